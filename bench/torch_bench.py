"""Times the PyTorch original (``tests/torch_reference.py``) on random inputs.

Run in a process of its own so that its peak memory is measured apart from ours:

    python bench/torch_bench.py --seq-len 512 --batch 32 --steps 3 --mode train --json

``--mode train`` times the original's train step (forward, masked MSE on the expression
output over all positions, backward, ``clip_grad_norm_(1.0)``, Adam lr 1e-4);
``--mode eval`` times its evaluation forward (eval mode, ``torch.no_grad()``). There
PyTorch by default takes its fused "fast path" (batches turned into nested tensors); with
it off, ``nn.MultiheadAttention`` calls ``scaled_dot_product_attention``, whose CPU kernel
does not materialise the attention matrix. On this 2-core CPU the fast path was 4-8x
slower and used 5x the memory at sequence 1536, so the benchmark turns it off
(``--fastpath off``, the stronger baseline); ``--fastpath on`` gives torch's default.
Training never takes the fast path. The model uses the seed script's settings (embsize 64,
d_hid 64, 4 layers, 4 heads, dropout 0.2) unless told otherwise. Inputs follow the seed's
``include_zero_gene="batch-wise"``
batches: one gene list shared by the rows, no padding.

With ``--json`` the last stdout line is one JSON object: seq_len, batch, mode,
sec_per_step (median over the timed steps), cells_per_s, peak_rss_gb (GiB, from
``ru_maxrss``), torch_version, threads, and extra detail (step times, FLOP estimate).

Memory: the process caps its address space at what the machine has available when it
starts (``--mem-limit-gb`` overrides, 0 disables), so a case that does not fit (e.g.
sequence 5045 at batch 32) fails inside PyTorch's allocator instead of waking the kernel's
OOM killer; it then prints ``"error": "out of memory"`` and exits with status 3.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time
import warnings
from pathlib import Path

if __package__ in (None, ""):
    # Run as a script: make the repository root importable for ``tests.torch_reference``.
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from tests.torch_reference import build_reference_model, make_vocab  # noqa: E402

EXIT_OUT_OF_MEMORY = 3
NORMAN_N_GENES = 5045  # Norman 2019's gene count, the seed's "include_zero_gene: all" length.


def _meminfo_gib(field: str) -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return None


def _virtual_size_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmSize:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("VmSize missing from /proc/self/status")


def limit_address_space(limit_gib: float) -> None:
    """Lets the process map at most ``limit_gib`` more than it has mapped now.

    Counting from the current size leaves room for what torch and its thread pools have
    reserved but never touch, so the cap bites on real allocations.
    """
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    soft = _virtual_size_bytes() + int(limit_gib * 2**30)
    if hard != resource.RLIM_INFINITY:
        soft = min(soft, hard)
    resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def is_out_of_memory(error: BaseException) -> bool:
    """True for the ways numpy/torch report a failed host allocation."""
    if isinstance(error, MemoryError):
        return True
    if isinstance(error, RuntimeError):
        text = str(error).lower()
        return any(
            s in text
            for s in (
                "can't allocate memory",
                "out of memory",
                "bad_alloc",
                "cannot allocate memory",
            )
        )
    return False


def peak_rss_gib() -> float:
    # Linux reports ru_maxrss in KiB.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def forward_flops(batch: int, seq_len: int, d_model: int, d_hid: int, nlayers: int) -> float:
    """Matmul FLOPs (2 per multiply-add) of one forward pass of the expression path.

    Per layer: q/k/v and output projections (4 d^2 per token), attention scores and
    weighted sum (2 L d per token), feed-forward (2 d d_hid per token); plus the value
    encoder (d + d^2) and the decoder (d). A train step is counted as 3 forwards.
    """
    tokens = batch * seq_len
    per_layer = 4 * d_model**2 + 2 * seq_len * d_model + 2 * d_model * d_hid
    other = d_model + d_model**2 + d_model
    return 2.0 * tokens * (nlayers * per_layer + other)


def make_inputs(
    batch: int, seq_len: int, n_genes: int, vocab: dict[str, int], seed: int
) -> dict[str, torch.Tensor]:
    """Random batch shaped like the seed's batch-wise batches.

    Returns:
        gene_ids (batch, seq_len) long, one sorted gene list repeated per row;
        values, target_values (batch, seq_len) float32, log1p of Poisson counts;
        pert_flags (batch, seq_len) long, one or two perturbed genes per row;
        padding_mask (batch, seq_len) bool, all False.
    """
    if seq_len > n_genes:
        raise ValueError(f"seq_len {seq_len} exceeds n_genes {n_genes}; raise --n-genes.")
    rng = np.random.default_rng(seed)
    columns = np.sort(rng.choice(n_genes, size=seq_len, replace=False))
    gene_ids = np.array([vocab[f"GENE{c:05d}"] for c in columns])
    gene_ids = np.broadcast_to(gene_ids, (batch, seq_len)).copy()
    values = np.log1p(rng.poisson(1.0, size=(batch, seq_len))).astype(np.float32)
    targets = np.log1p(rng.poisson(1.0, size=(batch, seq_len))).astype(np.float32)
    pert_flags = np.zeros((batch, seq_len), dtype=np.int64)
    for row in range(batch):
        pert_flags[row, rng.choice(seq_len, size=rng.integers(1, 3), replace=False)] = 1
    return {
        "gene_ids": torch.from_numpy(gene_ids),
        "values": torch.from_numpy(values),
        "target_values": torch.from_numpy(targets),
        "pert_flags": torch.from_numpy(pert_flags),
        "padding_mask": torch.zeros((batch, seq_len), dtype=torch.bool),
    }


def masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The seed's masked MSE: sum of squared error over the mask, divided by its size."""
    mask = mask.float()
    return F.mse_loss(pred * mask, target * mask, reduction="sum") / mask.sum()


def train_step(model, optimizer, inputs) -> float:
    output = model(
        inputs["gene_ids"],
        inputs["values"],
        inputs["pert_flags"],
        src_key_padding_mask=inputs["padding_mask"],
    )
    everything = torch.ones_like(inputs["values"], dtype=torch.bool)
    loss = masked_mse(output["mlm_output"], inputs["target_values"], everything)
    optimizer.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    return loss.item()


def eval_step(model, inputs) -> float:
    with torch.no_grad():
        output = model(
            inputs["gene_ids"],
            inputs["values"],
            inputs["pert_flags"],
            src_key_padding_mask=inputs["padding_mask"],
        )
    return float(output["mlm_output"].mean())


def run_benchmark(
    *,
    seq_len: int,
    batch: int,
    steps: int,
    mode: str,
    warmup: int,
    n_genes: int,
    d_model: int,
    nhead: int,
    d_hid: int,
    nlayers: int,
    dropout: float,
    attention_layout: str,
    seed: int,
    fastpath: bool = False,
) -> dict:
    """Builds the model, runs ``warmup`` untimed and ``steps`` timed steps.

    Returns:
        The result record (without the common header fields).
    """
    vocab = make_vocab([f"GENE{i:05d}" for i in range(n_genes)])
    model = build_reference_model(
        vocab=vocab,
        d_model=d_model,
        nhead=nhead,
        d_hid=d_hid,
        nlayers=nlayers,
        dropout=dropout,
        attention_layout=attention_layout,
        seed=seed,
    )
    inputs = make_inputs(batch, seq_len, n_genes, vocab, seed)
    torch.backends.mha.set_fastpath_enabled(fastpath)
    if mode == "train":
        model.train()
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)

        def step():
            return train_step(model, optimizer, inputs)
    else:
        model.eval()

        def step():
            return eval_step(model, inputs)

    start = time.perf_counter()
    for _ in range(warmup):
        step()
    warmup_s = time.perf_counter() - start
    times, last = [], None
    cpu_start = time.process_time()
    for _ in range(steps):
        start = time.perf_counter()
        last = step()
        times.append(time.perf_counter() - start)
    cpu_per_step = (time.process_time() - cpu_start) / steps
    sec_per_step = statistics.median(times)
    flops = forward_flops(batch, seq_len, d_model, d_hid, nlayers) * (3 if mode == "train" else 1)
    return {
        "sec_per_step": sec_per_step,
        "cells_per_s": batch / sec_per_step,
        "step_times_s": times,
        "warmup_s": warmup_s,
        # CPU seconds of this process per step (all threads): wall time grows when other
        # processes share the cores, this much less so.
        "cpu_s_per_step": cpu_per_step,
        "model_flops_per_step": flops,
        "gflops_per_s": flops / sec_per_step / 1e9,
        "n_params": sum(p.numel() for p in model.parameters()),
        "final_output": last,
    }


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=3, help="timed steps")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    parser.add_argument("--mode", choices=("train", "eval"), default="train")
    parser.add_argument(
        "--n-genes",
        type=int,
        default=None,
        help=f"vocabulary size (default max({NORMAN_N_GENES}, seq-len))",
    )
    parser.add_argument("--embsize", type=int, default=64)
    parser.add_argument("--nheads", type=int, default=4)
    parser.add_argument("--d-hid", type=int, default=64)
    parser.add_argument("--nlayers", type=int, default=4)
    parser.add_argument("--dropout", type=float, default=0.2)
    parser.add_argument("--attention-layout", choices=("torch", "flash"), default="torch")
    parser.add_argument(
        "--fastpath",
        choices=("on", "off"),
        default="off",
        help="torch's fused inference fast path in eval mode (torch's "
        "default is on; off was much faster here)",
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (default os.cpu_count())"
    )
    parser.add_argument(
        "--mem-limit-gb",
        type=float,
        default=None,
        help="extra address space allowed, GiB (default: MemAvailable; 0: none)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print one JSON line")
    args = parser.parse_args(argv)
    for name in ("seq_len", "batch", "steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.warmup < 0:
        parser.error("--warmup must be 0 or more")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    # Eval batches go through torch's nested-tensor fast path, which warns that the API is
    # a prototype; that is how the original ran, and the warning is noise here.
    warnings.filterwarnings("ignore", message=".*nested tensors.*")
    threads = args.threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    mem_limit = args.mem_limit_gb
    if mem_limit is None:
        mem_limit = _meminfo_gib("MemAvailable")
    if mem_limit:
        limit_address_space(mem_limit)
    record = {
        "seq_len": args.seq_len,
        "batch": args.batch,
        "mode": args.mode,
        "torch_version": torch.__version__,
        "threads": threads,
        "attention_layout": args.attention_layout,
        "fastpath": args.fastpath == "on",
        "model": {
            "embsize": args.embsize,
            "nheads": args.nheads,
            "d_hid": args.d_hid,
            "nlayers": args.nlayers,
            "dropout": args.dropout,
        },
        "steps": args.steps,
        "warmup": args.warmup,
        "mem_limit_gb": mem_limit or None,
        # Other load on the machine at the start: timings are only comparable when low.
        "loadavg_1m": os.getloadavg()[0],
    }
    try:
        record.update(
            run_benchmark(
                seq_len=args.seq_len,
                batch=args.batch,
                steps=args.steps,
                mode=args.mode,
                warmup=args.warmup,
                n_genes=args.n_genes or max(NORMAN_N_GENES, args.seq_len),
                d_model=args.embsize,
                nhead=args.nheads,
                d_hid=args.d_hid,
                nlayers=args.nlayers,
                dropout=args.dropout,
                attention_layout=args.attention_layout,
                seed=args.seed,
                fastpath=args.fastpath == "on",
            )
        )
    except (MemoryError, RuntimeError) as error:
        if not is_out_of_memory(error):
            raise
        record.update(
            {
                "error": "out of memory",
                "detail": str(error).splitlines()[0][:300],
                "peak_rss_gb": peak_rss_gib(),
            }
        )
        print(
            f"torch_bench: out of memory at seq_len {args.seq_len}, batch {args.batch}, "
            f"mode {args.mode} (limit {mem_limit or 'none'} GiB): "
            f"{record['detail']}",
            file=sys.stderr,
        )
        print(json.dumps(record) if args.json else record["detail"], flush=True)
        return EXIT_OUT_OF_MEMORY
    record["peak_rss_gb"] = peak_rss_gib()
    if args.json:
        print(json.dumps(record), flush=True)
    else:
        print(
            f"{args.mode} seq {args.seq_len} batch {args.batch}: "
            f"{record['sec_per_step']:.3f} s/step, {record['cells_per_s']:.2f} cells/s, "
            f"peak RSS {record['peak_rss_gb']:.2f} GiB, "
            f"{record['gflops_per_s']:.1f} GFLOP/s (torch {torch.__version__}, "
            f"{threads} threads)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
