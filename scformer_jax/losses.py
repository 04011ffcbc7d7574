"""Functional losses of scFormer's perturbation training, importable on their own.

Every function is pure and jit-compatible, takes its mask or weights explicitly (no boolean
indexing) and returns 0, not NaN, when nothing is selected. Where data-parallel training
needs it, a ``*_terms`` variant returns the ``(numerator, denominator)`` pair so that the
reduction across devices happens before the division::

    num, den = masked_mse_terms(pred, target, mask)
    loss = lax.psum(num, "batch") / jnp.maximum(lax.psum(den, "batch"), 1)

Objectives (weights and switches are config keys, see the README):

* MSE: ``masked_mse_loss`` on the predicted expression (always on).
* CLS: ``classification_loss``, cross-entropy on cell-type logits.
* CCE: ``contrastive_cell_embedding_loss``, SimCSE-style contrast of two dropout passes.
* MVC: ``masked_mse_loss`` of the MVC decoder's output.
* ECS: ``elastic_cell_similarity_loss``.
"""

from __future__ import annotations

from typing import Mapping

import chex
import jax
import jax.numpy as jnp

__all__ = [
    "classification_loss",
    "classification_terms",
    "combine_losses",
    "contrastive_cell_embedding_loss",
    "contrastive_cell_embedding_terms",
    "elastic_cell_similarity_loss",
    "elastic_cell_similarity_terms",
    "masked_mse_loss",
    "masked_mse_terms",
    "masked_relative_error",
    "masked_relative_error_terms",
    "safe_divide",
]


def safe_divide(numerator, denominator):
    """numerator / denominator, and 0 where the denominator is 0."""
    denominator = jnp.asarray(denominator, jnp.float32)
    return jnp.where(denominator > 0, numerator / jnp.where(denominator > 0, denominator, 1.0), 0.0)


def _check_masked(pred, target, mask):
    chex.assert_equal_shape([pred, target])
    chex.assert_shape(mask, pred.shape)


def masked_mse_terms(pred, target, mask):
    """(sum of squared errors over the mask, mask total)."""
    _check_masked(pred, target, mask)
    mask = mask.astype(jnp.float32)
    err = (pred.astype(jnp.float32) - target.astype(jnp.float32)) ** 2
    return jnp.sum(err * mask), jnp.sum(mask)


def masked_mse_loss(pred, target, mask):
    """Mean squared error over the masked positions.

    Args:
      pred: (batch, seq_len) predicted expression.
      target: (batch, seq_len) true expression.
      mask: (batch, seq_len) bool or float weights; 1/True where a position counts.

    Returns:
      Scalar: sum(mask * (pred - target)^2) / sum(mask); 0 for an empty mask.
    """
    return safe_divide(*masked_mse_terms(pred, target, mask))


def masked_relative_error_terms(pred, target, mask):
    """(sum of |pred - target| / (target + 1e-6) over the mask, mask total)."""
    _check_masked(pred, target, mask)
    mask = mask.astype(jnp.float32)
    target = target.astype(jnp.float32)
    # Outside the mask the target may be anything (e.g. -1e-6); keep the ratio finite there.
    denom = jnp.where(mask > 0, target + 1e-6, 1.0)
    rel = jnp.abs(pred.astype(jnp.float32) - target) / denom
    return jnp.sum(jnp.where(mask > 0, rel, 0.0) * mask), jnp.sum(mask)


def masked_relative_error(pred, target, mask):
    """Mean of |pred - target| / (target + 1e-6) over the mask (the original's MRE metric).

    Args/Returns as :func:`masked_mse_loss`.
    """
    return safe_divide(*masked_relative_error_terms(pred, target, mask))


def classification_terms(logits, labels, *, weights=None):
    """(weighted sum of cross-entropies, sum of weights)."""
    chex.assert_rank(logits, 2)
    chex.assert_shape(labels, logits.shape[:1])
    weights = (
        jnp.ones(labels.shape, jnp.float32)
        if weights is None
        else jnp.asarray(weights, jnp.float32)
    )
    chex.assert_shape(weights, labels.shape)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, labels[:, None].astype(jnp.int32), axis=-1)[:, 0]
    return jnp.sum(nll * weights), jnp.sum(weights)


def classification_loss(logits, labels, *, weights=None):
    """Cell-type cross-entropy (CLS).

    Args:
      logits: (batch, n_cls).
      labels: int (batch,).
      weights: optional (batch,) row weights (0 for padding rows).

    Returns:
      Scalar mean cross-entropy over rows of non-zero weight (0 if none).
    """
    return safe_divide(*classification_terms(logits, labels, weights=weights))


def _l2_normalize(x, eps=1e-8):
    x = x.astype(jnp.float32)
    # max inside the sqrt: the gradient of a norm at a zero vector would be NaN.
    sq = jnp.sum(x * x, axis=-1, keepdims=True)
    return x * jax.lax.rsqrt(jnp.maximum(sq, eps * eps))


def contrastive_cell_embedding_terms(
    emb_a, emb_b, *, temperature=0.5, axis_name=None, weights=None
):
    """(sum of per-row cross-entropies, number of rows) of the CCE objective.

    With ``axis_name``, the keys ``emb_b`` (and their weights) are gathered from every device
    along that axis, and each device's rows are scored against the global batch: the psum of
    the terms over devices equals the single-device loss of the global batch.
    """
    chex.assert_rank(emb_a, 2)
    chex.assert_equal_shape([emb_a, emb_b])
    n_local = emb_a.shape[0]
    weights = (
        jnp.ones((n_local,), jnp.float32) if weights is None else jnp.asarray(weights, jnp.float32)
    )
    chex.assert_shape(weights, (n_local,))
    queries = _l2_normalize(emb_a)
    keys = _l2_normalize(emb_b)
    key_weights = weights
    offset = 0
    if axis_name is not None:
        # Gradients flow through all_gather, so every shard's embeddings get theirs.
        keys = jax.lax.all_gather(keys, axis_name, tiled=True)
        key_weights = jax.lax.all_gather(weights, axis_name, tiled=True)
        offset = jax.lax.axis_index(axis_name) * n_local
    logits = queries @ keys.T / temperature  # (n_local, n_global)
    logits = jnp.where(key_weights[None, :] > 0, logits, -1e30)
    logp = jax.nn.log_softmax(logits, axis=-1)
    positive = jnp.arange(n_local) + offset
    nll = -jnp.take_along_axis(logp, positive[:, None], axis=-1)[:, 0]
    return jnp.sum(nll * weights), jnp.sum(weights)


def contrastive_cell_embedding_loss(emb_a, emb_b, *, temperature=0.5, axis_name=None, weights=None):
    """Contrastive cell embedding (CCE), SimCSE-style.

    Cosine similarities between the cell embeddings of two forward passes with different
    dropout, divided by ``temperature``; cross-entropy with the matching cell (the diagonal)
    as the positive.

    Args:
      emb_a: (batch, d) cell embeddings of the first pass (queries).
      emb_b: (batch, d) cell embeddings of the second pass (keys).
      temperature: softmax temperature (0.5 in scFormer).
      axis_name: the pmap/shard_map axis to gather keys over in data-parallel training.
        The returned value is then this device's mean; use the ``_terms`` variant and a psum
        for the global mean.
      weights: optional (batch,) row weights; rows of weight 0 are neither queries nor keys.

    Returns:
      Scalar loss (0 when every weight is 0).
    """
    return safe_divide(
        *contrastive_cell_embedding_terms(
            emb_a, emb_b, temperature=temperature, axis_name=axis_name, weights=weights
        )
    )


def elastic_cell_similarity_terms(cell_emb, *, ecs_threshold=0.85, axis_name=None, weights=None):
    """(sum over cell pairs, number of pairs) of the ECS objective.

    With ``axis_name``, this device's cells are paired with the cells of every device along
    that axis, so that the psum of the terms equals the single-device global-batch value.
    """
    chex.assert_rank(cell_emb, 2)
    n = cell_emb.shape[0]
    weights = jnp.ones((n,), jnp.float32) if weights is None else jnp.asarray(weights, jnp.float32)
    chex.assert_shape(weights, (n,))
    normed = _l2_normalize(cell_emb)
    others, other_weights, offset = normed, weights, 0
    if axis_name is not None:
        others = jax.lax.all_gather(normed, axis_name, tiled=True)
        other_weights = jax.lax.all_gather(weights, axis_name, tiled=True)
        offset = jax.lax.axis_index(axis_name) * n
    cos_sim = normed @ others.T  # (n_local, n_global)
    diagonal = jnp.arange(n)[:, None] + offset == jnp.arange(others.shape[0])[None, :]
    cos_sim = jnp.where(diagonal, 0.0, cos_sim)
    per_pair = 1.0 - (jax.nn.relu(cos_sim) - ecs_threshold) ** 2
    pair_weights = weights[:, None] * other_weights[None, :]
    return jnp.sum(per_pair * pair_weights), jnp.sum(pair_weights)


def elastic_cell_similarity_loss(cell_emb, *, ecs_threshold=0.85, axis_name=None, weights=None):
    """Elastic cell similarity (ECS).

    ``mean(1 - (relu(cos_sim) - ecs_threshold)^2)`` over all cell pairs of the batch, with the
    diagonal of the cosine-similarity matrix set to 0 (as the original, the mean includes the
    diagonal entries). Minimising it pushes pair similarities away from the threshold.

    Args:
      cell_emb: (batch, d).
      ecs_threshold: the threshold (0.85 in the perturbation script).
      axis_name: optional data-parallel axis; pairs then span every device's cells.
      weights: optional (batch,) row weights; pairs with a weight-0 cell are left out.

    Returns:
      Scalar (0 when no pair counts).
    """
    return safe_divide(
        *elastic_cell_similarity_terms(
            cell_emb, ecs_threshold=ecs_threshold, axis_name=axis_name, weights=weights
        )
    )


def combine_losses(losses: Mapping[str, jnp.ndarray], weights: Mapping[str, float]):
    """Weighted sum of the enabled objectives, by name.

    Args:
      losses: loss name -> scalar (e.g. {"mse": ..., "cce": ...}).
      weights: loss name -> weight (``ObjectiveConfig.weights()``); every loss must have one.

    Returns:
      Scalar ``sum(weights[k] * losses[k])``.
    """
    missing = sorted(set(losses) - set(weights))
    if missing:
        raise KeyError(f"No weight given for loss(es) {missing}; weights has {sorted(weights)}.")
    total = jnp.zeros((), jnp.float32)
    for name, value in losses.items():
        total = total + weights[name] * value
    return total
