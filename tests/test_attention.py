"""Every attention kernel computes the same function as the plain one."""

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


@pytest.mark.parametrize("impl,kw", [("full", {}), ("chunked", {"block_size": 8}),
                                     ("chunked", {"block_size": 64}), ("xla", {})])
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
    outs = jax.vmap(lambda r: attn.attention(q, k, v, mask, implementation=impl, block_size=4,
                                             dropout_rate=0.3, dropout_rng=r))(keys)
    assert not np.allclose(outs[0], ref, atol=1e-3)
    np.testing.assert_allclose(np.mean(outs, axis=0), ref, atol=0.12)


def test_auto_choice():
    assert attn.resolve_implementation("auto", 64, attention_dropout=0.2, platform="cpu") == "full"
    assert attn.resolve_implementation("auto", 1536, attention_dropout=0.2,
                                       platform="cpu") == "chunked"
    assert attn.resolve_implementation("auto", 1536, attention_dropout=0.0,
                                       platform="gpu") == "cudnn"
    assert attn.resolve_implementation("auto", 1536, attention_dropout=0.1,
                                       platform="gpu") == "chunked"
    with pytest.raises(ValueError, match="Unknown"):
        attn.resolve_implementation("flash", 10, attention_dropout=0.0)
    with pytest.raises(ValueError, match="attention_dropout"):
        q, k, v, mask = make_qkv()
        attn.attention(q, k, v, mask, implementation="xla", dropout_rate=0.1,
                       dropout_rng=jax.random.PRNGKey(0))
