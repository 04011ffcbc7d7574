"""Every attention kernel computes the same function as the plain one.

The chunked kernel (hand-written backward, tiles of rows x queries) and the hash-based
dropout masks shared by both kernels are checked against NumPy (softmax attention, the
keep-mask hash written again here) and against the plain kernel differentiated by JAX.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from scformer_jax import attention as attn


def make_qkv(batch=2, length=37, heads=2, dim=8, seed=0):
    rng = np.random.default_rng(seed)
    q, k, v = (rng.normal(size=(batch, length, heads, dim)).astype(np.float32) for _ in range(3))
    mask = np.zeros((batch, length), bool)
    if batch > 1:
        mask[1, -11:] = True
    return q, k, v, mask


def numpy_attention(q, k, v, mask):
    scores = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
    scores = np.where(mask[:, None, None, :], -np.inf, scores)
    w = np.exp(scores - scores.max(-1, keepdims=True))
    w = w / w.sum(-1, keepdims=True)
    return np.einsum("bhqk,bkhd->bqhd", w, v)


@pytest.mark.parametrize(
    "impl,kw",
    [("full", {}), ("chunked", {"block_size": 8}), ("chunked", {"block_size": 64}), ("xla", {})],
)
def test_kernels_match_numpy(impl, kw):
    q, k, v, mask = make_qkv()
    got = jax.jit(lambda *a: attn.attention(*a, implementation=impl, **kw))(q, k, v, mask)
    np.testing.assert_allclose(got, numpy_attention(q, k, v, mask), rtol=2e-5, atol=2e-5)


def test_chunked_gradients_match_full():
    q, k, v, mask = make_qkv(length=29)
    weights = np.random.default_rng(1).normal(size=q.shape).astype(np.float32)

    def loss(impl, q, k, v):
        out = attn.attention(q, k, v, mask, implementation=impl, block_size=8)
        return jnp.sum(out * weights)

    g_full = jax.grad(lambda *a: loss("full", *a), argnums=(0, 1, 2))(q, k, v)
    g_chunk = jax.grad(lambda *a: loss("chunked", *a), argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(g_full, g_chunk):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("impl", ["full", "chunked"])
def test_attention_dropout_is_unbiased(impl):
    q, k, v, mask = make_qkv(batch=1, length=16)
    mask = mask[:1]
    ref = numpy_attention(q, k, v, mask)
    keys = jax.random.split(jax.random.PRNGKey(0), 400)
    outs = jax.vmap(
        lambda r: attn.attention(
            q, k, v, mask, implementation=impl, block_size=4, dropout_rate=0.3, dropout_rng=r
        )
    )(keys)
    assert not np.allclose(outs[0], ref, atol=1e-3)
    np.testing.assert_allclose(np.mean(outs, axis=0), ref, atol=0.12)


def test_auto_choice():
    assert attn.resolve_implementation("auto", 64, attention_dropout=0.2, platform="cpu") == "full"
    assert (
        attn.resolve_implementation("auto", 1536, attention_dropout=0.2, platform="cpu")
        == "chunked"
    )
    assert (
        attn.resolve_implementation("auto", 1536, attention_dropout=0.0, platform="gpu") == "cudnn"
    )
    assert (
        attn.resolve_implementation("auto", 1536, attention_dropout=0.1, platform="gpu")
        == "chunked"
    )
    with pytest.raises(ValueError, match="Unknown"):
        attn.resolve_implementation("flash", 10, attention_dropout=0.0)
    with pytest.raises(ValueError, match="attention_dropout"):
        q, k, v, mask = make_qkv()
        attn.attention(
            q, k, v, mask, implementation="xla", dropout_rate=0.1, dropout_rng=jax.random.PRNGKey(0)
        )


# ---------------------------------------------------------------------------------------------
# The chunked kernel and the dropout hash against NumPy


def np_mix32(x):
    x = np.asarray(x, np.uint64) & 0xFFFFFFFF
    x ^= x >> 16
    x = (x * 0x7FEB352D) & 0xFFFFFFFF
    x ^= x >> 15
    x = (x * 0x846CA68B) & 0xFFFFFFFF
    return x ^ (x >> 16)


def np_keep_mask(seeds, batch, heads, q_len, k_len, rate):
    """bool (batch, heads, q_len, k_len): row id (b * heads + h) * q_len + q, key id k."""
    seeds = np.asarray(seeds, np.uint64)
    rows = (np.arange(batch * heads * q_len, dtype=np.uint64)).reshape(batch, heads, q_len)
    row_hash = np_mix32(rows ^ seeds[0])
    key_hash = (np.arange(k_len, dtype=np.uint64) * 0x9E3779B9 + seeds[1]) & 0xFFFFFFFF
    threshold = min(round(rate * 2**32), 2**32 - 1)
    return np_mix32(row_hash[..., None] ^ key_hash) >= threshold


def np_attention(q, k, v, mask, keep=None, rate=0.0):
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    scores = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
    scores = np.where(mask[:, None, None, :], -1e30, scores)
    w = np.exp(scores - scores.max(-1, keepdims=True))
    w = w / w.sum(-1, keepdims=True)
    if keep is not None:
        w = np.where(keep, w / (1.0 - rate), 0.0)
    return np.einsum("bhqk,bkhd->bqhd", w, v)


def make_padded_qkv(batch=3, length=37, heads=2, dim=8, seed=0):
    rng = np.random.default_rng(seed)
    q, k, v, w = (rng.normal(size=(batch, length, heads, dim)).astype(np.float32) for _ in range(4))
    mask = np.zeros((batch, length), bool)
    mask[1, -11:] = True  # a partly padded row
    mask[2, :] = True  # a fully padded row (a batch's filler row with prepend_cls_token off)
    return q, k, v, w, mask


# (block_size, tile_bytes): several query blocks with a padded last block and one row per
# tile; several rows per tile; one tile holding everything.
LAYOUTS = [(5, 1), (8, 8 * 37 * 4 * 2), (64, attn.TILE_BYTES)]


@pytest.mark.parametrize("block_size,tile_bytes", LAYOUTS)
def test_chunk_layout_covers_queries(block_size, tile_bytes):
    rows, block = attn.chunk_layout(6, 37, block_size, tile_bytes)
    assert 6 % rows == 0 and block <= max(block_size, 1)
    n_blocks = math.ceil(37 / block)
    assert n_blocks * block >= 37 and (n_blocks - 1) * block < 37


@pytest.mark.parametrize("block_size,tile_bytes", LAYOUTS)
def test_chunked_forward_and_gradients_match_plain(block_size, tile_bytes):
    q, k, v, w, mask = make_padded_qkv()

    def loss(fn, q, k, v):
        return jnp.sum(fn(q, k, v) * w)

    chunked = lambda q, k, v: attn.chunked_attention(  # noqa: E731
        q, k, v, mask, block_size=block_size, tile_bytes=tile_bytes
    )
    full = lambda q, k, v: attn.full_attention(q, k, v, mask)  # noqa: E731
    out = jax.jit(chunked)(q, k, v)
    np.testing.assert_allclose(out, np_attention(q, k, v, mask), rtol=2e-5, atol=2e-5)
    g_chunk = jax.jit(jax.grad(lambda *a: loss(chunked, *a), argnums=(0, 1, 2)))(q, k, v)
    g_full = jax.grad(lambda *a: loss(full, *a), argnums=(0, 1, 2))(q, k, v)
    for got, want in zip(g_chunk, g_full):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=2e-5)
    # The fully padded row: uniform weights whatever q and k are, so no gradient to them.
    assert np.all(np.asarray(g_chunk[0])[2] == 0) and np.all(np.asarray(g_chunk[1])[2] == 0)


def test_keep_mask_matches_numpy_and_has_the_rate():
    seeds = jnp.array([123456789, 987654321], jnp.uint32)
    rows = jnp.arange(2 * 3 * 40, dtype=jnp.uint32).reshape(2, 3, 40)
    got = np.asarray(attn.dropout_keep_mask(seeds, rows, jnp.arange(50), 0.2))
    np.testing.assert_array_equal(got, np_keep_mask(np.asarray(seeds), 2, 3, 40, 50, 0.2))

    big = np.asarray(attn.dropout_keep_mask(seeds, jnp.arange(512), jnp.arange(512), 0.3))
    assert abs(big.mean() - 0.7) < 0.005  # binomial sd ~0.0009
    # Neighbouring entries are independent: P(both kept) ~ 0.49.
    assert abs((big[:, 1:] & big[:, :-1]).mean() - 0.49) < 0.01
    assert abs((big[1:] & big[:-1]).mean() - 0.49) < 0.01
    other = np.asarray(attn.dropout_keep_mask(seeds + 1, jnp.arange(512), jnp.arange(512), 0.3))
    assert 0.5 < (big == other).mean() < 0.65  # unrelated masks agree on ~0.58 of entries


@pytest.mark.parametrize("block_size,tile_bytes", LAYOUTS[:2])
def test_attention_dropout_same_in_both_kernels(block_size, tile_bytes):
    q, k, v, w, mask = make_padded_qkv()
    rng = jax.random.PRNGKey(7)
    seeds = np.asarray(attn.dropout_seeds(rng))
    keep = np_keep_mask(seeds, 3, 2, 37, 37, 0.3)
    want = np_attention(q, k, v, mask, keep=keep, rate=0.3)
    full = lambda q, k, v: attn.full_attention(  # noqa: E731
        q, k, v, mask, dropout_rate=0.3, dropout_rng=rng
    )
    chunked = lambda q, k, v: attn.chunked_attention(  # noqa: E731
        q,
        k,
        v,
        mask,
        block_size=block_size,
        tile_bytes=tile_bytes,
        dropout_rate=0.3,
        dropout_rng=rng,
    )
    np.testing.assert_allclose(full(q, k, v), want, rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(jax.jit(chunked)(q, k, v), want, rtol=2e-5, atol=2e-5)
    g_full = jax.grad(lambda *a: jnp.sum(full(*a) * w), argnums=(0, 1, 2))(q, k, v)
    g_chunk = jax.grad(lambda *a: jnp.sum(chunked(*a) * w), argnums=(0, 1, 2))(q, k, v)
    for got, want_g in zip(g_chunk, g_full):
        np.testing.assert_allclose(got, want_g, rtol=1e-4, atol=2e-5)


def test_chunked_bfloat16_is_close_to_float32():
    q, k, v, _, mask = make_padded_qkv()
    ref = np_attention(q, k, v, mask)
    bf = [jnp.asarray(x, jnp.bfloat16) for x in (q, k, v)]
    out = attn.chunked_attention(*bf, mask, block_size=8)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out, np.float32), ref, atol=5e-2)
