"""The built-in dataset: a simulated Perturb-seq experiment in GEARS's layout.

Generative model (all of it drawn from one seed):

1. **Gene regulatory network.** Genes sit in ``grn_layers`` layers; each gene outside the
   first layer has a few regulators in earlier layers, drawn with a preference for hubs;
   each edge has a signed weight. The network is a DAG, so a perturbation's effect reaches
   a fixed point after ``grn_layers`` propagation steps.
2. **Cell state.** A cell's log-expression is ``a = b + e + p + H(a - b) @ W``: baseline
   ``b`` (gene-specific), intrinsic noise ``e`` (which propagates too, so co-expression in
   control cells reveals the network), the perturbation shift ``p`` and the regulatory
   input through the saturating response ``H(d) = s * tanh(d / s)``.
3. **Perturbations.** Each perturbed gene is either knocked down (CRISPRi-like, a negative
   shift) or activated (CRISPRa-like, a positive shift), scaled per cell by an efficiency
   drawn from ``[efficiency_low, 1]``. Doubles apply both shifts; their downstream response
   is then scaled by an interaction gain: 1 (additive: the network's own joint response),
   ``synergy_gain`` (synergistic) or ``buffering_gain`` (buffering).
4. **Counts.** Expected UMI counts are a per-cell library size times ``softmax(a)``;
   counts are Poisson; then normalise to ``target_sum`` per cell and ``log1p``.
5. **GEARS layout.** obs 'condition', 'cell_type', 'condition_name', ...; var 'gene_name';
   DE genes computed the way GEARS does. The truth (network, modes, interactions) is kept
   in ``uns['simulation']``.

Everything is vectorised over cells in chunks and X is built sparse, so the ``norman``
preset (about 90k cells x 5k genes) never holds a dense copy of X.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Mapping

import anndata
import numpy as np
import pandas as pd
from scipy import sparse

from scformer_jax.data.backed import BackedCSR, CSRWriter, write_metadata
from scformer_jax.data.conditions import CONTROL
from scformer_jax.data.de import add_gears_annotations
from scformer_jax.io import atomic_path

INTERACTIONS = ("additive", "synergistic", "buffering")


@dataclasses.dataclass(frozen=True)
class SimulationConfig:
    """Sizes and effect strengths of the simulated experiment."""

    n_genes: int = 150  # measured genes (columns of X)
    n_pert_genes: int = 40  # distinct perturbed genes (measured ones + unmeasured ones)
    n_combos: int = 30  # double perturbations, drawn among pairs of perturbed genes
    cells_per_condition: int = 40  # mean cells per perturbation condition
    n_control_cells: int = 1000
    # Perturbed genes that regulate others but are not among the measured genes.
    n_unmeasured_pert_genes: int = 0
    grn_layers: int = 4
    mean_regulators: float = 2.5  # mean number of regulators of a non-root gene
    activating_edge_fraction: float = 0.65
    activation_fraction: float = 0.3  # perturbed genes that are activated, not knocked down
    knockdown_shift: float = -2.5  # log-scale shift of a knocked-down gene
    activation_shift: float = 2.0
    efficiency_low: float = 0.7  # per-cell efficiency ~ Uniform(efficiency_low, 1)
    response_scale: float = 3.0  # s of the saturating response H(d) = s tanh(d / s)
    noise_sd: float = 0.4  # intrinsic log-scale noise per gene and cell (propagates)
    baseline_sd: float = 1.2  # spread of the genes' baseline log-expression
    umis_per_gene: float = 8.0  # mean library size per cell / total genes
    library_sd: float = 0.3  # log-normal spread of library sizes
    interaction_probs: tuple[float, float, float] = (0.4, 0.3, 0.3)  # additive, syn., buff.
    synergy_gain: float = 1.8
    buffering_gain: float = 0.35
    condition_size_sd: float = 0.25  # log-normal spread of cells per condition
    min_cells_per_condition: int = 4
    cell_type: str = "simcell"
    target_sum: float = 1e4

    def __post_init__(self):
        def need(ok: bool, message: str) -> None:
            if not ok:
                raise ValueError(f"SimulationConfig: {message}")

        need(self.n_genes >= 4, f"n_genes must be >= 4, got {self.n_genes}.")
        need(self.n_pert_genes >= 2, f"n_pert_genes must be >= 2, got {self.n_pert_genes}.")
        need(
            0 <= self.n_unmeasured_pert_genes < self.n_pert_genes,
            "n_unmeasured_pert_genes must be in [0, n_pert_genes).",
        )
        need(
            self.n_pert_genes - self.n_unmeasured_pert_genes <= self.n_genes,
            "more measured perturbed genes than genes.",
        )
        max_pairs = self.n_pert_genes * (self.n_pert_genes - 1) // 2
        need(
            0 <= self.n_combos <= max_pairs,
            f"n_combos must be in [0, {max_pairs}] for {self.n_pert_genes} perturbed genes.",
        )
        need(self.cells_per_condition >= 2, "cells_per_condition must be >= 2.")
        need(self.n_control_cells >= 2, "n_control_cells must be >= 2.")
        need(self.min_cells_per_condition >= 2, "min_cells_per_condition must be >= 2.")
        need(self.grn_layers >= 2, "grn_layers must be >= 2.")
        need(
            len(self.interaction_probs) == 3
            and min(self.interaction_probs) >= 0
            and sum(self.interaction_probs) > 0,
            "interaction_probs must be three non-negative weights.",
        )
        need(0 < self.efficiency_low <= 1, "efficiency_low must be in (0, 1].")
        need("_" not in self.cell_type, "cell_type must not contain '_'.")


PRESETS: dict[str, SimulationConfig] = {
    # Unit tests: a few hundred cells, 40 genes.
    "tiny": SimulationConfig(
        n_genes=40, n_pert_genes=10, n_combos=8, cells_per_condition=12, n_control_cells=80
    ),
    # The default built-in dataset: ~3.8k cells x 150 genes; trains in minutes on 2 cores.
    "default": SimulationConfig(),
    # A CRISPR knock-out screen as many real ones: single perturbations only, a panel of 300
    # measured genes, most perturbed genes outside the panel, ~2.6k cells. Its test
    # perturbations are unseen singles whose gene is mostly not measured.
    "screen": SimulationConfig(
        n_genes=300,
        n_pert_genes=100,
        n_unmeasured_pert_genes=80,
        n_combos=0,
        cells_per_condition=20,
        n_control_cells=600,
        activation_fraction=0.0,
    ),
    # Benchmarks only: the size of GEARS's Norman 2019 data (~91k cells x 5045 genes,
    # 105 perturbed genes, 131 doubles, ~7.4k control cells).
    "norman": SimulationConfig(
        n_genes=5045,
        n_pert_genes=105,
        n_combos=131,
        cells_per_condition=355,
        n_control_cells=7353,
        umis_per_gene=0.6,
    ),
    # The size of Replogle et al. 2022's K562 essential screen (~310k cells x 8563 genes,
    # 2057 single CRISPRi knock-downs, ~10.7k control cells). About a third of X is non-zero
    # (~0.8G stored values, ~6.6 GB on disk): too large to hold comfortably as CSR on a
    # small machine, so it is generated straight to disk and read from there.
    "replogle_essential": SimulationConfig(
        n_genes=8563,
        n_pert_genes=2057,
        n_unmeasured_pert_genes=200,
        n_combos=0,
        cells_per_condition=145,
        n_control_cells=10691,
        activation_fraction=0.0,
        umis_per_gene=0.6,
    ),
    # Genome-wide-sized (Replogle 2022's K562 genome-wide screen: ~2M cells x 8248 genes,
    # 9867 single knock-downs). Sparser than the essential preset (12% non-zero, ~2G stored
    # values: X ~16 GB on disk, plus ~4 GB of per-condition DE tables) to fit a modest disk.
    "genome_wide": SimulationConfig(
        n_genes=8248,
        n_pert_genes=9867,
        n_unmeasured_pert_genes=1619,
        n_combos=0,
        cells_per_condition=195,
        n_control_cells=75000,
        activation_fraction=0.0,
        umis_per_gene=0.15,
    ),
}
# Presets too large to generate in memory: the built-in names write them to an .h5ad cache
# file (simulate_to_h5ad) and load them from there.
ON_DISK_PRESETS = ("replogle_essential", "genome_wide")


def simulation_config(preset: str = "default", **overrides: Any) -> SimulationConfig:
    """A preset's config with some fields replaced (unknown names raise ValueError)."""
    if preset not in PRESETS:
        raise ValueError(f"Unknown simulation preset {preset!r}; choose one of {list(PRESETS)}.")
    fields = {f.name for f in dataclasses.fields(SimulationConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(f"Unknown simulation option(s) {unknown}; valid: {sorted(fields)}.")
    return dataclasses.replace(PRESETS[preset], **overrides)


@dataclasses.dataclass(frozen=True)
class _Network:
    weights: sparse.csr_matrix  # (total_genes, total_genes); W[r, t] = weight of r -> t
    regulators: np.ndarray  # (n_edges,)
    targets: np.ndarray  # (n_edges,)
    edge_weights: np.ndarray  # (n_edges,)
    layer: np.ndarray  # (total_genes,)


def _make_network(cfg: SimulationConfig, total: int, rng: np.random.Generator) -> _Network:
    order = rng.permutation(total)
    n_root = max(2, int(round(0.2 * total)))
    layer = np.empty(total, np.int64)
    layer[order[:n_root]] = 0
    rest = order[n_root:]
    layer[rest] = 1 + (np.arange(len(rest)) * (cfg.grn_layers - 1)) // max(len(rest), 1)
    # Hubs: a heavy-tailed propensity to regulate, as in real networks.
    hubness = rng.pareto(1.5, total) + 0.05
    regulators, targets = [], []
    by_layer = [np.flatnonzero(layer == depth) for depth in range(cfg.grn_layers)]
    for depth in range(1, cfg.grn_layers):
        candidates = np.concatenate(by_layer[:depth])
        p = hubness[candidates] / hubness[candidates].sum()
        genes = by_layer[depth]
        k = np.minimum(
            1 + rng.poisson(max(cfg.mean_regulators - 1.0, 0.0), len(genes)), len(candidates)
        )
        # Weighted sampling without replacement for all genes of the layer at once
        # (Gumbel top-k on log-propensities).
        keys = np.log(p)[None, :] + rng.gumbel(size=(len(genes), len(candidates)))
        ranked = np.argsort(-keys, axis=1)
        for gene, kg, row in zip(genes, k, ranked):
            regulators.append(candidates[row[:kg]])
            targets.append(np.full(kg, gene))
    regulators = np.concatenate(regulators)
    targets = np.concatenate(targets)
    in_degree = np.bincount(targets, minlength=total)
    sign = np.where(rng.random(len(targets)) < cfg.activating_edge_fraction, 1.0, -1.0)
    weights = sign * rng.uniform(0.5, 1.1, len(targets)) / np.sqrt(in_degree[targets])
    matrix = sparse.csr_matrix((weights, (regulators, targets)), shape=(total, total))
    return _Network(matrix, regulators, targets, weights, layer)


def _pair_of_index(index: np.ndarray, n: int) -> np.ndarray:
    """int64 (k, 2): the pairs (i, j), i < j < n, at positions `index` of their
    lexicographic order (without listing all n(n-1)/2 pairs)."""
    index = np.asarray(index, np.int64)
    # Pairs before row i: i * n - i * (i + 1) / 2.
    rows = np.arange(n, dtype=np.int64)
    first = rows * n - rows * (rows + 1) // 2
    i = np.searchsorted(first, index, side="right") - 1
    j = index - first[i] + i + 1
    return np.stack([i, j], axis=1).reshape(-1, 2)


def _gene_names(total: int) -> np.ndarray:
    width = max(4, len(str(total)))
    return np.array([f"G{i:0{width}d}" for i in range(total)], dtype=object)


def _propagate(
    start: np.ndarray,
    baseline: np.ndarray,
    regulators: np.ndarray,
    weights_in: sparse.csr_matrix,
    scale: float,
    steps: int,
) -> np.ndarray:
    """Fixed point of a = start + H(a - b) @ W on a DAG (exact after `steps` = depth).

    Works gene-major, (genes, cells), so that every step is a row gather, an elementwise
    response and one sparse-times-dense product on contiguous memory.

    Args:
      start: float32 (genes, cells): b + e + p.
      baseline: float32 (genes,): b.
      regulators: int (n_regulators,): the genes with outgoing edges (only their response
        feeds other genes).
      weights_in: CSR float32 (genes, n_regulators): W restricted to those genes, transposed.

    Returns:
      float32 (genes, cells).
    """
    state = start
    reg_baseline = baseline[regulators][:, None]
    for _ in range(steps):
        response = np.tanh((state[regulators] - reg_baseline) * np.float32(1.0 / scale))
        response *= np.float32(scale)
        state = start + weights_in @ response
    return state


def _to_csr_rows(values: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(data, indices, row lengths) of a dense (cells, genes) block, row-major."""
    rows, cols = np.nonzero(values)
    return values[rows, cols], cols.astype(np.int32), np.bincount(rows, minlength=values.shape[0])


@dataclasses.dataclass(frozen=True)
class _ChunkTables:
    pert_table: np.ndarray  # int (n_conditions, 2): perturbed genes, -1 for none
    shift_table: np.ndarray  # float (n_conditions, 2): their log-scale shifts
    gain_table: np.ndarray  # float (n_conditions,): interaction gain (1 for non-doubles)
    regulators: np.ndarray  # int (n_regulators,)
    weights_in: sparse.csr_matrix  # float32 (total_genes, n_regulators)
    baseline: np.ndarray  # float32 (total_genes,)
    keep: np.ndarray  # int (n_genes,): the measured genes


def _simulate_chunk(
    cfg: SimulationConfig,
    tables: _ChunkTables,
    rng: np.random.Generator,
    cond: np.ndarray,
    counts_only: bool = False,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Expression of one chunk of cells as CSR pieces (data, indices, row lengths).

    Args:
      cond: int (cells,): each cell's condition (row of the tables).
      counts_only: the UMI counts of the measured genes (float32 integers) instead of the
        log1p-normalised values; the same random draws either way.
    """
    total = len(tables.baseline)
    n = len(cond)
    cells = np.arange(n)
    # Gene-major (genes, cells) until the counts.
    unperturbed = rng.standard_normal((total, n), dtype=np.float32)
    unperturbed *= np.float32(cfg.noise_sd)
    unperturbed += tables.baseline[:, None]
    efficiency = rng.uniform(cfg.efficiency_low, 1.0, n)
    perturbed = unperturbed.copy()
    for k in range(2):
        genes = tables.pert_table[cond, k]
        has = genes >= 0
        perturbed[genes[has], cells[has]] += (
            tables.shift_table[cond[has], k] * efficiency[has]
        ).astype(np.float32)
    state = _propagate(
        perturbed,
        tables.baseline,
        tables.regulators,
        tables.weights_in,
        cfg.response_scale,
        cfg.grn_layers,
    )
    gain = tables.gain_table[cond]
    doubles = np.flatnonzero(gain != 1.0)
    if len(doubles):
        # Scale the downstream response of a double relative to the same cell without the
        # perturbation; the perturbed genes themselves keep their direct shift.
        reference = _propagate(
            unperturbed[:, doubles],
            tables.baseline,
            tables.regulators,
            tables.weights_in,
            cfg.response_scale,
            cfg.grn_layers,
        )
        targets = tables.pert_table[cond[doubles]].T  # (2, n_doubles)
        direct = state[targets, doubles[None, :]]
        state[:, doubles] = reference + gain[doubles].astype(np.float32) * (
            state[:, doubles] - reference
        )
        state[targets, doubles[None, :]] = direct
    state = np.ascontiguousarray(state.T)  # (cells, genes)
    state -= state.max(axis=1, keepdims=True)
    rates = np.exp(state, out=state)
    library = cfg.umis_per_gene * total * rng.lognormal(0.0, cfg.library_sd, n)
    rates *= (library / rates.sum(axis=1, dtype=np.float64)).astype(np.float32)[:, None]
    counts = rng.poisson(rates).astype(np.float32)
    totals = np.maximum(counts.sum(axis=1, keepdims=True), 1.0)
    if len(tables.keep) < total:
        counts = counts[:, tables.keep]
    if counts_only:
        return _to_csr_rows(counts)
    # Normalised over all genes: the measured ones are a subset of the transcriptome.
    values = np.log1p(counts * (np.float32(cfg.target_sum) / totals))
    return _to_csr_rows(values)


@dataclasses.dataclass(frozen=True)
class _Plan:
    """Everything about a simulated experiment except the cells' expression."""

    cfg: SimulationConfig
    seed: int
    tables: _ChunkTables
    cell_condition: np.ndarray  # int (cells,): row of the tables
    condition_strings: list[str]
    names: np.ndarray  # all gene names, measured and unmeasured
    network: _Network
    pert_genes: np.ndarray
    activated: np.ndarray
    unmeasured: np.ndarray
    n_singles: int
    interaction: np.ndarray
    chunk: int  # cells per generated chunk

    @property
    def n_cells(self) -> int:
        return len(self.cell_condition)


def _plan(cfg: SimulationConfig, seed: int) -> _Plan:
    """Draws the network, the perturbations and each cell's condition (not the cells)."""
    rng = np.random.default_rng(int(seed))
    total = cfg.n_genes + cfg.n_unmeasured_pert_genes
    names = _gene_names(total)
    network = _make_network(cfg, total, rng)
    baseline = rng.normal(0.0, cfg.baseline_sd, total)
    # Perturbed genes: regulators first (their effects propagate), preferring big hubs.
    out_degree = np.bincount(network.regulators, minlength=total)
    propensity = np.sqrt(out_degree) + 0.1 * (out_degree == 0)
    keys = np.log(propensity) + rng.gumbel(size=total)
    pert_genes = np.argsort(-keys)[: cfg.n_pert_genes]
    unmeasured = np.zeros(total, bool)
    unmeasured[pert_genes[: cfg.n_unmeasured_pert_genes]] = True
    activated = rng.random(cfg.n_pert_genes) < cfg.activation_fraction
    shift_of = dict(
        zip(pert_genes.tolist(), np.where(activated, cfg.activation_shift, cfg.knockdown_shift))
    )

    # Conditions: singles of every perturbed gene, doubles among pairs of them.
    singles = [(int(g),) for g in pert_genes]
    n_pairs = cfg.n_pert_genes * (cfg.n_pert_genes - 1) // 2
    chosen = _pair_of_index(
        np.sort(rng.choice(n_pairs, cfg.n_combos, replace=False)), cfg.n_pert_genes
    )
    combos = [
        tuple(sorted((int(pert_genes[i]), int(pert_genes[j])), key=lambda g: names[g]))
        for i, j in chosen
    ]
    probs = np.asarray(cfg.interaction_probs, float) / np.sum(cfg.interaction_probs)
    interaction = rng.choice(len(INTERACTIONS), len(combos), p=probs)
    gains = np.array([1.0, cfg.synergy_gain, cfg.buffering_gain])

    perturbations: list[tuple[int, ...]] = [()] + singles + combos
    condition_strings = (
        [CONTROL]
        + [f"{names[g]}+{CONTROL}" for (g,) in singles]
        + [f"{names[a]}+{names[b]}" for a, b in combos]
    )
    sizes = np.maximum(
        cfg.min_cells_per_condition,
        np.round(
            cfg.cells_per_condition
            * rng.lognormal(0.0, cfg.condition_size_sd, len(perturbations) - 1)
        ),
    ).astype(np.int64)
    sizes = np.concatenate([[cfg.n_control_cells], sizes])
    cell_condition = rng.permutation(np.repeat(np.arange(len(perturbations)), sizes))

    # Per-condition perturbation shifts and interaction gains, as dense small tables.
    pert_table = np.full((len(perturbations), 2), -1, np.int64)
    shift_table = np.zeros((len(perturbations), 2))
    for i, genes in enumerate(perturbations):
        for k, g in enumerate(genes):
            pert_table[i, k] = g
            shift_table[i, k] = shift_of[g]
    gain_table = np.ones(len(perturbations))
    gain_table[1 + len(singles) :] = gains[interaction]

    regulators = np.flatnonzero(np.bincount(network.regulators, minlength=total))
    tables = _ChunkTables(
        pert_table=pert_table,
        shift_table=shift_table,
        gain_table=gain_table,
        regulators=regulators,
        weights_in=sparse.csr_matrix(network.weights[regulators].T, dtype=np.float32),
        baseline=baseline.astype(np.float32),
        keep=np.flatnonzero(~unmeasured),
    )
    # The chunk size and each chunk's random stream depend only on (config, seed), so the
    # result is the same whatever the number of worker threads.
    chunk = int(max(256, min(16384, 4_000_000 // total)))
    return _Plan(
        cfg=cfg,
        seed=int(seed),
        tables=tables,
        cell_condition=cell_condition,
        condition_strings=condition_strings,
        names=names,
        network=network,
        pert_genes=pert_genes,
        activated=activated,
        unmeasured=unmeasured,
        n_singles=len(singles),
        interaction=interaction,
        chunk=chunk,
    )


def _blocks(plan: _Plan, workers: int | None = None, counts_only: bool = False):
    """Yields the cells' expression chunk by chunk, in order, as CSR pieces (the UMI counts
    of the measured genes with `counts_only`).

    The chunk size and each chunk's random stream depend only on (config, seed), so the
    result is the same whatever the number of worker threads. At most ``2 * workers`` chunks
    are in flight, so memory stays bounded however many cells there are.
    """
    starts = range(0, plan.n_cells, plan.chunk)
    work = (
        (
            np.random.default_rng([plan.seed, 1, i]),
            plan.cell_condition[s : s + plan.chunk],
            counts_only,
        )
        for i, s in enumerate(starts)
    )
    if workers is None:
        workers = max(1, min(len(starts), os.cpu_count() or 1, 4))
    if workers <= 1:
        for w in work:
            yield _simulate_chunk(plan.cfg, plan.tables, *w)
        return
    # numpy's samplers, ufuncs and scipy's sparse products release the GIL.
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        pending: collections.deque = collections.deque()
        for w in work:
            pending.append(pool.submit(_simulate_chunk, plan.cfg, plan.tables, *w))
            if len(pending) >= 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def _frames(plan: _Plan) -> tuple[pd.DataFrame, pd.DataFrame]:
    """obs ('condition', 'cell_type') and var ('gene_name') of the simulated dataset."""
    n_cells = plan.n_cells
    obs = pd.DataFrame(
        {
            "condition": np.asarray(plan.condition_strings, dtype=object)[plan.cell_condition],
            "cell_type": plan.cfg.cell_type,
        },
        index=pd.Index([f"cell{i}" for i in range(n_cells)]),
    )
    keep = plan.tables.keep
    names = plan.names
    var = pd.DataFrame({"gene_name": names[keep]}, index=pd.Index(names[keep].astype(str)))
    return obs, var


def _truth(plan: _Plan) -> dict[str, Any]:
    """``uns['simulation']``: the config, the network and the perturbations' modes."""
    names, network = plan.names, plan.network
    return {
        "config": json.dumps(dataclasses.asdict(plan.cfg)),
        "seed": int(plan.seed),
        "edge_regulator": names[network.regulators].astype(str),
        "edge_target": names[network.targets].astype(str),
        "edge_weight": network.edge_weights.astype(np.float32),
        "perturbed_genes": names[plan.pert_genes].astype(str),
        "perturbation_mode": np.where(plan.activated, "activation", "knockdown").astype(str),
        "unmeasured_genes": names[plan.unmeasured].astype(str),
        "combo_conditions": np.asarray(plan.condition_strings[1 + plan.n_singles :], dtype=str),
        "combo_interactions": np.asarray([INTERACTIONS[i] for i in plan.interaction], dtype=str),
    }


def _checked_config(config: SimulationConfig | str, seed) -> SimulationConfig:
    cfg = simulation_config(config) if isinstance(config, str) else config
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}.")
    return cfg


def simulate(config: SimulationConfig | str = "default", seed: int = 0) -> anndata.AnnData:
    """Generates the simulated Perturb-seq dataset as a GEARS-format AnnData in memory.

    Args:
      config: a :class:`SimulationConfig` or a preset name (``"tiny"``, ``"default"``,
        ``"norman"``, ...).
      seed: the whole dataset is a function of (config, seed).

    Returns:
      AnnData: X CSR float32 (cells, n_genes) log1p-normalised; obs 'condition',
      'cell_type', 'condition_name', 'dose_val', 'control'; var 'gene_name'; uns with
      GEARS's DE entries and ``uns['simulation']`` (config, network edges, perturbation modes,
      interaction type of each double).
    """
    cfg = _checked_config(config, seed)
    plan = _plan(cfg, int(seed))
    blocks = list(_blocks(plan))
    indptr = np.concatenate([[0], np.cumsum(np.concatenate([b[2] for b in blocks]))])
    index_dtype = np.int32 if indptr[-1] < np.iinfo(np.int32).max else np.int64
    X = sparse.csr_matrix(
        (
            np.concatenate([b[0] for b in blocks]),
            np.concatenate([b[1] for b in blocks]).astype(index_dtype, copy=False),
            indptr.astype(index_dtype),
        ),
        shape=(plan.n_cells, len(plan.tables.keep)),
    )
    del blocks
    obs, var = _frames(plan)
    adata = anndata.AnnData(X=X, obs=obs, var=var)
    add_gears_annotations(adata, de_backend="numpy")
    adata.uns["simulation"] = _truth(plan)
    return adata


def simulate_to_h5ad(
    config: SimulationConfig | str,
    path: str | os.PathLike,
    seed: int = 0,
    *,
    progress: bool = False,
    workers: int | None = None,
    counts: bool = False,
) -> Path:
    """Generates the simulated dataset straight into an ``.h5ad`` file, chunk by chunk.

    The same dataset as :func:`simulate` (same X, obs, var and uns), but X never sits in
    memory: chunks of cells are appended to the file's CSR arrays as they are generated and
    the DE statistics are then computed in one chunked pass over the file. Memory stays at a
    few chunks plus the per-condition statistics (conditions x genes, float64). The file is
    written under a temporary name and renamed when complete.

    With ``counts=True`` the file is instead the raw experiment that ``prepare`` takes as
    input: X holds the cells' UMI counts of the measured genes (float32 integers, the same
    draws the normalised dataset comes from), obs 'condition' (GEARS condition strings,
    ``ctrl`` for controls) and 'cell_type', var 'gene_name', ``uns['simulation']``, and no
    DE entries (X is not read back). Its X is stored gzip-compressed (about a fifth of the
    space; ``prepare`` reads it front to back). Normalising it (``prepare``) divides by each
    cell's total over the measured genes, whereas the simulator's own normalisation counts the
    unmeasured perturbed genes too; without unmeasured genes the values are those of
    :func:`simulate`.

    Args:
      config: a :class:`SimulationConfig` or a preset name.
      path: the ``.h5ad`` file to write.
      seed: the whole dataset is a function of (config, seed).
      progress: show progress bars on stderr.
      workers: generating threads (None: up to 4, at most the CPU count).
      counts: write raw UMI counts without DE entries (see above).

    Returns:
      The path written.
    """
    import h5py
    from tqdm import tqdm

    cfg = _checked_config(config, seed)
    plan = _plan(cfg, int(seed))
    obs, var = _frames(plan)
    with atomic_path(path, suffix=".h5ad") as tmp:
        with h5py.File(tmp, "w") as f:
            writer = CSRWriter(f, len(plan.tables.keep), compress=counts)
            blocks = _blocks(plan, workers, counts_only=counts)
            if progress:
                blocks = tqdm(
                    blocks,
                    desc="simulate cells",
                    total=-(-plan.n_cells // plan.chunk),
                    unit="chunk",
                )
            for data, indices, lengths in blocks:
                writer.append(data, indices, lengths)
            writer.close()
        meta = anndata.AnnData(obs=obs, var=var)
        if not counts:
            X = BackedCSR(tmp)
            try:
                add_gears_annotations(meta, de_backend="numpy", X=X, progress=progress)
            finally:
                X.close()
        meta.uns["simulation"] = _truth(plan)
        write_metadata(tmp, meta)
    return Path(path)


def simulation_truth(adata: anndata.AnnData) -> dict[str, Any]:
    """The ground truth stored by :func:`simulate` (config, edges, modes, interactions)."""
    if "simulation" not in adata.uns:
        raise ValueError(
            "This AnnData was not made by scformer_jax.data.simulate (no uns['simulation'])."
        )
    info: Mapping[str, Any] = adata.uns["simulation"]
    return {
        "config": json.loads(str(info["config"])),
        "seed": int(info["seed"]),
        "edges": list(
            zip(
                map(str, info["edge_regulator"]),
                map(str, info["edge_target"]),
                map(float, info["edge_weight"]),
            )
        ),
        "perturbation_mode": dict(
            zip(map(str, info["perturbed_genes"]), map(str, info["perturbation_mode"]))
        ),
        "unmeasured_genes": [str(g) for g in info["unmeasured_genes"]],
        "interaction": dict(
            zip(map(str, info["combo_conditions"]), map(str, info["combo_interactions"]))
        ),
    }
