"""Importing PyTorch scGPT/scFormer checkpoints (scformer_jax.convert).

The PyTorch side is tests/torch_reference.py, a re-implementation of the original model with
the original state_dict names; its checkpoints are written with random weights into
tmp_path. Expected values are the PyTorch model's outputs or the saved tensors themselves.
"""

import dataclasses
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from scformer_jax import convert
from scformer_jax.config import load_config
from scformer_jax.model import TransformerGenerator, init_params

TINY = "tests/configs/tiny.yaml"
SIZES = dict(d_model=16, nhead=4, d_hid=24, nlayers=2, nlayers_cls=3)
# Parity cases: each attention layout, cell-embedding style and MVC style at least once.
CASES = [
    ("torch", "cls", "inner product"),
    ("flash", "w-pool", "concat query"),
    ("torch", "avg-pool", "sum query"),
    ("flash", "cls", "inner product, detach"),
]


@pytest.fixture(scope="module")
def ref():
    pytest.importorskip("torch")
    from tests import torch_reference

    return torch_reference


def build(
    ref,
    folder,
    *,
    layout="torch",
    style="cls",
    mvc="inner product",
    vocab=None,
    sizes=SIZES,
    seed=1,
    **args,
):
    """A random-weight reference model saved as an scGPT checkpoint folder."""
    model = ref.build_reference_model(
        vocab=vocab,
        n_genes=20,
        **sizes,
        do_mvc=True,
        cell_emb_style=style,
        mvc_decoder_style=mvc,
        attention_layout=layout,
        randomize_all=True,
        seed=seed,
    )
    ref.save_reference_checkpoint(model, folder, extra_args=args or None)
    return model


def state_dict(model):
    return {k: v.detach().numpy() for k, v in model.state_dict().items()}


def make_cells(n_genes, pad_id, *, n_pad=(0, 3, 5), length=9, seed=0):
    """Random gene tokens, values and flags; the last n_pad[row] positions are padding."""
    rng = np.random.default_rng(seed)
    batch = len(n_pad)
    gene_ids = rng.permuted(np.tile(np.arange(n_genes), (batch, 1)), axis=1)[:, :length]
    values = rng.uniform(0.0, 3.0, (batch, length)).astype(np.float32)
    flags = np.zeros((batch, length), np.int64)
    flags[:, 2] = 1
    padding = np.zeros((batch, length), bool)
    for row, n in enumerate(n_pad):
        if n:
            padding[row, -n:] = True
    gene_ids[padding] = pad_id
    values[padding] = 0.0
    flags[padding] = 2
    return gene_ids, values, flags, padding


def jax_forward(config, params, gene_ids, values, flags, padding):
    inputs = np.stack([values, flags.astype(np.float32)], axis=-1)
    out = TransformerGenerator(config).apply(
        {"params": params},
        jnp.asarray(gene_ids, jnp.int32),
        jnp.asarray(inputs),
        jnp.asarray(padding),
        deterministic=True,
        compute_mvc=True,
    )
    return {k: np.asarray(v) for k, v in out.items()}


def flat(params):
    return {"/".join(k): np.asarray(v) for k, v in traverse_util.flatten_dict(params).items()}


# ------------------------------------------------------------------------------ key mapping


def test_torch_keys_map_onto_our_tree():
    cases = {
        "encoder.embedding.weight": (("encoder", "embedding"), "embedding"),
        "encoder.enc_norm.bias": (("encoder_norm", "bias"), "norm"),
        "value_encoder.linear2.weight": (("value_encoder", "linear2", "kernel"), "linear"),
        "pert_encoder.weight": (("pert_encoder", "embedding"), "embedding"),
        "transformer_encoder.layers.11.self_attn.in_proj_weight": (
            ("layers_11", "self_attn", "in_proj", "kernel"),
            "linear",
        ),
        "transformer_encoder.layers.0.self_attn.Wqkv.bias": (
            ("layers_0", "self_attn", "in_proj", "bias"),
            "linear",
        ),
        "transformer_encoder.layers.2.norm1.weight": (("layers_2", "norm1", "scale"), "norm"),
        "cls_decoder._decoder.3.weight": (("cls_decoder", "dense_1", "kernel"), "linear"),
        "cls_decoder._decoder.5.bias": (("cls_decoder", "norm_1", "bias"), "norm"),
        "mvc_decoder.hidden_activation.weight": (
            ("mvc_decoder", "hidden_activation", "negative_slope"),
            "prelu",
        ),
    }
    for key, expected in cases.items():
        assert convert.torch_key_to_path(key) == expected, key
    for key in (
        "batch_encoder.embedding.weight",
        "sim.temp",
        "transformer_encoder.layers.0.self_attn.out_proj.scale",
    ):
        assert convert.torch_key_to_path(key) is None, key


def test_missing_torch_names_the_install_command(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "torch", None)  # import torch -> ImportError
    with pytest.raises(ImportError, match=r"pip install torch==2\.13\.0"):
        convert.read_state_dict(tmp_path / "best_model.pt")


# ----------------------------------------------------------------------------------- parity


@pytest.mark.torch
@pytest.mark.parametrize("layout,style,mvc", CASES)
def test_outputs_equal_pytorch(ref, tmp_path, layout, style, mvc):
    model = build(ref, tmp_path / "ckpt", layout=layout, style=style, mvc=mvc)
    config, params, report = convert.convert_params(tmp_path / "ckpt")
    assert report.attention_layout == layout
    assert not (report.missing or report.unexpected or report.shape_mismatched)
    assert len(report.loaded) == len(model.state_dict())
    assert config.prepend_cls_token is (style != "cls")
    assert config.mvc_decoder_style == mvc and config.cell_emb_style == style

    n_pad = (0, 0, 0) if style == "avg-pool" else (0, 3, 5)
    cells = make_cells(20, model.pad_token_id, n_pad=n_pad)
    expected = ref.reference_forward(model, *cells)
    got = jax_forward(config, params, *cells)
    real = ~cells[3]
    for key in ("mlm_output", "mvc_output"):
        np.testing.assert_allclose(
            got[key][real], expected[key][real], rtol=1e-5, atol=1e-5, err_msg=key
        )
    np.testing.assert_allclose(got["cell_emb"], expected["cell_emb"], rtol=1e-5, atol=1e-5)

    if style == "avg-pool":
        # With padding, the original averages over padding positions too; ours over the
        # real positions only (a deliberate difference): the encoder output still agrees.
        cells = make_cells(20, model.pad_token_id, n_pad=(0, 3, 5))
        expected = ref.reference_forward(model, *cells)
        got = jax_forward(config, params, *cells)
        real = ~cells[3]
        np.testing.assert_allclose(
            got["mlm_output"][real], expected["mlm_output"][real], rtol=1e-5, atol=1e-5
        )
        masked_mean = (expected["transformer_output"] * real[..., None]).sum(1) / real.sum(
            1, keepdims=True
        )
        np.testing.assert_allclose(got["cell_emb"], masked_mean, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------- partial and reports


@pytest.mark.torch
def test_partial_load_by_prefix_keeps_other_params_at_init(ref, tmp_path):
    model = build(ref, tmp_path / "ckpt", layout="flash")
    sd = state_dict(model)
    config, _, _ = convert.convert_params(tmp_path / "ckpt")
    rng = jax.random.PRNGKey(7)
    params, report = convert.load_pretrained(
        tmp_path / "ckpt", config, rng, prefixes=convert.SCGPT_PREFIXES
    )
    got, init = flat(params), flat(init_params(config, rng))
    prefixes = ("encoder.", "value_encoder.", "transformer_encoder.")
    assert len(report.loaded) == sum(k.startswith(prefixes) for k in sd)
    assert sorted(report.skipped) == sorted(k for k in sd if not k.startswith(prefixes))
    loaded_paths = {path for _, path in report.loaded}
    for path, value in got.items():
        if path not in loaded_paths:
            np.testing.assert_array_equal(value, init[path], err_msg=path)
    for layer in range(SIZES["nlayers"]):
        np.testing.assert_array_equal(
            got[f"layers_{layer}/self_attn/in_proj/kernel"],
            sd[f"transformer_encoder.layers.{layer}.self_attn.Wqkv.weight"].T,
        )
    np.testing.assert_array_equal(got["encoder/embedding"], sd["encoder.embedding.weight"])
    np.testing.assert_array_equal(got["encoder_norm/scale"], sd["encoder.enc_norm.weight"])
    assert not np.allclose(got["decoder/kernel"], sd["decoder.weight"].T)
    assert "pert_encoder/embedding" not in loaded_paths

    with pytest.raises(convert.ConversionError, match="transformer_encodr"):
        convert.load_pretrained(tmp_path / "ckpt", config, rng, prefixes=["transformer_encodr"])


@pytest.mark.torch
def test_shape_mismatch_is_reported_and_left_at_init(ref, tmp_path):
    build(ref, tmp_path / "ckpt")
    config, _, _ = convert.convert_params(tmp_path / "ckpt")
    wider = dataclasses.replace(config, d_hid=32)
    rng = jax.random.PRNGKey(3)
    params, report = convert.load_pretrained(tmp_path / "ckpt", wider, rng)
    mismatched = {m.path: m for m in report.shape_mismatched}
    assert set(mismatched) == {
        f"layers_{i}/{name}"
        for i in range(2)
        for name in ("linear1/kernel", "linear1/bias", "linear2/kernel")
    }
    assert mismatched["layers_0/linear1/kernel"].source_shape == (24, 16)
    assert mismatched["layers_0/linear1/kernel"].expected_shape == (16, 32)
    init = flat(init_params(wider, rng))
    for path in mismatched:
        np.testing.assert_array_equal(flat(params)[path], init[path])
    assert any("model.d_hid: 24 in the checkpoint, 32 in this run" in n for n in report.notes)
    assert "shape mismatched" in report.summary()


@pytest.mark.torch
def test_vocabulary_is_matched_by_gene_name(ref, tmp_path, data_tiny):
    genes = [str(g) for g in data_tiny.gene_names]
    rng = np.random.default_rng(0)
    kept = [genes[i] for i in rng.permutation(len(genes))[:25]]
    foreign = [f"OTHER{i}" for i in range(5)]
    vocab = ref.make_vocab(foreign[:2] + kept + foreign[2:])
    model = build(ref, tmp_path / "ckpt", vocab=vocab, pad_value=0.0)
    table = state_dict(model)["encoder.embedding.weight"]

    base, _, _ = convert.convert_params(tmp_path / "ckpt")
    config = base.with_vocab(data_tiny)
    params, report = convert.load_pretrained(
        tmp_path / "ckpt", config, jax.random.PRNGKey(0), dataset=data_tiny
    )
    match = report.vocabulary
    assert match.message == "match 25/40 genes in vocabulary"
    assert list(match.unmatched_genes) == [g for g in genes if g not in kept]
    assert set(match.special_tokens) == {"<pad>", "<cls>", "<eoc>"}
    assert "match 25/40 genes in vocabulary" in report.summary()
    embedding = flat(params)["encoder/embedding"]
    assert embedding.shape == (data_tiny.n_tokens, SIZES["d_model"])
    for token_id, name in enumerate(data_tiny.token_names):
        if name in kept or name in ("<cls>", "<eoc>"):
            np.testing.assert_array_equal(embedding[token_id], table[vocab[name]])
        else:
            assert not embedding[token_id].any(), name

    # The same cells through both models: dataset token ids here, checkpoint ids there.
    ids = np.array([[data_tiny.vocab[g] for g in kept[:8]]] * 2)
    ckpt_ids = np.array([[vocab[g] for g in kept[:8]]] * 2)
    cells = make_cells(8, 0, n_pad=(0, 3), length=8)
    padding = cells[3]
    ids[padding], ckpt_ids[padding] = data_tiny.pad_token_id, vocab["<pad>"]
    expected = ref.reference_forward(model, ckpt_ids, *cells[1:])
    got = jax_forward(config, params, ids, *cells[1:])
    np.testing.assert_allclose(
        got["mlm_output"][~padding], expected["mlm_output"][~padding], rtol=1e-5, atol=1e-5
    )


@pytest.mark.torch
def test_bad_folders_are_clear_errors_and_write_nothing(ref, tmp_path):
    with pytest.raises(convert.ConversionError, match="lacks best_model.pt, args.json"):
        convert.convert_checkpoint(tmp_path, tmp_path / "out")
    model = build(ref, tmp_path / "ckpt")
    vocab = dict(model.vocab, EXTRA=len(model.vocab))
    (tmp_path / "ckpt" / "vocab.json").write_text(json.dumps(vocab))
    with pytest.raises(convert.ConversionError, match="rows; use the vocab.json"):
        convert.convert_checkpoint(tmp_path / "ckpt", tmp_path / "out")
    (tmp_path / "ckpt" / "best_model.pt").write_bytes(b"not a torch file")
    with pytest.raises(convert.ConversionError, match="state_dict"):
        convert.read_state_dict(tmp_path / "ckpt" / "best_model.pt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


@pytest.mark.torch
def test_failed_conversion_leaves_nothing_half_written(ref, tmp_path, monkeypatch):
    from scformer_jax.checkpoints import Checkpoints

    build(ref, tmp_path / "bad", d_hid=32)  # args.json contradicts the tensors (d_hid 24)
    with pytest.raises(convert.ConversionError, match="do not fit.*Nothing was written"):
        convert.convert_checkpoint(tmp_path / "bad", tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad"]

    build(ref, tmp_path / "ckpt")
    convert.convert_checkpoint(tmp_path / "ckpt", tmp_path / "out")
    before = sorted(str(p.relative_to(tmp_path)) for p in (tmp_path / "out").rglob("*"))

    def failing_save(self, *args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(Checkpoints, "save", failing_save)
    with pytest.raises(RuntimeError, match="disk full"):
        convert.convert_checkpoint(tmp_path / "ckpt", tmp_path / "out", overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad", "ckpt", "out"]
    assert sorted(str(p.relative_to(tmp_path)) for p in (tmp_path / "out").rglob("*")) == before


# ------------------------------------------------------------------- CLI, eval and training


@pytest.mark.torch
def test_cli_round_trip_then_eval_and_predict(ref, tmp_path, data_tiny, capsys):
    import eval as eval_cli
    from scformer_jax.predict import load_predictor
    from scformer_jax.runs import restore_params

    genes = [str(g) for g in data_tiny.gene_names]
    vocab = ref.make_vocab(["OTHER0"] + genes[::-1])
    build(ref, tmp_path / "ckpt", vocab=vocab, style="avg-pool")
    out = tmp_path / "converted"
    assert (
        convert.main(
            [
                str(tmp_path / "ckpt"),
                str(out),
                "--data",
                "simulated:tiny",
                "--set",
                "train.eval_batch_size=16",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "loaded: " in printed and "match 40/40 genes in vocabulary" in printed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "converted"]
    for name in ("config.yaml", "vocab.json", "conversion_report.json", "checkpoints"):
        assert (out / name).exists(), name
    run_config = load_config(out / "config.yaml")
    assert run_config.data.path == "simulated:tiny"
    assert run_config.train.load_model == str(out)
    assert run_config.model.cell_emb_style == "avg-pool" and run_config.model.embsize == 16
    assert json.loads((out / "vocab.json").read_text()) == vocab
    report = json.loads((out / "conversion_report.json").read_text())
    assert report["vocabulary"]["n_matched"] == 40 and not report["shape_mismatched"]

    expected_config, expected_params, _ = convert.convert_params(tmp_path / "ckpt")
    model_config, params, _ = restore_params(out)
    assert model_config == expected_config
    for path, value in flat(expected_params).items():
        np.testing.assert_array_equal(flat(params)[path], value, err_msg=path)

    # train.load_model may name the converted folder or the PyTorch one: same parameters.
    dataset_config = model_config.with_vocab(data_tiny)
    loaded = [
        convert.load_pretrained(
            folder,
            dataset_config,
            jax.random.PRNGKey(1),
            prefixes=["encoder", "layers_"],
            dataset=data_tiny,
        )
        for folder in (out, tmp_path / "ckpt")
    ]
    assert loaded[0][1].attention_layout == "converted"
    assert [p for _, p in loaded[0][1].loaded] == [p for _, p in loaded[1][1].loaded]
    for path, value in flat(loaded[1][0]).items():
        np.testing.assert_array_equal(flat(loaded[0][0])[path], value, err_msg=path)

    assert convert.main([str(tmp_path / "ckpt"), str(out)]) == 2
    assert "already exists" in capsys.readouterr().err

    # eval.py and predict() read the folder; the embedding moves to the dataset's order.
    assert eval_cli.main(["--workdir", str(out), "--n-plots", "1"]) == 0
    metrics = json.loads((out / "eval" / "metrics.json").read_text())
    assert metrics["n_test_perturbations"] > 0
    predictor = load_predictor(str(out), batch_size=16)
    embedding = np.asarray(predictor.params["encoder"]["embedding"])
    np.testing.assert_array_equal(
        embedding[data_tiny.vocab[genes[0]]], flat(params)["encoder/embedding"][vocab[genes[0]]]
    )
    result = predictor.predict([genes[3]], pool_size=5)
    assert result.mean.shape == (1, data_tiny.n_genes) and np.isfinite(result.mean.X).all()


@pytest.mark.torch
def test_train_fine_tunes_from_load_model(ref, tmp_path, capsys):
    import train as train_cli
    from scformer_jax.data.dataset import load_dataset
    from scformer_jax.runs import restore_params

    genes = [str(g) for g in load_dataset("simulated:tiny").gene_names]
    model = build(
        ref,
        tmp_path / "ckpt",
        vocab=ref.make_vocab(genes[5:]),
        sizes=dict(d_model=16, nhead=2, d_hid=16, nlayers=1, nlayers_cls=3),
    )
    sd = state_dict(model)
    run = tmp_path / "run"
    code = train_cli.main(
        [
            "--config",
            TINY,
            "--workdir",
            str(run),
            "--no-progress",
            "--set",
            f"train.load_model={tmp_path / 'ckpt'}",
            "--set",
            "train.load_param_prefixes=[encoder,value_encoder,transformer_encoder]",
            "--set",
            "model.prepend_cls_token=false",
            "--set",
            "train.epochs=1",
            "--set",
            "train.max_steps=2",
            "--set",
            "train.max_val_batches=1",
            "--set",
            "optim.lr=1e-9",
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "match 35/40 genes in vocabulary" in printed and "skipped by prefix" in printed
    _, params, meta = restore_params(run, which="latest")
    got = flat(params)
    # Two Adam steps of lr 1e-9 leave the loaded weights where the checkpoint had them.
    np.testing.assert_allclose(
        got["layers_0/self_attn/in_proj/kernel"],
        sd["transformer_encoder.layers.0.self_attn.in_proj_weight"].T,
        atol=1e-6,
    )
    np.testing.assert_allclose(
        got["value_encoder/linear1/kernel"], sd["value_encoder.linear1.weight"].T, atol=1e-6
    )
    np.testing.assert_allclose(
        got["encoder/embedding"][5], sd["encoder.embedding.weight"][0], atol=1e-6
    )
    assert np.abs(got["encoder/embedding"][:5]).max() < 1e-6  # not in the checkpoint
    assert not np.allclose(got["decoder/kernel"], sd["decoder.weight"].T, atol=1e-3)
