"""Multi-head attention kernels with a key-padding mask.

Three implementations compute the same function (tested against each other):

* ``"full"``: the plain (batch, heads, q_len, k_len) softmax. Simple and fast at short
  lengths, but its score tensor and the copies kept for the backward pass grow with L^2
  (about 17 GB at L=1536, batch 32, 4 layers on CPU).
* ``"chunked"``: flash-style online softmax over blocks of keys inside a rematerialised
  ``lax.scan``; memory grows with L * block instead of L^2, for the forward and the backward
  pass. The default on CPU for long sequences.
* ``"xla"`` / ``"cudnn"``: ``jax.nn.dot_product_attention``; ``"cudnn"`` is the fused flash
  attention kernel on NVIDIA GPUs. They have no attention-weight dropout, so a config that
  asks for one with these kernels is rejected when the model is built.

``"auto"`` picks ``cudnn`` on GPU when no attention dropout is needed, else ``chunked`` for
sequences longer than :data:`AUTO_CHUNK_MIN_LENGTH`, else ``full``.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

IMPLEMENTATIONS = ("auto", "full", "chunked", "xla", "cudnn")
AUTO_CHUNK_MIN_LENGTH = 512
# A large finite negative instead of -inf keeps fully padded rows NaN-free.
_MASK_VALUE = -1e30


def resolve_implementation(implementation: str, length: int, *, attention_dropout: float,
                           platform: str | None = None) -> str:
    """Turns ``"auto"`` into a concrete kernel for this platform and sequence length."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(
            f"Unknown attention implementation {implementation!r}; choose one of {IMPLEMENTATIONS}."
        )
    if implementation != "auto":
        return implementation
    platform = platform or jax.default_backend()
    if platform == "gpu" and attention_dropout == 0.0:
        return "cudnn"
    return "chunked" if length > AUTO_CHUNK_MIN_LENGTH else "full"


def _dropout_keep(rng, rate, shape):
    return jax.random.bernoulli(rng, 1.0 - rate, shape)


def full_attention(q, k, v, key_padding_mask, *, dropout_rate=0.0, dropout_rng=None):
    """Plain softmax attention.

    Args:
      q, k, v: (batch, length, heads, head_dim).
      key_padding_mask: bool (batch, length), True at padded keys.
      dropout_rate: dropout on the attention weights (as PyTorch's ``nn.MultiheadAttention``).
      dropout_rng: PRNG key, required when ``dropout_rate > 0``.

    Returns:
      (batch, length, heads, head_dim).
    """
    scale = 1.0 / math.sqrt(q.shape[-1])
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
    scores = jnp.where(key_padding_mask[:, None, None, :], _MASK_VALUE, scores)
    weights = jax.nn.softmax(scores, axis=-1)
    if dropout_rate > 0.0:
        keep = _dropout_keep(dropout_rng, dropout_rate, weights.shape)
        weights = jnp.where(keep, weights / (1.0 - dropout_rate), 0.0)
    return jnp.einsum("bhqk,bkhd->bqhd", weights.astype(v.dtype), v,
                      preferred_element_type=jnp.float32).astype(q.dtype)


def chunked_attention(q, k, v, key_padding_mask, *, block_size=128, dropout_rate=0.0,
                      dropout_rng=None):
    """Online-softmax attention over key blocks; same arguments as :func:`full_attention`.

    Memory: the scan body is rematerialised, so the backward pass keeps only the running
    (output, max, normaliser) per block instead of every block's score matrix.
    """
    batch, length, heads, head_dim = q.shape
    block = min(block_size, length)
    n_blocks = -(-length // block)
    pad = n_blocks * block - length
    if pad:
        # Padding keys are masked, so the extra block columns contribute nothing.
        k = jnp.pad(k, ((0, 0), (0, pad), (0, 0), (0, 0)))
        v = jnp.pad(v, ((0, 0), (0, pad), (0, 0), (0, 0)))
        key_padding_mask = jnp.pad(key_padding_mask, ((0, 0), (0, pad)), constant_values=True)
    scale = 1.0 / math.sqrt(head_dim)
    # (n_blocks, batch, block, heads, head_dim): the scan runs over the leading axis.
    k_blocks = k.reshape(batch, n_blocks, block, heads, head_dim).swapaxes(0, 1)
    v_blocks = v.reshape(batch, n_blocks, block, heads, head_dim).swapaxes(0, 1)
    m_blocks = key_padding_mask.reshape(batch, n_blocks, block).swapaxes(0, 1)
    qs = q * jnp.asarray(scale, q.dtype)
    use_dropout = dropout_rate > 0.0

    @jax.checkpoint
    def body(carry, xs):
        acc, row_max, row_sum = carry
        k_blk, v_blk, pad_blk, idx = xs
        scores = jnp.einsum("bqhd,bkhd->bhqk", qs, k_blk, preferred_element_type=jnp.float32)
        scores = jnp.where(pad_blk[:, None, None, :], _MASK_VALUE, scores)
        new_max = jnp.maximum(row_max, scores.max(axis=-1))
        correction = jnp.exp(row_max - new_max)
        probs = jnp.exp(scores - new_max[..., None])
        row_sum = row_sum * correction + probs.sum(axis=-1)
        if use_dropout:
            # Dropout acts on the normalised weights; the normaliser uses the undropped ones.
            keep = _dropout_keep(jax.random.fold_in(dropout_rng, idx), dropout_rate, probs.shape)
            probs = jnp.where(keep, probs / (1.0 - dropout_rate), 0.0)
        acc = acc * correction[..., None] + jnp.einsum(
            "bhqk,bkhd->bhqd", probs.astype(v.dtype), v_blk, preferred_element_type=jnp.float32)
        return (acc, new_max, row_sum), None

    init = (
        jnp.zeros((batch, heads, length, head_dim), jnp.float32),
        jnp.full((batch, heads, length), _MASK_VALUE, jnp.float32),
        jnp.zeros((batch, heads, length), jnp.float32),
    )
    (acc, _, row_sum), _ = jax.lax.scan(
        body, init, (k_blocks, v_blocks, m_blocks, jnp.arange(n_blocks)))
    out = acc / jnp.maximum(row_sum, 1e-30)[..., None]
    return out.transpose(0, 2, 1, 3).astype(q.dtype)


def library_attention(q, k, v, key_padding_mask, *, implementation):
    """``jax.nn.dot_product_attention`` (``"xla"`` or ``"cudnn"``), no attention dropout."""
    mask = ~key_padding_mask[:, None, None, :]
    if implementation == "cudnn":
        # cuDNN's flash kernel takes per-row key lengths rather than a dense mask; the data
        # pipeline pads at the end of each row, so the number of real tokens is that length.
        lengths = jnp.sum(~key_padding_mask, axis=-1).astype(jnp.int32)
        return jax.nn.dot_product_attention(
            q, k, v, key_value_seq_lengths=lengths, query_seq_lengths=lengths,
            implementation="cudnn")
    return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="xla")


def attention(q, k, v, key_padding_mask, *, implementation="full", block_size=128,
              dropout_rate=0.0, dropout_rng=None):
    """Dispatches to one kernel; ``implementation`` must already be resolved (not ``auto``)."""
    if implementation == "full":
        return full_attention(q, k, v, key_padding_mask, dropout_rate=dropout_rate,
                              dropout_rng=dropout_rng)
    if implementation == "chunked":
        return chunked_attention(q, k, v, key_padding_mask, block_size=block_size,
                                 dropout_rate=dropout_rate, dropout_rng=dropout_rng)
    if implementation in ("xla", "cudnn"):
        if dropout_rate > 0.0:
            raise ValueError(
                f"attention implementation {implementation!r} has no attention-weight dropout; "
                "set model.attention_dropout: 0.0 or use 'full' / 'chunked'.")
        return library_attention(q, k, v, key_padding_mask, implementation=implementation)
    raise ValueError(f"Unknown attention implementation {implementation!r}.")
