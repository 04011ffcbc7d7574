"""The PyTorch reference of the original model (tests/torch_reference.py) and its benchmark.

Expected values come from a NumPy forward pass written here from the state dict alone, so
the reference (and its flash-layout attention in particular) is checked independently.
"""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from scformer_jax.data.dataset import SPECIAL_TOKENS  # noqa: E402
from tests import torch_reference as ref  # noqa: E402

pytestmark = pytest.mark.torch

REPO_ROOT = Path(__file__).resolve().parent.parent
TINY = dict(n_genes=12, d_model=16, nhead=4, d_hid=24, nlayers=2, nlayers_cls=3, dropout=0.1)


def tiny_model(layout="torch", **overrides):
    kwargs = dict(TINY, attention_layout=layout, randomize_all=True, seed=3)
    kwargs.update(overrides)
    return ref.build_reference_model(**kwargs)


def make_batch(model, batch=3, length=7, n_pad=(0, 2, 4), seed=0):
    """Random real tokens; the last n_pad[row] positions of each row are padding."""
    rng = np.random.default_rng(seed)
    n_genes = len(model.vocab) - len(ref.SPECIAL_TOKENS)
    gene_ids = rng.integers(0, n_genes, size=(batch, length))
    values = rng.uniform(0.0, 3.0, size=(batch, length)).astype(np.float32)
    flags = np.zeros((batch, length), dtype=np.int64)
    flags[:, 1] = 1
    padding = np.zeros((batch, length), dtype=bool)
    for row, n in enumerate(n_pad):
        if n:
            padding[row, -n:] = True
    gene_ids[padding] = model.pad_token_id
    values[padding] = model.pad_value
    flags[padding] = model.pert_pad_id
    return gene_ids, values, flags, padding


# ----- NumPy forward pass, from the state dict ---------------------------------------------


def np_layer_norm(x, sd, prefix, eps=1e-5):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * sd[prefix + ".weight"] + sd[prefix + ".bias"]


def np_linear(x, sd, prefix):
    y = x @ sd[prefix + ".weight"].T
    return y + sd[prefix + ".bias"] if prefix + ".bias" in sd else y


def np_attention(x, weight, bias, sd, prefix, n_heads, padding, zero_padded_queries):
    batch, length, d = x.shape
    head = d // n_heads
    qkv = x @ weight.T + bias  # (B, L, 3d): [q | k | v]
    q, k, v = (
        qkv[..., i * d : (i + 1) * d].reshape(batch, length, n_heads, head) for i in range(3)
    )
    scores = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(head)
    scores = np.where(padding[:, None, None, :], -np.inf, scores)
    scores = scores - scores.max(-1, keepdims=True)
    probs = np.exp(scores)
    probs /= probs.sum(-1, keepdims=True)
    context = np.einsum("bhqk,bkhd->bqhd", probs, v).reshape(batch, length, d)
    if zero_padded_queries:  # flash_attn computes real tokens only and pads back with zeros
        context = np.where(padding[..., None], 0.0, context)
    return np_linear(context, sd, prefix + ".out_proj")


def np_forward(model, gene_ids, values, flags, padding):
    sd = {k: v.double().numpy() for k, v in model.state_dict().items()}
    n_heads = model.config["nhead"]
    gene_embs = np_layer_norm(sd["encoder.embedding.weight"][gene_ids], sd, "encoder.enc_norm")
    v = np.minimum(values.astype(np.float64), 512)[..., None]
    v = np.maximum(np_linear(v, sd, "value_encoder.linear1"), 0)
    v = np_layer_norm(np_linear(v, sd, "value_encoder.linear2"), sd, "value_encoder.norm")
    h = gene_embs + v + sd["pert_encoder.weight"][flags]
    for i in range(model.config["nlayers"]):
        p = f"transformer_encoder.layers.{i}"
        flash = f"{p}.self_attn.Wqkv.weight" in sd
        if flash:
            w, b = sd[f"{p}.self_attn.Wqkv.weight"], sd[f"{p}.self_attn.Wqkv.bias"]
        else:
            w, b = sd[f"{p}.self_attn.in_proj_weight"], sd[f"{p}.self_attn.in_proj_bias"]
        attn = np_attention(h, w, b, sd, f"{p}.self_attn", n_heads, padding, flash)
        h = np_layer_norm(h + attn, sd, f"{p}.norm1")
        ff = np_linear(np.maximum(np_linear(h, sd, f"{p}.linear1"), 0), sd, f"{p}.linear2")
        h = np_layer_norm(h + ff, sd, f"{p}.norm2")
    out = {
        "mlm_output": np_linear(h, sd, "decoder")[..., 0],
        "cell_emb": h[:, 0],
        "transformer_output": h,
    }
    if "mvc_decoder.W.weight" in sd:
        query = 1 / (1 + np.exp(-np_linear(gene_embs, sd, "mvc_decoder.gene2query")))
        out["mvc_output"] = np.einsum(
            "bld,bd->bl", query @ sd["mvc_decoder.W.weight"].T, out["cell_emb"]
        )
    return out


# ----- state dict keys ---------------------------------------------------------------------


def expected_keys(layout, nlayers=2, nlayers_cls=3):
    keys = [
        "encoder.embedding.weight",
        "encoder.enc_norm.weight",
        "encoder.enc_norm.bias",
        "pert_encoder.weight",
        "decoder.weight",
        "decoder.bias",
        "cls_decoder.out_layer.weight",
        "cls_decoder.out_layer.bias",
        "mvc_decoder.gene2query.weight",
        "mvc_decoder.gene2query.bias",
        "mvc_decoder.W.weight",
    ]
    keys += [
        f"value_encoder.{m}.{p}" for m in ("linear1", "linear2", "norm") for p in ("weight", "bias")
    ]
    qkv = (
        ["self_attn.in_proj_weight", "self_attn.in_proj_bias"]
        if layout == "torch"
        else ["self_attn.Wqkv.weight", "self_attn.Wqkv.bias"]
    )
    per_layer = qkv + [
        f"{m}.{p}"
        for m in ("self_attn.out_proj", "linear1", "linear2", "norm1", "norm2")
        for p in ("weight", "bias")
    ]
    keys += [f"transformer_encoder.layers.{i}.{k}" for i in range(nlayers) for k in per_layer]
    # ClsDecoder blocks are (Linear, ReLU, LayerNorm): parameters at indices 0, 2, 3, 5, ...
    for block in range(nlayers_cls - 1):
        for index in (3 * block, 3 * block + 2):
            keys += [f"cls_decoder._decoder.{index}.weight", f"cls_decoder._decoder.{index}.bias"]
    return set(keys)


def test_special_tokens_are_the_packages():
    # The oracle keeps its own copy of the original's tokens; ours must be the same.
    assert ref.SPECIAL_TOKENS == SPECIAL_TOKENS
    assert list(ref.make_vocab(["A", "B"]))[-3:] == list(SPECIAL_TOKENS)


@pytest.mark.parametrize("layout", ["torch", "flash"])
def test_state_dict_keys_match_the_original(layout):
    model = tiny_model(layout, do_mvc=True)
    state = model.state_dict()
    assert set(state) == expected_keys(layout)
    d = TINY["d_model"]
    qkv = "in_proj_weight" if layout == "torch" else "Wqkv.weight"
    assert tuple(state[f"transformer_encoder.layers.1.self_attn.{qkv}"].shape) == (3 * d, d)
    assert tuple(state["transformer_encoder.layers.0.linear1.weight"].shape) == (24, d)
    assert tuple(state["encoder.embedding.weight"].shape) == (TINY["n_genes"] + 3, d)
    assert tuple(state["pert_encoder.weight"].shape) == (3, d)


@pytest.mark.parametrize(
    "style, extra",
    [
        ("inner product", {"gene2query.weight": (16, 16), "W.weight": (16, 16)}),
        ("inner product, detach", {"gene2query.weight": (16, 16), "W.weight": (16, 16)}),
        (
            "concat query",
            {
                "gene2query.weight": (64, 16),
                "fc1.weight": (64, 80),
                "fc2.weight": (1, 64),
                "hidden_activation.weight": (1,),
            },
        ),
        (
            "sum query",
            {
                "gene2query.weight": (16, 16),
                "fc1.weight": (64, 16),
                "fc2.weight": (1, 64),
                "hidden_activation.weight": (1,),
            },
        ),
    ],
)
def test_mvc_styles_have_the_original_parameters(style, extra):
    model = tiny_model(do_mvc=True, mvc_decoder_style=style)
    mvc = {
        k[len("mvc_decoder.") :]: tuple(v.shape)
        for k, v in model.state_dict().items()
        if k.startswith("mvc_decoder.")
    }
    assert {k: mvc[k] for k in extra} == extra
    out = ref.reference_forward(model, *make_batch(model))
    assert out["mvc_output"].shape == (3, 7) and np.all(np.isfinite(out["mvc_output"]))


# ----- outputs -----------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["torch", "flash"])
@pytest.mark.parametrize("fastpath", [True, False])
def test_forward_matches_numpy(layout, fastpath):
    model = tiny_model(layout, do_mvc=True)
    gene_ids, values, flags, padding = make_batch(model)
    got = ref.reference_forward(model, gene_ids, values, flags, padding, fastpath=fastpath)
    want = np_forward(model, gene_ids, values, flags, padding)
    real = ~padding
    for name in ("mlm_output", "mvc_output", "transformer_output"):
        np.testing.assert_allclose(got[name][real], want[name][real], atol=2e-5, rtol=1e-5)
    np.testing.assert_allclose(got["cell_emb"], want["cell_emb"], atol=2e-5, rtol=1e-5)
    # Padding positions: torch's eval fast path drops them (zeros out); otherwise they are
    # computed like any token, the flash layout with a zero attention context.
    if layout == "torch" and fastpath:
        assert np.all(got["transformer_output"][padding] == 0)
    else:
        np.testing.assert_allclose(
            got["transformer_output"][padding],
            want["transformer_output"][padding],
            atol=2e-5,
            rtol=1e-5,
        )


def test_flash_layout_equals_torch_layout_after_conversion():
    torch_model = tiny_model("torch", do_mvc=True)
    flash_model = tiny_model("flash", do_mvc=True, seed=99)
    flash_model.load_state_dict(ref.convert_attention_layout(torch_model.state_dict(), "flash"))
    batch = make_batch(torch_model, seed=5)
    padding = batch[3]
    a = ref.reference_forward(torch_model, *batch)
    b = ref.reference_forward(flash_model, *batch)
    for name in ("mlm_output", "mvc_output"):
        np.testing.assert_allclose(a[name][~padding], b[name][~padding], atol=1e-5)
    np.testing.assert_allclose(a["cell_emb"], b["cell_emb"], atol=1e-5)

    back = ref.convert_attention_layout(flash_model.state_dict(), "torch")
    original = torch_model.state_dict()
    assert set(back) == set(original)
    assert all(torch.equal(back[k], original[k]) for k in original)
    assert ref.detect_attention_layout(original) == "torch"
    assert ref.detect_attention_layout(flash_model.state_dict()) == "flash"


@pytest.mark.parametrize("layout", ["torch", "flash"])
def test_padding_does_not_change_real_positions(layout):
    model = tiny_model(layout, do_mvc=True)
    gene_ids, values, flags, padding = make_batch(model, n_pad=(0, 0, 0), length=5, seed=2)
    short = ref.reference_forward(model, gene_ids, values, flags, padding)
    rng = np.random.default_rng(7)
    extra = 4
    # Garbage (real gene ids, values, flags) in the padded slots: only the mask hides them.
    long_ids = np.concatenate([gene_ids, rng.integers(0, 12, (3, extra))], axis=1)
    long_values = np.concatenate([values, rng.uniform(0, 3, (3, extra))], axis=1)
    long_flags = np.concatenate([flags, rng.integers(0, 2, (3, extra))], axis=1)
    long_padding = np.concatenate([padding, np.ones((3, extra), bool)], axis=1)
    long = ref.reference_forward(model, long_ids, long_values, long_flags, long_padding)
    for name in ("mlm_output", "mvc_output"):
        np.testing.assert_allclose(long[name][:, :5], short[name], atol=1e-5)
    np.testing.assert_allclose(long["cell_emb"], short["cell_emb"], atol=1e-5)
    # Without the mask the garbage does leak in: the test can tell.
    leaked = ref.reference_forward(
        model, long_ids, long_values, long_flags, np.zeros_like(long_padding)
    )
    assert np.abs(leaked["mlm_output"][:, :5] - short["mlm_output"]).max() > 1e-3


def test_cell_embedding_styles_as_the_original():
    base = tiny_model("torch")
    batch = make_batch(base, seed=4)
    gene_ids, values, flags, padding = batch
    for style in ("avg-pool", "w-pool"):
        model = tiny_model("torch", cell_emb_style=style)
        out = ref.reference_forward(model, *batch)
        h = out["transformer_output"].astype(np.float64)
        if style == "avg-pool":
            # The eval fast path zeroes padding rows, and the mean still counts them.
            assert np.all(h[padding] == 0)
            want = h.sum(1) / h.shape[1]
        else:
            pooled = (h * values[..., None]).sum(1)
            want = pooled / np.linalg.norm(pooled, axis=1, keepdims=True)
        np.testing.assert_allclose(out["cell_emb"], want, atol=1e-5)
    with pytest.raises(ValueError, match="weights is required"):
        model.train()(*(torch.as_tensor(x) for x in (gene_ids, values, flags, padding)), CCE=True)


def test_ecs_and_cce_losses_as_the_original():
    model = tiny_model("torch", ecs_threshold=0.3)
    gene_ids, values, flags, padding = make_batch(model, seed=6)
    with torch.no_grad():
        out = model.eval()(
            torch.as_tensor(gene_ids),
            torch.as_tensor(values),
            torch.as_tensor(flags),
            torch.as_tensor(padding),
            CLS=True,
            CCE=True,
            ECS=True,
        )
    cell = out["cell_emb"].double().numpy()
    normed = cell / np.linalg.norm(cell, axis=1, keepdims=True)
    cos = normed @ normed.T
    np.fill_diagonal(cos, 0.0)
    ecs = np.mean(1 - (np.maximum(cos, 0) - 0.3) ** 2)
    np.testing.assert_allclose(float(out["loss_ecs"]), ecs, rtol=1e-5)
    # In eval mode both encodings agree, so CCE is cross-entropy of cos/0.5 with labels i.
    logits = (normed @ normed.T) / 0.5
    log_softmax = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    np.testing.assert_allclose(float(out["loss_cce"]), -np.mean(np.diag(log_softmax)), rtol=1e-5)
    assert tuple(out["cls_output"].shape) == (3, 1)


# ----- checkpoint folder -------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["torch", "flash"])
def test_checkpoint_folder_round_trip(tmp_path, layout):
    model = tiny_model(layout, do_mvc=True, mvc_decoder_style="sum query", n_cls=4)
    folder = ref.save_reference_checkpoint(model, tmp_path / "ckpt", extra_args={"lr": 1e-4})
    assert sorted(p.name for p in folder.iterdir()) == ["args.json", "best_model.pt", "vocab.json"]
    args = json.loads((folder / "args.json").read_text())
    assert {
        k: args[k]
        for k in (
            "embsize",
            "nheads",
            "d_hid",
            "nlayers",
            "n_layers_cls",
            "dropout",
            "pad_token",
            "pad_value",
            "lr",
        )
    } == {
        "embsize": 16,
        "nheads": 4,
        "d_hid": 24,
        "nlayers": 2,
        "n_layers_cls": 3,
        "dropout": 0.1,
        "pad_token": "<pad>",
        "pad_value": 0,
        "lr": 1e-4,
    }
    assert args["fast_transformer"] is (layout == "flash")
    vocab = json.loads((folder / "vocab.json").read_text())
    assert vocab["GENE0000"] == 0
    assert [vocab[t] for t in ("<pad>", "<cls>", "<eoc>")] == [12, 13, 14]
    state = torch.load(folder / "best_model.pt", weights_only=True)
    assert set(state) == set(model.state_dict())

    loaded = ref.load_reference_checkpoint(folder)
    assert loaded.attention_layout == layout
    assert loaded.config["mvc_decoder_style"] == "sum query" and loaded.config["n_cls"] == 4
    batch = make_batch(model)
    a, b = ref.reference_forward(model, *batch), ref.reference_forward(loaded, *batch)
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_loading_an_incomplete_folder_names_what_is_missing(tmp_path):
    ref.save_reference_checkpoint(tiny_model(), tmp_path)
    (tmp_path / "vocab.json").unlink()
    with pytest.raises(FileNotFoundError, match="vocab.json"):
        ref.load_reference_checkpoint(tmp_path)


def test_reference_forward_rejects_bad_inputs():
    model = tiny_model()
    gene_ids, values, flags, padding = make_batch(model)
    with pytest.raises(ValueError, match="share one"):
        ref.reference_forward(model, gene_ids[:, :-1], values, flags, padding)
    bad = values.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        ref.reference_forward(model, gene_ids, bad, flags, padding)
    with pytest.raises(ValueError, match="pert_flags"):
        ref.reference_forward(model, gene_ids, values, flags + 5, padding)


# ----- benchmark script --------------------------------------------------------------------


def run_bench(*args):
    return subprocess.run(
        [sys.executable, str(REPO_ROOT / "bench" / "torch_bench.py"), *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO_ROOT,
    )


def test_bench_prints_one_json_record():
    done = run_bench(
        "--seq-len",
        "16",
        "--batch",
        "2",
        "--steps",
        "2",
        "--warmup",
        "0",
        "--mode",
        "train",
        "--nlayers",
        "1",
        "--threads",
        "1",
        "--n-genes",
        "32",
        "--json",
    )
    assert done.returncode == 0, done.stderr
    record = json.loads(done.stdout.strip().splitlines()[-1])
    assert {
        "seq_len",
        "batch",
        "mode",
        "sec_per_step",
        "cells_per_s",
        "peak_rss_gb",
        "torch_version",
        "threads",
    } <= set(record)
    assert (record["seq_len"], record["batch"], record["mode"], record["threads"]) == (
        16,
        2,
        "train",
        1,
    )
    assert record["cells_per_s"] == pytest.approx(2 / record["sec_per_step"])
    assert len(record["step_times_s"]) == 2 and record["peak_rss_gb"] > 0


def test_bench_reports_out_of_memory():
    # Training materialises attention probabilities: 8 * 4 * 2048^2 * 4 bytes = 512 MiB.
    done = run_bench(
        "--seq-len",
        "2048",
        "--batch",
        "8",
        "--steps",
        "1",
        "--warmup",
        "0",
        "--mode",
        "train",
        "--mem-limit-gb",
        "0.2",
        "--json",
    )
    assert done.returncode == 3, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1])["error"] == "out of memory"
    assert "out of memory" in done.stderr
