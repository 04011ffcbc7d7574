"""Generates the GEARS split expectations that tests/test_splits.py compares against.

Not run by the tests. It needs cell-gears 0.1.2, which pulls torch and torch_geometric, so run
it in a separate virtual environment:

    python -m venv /tmp/gearsenv
    /tmp/gearsenv/bin/pip install torch==2.13.0          # this exact spec: the CPU wheel
    /tmp/gearsenv/bin/pip install cell-gears==0.1.2 --no-deps
    /tmp/gearsenv/bin/pip install numpy pandas anndata scanpy tqdm requests networkx \
        scikit-learn dcor torch_geometric
    /tmp/gearsenv/bin/python tests/data/gears_splits/make_expected.py            # writes JSON
    /tmp/gearsenv/bin/python tests/data/gears_splits/make_expected.py --check-hashseed

What it does: builds a few fixed per-cell condition columns (a Norman-like list with singles and
doubles, an Adamson-like singles-only list, a list mixing 'ctrl+A' and 'A+ctrl' spellings, and
a tiny list that makes GEARS fail), puts each in an AnnData's obs['condition'] (categorical, as
in GEARS's processed files) and runs GEARS's own ``PertData.prepare_split`` on it for several
split types and seeds. ``simulation_single`` crashes inside ``prepare_split`` in 0.1.2 (it
unpacks two values from a ``split_data`` that returns one), so for that type the script calls
``DataSplitter.split_data`` directly and reads the subgroup from
``get_simulation_split_single``, which is what ``split_data`` computes internally.

Each case stores the GEARS outcome: the ``set2conditions`` lists GEARS keeps (a set missing
from it, e.g. ``val``, is what later raises ``KeyError: 'val'`` in GEARS), the subgroups GEARS
defines (``simulation`` and ``simulation_single`` only, else null), or the exception GEARS
raised. ``--check-hashseed`` recomputes everything under two PYTHONHASHSEED values and checks
the outcomes are identical, i.e. that GEARS's splits do not depend on string hashing.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import warnings

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
OUTPUT = os.path.join(HERE, "expected_splits.json")

# Perturbation targets of Norman et al. 2019 (a subset): real-looking names, realistic sorting.
NORMAN_GENES = [
    "AHR",
    "ARID1A",
    "BAK1",
    "BCL2L11",
    "BCORL1",
    "BPGM",
    "CBFA2T3",
    "CBL",
    "CDKN1A",
    "CDKN1B",
    "CEBPA",
    "CEBPB",
    "CEBPE",
    "CNN1",
    "COL1A1",
    "CSRNP1",
    "DLX2",
    "DUSP9",
    "EGR1",
    "ETS2",
    "FEV",
    "FOXA1",
    "FOXA3",
    "FOXF1",
    "FOXL2",
    "FOXO4",
    "GLB1L2",
    "HK2",
    "HOXA13",
    "IGDCC3",
    "IKZF3",
    "KLF1",
    "MAP2K3",
    "MAP2K6",
    "MAPK1",
    "PTPN12",
    "SET",
    "SGK1",
    "TBX3",
    "ZNF318",
]


def _random_gene_names(rng: np.random.RandomState, n: int) -> list[str]:
    """Gene-like names mixing case, digits, '-' and '.', to exercise sort order."""
    alphabet = list("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-.")
    names: set[str] = set()
    while len(names) < n:
        length = rng.randint(2, 9)
        first = alphabet[rng.randint(0, 26)]  # names start with an upper-case letter
        names.add(first + "".join(alphabet[i] for i in rng.randint(0, len(alphabet), length - 1)))
    return sorted(names)


def _cell_column(rng: np.random.RandomState, conditions: list[str]) -> list[str]:
    """Per-cell condition column: each condition 2-4 cells, shuffled, so order is nontrivial.

    At least two cells each: with pandas 2.x, GEARS's ``groupby('split').agg(lambda x: x)``
    returns a bare string for a set holding one cell and ``prepare_split`` then fails with
    AttributeError, an artefact that real data (hundreds of cells per condition) never hits.
    """
    cells = [c for c in conditions for _ in range(rng.randint(2, 5))]
    return [cells[i] for i in rng.permutation(len(cells))]


def _doubles(rng: np.random.RandomState, genes: list[str], n: int) -> list[str]:
    pairs: list[str] = []
    while len(pairs) < n:
        a, b = rng.choice(len(genes), 2, replace=False)
        name = f"{genes[a]}+{genes[b]}"
        if name not in pairs and f"{genes[b]}+{genes[a]}" not in pairs:
            pairs.append(name)
    return pairs


def condition_lists() -> dict[str, list[str]]:
    """The fixed per-cell condition columns, by name."""
    rng = np.random.RandomState(20240)
    # Norman-like: 36 of the 40 genes have a single; 4 appear only in doubles, as in Norman.
    norman_singles = [f"{g}+ctrl" for g in NORMAN_GENES[:36]]
    norman = ["ctrl"] + norman_singles + _doubles(rng, NORMAN_GENES, 32)
    adamson_genes = _random_gene_names(rng, 87)
    adamson = ["ctrl"] + [f"{g}+ctrl" for g in adamson_genes]
    mixed_genes = _random_gene_names(rng, 16)
    mixed = (
        [f"ctrl+{g}" if i % 3 == 0 else f"{g}+ctrl" for i, g in enumerate(mixed_genes[:14])]
        + _doubles(rng, mixed_genes, 12)
        + ["ctrl"]
    )
    tiny = ["ctrl", "A+ctrl", "B+ctrl", "C+ctrl", "D+ctrl", "E+ctrl", "F+ctrl", "A+B", "C+D", "E+F"]
    return {
        "norman_like": _cell_column(rng, norman),
        "adamson_like": _cell_column(rng, adamson),
        "mixed_spelling": _cell_column(rng, mixed),
        "tiny": _cell_column(rng, tiny),
        "two_genes": _cell_column(rng, ["ctrl", "A+ctrl", "B+ctrl"]),
    }


def _cases() -> list[dict]:
    cases = []
    all_types = [
        "simulation",
        "simulation_single",
        "single",
        "combo_seen0",
        "combo_seen1",
        "combo_seen2",
        "no_test",
    ]
    for name in ("norman_like", "adamson_like", "mixed_spelling", "tiny"):
        for split in all_types:
            seeds = (1, 2, 3) if split == "simulation" else (1, 2)
            for seed in seeds:
                cases.append(
                    {
                        "conditions": name,
                        "split": split,
                        "seed": seed,
                        "train_gene_set_size": 0.75,
                        "combo_seen2_train_frac": 0.75,
                    }
                )
    for name in ("norman_like", "mixed_spelling"):
        cases.append(
            {
                "conditions": name,
                "split": "simulation",
                "seed": 5,
                "train_gene_set_size": 0.5,
                "combo_seen2_train_frac": 0.5,
            }
        )
        cases.append(
            {
                "conditions": name,
                "split": "simulation",
                "seed": 0,
                "train_gene_set_size": 0.9,
                "combo_seen2_train_frac": 0.0,
            }
        )
    cases.append(
        {
            "conditions": "adamson_like",
            "split": "simulation_single",
            "seed": 11,
            "train_gene_set_size": 0.6,
            "combo_seen2_train_frac": 0.75,
        }
    )
    # Failure modes: every gene seen leaves no test set; two genes leave training empty.
    cases.append(
        {
            "conditions": "adamson_like",
            "split": "simulation",
            "seed": 1,
            "train_gene_set_size": 1.0,
            "combo_seen2_train_frac": 0.75,
        }
    )
    for split in ("simulation", "no_test"):
        cases.append(
            {
                "conditions": "two_genes",
                "split": split,
                "seed": 1,
                "train_gene_set_size": 0.75,
                "combo_seen2_train_frac": 0.75,
            }
        )
    return cases


def _set2conditions(adata) -> dict[str, list[str]]:
    """The set -> conditions dict exactly as PertData.prepare_split builds it."""
    grouped = dict(adata.obs.groupby("split").agg({"condition": lambda x: x}).condition)
    return {k: [str(c) for c in v.unique().tolist()] for k, v in grouped.items()}


def _plain(groups: dict) -> dict[str, list[str]]:
    return {k: [str(c) for c in v] for k, v in groups.items()}


def run_gears(
    cell_conditions: list[str],
    split: str,
    seed: int,
    train_gene_set_size: float = 0.75,
    combo_seen2_train_frac: float = 0.75,
) -> dict:
    """Runs cell-gears 0.1.2 on one condition column; returns the outcome record.

    Returns:
      ``{"sets": {...}, "subgroups": {...} | None}`` or ``{"exception": "TypeName"}``.
    """
    import anndata as ad
    import pandas as pd
    from gears.data_utils import DataSplitter
    from gears.pertdata import PertData

    obs = pd.DataFrame(
        {"condition": pd.Categorical(cell_conditions)},
        index=[str(i) for i in range(len(cell_conditions))],
    )
    adata = ad.AnnData(np.zeros((len(cell_conditions), 1), dtype=np.float32), obs=obs)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if split == "simulation_single":
                splitter = DataSplitter(adata, split_type=split)
                adata = splitter.split_data(
                    train_gene_set_size=train_gene_set_size,
                    combo_seen2_train_frac=combo_seen2_train_frac,
                    seed=seed,
                )
                unique_perts = [p for p in adata.obs["condition"].unique() if p != "ctrl"]
                _, _, subgroup = splitter.get_simulation_split_single(
                    unique_perts, train_gene_set_size, seed
                )
                return {"sets": _set2conditions(adata), "subgroups": _plain(subgroup)}
            # PertData.__init__ downloads GEARS's gene graph; prepare_split needs none of it.
            pert_data = PertData.__new__(PertData)
            pert_data.adata = adata
            pert_data.dataset_name = "synthetic"
            with tempfile.TemporaryDirectory() as folder:
                pert_data.dataset_path = folder
                with open(os.devnull, "w") as devnull:
                    stdout, sys.stdout = sys.stdout, devnull
                    try:
                        pert_data.prepare_split(
                            split=split,
                            seed=seed,
                            train_gene_set_size=train_gene_set_size,
                            combo_seen2_train_frac=combo_seen2_train_frac,
                        )
                    finally:
                        sys.stdout = stdout
            subgroups = None
            if pert_data.subgroup is not None:
                subgroups = _plain(pert_data.subgroup["test_subgroup"])
            return {"sets": _plain(pert_data.set2conditions), "subgroups": subgroups}
    except Exception as err:  # noqa: BLE001 - the failure itself is the expected outcome
        return {"exception": type(err).__name__}


def compute() -> dict:
    import gears
    import pandas as pd

    lists = condition_lists()
    cases = []
    for case in _cases():
        outcome = run_gears(
            lists[case["conditions"]],
            case["split"],
            case["seed"],
            case["train_gene_set_size"],
            case["combo_seen2_train_frac"],
        )
        cases.append({**case, "gears": outcome})
    return {
        "generated_by": "tests/data/gears_splits/make_expected.py",
        "versions": {
            "cell-gears": getattr(gears, "__version__", "0.1.2"),
            "numpy": np.__version__,
            "pandas": pd.__version__,
        },
        "condition_lists": lists,
        "cases": cases,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stdout", action="store_true", help="print JSON instead of writing")
    parser.add_argument(
        "--check-hashseed",
        action="store_true",
        help="recompute under PYTHONHASHSEED=0 and =12345 and compare",
    )
    args = parser.parse_args()
    if args.check_hashseed:
        outputs = []
        for hash_seed in ("0", "12345"):
            env = {**os.environ, "PYTHONHASHSEED": hash_seed}
            outputs.append(
                subprocess.run(
                    [sys.executable, __file__, "--stdout"],
                    env=env,
                    check=True,
                    capture_output=True,
                    text=True,
                ).stdout
            )
        same = json.loads(outputs[0])["cases"] == json.loads(outputs[1])["cases"]
        print("GEARS splits identical across PYTHONHASHSEED values:", same)
        sys.exit(0 if same else 1)
    text = json.dumps(compute(), indent=1) + "\n"
    if args.stdout:
        sys.stdout.write(text)
        return
    tmp_path = OUTPUT + ".tmp"
    with open(tmp_path, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp_path, OUTPUT)
    print("wrote", OUTPUT)


if __name__ == "__main__":
    main()
