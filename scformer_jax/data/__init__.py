"""Perturb-seq data: GEARS-format loading and preparation, splits, control pairing,
fixed-shape two-channel batches, the GEARS-batch adapter and the built-in simulated dataset.

Typical use::

    from scformer_jax.data import load_dataset, gears_split, BatchLoader

    data = load_dataset("simulated")            # or a GEARS folder / .h5ad file
    split = gears_split(data.conditions, "simulation", seed=1)
    loader = BatchLoader(data, split["train"], batch_size=32, seed=0)
    for host_batch in loader.epoch(0):
        host_batch.batch                          # PerturbBatch of NumPy arrays
"""

from scformer_jax.data.adapter import from_gears_batch
from scformer_jax.data.batching import (
    INCLUDE_ZERO_GENE_MODES,
    BatchLoader,
    HostBatch,
    assemble_batch,
    bucket_sizes,
    pair_controls,
)
from scformer_jax.data.conditions import CONTROL, DataFormatError, parse_condition
from scformer_jax.data.dataset import (
    BUILTIN_DATASETS,
    SPECIAL_TOKENS,
    PerturbData,
    UnknownGeneError,
    load_dataset,
)
from scformer_jax.data.de import add_gears_annotations
from scformer_jax.data.gears_io import read_gears, validate_gears_adata, write_h5ad_atomic
from scformer_jax.data.prepare import prepare
from scformer_jax.data.simulate import (
    PRESETS,
    SimulationConfig,
    simulate,
    simulation_config,
    simulation_truth,
)
from scformer_jax.data.splits import gears_split

__all__ = [
    "BUILTIN_DATASETS",
    "CONTROL",
    "INCLUDE_ZERO_GENE_MODES",
    "PRESETS",
    "SPECIAL_TOKENS",
    "BatchLoader",
    "DataFormatError",
    "HostBatch",
    "PerturbData",
    "SimulationConfig",
    "UnknownGeneError",
    "add_gears_annotations",
    "assemble_batch",
    "bucket_sizes",
    "from_gears_batch",
    "gears_split",
    "load_dataset",
    "pair_controls",
    "parse_condition",
    "prepare",
    "read_gears",
    "simulate",
    "simulation_config",
    "simulation_truth",
    "validate_gears_adata",
    "write_h5ad_atomic",
]
