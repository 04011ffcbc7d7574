"""Data at scale: wall time and peak memory of each stage, and the input pipeline's batches/s.

    python bench/data_bench.py --json                  # Norman-sized, in memory (bench/run.py)
    python bench/data_bench.py --preset replogle_essential --cache-dir /work/cache15 \\
        --cases generate,load,batches,validate,train,eval
    python bench/data_bench.py --preset genome_wide --counts --cache-dir DIR \\
        --cases generate,prepare,load,batches,train --train-steps 100

Without ``--cases`` (the default, what ``bench/run.py`` runs): the ``norman`` preset is written
once as an ``.h5ad`` file by a child process and cached; this process then loads it, splits it
(GEARS's "simulation" split), pairs every training cell with a control and assembles
``--batches`` batches, timing each stage.

With ``--cases``, each case runs in its own child process (so that its peak resident memory,
``VmHWM``, is its own) and prints one JSON record; the parent prints them all:

* ``generate``: the simulator writes the preset to the cache folder chunk by chunk
  (skipped, and reported as cached, when the file exists).
* ``prepare``: :func:`~scformer_jax.data.prepare.prepare_h5ad` on the preset's file (already
  log-normalised: X rewritten block by block, DE genes recomputed); the output is deleted.
* ``load``: load (X on disk when larger than ``data.backed_above_gb``) + split + pairing.
* ``batches``: assembles ``--batches`` training batches at the seed's settings (batch
  ``--batch-size``, ``include_zero_gene`` batch-wise, ``max_seq_len`` 1536, pairing drawn once)
  and times ``--steps`` train steps of the seed's model (``configs/scformer.yaml``) on them in
  the same process: batches/s and how many batches the pipeline makes per train step.
* ``validate``: validation (all genes per cell, as training validates) on ``--val-batches``
  batches of the seed's model.
* ``train``: ``train.py --config configs/scformer.yaml`` for ``--train-steps`` steps.
* ``eval``: ``eval.py`` on that run for ``--eval-perturbations`` test perturbations,
  ``--eval-cells`` cells each.

With ``--counts`` the simulator writes the raw experiment instead (UMI counts of the measured
genes, compressed, no DE genes: ``simulate_to_h5ad(counts=True)``) to
``simulated_PRESET_seedN_counts.h5ad``; ``prepare`` normalises it, log-transforms it and
computes the DE genes into ``simulated_PRESET_seedN_prepared.h5ad``, which it keeps, and the
later cases read that file: the path of a user's raw screen.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if __package__ in (None, ""):
    sys.path.insert(0, str(ROOT))

DEFAULT_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "scformer-jax"
SEED_CONFIG = ROOT / "configs" / "scformer.yaml"
CASES = ("generate", "prepare", "load", "batches", "validate", "train", "eval")


def dataset_path(cache_dir: Path, preset: str, seed: int) -> Path:
    return cache_dir / f"simulated_{preset}_seed{seed}.h5ad"


def _gb(path) -> float:
    """A file's size in GiB."""
    return Path(path).stat().st_size / 2**30


def counts_paths(cache_dir: Path, preset: str, seed: int) -> tuple[Path, Path]:
    """(raw counts file, its prepared file) of ``--counts``."""
    stem = f"simulated_{preset}_seed{seed}"
    return cache_dir / f"{stem}_counts.h5ad", cache_dir / f"{stem}_prepared.h5ad"


def generate(path: Path, preset: str, seed: int, counts: bool = False) -> None:
    """Simulates the preset and writes it to `path` (chunk by chunk for the large presets;
    with `counts`, the raw UMI counts, chunk by chunk)."""
    from scformer_jax.data import simulate, write_h5ad_atomic
    from scformer_jax.data.simulate import ON_DISK_PRESETS, simulate_to_h5ad

    path.parent.mkdir(parents=True, exist_ok=True)
    if counts or preset in ON_DISK_PRESETS:
        simulate_to_h5ad(preset, path, seed=seed, progress=True, counts=counts)
    else:
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
    """Peak resident memory of this process (VmHWM; ru_maxrss where /proc is missing)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def measure(path: Path, *, batches: int, batch_size: int, max_seq_len: int) -> dict:
    """Load + split + pair + batch assembly of a cached file, in this process (mode "all")."""
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
        "backed": bool(data.backed),
        "file_gb": _gb(path),
        "peak_rss_gb": peak_rss_gb(),
        "rss_before_gb": rss_start,
    }


# ----------------------------------------------------------------------------- cases


def _seed_config(args, workdir: Path | None = None):
    from scformer_jax.config import load_config

    overrides = [
        f"data.path={args.path}",
        f"train.batch_size={args.batch_size}",
        f"train.eval_batch_size={args.eval_batch_size}",
        f"data.cache_mb={args.cache_mb}",
    ]
    return load_config(SEED_CONFIG, overrides)


def _load(args):
    from scformer_jax.runs import load_data

    config = _seed_config(args)
    t0 = time.perf_counter()
    dataset, split = load_data(config)
    return config, dataset, split, time.perf_counter() - t0


def case_generate(args) -> dict:
    counts = getattr(args, "counts", False)
    path = Path(args.raw_path if counts else args.path)
    if path.exists():
        return {"cached": True, "file_gb": _gb(path)}
    t0 = time.perf_counter()
    generate(path, args.preset, args.seed, counts=counts)
    return {"cached": False, "generate_s": time.perf_counter() - t0, "file_gb": _gb(path)}


def case_prepare(args) -> dict:
    """The chunked prepare of the (already log-normalised) file: X rewritten block by block,
    DE genes recomputed in chunked passes; the output is deleted afterwards. With
    ``--counts``: the raw counts normalised, log-transformed and the DE genes computed into
    the prepared file, which the later cases read."""
    from scformer_jax.data.prepare import prepare_h5ad

    if getattr(args, "counts", False):
        t0 = time.perf_counter()
        prepare_h5ad(
            args.raw_path,
            args.path,
            perturbation_key="condition",
            control_label="ctrl",
            cell_type_key="cell_type",
            progress=True,
        )
        return {
            "prepare_s": time.perf_counter() - t0,
            "raw_file_gb": _gb(args.raw_path),
            "file_gb": _gb(args.path),
        }
    out = Path(args.path).with_name(Path(args.path).stem + "_prepared.h5ad")
    t0 = time.perf_counter()
    prepare_h5ad(
        args.path,
        out,
        perturbation_key="condition",
        control_label="ctrl",
        normalize=False,
        labels_are_gene_names=True,
    )
    record = {"prepare_s": time.perf_counter() - t0, "file_gb": _gb(out)}
    out.unlink()
    return record


def case_load(args) -> dict:
    from scformer_jax.training import _loader

    config, dataset, split, load_s = _load(args)
    t0 = time.perf_counter()
    loader = _loader(dataset, split["train"], config, train=True, batch_size=args.batch_size)
    partners = loader.pairing(0)
    pair_s = time.perf_counter() - t0
    return {
        "load_split_s": load_s,
        "pair_s": pair_s,
        "backed": bool(dataset.backed),
        "n_cells": int(dataset.n_cells),
        "n_genes": int(dataset.n_genes),
        "n_conditions": len(dataset.conditions),
        "n_train_cells": int(loader.n_cells),
        "n_paired": int(len(partners)),
        "train_batches_per_epoch": len(loader),
        "split_sizes": {k: len(split[k]) for k in ("train", "val", "test")},
    }


def case_batches(args) -> dict:
    import jax

    from scformer_jax.model import TransformerGenerator
    from scformer_jax.training import (
        _loader,
        create_train_state,
        model_config_for,
        train_step,
    )

    config, dataset, split, load_s = _load(args)
    loader = _loader(dataset, split["train"], config, train=True, batch_size=args.batch_size)
    epoch = loader.epoch(0)
    t0 = time.perf_counter()
    hosts = [next(epoch) for _ in range(args.batches)]
    assemble_s = time.perf_counter() - t0
    batches_per_s = args.batches / assemble_s

    model_config = model_config_for(config, dataset)
    model = TransformerGenerator(model_config)
    state, _ = create_train_state(model_config, config.optim, len(loader), jax.random.PRNGKey(0))
    step = jax.jit(
        lambda s, b, r: train_step(s, b, r, model=model, objective=config.objective, axis_name=None)
    )
    rng = jax.random.PRNGKey(1)
    t0 = time.perf_counter()
    state, metrics = step(state, hosts[0].batch, rng)
    jax.block_until_ready(metrics)
    compile_s = time.perf_counter() - t0
    times = []
    for i in range(args.steps):
        t0 = time.perf_counter()
        state, metrics = step(state, hosts[(i + 1) % len(hosts)].batch, rng)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - t0)
    step_s = sorted(times)[len(times) // 2]
    return {
        "load_split_s": load_s,
        "batch_shape": list(hosts[0].batch.gene_ids.shape),
        "batches_per_s": batches_per_s,
        "assemble_ms": 1e3 / batches_per_s,
        "rows_read_from_disk": int(getattr(dataset.X, "rows_read", 0)),
        "train_step_s": step_s,
        "first_step_s_with_compile": compile_s,
        "batches_per_train_step": batches_per_s * step_s,
        "backed": bool(dataset.backed),
    }


def case_validate(args) -> dict:
    import jax

    from scformer_jax import parallel
    from scformer_jax.model import TransformerGenerator, init_params
    from scformer_jax.training import _loader, make_p_eval_step, model_config_for, validate

    config, dataset, split, load_s = _load(args)
    loader = _loader(
        dataset, split["val"], config, train=False, batch_size=config.train.eval_batch_size
    )
    model_config = model_config_for(config, dataset)
    params = parallel.replicate(init_params(model_config, jax.random.PRNGKey(0)))
    p_eval = make_p_eval_step(TransformerGenerator(model_config))
    t0 = time.perf_counter()
    val = validate(p_eval, params, loader, dataset, max_batches=args.val_batches)
    return {
        "load_split_s": load_s,
        "val_batches": args.val_batches,
        "val_batches_in_split": len(loader),
        "validate_s": time.perf_counter() - t0,
        "val_mse": float(val["val_mse"]),
    }


def case_train(args) -> dict:
    import train as train_cli

    workdir = Path(args.workdir)
    if workdir.exists():
        shutil.rmtree(workdir)
    argv = [
        "--config",
        str(SEED_CONFIG),
        "--workdir",
        str(workdir),
        "--no-progress",
    ]
    for setting in (
        f"data.path={args.path}",
        f"train.batch_size={args.batch_size}",
        f"train.max_steps={args.train_steps}",
        "train.log_interval=1",
        f"data.cache_mb={args.cache_mb}",
    ):
        argv += ["--set", setting]
    t0 = time.perf_counter()
    code = train_cli.main(argv)
    wall = time.perf_counter() - t0
    steps = []
    log = workdir / "metrics.jsonl"
    if log.exists():
        for line in log.read_text().splitlines():
            record = json.loads(line)
            if "ms_per_batch" in record:
                steps.append(record["ms_per_batch"] / 1e3)
    record = {"exit": code, "train_steps": args.train_steps, "wall_s": wall}
    if steps:
        record["median_step_s"] = sorted(steps)[len(steps) // 2]
    return record


def case_eval(args) -> dict:
    import eval as eval_cli

    t0 = time.perf_counter()
    code = eval_cli.main(
        [
            "--workdir",
            str(args.workdir),
            "--checkpoint",
            "latest",
            "--n-plots",
            "0",
            "--max-perturbations",
            str(args.eval_perturbations),
            "--max-cells",
            str(args.eval_cells),
        ]
    )
    record = {"exit": code, "eval_s": time.perf_counter() - t0}
    metrics = Path(args.workdir) / "eval" / "metrics.json"
    if code == 0 and metrics.exists():
        summary = json.loads(metrics.read_text())
        record["n_test_perturbations"] = summary["n_test_perturbations"]
        record["pearson_delta"] = summary["model"]["overall"].get("pearson_delta")
    return record


def run_case(name: str, args) -> dict:
    t0 = time.perf_counter()
    record = {"case": name, "preset": args.preset}
    record.update(globals()[f"case_{name}"](args))
    record["wall_s"] = time.perf_counter() - t0
    record["peak_rss_gb"] = peak_rss_gb()
    return record


def run_cases(args, log) -> list[dict]:
    records = []
    for name in args.cases:
        cmd = [sys.executable, __file__, "--case", name] + args.child_argv
        log(f"data_bench: case {name} ...")
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
        record = json.loads(lines[-1]) if lines else {"case": name}
        if proc.returncode:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            record["error"] = f"exit {proc.returncode}: " + " | ".join(tail)[-400:]
        log(f"  {json.dumps(record)}")
        records.append(record)
    return records


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
    parser.add_argument("--batch-size", type=int, default=None, help="default 32, cases 64")
    parser.add_argument("--max-seq-len", type=int, default=1536)
    parser.add_argument("--cases", default=None, help=f"comma-separated, of {','.join(CASES)}")
    parser.add_argument("--steps", type=int, default=3, help="batches: timed train steps")
    parser.add_argument("--eval-batch-size", type=int, default=32)
    parser.add_argument("--val-batches", type=int, default=2, help="validate: batches")
    parser.add_argument("--train-steps", type=int, default=200, help="train: steps")
    parser.add_argument("--eval-perturbations", type=int, default=3)
    parser.add_argument("--eval-cells", type=int, default=32)
    parser.add_argument("--cache-mb", type=int, default=512, help="data.cache_mb")
    parser.add_argument("--workdir", type=Path, default=None, help="train/eval run folder")
    parser.add_argument(
        "--path", default=None, help="cases: this .h5ad instead of the preset's cache file"
    )
    parser.add_argument(
        "--counts",
        action="store_true",
        help="cases: simulate raw counts, prepare them (normalise, log1p, DE genes) into the "
        "file the later cases read",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON line")
    parser.add_argument("--generate", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--case", default=None, choices=CASES, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.generate is not None:
        generate(args.generate, args.preset, args.seed)
        return 0

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    if args.case or args.cases:
        if args.counts:
            raw, prepared = counts_paths(args.cache_dir, args.preset, args.seed)
            args.raw_path, args.path = str(raw), args.path or str(prepared)
        args.path = args.path or str(dataset_path(args.cache_dir, args.preset, args.seed))
        args.batch_size = args.batch_size or 64
        if args.workdir is None:
            args.workdir = args.cache_dir / f"bench_run_{args.preset}"
        if args.case:
            print(json.dumps(run_case(args.case, args)), flush=True)
            return 0
        args.cases = [c.strip() for c in args.cases.split(",") if c.strip()]
        unknown = sorted(set(args.cases) - set(CASES))
        if unknown:
            parser.error(f"unknown case(s) {unknown}; choose among {list(CASES)}")
        raw = list(argv if argv is not None else sys.argv[1:])
        args.child_argv = []
        skip = False
        for a in raw:
            if skip:
                skip = False
            elif a == "--cases":
                skip = True  # "--cases LIST" as two words
            elif a != "--json" and not a.startswith("--cases="):
                args.child_argv.append(a)
        records = run_cases(args, log)
        if args.json:
            print(json.dumps(records))
        else:
            for r in records:
                extra = {k: v for k, v in r.items() if k not in ("case", "preset")}
                print(f"{r['case']:>9}: {json.dumps(extra)}")
        return 1 if any("error" in r for r in records) else 0

    args.batch_size = args.batch_size or 32
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
