"""Baselines on data where the right answer is known."""

import numpy as np
import pytest
import scipy.sparse as sp

from scformer_jax import baselines

RNG = np.random.default_rng(0)
N_GENES = 12
GENES = [f"G{i}" for i in range(N_GENES)]


def additive_world():
    ctrl = RNG.uniform(1.0, 3.0, N_GENES)
    effect = {g: RNG.normal(0, 0.5, N_GENES) for g in ("G0", "G1", "G2", "G3")}
    train = {
        "ctrl": ctrl,
        "G0+ctrl": ctrl + effect["G0"],
        "ctrl+G1": ctrl + effect["G1"],
        "G2+ctrl": ctrl + effect["G2"],
        "G0+G2": ctrl + effect["G0"] + effect["G2"] + 0.3,
    }  # a non-additive training double
    return ctrl, effect, train


def test_control_baseline_is_exactly_the_control_mean():
    ctrl, _, train = additive_world()
    pred = baselines.fit_control_baseline(ctrl).predict(["G5+ctrl", "G0+G1", "ctrl"])
    for p in pred.values():
        np.testing.assert_array_equal(p, ctrl)


def test_mean_baseline_averages_training_perturbations():
    ctrl, effect, train = additive_world()
    base = baselines.fit_mean_baseline(train, ctrl)
    expected = np.mean([train[c] for c in ("G0+ctrl", "ctrl+G1", "G2+ctrl", "G0+G2")], axis=0)
    pred = base.predict(["G7+ctrl", "G4+G5", "ctrl"])
    np.testing.assert_allclose(pred["G7+ctrl"], expected)
    np.testing.assert_allclose(pred["G4+G5"], expected)
    np.testing.assert_array_equal(pred["ctrl"], ctrl)


def test_additive_baseline_predicts_an_additive_combo_exactly():
    ctrl, effect, train = additive_world()
    truth = ctrl + effect["G0"] + effect["G1"]  # a purely additive double
    base = baselines.fit_additive_baseline(train, ctrl)
    pred = base.predict(["G0+G1", "G1+G0", "G0+ctrl", "G0"])
    np.testing.assert_allclose(pred["G0+G1"], truth, atol=1e-12)
    np.testing.assert_allclose(pred["G1+G0"], truth, atol=1e-12)
    np.testing.assert_allclose(pred["G0+ctrl"], train["G0+ctrl"], atol=1e-12)
    np.testing.assert_allclose(pred["G0"], train["G0+ctrl"], atol=1e-12)


def test_additive_baseline_fallback_for_unseen_genes():
    ctrl, effect, train = additive_world()
    mean_single = np.mean([effect["G0"], effect["G1"], effect["G2"]], axis=0)
    base = baselines.fit_additive_baseline(train, ctrl)
    pred = base.predict(["G0+G9", "G9+ctrl"])
    np.testing.assert_allclose(pred["G0+G9"], ctrl + effect["G0"] + mean_single)
    np.testing.assert_allclose(pred["G9+ctrl"], ctrl + mean_single)
    assert base.unseen_genes(["G0+G9", "G0+G1"]) == {"G0+G9": ("G9",)}
    zero = baselines.fit_additive_baseline(train, ctrl, unseen_gene="zero")
    np.testing.assert_allclose(zero.predict(["G0+G9"])["G0+G9"], ctrl + effect["G0"])


def linear_world(n_cells=200, n_genes=N_GENES, k=3):
    """Profiles whose changes are exactly G W p, G the PCA of the training cells."""
    cells = RNG.gamma(2.0, 1.0, (n_cells, n_genes))
    centred = cells.T - cells.T.mean(axis=0, keepdims=True)  # genes x cells, cells centred
    u, s, _ = np.linalg.svd(centred, full_matrices=False)
    g = u[:, :k] * s[:k]
    w_true = RNG.normal(0, 0.05, (k, k))
    ctrl = RNG.uniform(1.0, 3.0, n_genes)

    def truth(cond):
        genes = [x for x in cond.split("+") if x != "ctrl"]
        return ctrl + g @ w_true @ g[[GENES.index(x) for x in genes]].sum(0)

    return cells, ctrl, truth


def test_linear_baseline_recovers_a_linear_ground_truth():
    cells, ctrl, truth = linear_world()
    train_conds = ["G0+ctrl", "G1+ctrl", "G2+ctrl", "G3+ctrl", "G4+ctrl", "G5+ctrl", "G0+G1"]
    train = {c: truth(c) for c in train_conds} | {"ctrl": ctrl}
    for expression in (cells, sp.csr_matrix(cells)):
        base = baselines.fit_linear_baseline(
            train, ctrl, GENES, train_expression=expression, n_components=3, ridge_penalty=0.0
        )
        test_conds = ["G7+ctrl", "G9+G10", "G2+G11"]
        pred = base.predict(test_conds + ["ctrl"])
        for c in test_conds:
            np.testing.assert_allclose(pred[c], truth(c), atol=1e-8)
        np.testing.assert_array_equal(pred["ctrl"], ctrl)
    # A huge ridge penalty shrinks W to 0: every perturbation gets the mean training change.
    ridge = baselines.fit_linear_baseline(
        train, ctrl, GENES, train_expression=cells, n_components=3, ridge_penalty=1e12
    )
    mean_change = np.mean([truth(c) - ctrl for c in train_conds] + [np.zeros(N_GENES)], axis=0)
    np.testing.assert_allclose(ridge.predict(["G7+ctrl"])["G7+ctrl"], ctrl + mean_change, atol=1e-6)


def test_linear_baseline_default_embedding_is_the_pseudobulk_pca():
    ctrl, effect, train = additive_world()
    base = baselines.fit_linear_baseline(train, ctrl, GENES, n_components=2)
    pseudobulk = np.column_stack([train[c] for c in train])  # 'ctrl' already included
    centred = pseudobulk - pseudobulk.mean(axis=0, keepdims=True)
    u, s, _ = np.linalg.svd(centred, full_matrices=False)
    g = u[:, :2] * s[:2]
    # Equal up to the sign of each component.
    np.testing.assert_allclose(np.abs(base.gene_embedding), np.abs(g), atol=1e-10)
    pred = base.predict(["G5+ctrl"])["G5+ctrl"]
    assert pred.shape == (N_GENES,) and np.all(np.isfinite(pred))


def test_pca_gene_embedding_sparse_iterative_path_matches_dense(monkeypatch):
    cells = RNG.poisson(0.7, (80, 30)).astype(float)
    dense = baselines.pca_gene_embedding(cells.T, 4)
    monkeypatch.setattr(baselines, "_DENSE_SVD_MAX_ENTRIES", 10)
    iterative = baselines.pca_gene_embedding(sp.csr_matrix(cells.T), 4)
    np.testing.assert_allclose(iterative, dense, atol=1e-8)


def test_coexpression_baseline_regresses_on_the_perturbed_gene_in_control_cells():
    from scformer_jax.prior import RIDGE

    ctrl, effect, train = additive_world()
    rng = np.random.default_rng(5)
    controls = ctrl + rng.normal(0, 0.3, (400, N_GENES))
    controls[:, 6] += 2.0 * (controls[:, 5] - ctrl[5])  # G5 drives G6 in the control cells
    base = baselines.fit_coexpression_baseline(train, ctrl, GENES, sp.csr_matrix(controls))
    d = np.mean([effect[g][int(g[1:])] for g in ("G0", "G1", "G2")])
    centred = controls - controls.mean(axis=0)
    var = centred.var(axis=0, ddof=1)
    beta5 = centred.T @ centred[:, 5] / (len(controls) - 1) / (var[5] + RIDGE * var.mean())
    beta5[5] = 1.0
    assert beta5[6] > 1.5  # the planted regulation is found
    pred = base.predict(["G5+ctrl", "G0+G5", "G0+G1", "G0+NOT_MEASURED", "ctrl"])
    np.testing.assert_allclose(pred["G5+ctrl"], ctrl + d * beta5, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(pred["G0+G5"], ctrl + effect["G0"] + d * beta5, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(pred["G0+G1"], ctrl + effect["G0"] + effect["G1"], atol=1e-9)
    np.testing.assert_allclose(pred["G0+NOT_MEASURED"], ctrl + effect["G0"], atol=1e-9)
    np.testing.assert_array_equal(pred["ctrl"], ctrl)
    fitted = baselines.fit_baselines(
        train, ctrl, GENES, n_components=2, control_expression=controls
    )
    assert list(fitted) == ["control", "train_mean", "additive", "linear", "coexpression"]
    # With the singles' errors: the additive baseline of the shrunk singles besides.
    errors = {g: np.full(len(ctrl), 0.05) for g in ("G0", "G1", "G2")}
    with_errors = baselines.fit_baselines(
        train, ctrl, GENES, n_components=2, single_squared_errors=errors
    )
    assert list(with_errors)[-1] == "additive_shrunk"
    shrunk = with_errors["additive_shrunk"].predict(["G0+G1"])["G0+G1"]
    raw = with_errors["additive"].predict(["G0+G1"])["G0+G1"]
    assert not np.allclose(shrunk, raw)
    from scformer_jax.prior import shrink_single_changes

    expected = shrink_single_changes({g: effect[g] for g in errors}, errors)
    np.testing.assert_allclose(shrunk, ctrl + expected["G0"] + expected["G1"], atol=1e-5)
    # The shrinkage follows model.shrink_prior.
    adaptive = baselines.fit_baselines(
        train,
        ctrl,
        GENES,
        n_components=2,
        single_squared_errors=errors,
        shrink_prior="adaptive",
    )["additive_shrunk"].predict(["G0+G1"])["G0+G1"]
    expected = shrink_single_changes({g: effect[g] for g in errors}, errors, prior="adaptive")
    np.testing.assert_allclose(adaptive, ctrl + expected["G0"] + expected["G1"], atol=1e-5)
    assert not np.allclose(adaptive, shrunk)
    with pytest.raises(ValueError, match="squared_errors has no entry"):
        baselines.fit_additive_baseline(train, ctrl, squared_errors={"G0": errors["G0"]})
    with pytest.raises(ValueError, match="control_expression"):
        baselines.fit_coexpression_baseline(train, ctrl, GENES, controls[:, :5])


def test_fit_baselines_names_and_shapes():
    ctrl, effect, train = additive_world()
    fitted = baselines.fit_baselines(train, ctrl, GENES, n_components=2)
    assert list(fitted) == ["control", "train_mean", "additive", "linear"]
    for b in fitted.values():
        pred = b.predict(["G0+G1", "G8+ctrl"])
        assert set(pred) == {"G0+G1", "G8+ctrl"}
        assert all(p.shape == (N_GENES,) for p in pred.values())


def test_bad_inputs_raise_clear_errors():
    ctrl, effect, train = additive_world()
    linear = baselines.fit_linear_baseline(train, ctrl, GENES)
    with pytest.raises(
        ValueError, match="'g5' of condition 'G0\\+g5' is not among.*Close matches: G5"
    ):
        linear.predict(["G0+g5"])
    with pytest.raises(ValueError, match="'XYZ' .*not among"):
        baselines.fit_linear_baseline(dict(train, **{"XYZ+ctrl": ctrl}), ctrl, GENES)
    linear = baselines.fit_linear_baseline(train, ctrl, GENES, unmeasured_genes="ignore")
    mean_change = np.mean([train[c] - ctrl for c in train], axis=0)  # incl. ctrl's zero
    np.testing.assert_allclose(linear.predict(["XYZ+ctrl"])["XYZ+ctrl"], ctrl + mean_change)
    bad = dict(train, **{"G3+ctrl": np.full(N_GENES, np.nan)})
    for fit in (baselines.fit_mean_baseline, baselines.fit_additive_baseline):
        with pytest.raises(ValueError, match="NaN"):
            fit(bad, ctrl)
    with pytest.raises(ValueError, match="NaN"):
        baselines.fit_control_baseline(np.full(N_GENES, np.nan))
    with pytest.raises(ValueError, match="genes but ctrl_mean"):
        baselines.fit_mean_baseline(dict(train, **{"G3+ctrl": np.ones(5)}), ctrl)
    with pytest.raises(ValueError, match="no perturbed condition"):
        baselines.fit_additive_baseline({"ctrl": ctrl}, ctrl)
    with pytest.raises(ValueError, match="gene_names has 3 names"):
        baselines.fit_linear_baseline(train, ctrl, GENES[:3])
    with pytest.raises(ValueError, match="train_expression contains NaN"):
        cells = RNG.uniform(0, 1, (20, N_GENES))
        cells[0, 0] = np.nan
        baselines.fit_linear_baseline(train, ctrl, GENES, train_expression=cells)
    with pytest.raises(ValueError, match="Malformed condition"):
        baselines.fit_control_baseline(ctrl).predict(["A+B+C"])
    with pytest.raises(ValueError, match="list of conditions"):
        baselines.fit_control_baseline(ctrl).predict("G0+ctrl")
