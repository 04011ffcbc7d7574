"""Times data preparation of a Norman-sized dataset: load, split, pair (and batch assembly).

    python bench/data_bench.py --json

The dataset is the built-in simulator's ``norman`` preset (about 90k cells x 5045 genes, the
size of GEARS's Norman 2019 data), written once as an ``.h5ad`` file by a separate process
(not timed: real users download theirs) and cached under ``--cache-dir``. This process then
does what training does before its first step, timing each stage: load the file
(:func:`scformer_jax.data.load_dataset`: read, validate, build the vocabulary, condition
index and DE genes), split it (:func:`scformer_jax.data.gears_split`, GEARS's "simulation"
split), and pair every training cell with a control cell (the loader's pairing of epoch 0).
It then assembles ``--batches`` training batches (batch 32, all genes capped at
``--max-seq-len``) to show that the input pipeline costs far less than a train step.

Reported: seconds per stage, ``total_s`` (load + split + pair), ms per assembled batch, the
dataset's size, and the peak resident memory of this process (``ru_maxrss``).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

DEFAULT_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "scformer-jax"


def dataset_path(cache_dir: Path, preset: str, seed: int) -> Path:
    return cache_dir / f"simulated_{preset}_seed{seed}.h5ad"


def generate(path: Path, preset: str, seed: int) -> None:
    """Simulates the preset and writes it to `path` (atomically)."""
    from scformer_jax.data import simulate, write_h5ad_atomic

    path.parent.mkdir(parents=True, exist_ok=True)
    write_h5ad_atomic(simulate(preset, seed=seed), path)


def ensure_dataset(path: Path, preset: str, seed: int, log) -> float:
    """Writes the dataset in a child process unless cached; returns the seconds it took."""
    if path.exists():
        return 0.0
    log(f"data_bench: simulating the {preset!r} preset into {path} (once) ...")
    start = time.perf_counter()
    subprocess.run(
        [
            sys.executable,
            __file__,
            "--generate",
            str(path),
            "--preset",
            preset,
            "--seed",
            str(seed),
        ],
        check=True,
    )
    return time.perf_counter() - start


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def measure(path: Path, *, batches: int, batch_size: int, max_seq_len: int) -> dict:
    from scformer_jax.data import BatchLoader, gears_split, load_dataset

    rss_start = peak_rss_gb()
    t0 = time.perf_counter()
    data = load_dataset(path)
    t1 = time.perf_counter()
    split = gears_split(data.conditions, "simulation", seed=1)
    t2 = time.perf_counter()
    loader = BatchLoader(
        data,
        split["train"],
        batch_size=batch_size,
        include_zero_gene="all",
        max_seq_len=max_seq_len,
        seed=0,
    )
    partners = loader.pairing(0)
    t3 = time.perf_counter()
    assembled = 0
    epoch = loader.epoch(0)
    for _ in range(min(batches, len(loader))):
        host = next(epoch)
        assembled += 1
    t4 = time.perf_counter()
    return {
        "load_s": t1 - t0,
        "split_s": t2 - t1,
        "pair_s": t3 - t2,
        "total_s": t3 - t0,
        "batch_ms": 1e3 * (t4 - t3) / max(assembled, 1),
        "batches_timed": assembled,
        "batch_shape": list(host.batch.gene_ids.shape) if assembled else None,
        "n_cells": int(data.n_cells),
        "n_genes": int(data.n_genes),
        "n_conditions": len(data.conditions),
        "n_train_cells": int(loader.n_cells),
        "n_paired": int(len(partners)),
        "file_gb": path.stat().st_size / 2**30,
        "peak_rss_gb": peak_rss_gb(),
        "rss_before_gb": rss_start,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="norman", help="simulation preset (default norman)")
    parser.add_argument("--seed", type=int, default=0, help="simulation seed")
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=DEFAULT_CACHE,
        help=f"where the simulated .h5ad is kept (default {DEFAULT_CACHE})",
    )
    parser.add_argument("--batches", type=int, default=20, help="training batches to assemble")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-seq-len", type=int, default=1536)
    parser.add_argument("--json", action="store_true", help="print one JSON line")
    parser.add_argument("--generate", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.generate is not None:
        generate(args.generate, args.preset, args.seed)
        return 0

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    try:
        path = dataset_path(args.cache_dir, args.preset, args.seed)
        simulate_s = ensure_dataset(path, args.preset, args.seed, log)
    except (OSError, subprocess.CalledProcessError):
        # An unwritable cache: fall back to a temporary folder.
        path = dataset_path(Path(tempfile.gettempdir()) / "scformer-jax", args.preset, args.seed)
        simulate_s = ensure_dataset(path, args.preset, args.seed, log)
    record = {"preset": args.preset, "path": str(path), "simulate_s": simulate_s or None}
    record.update(
        measure(
            path, batches=args.batches, batch_size=args.batch_size, max_seq_len=args.max_seq_len
        )
    )
    if args.json:
        print(json.dumps(record))
    else:
        print(
            f"{record['n_cells']} cells x {record['n_genes']} genes: load "
            f"{record['load_s']:.1f} s, split {record['split_s']:.2f} s, pair "
            f"{record['pair_s']:.2f} s, total {record['total_s']:.1f} s, peak "
            f"{record['peak_rss_gb']:.2f} GB; {record['batch_ms']:.0f} ms per batch of "
            f"{args.batch_size}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
