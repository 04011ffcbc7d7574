"""Evaluate a trained run on its test split, beside simple baselines, and write a report.

``python eval.py --workdir runs/NAME`` calls :func:`evaluate_run`, which writes into
``runs/NAME/eval/``: ``metrics.json``, ``per_perturbation.csv``, ``predictions.h5ad``,
``plots/`` and ``report.md``.

The model is scored as GEARS scores it: every test cell is predicted from its paired control
cell, predictions are averaged per perturbation and compared with the mean of the true
perturbed cells (:mod:`scformer_jax.metrics`). Baselines and the ``technical_duplicate``
ceiling (half of each perturbation's cells predicting the other half) get the same split and
metrics, GEARS's and the calibrated ones (:data:`metrics.CALIBRATED_METRICS`).
:func:`evaluate_runs` and :func:`summarize_runs` give the mean ± sd over several runs.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
from pathlib import Path
from typing import Any, Mapping, Sequence

import anndata
import numpy as np
import pandas as pd

from scformer_jax import baselines as baselines_lib
from scformer_jax import metrics as metrics_lib
from scformer_jax import plots as plots_lib
from scformer_jax.data.batching import pair_controls
from scformer_jax.data.conditions import CONTROL
from scformer_jax.data.dataset import PerturbData
from scformer_jax.data.de import group_stats
from scformer_jax.data.splits import SUBGROUP_NAMES
from scformer_jax.io import make_temp_dir, write_text_atomic
from scformer_jax.predict import Predictor, normalize_perturbation, run_predictor
from scformer_jax.runs import Run, load_run

REPORT_METRICS = (
    "pearson_delta",
    "pearson_de_delta",
    "mse_de",
    "pearson_de",
    "frac_correct_direction_20",
    "frac_correct_direction_non_dropout",
)
CALIBRATED_REPORT_METRICS = (
    "pearson_delta_pert",
    "pearson_de_delta_pert",
    "r2_w_delta",
    "wmse_delta",
    "de_overlap_top20",
    "de_sign_agreement",
    "discrimination_l1",
    "energy_distance",
)
MODEL = "model"
CEILING = "technical_duplicate"
# Cells per side for the energy distance (its cost grows with the square).
ENERGY_MAX_CELLS = 100


def _test_conditions(split: dict, dataset: PerturbData) -> list[str]:
    test = [c for c in split.get("test", []) if c != CONTROL]
    if not test:
        raise ValueError(
            "The run's split has no test perturbations (split 'no_test'?); evaluate a run "
            "trained with a split that holds some out, e.g. data.split: simulation."
        )
    missing = [c for c in test if c not in dataset.condition_cells]
    if missing:
        raise ValueError(
            f"Test condition(s) {missing[:10]} are not in the dataset; was the "
            "run trained on other data than config.yaml's data.path?"
        )
    return test


def model_profiles(
    predictor: Predictor,
    dataset: PerturbData,
    conditions: Sequence[str],
    *,
    seed: int = 0,
    max_cells: int | None = None,
) -> dict[str, np.ndarray]:
    """Mean predicted profile per condition, each test cell predicted from a paired control
    cell (seeded), as GEARS evaluates."""
    return model_predictions(
        predictor, dataset, conditions, seed=seed, max_cells=max_cells, keep_cells=0
    )[0]


def model_predictions(
    predictor: Predictor,
    dataset: PerturbData,
    conditions: Sequence[str],
    *,
    seed: int = 0,
    max_cells: int | None = None,
    keep_cells: int = ENERGY_MAX_CELLS,
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Mean predicted profiles and a sample of the predicted cells, per condition.

    Every test cell (at most ``max_cells``) is predicted from a paired control cell
    (seeded), as GEARS evaluates; the mean is over all of them.

    Returns:
      ``(means, cells)``: condition -> (n_genes,) mean, and condition -> (<= keep_cells,
      n_genes) predicted cells (a seeded sample, for the energy distance).
    """
    rng = np.random.default_rng(seed)
    # A separate stream for the kept cells leaves the pairing (and the means) unchanged.
    keep_rng = np.random.default_rng([seed, 1])
    means, kept = {}, {}
    for condition in conditions:
        cells = dataset.condition_cells[condition]
        if max_cells and len(cells) > max_cells:
            cells = np.sort(rng.choice(cells, max_cells, replace=False))
        controls = pair_controls(dataset, cells, rng)
        predicted = predictor.predict_cells(condition, controls)
        means[condition] = predicted.mean(axis=0)
        if keep_cells:
            kept[condition] = _sample_rows(predicted, keep_cells, keep_rng)
    return means, kept


def _sample_rows(rows: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    if len(rows) <= n:
        return np.asarray(rows, np.float64)
    return np.asarray(rows[np.sort(rng.choice(len(rows), n, replace=False))], np.float64)


@dataclasses.dataclass(frozen=True)
class Reference:
    """What every method is scored against, computed once from the data and the split.

    :func:`build_reference` fills every field; :func:`observed_reference` only those GEARS's
    metrics need (validation), leaving the others None or empty.

    Attributes:
      ctrl_mean: (n_genes,) mean of the control cells.
      pert_ref: (n_genes,) mean of all perturbed training cells (Systema's reference).
      n_pert_ref_cells: how many cells ``pert_ref`` averages.
      true_mean: condition -> (n_genes,) mean of its observed cells.
      true_cells: condition -> (<= ENERGY_MAX_CELLS, n_genes) sample of its observed cells.
      control_cells: condition -> (<= ENERGY_MAX_CELLS, n_genes) control cells paired with
        ``true_cells`` (the cells mean-only predictors shift by their predicted change).
      de_idx, non_dropout_de_idx, non_zero_idx, non_dropout_idx: GEARS's gene sets.
      de_weights: condition -> (n_genes,) weights from the Welch t of its cells vs control.
      exclude_idx: condition -> columns of its measured perturbed genes.
      halves: condition -> (first, second) cell indices of the technical duplicate split.
      seed: the seed everything above was drawn with.
    """

    ctrl_mean: np.ndarray
    pert_ref: np.ndarray | None
    n_pert_ref_cells: int
    true_mean: dict[str, np.ndarray]
    true_cells: dict[str, np.ndarray] | None
    control_cells: dict[str, np.ndarray] | None
    de_idx: dict[str, np.ndarray]
    non_dropout_de_idx: dict[str, np.ndarray] | None
    non_zero_idx: dict[str, np.ndarray] | None
    non_dropout_idx: dict[str, np.ndarray] | None
    de_weights: dict[str, np.ndarray] | None
    exclude_idx: dict[str, np.ndarray] | None
    halves: dict[str, tuple[np.ndarray, np.ndarray]]
    seed: int = 0


def build_reference(
    dataset: PerturbData,
    train_conditions: Sequence[str],
    test_conditions: Sequence[str],
    *,
    seed: int = 0,
    profiles: Mapping[str, np.ndarray] | None = None,
) -> Reference:
    """Everything the metrics need besides the predictions (see :class:`Reference`).

    Args:
      dataset: the data.
      train_conditions: the split's training conditions (``ctrl`` is ignored).
      test_conditions: the conditions to evaluate.
      seed: seed of the cell samples and of the technical duplicate split.
      profiles: the training conditions' mean profiles, if already measured
        (:func:`scformer_jax.prior.measure_training`): the pooled perturbed reference is
        then their cell-count-weighted mean (equal to the pooled cells' mean but for float
        rounding) instead of another pass over every perturbed training cell.
    """
    rng = np.random.default_rng(seed)
    train = list(
        dict.fromkeys(c for c in train_conditions if c != CONTROL and c in dataset.condition_cells)
    )
    if not train:
        raise ValueError(
            "The split has no perturbed training condition, so there is no "
            "perturbed reference (mean of the perturbed training cells)."
        )
    n_pert_ref_cells = sum(len(dataset.condition_cells[c]) for c in train)
    if profiles is None:
        pert_ref = np.asarray(dataset.mean_expression(dataset.cells_of(train)), np.float64)
    else:
        missing = [c for c in train if c not in profiles]
        if missing:
            raise KeyError(f"No measured profile for training condition(s) {missing[:5]}.")
        pert_ref = np.zeros(dataset.n_genes, np.float64)
        for c in train:
            pert_ref += len(dataset.condition_cells[c]) * np.asarray(profiles[c], np.float64)
        pert_ref /= n_pert_ref_cells
    ctrl_mean = np.asarray(dataset.control_mean, np.float64)

    # Welch t of each test condition against control: one pass over their cells.
    groups = [CONTROL] + list(test_conditions)
    cells = np.concatenate([dataset.condition_cells[c] for c in groups])
    codes = np.concatenate(
        [np.full(len(dataset.condition_cells[c]), i) for i, c in enumerate(groups)]
    )
    counts, means, variances = group_stats(dataset.rows(cells), codes, len(groups))
    weights = {
        c: metrics_lib.de_weights(
            metrics_lib.welch_t(
                means[i], variances[i], int(counts[i]), means[0], variances[0], int(counts[0])
            )
        )
        for i, c in enumerate(groups)
        if i
    }

    true_mean, true_cells, control_cells, halves, exclude = {}, {}, {}, {}, {}
    for c in test_conditions:
        members = dataset.condition_cells[c]
        true_mean[c] = np.asarray(dataset.condition_mean(c), np.float64)
        sample = (
            members
            if len(members) <= ENERGY_MAX_CELLS
            else np.sort(rng.choice(members, ENERGY_MAX_CELLS, replace=False))
        )
        true_cells[c] = dataset.dense_rows(sample).astype(np.float64)
        control_cells[c] = dataset.dense_rows(pair_controls(dataset, sample, rng)).astype(
            np.float64
        )
        order = rng.permutation(members)
        half = len(order) // 2
        halves[c] = (np.sort(order[:half]), np.sort(order[half:]))
        columns = [dataset.column_of(g) for g in dataset.condition_genes[c]]
        exclude[c] = np.asarray([i for i in columns if i >= 0], np.int64)

    def per_condition(table: dict) -> dict | None:
        return (
            {c: table[c] for c in test_conditions}
            if all(c in table for c in test_conditions)
            else None
        )

    return Reference(
        ctrl_mean=ctrl_mean,
        pert_ref=pert_ref,
        n_pert_ref_cells=n_pert_ref_cells,
        true_mean=true_mean,
        true_cells=true_cells,
        control_cells=control_cells,
        de_idx={c: dataset.de_rank[c] for c in test_conditions},
        non_dropout_de_idx=per_condition(dataset.top_non_dropout_de_20),
        non_zero_idx=per_condition(dataset.non_zeros_gene_idx),
        non_dropout_idx=per_condition(dataset.non_dropout_gene_idx),
        de_weights=weights,
        exclude_idx=exclude,
        halves=halves,
        seed=seed,
    )


def observed_reference(dataset: PerturbData, cells: Mapping[str, Sequence[int]]) -> Reference:
    """The reference of GEARS's metrics for the cells a pass predicted (validation).

    Each condition's truth is the mean of its `cells`; the control mean is the dataset's.
    There is no perturbed reference, DE weighting or cell sample, so :func:`score` gives
    GEARS's metrics only.

    Args:
      dataset: the data.
      cells: condition -> the indices of its cells that were predicted.
    """
    return Reference(
        ctrl_mean=dataset.control_mean,
        pert_ref=None,
        n_pert_ref_cells=0,
        true_mean={c: dataset.mean_expression(np.asarray(cells[c])) for c in cells},
        true_cells=None,
        control_cells=None,
        de_idx={c: dataset.de_rank[c] for c in cells},
        non_dropout_de_idx=None,
        non_zero_idx=None,
        non_dropout_idx=None,
        de_weights=None,
        exclude_idx=None,
        halves={},
    )


def score(
    ref: Reference,
    pred_mean: Mapping[str, np.ndarray],
    pred_cells: Mapping[str, np.ndarray] | None = None,
    *,
    true_mean: Mapping[str, np.ndarray] | None = None,
    true_cells: Mapping[str, np.ndarray] | None = None,
    subgroups: Mapping[str, Sequence[str]] | None = None,
) -> metrics_lib.EvalResult:
    """Every metric of one method against ``ref``.

    The one profile -> metrics path of evaluation and validation. A method that predicts
    only mean profiles (the baselines) gets predicted cells from the control cells paired
    with the observed ones, shifted by its predicted change (when `ref` holds them).
    ``true_mean``/``true_cells`` replace the reference's truth (the technical duplicate is
    scored against its held-out half).
    """
    true_mean = ref.true_mean if true_mean is None else true_mean
    true_cells = ref.true_cells if true_cells is None else true_cells
    if pred_cells is None and ref.control_cells is not None:
        pred_cells = {
            c: ref.control_cells[c] + (np.asarray(pred_mean[c], np.float64) - ref.ctrl_mean)
            for c in true_mean
        }
    return metrics_lib.evaluate_profiles(
        pred_mean,
        true_mean,
        ref.ctrl_mean,
        ref.de_idx,
        ref.non_dropout_de_idx,
        subgroups,
        non_zero_idx=ref.non_zero_idx,
        non_dropout_idx=ref.non_dropout_idx,
        pert_ref=ref.pert_ref,
        de_weights=ref.de_weights,
        pred_cells=pred_cells,
        true_cells=true_cells,
        exclude_idx=ref.exclude_idx,
    )


def technical_duplicate(
    ref: Reference, dataset: PerturbData, subgroups: Mapping[str, Sequence[str]] | None = None
) -> metrics_lib.EvalResult:
    """The ceiling: one half of each condition's cells predicting the other half.

    The halves are a seeded random split (:attr:`Reference.halves`); the first half's mean
    and cells are the prediction, the second half's are the truth, so every metric shows
    how well a perfect model could do under the sampling noise of the data (with half the
    cells on each side, a conservative ceiling).
    """
    rng = np.random.default_rng([ref.seed, 2])
    pred_mean, pred_cells, true_mean, true_cells = {}, {}, {}, {}
    for c, (first, second) in ref.halves.items():
        pred_mean[c] = np.asarray(dataset.mean_expression(first), np.float64)
        true_mean[c] = np.asarray(dataset.mean_expression(second), np.float64)
        pred_cells[c] = _sample_rows(dataset.dense_rows(first), ENERGY_MAX_CELLS, rng)
        true_cells[c] = _sample_rows(dataset.dense_rows(second), ENERGY_MAX_CELLS, rng)
    return score(
        ref, pred_mean, pred_cells, true_mean=true_mean, true_cells=true_cells, subgroups=subgroups
    )


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


def _group_values(result: metrics_lib.EvalResult, group: str) -> dict[str, float]:
    return result.overall if group == "overall" else result.per_subgroup.get(group, {})


def _best_baseline(
    results: Mapping[str, metrics_lib.EvalResult], group: str, metric: str
) -> tuple[str | None, float | None]:
    """The baseline with the best value of `metric` in `group` (direction per metric)."""
    higher = metrics_lib.CALIBRATED_METRICS.get(metric, not metric.startswith("mse"))
    best: tuple[str | None, float | None] = (None, None)
    for name, result in results.items():
        if name in (MODEL, CEILING):
            continue
        value = _group_values(result, group).get(metric)
        if value is None or not math.isfinite(value):
            continue
        if best[1] is None or (value > best[1] if higher else value < best[1]):
            best = (name, value)
    return best


def _calibrated_table(results: Mapping[str, metrics_lib.EvalResult], group: str) -> list[str]:
    names = [
        m
        for m in CALIBRATED_REPORT_METRICS
        if any(m in _group_values(r, group) for r in results.values())
    ]
    arrows = ["↑" if metrics_lib.CALIBRATED_METRICS[m] else "↓" for m in names]
    lines = [
        "| | " + " | ".join(f"{m} {a}" for m, a in zip(names, arrows)) + " |",
        "|---" * (len(names) + 1) + "|",
    ]
    for method, label in ((MODEL, "model"), (CEILING, f"{CEILING} (ceiling)")):
        values = _group_values(results[method], group)
        lines.append(f"| {label} | " + " | ".join(_fmt(values.get(m)) for m in names) + " |")
    cells = []
    for m in names:
        name, value = _best_baseline(results, group, m)
        cells.append("-" if name is None else f"{_fmt(value)} ({name})")
    lines.append("| best baseline | " + " | ".join(cells) + " |")
    return lines


def _report(
    results: dict[str, metrics_lib.EvalResult],
    workdir: Path,
    sizes: dict[str, int],
    notes: list[str],
    n_ref_cells: int,
) -> str:
    groups = ["overall"] + [g for g in SUBGROUP_NAMES if g in sizes]

    def heading(group: str) -> str:
        size = sum(sizes.values()) if group == "overall" else sizes[group]
        return f"{group} ({size} perturbation{'s' if size != 1 else ''})"

    lines = [
        f"# Evaluation of {workdir.name}",
        "",
        "Calibrated metrics first (↑ higher is better, ↓ lower): `*_pert` correlations "
        f"take the change over the mean of all {n_ref_cells} perturbed training cells, "
        "so predicting the average perturbation scores about 0 there. The ceiling row "
        f"(`{CEILING}`) is half of each perturbation's cells predicting the other half; "
        "the best baseline is chosen per metric. Definitions: README, section "
        '"Metrics".',
        "",
    ]
    for group in groups:
        lines += [f"## Calibrated: {heading(group)}", ""] + _calibrated_table(results, group)
        lines.append("")
    model_pd = results[MODEL].overall.get("pearson_delta_pert")
    best_name, best_value = _best_baseline(results, "overall", "pearson_delta_pert")
    if model_pd is not None and best_name is not None:
        verdict = "beats" if model_pd > best_value else "does not beat"
        lines += [
            f"**pearson_delta_pert: the model ({model_pd:.4f}) {verdict} the best "
            f"baseline ({best_name}, {best_value:.4f}); ceiling "
            f"{_fmt(results[CEILING].overall.get('pearson_delta_pert'))}.**",
            "",
        ]
    lines += [
        "## GEARS metrics",
        "",
        "GEARS's metrics on mean profiles per test perturbation (change over the "
        "control mean; higher is better for pearson and frac, lower for mse).",
        "",
    ]
    for group in groups:
        lines += [
            f"### {heading(group)}",
            "",
            "| method | " + " | ".join(REPORT_METRICS) + " |",
            "|---" * (len(REPORT_METRICS) + 1) + "|",
        ]
        for method, result in results.items():
            values = _group_values(result, group)
            label = f"{method} (ceiling)" if method == CEILING else method
            lines.append(
                f"| {label} | " + " | ".join(_fmt(values.get(m)) for m in REPORT_METRICS) + " |"
            )
        lines.append("")
    if notes:
        lines += ["Notes:", ""] + [f"- {n}" for n in notes[:20]] + [""]
    lines += [
        "Files: `metrics.json`, `per_perturbation.csv`, `predictions.h5ad`, `plots/` "
        "(`calibrated_by_subgroup.png`, `metrics_by_subgroup.png`).",
        "",
    ]
    return "\n".join(lines)


def evaluate_run(
    run: Run | str | Path,
    *,
    which: str = "best",
    out_dir: str | Path | None = None,
    plot_perturbations: Sequence[str] = (),
    n_plots: int = 5,
    batch_size: int | None = None,
    seed: int = 0,
    max_cells_per_condition: int | None = None,
    predictor: Predictor | None = None,
    max_perturbations: int | None = None,
) -> dict[str, Any]:
    """Evaluates a run folder's checkpoint on its test split and writes the report.

    Args:
      run: the folder ``train.py`` wrote (config.yaml, split.json, checkpoints/), or that
        folder already loaded (:func:`scformer_jax.runs.load_run`).
      which: "best" or "latest" checkpoint (of a folder; a loaded run has its own).
      out_dir: where to write (default ``workdir/eval``); replaced atomically.
      plot_perturbations: perturbations to plot besides the first `n_plots` test ones.
      n_plots: how many test perturbations get a box plot.
      batch_size: prediction batch (default the config's eval_batch_size).
      seed: control pairing seed.
      max_cells_per_condition: cap on cells predicted per condition (None: all).
      predictor: the run's predictor when the caller has built it already
        (:func:`scformer_jax.predict.run_predictor`); default: built here.
      max_perturbations: evaluate only this many test perturbations, spread evenly over
        the sorted test list (None: all); for a quick look at a large dataset.

    Returns:
      The ``metrics.json`` content.
    """
    if not isinstance(run, Run):
        run = load_run(run, which=which)
    workdir, config, dataset, split = run.workdir, run.config, run.dataset, run.split
    test = _test_conditions(split, dataset)
    n_test_total = len(test)
    if max_perturbations is not None:
        if max_perturbations < 1:
            raise ValueError(f"max_perturbations must be >= 1, got {max_perturbations}.")
        ordered = sorted(test)
        picks = np.unique(np.linspace(0, len(ordered) - 1, min(max_perturbations, len(ordered))))
        test = [ordered[int(i)] for i in picks]
    # Every training perturbation's mean (and its singles' errors) is computed once, for the
    # model's priors, the baselines and the pooled perturbed reference.
    measured = run.training_measurements()
    if predictor is None:
        predictor = run_predictor(run, batch_size=batch_size)

    chosen = set(test)
    subgroups = {
        k: [c for c in v if c in chosen] for k, v in split.get("subgroups", {}).items() if v
    }
    subgroups = {k: v for k, v in subgroups.items() if v}
    ref = build_reference(dataset, split["train"], test, seed=seed, profiles=measured.profiles)
    ctrl_mean, true_mean = ref.ctrl_mean, ref.true_mean

    model_mean, model_cells = model_predictions(
        predictor, dataset, test, seed=seed, max_cells=max_cells_per_condition
    )
    predictions = {MODEL: model_mean}
    fitted = baselines_lib.fit_baselines(
        measured.profiles,
        ctrl_mean,
        _first_occurrence_names(dataset.gene_names),
        control_expression=dataset.dense_rows(dataset.control_cells),
        single_squared_errors=measured.single_squared_errors,
        shrink_prior=run.model_config.shrink_prior,
    )
    for name, baseline in fitted.items():
        predictions[name] = baseline.predict(test)

    results = {
        name: score(ref, pred, model_cells if name == MODEL else None, subgroups=subgroups)
        for name, pred in predictions.items()
    }
    results[CEILING] = technical_duplicate(ref, dataset, subgroups)
    sizes = results[MODEL].subgroup_sizes
    notes = list(results[MODEL].notes)

    out_dir = Path(out_dir) if out_dir is not None else workdir / "eval"
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = make_temp_dir(out_dir.parent, prefix=".eval-")
    try:
        summary = {
            "workdir": str(workdir),
            "checkpoint": run.which,
            "n_test_perturbations": len(test),
            "n_test_perturbations_in_split": n_test_total,
            "split": config.data.split,
            "split_seed": config.data.split_seed,
            "subgroup_sizes": sizes,
            "perturbed_reference_cells": ref.n_pert_ref_cells,
            "model": results[MODEL].to_dict(),
            "baselines": {
                name: r.to_dict() for name, r in results.items() if name not in (MODEL, CEILING)
            },
            "ceiling": {CEILING: results[CEILING].to_dict()},
        }
        write_text_atomic(
            staging / "metrics.json", json.dumps(summary, indent=2, allow_nan=False, default=float)
        )
        tables = []
        for name, result in results.items():
            table = result.per_perturbation.copy()
            table.insert(0, "method", name)
            tables.append(table)
        pd.concat(tables).to_csv(staging / "per_perturbation.csv")

        subgroup_of = {
            c: ";".join(g for g, members in subgroups.items() if c in members) for c in test
        }
        pred_ad = anndata.AnnData(
            X=np.stack([predictions[MODEL][c] for c in test]).astype(np.float32),
            obs=pd.DataFrame(
                {
                    "condition": test,
                    "subgroup": [subgroup_of[c] for c in test],
                    "n_cells": [len(dataset.condition_cells[c]) for c in test],
                },
                index=[str(i) for i in range(len(test))],
            ),
            var=pd.DataFrame(index=pd.Index(dataset.gene_names.astype(str), name="gene_name")),
        )
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
                    c,
                    pair_controls(dataset, dataset.condition_cells[c], np.random.default_rng(seed)),
                ).mean(axis=0)
            idx = dataset.top_non_dropout_de_20.get(c, dataset.de_rank[c][:20])
            plots_lib.plot_perturbation(
                plots / f"perturbation_{c.replace('+', '_')}.png",
                c,
                dataset.dense_rows(dataset.condition_cells[c]),
                pred,
                ctrl_mean,
                idx,
                gene_names,
            )
        plots_lib.plot_change_scatter(
            plots / "change_scatter.png",
            np.concatenate([predictions[MODEL][c] - ctrl_mean for c in test]),
            np.concatenate([true_mean[c] - ctrl_mean for c in test]),
            title="Predicted vs true change over control (test perturbations)",
        )
        bars = {name: {"overall": r.overall, **r.per_subgroup} for name, r in results.items()}
        plots_lib.plot_metric_bars(plots / "metrics_by_subgroup.png", bars)
        plots_lib.plot_metric_bars(
            plots / "calibrated_by_subgroup.png", bars, CALIBRATED_REPORT_METRICS
        )
        if (workdir / "metrics.jsonl").is_file():
            try:
                plots_lib.plot_training_curves(
                    plots / "training_curves.png", workdir / "metrics.jsonl"
                )
            except ValueError as e:  # too few records to draw a curve
                notes.append(f"training curves not drawn: {e}")
        write_text_atomic(
            staging / "report.md", _report(results, workdir, sizes, notes, ref.n_pert_ref_cells)
        )
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return summary


# --------------------------------------------------------------------------------------
# Several runs (split seeds).
# --------------------------------------------------------------------------------------


def _methods_of(summary: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    if "model" not in summary:
        raise ValueError(
            "summarize_runs expects metrics.json contents (keys 'model', "
            "'baselines', 'ceiling'), got keys "
            f"{sorted(summary)[:8]}; pass the dicts evaluate_run returns."
        )
    return {MODEL: summary["model"], **summary.get("baselines", {}), **summary.get("ceiling", {})}


def summarize_runs(
    summaries: Sequence[Mapping[str, Any]], *, metrics: Sequence[str] | None = None
) -> pd.DataFrame:
    """Mean and standard deviation of every metric over several evaluated runs.

    Args:
      summaries: ``metrics.json`` contents (what :func:`evaluate_run` returns), one per
        run, e.g. one per split seed.
      metrics: metrics to keep (default: all).

    Returns:
      A long table with columns ``method`` (model, each baseline, technical_duplicate),
      ``group`` (``overall`` or a subgroup), ``metric``, ``mean``, ``sd`` (sample standard
      deviation, ddof=1; NaN for a single run) and ``n_runs`` (runs that report the value;
      a subgroup can be empty in some splits). Rows in the order first met.

    Raises:
      ValueError: for an empty list or a dict that is not a ``metrics.json``.
    """
    if not summaries:
        raise ValueError("summarize_runs: no runs given.")
    values: dict[tuple[str, str, str], list[float]] = {}
    for summary in summaries:
        for method, result in _methods_of(summary).items():
            groups = {"overall": result.get("overall", {}), **result.get("per_subgroup", {})}
            for group, table in groups.items():
                for metric, value in table.items():
                    if metrics is not None and metric not in metrics:
                        continue
                    if value is not None and math.isfinite(value):
                        values.setdefault((method, group, metric), []).append(float(value))
    rows = []
    for (method, group, metric), vals in values.items():
        arr = np.asarray(vals)
        rows.append(
            {
                "method": method,
                "group": group,
                "metric": metric,
                "mean": float(arr.mean()),
                "sd": float(arr.std(ddof=1)) if arr.size > 1 else float("nan"),
                "n_runs": int(arr.size),
            }
        )
    return pd.DataFrame(rows, columns=["method", "group", "metric", "mean", "sd", "n_runs"])


def summary_markdown(
    table: pd.DataFrame,
    *,
    group: str = "overall",
    metrics: Sequence[str] = CALIBRATED_REPORT_METRICS + REPORT_METRICS[:3],
) -> str:
    """A markdown table ``mean ± sd`` (methods as rows) of :func:`summarize_runs`'s output."""
    part = table[(table["group"] == group) & table["metric"].isin(metrics)]
    metrics = [m for m in metrics if m in set(part["metric"])]
    lines = ["| method | n | " + " | ".join(metrics) + " |", "|---" * (len(metrics) + 2) + "|"]
    for method in dict.fromkeys(part["method"]):
        rows = part[part["method"] == method].set_index("metric")
        cells = []
        for m in metrics:
            if m not in rows.index:
                cells.append("-")
                continue
            mean, sd = rows.loc[m, "mean"], rows.loc[m, "sd"]
            cells.append(f"{mean:.4f}" + ("" if not math.isfinite(sd) else f" ± {sd:.4f}"))
        lines.append(f"| {method} | {int(rows['n_runs'].max())} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def evaluate_runs(
    workdirs: Sequence[str | Path], summary_dir: str | Path, **kwargs
) -> pd.DataFrame:
    """Evaluates several runs (each into its own ``eval/``) and writes their mean ± sd.

    Args:
      workdirs: run folders, e.g. one per split seed.
      summary_dir: where ``summary.csv`` (:func:`summarize_runs`) and ``summary.md`` go.
      **kwargs: passed to :func:`evaluate_run` (not ``out_dir``).

    Returns:
      The :func:`summarize_runs` table.
    """
    if "out_dir" in kwargs:
        raise ValueError(
            "evaluate_runs writes each run into its own WORKDIR/eval; out_dir is not accepted."
        )
    summaries = [evaluate_run(w, **kwargs) for w in workdirs]
    table = summarize_runs(summaries)
    summary_dir = Path(summary_dir)
    summary_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(summary_dir / "summary.csv", table.to_csv(index=False))
    seeds = ", ".join(str(s.get("split_seed")) for s in summaries)
    lines = [
        f"# Evaluation over {len(summaries)} runs",
        "",
        "Runs: " + ", ".join(f"`{w}`" for w in workdirs) + f" (split seeds {seeds}).",
        "Mean ± sample standard deviation over the runs; n = runs reporting the value.",
        "",
    ]
    groups = list(dict.fromkeys(table["group"]))
    for group in groups:
        lines += [f"## {group}", "", summary_markdown(table, group=group), ""]
    write_text_atomic(summary_dir / "summary.md", "\n".join(lines))
    return table
