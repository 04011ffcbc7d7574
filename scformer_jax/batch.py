"""The two-channel input contract, stated once.

Every cell reaches the model as a fixed-length sequence of gene tokens. For each token the
model sees the gene's token id and **two input channels**:

* channel 0 (:data:`VALUE_CHANNEL`): the paired control cell's expression of that gene
  (log-normalised), and
* channel 1 (:data:`FLAG_CHANNEL`): the perturbation flag, ``0`` = not perturbed,
  ``1`` = perturbed, ``pert_pad_id`` (2 by default) at padding positions.

The target is the perturbed cell's expression of the same genes. The original PyTorch script
read the flag from ``x[:, 1]`` of a GEARS batch; GEARS >= 0.0.3 stores ``x`` with one column
only, hence its ``IndexError: index 1 is out of bounds for dimension 1 with size 1``. Here a
one-channel input fails while tracing, with :func:`check_inputs`' message.
"""

from __future__ import annotations

from typing import Any

import chex
import flax.struct
import jax.numpy as jnp
import numpy as np

VALUE_CHANNEL = 0
FLAG_CHANNEL = 1
NUM_INPUT_CHANNELS = 2

# Perturbation flag values (channel 1).
FLAG_NOT_PERTURBED = 0
FLAG_PERTURBED = 1
DEFAULT_PERT_PAD_ID = 2

_FLAG_HOWTO = (
    "Build the flag channel from the condition names, not from GEARS's `pert_idx` (it indexes "
    "GEARS's GO-graph gene list `pert_names`, not the expression columns): for a condition "
    "'A+B' set flag 1 at the tokens of genes A and B, 0 elsewhere and pert_pad_id at padding, "
    "then stack `inputs = np.stack([control_values, pert_flags], axis=-1)`. "
    "`scformer_jax.data.from_gears_batch` converts a GEARS batch (x with 1 or 2 columns)."
)


def input_shape_error(
    given: tuple[int, ...], batch: int | None = None, length: int | None = None
) -> str:
    """The message for an input that breaks the two-channel contract."""
    rows = "batch" if batch is None else batch
    expected = f"({rows}, {'seq_len' if length is None else length}, 2)"
    return (
        f"scformer-jax expects the per-gene input `inputs` of shape {expected}: channel 0 = the "
        f"control cell's expression, channel 1 = the perturbation flag (0/1, pert_pad_id at "
        f"padding); got shape {tuple(given)}. "
        + (
            "A last axis of size 1 is the GEARS >= 0.0.3 layout (expression only, which made the "
            "original script fail with 'IndexError: index 1 is out of bounds for dimension 1 "
            "with size 1'). "
            if len(given) >= 1 and given[-1] == 1
            else ""
        )
        + _FLAG_HOWTO
    )


def check_inputs(gene_ids: Any, inputs: Any, padding_mask: Any) -> None:
    """Trace-time check of the two-channel contract (works under ``jit`` and ``pmap``).

    Args:
      gene_ids: int array (batch, seq_len).
      inputs: float array (batch, seq_len, 2).
      padding_mask: bool array (batch, seq_len), True at padding positions.

    Raises:
      AssertionError: while tracing, naming the expected and the given shape and how to
        build the flag channel.
    """
    chex.assert_rank(gene_ids, 2)
    batch, length = gene_ids.shape
    shape = tuple(inputs.shape)
    if len(shape) != 3 or shape[0] != batch or shape[1] != length or shape[2] != NUM_INPUT_CHANNELS:
        raise AssertionError(input_shape_error(shape, batch, length))
    chex.assert_shape(padding_mask, (batch, length))


@flax.struct.dataclass
class PerturbBatch:
    """What the model and the train step consume: fixed shapes, arrays only.

    Attributes:
      gene_ids: int32 (batch, seq_len): token ids of the input genes (vocabulary ids),
        ``pad_token_id`` at padding.
      inputs: float32 (batch, seq_len, 2): channel 0 the control expression, channel 1 the
        perturbation flag (see the module docstring).
      target_values: float32 (batch, seq_len): the perturbed cell's expression of each token.
      padding_mask: bool (batch, seq_len): True at padding positions.
      cell_weights: float32 (batch,): 1 for real cells, 0 for the rows that pad a last
        partial batch; every loss ignores rows of weight 0.
      labels: int32 (batch,): class labels for the CLS objective (cell type by default).
      target_mask: bool (batch, seq_len): True where the token has a target. False at
        padding and at the extra tokens of perturbed genes that are not measured (they carry
        flag 1 as input but have no expression to predict).
    """

    gene_ids: Any
    inputs: Any
    target_values: Any
    padding_mask: Any
    cell_weights: Any
    labels: Any
    target_mask: Any

    @property
    def control_values(self):
        return self.inputs[..., VALUE_CHANNEL]

    @property
    def pert_flags(self):
        return self.inputs[..., FLAG_CHANNEL]

    @property
    def loss_mask(self):
        """float (batch, seq_len): 1 where a token is real and its cell counts."""
        xp = jnp if not isinstance(self.padding_mask, np.ndarray) else np
        scored = xp.logical_and(~self.padding_mask, self.target_mask)
        return scored.astype(xp.float32) * self.cell_weights[..., None]

    def check(self) -> None:
        """Trace-time (or eager) shape check of the whole batch."""
        check_inputs(self.gene_ids, self.inputs, self.padding_mask)
        batch, length = self.gene_ids.shape
        chex.assert_shape(self.target_values, (batch, length))
        chex.assert_shape(self.cell_weights, (batch,))
        chex.assert_shape(self.labels, (batch,))
        chex.assert_shape(self.target_mask, (batch, length))

    @classmethod
    def from_arrays(
        cls,
        *,
        gene_ids,
        control_values,
        pert_flags,
        target_values,
        padding_mask,
        cell_weights=None,
        labels=None,
        target_mask=None,
    ) -> "PerturbBatch":
        """Builds a NumPy batch from separate channels (the usual way to make one)."""
        gene_ids = np.asarray(gene_ids, dtype=np.int32)
        control_values = np.asarray(control_values, dtype=np.float32)
        pert_flags = np.asarray(pert_flags)
        if control_values.shape != gene_ids.shape or pert_flags.shape != gene_ids.shape:
            raise ValueError(
                f"gene_ids {gene_ids.shape}, control_values {control_values.shape} and "
                f"pert_flags {pert_flags.shape} must have one shape (batch, seq_len)."
            )
        batch = gene_ids.shape[0]
        padding_mask = np.asarray(padding_mask, dtype=bool)
        return cls(
            gene_ids=gene_ids,
            inputs=np.stack([control_values, pert_flags.astype(np.float32)], axis=-1),
            target_values=np.asarray(target_values, dtype=np.float32),
            padding_mask=padding_mask,
            cell_weights=(
                np.ones(batch, np.float32)
                if cell_weights is None
                else np.asarray(cell_weights, np.float32)
            ),
            labels=(np.zeros(batch, np.int32) if labels is None else np.asarray(labels, np.int32)),
            target_mask=(
                ~padding_mask
                if target_mask is None
                else np.asarray(target_mask, bool) & ~padding_mask
            ),
        )
