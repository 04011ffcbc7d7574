"""Control pairing and fixed-shape two-channel batches.

Each cell of a batch is a (control cell, target cell) pair: the input channels are the
control cell's expression and the perturbation flags of the target cell's condition; the
target is the target cell's expression. Each perturbed cell is paired with a random control
cell of its cell type, re-drawn every epoch or drawn once (``frozen_pairing``, as GEARS, which
draws one control per perturbed cell when it builds its dataset); control cells are paired
with themselves.

Gene selection (``include_zero_gene``), as in the original script, but on gene ids and
always keeping the perturbed genes:

* ``"all"``: every measured gene (one length for the whole run),
* ``"batch-wise"``: genes non-zero in any control input of the batch (shared by its rows),
* ``"row-wise"``: per row, genes non-zero in the control input (the original's
  ``pred_perturb`` row-wise branch),
* ``"nonzero"``: the same as ``"row-wise"`` (the original's ``include_zero_gene=False``).

Token selection never looks at the target cell: a gene chosen because the perturbed cell
expresses it would tell the model the answer, and at prediction time there is no target.

Every mode adds the perturbed genes of the rows (as extra tokens with expression 0 when
they are not measured). Above ``max_seq_len`` the other genes are sampled by gene id. The
length is padded up to the smallest of a few bucket sizes, so the model compiles once per
bucket, and the last partial batch is filled with rows of weight 0 (or dropped, with
``drop_last``, as GEARS's train loader).

Everything is a pure function of (seed, epoch, batch index): ``epoch(e, start_batch=k)``
yields exactly the batches ``k, k+1, ...`` of ``epoch(e)``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Iterator, Mapping, Sequence

import numpy as np

from scformer_jax.batch import DEFAULT_PERT_PAD_ID, PerturbBatch
from scformer_jax.config import INCLUDE_ZERO_GENE_MODES, TRAIN_TARGETS
from scformer_jax.data.conditions import CONTROL, DataFormatError
from scformer_jax.data.dataset import PerturbData

_SHARED_MODES = ("all", "batch-wise")
# Independent random streams of a loader: np.random.default_rng([seed, stream, ...]).
_STREAM_PAIRING, _STREAM_FROZEN_PAIRING, _STREAM_SHUFFLE, _STREAM_GENES = 11, 12, 13, 14


@dataclasses.dataclass(frozen=True)
class HostBatch:
    """One batch on the host, with what evaluation needs to map it back to the data.

    Attributes:
      batch: the model's input (NumPy arrays, static shapes (batch_size, bucket length)).
      conditions: per row, the target cell's condition; ``""`` for padding rows.
      gene_index: int64 (batch_size, seq_len): expression column of each token, -1 at
        padding positions and for tokens of perturbed genes that are not measured.
      n_real: number of real rows (the first `n_real`); the rest pad the last batch.
      cell_indices: int64 (batch_size,): target cell of each row, -1 for padding rows.
      control_indices: int64 (batch_size,): paired control cell, -1 for padding rows.
    """

    batch: PerturbBatch
    conditions: list[str]
    gene_index: np.ndarray
    n_real: int
    cell_indices: np.ndarray
    control_indices: np.ndarray


@dataclasses.dataclass(frozen=True)
class ProcessShare:
    """This process's part of every global batch when several processes train together.

    A global batch of ``count * r`` rows is split into ``count`` contiguous shares of ``r``
    rows; process ``index`` assembles (and reads the cells of) only its own share. What the
    rows' token choice needs from the other shares (the genes their control cells express, in
    ``"batch-wise"`` mode; the longest row, in the row-wise modes) comes through `exchange`.

    Attributes:
      index: this process.
      count: processes.
      exchange: ``exchange(local)`` -> every process's `local` (same shape and dtype), in
        process order; every process calls it the same number of times in the same order
        (e.g. :class:`scformer_jax.parallel.HostExchange`).
    """

    index: int
    count: int
    exchange: Callable[[np.ndarray], list[np.ndarray]]

    def __post_init__(self):
        if not 0 <= self.index < self.count:
            raise ValueError(f"process index {self.index} is not in [0, {self.count}).")


def pair_controls(
    data: PerturbData, cell_indices: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """A random control cell (of the same cell type) for each cell; controls map to themselves.

    Args:
      data: the dataset.
      cell_indices: int (n,) target cells.
      rng: the source of the draws.

    Returns:
      int64 (n,): the paired control cell of each target cell.

    Raises:
      DataFormatError: perturbed cells of a cell type that has no control cells.
    """
    cells = np.asarray(cell_indices, dtype=np.int64)
    paired = cells.copy()
    perturbed = data.cell_conditions[cells] != CONTROL
    types = data.cell_types[cells]
    for cell_type in sorted(set(types[perturbed].tolist())):
        rows = np.flatnonzero(perturbed & (types == cell_type))
        pool = data.control_cells_by_type.get(cell_type)
        if pool is None or len(pool) == 0:
            raise DataFormatError(
                f"Cell type {cell_type!r} has perturbed cells but no control cells to pair them "
                "with; add its control cells or drop its perturbed cells."
            )
        paired[rows] = pool[rng.integers(0, len(pool), len(rows))]
    return paired


def bucket_sizes(max_len: int, n_buckets: int = 4, multiple: int = 8) -> tuple[int, ...]:
    """Evenly spaced length buckets up to `max_len`, rounded up to a multiple of `multiple`.

    Example: ``bucket_sizes(150, 4) == (40, 80, 120, 150)``.
    """
    if max_len < 1 or n_buckets < 1:
        raise ValueError(
            f"bucket_sizes needs max_len >= 1 and n_buckets >= 1, got {max_len}, {n_buckets}."
        )
    sizes = {max_len}
    for i in range(1, n_buckets):
        size = int(math.ceil(max_len * i / n_buckets / multiple) * multiple)
        sizes.add(min(max(size, multiple), max_len))
    return tuple(sorted(sizes))


def _select(
    candidates: np.ndarray,
    keep: np.ndarray,
    n_extra: int,
    max_seq_len: int | None,
    rng: np.random.Generator,
    where: str,
) -> np.ndarray:
    """Measured columns to use: all of `candidates` or, above max_seq_len, all of `keep`
    (the perturbed genes) plus a sample of the rest, drawn by gene id; sorted."""
    candidates = np.union1d(candidates, keep)
    if max_seq_len is None or len(candidates) + n_extra <= max_seq_len:
        return candidates
    room = max_seq_len - len(keep) - n_extra
    if room < 0:
        raise ValueError(
            f"{where} has {len(keep) + n_extra} perturbed genes, more than max_seq_len "
            f"({max_seq_len}); raise max_seq_len or lower the batch size."
        )
    others = np.setdiff1d(candidates, keep, assume_unique=True)
    return np.sort(np.concatenate([keep, rng.choice(others, room, replace=False)]))


def assemble_batch(
    data: PerturbData,
    target_cells: Sequence[int] | np.ndarray,
    control_cells: Sequence[int] | np.ndarray,
    *,
    conditions: Sequence[str] | None = None,
    include_zero_gene: str = "all",
    max_seq_len: int | None = None,
    bucket_sizes: Sequence[int] | None = None,
    batch_size: int | None = None,
    rng: np.random.Generator | None = None,
    pad_value: float = 0.0,
    pert_pad_id: int = DEFAULT_PERT_PAD_ID,
    target_profiles: Mapping[str, np.ndarray] | None = None,
    target_offsets: Mapping[str, np.ndarray] | None = None,
    share: ProcessShare | None = None,
) -> HostBatch:
    """Builds one fixed-shape batch from (target, control) cell pairs.

    Args:
      data: the dataset.
      target_cells: int (n,) cells whose expression is the target.
      control_cells: int (n,) paired control cells (the input expression).
      conditions: per row, the condition whose flags to set; default: the target cells'
        conditions. (Prediction of an unseen condition passes it here.)
      include_zero_gene: gene selection mode, one of :data:`INCLUDE_ZERO_GENE_MODES`.
      max_seq_len: most tokens per row; None: no limit.
      bucket_sizes: allowed lengths; the batch is padded to the smallest that fits. None:
        the exact longest row.
      batch_size: rows of the batch; rows past n repeat row 0 with cell weight 0.
        None: n.
      rng: draws the gene sample above max_seq_len.
      pad_value: expression value at padding positions.
      pert_pad_id: flag value at padding positions.
      target_profiles: condition -> float32 (n_genes,) profile that replaces the target
        cells' own expression as the target of every row of that condition (e.g. the
        condition's mean: a denoised target). None: each target cell's expression.
      target_offsets: condition -> float32 (n_genes,) subtracted from the targets of that
        condition's rows (the measured part of :mod:`scformer_jax.prior`'s additive prior).
      share: with several processes, build only this process's rows of the global batch
        (reading only their cells); its real rows equal those rows of the whole batch.
        None: the whole batch.

    Returns:
      A :class:`HostBatch` (with `share`: of the share's ``batch_size // count`` rows; a share
      without real rows holds weight-0 copies of the global batch's first row).
    """
    if include_zero_gene not in INCLUDE_ZERO_GENE_MODES:
        raise ValueError(
            f"include_zero_gene {include_zero_gene!r} is not one of "
            f"{list(INCLUDE_ZERO_GENE_MODES)}."
        )
    targets = np.asarray(target_cells, dtype=np.int64)
    controls = np.asarray(control_cells, dtype=np.int64)
    n = len(targets)
    if n == 0 or targets.shape != controls.shape or targets.ndim != 1:
        raise ValueError(
            f"target_cells {targets.shape} and control_cells {controls.shape} must "
            "be two non-empty 1-D arrays of one length."
        )
    rows_total = n if batch_size is None else int(batch_size)
    if n > rows_total:
        raise ValueError(f"{n} cells do not fit a batch of {rows_total} rows.")
    conditions = (
        [str(c) for c in data.cell_conditions[targets]]
        if conditions is None
        else [str(c) for c in conditions]
    )
    if len(conditions) != n:
        raise ValueError(f"{len(conditions)} conditions for {n} cells.")
    rng = np.random.default_rng(0) if rng is None else rng
    # Independent streams per row (row-wise modes), so that a row's gene sample does not
    # depend on which other rows a process assembles.
    row_rngs = rng.spawn(n) if include_zero_gene not in _SHARED_MODES else None

    # The rows built here: all of them, or this process's share.
    if share is None:
        out_rows, mine = rows_total, np.arange(n)
    else:
        if rows_total % share.count:
            raise ValueError(
                f"A batch of {rows_total} rows does not split into {share.count} equal shares."
            )
        out_rows = rows_total // share.count
        start = share.index * out_rows
        mine = np.arange(start, min(start + out_rows, n))
    m = len(mine)  # real rows built here
    source = mine if m else np.zeros(1, np.int64)  # a share without real rows pads with row 0
    local_conditions = [conditions[i] for i in source]

    control_values = data.dense_rows(controls[source])  # (len(source), n_genes)
    if target_profiles is None:
        target_values = data.dense_rows(targets[source])
    else:
        missing = sorted(set(conditions) - set(target_profiles))
        if missing:
            raise ValueError(f"target_profiles has no profile for condition(s) {missing[:5]}.")
        target_values = np.stack(
            [np.asarray(target_profiles[c], np.float32) for c in local_conditions]
        )
    if target_offsets is not None:
        target_values = target_values - np.stack(
            [np.asarray(target_offsets[c], np.float32) for c in local_conditions]
        )
    n_genes = data.n_genes
    pert = {}
    for c in set(conditions):
        pert[c] = data.perturbed_tokens(c)  # (token ids, columns)
    row_cols = [pert[c][1][pert[c][1] >= 0] for c in conditions]
    row_extra = [pert[c][0][pert[c][1] < 0] for c in conditions]

    # Per built row: measured columns (sorted) and extra tokens (sorted); shared modes share
    # them over the whole batch (every share computes the same).
    shared = include_zero_gene in _SHARED_MODES
    if shared:
        keep = np.unique(np.concatenate(row_cols)).astype(np.int64)
        extra = np.unique(np.concatenate(row_extra)).astype(np.int64)
        if include_zero_gene == "all":
            candidates = np.arange(n_genes)
        else:
            expressed = (control_values[:m] != 0).any(axis=0)
            if share is not None:
                packed = share.exchange(np.packbits(expressed))
                expressed = np.unpackbits(np.bitwise_or.reduce(packed), count=n_genes) > 0
            candidates = np.flatnonzero(expressed)
        columns = _select(candidates, keep, len(extra), max_seq_len, rng, "This batch")
        per_row = [(columns, extra)] * len(source)
    else:
        per_row = []
        for j, i in enumerate(source):
            mask = control_values[j] != 0
            extra = np.unique(row_extra[i]).astype(np.int64)
            columns = _select(
                np.flatnonzero(mask),
                np.unique(row_cols[i]).astype(np.int64),
                len(extra),
                max_seq_len,
                row_rngs[i],
                f"Row {i} ({conditions[i]!r})",
            )
            per_row.append((columns, extra))

    longest = max(len(c) + len(e) for c, e in per_row[: max(m, 1)])
    if share is not None and not shared:
        longest = int(np.max(share.exchange(np.asarray([longest if m else 0], np.int64))))
    if bucket_sizes is None:
        length = longest
    else:
        fitting = [b for b in sorted(bucket_sizes) if b >= longest]
        if not fitting:
            raise ValueError(
                f"A row has {longest} tokens, more than the largest length bucket "
                f"{max(bucket_sizes)}; add a larger bucket or set max_seq_len."
            )
        length = fitting[0]

    gene_ids = np.full((out_rows, length), data.pad_token_id, np.int32)
    gene_index = np.full((out_rows, length), -1, np.int64)
    inputs_value = np.full((out_rows, length), pad_value, np.float32)
    inputs_flag = np.full((out_rows, length), pert_pad_id, np.float32)
    target = np.full((out_rows, length), pad_value, np.float32)
    padding = np.ones((out_rows, length), bool)
    # A zero column at index n_genes stands for unmeasured genes (expression 0).
    k_src = len(source)
    control_ext = np.concatenate([control_values, np.zeros((k_src, 1), np.float32)], axis=1)
    target_ext = np.concatenate([target_values, np.zeros((k_src, 1), np.float32)], axis=1)
    for j in range(1 if shared else k_src):
        columns, extra = per_row[j]
        rows = slice(0, k_src) if shared else slice(j, j + 1)
        k = len(columns) + len(extra)
        # Ascending token ids: measured columns (token = column) then the extra tokens.
        tokens = np.concatenate([data.gene_token_ids[columns].astype(np.int64), extra])
        index = np.concatenate([columns, np.full(len(extra), -1, np.int64)])
        take = np.where(index >= 0, index, n_genes)
        gene_ids[rows, :k] = tokens
        gene_index[rows, :k] = index
        inputs_value[rows, :k] = control_ext[rows][:, take]
        target[rows, :k] = target_ext[rows][:, take]
        padding[rows, :k] = False
        inputs_flag[rows, :k] = 0.0
        for r in range(rows.start, rows.stop):
            mine_tokens = pert[local_conditions[r]][0]
            if len(mine_tokens):
                inputs_flag[r, np.searchsorted(tokens, mine_tokens)] = 1.0
    labels = np.zeros(out_rows, np.int32)
    labels[:k_src] = data.labels[targets[source]]
    weights = np.zeros(out_rows, np.float32)
    weights[:m] = 1.0
    if out_rows > m:
        # Padding rows repeat the first row (weight 0) so that no row is all padding:
        # attention over an all-masked row would produce NaNs.
        for array in (gene_ids, gene_index, inputs_value, inputs_flag, target, padding, labels):
            array[m:] = array[0]
    batch = PerturbBatch.from_arrays(
        gene_ids=gene_ids,
        control_values=inputs_value,
        pert_flags=inputs_flag,
        target_values=target,
        padding_mask=padding,
        cell_weights=weights,
        labels=labels,
        target_mask=gene_index >= 0,
    )
    pad_rows = out_rows - m
    return HostBatch(
        batch=batch,
        conditions=[conditions[i] for i in mine] + [""] * pad_rows,
        gene_index=gene_index,
        n_real=m,
        cell_indices=np.concatenate([targets[mine], np.full(pad_rows, -1, np.int64)]),
        control_indices=np.concatenate([controls[mine], np.full(pad_rows, -1, np.int64)]),
    )


class BatchLoader:
    """Deterministic, resumable epochs of fixed-shape batches over some conditions.

    Args:
      data: the dataset.
      conditions: the conditions whose cells the loader serves (e.g. a split's train list).
      batch_size: rows per batch; the last partial batch is padded with weight-0 rows
        (or dropped, see `drop_last`).
      include_zero_gene: ``"all"``, ``"batch-wise"``, ``"row-wise"`` or ``"nonzero"``.
      max_seq_len: most tokens per row (perturbed genes always kept); None: no limit.
      seed: the loader's seed; pairing, order and gene sampling derive from (seed, epoch).
      shuffle: shuffle the cells every epoch (else dataset order).
      pad_value: expression value at padding positions.
      pert_pad_id: flag value at padding positions.
      frozen_pairing: draw the control partners once and keep them for every epoch, as
        GEARS does; False: re-draw them every epoch.
      length_buckets: number of evenly spaced length buckets (mode ``"all"`` uses one), or
        the explicit bucket sizes.
      target: ``"cell"`` (each target cell's expression) or ``"condition_mean"`` (the mean
        expression of the target's condition over all of its cells the loader serves).
      target_offsets: condition -> (n_genes,) taken off that condition's targets (see
        :func:`assemble_batch`); None: nothing.
      condition_means: condition -> (n_genes,) the mean expression of its cells, for
        ``target="condition_mean"``, when the caller has measured them already (those
        missing are computed here).
      drop_last: leave out the last partial batch of every epoch (its cells, which change
        with the shuffle, are not served in that epoch), as GEARS's train loader.
      share: with several processes, yield only this process's rows of every batch (and
        read only their cells); see :class:`ProcessShare`. None: whole batches.

    Attributes:
      cell_indices: int64 (n_cells,) the cells served, ascending.
      bucket_sizes: the lengths batches are padded to.
    """

    def __init__(
        self,
        data: PerturbData,
        conditions: Sequence[str],
        *,
        batch_size: int,
        include_zero_gene: str = "all",
        max_seq_len: int | None = None,
        seed: int = 0,
        shuffle: bool = True,
        pad_value: float = 0.0,
        pert_pad_id: int = DEFAULT_PERT_PAD_ID,
        frozen_pairing: bool = False,
        length_buckets: int | Sequence[int] = 4,
        target: str = "cell",
        target_offsets: Mapping[str, np.ndarray] | None = None,
        condition_means: Mapping[str, np.ndarray] | None = None,
        drop_last: bool = False,
        share: ProcessShare | None = None,
    ):
        if include_zero_gene not in INCLUDE_ZERO_GENE_MODES:
            raise ValueError(
                f"include_zero_gene {include_zero_gene!r} is not one of "
                f"{list(INCLUDE_ZERO_GENE_MODES)}."
            )
        if isinstance(conditions, str):
            raise ValueError("conditions must be a list of condition names, not one string.")
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
        if max_seq_len is not None and int(max_seq_len) < 1:
            raise ValueError(f"max_seq_len must be >= 1 or None, got {max_seq_len}.")
        if not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}.")
        if pert_pad_id in (0, 1):
            raise ValueError(f"pert_pad_id must differ from the flags 0 and 1, got {pert_pad_id}.")
        if target not in TRAIN_TARGETS:
            raise ValueError(f"target {target!r} is not one of {list(TRAIN_TARGETS)}.")
        unknown = [c for c in conditions if c not in data.condition_cells]
        if unknown:
            raise ValueError(
                f"Condition(s) {unknown[:10]} are not in the dataset {data.name!r} "
                f"(e.g. it has {data.conditions[:5]})."
            )
        self.data = data
        self.conditions = list(dict.fromkeys(str(c) for c in conditions))
        self.cell_indices = data.cells_of(self.conditions)
        if len(self.cell_indices) == 0:
            raise ValueError("The loader has no cells: give it at least one condition.")
        self.batch_size = int(batch_size)
        self.drop_last = bool(drop_last)
        if self.drop_last and len(self.cell_indices) < self.batch_size:
            raise ValueError(
                f"drop_last leaves no batch: the loader has {len(self.cell_indices)} cells, fewer "
                f"than batch_size {self.batch_size}; lower the batch size or set drop_last false."
            )
        if share is not None and self.batch_size % share.count:
            raise ValueError(
                f"batch_size {self.batch_size} does not split into {share.count} equal "
                "process shares."
            )
        self.share = share
        self.include_zero_gene = include_zero_gene
        self.max_seq_len = None if max_seq_len is None else int(max_seq_len)
        self.seed = int(seed)
        self.shuffle = shuffle
        self.pad_value = float(pad_value)
        self.pert_pad_id = int(pert_pad_id)
        self.frozen_pairing = frozen_pairing
        # A split holds whole conditions, so a condition's mean is over the cells served.
        known = condition_means or {}
        self.target_profiles = (
            None
            if target == "cell"
            else {c: known[c] if c in known else data.condition_mean(c) for c in self.conditions}
        )
        self.target_offsets = target_offsets

        # The longest possible row, to size the buckets.
        pert_genes = sorted({g for c in self.conditions for g in data.condition_genes[c]})
        n_unmeasured = sum(data.column_of(g) < 0 for g in pert_genes)
        shared = include_zero_gene in _SHARED_MODES
        most_extra = min(n_unmeasured, (2 * self.batch_size) if shared else 2)
        longest = data.n_genes + most_extra
        if self.max_seq_len is not None:
            must_keep = min(len(pert_genes), 2 * self.batch_size) if shared else 2
            if self.max_seq_len < must_keep:
                raise ValueError(
                    f"max_seq_len {self.max_seq_len} is below the {must_keep} perturbed genes a "
                    f"batch may hold (always kept); raise it or lower the batch size."
                )
            longest = min(longest, self.max_seq_len)
        if isinstance(length_buckets, (int, np.integer)):
            self.bucket_sizes = (
                (longest,)
                if include_zero_gene == "all"
                else bucket_sizes(longest, int(length_buckets))
            )
        else:
            sizes = tuple(sorted({int(b) for b in length_buckets}))
            if not sizes or sizes[0] < 1:
                raise ValueError(f"length_buckets {length_buckets!r} must be positive sizes.")
            if sizes[-1] < longest:
                raise ValueError(
                    f"The largest length bucket ({sizes[-1]}) is below the longest possible row "
                    f"({longest} tokens); add a bucket of {longest} or set max_seq_len."
                )
            self.bucket_sizes = sizes

    def __len__(self) -> int:
        if self.drop_last:
            return len(self.cell_indices) // self.batch_size
        return -(-len(self.cell_indices) // self.batch_size)

    @property
    def n_cells(self) -> int:
        return len(self.cell_indices)

    def pairing(self, epoch_index: int) -> np.ndarray:
        """int64 (n_cells,): the control partner of each served cell in this epoch."""
        entropy = (
            [self.seed, _STREAM_FROZEN_PAIRING]
            if self.frozen_pairing
            else [self.seed, _STREAM_PAIRING, int(epoch_index)]
        )
        return pair_controls(self.data, self.cell_indices, np.random.default_rng(entropy))

    def order(self, epoch_index: int) -> np.ndarray:
        """int (n_cells,): positions into `cell_indices` in this epoch's order."""
        if not self.shuffle:
            return np.arange(self.n_cells)
        rng = np.random.default_rng([self.seed, _STREAM_SHUFFLE, int(epoch_index)])
        return rng.permutation(self.n_cells)

    def epoch(self, epoch_index: int, start_batch: int = 0) -> Iterator[HostBatch]:
        """Yields the batches of an epoch, from `start_batch` on (to resume mid-epoch)."""
        if epoch_index < 0 or not 0 <= start_batch <= len(self):
            raise ValueError(
                f"epoch_index must be >= 0 and start_batch in [0, {len(self)}]; "
                f"got {epoch_index}, {start_batch}."
            )
        partners = self.pairing(epoch_index)
        order = self.order(epoch_index)
        for b in range(start_batch, len(self)):
            rows = order[b * self.batch_size : (b + 1) * self.batch_size]
            yield assemble_batch(
                self.data,
                self.cell_indices[rows],
                partners[rows],
                include_zero_gene=self.include_zero_gene,
                max_seq_len=self.max_seq_len,
                bucket_sizes=self.bucket_sizes,
                batch_size=self.batch_size,
                rng=np.random.default_rng([self.seed, _STREAM_GENES, int(epoch_index), b]),
                pad_value=self.pad_value,
                pert_pad_id=self.pert_pad_id,
                target_profiles=self.target_profiles,
                target_offsets=self.target_offsets,
                share=self.share,
            )

    def __repr__(self) -> str:
        return (
            f"BatchLoader({len(self.conditions)} conditions, {self.n_cells} cells, "
            f"{len(self)} batches of {self.batch_size}, {self.include_zero_gene!r}, "
            f"buckets {self.bucket_sizes})"
        )
