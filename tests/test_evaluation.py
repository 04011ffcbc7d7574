"""eval.py end to end on a tiny trained run, and predict() on seen and unseen perturbations."""

import json

import anndata
import numpy as np
import pandas as pd
import pytest

import eval as eval_cli
import train as train_cli
from scformer_jax.predict import UnknownPerturbationError, load_predictor

TINY = "tests/configs/tiny.yaml"


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("evalrun") / "run"
    assert train_cli.main(["--config", TINY, "--workdir", str(run), "--no-progress",
                           "--set", "train.epochs=1"]) == 0
    return run


def test_eval_writes_report_with_model_and_baselines(trained_run, capsys):
    assert eval_cli.main(["--workdir", str(trained_run), "--n-plots", "2"]) == 0
    out_dir = trained_run / "eval"
    metrics = json.loads((out_dir / "metrics.json").read_text())
    assert set(metrics["baselines"]) == {"control", "train_mean", "additive", "linear"}
    split = json.loads((trained_run / "split.json").read_text())
    test = [c for c in split["test"] if c != "ctrl"]
    assert metrics["n_test_perturbations"] == len(test)
    for group, members in split["subgroups"].items():
        if members:
            assert group in metrics["model"]["per_subgroup"]
        else:
            assert group not in metrics["model"]["per_subgroup"]
    # The control baseline predicts no change: its pearson_delta is 0 by definition here.
    assert metrics["baselines"]["control"]["overall"]["pearson_delta"] == 0.0
    table = pd.read_csv(out_dir / "per_perturbation.csv")
    assert set(table["method"]) == {"model", "control", "train_mean", "additive", "linear"}
    assert len(table[table["method"] == "model"]) == len(test)
    pred = anndata.read_h5ad(out_dir / "predictions.h5ad")
    assert list(pred.obs["condition"]) == test and "true_mean" in pred.layers
    pngs = list((out_dir / "plots").glob("*.png"))
    names = {p.name for p in pngs}
    assert {"change_scatter.png", "metrics_by_subgroup.png", "training_curves.png"} <= names
    assert sum(n.startswith("perturbation_") for n in names) == 2
    assert all(p.stat().st_size > 1000 and p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
               for p in pngs)
    report = (out_dir / "report.md").read_text()
    assert "| model |" in report and "| additive |" in report
    assert "Evaluation written to" in capsys.readouterr().out


def test_predict_unseen_combo_and_single(trained_run):
    predictor = load_predictor(str(trained_run))
    data = predictor.dataset
    singles = sorted({g for c in data.conditions for g in data.condition_genes[c]})
    seen_pairs = {frozenset(data.condition_genes[c]) for c in data.conditions}
    unseen = next(f"{a}+{b}" for a in singles for b in singles
                  if a < b and frozenset((a, b)) not in seen_pairs)
    result = predictor.predict([singles[0], unseen], pool_size=7, seed=3)
    assert list(result.mean.obs["condition"]) == [f"{singles[0]}+ctrl", unseen]
    assert result.mean.shape == (2, data.n_genes)
    assert result.cells.shape == (14, data.n_genes)
    np.testing.assert_allclose(result.mean.X[1],
                               result.cells.X[result.cells.obs["condition"] == unseen].mean(0),
                               rtol=1e-5)
    assert np.all(np.isfinite(result.cells.X))
    # The same pool and seed give the same answer; the flags make the perturbations differ.
    again = predictor.predict([unseen], pool_size=7, seed=3, return_cells=False)
    np.testing.assert_allclose(again.mean.X[0], result.mean.X[1], rtol=1e-6)
    assert not np.allclose(result.mean.X[0], result.mean.X[1])


def test_predict_unknown_gene_lists_close_matches(trained_run):
    predictor = load_predictor(str(trained_run))
    gene = str(predictor.dataset.gene_names[0])
    with pytest.raises(UnknownPerturbationError, match="Close matches") as err:
        predictor.predict([gene + "X"], pool_size=2)
    assert gene in str(err.value)
    with pytest.raises(UnknownPerturbationError, match="malformed"):
        predictor.predict(["A+B+C"], pool_size=2)


def test_eval_on_missing_run_is_a_clear_error(tmp_path, capsys):
    assert eval_cli.main(["--workdir", str(tmp_path)]) == 2
    assert "written by train.py" in capsys.readouterr().err
