"""The tiny model and random inputs the model, train-step and fast-path tests share.

``tests/conftest.py`` exposes them as fixtures; parametrised variants call these directly.
"""

import numpy as np

from scformer_jax.batch import PerturbBatch
from scformer_jax.config import ModelConfig

# Width 16, two layers of two heads, 24 tokens (ids 0-2 are left to the special tokens).
TINY = dict(ntoken=24, embsize=16, d_hid=16, nlayers=2, nhead=2, n_cls=3)


def tiny_config(**overrides) -> ModelConfig:
    """The tiny :class:`ModelConfig` with `overrides`."""
    return ModelConfig(**{**TINY, **overrides})


# The train-step tests: no dropout, so one device and two agree to float rounding.
TRAIN_STEP_MODEL = tiny_config(ntoken=30, dropout=0.0, attention="full")


def make_inputs(batch=3, length=10, n_pad=(0, 3, 6), perturbed=1, seed=0):
    """Random model inputs: (gene_ids int32 (batch, length), inputs float32 (batch, length, 2),
    padding bool (batch, length)); the last ``n_pad[row]`` positions of each row are padding
    and column `perturbed` carries the perturbation flag."""
    rng = np.random.default_rng(seed)
    gene_ids = rng.integers(3, TINY["ntoken"], size=(batch, length)).astype(np.int32)
    values = rng.uniform(0, 3, size=(batch, length)).astype(np.float32)
    flags = np.zeros((batch, length), np.float32)
    flags[:, perturbed] = 1
    padding = np.zeros((batch, length), bool)
    for row, n in enumerate(n_pad):
        if n:
            padding[row, -n:] = True
    gene_ids[padding] = 0
    values[padding] = 0.0
    flags[padding] = 2
    return gene_ids, np.stack([values, flags], -1), padding


def random_batch(batch=8, length=12, seed=0, n_pad_rows=0) -> PerturbBatch:
    """A :class:`PerturbBatch` for the train step: each row perturbs one gene, whose target
    moves by about 1; the last `n_pad_rows` rows have weight 0."""
    rng = np.random.default_rng(seed)
    gene_ids = np.tile(np.arange(3, 3 + length, dtype=np.int32), (batch, 1))
    control = rng.uniform(0, 3, (batch, length)).astype(np.float32)
    flags = np.zeros((batch, length), np.float32)
    flags[np.arange(batch), rng.integers(0, length, batch)] = 1
    target = control + flags * rng.normal(1, 0.1, (batch, length)).astype(np.float32)
    weights = np.ones(batch, np.float32)
    if n_pad_rows:
        weights[-n_pad_rows:] = 0
    return PerturbBatch.from_arrays(
        gene_ids=gene_ids,
        control_values=control,
        pert_flags=flags,
        target_values=target,
        padding_mask=np.zeros((batch, length), bool),
        cell_weights=weights,
        labels=rng.integers(0, 3, batch),
    )
