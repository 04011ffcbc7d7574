"""Prediction quality: the seed config, the recommended config and every baseline, over seeds.

    python bench/quality.py                  # everything below (about 2 hours on 2 CPU cores)
    python bench/quality.py --datasets simulated --seeds 1   # one cell of it
    python bench/quality.py --datasets simulated --configs recommended --train-seeds 42 43 44

For each dataset and GEARS split seed (1, 2, 3 by default) it trains the seed script's setup
(``configs/scformer.yaml``) and the recommended one (``configs/default.yaml``), evaluates
both on the test split with ``eval.py``'s code (which fits the baselines ``control``,
``train_mean``, ``additive``, ``linear``, ``coexpression`` and ``additive_shrunk`` on the
same split), and prints, per dataset, a table of mean +- sd over the seeds per subgroup and
metric. With
``--ablations`` it also trains the recommended config with each of its options changed (on
the first dataset only). With ``--train-seeds`` every split seed is trained once per
``train.seed`` (parameter initialisation, dropout, data order) and the means are over all
those runs: a run's score moves by several hundredths with the training seed alone, so a
margin that holds for one training seed may not hold for another.

Datasets:

* ``simulated``: the built-in dataset (simulator seed 0). The recommended config was chosen
  on its validation perturbations; its test perturbations were never used for a choice.
* ``shifted``: a dataset nothing was tuned on: simulator seed 7, a denser network (3.5
  regulators per gene instead of 2.5), weaker knock-down (-1.8 instead of -2.5), stronger
  activation (2.5 instead of 2.0), more intrinsic noise (0.5 instead of 0.4).
* ``shifted2``: a second dataset nothing was tuned on, added after choices had been made on
  ``dev`` while ``shifted`` had been looked at: simulator seed 23, a sparser network (2.0
  regulators per gene), stronger knock-down (-3.0), half the perturbed genes activated
  (instead of 30%), 60 cells per perturbation (instead of 40) and more non-additive doubles
  (20% additive, 40% synergistic, 40% buffering instead of 40/30/30).
* ``shifted3``: a third dataset nothing was tuned on, its settings fixed before any run on it
  (after ``shifted2``'s table), shaped like a CRISPRi screen: simulator seed 41, 3.0
  regulators per gene, half the network's edges activating (instead of 65%), 15% of the
  perturbed genes activated, a milder knock-down (-2.0), 30 cells per perturbation, more
  intrinsic noise (0.45) and mostly additive doubles (60% additive, 20/20).
* ``dev``: a development dataset for choices between options, never reported as a result:
  simulator seed 11 with the default settings. Its test perturbations may be used to choose
  (it is a validation set of its own), the other datasets' test perturbations never.
* ``screen``: ``simulated:screen``, single knock-outs only, 300 measured genes, 80 of the
  100 perturbed genes outside the panel; its test subgroup is ``unseen_single``.

Each run folder is kept under ``--out`` (default ``bench/results/quality``); a run whose
``eval/metrics.json`` exists and whose ``config.yaml`` is the config asked for is read instead
of trained again (``--fresh`` retrains). The
last line counts the (subgroup, metric) cells where the recommended model's mean is better
than every baseline's mean, per dataset.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

CONFIGS = {
    "seed": ROOT / "configs" / "scformer.yaml",
    "recommended": ROOT / "configs" / "default.yaml",
}
BASELINES = ("control", "train_mean", "additive", "linear", "coexpression", "additive_shrunk")
# The simple baselines published comparisons use (Ahlmann-Eltze et al. 2025), and the
# subgroups they are compared on (combo_seen0 is a single perturbation in some splits, none
# in others): the first count of the closing line. `coexpression` and `additive_shrunk` are
# this project's own, stronger baselines (the recommended model's priors without the
# network: the co-expression prior, and the measured singles shrunk by their sampling error):
# the second count adds them.
SIMPLE_BASELINES = ("control", "train_mean", "additive", "linear")
SCORED_SUBGROUPS = ("overall", "unseen_single", "combo_seen1", "combo_seen2")
CEILING = "technical_duplicate"  # half of each test perturbation's cells predicting the other
SUBGROUPS = ("overall", "unseen_single", "combo_seen0", "combo_seen1", "combo_seen2")
# (metric, higher is better)
METRICS = (
    ("pearson_delta", True),
    ("pearson_de_delta", True),
    ("pearson_delta_pert", True),
    ("mse_de", False),
    ("discrimination_l1", True),
)
# Metrics that the win count and the closing line use.
WIN_METRICS = ("pearson_delta", "pearson_de_delta")
# A cell is won when the recommended mean is ahead of every baseline's by at least this much:
# a level cell (the same prediction, as unseen_single and combo_seen0 under no_network are the
# coexpression baseline's, apart from float rounding) is not a win. Half the tables' last digit.
WIN_MARGIN = 5e-4
PER_PERTURBATION = "per_perturbation.csv"  # eval's per-perturbation table in a run's eval/
# The recommended config with one option set back to the seed's value (or, for the additive
# prior and the control anchor, which validation did not choose, with that option on; or to
# the value recommended before, as "unseen_single prior" and "shrink_prior normal"): the
# ablation runs.
ABLATIONS = {
    "unseen_single network": ["model.unseen_single=network"],
    "unseen_single prior": ["model.unseen_single=prior"],
    "unseen_in_combo network": ["model.unseen_in_combo=network"],
    "unseen_in_combo prior": ["model.unseen_in_combo=prior"],
    "with control_anchor": ["model.control_anchor=true"],
    "with ema_decay 0.99": ["optim.ema_decay=0.99"],
    "with ema_decay 0.998": ["optim.ema_decay=0.998"],
    "no coexpression_prior": [
        "model.coexpression_prior=false",
        "model.unseen_single=network",
        "model.unseen_in_combo=network",
    ],
    "no shrink_singles": ["model.shrink_singles=false", "model.shrink_prior=normal"],
    "shrink_prior normal": ["model.shrink_prior=normal"],
    "no seen_single_correction": [
        "model.seen_single_correction=false",
        "model.shrink_singles=false",
        "model.shrink_prior=normal",
        "model.unseen_in_combo=network",
    ],
    "additive_prior instead of seen_single_correction": [
        "model.seen_single_correction=false",
        "model.additive_prior=true",
        "model.unseen_in_combo=network",
    ],
    "output_baseline none": ["model.output_baseline=none"],
    "no condition_mean target": ["data.train_target=cell"],
    "random gene embedding": ["model.gene_embedding_init=random"],
    "neither prior": [
        "model.coexpression_prior=false",
        "model.seen_single_correction=false",
        "model.shrink_singles=false",
        "model.shrink_prior=normal",
        "model.unseen_single=network",
        "model.unseen_in_combo=network",
    ],
}
SHIFTED = dict(mean_regulators=3.5, knockdown_shift=-1.8, activation_shift=2.5, noise_sd=0.5)
SHIFTED2 = dict(
    mean_regulators=2.0,
    knockdown_shift=-3.0,
    activation_fraction=0.5,
    cells_per_condition=60,
    interaction_probs=(0.2, 0.4, 0.4),
)
SHIFTED3 = dict(
    mean_regulators=3.0,
    activating_edge_fraction=0.5,
    activation_fraction=0.15,
    knockdown_shift=-2.0,
    cells_per_condition=30,
    noise_sd=0.45,
    interaction_probs=(0.6, 0.2, 0.2),
)
# The datasets written once as .h5ad: name -> (simulator seed, settings over "default").
SIMULATED_FILES = {
    "shifted": (7, SHIFTED),
    "shifted2": (23, SHIFTED2),
    "shifted3": (41, SHIFTED3),
    "dev": (11, {}),
}
DATASETS = ("simulated", "shifted", "shifted2", "shifted3", "screen", "dev")


def dataset_path(name: str, out: Path) -> str:
    """The data.path of a benchmark dataset (those of SIMULATED_FILES are written once as
    .h5ad under `out`)."""
    if name == "simulated":
        return "simulated"
    if name == "screen":
        return "simulated:screen"
    if name in SIMULATED_FILES:
        seed, settings = SIMULATED_FILES[name]
        path = out / "data" / f"{name}_seed{seed}.h5ad"
        if not path.is_file():
            from scformer_jax.data.simulate import simulate, simulation_config

            path.parent.mkdir(parents=True, exist_ok=True)
            simulate(simulation_config("default", **settings), seed=seed).write_h5ad(path)
        return str(path)
    raise ValueError(f"Unknown dataset {name!r}; choose from {', '.join(DATASETS)}.")


def run_one(config_path: Path, overrides: list[str], workdir: Path, fresh: bool) -> dict:
    """Trains (unless already done) and evaluates one run; returns its metrics.json."""
    from scformer_jax import evaluation, training
    from scformer_jax.config import ConfigError, config_to_dict, load_config

    config = load_config(config_path, overrides)
    metrics_path = workdir / "eval" / "metrics.json"
    if metrics_path.is_file() and not fresh:
        try:
            cached = config_to_dict(load_config(workdir / "config.yaml"))
        except (OSError, ConfigError):  # written by an older version: not comparable
            cached = None
        if cached == config_to_dict(config):
            metrics = json.loads(metrics_path.read_text())
            if set(BASELINES) <= set(metrics.get("baselines", {})):
                return metrics
            # Evaluated before a baseline was added: evaluate the trained run again.
            evaluation.evaluate_run(workdir, n_plots=0)
            return json.loads(metrics_path.read_text())
        print(f"  {workdir}: its config is not the one asked for: training it again", flush=True)
    if workdir.exists():
        import shutil

        shutil.rmtree(workdir)
    start = time.time()
    training.train_and_evaluate(config, workdir, progress=False)
    evaluation.evaluate_run(workdir, n_plots=0)
    print(f"  {workdir.relative_to(workdir.parents[2])}: {time.time() - start:.0f} s", flush=True)
    return json.loads(metrics_path.read_text())


def summarize(runs: dict[str, list[dict]]) -> dict:
    """runs: variant name -> the metrics.json of each seed. Returns
    {(row, subgroup, metric): (mean, sd, n)}: one row per variant (its model) and one per
    baseline and the technical-duplicate ceiling, from the runs of ``recommended`` when it is
    there, else of the first variant (every variant of a seed shares the split; only
    ``additive_shrunk`` differs between configs, following ``model.shrink_prior``)."""
    from scformer_jax.evaluation import summarize_runs

    table = {}
    wanted = [m for m, _ in METRICS]
    source = "recommended" if "recommended" in runs else next(iter(runs), None)
    for variant, per_seed in runs.items():
        frame = summarize_runs(per_seed, metrics=wanted)
        for rec in frame.itertuples(index=False):
            if rec.method == "model":
                row = variant
            elif variant == source and rec.method in BASELINES + (CEILING,):
                row = rec.method
            else:
                continue
            sd = 0.0 if math.isnan(rec.sd) else rec.sd
            table[(row, rec.group, rec.metric)] = (rec.mean, sd, rec.n_runs)
    return table


def wins(
    table: dict,
    row: str = "recommended",
    *,
    baselines: tuple[str, ...] = BASELINES,
    subgroups: tuple[str, ...] = SUBGROUPS,
) -> tuple[int, int, list[str]]:
    """(won, total, lost cells) of `row` against every one of `baselines` on WIN_METRICS in
    `subgroups` (those the table has); a cell is won by a margin of at least WIN_MARGIN."""
    won = total = 0
    lost = []
    higher = dict(METRICS)
    for subgroup in subgroups:
        for metric in WIN_METRICS:
            if (row, subgroup, metric) not in table:
                continue
            total += 1
            mine = table[(row, subgroup, metric)][0]
            best = [
                (table[(b, subgroup, metric)][0], b)
                for b in baselines
                if (b, subgroup, metric) in table
            ]
            better = all(
                (mine >= v + WIN_MARGIN) if higher[metric] else (mine <= v - WIN_MARGIN)
                for v, _ in best
            )
            if better:
                won += 1
            else:
                top = max(best) if higher[metric] else min(best)
                lost.append(f"{subgroup}/{metric} ({mine:.3f} vs {top[1]} {top[0]:.3f})")
    return won, total, lost


def paired(
    frames: list,
    baselines: tuple[str, ...] = SIMPLE_BASELINES,
    *,
    subgroups: tuple[str, ...] = SCORED_SUBGROUPS,
    n_boot: int = 2000,
    seed: int = 0,
) -> dict:
    """Per-perturbation comparison of the model with the strongest baseline of each cell.

    frames: each seed's ``eval/per_perturbation.csv`` (pandas frames with columns
    condition, method, subgroup and the metrics). For each (subgroup, metric) of
    WIN_METRICS the baseline with the highest mean over the pooled test perturbations is
    compared with the model perturbation by perturbation: the mean difference (model minus
    baseline), a bootstrap 95% interval of it (perturbations resampled, ``n_boot`` draws) and
    how many perturbations the model scores higher on. A perturbation tested in several runs
    (split seeds, train seeds) counts once per run.

    Returns {(subgroup, metric): (baseline, mean difference, low, high, won, n)}.
    """
    import numpy as np
    import pandas as pd

    data = pd.concat([f.assign(split=i) for i, f in enumerate(frames)], ignore_index=True)
    rng = np.random.default_rng(seed)
    out = {}
    for subgroup in subgroups:
        rows = data if subgroup == "overall" else data[data["subgroup"] == subgroup]
        for metric in WIN_METRICS:
            wide = rows.pivot_table(
                index=["split", "condition"], columns="method", values=metric, aggfunc="first"
            )
            present = [b for b in baselines if b in wide.columns]
            if "model" not in wide.columns or not present or wide.empty:
                continue
            wide = wide.dropna(subset=["model", *present])
            if wide.empty:
                continue
            best = max(present, key=lambda b: wide[b].mean())
            diff = (wide["model"] - wide[best]).to_numpy()
            draws = rng.integers(0, len(diff), size=(n_boot, len(diff)))
            means = diff[draws].mean(axis=1)
            low, high = np.quantile(means, [0.025, 0.975])
            out[(subgroup, metric)] = (
                best,
                float(diff.mean()),
                float(low),
                float(high),
                int((diff > 0).sum()),
                len(diff),
            )
    return out


def format_paired(name: str, result: dict) -> str:
    lines = [
        f"{name}: recommended minus the strongest simple baseline, per test perturbation "
        "(pooled over runs; bootstrap 95% interval; perturbations won)",
        "",
        "| subgroup | metric | baseline | difference | 95% interval | won |",
        "|---|---|---|---|---|---|",
    ]
    for (subgroup, metric), (base, mean, low, high, won, n) in result.items():
        lines.append(
            f"| {subgroup} | {metric} | {base} | {mean:+.3f} | [{low:+.3f}, {high:+.3f}] | "
            f"{won}/{n} |"
        )
    return "\n".join(lines) + "\n"


def runs_label(args) -> str:
    """What the table's means are over: "split seeds [1, 2, 3]", with "x train seeds [...]"
    when --train-seeds was given."""
    label = f"split seeds {args.seeds}"
    return label if args.train_seeds is None else f"{label} x train seeds {args.train_seeds}"


def format_table(name: str, table: dict, rows: list[str], over: str) -> str:
    lines = [f"## {name} (mean +- sd over {over})", ""]
    for subgroup in SUBGROUPS:
        if not any((r, subgroup, "pearson_delta") in table for r in rows):
            continue
        n = max(
            table[(r, subgroup, "pearson_delta")][2]
            for r in rows
            if (r, subgroup, "pearson_delta") in table
        )
        lines += [
            f"{subgroup} ({n} run(s) with this subgroup)",
            "",
            "| method | " + " | ".join(m for m, _ in METRICS) + " |",
            "|---|" + "---|" * len(METRICS),
        ]
        for r in rows:
            cells = []
            for metric, _ in METRICS:
                v = table.get((r, subgroup, metric))
                cells.append("-" if v is None else f"{v[0]:.3f} +- {v[1]:.3f}")
            lines.append(f"| {r} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--datasets",
        nargs="+",
        default=["simulated", "shifted", "shifted2", "shifted3", "screen"],
        choices=list(DATASETS),
    )
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    parser.add_argument(
        "--train-seeds",
        nargs="+",
        type=int,
        default=None,
        metavar="SEED",
        help="also vary train.seed (parameter init, dropout, data order): every split seed is "
        "trained once per train seed and the table averages over all of those runs "
        "(default: the configs' own train.seed, one run per split seed)",
    )
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument(
        "--ablations",
        nargs="*",
        metavar="NAME",
        help="also train the recommended config with each option changed "
        "(first dataset only); names choose some: " + "; ".join(ABLATIONS),
    )
    parser.add_argument(
        "--ablations-only",
        action="store_true",
        help="train only the ablation runs (e.g. in a second process beside "
        "one that trains the main table into the same --out)",
    )
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "quality")
    parser.add_argument("--fresh", action="store_true", help="retrain runs that exist")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        help="an override for every run, e.g. train.epochs=2 (smoke tests)",
    )
    args = parser.parse_args(argv)

    # Every run first (the main table of every dataset before the ablations, so that a cut
    # short benchmark has the main results), then the tables from the stored metrics.
    # A run is (split seed, train seed); train seed None: the config's own.
    run_keys = [(s, t) for s in args.seeds for t in (args.train_seeds or [None])]
    plan = []  # (dataset, run key, variant name, config path, extra overrides)
    for dataset in args.datasets:
        for key in run_keys:
            plan += [(dataset, key, name, CONFIGS[name], []) for name in args.configs]
    if args.ablations_only:
        plan = []
    if args.ablations is not None or args.ablations_only:
        chosen = args.ablations or list(ABLATIONS)
        unknown = [k for k in chosen if k not in ABLATIONS]
        if unknown:
            parser.error(f"unknown ablation(s) {unknown}; choose from {list(ABLATIONS)}")
        plan += [
            (args.datasets[0], key, f"recommended, {k}", CONFIGS["recommended"], ABLATIONS[k])
            for key in run_keys
            for k in chosen
        ]
    metrics_of = {}
    workdir_of = {}
    for dataset, (seed, train_seed), name, config_path, extra in plan:
        slug = name.replace(", ", "-").replace(" ", "_")
        folder = f"seed{seed}" if train_seed is None else f"seed{seed}-train{train_seed}"
        workdir = args.out / "runs" / dataset / slug / folder
        overrides = [
            f"data.path={dataset_path(dataset, args.out)}",
            f"data.split_seed={seed}",
            *([] if train_seed is None else [f"train.seed={train_seed}"]),
            *extra,
            *args.overrides,
        ]
        key = (dataset, (seed, train_seed), name)
        metrics_of[key] = run_one(config_path, overrides, workdir, args.fresh)
        workdir_of[key] = workdir

    results = []
    closing = []
    for dataset in args.datasets:
        variants = [n for d, _, n, _, _ in plan if d == dataset]
        variants = list(dict.fromkeys(variants))
        runs = {name: [metrics_of[(dataset, k, name)] for k in run_keys] for name in variants}
        table = summarize(runs)
        text = format_table(
            dataset, table, variants + list(BASELINES) + [CEILING], runs_label(args)
        )
        print(text, flush=True)
        results.append(text)
        if not variants:
            continue
        if "recommended" in variants:
            simple_won, simple_total, _ = wins(
                table, baselines=SIMPLE_BASELINES, subgroups=SCORED_SUBGROUPS
            )
            won, total, lost = wins(table)
            closing.append(
                f"{simple_won}/{simple_total} against the simple baselines and {won}/{total} "
                f"against every baseline on {dataset}"
            )
            if lost:
                print(
                    f"{dataset}: the recommended model does not beat every baseline on: "
                    + "; ".join(lost)
                    + "\n"
                )
            import pandas as pd

            frames = [
                pd.read_csv(workdir_of[(dataset, k, "recommended")] / "eval" / PER_PERTURBATION)
                for k in run_keys
            ]
            text = format_paired(dataset, paired(frames))
            print(text, flush=True)
            results.append(text)
    (args.out).mkdir(parents=True, exist_ok=True)
    (args.out / "quality.md").write_text("\n\n".join(results) + "\n")
    if closing:
        print(
            "model wins " + "; ".join(closing) + " (subgroup, metric) cells "
            f"({'/'.join(WIN_METRICS)}; mean over {runs_label(args)} above each baseline "
            f"by at least {WIN_MARGIN}; "
            f"simple: {', '.join(SIMPLE_BASELINES)} on {', '.join(SCORED_SUBGROUPS)}; "
            f"every: also {', '.join(b for b in BASELINES if b not in SIMPLE_BASELINES)}, "
            "and combo_seen0)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
