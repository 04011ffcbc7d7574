"""Times scformer-jax's real train step (or eval forward) on random inputs, one case per process.

    python bench/jax_bench.py --seq-len 1536 --batch 32 --steps 3 --mode train --json

``--mode train`` runs :func:`scformer_jax.training.train_step` (forward, masked MSE, backward,
global-norm clipping, Adam from :func:`scformer_jax.training.make_optimizer`) under ``jax.jit``
with the state donated, exactly as training does on one device; ``--mode eval`` runs the
eval-mode forward (:func:`scformer_jax.objectives.predict_expression`). Inputs follow the batch
contract (:class:`scformer_jax.batch.PerturbBatch`): random gene ids, control values with
zeros, one or two perturbed genes per cell, optional padding at the row ends. The model uses
the seed script's settings (embsize 64, d_hid 64, 4 layers, 4 heads, dropout 0.2) unless told
otherwise; ``--seq-len`` counts genes (the model prepends its ``<cls>`` token).

Reported (``--json``: one JSON line, the last on stdout): median seconds per timed step and
cells/s; peak resident memory of the process (``ru_maxrss``); compile time (JAX's own
trace + lowering + XLA compile durations, from ``jax.monitoring``) and the first call's wall
time; ``traces``, a counter incremented each time JAX traces the step function, and
``compiles``, the number of XLA compilations, both counted over all steps including
``--extra-batches`` batches of new values after the timed ones (1 and 1 mean nothing was
recompiled); model FLOPs per step (matmuls only, counted analytically, the backward pass as
twice the forward) and the achieved FLOP/s against the CPU's peak.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

NORMAN_N_GENES = 5045


# ---------------------------------------------------------------------------------------------
# The machine's peak


def cpu_peak_flops(threads: int | None = None) -> dict:
    """fp32 peak of this CPU: clock x cores x FLOP per cycle per core.

    FLOP per cycle: an FMA is 2 FLOP per lane; 512-bit vectors hold 16 fp32 lanes, so one
    AVX-512 FMA unit gives 32 FLOP/cycle. Zen 4 (AMD family 25, model >= 0x10) executes
    512-bit FMAs on two 256-bit pipes, i.e. one 512-bit FMA per cycle; Intel server cores
    with two 512-bit FMA units (Skylake-SP and later Xeon) give 64. Without AVX-512, AVX2 with
    two FMA units gives 32. The assumption is returned with the number.
    """
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    flags = (
        set(re.search(r"^flags\s*:\s*(.*)$", cpuinfo, re.M).group(1).split())
        if "flags" in cpuinfo
        else set()
    )
    mhz = [float(x) for x in re.findall(r"^cpu MHz\s*:\s*([\d.]+)", cpuinfo, re.M)]
    clock_ghz = (max(mhz) / 1000.0) if mhz else 2.0
    vendor = (re.search(r"^vendor_id\s*:\s*(\S+)", cpuinfo, re.M) or [None, "?"])[1]
    cores = threads or os.cpu_count() or 1
    if "avx512f" in flags:
        if vendor == "AuthenticAMD":
            fma_units, note = 1, "AVX-512 on AMD Zen 4: one 512-bit FMA/cycle (2x256-bit pipes)"
        else:
            fma_units, note = 2, "AVX-512 on Intel Xeon: two 512-bit FMA units"
        flop_per_cycle = 32 * fma_units
    elif "fma" in flags:
        flop_per_cycle, fma_units, note = 32, 2, "AVX2: two 256-bit FMA units"
    else:
        flop_per_cycle, fma_units, note = 8, 1, "no FMA: SSE estimate"
    return {
        "peak_gflops": clock_ghz * cores * flop_per_cycle,
        "clock_ghz": clock_ghz,
        "cores": cores,
        "flop_per_cycle_per_core": flop_per_cycle,
        "assumption": note,
    }


def model_flops(
    *, batch: int, tokens: int, embsize: int, d_hid: int, nlayers: int, train: bool
) -> float:
    """Matmul FLOPs of one step (2 per multiply-add; backward = 2 x forward).

    Per token and layer: q/k/v and output projections 2*4*d^2, feed-forward 2*2*d*d_hid,
    attention scores and weighted sum 2*2*L*d; plus the value encoder's d x d layer and
    the expression decoder. Rematerialisation is not counted (model FLOPs, not hardware).
    """
    per_token_layer = 8 * embsize**2 + 4 * embsize * d_hid + 4 * tokens * embsize
    per_token = nlayers * per_token_layer + 2 * embsize**2 + 4 * embsize
    forward = batch * tokens * per_token
    return forward * (3.0 if train else 1.0)


# ---------------------------------------------------------------------------------------------
# Inputs


def random_batch(
    rng,
    *,
    batch: int,
    seq_len: int,
    n_genes: int,
    pad_frac: float,
    pad_token_id: int,
    pert_pad_id: int,
    first_gene_id: int,
):
    """A host PerturbBatch with the contract's shapes and plausible values."""
    import numpy as np

    from scformer_jax.batch import PerturbBatch

    gene_ids = (
        np.stack(
            [rng.choice(n_genes, size=seq_len, replace=seq_len > n_genes) for _ in range(batch)]
        ).astype(np.int32)
        + first_gene_id
    )
    control = np.where(
        rng.random((batch, seq_len)) < 0.6, 0.0, rng.gamma(2.0, 0.8, (batch, seq_len))
    ).astype(np.float32)
    flags = np.zeros((batch, seq_len), np.float32)
    flags[np.arange(batch), rng.integers(0, seq_len, batch)] = 1.0
    target = np.maximum(control + rng.normal(0, 0.3, control.shape), 0).astype(np.float32)
    padding = np.zeros((batch, seq_len), bool)
    if pad_frac > 0:
        n_pad = rng.integers(0, int(pad_frac * seq_len) + 1, batch)
        for row, n in enumerate(n_pad):
            if n:
                padding[row, -n:] = True
    gene_ids[padding] = pad_token_id
    control[padding] = 0.0
    flags[padding] = pert_pad_id
    target[padding] = 0.0
    return PerturbBatch.from_arrays(
        gene_ids=gene_ids,
        control_values=control,
        pert_flags=flags,
        target_values=target,
        padding_mask=padding,
    )


# ---------------------------------------------------------------------------------------------
# The run


class CompileTimer:
    """Sums JAX's trace, lowering and backend-compile durations; counts backend compiles."""

    EVENTS = (
        "/jax/core/compile/jaxpr_trace_duration",
        "/jax/core/compile/jaxpr_to_mlir_module_duration",
        "/jax/core/compile/backend_compile_duration",
    )

    def __init__(self):
        import jax

        self.seconds = {e: 0.0 for e in self.EVENTS}
        self.compiles = 0
        jax.monitoring.register_event_duration_secs_listener(self._on_event)

    def _on_event(self, event, duration, **_):
        if event in self.seconds:
            self.seconds[event] += duration
            if event.endswith("backend_compile_duration"):
                self.compiles += 1

    @property
    def total(self) -> float:
        return sum(self.seconds.values())


def peak_rss_gb() -> float:
    # ru_maxrss is in KiB on Linux.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def run(args) -> dict:
    import jax
    import numpy as np

    from scformer_jax import ModelConfig
    from scformer_jax.attention import chunk_layout, resolve_implementation
    from scformer_jax.config import ObjectiveConfig, OptimConfig
    from scformer_jax.model import TransformerGenerator
    from scformer_jax.objectives import predict_expression
    from scformer_jax.training import create_train_state, train_step

    timer = CompileTimer()
    n_genes = max(args.n_genes or NORMAN_N_GENES, args.seq_len)
    config = ModelConfig(
        ntoken=n_genes + 2,
        pad_token_id=0,
        cls_token_id=1,
        embsize=args.embsize,
        d_hid=args.d_hid,
        nlayers=args.nlayers,
        nhead=args.nheads,
        dropout=args.dropout,
        attention=args.attention,
        remat=args.remat,
        dtype=args.dtype,
        **({} if args.block_size is None else {"attention_block_size": args.block_size}),
        **(
            {}
            if args.eval_block_size is None
            else {"attention_eval_block_size": args.eval_block_size}
        ),
    )
    tokens = args.seq_len + (1 if config.uses_cls_token else 0)
    impl = resolve_implementation(
        config.attention, tokens, attention_dropout=config.attn_dropout_rate
    )
    model = TransformerGenerator(config)
    objective = ObjectiveConfig()
    rng = np.random.default_rng(args.seed)
    host_batches = [
        random_batch(
            rng,
            batch=args.batch,
            seq_len=args.seq_len,
            n_genes=n_genes,
            pad_frac=args.pad_frac,
            pad_token_id=config.pad_token_id,
            pert_pad_id=config.pert_pad_id,
            first_gene_id=2,
        )
        for _ in range(2)
    ]

    traces = [0]
    train = args.mode == "train"
    if train:
        state, _ = create_train_state(config, OptimConfig(), 1000, jax.random.PRNGKey(0))

        def step_fn(state, batch, rng):
            traces[0] += 1  # runs only while JAX traces: counts (re)compilations
            return train_step(state, batch, rng, model=model, objective=objective, axis_name=None)

        step = jax.jit(step_fn, donate_argnums=(0,))
    else:
        from scformer_jax.model import init_params

        params = init_params(config, jax.random.PRNGKey(0))

        def predict_fn(params, batch):
            traces[0] += 1
            return predict_expression(model, params, batch)

        step = jax.jit(predict_fn)

    times: list[float] = []
    cpu_times: list[float] = []
    first_call = None
    total_calls = args.warmup + args.steps + args.extra_batches
    step_keys = list(jax.random.split(jax.random.PRNGKey(1), total_calls))
    compile_s = 0.0
    compiles = 0
    for i in range(total_calls):
        # Host -> device transfer outside the timed region, as the loader's prefetch does.
        batch = jax.block_until_ready(jax.device_put(host_batches[i % len(host_batches)]))
        seconds_before, compiles_before = timer.total, timer.compiles
        t0, c0 = time.perf_counter(), time.process_time()
        if train:
            state, metrics = step(state, batch, step_keys[i])
            jax.block_until_ready(metrics)
        else:
            jax.block_until_ready(step(params, batch))
        elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
        compile_s += timer.total - seconds_before
        compiles += timer.compiles - compiles_before
        if i == 0:
            first_call = elapsed
        elif args.warmup <= i < args.warmup + args.steps:
            times.append(elapsed)
            cpu_times.append(cpu)
    if train and not np.isfinite(float(metrics["loss"])):
        raise RuntimeError(f"non-finite loss {float(metrics['loss'])}")

    sec = statistics.median(times)
    flops = model_flops(
        batch=args.batch,
        tokens=tokens,
        embsize=args.embsize,
        d_hid=args.d_hid,
        nlayers=args.nlayers,
        train=train,
    )
    peak = cpu_peak_flops()
    device = jax.devices()[0]
    result = {
        "impl": "jax",
        "seq_len": args.seq_len,
        "tokens": tokens,
        "batch": args.batch,
        "mode": args.mode,
        "sec_per_step": sec,
        "cells_per_s": args.batch / sec,
        "peak_rss_gb": peak_rss_gb(),
        "compile_s": compile_s,
        "first_call_s": first_call,
        "traces": traces[0],
        "compiles": compiles,
        "calls": total_calls,
        "step_times": times,
        "cpu_s_per_step": statistics.median(cpu_times),
        "model_gflop_per_step": flops / 1e9,
        "achieved_gflops": flops / sec / 1e9,
        "peak_gflops": peak["peak_gflops"],
        "fraction_of_peak": flops / sec / 1e9 / peak["peak_gflops"],
        "peak_assumption": peak,
        "attention": impl,
        "remat": args.remat,
        "dtype": args.dtype,
        # Other load on the machine at the start: timings are only comparable when low.
        "loadavg_1m": os.getloadavg()[0],
        "jax_version": jax.__version__,
        "backend": jax.default_backend(),
        "device": getattr(device, "device_kind", str(device)),
        "python": platform.python_version(),
    }
    if impl == "chunked":
        block_size = config.attention_block_size_for(deterministic=not train)
        rows, block = chunk_layout(args.batch * args.nheads, tokens, block_size)
        result["chunk_tile"] = {"rows": rows, "queries": block, "block_size": block_size}
    if train:
        result["loss"] = float(metrics["loss"])
    return result


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seq-len", type=int, default=512, help="genes per cell")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=3, help="timed steps")
    parser.add_argument(
        "--warmup", type=int, default=1, help="untimed steps first (the first compiles)"
    )
    parser.add_argument(
        "--extra-batches",
        type=int,
        default=2,
        help="untimed steps after the timed ones, to show no recompilation",
    )
    parser.add_argument("--mode", choices=("train", "eval"), default="train")
    parser.add_argument(
        "--n-genes",
        type=int,
        default=None,
        help=f"vocabulary size (default {NORMAN_N_GENES}, Norman's gene count)",
    )
    parser.add_argument("--embsize", type=int, default=64)
    parser.add_argument("--nheads", type=int, default=4)
    parser.add_argument("--d-hid", type=int, default=64)
    parser.add_argument("--nlayers", type=int, default=4)
    parser.add_argument("--dropout", type=float, default=0.2)
    parser.add_argument(
        "--attention", default="auto", help="auto, full, chunked, xla or cudnn (model.attention)"
    )
    parser.add_argument(
        "--block-size",
        type=int,
        default=None,
        help="model.attention_block_size (default: the config's default)",
    )
    parser.add_argument(
        "--eval-block-size",
        type=int,
        default=None,
        help="model.attention_eval_block_size, used by --mode eval (default: the config's default)",
    )
    parser.add_argument("--remat", action="store_true", help="model.remat")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument(
        "--pad-frac",
        type=float,
        default=0.0,
        help="pad up to this fraction of each row (0: no padding, like the "
        "reference's batch-wise batches)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print one JSON line")
    args = parser.parse_args(argv)
    if args.warmup < 1 or args.steps < 1:
        parser.error("--warmup and --steps must be at least 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    result = run(args)
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key}: {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
