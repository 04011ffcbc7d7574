"""Command line: ``python -m scformer_jax.data {simulate,prepare,split} ...``.

* ``simulate --out FILE.h5ad [--seed N] [--preset NAME] [--set KEY=VALUE] [--chunked]
  [--counts]`` writes the built-in simulated dataset in GEARS's layout (the large presets chunk
  by chunk), or with ``--counts`` its raw UMI counts, an input for ``prepare``.
* ``prepare IN.h5ad OUT.h5ad --perturbation-key COL --control-label LABEL [--chunked] [...]``
  turns a Perturb-seq AnnData into GEARS's layout, block by block for large inputs (OUT may be
  a folder: then ``OUT/perturb_processed.h5ad``).
* ``split DATA --split simulation --seed 1 --out split.json`` writes GEARS's split of the
  dataset's conditions (DATA: a GEARS folder, an ``.h5ad`` file or a built-in name).

Every output is written atomically at the very end; an error writes nothing and exits with
status 2 and a message naming the problem.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

import yaml

from scformer_jax.data.backed import x_nbytes
from scformer_jax.data.conditions import DataFormatError
from scformer_jax.data.dataset import (
    BUILTIN_DATASETS,
    DEFAULT_BACKED_ABOVE_GB,
    simulated_path,
)
from scformer_jax.data.gears_io import PROCESSED_FILE, resolve_h5ad_path, write_h5ad_atomic
from scformer_jax.data.prepare import prepare, prepare_h5ad
from scformer_jax.data.simulate import (
    ON_DISK_PRESETS,
    PRESETS,
    simulate,
    simulate_to_h5ad,
    simulation_config,
)
from scformer_jax.data.splits import gears_split, write_split_json
from scformer_jax.io import describe_os_error


def _parse_sets(items: Sequence[str]) -> dict:
    overrides = {}
    for item in items:
        if "=" not in item:
            raise DataFormatError(f"--set {item!r} must look like KEY=VALUE, e.g. n_genes=200.")
        key, value = item.split("=", 1)
        value = yaml.safe_load(value)
        overrides[key.strip()] = tuple(value) if isinstance(value, list) else value
    return overrides


def _obs_and_var(path: Path):
    """An AnnData with only the obs and var of an .h5ad file (no X, no uns)."""
    import anndata
    import h5py
    from anndata.io import read_elem

    with h5py.File(path, "r") as f:
        return anndata.AnnData(obs=read_elem(f["obs"]), var=read_elem(f["var"]))


def _cmd_simulate(args: argparse.Namespace) -> str:
    out = Path(args.out)
    if out.suffix != ".h5ad":
        raise DataFormatError(f"--out {str(out)!r} must end in .h5ad.")
    cfg = simulation_config(args.preset, **_parse_sets(args.set))
    if args.counts:
        simulate_to_h5ad(cfg, out, seed=args.seed, progress=True, counts=True)
        adata = _obs_and_var(out)
        return (
            f"wrote {out}: raw UMI counts of {adata.n_obs} cells x {adata.n_vars} genes, "
            f"{adata.obs['condition'].nunique()} conditions (preset {args.preset!r}, seed "
            f"{args.seed}); prepare it with: python -m scformer_jax.data prepare {out} "
            "PREPARED.h5ad --perturbation-key condition --control-label ctrl "
            "--cell-type-key cell_type"
        )
    if args.chunked or args.preset in ON_DISK_PRESETS:
        # Chunk by chunk straight to the file: X is never in memory.
        simulate_to_h5ad(cfg, out, seed=args.seed, progress=True)
        adata = _obs_and_var(out)
    else:
        adata = simulate(cfg, seed=args.seed)
        write_h5ad_atomic(adata, out)
    n_conditions = adata.obs["condition"].nunique()
    return (
        f"wrote {out}: {adata.n_obs} cells x {adata.n_vars} genes, {n_conditions} "
        f"conditions (preset {args.preset!r}, seed {args.seed})"
    )


def _cmd_prepare(args: argparse.Namespace) -> str:
    import anndata

    source = Path(args.input)
    if not source.is_file():
        raise DataFormatError(f"Input file {str(source)!r} does not exist.")
    out = Path(args.output)
    if out.suffix != ".h5ad":
        out = out / PROCESSED_FILE
    if out.resolve() == source.resolve():
        raise DataFormatError("OUT must differ from IN; prepare never overwrites its input.")
    normalize = {"auto": None, "yes": True, "no": False}[args.normalize]
    options = dict(
        perturbation_key=args.perturbation_key,
        control_label=args.control_label,
        cell_type_key=args.cell_type_key,
        cell_type=args.cell_type,
        gene_name_key=args.gene_name_key,
        combo_separator=args.combo_separator,
        normalize=normalize,
        min_cells=args.min_cells,
        labels_are_gene_names=args.labels_are_gene_names,
    )
    try:
        large = args.chunked or x_nbytes(source) > DEFAULT_BACKED_ABOVE_GB * 2**30
    except OSError as e:
        raise DataFormatError(f"Could not read {str(source)!r} as .h5ad: {e}") from e
    if large:
        # Block by block from disk to disk (DE with the numpy backend): X never in memory.
        prepare_h5ad(source, out, progress=True, **options)
        result = _obs_and_var(out)
        return (
            f"wrote {out} chunk by chunk: {result.n_obs} cells x {result.n_vars} genes, "
            f"{result.obs['condition'].nunique()} conditions"
        )
    try:
        adata = anndata.read_h5ad(source)
    except Exception as e:  # h5py raises various errors on a bad file
        raise DataFormatError(f"Could not read {str(source)!r} as .h5ad: {e}") from e
    result = prepare(adata, de_backend=args.de_backend, **options)
    write_h5ad_atomic(result, out)
    return (
        f"wrote {out}: {result.n_obs} cells x {result.n_vars} genes, "
        f"{result.obs['condition'].nunique()} conditions"
    )


def _conditions_of(data: str, data_seed: int) -> list[str]:
    if not Path(data).exists() and data in BUILTIN_DATASETS:
        preset = BUILTIN_DATASETS[data]
        if preset not in ON_DISK_PRESETS:
            adata = simulate(preset, seed=data_seed)
            return adata.obs["condition"].astype(str).tolist()
        path = simulated_path(preset, data_seed)
        if not path.exists():
            simulate_to_h5ad(preset, path, seed=data_seed, progress=True)
        data = str(path)
    try:
        adata = _obs_and_var(resolve_h5ad_path(data))
    except (OSError, KeyError) as e:
        raise DataFormatError(f"Could not read {data!r} as an .h5ad file: {e}") from e
    if "condition" not in adata.obs.columns:
        raise DataFormatError(
            f"{data!r} has no obs['condition'] (columns: {list(adata.obs.columns)}). Run "
            "`python -m scformer_jax.data prepare` on it first."
        )
    return adata.obs["condition"].astype(str).tolist()


def _cmd_split(args: argparse.Namespace) -> str:
    conditions = _conditions_of(args.data, args.data_seed)
    result = gears_split(
        conditions,
        split=args.split,
        seed=args.seed,
        train_gene_set_size=args.train_gene_set_size,
        combo_seen2_train_frac=args.combo_seen2_train_frac,
        split_path=args.split_path,
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_split_json(result, out)
    sizes = ", ".join(f"{k} {len(result[k])}" for k in ("train", "val", "test"))
    return f"wrote {out}: {sizes}"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m scformer_jax.data",
        description="Perturb-seq data in GEARS's layout: simulate, prepare, split.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    sim = sub.add_parser("simulate", help="write the built-in simulated dataset")
    sim.add_argument("--out", required=True, help="output .h5ad file")
    sim.add_argument("--seed", type=int, default=0, help="simulation seed (default 0)")
    sim.add_argument(
        "--preset",
        default="default",
        choices=list(PRESETS),
        help="size preset (default: default); "
        f"{' and '.join(ON_DISK_PRESETS)} are always generated chunk by chunk to the file",
    )
    sim.add_argument(
        "--chunked",
        action="store_true",
        help="write chunk by chunk without holding X in memory (same file)",
    )
    sim.add_argument(
        "--counts",
        action="store_true",
        help="write the raw UMI counts of the measured genes (chunk by chunk, no DE genes): "
        "the input of `prepare`, as a sequencing experiment gives it",
    )
    sim.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a SimulationConfig field, e.g. --set n_genes=200",
    )
    sim.set_defaults(func=_cmd_simulate)

    prep = sub.add_parser("prepare", help="turn a Perturb-seq AnnData into GEARS's layout")
    prep.add_argument("input", help="input .h5ad")
    prep.add_argument("output", help="output .h5ad, or a folder for perturb_processed.h5ad")
    prep.add_argument(
        "--perturbation-key", required=True, help="obs column with each cell's perturbed gene(s)"
    )
    prep.add_argument(
        "--control-label", required=True, help="value of that column for control cells"
    )
    prep.add_argument("--cell-type-key", default=None, help="obs column with the cell type")
    prep.add_argument(
        "--cell-type",
        default="cell",
        help="cell type of all cells when --cell-type-key is not given",
    )
    prep.add_argument(
        "--gene-name-key",
        default=None,
        help="var column with gene symbols (default: the var names)",
    )
    prep.add_argument(
        "--combo-separator",
        default="+",
        help="joins the two genes of a double in the labels (default '+')",
    )
    prep.add_argument(
        "--normalize",
        default="auto",
        choices=["auto", "yes", "no"],
        help="normalise + log1p: auto (if X holds counts), yes, no",
    )
    prep.add_argument(
        "--min-cells", type=int, default=2, help="fewest cells per condition (default 2)"
    )
    prep.add_argument(
        "--de-backend",
        default="scanpy",
        choices=["scanpy", "numpy"],
        help="DE t-test via scanpy (GEARS's call, default) or numpy (faster)",
    )
    prep.add_argument(
        "--chunked",
        action="store_true",
        help="read, normalise and write X block by block, never all in memory (automatic "
        f"when X would take more than {DEFAULT_BACKED_ABOVE_GB:g} GB; DE via numpy)",
    )
    prep.add_argument(
        "--labels-are-gene-names",
        action="store_true",
        help="accept perturbation labels that look like integer codes or name "
        "no measured gene (refused by default: usually category codes)",
    )
    prep.set_defaults(func=_cmd_prepare)

    spl = sub.add_parser("split", help="write GEARS's train/val/test split as JSON")
    spl.add_argument("data", help="GEARS data folder, .h5ad file or built-in dataset name")
    spl.add_argument("--split", default="simulation", help="split type (default simulation)")
    spl.add_argument("--seed", type=int, default=1, help="split seed (default 1)")
    spl.add_argument("--out", required=True, help="output .json")
    spl.add_argument("--train-gene-set-size", type=float, default=0.75)
    spl.add_argument("--combo-seen2-train-frac", type=float, default=0.75)
    spl.add_argument("--split-path", default=None, help="custom split file (--split custom)")
    spl.add_argument(
        "--data-seed",
        type=int,
        default=0,
        help="simulation seed when DATA is a built-in name (default 0)",
    )
    spl.set_defaults(func=_cmd_split)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        message = args.func(args)
    except (DataFormatError, ValueError, KeyError) as e:
        text = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"error: {text}", file=sys.stderr)
        return 2
    except OSError as e:  # no space left, read-only folder, no permission
        print(f"error: {describe_os_error(e)}", file=sys.stderr)
        return 2
    print(message)
    return 0


if __name__ == "__main__":
    sys.exit(main())
