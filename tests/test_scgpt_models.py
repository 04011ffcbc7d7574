"""scGPT's perturbation models: the model options that build them, their checkpoints
converted whole, and the running statistics through training, eval and prediction.

The PyTorch side is tests/torch_reference.py (our re-implementation of scGPT's
TransformerGenerator in both versions: up to January 2024 with BatchNorm and the MLP
decoder, since then with the affine decoder); its random-weight checkpoints are converted
and must give the same outputs.
"""

import dataclasses
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from scformer_jax import convert
from scformer_jax.config import ConfigError, ModelConfig, ObjectiveConfig, OptimConfig
from scformer_jax.model import (
    BATCH_STATS,
    InputBatchNorm,
    TransformerGenerator,
    init_params,
    model_variables,
)
from scformer_jax.training import create_train_state, train_step
from tests.parity import require
from tests.test_convert import flat, make_cells
from tests.tiny_model import random_batch, tiny_config

SIZES = dict(d_model=16, nhead=4, d_hid=24, nlayers=2, nlayers_cls=3)
OLD = dict(expr_decoder="mlp", input_batchnorm=True)  # scGPT up to January 2024
NEW = dict(expr_decoder="affine")  # scGPT since January 2024
# (version, attention layout, cell embedding, MVC style, more options)
CASES = [
    ("old", "torch", "cls", "inner product", dict(explicit_zero_prob=True)),
    ("old", "flash", "w-pool", "inner product, detach", dict(pre_norm=True)),
    ("old", "flash", "cls", "sum query", dict(explicit_zero_prob=True)),
    (
        "new",
        "torch",
        "w-pool",
        "inner product",
        dict(explicit_zero_prob=True, decoder_activation="Softplus", decoder_adaptive_bias=True),
    ),
    ("new", "flash", "cls", "inner product", dict(explicit_zero_prob=True, pre_norm=True)),
    ("new", "flash", "avg-pool", "concat query", dict(decoder_adaptive_bias=True)),
]


@pytest.fixture(scope="module")
def ref():
    require("torch")
    from tests import torch_reference

    return torch_reference


def build(
    ref, folder, version, layout="torch", style="cls", mvc="inner product", vocab=None, **options
):
    model = ref.build_reference_model(
        vocab=vocab,
        n_genes=20,
        **SIZES,
        **(OLD if version == "old" else NEW),
        **options,
        do_mvc=True,
        cell_emb_style=style,
        mvc_decoder_style=mvc,
        attention_layout=layout,
        randomize_all=True,
        seed=3,
    )
    ref.save_reference_checkpoint(model, folder)
    return model


def jax_forward(config, params, gene_ids, values, flags, padding):
    inputs = np.stack([values, flags.astype(np.float32)], axis=-1)
    out = TransformerGenerator(config).apply(
        model_variables(params),
        jnp.asarray(gene_ids, jnp.int32),
        jnp.asarray(inputs),
        jnp.asarray(padding),
        deterministic=True,
        compute_mvc=True,
    )
    return {k: np.asarray(v) for k, v in out.items()}


@pytest.mark.torch
@pytest.mark.parametrize("version,layout,style,mvc,options", CASES)
def test_converted_scgpt_model_equals_pytorch(ref, tmp_path, version, layout, style, mvc, options):
    model = build(ref, tmp_path / "ckpt", version, layout, style, mvc, **options)
    config, params, report = convert.convert_params(tmp_path / "ckpt")
    assert not (report.missing or report.unexpected or report.shape_mismatched), report
    assert report.ignored == (["bn.num_batches_tracked"] if version == "old" else [])
    assert len(report.loaded) + len(report.ignored) == len(model.state_dict())
    assert config.expr_decoder == ("mlp" if version == "old" else "affine")
    assert config.input_batchnorm is (version == "old")
    assert config.pre_norm is options.get("pre_norm", False)
    assert config.explicit_zero_prob is options.get("explicit_zero_prob", False)
    assert config.sample_zero_prob is config.explicit_zero_prob  # scGPT's pred_perturb
    assert config.decoder_activation == options.get("decoder_activation")
    assert config.decoder_adaptive_bias is options.get("decoder_adaptive_bias", False)
    if version == "old":
        np.testing.assert_array_equal(
            params[BATCH_STATS]["bn"]["var"], model.bn.running_var.numpy()
        )
        assert not np.allclose(params[BATCH_STATS]["bn"]["var"], 1.0)

    n_pad = (0, 0, 0) if style == "avg-pool" else (0, 3, 5)
    cells = make_cells(20, model.pad_token_id, n_pad=n_pad)
    expected = ref.reference_forward(model, *cells)
    # Unsampled predictions on both sides (sampling is checked on its own below).
    got = jax_forward(dataclasses.replace(config, sample_zero_prob=False), params, *cells)
    real = ~cells[3]
    keys = ["mlm_output", "mvc_output"]
    if config.explicit_zero_prob:
        keys.append("mlm_zero_probs")
        if mvc.startswith("inner product"):
            keys.append("mvc_zero_probs")
    assert sorted(k for k in got if "zero" in k) == sorted(k for k in keys if "zero" in k)
    assert sorted(k for k in expected if "zero" in k) == sorted(k for k in keys if "zero" in k)
    for key in keys:
        np.testing.assert_allclose(
            got[key][real], expected[key][real], rtol=1e-5, atol=1e-5, err_msg=key
        )
    np.testing.assert_allclose(got["cell_emb"], expected["cell_emb"], rtol=1e-5, atol=1e-5)


@pytest.mark.torch
def test_input_batchnorm_matches_torch_batchnorm(ref):
    torch = ref.torch
    rng = np.random.default_rng(0)
    x = rng.normal(1.0, 2.0, (3, 5, 4)).astype(np.float32)
    bn = torch.nn.BatchNorm1d(4, eps=6.1e-5)
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([0.5, 1.0, 1.5, 2.0]))
        bn.bias.copy_(torch.tensor([0.1, -0.2, 0.3, 0.0]))
    params = {"scale": bn.weight.detach().numpy(), "bias": bn.bias.detach().numpy()}
    stats = {"mean": np.zeros(4, np.float32), "var": np.ones(4, np.float32)}
    module = InputBatchNorm()

    # Training: batch statistics; the running ones move by momentum 0.1 (unbiased variance).
    keep = np.ones((3, 5), bool)
    y, updates = module.apply(
        {"params": params, BATCH_STATS: stats},
        x,
        keep,
        deterministic=False,
        mutable=[BATCH_STATS],
    )
    bn.train()
    expected = bn(torch.tensor(x).permute(0, 2, 1)).permute(0, 2, 1).detach().numpy()
    np.testing.assert_allclose(np.asarray(y), expected, rtol=1e-5, atol=1e-5)
    for ours, theirs in (("mean", bn.running_mean), ("var", bn.running_var)):
        np.testing.assert_allclose(updates[BATCH_STATS][ours], theirs.numpy(), rtol=1e-5)

    # Eval: the running statistics.
    bn.eval()
    y = module.apply(
        {"params": params, BATCH_STATS: updates[BATCH_STATS]}, x, keep, deterministic=True
    )
    expected = bn(torch.tensor(x).permute(0, 2, 1)).permute(0, 2, 1).detach().numpy()
    np.testing.assert_allclose(np.asarray(y), expected, rtol=1e-5, atol=1e-5)

    # Padding tokens do not enter the batch statistics.
    keep[1, 2:] = False
    _, masked = module.apply(
        {"params": params, BATCH_STATS: stats}, x, keep, deterministic=False, mutable=[BATCH_STATS]
    )
    real = x[keep]  # (n_real, features)
    np.testing.assert_allclose(
        masked[BATCH_STATS]["mean"], 0.1 * real.mean(0), rtol=1e-5, atol=1e-6
    )
    np.testing.assert_allclose(
        masked[BATCH_STATS]["var"], 0.9 + 0.1 * real.var(0, ddof=1), rtol=1e-5
    )


def scgpt_config(**options):
    return dataclasses.replace(
        tiny_config(dropout=0.0, attention="full"),
        **{"expr_decoder": "mlp", "input_batchnorm": True, **options},
    )


def test_train_step_updates_running_statistics_on_every_device():
    from scformer_jax import parallel

    config = scgpt_config(explicit_zero_prob=True)
    state, _ = create_train_state(config, OptimConfig(lr=1e-3), 10, jax.random.PRNGKey(0))
    assert set(state.params[BATCH_STATS]["bn"]) == {"mean", "var"}
    batch = random_batch(batch=4, length=12, seed=1)
    model = TransformerGenerator(config)
    p_step = parallel.pmap(functools.partial(train_step, model=model, objective=ObjectiveConfig()))
    rng = jax.random.PRNGKey(0)
    new, _ = p_step(parallel.replicate(state), parallel.shard_batch(batch), parallel.replicate(rng))
    stats = jax.tree_util.tree_map(np.asarray, new.params[BATCH_STATS]["bn"])
    # Identical on both devices, and moved from the (0, 1) start by one momentum step.
    np.testing.assert_array_equal(stats["mean"][0], stats["mean"][1])
    assert 0 < np.abs(stats["mean"][0]).max() < 1.0
    assert not np.allclose(stats["var"][0], 1.0)
    # On one device the new statistics are exactly the training pass's update (the
    # optimiser's step on them is replaced), and the trained parameters did move.
    single = jax.jit(
        functools.partial(train_step, model=model, objective=ObjectiveConfig(), axis_name=None)
    )
    host_batch = jax.tree_util.tree_map(np.asarray, batch)
    one, _ = single(state, host_batch, rng)
    _, updates = model.apply(
        model_variables(state.params),
        host_batch.gene_ids,
        host_batch.inputs,
        host_batch.padding_mask,
        deterministic=False,
        mutable=[BATCH_STATS],
    )
    for name in ("mean", "var"):
        np.testing.assert_allclose(
            one.params[BATCH_STATS]["bn"][name], updates[BATCH_STATS]["bn"][name], rtol=1e-6
        )
    assert not np.allclose(one.params["bn"]["scale"], state.params["bn"]["scale"])


def test_sampled_prediction_draws_from_the_zero_probabilities():
    config = scgpt_config(explicit_zero_prob=True)
    params = init_params(config, jax.random.PRNGKey(0))
    batch = random_batch(batch=2, length=10, seed=2)
    model = TransformerGenerator(config)
    args = (batch.gene_ids, batch.inputs, batch.padding_mask)
    plain = model.apply(model_variables(params), *args)
    sampled_model = TransformerGenerator(dataclasses.replace(config, sample_zero_prob=True))

    @jax.jit
    def draw(key):
        return sampled_model.apply(model_variables(params), *args, rngs={"sample": key})

    draws = np.stack(
        [np.asarray(draw(jax.random.PRNGKey(i))["mlm_output"]) for i in range(400)]
    )  # (400, batch, length)
    pred, probs = np.asarray(plain["mlm_output"]), np.asarray(plain["mlm_zero_probs"])
    assert np.all((draws == 0) | np.isclose(draws, pred))
    kept = np.isclose(draws, pred).mean(0)
    # 400 Bernoulli draws: the kept fraction is within 5 standard errors of zero_probs.
    assert np.all(np.abs(kept - probs) < 5 * np.sqrt(probs * (1 - probs) / 400) + 1e-3)


def test_options_are_checked():
    with pytest.raises(ConfigError, match="explicit_zero_prob needs model.expr_decoder"):
        ModelConfig(explicit_zero_prob=True)
    with pytest.raises(ConfigError, match="belong to the affine decoder"):
        ModelConfig(expr_decoder="mlp", decoder_adaptive_bias=True)
    with pytest.raises(ConfigError, match="not one of"):
        ModelConfig(expr_decoder="affine", decoder_activation="relu")
    with pytest.raises(ConfigError, match="set model.explicit_zero_prob: true"):
        ModelConfig(expr_decoder="mlp", sample_zero_prob=True)


def test_scgpt_keys_map_onto_our_tree():
    cases = {
        "bn.weight": ("bn", "scale"),
        "bn.running_mean": (BATCH_STATS, "bn", "mean"),
        "decoder.fc.4.bias": ("decoder", "fc_4", "bias"),
        "decoder.zero_logit.0.weight": ("decoder", "zero_logit_0", "kernel"),
        "decoder.coeff_decoder.fc.2.weight": ("decoder", "coeff_decoder", "fc_2", "kernel"),
        "decoder.bias_decoder.zero_logit.4.bias": (
            "decoder",
            "bias_decoder",
            "zero_logit_4",
            "bias",
        ),
        "mvc_decoder.W_zero_logit.weight": ("mvc_decoder", "W_zero_logit", "kernel"),
    }
    for key, path in cases.items():
        assert convert.torch_key_to_path(key)[0] == path, key
    assert convert.torch_key_to_path("bn.num_batches_tracked") is None


@pytest.mark.torch
@pytest.mark.parametrize("version", ["old", "new"])
def test_converted_scgpt_folder_runs_eval_and_predict(ref, tmp_path, data_tiny, version):
    import eval as eval_cli
    from scformer_jax.predict import load_predictor

    genes = [str(g) for g in data_tiny.gene_names]
    build(
        ref,
        tmp_path / "ckpt",
        version,
        layout="flash",
        explicit_zero_prob=version == "old",
        pre_norm=True,
        vocab=ref.make_vocab(genes),
    )
    out = tmp_path / "converted"
    assert convert.main([str(tmp_path / "ckpt"), str(out), "--data", "simulated:tiny"]) == 0
    report = json.loads((out / "conversion_report.json").read_text())
    assert report["missing"] == [] and report["unexpected"] == []
    assert eval_cli.main(["--workdir", str(out), "--n-plots", "0", "--predict", genes[3]]) == 0
    metrics = json.loads((out / "eval" / "metrics.json").read_text())
    assert metrics["n_test_perturbations"] > 0
    assert (out / "eval" / "predict.h5ad").is_file()
    predictor = load_predictor(str(out), batch_size=16)
    if version == "old":
        assert set(predictor.params[BATCH_STATS]["bn"]) == {"mean", "var"}
    else:
        assert BATCH_STATS not in predictor.params
    result = predictor.predict([genes[3]], pool_size=5)
    assert result.mean.shape == (1, data_tiny.n_genes) and np.isfinite(result.mean.X).all()
    _, params, _ = convert.convert_params(tmp_path / "ckpt")
    got = flat(predictor.params)
    for path, value in flat(params).items():
        if path != "encoder/embedding":  # re-ordered into the dataset's tokens
            np.testing.assert_array_equal(got[path], value, err_msg=path)
