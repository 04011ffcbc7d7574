"""Our metrics against Arc Institute's cell-eval on a small fixture (shared definitions).

cell-eval compares predicted with real cells per perturbation (named by its target gene)
against a control group. The fixture gives both the same control cells, so cell-eval's
change over the predicted control equals ours over the control mean. Required in CI
(``SCFORMER_REQUIRE_PARITY=1``), skipped locally when cell-eval is not installed.
"""

import numpy as np
import pandas as pd
import pytest
from scipy.stats import pearsonr

from scformer_jax import metrics
from tests.parity import require

CONTROL = "non-targeting"
N_GENES, N_PERTS = 30, 6
TOL = 1e-6


def fixture():
    """Real and predicted cells: control + 6 perturbations of genes G1..G6."""
    rng = np.random.default_rng(7)
    genes = np.array([f"G{i}" for i in range(N_GENES)])
    base = rng.uniform(0.5, 3.0, N_GENES)
    control = np.maximum(base + rng.normal(0, 0.3, (12, N_GENES)), 0)
    real, pred, labels_real, labels_pred = [control], [control], [CONTROL] * 12, [CONTROL] * 12
    for p in range(1, N_PERTS + 1):
        effect = rng.normal(0, 1.0, N_GENES)
        effect[p] = -2.0  # the target gene goes down
        n_real, n_pred = 8 + p, 10
        real.append(np.maximum(base + effect + rng.normal(0, 0.3, (n_real, N_GENES)), 0))
        guess = 0.3 * effect + rng.normal(0, 0.9, N_GENES)
        pred.append(np.maximum(base + guess + rng.normal(0, 0.3, (n_pred, N_GENES)), 0))
        labels_real += [genes[p]] * n_real
        labels_pred += [genes[p]] * n_pred
    return genes, np.vstack(real), np.array(labels_real), np.vstack(pred), np.array(labels_pred)


@pytest.fixture(scope="module")
def data():
    genes, real, lab_r, pred, lab_p = fixture()
    perts = [g for g in genes[1 : N_PERTS + 1]]
    ctrl = real[lab_r == CONTROL].mean(0)
    return {
        "genes": genes,
        "real": real,
        "lab_r": lab_r,
        "pred": pred,
        "lab_p": lab_p,
        "perts": perts,
        "ctrl": ctrl,
        "true_mean": {p: real[lab_r == p].mean(0) for p in perts},
        "pred_mean": {p: pred[lab_p == p].mean(0) for p in perts},
    }


@pytest.fixture(scope="module")
def pair(data):
    require("cell_eval")
    import anndata
    from cell_eval._types import PerturbationAnndataPair

    def adata(x, labels):
        return anndata.AnnData(
            X=x.astype(np.float64),
            obs=pd.DataFrame({"target": labels}, index=[str(i) for i in range(len(labels))]),
            var=pd.DataFrame(index=data["genes"]),
        )

    return PerturbationAnndataPair(
        real=adata(data["real"], data["lab_r"]),
        pred=adata(data["pred"], data["lab_p"]),
        pert_col="target",
        control_pert=CONTROL,
    )


def test_profile_metrics_match_cell_eval(data, pair):
    from cell_eval.metrics import mse, pearson_delta

    ce_pd, ce_mse = pearson_delta(pair), mse(pair)
    assert sorted(ce_pd) == sorted(data["perts"])
    for p in data["perts"]:
        ours = metrics.perturbation_metrics(
            data["pred_mean"][p], data["true_mean"][p], data["ctrl"], np.arange(N_GENES)
        )
        assert ours["pearson_delta"] == pytest.approx(ce_pd[p], abs=TOL)
        assert ours["mse"] == pytest.approx(ce_mse[p], abs=TOL)


@pytest.mark.parametrize("metric", ["l1", "l2"])
def test_discrimination_matches_cell_eval(data, pair, metric):
    from cell_eval.metrics import discrimination_score

    ce = discrimination_score(pair, metric=metric)
    # cell-eval leaves out the column named like the perturbation (its target gene).
    exclude = {p: np.flatnonzero(data["genes"] == p) for p in data["perts"]}
    ours = metrics.discrimination_scores(
        data["pred_mean"], data["true_mean"], exclude_idx=exclude, metric=metric
    )
    assert set(ours) == set(ce)
    for p in data["perts"]:
        assert ours[p] == pytest.approx(ce[p], abs=TOL)
    assert len(set(ours.values())) > 1  # not a degenerate fixture


def test_energy_distance_matches_cell_eval(data, pair):
    from cell_eval.metrics._anndata import edistance

    # cell-eval's edistance metric: Pearson, over perturbations, of the energy distance of
    # the real cells to control and of the predicted cells to control.
    ctrl_cells = data["real"][data["lab_r"] == CONTROL]
    # cell-eval's definition averages over all pairs, self-pairs included (unbiased=False).
    real_d = [
        metrics.energy_distance(data["real"][data["lab_r"] == p], ctrl_cells, unbiased=False)
        for p in data["perts"]
    ]
    pred_d = [
        metrics.energy_distance(data["pred"][data["lab_p"] == p], ctrl_cells, unbiased=False)
        for p in data["perts"]
    ]
    assert pearsonr(real_d, pred_d)[0] == pytest.approx(edistance(pair), abs=TOL)


def _de_frame(data, change_of, significant):
    import polars as pl

    rows = []
    for p in data["perts"]:
        change = change_of[p] - data["ctrl"]
        for g, name in enumerate(data["genes"]):
            fdr = 0.001 if significant(p, g) else 0.5
            rows.append(
                {
                    "target": p,
                    "feature": name,
                    "log2_fold_change": change[g],
                    "p_value": fdr,
                    "fdr": fdr,
                }
            )
    return pl.DataFrame(rows)


def test_de_overlap_and_direction_match_cell_eval(data):
    require("cell_eval")
    from cell_eval._types import initialize_de_comparison
    from cell_eval.metrics import DEDirectionMatch, de_overlap_metric

    de_idx = {
        p: np.argsort(-np.abs(data["true_mean"][p] - data["ctrl"]), kind="stable")
        for p in data["perts"]
    }
    everything = initialize_de_comparison(
        real=_de_frame(data, data["true_mean"], lambda p, g: True),
        pred=_de_frame(data, data["pred_mean"], lambda p, g: True),
    )
    for k in (5, 10):
        ce = de_overlap_metric(everything, k=k, metric="overlap")
        for p in data["perts"]:
            ours = metrics.top_k_overlap(data["pred_mean"][p] - data["ctrl"], de_idx[p], k)
            assert ours == pytest.approx(ce[p], abs=TOL), (p, k)

    top = {p: set(de_idx[p][:10].tolist()) for p in data["perts"]}
    significant = initialize_de_comparison(
        real=_de_frame(data, data["true_mean"], lambda p, g: g in top[p]),
        pred=_de_frame(data, data["pred_mean"], lambda p, g: True),
    )
    ce = DEDirectionMatch()(significant)
    values = []
    for p in data["perts"]:
        idx = de_idx[p][:10]
        ours = metrics.sign_agreement(
            data["pred_mean"][p][idx] - data["ctrl"][idx],
            data["true_mean"][p][idx] - data["ctrl"][idx],
        )
        assert ours == pytest.approx(ce[p], abs=TOL), p
        values.append(ours)
    assert 0 < min(values) and len(set(values)) > 1
