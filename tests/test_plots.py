"""Plots are written atomically as non-empty, valid PNG files."""

import json
import os
import warnings

import matplotlib
import numpy as np
import pytest
import scipy.sparse as sp

from scformer_jax import plots

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
RNG = np.random.default_rng(0)


def assert_png(path):
    assert os.path.getsize(path) > 1000
    with open(path, "rb") as f:
        assert f.read(8) == PNG_MAGIC
    leftovers = [n for n in os.listdir(os.path.dirname(path)) if n.startswith(".tmp-")]
    assert leftovers == []


def test_plot_perturbation_writes_png(tmp_path):
    n_genes = 30
    ctrl = RNG.uniform(0.5, 2, n_genes)
    cells = np.maximum(ctrl + RNG.normal(0, 0.5, (15, n_genes)), 0)
    pred = ctrl + RNG.normal(0, 0.2, n_genes)
    genes = [f"GENE{i}" for i in range(n_genes)]
    backend = matplotlib.get_backend()
    for true_cells in (cells, sp.csr_matrix(cells)):
        out = plots.plot_perturbation(
            tmp_path / "sub" / "A+B.png", "A+B", true_cells, pred, ctrl, np.arange(20)[::-1], genes
        )
        assert_png(out)
    assert matplotlib.get_backend() == backend  # no global backend switch
    with pytest.raises(ValueError, match="true_cells"):
        plots.plot_perturbation(
            tmp_path / "x.png", "A+B", cells[:, :5], pred, ctrl, np.arange(3), genes
        )
    with pytest.raises(ValueError, match="de_idx"):
        plots.plot_perturbation(tmp_path / "x.png", "A+B", cells, pred, ctrl, [40], genes)
    assert not (tmp_path / "x.png").exists()


def test_plot_change_scatter_writes_png(tmp_path):
    true = RNG.normal(size=(4, 20))
    out = plots.plot_change_scatter(tmp_path / "scatter.png", 0.5 * true + 0.1, true, label="model")
    assert_png(out)
    with pytest.raises(ValueError, match="one shape"):
        plots.plot_change_scatter(tmp_path / "bad.png", true, true[:2])


def test_plot_metric_bars_writes_png_and_skips_missing_groups(tmp_path):
    results = {
        "model": {
            "overall": {"pearson_delta": 0.6, "mse_de": 0.1},
            "unseen_single": {"pearson_delta": 0.5, "mse_de": 0.2},
            "combo_seen2": {"pearson_delta": 0.7, "mse_de": 0.05},
        },
        "additive": {
            "overall": {"pearson_delta": 0.4, "mse_de": 0.3},
            "combo_seen2": {"pearson_delta": 0.65, "mse_de": 0.08},
        },
        "control": {"overall": {"pearson_delta": 0.0, "mse_de": 0.5}},
    }
    out = plots.plot_metric_bars(tmp_path / "bars.png", results, ["pearson_delta", "mse_de"])
    assert_png(out)
    with pytest.raises(ValueError, match="none of"):
        plots.plot_metric_bars(tmp_path / "bad.png", results, ["no_such_metric"])


def test_plot_training_curves_from_jsonl(tmp_path):
    metrics_file = tmp_path / "metrics.jsonl"
    lines = []
    for step in range(1, 41):
        rec = {"step": step, "epoch": step // 10, "loss": 1.0 / step, "lr": 1e-3}
        if step % 10 == 0:
            rec |= {"val_loss": 1.2 / step, "val_pearson_delta": step / 50}
        lines.append(json.dumps(rec))
    metrics_file.write_text("\n".join(lines) + "\n\n")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = plots.plot_training_curves(tmp_path / "plots" / "curves.png", metrics_file)
    assert_png(out)
    assert len(plots.read_metrics_jsonl(metrics_file)) == 40

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"step": 1, "loss": 0.5}\n{"step": 2, "loss": \n')
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        plots.plot_training_curves(tmp_path / "bad.png", bad)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ValueError, match="no records"):
        plots.plot_training_curves(tmp_path / "empty.png", empty)
    assert not (tmp_path / "bad.png").exists() and not (tmp_path / "empty.png").exists()


def test_save_figure_leaves_no_partial_file_on_error(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    fig = Figure()
    fig.add_subplot().plot([0, 1], [0, 1])

    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(Figure, "savefig", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        plots.save_figure(fig, tmp_path / "f.png")
    assert os.listdir(tmp_path) == []
