#!/usr/bin/env python
"""Evaluate a trained run: ``python eval.py --workdir runs/NAME``.

Scores the best checkpoint on the run's test split with GEARS's metrics, beside the control,
training-mean, additive and linear baselines, and writes ``runs/NAME/eval/`` (metrics.json,
per_perturbation.csv, predictions.h5ad, plots/, report.md). ``--predict A+B C`` also writes
predictions for any perturbations, seen or not.

Several runs (e.g. one per split seed): ``python eval.py --workdir runs/s1 --workdir runs/s2
--summary-out runs/summary`` evaluates each into its own ``eval/`` and writes the mean ± sd
of every metric to ``summary.md`` and ``summary.csv``. The work is in
:mod:`scformer_jax.evaluation` and :mod:`scformer_jax.predict`.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--workdir",
        required=True,
        action="append",
        help="Run folder written by train.py; repeat it to evaluate several "
        "runs and summarise them (mean ± sd).",
    )
    parser.add_argument(
        "--summary-out",
        default="eval_summary",
        help="With several --workdir: folder of summary.md / summary.csv.",
    )
    parser.add_argument("--checkpoint", choices=("best", "latest"), default="best")
    parser.add_argument("--out", default=None, help="Output folder (default WORKDIR/eval).")
    parser.add_argument(
        "--plot",
        nargs="*",
        default=[],
        metavar="PERTURBATION",
        help="Perturbations to plot besides the first --n-plots test ones.",
    )
    parser.add_argument("--n-plots", type=int, default=5)
    parser.add_argument(
        "--predict",
        nargs="*",
        default=[],
        metavar="PERTURBATION",
        help="Also predict these perturbations (e.g. A+B C) into "
        "OUT/predict.h5ad (mean) and OUT/predict_cells.h5ad.",
    )
    parser.add_argument(
        "--pool-size", type=int, default=300, help="Control cells sampled for --predict."
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--max-perturbations",
        type=int,
        default=None,
        metavar="N",
        help="Evaluate only N test perturbations, spread over the sorted test list "
        "(a quick look at a large dataset; default all).",
    )
    parser.add_argument(
        "--max-cells",
        type=int,
        default=None,
        metavar="N",
        help="Predict at most N cells per test perturbation (default all).",
    )
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from scformer_jax import evaluation
    from scformer_jax.data.gears_io import write_h5ad_atomic
    from scformer_jax.io import describe_os_error
    from scformer_jax.predict import UnknownPerturbationError, run_predictor
    from scformer_jax.runs import load_run

    if len(args.workdir) > 1:
        if args.out or args.predict:
            print(
                "eval.py: --out and --predict take one --workdir; with several, each run "
                "is written to its own WORKDIR/eval and the summary to --summary-out.",
                file=sys.stderr,
            )
            return 2
        try:
            evaluation.evaluate_runs(
                args.workdir,
                args.summary_out,
                which=args.checkpoint,
                plot_perturbations=args.plot,
                n_plots=args.n_plots,
                seed=args.seed,
            )
        except (FileNotFoundError, ValueError, KeyError) as e:
            print(f"eval.py: {e}", file=sys.stderr)
            return 2
        summary = Path(args.summary_out)
        print((summary / "summary.md").read_text())
        print(f"Summary written to {summary}")
        return 0
    workdir = args.workdir[0]
    out = Path(args.out) if args.out else Path(workdir) / "eval"
    for flag, value in (
        ("--max-perturbations", args.max_perturbations),
        ("--max-cells", args.max_cells),
    ):
        if value is not None and value < 1:
            print(f"eval.py: {flag} must be >= 1, got {value}.", file=sys.stderr)
            return 2
    if args.predict and args.pool_size < 1:
        print(f"eval.py: --pool-size must be >= 1, got {args.pool_size}.", file=sys.stderr)
        return 2
    try:
        # The dataset and the parameters are loaded once, for the evaluation and --predict.
        run = load_run(workdir, which=args.checkpoint)
        # The training perturbations are measured once, for the predictor and the baselines.
        run.training_measurements()
        predictor = run_predictor(run)
        if args.predict:
            # Bad names fail here, before the evaluation's minutes of work.
            predictor.check_perturbations(args.predict)
        evaluation.evaluate_run(
            run,
            out_dir=args.out,
            plot_perturbations=args.plot,
            n_plots=args.n_plots,
            seed=args.seed,
            predictor=predictor,
            max_perturbations=args.max_perturbations,
            max_cells_per_condition=args.max_cells,
        )
        if args.predict:
            result = predictor.predict(args.predict, pool_size=args.pool_size, seed=args.seed)
            write_h5ad_atomic(result.mean, out / "predict.h5ad")
            write_h5ad_atomic(result.cells, out / "predict_cells.h5ad")
    except (FileNotFoundError, ValueError, KeyError, UnknownPerturbationError) as e:
        print(f"eval.py: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # no space left, read-only folder, no permission
        print(f"eval.py: {describe_os_error(e)}", file=sys.stderr)
        return 2
    print((out / "report.md").read_text())
    print(f"Evaluation written to {out}")
    if args.predict:
        print(
            f"Predictions for {len(args.predict)} perturbation(s) written to "
            f"{out / 'predict.h5ad'} (mean profile per perturbation) and "
            f"{out / 'predict_cells.h5ad'} (one row per control cell)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
