"""Device placement, in one place: multi-host start-up, replication, batch sharding, pmap.

The train step itself is per-device code with one axis name (:data:`AXIS`); this module
decides how it is mapped over devices. Today that is ``jax.pmap`` over the local devices of
every process (one global axis across hosts); a ``jit`` + ``shard_map`` version would only
change the functions here.
"""

from __future__ import annotations

import itertools
import logging
import os
import queue
import threading
from typing import Any, Callable

import jax
import numpy as np
from flax import jax_utils

from scformer_jax.batch import PerturbBatch
from scformer_jax.data.batching import ProcessShare

AXIS = "batch"
log = logging.getLogger(__name__)

_CLUSTER_ENV = (
    "SLURM_NTASKS",
    "OMPI_COMM_WORLD_SIZE",
    "TPU_WORKER_HOSTNAMES",
    "JAX_COORDINATOR_ADDRESS",
    "KUBERNETES_SERVICE_HOST",
)


def initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> bool:
    """Calls ``jax.distributed.initialize`` when this is one process of several.

    Explicit arguments win; otherwise JAX auto-detects Slurm, Open MPI, Kubernetes and Cloud
    TPU. A plain single process (no cluster variables) is left alone. Returns True when the
    distributed runtime was started.
    """
    explicit = coordinator_address is not None or (num_processes or 1) > 1
    slurm_multi = int(os.environ.get("SLURM_NTASKS", "1") or 1) > 1
    detected = slurm_multi or any(
        os.environ.get(k) for k in _CLUSTER_ENV if k not in ("SLURM_NTASKS",)
    )
    if not explicit and not detected:
        return False
    if explicit:
        if coordinator_address is None or num_processes is None or process_id is None:
            raise ValueError(
                "Multi-process training needs all of --coordinator-address, --num-processes "
                "and --process-id (or none of them, to auto-detect Slurm/MPI/TPU)."
            )
        jax.distributed.initialize(
            coordinator_address=coordinator_address,
            num_processes=num_processes,
            process_id=process_id,
        )
    else:
        jax.distributed.initialize()
    log.info(
        "distributed: process %d of %d, %d local / %d global devices",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
    )
    return True


def is_primary() -> bool:
    return jax.process_index() == 0


def check_batch_size(global_batch: int, *, what: str = "train.batch_size") -> int:
    """Per-device batch size; the global batch must split evenly over all devices."""
    n = jax.device_count()
    if global_batch % n:
        raise ValueError(
            f"{what} ({global_batch}) must be divisible by the number of devices ({n} = "
            f"{jax.process_count()} process(es) x {jax.local_device_count()} local device(s)); "
            f"use e.g. {max(n, global_batch // n * n)}."
        )
    return global_batch // n


def process_rows(
    tree: Any, *, process_index: int | None = None, process_count: int | None = None
) -> Any:
    """This process's contiguous share of the rows of a global host batch."""
    index = jax.process_index() if process_index is None else process_index
    count = jax.process_count() if process_count is None else process_count
    if count == 1:
        return tree

    def take(x):
        rows = x.shape[0] // count
        return x[index * rows : (index + 1) * rows]

    return jax.tree_util.tree_map(take, tree)


def shard(tree: Any) -> Any:
    """(rows, ...) host arrays -> (local_devices, rows / local_devices, ...) on the devices."""
    n = jax.local_device_count()

    def split(x):
        x = np.asarray(x)
        if x.shape[0] % n:
            raise ValueError(f"{x.shape[0]} rows do not split over {n} local devices.")
        return x.reshape((n, x.shape[0] // n) + x.shape[1:])

    # `jax.device_put_sharded` is gone in JAX 0.10: a NamedSharding over the local devices,
    # leading axis split, is what pmap takes without a copy.
    mesh = jax.sharding.Mesh(np.array(jax.local_devices()), ("_local",))
    sharding = jax.NamedSharding(mesh, jax.P("_local"))
    return jax.tree_util.tree_map(lambda x: jax.device_put(split(x), sharding), tree)


def prefetch(iterator, size: int = 2, *, join_timeout_s: float = 60.0):
    """Yields `iterator`'s items in order, drawn by a background thread up to `size` ahead.

    The thread runs `iterator` (the training loop passes a generator that assembles each
    batch and shards it onto the devices with :func:`shard_batch`) while the consumer waits
    on the step in flight, so a batch's assembly and its host-to-device transfer overlap the
    step before it. An exception raised by `iterator` is raised to the consumer where its
    item would have come. Closing this generator (or dropping it) stops the thread after the
    item it is drawing (waiting at most `join_timeout_s` for it). A source shared between
    processes (a :class:`HostExchange` per item) must be limited to the items every process
    will consume, so that no process draws an item the others never draw.
    """
    if size < 1:
        raise ValueError(f"prefetch size must be >= 1, got {size}.")
    items: queue.Queue = queue.Queue(maxsize=size)
    stop = threading.Event()
    end = object()

    def offer(entry) -> bool:
        while not stop.is_set():
            try:
                items.put(entry, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def fill() -> None:
        try:
            for item in iterator:
                if not offer((item, None)):
                    return
        except BaseException as error:  # noqa: BLE001  (handed to the consumer, raised there)
            offer((end, error))
            return
        offer((end, None))

    thread = threading.Thread(target=fill, name="scformer-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item, error = items.get()
            if item is end:
                if error is not None:
                    raise error
                return
            yield item
    finally:
        stop.set()
        # The item being drawn finishes first; bounded, so that an interrupt cannot hang here
        # on a source that waits for other processes (the thread is a daemon).
        thread.join(timeout=join_timeout_s)


def shard_batch(batch: PerturbBatch, *, local: bool = False) -> PerturbBatch:
    """A global host batch -> this process's rows, split over the local devices.

    `local`: the batch already holds only this process's rows (a loader with a
    :class:`~scformer_jax.data.batching.ProcessShare`)."""
    return shard(batch if local else process_rows(batch))


class HostExchange:
    """A host-side all-gather of small NumPy arrays between the processes of a run, through
    the coordination service's key-value store (no device collective, so a loader thread
    may call it while the devices run a step).

    Every process must call it the same number of times in the same order; call ``k``
    writes this process's array under a key of its own and waits (up to `timeout_s`) for the
    others'. Keys older than `keep` calls are deleted.
    """

    _instances = itertools.count()

    def __init__(self, *, timeout_s: float = 600.0, keep: int = 64, prefix: str = "scformer_jax"):
        from jax._src import distributed

        self._client = distributed.global_state.client
        if self._client is None:
            raise RuntimeError(
                "HostExchange needs jax.distributed.initialize(...) (train.py's "
                "--coordinator-address/--num-processes/--process-id) to have run."
            )
        self.index, self.count = jax.process_index(), jax.process_count()
        self._timeout_ms = int(timeout_s * 1000)
        self._keep = keep
        # Each instance its own key space (processes create theirs in the same order), so
        # that a second exchange in the same job never meets the first one's keys.
        self._prefix = f"{prefix}/{next(HostExchange._instances)}"
        self._calls = 0

    def _key(self, call: int, process: int) -> str:
        return f"{self._prefix}/exchange/{call}/{process}"

    def __call__(self, local: np.ndarray) -> list[np.ndarray]:
        local = np.ascontiguousarray(local)
        call, self._calls = self._calls, self._calls + 1
        self._client.key_value_set_bytes(self._key(call, self.index), local.tobytes())
        out = []
        for process in range(self.count):
            try:
                raw = self._client.blocking_key_value_get_bytes(
                    self._key(call, process), self._timeout_ms
                )
            except jax.errors.JaxRuntimeError as e:
                if "DEADLINE_EXCEEDED" not in str(e):
                    raise
                raise RuntimeError(
                    f"Process {self.index} waited {self._timeout_ms / 1000:g} s for process "
                    f"{process}'s part of input exchange {call}, which never came: that "
                    "process most likely failed or stopped before it (read its log for the "
                    "first error), or it runs another config or data file."
                ) from e
            out.append(np.frombuffer(raw, dtype=local.dtype).reshape(local.shape))
        if call >= self._keep:
            # Every process has written call - keep long ago, and read it before writing
            # anything later: its own key can go.
            self._client.key_value_delete(self._key(call - self._keep, self.index))
        return out


def process_share():
    """This process's :class:`~scformer_jax.data.batching.ProcessShare` of every training
    batch when several processes run, else None."""
    if jax.process_count() == 1:
        return None

    exchange = HostExchange()
    return ProcessShare(index=exchange.index, count=exchange.count, exchange=exchange)


def replicate(tree: Any) -> Any:
    return jax_utils.replicate(tree)


def first_replica(x: Any) -> np.ndarray:
    """This process's first replica of a pmap output, as NumPy (works across hosts, where
    the other replicas are not addressable)."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return np.asarray(x.addressable_shards[0].data).reshape(x.shape[1:])
    return np.asarray(x[0])


def unreplicate(tree: Any) -> Any:
    """The first replica, as host NumPy arrays."""
    return jax.tree_util.tree_map(first_replica, tree)


def pmap(fn: Callable, *, donate_argnums=()) -> Callable:
    """The one place where per-device code is mapped over devices."""
    return jax.pmap(fn, axis_name=AXIS, donate_argnums=donate_argnums)


def gather_rows(x: Any) -> np.ndarray:
    """(local_devices, rows, ...) device output -> (all processes' rows, ...) on every host."""
    trailing = x.shape[2:]
    shards = sorted(x.addressable_shards, key=lambda s: s.index[0].start or 0)
    local = np.concatenate([np.asarray(s.data).reshape((-1,) + trailing) for s in shards])
    if jax.process_count() == 1:
        return local
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(local, tiled=True))
