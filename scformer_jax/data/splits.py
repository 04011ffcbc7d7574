"""Train/validation/test splits of perturbation conditions, identical to GEARS's.

Results are only comparable with published GEARS numbers when the test perturbations are the
same, so :func:`gears_split` reproduces the splits of cell-gears 0.1.2 (``DataSplitter`` in
``gears/data_utils.py`` as driven by ``PertData.prepare_split``) draw for draw: the same legacy
NumPy ``RandomState`` streams, re-seeded at the same points, drawing from the same candidate
lists in the same order. The implementation is our own; only the behaviour is matched.

Conditions use GEARS's names: ``"ctrl"`` for control cells, ``"A+ctrl"`` (or ``"ctrl+A"``) for a
single-gene perturbation and ``"A+B"`` for a double.

What the split types do (``n_genes`` counts the distinct perturbed genes):

* ``simulation``: ``int(n_genes * train_gene_set_size)`` genes are drawn as "seen". Test holds
  the singles of the other genes (``unseen_single``), doubles with one or no seen gene
  (``combo_seen1``, ``combo_seen0``) and ``1 - combo_seen2_train_frac`` of the doubles with two
  seen genes (``combo_seen2``). Validation is drawn from training the same way with fractions
  0.9 and 0.9. ``ctrl`` is always in training.
* ``simulation_single``: the same for data with single perturbations only.
* ``single``: ``int(n_singles * 0.1)`` genes are drawn (with replacement); their singles form
  the test set and doubles containing them are dropped from every set.
* ``combo_seen0`` / ``combo_seen1``: genes are drawn the same way; test holds their singles and
  the doubles with both (seen0) or at least one (seen1) drawn gene; seen0 drops the doubles
  that pair a drawn gene with an undrawn one.
* ``combo_seen2``: ``int(n_doubles * 0.1)`` doubles are drawn (with replacement) for the test set.
* ``no_test``: ``int(n_perturbations * 0.1)`` perturbations are drawn for validation; no test set.
* ``custom``: read from a file (GEARS's pickled ``{"train", "val", "test"}`` dict or our JSON).

In the list-based types (``single``, ``combo_seen*``, ``no_test``) validation is drawn from the
remaining training perturbations in the same way with fraction 0.1, from the same random stream.

Subgroups: for ``simulation`` they are GEARS's ``test_subgroup`` lists exactly (same order:
``combo_seen2`` sorted, the others in data order); for ``simulation_single`` GEARS's
``unseen_single`` list. GEARS defines no subgroups for the other types; there we classify each
test condition by how many of its genes are perturbed in some training condition (a test single
whose gene is perturbed in training belongs to no subgroup).

Order of the lists: GEARS lists each set's conditions in order of first appearance in
``adata.obs['condition']``, so pass the conditions in that order (the per-cell column itself is
fine; repeats are ignored). The order matters beyond presentation for ``no_test`` and
``combo_seen2``, whose draws index into the perturbation list.

Failure modes that GEARS reports late and obscurely (``KeyError: 'val'`` when no condition
lands in validation, an ``AssertionError`` for doubles in ``simulation_single``, a crash on a
missing custom split file) raise ``ValueError`` here, naming what is too small and the fix.
Two GEARS crashes are not reproduced, since the split they would have produced is well defined:
``prepare_split('simulation_single')`` fails unpacking ``split_data``'s single return value
(we return what ``DataSplitter`` computes), and with pandas 2.x ``prepare_split`` fails with an
``AttributeError`` when a set holds exactly one cell.
"""

from __future__ import annotations

import json
import os
import pickle
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from scformer_jax.data.conditions import CONTROL, parse_condition, unique_conditions
from scformer_jax.io import atomic_path

SPLIT_TYPES = (
    "simulation",
    "simulation_single",
    "single",
    "combo_seen0",
    "combo_seen1",
    "combo_seen2",
    "no_test",
    "custom",
)
# GEARS's test subgroups, in its order (metrics and reports group by these).
SUBGROUP_NAMES = ("unseen_single", "combo_seen0", "combo_seen1", "combo_seen2")
SET_NAMES = ("train", "val", "test")

# PertData.prepare_split draws validation from training with these fixed fractions, whatever
# the test fractions were.
_SIMULATION_VAL_GENE_FRACTION = 0.9
_SIMULATION_VAL_COMBO_SEEN2_TRAIN_FRAC = 0.9
# DataSplitter.split_data's val_size and prepare_split's combo_single_split_test_set_fraction.
_LIST_SPLIT_FRACTION = 0.1
_MAX_LISTED = 10


def _format_names(names: Sequence[str]) -> str:
    """Lists at most ``_MAX_LISTED`` names, so messages stay readable for long lists."""
    shown = ", ".join(repr(str(name)) for name in names[:_MAX_LISTED])
    if len(names) > _MAX_LISTED:
        shown += f", ... ({len(names) - _MAX_LISTED} more)"
    return shown


def _checked_conditions(conditions: Iterable[Any]) -> list[str]:
    """Distinct conditions in order of first appearance, each checked by parse_condition."""
    if isinstance(conditions, (str, bytes)):
        raise ValueError("conditions must be a list of condition names, not a single string")
    conditions = list(conditions)
    for position, condition in enumerate(conditions):
        if not isinstance(condition, str):
            raise ValueError(
                f"conditions[{position}] is {condition!r} ({type(condition).__name__})"
                "; every entry must be a GEARS condition name such as 'A+ctrl' "
                "(missing values in obs['condition']?)"
            )
    distinct = unique_conditions(conditions)
    for condition in distinct:
        parse_condition(condition)
    return distinct


def _genes_in(perts: Sequence[str], genes_of: dict[str, tuple[str, ...]]) -> list[str]:
    """Sorted distinct genes of ``perts``: the candidate list GEARS draws genes from."""
    return sorted({gene for pert in perts for gene in genes_of[pert]})


def _simulation_stage(
    perts: list[str],
    genes_of: dict[str, tuple[str, ...]],
    seed: int,
    gene_fraction: float,
    seen2_train_frac: float,
    singles_only: bool,
) -> tuple[list[str], list[str], dict[str, list[str]]]:
    """One GEARS simulation draw: splits ``perts`` into kept and held-out conditions.

    GEARS seeds NumPy afresh with the same seed for the gene draw and again for the double
    draw, so both draws start from the beginning of the seed's stream.

    Returns:
      (kept, held_out, subgroups); subgroups keyed by SUBGROUP_NAMES, in GEARS's order.
    """
    genes = _genes_in(perts, genes_of)
    n_seen = int(len(genes) * gene_fraction)
    gene_draw = np.random.RandomState(seed).choice(len(genes), n_seen, replace=False)
    seen_genes = {genes[i] for i in gene_draw}

    singles = [p for p in perts if len(genes_of[p]) == 1]
    doubles = [p for p in perts if len(genes_of[p]) == 2]
    if singles_only and doubles:
        raise ValueError(
            f"split 'simulation_single' handles single-gene perturbations only, but the data "
            f"has {len(doubles)} double(s) ({_format_names(doubles)}); use split='simulation'"
        )
    train_singles = [p for p in singles if genes_of[p][0] in seen_genes]
    unseen_single = [p for p in singles if genes_of[p][0] not in seen_genes]

    def n_seen_of(pert: str) -> int:
        return sum(gene in seen_genes for gene in genes_of[pert])

    combo_seen0 = [p for p in doubles if n_seen_of(p) == 0]
    combo_seen1 = [p for p in doubles if n_seen_of(p) == 1]
    # GEARS draws from the sorted distinct doubles with both genes seen (np.setdiff1d sorts).
    seen2_pool = sorted({p for p in doubles if n_seen_of(p) == 2})
    n_seen2_train = int(len(seen2_pool) * seen2_train_frac)
    seen2_draw = np.random.RandomState(seed).choice(len(seen2_pool), n_seen2_train, replace=False)
    seen2_train = [seen2_pool[i] for i in seen2_draw]
    seen2_train_set = set(seen2_train)
    combo_seen2 = [p for p in seen2_pool if p not in seen2_train_set]

    kept = train_singles + seen2_train
    subgroups = {
        "unseen_single": unseen_single,
        "combo_seen0": combo_seen0,
        "combo_seen1": combo_seen1,
        "combo_seen2": combo_seen2,
    }
    held_out = unseen_single + combo_seen1 + combo_seen2 + combo_seen0
    return kept, held_out, subgroups


def _list_stage(
    perts: list[str],
    genes_of: dict[str, tuple[str, ...]],
    split: str,
    fraction: float,
    rng: np.random.RandomState,
) -> tuple[list[str], list[str]]:
    """One draw of GEARS's list-based splits (single, combo_seen*, no_test).

    GEARS always draws ``int(n_singles * fraction)`` genes with replacement first, even for the
    types that then ignore them, so that draw is made here too to keep the stream aligned.

    Returns:
      (kept, held_out). Conditions in neither (doubles that ``single`` and ``combo_seen0``
      drop) go to no set.
    """
    singles = [p for p in perts if len(genes_of[p]) == 1]
    doubles = [p for p in perts if len(genes_of[p]) == 2]
    genes = _genes_in(perts, genes_of)
    drawn_genes = {genes[i] for i in rng.choice(len(genes), int(len(singles) * fraction))}

    def n_drawn_of(pert: str) -> int:
        return sum(gene in drawn_genes for gene in genes_of[pert])

    dropped: set[str] = set()
    if split == "single":
        held_out = [p for p in singles if n_drawn_of(p)]
        dropped = {p for p in doubles if n_drawn_of(p)}
    elif split == "no_test":
        drawn = {perts[i] for i in rng.choice(len(perts), int(len(perts) * fraction))}
        held_out = [p for p in perts if p in drawn]
    elif split == "combo_seen2":
        drawn = {doubles[i] for i in rng.choice(len(doubles), int(len(doubles) * fraction))}
        held_out = [p for p in doubles if p in drawn]
    elif split in ("combo_seen0", "combo_seen1"):
        touched = [p for p in doubles if n_drawn_of(p)]
        # A double is "seen k" when k of its genes lie outside the drawn (unseen) genes.
        max_seen = int(split[-1])
        dropped = {p for p in touched if len(genes_of[p]) - n_drawn_of(p) > max_seen}
        held_out = [p for p in singles if n_drawn_of(p)] + [p for p in touched if p not in dropped]
    else:  # pragma: no cover - callers pass only the types above
        raise AssertionError(split)
    excluded = set(held_out) | dropped
    return [p for p in perts if p not in excluded], held_out


def _too_small_error(split: str, seed: int, set_name: str, detail: str) -> ValueError:
    gears_error = {"val": "KeyError: 'val'", "test": "KeyError: 'test'"}.get(set_name)
    also = f" (GEARS itself would fail later with {gears_error})" if gears_error else ""
    return ValueError(
        f"split {split!r} with seed {seed} leaves the {set_name} set without "
        f"perturbations{also}: {detail}"
    )


def _check_sizes(
    split: str,
    seed: int,
    train: list[str],
    val: list[str],
    test: list[str],
    details: dict[str, str],
) -> None:
    # The test draw comes first, so an empty test set is the root cause when several are empty.
    if split != "no_test" and not test:
        raise _too_small_error(split, seed, "test", details["test"])
    if not val:
        raise _too_small_error(split, seed, "val", details["val"])
    if not [c for c in train if c != CONTROL]:
        raise _too_small_error(split, seed, "train", details["train"])


def _derived_subgroups(train: Sequence[str], test: Sequence[str]) -> dict[str, list[str]]:
    """Subgroups for split types GEARS gives none: by genes perturbed in training conditions."""
    train_genes = {gene for c in train for gene in parse_condition(c)}
    subgroups: dict[str, list[str]] = {name: [] for name in SUBGROUP_NAMES}
    for condition in test:
        genes = parse_condition(condition)
        n_seen = sum(gene in train_genes for gene in genes)
        if len(genes) == 1 and n_seen == 0:
            subgroups["unseen_single"].append(condition)
        elif len(genes) == 2:
            subgroups[f"combo_seen{n_seen}"].append(condition)
    return subgroups


def _check_fraction(name: str, value: float, allow_zero: bool) -> None:
    numeric = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(
        value, bool
    )
    if not numeric or not ((value >= 0 if allow_zero else value > 0) and value <= 1):
        interval = "[0, 1]" if allow_zero else "(0, 1]"
        raise ValueError(f"{name} must be a number in {interval}, got {value!r}")


def gears_split(
    conditions: list[str],
    split: str = "simulation",
    seed: int = 1,
    train_gene_set_size: float = 0.75,
    combo_seen2_train_frac: float = 0.75,
    split_path: str | None = None,
    *,
    combo_single_split_test_set_fraction: float = _LIST_SPLIT_FRACTION,
) -> dict:
    """Splits perturbation conditions into train/val/test exactly as GEARS 0.1.2 does.

    Args:
      conditions: condition names, e.g. ``adata.obs['condition']`` (per cell, length
        ``n_cells``) or its distinct values, in order of first appearance; repeats are ignored.
      split: one of ``SPLIT_TYPES`` (see the module docstring).
      seed: the seed GEARS's ``prepare_split`` receives, an int in ``[0, 2**32)``.
      train_gene_set_size: ``simulation*`` only: fraction of genes seen in training.
      combo_seen2_train_frac: ``simulation`` only: fraction of doubles with both genes seen
        that stay in training.
      split_path: ``custom`` only: a GEARS split pickle (``{"train": [...], "val": [...],
        "test": [...]}``) or a JSON file written by :func:`write_split_json`. Pickles can run
        code when loaded: load only files you trust.
      combo_single_split_test_set_fraction: ``single`` and ``combo_seen*`` only: GEARS's
        fraction of the same name, 0.1 by default.

    Returns:
      ``{"train": [...], "val": [...], "test": [...], "subgroups": {"unseen_single": [...],
      "combo_seen0": [...], "combo_seen1": [...], "combo_seen2": [...]}}``; lists of condition
      names, ``"ctrl"`` in train when present in ``conditions``, ``test`` empty for ``no_test``.
      Conditions that GEARS drops (doubles held out by ``single`` and ``combo_seen0``) are in
      no list.

    Raises:
      ValueError: malformed or missing conditions, an unknown split type, bad fractions, a
        split that leaves train, val or (except ``no_test``) test without perturbations, or a
        custom split file that is missing, malformed or names unknown conditions.
    """
    if split not in SPLIT_TYPES:
        raise ValueError(f"unknown split {split!r}; choose one of {', '.join(SPLIT_TYPES)}")
    all_conditions = _checked_conditions(conditions)
    if split == "custom":
        return _custom_split(all_conditions, split_path)
    if split_path is not None:
        raise ValueError(f"split_path is only read for split='custom', not {split!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not (0 <= seed < 2**32):
        raise ValueError(f"seed must be an int in [0, 2**32), got {seed!r}")
    seed = int(seed)
    _check_fraction("train_gene_set_size", train_gene_set_size, allow_zero=False)
    _check_fraction("combo_seen2_train_frac", combo_seen2_train_frac, allow_zero=True)
    _check_fraction(
        "combo_single_split_test_set_fraction",
        combo_single_split_test_set_fraction,
        allow_zero=False,
    )

    perts = [c for c in all_conditions if c != CONTROL]
    if not perts:
        raise ValueError(
            "conditions hold no perturbation (only 'ctrl' or nothing); a split "
            "needs conditions such as 'A+ctrl' or 'A+B'"
        )
    genes_of = {p: parse_condition(p) for p in perts}
    n_genes = len(_genes_in(perts, genes_of))

    if split in ("simulation", "simulation_single"):
        singles_only = split == "simulation_single"
        train, test, subgroups = _simulation_stage(
            perts, genes_of, seed, train_gene_set_size, combo_seen2_train_frac, singles_only
        )
        train, val, _ = _simulation_stage(
            train,
            genes_of,
            seed,
            _SIMULATION_VAL_GENE_FRACTION,
            _SIMULATION_VAL_COMBO_SEEN2_TRAIN_FRAC,
            singles_only,
        )
        if singles_only:
            subgroups = {
                name: subgroups[name] if name == "unseen_single" else [] for name in SUBGROUP_NAMES
            }
        n_seen = int(n_genes * train_gene_set_size)
        grow = "use data with more perturbed genes, or a custom split"
        details = {
            "train": f"of the {n_genes} perturbed gene(s), int({n_genes} * "
            f"{train_gene_set_size}) = {n_seen} are seen in training, and validation "
            f"takes 10% of those; raise train_gene_set_size or {grow}",
            "val": f"validation is drawn from the {len(train) + len(val)} training "
            f"perturbation(s) left by the test split; raise train_gene_set_size or "
            f"{grow}",
            "test": f"int({n_genes} * {train_gene_set_size}) = {n_seen} of {n_genes} gene(s) "
            f"are seen, which leaves nothing to test; lower train_gene_set_size or "
            f"{grow}",
        }
    else:
        rng = np.random.RandomState(seed)
        first_fraction = (
            _LIST_SPLIT_FRACTION if split == "no_test" else combo_single_split_test_set_fraction
        )
        train, held_out = _list_stage(perts, genes_of, split, first_fraction, rng)
        first_train = train
        if split == "no_test":
            val, test = held_out, []
        else:
            test = held_out
            train, val = _list_stage(train, genes_of, split, _LIST_SPLIT_FRACTION, rng)
        subgroups = None
        details = _list_split_details(split, perts, first_train, genes_of, first_fraction)

    # GEARS labels each cell by its condition and then lists each set's conditions in order of
    # first appearance among the cells; ctrl is always labelled train.
    label = {c: "train" for c in train}
    label.update({c: "val" for c in val})
    label.update({c: "test" for c in test})
    label[CONTROL] = "train"
    result: dict[str, Any] = {
        name: [c for c in all_conditions if label.get(c) == name] for name in SET_NAMES
    }
    _check_sizes(split, seed, result["train"], result["val"], result["test"], details)
    if subgroups is None:
        subgroups = _derived_subgroups(result["train"], result["test"])
    result["subgroups"] = {name: [str(c) for c in subgroups[name]] for name in SUBGROUP_NAMES}
    return result


def _min_count(fraction: float) -> int:
    """Smallest n with int(n * fraction) >= 1, i.e. the fewest items a draw needs."""
    n = max(1, int(1 / fraction) - 1)
    while int(n * fraction) < 1:
        n += 1
    return n


def _list_split_details(
    split: str,
    perts: list[str],
    first_train: list[str],
    genes_of: dict[str, tuple[str, ...]],
    first_fraction: float,
) -> dict[str, str]:
    """Why each set of a list-based split can come out empty, and the fix, for error messages.

    Args:
      perts: all perturbations; the first draw (test, or validation for no_test) uses them.
      first_train: what the first draw left; the validation draw uses it.
    """
    if split == "no_test":
        unit, count_in = "perturbation", len
    else:
        kind = 2 if split == "combo_seen2" else 1
        unit = "double" if kind == 2 else "single-gene perturbation"

        def count_in(items: list[str]) -> int:
            return sum(len(genes_of[p]) == kind for p in items)

    def why(pool: int, fraction: float, where: str, fix: str) -> str:
        n_drawn = int(pool * fraction)
        if pool == 0:
            return f"there are no {unit}s {where} to draw from; {fix}"
        if n_drawn == 0:
            return (
                f"the draw takes int({pool} * {fraction}) = 0 of the {pool} {unit}s "
                f"{where}; it needs at least {_min_count(fraction)} of them; {fix}"
            )
        return (
            f"the {n_drawn} gene(s) drawn from the {pool} {unit}s {where} have no "
            f"single-gene perturbation of their own (they occur only in doubles); try "
            f"another seed, or {fix}"
        )

    more = "use more perturbations or a custom split"
    first = why(
        count_in(perts),
        first_fraction,
        "in the data",
        more
        if split == "no_test"
        else "use more perturbations, a larger combo_single_split_test_set_fraction, or a "
        "custom split",
    )
    if split == "no_test":
        return {
            "val": first,
            "test": "",
            "train": "every perturbation was drawn for validation; " + more,
        }
    return {
        "test": first,
        "val": why(count_in(first_train), _LIST_SPLIT_FRACTION, "left in training", more),
        "train": "every perturbation went to test or validation or was dropped with its "
        "test gene; " + more,
    }


def _as_name_list(value: Any, where: str) -> list[str]:
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
        raise ValueError(f"{where} must be a list of condition names, got {type(value).__name__}")
    for item in value:
        if not isinstance(item, str):
            raise ValueError(
                f"{where} holds {item!r} ({type(item).__name__}); expected condition names"
            )
    return [str(item) for item in value]


def _validate_split_dict(raw: Any, source: str, require_subgroups: bool) -> dict:
    """Checks a split mapping's structure; returns it with plain lists and all keys."""
    if not isinstance(raw, dict):
        raise ValueError(
            f"{source} holds a {type(raw).__name__}, expected a dict with keys "
            "'train', 'val', 'test'"
        )
    allowed = set(SET_NAMES) | {"subgroups"}
    unknown = sorted(str(key) for key in raw if key not in allowed)
    if unknown:
        raise ValueError(
            f"{source} has unknown key(s) {', '.join(unknown)}; allowed: "
            f"{', '.join(sorted(allowed))}"
        )
    required = ("train", "val") + (("test", "subgroups") if require_subgroups else ())
    missing = [key for key in required if key not in raw]
    if missing:
        raise ValueError(f"{source} lacks key(s) {', '.join(missing)}")
    result: dict[str, Any] = {
        name: _as_name_list(raw.get(name, []), f"{source}[{name!r}]") for name in SET_NAMES
    }
    owner: dict[str, str] = {}
    for name in SET_NAMES:
        for condition in result[name]:
            if condition in owner and owner[condition] != name:
                raise ValueError(
                    f"{source}: condition {condition!r} is in both "
                    f"{owner[condition]!r} and {name!r}; each condition belongs "
                    "to one set"
                )
            owner[condition] = name
    if "subgroups" in raw:
        groups = raw["subgroups"]
        if not isinstance(groups, dict) or set(groups) != set(SUBGROUP_NAMES):
            keys = sorted(groups) if isinstance(groups, dict) else type(groups).__name__
            raise ValueError(
                f"{source}['subgroups'] must have exactly the keys "
                f"{', '.join(SUBGROUP_NAMES)}, got {keys}"
            )
        test = set(result["test"])
        result["subgroups"] = {}
        for name in SUBGROUP_NAMES:
            names = _as_name_list(groups[name], f"{source}['subgroups'][{name!r}]")
            outside = [c for c in names if c not in test]
            if outside:
                raise ValueError(
                    f"{source}['subgroups'][{name!r}] names condition(s) not in "
                    f"the test set: {_format_names(outside)}"
                )
            result["subgroups"][name] = names
    return result


def _load_split_file(path: str | os.PathLike) -> Any:
    """Reads JSON, or a pickle for .pkl/.pickle files (GEARS saves its splits as pickles)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(
            f"split file {path!r} does not exist; give the path of a GEARS split "
            "pickle or a split JSON written by write_split_json"
        )
    if path.endswith((".pkl", ".pickle")):
        try:
            with open(path, "rb") as f:
                return pickle.load(f)
        except Exception as err:
            raise ValueError(f"split file {path!r} is not a readable pickle: {err}") from err
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(
            f"split file {path!r} is not valid JSON ({err}); GEARS pickles must "
            "end in .pkl or .pickle"
        ) from err


def _custom_split(all_conditions: list[str], split_path: str | None) -> dict:
    if split_path is None:
        raise ValueError(
            "split='custom' needs split_path: a GEARS split pickle or a split "
            "JSON with 'train', 'val' and 'test' lists"
        )
    source = f"custom split file {os.fspath(split_path)!r}"
    result = _validate_split_dict(_load_split_file(split_path), source, require_subgroups=False)
    known = set(all_conditions)
    for name in SET_NAMES:
        unknown = [c for c in result[name] if c not in known]
        if unknown:
            raise ValueError(
                f"{source}: {name!r} names {len(unknown)} condition(s) absent "
                f"from the data: {_format_names(unknown)}; remove them or fix "
                "their spelling (GEARS names: 'A+ctrl', 'A+B', 'ctrl')"
            )
    if not [c for c in result["train"] if c != CONTROL]:
        raise ValueError(f"{source}: 'train' holds no perturbation")
    if not result["val"]:
        raise ValueError(
            f"{source}: 'val' is empty (GEARS would fail with KeyError: 'val'); "
            "move some training perturbations to 'val'"
        )
    if "subgroups" not in result:
        result["subgroups"] = _derived_subgroups(result["train"], result["test"])
    return result


def write_split_json(result: dict, path: str | os.PathLike) -> None:
    """Writes a split atomically (temporary file, then rename), so no half-written file remains.

    Args:
      result: a dict as returned by :func:`gears_split`.
      path: destination ``.json`` path; its folder must exist.

    Raises:
      ValueError: if ``result`` is malformed or the folder does not exist.
    """
    checked = _validate_split_dict(result, "split to write", require_subgroups=True)
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise ValueError(
            f"cannot write {path!r}: folder {folder!r} does not exist; create it first"
        )
    text = json.dumps(checked, indent=1) + "\n"
    with atomic_path(path, suffix=".json") as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())


def read_split_json(path: str | os.PathLike) -> dict:
    """Reads a split written by :func:`write_split_json`.

    Args:
      path: the JSON file.

    Returns:
      The split dict, with keys ``train``, ``val``, ``test`` and ``subgroups``.

    Raises:
      ValueError: if the file is missing, not JSON, or not a split.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"split file {path!r} does not exist")
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"split file {path!r} is not valid JSON: {err}") from err
    return _validate_split_dict(raw, f"split file {path!r}", require_subgroups=True)
