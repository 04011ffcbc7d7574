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
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence

import numpy as np

from scformer_jax.data.conditions import CONTROL, condition_genes


@dataclasses.dataclass(frozen=True, eq=False)
class AdditivePrior:
    """Measured single-gene changes of the training split.

    Attributes:
      changes: gene name -> float32 (n_genes,) mean change of the training single over the
        control mean.
    """

    changes: Mapping[str, np.ndarray]

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

    def offsets(self, conditions: Sequence[str], n_genes: int) -> dict[str, np.ndarray]:
        """condition -> the measured part that training takes off its targets."""
        return {c: self.parts(c, n_genes)[0] for c in dict.fromkeys(conditions)}


def uses_prior(model_config) -> bool:
    """Whether a model's predictions need the training singles (:class:`AdditivePrior`)."""
    return bool(model_config.additive_prior or model_config.seen_single_correction)


def prior_for(model_config, dataset, train_conditions: Sequence[str]) -> AdditivePrior | None:
    """The training singles' changes when the model config uses them, else None."""
    return fit_additive_prior(dataset, train_conditions) if uses_prior(model_config) else None


def fit_additive_prior(dataset, train_conditions: Sequence[str]) -> AdditivePrior:
    """The training singles' mean changes over the control mean (training cells only)."""
    ctrl = np.asarray(dataset.control_mean, np.float32)
    changes = {}
    for condition in dict.fromkeys(train_conditions):
        genes = condition_genes(condition)
        if condition != CONTROL and len(genes) == 1:
            changes[genes[0]] = (dataset.condition_mean(condition) - ctrl).astype(np.float32)
    return AdditivePrior(changes=changes)
