"""The Flax model: shapes, padding invariance, styles, determinism, the two-channel contract."""

import chex
import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from scformer_jax import ModelConfig, PerturbBatch, TransformerGenerator, init_params
from scformer_jax import attention as attn
from scformer_jax.config import CELL_EMB_STYLES, MVC_DECODER_STYLES, ConfigError
from scformer_jax.model import Dropout
from tests import tiny_model
from tests.tiny_model import make_inputs

# The shared tiny model with dropout on and the plain attention kernel.
TINY = dict(tiny_model.TINY, dropout=0.1, attention="full")


def apply(config, params, gene_ids, inputs, padding, **kw):
    model = TransformerGenerator(config)
    return model.apply(
        {"params": params}, gene_ids, inputs, padding, compute_cls=True, compute_mvc=True, **kw
    )


def test_output_shapes(tiny):
    config, params = tiny
    out = apply(config, params, *make_inputs())
    assert out["mlm_output"].shape == (3, 10)
    assert out["cell_emb"].shape == (3, 16)
    assert out["cls_output"].shape == (3, 3)
    assert out["mvc_output"].shape == (3, 10)


@pytest.mark.parametrize("style", CELL_EMB_STYLES)
@pytest.mark.parametrize("prepend", [True, False])
def test_padding_invariance(style, prepend):
    config = ModelConfig(
        **{
            **TINY,
            "cell_emb_style": style,
            "prepend_cls_token": prepend,
            "mvc_decoder_style": "concat query",
        }
    )
    params = init_params(config, jax.random.PRNGKey(1))
    gene_ids, inputs, padding = make_inputs()
    out = apply(config, params, gene_ids, inputs, padding)
    # Garbage at padded positions must not reach real positions.
    ids2, inputs2 = gene_ids.copy(), inputs.copy()
    ids2[padding] = 7
    inputs2[padding] = [[5.0, 1.0]]
    out2 = apply(config, params, ids2, inputs2, padding)
    real = ~padding
    for key in ("mlm_output", "mvc_output"):
        np.testing.assert_allclose(
            np.asarray(out[key])[real], np.asarray(out2[key])[real], rtol=1e-5, atol=1e-5
        )
    np.testing.assert_allclose(out["cell_emb"], out2["cell_emb"], rtol=1e-5, atol=1e-5)
    # And a row padded further gives the same real outputs as the unpadded row.
    longer = [
        np.concatenate([a, np.repeat(a[:, -1:], 4, axis=1)], axis=1)
        for a in (gene_ids, inputs, padding)
    ]
    longer[2][:, -4:] = True
    out3 = apply(config, params, *longer)
    np.testing.assert_allclose(
        np.asarray(out3["mlm_output"])[:, :10][real],
        np.asarray(out["mlm_output"])[real],
        rtol=1e-5,
        atol=1e-5,
    )


@pytest.mark.parametrize("style", MVC_DECODER_STYLES)
def test_every_mvc_style_runs_with_finite_gradients(style):
    config = ModelConfig(**{**TINY, "mvc_decoder_style": style})
    params = init_params(config, jax.random.PRNGKey(2))
    gene_ids, inputs, padding = make_inputs()

    def mvc_sum(p):
        return apply(config, p, gene_ids, inputs, padding)["mvc_output"].sum()

    value, grads = jax.value_and_grad(mvc_sum)(params)
    assert np.isfinite(value)
    assert all(np.all(np.isfinite(g)) for g in jax.tree_util.tree_leaves(grads))
    assert np.abs(np.asarray(grads["mvc_decoder"]["gene2query"]["kernel"])).sum() > 0


def test_detach_blocks_query_gradient_only():
    """With detach, the MVC loss reaches gene embeddings only through the cell embedding."""
    base = {**TINY, "cell_emb_style": "avg-pool", "nlayers": 1}
    results = {}
    for style in ("inner product", "inner product, detach"):
        config = ModelConfig(**{**base, "mvc_decoder_style": style})
        params = init_params(config, jax.random.PRNGKey(3))
        gene_ids, inputs, padding = make_inputs()

        def mvc_only(enc, p=params, config=config, args=(gene_ids, inputs, padding)):
            p = {**p, "encoder": {"embedding": enc}}
            return apply(config, p, *args)["mvc_output"].sum()

        results[style] = np.asarray(jax.grad(mvc_only)(params["encoder"]["embedding"]))
    assert not np.allclose(results["inner product"], results["inner product, detach"])


def test_pad_embedding_is_zero_and_gets_no_gradient(tiny):
    config, params = tiny
    assert np.all(np.asarray(params["encoder"]["embedding"][config.pad_token_id]) == 0)
    assert np.all(np.asarray(params["pert_encoder"]["embedding"][config.pert_pad_id]) == 0)
    gene_ids, inputs, padding = make_inputs()
    grads = jax.grad(
        lambda p: apply(config, p, gene_ids, inputs, padding, deterministic=True)[
            "mlm_output"
        ].sum()
    )(params)
    assert np.all(np.asarray(grads["encoder"]["embedding"][config.pad_token_id]) == 0)
    assert np.all(np.asarray(grads["pert_encoder"]["embedding"][config.pert_pad_id]) == 0)


def test_eval_is_deterministic_and_train_uses_dropout(tiny):
    config, params = tiny
    args = make_inputs()
    a = apply(config, params, *args)["mlm_output"]
    b = apply(config, params, *args)["mlm_output"]
    np.testing.assert_array_equal(a, b)
    c = apply(config, params, *args, deterministic=False, rngs={"dropout": jax.random.PRNGKey(5)})[
        "mlm_output"
    ]
    d = apply(config, params, *args, deterministic=False, rngs={"dropout": jax.random.PRNGKey(6)})[
        "mlm_output"
    ]
    assert not np.allclose(c, d)


def test_cls_token_prepended_changes_cell_embedding_source():
    config_new = ModelConfig(**TINY)
    config_old = ModelConfig(**{**TINY, "prepend_cls_token": False})
    params = init_params(config_new, jax.random.PRNGKey(4))
    gene_ids, inputs, padding = make_inputs()
    old = apply(config_old, params, gene_ids, inputs, padding)
    new = apply(config_new, params, gene_ids, inputs, padding)
    assert old["mlm_output"].shape == new["mlm_output"].shape == (3, 10)
    # Original behaviour: the cell embedding is the first gene's output, so it moves when only
    # that gene's value changes while others are fixed ... and the <cls> version too, but the
    # <cls> version does not equal any gene position's hidden state.
    assert not np.allclose(old["cell_emb"], new["cell_emb"])


@pytest.mark.parametrize("channels", [1, 3])
def test_wrong_channel_count_fails_at_trace_time(tiny, channels):
    config, params = tiny
    gene_ids, inputs, padding = make_inputs()
    bad = np.repeat(inputs[..., :1], channels, axis=-1)
    model = TransformerGenerator(config)
    fn = jax.jit(lambda p, g, x, m: model.apply({"params": p}, g, x, m))
    with pytest.raises(AssertionError) as err:
        fn(params, gene_ids, bad, padding)
    msg = str(err.value)
    assert f"(3, 10, {channels})" in msg and "(3, 10, 2)" in msg and "flag" in msg
    if channels == 1:
        assert "index 1 is out of bounds" in msg


def test_batch_check_and_properties():
    gene_ids, inputs, padding = make_inputs()
    batch = PerturbBatch.from_arrays(
        gene_ids=gene_ids,
        control_values=inputs[..., 0],
        pert_flags=inputs[..., 1],
        target_values=inputs[..., 0],
        padding_mask=padding,
    )
    batch.check()
    np.testing.assert_array_equal(batch.pert_flags, inputs[..., 1])
    assert batch.loss_mask.sum() == (~padding).sum()
    with pytest.raises(ValueError, match="one shape"):
        PerturbBatch.from_arrays(
            gene_ids=gene_ids,
            control_values=inputs[..., 0][:, :5],
            pert_flags=inputs[..., 1],
            target_values=inputs[..., 0],
            padding_mask=padding,
        )


def test_same_shape_does_not_recompile(tiny):
    config, params = tiny
    model = TransformerGenerator(config)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def forward(p, g, x, m):
        return model.apply({"params": p}, g, x, m)["mlm_output"]

    forward(params, *make_inputs(seed=0))
    forward(params, *make_inputs(seed=1))  # new values, same shapes: no new trace


def test_config_rejects_bad_values():
    with pytest.raises(ConfigError, match="divisible"):
        ModelConfig(embsize=10, nhead=3)
    with pytest.raises(ConfigError, match="cell_emb_style"):
        ModelConfig(cell_emb_style="first")
    with pytest.raises(ConfigError, match="attention_dropout"):
        ModelConfig(attention="cudnn", dropout=0.2)
    ModelConfig(attention="cudnn", dropout=0.2, attention_dropout=0.0)


# ---------------------------------------------------------------------------------------------
# Fast paths (chunked attention, rematerialised layers) compute what the plain path computes


def model_loss_and_grads(config, params, deterministic):
    gene_ids, inputs, padding = make_inputs(length=21, n_pad=(0, 5, 12), perturbed=2)
    target = np.random.default_rng(1).uniform(0, 3, padding.shape).astype(np.float32)
    model = TransformerGenerator(config)

    def loss(p):
        out = model.apply(
            {"params": p},
            gene_ids,
            inputs,
            padding,
            deterministic=deterministic,
            compute_cls=True,
            compute_mvc=True,
            rngs={"dropout": jax.random.PRNGKey(3)},
        )
        err = jnp.where(padding, 0.0, out["mlm_output"] - target)
        return jnp.sum(err**2) + jnp.sum(out["cls_output"]) + jnp.sum(out["cell_emb"] ** 2)

    return jax.jit(jax.value_and_grad(loss))(params)


@pytest.mark.parametrize(
    "variant,dropout",
    [
        (dict(attention="chunked", attention_block_size=4), 0.0),
        (dict(attention="chunked", attention_block_size=4), 0.2),
        (dict(attention="full", remat=True), 0.2),
        (dict(attention="chunked", attention_block_size=8, remat=True), 0.0),
    ],
)
def test_model_fast_paths_match_plain(variant, dropout):
    plain = tiny_model.tiny_config(attention="full", dropout=dropout)
    fast = tiny_model.tiny_config(dropout=dropout, **variant)
    params = init_params(plain, jax.random.PRNGKey(0))
    # The parameter tree does not depend on the path (checkpoints move between them).
    assert jax.tree_util.tree_structure(
        init_params(fast, jax.random.PRNGKey(0))
    ) == jax.tree_util.tree_structure(params)
    deterministic = dropout == 0.0
    want_loss, want_grads = model_loss_and_grads(plain, params, deterministic)
    got_loss, got_grads = model_loss_and_grads(fast, params, deterministic)
    np.testing.assert_allclose(got_loss, want_loss, rtol=1e-5)
    for got, want in zip(
        jax.tree_util.tree_leaves(got_grads), jax.tree_util.tree_leaves(want_grads)
    ):
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
    fast = tiny_model.tiny_config(
        attention="chunked", attention_block_size=4, attention_eval_block_size=8, dropout=0.1
    )
    plain = tiny_model.tiny_config(attention="full", dropout=0.1)
    params = init_params(plain, jax.random.PRNGKey(0))
    gene_ids, inputs, padding = make_inputs(length=21, n_pad=(0, 5, 12), perturbed=2)
    seen.clear()
    got = TransformerGenerator(fast).apply(
        {"params": params}, gene_ids, inputs, padding, deterministic=True
    )["mlm_output"]
    assert seen == [(8, 0.0)] * fast.nlayers
    # 22 tokens (with <cls>) in tiles of at most 8 queries: three query blocks, the last padded.
    assert attn.chunk_layout(6, 22, 8)[1] == 8
    want = TransformerGenerator(plain).apply(
        {"params": params}, gene_ids, inputs, padding, deterministic=True
    )["mlm_output"]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    seen.clear()
    TransformerGenerator(fast).apply(
        {"params": params},
        gene_ids,
        inputs,
        padding,
        deterministic=False,
        rngs={"dropout": jax.random.PRNGKey(1)},
    )
    assert seen == [(4, 0.1)] * fast.nlayers


def test_model_dropout_rate_scale_and_eval_identity():
    x = jnp.ones((64, 50, 32), jnp.float32)
    layer = Dropout(0.25)
    out = np.asarray(
        layer.apply({}, x, deterministic=False, rngs={"dropout": jax.random.PRNGKey(0)})
    )
    kept = out != 0
    assert abs(kept.mean() - 0.75) < 0.01
    np.testing.assert_allclose(out[kept], 1 / 0.75, rtol=1e-6)
    again = np.asarray(
        layer.apply({}, x, deterministic=False, rngs={"dropout": jax.random.PRNGKey(1)})
    )
    assert (kept == (again != 0)).mean() < 0.7  # another key, another mask
    np.testing.assert_array_equal(layer.apply({}, x, deterministic=True), x)


# ---------------------------------------------------------------------------------------------
# model.init: torch starts from the PyTorch original's initial values

# Wide enough for the statistics below (>= 2048 draws per checked kernel).
INIT_SIZES = dict(ntoken=300, embsize=64, d_hid=32, nlayers=3, nhead=4, n_cls=5)


def _flat(params):
    return {"/".join(k): np.asarray(v) for k, v in flax.traverse_util.flatten_dict(params).items()}


def _assert_uniform(name, values, bound):
    """values look like draws of U(-bound, bound): inside it, reaching near both ends, with
    its standard deviation bound / sqrt(3)."""
    assert np.abs(values).max() <= bound * (1 + 1e-6), name
    assert values.max() > 0 > values.min(), name
    if values.size >= 200:  # P(no draw in the top 10% of either end) < 1e-4
        assert values.max() > 0.9 * bound and values.min() < -0.9 * bound, name
    if values.size >= 1000:
        np.testing.assert_allclose(values.std(), bound / np.sqrt(3), rtol=0.1, err_msg=name)


def test_torch_init_matches_the_original_initialisers():
    config = ModelConfig(**INIT_SIZES, init="torch")
    flat = _flat(init_params(config, jax.random.PRNGKey(0)))
    d, h = config.embsize, config.d_hid
    # nn.Linear: kernel and bias U(+-1/sqrt(fan_in)) (fan_in = rows of a Flax kernel).
    linear = {
        "value_encoder/linear1": 1,
        "value_encoder/linear2": d,
        "layers_0/linear1": d,
        "layers_0/linear2": h,
        "cls_decoder/dense_0": d,
        "cls_decoder/dense_1": d,
        "cls_decoder/out_layer": d,
        "mvc_decoder/gene2query": d,
    }
    for name, fan_in in linear.items():
        _assert_uniform(name + "/kernel", flat[name + "/kernel"], 1 / np.sqrt(fan_in))
        _assert_uniform(name + "/bias", flat[name + "/bias"], 1 / np.sqrt(fan_in))
    _assert_uniform("mvc W", flat["mvc_decoder/W/kernel"], 1 / np.sqrt(d))
    # MultiheadAttention: xavier-uniform in-projection, zero biases, nn.Linear out-projection.
    _assert_uniform("in_proj", flat["layers_0/self_attn/in_proj/kernel"], np.sqrt(6 / (d + 3 * d)))
    _assert_uniform("out_proj", flat["layers_0/self_attn/out_proj/kernel"], 1 / np.sqrt(d))
    assert not flat["layers_0/self_attn/in_proj/bias"].any()
    assert not flat["layers_0/self_attn/out_proj/bias"].any()
    # init_weights: decoder U(+-0.1) with a zero bias; gene embedding U(+-0.1), pad row too.
    _assert_uniform("decoder", flat["decoder/kernel"], 0.1)
    assert not flat["decoder/bias"].any()
    table = flat["encoder/embedding"]
    _assert_uniform("encoder", table, 0.1)
    assert np.abs(table[config.pad_token_id]).min() > 0
    # nn.Embedding(3, d, padding_idx=2): N(0, 1) with the pad row zero.
    pert = flat["pert_encoder/embedding"]
    assert not pert[config.pert_pad_id].any()
    assert 0.7 < pert[:2].std() < 1.3
    # LayerNorm: ones and zeros.
    assert np.all(flat["layers_0/norm1/scale"] == 1) and not flat["layers_0/norm1/bias"].any()
    # nn.TransformerEncoder deep-copies its layer: every layer starts as the first.
    for i in range(1, config.nlayers):
        for key in [k for k in flat if k.startswith("layers_0/")]:
            np.testing.assert_array_equal(
                flat[key.replace("layers_0", f"layers_{i}", 1)], flat[key]
            )


def test_flax_init_differs_where_torch_init_changes_it():
    flax_config = ModelConfig(**INIT_SIZES)
    torch_config = ModelConfig(**INIT_SIZES, init="torch")
    fx = _flat(init_params(flax_config, jax.random.PRNGKey(0)))
    tr = _flat(init_params(torch_config, jax.random.PRNGKey(0)))
    assert fx.keys() == tr.keys()
    assert all(fx[k].shape == tr[k].shape and fx[k].dtype == tr[k].dtype for k in fx)
    # lecun_normal (truncated normal, std 1/sqrt(fan_in)) crosses nn.Linear's bound.
    assert np.abs(fx["layers_0/linear2/kernel"]).max() > 1.2 / np.sqrt(flax_config.d_hid)
    assert not fx["cls_decoder/dense_0/bias"].any() and tr["cls_decoder/dense_0/bias"].any()
    assert not fx["encoder/embedding"][flax_config.pad_token_id].any()
    assert not np.array_equal(fx["layers_1/linear1/kernel"], fx["layers_0/linear1/kernel"])
    # The torch model runs: finite outputs of every head.
    out = apply(torch_config, init_params(torch_config, jax.random.PRNGKey(0)), *make_inputs())
    assert all(np.isfinite(np.asarray(v)).all() for v in out.values())


def test_model_init_rejects_unknown_values():
    with pytest.raises(ConfigError, match=r"model\.init.*'flax', 'torch'"):
        ModelConfig(init="pytorch")
