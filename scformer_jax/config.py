"""Typed, frozen configuration: one dataclass per concern, read from YAML.

An unknown or mistyped key is an error that lists the valid keys of its section; values are
checked for type and range when the object is built. ``--set section.key=value`` overrides
from the command line go through the same checks.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, Mapping

import yaml

from scformer_jax.io import write_text_atomic

CELL_EMB_STYLES = ("cls", "avg-pool", "w-pool")
MVC_DECODER_STYLES = ("inner product", "inner product, detach", "concat query", "sum query")
# Which genes are input tokens (data.include_zero_gene); see scformer_jax.data.batching.
INCLUDE_ZERO_GENE_MODES = ("all", "batch-wise", "row-wise", "nonzero")
# Attention kernels (model.attention); see scformer_jax.attention.
ATTENTION_IMPLEMENTATIONS = ("auto", "full", "chunked", "xla", "cudnn")
GENE_EMBEDDING_INITS = ("random", "data")
# How the parameters start (model.init): Flax's initialisers or PyTorch's (see
# scformer_jax.model.init_params).
PARAM_INITS = ("flax", "torch")
OUTPUT_BASELINES = ("none", "control_input", "gene_mean")
# How a single perturbation of a gene without a training single is predicted
# (model.unseen_single): the network, the network's unperturbed prediction plus the
# co-expression prior, or the control mean plus that prior (no network).
UNSEEN_SINGLE_PREDICTIONS = ("network", "prior", "no_network")
# How a multi-gene perturbation with such a gene is predicted (model.unseen_in_combo): the
# network, the network with the prior standing in for its guess of that gene, or the priors
# alone (no network).
UNSEEN_IN_COMBO_PREDICTIONS = ("network", "prior", "no_network")
# The prior of model.shrink_singles (scformer_jax.prior.shrink_single_changes).
SHRINK_PRIORS = ("normal", "adaptive")
# The expression decoder (model.expr_decoder): scFormer's one Linear, scGPT's MLP
# (ExprDecoder) or scGPT's affine decoder (AffineExprDecoder). See scformer_jax.model.
EXPR_DECODERS = ("linear", "mlp", "affine")
# Activations of the affine decoder's coefficient and bias (model.decoder_activation), by
# scGPT's names (torch.nn class names, default arguments).
DECODER_ACTIVATIONS = ("ReLU", "LeakyReLU", "Softplus", "Sigmoid", "Tanh", "ELU", "GELU", "SiLU")
TRAIN_TARGETS = ("cell", "condition_mean")
# Validation metrics computed every epoch (train.best_metric picks one, with or without val_).
VALIDATION_METRICS = (
    "mse",
    "mre",
    "pearson",
    "pearson_delta",
    "pearson_de",
    "pearson_de_delta",
    "mse_de",
)


class ConfigError(ValueError):
    """A configuration file or override that cannot be used as given."""


def _check_choice(name: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise ConfigError(f"{name}: {value!r} is not one of {list(choices)}.")


def _check_range(
    name: str,
    value: float,
    low: float | None = None,
    high: float | None = None,
    *,
    low_open: bool = False,
    high_open: bool = False,
) -> None:
    if low is not None and (value < low or (low_open and value == low)):
        raise ConfigError(f"{name}: {value!r} must be {'>' if low_open else '>='} {low}.")
    if high is not None and (value > high or (high_open and value == high)):
        raise ConfigError(f"{name}: {value!r} must be {'<' if high_open else '<='} {high}.")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Sizes and options of :class:`scformer_jax.model.TransformerGenerator`."""

    embsize: int = 64
    d_hid: int = 64
    nlayers: int = 4
    nhead: int = 4
    dropout: float = 0.2
    # None: the same as `dropout` (the original applies it to the attention weights too).
    attention_dropout: float | None = None
    nlayers_cls: int = 3
    n_cls: int = 1
    # Vocabulary; the data sets these from the dataset's gene vocabulary.
    ntoken: int = 0
    pad_token_id: int = 0
    cls_token_id: int = 1
    pad_value: float = 0.0
    pert_pad_id: int = 2
    max_value: float = 512.0
    cell_emb_style: str = "cls"
    # True: prepend a real <cls> token for cell_emb_style 'cls'. False: the original's
    # behaviour (the first gene's output is the cell embedding), to reproduce old checkpoints.
    prepend_cls_token: bool = True
    mvc_decoder_style: str = "inner product, detach"
    attention: str = "auto"
    # Queries per tile of the chunked attention in training (tiles of a few MB were fastest
    # for forward + backward on CPU).
    attention_block_size: int = 256
    # The same in deterministic passes (validation, evaluation, prediction), which keep nothing
    # for a backward pass: larger tiles were faster there (at sequence 1536 on a 2-core CPU,
    # two 769-query tiles per row took ~14% less time per forward pass than 256-query tiles).
    attention_eval_block_size: int = 1024
    # Rematerialise each transformer layer in the backward pass (less memory, ~30% more FLOPs).
    remat: bool = False
    # Matmul dtype; parameters, LayerNorm, softmax statistics and losses stay float32.
    dtype: str = "float32"
    # What the expression decoder's output is added to: "none" (the decoder predicts the
    # expression, as the original), "control_input" (each token's control value: the decoder
    # predicts the change over the paired cell) or "gene_mean" (a learned per-gene baseline,
    # the parameter `gene_baseline`, that training starts at the control cells' mean: the
    # decoder predicts the change over the control mean and need not undo the paired cell's
    # noise).
    output_baseline: str = "none"
    # How the gene embedding table starts: "random" (uniform, as the original) or "data":
    # principal components of the training data's gene-gene structure (control-cell
    # co-expression and training perturbation profiles), so that genes never perturbed in
    # training start next to the genes they co-vary with (scformer_jax.gene_features).
    gene_embedding_init: str = "random"
    # True: a multi-gene perturbation is predicted as the sum of its singles' changes
    # (measured in training where the single was trained on, else the model's own single
    # prediction) plus the model's output, which learns the interaction (scformer_jax.prior).
    additive_prior: bool = False
    # True: training is unchanged; a multi-gene perturbation's prediction is corrected by the
    # model's own error on each of its singles measured in training (measured mean minus the
    # model's prediction of that single on the same cell), in validation, eval and predict
    # (scformer_jax.prior). Excludes additive_prior.
    seen_single_correction: bool = False
    # True: the measured training singles' changes that additive_prior or
    # seen_single_correction put into multi-gene predictions are first shrunk towards no
    # change, gene by gene, by their sampling error (empirical Bayes; scformer_jax.prior).
    # Needs one of the two.
    shrink_singles: bool = False
    # The prior of that shrinkage: "normal" (one normal per gene, its variance from all the
    # singles' changes of the gene: every single's change of a gene is scaled by the same
    # factor) or "adaptive" (one mixture of a point mass at no change and normals of growing
    # spread for every change, fitted by penalised maximum likelihood: a change large against
    # its error is barely shrunk, one within its noise goes near no change). See
    # scformer_jax.prior.
    shrink_prior: str = "normal"
    # True: every perturbation of measured genes starts from what the control cells'
    # co-expression implies (the regression of each gene on the perturbed one, scaled by the
    # training singles' typical direct effect) and the model learns the rest
    # (scformer_jax.prior).
    coexpression_prior: bool = False
    # How a single perturbation of a measured gene that has no single in the training split
    # is predicted: "network" (the model's output for it, plus the priors) or "prior" (the
    # model's prediction of the control cell unperturbed plus the gene's co-expression prior:
    # the network's own guess for a gene it never saw perturbed is not used) or "no_network"
    # (the control mean plus that prior: no network at all, as the coexpression baseline;
    # the same for every cell). "prior" and "no_network" need coexpression_prior.
    # Validation, eval and predict apply it; training is unchanged (scformer_jax.predict).
    unseen_single: str = "network"
    # The same for a measured gene without a training single inside a multi-gene
    # perturbation, under seen_single_correction: "network" (the network's output for the
    # combination carries its guess for that gene) or "prior" (the combination is also
    # corrected by the network's error on that gene's single, with the single's
    # unseen_single: prior prediction standing in for a measurement, so the combination keeps
    # the measured singles, the prior's guess for the unseen gene and the network's
    # interaction; needs seen_single_correction and coexpression_prior) or "no_network" (a
    # combination whose every gene is measured and has a training single or a co-expression
    # prior, one at least without a single, is predicted from the priors alone: the control
    # mean plus its measured singles' changes plus the co-expression prior of the others).
    # Validation, eval and predict apply it; training is unchanged (scformer_jax.predict).
    unseen_in_combo: str = "network"
    # Predictions set on the control mean: every network output in a prediction counts as
    # its change over the network's own prediction of the same control cells unperturbed
    # (one more network pass per condition). Takes out of the mean profile the network's
    # drift (what it predicts for a control cell with no flag set) and the noise of the few
    # control cells paired with a condition; each cell keeps its own variation. Validation,
    # eval and predict apply it; training is unchanged (scformer_jax.predict).
    control_anchor: bool = False
    # How the parameters start: "flax" (the modules' initialisers: Flax's lecun_normal for
    # most dense kernels, zero classifier and MVC biases, layers drawn independently) or
    # "torch" (the distributions the PyTorch original starts from: nn.Linear's
    # U(+-1/sqrt(fan_in)) kernels and biases, the whole gene embedding uniform(-0.1, 0.1)
    # with its pad row, and every transformer layer a copy of the first, as
    # nn.TransformerEncoder deep-copies its layer). See scformer_jax.model.init_params.
    init: str = "flax"
    # scGPT's perturbation-model variants (defaults: scFormer's model). See the README's
    # checkpoint section for which scGPT version uses which.
    # The expression decoder: "linear" (one Dense, scFormer), "mlp" (Dense-LeakyReLU-Dense-
    # LeakyReLU-Dense, scGPT's ExprDecoder) or "affine" (two such MLPs giving a coefficient
    # and a bias: prediction = coefficient * control value + bias, scGPT's AffineExprDecoder).
    expr_decoder: str = "linear"
    # Affine decoder only: an activation on the coefficient and the bias (scGPT's names, e.g.
    # "ReLU"; null: none), and the bias scaled by the cell's mean non-zero input value.
    decoder_activation: str | None = None
    decoder_adaptive_bias: bool = False
    # BatchNorm over the summed gene + value + flag embeddings (scGPT's `bn`, eps 6.1e-5,
    # momentum 0.1): batch statistics of the real tokens in training, running statistics
    # (non-trainable, kept beside the parameters) in validation, eval and prediction.
    input_batchnorm: bool = False
    # A second decoder head gives each token's probability of a non-zero value (scGPT's
    # `zero_probs`, output "mlm_zero_probs", and "mvc_zero_probs" for the inner-product MVC
    # decoder). Needs expr_decoder mlp or affine. No loss trains it here.
    explicit_zero_prob: bool = False
    # Eval only (validation, eval, prediction): the prediction is the decoder's value times
    # a Bernoulli(zero_probs) draw, as scGPT's pred_perturb; needs explicit_zero_prob.
    sample_zero_prob: bool = False
    # scGPT's pre-norm layer (norm_scheme "pre"): x = LN1(x); x += attn(x); x = LN2(x);
    # x += ff(x) (the residual starts from the normalised input; no final norm).
    pre_norm: bool = False

    def __post_init__(self):
        for name in (
            "embsize",
            "d_hid",
            "nlayers",
            "nhead",
            "nlayers_cls",
            "n_cls",
            "attention_block_size",
            "attention_eval_block_size",
        ):
            _check_range(f"model.{name}", getattr(self, name), 1)
        if self.embsize % self.nhead:
            raise ConfigError(
                f"model.embsize ({self.embsize}) must be divisible by model.nhead ({self.nhead})."
            )
        _check_range("model.dropout", self.dropout, 0.0, 0.999)
        if self.attention_dropout is not None:
            _check_range("model.attention_dropout", self.attention_dropout, 0.0, 0.999)
        _check_choice("model.cell_emb_style", self.cell_emb_style, CELL_EMB_STYLES)
        _check_choice("model.mvc_decoder_style", self.mvc_decoder_style, MVC_DECODER_STYLES)
        _check_choice("model.attention", self.attention, ATTENTION_IMPLEMENTATIONS)
        _check_choice("model.dtype", self.dtype, ("float32", "bfloat16"))
        _check_choice("model.gene_embedding_init", self.gene_embedding_init, GENE_EMBEDDING_INITS)
        _check_choice("model.output_baseline", self.output_baseline, OUTPUT_BASELINES)
        _check_choice("model.init", self.init, PARAM_INITS)
        _check_choice("model.unseen_single", self.unseen_single, UNSEEN_SINGLE_PREDICTIONS)
        _check_choice("model.unseen_in_combo", self.unseen_in_combo, UNSEEN_IN_COMBO_PREDICTIONS)
        _check_choice("model.shrink_prior", self.shrink_prior, SHRINK_PRIORS)
        _check_choice("model.expr_decoder", self.expr_decoder, EXPR_DECODERS)
        if self.decoder_activation is not None:
            _check_choice("model.decoder_activation", self.decoder_activation, DECODER_ACTIVATIONS)
        if self.expr_decoder != "affine" and (
            self.decoder_activation is not None or self.decoder_adaptive_bias
        ):
            raise ConfigError(
                "model.decoder_activation and model.decoder_adaptive_bias belong to the affine "
                f"decoder; set model.expr_decoder: affine (it is {self.expr_decoder!r}) or "
                "remove them."
            )
        if self.explicit_zero_prob and self.expr_decoder == "linear":
            raise ConfigError(
                "model.explicit_zero_prob needs model.expr_decoder mlp or affine (scGPT's "
                "decoders with a zero-probability head); the linear decoder has none."
            )
        if self.sample_zero_prob and not self.explicit_zero_prob:
            raise ConfigError(
                "model.sample_zero_prob samples from the zero probabilities: set "
                "model.explicit_zero_prob: true as well, or sample_zero_prob: false."
            )
        if self.attention in ("xla", "cudnn") and self.attn_dropout_rate > 0:
            raise ConfigError(
                f"model.attention {self.attention!r} has no attention-weight dropout but the "
                f"config asks for {self.attn_dropout_rate}; set model.attention_dropout: 0.0 "
                "(or model.dropout: 0.0), or use attention 'chunked' / 'full'."
            )
        if self.additive_prior and self.seen_single_correction:
            raise ConfigError(
                "model.additive_prior and model.seen_single_correction both correct multi-gene "
                "predictions by the measured singles: set one of them to false."
            )
        if self.shrink_singles and not (self.additive_prior or self.seen_single_correction):
            raise ConfigError(
                "model.shrink_singles shrinks the measured singles that multi-gene predictions "
                "use: set model.seen_single_correction: true (or model.additive_prior: true), "
                "or model.shrink_singles: false."
            )
        if self.shrink_prior != "normal" and not self.shrink_singles:
            raise ConfigError(
                f"model.shrink_prior: {self.shrink_prior} chooses the prior of "
                "model.shrink_singles, which is off: set model.shrink_singles: true (or "
                "model.shrink_prior: normal)."
            )
        if self.unseen_in_combo != "network" and not (
            self.seen_single_correction and self.coexpression_prior
        ):
            raise ConfigError(
                f"model.unseen_in_combo: {self.unseen_in_combo} predicts multi-gene "
                "perturbations from their measured singles and the co-expression prior of their "
                "unseen genes: set model.seen_single_correction: true and "
                "model.coexpression_prior: true (or model.unseen_in_combo: network)."
            )
        if self.unseen_single != "network" and not self.coexpression_prior:
            raise ConfigError(
                f"model.unseen_single: {self.unseen_single} predicts unseen singles from the "
                "co-expression prior: set model.coexpression_prior: true (or "
                "model.unseen_single: network)."
            )
        if self.pert_pad_id in (0, 1) or not 0 <= self.pert_pad_id <= 2:
            raise ConfigError(
                f"model.pert_pad_id must be 2 (flags 0 and 1 are taken); got {self.pert_pad_id}."
            )

    @property
    def attn_dropout_rate(self) -> float:
        return self.dropout if self.attention_dropout is None else self.attention_dropout

    def attention_block_size_for(self, deterministic: bool) -> int:
        """Queries per tile of the chunked attention in a deterministic (eval) or training pass."""
        return self.attention_eval_block_size if deterministic else self.attention_block_size

    @property
    def uses_cls_token(self) -> bool:
        return self.cell_emb_style == "cls" and self.prepend_cls_token

    def with_vocab(self, vocab: Any, *, n_cls: int | None = None) -> ModelConfig:
        """This config on `vocab`'s tokens (anything with ``n_tokens``, ``pad_token_id`` and
        ``cls_token_id``, e.g. a :class:`~scformer_jax.data.dataset.PerturbData`); `n_cls`
        also sets the classifier's classes."""
        return dataclasses.replace(
            self,
            ntoken=vocab.n_tokens,
            pad_token_id=vocab.pad_token_id,
            cls_token_id=vocab.cls_token_id,
            n_cls=self.n_cls if n_cls is None else n_cls,
        )


@dataclasses.dataclass(frozen=True)
class ObjectiveConfig:
    """Which objectives train the model and their named weights.

    The total loss is ``sum(weight_k * loss_k)`` over the enabled objectives; the original
    script hard-coded 10 for CCE and ECS.
    """

    mlm: bool = True  # masked MSE on expression; always on, kept as a key for clarity
    cls: bool = False
    cce: bool = False
    mvc: bool = False
    ecs: bool = False
    mse_weight: float = 1.0
    cls_weight: float = 1.0
    cce_weight: float = 10.0
    mvc_weight: float = 1.0
    ecs_weight: float = 10.0
    cce_temperature: float = 0.5
    ecs_threshold: float = 0.85

    def __post_init__(self):
        if not self.mlm:
            raise ConfigError(
                "objective.mlm: the expression MSE is the perturbation objective and is always "
                "on; set objective.mlm: true (use objective.mse_weight to rescale it)."
            )
        for name in ("mse_weight", "cls_weight", "cce_weight", "mvc_weight", "ecs_weight"):
            _check_range(f"objective.{name}", getattr(self, name), 0.0)
        _check_range("objective.cce_temperature", self.cce_temperature, 0.0, low_open=True)
        _check_range("objective.ecs_threshold", self.ecs_threshold, 0.0, 1.0)

    def weights(self) -> dict[str, float]:
        """The weight of every enabled objective, by loss name."""
        out = {"mse": self.mse_weight}
        for name in ("cls", "cce", "mvc", "ecs"):
            if getattr(self, name):
                out[name] = getattr(self, f"{name}_weight")
        return out


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where the data comes from and how cells become token sequences."""

    # A GEARS data folder, a .h5ad file, or a built-in dataset name ("simulated", ...).
    path: str = "simulated"
    split: str = "simulation"
    split_seed: int = 1
    train_gene_set_size: float = 0.75
    combo_seen2_train_frac: float = 0.75
    split_path: str | None = None
    include_zero_gene: str = "all"
    max_seq_len: int = 1536
    # obs column holding the labels of the CLS objective.
    label_key: str = "cell_type"
    # True: re-draw the control cell paired with each perturbed cell every epoch. False:
    # draw it once and keep it for every epoch, as GEARS (one control per perturbed cell,
    # drawn when its dataset is built).
    redraw_pairing: bool = True
    # Drop the last partial training batch every epoch (GEARS's train loader does); False:
    # pad it with weight-0 rows. Validation and evaluation always score every cell.
    drop_last: bool = False
    # Data-loader seed (pairing, shuffling, gene sampling); None: train.seed.
    seed: int | None = None
    # Training target of each cell: "cell" (the perturbed cell's own expression, as GEARS
    # and the original) or "condition_mean" (the mean over the condition's training cells:
    # the same optimum under MSE, without the cell-to-cell noise of one random cell).
    train_target: str = "cell"
    # Where X lives while training, validating and evaluating: "auto" (read it from the
    # .h5ad on disk when X or the whole file is larger than backed_above_gb GB), true (always
    # from disk) or false (always in memory, the fast path).
    backed: bool | str = "auto"
    backed_above_gb: float = 4.0
    # Most megabytes of cells the on-disk reader keeps cached.
    cache_mb: int = 512

    def __post_init__(self):
        if self.backed not in ("auto", True, False):
            raise ConfigError(f"data.backed: {self.backed!r} is not one of auto, true, false.")
        _check_range("data.backed_above_gb", self.backed_above_gb, 0.0)
        _check_range("data.cache_mb", self.cache_mb, 1)
        _check_choice("data.include_zero_gene", self.include_zero_gene, INCLUDE_ZERO_GENE_MODES)
        _check_choice("data.train_target", self.train_target, TRAIN_TARGETS)
        _check_range("data.max_seq_len", self.max_seq_len, 2)
        _check_range("data.train_gene_set_size", self.train_gene_set_size, 0.0, 1.0, low_open=True)
        _check_range("data.combo_seen2_train_frac", self.combo_seen2_train_frac, 0.0, 1.0)


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """Adam with global-norm clipping and a step decay per `schedule_interval` epochs."""

    lr: float = 1e-4
    schedule_interval: int = 1
    decay: float = 0.9  # lr multiplied by this every schedule_interval epochs (StepLR gamma)
    grad_clip_norm: float = 1.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0
    # Validation, checkpoint selection, eval and predict use an exponential moving average of
    # the parameters with this decay per step (0: the parameters themselves).
    ema_decay: float = 0.0

    def __post_init__(self):
        _check_range("optim.lr", self.lr, 0.0, low_open=True)
        _check_range("optim.ema_decay", self.ema_decay, 0.0, 1.0, high_open=True)
        _check_range("optim.schedule_interval", self.schedule_interval, 1)
        _check_range("optim.decay", self.decay, 0.0, 1.0, low_open=True)
        _check_range("optim.grad_clip_norm", self.grad_clip_norm, 0.0, low_open=True)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """The loop: sizes, epochs, validation, checkpoints, logging."""

    batch_size: int = 32
    eval_batch_size: int = 32
    epochs: int = 6
    early_stop: int = 5  # epochs without improvement of `best_metric` before stopping
    best_metric: str = "val_pearson_delta"
    # "max" or "min"; None: "min" for mse/mre, "max" for the pearson metrics.
    best_mode: str | None = None
    log_interval: int = 100
    seed: int = 42
    # Stop after this many steps in total (0: no limit); for smoke tests and benchmarks.
    max_steps: int = 0
    # Validation batches per epoch (0: the whole validation set).
    max_val_batches: int = 0
    keep_checkpoints: int = 1
    # Show the masked relative error in the training log line (metrics.jsonl always has it);
    # on targets near zero it reaches the hundreds of thousands and says little.
    log_mre: bool = False
    # A PyTorch scGPT/scFormer checkpoint folder to start from, and which parameter groups
    # to take from it (empty: all that match).
    load_model: str | None = None
    load_param_prefixes: tuple[str, ...] = ()

    def __post_init__(self):
        for name in ("batch_size", "eval_batch_size", "epochs", "log_interval", "keep_checkpoints"):
            _check_range(f"train.{name}", getattr(self, name), 1)
        _check_range("train.early_stop", self.early_stop, 0)
        _check_range("train.max_steps", self.max_steps, 0)
        _check_range("train.max_val_batches", self.max_val_batches, 0)
        metric = self.best_metric.removeprefix("val_")
        _check_choice("train.best_metric", metric, VALIDATION_METRICS)
        natural = "min" if metric.startswith(("mse", "mre")) else "max"
        if self.best_mode is None:
            object.__setattr__(self, "best_mode", natural)
        _check_choice("train.best_mode", self.best_mode, ("min", "max"))
        if self.best_mode != natural:
            raise ConfigError(
                f"train.best_mode {self.best_mode!r} would keep the worst checkpoint by "
                f"{self.best_metric!r} (lower is better for mse/mre, higher for pearson); set "
                f"train.best_mode: {natural} or leave it out."
            )


@dataclasses.dataclass(frozen=True)
class Config:
    """The whole run."""

    model: ModelConfig = ModelConfig()
    objective: ObjectiveConfig = ObjectiveConfig()
    data: DataConfig = DataConfig()
    optim: OptimConfig = OptimConfig()
    train: TrainConfig = TrainConfig()


_SECTIONS = {f.name: f.type for f in dataclasses.fields(Config)}
_SECTION_TYPES = {
    "model": ModelConfig,
    "objective": ObjectiveConfig,
    "data": DataConfig,
    "optim": OptimConfig,
    "train": TrainConfig,
}


def _unknown_key_error(where: str, key: str, valid: list[str]) -> ConfigError:
    close = difflib.get_close_matches(key, valid, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return ConfigError(f"Unknown key {key!r} in {where}.{hint} Valid keys: {', '.join(valid)}.")


def _coerce(where: str, value: Any, annotation: Any) -> Any:
    """Checks `value` against a field annotation (the few types the configs use)."""
    if isinstance(annotation, str):
        annotation = eval(annotation, {"typing": typing}, {})  # noqa: S307 - our own annotations
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(annotation)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(where, value, arg)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{where}: bad value {value!r}.")
    if origin is tuple:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}.")
        (item_type, _) = typing.get_args(annotation)
        return tuple(_coerce(where, v, item_type) for v in value)
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true or false, got {value!r}.")
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{where}: expected an integer, got {value!r}.")
        return value
    if annotation is float:
        if isinstance(value, str):
            # YAML 1.1 reads "3e-4" (no dot) as a string; accept it as the number it means.
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}.")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}.")
        return value
    return value


def _build_section(name: str, values: Mapping[str, Any]) -> Any:
    cls = _SECTION_TYPES[name]
    fields = {f.name: f for f in dataclasses.fields(cls)}
    if not isinstance(values, Mapping):
        raise ConfigError(f"Section {name!r} must be a mapping of keys to values, got {values!r}.")
    kwargs = {}
    for key, value in values.items():
        if key not in fields:
            raise _unknown_key_error(name, key, sorted(fields))
        kwargs[key] = _coerce(f"{name}.{key}", value, fields[key].type)
    return cls(**kwargs)


def config_from_dict(raw: Mapping[str, Any] | None) -> Config:
    """Builds a :class:`Config`; unknown sections or keys raise :class:`ConfigError`."""
    raw = dict(raw or {})
    for section in raw:
        if section not in _SECTIONS:
            raise _unknown_key_error("the config's top level", section, sorted(_SECTIONS))
    return Config(**{name: _build_section(name, raw.get(name) or {}) for name in _SECTIONS})


def config_to_dict(config: Config) -> dict[str, dict[str, Any]]:
    out = dataclasses.asdict(config)
    for section in out.values():
        for key, value in section.items():
            if isinstance(value, tuple):
                section[key] = list(value)
    return out


def parse_override(text: str) -> tuple[str, str, Any]:
    """``"optim.lr=3e-4"`` -> ``("optim", "lr", 3e-4)``; the value is read as YAML."""
    if "=" not in text or "." not in text.split("=", 1)[0]:
        raise ConfigError(
            f"Override {text!r} must look like section.key=value, e.g. optim.lr=3e-4."
        )
    path, value = text.split("=", 1)
    section, key = path.strip().split(".", 1)
    return section, key, yaml.safe_load(value)


def apply_overrides(raw: Mapping[str, Any], overrides: list[str]) -> dict[str, Any]:
    raw = {k: dict(v or {}) for k, v in dict(raw or {}).items()}
    for text in overrides:
        section, key, value = parse_override(text)
        raw.setdefault(section, {})[key] = value
    return raw


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Reads one YAML file; a top-level ``base: other.yaml`` (relative to it) is read first
    and this file's sections update it key by key."""
    if not path.is_file():
        raise ConfigError(f"Config file {str(path)!r} does not exist.")
    if path.resolve() in seen:
        raise ConfigError(f"Config file {str(path)!r} includes itself through 'base'.")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"Config file {str(path)!r} is not valid YAML: {e}") from e
    if not isinstance(raw, Mapping):
        raise ConfigError(f"Config file {str(path)!r} must hold a mapping of sections.")
    raw = dict(raw)
    base = raw.pop("base", None)
    if base is None:
        return raw
    merged = _read_yaml(path.parent / base, seen + (path.resolve(),))
    for section, values in raw.items():
        if isinstance(values, Mapping) and isinstance(merged.get(section), Mapping):
            merged[section] = {**merged[section], **values}
        else:
            merged[section] = values
    return merged


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """Reads a YAML config (or the defaults when `path` is None) and applies overrides."""
    raw = _read_yaml(Path(path)) if path is not None else {}
    return config_from_dict(apply_overrides(raw, list(overrides)))


def save_config(config: Config, path: str | Path) -> None:
    """Writes the resolved config as YAML (atomically)."""
    write_text_atomic(path, yaml.safe_dump(config_to_dict(config), sort_keys=False))
