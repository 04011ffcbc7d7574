"""eval.py end to end on a tiny trained run, and predict() on seen and unseen perturbations."""

import json
import shutil

import anndata
import numpy as np
import pandas as pd
import pytest

import eval as eval_cli
import train as train_cli
from scformer_jax import evaluation
from scformer_jax import metrics as metrics_lib
from scformer_jax.metrics import CALIBRATED_METRIC_NAMES
from scformer_jax.predict import UnknownPerturbationError, load_predictor
from scformer_jax.prior import measure_training

TINY = "tests/configs/tiny.yaml"


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("evalrun") / "run"
    assert (
        train_cli.main(
            ["--config", TINY, "--workdir", str(run), "--no-progress", "--set", "train.epochs=1"]
        )
        == 0
    )
    return run


def test_eval_writes_report_with_model_and_baselines(trained_run, capsys):
    assert eval_cli.main(["--workdir", str(trained_run), "--n-plots", "2"]) == 0
    out_dir = trained_run / "eval"
    metrics = json.loads((out_dir / "metrics.json").read_text())
    assert set(metrics["baselines"]) == {
        "control",
        "train_mean",
        "additive",
        "linear",
        "coexpression",
        "additive_shrunk",
    }
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
    methods = {
        "model",
        "control",
        "train_mean",
        "additive",
        "linear",
        "coexpression",
        "additive_shrunk",
        "technical_duplicate",
    }
    assert set(table["method"]) == methods
    assert len(table[table["method"] == "model"]) == len(test)
    # Every method gets every calibrated metric, per perturbation and averaged (the tiny
    # data has 40 genes, too few for a top-100 overlap).
    for name in CALIBRATED_METRIC_NAMES + ("frac_correct_direction_non_dropout",):
        if name != "de_overlap_top100":
            assert table[name].notna().all(), name
    assert table["de_overlap_top100"].isna().all()
    ceiling = metrics["ceiling"]["technical_duplicate"]["overall"]
    for result in [metrics["model"], *metrics["baselines"].values()]:
        assert set(CALIBRATED_METRIC_NAMES) - {"de_overlap_top100"} <= set(result["overall"])
    # Half the cells predicting the other half: the ceiling is close, better than the
    # control baseline, and picks out its own perturbation.
    assert ceiling["pearson_delta"] > 0.5 and ceiling["discrimination_l1"] > 0.8
    control = metrics["baselines"]["control"]["overall"]
    assert ceiling["wmse_delta"] < control["wmse_delta"]
    assert control["de_overlap_top20"] == 0.0 and control["de_sign_agreement"] == 0.0
    assert metrics["perturbed_reference_cells"] > 0
    pred = anndata.read_h5ad(out_dir / "predictions.h5ad")
    assert list(pred.obs["condition"]) == test and "true_mean" in pred.layers
    pngs = list((out_dir / "plots").glob("*.png"))
    names = {p.name for p in pngs}
    assert {
        "change_scatter.png",
        "metrics_by_subgroup.png",
        "calibrated_by_subgroup.png",
        "training_curves.png",
    } <= names
    assert sum(n.startswith("perturbation_") for n in names) == 2
    assert all(p.stat().st_size > 1000 and p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
    report = (out_dir / "report.md").read_text()
    assert "| model |" in report and "| additive |" in report
    # The calibrated table (with the ceiling row) comes before the GEARS table.
    calibrated = report.index("## Calibrated: overall")
    assert (
        calibrated
        < report.index("| technical_duplicate (ceiling) |")
        < report.index("## GEARS metrics")
    )
    assert "| best baseline |" in report
    assert "Evaluation written to" in capsys.readouterr().out


def test_eval_several_runs_reports_mean_and_sd(trained_run, tmp_path, capsys):
    # Two copies of one run: every metric is reproduced exactly, so sd is 0 and n is 2.
    copy = tmp_path / "copy"
    shutil.copytree(trained_run, copy, ignore=shutil.ignore_patterns("eval"))
    summary = tmp_path / "summary"
    assert (
        eval_cli.main(
            [
                "--workdir",
                str(trained_run),
                "--workdir",
                str(copy),
                "--summary-out",
                str(summary),
                "--n-plots",
                "0",
            ]
        )
        == 0
    )
    table = pd.read_csv(summary / "summary.csv")
    row = table[
        (table.method == "model")
        & (table.group == "overall")
        & (table.metric == "pearson_delta_pert")
    ].iloc[0]
    single = json.loads((copy / "eval" / "metrics.json").read_text())
    assert row["n_runs"] == 2 and row["sd"] == pytest.approx(0.0, abs=1e-12)
    assert row["mean"] == pytest.approx(single["model"]["overall"]["pearson_delta_pert"])
    assert "technical_duplicate" in set(table.method)
    text = (summary / "summary.md").read_text()
    assert "± 0.0000" in text and "| technical_duplicate |" in text
    assert (
        eval_cli.main(
            ["--workdir", str(trained_run), "--workdir", str(copy), "--out", str(tmp_path / "x")]
        )
        == 2
    )
    assert "--summary-out" in capsys.readouterr().err


def test_summarize_runs_mean_and_sample_sd():
    def run(value, sub):
        return {
            "model": {
                "overall": {"pearson_delta_pert": value},
                "per_subgroup": {"unseen_single": {"pearson_delta_pert": sub}},
            },
            "baselines": {
                "additive": {"overall": {"pearson_delta_pert": value / 2}, "per_subgroup": {}}
            },
            "ceiling": {
                "technical_duplicate": {"overall": {"pearson_delta_pert": 0.9}, "per_subgroup": {}}
            },
        }

    table = evaluation.summarize_runs([run(0.2, 0.1), run(0.4, 0.3), run(0.9, 0.5)])
    row = table.set_index(["method", "group", "metric"])
    values = np.array([0.2, 0.4, 0.9])
    got = row.loc[("model", "overall", "pearson_delta_pert")]
    assert got["mean"] == pytest.approx(values.mean())
    assert got["sd"] == pytest.approx(np.std(values, ddof=1))
    assert got["n_runs"] == 3
    assert row.loc[("additive", "overall", "pearson_delta_pert"), "mean"] == pytest.approx(
        values.mean() / 2
    )
    assert row.loc[("technical_duplicate", "overall", "pearson_delta_pert"), "sd"] == 0.0
    one = evaluation.summarize_runs([run(0.2, 0.1)])
    assert np.isnan(one["sd"]).all() and (one["n_runs"] == 1).all()
    with pytest.raises(ValueError, match="metrics.json"):
        evaluation.summarize_runs([{"overall": {}}])
    with pytest.raises(ValueError, match="no runs"):
        evaluation.summarize_runs([])


def test_predict_unseen_combo_and_single(trained_run):
    predictor = load_predictor(str(trained_run))
    data = predictor.dataset
    singles = sorted({g for c in data.conditions for g in data.condition_genes[c]})
    seen_pairs = {frozenset(data.condition_genes[c]) for c in data.conditions}
    unseen = next(
        f"{a}+{b}"
        for a in singles
        for b in singles
        if a < b and frozenset((a, b)) not in seen_pairs
    )
    result = predictor.predict([singles[0], unseen], pool_size=7, seed=3)
    assert list(result.mean.obs["condition"]) == [f"{singles[0]}+ctrl", unseen]
    assert result.mean.shape == (2, data.n_genes)
    assert result.cells.shape == (14, data.n_genes)
    np.testing.assert_allclose(
        result.mean.X[1], result.cells.X[result.cells.obs["condition"] == unseen].mean(0), rtol=1e-5
    )
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


def test_reference_and_technical_duplicate(data_tiny):
    from scformer_jax.data.splits import gears_split

    data = data_tiny
    split = gears_split(data.conditions, split="simulation", seed=1)
    test = [c for c in split["test"] if c != "ctrl"]
    ref = evaluation.build_reference(data, split["train"], test, seed=3)
    train_cells = np.concatenate([data.condition_cells[c] for c in split["train"] if c != "ctrl"])
    np.testing.assert_allclose(ref.pert_ref, data.X[train_cells].toarray().mean(0), rtol=1e-5)
    for c in test:
        first, second = ref.halves[c]
        assert not set(first) & set(second)
        assert sorted(np.concatenate([first, second])) == sorted(data.condition_cells[c])
        assert abs(len(first) - len(second)) <= 1
        # The most differential gene of the data's ranking weighs (about) the most.
        assert ref.de_weights[c][data.de_rank[c][0]] > 0.99
        assert ref.de_weights[c].max() == 1.0
    again = evaluation.build_reference(data, split["train"], test, seed=3)
    other = evaluation.build_reference(data, split["train"], test, seed=4)
    # From already measured training profiles: the same pooled reference, no pass over cells.
    profiles = measure_training(data, split["train"]).profiles
    measured = evaluation.build_reference(data, split["train"], test, seed=3, profiles=profiles)
    np.testing.assert_allclose(measured.pert_ref, ref.pert_ref, rtol=1e-6, atol=1e-7)
    assert measured.n_pert_ref_cells == ref.n_pert_ref_cells == len(train_cells)
    assert all(np.array_equal(measured.halves[c][0], ref.halves[c][0]) for c in test)
    with pytest.raises(KeyError, match="No measured profile"):
        evaluation.build_reference(
            data, split["train"], test, profiles={c: v for c, v in list(profiles.items())[1:]}
        )
    assert all(np.array_equal(again.halves[c][0], ref.halves[c][0]) for c in test)
    assert not all(np.array_equal(other.halves[c][0], ref.halves[c][0]) for c in test)
    ceiling = evaluation.technical_duplicate(ref, data)
    control = evaluation.score(ref, {c: ref.ctrl_mean for c in test})
    assert ceiling.overall["pearson_delta_pert"] > 0.5
    assert ceiling.overall["energy_distance"] < control.overall["energy_distance"]
    # Mean-only predictions get paired control cells shifted by the predicted change.
    c = test[0]
    shifted = evaluation.score(ref, {t: ref.true_mean[t] for t in test})
    assert shifted.per_perturbation.loc[c, "energy_distance"] == pytest.approx(
        metrics_lib.energy_distance(
            ref.control_cells[c] + ref.true_mean[c] - ref.ctrl_mean, ref.true_cells[c]
        )
    )


def test_eval_caps_the_test_perturbations(trained_run, tmp_path):
    out = tmp_path / "capped"
    args = ["--workdir", str(trained_run), "--out", str(out), "--n-plots", "0"]
    assert eval_cli.main(args + ["--max-perturbations", "2", "--max-cells", "5"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    split = json.loads((trained_run / "split.json").read_text())
    test = sorted(c for c in split["test"] if c != "ctrl")
    assert metrics["n_test_perturbations"] == 2
    assert metrics["n_test_perturbations_in_split"] == len(test)
    table = pd.read_csv(out / "per_perturbation.csv")
    assert set(table["condition"]) == {test[0], test[-1]}
    assert eval_cli.main(args + ["--max-perturbations", "0"]) == 2


def test_eval_reads_each_training_perturbation_once_and_follows_the_shrink_prior(
    trained_run, tmp_path, monkeypatch, cell_reads
):
    import dataclasses

    from scformer_jax import baselines as baselines_lib
    from scformer_jax.runs import load_run

    run = load_run(trained_run)
    asked = []
    fit_baselines = baselines_lib.fit_baselines

    def spy(*args, **kwargs):
        asked.append(kwargs["shrink_prior"])
        return fit_baselines(*args, **kwargs)

    monkeypatch.setattr(baselines_lib, "fit_baselines", spy)
    train = [c for c in dict.fromkeys(run.split["train"]) if c != "ctrl"]
    shrunk = {}
    for prior in ("normal", "adaptive"):
        variant = dataclasses.replace(
            run, model_config=dataclasses.replace(run.model_config, shrink_prior=prior)
        )
        cell_reads.clear()
        metrics = evaluation.evaluate_run(variant, out_dir=tmp_path / prior, n_plots=0)
        # The priors of the model, the baselines and the pooled perturbed reference share one
        # pass over the training cells: each perturbed training cell is read once in all.
        counts = [cell_reads[tuple(run.dataset.condition_cells[c].tolist())] for c in train]
        assert counts == [1] * len(train)
        train_cells = set(run.dataset.cells_of(train).tolist())
        reads = sum(n * len(train_cells.intersection(key)) for key, n in cell_reads.items())
        assert reads == len(train_cells)
        shrunk[prior] = metrics["baselines"]["additive_shrunk"]["overall"]["pearson_delta"]
    assert asked == ["normal", "adaptive"]
    assert shrunk["normal"] != shrunk["adaptive"]
