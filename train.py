#!/usr/bin/env python
"""Train scformer-jax: ``python train.py --config configs/default.yaml [--workdir runs/NAME]``.

Kept short on purpose: the work is in :mod:`scformer_jax.training`.
"""

from __future__ import annotations

import argparse
import logging
import sys


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="YAML config (see configs/).")
    parser.add_argument(
        "--workdir",
        default=None,
        help="Run folder; default: a new folder under runs/. An existing run "
        "folder is resumed from its newest checkpoint.",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="Override a config key (repeatable).",
    )
    parser.add_argument(
        "--no-progress",
        action="store_true",
        help="No progress bar: a log line every train.log_interval steps "
        "instead. The default when stderr is not a terminal (cluster job "
        "logs, redirected output), where a bar would fill the log.",
    )
    multi = parser.add_argument_group(
        "multi-process (leave out on Slurm/MPI/TPU pods: detected automatically)"
    )
    multi.add_argument("--coordinator-address", default=None, help="host:port of process 0.")
    multi.add_argument("--num-processes", type=int, default=None)
    multi.add_argument("--process-id", type=int, default=None)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from scformer_jax.config import ConfigError, load_config

    try:
        config = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"Config error: {e}", file=sys.stderr)
        return 2
    import jax

    from scformer_jax import parallel, runs, training
    from scformer_jax.checkpoints import CheckpointWriteError
    from scformer_jax.io import RunFolderLockedError, describe_os_error

    parallel.initialize_distributed(args.coordinator_address, args.num_processes, args.process_id)
    if args.workdir is None and jax.process_count() > 1:
        # Each process would pick its own timestamped folder.
        print(
            "Config error: with several processes, give every process the same --workdir.",
            file=sys.stderr,
        )
        return 2
    workdir = args.workdir or str(runs.new_workdir())
    try:
        summary = training.train_and_evaluate(
            config, workdir, progress=not args.no_progress and sys.stderr.isatty()
        )
    except training.NonFiniteError as e:
        print(f"Training stopped: {e}", file=sys.stderr)
        return 3
    except ConfigError as e:
        print(f"Config error: {e}", file=sys.stderr)
        return 2
    except (ValueError, KeyError, FileNotFoundError, RunFolderLockedError) as e:
        # Bad data or sizes (DataFormatError, split too small, batch vs devices), or another
        # writer on the run folder: the message names the problem; nothing was written for a
        # new run folder.
        print(f"Cannot train: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        # No space left, a read-only folder, no permission: one line with the path.
        text = str(e) if isinstance(e, CheckpointWriteError) else describe_os_error(e)
        print(f"Cannot train: {text}", file=sys.stderr)
        return 2
    if parallel.is_primary():
        best = summary["best_value"]
        print(
            f"Done: {summary['steps']} steps, best {summary['best_metric']} "
            f"{best if best is None else round(best, 4)} at epoch {summary['best_epoch']}. "
            f"Run folder: {summary['workdir']} (checkpoints/, metrics.jsonl, tensorboard/, "
            f"config.yaml). Evaluate: python eval.py --workdir {summary['workdir']}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
