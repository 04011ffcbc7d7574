"""Multi-head attention kernels with a key-padding mask.

Four implementations compute the same function (tested against each other):

* ``"full"``: the plain (batch, heads, q_len, k_len) softmax, differentiated by JAX. Simple
  and fast at short lengths, but its score tensor and the copies kept for the backward pass
  grow with L^2 (about 17 GB at L=1536, batch 32, 4 layers on CPU).
* ``"chunked"``: memory-lean attention with a hand-written backward pass (flash-attention
  style). The (batch * heads, queries) plane is cut into tiles of ``rows x block_size``
  queries against all keys, so each tile's softmax is exact (no online rescaling); a
  ``lax.scan`` walks the tiles. The forward pass saves only the output and two numbers per
  query (row max and log normaliser); the backward pass recomputes each tile's weights from
  them. Memory grows with L (plus one tile) instead of L^2, and tiles sized to the CPU's cache
  keep the softmax passes out of main memory.
* ``"xla"`` / ``"cudnn"``: ``jax.nn.dot_product_attention``; ``"cudnn"`` is the fused flash
  attention kernel on NVIDIA GPUs. They have no attention-weight dropout, so a config that
  asks for one with these kernels is rejected when the model is built.

``"auto"`` picks ``cudnn`` on GPU when no attention dropout is needed, else ``chunked`` for
sequences of at least :data:`AUTO_CHUNK_MIN_LENGTH`, else ``full``.

Attention-weight dropout (as PyTorch's ``nn.MultiheadAttention``) draws its keep mask from a
counter-based hash of (seed, row, key) rather than from ``jax.random``: the chunked kernel
regenerates the mask of each tile in its backward pass instead of storing L^2 bits, a
threefry draw of 3e8 numbers per layer costs seconds on a CPU while the hash costs
milliseconds, and ``full`` and ``chunked`` drop exactly the same weights for the same key, so
they agree with dropout on too.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from scformer_jax.config import ATTENTION_IMPLEMENTATIONS as IMPLEMENTATIONS

# From this length on the chunked kernel beats the plain one on a CPU (forward + backward of
# one layer, batch 32, 4 heads, dropout 0.2: 3.2 vs 2.4 ms at 65, 11 vs 20 ms at 129,
# 89 vs 186 ms at 385).
AUTO_CHUNK_MIN_LENGTH = 128
# A large finite negative instead of -inf keeps fully padded rows NaN-free.
_MASK_VALUE = -1e30
# Bytes of one tile's (rows, block, keys) float32 score matrix in the chunked kernel: small
# enough that a tile's softmax passes stay in cache, large enough that the per-iteration
# overhead of the scans stays small. Measured on a 2-core AVX-512 CPU (batch 32, 4 heads,
# L=1537, forward + backward): 2-5 MB tiles of 200-400 queries were fastest; 119-query
# blocks cost ~8% more, 62-query blocks ~45% more, 20 MB tiles ~30% more.
TILE_BYTES = 4 * 2**20
# On accelerators each scan iteration is a kernel launch, so tiles are made much larger.
ACCELERATOR_TILE_BYTES = 512 * 2**20
_GOLDEN = 0x9E3779B9


def resolve_implementation(
    implementation: str, length: int, *, attention_dropout: float, platform: str | None = None
) -> str:
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
    return "chunked" if length >= AUTO_CHUNK_MIN_LENGTH else "full"


# ---------------------------------------------------------------------------------------------
# Dropout masks


def _mix32(x):
    """A 32-bit integer hash with full avalanche (the "lowbias32" constants)."""
    x = x ^ (x >> 16)
    x = x * jnp.uint32(0x7FEB352D)
    x = x ^ (x >> 15)
    x = x * jnp.uint32(0x846CA68B)
    return x ^ (x >> 16)


def dropout_seeds(dropout_rng):
    """Two uint32 seeds of the keep-mask hash, drawn from a PRNG key."""
    if dropout_rng is None:
        raise ValueError(
            "Attention dropout needs a PRNG key: pass dropout_rng (the model "
            "draws it from its 'dropout' stream when deterministic=False)."
        )
    return jax.random.bits(dropout_rng, (2,), jnp.uint32)


def dropout_keep_mask(seeds, row_ids, key_ids, rate: float):
    """Which attention weights survive dropout at ``rate``.

    Args:
      seeds: uint32 (2,) from :func:`dropout_seeds`.
      row_ids: int (...,) global query-row index ``(batch * heads + head) * q_len + query``.
      key_ids: int (k,) key positions.
      rate: the drop probability.

    Returns:
      bool (..., k), True where the weight is kept; each entry is True with probability
      ``1 - rate`` (to within 2^-32), independently of the tiling that computes it.
    """
    rows = _mix32(row_ids.astype(jnp.uint32) ^ seeds[0])
    keys = key_ids.astype(jnp.uint32) * jnp.uint32(_GOLDEN) + seeds[1]
    threshold = jnp.uint32(min(int(round(rate * 2.0**32)), 2**32 - 1))
    return _mix32(rows[..., None] ^ keys) >= threshold


# ---------------------------------------------------------------------------------------------
# Plain attention


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
    batch, q_len, heads, _ = q.shape
    scale = 1.0 / math.sqrt(q.shape[-1])
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
    scores = jnp.where(key_padding_mask[:, None, None, :], _MASK_VALUE, scores)
    weights = jax.nn.softmax(scores, axis=-1)
    if dropout_rate > 0.0:
        # (batch, heads, q_len) global row ids, the same numbering as the chunked kernel's.
        row_ids = jnp.arange(batch * heads, dtype=jnp.uint32).reshape(batch, heads, 1) * jnp.uint32(
            q_len
        ) + jnp.arange(q_len, dtype=jnp.uint32)
        keep = dropout_keep_mask(
            dropout_seeds(dropout_rng), row_ids, jnp.arange(k.shape[1]), dropout_rate
        )
        weights = jnp.where(keep, weights / (1.0 - dropout_rate), 0.0)
    return jnp.einsum(
        "bhqk,bkhd->bqhd", weights.astype(v.dtype), v, preferred_element_type=jnp.float32
    ).astype(q.dtype)


# ---------------------------------------------------------------------------------------------
# Chunked (flash-style) attention


def _split_rows(x, rows):
    """(bh, ...) -> (bh / rows, rows, ...): the outer scan runs over groups of rows."""
    return x.reshape((x.shape[0] // rows, rows) + x.shape[1:])


def _split_queries(x, block):
    """(rows, q, ...) -> (q / block, rows, block, ...): the inner scan runs over query blocks."""
    x = x.reshape((x.shape[0], x.shape[1] // block, block) + x.shape[2:])
    return jnp.swapaxes(x, 0, 1)


def _merge_queries(x):
    """Inverse of :func:`_split_queries`."""
    x = jnp.swapaxes(x, 0, 1)
    return x.reshape((x.shape[0], x.shape[1] * x.shape[2]) + x.shape[3:])


def _tile_row_ids(group, block_index, rows, block, q_len):
    """(rows, block) global row ids of one tile (the numbering of :func:`full_attention`)."""
    bh = group * jnp.uint32(rows) + jnp.arange(rows, dtype=jnp.uint32)
    query = block_index * jnp.uint32(block) + jnp.arange(block, dtype=jnp.uint32)
    return bh[:, None] * jnp.uint32(q_len) + query[None, :]


def _tile_scores(q_tile, k_rows, bias_rows):
    """(rows, block, d) x (rows, keys, d) -> (rows, block, keys) float32 scores + mask bias."""
    scores = jnp.einsum("rqd,rkd->rqk", q_tile, k_rows, preferred_element_type=jnp.float32)
    return scores + bias_rows[:, None, :]


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8))
def _tiled_attention(q, k, v, bias, seeds, rate, rows, block, q_len):
    """Args: q (bh, q_pad, d) scaled and padded to a multiple of `block`; k, v (bh, keys, d);
    bias (bh, keys) float32 (0 or the mask value); seeds uint32 (2,). Returns (bh, q_pad, d)."""
    return _tiled_forward(q, k, v, bias, seeds, rate, rows, block, q_len)[0]


def _tiled_forward(q, k, v, bias, seeds, rate, rows, block, q_len):
    """The forward pass; also returns the residuals of :func:`_tiled_backward`.

    Scans groups of `rows` (batch x head) rows, and inside each, blocks of `block` queries;
    each tile's softmax runs over all keys at once. Residuals: the inputs, the output and
    per query the row max and log normaliser, (bh, q_pad) each.
    """
    bh, q_pad, _ = q.shape
    key_ids = jnp.arange(k.shape[1], dtype=jnp.uint32)

    def row_group(_, xs):
        q_rows, k_rows, v_rows, bias_rows, group = xs

        def query_block(_, ys):
            q_tile, block_index = ys
            scores = _tile_scores(q_tile, k_rows, bias_rows)
            row_max = scores.max(axis=-1)
            probs = jnp.exp(scores - row_max[..., None])
            row_sum = probs.sum(axis=-1)
            if rate > 0.0:
                # The normaliser uses the undropped weights, as dropout acts after softmax.
                keep = dropout_keep_mask(
                    seeds, _tile_row_ids(group, block_index, rows, block, q_len), key_ids, rate
                )
                probs = jnp.where(keep, probs, 0.0)
                inv = 1.0 / (row_sum * (1.0 - rate))
            else:
                inv = 1.0 / row_sum
            out = (
                jnp.einsum(
                    "rqk,rkd->rqd",
                    probs.astype(v_rows.dtype),
                    v_rows,
                    preferred_element_type=jnp.float32,
                )
                * inv[..., None]
            )
            return None, (out, row_max, jnp.log(row_sum))

        _, (out, row_max, log_sum) = jax.lax.scan(
            query_block,
            None,
            (_split_queries(q_rows, block), jnp.arange(q_pad // block, dtype=jnp.uint32)),
        )
        return None, (_merge_queries(out), _merge_queries(row_max), _merge_queries(log_sum))

    _, (out, row_max, log_sum) = jax.lax.scan(
        row_group,
        None,
        (
            _split_rows(q, rows),
            _split_rows(k, rows),
            _split_rows(v, rows),
            _split_rows(bias, rows),
            jnp.arange(bh // rows, dtype=jnp.uint32),
        ),
    )
    out = out.reshape(q.shape).astype(q.dtype)
    # Row max and log-normaliser separately: for a fully padded row their sum would absorb
    # the normaliser into the mask value.
    stats = (row_max.reshape(bh, q_pad), log_sum.reshape(bh, q_pad))
    return out, (q, k, v, bias, seeds, out, stats)


def _tiled_backward(rate, rows, block, q_len, residuals, d_out):
    """Gradients for q, k, v from d_out (bh, q_pad, d), tile by tile as the forward pass.

    Each tile's weights are recomputed from the saved row statistics (and its dropout mask
    from the hash); dk and dv accumulate over a row group's query blocks in the carry, kept
    as (rows, d, keys) so that both of their matmuls contract the tile's last axis.
    """
    q, k, v, bias, seeds, out, (row_max, log_sum) = residuals
    bh, q_pad, _ = q.shape
    key_ids = jnp.arange(k.shape[1], dtype=jnp.uint32)
    # sum_k P_qk dP_qk = dO_q . O_q, also with dropout (O already holds the dropped weights).
    delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)

    def row_group(_, xs):
        q_rows, k_rows, v_rows, bias_rows, do_rows, max_rows, logsum_rows, delta_rows, group = xs

        def query_block(carry, ys):
            dk, dv = carry
            q_tile, do_tile, max_tile, logsum_tile, delta_tile, block_index = ys
            scores = _tile_scores(q_tile, k_rows, bias_rows)
            probs = jnp.exp((scores - max_tile[..., None]) - logsum_tile[..., None])
            d_probs = jnp.einsum(
                "rqd,rkd->rqk", do_tile, v_rows, preferred_element_type=jnp.float32
            )
            if rate > 0.0:
                keep = dropout_keep_mask(
                    seeds, _tile_row_ids(group, block_index, rows, block, q_len), key_ids, rate
                )
                kept = jnp.where(keep, probs * (1.0 / (1.0 - rate)), 0.0)
                d_probs = jnp.where(keep, d_probs * (1.0 / (1.0 - rate)), 0.0)
            else:
                kept = probs
            dv = dv + jnp.einsum(
                "rqd,rqk->rdk",
                do_tile,
                kept.astype(do_tile.dtype),
                preferred_element_type=jnp.float32,
            )
            d_scores = probs * (d_probs - delta_tile[..., None])
            d_scores = d_scores.astype(q_tile.dtype)
            dq = jnp.einsum("rqk,rkd->rqd", d_scores, k_rows, preferred_element_type=jnp.float32)
            dk = dk + jnp.einsum(
                "rqd,rqk->rdk", q_tile, d_scores, preferred_element_type=jnp.float32
            )
            return (dk, dv), dq

        zeros = jnp.zeros(k_rows.shape, jnp.float32).swapaxes(1, 2)
        (dk, dv), dq = jax.lax.scan(
            query_block,
            (zeros, zeros),
            (
                _split_queries(q_rows, block),
                _split_queries(do_rows, block),
                _split_queries(max_rows, block),
                _split_queries(logsum_rows, block),
                _split_queries(delta_rows, block),
                jnp.arange(q_pad // block, dtype=jnp.uint32),
            ),
        )
        return None, (_merge_queries(dq), dk.swapaxes(1, 2), dv.swapaxes(1, 2))

    _, (dq, dk, dv) = jax.lax.scan(
        row_group,
        None,
        tuple(
            _split_rows(x, rows)
            for x in (q, k, v, bias, d_out.astype(q.dtype), row_max, log_sum, delta)
        )
        + (jnp.arange(bh // rows, dtype=jnp.uint32),),
    )
    # A padded key's weight is exp(mask value - max) = 0, so its score gradient vanishes,
    # except in a row whose keys are all padded: its weights are uniform whatever q and k
    # are, so q and those keys get no gradient (as through the mask of the full kernel).
    real_key = bias > _MASK_VALUE / 2
    dk = dk.reshape(k.shape) * real_key[..., None]
    dq = dq.reshape(q.shape) * jnp.any(real_key, axis=-1)[:, None, None]
    return (dq.astype(q.dtype), dk.astype(k.dtype), dv.reshape(v.shape).astype(v.dtype), None, None)


_tiled_attention.defvjp(_tiled_forward, _tiled_backward)


def chunk_layout(
    batch_heads: int, length: int, block_size: int, tile_bytes: int = TILE_BYTES
) -> tuple[int, int]:
    """(rows, block): the chunked kernel's tile, ``rows`` of batch x heads by ``block`` queries.

    The queries are cut into equal blocks of at most ``block_size`` (the last block padded);
    ``rows`` is the largest divisor of ``batch_heads`` whose float32 score tile fits
    ``tile_bytes``.
    """
    n_blocks = -(-length // max(1, min(block_size, length)))
    block = -(-length // n_blocks)
    rows = 1
    for candidate in range(1, batch_heads + 1):
        if batch_heads % candidate == 0 and candidate * block * length * 4 <= tile_bytes:
            rows = candidate
    return rows, block


def chunked_attention(
    q,
    k,
    v,
    key_padding_mask,
    *,
    block_size=128,
    dropout_rate=0.0,
    dropout_rng=None,
    tile_bytes=None,
):
    """Memory-lean attention (see the module docstring); same arguments as
    :func:`full_attention`, plus ``block_size`` (queries per tile) and ``tile_bytes`` (the
    score tile's size; default :data:`TILE_BYTES` on CPU, :data:`ACCELERATOR_TILE_BYTES`
    elsewhere)."""
    batch, length, heads, head_dim = q.shape
    if tile_bytes is None:
        tile_bytes = TILE_BYTES if jax.default_backend() == "cpu" else ACCELERATOR_TILE_BYTES
    rows, block = chunk_layout(batch * heads, length, block_size, tile_bytes)
    q_pad = -(-length // block) * block

    def head_major(x):  # (batch, length, heads, d) -> (batch * heads, length, d)
        return x.transpose(0, 2, 1, 3).reshape(batch * heads, length, head_dim)

    q_h = head_major(q * jnp.asarray(1.0 / math.sqrt(head_dim), q.dtype))
    if q_pad > length:
        q_h = jnp.pad(q_h, ((0, 0), (0, q_pad - length), (0, 0)))
    bias = jnp.repeat(
        jnp.where(key_padding_mask, _MASK_VALUE, 0.0).astype(jnp.float32), heads, axis=0
    )
    seeds = dropout_seeds(dropout_rng) if dropout_rate > 0.0 else jnp.zeros((2,), jnp.uint32)
    out = _tiled_attention(
        q_h, head_major(k), head_major(v), bias, seeds, float(dropout_rate), rows, block, length
    )
    return out[:, :length].reshape(batch, heads, length, head_dim).transpose(0, 2, 1, 3)


# ---------------------------------------------------------------------------------------------
# Library kernels and dispatch


def library_attention(q, k, v, key_padding_mask, *, implementation):
    """``jax.nn.dot_product_attention`` (``"xla"`` or ``"cudnn"``), no attention dropout."""
    mask = ~key_padding_mask[:, None, None, :]
    if implementation == "cudnn":
        # cuDNN's flash kernel takes per-row key lengths rather than a dense mask; the data
        # pipeline pads at the end of each row, so the number of real tokens is that length.
        lengths = jnp.sum(~key_padding_mask, axis=-1).astype(jnp.int32)
        return jax.nn.dot_product_attention(
            q,
            k,
            v,
            key_value_seq_lengths=lengths,
            query_seq_lengths=lengths,
            implementation="cudnn",
        )
    return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="xla")


def attention(
    q,
    k,
    v,
    key_padding_mask,
    *,
    implementation="full",
    block_size=128,
    dropout_rate=0.0,
    dropout_rng=None,
):
    """Dispatches to one kernel; ``implementation`` must already be resolved (not ``auto``)."""
    if implementation == "full":
        return full_attention(
            q, k, v, key_padding_mask, dropout_rate=dropout_rate, dropout_rng=dropout_rng
        )
    if implementation == "chunked":
        return chunked_attention(
            q,
            k,
            v,
            key_padding_mask,
            block_size=block_size,
            dropout_rate=dropout_rate,
            dropout_rng=dropout_rng,
        )
    if implementation in ("xla", "cudnn"):
        if dropout_rate > 0.0:
            raise ValueError(
                f"attention implementation {implementation!r} has no attention-weight dropout; "
                "set model.attention_dropout: 0.0 or use 'full' / 'chunked'."
            )
        return library_attention(q, k, v, key_padding_mask, implementation=implementation)
    raise ValueError(f"Unknown attention implementation {implementation!r}.")
