"""Every fast path computes what the plain path computes; the benchmark scripts run.

Fast paths: the chunked attention kernel (hand-written backward, tiles of rows x queries),
the hash-based dropout masks shared by both kernels, the model with chunked attention and
with rematerialised layers. Expected values come from NumPy (softmax attention, the keep-mask
hash written again here) or from the plain path differentiated by JAX.
"""

import json
import math
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from scformer_jax import ModelConfig, TransformerGenerator, init_params
from scformer_jax import attention as attn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


# ---------------------------------------------------------------------------------------------
# NumPy references


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


def make_qkv(batch=3, length=37, heads=2, dim=8, seed=0):
    rng = np.random.default_rng(seed)
    q, k, v, w = (rng.normal(size=(batch, length, heads, dim)).astype(np.float32)
                  for _ in range(4))
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
    q, k, v, w, mask = make_qkv()

    def loss(fn, q, k, v):
        return jnp.sum(fn(q, k, v) * w)

    chunked = lambda q, k, v: attn.chunked_attention(  # noqa: E731
        q, k, v, mask, block_size=block_size, tile_bytes=tile_bytes)
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
    q, k, v, w, mask = make_qkv()
    rng = jax.random.PRNGKey(7)
    seeds = np.asarray(attn.dropout_seeds(rng))
    keep = np_keep_mask(seeds, 3, 2, 37, 37, 0.3)
    want = np_attention(q, k, v, mask, keep=keep, rate=0.3)
    full = lambda q, k, v: attn.full_attention(  # noqa: E731
        q, k, v, mask, dropout_rate=0.3, dropout_rng=rng)
    chunked = lambda q, k, v: attn.chunked_attention(  # noqa: E731
        q, k, v, mask, block_size=block_size, tile_bytes=tile_bytes, dropout_rate=0.3,
        dropout_rng=rng)
    np.testing.assert_allclose(full(q, k, v), want, rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(jax.jit(chunked)(q, k, v), want, rtol=2e-5, atol=2e-5)
    g_full = jax.grad(lambda *a: jnp.sum(full(*a) * w), argnums=(0, 1, 2))(q, k, v)
    g_chunk = jax.grad(lambda *a: jnp.sum(chunked(*a) * w), argnums=(0, 1, 2))(q, k, v)
    for got, want_g in zip(g_chunk, g_full):
        np.testing.assert_allclose(got, want_g, rtol=1e-4, atol=2e-5)


def test_chunked_bfloat16_is_close_to_float32():
    q, k, v, _, mask = make_qkv()
    ref = np_attention(q, k, v, mask)
    bf = [jnp.asarray(x, jnp.bfloat16) for x in (q, k, v)]
    out = attn.chunked_attention(*bf, mask, block_size=8)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out, np.float32), ref, atol=5e-2)


# ---------------------------------------------------------------------------------------------
# The model


TINY = dict(ntoken=24, embsize=16, d_hid=16, nlayers=2, nhead=2, n_cls=3)


def make_inputs(batch=3, length=21, seed=0):
    rng = np.random.default_rng(seed)
    gene_ids = rng.integers(3, 24, size=(batch, length)).astype(np.int32)
    values = rng.uniform(0, 3, size=(batch, length)).astype(np.float32)
    flags = np.zeros((batch, length), np.float32)
    flags[:, 2] = 1
    padding = np.zeros((batch, length), bool)
    padding[1, -5:] = True
    padding[2, -12:] = True
    gene_ids[padding], values[padding], flags[padding] = 0, 0.0, 2
    target = rng.uniform(0, 3, size=(batch, length)).astype(np.float32)
    return gene_ids, np.stack([values, flags], -1), padding, target


def model_loss_and_grads(config, params, deterministic):
    gene_ids, inputs, padding, target = make_inputs()
    model = TransformerGenerator(config)

    def loss(p):
        out = model.apply({"params": p}, gene_ids, inputs, padding, deterministic=deterministic,
                          compute_cls=True, compute_mvc=True,
                          rngs={"dropout": jax.random.PRNGKey(3)})
        err = jnp.where(padding, 0.0, out["mlm_output"] - target)
        return jnp.sum(err**2) + jnp.sum(out["cls_output"]) + jnp.sum(out["cell_emb"] ** 2)

    return jax.jit(jax.value_and_grad(loss))(params)


@pytest.mark.parametrize("variant,dropout", [
    (dict(attention="chunked", attention_block_size=4), 0.0),
    (dict(attention="chunked", attention_block_size=4), 0.2),
    (dict(attention="full", remat=True), 0.2),
    (dict(attention="chunked", attention_block_size=8, remat=True), 0.0)])
def test_model_fast_paths_match_plain(variant, dropout):
    plain = ModelConfig(**TINY, attention="full", dropout=dropout)
    fast = ModelConfig(**TINY, dropout=dropout, **variant)
    params = init_params(plain, jax.random.PRNGKey(0))
    # The parameter tree does not depend on the path (checkpoints move between them).
    assert (jax.tree_util.tree_structure(init_params(fast, jax.random.PRNGKey(0)))
            == jax.tree_util.tree_structure(params))
    deterministic = dropout == 0.0
    want_loss, want_grads = model_loss_and_grads(plain, params, deterministic)
    got_loss, got_grads = model_loss_and_grads(fast, params, deterministic)
    np.testing.assert_allclose(got_loss, want_loss, rtol=1e-5)
    for got, want in zip(jax.tree_util.tree_leaves(got_grads),
                         jax.tree_util.tree_leaves(want_grads)):
        np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-5)


def test_eval_passes_tile_with_the_eval_block_size(monkeypatch):
    """Deterministic passes use model.attention_eval_block_size, training passes
    model.attention_block_size, and both give the plain kernel's output."""
    seen = []
    real = attn.attention

    def spy(*args, block_size, dropout_rate=0.0, **kwargs):
        seen.append((block_size, dropout_rate))
        return real(*args, block_size=block_size, dropout_rate=dropout_rate, **kwargs)

    monkeypatch.setattr(attn, "attention", spy)
    fast = ModelConfig(**TINY, attention="chunked", attention_block_size=4,
                       attention_eval_block_size=8, dropout=0.1)
    plain = ModelConfig(**TINY, attention="full", dropout=0.1)
    params = init_params(plain, jax.random.PRNGKey(0))
    gene_ids, inputs, padding, _ = make_inputs()
    seen.clear()
    got = TransformerGenerator(fast).apply({"params": params}, gene_ids, inputs, padding,
                                           deterministic=True)["mlm_output"]
    assert seen == [(8, 0.0)] * fast.nlayers
    # 22 tokens (with <cls>) in tiles of at most 8 queries: three query blocks, the last padded.
    assert attn.chunk_layout(6, 22, 8)[1] == 8
    want = TransformerGenerator(plain).apply({"params": params}, gene_ids, inputs, padding,
                                             deterministic=True)["mlm_output"]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    seen.clear()
    TransformerGenerator(fast).apply({"params": params}, gene_ids, inputs, padding,
                                     deterministic=False, rngs={"dropout": jax.random.PRNGKey(1)})
    assert seen == [(4, 0.1)] * fast.nlayers


def test_model_dropout_rate_scale_and_eval_identity():
    from scformer_jax.model import Dropout

    x = jnp.ones((64, 50, 32), jnp.float32)
    layer = Dropout(0.25)
    out = np.asarray(layer.apply({}, x, deterministic=False,
                                 rngs={"dropout": jax.random.PRNGKey(0)}))
    kept = out != 0
    assert abs(kept.mean() - 0.75) < 0.01
    np.testing.assert_allclose(out[kept], 1 / 0.75, rtol=1e-6)
    again = np.asarray(layer.apply({}, x, deterministic=False,
                                   rngs={"dropout": jax.random.PRNGKey(1)}))
    assert (kept == (again != 0)).mean() < 0.7  # another key, another mask
    np.testing.assert_array_equal(layer.apply({}, x, deterministic=True), x)


# ---------------------------------------------------------------------------------------------
# The benchmark scripts


@pytest.mark.parametrize("script", ["run.py", "jax_bench.py", "data_bench.py", "gpu_bench.py"])
def test_bench_help(script):
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / script), "--help"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "usage" in proc.stdout


def test_gpu_sh_is_valid_bash():
    proc = subprocess.run(["bash", "-n", str(ROOT / "bench" / "gpu.sh")], capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stderr


def _json_line(text):
    return json.loads(text.strip().splitlines()[-1])


@pytest.mark.parametrize("mode,attention", [("train", "chunked"), ("eval", "full")])
def test_jax_bench_smoke_no_recompilation(capsys, mode, attention):
    from bench import jax_bench

    assert jax_bench.main(["--seq-len", "32", "--batch", "4", "--steps", "1",
                           "--extra-batches", "2", "--mode", mode, "--attention", attention,
                           "--block-size", "8", "--n-genes", "50", "--json"]) == 0
    record = _json_line(capsys.readouterr().out)
    assert record["mode"] == mode and record["attention"] == attention
    assert record["tokens"] == 33 and record["calls"] == 4
    # Four calls on two different batches: traced and compiled once.
    assert record["traces"] == 1 and record["compiles"] == 1
    assert record["cells_per_s"] > 0 and record["peak_rss_gb"] > 0
    assert 0 < record["fraction_of_peak"] < 1
    if mode == "train":
        assert np.isfinite(record["loss"])


def test_model_flops_counts_matmuls():
    from bench.jax_bench import model_flops

    # One layer, d=2, d_hid=3, L=5, batch 1, forward: per token 8*4 + 4*6 + 4*5*2 = 96 per
    # layer, plus 2*4 + 4*2 = 16 outside the layers.
    assert model_flops(batch=1, tokens=5, embsize=2, d_hid=3, nlayers=1, train=False) == 5 * 112
    assert model_flops(batch=2, tokens=5, embsize=2, d_hid=3, nlayers=1, train=True) == 3 * 1120


def test_gpu_bench_cpu_smoke(capsys):
    from bench import gpu_bench

    assert gpu_bench.main(["--cpu-smoke", "--json"]) == 0
    record = _json_line(capsys.readouterr().out)
    assert record["cpu_smoke"] and record["traces"] == 1 and np.isfinite(record["loss"])
    assert record["ms_per_step"] > 0 and record["dtype"] == "bfloat16"


def test_data_bench_stages_on_tiny_data(tmp_path):
    from bench import data_bench

    path = data_bench.dataset_path(tmp_path, "tiny", 0)
    data_bench.generate(path, "tiny", 0)
    record = data_bench.measure(path, batches=2, batch_size=4, max_seq_len=32)
    assert record["n_genes"] == 40 and record["n_paired"] == record["n_train_cells"] > 0
    assert record["batches_timed"] == 2 and record["batch_shape"][0] == 4
    assert record["total_s"] >= record["load_s"] > 0


def test_run_table_and_summary():
    from bench import run

    def rec(cells, peak, **extra):
        return {"cells_per_s": cells, "sec_per_step": 32 / cells, "peak_rss_gb": peak,
                "batch": 32, "compile_s": 4.0, "traces": 1, "compiles": 1,
                "fraction_of_peak": 0.3, **extra}

    rows = [
        {"case": "train-512", "seq_len": 512, "mode": "train", "ours": rec(40.0, 1.1),
         "ref": rec(10.0, 2.6)},
        {"case": "train-1536", "seq_len": 1536, "mode": "train", "ours": rec(6.0, 2.0),
         "ref": rec(1.0, 17.0)},
        {"case": "train-5045", "seq_len": 5045, "mode": "train", "ours": rec(0.8, 4.5),
         "ref": {"error": "out of memory", "peak_rss_gb": 20.0}},
    ]
    table = "\n".join(run.format_table(rows, {"total_s": 1.8, "peak_rss_gb": 1.7}))
    assert "4.0x" in table and "6.0x" in table and "OOM" in table and "1.8 s" in table
    line = run.summary_line(rows)
    assert line.startswith("Train step at sequence 1536") and "6.0x" in line
    assert "5045 the original ran out of memory" in line
