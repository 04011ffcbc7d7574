"""GEARS metrics against NumPy/SciPy values written here, on small hand-made profiles."""

import warnings

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from scipy.stats import pearsonr

from scformer_jax import metrics
from tests.parity import require

RNG = np.random.default_rng(0)


def sign_agree(p, t):
    return float(np.mean(np.sign(p) == np.sign(t)))


def hand_case(n_genes=25):
    """Non-negative profiles with exact zeros, and a rank order unlike the gene order."""
    ctrl = np.linspace(0.0, 2.4, n_genes)  # gene 0 is unexpressed in control
    true = ctrl.copy()
    true[[3, 7, 11]] += [1.0, -0.5, 2.0]
    true[0] = 0.0
    true[5] = 0.0  # expressed in control, lost: a dropout
    pred = ctrl + 0.1 * np.cos(np.arange(n_genes))
    pred[0] = 0.0
    de = np.array(
        [11, 3, 7, 5, 0] + [i for i in range(n_genes - 1, -1, -1) if i not in (11, 3, 7, 5, 0)]
    )
    return pred, true, ctrl, de


def test_pearson_matches_scipy_and_constant_gives_zero_without_warning():
    x, y = RNG.normal(size=30), RNG.normal(size=30)
    assert metrics.pearson(x, y) == pytest.approx(pearsonr(x, y)[0], abs=1e-12)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert metrics.pearson(np.full(5, 2.0), RNG.normal(size=5)) == 0.0
        assert metrics.pearson(RNG.normal(size=5), np.zeros(5)) == 0.0
        assert metrics.pearson([1.0], [2.0]) == 0.0
    assert metrics.mse([1, 2, 3], [1, 0, 0]) == pytest.approx((0 + 4 + 9) / 3)


def test_direction_fractions_count_zero_changes():
    p = np.array([1.0, -1.0, 0.0, 0.0, 2.0])
    t = np.array([2.0, 1.0, 0.0, 3.0, 0.0])
    assert metrics.direction_fractions(p, t) == pytest.approx((2 / 5, 1 / 5, 2 / 5))


def test_perturbation_metrics_on_hand_made_profiles():
    pred, true, ctrl, de = hand_case()
    m = metrics.perturbation_metrics(pred, true, ctrl, de)
    top = de[:20]
    dp, dt = pred - ctrl, true - ctrl
    assert m["mse"] == pytest.approx(np.mean((pred - true) ** 2))
    assert m["pearson"] == pytest.approx(pearsonr(pred, true)[0])
    assert m["mse_de"] == pytest.approx(np.mean((pred[top] - true[top]) ** 2))
    assert m["pearson_de"] == pytest.approx(pearsonr(pred[top], true[top])[0])
    assert m["pearson_delta"] == pytest.approx(pearsonr(dp, dt)[0])
    assert m["pearson_de_delta"] == pytest.approx(pearsonr(dp[top], dt[top])[0])
    assert m["pearson_delta_top20_de"] == m["pearson_de_delta"]
    assert m["mse_top20_de"] == pytest.approx(m["mse_de"])
    assert m["frac_correct_direction_all"] == pytest.approx(sign_agree(dp, dt))
    assert m["frac_correct_direction_20"] == pytest.approx(sign_agree(dp[top], dt[top]))
    nonzero = [g for g in top if true[g] != 0]
    assert len(nonzero) == 18
    assert m["frac_correct_direction_20_nonzero"] == pytest.approx(
        sign_agree(dp[nonzero], dt[nonzero])
    )
    # 25 genes: the top-50 and beyond are undefined, not silently computed on 25 genes.
    for k in (50, 100, 200):
        assert np.isnan(m[f"pearson_top{k}_de"]) and np.isnan(m[f"frac_correct_direction_{k}"])
    assert "pearson_top20_de_non_dropout" not in m


def test_top_k_metrics_on_random_profiles():
    n = 230
    ctrl = RNG.uniform(0, 3, n)
    true = ctrl + RNG.normal(0, 0.5, n)
    pred = ctrl + 0.5 * (true - ctrl) + RNG.normal(0, 0.3, n)
    de = RNG.permutation(n)
    m = metrics.perturbation_metrics(pred, true, ctrl, de)
    for k in (20, 50, 100, 200):
        idx = de[:k]
        assert m[f"pearson_top{k}_de"] == pytest.approx(pearsonr(pred[idx], true[idx])[0])
        assert m[f"pearson_delta_top{k}_de"] == pytest.approx(
            pearsonr(pred[idx] - ctrl[idx], true[idx] - ctrl[idx])[0]
        )
        assert m[f"mse_top{k}_de"] == pytest.approx(np.mean((pred[idx] - true[idx]) ** 2))
        assert m[f"frac_correct_direction_{k}"] == pytest.approx(
            sign_agree(pred[idx] - ctrl[idx], true[idx] - ctrl[idx])
        )


def test_nonzero_direction_pairs_each_gene_with_its_own_control():
    # Gene order and rank order differ; GEARS pairs pred_de (gene order) with
    # ctrl[de_idx] (rank order). Here the correct pairing gives 1.0 and GEARS's less.
    n = 40
    de = np.arange(39, 19, -1)  # ranks 39, 38, ..., 20
    ctrl = np.ones(n)
    ctrl[de] = np.linspace(1.0, 10.0, 20)  # control rises with rank
    true = ctrl.copy()
    true[de] = ctrl[de] + 0.5  # every DE gene goes up
    pred = ctrl.copy()
    pred[de] = ctrl[de] + 5.0  # right direction, wrong size
    m = metrics.perturbation_metrics(pred, true, ctrl, de)
    assert m["frac_correct_direction_20_nonzero"] == 1.0
    gene_order = np.sort(de)
    gears_mixed = sign_agree(pred[gene_order] - ctrl[de], true[gene_order] - ctrl[de])
    assert gears_mixed == pytest.approx(0.8)


def test_non_dropout_metrics():
    pred, true, ctrl, de = hand_case()
    nd = metrics.top_non_dropout_de(de, true, ctrl)
    assert 5 not in nd  # the dropout gene is excluded
    assert 0 in nd  # zero in both: not a dropout
    expected = [g for g in de if g != 5][:20]
    np.testing.assert_array_equal(nd, expected)
    m = metrics.perturbation_metrics(pred, true, ctrl, de, nd)
    dp, dt = pred[nd] - ctrl[nd], true[nd] - ctrl[nd]
    assert m["pearson_top20_de_non_dropout"] == pytest.approx(pearsonr(pred[nd], true[nd])[0])
    assert m["pearson_delta_top20_de_non_dropout"] == pytest.approx(pearsonr(dp, dt)[0])
    assert m["mse_top20_de_non_dropout"] == pytest.approx(np.mean((dp - dt) ** 2))
    diff = np.abs(np.sign(dp) - np.sign(dt))
    assert m["frac_correct_direction_top20_non_dropout"] == pytest.approx(np.mean(diff == 0))
    assert m["frac_opposite_direction_top20_non_dropout"] == pytest.approx(np.mean(diff == 2))
    assert m["frac_0/1_direction_top20_non_dropout"] == pytest.approx(np.mean(diff == 1))


def make_set(n_genes=30):
    ctrl = RNG.uniform(0.5, 2.0, n_genes)
    conds = ["A+ctrl", "B+ctrl", "A+B", "C+D"]
    true = {c: ctrl + RNG.normal(0, 0.5, n_genes) for c in conds}
    pred = {c: ctrl + 0.5 * (true[c] - ctrl) + RNG.normal(0, 0.2, n_genes) for c in conds}
    de = {c: np.argsort(-np.abs(true[c] - ctrl)) for c in conds}
    return pred, true, ctrl, de


def test_evaluate_profiles_averages_overall_and_per_subgroup():
    pred, true, ctrl, de = make_set()
    subgroups = {
        "unseen_single": ["A+ctrl", "B+ctrl"],
        "combo_seen1": ["A+B"],
        "combo_seen0": ["C+D"],
        "combo_seen2": [],
    }
    res = metrics.evaluate_profiles(pred, true, ctrl, de, subgroups=subgroups)
    table = res.per_perturbation
    assert list(table.index) == list(true)
    assert table.loc["A+B", "subgroup"] == "combo_seen1"
    per_cond = {c: pearsonr(pred[c] - ctrl, true[c] - ctrl)[0] for c in true}
    assert table.loc["C+D", "pearson_delta"] == pytest.approx(per_cond["C+D"])
    assert res.overall["pearson_delta"] == pytest.approx(np.mean(list(per_cond.values())))
    assert res.per_subgroup["unseen_single"]["pearson_delta"] == pytest.approx(
        (per_cond["A+ctrl"] + per_cond["B+ctrl"]) / 2
    )
    mse_de = np.mean([np.mean((pred[c][de[c][:20]] - true[c][de[c][:20]]) ** 2) for c in true])
    assert res.overall["mse_de"] == pytest.approx(mse_de)
    # Empty subgroup: absent, not NaN; undefined top-k metrics: absent from the averages.
    assert "combo_seen2" not in res.per_subgroup
    assert res.subgroup_sizes == {"unseen_single": 2, "combo_seen1": 1, "combo_seen0": 1}
    assert "pearson_top50_de" not in res.overall
    assert all(np.isfinite(v) for v in res.overall.values())
    d = res.to_dict()
    assert set(d) == {"overall", "per_subgroup", "subgroup_sizes", "notes"}


def test_subgroup_members_without_predictions_are_skipped_and_noted():
    pred, true, ctrl, de = make_set()
    res = metrics.evaluate_profiles(
        pred, true, ctrl, de, subgroups={"combo_seen2": ["X+Y"], "combo_seen1": ["A+B", "Z+W"]}
    )
    assert "combo_seen2" not in res.per_subgroup
    assert res.subgroup_sizes["combo_seen1"] == 1
    assert any("Z+W" in n for n in res.notes)


def test_constant_prediction_is_zero_and_noted_without_warnings():
    pred, true, ctrl, de = make_set()
    no_change = {c: ctrl.copy() for c in true}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        res = metrics.evaluate_profiles(no_change, true, ctrl, de)
    assert res.overall["pearson_delta"] == 0.0
    assert res.overall["frac_correct_direction_all"] == 0.0
    assert len(res.notes) == len(true) and "pearson_delta" in res.notes[0]


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda p, t, c, d: p.pop("A+B"), "no prediction"),
        (lambda p, t, c, d: d.pop("A+B"), "no DE gene indices"),
        (lambda p, t, c, d: p.__setitem__("A+B", np.full(c.shape, np.nan)), "NaN"),
        (lambda p, t, c, d: p.__setitem__("A+B", np.zeros(c.size + 1)), "genes but ctrl_mean"),
        (lambda p, t, c, d: p.__setitem__("A+B", np.zeros((3, c.size))), "1-D profile"),
        (lambda p, t, c, d: d.__setitem__("A+B", np.array([0, c.size])), "outside"),
        (lambda p, t, c, d: d.__setitem__("A+B", np.array([1, 1])), "repeats"),
        (lambda p, t, c, d: d.__setitem__("A+B", np.array([0.5, 1.0])), "integer"),
    ],
)
def test_bad_input_raises_clear_errors(mutate, match):
    pred, true, ctrl, de = make_set()
    mutate(pred, true, ctrl, de)
    with pytest.raises(ValueError, match=match):
        metrics.evaluate_profiles(pred, true, ctrl, de)


def test_mean_profiles_dense_and_sparse():
    values = RNG.uniform(0, 1, (7, 4))
    values[values < 0.3] = 0.0
    conds = np.array(["b", "a", "b", "ctrl", "a", "a", "b"])
    for v in (values, sp.csr_matrix(values)):
        means = metrics.mean_profiles(v, conds)
        assert list(means) == ["b", "a", "ctrl"]
        for c in means:
            np.testing.assert_allclose(means[c], values[conds == c].mean(0))
    with pytest.raises(ValueError, match="one condition name per cell"):
        metrics.mean_profiles(values, conds[:3])


def test_de_indices_from_gene_lists_keeps_rank_order_and_names_unknown_genes():
    genes = ["g0", "GATA1", "g2", "TP53"]
    out = metrics.de_indices_from_gene_lists({"A+ctrl": ["TP53", "g0", "GATA1"]}, genes)
    np.testing.assert_array_equal(out["A+ctrl"], [3, 0, 1])
    with pytest.raises(ValueError, match="GATA1"):
        metrics.de_indices_from_gene_lists({"A+ctrl": ["GATA2"]}, genes)


def test_evaluate_gears_results_matches_evaluate_profiles():
    pred, true, ctrl, de = make_set(n_genes=24)
    cats, p_cells, t_cells = [], [], []
    for c in list(true) + ["ctrl"]:
        for _ in range(3):
            cats.append(c)
            base_t = true.get(c, ctrl)
            base_p = pred.get(c, ctrl)
            t_cells.append(base_t + RNG.normal(0, 0.1, ctrl.size))
            p_cells.append(base_p + RNG.normal(0, 0.1, ctrl.size))
    test_res = {"pert_cat": np.array(cats), "pred": np.array(p_cells), "truth": np.array(t_cells)}
    res = metrics.evaluate_gears_results(test_res, ctrl, de)
    assert "ctrl" not in res.per_perturbation.index
    cats = np.array(cats)
    direct = metrics.evaluate_profiles(
        {c: np.mean(np.array(p_cells)[cats == c], 0) for c in true},
        {c: np.mean(np.array(t_cells)[cats == c], 0) for c in true},
        ctrl,
        de,
    )
    for k, v in direct.overall.items():
        assert res.overall[k] == pytest.approx(v)
    assert metrics.to_gears_names({"pearson_de_delta": 1.0, "mse": 2.0}) == {
        "pearson_delta_de": 1.0,
        "mse": 2.0,
    }


# --------------------------------------------------------------------------------------
# Calibrated metrics.
# --------------------------------------------------------------------------------------


def test_average_perturbed_profile_scores_high_against_control_and_zero_against_pert_ref():
    # Every perturbation shares a large systematic shift over control plus a small effect
    # of its own; predicting the average perturbed profile knows nothing about the effect.
    n_genes, rng = 300, np.random.default_rng(1)
    ctrl = rng.uniform(0.5, 2.0, n_genes)
    shift = rng.normal(0.0, 1.0, n_genes)
    effects = {f"G{i}+ctrl": rng.normal(0.0, 0.3, n_genes) for i in range(60)}
    profiles = {c: ctrl + shift + e for c, e in effects.items()}
    train, test = list(profiles)[:40], list(profiles)[40:]
    n_cells = {c: int(rng.integers(20, 200)) for c in train}
    pert_ref = sum(n_cells[c] * profiles[c] for c in train) / sum(n_cells.values())
    average = np.mean([profiles[c] for c in train], axis=0)
    pred = {c: average for c in test}
    true = {c: profiles[c] for c in test}
    de = {c: np.argsort(-np.abs(true[c] - ctrl)) for c in test}
    res = metrics.evaluate_profiles(pred, true, ctrl, de, pert_ref=pert_ref)
    assert res.overall["pearson_delta"] > 0.9
    assert abs(res.overall["pearson_delta_pert"]) < 0.1
    # The true effect itself is recovered under both references.
    exact = metrics.evaluate_profiles(true, true, ctrl, de, pert_ref=pert_ref)
    assert exact.overall["pearson_delta_pert"] == pytest.approx(1.0)
    # Per perturbation the value is Pearson of the changes over the reference.
    c = test[0]
    assert res.per_perturbation.loc[c, "pearson_delta_pert"] == pytest.approx(
        pearsonr(average - pert_ref, true[c] - pert_ref)[0]
    )
    top = de[c][:20]
    assert res.per_perturbation.loc[c, "pearson_de_delta_pert"] == pytest.approx(
        pearsonr(average[top] - pert_ref[top], true[c][top] - pert_ref[top])[0]
    )


def test_weighted_change_metrics_against_numpy():
    n = 50
    ctrl = RNG.uniform(0, 2, n)
    true = ctrl + RNG.normal(0, 1, n)
    pred = ctrl + 0.7 * (true - ctrl) + RNG.normal(0, 0.3, n)
    t = RNG.normal(0, 5, n)
    w = (np.abs(t) / np.abs(t).max()) ** 2
    np.testing.assert_allclose(metrics.de_weights(t), w)
    assert metrics.de_weights(np.zeros(4)).tolist() == [0, 0, 0, 0]
    m = metrics.perturbation_metrics(
        pred, true, ctrl, np.argsort(-np.abs(t)), pert_ref=ctrl, de_weights=w
    )
    dp, dt = pred - ctrl, true - ctrl
    assert m["wmse_delta"] == pytest.approx(np.sum(w * (dp - dt) ** 2) / np.sum(w))
    mean_w = np.sum(w * dt) / np.sum(w)
    assert m["r2_w_delta"] == pytest.approx(
        1 - np.sum(w * (dp - dt) ** 2) / np.sum(w * (dt - mean_w) ** 2)
    )
    perfect = metrics.perturbation_metrics(
        true, true, ctrl, np.arange(n), pert_ref=ctrl, de_weights=w
    )
    assert perfect["r2_w_delta"] == 1.0 and perfect["wmse_delta"] == 0.0
    assert np.isnan(metrics.weighted_mse(dp, dt, np.zeros(n)))
    # Welch's t as scanpy's t-test computes it, from cells.
    a, b = RNG.normal(1, 1, (12, n)), RNG.normal(0, 2, (30, n))
    expected = (a.mean(0) - b.mean(0)) / np.sqrt(a.var(0, ddof=1) / 12 + b.var(0, ddof=1) / 30)
    np.testing.assert_allclose(
        metrics.welch_t(a.mean(0), a.var(0, ddof=1), 12, b.mean(0), b.var(0, ddof=1), 30), expected
    )


def test_de_overlap_and_sign_agreement():
    change = np.array([0.0, 3.0, -2.0, 0.5, -0.1, 1.0])
    de = np.array([1, 2, 5, 0, 3, 4])
    assert metrics.top_k_overlap(change, de, 2) == 1.0  # {1, 2} both ways
    assert metrics.top_k_overlap(change, de, 3) == 1.0  # {1, 2, 5}
    assert metrics.top_k_overlap(change, np.array([4, 1]), 1) == 0.0  # top-1 is gene 1
    # A prediction of no change names no DE gene; too few DE genes give NaN.
    assert metrics.top_k_overlap(np.zeros(6), de, 3) == 0.0
    assert np.isnan(metrics.top_k_overlap(change, de[:2], 3))
    true = np.array([1.0, -1.0, 0.0, 2.0])
    pred = np.array([2.0, 1.0, 5.0, 0.0])
    # Gene 2 has no true change (left out); gene 3's predicted 0 does not agree.
    assert metrics.sign_agreement(pred, true) == pytest.approx(1 / 3)
    assert np.isnan(metrics.sign_agreement(pred, np.zeros(4)))


def test_energy_distance_against_scipy():
    from scipy.spatial.distance import cdist

    x, y = RNG.normal(0, 1, (7, 5)), RNG.normal(1, 1, (9, 5))
    expected = 2 * cdist(x, y).mean() - cdist(x, x).mean() - cdist(y, y).mean()
    assert metrics.energy_distance(x, y, unbiased=False) == pytest.approx(expected, abs=1e-9)
    assert metrics.energy_distance(x, x, unbiased=False) == pytest.approx(0.0, abs=1e-6)
    # Unbiased: within-set means over distinct pairs only.
    within = [cdist(z, z).sum() / (len(z) * (len(z) - 1)) for z in (x, y)]
    assert metrics.energy_distance(x, y) == pytest.approx(
        2 * cdist(x, y).mean() - within[0] - within[1], abs=1e-9
    )
    # Two samples of one distribution: about 0 unbiased, biased upwards by small sets.
    big = RNG.normal(0, 1, (400, 5))
    assert abs(metrics.energy_distance(big[:200], big[200:])) < 0.05
    assert metrics.energy_distance(big[:10], big[10:20], unbiased=False) > 0.2
    assert metrics.energy_distance(x, x + 5) > metrics.energy_distance(x, x + 1) > 0
    with pytest.raises(ValueError, match="same genes"):
        metrics.energy_distance(x, y[:, :4])


def test_discrimination_scores():
    truth = {f"P{i}": RNG.normal(0, 1, 40) for i in range(8)}
    perfect = metrics.discrimination_scores(truth, truth)
    assert all(v == 1.0 for v in perfect.values())
    # A prediction closest to another perturbation's profile ranks its own lower.
    shifted = {c: truth[f"P{(i + 1) % 8}"] for i, c in enumerate(truth)}
    scores = metrics.discrimination_scores(shifted, truth)
    for c, v in scores.items():
        dist = [np.abs(truth[o] - shifted[c]).sum() for o in truth]
        rank = sum(d < np.abs(truth[c] - shifted[c]).sum() for d in dist)
        assert v == pytest.approx(1 - rank / 8)
        assert v < 1.0
    # One prediction for everything ranks each truth by its distance to it: mean 0.5 + 1/2n.
    same = {c: np.zeros(40) for c in truth}
    assert np.mean(list(metrics.discrimination_scores(same, truth).values())) == pytest.approx(
        0.5 + 1 / 16
    )
    # Excluded columns do not count: a prediction right only on them is not discriminated.
    pred = {c: np.zeros(40) for c in truth}
    pred["P0"][:5] = 100.0
    truth0 = {c: np.zeros(40) + 0.01 * i for i, c in enumerate(truth)}
    truth0["P0"] = np.zeros(40) + 0.05
    truth0["P0"][:5] = 100.0
    assert metrics.discrimination_scores(pred, truth0)["P0"] == 1.0
    excluded = metrics.discrimination_scores(pred, truth0, exclude_idx={"P0": np.arange(5)})
    assert excluded["P0"] < 0.5


def test_gene_set_direction_fractions():
    pred, true, ctrl, de = hand_case()
    nz = np.flatnonzero(true != 0)
    ndg = np.flatnonzero((true != 0) | (ctrl == 0))
    m = metrics.perturbation_metrics(pred, true, ctrl, de, non_zero_idx=nz, non_dropout_idx=ndg)
    for subset, idx in (("non_zero", nz), ("non_dropout", ndg)):
        diff = np.abs(np.sign(pred[idx] - ctrl[idx]) - np.sign(true[idx] - ctrl[idx]))
        assert m[f"frac_correct_direction_{subset}"] == pytest.approx(np.mean(diff == 0))
        assert m[f"frac_opposite_direction_{subset}"] == pytest.approx(np.mean(diff == 2))
        assert m[f"frac_0/1_direction_{subset}"] == pytest.approx(np.mean(diff == 1))
    with pytest.raises(ValueError, match="both or neither"):
        metrics.perturbation_metrics(pred, true, ctrl, de, non_zero_idx=nz)


def test_evaluate_profiles_calibrated_columns_and_energy_distance():
    pred, true, ctrl, de = make_set()
    weights = {c: np.ones(ctrl.size) for c in true}
    cells_t = {c: true[c] + RNG.normal(0, 0.1, (6, ctrl.size)) for c in true}
    cells_p = {c: pred[c] + RNG.normal(0, 0.1, (5, ctrl.size)) for c in list(true)[:3]}
    res = metrics.evaluate_profiles(
        pred,
        true,
        ctrl,
        de,
        pert_ref=ctrl + 0.1,
        de_weights=weights,
        pred_cells=cells_p,
        true_cells=cells_t,
    )
    table = res.per_perturbation
    assert set(metrics.CALIBRATED_METRIC_NAMES) <= set(table.columns)
    c = list(true)[0]
    assert table.loc[c, "energy_distance"] == pytest.approx(
        metrics.energy_distance(cells_p[c], cells_t[c])
    )
    assert np.isnan(table.loc["C+D", "energy_distance"])  # no predicted cells
    # Uniform weights: the weighted MSE of the change is the plain MSE.
    assert table.loc[c, "wmse_delta"] == pytest.approx(table.loc[c, "mse"])
    with pytest.raises(ValueError, match="no DE weights"):
        metrics.evaluate_profiles(pred, true, ctrl, de, pert_ref=ctrl, de_weights={})
    plain = metrics.evaluate_profiles(pred, true, ctrl, de)
    assert not set(metrics.CALIBRATED_METRIC_NAMES) & set(plain.per_perturbation.columns)


# --------------------------------------------------------------------------------------
# Against GEARS itself (cell-gears 0.1.2, needs torch and torch_geometric; required in CI).
# --------------------------------------------------------------------------------------


def test_against_gears_functions():
    require("torch")
    require("torch_geometric")
    inference = require("gears.inference")
    import anndata

    n_genes, n_cells = 210, 6
    gene_ids = np.array([f"ENSG{i:05d}" for i in range(n_genes)])
    ctrl_base = RNG.uniform(0.2, 3.0, n_genes)
    ctrl_base[:15] = 0.0  # genes unexpressed in control
    conds = ["A+ctrl", "B+ctrl", "A+B"]
    blocks, obs = [], []
    ranked, pred_cells, truth_cells, cats = {}, [], [], []
    for _ in range(n_cells * 2):
        blocks.append(np.maximum(ctrl_base + RNG.normal(0, 0.2, n_genes), 0) * (ctrl_base > 0))
        obs.append(("ctrl", "K562_ctrl_1"))
    for c in conds:
        shift = RNG.normal(0, 1.0, n_genes)
        dropped = RNG.choice(np.arange(15, n_genes), 4, replace=False)
        for _ in range(n_cells):
            cell = np.maximum(ctrl_base + shift + RNG.normal(0, 0.2, n_genes), 0)
            cell[dropped] = 0.0  # dropouts: expressed in ctrl, 0 here
            blocks.append(cell)
            obs.append((c, f"K562_{c}_1+1"))
            truth_cells.append(cell)
            pred_cells.append(np.maximum(ctrl_base + 0.6 * shift + RNG.normal(0, 0.3, n_genes), 0))
            cats.append(c)
        ranked[f"K562_{c}_1+1"] = gene_ids[RNG.permutation(n_genes)]
    X = np.array(blocks)
    adata = anndata.AnnData(
        X=sp.csr_matrix(X.astype(np.float32)),
        obs=pd.DataFrame(obs, columns=["condition", "condition_name"]),
        var=pd.DataFrame({"gene_name": [f"G{i}" for i in range(n_genes)]}, index=gene_ids),
    )
    ctrl_mean = np.asarray(adata.X[adata.obs.condition.values == "ctrl"].mean(0)).ravel()

    de_idx, nd_idx, uns_nd, uns_nz, uns_ndg = {}, {}, {}, {}, {}
    for c in conds:
        name = f"K562_{c}_1+1"
        rank = np.array([int(g[4:]) for g in ranked[name]])
        de_idx[c] = rank
        pert_mean = np.asarray(adata.X[adata.obs.condition.values == c].mean(0)).ravel()
        nd_idx[c] = metrics.top_non_dropout_de(rank, pert_mean, ctrl_mean)
        uns_nd[name] = gene_ids[nd_idx[c]]
        uns_nz[name] = np.where(pert_mean != 0)[0]
        uns_ndg[name] = np.where((pert_mean != 0) | (ctrl_mean == 0))[0]
    adata.uns["rank_genes_groups_cov_all"] = ranked
    adata.uns["top_non_dropout_de_20"] = uns_nd
    adata.uns["non_zeros_gene_idx"] = uns_nz
    adata.uns["non_dropout_gene_idx"] = uns_ndg

    pred_cells, truth_cells, cats = (np.array(pred_cells), np.array(truth_cells), np.array(cats))
    # GEARS's loader stores the top-20 DE genes in gene order (np.where(isin(...))).
    gears_de = {c: np.sort(de_idx[c][:20]) for c in conds}
    test_res = {
        "pert_cat": cats,
        "pred": pred_cells,
        "truth": truth_cells,
        "pred_de": np.array([p[gears_de[c]] for p, c in zip(pred_cells, cats)]),
        "truth_de": np.array([t[gears_de[c]] for t, c in zip(truth_cells, cats)]),
    }
    nz_idx = {c: uns_nz[f"K562_{c}_1+1"] for c in conds}
    ndg_idx = {c: uns_ndg[f"K562_{c}_1+1"] for c in conds}
    ours = metrics.evaluate_gears_results(
        test_res, ctrl_mean, de_idx, nd_idx, non_zero_idx=nz_idx, non_dropout_idx=ndg_idx
    ).per_perturbation
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, gears_basic = inference.compute_metrics(test_res)
        gears_deep = inference.deeper_analysis(adata, test_res)
        gears_nd = inference.non_dropout_analysis(adata, test_res)
    differs_by_design = {"frac_correct_direction_20_nonzero"}
    for c in conds:
        gears = {**gears_basic[c], **gears_deep[c], **gears_nd[c]}
        compared = 0
        for name in metrics.METRIC_NAMES:
            gname = metrics.GEARS_METRIC_NAMES.get(name, name)
            if name in differs_by_design or gname not in gears:
                continue
            assert ours.loc[c, name] == pytest.approx(float(gears[gname]), abs=1e-6), (c, name)
            compared += 1
        assert compared == len(metrics.METRIC_NAMES) - len(differs_by_design)
        # Ours pairs each DE gene with its own control value (see the module docstring).
        top = de_idx[c][:20]
        p = pred_cells[cats == c].mean(0)
        t = truth_cells[cats == c].mean(0)
        nz = top[t[top] != 0]
        assert ours.loc[c, "frac_correct_direction_20_nonzero"] == pytest.approx(
            sign_agree(p[nz] - ctrl_mean[nz], t[nz] - ctrl_mean[nz])
        )
