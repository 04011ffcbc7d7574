"""Times the scGPT-sized model's train step on a GPU: ms/step and model FLOP utilisation.

    python bench/gpu_bench.py                 # embsize 512, 12 layers, 8 heads, seq 1536,
                                              # batch 64, bf16 matmuls, cuDNN attention
    python bench/gpu_bench.py --cpu-smoke     # the same code path at tiny sizes on the CPU

Runs :func:`scformer_jax.training.train_step` (forward, masked MSE, backward, clipping, Adam)
under ``jax.jit`` on random batches of the batch contract, ``--warmup`` untimed steps then
``--steps`` timed ones, and prints what it ran on, ms/step (median and mean), cells/s, peak
device memory, and the model FLOP utilisation: the model's matmul FLOPs per step (backward =
2 x forward) divided by the step time and the device's dense bf16 peak. scGPT's perturbation
tutorial logs about 315 ms/batch for this setting (PyTorch, flash-attention, AMP).
``bench/gpu.sh`` installs a CUDA build of jax first when needed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.jax_bench import cpu_peak_flops, model_flops, random_batch  # noqa: E402

SCGPT_VOCAB = 60697  # scGPT's whole-human gene vocabulary (its pretrained checkpoints)

# Dense bf16 tensor-core peaks, TFLOP/s, by a substring of jax's device_kind.
GPU_BF16_PEAK_TFLOPS = (
    ("H200", 989.0),
    ("H100 PCIe", 756.0),
    ("H100", 989.0),
    ("GH200", 989.0),
    ("A100", 312.0),
    ("L40S", 362.0),
    ("A10G", 70.0),
    ("L4", 121.0),
    ("V100", 125.0),
    ("B200", 2250.0),
)


def device_peak_tflops(device) -> tuple[float | None, str]:
    kind = getattr(device, "device_kind", str(device))
    if device.platform == "cpu":
        peak = cpu_peak_flops()
        return peak["peak_gflops"] / 1e3, f"CPU fp32 estimate: {peak['assumption']}"
    for name, tflops in GPU_BF16_PEAK_TFLOPS:
        if name.lower() in kind.lower():
            return tflops, f"{name} dense bf16 peak"
    return None, f"unknown device {kind!r}: no peak table entry"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--cpu-smoke", action="store_true", help="tiny sizes on the CPU, to check the script itself"
    )
    parser.add_argument("--seq-len", type=int, default=1536)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--embsize", type=int, default=512)
    parser.add_argument("--d-hid", type=int, default=512)
    parser.add_argument("--nlayers", type=int, default=12)
    parser.add_argument("--nheads", type=int, default=8)
    parser.add_argument("--ntoken", type=int, default=SCGPT_VOCAB)
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    parser.add_argument(
        "--attention", default="cudnn", help="cudnn, xla, chunked, full or auto (model.attention)"
    )
    parser.add_argument("--steps", type=int, default=30, help="timed steps")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--json", action="store_true", help="also print one JSON line")
    args = parser.parse_args(argv)
    if args.cpu_smoke:
        args.seq_len, args.batch, args.embsize, args.d_hid = 64, 4, 32, 32
        args.nlayers, args.nheads, args.ntoken = 2, 2, 300
        args.steps, args.warmup = min(args.steps, 3), 1
        if args.attention == "cudnn":
            args.attention = "auto"
    return args


def time_steps(args, attention: str):
    """Builds the model with `attention`, runs the warm-up and timed steps.

    Returns:
      (attention kernel, tokens per row, parameter count, last metrics, step times in s,
      first-call seconds, trace count).
    """
    import jax
    import numpy as np

    from scformer_jax import ModelConfig
    from scformer_jax.attention import resolve_implementation
    from scformer_jax.config import ObjectiveConfig, OptimConfig
    from scformer_jax.model import TransformerGenerator
    from scformer_jax.training import create_train_state, train_step

    config = ModelConfig(
        ntoken=args.ntoken,
        embsize=args.embsize,
        d_hid=args.d_hid,
        nlayers=args.nlayers,
        nhead=args.nheads,
        dropout=0.0,
        attention=attention,
        dtype=args.dtype,
    )
    tokens = args.seq_len + (1 if config.uses_cls_token else 0)
    impl = resolve_implementation(config.attention, tokens, attention_dropout=0.0)
    print(
        f"model: embsize {args.embsize}, d_hid {args.d_hid}, {args.nlayers} layers, "
        f"{args.nheads} heads, vocab {args.ntoken}, dtype {args.dtype}, attention {impl}; "
        f"batch {args.batch} x sequence {args.seq_len} (+<cls>)",
        flush=True,
    )
    model = TransformerGenerator(config)
    objective = ObjectiveConfig()
    state, _ = create_train_state(config, OptimConfig(), 1000, jax.random.PRNGKey(0))
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(state.params))
    rng = np.random.default_rng(0)
    batches = [
        jax.device_put(
            random_batch(
                rng,
                batch=args.batch,
                seq_len=args.seq_len,
                n_genes=args.ntoken - 2,
                pad_frac=0.1,
                pad_token_id=config.pad_token_id,
                pert_pad_id=config.pert_pad_id,
                first_gene_id=2,
            )
        )
        for _ in range(2)
    ]
    traces = [0]

    def step_fn(state, batch, rng):
        traces[0] += 1
        return train_step(state, batch, rng, model=model, objective=objective, axis_name=None)

    step = jax.jit(step_fn, donate_argnums=(0,))
    keys = jax.random.split(jax.random.PRNGKey(1), args.warmup + args.steps)
    t0 = time.perf_counter()
    state, metrics = step(state, batches[0], keys[0])
    jax.block_until_ready(metrics)
    first = time.perf_counter() - t0
    for i in range(1, args.warmup):
        state, metrics = step(state, batches[i % 2], keys[i])
    jax.block_until_ready(metrics)
    times = []
    for i in range(args.steps):
        t0 = time.perf_counter()
        state, metrics = step(state, batches[i % 2], keys[args.warmup + i])
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - t0)
    return impl, tokens, n_params, metrics, times, first, traces[0]


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.cpu_smoke:
        import os

        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax
    import numpy as np

    device = jax.devices()[0]
    print(
        f"jax {jax.__version__}, backend {jax.default_backend()}, device "
        f"{getattr(device, 'device_kind', device)} x {jax.device_count()}",
        flush=True,
    )
    if not args.cpu_smoke and device.platform != "gpu":
        print(
            "gpu_bench: no GPU backend (run bench/gpu.sh, which installs jax[cuda12]); use "
            "--cpu-smoke to check the script on a CPU.",
            file=sys.stderr,
        )
        return 2

    try:
        result = time_steps(args, args.attention)
    except Exception as error:  # noqa: BLE001 - a cuDNN kernel the GPU/driver cannot run
        if args.attention not in ("cudnn", "auto") or device.platform != "gpu":
            raise
        print(
            f"gpu_bench: attention {args.attention!r} failed ({type(error).__name__}: "
            f"{str(error).splitlines()[0][:200]}); retrying with attention 'xla'.",
            file=sys.stderr,
            flush=True,
        )
        result = time_steps(args, "xla")
    impl, tokens, n_params, metrics, times, first, traces = result
    loss = float(metrics["loss"])
    sec = statistics.median(times)
    flops = model_flops(
        batch=args.batch,
        tokens=tokens,
        embsize=args.embsize,
        d_hid=args.d_hid,
        nlayers=args.nlayers,
        train=True,
    )
    peak_tflops, peak_note = device_peak_tflops(device)
    mfu = flops / sec / 1e12 / peak_tflops if peak_tflops else None
    stats = device.memory_stats() or {}
    peak_mem = stats.get("peak_bytes_in_use")
    record = {
        "jax_version": jax.__version__,
        "backend": jax.default_backend(),
        "device": getattr(device, "device_kind", str(device)),
        "attention": impl,
        "dtype": args.dtype,
        "seq_len": args.seq_len,
        "batch": args.batch,
        "embsize": args.embsize,
        "nlayers": args.nlayers,
        "nheads": args.nheads,
        "n_params": n_params,
        "ms_per_step": 1e3 * sec,
        "ms_per_step_mean": 1e3 * statistics.mean(times),
        "cells_per_s": args.batch / sec,
        "first_call_s": first,
        "traces": traces,
        "model_tflop_per_step": flops / 1e12,
        "achieved_tflops": flops / sec / 1e12,
        "peak_tflops": peak_tflops,
        "peak_note": peak_note,
        "mfu": mfu,
        "peak_device_memory_gb": peak_mem / 2**30 if peak_mem else None,
        "loss": loss,
        "cpu_smoke": args.cpu_smoke,
    }
    print(
        f"{args.steps} steps: {record['ms_per_step']:.1f} ms/step (median; mean "
        f"{record['ms_per_step_mean']:.1f}), {record['cells_per_s']:.1f} cells/s, first call "
        f"(compile) {first:.1f} s, traces {traces}, loss {loss:.4f}"
    )
    print(
        f"model FLOPs {flops / 1e12:.3g} TFLOP/step -> {record['achieved_tflops']:.3g} TFLOP/s"
        + (
            f" = MFU {100 * mfu:.1f}% of {peak_tflops:.3g} TFLOP/s ({peak_note})"
            if mfu
            else f" ({peak_note})"
        )
        + (f"; peak device memory {record['peak_device_memory_gb']:.1f} GB" if peak_mem else "")
    )
    if not np.isfinite(loss):
        print("gpu_bench: the loss is not finite.", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
