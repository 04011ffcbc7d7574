"""Runs the benchmark cases against the PyTorch original and prints one table.

    python bench/run.py            # every case (about 15-20 minutes on a 2-core CPU)
    python bench/run.py --quick    # the sequence-512 cases only (a few minutes)

Each measurement runs in a process of its own (``bench/jax_bench.py``,
``bench/torch_bench.py``, ``bench/data_bench.py``), so peak memory is measured apart; for
each case the PyTorch run comes right before ours, so both see similar load from other
processes. Cases: train step and eval forward at sequences 512 and 1536 (batch 32, the seed
script's model), the train step at sequence 5045 (Norman's gene count; the original runs
out of memory there), and data preparation of a Norman-sized simulated dataset. Eval is
compared twice: with the original as it evaluates (``model.eval()`` under ``no_grad``,
which takes torch's default nested-tensor "fast path") and with that fast path off, where
torch runs its fused C++ ``scaled_dot_product_attention`` kernel ("vs torch SDPA").

The table gives, per case, our cells/s, the original's, their ratio, the peak memory of each,
our compile time and trace/compile counts (1/1: nothing was recompiled over the run's
batches), and the achieved FLOP/s as a fraction of the CPU's peak. The last line states the
train-step ratio at the largest sequence where both ran. ``--json PATH`` also writes every
raw record. Without torch (``pip install torch==2.13.0``) only our side runs.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent

# (name, sequence length, mode, timed steps, run the reference)
FULL_CASES = (
    ("train-512", 512, "train", 3, True),
    ("eval-512", 512, "eval", 5, True),
    ("train-1536", 1536, "train", 3, True),
    ("eval-1536", 1536, "eval", 3, True),
    ("train-5045", 5045, "train", 2, True),
)
QUICK_CASES = FULL_CASES[:2]
# Eval runs the reference twice: as the original evaluates (model.eval() under no_grad, so
# torch's default "fast path" with nested tensors) and with that fast path off, where torch
# uses its fused scaled_dot_product_attention kernel (much faster on this CPU).
# Our runs use the config's defaults, as train.py and eval.py do: the chunked kernel's tiles
# are model.attention_block_size queries in training and model.attention_eval_block_size in
# eval passes (see scformer_jax/config.py).
EVAL_REFERENCES = (("", ["--fastpath", "on"]), (" vs torch SDPA", ["--fastpath", "off"]))


def _last_json_line(text: str) -> dict | None:
    for line in reversed(text.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                return None
    return None


def run_script(script: str, args: list[str], *, timeout: float, log) -> dict:
    """Runs one bench script in its own process; its last JSON line, or an error record."""
    cmd = [sys.executable, str(BENCH / script)] + args + ["--json"]
    log(f"$ {' '.join(cmd[1:])}")
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    record = _last_json_line(proc.stdout)
    if record is None:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        record = {"error": f"exit {proc.returncode}: " + " | ".join(tail)[-400:]}
    elif proc.returncode and "error" not in record:
        record["error"] = f"exit {proc.returncode}"
    record["wall_s_total"] = time.perf_counter() - start
    return record


def torch_available() -> bool:
    return importlib.util.find_spec("torch") is not None


def run_cases(cases, *, batch: int, with_torch: bool, timeout: float, log) -> list[dict]:
    rows = []
    for name, seq_len, mode, steps, run_ref in cases:
        common = [
            "--seq-len",
            str(seq_len),
            "--batch",
            str(batch),
            "--mode",
            mode,
            "--steps",
            str(steps),
        ]
        references = EVAL_REFERENCES if mode == "eval" else (("", []),)
        refs = []
        for suffix, extra in references:
            ref = None
            if with_torch and run_ref:
                ref = run_script("torch_bench.py", common + extra, timeout=timeout, log=log)
                log(f"  reference{suffix}: {_brief(ref)}")
            refs.append((suffix, ref))
        ours_args = common + (["--extra-batches", "1"] if seq_len > 2048 else [])
        ours = run_script("jax_bench.py", ours_args, timeout=timeout, log=log)
        log(f"  ours:      {_brief(ours)}")
        for suffix, ref in refs:
            rows.append(
                {"case": name + suffix, "seq_len": seq_len, "mode": mode, "ours": ours, "ref": ref}
            )
    return rows


def _brief(record: dict | None) -> str:
    if record is None:
        return "not run"
    if "error" in record and "cells_per_s" not in record:
        return record["error"]
    return (
        f"{record['sec_per_step']:.3f} s/step, {record['cells_per_s']:.2f} cells/s, "
        f"peak {record.get('peak_rss_gb', float('nan')):.2f} GB"
    )


def _fmt(value, spec: str, missing: str = "-") -> str:
    return missing if value is None else format(value, spec)


def format_table(rows: list[dict], data: dict | None) -> list[str]:
    header = (
        "case",
        "ours cells/s",
        "orig cells/s",
        "ratio",
        "ours peak GB",
        "orig peak GB",
        "compile s",
        "traces/compiles",
        "% of peak FLOP/s",
    )
    lines = []
    body = []
    for row in rows:
        ours, ref = row["ours"], row["ref"]
        ours_ok = "cells_per_s" in ours
        ref_ok = ref is not None and "cells_per_s" in ref
        if ref is None:
            ref_cells = "not run"
        elif ref_ok:
            ref_cells = f"{ref['cells_per_s']:.2f}"
        else:
            ref_cells = "OOM" if "memory" in ref.get("error", "") else "failed"
        ratio = f"{ours['cells_per_s'] / ref['cells_per_s']:.1f}x" if ours_ok and ref_ok else "-"
        body.append(
            (
                row["case"],
                f"{ours['cells_per_s']:.2f}" if ours_ok else ours.get("error", "failed")[:30],
                ref_cells,
                ratio,
                _fmt(ours.get("peak_rss_gb"), ".2f"),
                _fmt(ref.get("peak_rss_gb") if ref else None, ".2f"),
                _fmt(ours.get("compile_s"), ".1f"),
                f"{ours['traces']}/{ours['compiles']}" if ours_ok else "-",
                f"{100 * ours['fraction_of_peak']:.0f}%" if ours_ok else "-",
            )
        )
    if data is not None:
        ok = "total_s" in data
        body.append(
            (
                "data-prep (norman)",
                f"{data['total_s']:.1f} s" if ok else data.get("error", "failed")[:30],
                "-",
                "-",
                _fmt(data.get("peak_rss_gb"), ".2f"),
                "-",
                "-",
                "-",
                "-",
            )
        )
    widths = [max(len(str(r[i])) for r in body + [header]) for i in range(len(header))]
    lines.append(" | ".join(h.ljust(w) for h, w in zip(header, widths)))
    lines.append("-+-".join("-" * w for w in widths))
    for r in body:
        lines.append(" | ".join(str(c).ljust(w) for c, w in zip(r, widths)))
    return lines


def summary_line(rows: list[dict]) -> str:
    """The train-step ratio at the largest sequence where both sides ran."""
    train = [r for r in rows if r["mode"] == "train" and "cells_per_s" in r["ours"]]
    both = [r for r in train if r["ref"] is not None and "cells_per_s" in r["ref"]]
    if not train:
        return "Train step: no successful run."
    parts = []
    if both:
        best = max(both, key=lambda r: r["seq_len"])
        ours, ref = best["ours"], best["ref"]
        parts.append(
            f"Train step at sequence {best['seq_len']}, batch {ours['batch']}: "
            f"{ours['cells_per_s'] / ref['cells_per_s']:.1f}x the PyTorch original's cells/s "
            f"({ours['sec_per_step']:.2f} vs {ref['sec_per_step']:.2f} s/step), peak memory "
            f"{ours['peak_rss_gb']:.1f} vs {ref['peak_rss_gb']:.1f} GB"
        )
    longer = [r for r in train if r not in both and (not both or r["seq_len"] > best["seq_len"])]
    for row in longer:
        ref = row["ref"]
        why = (
            "ran out of memory"
            if ref and "memory" in ref.get("error", "")
            else "was not run"
            if ref is None
            else "failed"
        )
        parts.append(
            f"at sequence {row['seq_len']} the original {why}, ours trained at "
            f"{row['ours']['sec_per_step']:.1f} s/step in "
            f"{row['ours']['peak_rss_gb']:.1f} GB"
        )
    if not both:
        parts.insert(0, "No reference train run to compare with")
    return "; ".join(parts) + "."


def measured_matmul_gflops(size: int = 4096, repeats: int = 3) -> float:
    """fp32 GFLOP/s of NumPy's BLAS sgemm on all cores: a practical ceiling for matmuls."""
    import numpy as np

    rng = np.random.default_rng(0)
    a = rng.random((size, size), dtype=np.float32)
    b = rng.random((size, size), dtype=np.float32)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e9


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="only the sequence-512 cases")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch reference")
    parser.add_argument("--no-data", action="store_true", help="skip the data-preparation case")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per process")
    parser.add_argument("--json", type=Path, default=None, help="also write raw records here")
    parser.add_argument("--quiet", action="store_true", help="print only the table")
    args = parser.parse_args(argv)

    def log(message: str) -> None:
        if not args.quiet:
            print(message, file=sys.stderr, flush=True)

    with_torch = not args.no_torch and torch_available()
    if not args.no_torch and not with_torch:
        log("torch is not installed (pip install torch==2.13.0): reference runs skipped.")
    load_before = os.getloadavg()[0]
    rows = run_cases(
        QUICK_CASES if args.quick else FULL_CASES,
        batch=args.batch,
        with_torch=with_torch,
        timeout=args.timeout,
        log=log,
    )
    data = None
    if not args.quick and not args.no_data:
        data = run_script("data_bench.py", [], timeout=args.timeout, log=log)
        log(f"  data prep: {data}")

    first = next((r["ours"] for r in rows if "peak_assumption" in r["ours"]), None)
    print()
    for line in format_table(rows, data):
        print(line)
    if first is not None:
        peak = first["peak_assumption"]
        print(
            f"\nPeak FLOP/s assumed: {peak['clock_ghz']:.2f} GHz x {peak['cores']} cores x "
            f"{peak['flop_per_cycle_per_core']} FLOP/cycle = {peak['peak_gflops']:.0f} GFLOP/s "
            f"({peak['assumption']}); FLOPs are the model's matmuls, backward = 2x forward."
        )
    train = [r["ours"] for r in rows if r["mode"] == "train" and "cells_per_s" in r["ours"]]
    if train:
        ceiling = measured_matmul_gflops()
        largest = max(train, key=lambda r: r["seq_len"])
        print(
            f"Measured fp32 matmul ceiling (NumPy sgemm 4096x4096, all cores): {ceiling:.0f} "
            f"GFLOP/s; the train step at sequence {largest['seq_len']} reached "
            f"{largest['achieved_gflops']:.0f} GFLOP/s = "
            f"{100 * largest['achieved_gflops'] / ceiling:.0f}% of it."
        )
    print(
        f"Load average (1 min) at start: {load_before:.2f}, at end: {os.getloadavg()[0]:.2f} "
        f"(other processes on the machine slow both sides)."
    )
    print(summary_line(rows))
    if args.json is not None:
        from scformer_jax.io import write_text_atomic

        write_text_atomic(args.json, json.dumps({"cases": rows, "data": data}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
