"""Reading checkpoint folders: a PyTorch one (``best_model.pt``, ``args.json``,
``vocab.json``) or one written by :func:`scformer_jax.convert.convert_checkpoint`, into a
:class:`Source` of tensors already in our layout, with the model config they describe."""

from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from flax import traverse_util

from scformer_jax.config import CELL_EMB_STYLES, MVC_DECODER_STYLES, ConfigError, ModelConfig
from scformer_jax.convert.keys import (
    EMBED,
    LAYER_PATTERN,
    attention_layout,
    detect_architecture,
    infer_mvc_style,
    to_flax_layout,
    torch_key_to_path,
)
from scformer_jax.convert.report import ConversionError
from scformer_jax.data.dataset import CLS_TOKEN, PAD_TOKEN
from scformer_jax.runs import CHECKPOINTS_DIR, restore_params
from scformer_jax.vocab import VOCAB_FILE, VocabularyError, check_vocab

CHECKPOINT_FILE = "best_model.pt"
ARGS_FILE = "args.json"
TORCH_INSTALL_HINT = (
    "pip install torch==2.13.0 (the CPU wheel), or the project's extra: "
    "pip install 'scformer-jax[torch]'"
)


def read_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Reads a PyTorch ``state_dict`` file into float32 NumPy arrays.

    Accepts a plain state dict, or a dict holding one under ``state_dict`` /
    ``model_state_dict`` / ``model``; a ``module.`` prefix on every key (DDP) is removed.
    Non-floating tensors (counters) are kept as they are, to be reported as ignored or
    unexpected.

    Args:
      path: the ``.pt`` file.

    Returns:
      key -> array in PyTorch's orientation.

    Raises:
      ImportError: torch is not installed (names the install command).
      ConversionError: the file is not a state dict.
    """
    try:
        import torch
    except ImportError as e:
        raise ImportError(
            f"Reading a PyTorch checkpoint ({path}) needs torch: {TORCH_INSTALL_HINT}."
        ) from e
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file gets the same advice
        raise ConversionError(
            f"Cannot read {path} as a PyTorch state_dict ({type(e).__name__}: {e}). Save the "
            "weights with torch.save(model.state_dict(), 'best_model.pt'), not the pickled "
            "model object."
        ) from e
    if isinstance(obj, Mapping) and not all(isinstance(v, torch.Tensor) for v in obj.values()):
        for key in ("state_dict", "model_state_dict", "model"):
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if (
        not isinstance(obj, Mapping)
        or not obj
        or not all(isinstance(v, torch.Tensor) for v in obj.values())
    ):
        raise ConversionError(
            f"{path} does not hold a state_dict (a mapping of parameter names to tensors); "
            "save it with torch.save(model.state_dict(), 'best_model.pt')."
        )
    keys = list(obj)
    if all(k.startswith("module.") for k in keys):
        obj = {k[len("module.") :]: v for k, v in obj.items()}
    out = {}
    for key, tensor in obj.items():
        tensor = tensor.detach().cpu()
        out[key] = (tensor.float().numpy() if tensor.is_floating_point() else tensor.numpy()).copy()
    return out


def _read_vocab(vocab: Any, path: Path) -> dict[str, int]:
    try:
        return check_vocab(vocab, path)
    except VocabularyError as e:
        raise ConversionError(str(e)) from None


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConversionError(f"Cannot read {path} ({what}): {e}") from e


@dataclasses.dataclass
class Entry:
    """One source tensor: its key, where it goes in our tree, and the value in our layout."""

    key: str
    path: tuple[str, ...] | None
    kind: str | None
    value: np.ndarray
    source_shape: tuple[int, ...] = ()


@dataclasses.dataclass
class Source:
    folder: Path
    entries: list[Entry]
    vocab: dict[str, int]
    args: dict[str, Any]
    model_config: ModelConfig
    attention_layout: str | None
    notes: list[str]


def model_config_from_args(
    args: Mapping[str, Any],
    vocab: Mapping[str, int],
    state_dict: Mapping[str, np.ndarray],
    base: ModelConfig | None = None,
) -> tuple[ModelConfig, list[str]]:
    """Our model config for a checkpoint, from its ``args.json`` (scGPT's key names).

    Sizes absent from ``args.json`` are read off the tensors; other absent keys take the
    original's defaults. Options the checkpoint does not determine (attention kernel, dtype,
    remat, max_value, block size) come from `base`.

    Args:
      args: the parsed ``args.json``.
      vocab: the parsed ``vocab.json``.
      state_dict: key -> array (PyTorch names and layout).
      base: our config to start from (default: :class:`ModelConfig`'s defaults).

    Returns:
      (model config in the checkpoint's vocabulary, notes for the report).

    Raises:
      ConversionError: a size that is neither in ``args.json`` nor readable from the tensors,
        an unknown style, or a ``pad_token`` that is not in the vocabulary.
    """
    base = base or ModelConfig()
    notes: list[str] = []
    embedding = state_dict.get("encoder.embedding.weight")

    def size(names: Sequence[str], inferred, what: str) -> int:
        for name in names:
            if args.get(name) is not None:
                return int(args[name])
        if inferred is None:
            raise ConversionError(
                f"args.json lacks {names[0]!r} ({what}) and the state_dict does not show it; "
                f'add "{names[0]}": N to args.json.'
            )
        notes.append(f"args.json has no {names[0]!r}; read {inferred} off the tensors.")
        return int(inferred)

    layer_ids = {int(m[1]) for k in state_dict if (m := re.match(LAYER_PATTERN + r"\.", k))}
    linear1 = state_dict.get("transformer_encoder.layers.0.linear1.weight")
    cls_linears = [
        int(m[1])
        for k in state_dict
        if (m := re.fullmatch(r"cls_decoder\._decoder\.(\d+)\.weight", k)) and int(m[1]) % 3 == 0
    ]
    embsize = size(
        ("embsize", "d_model"),
        None if embedding is None else embedding.shape[1],
        "the embedding size",
    )
    nhead = size(("nheads", "nhead"), None, "the number of attention heads")
    d_hid = size(
        ("d_hid",), None if linear1 is None else linear1.shape[0], "the feed-forward width"
    )
    nlayers = size(
        ("nlayers",), max(layer_ids) + 1 if layer_ids else None, "the number of transformer layers"
    )
    nlayers_cls = size(
        ("n_layers_cls", "nlayers_cls"),
        len(cls_linears) + 1 if cls_linears else 3,
        "the classification decoder's layers",
    )
    out_layer = state_dict.get("cls_decoder.out_layer.weight")
    n_cls = int(out_layer.shape[0]) if out_layer is not None else int(args.get("n_cls", 1))

    cell_emb_style = str(args.get("cell_emb_style", "cls"))
    if cell_emb_style not in CELL_EMB_STYLES:
        raise ConversionError(
            f"args.json cell_emb_style {cell_emb_style!r} is not one of {list(CELL_EMB_STYLES)}."
        )
    mvc_style = (
        args.get("mvc_decoder_style") or infer_mvc_style(state_dict, embsize) or "inner product"
    )
    if mvc_style not in MVC_DECODER_STYLES:
        raise ConversionError(
            f"args.json mvc_decoder_style {mvc_style!r} is not one of {list(MVC_DECODER_STYLES)}."
        )
    pad_token = str(args.get("pad_token", PAD_TOKEN))
    if pad_token not in vocab:
        raise ConversionError(
            f"args.json pad_token {pad_token!r} is not in vocab.json; use "
            "the vocab.json saved with this checkpoint."
        )
    pad_token_id = vocab[pad_token]
    cls_token_id = vocab.get(CLS_TOKEN, pad_token_id)
    prepend_cls_token = base.prepend_cls_token
    if cell_emb_style == "cls":
        prepend_cls_token = False
        notes.append(
            "cell_emb_style 'cls': prepend_cls_token is false, as in the original "
            "(the cell embedding is the first gene's output, since the perturbation "
            "input has no <cls> token)."
        )
    pert_pad_id = args.get("pert_pad_id", 2)
    if pert_pad_id != 2:
        notes.append(
            f"The checkpoint used pert_pad_id {pert_pad_id}; scformer-jax pads the "
            "flag channel with 2. Flags 0 and 1 keep their pert_encoder rows."
        )
    arch = _architecture(args, state_dict, notes)
    if args.get("input_emb_style", "continuous") != "continuous":
        notes.append(
            f"input_emb_style {args['input_emb_style']!r}: its value_encoder has "
            "another form than our continuous value encoder and does not load."
        )
    if args.get("input_style") == "binned":
        notes.append(
            "The checkpoint was trained on binned expression (input_style 'binned'); "
            "scformer-jax feeds log-normalised values, so fine-tune before use."
        )
    fields = dict(
        embsize=embsize,
        nhead=nhead,
        d_hid=d_hid,
        nlayers=nlayers,
        nlayers_cls=nlayers_cls,
        n_cls=n_cls,
        dropout=float(args.get("dropout", base.dropout)),
        pad_value=float(args.get("pad_value", 0.0)),
        pert_pad_id=2,
        cell_emb_style=cell_emb_style,
        prepend_cls_token=prepend_cls_token,
        mvc_decoder_style=mvc_style,
        ntoken=max(vocab.values()) + 1,
        pad_token_id=pad_token_id,
        cls_token_id=cls_token_id,
        **arch,
    )
    try:
        return dataclasses.replace(base, **fields), notes
    except ConfigError as e:
        raise ConversionError(f"args.json gives a model scformer-jax cannot build: {e}") from e


def _architecture(
    args: Mapping[str, Any], state_dict: Mapping[str, np.ndarray], notes: list[str]
) -> dict[str, Any]:
    """The model options of scGPT's variants: the decoder, BatchNorm and zero-probability
    heads from the state dict's keys; pre-norm and the affine decoder's options from
    ``args.json`` (the tensors do not show them)."""
    arch = detect_architecture(state_dict)
    if arch["expr_decoder"] == "affine":
        notes.append(
            "scGPT's perturbation model since January 2024 (AffineExprDecoder: prediction = "
            "coefficient * control value + bias)."
        )
    elif arch["expr_decoder"] == "mlp":
        notes.append(
            "scGPT's perturbation model up to January 2024 (MLP ExprDecoder"
            + (", BatchNorm over the embedding sum)." if arch["input_batchnorm"] else ").")
        )
    if (
        bool(args.get("explicit_zero_prob", arch["explicit_zero_prob"]))
        != arch["explicit_zero_prob"]
    ):
        notes.append(
            f"args.json says explicit_zero_prob {args['explicit_zero_prob']!r} but the "
            f"tensors {'hold' if arch['explicit_zero_prob'] else 'lack'} zero-probability "
            "heads; the tensors decide."
        )
    if arch["explicit_zero_prob"]:
        # scGPT's forward samples whenever the model is in eval mode.
        arch["sample_zero_prob"] = True
        notes.append(
            "explicit_zero_prob: eval and predict sample the prediction from the zero "
            "probabilities as scGPT's pred_perturb does (model.sample_zero_prob: true; false "
            "gives the decoder's value)."
        )
    if arch["expr_decoder"] == "affine":
        arch["decoder_activation"] = args.get("decoder_activation")
        arch["decoder_adaptive_bias"] = bool(args.get("decoder_adaptive_bias", False))
        if "decoder_activation" not in args or "decoder_adaptive_bias" not in args:
            notes.append(
                "args.json does not record decoder_activation / decoder_adaptive_bias; "
                "taken as scGPT's defaults (none, false) where absent."
            )
    pre_norm = bool(args.get("pre_norm", False))
    if pre_norm and attention_layout(state_dict) == "torch":
        # scGPT passes pre_norm only to its flash layer; nn.TransformerEncoderLayer is post-LN.
        notes.append(
            "args.json has pre_norm: true, but the layers are nn.TransformerEncoderLayer "
            "(post-LayerNorm in scGPT whatever pre_norm says); loaded as post-LayerNorm."
        )
        pre_norm = False
    arch["pre_norm"] = pre_norm
    return arch


def _read_torch_folder(folder: Path, base: ModelConfig | None) -> Source:
    missing = [n for n in (CHECKPOINT_FILE, ARGS_FILE, VOCAB_FILE) if not (folder / n).is_file()]
    if missing:
        raise ConversionError(
            f"{folder} lacks {', '.join(missing)}: a PyTorch checkpoint folder needs "
            f"{CHECKPOINT_FILE} (the state_dict), {ARGS_FILE} and {VOCAB_FILE} as scGPT saves "
            "them (or give a folder written by python -m scformer_jax.convert)."
        )
    args = _read_json(folder / ARGS_FILE, "the model's settings")
    if not isinstance(args, Mapping):
        raise ConversionError(f"{folder / ARGS_FILE} must be a JSON object.")
    vocab = _read_vocab(_read_json(folder / VOCAB_FILE, "the gene vocabulary"), folder / VOCAB_FILE)
    state_dict = read_state_dict(folder / CHECKPOINT_FILE)
    embedding = state_dict.get("encoder.embedding.weight")
    if embedding is not None and max(vocab.values()) >= embedding.shape[0]:
        raise ConversionError(
            f"vocab.json has ids up to {max(vocab.values())} but encoder.embedding.weight has "
            f"{embedding.shape[0]} rows; use the vocab.json saved with this checkpoint."
        )
    layout = attention_layout(state_dict)
    model_config, notes = model_config_from_args(args, vocab, state_dict, base)
    if embedding is not None:
        model_config = dataclasses.replace(model_config, ntoken=int(embedding.shape[0]))
    entries = []
    for key, value in state_dict.items():
        target = torch_key_to_path(key) if value.dtype.kind == "f" else None
        shape = tuple(int(s) for s in value.shape)
        if target is None:
            entries.append(Entry(key, None, None, value, shape))
        else:
            path, kind = target
            entries.append(Entry(key, path, kind, to_flax_layout(value, kind, path), shape))
    return Source(folder, entries, vocab, dict(args), model_config, layout, notes)


def _read_converted_folder(folder: Path) -> Source:
    if not (folder / VOCAB_FILE).is_file():
        raise ConversionError(
            f"{folder} has no {VOCAB_FILE}, so it is not a converted checkpoint: give a "
            "PyTorch checkpoint folder or one written by python -m scformer_jax.convert (to "
            "continue a scformer-jax run, pass its folder as --workdir instead)."
        )
    model_config, params, meta = restore_params(folder)
    source_keys = meta.get("source_keys")
    if not isinstance(source_keys, Mapping):
        raise ConversionError(
            f"{folder} is a training run, not a converted checkpoint; "
            "point train.load_model at a PyTorch checkpoint folder or a "
            "folder written by python -m scformer_jax.convert."
        )
    vocab = _read_vocab(_read_json(folder / VOCAB_FILE, "the gene vocabulary"), folder / VOCAB_FILE)
    flat = traverse_util.flatten_dict(params)
    entries = []
    # Only what came from PyTorch counts as pretrained; the rest of the folder's tree is
    # the conversion's initialisation.
    for path_text, key in source_keys.items():
        path = tuple(path_text.split("/"))
        kind = EMBED if path == ("encoder", "embedding") else "converted"
        value = np.asarray(flat[path])
        entries.append(Entry(str(key), path, kind, value, tuple(value.shape)))
    return Source(
        folder,
        entries,
        vocab,
        dict(meta.get("args") or {}),
        model_config,
        "converted",
        list(meta.get("notes") or []),
    )


def read_source(path: str | os.PathLike, base: ModelConfig | None = None) -> Source:
    """Reads a PyTorch checkpoint folder or a folder written by :func:`convert_checkpoint`."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise ConversionError(
            f"Checkpoint folder {str(folder)!r} does not exist (expected "
            f"{CHECKPOINT_FILE}, {ARGS_FILE} and {VOCAB_FILE} in it)."
        )
    if (folder / CHECKPOINTS_DIR).is_dir() and not (folder / CHECKPOINT_FILE).is_file():
        return _read_converted_folder(folder)
    return _read_torch_folder(folder, base)
