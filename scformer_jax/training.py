"""Training library: train state, optimiser, the per-device train step and the loop.

``train.py`` only parses arguments and calls :func:`train_and_evaluate`.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct
from flax.training import train_state
from tensorboardX import SummaryWriter
from tqdm.auto import tqdm

from scformer_jax import parallel, runs
from scformer_jax.batch import PerturbBatch
from scformer_jax.checkpoints import Checkpoints
from scformer_jax.config import (
    VALIDATION_METRICS,
    Config,
    ModelConfig,
    ObjectiveConfig,
)
from scformer_jax.convert import load_pretrained_params
from scformer_jax.data.batching import BatchLoader
from scformer_jax.data.conditions import CONTROL
from scformer_jax.evaluation import observed_reference, score
from scformer_jax.gene_features import init_from_data
from scformer_jax.io import RunFolderLock, write_text_atomic
from scformer_jax.model import BATCH_STATS, TransformerGenerator, init_params
from scformer_jax.objectives import loss_terms, objective_value
from scformer_jax.predict import Predictor, full_profiles
from scformer_jax.prior import measure_training, prior_for, uses_prior

log = logging.getLogger(__name__)


class TrainState(train_state.TrainState):
    """Params, optimiser state and step, and with ``optim.ema_decay`` > 0 an exponential
    moving average of the params (``ema_params``, what validation and the checkpoint's
    evaluation use); nothing else lives on the devices."""

    ema_params: Any = None
    ema_decay: float = struct.field(pytree_node=False, default=0.0)

    @property
    def eval_params(self) -> Any:
        """The parameters that validation, eval and predict apply."""
        return self.params if self.ema_params is None else self.ema_params


def update_ema(ema: Any, params: Any, step, decay: float) -> Any:
    """The parameters' moving average after step ``step`` (1, 2, ...), bias-corrected.

    The average of the parameters after steps 1..t with weights ``decay ** (t - i)``, divided
    by their sum (as Adam corrects its moments, so the initialisation carries no weight and
    ``decay`` sets the horizon, about ``1 / (1 - decay)`` steps, from the first step):
    ``ema + (params - ema) * (1 - decay) / (1 - decay ** t)``.
    """
    step = jnp.asarray(step, jnp.float32)
    rate = (1.0 - decay) / (1.0 - jnp.power(decay, step))
    return jax.tree_util.tree_map(lambda e, p: e + (rate * (p - e)).astype(e.dtype), ema, params)


class NonFiniteError(RuntimeError):
    """The loss, the gradient norm or the parameters became NaN or inf; the message names the
    step. That step is never checkpointed."""


def make_optimizer(optim, steps_per_epoch: int) -> tuple[optax.GradientTransformation, Any]:
    """Adam with global-norm clipping and the original's StepLR decay per epoch interval."""
    schedule = optax.exponential_decay(
        init_value=optim.lr,
        transition_steps=max(1, steps_per_epoch * optim.schedule_interval),
        decay_rate=optim.decay,
        staircase=True,
    )
    adam = (
        optax.adamw(
            schedule, b1=optim.b1, b2=optim.b2, eps=optim.eps, weight_decay=optim.weight_decay
        )
        if optim.weight_decay > 0
        else optax.adam(schedule, b1=optim.b1, b2=optim.b2, eps=optim.eps)
    )
    return optax.chain(optax.clip_by_global_norm(optim.grad_clip_norm), adam), schedule


def create_train_state(
    model_config: ModelConfig, optim, steps_per_epoch: int, rng, params: Any | None = None
) -> tuple[TrainState, Any]:
    model = TransformerGenerator(model_config)
    if params is None:
        params = init_params(model_config, rng)
    tx, schedule = make_optimizer(optim, steps_per_epoch)
    ema = jax.tree_util.tree_map(jnp.array, params) if optim.ema_decay > 0 else None
    state = TrainState.create(
        apply_fn=model.apply, params=params, tx=tx, ema_params=ema, ema_decay=optim.ema_decay
    )
    return state, schedule


def train_step(
    state: TrainState,
    batch: PerturbBatch,
    rng,
    *,
    model: TransformerGenerator,
    objective,
    axis_name: str | None = parallel.AXIS,
):
    """One optimisation step on this device's shard of the batch.

    Per-device code: gradients are averaged over ``axis_name`` (``lax.pmean``), so the
    update equals the single-device update on the global batch. ``rng`` is the step's key;
    each device folds in its index so dropout differs across shards.
    """
    if axis_name is not None:
        rng = jax.random.fold_in(rng, jax.lax.axis_index(axis_name))

    def loss_fn(params):
        terms, out = loss_terms(
            model, params, batch, rng, objective, deterministic=False, axis_name=axis_name
        )
        loss, metrics = objective_value(terms, objective, axis_name=axis_name)
        return loss, (metrics, out.get(BATCH_STATS))

    (_, (metrics, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    if axis_name is not None:
        grads = jax.lax.pmean(grads, axis_name)
    metrics["grad_norm"] = optax.tree.norm(grads)
    state = state.apply_gradients(grads=grads)
    if batch_stats is not None:
        # Running statistics are not trained: their new values replace whatever the
        # optimiser did to them (their gradient is zero), averaged over the devices.
        if axis_name is not None:
            batch_stats = jax.lax.pmean(batch_stats, axis_name)
        state = state.replace(params={**state.params, BATCH_STATS: batch_stats})
    if state.ema_params is not None:
        state = state.replace(
            ema_params=update_ema(state.ema_params, state.params, state.step, state.ema_decay)
        )
    return state, metrics


def eval_step(
    params,
    batch: PerturbBatch,
    *,
    model: TransformerGenerator,
    axis_name: str | None = parallel.AXIS,
):
    """Eval-mode (numerator, denominator) of MSE and MRE, summed over devices, and the
    predicted expression of every input token (0 at padding)."""
    # The default objective has only the expression MSE: no second CCE pass, no extra heads.
    terms, out = loss_terms(
        model,
        params,
        batch,
        jax.random.PRNGKey(0),
        ObjectiveConfig(),
        deterministic=True,
        axis_name=axis_name,
    )
    sums = {}
    for name in ("mse", "mre"):
        num, den = terms[name]
        if axis_name is not None:
            num, den = jax.lax.psum(num, axis_name), jax.lax.psum(den, axis_name)
        sums[name] = (num, den)
    pred = jnp.where(batch.padding_mask, 0.0, out["mlm_output"])
    return sums, pred


def make_p_train_step(model, objective):
    return parallel.pmap(
        functools.partial(train_step, model=model, objective=objective), donate_argnums=(0,)
    )


def make_p_eval_step(model):
    return parallel.pmap(functools.partial(eval_step, model=model))


# ---------------------------------------------------------------------------------------------
# Logging


class MetricsWriter:
    """JSON lines (``metrics.jsonl``) and TensorBoard events, from the primary process only."""

    def __init__(self, workdir: Path, enabled: bool = True, *, purge_step: int | None = None):
        """`purge_step`: the first step this writer logs; TensorBoard hides the events of an
        earlier attempt from that step on (a resumed run writes them again)."""
        self.enabled = enabled
        self.path = workdir / runs.METRICS_FILE
        self._file = None
        self._tb = None
        if enabled:
            self._file = open(self.path, "a", buffering=1)
            try:
                self._tb = SummaryWriter(str(workdir / runs.TENSORBOARD_DIR), purge_step=purge_step)
            except Exception as e:  # noqa: BLE001 - TensorBoard is a convenience
                log.warning("TensorBoard logging disabled: %s", e)

    def write(self, kind: str, step: int, values: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"kind": kind, "step": int(step)}
        record.update(
            {
                k: (
                    float(v)
                    if isinstance(v, (int, float, np.floating, np.integer))
                    or (hasattr(v, "shape") and np.ndim(v) == 0)
                    else v
                )
                for k, v in values.items()
            }
        )
        try:
            self._file.write(json.dumps(record) + "\n")
        except OSError as e:  # a full disk: name the file, which write() does not
            raise type(e)(e.errno, e.strerror, str(self.path)) from e
        if self._tb is not None:
            for key, value in record.items():
                if (
                    key not in ("kind", "step")
                    and isinstance(value, float)
                    and math.isfinite(value)
                ):
                    self._tb.add_scalar(f"{kind}/{key}", value, step)

    def close(self) -> None:
        try:
            if self._file is not None:
                self._file.close()
        finally:
            self._file = None
            if self._tb is not None:
                tb, self._tb = self._tb, None
                try:
                    tb.close()
                except OSError as e:  # TensorBoard is a convenience; metrics.jsonl is the record
                    log.warning("TensorBoard events not flushed: %s", e)


# ---------------------------------------------------------------------------------------------
# The loop


@dataclasses.dataclass
class LoopState:
    """Where the loop is; saved with every checkpoint (JSON)."""

    epoch: int = 0  # the next epoch to run
    batch_in_epoch: int = 0  # batches of `epoch` already done (a max_steps stop mid-epoch)
    best_value: float | None = None
    best_epoch: int = -1
    epochs_without_improvement: int = 0


def _improved(value: float, best: float | None, mode: str) -> bool:
    if value is None or not math.isfinite(value):
        return False
    return best is None or (value > best if mode == "max" else value < best)


def model_config_for(config: Config, dataset) -> ModelConfig:
    """The model config with the vocabulary and class count taken from the dataset."""
    labels = dataset.label_names if config.objective.cls else None
    return config.model.with_vocab(
        dataset, n_cls=max(1, len(labels)) if labels is not None else None
    )


def _loader(
    dataset,
    conditions,
    config: Config,
    *,
    train: bool,
    batch_size: int,
    prior=None,
    share=None,
    condition_means=None,
):
    seed = config.data.seed if config.data.seed is not None else config.train.seed
    # Evaluation scores every gene of a cell, as the original's pred_perturb: no sampling.
    max_len = config.data.max_seq_len if train else None
    return BatchLoader(
        dataset,
        conditions,
        batch_size=batch_size,
        include_zero_gene=config.data.include_zero_gene,
        max_seq_len=max_len,
        seed=seed,
        shuffle=train,
        pad_value=config.model.pad_value,
        pert_pad_id=config.model.pert_pad_id,
        frozen_pairing=not config.data.redraw_pairing if train else True,
        drop_last=config.data.drop_last and train,
        target=config.data.train_target if train else "cell",
        # The priors' parts of the targets (co-expression prior, additive prior of doubles)
        # are taken off: the model learns the rest.
        target_offsets=None
        if prior is None or not (config.model.additive_prior or config.model.coexpression_prior)
        else prior.offsets(conditions, dataset.n_genes, additive=config.model.additive_prior),
        condition_means=condition_means,
        share=share,
    )


def validate(p_eval, params_repl, loader, dataset, *, max_batches: int = 0, predictor=None):
    """Validation loss (eval-mode MSE/MRE over every scored token of the val cells) and
    GEARS's metrics on mean profiles per condition, computed as ``eval.py`` does: genes that
    are not input tokens of a cell keep its control value, and the truth is the whole cell.

    ``predictor``: a :class:`~scformer_jax.predict.Predictor` holding the priors
    (``model.coexpression_prior``, ``model.additive_prior``, ``model.seen_single_correction``)
    and the control anchor (``model.control_anchor``);
    its :meth:`prior_part` is added to the model's output, as in prediction. The loss scores
    the model's own output (with the co-expression or additive prior: the change beyond
    them)."""
    num = {"mse": 0.0, "mre": 0.0}
    den = {"mse": 0.0, "mre": 0.0}
    pred_sum: dict[str, np.ndarray] = {}
    cells: dict[str, list[int]] = {}
    for i, host in enumerate(loader.epoch(0)):
        if max_batches and i >= max_batches:
            break
        sums, pred = p_eval(params_repl, parallel.shard_batch(host.batch))
        for name, (n, d) in sums.items():
            num[name] += float(parallel.first_replica(n))
            den[name] += float(parallel.first_replica(d))
        full = full_profiles(
            dataset.dense_rows(host.control_indices[: host.n_real]),
            parallel.gather_rows(pred),
            host.gene_index,
        )
        if predictor is not None:
            conds = np.asarray(host.conditions[: host.n_real])
            for cond in set(conds.tolist()):
                rows = np.flatnonzero(conds == cond)
                full[rows] += predictor.prior_part(cond, host.control_indices[rows], full[rows])
        for row in range(host.n_real):
            cond = host.conditions[row]
            pred_sum[cond] = pred_sum.get(cond, 0.0) + full[row]
            cells.setdefault(cond, []).append(int(host.cell_indices[row]))
    out = {f"val_{k}": num[k] / den[k] if den[k] else 0.0 for k in num}
    perturbed = [c for c in pred_sum if c != CONTROL]
    if perturbed:
        result = score(
            observed_reference(dataset, {c: cells[c] for c in perturbed}),
            {c: pred_sum[c] / len(cells[c]) for c in perturbed},
        )
        for key in VALIDATION_METRICS:
            # val_mse / val_mre stay the token-level losses above.
            if key in result.overall and key not in ("mse", "mre"):
                out[f"val_{key}"] = result.overall[key]
    return out


def _format_bar(
    metrics: dict[str, float], lr: float, ms_per_batch: float, cells_s: float, *, mre: bool = False
) -> str:
    """The training log line; the relative error only with ``mre`` (``train.log_mre``)."""
    return (
        f"loss {metrics['loss']:.4f} mse {metrics['mse']:.4f} "
        + (f"mre {metrics['mre']:.3f} " if mre else "")
        + f"lr {lr:.2e} {ms_per_batch:.0f} ms/batch {cells_s:.1f} cells/s"
    )


def _progress(iterable, total: int, desc: str, enabled: bool):
    if not enabled:
        return iterable, None
    bar = tqdm(iterable, total=total, desc=desc, leave=False, dynamic_ncols=True)
    return bar, bar


def _truncate_metrics(path: Path, last_step: int) -> None:
    """Drops records past the checkpoint being resumed from (they will be written again);
    `last_step` 0 (no checkpoint) drops them all."""
    if not path.is_file():
        return
    kept = [
        line
        for line in path.read_text().splitlines()
        if line.strip() and json.loads(line).get("step", 0) <= last_step
    ]
    write_text_atomic(path, "".join(line + "\n" for line in kept))


def train_and_evaluate(config: Config, workdir: str | Path, *, progress: bool = True) -> dict:
    """Trains with `config`, writing checkpoints, metrics and the config into `workdir`.

    Resumes from the newest readable checkpoint in `workdir` when there is one. The primary
    process holds the run-folder lock (``WORKDIR/train.lock``) while it runs. Returns a
    summary dict (best metric, best epoch, steps, workdir).

    Raises:
      RunFolderLockedError: another process is training into `workdir`.
      NonFiniteError: the loss, gradient norm or parameters became non-finite.
      CheckpointWriteError, OSError: a file could not be written (the message names it).
    """
    workdir = Path(workdir)
    if not parallel.is_primary():
        return _train(config, workdir, progress=progress)
    lock = RunFolderLock(workdir).acquire()
    try:
        if lock.stale_message():
            log.warning(lock.stale_message())
        return _train(config, workdir, progress=progress)
    finally:
        # A start that failed on bad input leaves no folder behind.
        lock.release()


def _train(config: Config, workdir: Path, *, progress: bool) -> dict:
    primary = parallel.is_primary()
    runs.check_resume_config(config, workdir)
    # Everything that can fail on bad input (data, split, sizes) runs before the run folder
    # is written, so a failed start leaves nothing behind.
    dataset, split = runs.load_data(config)
    if not split.get("val"):
        raise ValueError(
            f"The {config.data.split!r} split of {config.data.path!r} has no validation "
            "perturbations; use a larger dataset or another split."
        )

    model_config = model_config_for(config, dataset)
    per_device = parallel.check_batch_size(config.train.batch_size)
    parallel.check_batch_size(config.train.eval_batch_size, what="train.eval_batch_size")
    # The training perturbations' cells are read once for the priors, the mean targets and
    # the data-initialised gene embedding.
    profiles_needed = (
        config.data.train_target == "condition_mean" or model_config.gene_embedding_init == "data"
    )
    measured = (
        measure_training(dataset, split["train"], singles_only=not profiles_needed)
        if profiles_needed or uses_prior(model_config)
        else None
    )
    prior = prior_for(model_config, dataset, split["train"], measured=measured)
    # With several processes each assembles (and reads the cells of) only its share of a
    # training batch; validation gathers every prediction, so each process builds it whole.
    train_loader = _loader(
        dataset,
        split["train"],
        config,
        train=True,
        batch_size=config.train.batch_size,
        prior=prior,
        share=parallel.process_share(),
        condition_means=None if measured is None else measured.profiles,
    )
    val_loader = _loader(
        dataset,
        split["val"],
        config,
        train=False,
        batch_size=config.train.eval_batch_size,
        prior=prior,
    )
    steps_per_epoch = len(train_loader)
    if primary:
        runs.create_run_folder(workdir, config, split)

    rng = jax.random.PRNGKey(config.train.seed)
    init_rng, step_rng_base = jax.random.split(rng)
    params = None
    if config.train.load_model:
        params = load_pretrained_params(
            config.train.load_model,
            model_config,
            init_rng,
            prefixes=config.train.load_param_prefixes,
            dataset=dataset,
        )
    params = init_from_data(
        params if params is not None else init_params(model_config, init_rng),
        model_config,
        dataset,
        split["train"],
        seed=config.train.seed,
        embedding=not config.train.load_model,
        profiles=None if measured is None else measured.profiles,
    )
    state, schedule = create_train_state(
        model_config, config.optim, steps_per_epoch, init_rng, params=params
    )
    ckpts = Checkpoints(
        workdir / runs.CHECKPOINTS_DIR,
        best_mode=config.train.best_mode,
        keep_latest=config.train.keep_checkpoints,
    )
    loop = LoopState()
    restored = ckpts.restore(_saved_state(state), move_unreadable=True)
    resumed_step = 0
    if restored is not None:
        step, host_state, meta = restored
        state = state.replace(
            step=host_state["step"],
            params=host_state["params"],
            opt_state=host_state["opt_state"],
            ema_params=host_state.get("ema_params"),
        )
        loop = LoopState(**meta["loop"])
        resumed_step = int(step)
        log.info("Resumed from checkpoint step %d (epoch %d)", step, loop.epoch)
        if primary:
            print(f"Resuming from {ckpts.directory} step {step}, epoch {loop.epoch + 1}")
    if primary:
        # Records past the resumed step (all of them without a checkpoint) are from an
        # attempt that did not finish; this run writes those steps again.
        _truncate_metrics(workdir / runs.METRICS_FILE, resumed_step)

    model = TransformerGenerator(model_config)
    prior_predictor = None
    if prior is not None or model_config.control_anchor:
        # Validation composes the priors and the anchor with the model's output as eval does.
        prior_predictor = Predictor(
            model_config,
            state.eval_params,
            dataset,
            batch_size=config.train.eval_batch_size,
            include_zero_gene=config.data.include_zero_gene,
            prior=prior,
        )
    p_train_step = make_p_train_step(model, config.objective)
    p_eval = make_p_eval_step(model)
    state_repl = parallel.replicate(state)
    writer = MetricsWriter(
        workdir,
        enabled=primary,
        purge_step=resumed_step + 1 if (workdir / runs.TENSORBOARD_DIR).exists() else None,
    )
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(state.params))
    if primary:
        print(
            f"scformer-jax: {dataset.n_genes} genes, {len(split['train'])} train / "
            f"{len(split['val'])} val / {len(split['test'])} test perturbations; "
            f"{n_params / 1e6:.2f}M parameters; {jax.device_count()} device(s) "
            f"({jax.default_backend()}), {per_device} cells per device per step"
        )
        if train_loader.share is not None:
            print(
                f"{train_loader.share.count} processes: each assembles (and reads the cells "
                f"of) its {config.train.batch_size // train_loader.share.count} rows of every "
                "training batch"
            )

    total_steps = int(state.step)
    stopped_early = False
    best_metric = f"val_{config.train.best_metric.removeprefix('val_')}"
    last_val: dict[str, float] = {}
    fed = None
    try:
        for epoch in range(loop.epoch, config.train.epochs):
            t_epoch = time.time()
            start_batch, loop.batch_in_epoch = loop.batch_in_epoch, 0
            batches = (
                parallel.shard_batch(h.batch, local=train_loader.share is not None)
                for h in train_loader.epoch(epoch, start_batch=start_batch)
            )
            if config.train.max_steps:
                # The loader thread draws no batch past the stop: with several processes, a
                # batch one drew and another did not would leave it waiting on the exchange.
                batches = itertools.islice(batches, max(config.train.max_steps - total_steps, 1))
            fed = parallel.prefetch(batches)
            it, bar = _progress(
                fed,
                steps_per_epoch,
                f"epoch {epoch + 1}/{config.train.epochs}",
                progress and primary,
            )
            sums: dict[str, float] = {}
            n_steps = 0
            stopped_mid_epoch = False
            t_last = time.time()
            for batch in it:
                step_rng = jax.random.fold_in(step_rng_base, total_steps)
                state_repl, metrics = p_train_step(state_repl, batch, parallel.replicate(step_rng))
                # Block on every step: queued collectives can stall on few-core CPU hosts,
                # and the loss must be checked before the next step anyway.
                metrics = {k: float(parallel.first_replica(v)) for k, v in metrics.items()}
                total_steps += 1
                n_steps += 1
                bad = {
                    k: metrics[k]
                    for k in ("loss", "grad_norm")
                    if k in metrics and not math.isfinite(metrics[k])
                }
                if bad:
                    raise _non_finite(
                        ", ".join(f"{k} ({v})" for k, v in bad.items()), total_steps, epoch, ckpts
                    )
                for k, v in metrics.items():
                    sums[k] = sums.get(k, 0.0) + v
                now = time.time()
                dt, t_last = now - t_last, now
                lr = float(schedule(total_steps - 1))
                if bar is not None:
                    bar.set_postfix_str(
                        _format_bar(
                            metrics,
                            lr,
                            dt * 1000,
                            config.train.batch_size / max(dt, 1e-9),
                            mre=config.train.log_mre,
                        )
                    )
                writer.write(
                    "train",
                    total_steps,
                    {**metrics, "lr": lr, "epoch": epoch + 1, "ms_per_batch": dt * 1000},
                )
                if bar is None and primary and total_steps % config.train.log_interval == 0:
                    print(
                        f"step {total_steps} (epoch {epoch + 1}): "
                        + _format_bar(
                            metrics,
                            lr,
                            dt * 1000,
                            config.train.batch_size / max(dt, 1e-9),
                            mre=config.train.log_mre,
                        ),
                        flush=True,
                    )
                if config.train.max_steps and total_steps >= config.train.max_steps:
                    stopped_mid_epoch = start_batch + n_steps < steps_per_epoch
                    break
            fed.close()  # stops the loader thread after a mid-epoch stop
            if bar is not None:
                bar.close()
            if stopped_mid_epoch:
                # Save where the epoch stopped: a resume with a larger max_steps goes on with
                # the next batch of this epoch, as an uninterrupted run would.
                loop.epoch, loop.batch_in_epoch = epoch, start_batch + n_steps
                ckpts.save(
                    total_steps,
                    _finite_host_state(state_repl, total_steps, epoch, ckpts),
                    {
                        "loop": dataclasses.asdict(loop),
                        "epoch_metrics": {},
                        "model_config": dataclasses.asdict(model_config),
                    },
                    metric=None,
                )
                if primary:
                    print(
                        f"Stopped at train.max_steps={config.train.max_steps}, in epoch "
                        f"{epoch + 1} after batch {loop.batch_in_epoch}/{steps_per_epoch}."
                    )
                break
            # Checked before validation, which would fail on NaN predictions.
            host_state = _finite_host_state(state_repl, total_steps, epoch, ckpts)
            params_repl = state_repl.eval_params
            if prior_predictor is not None:
                prior_predictor.params = parallel.unreplicate(params_repl)
            val = validate(
                p_eval,
                params_repl,
                val_loader,
                dataset,
                max_batches=config.train.max_val_batches,
                predictor=prior_predictor,
            )
            last_val = val
            epoch_metrics = {f"train_{k}": v / max(n_steps, 1) for k, v in sums.items()}
            epoch_metrics.update(val)
            epoch_metrics["epoch_seconds"] = time.time() - t_epoch
            value = val.get(best_metric)
            if value is None:
                raise ValueError(
                    f"train.best_metric {config.train.best_metric!r} is not computed; "
                    f"choose one of {sorted(k.removeprefix('val_') for k in val)}."
                )
            loop.epoch = epoch + 1
            if _improved(value, loop.best_value, config.train.best_mode):
                loop.best_value, loop.best_epoch = value, epoch + 1
                loop.epochs_without_improvement = 0
            else:
                loop.epochs_without_improvement += 1
            writer.write("epoch", total_steps, {"epoch": epoch + 1, **epoch_metrics})
            if primary:
                print(
                    f"epoch {epoch + 1}/{config.train.epochs}: train loss "
                    f"{epoch_metrics.get('train_loss', float('nan')):.4f}, val mse "
                    f"{val.get('val_mse', float('nan')):.4f}, {best_metric} {value:.4f}"
                    f"{' (best)' if loop.best_epoch == epoch + 1 else ''}, "
                    f"{epoch_metrics['epoch_seconds']:.1f}s"
                )
            ckpts.save(
                total_steps,
                host_state,
                {
                    "loop": dataclasses.asdict(loop),
                    "epoch_metrics": epoch_metrics,
                    "model_config": dataclasses.asdict(model_config),
                },
                metric=value,
            )
            if config.train.max_steps and total_steps >= config.train.max_steps:
                break
            if (
                config.train.early_stop
                and loop.epochs_without_improvement >= config.train.early_stop
            ):
                stopped_early = True
                if primary:
                    print(
                        f"Early stop: no improvement of {best_metric} for "
                        f"{config.train.early_stop} epoch(s)."
                    )
                break
    finally:
        if fed is not None:
            fed.close()  # an error mid-epoch: stop the loader thread before anything else reads
        ckpts.close()
        writer.close()

    summary = {
        "workdir": str(workdir),
        "steps": total_steps,
        "epochs_run": loop.epoch,
        "best_epoch": loop.best_epoch,
        "best_metric": best_metric,
        "best_value": loop.best_value,
        "stopped_early": stopped_early,
        "last_validation": last_val,
    }
    if primary:
        write_text_atomic(workdir / runs.SUMMARY_FILE, json.dumps(summary, indent=2))
    return summary


def _saved_state(state: TrainState) -> dict:
    """What a checkpoint holds of the train state (the optimiser's code is not data)."""
    saved = {"step": state.step, "params": state.params, "opt_state": state.opt_state}
    if state.ema_params is not None:
        saved["ema_params"] = state.ema_params
    return saved


def _non_finite(what: str, step: int, epoch: int, ckpts: Checkpoints) -> NonFiniteError:
    steps = ckpts.steps()
    kept = (
        f"the newest checkpoint, step {steps[-1]} in {ckpts.directory}, is finite and is kept"
        if steps
        else "no checkpoint was written before it"
    )
    return NonFiniteError(
        f"Non-finite {what} at step {step} (epoch {epoch + 1}); this step is not "
        f"checkpointed and {kept}. Lower optim.lr, check the data for NaN/inf, or use dtype "
        "float32."
    )


def _all_finite(tree: Any) -> bool:
    return all(
        bool(np.isfinite(x).all())
        for x in jax.tree_util.tree_leaves(tree)
        if np.issubdtype(np.asarray(x).dtype, np.inexact)
    )


def _finite_host_state(state_repl, step: int, epoch: int, ckpts: Checkpoints) -> dict:
    """The state to checkpoint at `step`, as host arrays; raises when it holds NaN or inf,
    so that no checkpoint is ever non-finite."""
    host_state = _saved_state(parallel.unreplicate(state_repl))
    if not _all_finite(host_state):
        raise _non_finite("parameters or optimiser state", step, epoch, ckpts)
    return host_state
