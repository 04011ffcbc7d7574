"""Simple baselines for perturbation prediction, fitted on the training split's mean profiles.

Each ``fit_*`` function returns a frozen object with ``name`` and
``predict(conditions) -> {condition: (n_genes,) mean profile}``, so the baselines run
through the same metrics (:mod:`scformer_jax.metrics`) as the model:

* :func:`fit_control_baseline` ("no change"): every perturbation predicts the control mean.
* :func:`fit_mean_baseline`: the mean of the training perturbations' profiles.
* :func:`fit_additive_baseline`: control + the sum of the single-gene changes seen in
  training; a gene without a training single gets the mean single-gene change (or no
  change, ``unseen_gene="zero"``).
* :func:`fit_linear_baseline`: the linear model of Ahlmann-Eltze, Huber & Anders (Nat
  Methods 2025): changes ~ ``G W P^T`` with a PCA gene embedding ``G`` and perturbation
  embeddings taken from ``G``'s rows, fitted by ridge regression in closed form.
* :func:`fit_coexpression_baseline` (when the control cells are given): the additive
  baseline whose genes without a training single get what the control cells' co-expression
  implies (:mod:`scformer_jax.prior`): the regression of every gene on the perturbed one,
  scaled by the training singles' typical direct effect on their own gene.
* ``additive_shrunk`` (:func:`fit_additive_baseline` with ``squared_errors``): the additive
  baseline with each training single's change shrunk towards no change by its sampling error,
  as ``model.shrink_singles`` does inside the model (under the same ``model.shrink_prior``
  in eval).

Condition names are GEARS's (``"ctrl"``, ``"A+ctrl"``, ``"ctrl+A"``, ``"A+B"``); a bare
``"A"`` is read as the single ``"A+ctrl"``. ``"ctrl"`` is predicted as the control mean by
every baseline.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np
import scipy.sparse as sp
import scipy.sparse.linalg as spla

from scformer_jax.data.conditions import CONTROL, condition_genes
from scformer_jax.gene_features import top_components
from scformer_jax.metrics import as_profile
from scformer_jax.prior import coexpression_from, shrink_single_changes

# --------------------------------------------------------------------------------------
# Inputs.
# --------------------------------------------------------------------------------------


def _training_changes(
    train_profiles: Mapping[str, Any], ctrl: np.ndarray
) -> dict[tuple[str, ...], list[np.ndarray]]:
    """Training perturbations' changes over control, grouped by their gene set."""
    if not isinstance(train_profiles, Mapping):
        raise ValueError("train_profiles must be a mapping condition -> (n_genes,) profile.")
    changes: dict[tuple[str, ...], list[np.ndarray]] = {}
    for cond, profile in train_profiles.items():
        genes = condition_genes(cond)
        if not genes:
            continue  # the control condition carries no perturbation effect
        change = as_profile(profile, f"train_profiles[{cond!r}]", ctrl.shape[0]) - ctrl
        # "A+B" and "B+A" are the same perturbation.
        changes.setdefault(tuple(sorted(genes)), []).append(change)
    if not changes:
        raise ValueError(
            "train_profiles has no perturbed condition (only 'ctrl' or nothing); "
            "baselines are fitted on the training perturbations' mean profiles."
        )
    return changes


def _single_changes(changes: Mapping[tuple[str, ...], list[np.ndarray]]) -> dict[str, np.ndarray]:
    """gene -> the mean change of its training single(s), from :func:`_training_changes`."""
    return {genes[0]: np.mean(v, axis=0) for genes, v in changes.items() if len(genes) == 1}


def _conditions(conditions: Sequence[str]) -> list[str]:
    if isinstance(conditions, str):
        raise ValueError(
            f"predict expects a list of conditions, got the string {conditions!r}; "
            f"wrap it in a list."
        )
    conditions = list(conditions)
    for c in conditions:
        condition_genes(c)
    return conditions


# --------------------------------------------------------------------------------------
# Control and mean baselines.
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class ControlBaseline:
    """Predicts no change: the control mean for every condition.

    Attributes:
      ctrl_mean: (n_genes,) mean expression of the control cells.
    """

    ctrl_mean: np.ndarray
    name: str = "control"

    def predict(self, conditions: Sequence[str]) -> dict[str, np.ndarray]:
        """condition -> (n_genes,) predicted mean profile."""
        return {c: self.ctrl_mean.copy() for c in _conditions(conditions)}


def fit_control_baseline(ctrl_mean: Any) -> ControlBaseline:
    """The "no change" baseline.

    Args:
      ctrl_mean: (n_genes,) mean expression of the control cells.
    """
    return ControlBaseline(ctrl_mean=as_profile(ctrl_mean, "ctrl_mean"))


@dataclasses.dataclass(frozen=True, eq=False)
class MeanBaseline:
    """Predicts the mean training perturbation profile for every perturbation.

    Attributes:
      ctrl_mean: (n_genes,) control mean (predicted for ``"ctrl"``).
      mean_profile: (n_genes,) mean over the training perturbations' mean profiles, each
        distinct perturbation weighted once.
    """

    ctrl_mean: np.ndarray
    mean_profile: np.ndarray
    name: str = "train_mean"

    def predict(self, conditions: Sequence[str]) -> dict[str, np.ndarray]:
        """condition -> (n_genes,) predicted mean profile."""
        return {
            c: (self.mean_profile if condition_genes(c) else self.ctrl_mean).copy()
            for c in _conditions(conditions)
        }


def fit_mean_baseline(train_profiles: Mapping[str, Any], ctrl_mean: Any) -> MeanBaseline:
    """The mean-of-training-perturbations baseline.

    Args:
      train_profiles: training condition -> (n_genes,) mean profile (``"ctrl"`` ignored).
      ctrl_mean: (n_genes,) mean expression of the control cells.
    """
    ctrl = as_profile(ctrl_mean, "ctrl_mean")
    changes = _training_changes(train_profiles, ctrl)
    per_pert = [np.mean(v, axis=0) for v in changes.values()]
    return MeanBaseline(ctrl_mean=ctrl, mean_profile=ctrl + np.mean(per_pert, axis=0))


# --------------------------------------------------------------------------------------
# Additive baseline.
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class AdditiveBaseline:
    """Control plus the sum of the perturbed genes' single-perturbation changes.

    Attributes:
      ctrl_mean: (n_genes,) control mean.
      single_changes: gene -> (n_genes,) change over control of its training single
        (``"A+ctrl"``/``"ctrl+A"``, averaged if both occur).
      fallback_change: (n_genes,) change used for a gene without a training single.
      unseen_gene: ``"mean"`` (fallback = mean training single change) or ``"zero"``.
    """

    ctrl_mean: np.ndarray
    single_changes: dict[str, np.ndarray]
    fallback_change: np.ndarray
    unseen_gene: str
    name: str = "additive"

    def unseen_genes(self, conditions: Sequence[str]) -> dict[str, tuple[str, ...]]:
        """condition -> the genes that had no training single (and got the fallback)."""
        out = {}
        for c in _conditions(conditions):
            missing = tuple(g for g in condition_genes(c) if g not in self.single_changes)
            if missing:
                out[c] = missing
        return out

    def predict(self, conditions: Sequence[str]) -> dict[str, np.ndarray]:
        """condition -> (n_genes,) predicted mean profile."""
        out = {}
        for c in _conditions(conditions):
            pred = self.ctrl_mean.copy()
            for g in condition_genes(c):
                pred += self.single_changes.get(g, self.fallback_change)
            out[c] = pred
        return out


def fit_additive_baseline(
    train_profiles: Mapping[str, Any],
    ctrl_mean: Any,
    *,
    unseen_gene: Literal["mean", "zero"] = "mean",
    squared_errors: Mapping[str, Any] | None = None,
    shrink_prior: str = "normal",
) -> AdditiveBaseline:
    """The additive baseline: ``ctrl + change(A) + change(B)`` from training singles.

    A purely additive double (``true(A+B) - ctrl == change(A) + change(B)``) is predicted
    exactly when both singles are in training. For a gene with no training single (every
    gene of the ``unseen_single`` and ``combo_seen0/1`` test subgroups) the change is the
    mean change of the training singles (``unseen_gene="mean"``; the mean of all training
    perturbations when training has no single) or none (``"zero"``).

    Args:
      train_profiles: training condition -> (n_genes,) mean profile.
      ctrl_mean: (n_genes,) mean expression of the control cells.
      unseen_gene: the fallback for genes without a training single.
      squared_errors: gene -> (n_genes,) squared standard error of its single's change
        (:func:`scformer_jax.prior.single_changes_and_errors`). Given, the singles' changes
        are first shrunk towards no change by their errors
        (:func:`scformer_jax.prior.shrink_single_changes`, as ``model.shrink_singles``) and
        the baseline is named ``additive_shrunk``.
      shrink_prior: the prior of that shrinkage (``model.shrink_prior``: ``"normal"`` or
        ``"adaptive"``).

    Returns:
      An :class:`AdditiveBaseline`.
    """
    if unseen_gene not in ("mean", "zero"):
        raise ValueError(f"unseen_gene must be 'mean' or 'zero', got {unseen_gene!r}.")
    ctrl = as_profile(ctrl_mean, "ctrl_mean")
    changes = _training_changes(train_profiles, ctrl)
    singles = _single_changes(changes)
    if squared_errors is not None:
        missing = sorted(set(singles) - set(squared_errors))
        if missing:
            raise ValueError(
                f"squared_errors has no entry for the training single(s) {missing[:5]}: give "
                "the errors of every training single (prior.single_changes_and_errors)."
            )
        singles = shrink_single_changes(
            singles, {g: squared_errors[g] for g in singles}, prior=shrink_prior
        )
    if unseen_gene == "zero":
        fallback = np.zeros_like(ctrl)
    elif singles:
        fallback = np.mean(list(singles.values()), axis=0)
    else:
        fallback = np.mean([np.mean(v, axis=0) for v in changes.values()], axis=0)
    return AdditiveBaseline(
        ctrl_mean=ctrl,
        single_changes=singles,
        fallback_change=fallback,
        unseen_gene=unseen_gene,
        name="additive" if squared_errors is None else "additive_shrunk",
    )


@dataclasses.dataclass(frozen=True, eq=False)
class CoexpressionBaseline:
    """Training singles' changes where measured, the co-expression prior for other genes."""

    ctrl_mean: np.ndarray
    single_changes: Mapping[str, np.ndarray]
    coexpression: Any  # scformer_jax.prior.CoexpressionPrior
    name: str = "coexpression"

    def predict(self, conditions: Sequence[str]) -> dict[str, np.ndarray]:
        out = {}
        for c in _conditions(conditions):
            pred = self.ctrl_mean.copy()
            genes = condition_genes(c)
            for g in genes:
                if len(genes) > 1 and g in self.single_changes:
                    pred += self.single_changes[g]
                else:
                    effect = self.coexpression.effect(g)
                    if effect is not None:
                        pred += effect
            out[c] = pred
        return out


def fit_coexpression_baseline(
    train_profiles: Mapping[str, Any],
    ctrl_mean: Any,
    gene_names: Sequence[str],
    control_expression: Any,
) -> CoexpressionBaseline | None:
    """The co-expression baseline, or None when no training single perturbs a measured gene.

    A single is predicted from the co-expression of its gene with the others in the control
    cells (``control_expression``, (n_controls, n_genes)); a double as the sum of its
    genes' training singles, the co-expression prediction standing in for a gene without
    one. A gene that is not measured adds nothing.
    """
    ctrl = as_profile(ctrl_mean, "ctrl_mean")
    changes = _training_changes(train_profiles, ctrl)
    singles = _single_changes(changes)
    control_expression = np.asarray(
        control_expression.toarray() if sp.issparse(control_expression) else control_expression,
        np.float64,
    )
    if control_expression.ndim != 2 or control_expression.shape[1] != ctrl.shape[0]:
        raise ValueError(
            f"control_expression must be (n_controls, {ctrl.shape[0]}); got "
            f"{control_expression.shape}."
        )
    coexpression = coexpression_from(control_expression, gene_names, singles)
    if coexpression is None:
        return None
    return CoexpressionBaseline(ctrl_mean=ctrl, single_changes=singles, coexpression=coexpression)


# --------------------------------------------------------------------------------------
# Linear baseline (Ahlmann-Eltze et al. 2025).
# --------------------------------------------------------------------------------------

# Above this many entries a dense matrix goes through the iterative (ARPACK) SVD.
_DENSE_SVD_MAX_ENTRIES = 20_000_000


def pca_gene_embedding(matrix: Any, n_components: int, *, seed: int = 0) -> np.ndarray:
    """Genes' principal-component scores, genes being the observations.

    Each column (a condition's or a cell's profile) is centred over the genes, as R's
    ``prcomp`` does for a genes x samples matrix; the scores are ``U_k S_k`` of its SVD.
    Each component's sign is fixed so that its largest-magnitude score is positive.

    Args:
      matrix: (n_genes, n_samples) dense array or scipy sparse matrix.
      n_components: number of components ``k``; clipped to ``min(n_genes, n_samples)``.
      seed: seed of the iterative SVD's start vector (large or sparse inputs).

    Returns:
      (n_genes, k) float64 gene embedding.
    """
    n_genes, n_samples = matrix.shape
    k = int(min(n_components, n_genes, n_samples))
    if k < 1:
        raise ValueError(
            f"pca_gene_embedding needs n_components >= 1 and a non-empty "
            f"matrix, got n_components={n_components}, shape {matrix.shape}."
        )
    fits_dense = n_genes * n_samples <= _DENSE_SVD_MAX_ENTRIES
    if fits_dense and (not sp.issparse(matrix) or k >= min(n_genes, n_samples) - 1):
        dense = np.asarray(matrix.toarray() if sp.issparse(matrix) else matrix, np.float64)
        centred = dense - dense.mean(axis=0, keepdims=True)
        scores = top_components(centred, k, exact_max=min(centred.shape))  # an exact SVD
    elif k >= min(n_genes, n_samples) - 1:
        raise ValueError(
            f"pca_gene_embedding: n_components={n_components} is too large for "
            f"the iterative SVD of a {matrix.shape} matrix; use fewer components."
        )
    else:
        # Sparse, or too large for a dense SVD: ARPACK on the implicitly centred matrix, so
        # that sparse input stays sparse.
        csr = (
            sp.csr_matrix(matrix, dtype=np.float64)
            if sp.issparse(matrix)
            else np.asarray(matrix, dtype=np.float64)
        )
        col_means = np.asarray(csr.mean(axis=0)).ravel()
        ones = np.ones(n_genes)
        op = spla.LinearOperator(
            shape=(n_genes, n_samples),
            dtype=np.float64,
            matvec=lambda v: csr @ np.ravel(v) - ones * (col_means @ np.ravel(v)),
            rmatvec=lambda v: csr.T @ np.ravel(v) - col_means * np.sum(v),
        )
        v0 = np.random.default_rng(seed).standard_normal(min(n_genes, n_samples))
        u, s, _ = spla.svds(op, k=k, v0=v0)
        order = np.argsort(-s)
        scores = u[:, order] * s[order]
    signs = np.sign(scores[np.argmax(np.abs(scores), axis=0), np.arange(scores.shape[1])])
    signs[signs == 0] = 1.0
    return scores * signs


@dataclasses.dataclass(frozen=True, eq=False)
class LinearBaseline:
    """Ridge-regression linear model on PCA gene embeddings.

    Predicts ``ctrl + center + G W (p - p_mean)``, where ``p`` is the sum of the rows of
    ``G`` of the perturbed genes.

    Attributes:
      ctrl_mean: (n_genes,) control mean.
      gene_names: (n_genes,) gene names of the columns (also the perturbable genes).
      gene_embedding: (n_genes, k) ``G``.
      weights: (k, k) ``W``.
      center: (n_genes,) mean training change.
      pert_embedding_mean: (k,) mean training perturbation embedding ``p_mean``.
      unmeasured_genes: ``"raise"`` or ``"ignore"`` (see :func:`fit_linear_baseline`).
    """

    ctrl_mean: np.ndarray
    gene_names: tuple[str, ...]
    gene_embedding: np.ndarray
    weights: np.ndarray
    center: np.ndarray
    pert_embedding_mean: np.ndarray
    unmeasured_genes: str
    name: str = "linear"

    def predict(self, conditions: Sequence[str]) -> dict[str, np.ndarray]:
        """condition -> (n_genes,) predicted mean profile.

        A double with one unmeasured gene (``unmeasured_genes="ignore"``) uses the measured
        gene's embedding alone; a condition with no measured gene gets the mean training
        change.

        Raises:
          ValueError: for a perturbed gene not among ``gene_names`` when
            ``unmeasured_genes="raise"`` (close matches listed).
        """
        position = {g: i for i, g in enumerate(self.gene_names)}
        out = {}
        for c in _conditions(conditions):
            genes = condition_genes(c)
            p = _pert_embedding(c, self.gene_embedding, position, self.unmeasured_genes)
            if not genes:
                out[c] = self.ctrl_mean.copy()
            elif not any(g in position for g in genes):
                out[c] = self.ctrl_mean + self.center
            else:
                out[c] = (
                    self.ctrl_mean
                    + self.center
                    + self.gene_embedding @ (self.weights @ (p - self.pert_embedding_mean))
                )
        return out


def _close_matches(name: str, candidates: Sequence[str], n: int = 3) -> list[str]:
    """Closest names, ignoring case (gene symbols are often mistyped in case only)."""
    by_upper: dict[str, str] = {}
    for c in candidates:
        by_upper.setdefault(c.upper(), c)
    return [by_upper[m] for m in difflib.get_close_matches(name.upper(), list(by_upper), n=n)]


def _pert_embedding(
    condition: str, gene_embedding: np.ndarray, position: Mapping[str, int], unmeasured_genes: str
) -> np.ndarray:
    p = np.zeros(gene_embedding.shape[1])
    for g in condition_genes(condition):
        if g in position:
            p += gene_embedding[position[g]]
        elif unmeasured_genes == "raise":
            close = _close_matches(g, position)
            hint = f" Close matches: {', '.join(close)}." if close else ""
            raise ValueError(
                f"linear baseline: perturbed gene {g!r} of condition {condition!r} is not "
                f"among the {len(position)} measured genes, so it has no embedding.{hint} "
                f"Fix the name, or pass unmeasured_genes='ignore' to give it no embedding."
            )
    return p


def fit_linear_baseline(
    train_profiles: Mapping[str, Any],
    ctrl_mean: Any,
    gene_names: Sequence[str],
    *,
    train_expression: Any = None,
    n_components: int = 10,
    ridge_penalty: float = 0.1,
    unmeasured_genes: Literal["raise", "ignore"] = "raise",
    seed: int = 0,
) -> LinearBaseline:
    """The linear baseline of Ahlmann-Eltze, Huber & Anders (Nat Methods 2025).

    With ``Y`` (n_genes x n_train) the training perturbations' changes over control
    (the control condition included as a zero change with a zero embedding, as in the
    paper), ``G`` (n_genes x k) a PCA gene embedding and ``P`` (n_train x k) the
    perturbation embeddings (the row of ``G`` of the perturbed gene; the sum of the two
    rows for a double, an extension: the paper fits singles only), the model is
    ``Y ~ center + G W (P - p_mean)^T`` with the ridge solution
    ``W = (G^T G + lambda I)^-1 G^T Yc Pc (Pc^T Pc + lambda I)^-1``, ``Yc`` and ``Pc``
    centred over the training perturbations. The paper centres ``Y`` only; centring
    ``P`` as well makes ``center`` the least-squares intercept, so a linear ground truth
    is recovered exactly as ``lambda -> 0`` (the two agree when ``p_mean = 0``).

    ``G``: by default, as in the paper, the PCA of the training pseudobulk matrix (genes x
    training conditions incl. control, genes as observations). With ``train_expression``
    (cells x genes) the PCA is taken over the training cells instead (an iterative SVD for
    large or sparse input: about 17 s for 31 M non-zeros on 2 CPU cores).

    Args:
      train_profiles: training condition -> (n_genes,) mean profile.
      ctrl_mean: (n_genes,) mean expression of the control cells.
      gene_names: (n_genes,) names of the profile columns, in the naming of the
        conditions (GEARS's ``gene_name``).
      train_expression: optional (n_cells, n_genes) training expression, dense or sparse.
      n_components: PCA dimension ``k`` (paper: 10); clipped to the data's size.
      ridge_penalty: ``lambda`` (paper: 0.1).
      unmeasured_genes: a perturbed gene that is not a column has no embedding:
        ``"raise"`` an error, or ``"ignore"`` it (a condition none of whose genes is
        measured is then predicted as control + the mean training change, and is left
        out of the fit).
      seed: seed of the iterative SVD (large or sparse inputs only).

    Returns:
      A :class:`LinearBaseline`.
    """
    if unmeasured_genes not in ("raise", "ignore"):
        raise ValueError(f"unmeasured_genes must be 'raise' or 'ignore', got {unmeasured_genes!r}.")
    if not (ridge_penalty >= 0 and np.isfinite(ridge_penalty)):
        raise ValueError(f"ridge_penalty must be a finite number >= 0, got {ridge_penalty!r}.")
    ctrl = as_profile(ctrl_mean, "ctrl_mean")
    n_genes = ctrl.shape[0]
    gene_names = tuple(str(g) for g in gene_names)
    if len(gene_names) != n_genes:
        raise ValueError(
            f"gene_names has {len(gene_names)} names but the profiles have "
            f"{n_genes} genes; pass the names of the profile columns in order."
        )
    if len(set(gene_names)) != n_genes:
        raise ValueError("gene_names has duplicates; gene names must identify columns uniquely.")
    position = {g: i for i, g in enumerate(gene_names)}

    conds, profiles = [], []
    for cond, profile in train_profiles.items():
        genes = condition_genes(cond)
        profiles.append(as_profile(profile, f"train_profiles[{cond!r}]", n_genes))
        conds.append(cond)
        if unmeasured_genes == "raise":
            _pert_embedding(cond, np.zeros((n_genes, 1)), position, "raise")
    if not any(condition_genes(c) for c in conds):
        raise ValueError(
            "train_profiles has no perturbed condition; the linear baseline is "
            "fitted on the training perturbations' mean profiles."
        )

    if train_expression is None:
        # Genes x (training conditions + control), as the paper's pseudobulk PCA.
        pseudobulk = np.column_stack(profiles + ([] if CONTROL in train_profiles else [ctrl]))
        gene_embedding = pca_gene_embedding(pseudobulk, n_components, seed=seed)
    else:
        if train_expression.ndim != 2 or train_expression.shape[1] != n_genes:
            raise ValueError(
                f"train_expression must be (n_cells, n_genes={n_genes}), got "
                f"shape {train_expression.shape}."
            )
        values = (
            train_expression.data if sp.issparse(train_expression) else np.asarray(train_expression)
        )
        if not np.all(np.isfinite(values)):
            raise ValueError(
                "train_expression contains NaN/inf values; clean the training "
                "expression matrix before fitting the linear baseline."
            )
        gene_embedding = pca_gene_embedding(train_expression.T, n_components, seed=seed)

    # Training columns: control (zero change, zero embedding) and every perturbation with
    # at least one measured gene.
    changes, embeddings = [np.zeros(n_genes)], [np.zeros(gene_embedding.shape[1])]
    for cond, profile in zip(conds, profiles):
        genes = condition_genes(cond)
        if not genes or not any(g in position for g in genes):
            continue
        changes.append(profile - ctrl)
        embeddings.append(_pert_embedding(cond, gene_embedding, position, unmeasured_genes))
    y = np.column_stack(changes)  # (n_genes, n_train)
    p = np.vstack(embeddings)  # (n_train, k)
    center = y.mean(axis=1)
    p_mean = p.mean(axis=0)
    yc = y - center[:, None]
    pc = p - p_mean
    k = gene_embedding.shape[1]
    gram_g = gene_embedding.T @ gene_embedding + ridge_penalty * np.eye(k)
    gram_p = pc.T @ pc + ridge_penalty * np.eye(k)
    # lstsq rather than solve: with lambda = 0 and a rank-deficient P the minimum-norm W.
    left = np.linalg.lstsq(gram_g, gene_embedding.T @ yc @ pc, rcond=None)[0]
    weights = np.linalg.lstsq(gram_p.T, left.T, rcond=None)[0].T
    return LinearBaseline(
        ctrl_mean=ctrl,
        gene_names=gene_names,
        gene_embedding=gene_embedding,
        weights=weights,
        center=center,
        pert_embedding_mean=p_mean,
        unmeasured_genes=unmeasured_genes,
    )


# --------------------------------------------------------------------------------------
# All at once.
# --------------------------------------------------------------------------------------


def fit_baselines(
    train_profiles: Mapping[str, Any],
    ctrl_mean: Any,
    gene_names: Sequence[str],
    *,
    train_expression: Any = None,
    n_components: int = 10,
    ridge_penalty: float = 0.1,
    unseen_gene: Literal["mean", "zero"] = "mean",
    unmeasured_genes: Literal["raise", "ignore"] = "ignore",
    control_expression: Any = None,
    single_squared_errors: Mapping[str, Any] | None = None,
    shrink_prior: str = "normal",
) -> dict[str, Any]:
    """Every baseline, keyed by its ``name`` (control, train_mean, additive, linear,
    coexpression when `control_expression` is given and additive_shrunk when
    `single_squared_errors` is).

    Args:
      train_profiles: training condition -> (n_genes,) mean profile.
      ctrl_mean: (n_genes,) mean expression of the control cells.
      gene_names: (n_genes,) names of the profile columns.
      train_expression: optional (n_cells, n_genes) training cells for the linear
        baseline's PCA (default: the pseudobulk profiles, as in the paper).
      n_components: the linear baseline's PCA dimension.
      ridge_penalty: the linear baseline's ridge penalty.
      unseen_gene: the additive baseline's fallback.
      unmeasured_genes: the linear baseline's handling of perturbed genes that are not
        columns (``"ignore"`` here: real data sets perturb genes outside the expression
        panel).
      control_expression: optional (n_controls, n_genes) control cells for the
        co-expression baseline.
      single_squared_errors: optional gene -> (n_genes,) squared standard errors of the
        training singles' changes, for the additive baseline with shrunk singles.
      shrink_prior: the prior of that shrinkage (as ``model.shrink_prior``).

    Returns:
      name -> fitted baseline.
    """
    baselines = [
        fit_control_baseline(ctrl_mean),
        fit_mean_baseline(train_profiles, ctrl_mean),
        fit_additive_baseline(train_profiles, ctrl_mean, unseen_gene=unseen_gene),
        fit_linear_baseline(
            train_profiles,
            ctrl_mean,
            gene_names,
            train_expression=train_expression,
            n_components=n_components,
            ridge_penalty=ridge_penalty,
            unmeasured_genes=unmeasured_genes,
        ),
    ]
    if control_expression is not None:
        baselines.append(
            fit_coexpression_baseline(train_profiles, ctrl_mean, gene_names, control_expression)
        )
    if single_squared_errors is not None:
        baselines.append(
            fit_additive_baseline(
                train_profiles,
                ctrl_mean,
                unseen_gene=unseen_gene,
                squared_errors=single_squared_errors,
                shrink_prior=shrink_prior,
            )
        )
    return {b.name: b for b in baselines if b is not None}
