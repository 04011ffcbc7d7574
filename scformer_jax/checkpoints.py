"""Orbax checkpoints of the train state: the latest and the best by a validation metric.

Each checkpoint holds ``state`` (params, optimiser state, step: host NumPy arrays, saved
unreplicated) and ``meta`` (JSON: the loop's position, best metric so far, the metric of this
checkpoint). A save returns once the checkpoint is on disk, so a failed write (a full disk,
a read-only folder) stops the run at the step that failed, as one :class:`CheckpointWriteError`.
When a resume finds an unreadable step folder (a killed save, a truncated file) it moves it
into ``corrupt/`` with a warning and uses the newest readable one.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import math
import os
import shutil
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as cm

log = logging.getLogger(__name__)
METRIC_KEY = "best_metric_value"
CORRUPT_DIR = "corrupt"
# Free space a save needs beyond the size of the checkpoint itself (file-system overhead).
SPACE_MARGIN_BYTES = 1 << 20


def _join_new_threads(before: set[threading.Thread], *, timeout: float) -> None:
    """Waits up to `timeout` seconds for the threads started since `before` to end.

    A thread whose `start()` was called but that is not running yet cannot be joined (the
    `RuntimeError` of `Thread.join`); it is waited for until it runs. orbax's writer threads
    re-raise their own error from `join`: that thread has ended, and its error is the failed
    save the caller is already reporting, so it is not raised again here.
    """
    deadline = time.monotonic() + timeout
    current = threading.current_thread()
    for thread in set(threading.enumerate()) - before - {current}:
        while (left := deadline - time.monotonic()) > 0:
            try:
                thread.join(timeout=left)
                break
            except Exception as e:  # noqa: BLE001
                if not (isinstance(e, RuntimeError) and "before it is started" in str(e)):
                    break  # the thread's own error: it has ended
                time.sleep(0.01)  # started but not yet running


class CheckpointWriteError(OSError):
    """A checkpoint could not be written; ``str()`` names the step, the folder and the cause."""

    def __init__(self, step: int, directory: Path, cause: BaseException):
        code, reason = _os_cause(cause)
        super().__init__(code, reason, str(directory))
        self.step = step

    def __str__(self) -> str:
        return f"cannot write checkpoint step {self.step} into {self.filename}: {self.strerror}"


# tensorstore reports file errors as absl status codes in the message of a ValueError.
_STATUS_ERRNO = {"RESOURCE_EXHAUSTED": errno.ENOSPC, "PERMISSION_DENIED": errno.EACCES}


def _os_cause(error: BaseException) -> tuple[int, str]:
    """(errno, text) of the file-system error behind `error` and the errors it chains."""
    seen = error
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno:
            return seen.errno, seen.strerror or os.strerror(seen.errno)
        text = str(seen)
        for status, code in _STATUS_ERRNO.items():
            if status in text:
                return code, os.strerror(code)
        seen = seen.__cause__ or seen.__context__
    return errno.EIO, f"{type(error).__name__}: {error}"


class _DropLoggedTracebacks(logging.Filter):
    """Keeps orbax's background-thread tracebacks out of the log while a save runs: the
    failure reaches the caller as one CheckpointWriteError instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.exc_info is None and record.levelno < logging.ERROR


@contextlib.contextmanager
def _quiet_orbax_errors():
    logger = logging.getLogger("absl")
    quiet = _DropLoggedTracebacks()
    logger.addFilter(quiet)
    try:
        yield
    finally:
        logger.removeFilter(quiet)


def _tree_nbytes(tree: Any) -> int:
    return sum(int(np.asarray(x).nbytes) for x in jax.tree_util.tree_leaves(tree))


def _folder_bytes(path: Path) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.stat(os.path.join(root, name)).st_blocks * 512
    return total


class Checkpoints:
    """Keeps the newest checkpoint and the best one by ``metrics[METRIC_KEY]``.

    Args:
      directory: the folder (created).
      best_mode: "max" or "min" for the metric.
      keep_latest: how many newest checkpoints to keep besides the best.
      primary_only: in multi-process runs, only process 0 writes (``state`` is host data).
    """

    def __init__(
        self,
        directory: str | Path,
        *,
        best_mode: str = "max",
        keep_latest: int = 1,
        primary_only: bool = True,
    ):
        self.directory = Path(directory).absolute()
        self.best_mode = best_mode

        def metric(m):
            value = m.get(METRIC_KEY) if m else None
            return float(value) if value is not None and math.isfinite(value) else None

        policy = cm.AnyPreservationPolicy(
            [
                # BestN's `reverse=True` keeps the lowest values, `False` the highest.
                cm.BestN(
                    get_metric_fn=lambda m: (
                        metric(m)
                        if metric(m) is not None
                        else (-math.inf if best_mode == "max" else math.inf)
                    ),
                    reverse=best_mode == "min",
                    n=1,
                ),
                cm.LatestN(n=keep_latest),
            ]
        )
        multi = jax.process_count() > 1
        # Across hosts each process gets a manager of its own (no cross-process barriers):
        # process 0 writes host (NumPy) state, the others only read it back on resume.
        multiprocessing = ocp.options.MultiprocessingOptions(
            primary_host=jax.process_index() if multi else 0,
            active_processes={jax.process_index()} if multi else None,
        )
        if multi:
            self.directory.mkdir(parents=True, exist_ok=True)
        options = ocp.CheckpointManagerOptions(
            preservation_policy=policy,
            best_fn=lambda m: (
                metric(m)
                if metric(m) is not None
                else (-math.inf if best_mode == "max" else math.inf)
            ),
            best_mode=best_mode,
            multiprocessing_options=multiprocessing,
            create=not multi,
            # Blocking saves: a write error surfaces at the step that failed, not an epoch
            # later from a background thread; a checkpoint is written once per epoch.
            enable_async_checkpointing=False,
        )
        self._writes = not (primary_only and jax.process_index() != 0)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def save(self, step: int, state: Any, meta: dict, *, metric: float | None) -> None:
        """Writes checkpoint `step` and returns once it is on disk.

        Raises:
          CheckpointWriteError: the write failed (no space left, permission denied, ...);
            nothing of the step is left behind and older checkpoints are kept.
        """
        if not self._writes:
            return
        state = jax.device_get(state)
        self._check_space(step, state)
        metrics = (
            {METRIC_KEY: float(metric)} if metric is not None and math.isfinite(metric) else {}
        )
        threads_before = set(threading.enumerate())
        with _quiet_orbax_errors():
            try:
                self.manager.save(
                    step,
                    args=ocp.args.Composite(
                        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)
                    ),
                    metrics=metrics,
                    force=True,
                )
                self.manager.wait_until_finished()
            except Exception as e:  # noqa: BLE001 - any write failure ends the run here
                # The first failed item raises while the others may still be writing in
                # orbax's threads: let them end before removing what they wrote.
                _join_new_threads(threads_before, timeout=60.0)
                self._discard(step)
                raise CheckpointWriteError(step, self.directory, e) from e
        if not (self.directory / str(step)).is_dir():
            self._discard(step)
            raise CheckpointWriteError(
                step,
                self.directory,
                RuntimeError("the save ended without an error but the step folder is missing"),
            )

    def _check_space(self, step: int, state: Any) -> None:
        """Refuses to start a save that cannot fit: the size of the newest checkpoint on disk
        (or of the arrays, for the first) plus a margin."""
        steps = self.steps()
        needed = max(
            _tree_nbytes(state), _folder_bytes(self.directory / str(steps[-1])) if steps else 0
        )
        needed += SPACE_MARGIN_BYTES
        try:
            free = shutil.disk_usage(self.directory).free
        except OSError:
            return  # the save itself will report what is wrong with the folder
        if free < needed:
            raise CheckpointWriteError(
                step,
                self.directory,
                OSError(
                    errno.ENOSPC,
                    f"{os.strerror(errno.ENOSPC)} (needs about "
                    f"{needed / 2**20:.1f} MiB, {free / 2**20:.1f} MiB free)",
                ),
            )

    def _discard(self, step: int) -> None:
        """Removes what a failed save left of `step` (its temporary folder)."""
        for path in self.directory.glob(f"{step}.orbax-checkpoint-tmp*"):
            shutil.rmtree(path, ignore_errors=True)
        with contextlib.suppress(Exception):
            self.manager.reload()

    def wait(self) -> None:
        if self.manager is not None:
            self.manager.wait_until_finished()

    def steps(self) -> list[int]:
        if self.manager is None:
            return []
        self.manager.reload()
        return sorted(self.manager.all_steps())

    def best_step(self) -> int | None:
        if self.manager is None:
            return None
        self.manager.reload()
        return self.manager.best_step()

    def restore(
        self, target: Any, step: int | None = None, *, move_unreadable: bool = False
    ) -> tuple[int, Any, dict] | None:
        """Restores `step` (default: the newest readable one) into the structure of `target`.

        Args:
          target: a pytree with the structure, shapes and dtypes of the saved state; None:
            the tree as saved (NumPy arrays; containers as dicts and lists).
          step: the step to restore; None: the newest readable one.
          move_unreadable: move an unreadable step folder into ``corrupt/`` (a resuming
            writer does, so that the step can be written again); otherwise skip it.

        Returns (step, state, meta), or None when no readable checkpoint exists. Unreadable
        step folders (a killed save, a corrupt file) are skipped with a warning.
        """
        candidates = [step] if step is not None else list(reversed(self.steps()))
        abstract = (
            None
            if target is None
            else jax.tree_util.tree_map(
                lambda x: np.zeros(np.shape(x), np.asarray(x).dtype), jax.device_get(target)
            )
        )
        for candidate in candidates:
            try:
                restored = self.manager.restore(
                    candidate,
                    args=ocp.args.Composite(
                        state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()
                    ),
                )
            except Exception as e:  # noqa: BLE001 - any unreadable checkpoint is skipped
                where = ""
                if move_unreadable and self._writes:
                    where = f"; moved it to {self._move_aside(candidate)}"
                warnings.warn(
                    f"Skipping unreadable checkpoint step {candidate} in "
                    f"{self.directory}: {type(e).__name__}: {e}{where}",
                    stacklevel=2,
                )
                continue
            return candidate, restored["state"], dict(restored["meta"])
        return None

    def _move_aside(self, step: int) -> Path:
        corrupt = self.directory / CORRUPT_DIR
        corrupt.mkdir(exist_ok=True)
        dest = corrupt / str(step)
        n = 0
        while dest.exists():
            n += 1
            dest = corrupt / f"{step}-{n}"
        os.replace(self.directory / str(step), dest)
        self.manager.reload()
        return dest

    def close(self) -> None:
        if self.manager is not None:
            self.manager.wait_until_finished()
            self.manager.close()


def restore_params(
    directory: str | Path, *, which: str = "best", best_mode: str = "max"
) -> tuple[int, Any, dict]:
    """The parameters of the best (or latest) checkpoint in `directory`, read without an
    optimiser: the saved state is read as stored and its ``params`` returned.

    Args:
      directory: the ``checkpoints/`` folder.
      which: "best" (by the saved metric; the newest readable one when none has a metric)
        or "latest".
      best_mode: "max" or "min", the direction of the saved metric.

    Returns:
      (step, params as NumPy arrays, meta); the moving average of the parameters where the
      run kept one (``optim.ema_decay``), the parameters otherwise.

    Raises:
      FileNotFoundError: no checkpoint, none readable, or (`which` "best") the best one
        unreadable.
    """
    if which not in ("best", "latest"):
        raise ValueError(f"which must be 'best' or 'latest', got {which!r}.")
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"No checkpoint in {directory} (the folder does not exist).")
    ckpts = Checkpoints(directory, best_mode=best_mode)
    try:
        if not ckpts.steps():
            raise FileNotFoundError(f"No checkpoint in {directory}.")
        best = ckpts.best_step() if which == "best" else None
        restored = ckpts.restore(None, step=best)
    finally:
        ckpts.close()
    if restored is None and best is not None:
        raise FileNotFoundError(
            f"The best checkpoint in {directory} (step {best}) is unreadable (the warning "
            "above says why), and no other checkpoint is used in its place. Evaluate the "
            "newest readable checkpoint instead (eval.py --checkpoint latest; "
            "restore_params(..., which='latest')) or train the run again."
        )
    if restored is None:
        raise FileNotFoundError(f"No readable checkpoint in {directory}.")
    step, state, meta = restored
    # A run trained with a parameter average (optim.ema_decay) is evaluated with the average.
    return step, state.get("ema_params", state["params"]), meta
