"""Evaluation plots written as PNG files.

Figures are drawn on matplotlib's Agg canvas without pyplot, so nothing here changes the
caller's matplotlib backend or global state and no display is needed. Every file is
written to a temporary file in the target folder and renamed into place, so a crash never
leaves a half-written PNG.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import scipy.sparse as sp
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from scformer_jax.io import atomic_path
from scformer_jax.metrics import pearson

PathLike = str | os.PathLike


def save_figure(fig: Figure, path: PathLike, *, dpi: int = 120) -> str:
    """Writes ``fig`` as a PNG atomically (temporary file, then rename).

    Args:
      fig: the figure.
      path: target file; parent folders are created.
      dpi: resolution.

    Returns:
      The path written, as a string.
    """
    path = os.fspath(path)
    FigureCanvasAgg(fig)
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight")
    return path


def _vector(x: Any, what: str, n: int | None = None) -> np.ndarray:
    arr = np.asarray(x.toarray() if sp.issparse(x) else x, dtype=np.float64)
    if arr.ndim == 2 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != 1 or (n is not None and arr.shape[0] != n):
        want = "(n_genes,)" if n is None else f"({n},)"
        raise ValueError(f"{what} must have shape {want}, got {arr.shape}.")
    return arr


def plot_perturbation(
    path: PathLike,
    condition: str,
    true_cells: Any,
    pred_mean: Any,
    ctrl_mean: Any,
    de_idx: Any,
    gene_names: Sequence[str],
    *,
    title: str | None = None,
) -> str:
    """Box plot of the true change of each DE gene over its cells, predicted change as points.

    The scFormer/GEARS ``plot_perturbation`` figure: for each of the perturbation's top
    non-dropout DE genes (rank order, left to right) a box of the per-cell true change over
    the control mean, a red dot at the predicted mean change, and a line at 0.

    Args:
      path: PNG file to write.
      condition: the condition name (title).
      true_cells: (n_cells, n_genes) true expression of the perturbed cells (dense or
        sparse).
      pred_mean: (n_genes,) predicted mean profile.
      ctrl_mean: (n_genes,) control mean.
      de_idx: (n_de,) int gene indices to show (e.g. the top-20 non-dropout DE genes).
      gene_names: (n_genes,) gene names (x labels).
      title: optional title; default ``condition``.

    Returns:
      The path written.
    """
    ctrl = _vector(ctrl_mean, "ctrl_mean")
    n_genes = ctrl.shape[0]
    pred = _vector(pred_mean, "pred_mean", n_genes)
    cells = true_cells.toarray() if sp.issparse(true_cells) else np.asarray(true_cells, float)
    if cells.ndim != 2 or cells.shape[1] != n_genes or cells.shape[0] == 0:
        raise ValueError(
            f"true_cells must be (n_cells >= 1, n_genes={n_genes}), got {cells.shape}."
        )
    idx = np.asarray(de_idx)
    if (
        idx.ndim != 1
        or idx.size == 0
        or not np.issubdtype(idx.dtype, np.integer)
        or (idx.min() < 0 or idx.max() >= n_genes)
    ):
        raise ValueError(
            f"de_idx must be a non-empty 1-D int array of indices in [0, {n_genes}), got {idx!r}."
        )
    if len(gene_names) != n_genes:
        raise ValueError(f"gene_names has {len(gene_names)} names for {n_genes} genes.")
    true_change = cells[:, idx] - ctrl[idx]
    pred_change = pred[idx] - ctrl[idx]

    fig = Figure(figsize=(max(4.0, 0.45 * idx.size + 1.5), 4.2))
    ax = fig.add_subplot()
    positions = np.arange(1, idx.size + 1)
    ax.boxplot(
        list(true_change.T),
        positions=positions,
        showfliers=False,
        widths=0.6,
        medianprops={"color": "black"},
    )
    ax.scatter(positions, pred_change, color="red", zorder=3, s=22, label="predicted")
    ax.axhline(0.0, color="grey", linestyle="--", linewidth=0.8)
    ax.set_xticks(positions)
    ax.set_xticklabels([str(gene_names[i]) for i in idx], rotation=90)
    ax.set_ylabel("change over control")
    ax.set_title(title or condition)
    ax.legend(loc="best", fontsize=8, frameon=False)
    return save_figure(fig, path)


def plot_change_scatter(
    path: PathLike,
    pred_change: Any,
    true_change: Any,
    *,
    title: str = "predicted vs true change over control",
    label: str | None = None,
) -> str:
    """Scatter of predicted against true change over control, with the identity line.

    Args:
      path: PNG file to write.
      pred_change: predicted changes, any shape (e.g. (n_perts, n_genes) or the DE genes
        of each perturbation concatenated); flattened.
      true_change: true changes, same shape.
      title: title; the Pearson correlation is appended.
      label: optional legend label of the points.

    Returns:
      The path written.
    """
    p = np.asarray(pred_change, dtype=np.float64).ravel()
    t = np.asarray(true_change, dtype=np.float64).ravel()
    if p.shape != t.shape or p.size == 0:
        raise ValueError(
            f"pred_change and true_change must be non-empty and of one shape, "
            f"got {np.shape(pred_change)} and {np.shape(true_change)}."
        )
    finite = np.isfinite(p) & np.isfinite(t)
    if not finite.all():
        raise ValueError(f"{int((~finite).sum())} NaN/inf values in pred_change/true_change.")
    fig = Figure(figsize=(4.6, 4.4))
    ax = fig.add_subplot()
    ax.scatter(t, p, s=8, alpha=0.6, label=label)
    lo, hi = float(min(p.min(), t.min())), float(max(p.max(), t.max()))
    pad = 0.05 * (hi - lo or 1.0)
    ax.plot([lo - pad, hi + pad], [lo - pad, hi + pad], color="grey", linewidth=0.8, linestyle="--")
    ax.axhline(0.0, color="lightgrey", linewidth=0.6)
    ax.axvline(0.0, color="lightgrey", linewidth=0.6)
    ax.set_xlabel("true change")
    ax.set_ylabel("predicted change")
    ax.set_title(f"{title}\nPearson r = {pearson(p, t):.3f}, n = {p.size}", fontsize=10)
    if label:
        ax.legend(fontsize=8, frameon=False)
    return save_figure(fig, path)


def plot_metric_bars(
    path: PathLike,
    results: Mapping[str, Mapping[str, Mapping[str, float]]],
    metric_names: Sequence[str] = ("pearson_delta", "pearson_de_delta", "mse_de"),
    *,
    subgroups: Sequence[str] | None = None,
) -> str:
    """Grouped bar chart of metrics per subgroup, one bar per method, one panel per metric.

    Args:
      path: PNG file to write.
      results: method (model or baseline name) -> group -> metric -> value, e.g.
        ``{"model": {"overall": res.overall, **res.per_subgroup}, "additive": {...}}``.
        A missing group or metric leaves its bar out.
      metric_names: metrics to show, one panel each.
      subgroups: groups on the x axis, in order; default: every group present, in order of
        first appearance.

    Returns:
      The path written.
    """
    if not results:
        raise ValueError("plot_metric_bars: results is empty; pass method -> group -> metric.")
    if not metric_names:
        raise ValueError("plot_metric_bars: metric_names is empty.")
    methods = list(results)
    if subgroups is None:
        subgroups = list(dict.fromkeys(g for m in methods for g in results[m]))
    if not subgroups:
        raise ValueError("plot_metric_bars: no group found in results.")
    if not any(
        name in results[m].get(g, {}) for m in methods for g in subgroups for name in metric_names
    ):
        raise ValueError(f"plot_metric_bars: none of {list(metric_names)} is in results.")

    n_panels = len(metric_names)
    fig = Figure(
        figsize=(max(4.5, 1.1 * len(subgroups) * max(1, len(methods)) / 2 + 2), 3.2 * n_panels)
    )
    width = 0.8 / len(methods)
    x = np.arange(len(subgroups))
    for row, name in enumerate(metric_names):
        ax = fig.add_subplot(n_panels, 1, row + 1)
        for j, method in enumerate(methods):
            values = [results[method].get(g, {}).get(name, math.nan) for g in subgroups]
            ax.bar(x - 0.4 + width * (j + 0.5), values, width, label=method)
        ax.set_xticks(x)
        ax.set_xticklabels(list(subgroups), rotation=20)
        ax.set_ylabel(name)
        ax.axhline(0.0, color="grey", linewidth=0.6)
        if row == 0:
            ax.legend(fontsize=8, frameon=False, ncols=min(4, len(methods)))
    fig.tight_layout()
    return save_figure(fig, path)


def read_metrics_jsonl(path: PathLike) -> list[dict[str, Any]]:
    """Reads a JSON-lines metrics file (one JSON object per line, blank lines skipped).

    Raises:
      ValueError: naming the line of a malformed record.
    """
    records = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(
                    f"{path}:{number}: not valid JSON ({err.msg}); each line of "
                    f"the metrics file must be one JSON object."
                ) from None
            if not isinstance(record, dict):
                raise ValueError(
                    f"{path}:{number}: expected a JSON object, got {type(record).__name__}."
                )
            records.append(record)
    return records


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def plot_training_curves(
    path: PathLike,
    metrics_file: PathLike,
    *,
    keys: Sequence[str] | None = None,
    x_key: str | None = None,
) -> str:
    """Training curves from a JSON-lines metrics file.

    Each record is a dict such as ``{"step": 100, "epoch": 1, "loss": 0.3}`` or
    ``{"step": 500, "val_loss": 0.2, "val_pearson_delta": 0.6}``; records may carry
    different keys. One panel per metric family: ``loss``, ``train_loss`` and ``val_loss``
    share the ``loss`` panel.

    Args:
      path: PNG file to write.
      metrics_file: the JSON-lines file.
      keys: metrics to plot; default every numeric key except ``step``, ``epoch`` and
        time stamps (``time``, ``wall_time``, ``timestamp``).
      x_key: x axis key; default ``"step"`` if any record has it, else ``"epoch"``, else
        the record number.

    Returns:
      The path written.
    """
    records = read_metrics_jsonl(metrics_file)
    if not records:
        raise ValueError(
            f"{metrics_file}: no records; train first (the metrics file is written by train.py)."
        )
    if x_key is None:
        x_key = next((k for k in ("step", "epoch") if any(k in r for r in records)), None)
    axis_keys = {"step", "epoch", "time", "wall_time", "timestamp"}
    if keys is None:
        keys = list(
            dict.fromkeys(
                k
                for r in records
                for k, v in r.items()
                if k not in axis_keys and k != x_key and _is_number(v)
            )
        )
    if not keys:
        raise ValueError(f"{metrics_file}: no numeric metric to plot.")

    def family(key: str) -> str:
        for prefix in ("train_", "val_", "valid_", "test_"):
            if key.startswith(prefix):
                return key[len(prefix) :]
        return key

    panels: dict[str, list[str]] = {}
    for k in keys:
        panels.setdefault(family(k), []).append(k)
    n = len(panels)
    n_cols = min(3, n)
    n_rows = math.ceil(n / n_cols)
    fig = Figure(figsize=(4.2 * n_cols, 3.0 * n_rows))
    plotted = 0
    for i, (fam, members) in enumerate(panels.items()):
        ax = fig.add_subplot(n_rows, n_cols, i + 1)
        for k in members:
            pts = [
                (r.get(x_key, j) if x_key else j, r[k])
                for j, r in enumerate(records)
                if _is_number(r.get(k)) and (x_key is None or _is_number(r.get(x_key)))
            ]
            if not pts:
                continue
            xs, ys = zip(*pts)
            ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, markersize=3, label=k)
            plotted += 1
        ax.set_title(fam, fontsize=10)
        ax.set_xlabel(x_key or "record")
        if fam == "loss" and all(_positive(records, k) for k in members):
            ax.set_yscale("log")
        if ax.get_lines():
            ax.legend(fontsize=7, frameon=False)
    if plotted == 0:
        raise ValueError(
            f"{metrics_file}: none of {list(keys)} has a numeric value with {x_key!r}."
        )
    fig.tight_layout()
    return save_figure(fig, path)


def _positive(records: Sequence[Mapping[str, Any]], key: str) -> bool:
    values = [r[key] for r in records if _is_number(r.get(key))]
    return bool(values) and min(values) > 0
