"""The Flax model: shapes, padding invariance, styles, determinism, the two-channel contract."""

import chex
import jax
import numpy as np
import pytest

from scformer_jax import ModelConfig, PerturbBatch, TransformerGenerator, init_params
from scformer_jax.config import CELL_EMB_STYLES, MVC_DECODER_STYLES, ConfigError

TINY = dict(ntoken=24, embsize=16, d_hid=16, nlayers=2, nhead=2, dropout=0.1, n_cls=3,
            attention="full")


def make_inputs(batch=3, length=10, n_pad=(0, 3, 6), seed=0):
    rng = np.random.default_rng(seed)
    gene_ids = rng.integers(3, 24, size=(batch, length)).astype(np.int32)
    values = rng.uniform(0, 3, size=(batch, length)).astype(np.float32)
    flags = np.zeros((batch, length), np.float32)
    flags[:, 1] = 1
    padding = np.zeros((batch, length), bool)
    for row, n in enumerate(n_pad):
        if n:
            padding[row, -n:] = True
    gene_ids[padding] = 0
    values[padding] = 0.0
    flags[padding] = 2
    return gene_ids, np.stack([values, flags], -1), padding


def apply(config, params, gene_ids, inputs, padding, **kw):
    model = TransformerGenerator(config)
    return model.apply({"params": params}, gene_ids, inputs, padding,
                       compute_cls=True, compute_mvc=True, **kw)


@pytest.fixture(scope="module")
def tiny():
    config = ModelConfig(**TINY)
    return config, init_params(config, jax.random.PRNGKey(0))


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
    config = ModelConfig(**{**TINY, "cell_emb_style": style, "prepend_cls_token": prepend,
                            "mvc_decoder_style": "concat query"})
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
        np.testing.assert_allclose(np.asarray(out[key])[real], np.asarray(out2[key])[real],
                                   rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out["cell_emb"], out2["cell_emb"], rtol=1e-5, atol=1e-5)
    # And a row padded further gives the same real outputs as the unpadded row.
    longer = [np.concatenate([a, np.repeat(a[:, -1:], 4, axis=1)], axis=1)
              for a in (gene_ids, inputs, padding)]
    longer[2][:, -4:] = True
    out3 = apply(config, params, *longer)
    np.testing.assert_allclose(np.asarray(out3["mlm_output"])[:, :10][real],
                               np.asarray(out["mlm_output"])[real], rtol=1e-5, atol=1e-5)


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

        def mvc_only(enc, p=params, config=config):
            p = {**p, "encoder": {"embedding": enc}}
            return apply(config, p, gene_ids, inputs, padding)["mvc_output"].sum()

        results[style] = np.asarray(jax.grad(mvc_only)(params["encoder"]["embedding"]))
    assert not np.allclose(results["inner product"], results["inner product, detach"])


def test_pad_embedding_is_zero_and_gets_no_gradient(tiny):
    config, params = tiny
    assert np.all(np.asarray(params["encoder"]["embedding"][config.pad_token_id]) == 0)
    assert np.all(np.asarray(params["pert_encoder"]["embedding"][config.pert_pad_id]) == 0)
    gene_ids, inputs, padding = make_inputs()
    grads = jax.grad(lambda p: apply(config, p, gene_ids, inputs, padding,
                                     deterministic=True)["mlm_output"].sum())(params)
    assert np.all(np.asarray(grads["encoder"]["embedding"][config.pad_token_id]) == 0)
    assert np.all(np.asarray(grads["pert_encoder"]["embedding"][config.pert_pad_id]) == 0)


def test_eval_is_deterministic_and_train_uses_dropout(tiny):
    config, params = tiny
    args = make_inputs()
    a = apply(config, params, *args)["mlm_output"]
    b = apply(config, params, *args)["mlm_output"]
    np.testing.assert_array_equal(a, b)
    c = apply(config, params, *args, deterministic=False,
              rngs={"dropout": jax.random.PRNGKey(5)})["mlm_output"]
    d = apply(config, params, *args, deterministic=False,
              rngs={"dropout": jax.random.PRNGKey(6)})["mlm_output"]
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
    batch = PerturbBatch.from_arrays(gene_ids=gene_ids, control_values=inputs[..., 0],
                                     pert_flags=inputs[..., 1], target_values=inputs[..., 0],
                                     padding_mask=padding)
    batch.check()
    np.testing.assert_array_equal(batch.pert_flags, inputs[..., 1])
    assert batch.loss_mask.sum() == (~padding).sum()
    with pytest.raises(ValueError, match="one shape"):
        PerturbBatch.from_arrays(gene_ids=gene_ids, control_values=inputs[..., 0][:, :5],
                                 pert_flags=inputs[..., 1], target_values=inputs[..., 0],
                                 padding_mask=padding)


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
