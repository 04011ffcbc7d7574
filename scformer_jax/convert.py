"""Import PyTorch scGPT / scFormer checkpoints into scformer-jax.

A PyTorch checkpoint folder (``TORCH_DIR``) holds, as scGPT writes it:

* ``best_model.pt``: the model's ``state_dict`` (``torch.save(model.state_dict(), ...)``);
* ``args.json``: the run's settings (scGPT's names: ``embsize``, ``nheads``, ``d_hid``,
  ``nlayers``, ``n_layers_cls``, ``dropout``, ``pad_token``, ``pad_value``, and optionally
  ``pert_pad_id``, ``cell_emb_style``, ``mvc_decoder_style``, ``pre_norm``, ...);
* ``vocab.json``: token name -> row of the gene embedding (genes and ``<pad>``, ``<cls>``,
  ``<eoc>``).

Three ways in:

* ``python -m scformer_jax.convert TORCH_DIR OUT_DIR`` (or :func:`convert_checkpoint`) writes
  a folder that ``eval.py --workdir OUT_DIR``, :func:`scformer_jax.predict.load_predictor`
  and ``train.py`` (``train.load_model: OUT_DIR``) accept: ``config.yaml``, an orbax
  checkpoint under ``checkpoints/``, the checkpoint's ``vocab.json`` and
  ``conversion_report.json``.
* ``train.load_model: TORCH_DIR`` (or ``OUT_DIR``) with ``train.load_param_prefixes``
  fine-tunes from it (:func:`load_pretrained_params`), as scGPT's perturbation tutorial does
  with ``["encoder", "value_encoder", "transformer_encoder"]``.
* :func:`convert_params` returns ``(model_config, params, report)`` in memory (notebooks).

Every mapping returns a :class:`ConversionReport`: what was loaded, skipped by prefix,
missing from the checkpoint (left at initialisation), unexpected (no place in our model) and
shape-mismatched (reported and left at initialisation, never a crash).

Parameter mapping (PyTorch ``nn.Linear`` weight is ``(out, in)``; Flax ``Dense`` kernel is
``(in, out)``, so kernels are transposed; LayerNorm weight/bias are scale/bias): the gene
embedding and its norm (``encoder.embedding``, ``encoder.enc_norm``), the value encoder, the
perturbation-flag embedding, every transformer layer in both layouts found in these
checkpoints (``self_attn.in_proj_weight/bias`` of ``nn.MultiheadAttention``, and the fused
``self_attn.Wqkv`` of scGPT's flash-attention layer; both store the rows as q, k, v with the
heads contiguous, as our ``in_proj`` does), the feed-forward and norms, the expression
decoder, the classification decoder (``cls_decoder._decoder.{3i}`` Linear and ``{3i+2}``
LayerNorm) and the MVC decoder.

Gene vocabulary: with a dataset, the gene embedding is re-ordered into the dataset's token
order by gene name ("match 4399/5060 genes in vocabulary"). A dataset gene that is not in
the checkpoint's vocabulary keeps its own token, and its embedding row starts at zero, the
vector our model embeds ``<pad>`` to. scGPT instead gives such genes the ``<pad>`` id; with a
token of their own their perturbation flag and expression still reach the model as a
distinct gene, and fine-tuning can learn an embedding for them (the ``<pad>`` row never
trains).

Converted configs reproduce the original: with ``cell_emb_style: cls`` they set
``prepend_cls_token: false`` (the original input has no ``<cls>`` token; the cell embedding
is the first gene's output). One deliberate difference remains: our ``avg-pool`` ignores
padding positions while the original averaged over them too, so that cell embedding equals
the original's on unpadded input only (``w-pool`` agrees when ``pad_value`` is 0).

``torch`` is an optional extra used only by :func:`read_state_dict`; nothing else imports it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import shutil
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from flax import traverse_util

from scformer_jax.config import (
    CELL_EMB_STYLES,
    MVC_DECODER_STYLES,
    Config,
    ConfigError,
    ModelConfig,
    apply_overrides,
    config_from_dict,
    config_to_dict,
    load_config,
)
from scformer_jax.io import write_text_atomic

CHECKPOINT_FILE = "best_model.pt"
ARGS_FILE = "args.json"
VOCAB_FILE = "vocab.json"
CONFIG_FILE = "config.yaml"
REPORT_FILE = "conversion_report.json"
CHECKPOINTS_DIR = "checkpoints"
SPECIAL_TOKENS = ("<pad>", "<cls>", "<eoc>")
# scGPT's perturbation tutorial loads these three groups from the pretrained model.
SCGPT_PREFIXES = ("encoder", "value_encoder", "transformer_encoder")
TORCH_INSTALL_HINT = ("pip install torch==2.13.0 (the CPU wheel), or the project's extra: "
                      "pip install 'scformer-jax[torch]'")

# How the tensors of one PyTorch module become Flax parameters.
_LINEAR, _NORM, _EMBED, _PRELU = "linear", "norm", "embedding", "prelu"
_PARAM_NAMES = {
    _LINEAR: {"weight": "kernel", "bias": "bias"},
    _NORM: {"weight": "scale", "bias": "bias"},
    _EMBED: {"weight": "embedding"},
    _PRELU: {"weight": "negative_slope"},
}
_LAYER = r"transformer_encoder\.layers\.(\d+)"
# (PyTorch module path regex, function of the match -> (Flax module path, kind)).
_MODULE_RULES = [
    (r"encoder\.embedding", lambda m: (("encoder",), _EMBED)),
    (r"encoder\.enc_norm", lambda m: (("encoder_norm",), _NORM)),
    (r"value_encoder\.(linear1|linear2)", lambda m: (("value_encoder", m[1]), _LINEAR)),
    (r"value_encoder\.norm", lambda m: (("value_encoder", "norm"), _NORM)),
    (r"pert_encoder", lambda m: (("pert_encoder",), _EMBED)),
    (_LAYER + r"\.self_attn\.(in_proj|out_proj)",
     lambda m: ((f"layers_{m[1]}", "self_attn", m[2]), _LINEAR)),
    (_LAYER + r"\.(linear1|linear2)", lambda m: ((f"layers_{m[1]}", m[2]), _LINEAR)),
    (_LAYER + r"\.(norm1|norm2)", lambda m: ((f"layers_{m[1]}", m[2]), _NORM)),
    (r"decoder", lambda m: (("decoder",), _LINEAR)),
    # ClsDecoder's ModuleList repeats (Linear, ReLU, LayerNorm): index 3i is dense_i,
    # 3i + 2 is norm_i (ReLU has no parameters).
    (r"cls_decoder\._decoder\.(\d+)", lambda m: (
        ("cls_decoder", f"dense_{int(m[1]) // 3}"), _LINEAR) if int(m[1]) % 3 == 0 else (
        ("cls_decoder", f"norm_{int(m[1]) // 3}"), _NORM) if int(m[1]) % 3 == 2 else None),
    (r"cls_decoder\.out_layer", lambda m: (("cls_decoder", "out_layer"), _LINEAR)),
    (r"mvc_decoder\.(gene2query|W|fc1|fc2)", lambda m: (("mvc_decoder", m[1]), _LINEAR)),
    (r"mvc_decoder\.hidden_activation", lambda m: (("mvc_decoder", "hidden_activation"),
                                                   _PRELU)),
]
_MODULE_RULES = [(re.compile(pattern), rule) for pattern, rule in _MODULE_RULES]


class ConversionError(ValueError):
    """A checkpoint folder that cannot be converted as given; the message names the fix."""


# ---------------------------------------------------------------------------------------------
# Reports


@dataclasses.dataclass(frozen=True)
class ShapeMismatch:
    """A checkpoint tensor whose shape does not fit our parameter (left at initialisation)."""

    source_key: str
    path: str
    source_shape: tuple[int, ...]
    expected_shape: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class VocabularyMatch:
    """How a dataset's tokens map onto a checkpoint's vocabulary, by name.

    Attributes:
      n_genes: the dataset's gene tokens (measured genes and unmeasured perturbed genes).
      n_matched: how many of them the checkpoint's vocabulary holds.
      unmatched_genes: the others, in token order (their embedding rows start at zero).
      special_tokens: the dataset's special tokens found in the checkpoint's vocabulary.
    """

    n_genes: int
    n_matched: int
    unmatched_genes: tuple[str, ...]
    special_tokens: tuple[str, ...]

    @property
    def message(self) -> str:
        return f"match {self.n_matched}/{self.n_genes} genes in vocabulary"


@dataclasses.dataclass
class ConversionReport:
    """What a weight import did.

    Attributes:
      source: the folder read.
      attention_layout: "torch" (``self_attn.in_proj_weight``), "flash" (``self_attn.Wqkv``),
        "converted" (a folder written by this module) or None (no transformer layers).
      prefixes: the prefixes that selected what to load (empty: everything).
      loaded: (source key, our parameter path) of every parameter taken from the checkpoint.
      skipped: source keys left out because no prefix selects them.
      missing: our parameter paths the checkpoint has no tensor for (left at initialisation).
      unexpected: source keys with no place in our model.
      shape_mismatched: tensors that do not fit (left at initialisation).
      vocabulary: the dataset-to-checkpoint gene match, when a dataset was given.
      notes: behaviour differences and hints worth reading.
    """

    source: str
    attention_layout: str | None = None
    prefixes: tuple[str, ...] = ()
    loaded: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    skipped: list[str] = dataclasses.field(default_factory=list)
    missing: list[str] = dataclasses.field(default_factory=list)
    unexpected: list[str] = dataclasses.field(default_factory=list)
    shape_mismatched: list[ShapeMismatch] = dataclasses.field(default_factory=list)
    vocabulary: VocabularyMatch | None = None
    notes: list[str] = dataclasses.field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["loaded"] = [list(pair) for pair in self.loaded]
        out["prefixes"] = list(self.prefixes)
        if self.vocabulary is not None:
            out["vocabulary"]["message"] = self.vocabulary.message
        return out

    def summary(self, max_items: int = 20) -> str:
        """A human-readable account, lists cut at `max_items` entries."""

        def listed(items: Sequence[str]) -> str:
            shown = ", ".join(items[:max_items])
            return shown + (f", ... ({len(items) - max_items} more)"
                            if len(items) > max_items else "")

        lines = [f"Weights from {self.source}"
                 + (f" (attention layout: {self.attention_layout})"
                    if self.attention_layout else "")
                 + (f", prefixes {list(self.prefixes)}" if self.prefixes else "") + ":",
                 f"  loaded: {len(self.loaded)} tensor(s)"]
        if self.skipped:
            lines.append(f"  skipped by prefix ({len(self.skipped)}): {listed(self.skipped)}")
        if self.missing:
            lines.append(f"  missing from the checkpoint, left at initialisation "
                         f"({len(self.missing)}): {listed(self.missing)}")
        if self.unexpected:
            lines.append(f"  unexpected, not used ({len(self.unexpected)}): "
                         f"{listed(self.unexpected)}")
        if self.shape_mismatched:
            lines.append(f"  shape mismatched, left at initialisation "
                         f"({len(self.shape_mismatched)}): " + listed(
                             [f"{m.source_key} {m.source_shape} -> {m.path} {m.expected_shape}"
                              for m in self.shape_mismatched]))
        if self.vocabulary is not None:
            v = self.vocabulary
            lines.append(f"  vocabulary: {v.message}"
                         + (f"; not in it (embedding starts at zero): "
                            f"{listed(list(v.unmatched_genes))}" if v.unmatched_genes else ""))
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()


# ---------------------------------------------------------------------------------------------
# Reading


def read_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Reads a PyTorch ``state_dict`` file into float32 NumPy arrays.

    Accepts a plain state dict, or a dict holding one under ``state_dict`` /
    ``model_state_dict`` / ``model``; a ``module.`` prefix on every key (DDP) is removed.
    Non-floating tensors (counters) are kept as they are, to be reported as unexpected.

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
        raise ImportError(f"Reading a PyTorch checkpoint ({path}) needs torch: "
                          f"{TORCH_INSTALL_HINT}.") from e
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file gets the same advice
        raise ConversionError(
            f"Cannot read {path} as a PyTorch state_dict ({type(e).__name__}: {e}). Save the "
            "weights with torch.save(model.state_dict(), 'best_model.pt'), not the pickled "
            "model object.") from e
    if isinstance(obj, Mapping) and not all(isinstance(v, torch.Tensor) for v in obj.values()):
        for key in ("state_dict", "model_state_dict", "model"):
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not obj or not all(
            isinstance(v, torch.Tensor) for v in obj.values()):
        raise ConversionError(
            f"{path} does not hold a state_dict (a mapping of parameter names to tensors); "
            "save it with torch.save(model.state_dict(), 'best_model.pt').")
    keys = list(obj)
    if all(k.startswith("module.") for k in keys):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    out = {}
    for key, tensor in obj.items():
        tensor = tensor.detach().cpu()
        out[key] = (tensor.float().numpy() if tensor.is_floating_point()
                    else tensor.numpy()).copy()
    return out


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConversionError(f"Cannot read {path} ({what}): {e}") from e


def _check_vocab(vocab: Any, path: Path) -> dict[str, int]:
    if not isinstance(vocab, Mapping) or not vocab:
        raise ConversionError(f"{path} must be a JSON object of token name -> id.")
    ids = list(vocab.values())
    if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
        raise ConversionError(f"{path}: token ids must be non-negative integers.")
    if len(set(ids)) != len(ids):
        raise ConversionError(f"{path}: several tokens share an id; each token needs its own.")
    return {str(k): int(v) for k, v in vocab.items()}


@dataclasses.dataclass
class _Entry:
    """One source tensor: its key, where it goes in our tree, and the value in our layout."""

    key: str
    path: tuple[str, ...] | None
    kind: str | None
    value: np.ndarray
    source_shape: tuple[int, ...] = ()


@dataclasses.dataclass
class _Source:
    folder: Path
    entries: list[_Entry]
    vocab: dict[str, int]
    args: dict[str, Any]
    model_config: ModelConfig
    attention_layout: str | None
    notes: list[str]


def torch_key_to_path(key: str) -> tuple[tuple[str, ...], str] | None:
    """Our parameter path and the mapping kind of a PyTorch state-dict key, or None.

    Example: ``transformer_encoder.layers.3.self_attn.Wqkv.weight`` ->
    ``(("layers_3", "self_attn", "in_proj", "kernel"), "linear")``.
    """
    # Both attention layouts name one (3 * d, d) projection; give them one module name.
    key = (key.replace(".self_attn.in_proj_weight", ".self_attn.in_proj.weight")
           .replace(".self_attn.in_proj_bias", ".self_attn.in_proj.bias")
           .replace(".self_attn.Wqkv.", ".self_attn.in_proj."))
    if "." not in key:
        return None
    module, param = key.rsplit(".", 1)
    for pattern, rule in _MODULE_RULES:
        match = pattern.fullmatch(module)
        if match is None:
            continue
        target = rule(match)
        if target is None:
            return None
        path, kind = target
        name = _PARAM_NAMES[kind].get(param)
        return (path + (name,), kind) if name is not None else None
    return None


def _to_flax_layout(value: np.ndarray, kind: str, path: tuple[str, ...]) -> np.ndarray:
    if kind == _LINEAR and path[-1] == "kernel" and value.ndim == 2:
        return np.ascontiguousarray(value.T)
    if kind == _PRELU and value.size == 1:
        # nn.PReLU() holds one slope of shape (1,); Flax's PReLU a scalar.
        return value.reshape(())
    return value


def _attention_layout(state_dict: Mapping[str, Any]) -> str | None:
    flash = any(".self_attn.Wqkv." in k for k in state_dict)
    torch_style = any(".self_attn.in_proj_" in k for k in state_dict)
    if flash and torch_style:
        raise ConversionError(
            "The state_dict mixes both attention layouts (self_attn.in_proj_weight and "
            "self_attn.Wqkv); it is not one model's state_dict.")
    return "flash" if flash else "torch" if torch_style else None


def _infer_mvc_style(state_dict: Mapping[str, np.ndarray], embsize: int) -> str | None:
    if "mvc_decoder.W.weight" in state_dict:
        return "inner product"
    fc1 = state_dict.get("mvc_decoder.fc1.weight")
    if fc1 is not None:
        return "concat query" if fc1.shape[-1] == embsize + 64 else "sum query"
    return None


def model_config_from_args(args: Mapping[str, Any], vocab: Mapping[str, int],
                           state_dict: Mapping[str, np.ndarray],
                           base: ModelConfig | None = None) -> tuple[ModelConfig, list[str]]:
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
                f"add \"{names[0]}\": N to args.json.")
        notes.append(f"args.json has no {names[0]!r}; read {inferred} off the tensors.")
        return int(inferred)

    layer_ids = {int(m[1]) for k in state_dict if (m := re.match(_LAYER + r"\.", k))}
    linear1 = state_dict.get("transformer_encoder.layers.0.linear1.weight")
    cls_linears = [int(m[1]) for k in state_dict
                   if (m := re.fullmatch(r"cls_decoder\._decoder\.(\d+)\.weight", k))
                   and int(m[1]) % 3 == 0]
    embsize = size(("embsize", "d_model"), None if embedding is None else embedding.shape[1],
                   "the embedding size")
    nhead = size(("nheads", "nhead"), None, "the number of attention heads")
    d_hid = size(("d_hid",), None if linear1 is None else linear1.shape[0],
                 "the feed-forward width")
    nlayers = size(("nlayers",), max(layer_ids) + 1 if layer_ids else None,
                   "the number of transformer layers")
    nlayers_cls = size(("n_layers_cls", "nlayers_cls"),
                       len(cls_linears) + 1 if cls_linears else 3,
                       "the classification decoder's layers")
    out_layer = state_dict.get("cls_decoder.out_layer.weight")
    n_cls = int(out_layer.shape[0]) if out_layer is not None else int(args.get("n_cls", 1))

    cell_emb_style = str(args.get("cell_emb_style", "cls"))
    if cell_emb_style not in CELL_EMB_STYLES:
        raise ConversionError(f"args.json cell_emb_style {cell_emb_style!r} is not one of "
                              f"{list(CELL_EMB_STYLES)}.")
    mvc_style = args.get("mvc_decoder_style") or _infer_mvc_style(state_dict, embsize) \
        or "inner product"
    if mvc_style not in MVC_DECODER_STYLES:
        raise ConversionError(f"args.json mvc_decoder_style {mvc_style!r} is not one of "
                              f"{list(MVC_DECODER_STYLES)}.")
    pad_token = str(args.get("pad_token", "<pad>"))
    if pad_token not in vocab:
        raise ConversionError(f"args.json pad_token {pad_token!r} is not in vocab.json; use "
                              "the vocab.json saved with this checkpoint.")
    pad_token_id = vocab[pad_token]
    cls_token_id = vocab.get("<cls>", pad_token_id)
    prepend_cls_token = base.prepend_cls_token
    if cell_emb_style == "cls":
        prepend_cls_token = False
        notes.append("cell_emb_style 'cls': prepend_cls_token is false, as in the original "
                     "(the cell embedding is the first gene's output, since the perturbation "
                     "input has no <cls> token).")
    pert_pad_id = args.get("pert_pad_id", 2)
    if pert_pad_id != 2:
        notes.append(f"The checkpoint used pert_pad_id {pert_pad_id}; scformer-jax pads the "
                     "flag channel with 2. Flags 0 and 1 keep their pert_encoder rows.")
    if args.get("pre_norm"):
        notes.append("The checkpoint's layers are pre-LayerNorm (pre_norm: true); scformer-jax "
                     "implements the original post-LayerNorm layer only.")
    if args.get("input_emb_style", "continuous") != "continuous":
        notes.append(f"input_emb_style {args['input_emb_style']!r}: its value_encoder has "
                     "another form than our continuous value encoder and does not load.")
    if args.get("input_style") == "binned":
        notes.append("The checkpoint was trained on binned expression (input_style 'binned'); "
                     "scformer-jax feeds log-normalised values, so fine-tune before use.")
    fields = dict(embsize=embsize, nhead=nhead, d_hid=d_hid, nlayers=nlayers,
                  nlayers_cls=nlayers_cls, n_cls=n_cls,
                  dropout=float(args.get("dropout", base.dropout)),
                  pad_value=float(args.get("pad_value", 0.0)), pert_pad_id=2,
                  cell_emb_style=cell_emb_style, prepend_cls_token=prepend_cls_token,
                  mvc_decoder_style=mvc_style, ntoken=max(vocab.values()) + 1,
                  pad_token_id=pad_token_id, cls_token_id=cls_token_id)
    try:
        return dataclasses.replace(base, **fields), notes
    except ConfigError as e:
        raise ConversionError(f"args.json gives a model scformer-jax cannot build: {e}") from e


def _read_torch_folder(folder: Path, base: ModelConfig | None) -> _Source:
    missing = [n for n in (CHECKPOINT_FILE, ARGS_FILE, VOCAB_FILE) if not (folder / n).is_file()]
    if missing:
        raise ConversionError(
            f"{folder} lacks {', '.join(missing)}: a PyTorch checkpoint folder needs "
            f"{CHECKPOINT_FILE} (the state_dict), {ARGS_FILE} and {VOCAB_FILE} as scGPT saves "
            "them (or give a folder written by python -m scformer_jax.convert).")
    args = _read_json(folder / ARGS_FILE, "the model's settings")
    if not isinstance(args, Mapping):
        raise ConversionError(f"{folder / ARGS_FILE} must be a JSON object.")
    vocab = _check_vocab(_read_json(folder / VOCAB_FILE, "the gene vocabulary"),
                         folder / VOCAB_FILE)
    state_dict = read_state_dict(folder / CHECKPOINT_FILE)
    embedding = state_dict.get("encoder.embedding.weight")
    if embedding is not None and max(vocab.values()) >= embedding.shape[0]:
        raise ConversionError(
            f"vocab.json has ids up to {max(vocab.values())} but encoder.embedding.weight has "
            f"{embedding.shape[0]} rows; use the vocab.json saved with this checkpoint.")
    layout = _attention_layout(state_dict)
    model_config, notes = model_config_from_args(args, vocab, state_dict, base)
    if embedding is not None:
        model_config = dataclasses.replace(model_config, ntoken=int(embedding.shape[0]))
    entries = []
    for key, value in state_dict.items():
        target = torch_key_to_path(key) if value.dtype.kind == "f" else None
        shape = tuple(int(s) for s in value.shape)
        if target is None:
            entries.append(_Entry(key, None, None, value, shape))
        else:
            path, kind = target
            entries.append(_Entry(key, path, kind, _to_flax_layout(value, kind, path), shape))
    return _Source(folder, entries, vocab, dict(args), model_config, layout, notes)


def _read_converted_folder(folder: Path) -> _Source:
    from scformer_jax.training import restore_params

    if not (folder / VOCAB_FILE).is_file():
        raise ConversionError(
            f"{folder} has no {VOCAB_FILE}, so it is not a converted checkpoint: give a "
            "PyTorch checkpoint folder or one written by python -m scformer_jax.convert (to "
            "continue a scformer-jax run, pass its folder as --workdir instead).")
    model_config, params, meta = restore_params(folder)
    source_keys = meta.get("source_keys")
    if not isinstance(source_keys, Mapping):
        raise ConversionError(f"{folder} is a training run, not a converted checkpoint; "
                              "point train.load_model at a PyTorch checkpoint folder or a "
                              "folder written by python -m scformer_jax.convert.")
    vocab = _check_vocab(_read_json(folder / VOCAB_FILE, "the gene vocabulary"),
                         folder / VOCAB_FILE)
    flat = traverse_util.flatten_dict(params)
    entries = []
    # Only what came from PyTorch counts as pretrained; the rest of the folder's tree is
    # the conversion's initialisation.
    for path_text, key in source_keys.items():
        path = tuple(path_text.split("/"))
        kind = _EMBED if path == ("encoder", "embedding") else "converted"
        value = np.asarray(flat[path])
        entries.append(_Entry(str(key), path, kind, value, tuple(value.shape)))
    return _Source(folder, entries, vocab, dict(meta.get("args") or {}), model_config,
                   "converted", list(meta.get("notes") or []))


def read_source(path: str | os.PathLike, base: ModelConfig | None = None) -> _Source:
    """Reads a PyTorch checkpoint folder or a folder written by :func:`convert_checkpoint`."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise ConversionError(f"Checkpoint folder {str(folder)!r} does not exist (expected "
                              f"{CHECKPOINT_FILE}, {ARGS_FILE} and {VOCAB_FILE} in it).")
    if (folder / CHECKPOINTS_DIR).is_dir() and not (folder / CHECKPOINT_FILE).is_file():
        return _read_converted_folder(folder)
    return _read_torch_folder(folder, base)


# ---------------------------------------------------------------------------------------------
# Mapping


def match_vocabulary(token_names: Sequence[str], source_vocab: Mapping[str, int]
                     ) -> VocabularyMatch:
    """Matches a dataset's tokens (in token-id order) to a checkpoint vocabulary by name."""
    genes = [t for t in token_names if t not in SPECIAL_TOKENS]
    unmatched = tuple(g for g in genes if g not in source_vocab)
    specials = tuple(t for t in token_names if t in SPECIAL_TOKENS and t in source_vocab)
    return VocabularyMatch(len(genes), len(genes) - len(unmatched), unmatched, specials)


def remap_embedding(table: np.ndarray, source_vocab: Mapping[str, int],
                    token_names: Sequence[str], pad_token: str = "<pad>") -> np.ndarray:
    """Re-orders a gene embedding table into a dataset's token order, by token name.

    Args:
      table: (n_source_tokens, d) the checkpoint's gene embedding.
      source_vocab: the checkpoint's token name -> row.
      token_names: (n_tokens,) the dataset's token names in id order.
      pad_token: the padding token (its row is zero: our model never reads it).

    Returns:
      (n_tokens, d): the checkpoint row of each token found by name; zero for tokens the
      checkpoint does not know and for the pad token.
    """
    out = np.zeros((len(token_names), table.shape[1]), table.dtype)
    for token_id, name in enumerate(token_names):
        row = source_vocab.get(name)
        if row is not None and name != pad_token:
            out[token_id] = table[row]
    return out


def _selected(key: str, path: tuple[str, ...] | None, prefixes: Sequence[str]) -> bool:
    if not prefixes:
        return True
    names = [key] + (["/".join(path)] if path is not None else [])
    return any(name.startswith(p) for p in prefixes for name in names)


def _check_prefixes(entries: Sequence[_Entry], prefixes: Sequence[str]) -> None:
    unused = [p for p in prefixes if not any(_selected(e.key, e.path, [p]) for e in entries)]
    if unused:
        groups = sorted({e.key.split(".")[0] for e in entries})
        raise ConversionError(
            f"load_param_prefixes {unused} select no tensor of the checkpoint; its groups are "
            f"{groups} (scGPT's tutorial uses {list(SCGPT_PREFIXES)}).")


def _assign(source: _Source, target_params: Any, *, prefixes: Sequence[str],
            token_names: Sequence[str] | None, pad_token: str) -> tuple[Any, ConversionReport]:
    prefixes = tuple(prefixes)
    _check_prefixes(source.entries, prefixes)
    report = ConversionReport(str(source.folder), source.attention_layout, prefixes)
    flat = {path: np.asarray(value) for path, value in
            traverse_util.flatten_dict(target_params).items()}
    out = dict(flat)
    provided: set[tuple[str, ...]] = set()
    for entry in source.entries:
        if entry.path is None or entry.path not in flat:
            report.unexpected.append(entry.key)
            continue
        if entry.path in provided:
            raise ConversionError(f"Two tensors map onto {'/'.join(entry.path)} (the last: "
                                  f"{entry.key}); the state_dict is not one model's.")
        provided.add(entry.path)
        if not _selected(entry.key, entry.path, prefixes):
            report.skipped.append(entry.key)
            continue
        value = entry.value
        expected = flat[entry.path].shape
        if entry.kind == _EMBED and entry.path == ("encoder", "embedding") \
                and token_names is not None and value.ndim == 2:
            if value.shape[1] == expected[1] and len(token_names) == expected[0]:
                value = remap_embedding(value, source.vocab, token_names, pad_token)
        if tuple(value.shape) != tuple(expected):
            report.shape_mismatched.append(ShapeMismatch(
                entry.key, "/".join(entry.path), entry.source_shape,
                tuple(int(s) for s in expected)))
            continue
        out[entry.path] = value.astype(flat[entry.path].dtype)
        report.loaded.append((entry.key, "/".join(entry.path)))
    report.missing = ["/".join(p) for p in flat if p not in provided]
    return traverse_util.unflatten_dict(out), report


_COMPARED_FIELDS = ("embsize", "nhead", "d_hid", "nlayers", "nlayers_cls", "mvc_decoder_style",
                    "cell_emb_style", "prepend_cls_token", "pad_value")


def _config_differences(run: ModelConfig, checkpoint: ModelConfig) -> list[str]:
    """Hints for a run whose model config differs from the checkpoint's."""
    diffs = [f"model.{name}: {getattr(checkpoint, name)!r} in the checkpoint, "
             f"{getattr(run, name)!r} in this run"
             for name in _COMPARED_FIELDS if getattr(run, name) != getattr(checkpoint, name)]
    if not diffs:
        return []
    return ["The run's model config differs from the checkpoint's (" + "; ".join(diffs)
            + "). Set these keys to the checkpoint's values to reuse it as trained "
            "(mismatched shapes stay at initialisation; a different nhead, pooling or "
            "pad_value changes what the loaded weights compute)."]


def _check_pre_norm(source: _Source, report: ConversionReport) -> None:
    if source.args.get("pre_norm") and any(p.startswith("layers_") for _, p in report.loaded):
        raise ConversionError(
            f"{source.folder} holds pre-LayerNorm transformer layers (args.json pre_norm: "
            "true); scformer-jax implements the original post-LayerNorm layer, so they would "
            "compute something else. Leave transformer_encoder out of load_param_prefixes.")


def _load(source: _Source, model_config: ModelConfig, rng, *, prefixes: Sequence[str],
          dataset=None) -> tuple[Any, ConversionReport]:
    from scformer_jax.model import init_params

    token_names = list(dataset.token_names) if dataset is not None else None
    target = init_params(model_config, rng)
    pad_token = str(source.args.get("pad_token", "<pad>"))
    params, report = _assign(source, target, prefixes=prefixes, token_names=token_names,
                             pad_token=pad_token)
    _check_pre_norm(source, report)
    report.notes += source.notes + _config_differences(model_config, source.model_config)
    if dataset is not None:
        report.vocabulary = match_vocabulary(token_names, source.vocab)
    elif model_config.ntoken != source.model_config.ntoken:
        report.notes.append(
            f"The model has {model_config.ntoken} tokens and the checkpoint "
            f"{source.model_config.ntoken}; pass the dataset to map genes by name.")
    return params, report


def load_pretrained(path: str | os.PathLike, model_config: ModelConfig, rng, *,
                    prefixes: Sequence[str] = (), dataset=None) -> tuple[Any, ConversionReport]:
    """Initialises `model_config`'s parameters with `rng` and loads a checkpoint into them.

    Args:
      path: a PyTorch checkpoint folder (best_model.pt, args.json, vocab.json) or a folder
        written by :func:`convert_checkpoint`.
      model_config: the model to load into (its vocabulary: the dataset's when `dataset` is
        given, else the checkpoint's).
      rng: the initialisation key of everything not loaded.
      prefixes: load only tensors whose PyTorch key (``transformer_encoder.layers.0...``) or
        our path (``layers_0/...``) starts with one of these; empty: everything.
      dataset: a :class:`~scformer_jax.data.dataset.PerturbData`; the gene embedding is
        re-ordered into its token order by gene name.

    Returns:
      (params, report).

    Raises:
      ConversionError: unreadable folder, a prefix that selects nothing, pre-LN layers.
    """
    source = read_source(path, model_config)
    return _load(source, model_config, rng, prefixes=prefixes, dataset=dataset)


def load_pretrained_params(path: str | os.PathLike, model_config: ModelConfig, rng, *,
                           prefixes: Sequence[str] = (), dataset=None) -> Any:
    """:func:`load_pretrained` for the training loop: prints the report, returns params.

    Shape mismatches and a model config that differs from the checkpoint's also raise a
    ``UserWarning``, since training then starts those parameters from scratch.
    """
    from scformer_jax import parallel

    params, report = load_pretrained(path, model_config, rng, prefixes=prefixes,
                                     dataset=dataset)
    if parallel.is_primary():
        print(report.summary())
    if report.shape_mismatched:
        warnings.warn(
            f"{len(report.shape_mismatched)} tensor(s) of {path} do not fit the model and "
            f"start from initialisation (first: {report.shape_mismatched[0].source_key}); see "
            "the report above.", stacklevel=2)
    if not report.loaded:
        raise ConversionError(f"Nothing of {path} fits the model; see the report:\n"
                              f"{report.summary()}")
    return params


def convert_params(torch_dir: str | os.PathLike, *, base: ModelConfig | None = None,
                   prefixes: Sequence[str] = (), rng=None, dataset=None
                   ) -> tuple[ModelConfig, Any, ConversionReport]:
    """Converts a PyTorch checkpoint folder in memory.

    Args:
      torch_dir: folder with best_model.pt, args.json and vocab.json.
      base: our config supplying what the checkpoint does not determine.
      prefixes: as in :func:`load_pretrained`.
      rng: initialisation key of parameters the checkpoint lacks (default PRNGKey(0)).
      dataset: re-order the gene embedding into this dataset's tokens (the config's
        vocabulary becomes the dataset's); None keeps the checkpoint's vocabulary.

    Returns:
      (model config, params, report).
    """
    return _convert_source(read_source(torch_dir, base), prefixes=prefixes, rng=rng,
                           dataset=dataset)


def _convert_source(source: _Source, *, prefixes: Sequence[str] = (), rng=None, dataset=None
                    ) -> tuple[ModelConfig, Any, ConversionReport]:
    model_config = source.model_config
    if dataset is not None:
        model_config = dataclasses.replace(
            model_config, ntoken=dataset.n_tokens, pad_token_id=dataset.pad_token_id,
            cls_token_id=dataset.cls_token_id)
    rng = jax.random.PRNGKey(0) if rng is None else rng
    params, report = _load(source, model_config, rng, prefixes=prefixes, dataset=dataset)
    return model_config, params, report


def adapt_to_dataset(workdir: str | os.PathLike, model_config: ModelConfig, params: Any,
                     dataset) -> tuple[ModelConfig, Any, VocabularyMatch | None]:
    """Moves a converted folder's parameters onto a dataset's vocabulary, for eval/predict.

    A no-op (returns the inputs and None) for run folders without ``vocab.json`` and when
    the vocabulary already is the dataset's.

    Args:
      workdir: the run or converted folder.
      model_config, params: as restored from it.
      dataset: the PerturbData to predict on.

    Returns:
      (model config, params, vocabulary match or None).
    """
    vocab_file = Path(workdir) / VOCAB_FILE
    if not vocab_file.is_file():
        return model_config, params, None
    vocab = _check_vocab(_read_json(vocab_file, "the gene vocabulary"), vocab_file)
    same = (model_config.ntoken == dataset.n_tokens
            and all(vocab.get(name) == i for i, name in enumerate(dataset.token_names)))
    if same:
        return model_config, params, None
    pad_token = next((t for t, i in vocab.items() if i == model_config.pad_token_id), "<pad>")
    params = dict(params)
    encoder = dict(params["encoder"])
    encoder["embedding"] = remap_embedding(np.asarray(encoder["embedding"]), vocab,
                                           list(dataset.token_names), pad_token)
    params["encoder"] = encoder
    model_config = dataclasses.replace(model_config, ntoken=dataset.n_tokens,
                                       pad_token_id=dataset.pad_token_id,
                                       cls_token_id=dataset.cls_token_id)
    match = match_vocabulary(list(dataset.token_names), vocab)
    print(f"{workdir}: {match.message}"
          + (f" ({len(match.unmatched_genes)} start at zero: "
             f"{list(match.unmatched_genes[:10])})" if match.unmatched_genes else ""))
    return model_config, params, match


# ---------------------------------------------------------------------------------------------
# Writing a converted folder


def convert_checkpoint(torch_dir: str | os.PathLike, out_dir: str | os.PathLike, *,
                       config: Config | None = None, prefixes: Sequence[str] = (),
                       data: str | None = None, overwrite: bool = False) -> ConversionReport:
    """Converts a PyTorch checkpoint folder into a folder scformer-jax reads.

    ``out_dir`` receives ``config.yaml`` (the model section from the checkpoint; data,
    optim and train from `config`; ``train.load_model`` set to ``out_dir`` so that
    ``train.py --config out_dir/config.yaml`` fine-tunes from it), ``checkpoints/`` (orbax,
    step 0, parameters only), ``vocab.json`` (the checkpoint's) and
    ``conversion_report.json``. The parameters keep the checkpoint's vocabulary; train,
    eval and predict map it onto their dataset by gene name. Everything is written into a
    temporary folder beside `out_dir` and renamed into place, so an error leaves no
    half-written folder.

    Args:
      torch_dir: folder with best_model.pt, args.json and vocab.json.
      out_dir: the folder to write; must not exist unless `overwrite` (or be empty).
      config: the rest of the run config (default: the defaults).
      prefixes: load only these groups (the others stay at initialisation).
      data: a dataset path or built-in name: written as ``data.path`` and matched against
        the vocabulary in the report.
      overwrite: replace an existing `out_dir`.

    Returns:
      The report (also in ``conversion_report.json``).

    Raises:
      ConversionError: missing or unreadable files, or tensors whose shapes contradict
        ``args.json`` (then nothing is written).
      FileExistsError: `out_dir` exists and `overwrite` is False.
    """
    from scformer_jax.checkpoints import Checkpoints

    torch_dir = Path(torch_dir).expanduser()
    out_dir = Path(out_dir).expanduser().absolute()
    if out_dir.exists() and not overwrite and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise FileExistsError(f"{out_dir} already exists; choose a new folder or pass "
                              "overwrite=True (--overwrite).")
    if out_dir == torch_dir.absolute():
        raise ConversionError("OUT_DIR must differ from TORCH_DIR.")
    config = config or Config()
    if data is not None:
        config = dataclasses.replace(config, data=dataclasses.replace(config.data, path=data))
    source = read_source(torch_dir, config.model)
    if source.attention_layout == "converted":
        raise ConversionError(f"{torch_dir} is already a converted folder.")
    model_config, params, report = _convert_source(source, prefixes=prefixes)
    if report.shape_mismatched:
        # The config comes from this checkpoint's own args.json, so a mismatch means
        # args.json and best_model.pt disagree: a folder written now would be mostly noise.
        raise ConversionError(
            f"{len(report.shape_mismatched)} tensor(s) of {torch_dir / CHECKPOINT_FILE} do not "
            f"fit the model described by its {ARGS_FILE}; fix {ARGS_FILE} (sizes embsize, "
            f"nheads, d_hid, nlayers, n_layers_cls) to match. Nothing was written.\n"
            + report.summary())
    if data is not None:
        from scformer_jax.data.dataset import load_dataset

        dataset = load_dataset(data, label_key=config.data.label_key)
        report.vocabulary = match_vocabulary(list(dataset.token_names), source.vocab)
    run_config = dataclasses.replace(
        config, model=model_config,
        train=dataclasses.replace(config.train, load_model=str(out_dir),
                                  load_param_prefixes=()))
    meta = {"model_config": dataclasses.asdict(model_config),
            "params_only": True,
            "converted_from": str(torch_dir.absolute()),
            "source_keys": {path: key for key, path in report.loaded},
            "args": json.loads(json.dumps(source.args, default=str)),
            "notes": report.notes}

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.converting-", dir=out_dir.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(staging, 0o777 & ~umask)  # mkdtemp makes it private; the result is a normal folder
    old = None
    try:
        ckpts = Checkpoints(staging / CHECKPOINTS_DIR)
        try:
            ckpts.save(0, {"step": np.zeros((), np.int32), "params": jax.device_get(params)},
                       meta, metric=None)
        finally:
            ckpts.close()
        import yaml

        write_text_atomic(staging / CONFIG_FILE,
                    yaml.safe_dump(config_to_dict(run_config), sort_keys=False))
        write_text_atomic(staging / VOCAB_FILE, json.dumps(source.vocab, indent=1))
        write_text_atomic(staging / REPORT_FILE, json.dumps(report.to_dict(), indent=2, default=str))
        if out_dir.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
            os.replace(out_dir, old / "folder")
        os.replace(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if old is not None and not out_dir.exists():
            os.replace(old / "folder", out_dir)
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    return report


# ---------------------------------------------------------------------------------------------
# Command line


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m scformer_jax.convert",
        description="Convert a PyTorch scGPT/scFormer checkpoint folder (best_model.pt, "
                    "args.json, vocab.json) into a folder train.py, eval.py and predict read.")
    parser.add_argument("torch_dir", help="Folder with best_model.pt, args.json, vocab.json.")
    parser.add_argument("out_dir", help="Folder to write (must not exist, or --overwrite).")
    parser.add_argument("--config", default=None,
                        help="YAML config for the data/optim/train sections of OUT_DIR/"
                             "config.yaml (the model section comes from the checkpoint).")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="SECTION.KEY=VALUE", help="Override a config key (repeatable).")
    parser.add_argument("--data", default=None,
                        help="Dataset path or built-in name: data.path of the config, and the "
                             "report counts its genes found in the checkpoint's vocabulary.")
    parser.add_argument("--prefixes", nargs="*", default=[],
                        help="Load only these parameter groups, e.g. encoder value_encoder "
                             "transformer_encoder (default: all).")
    parser.add_argument("--overwrite", action="store_true", help="Replace OUT_DIR.")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        if args.config is not None:
            config = load_config(args.config, args.overrides)
        else:
            config = config_from_dict(apply_overrides({}, args.overrides))
        report = convert_checkpoint(args.torch_dir, args.out_dir, config=config,
                                    prefixes=args.prefixes, data=args.data,
                                    overwrite=args.overwrite)
    except (ValueError, FileExistsError, ImportError, OSError) as e:
        print(f"convert: {e}", file=sys.stderr)
        return 2
    print(report.summary())
    out = Path(args.out_dir)
    print(f"Converted into {out}. Evaluate: python eval.py --workdir {out}; fine-tune: "
          f"python train.py --config {out / CONFIG_FILE} (train.load_model is set).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
