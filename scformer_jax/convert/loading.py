"""Loading a checkpoint's tensors into our parameter tree: prefix selection, the gene
embedding re-ordered into a dataset's vocabulary, shape checks, and the report."""

from __future__ import annotations

import os
import warnings
from typing import Any, Sequence

import jax
import numpy as np
from flax import traverse_util

from scformer_jax import parallel
from scformer_jax.config import ModelConfig
from scformer_jax.convert.keys import EMBED, is_ignored
from scformer_jax.convert.reading import Entry, Source, read_source
from scformer_jax.convert.report import ConversionError, ConversionReport, ShapeMismatch
from scformer_jax.data.dataset import PAD_TOKEN
from scformer_jax.model import init_params
from scformer_jax.vocab import match_vocabulary, remap_embedding

# scGPT's perturbation tutorial loads these three groups from the pretrained model.
SCGPT_PREFIXES = ("encoder", "value_encoder", "transformer_encoder")


def _selected(key: str, path: tuple[str, ...] | None, prefixes: Sequence[str]) -> bool:
    if not prefixes:
        return True
    names = [key] + (["/".join(path)] if path is not None else [])
    return any(name.startswith(p) for p in prefixes for name in names)


def _check_prefixes(entries: Sequence[Entry], prefixes: Sequence[str]) -> None:
    unused = [p for p in prefixes if not any(_selected(e.key, e.path, [p]) for e in entries)]
    if unused:
        groups = sorted({e.key.split(".")[0] for e in entries})
        raise ConversionError(
            f"load_param_prefixes {unused} select no tensor of the checkpoint; its groups are "
            f"{groups} (scGPT's tutorial uses {list(SCGPT_PREFIXES)})."
        )


def _assign(
    source: Source,
    target_params: Any,
    *,
    prefixes: Sequence[str],
    token_names: Sequence[str] | None,
    pad_token: str,
) -> tuple[Any, ConversionReport]:
    prefixes = tuple(prefixes)
    _check_prefixes(source.entries, prefixes)
    report = ConversionReport(str(source.folder), source.attention_layout, prefixes)
    flat = {
        path: np.asarray(value) for path, value in traverse_util.flatten_dict(target_params).items()
    }
    out = dict(flat)
    provided: set[tuple[str, ...]] = set()
    for entry in source.entries:
        if entry.path is None and is_ignored(entry.key):
            report.ignored.append(entry.key)
            continue
        if entry.path is None or entry.path not in flat:
            report.unexpected.append(entry.key)
            continue
        if entry.path in provided:
            raise ConversionError(
                f"Two tensors map onto {'/'.join(entry.path)} (the last: "
                f"{entry.key}); the state_dict is not one model's."
            )
        provided.add(entry.path)
        if not _selected(entry.key, entry.path, prefixes):
            report.skipped.append(entry.key)
            continue
        value = entry.value
        expected = flat[entry.path].shape
        if (
            entry.kind == EMBED
            and entry.path == ("encoder", "embedding")
            and token_names is not None
            and value.ndim == 2
        ):
            if value.shape[1] == expected[1] and len(token_names) == expected[0]:
                value = remap_embedding(value, source.vocab, token_names, pad_token)
        if tuple(value.shape) != tuple(expected):
            report.shape_mismatched.append(
                ShapeMismatch(
                    entry.key,
                    "/".join(entry.path),
                    entry.source_shape,
                    tuple(int(s) for s in expected),
                )
            )
            continue
        out[entry.path] = value.astype(flat[entry.path].dtype)
        report.loaded.append((entry.key, "/".join(entry.path)))
    report.missing = ["/".join(p) for p in flat if p not in provided]
    return traverse_util.unflatten_dict(out), report


_COMPARED_FIELDS = (
    "embsize",
    "nhead",
    "d_hid",
    "nlayers",
    "nlayers_cls",
    "mvc_decoder_style",
    "cell_emb_style",
    "prepend_cls_token",
    "pad_value",
    "expr_decoder",
    "decoder_activation",
    "decoder_adaptive_bias",
    "input_batchnorm",
    "explicit_zero_prob",
    "pre_norm",
)


def _config_differences(run: ModelConfig, checkpoint: ModelConfig) -> list[str]:
    """Hints for a run whose model config differs from the checkpoint's."""
    diffs = [
        f"model.{name}: {getattr(checkpoint, name)!r} in the checkpoint, "
        f"{getattr(run, name)!r} in this run"
        for name in _COMPARED_FIELDS
        if getattr(run, name) != getattr(checkpoint, name)
    ]
    if not diffs:
        return []
    return [
        "The run's model config differs from the checkpoint's ("
        + "; ".join(diffs)
        + "). Set these keys to the checkpoint's values to reuse it as trained "
        "(mismatched shapes stay at initialisation; a different nhead, pooling or "
        "pad_value changes what the loaded weights compute)."
    ]


def _load(
    source: Source, model_config: ModelConfig, rng, *, prefixes: Sequence[str], dataset=None
) -> tuple[Any, ConversionReport]:
    token_names = list(dataset.token_names) if dataset is not None else None
    target = init_params(model_config, rng)
    pad_token = str(source.args.get("pad_token", PAD_TOKEN))
    params, report = _assign(
        source, target, prefixes=prefixes, token_names=token_names, pad_token=pad_token
    )
    report.notes += source.notes + _config_differences(model_config, source.model_config)
    if dataset is not None:
        report.vocabulary = match_vocabulary(token_names, source.vocab)
    elif model_config.ntoken != source.model_config.ntoken:
        report.notes.append(
            f"The model has {model_config.ntoken} tokens and the checkpoint "
            f"{source.model_config.ntoken}; pass the dataset to map genes by name."
        )
    return params, report


def load_pretrained(
    path: str | os.PathLike,
    model_config: ModelConfig,
    rng,
    *,
    prefixes: Sequence[str] = (),
    dataset=None,
) -> tuple[Any, ConversionReport]:
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
      ConversionError: unreadable folder, or a prefix that selects nothing.
    """
    source = read_source(path, model_config)
    return _load(source, model_config, rng, prefixes=prefixes, dataset=dataset)


def load_pretrained_params(
    path: str | os.PathLike,
    model_config: ModelConfig,
    rng,
    *,
    prefixes: Sequence[str] = (),
    dataset=None,
) -> Any:
    """:func:`load_pretrained` for the training loop: prints the report, returns params.

    Shape mismatches and a model config that differs from the checkpoint's also raise a
    ``UserWarning``, since training then starts those parameters from scratch.
    """
    params, report = load_pretrained(path, model_config, rng, prefixes=prefixes, dataset=dataset)
    if parallel.is_primary():
        print(report.summary())
    if report.shape_mismatched:
        warnings.warn(
            f"{len(report.shape_mismatched)} tensor(s) of {path} do not fit the model and "
            f"start from initialisation (first: {report.shape_mismatched[0].source_key}); see "
            "the report above.",
            stacklevel=2,
        )
    if not report.loaded:
        raise ConversionError(
            f"Nothing of {path} fits the model; see the report:\n{report.summary()}"
        )
    return params


def convert_params(
    torch_dir: str | os.PathLike,
    *,
    base: ModelConfig | None = None,
    prefixes: Sequence[str] = (),
    rng=None,
    dataset=None,
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
    return convert_source(read_source(torch_dir, base), prefixes=prefixes, rng=rng, dataset=dataset)


def convert_source(
    source: Source, *, prefixes: Sequence[str] = (), rng=None, dataset=None
) -> tuple[ModelConfig, Any, ConversionReport]:
    model_config = source.model_config
    if dataset is not None:
        model_config = model_config.with_vocab(dataset)
    rng = jax.random.PRNGKey(0) if rng is None else rng
    params, report = _load(source, model_config, rng, prefixes=prefixes, dataset=dataset)
    return model_config, params, report
