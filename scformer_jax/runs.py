"""Run folders: what ``train.py`` writes and ``eval.py`` and prediction read.

A run folder holds ``config.yaml`` (the resolved config), ``split.json``, ``checkpoints/``
(orbax), ``metrics.jsonl``, ``tensorboard/`` and ``summary.json``. A folder written by
``python -m scformer_jax.convert`` holds ``config.yaml``, ``checkpoints/`` (parameters only),
``vocab.json`` (the checkpoint's gene vocabulary) and ``conversion_report.json``, and no split.

:func:`load_run` reads one for evaluation and prediction: the config, the dataset, the split
and the parameters on the dataset's vocabulary. :func:`create_run_folder` and
:func:`check_resume_config` are the training side.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

from scformer_jax import checkpoints
from scformer_jax.config import (
    Config,
    ConfigError,
    ModelConfig,
    config_to_dict,
    load_config,
    save_config,
)
from scformer_jax.data.dataset import PerturbData, load_dataset
from scformer_jax.data.splits import gears_split, read_split_json, write_split_json
from scformer_jax.prior import TrainingMeasurements, measure_training
from scformer_jax.vocab import VOCAB_FILE, VocabularyMatch, adapt_to_dataset, read_vocab

CONFIG_FILE = "config.yaml"
SPLIT_FILE = "split.json"
CHECKPOINTS_DIR = "checkpoints"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
TENSORBOARD_DIR = "tensorboard"

# Keys that may change when a run is resumed: how long it runs, how it logs and how the
# attention kernel tiles its work. Anything else would make the resumed run a different run
# than its checkpoints.
RESUMABLE_CHANGES = {
    ("train", k)
    for k in (
        "epochs",
        "early_stop",
        "max_steps",
        "log_interval",
        "log_mre",
        "max_val_batches",
        "keep_checkpoints",
    )
} | {("model", "attention_block_size"), ("model", "attention_eval_block_size")}


@dataclasses.dataclass
class Run:
    """A run folder as evaluation and prediction use it.

    Attributes:
      workdir: the folder.
      config: its ``config.yaml``.
      dataset: ``config.data.path`` loaded.
      split: ``split.json``, or the config's split recomputed (converted folders have none).
      model_config: the checkpoint's model config, on the dataset's vocabulary.
      params: the checkpoint's parameters, on the dataset's vocabulary.
      step: the checkpoint's step.
      meta: the checkpoint's JSON metadata.
      vocabulary: how a converted checkpoint's genes matched the dataset's (None for runs
        trained on the dataset).
      which: "best" or "latest": which checkpoint was read.
    """

    workdir: Path
    config: Config
    dataset: PerturbData
    split: dict
    model_config: ModelConfig
    params: Any
    step: int
    meta: dict
    vocabulary: VocabularyMatch | None = None
    which: str = "best"
    _measured: Any = dataclasses.field(default=None, init=False, repr=False, compare=False)

    def training_measurements(self, *, singles_only: bool = False) -> TrainingMeasurements:
        """The training split's perturbations measured once, then kept: their mean profiles
        and their singles' changes and errors (:func:`scformer_jax.prior.measure_training`),
        for the model's priors and the baselines alike. `singles_only`: the singles' are
        enough (a measurement of every perturbation, when kept, serves too)."""
        if self._measured is None or (self._measured[0] and not singles_only):
            measured = measure_training(
                self.dataset, self.split["train"], singles_only=singles_only
            )
            self._measured = (singles_only, measured)
        return self._measured[1]


def read_config(workdir: str | Path) -> Config:
    """The run folder's ``config.yaml``; a clear error when the folder is not a run folder."""
    path = Path(workdir) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing: --workdir must be a folder written by train.py or "
            "python -m scformer_jax.convert."
        )
    return load_config(path)


def load_dataset_of(config: Config) -> PerturbData:
    """The dataset ``config.data`` names, in memory or read from disk as it says."""
    return load_dataset(
        config.data.path,
        label_key=config.data.label_key,
        backed=config.data.backed,
        backed_above_gb=config.data.backed_above_gb,
        cache_bytes=config.data.cache_mb << 20,
    )


def load_data(config: Config) -> tuple[PerturbData, dict]:
    """The dataset of ``config.data`` and its split, computed from the config."""
    dataset = load_dataset_of(config)
    return dataset, split_of(config, dataset)


def split_of(config: Config, dataset: PerturbData) -> dict:
    """GEARS's split of `dataset` as ``config.data`` describes it."""
    return gears_split(
        dataset.conditions,
        split=config.data.split,
        seed=config.data.split_seed,
        train_gene_set_size=config.data.train_gene_set_size,
        combo_seen2_train_frac=config.data.combo_seen2_train_frac,
        split_path=config.data.split_path,
    )


def restore_params(workdir: str | Path, *, which: str = "best") -> tuple[ModelConfig, Any, dict]:
    """(model config, params, meta) of a run folder's best (or latest) checkpoint, in the
    checkpoint's own vocabulary. Reads no optimiser state's structure."""
    workdir = Path(workdir)
    best_mode = "max"
    if (workdir / CONFIG_FILE).is_file():
        best_mode = load_config(workdir / CONFIG_FILE).train.best_mode
    try:
        _, params, meta = checkpoints.restore_params(
            workdir / CHECKPOINTS_DIR, which=which, best_mode=best_mode
        )
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{e} Run train.py with --workdir {workdir}.") from None
    return model_config_from_meta(meta), params, meta


def model_config_from_meta(meta: dict) -> ModelConfig:
    """The :class:`ModelConfig` a checkpoint's metadata records (lists back to tuples)."""
    return ModelConfig(
        **{k: (tuple(v) if isinstance(v, list) else v) for k, v in meta["model_config"].items()}
    )


def load_run(workdir: str | Path, *, which: str = "best") -> Run:
    """Reads a run folder (or a converted checkpoint folder) for evaluation and prediction.

    Loads the config, the dataset and the split once, restores the best (or latest)
    checkpoint's parameters and moves a converted checkpoint's gene embedding onto the
    dataset's vocabulary (by gene name; printing the match).

    Args:
      workdir: the folder ``train.py`` or ``python -m scformer_jax.convert`` wrote.
      which: "best" or "latest" checkpoint.

    Raises:
      FileNotFoundError: not a run folder, or no readable checkpoint.
    """
    workdir = Path(workdir)
    config = read_config(workdir)
    try:
        step, params, meta = checkpoints.restore_params(
            workdir / CHECKPOINTS_DIR, which=which, best_mode=config.train.best_mode
        )
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{e} Run train.py with --workdir {workdir}.") from None
    model_config = model_config_from_meta(meta)
    dataset = load_dataset_of(config)
    if (workdir / SPLIT_FILE).is_file():
        split = read_split_json(workdir / SPLIT_FILE)
    else:
        split = split_of(config, dataset)
    vocab = read_vocab(workdir / VOCAB_FILE) if (workdir / VOCAB_FILE).is_file() else None
    model_config, params, match = adapt_to_dataset(vocab, model_config, params, dataset)
    if match is not None:
        print(
            f"{workdir}: {match.message}"
            + (
                f" ({len(match.unmatched_genes)} start at zero: {list(match.unmatched_genes[:10])})"
                if match.unmatched_genes
                else ""
            )
        )
    return Run(
        workdir=workdir,
        config=config,
        dataset=dataset,
        split=split,
        model_config=model_config,
        params=params,
        step=step,
        meta=meta,
        vocabulary=match,
        which=which,
    )


# ---------------------------------------------------------------------------------------------
# The training side


def new_workdir(root: str | Path = "runs") -> Path:
    """A new timestamped folder name under `root` (not created)."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = Path(root) / stamp
    suffix = 0
    while path.exists():
        suffix += 1
        path = Path(root) / f"{stamp}-{suffix}"
    return path


def create_run_folder(workdir: str | Path, config: Config, split: dict) -> None:
    """Creates `workdir` (or reuses it on resume) and writes ``config.yaml`` and
    ``split.json`` into it, each atomically."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    save_config(config, workdir / CONFIG_FILE)
    write_split_json(split, workdir / SPLIT_FILE)


def check_resume_config(config: Config, workdir: str | Path) -> None:
    """Refuses to resume a run folder with a config that differs in what shapes the run."""
    workdir = Path(workdir)
    saved_path = workdir / CONFIG_FILE
    if not saved_path.is_file() or not (workdir / CHECKPOINTS_DIR).is_dir():
        return
    saved, new = config_to_dict(load_config(saved_path)), config_to_dict(config)
    changed = [
        f"{section}.{key}: {saved[section][key]!r} -> {new[section][key]!r}"
        for section in new
        for key in new[section]
        if new[section][key] != saved[section][key] and (section, key) not in RESUMABLE_CHANGES
    ]
    if changed:
        raise ConfigError(
            f"{workdir} holds a run with another config; resuming it with these changes would "
            f"mix two runs: {'; '.join(changed)}. Use a new --workdir, or set those keys back "
            f"(only {sorted(f'{s}.{k}' for s, k in RESUMABLE_CHANGES)} may change on resume)."
        )
