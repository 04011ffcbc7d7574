"""Writing a converted folder (``config.yaml``, ``checkpoints/``, ``vocab.json``,
``conversion_report.json``) and the ``python -m scformer_jax.convert`` command line."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Sequence

import jax
import numpy as np
import yaml

from scformer_jax.checkpoints import Checkpoints
from scformer_jax.config import (
    Config,
    apply_overrides,
    config_from_dict,
    config_to_dict,
    load_config,
)
from scformer_jax.convert.loading import convert_source
from scformer_jax.convert.reading import ARGS_FILE, CHECKPOINT_FILE, read_source
from scformer_jax.convert.report import ConversionError, ConversionReport
from scformer_jax.data.dataset import load_dataset
from scformer_jax.io import make_temp_dir, write_text_atomic
from scformer_jax.runs import CHECKPOINTS_DIR, CONFIG_FILE
from scformer_jax.vocab import VOCAB_FILE, match_vocabulary

REPORT_FILE = "conversion_report.json"


def convert_checkpoint(
    torch_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    config: Config | None = None,
    prefixes: Sequence[str] = (),
    data: str | None = None,
    overwrite: bool = False,
) -> ConversionReport:
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
    torch_dir = Path(torch_dir).expanduser()
    out_dir = Path(out_dir).expanduser().absolute()
    if out_dir.exists() and not overwrite and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise FileExistsError(
            f"{out_dir} already exists; choose a new folder or pass overwrite=True (--overwrite)."
        )
    if out_dir == torch_dir.absolute():
        raise ConversionError("OUT_DIR must differ from TORCH_DIR.")
    config = config or Config()
    if data is not None:
        config = dataclasses.replace(config, data=dataclasses.replace(config.data, path=data))
    source = read_source(torch_dir, config.model)
    if source.attention_layout == "converted":
        raise ConversionError(f"{torch_dir} is already a converted folder.")
    model_config, params, report = convert_source(source, prefixes=prefixes)
    if report.shape_mismatched:
        # The config comes from this checkpoint's own args.json, so a mismatch means
        # args.json and best_model.pt disagree: a folder written now would be mostly noise.
        raise ConversionError(
            f"{len(report.shape_mismatched)} tensor(s) of {torch_dir / CHECKPOINT_FILE} do not "
            f"fit the model described by its {ARGS_FILE}; fix {ARGS_FILE} (sizes embsize, "
            f"nheads, d_hid, nlayers, n_layers_cls) to match. Nothing was written.\n"
            + report.summary()
        )
    if data is not None:
        dataset = load_dataset(data, label_key=config.data.label_key)
        report.vocabulary = match_vocabulary(list(dataset.token_names), source.vocab)
    run_config = dataclasses.replace(
        config,
        model=model_config,
        train=dataclasses.replace(config.train, load_model=str(out_dir), load_param_prefixes=()),
    )
    meta = {
        "model_config": dataclasses.asdict(model_config),
        "params_only": True,
        "converted_from": str(torch_dir.absolute()),
        "source_keys": {path: key for key, path in report.loaded},
        "args": json.loads(json.dumps(source.args, default=str)),
        "notes": report.notes,
    }

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # mkdtemp makes a private folder; make_temp_dir gives it the mode mkdir would.
    staging = make_temp_dir(out_dir.parent, prefix=f".{out_dir.name}.converting-")
    old = None
    try:
        ckpts = Checkpoints(staging / CHECKPOINTS_DIR)
        try:
            ckpts.save(
                0,
                {"step": np.zeros((), np.int32), "params": jax.device_get(params)},
                meta,
                metric=None,
            )
        finally:
            ckpts.close()
        write_text_atomic(
            staging / CONFIG_FILE, yaml.safe_dump(config_to_dict(run_config), sort_keys=False)
        )
        write_text_atomic(staging / VOCAB_FILE, json.dumps(source.vocab, indent=1))
        write_text_atomic(
            staging / REPORT_FILE, json.dumps(report.to_dict(), indent=2, default=str)
        )
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


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m scformer_jax.convert",
        description="Convert a PyTorch scGPT/scFormer checkpoint folder (best_model.pt, "
        "args.json, vocab.json) into a folder train.py, eval.py and predict read.",
    )
    parser.add_argument("torch_dir", help="Folder with best_model.pt, args.json, vocab.json.")
    parser.add_argument("out_dir", help="Folder to write (must not exist, or --overwrite).")
    parser.add_argument(
        "--config",
        default=None,
        help="YAML config for the data/optim/train sections of OUT_DIR/"
        "config.yaml (the model section comes from the checkpoint).",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="Override a config key (repeatable).",
    )
    parser.add_argument(
        "--data",
        default=None,
        help="Dataset path or built-in name: data.path of the config, and the "
        "report counts its genes found in the checkpoint's vocabulary.",
    )
    parser.add_argument(
        "--prefixes",
        nargs="*",
        default=[],
        help="Load only these parameter groups, e.g. encoder value_encoder "
        "transformer_encoder (default: all).",
    )
    parser.add_argument("--overwrite", action="store_true", help="Replace OUT_DIR.")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        if args.config is not None:
            config = load_config(args.config, args.overrides)
        else:
            config = config_from_dict(apply_overrides({}, args.overrides))
        report = convert_checkpoint(
            args.torch_dir,
            args.out_dir,
            config=config,
            prefixes=args.prefixes,
            data=args.data,
            overwrite=args.overwrite,
        )
    except (ValueError, FileExistsError, ImportError, OSError) as e:
        print(f"convert: {e}", file=sys.stderr)
        return 2
    print(report.summary())
    out = Path(args.out_dir)
    print(
        f"Converted into {out}. Evaluate: python eval.py --workdir {out}; fine-tune: "
        f"python train.py --config {out / CONFIG_FILE} (train.load_model is set)."
    )
    return 0
