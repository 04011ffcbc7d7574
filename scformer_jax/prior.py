"""The additive prior for multi-gene perturbations.

With ``model.additive_prior``, a double perturbation ``A+B`` is predicted as the sum of its
singles' changes over control plus what the model adds, the interaction:

    prediction(A+B, cell) = model(A+B, cell) + part(A, cell) + part(B, cell)

where ``part(G, cell)`` is the measured change of the single ``G+ctrl`` in the training split
(its mean over its training cells minus the control mean) when that single was trained on,
and otherwise the model's own predicted change for ``G+ctrl`` on that cell. In training, the
targets of multi-gene conditions have the measured parts taken off, so the model learns the
interaction only (the additive baseline is strong on doubles whose singles were seen; the
model corrects it). Singles and the control are unchanged: the model learns them whole.

With ``model.seen_single_correction``, training is unchanged and a multi-gene perturbation's
prediction is corrected by the model's own error on each of its singles that was measured in
training:

    prediction(A+B, cell) = model(A+B, cell) + sum over measured singles G of
                            (measured mean of G+ctrl - model(G+ctrl, cell))

so the double inherits the measured singles' effects and keeps what the model predicts beyond
its own singles (its interaction); a gene without a measured single adds nothing.

With ``model.shrink_singles``, the measured singles' changes that either of the two uses are
first shrunk towards no change, gene by gene, by how noisy they are (empirical Bayes, in the
spirit of DESeq2's fold-change shrinkage): a single measured on a few dozen cells has a
sampling error per gene of about the cells' spread over the square root of their number, which
the sum of two singles carries twice into a double's prediction. Each gene ``g`` gets a normal
prior over the training singles' true changes, ``N(0, tau_g^2)`` with
``tau_g^2 = max(mean over singles of d_Gg^2 - mean of se_Gg^2, 0)``, and each measured change
``d_Gg`` becomes its posterior mean ``w d_Gg``, ``w = tau_g^2 / (tau_g^2 + se_Gg^2)``, where
``se_Gg^2`` is the gene's within-condition variance pooled over the training singles divided by
the single's cell count (the control mean's error, over many more cells, is left out). With
``model.shrink_prior: adaptive`` the prior is instead one scale mixture of normals shared by
every (single, gene) change, fitted to them by penalised maximum likelihood (the adaptive
shrinkage of Stephens, Biostatistics 2017): a point mass at no change and normals of growing
spread. A change that is large against its error then keeps nearly all of it, where the
per-gene normal prior scales every single's change of a gene by the same factor, so the one
single that moves a gene most (a double's top differentially expressed genes) was shrunk as
hard as the noise.

With ``model.coexpression_prior``, every perturbation of measured genes starts from what the
control cells' co-expression implies, and the model learns the rest:

    prediction(P, cell) = model(P, cell) + sum over measured genes G of P of d * beta_G

where ``beta_G`` is the (ridge) regression of every gene on ``G`` across the control cells
(``beta_G[G] = 1``: a shift of ``G`` moves the genes that co-vary with it) and ``d`` the
typical direct effect, the mean change of the perturbed gene itself over the training singles
whose gene is measured. Training targets of every condition lose this part. A perturbation of
a gene never perturbed in training thus gets a data-derived guess of its effects, in the
direction the training perturbations mostly go (knock-down in a CRISPRi screen, activation in
a CRISPRa one). Perturbed genes that are not measured have no co-expression: no prior.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator, Mapping, Sequence

import numpy as np

from scformer_jax.config import SHRINK_PRIORS
from scformer_jax.data.conditions import CONTROL, condition_genes

# Ridge of the co-expression regression, as a fraction of the mean gene variance: keeps genes
# that barely vary in the control cells from getting huge coefficients.
RIDGE = 0.1
# Genes per block of :func:`shrink_single_changes` (bounds its memory at genome-wide sizes).
SHRINK_BLOCK_GENES = 1024
# Adaptive shrinkage: the mixture's spreads grow by this factor from a tenth of the smallest
# standard error to twice the largest change beyond its error (at most this many components:
# with more, the grid starts higher; spreads far below every error act as the point mass);
# the point mass at no change gets NULL_WEIGHT - 1 pseudo-observations (a Dirichlet penalty
# that favours it where the data cannot tell); the weights are fitted on at most MAX_FIT
# (single, gene) changes with an error, drawn with a fixed seed, by EM accelerated by SQUAREM
# until the penalised log-likelihood moves by less than TOLERANCE per change.
ADAPTIVE_GRID_FACTOR = float(np.sqrt(2.0))
ADAPTIVE_MAX_COMPONENTS = 64
ADAPTIVE_NULL_WEIGHT = 10.0
ADAPTIVE_MAX_FIT = 1 << 18
ADAPTIVE_MAX_ITERATIONS = 2000
ADAPTIVE_TOLERANCE = 1e-10


@dataclasses.dataclass(frozen=True, eq=False)
class CoexpressionPrior:
    """What the control cells' co-expression implies for a perturbation of a measured gene.

    Attributes:
      centred: float32 (n_controls, n_genes) the control cells minus their mean.
      denominator: float32 (n_genes,) each gene's variance over the control cells plus the
        ridge.
      direct_effect: ``d``, the mean change of the perturbed gene itself over the training
        singles of measured genes.
      columns: measured gene name -> expression column.
    """

    centred: np.ndarray
    denominator: np.ndarray
    direct_effect: float
    columns: Mapping[str, int]
    _cache: dict = dataclasses.field(default_factory=dict, repr=False)

    def effect(self, gene: str) -> np.ndarray | None:
        """float32 (n_genes,) ``d * beta_G``, or None for a gene that is not measured."""
        column = self.columns.get(gene)
        if column is None:
            return None
        if gene not in self._cache:
            n = max(len(self.centred) - 1, 1)
            beta = (self.centred.T @ self.centred[:, column]).astype(np.float64) / n
            beta /= float(self.denominator[column])
            beta[column] = 1.0
            self._cache[gene] = (self.direct_effect * beta).astype(np.float32)
        return self._cache[gene]


@dataclasses.dataclass(frozen=True, eq=False)
class AdditivePrior:
    """Measured single-gene changes of the training split (and the co-expression prior).

    Attributes:
      changes: gene name -> float32 (n_genes,) mean change of the training single over the
        control mean.
      coexpression: the co-expression prior (``model.coexpression_prior``), or None.
    """

    changes: Mapping[str, np.ndarray]
    coexpression: CoexpressionPrior | None = None

    def effect_offset(self, condition: str, n_genes: int) -> np.ndarray:
        """float32 (n_genes,) the co-expression prior of a condition (zeros without it)."""
        offset = np.zeros(n_genes, np.float32)
        if self.coexpression is not None:
            for gene in condition_genes(condition):
                effect = self.coexpression.effect(gene)
                if effect is not None:
                    offset += effect
        return offset

    def parts(self, condition: str, n_genes: int) -> tuple[np.ndarray, tuple[str, ...]]:
        """The measured part of a condition's prior and its genes without a measured single.

        Returns:
          (offset float32 (n_genes,), unmeasured genes). Singles and the control get a zero
          offset and no genes: the model predicts them whole.
        """
        genes = condition_genes(condition)
        offset = np.zeros(n_genes, np.float32)
        if len(genes) < 2:
            return offset, ()
        missing = []
        for gene in genes:
            if gene in self.changes:
                offset += self.changes[gene]
            else:
                missing.append(gene)
        return offset, tuple(missing)

    def offsets(
        self, conditions: Sequence[str], n_genes: int, *, additive: bool = True
    ) -> dict[str, np.ndarray]:
        """condition -> what training takes off its targets: the co-expression prior and,
        with `additive`, the measured singles' part of multi-gene conditions."""
        return {
            c: self.effect_offset(c, n_genes) + (self.parts(c, n_genes)[0] if additive else 0.0)
            for c in dict.fromkeys(conditions)
        }


def uses_prior(model_config) -> bool:
    """Whether a model's predictions need the training singles (:class:`AdditivePrior`)."""
    return bool(
        model_config.additive_prior
        or model_config.seen_single_correction
        or model_config.coexpression_prior
    )


def prior_for(
    model_config,
    dataset,
    train_conditions: Sequence[str],
    *,
    measured: TrainingMeasurements | None = None,
) -> AdditivePrior | None:
    """The training singles' changes (and the co-expression prior when the config asks for
    it) when the model config uses them, else None. `measured`: as
    :func:`fit_additive_prior`'s."""
    if not uses_prior(model_config):
        return None
    return fit_additive_prior(
        dataset,
        train_conditions,
        coexpression=model_config.coexpression_prior,
        shrink=model_config.shrink_singles,
        shrink_prior=model_config.shrink_prior,
        measured=measured,
    )


def fit_additive_prior(
    dataset,
    train_conditions: Sequence[str],
    *,
    coexpression: bool = False,
    shrink: bool = False,
    shrink_prior: str = "normal",
    measured: TrainingMeasurements | None = None,
) -> AdditivePrior:
    """The training singles' mean changes over the control mean (training cells only) and,
    with `coexpression`, the co-expression prior (:func:`fit_coexpression`, from the
    measured changes). With `shrink`, the changes are shrunk by their sampling error
    under `shrink_prior` (:func:`shrink_single_changes`). `measured`: the training split
    already measured (:func:`measure_training` of the same `train_conditions`), else the
    singles' cells are read here."""
    if measured is None:
        measured = measure_training(dataset, train_conditions, singles_only=True)
    changes = measured.single_changes
    used = (
        shrink_single_changes(changes, measured.single_squared_errors, prior=shrink_prior)
        if shrink
        else changes
    )
    return AdditivePrior(
        changes=used, coexpression=fit_coexpression(dataset, changes) if coexpression else None
    )


def _training_singles(train_conditions: Sequence[str]) -> dict[str, str]:
    """gene -> its single-gene training condition."""
    singles = {}
    for condition in dict.fromkeys(train_conditions):
        genes = condition_genes(condition)
        if condition != CONTROL and len(genes) == 1:
            singles[genes[0]] = condition
    return singles


class SquaredErrors(Mapping):
    """gene -> float64 (n_genes,) squared standard error of its single's change: the pooled
    within-condition variance over the single's cell count, computed when asked (one
    (n_genes,) vector is kept, not one per single)."""

    def __init__(self, pooled: np.ndarray, counts: Mapping[str, int]):
        self.pooled = pooled
        self.counts = dict(counts)

    def __getitem__(self, gene: str) -> np.ndarray:
        return self.pooled / self.counts[gene]

    def __iter__(self) -> Iterator[str]:
        return iter(self.counts)

    def __len__(self) -> int:
        return len(self.counts)


def _block_of(squared_errors: Mapping[str, np.ndarray], gene: str, block: slice) -> np.ndarray:
    """float64 the `block` of `gene`'s squared errors (of :class:`SquaredErrors`, without
    computing the whole vector)."""
    if isinstance(squared_errors, SquaredErrors):
        return squared_errors.pooled[block] / squared_errors.counts[gene]
    return np.asarray(squared_errors[gene][block], np.float64)


@dataclasses.dataclass(frozen=True, eq=False)
class TrainingMeasurements:
    """A training split's perturbations measured in one pass over their cells.

    Attributes:
      profiles: training condition (not the control) -> float32 (n_genes,) mean expression
        (the singles' only, when measured with ``singles_only``).
      single_changes: gene -> float32 (n_genes,) mean change of its training single over the
        control mean.
      single_squared_errors: gene -> float64 (n_genes,) squared standard error of that change
        (:class:`SquaredErrors`).
    """

    profiles: Mapping[str, np.ndarray]
    single_changes: Mapping[str, np.ndarray]
    single_squared_errors: Mapping[str, np.ndarray]


def measure_training(
    dataset, train_conditions: Sequence[str], *, singles_only: bool = False
) -> TrainingMeasurements:
    """The training perturbations' mean profiles and their singles' changes over the control
    mean with their squared standard errors, in one pass over the cells (of the singles
    alone with `singles_only`). The error of a gene's change is its within-condition
    variance, pooled over the training singles, over the single's cell count."""
    ctrl = np.asarray(dataset.control_mean, np.float32)
    singles = _training_singles(train_conditions)
    unknown = [c for c in dict.fromkeys(train_conditions) if c not in dataset.condition_cells]
    if unknown:
        raise KeyError(
            f"Training condition(s) {unknown[:5]} are not in the dataset {dataset.name!r}: "
            "the split does not belong to this dataset."
        )
    means, changes, counts = {}, {}, {}
    squares = np.zeros(dataset.n_genes, np.float64)
    # The singles first, in a fixed order (their squared deviations are summed), then the
    # other perturbations.
    for gene, condition in singles.items():
        cells = dataset.condition_cells[condition]
        mean, square = dataset.expression_moments(cells)
        means[condition] = mean.astype(np.float32)
        squares += square
        changes[gene] = (means[condition] - ctrl).astype(np.float32)
        counts[gene] = len(cells)
    ordered = singles.values() if singles_only else dict.fromkeys(train_conditions)
    profiles = {}
    for condition in ordered:
        if condition == CONTROL:
            continue
        if condition not in means:
            mean, _ = dataset.expression_moments(dataset.condition_cells[condition])
            means[condition] = mean.astype(np.float32)
        profiles[condition] = means[condition]
    dof = sum(counts.values()) - len(counts)
    pooled = squares / dof if dof > 0 else np.zeros(dataset.n_genes)
    return TrainingMeasurements(
        profiles=profiles,
        single_changes=changes,
        single_squared_errors=SquaredErrors(pooled, counts),
    )


def single_changes_and_errors(
    dataset, train_conditions: Sequence[str]
) -> tuple[dict[str, np.ndarray], Mapping[str, np.ndarray]]:
    """The training singles' mean changes over the control mean and their squared standard
    errors: gene -> (n_genes,) float32 and float64 (:func:`measure_training` of the singles)."""
    measured = measure_training(dataset, train_conditions, singles_only=True)
    return dict(measured.single_changes), measured.single_squared_errors


def shrink_single_changes(
    changes: Mapping[str, np.ndarray],
    squared_errors: Mapping[str, np.ndarray],
    *,
    prior: str = "normal",
) -> dict[str, np.ndarray]:
    """Measured single changes shrunk towards no change by their sampling error.

    Args:
      changes: gene -> (n_genes,) measured change of its single over the control mean.
      squared_errors: gene -> (n_genes,) squared standard error of that change.
      prior: ``"normal"``: a normal prior ``N(0, tau^2)`` per gene, its variance estimated
        from all the singles' changes of that gene, ``tau^2 = max(mean(change^2) -
        mean(squared error), 0)``; each change becomes its posterior mean ``w * change`` with
        ``w = tau^2 / (tau^2 + squared error)`` (1 where both are 0: nothing to shrink by).
        ``"adaptive"``: one prior for every change, a mixture of a point mass at 0 and
        normals ``N(0, s_k^2)`` whose weights are fitted by penalised maximum likelihood
        (:func:`fit_adaptive_prior`); the posterior mean is
        ``sum_k p(k | change) * s_k^2 / (s_k^2 + squared error) * change``, so a change
        large against its error is barely shrunk and one within its noise goes near 0. A
        change with no error is kept.

    Returns:
      gene -> float32 (n_genes,) the posterior means.
    """
    if prior not in SHRINK_PRIORS:
        raise ValueError(f"prior must be one of {list(SHRINK_PRIORS)}, got {prior!r}.")
    if not changes:
        return {}
    genes = list(changes)
    shapes = {np.shape(changes[g]) for g in genes} | {np.shape(squared_errors[g]) for g in genes}
    if len(shapes) != 1:
        raise ValueError(
            f"changes and squared_errors must have the same shape, got {sorted(shapes)}."
        )
    n_genes = shapes.pop()[0]
    for g in genes:
        se2 = np.asarray(squared_errors[g])
        if np.any(se2 < 0) or not np.all(np.isfinite(se2)):
            raise ValueError("squared_errors must be finite and non-negative.")
        if not np.all(np.isfinite(changes[g])):
            raise ValueError(f"the change of {g!r} is not finite (NaN or inf): nothing to shrink.")
    out = {g: np.empty(n_genes, np.float32) for g in genes}
    if prior == "adaptive":
        spreads, weights = fit_adaptive_prior(changes, squared_errors)
        block_genes = max(1, (1 << 22) // (len(genes) * len(spreads)))
    else:
        block_genes = SHRINK_BLOCK_GENES
    for start in range(0, n_genes, block_genes):
        block = slice(start, start + block_genes)
        d = np.stack([np.asarray(changes[g][block], np.float64) for g in genes])
        se2 = np.stack([_block_of(squared_errors, g, block) for g in genes])
        if prior == "adaptive":
            weight = _adaptive_posterior_weight(d, se2, spreads, weights)
        else:
            # Gene by gene: the prior of a gene is its own column's.
            tau2 = np.maximum((d**2).mean(axis=0) - se2.mean(axis=0), 0.0)
            denominator = tau2 + se2
            weight = np.divide(tau2, denominator, out=np.ones_like(d), where=denominator > 0)
        for i, g in enumerate(genes):
            out[g][block] = weight[i] * d[i]
    return out


def fit_adaptive_prior(
    changes: Mapping[str, np.ndarray], squared_errors: Mapping[str, np.ndarray]
) -> tuple[np.ndarray, np.ndarray]:
    """The mixture prior of ``shrink_single_changes(prior="adaptive")``.

    The spreads ``s_k`` are 0 (the point mass) and a grid growing by
    ``ADAPTIVE_GRID_FACTOR`` from a tenth of the smallest non-zero standard error to twice the
    largest ``sqrt(change^2 - squared error)`` (at most ``ADAPTIVE_MAX_COMPONENTS``). The
    weights maximise the penalised likelihood of the changes with non-zero error,
    ``change ~ sum_k w_k N(0, s_k^2 + squared error)``, with ``ADAPTIVE_NULL_WEIGHT - 1``
    pseudo-observations on the point mass (on at most ``ADAPTIVE_MAX_FIT`` of those changes,
    drawn with a fixed seed over the genes in sorted order), by EM with SQUAREM steps.

    Returns:
      (spreads float64 (K,), weights float64 (K,) summing to 1). Without any non-zero error:
      the point mass alone.
    """
    genes = sorted(changes)

    def with_error(g):  # the gene's changes with a non-zero error, and those errors
        d = np.asarray(changes[g], np.float64)
        se2 = np.asarray(squared_errors[g], np.float64)
        return d[se2 > 0], se2[se2 > 0]

    # A first pass for the grid's ends and the count of changes with an error, a second for
    # the (sub)sample the weights are fitted on: (single, gene) changes are never all held at
    # once (at genome-wide sizes they are GBs).
    counts, smallest_se2, largest_excess = [], np.inf, 0.0
    for g in genes:
        d, se2 = with_error(g)
        counts.append(len(d))
        if len(d):
            smallest_se2 = min(smallest_se2, float(se2.min()))
            largest_excess = max(largest_excess, float(np.max(d**2 - se2)))
    total = sum(counts)
    if not total:
        return np.zeros(1), np.ones(1)
    smallest = np.sqrt(smallest_se2) / 10.0
    largest = max(2.0 * np.sqrt(largest_excess), smallest)
    log_factor = np.log(ADAPTIVE_GRID_FACTOR)
    n_grid = int(np.floor(np.log(largest / smallest) / log_factor)) + 1
    if n_grid > ADAPTIVE_MAX_COMPONENTS - 2:  # start higher: the grid ends at `largest`
        n_grid = ADAPTIVE_MAX_COMPONENTS - 2
        smallest = largest / ADAPTIVE_GRID_FACTOR ** (n_grid - 1)
    spreads = np.unique(
        np.concatenate([[0.0], smallest * ADAPTIVE_GRID_FACTOR ** np.arange(n_grid), [largest]])
    )
    picked = None
    if total > ADAPTIVE_MAX_FIT:
        picked = np.sort(np.random.default_rng(0).choice(total, ADAPTIVE_MAX_FIT, replace=False))
    d_parts, se2_parts = [], []
    start = 0
    for g, count in zip(genes, counts):
        d, se2 = with_error(g)
        if picked is not None:
            lo, hi = np.searchsorted(picked, [start, start + count])
            d, se2 = d[picked[lo:hi] - start], se2[picked[lo:hi] - start]
        d_parts.append(d)
        se2_parts.append(se2)
        start += count
    d, se2 = np.concatenate(d_parts), np.concatenate(se2_parts)
    likelihood = _component_likelihoods(d, se2, spreads)  # (n, K), rows scaled to max 1
    pseudo = np.zeros(len(spreads))
    pseudo[0] = ADAPTIVE_NULL_WEIGHT - 1.0

    def objective(w):  # the penalised log-likelihood (up to the rows' scales)
        mixture = np.maximum(likelihood @ w, 1e-300)
        return float(np.log(mixture).sum() + pseudo @ np.log(np.maximum(w, 1e-300)))

    def em(w):
        mixture = np.maximum(likelihood @ w, 1e-300)
        return (w * (likelihood.T @ (1.0 / mixture)) + pseudo) / (len(d) + pseudo.sum())

    weights = np.full(len(spreads), 1.0 / len(spreads))
    value = objective(weights)
    for _ in range(ADAPTIVE_MAX_ITERATIONS):
        # SQUAREM (Varadhan & Roland 2008): a step along two EM updates' direction, kept only
        # when it stays on the simplex and raises the objective; else the plain EM update.
        first = em(weights)
        second = em(first)
        r, v = first - weights, second - 2 * first + weights
        step = min(-np.sqrt((r @ r) / (v @ v)), -1.0) if v @ v > 0 else -1.0
        proposal = weights - 2 * step * r + step**2 * v
        while np.any(proposal <= 0) and step < -1.0:  # back towards the EM update
            step = (step - 1.0) / 2.0 if step < -1.01 else -1.0
            proposal = weights - 2 * step * r + step**2 * v
        weights, new_value = second, objective(second)
        if np.all(proposal > 0):
            accelerated = em(proposal / proposal.sum())
            accelerated_value = objective(accelerated)
            if accelerated_value >= new_value:
                weights, new_value = accelerated, accelerated_value
        if abs(new_value - value) <= ADAPTIVE_TOLERANCE * len(d):
            break
        value = new_value
    return spreads, weights


def _component_likelihoods(d: np.ndarray, se2: np.ndarray, spreads: np.ndarray) -> np.ndarray:
    """(..., K) the normal densities of `d` under each component, ``N(0, s_k^2 + se2)``,
    divided by their largest over the components (se2 > 0)."""
    variance = spreads**2 + se2[..., None]
    log_likelihood = -0.5 * (np.log(variance) + d[..., None] ** 2 / variance)
    log_likelihood -= log_likelihood.max(axis=-1, keepdims=True)
    return np.exp(log_likelihood)


def _adaptive_posterior_weight(
    d: np.ndarray, se2: np.ndarray, spreads: np.ndarray, weights: np.ndarray
) -> np.ndarray:
    """The factor of each change in its posterior mean under the mixture (1 where its
    error is 0)."""
    safe = np.where(se2 > 0, se2, 1.0)
    joint = _component_likelihoods(d, safe, spreads) * weights
    posterior = joint / np.maximum(joint.sum(axis=-1, keepdims=True), 1e-300)
    factor = (posterior * (spreads**2 / (spreads**2 + safe[..., None]))).sum(axis=-1)
    return np.where(se2 > 0, factor, 1.0)


def fit_coexpression(
    dataset, changes: Mapping[str, np.ndarray], *, ridge: float = RIDGE
) -> CoexpressionPrior | None:
    """The co-expression prior of a dataset's control cells and the training singles
    `changes` (None when no training single perturbs a measured gene: no direct effect to
    scale by)."""
    return coexpression_from(
        dataset.dense_rows(dataset.control_cells), dataset.gene_names, changes, ridge=ridge
    )


def coexpression_from(
    controls: np.ndarray,
    gene_names: Sequence[str],
    changes: Mapping[str, np.ndarray],
    *,
    ridge: float = RIDGE,
) -> CoexpressionPrior | None:
    """The co-expression prior from control cells (n_controls, n_genes) with columns
    `gene_names` and training singles' changes (gene -> (n_genes,)); None when no training
    single perturbs a measured gene."""
    columns: dict[str, int] = {}
    for column, gene in enumerate(gene_names):
        columns.setdefault(str(gene), column)
    direct = [float(change[columns[gene]]) for gene, change in changes.items() if gene in columns]
    if not direct:
        return None
    controls = np.asarray(controls, np.float64)
    centred = controls - controls.mean(axis=0)
    var = (centred**2).sum(axis=0) / max(len(controls) - 1, 1)
    return CoexpressionPrior(
        centred=centred.astype(np.float32),
        denominator=(var + ridge * max(float(var.mean()), 1e-12)).astype(np.float32),
        direct_effect=float(np.mean(direct)),
        columns=columns,
    )
