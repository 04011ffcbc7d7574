"""Evaluate a trained run on its test split, beside simple baselines, and write a report.

``python eval.py --workdir runs/NAME`` calls :func:`evaluate_run`, which writes into
``runs/NAME/eval/``: ``metrics.json``, ``per_perturbation.csv``, ``predictions.h5ad``,
``plots/`` and ``report.md``.

The model is scored as GEARS scores it: every test cell is predicted from its paired control
cell, predictions are averaged per perturbation and compared with the mean of the true
perturbed cells (:mod:`scformer_jax.metrics`). Baselines get the same split and metrics.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path
from typing import Any, Sequence

import anndata
import numpy as np
import pandas as pd

from scformer_jax import baselines as baselines_lib
from scformer_jax import convert
from scformer_jax import metrics as metrics_lib
from scformer_jax import plots as plots_lib
from scformer_jax.config import load_config
from scformer_jax.data.batching import pair_controls
from scformer_jax.data.dataset import PerturbData, load_dataset
from scformer_jax.data.splits import gears_split, read_split_json
from scformer_jax.io import make_temp_dir, write_text_atomic
from scformer_jax.predict import Predictor, normalize_perturbation
from scformer_jax.training import restore_params

CONTROL = "ctrl"
REPORT_METRICS = ("pearson_delta", "pearson_de_delta", "mse_de", "pearson_de",
                  "frac_correct_direction_20")
MODEL = "model"


def _test_conditions(split: dict, dataset: PerturbData) -> list[str]:
    test = [c for c in split.get("test", []) if c != CONTROL]
    if not test:
        raise ValueError(
            "The run's split has no test perturbations (split 'no_test'?); evaluate a run "
            "trained with a split that holds some out, e.g. data.split: simulation.")
    missing = [c for c in test if c not in dataset.condition_cells]
    if missing:
        raise ValueError(f"Test condition(s) {missing[:10]} are not in the dataset; was the "
                         "run trained on other data than config.yaml's data.path?")
    return test


def model_profiles(predictor: Predictor, dataset: PerturbData, conditions: Sequence[str], *,
                   seed: int = 0, max_cells: int | None = None) -> dict[str, np.ndarray]:
    """Mean predicted profile per condition, each test cell predicted from a paired control
    cell (seeded), as GEARS evaluates."""
    rng = np.random.default_rng(seed)
    out = {}
    for condition in conditions:
        cells = dataset.condition_cells[condition]
        if max_cells and len(cells) > max_cells:
            cells = np.sort(rng.choice(cells, max_cells, replace=False))
        controls = pair_controls(dataset, cells, rng)
        out[condition] = predictor.predict_cells(condition, controls).mean(axis=0)
    return out


def _first_occurrence_names(gene_names) -> list[str]:
    """Gene names made unique for the baselines: a perturbed gene maps to its first column,
    as in the dataset's vocabulary; later duplicates get a suffix (e.g. Replogle's symbols)."""
    seen: dict[str, int] = {}
    out = []
    for name in map(str, gene_names):
        if name in seen:
            seen[name] += 1
            out.append(f"{name}#dup{seen[name]}")
        else:
            seen[name] = 0
            out.append(name)
    return out


def _fmt(value: Any) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def _report(results: dict[str, metrics_lib.EvalResult], workdir: Path,
            sizes: dict[str, int], notes: list[str]) -> str:
    groups = ["overall"] + [g for g in metrics_lib.SUBGROUP_NAMES if g in sizes]
    lines = [f"# Evaluation of {workdir.name}", "",
             "GEARS metrics on mean profiles per test perturbation (higher is better for "
             "pearson and frac, lower for mse); the model beside simple baselines on the same "
             "split.", ""]
    for group in groups:
        size = sum(sizes.values()) if group == "overall" else sizes[group]
        lines += [f"## {group} ({size} perturbation{'s' if size != 1 else ''})", "",
                  "| method | " + " | ".join(REPORT_METRICS) + " |",
                  "|---" * (len(REPORT_METRICS) + 1) + "|"]
        for method, result in results.items():
            values = result.overall if group == "overall" else result.per_subgroup.get(group, {})
            lines.append(f"| {method} | " + " | ".join(_fmt(values.get(m))
                                                      for m in REPORT_METRICS) + " |")
        lines.append("")
    model_pd = results[MODEL].overall.get("pearson_delta")
    best_base = max(((name, r.overall.get("pearson_delta", -math.inf))
                     for name, r in results.items() if name != MODEL), key=lambda t: t[1],
                    default=(None, None))
    if model_pd is not None and best_base[0] is not None:
        verdict = "beats" if model_pd > best_base[1] else "does not beat"
        lines += [f"**pearson_delta: the model ({model_pd:.4f}) {verdict} the best baseline "
                  f"({best_base[0]}, {best_base[1]:.4f}).**", ""]
    if notes:
        lines += ["Notes:", ""] + [f"- {n}" for n in notes[:20]] + [""]
    lines += ["Files: `metrics.json`, `per_perturbation.csv`, `predictions.h5ad`, `plots/`.", ""]
    return "\n".join(lines)


def evaluate_run(workdir: str | Path, *, which: str = "best", out_dir: str | Path | None = None,
                 plot_perturbations: Sequence[str] = (), n_plots: int = 5,
                 batch_size: int | None = None, seed: int = 0,
                 max_cells_per_condition: int | None = None) -> dict[str, Any]:
    """Evaluates a run folder's checkpoint on its test split and writes the report.

    Args:
      workdir: the folder ``train.py`` wrote (config.yaml, split.json, checkpoints/).
      which: "best" or "latest" checkpoint.
      out_dir: where to write (default ``workdir/eval``); replaced atomically.
      plot_perturbations: perturbations to plot besides the first `n_plots` test ones.
      n_plots: how many test perturbations get a box plot.
      batch_size: prediction batch (default the config's eval_batch_size).
      seed: control pairing seed.
      max_cells_per_condition: cap on cells predicted per condition (None: all).

    Returns:
      The ``metrics.json`` content.
    """
    workdir = Path(workdir)
    if not (workdir / "config.yaml").is_file():
        raise FileNotFoundError(
            f"{workdir / 'config.yaml'} is missing: --workdir must be a folder written by "
            "train.py or python -m scformer_jax.convert.")
    config = load_config(workdir / "config.yaml")
    model_config, params, _ = restore_params(workdir, which=which)
    dataset = load_dataset(config.data.path, label_key=config.data.label_key)
    # A converted PyTorch checkpoint has no split.json and may hold another gene vocabulary.
    if (workdir / "split.json").is_file():
        split = read_split_json(workdir / "split.json")
    else:
        split = gears_split(dataset.conditions, split=config.data.split,
                            seed=config.data.split_seed,
                            train_gene_set_size=config.data.train_gene_set_size,
                            combo_seen2_train_frac=config.data.combo_seen2_train_frac,
                            split_path=config.data.split_path)
    model_config, params, _ = convert.adapt_to_dataset(workdir, model_config, params, dataset)
    test = _test_conditions(split, dataset)
    predictor = Predictor(model_config, params, dataset,
                          batch_size=batch_size or config.train.eval_batch_size,
                          include_zero_gene=config.data.include_zero_gene)

    ctrl_mean = np.asarray(dataset.control_mean, np.float64)
    true_mean = {c: dataset.condition_mean(c) for c in test}
    de_idx = {c: dataset.de_rank[c] for c in test}
    non_dropout = {c: dataset.top_non_dropout_de_20[c] for c in test
                   if c in dataset.top_non_dropout_de_20}
    if len(non_dropout) != len(test):
        non_dropout = None
    subgroups = {k: v for k, v in split.get("subgroups", {}).items() if v}

    predictions = {MODEL: model_profiles(predictor, dataset, test, seed=seed,
                                         max_cells=max_cells_per_condition)}
    train_profiles = {c: dataset.condition_mean(c) for c in split["train"] if c != CONTROL}
    fitted = baselines_lib.fit_baselines(train_profiles, ctrl_mean,
                                         _first_occurrence_names(dataset.gene_names))
    for name, baseline in fitted.items():
        predictions[name] = baseline.predict(test)

    results = {name: metrics_lib.evaluate_profiles(pred, true_mean, ctrl_mean, de_idx,
                                                   non_dropout, subgroups)
               for name, pred in predictions.items()}
    sizes = results[MODEL].subgroup_sizes
    notes = list(results[MODEL].notes)

    out_dir = Path(out_dir) if out_dir is not None else workdir / "eval"
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = make_temp_dir(out_dir.parent, prefix=".eval-")
    try:
        summary = {
            "workdir": str(workdir), "checkpoint": which, "n_test_perturbations": len(test),
            "subgroup_sizes": sizes,
            "model": results[MODEL].to_dict(),
            "baselines": {name: r.to_dict() for name, r in results.items() if name != MODEL},
        }
        write_text_atomic(staging / "metrics.json", json.dumps(summary, indent=2,
                                                                 allow_nan=False, default=float))
        tables = []
        for name, result in results.items():
            table = result.per_perturbation.copy()
            table.insert(0, "method", name)
            tables.append(table)
        pd.concat(tables).to_csv(staging / "per_perturbation.csv")

        subgroup_of = {c: ";".join(g for g, members in subgroups.items() if c in members)
                       for c in test}
        pred_ad = anndata.AnnData(
            X=np.stack([predictions[MODEL][c] for c in test]).astype(np.float32),
            obs=pd.DataFrame({"condition": test, "subgroup": [subgroup_of[c] for c in test],
                              "n_cells": [len(dataset.condition_cells[c]) for c in test]},
                             index=[str(i) for i in range(len(test))]),
            var=pd.DataFrame(index=pd.Index(dataset.gene_names.astype(str), name="gene_name")))
        pred_ad.layers["true_mean"] = np.stack([true_mean[c] for c in test]).astype(np.float32)
        pred_ad.uns["control_mean"] = ctrl_mean.astype(np.float32)
        pred_ad.write_h5ad(staging / "predictions.h5ad")

        plots = staging / "plots"
        plots.mkdir()
        gene_names = list(dataset.gene_names.astype(str))
        to_plot = list(test[:n_plots])
        for p in plot_perturbations:
            c = normalize_perturbation(p, dataset)
            if c not in to_plot:
                to_plot.append(c)
        for c in to_plot:
            if c not in dataset.condition_cells or c == CONTROL:
                continue
            pred = predictions[MODEL].get(c)
            if pred is None:
                pred = predictor.predict_cells(
                    c, pair_controls(dataset, dataset.condition_cells[c],
                                     np.random.default_rng(seed))).mean(axis=0)
            idx = dataset.top_non_dropout_de_20.get(c, dataset.de_rank[c][:20])
            plots_lib.plot_perturbation(
                plots / f"perturbation_{c.replace('+', '_')}.png", c,
                dataset.dense_rows(dataset.condition_cells[c]), pred, ctrl_mean, idx, gene_names)
        plots_lib.plot_change_scatter(
            plots / "change_scatter.png",
            np.concatenate([predictions[MODEL][c] - ctrl_mean for c in test]),
            np.concatenate([true_mean[c] - ctrl_mean for c in test]),
            title="Predicted vs true change over control (test perturbations)")
        bars = {name: {"overall": r.overall, **r.per_subgroup} for name, r in results.items()}
        plots_lib.plot_metric_bars(plots / "metrics_by_subgroup.png", bars)
        if (workdir / "metrics.jsonl").is_file():
            try:
                plots_lib.plot_training_curves(plots / "training_curves.png",
                                               workdir / "metrics.jsonl")
            except ValueError as e:  # too few records to draw a curve
                notes.append(f"training curves not drawn: {e}")
        write_text_atomic(staging / "report.md", _report(results, workdir, sizes, notes))
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return summary
