"""GEARS's perturbation metrics on mean expression profiles.

Every metric compares, for one perturbation (condition such as ``"A+ctrl"`` or ``"A+B"``),
the mean predicted profile with the mean true profile over all ``n_genes`` genes or over
the perturbation's top differentially expressed (DE) genes, either on expression values or
on the *change over control* (``profile - ctrl_mean``, "delta"). Per-perturbation values
are then averaged over perturbations, overall and per test subgroup (``unseen_single``,
``combo_seen0``, ``combo_seen1``, ``combo_seen2``).

The definitions follow GEARS (``gears.inference.compute_metrics``, ``deeper_analysis`` and
``non_dropout_analysis``); metric names are GEARS's except ``pearson_de_delta``, which GEARS
calls ``pearson_delta_de`` (scGPT's name is used here, see :data:`GEARS_METRIC_NAMES`).

Per-perturbation metrics (``k`` in 20, 50, 100, 200; ``de_idx[:k]`` are the top-``k`` DE
genes in rank order):

* ``mse``, ``pearson``: all genes, expression values.
* ``mse_de``, ``pearson_de``: top-20 DE genes, expression values.
* ``pearson_delta``: all genes, change over control; ``pearson_de_delta``: top-20 DE genes.
* ``pearson_top{k}_de``, ``pearson_delta_top{k}_de``, ``mse_top{k}_de``: top-``k`` DE genes
  (``mse_top{k}_de`` is GEARS's MSE of the changes, which equals the MSE of the values
  because the control mean cancels).
* ``frac_correct_direction_all``, ``frac_correct_direction_{k}``: fraction of genes where
  ``sign(pred - ctrl) == sign(true - ctrl)`` (two zero changes agree).
* ``frac_correct_direction_20_nonzero``: the same over the top-20 DE genes whose true mean
  is not zero.
* With ``non_dropout_de_idx`` (GEARS's ``top_non_dropout_de_20``): ``pearson_top20_de_non_dropout``,
  ``pearson_delta_top20_de_non_dropout``, ``mse_top20_de_non_dropout`` and the direction
  fractions ``frac_correct_direction_top20_non_dropout``,
  ``frac_opposite_direction_top20_non_dropout`` and ``frac_0/1_direction_top20_non_dropout``
  (one change zero, the other not).
* With ``non_zero_idx`` and ``non_dropout_idx`` (GEARS's ``non_zeros_gene_idx`` and
  ``non_dropout_gene_idx``): ``frac_{correct,opposite,0/1}_direction_{non_zero,non_dropout}``,
  the same three fractions over those gene sets (GEARS's ``non_dropout_analysis``).

Calibrated metrics (:data:`CALIBRATED_METRICS`; computed when ``pert_ref`` is given):

* ``pearson_delta_pert``, ``pearson_de_delta_pert``: ``pearson_delta`` and
  ``pearson_de_delta`` with the change taken over ``pert_ref``, the mean of all perturbed
  training cells (Systema's reference) instead of the control mean. Systematic differences
  between perturbed and control cells cancel, so predicting the average perturbed profile
  scores about 0 instead of high.
* ``wmse_delta``, ``r2_w_delta``: MSE and R^2 of the change over control, gene ``g``
  weighted by ``w_g = (|t_g| / max |t|)^2`` (:func:`de_weights`), ``t`` the Welch t of the
  perturbation's cells against control (the statistic GEARS ranks DE genes by). R^2 is
  ``1 - SSE_w / SST_w``: 0 is as good as predicting the weighted mean change everywhere.
* ``de_overlap_top{k}`` (k in 20, 100): share of the observed top-``k`` DE genes among the
  ``k`` largest predicted changes (:func:`top_k_overlap`).
* ``de_sign_agreement``: over the observed top-20 DE genes with a non-zero true change, the
  fraction whose predicted change has the same sign (:func:`sign_agreement`).
* ``discrimination_l1``: ``1 - r/n``, ``r`` the number of evaluated conditions whose true
  profile is closer (L1, the perturbed genes left out) to the prediction than the
  condition's own (:func:`discrimination_scores`); 1 best, about 0.5 for a prediction that
  ignores the perturbation.
* ``energy_distance``: energy distance between predicted and observed cells
  (:func:`energy_distance`, unbiased form).

Differences from cell-eval (Arc Institute; ``tests/test_cell_eval.py`` checks every shared
definition against it within 1e-6):

a. ``energy_distance`` leaves out the self-pairs in the within-set means (U-statistic) by
   default, so that methods scored on different numbers of cells (the technical duplicate
   scores half-sets) compare fairly; cell-eval includes them (``unbiased=False`` here).
   cell-eval's ``edistance`` metric is the Pearson, over perturbations, of each set's
   distance to control; here the distance itself, predicted to observed cells, is reported.
b. ``discrimination_l1``: cell-eval takes the position in ``argsort`` of the distances (ties
   in arbitrary order); ties count half here. It leaves out the column named like the
   perturbation; here the columns of the condition's measured perturbed genes.
c. ``de_overlap_top{k}`` and ``de_sign_agreement``: cell-eval ranks and signs genes by DE
   tests run on predicted cells (FDR-filtered, by |log2 fold change|); here by the
   predicted mean change, since baselines predict means only, and the observed DE genes are
   the data's ranking (``de_idx``). A predicted change of exactly 0 is never a predicted DE
   gene nor a sign match; genes with no true change are left out of the sign agreement
   (cell-eval compares ``sign`` values, so 0 vs 0 would match).

Documented behaviour and differences from GEARS:

1. **Rank order vs gene order.** GEARS's data loader stores each perturbation's top-20 DE
   genes as ``np.where(var_names.isin(top20))``, i.e. in *gene (column) order*, and
   ``evaluate`` builds ``pred_de``/``truth_de`` with them; ``deeper_analysis`` recomputes
   ``de_idx`` from ``rank_genes_groups_cov_all[:20]`` in *rank order*. Its
   ``frac_correct_direction_20_nonzero`` then compares ``pred_de`` (gene order) with
   ``ctrl[de_idx]`` (rank order), i.e. a gene's prediction with another gene's control
   value. Here every array is indexed with the same rank-ordered ``de_idx``, so each gene
   is compared with its own control value; the value can differ from GEARS's. All other
   metrics are invariant to the order of the genes, so they agree with GEARS.
2. **"nonzero"** in ``frac_correct_direction_20_nonzero`` means "the true expression is not
   zero in every cell" in GEARS; on mean profiles it is ``true_mean != 0``, the same thing
   for non-negative (log-normalised) expression.
3. **Constant vectors.** ``scipy.stats.pearsonr`` returns NaN (with a warning) when either
   vector is constant, and GEARS replaces that NaN with 0. :func:`pearson` returns 0.0 in
   that case without a NaN and without a warning, and :func:`evaluate_profiles` lists every
   such case in :attr:`EvalResult.notes` (the control baseline's predicted change is
   constant by design, so its ``pearson_delta`` is 0).
4. **Too few DE genes.** GEARS divides ``frac_correct_direction_{k}`` by ``k`` even when
   fewer than ``k`` genes were ranked. Here a top-``k`` metric is NaN in the
   per-perturbation table when fewer than ``k`` DE indices are given, and averages skip
   NaN; a metric that no perturbation defines is absent from the averages.
5. **Averages.** GEARS's subgroup means raise ``KeyError`` for a subgroup member that was
   not evaluated and give NaN for an empty subgroup. Here members without predictions are
   skipped (listed in ``notes``) and empty subgroups are absent.
6. **Not computed:** metrics that need the per-cell distribution of the truth
   (``frac_in_range*``, ``*sigma*``), GEARS's ``*_top200_hvg`` and ``fold_change_gap_*``
   (they need every condition's mean, not only the evaluated ones), and the "non-zero"
   family of ``non_zero_analysis``.
7. ``ctrl``: GEARS's ``compute_metrics`` gives the control condition ``mse_de = 0``;
   :func:`evaluate_gears_results` drops control cells from the evaluation instead.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from scformer_jax.data.conditions import CONTROL

DE_TOP_KS = (20, 50, 100, 200)
N_DE = 20

# Our name -> the name GEARS's deeper_analysis uses for the same quantity.
GEARS_METRIC_NAMES = {"pearson_de_delta": "pearson_delta_de"}


def _metric_names(with_non_dropout: bool) -> list[str]:
    names = ["mse", "pearson", "mse_de", "pearson_de", "pearson_delta", "pearson_de_delta"]
    for k in DE_TOP_KS:
        names += [f"pearson_top{k}_de", f"pearson_delta_top{k}_de", f"mse_top{k}_de"]
    names.append("frac_correct_direction_all")
    names += [f"frac_correct_direction_{k}" for k in DE_TOP_KS]
    names.append("frac_correct_direction_20_nonzero")
    if with_non_dropout:
        names += [
            "pearson_top20_de_non_dropout",
            "pearson_delta_top20_de_non_dropout",
            "mse_top20_de_non_dropout",
            "frac_correct_direction_top20_non_dropout",
            "frac_opposite_direction_top20_non_dropout",
            "frac_0/1_direction_top20_non_dropout",
        ]
    return names


def _gene_set_direction_names(with_gene_sets: bool) -> list[str]:
    if not with_gene_sets:
        return []
    return [
        f"frac_{kind}_direction_{subset}"
        for subset in ("non_zero", "non_dropout")
        for kind in ("correct", "opposite", "0/1")
    ]


METRIC_NAMES = tuple(_metric_names(with_non_dropout=True) + _gene_set_direction_names(True))

DE_OVERLAP_KS = (20, 100)
# Calibrated metrics, and whether higher is better.
CALIBRATED_METRICS = {
    "pearson_delta_pert": True,
    "pearson_de_delta_pert": True,
    "wmse_delta": False,
    "r2_w_delta": True,
    **{f"de_overlap_top{k}": True for k in DE_OVERLAP_KS},
    "de_sign_agreement": True,
    "discrimination_l1": True,
    "energy_distance": False,
}
CALIBRATED_METRIC_NAMES = tuple(CALIBRATED_METRICS)


# --------------------------------------------------------------------------------------
# Elementary metrics.
# --------------------------------------------------------------------------------------


def _is_constant(x: np.ndarray) -> bool:
    return x.size == 0 or bool(np.all(x == x.flat[0]))


def pearson(x: Any, y: Any) -> float:
    """Pearson correlation, 0.0 when either vector is constant (GEARS's convention).

    Args:
      x: (n,) values.
      y: (n,) values.

    Returns:
      The correlation in [-1, 1]; 0.0 (not NaN, no warning) if ``x`` or ``y`` is constant
      or has fewer than two entries.
    """
    x = np.asarray(x, dtype=np.float64).ravel()
    y = np.asarray(y, dtype=np.float64).ravel()
    if x.shape != y.shape:
        raise ValueError(f"pearson: x and y must have the same length, got {x.size} and {y.size}.")
    if x.size < 2 or _is_constant(x) or _is_constant(y):
        return 0.0
    xc = x - x.mean()
    yc = y - y.mean()
    denom = np.sqrt(np.dot(xc, xc) * np.dot(yc, yc))
    if denom == 0.0:  # underflow of nearly-constant vectors
        return 0.0
    return float(np.clip(np.dot(xc, yc) / denom, -1.0, 1.0))


def mse(x: Any, y: Any) -> float:
    """Mean squared error ``mean((x - y) ** 2)``.

    Args:
      x: (n,) values.
      y: (n,) values.

    Returns:
      The MSE; NaN for empty inputs.
    """
    x = np.asarray(x, dtype=np.float64).ravel()
    y = np.asarray(y, dtype=np.float64).ravel()
    if x.shape != y.shape:
        raise ValueError(f"mse: x and y must have the same length, got {x.size} and {y.size}.")
    if x.size == 0:
        return float("nan")
    return float(np.mean((x - y) ** 2))


def direction_fractions(pred_change: Any, true_change: Any) -> tuple[float, float, float]:
    """Agreement of the signs of two changes over control, gene by gene.

    Args:
      pred_change: (n,) predicted change over control.
      true_change: (n,) true change over control.

    Returns:
      ``(correct, opposite, zero_vs_nonzero)``: fractions of genes whose signs are equal
      (two zeros agree), opposite (+ vs -), or where exactly one change is zero; they sum
      to 1. NaNs for empty inputs.
    """
    diff = np.abs(
        np.sign(np.asarray(pred_change, np.float64)) - np.sign(np.asarray(true_change, np.float64))
    ).ravel()
    if diff.size == 0:
        return float("nan"), float("nan"), float("nan")
    n = diff.size
    return (
        float(np.sum(diff == 0) / n),
        float(np.sum(diff == 2) / n),
        float(np.sum(diff == 1) / n),
    )


def de_weights(t_statistic: Any) -> np.ndarray:
    """Gene weights from a perturbation's DE statistic: ``(|t| / max |t|) ** 2``.

    Args:
      t_statistic: (n_genes,) DE statistic of the perturbation against control (e.g. the
        Welch t of :func:`welch_t`); NaN counts as 0.

    Returns:
      (n_genes,) float64 weights in [0, 1], the most differential gene weighing 1; all
      zeros when no gene changes.
    """
    t = np.abs(np.nan_to_num(np.asarray(t_statistic, np.float64).ravel(), nan=0.0))
    top = t.max() if t.size else 0.0
    return (t / top) ** 2 if top > 0 else np.zeros_like(t)


def welch_t(
    pert_mean: Any, pert_var: Any, n_pert: int, ctrl_mean: Any, ctrl_var: Any, n_ctrl: int
) -> np.ndarray:
    """Welch's t of each gene, perturbed cells against control cells (scanpy's ``t-test``).

    Args:
      pert_mean, pert_var: (n_genes,) mean and unbiased variance of the perturbed cells.
      n_pert: number of perturbed cells.
      ctrl_mean, ctrl_var: (n_genes,) the same for the control cells.
      n_ctrl: number of control cells.

    Returns:
      (n_genes,) t statistics; 0 where both variances are 0.
    """
    diff = np.asarray(pert_mean, np.float64) - np.asarray(ctrl_mean, np.float64)
    scale = np.sqrt(
        np.asarray(pert_var, np.float64) / max(n_pert, 1)
        + np.asarray(ctrl_var, np.float64) / max(n_ctrl, 1)
    )
    with np.errstate(invalid="ignore", divide="ignore"):
        t = diff / scale
    return np.nan_to_num(t, nan=0.0, posinf=0.0, neginf=0.0)


def weighted_mse(x: Any, y: Any, weights: Any) -> float:
    """``sum(w * (x - y) ** 2) / sum(w)``; NaN when the weights sum to 0."""
    x, y, w = (np.asarray(a, np.float64).ravel() for a in (x, y, weights))
    total = w.sum()
    return float(np.dot(w, (x - y) ** 2) / total) if total > 0 else float("nan")


def weighted_r2(pred: Any, true: Any, weights: Any) -> float:
    """Weighted R^2 of ``pred`` as a prediction of ``true``.

    ``1 - sum(w (pred - true)^2) / sum(w (true - mean_w(true))^2)``, ``mean_w`` the
    weighted mean; 1 is perfect, 0 is as good as predicting ``mean_w(true)`` everywhere,
    and it is unbounded below. NaN when the weights sum to 0 or ``true`` is constant on
    the weighted genes.
    """
    p, t, w = (np.asarray(a, np.float64).ravel() for a in (pred, true, weights))
    total = w.sum()
    if total <= 0:
        return float("nan")
    spread = np.dot(w, (t - np.dot(w, t) / total) ** 2)
    if spread <= 0:
        return float("nan")
    return float(1.0 - np.dot(w, (p - t) ** 2) / spread)


def top_k_overlap(pred_change: Any, de_idx: Any, k: int) -> float:
    """Share of the observed top-``k`` DE genes among the ``k`` largest predicted changes.

    Genes are ranked by ``|pred_change|``; a gene predicted not to change (0) is never a
    predicted DE gene, so a prediction of no change scores 0.

    Args:
      pred_change: (n_genes,) predicted change over control.
      de_idx: (>= k,) observed DE gene indices, most significant first.
      k: list length.

    Returns:
      ``|top_k(pred) & de_idx[:k]| / k``; NaN when fewer than ``k`` DE genes are given.
    """
    change = np.abs(np.asarray(pred_change, np.float64).ravel())
    de = np.asarray(de_idx)
    if de.size < k or k < 1:
        return float("nan")
    order = np.argsort(-change, kind="stable")[:k]
    predicted = order[change[order] > 0]
    return float(np.intersect1d(predicted, de[:k]).size / k)


def sign_agreement(pred_change: Any, true_change: Any) -> float:
    """Fraction of genes whose predicted change has the sign of the true change.

    Genes with no true change are left out; a predicted 0 never agrees. NaN if no gene is
    left.
    """
    p = np.asarray(pred_change, np.float64).ravel()
    t = np.asarray(true_change, np.float64).ravel()
    keep = t != 0
    if not keep.any():
        return float("nan")
    return float(np.mean(np.sign(p[keep]) == np.sign(t[keep])))


def _pairwise_euclidean_mean(
    a: np.ndarray, b: np.ndarray | None = None, *, unbiased: bool = False
) -> float:
    """Mean Euclidean distance over the pairs of rows of ``a`` and ``b``; ``b=None``: of
    ``a`` with itself (the zero diagonal exact, and left out when ``unbiased``)."""
    other = a if b is None else b
    sq = (
        np.einsum("ij,ij->i", a, a)[:, None]
        + np.einsum("ij,ij->i", other, other)[None, :]
        - 2.0 * a @ other.T
    )
    if b is None:
        np.fill_diagonal(sq, 0.0)
    total = np.sqrt(np.maximum(sq, 0.0)).sum()
    if b is None and unbiased:
        n = a.shape[0]
        return float(total / (n * (n - 1))) if n > 1 else 0.0
    return float(total / sq.size)


def energy_distance(x: Any, y: Any, *, unbiased: bool = True) -> float:
    """Energy distance between two sets of cells, with Euclidean distances.

    ``2 E|X - Y| - E|X - X'| - E|Y - Y'|``. With ``unbiased`` (default) the within-set
    means leave out the pairs of a cell with itself (U-statistics), so the value does not
    grow as the sets get smaller and sets of different sizes compare fairly; its expected
    value is 0 for two samples of one distribution, and a single sample can be slightly
    negative. ``unbiased=False`` averages over all pairs, the zero self-pairs included, as
    ``cell-eval`` does (never negative).

    Args:
      x: (n, n_genes) cells.
      y: (m, n_genes) cells.
      unbiased: leave out self-pairs (see above).

    Returns:
      The distance (float); smaller is closer.
    """
    a = np.asarray(x, np.float64)
    b = np.asarray(y, np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or not len(a) or not len(b):
        raise ValueError(
            f"energy_distance needs two non-empty (cells, genes) arrays with the "
            f"same genes, got shapes {a.shape} and {b.shape}."
        )
    return (
        2.0 * _pairwise_euclidean_mean(a, b)
        - _pairwise_euclidean_mean(a, unbiased=unbiased)
        - _pairwise_euclidean_mean(b, unbiased=unbiased)
    )


def discrimination_scores(
    pred_mean: Mapping[str, Any],
    true_mean: Mapping[str, Any],
    *,
    exclude_idx: Mapping[str, Any] | None = None,
    metric: str = "l1",
) -> dict[str, float]:
    """How well each prediction picks out its own perturbation among all evaluated ones.

    For condition ``p``, the true profiles of all conditions are ranked by their distance to
    ``p``'s prediction; with ``r`` the number of conditions closer than ``p``'s own (ties
    count half), the score is ``1 - r / n``: 1 when the own profile is the closest,
    ``1/n`` when it is the furthest, about 0.5 for a prediction that knows nothing about
    ``p``.

    Args:
      pred_mean: condition -> (n_genes,) predicted profile.
      true_mean: condition -> (n_genes,) true profile; the candidates (every key of
        ``pred_mean`` must be here).
      exclude_idx: optional condition -> gene columns left out of ``p``'s distances (the
        perturbed genes, whose change is trivial to predict).
      metric: ``"l1"`` or ``"l2"``.

    Returns:
      condition -> score in (0, 1].
    """
    if metric not in ("l1", "l2"):
        raise ValueError(f"discrimination metric must be 'l1' or 'l2', got {metric!r}.")
    conditions = list(true_mean)
    truth = np.stack([np.asarray(true_mean[c], np.float64) for c in conditions])
    n = len(conditions)
    out = {}
    for i, cond in enumerate(conditions):
        if cond not in pred_mean:
            continue
        keep = np.ones(truth.shape[1], bool)
        if exclude_idx is not None and cond in exclude_idx:
            keep[np.asarray(exclude_idx[cond], np.int64)] = False
        diff = truth[:, keep] - np.asarray(pred_mean[cond], np.float64)[keep]
        dist = (
            np.abs(diff).sum(axis=1)
            if metric == "l1"
            else np.sqrt(np.einsum("ij,ij->i", diff, diff))
        )
        own = dist[i]
        others = np.delete(dist, i)
        rank = np.sum(others < own) + 0.5 * np.sum(others == own)
        out[cond] = float(1.0 - rank / n)
    return out


# --------------------------------------------------------------------------------------
# One perturbation.
# --------------------------------------------------------------------------------------


def _perturbation_metrics(
    pred: np.ndarray,
    true: np.ndarray,
    ctrl: np.ndarray,
    de_idx: np.ndarray,
    non_dropout_de_idx: np.ndarray | None,
    *,
    gene_sets: tuple[np.ndarray, np.ndarray] | None = None,
    pert_ref: np.ndarray | None = None,
    weights: np.ndarray | None = None,
) -> tuple[dict[str, float], list[str]]:
    """Metrics of one condition and the names of the Pearsons that met a constant vector.

    ``gene_sets``: (non-zero, non-dropout) gene indices for GEARS's direction fractions on
    those sets; ``pert_ref``: the perturbed reference profile; ``weights``: DE weights.
    The calibrated metrics are computed when ``pert_ref`` is given (the weighted ones when
    ``weights`` is given too)."""
    out: dict[str, float] = {}
    constant: list[str] = []
    pred_change = pred - ctrl
    true_change = true - ctrl

    def corr(name: str, a: np.ndarray, b: np.ndarray) -> None:
        if a.size >= 2 and (_is_constant(a) or _is_constant(b)):
            constant.append(name)
        out[name] = pearson(a, b)

    nan = float("nan")
    out["mse"] = mse(pred, true)
    corr("pearson", pred, true)

    top = de_idx[:N_DE] if de_idx.size >= N_DE else None
    if top is not None:
        out["mse_de"] = mse(pred[top], true[top])
        corr("pearson_de", pred[top], true[top])
    else:
        out["mse_de"] = out["pearson_de"] = nan
    corr("pearson_delta", pred_change, true_change)
    if top is not None:
        corr("pearson_de_delta", pred_change[top], true_change[top])
    else:
        out["pearson_de_delta"] = nan

    for k in DE_TOP_KS:
        if de_idx.size >= k:
            idx = de_idx[:k]
            corr(f"pearson_top{k}_de", pred[idx], true[idx])
            corr(f"pearson_delta_top{k}_de", pred_change[idx], true_change[idx])
            out[f"mse_top{k}_de"] = mse(pred_change[idx], true_change[idx])
        else:
            out[f"pearson_top{k}_de"] = out[f"pearson_delta_top{k}_de"] = nan
            out[f"mse_top{k}_de"] = nan

    out["frac_correct_direction_all"] = direction_fractions(pred_change, true_change)[0]
    for k in DE_TOP_KS:
        idx = de_idx[:k]
        out[f"frac_correct_direction_{k}"] = (
            direction_fractions(pred_change[idx], true_change[idx])[0] if de_idx.size >= k else nan
        )
    if top is not None:
        nonzero = top[true[top] != 0]
        out["frac_correct_direction_20_nonzero"] = (
            direction_fractions(pred_change[nonzero], true_change[nonzero])[0]
            if nonzero.size
            else nan
        )
    else:
        out["frac_correct_direction_20_nonzero"] = nan

    if non_dropout_de_idx is not None:
        idx = non_dropout_de_idx[:N_DE]
        if idx.size:
            corr("pearson_top20_de_non_dropout", pred[idx], true[idx])
            corr("pearson_delta_top20_de_non_dropout", pred_change[idx], true_change[idx])
            out["mse_top20_de_non_dropout"] = mse(pred_change[idx], true_change[idx])
            correct, opposite, half = direction_fractions(pred_change[idx], true_change[idx])
        else:
            for name in (
                "pearson_top20_de_non_dropout",
                "pearson_delta_top20_de_non_dropout",
                "mse_top20_de_non_dropout",
            ):
                out[name] = nan
            correct = opposite = half = nan
        out["frac_correct_direction_top20_non_dropout"] = correct
        out["frac_opposite_direction_top20_non_dropout"] = opposite
        out["frac_0/1_direction_top20_non_dropout"] = half
    if gene_sets is not None:
        for subset, idx in zip(("non_zero", "non_dropout"), gene_sets):
            fractions = direction_fractions(pred_change[idx], true_change[idx])
            for kind, value in zip(("correct", "opposite", "0/1"), fractions):
                out[f"frac_{kind}_direction_{subset}"] = value

    if pert_ref is not None:
        corr("pearson_delta_pert", pred - pert_ref, true - pert_ref)
        if top is not None:
            corr("pearson_de_delta_pert", pred[top] - pert_ref[top], true[top] - pert_ref[top])
        else:
            out["pearson_de_delta_pert"] = nan
        if weights is not None:
            out["wmse_delta"] = weighted_mse(pred_change, true_change, weights)
            out["r2_w_delta"] = weighted_r2(pred_change, true_change, weights)
        for k in DE_OVERLAP_KS:
            out[f"de_overlap_top{k}"] = top_k_overlap(pred_change, de_idx, k)
        out["de_sign_agreement"] = (
            sign_agreement(pred_change[top], true_change[top]) if top is not None else nan
        )
    return out, constant


def perturbation_metrics(
    pred_mean: Any,
    true_mean: Any,
    ctrl_mean: Any,
    de_idx: Any,
    non_dropout_de_idx: Any = None,
    *,
    non_zero_idx: Any = None,
    non_dropout_idx: Any = None,
    pert_ref: Any = None,
    de_weights: Any = None,
) -> dict[str, float]:
    """Every metric of one perturbation (see the module docstring for the list).

    Args:
      pred_mean: (n_genes,) mean predicted expression of the perturbed cells.
      true_mean: (n_genes,) mean true expression of the perturbed cells.
      ctrl_mean: (n_genes,) mean expression of the control cells.
      de_idx: (n_de,) int column indices of the DE genes, most significant first.
      non_dropout_de_idx: optional (<= 20,) int indices of the top non-dropout DE genes,
        most significant first (GEARS's ``top_non_dropout_de_20``).
      non_zero_idx, non_dropout_idx: optional int indices of GEARS's non-zero and
        non-dropout genes (``uns['non_zeros_gene_idx']``, ``uns['non_dropout_gene_idx']``);
        both or neither; enable the ``frac_*_direction_non_zero/non_dropout`` metrics.
      pert_ref: optional (n_genes,) perturbed reference (the mean of all perturbed
        training cells); enables the calibrated metrics.
      de_weights: optional (n_genes,) DE weights (:func:`de_weights`) for ``wmse_delta``
        and ``r2_w_delta``.

    Returns:
      metric name -> value; NaN where a top-``k`` metric has fewer than ``k`` DE genes.
    """
    ctrl = as_profile(ctrl_mean, "ctrl_mean")
    n_genes = ctrl.shape[0]
    pred = as_profile(pred_mean, "pred_mean", n_genes)
    true = as_profile(true_mean, "true_mean", n_genes)
    de = _as_index(de_idx, "de_idx", n_genes)
    nd = (
        None
        if non_dropout_de_idx is None
        else _as_index(non_dropout_de_idx, "non_dropout_de_idx", n_genes)
    )
    gene_sets = _gene_sets(non_zero_idx, non_dropout_idx, n_genes, "")
    ref = None if pert_ref is None else as_profile(pert_ref, "pert_ref", n_genes)
    weights = None if de_weights is None else as_profile(de_weights, "de_weights", n_genes)
    return _perturbation_metrics(
        pred, true, ctrl, de, nd, gene_sets=gene_sets, pert_ref=ref, weights=weights
    )[0]


def _gene_sets(
    non_zero_idx: Any, non_dropout_idx: Any, n_genes: int, where: str
) -> tuple[np.ndarray, np.ndarray] | None:
    if (non_zero_idx is None) != (non_dropout_idx is None):
        raise ValueError(
            "non_zero_idx and non_dropout_idx go together (GEARS's "
            "non_zeros_gene_idx and non_dropout_gene_idx); pass both or neither."
        )
    if non_zero_idx is None:
        return None
    return (
        _as_index(non_zero_idx, f"non_zero_idx{where}", n_genes),
        _as_index(non_dropout_idx, f"non_dropout_idx{where}", n_genes),
    )


# --------------------------------------------------------------------------------------
# Many perturbations.
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class EvalResult:
    """Metrics of one predictor on a set of perturbations.

    Attributes:
      overall: metric -> mean over the evaluated perturbations (NaN values skipped).
      per_subgroup: subgroup -> (metric -> mean over the subgroup's evaluated
        perturbations); subgroups with no evaluated perturbation are absent.
      per_perturbation: one row per condition (index ``condition``), a ``subgroup``
        column (``;``-joined names, empty if none) and one column per metric.
      subgroup_sizes: subgroup -> number of evaluated perturbations averaged.
      notes: human-readable remarks (constant vectors met by Pearson, subgroup members
        without predictions).
    """

    overall: dict[str, float]
    per_subgroup: dict[str, dict[str, float]]
    per_perturbation: pd.DataFrame
    subgroup_sizes: dict[str, int]
    notes: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready ``{"overall", "per_subgroup", "subgroup_sizes", "notes"}``."""
        return {
            "overall": dict(self.overall),
            "per_subgroup": {k: dict(v) for k, v in self.per_subgroup.items()},
            "subgroup_sizes": dict(self.subgroup_sizes),
            "notes": list(self.notes),
        }


def as_profile(x: Any, what: str, n_genes: int | None = None) -> np.ndarray:
    """A finite float64 (n_genes,) profile from a dense or sparse row; clear errors."""
    if sp.issparse(x):
        x = x.toarray()
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim == 2 and arr.shape[0] == 1:  # np.matrix rows from sparse means
        arr = arr[0]
    if arr.ndim != 1:
        raise ValueError(
            f"{what} must be a 1-D profile of shape (n_genes,), got shape "
            f"{arr.shape}. Average the cells first (see mean_profiles)."
        )
    if n_genes is not None and arr.shape[0] != n_genes:
        raise ValueError(
            f"{what} has {arr.shape[0]} genes but ctrl_mean has {n_genes}; all "
            f"profiles must use the same gene columns in the same order."
        )
    if not np.all(np.isfinite(arr)):
        bad = int(np.sum(~np.isfinite(arr)))
        raise ValueError(
            f"{what} contains {bad} NaN/inf values; metrics and baselines need "
            f"finite profiles (check the model output or the input data)."
        )
    return arr


def _as_index(idx: Any, what: str, n_genes: int) -> np.ndarray:
    arr = np.asarray(idx)
    if arr.ndim != 1:
        raise ValueError(
            f"{what} must be a 1-D array of gene column indices, got shape {arr.shape}."
        )
    if arr.size == 0:
        return arr.astype(np.int64)
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(
            f"{what} must hold integer gene column indices, got dtype "
            f"{arr.dtype}; map gene names with de_indices_from_gene_lists."
        )
    if arr.min() < 0 or arr.max() >= n_genes:
        raise ValueError(
            f"{what} has indices outside [0, {n_genes}); they must index the "
            f"profiles' gene columns."
        )
    if np.unique(arr).size != arr.size:
        raise ValueError(f"{what} repeats gene indices; each DE gene must appear once.")
    return arr.astype(np.int64)


def _mean_skipping_nan(values: Sequence[float]) -> float | None:
    arr = np.asarray(values, dtype=np.float64)
    arr = arr[~np.isnan(arr)]
    return float(arr.mean()) if arr.size else None


def _aggregate(table: pd.DataFrame, metric_names: Sequence[str]) -> dict[str, float]:
    out = {}
    for name in metric_names:
        value = _mean_skipping_nan(table[name].to_numpy())
        if value is not None:
            out[name] = value
    return out


def evaluate_profiles(
    pred_mean: Mapping[str, Any],
    true_mean: Mapping[str, Any],
    ctrl_mean: Any,
    de_idx: Mapping[str, Any],
    non_dropout_de_idx: Mapping[str, Any] | None = None,
    subgroups: Mapping[str, Sequence[str]] | None = None,
    *,
    non_zero_idx: Mapping[str, Any] | None = None,
    non_dropout_idx: Mapping[str, Any] | None = None,
    pert_ref: Any = None,
    de_weights: Mapping[str, Any] | None = None,
    pred_cells: Mapping[str, Any] | None = None,
    true_cells: Mapping[str, Any] | None = None,
    exclude_idx: Mapping[str, Any] | None = None,
) -> EvalResult:
    """Every metric for every condition of ``true_mean``, averaged overall and per subgroup.

    Args:
      pred_mean: condition -> (n_genes,) mean predicted profile; must cover every
        condition of ``true_mean`` (extra conditions are ignored).
      true_mean: condition -> (n_genes,) mean true profile; these conditions are evaluated.
      ctrl_mean: (n_genes,) mean expression of the control cells.
      de_idx: condition -> int array of DE gene column indices in *rank order* (most
        significant first, as in ``rank_genes_groups_cov_all``), at least 20 long for the
        top-20 metrics and at least ``k`` for the top-``k`` ones.
      non_dropout_de_idx: optional condition -> int array of the top non-dropout DE
        genes in rank order (GEARS's ``top_non_dropout_de_20``; see
        :func:`top_non_dropout_de`); enables the ``*_non_dropout`` metrics.
      subgroups: optional subgroup name -> list of conditions (e.g. GEARS's
        ``subgroup["test_subgroup"]``).
      non_zero_idx, non_dropout_idx: optional condition -> GEARS's non-zero / non-dropout
        gene indices (both or neither); enable ``frac_*_direction_non_zero/non_dropout``.
      pert_ref: optional (n_genes,) mean of all perturbed training cells; enables the
        calibrated metrics (:data:`CALIBRATED_METRIC_NAMES`) except those below.
      de_weights: optional condition -> (n_genes,) DE weights (:func:`de_weights`);
        enables ``wmse_delta`` and ``r2_w_delta``.
      pred_cells, true_cells: optional condition -> (n, n_genes) predicted / observed
        cells; ``energy_distance`` for the conditions in both (NaN for the others).
      exclude_idx: optional condition -> gene columns that ``discrimination_l1`` leaves
        out (the perturbed genes).

    Returns:
      An :class:`EvalResult`.

    Raises:
      ValueError: on missing predictions or DE indices, shape mismatches, NaNs, or
        out-of-range indices; the message names the condition.
    """
    if not true_mean:
        raise ValueError("evaluate_profiles: true_mean is empty; nothing to evaluate.")
    ctrl = as_profile(ctrl_mean, "ctrl_mean")
    n_genes = ctrl.shape[0]
    conditions = list(true_mean)
    required = [
        (
            "pred_mean",
            pred_mean,
            "no prediction",
            "pred_mean must cover every condition of true_mean.",
        ),
        ("de_idx", de_idx, "no DE gene indices", "pass de_idx for every condition."),
        (
            "non_dropout_de_idx",
            non_dropout_de_idx,
            "no non-dropout DE indices",
            "pass them for every condition or none.",
        ),
        (
            "non_zero_idx",
            non_zero_idx,
            "no non-zero gene indices",
            "pass them for every condition or none.",
        ),
        (
            "non_dropout_idx",
            non_dropout_idx,
            "no non-dropout gene indices",
            "pass them for every condition or none.",
        ),
        ("de_weights", de_weights, "no DE weights", "pass them for every condition or none."),
    ]
    for _, table, what, fix in required:
        if table is None:
            continue
        missing = [c for c in conditions if c not in table]
        if missing:
            raise ValueError(
                f"evaluate_profiles: {what} for {len(missing)} condition(s) {missing[:5]}; {fix}"
            )
    if (non_zero_idx is None) != (non_dropout_idx is None):
        raise ValueError(
            "evaluate_profiles: non_zero_idx and non_dropout_idx go together; pass both or neither."
        )
    ref = None if pert_ref is None else as_profile(pert_ref, "pert_ref", n_genes)

    metric_names = _metric_names(non_dropout_de_idx is not None) + _gene_set_direction_names(
        non_zero_idx is not None
    )
    if ref is not None:
        metric_names += [
            m
            for m in CALIBRATED_METRIC_NAMES
            if (de_weights is not None or m not in ("wmse_delta", "r2_w_delta"))
            and (pred_cells is not None or m != "energy_distance")
        ]
    rows = []
    notes: list[str] = []
    preds = {}
    for cond in conditions:
        pred = as_profile(pred_mean[cond], f"pred_mean[{cond!r}]", n_genes)
        true = as_profile(true_mean[cond], f"true_mean[{cond!r}]", n_genes)
        preds[cond] = pred
        de = _as_index(de_idx[cond], f"de_idx[{cond!r}]", n_genes)
        nd = (
            None
            if non_dropout_de_idx is None
            else _as_index(non_dropout_de_idx[cond], f"non_dropout_de_idx[{cond!r}]", n_genes)
        )
        gene_sets = (
            None
            if non_zero_idx is None
            else _gene_sets(non_zero_idx[cond], non_dropout_idx[cond], n_genes, f"[{cond!r}]")
        )
        weights = (
            None
            if de_weights is None or ref is None
            else as_profile(de_weights[cond], f"de_weights[{cond!r}]", n_genes)
        )
        values, constant = _perturbation_metrics(
            pred, true, ctrl, de, nd, gene_sets=gene_sets, pert_ref=ref, weights=weights
        )
        if constant:
            notes.append(
                f"{cond}: a constant vector made {', '.join(constant)} 0 "
                f"(Pearson is undefined there; GEARS also reports 0)."
            )
        rows.append(values)
    if ref is not None:
        truths = {c: as_profile(true_mean[c], f"true_mean[{c!r}]", n_genes) for c in conditions}
        if len(conditions) >= 2:
            scores = discrimination_scores(preds, truths, exclude_idx=exclude_idx)
            for row, cond in zip(rows, conditions):
                row["discrimination_l1"] = scores[cond]
        else:
            notes.append("discrimination_l1 needs at least two conditions; not computed.")
        if pred_cells is not None:
            for row, cond in zip(rows, conditions):
                if cond in pred_cells and true_cells is not None and cond in true_cells:
                    row["energy_distance"] = energy_distance(pred_cells[cond], true_cells[cond])

    membership: dict[str, list[str]] = {c: [] for c in conditions}
    per_subgroup: dict[str, dict[str, float]] = {}
    sizes: dict[str, int] = {}
    table = pd.DataFrame(rows, index=pd.Index(conditions, name="condition"), columns=metric_names)
    for name, members in (subgroups or {}).items():
        present = [c for c in members if c in membership]
        absent = [c for c in members if c not in membership]
        if absent:
            notes.append(
                f"subgroup {name}: {len(absent)} member(s) without predictions "
                f"skipped, e.g. {absent[:3]}."
            )
        for c in present:
            membership[c].append(name)
        if present:
            per_subgroup[name] = _aggregate(table.loc[present], metric_names)
            sizes[name] = len(present)
    table.insert(0, "subgroup", [";".join(membership[c]) for c in conditions])
    return EvalResult(
        overall=_aggregate(table, metric_names),
        per_subgroup=per_subgroup,
        per_perturbation=table,
        subgroup_sizes=sizes,
        notes=tuple(notes),
    )


# --------------------------------------------------------------------------------------
# Helpers: mean profiles, DE indices.
# --------------------------------------------------------------------------------------


def mean_profiles(values: Any, conditions: Sequence[str]) -> dict[str, np.ndarray]:
    """Mean profile of each condition from per-cell values.

    Args:
      values: (n_cells, n_genes) expression, dense array or scipy sparse matrix.
      conditions: (n_cells,) condition name of each cell.

    Returns:
      condition -> (n_genes,) float64 mean, conditions in order of first appearance.
    """
    conditions = np.asarray(conditions)
    if not sp.issparse(values):
        values = np.asarray(values, dtype=np.float64)
    if values.ndim != 2:
        raise ValueError(
            f"mean_profiles: values must be (n_cells, n_genes), got shape {values.shape}."
        )
    if conditions.shape != (values.shape[0],):
        raise ValueError(
            f"mean_profiles: conditions has shape {conditions.shape} but values "
            f"has {values.shape[0]} cells; give one condition name per cell."
        )
    codes, names = pd.factorize(conditions)
    counts = np.bincount(codes, minlength=len(names)).astype(np.float64)
    # A sparse (groups x cells) averaging matrix handles dense and sparse values alike.
    averaging = sp.csr_matrix(
        (1.0 / counts[codes], (codes, np.arange(codes.size))), shape=(len(names), codes.size)
    )
    means = averaging @ values
    means = np.asarray(means.toarray() if sp.issparse(means) else means, dtype=np.float64)
    if not np.all(np.isfinite(means)):
        raise ValueError("mean_profiles: values contain NaN/inf; clean the expression matrix.")
    return {str(name): means[i] for i, name in enumerate(names)}


def _close_matches(name: str, candidates: Sequence[str]) -> str:
    close = difflib.get_close_matches(name, list(candidates), n=3)
    return f" (close matches: {', '.join(close)})" if close else ""


def de_indices_from_gene_lists(
    de_genes: Mapping[str, Sequence[str]], gene_names: Sequence[str]
) -> dict[str, np.ndarray]:
    """Turns ranked DE gene lists (e.g. ``adata.uns["rank_genes_groups_cov_all"]``) into indices.

    Args:
      de_genes: condition -> gene identifiers, most significant first.
      gene_names: (n_genes,) identifiers of the profile columns (the same kind of
        identifier as in ``de_genes``, e.g. ``adata.var_names``).

    Returns:
      condition -> int64 column indices in the same (rank) order.

    Raises:
      ValueError: if a DE gene is not among ``gene_names`` (close matches listed).
    """
    position = {g: i for i, g in enumerate(gene_names)}
    out = {}
    for cond, genes in de_genes.items():
        idx = []
        for g in genes:
            if g not in position:
                raise ValueError(
                    f"DE gene {g!r} of condition {cond!r} is not among the "
                    f"{len(position)} gene columns{_close_matches(g, position)}; "
                    f"use the same gene identifiers as the profile columns."
                )
            idx.append(position[g])
        out[cond] = np.asarray(idx, dtype=np.int64)
    return out


def top_non_dropout_de(de_idx: Any, pert_mean: Any, ctrl_mean: Any, n: int = N_DE) -> np.ndarray:
    """GEARS's top non-dropout DE genes of one perturbation.

    A gene is a "dropout" when it is expressed in control (``ctrl_mean != 0``) but has zero
    mean in the perturbed cells; the result keeps the first ``n`` non-dropout genes of
    ``de_idx`` in rank order (GEARS's ``top_non_dropout_de_20``).

    Args:
      de_idx: (n_de,) int DE gene indices, most significant first.
      pert_mean: (n_genes,) mean true expression of the perturbed cells.
      ctrl_mean: (n_genes,) mean expression of the control cells.
      n: how many to keep.

    Returns:
      (<= n,) int64 indices in rank order.
    """
    ctrl = as_profile(ctrl_mean, "ctrl_mean")
    pert = as_profile(pert_mean, "pert_mean", ctrl.shape[0])
    idx = _as_index(de_idx, "de_idx", ctrl.shape[0])
    non_dropout = (pert != 0) | (ctrl == 0)
    return idx[non_dropout[idx]][:n]


def evaluate_gears_results(
    test_res: Mapping[str, Any],
    ctrl_mean: Any,
    de_idx: Mapping[str, Any],
    non_dropout_de_idx: Mapping[str, Any] | None = None,
    subgroups: Mapping[str, Sequence[str]] | None = None,
    *,
    non_zero_idx: Mapping[str, Any] | None = None,
    non_dropout_idx: Mapping[str, Any] | None = None,
) -> EvalResult:
    """:func:`evaluate_profiles` on a GEARS ``evaluate()``-style result dict.

    ``pred_de``/``truth_de`` of ``test_res`` are not used: they are in GEARS's gene order
    and carry no indices; the DE genes come from ``de_idx`` (rank order) instead. Control
    cells (``pert_cat == "ctrl"``) are dropped.

    Args:
      test_res: ``{"pert_cat": (n_cells,) str, "pred": (n_cells, n_genes),
        "truth": (n_cells, n_genes), ...}``.
      ctrl_mean: (n_genes,) mean expression of the control cells.
      de_idx: condition -> int DE gene indices in rank order.
      non_dropout_de_idx: optional condition -> top non-dropout DE indices in rank order.
      subgroups: optional subgroup name -> list of conditions.
      non_zero_idx, non_dropout_idx: optional condition -> GEARS's non-zero and
        non-dropout gene indices (both or neither).

    Returns:
      An :class:`EvalResult`.
    """
    for key in ("pert_cat", "pred", "truth"):
        if key not in test_res:
            raise ValueError(
                f"evaluate_gears_results: test_res has no {key!r}; expected "
                f"GEARS's evaluate() output with pert_cat, pred and truth."
            )
    pert_cat = np.asarray(test_res["pert_cat"]).astype(str)
    pred = np.asarray(test_res["pred"], dtype=np.float64)
    truth = np.asarray(test_res["truth"], dtype=np.float64)
    if pred.shape != truth.shape or pred.ndim != 2 or pred.shape[0] != pert_cat.shape[0]:
        raise ValueError(
            f"evaluate_gears_results: pred {pred.shape}, truth {truth.shape} and "
            f"pert_cat {pert_cat.shape} must be (n_cells, n_genes), "
            f"(n_cells, n_genes) and (n_cells,)."
        )
    keep = pert_cat != CONTROL
    return evaluate_profiles(
        mean_profiles(pred[keep], pert_cat[keep]),
        mean_profiles(truth[keep], pert_cat[keep]),
        ctrl_mean,
        de_idx,
        non_dropout_de_idx,
        subgroups,
        non_zero_idx=non_zero_idx,
        non_dropout_idx=non_dropout_idx,
    )


def to_gears_names(metrics: Mapping[str, float]) -> dict[str, float]:
    """Renames metrics to GEARS's names (``pearson_de_delta`` -> ``pearson_delta_de``)."""
    return {GEARS_METRIC_NAMES.get(k, k): v for k, v in metrics.items()}
