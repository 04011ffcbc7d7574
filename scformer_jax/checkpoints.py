"""Orbax checkpoints of the train state: the latest and the best by a validation metric.

Each checkpoint holds ``state`` (params, optimiser state, step: host NumPy arrays, saved
unreplicated) and ``meta`` (JSON: the loop's position, best metric so far, the metric of this
checkpoint). Saves are asynchronous; a partial or corrupt step folder is skipped with a
warning when restoring, never crashes a resume.
"""

from __future__ import annotations

import logging
import math
import warnings
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as cm

log = logging.getLogger(__name__)
METRIC_KEY = "best_metric_value"


class Checkpoints:
    """Keeps the newest checkpoint and the best one by ``metrics[METRIC_KEY]``.

    Args:
      directory: the folder (created).
      best_mode: "max" or "min" for the metric.
      keep_latest: how many newest checkpoints to keep besides the best.
      primary_only: in multi-process runs, only process 0 writes (``state`` is host data).
    """

    def __init__(self, directory: str | Path, *, best_mode: str = "max", keep_latest: int = 1,
                 primary_only: bool = True):
        self.directory = Path(directory).absolute()
        self.best_mode = best_mode

        def metric(m):
            value = m.get(METRIC_KEY) if m else None
            return float(value) if value is not None and math.isfinite(value) else None

        policy = cm.AnyPreservationPolicy([
            # BestN's `reverse=True` keeps the lowest values, `False` the highest.
            cm.BestN(get_metric_fn=lambda m: metric(m) if metric(m) is not None else
                     (-math.inf if best_mode == "max" else math.inf),
                     reverse=best_mode == "min", n=1),
            cm.LatestN(n=keep_latest),
        ])
        multi = jax.process_count() > 1
        # Across hosts each process gets a manager of its own (no cross-process barriers):
        # process 0 writes host (NumPy) state, the others only read it back on resume.
        multiprocessing = ocp.options.MultiprocessingOptions(
            primary_host=jax.process_index() if multi else 0,
            active_processes={jax.process_index()} if multi else None)
        if multi:
            self.directory.mkdir(parents=True, exist_ok=True)
        options = ocp.CheckpointManagerOptions(
            preservation_policy=policy,
            best_fn=lambda m: (metric(m) if metric(m) is not None else
                               (-math.inf if best_mode == "max" else math.inf)),
            best_mode=best_mode,
            multiprocessing_options=multiprocessing,
            create=not multi,
        )
        self._writes = not (primary_only and jax.process_index() != 0)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def save(self, step: int, state: Any, meta: dict, *, metric: float | None) -> None:
        """Saves asynchronously; `state` should already be host (NumPy) arrays."""
        if not self._writes:
            return
        state = jax.device_get(state)
        metrics = {METRIC_KEY: float(metric)} if metric is not None and math.isfinite(
            metric) else {}
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
            metrics=metrics, force=True)

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

    def restore(self, target: Any, step: int | None = None) -> tuple[int, Any, dict] | None:
        """Restores `step` (default: the newest readable one) into the structure of `target`.

        Returns (step, state, meta), or None when no readable checkpoint exists. Unreadable
        step folders (a killed save, a corrupt file) are skipped with a warning.
        """
        candidates = [step] if step is not None else list(reversed(self.steps()))
        abstract = jax.tree_util.tree_map(
            lambda x: np.zeros(np.shape(x), np.asarray(x).dtype), jax.device_get(target))
        for candidate in candidates:
            try:
                restored = self.manager.restore(candidate, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
            except Exception as e:  # noqa: BLE001 - any unreadable checkpoint is skipped
                warnings.warn(f"Skipping unreadable checkpoint step {candidate} in "
                              f"{self.directory}: {type(e).__name__}: {e}", stacklevel=2)
                continue
            return candidate, restored["state"], dict(restored["meta"])
        return None

    def close(self) -> None:
        if self.manager is not None:
            self.manager.wait_until_finished()
            self.manager.close()
