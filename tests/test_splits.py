"""GEARS-compatible splits: parity with cell-gears 0.1.2, files, and every error.

The expected splits in tests/data/gears_splits/expected_splits.json were computed once with
GEARS itself (see make_expected.py beside it), so these tests need no GEARS. When GEARS is
importable, ``test_parity_with_installed_gears`` also checks fresh random lists against it.
"""

import importlib.util
import json
import os
import pickle

import numpy as np
import pytest

from scformer_jax.data.splits import (
    SUBGROUP_NAMES,
    gears_split,
    parse_condition,
    read_split_json,
    write_split_json,
)

DATA_DIR = os.path.join(os.path.dirname(__file__), "data", "gears_splits")
with open(os.path.join(DATA_DIR, "expected_splits.json"), encoding="utf-8") as _f:
    EXPECTED = json.load(_f)
CASES = EXPECTED["cases"]


def _case_id(case):
    return (
        f"{case['conditions']}-{case['split']}-seed{case['seed']}"
        f"-{case['train_gene_set_size']}-{case['combo_seen2_train_frac']}"
    )


def _gears_failure(case):
    """Which set GEARS leaves unusable, or None when its split is usable."""
    outcome = case["gears"]
    if "exception" in outcome:
        return outcome["exception"]
    sets = outcome["sets"]
    if case["split"] != "no_test" and "test" not in sets:
        return "test"
    if "val" not in sets:
        return "val"
    if not [c for c in sets.get("train", []) if c != "ctrl"]:
        return "train"
    return None


def _run(case, conditions=None):
    if conditions is None:
        conditions = EXPECTED["condition_lists"][case["conditions"]]
    return gears_split(
        conditions,
        case["split"],
        seed=case["seed"],
        train_gene_set_size=case["train_gene_set_size"],
        combo_seen2_train_frac=case["combo_seen2_train_frac"],
    )


def _genes(condition):
    return [g for g in condition.split("+") if g != "ctrl"]


def _expected_derived_subgroups(train, test):
    """Independent statement of the rule for split types GEARS gives no subgroups."""
    train_genes = set()
    for condition in train:
        train_genes.update(_genes(condition))
    groups = {name: [] for name in SUBGROUP_NAMES}
    for condition in test:
        genes = _genes(condition)
        n_seen = len([g for g in genes if g in train_genes])
        if len(genes) == 2:
            groups[f"combo_seen{n_seen}"].append(condition)
        elif n_seen == 0:
            groups["unseen_single"].append(condition)
    return groups


def test_expectations_cover_every_split_type_and_failure():
    usable = {c["split"] for c in CASES if _gears_failure(c) is None}
    assert usable == {
        "simulation",
        "simulation_single",
        "single",
        "combo_seen0",
        "combo_seen1",
        "combo_seen2",
        "no_test",
    }
    failures = {_gears_failure(c) for c in CASES} - {None}
    assert {"val", "test", "train", "AssertionError"} <= failures


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_parity_with_stored_gears_splits(case):
    failure = _gears_failure(case)
    if failure is not None:
        expected_words = {
            "AssertionError": "handles single-gene perturbations only",
            "train": "train set",
            "val": "val set",
            "test": "test set",
        }[failure]
        with pytest.raises(ValueError, match=expected_words):
            _run(case)
        return
    result = _run(case)
    sets = case["gears"]["sets"]
    for name in ("train", "val", "test"):
        assert result[name] == sets.get(name, []), name
    gears_groups = case["gears"]["subgroups"]
    if gears_groups is not None:
        for name in SUBGROUP_NAMES:
            assert result["subgroups"][name] == gears_groups.get(name, []), name
    else:
        assert result["subgroups"] == _expected_derived_subgroups(result["train"], result["test"])


@pytest.mark.parametrize("split", ["simulation", "single", "combo_seen0", "combo_seen1"])
def test_sets_do_not_depend_on_condition_order(split):
    # These types draw from sorted gene lists, so only the listing order follows the input;
    # no_test and combo_seen2 draw by position and legitimately differ.
    conditions = EXPECTED["condition_lists"]["norman_like"]
    shuffled = [conditions[i] for i in np.random.RandomState(3).permutation(len(conditions))]
    a, b = gears_split(conditions, split), gears_split(shuffled, split)
    for name in ("train", "val", "test"):
        assert sorted(a[name]) == sorted(b[name])
    first_seen = list(dict.fromkeys(shuffled))
    assert b["test"] == [c for c in first_seen if c in set(b["test"])]


def test_simulation_partitions_all_conditions_and_keeps_ctrl_in_train():
    conditions = EXPECTED["condition_lists"]["norman_like"]
    result = gears_split(conditions, "simulation", seed=4)
    everything = result["train"] + result["val"] + result["test"]
    assert len(everything) == len(set(everything))
    assert set(everything) == set(conditions)
    assert "ctrl" in result["train"]
    grouped = [c for name in SUBGROUP_NAMES for c in result["subgroups"][name]]
    assert sorted(grouped) == sorted(result["test"])
    # Subgroup definitions, checked from the genes of training singles.
    seen = {_genes(c)[0] for c in result["train"] + result["val"] if c.endswith("+ctrl")}
    for condition in result["subgroups"]["unseen_single"]:
        assert _genes(condition)[0] not in seen
    for name in ("combo_seen0", "combo_seen1"):
        for condition in result["subgroups"][name]:
            assert len([g for g in _genes(condition) if g in seen]) <= int(name[-1])


def test_parse_condition_forms():
    assert parse_condition("ctrl") == ()
    assert parse_condition("KLF1+ctrl") == ("KLF1",)
    assert parse_condition("ctrl+KLF1") == ("KLF1",)
    assert parse_condition("KLF1+MAP2K6") == ("KLF1", "MAP2K6")


@pytest.mark.parametrize(
    "bad, words",
    [
        ("A+B+C", "2 '\\+' signs"),
        ("A", "0 '\\+' signs"),
        ("+ctrl", "empty or space-padded"),
        ("A +ctrl", "empty or space-padded"),
        ("ctrl+ctrl", "perturbs no gene"),
        ("ctrlX+ctrl", "contains 'ctrl'"),
    ],
)
def test_malformed_condition_is_named(bad, words):
    with pytest.raises(ValueError, match=words) as info:
        gears_split(["ctrl", "A+ctrl", bad], "simulation")
    assert repr(bad) in str(info.value)


def test_bad_arguments_are_named():
    conditions = EXPECTED["condition_lists"]["norman_like"]
    with pytest.raises(ValueError, match="conditions\\[1\\] is nan"):
        gears_split(["ctrl", float("nan")])
    with pytest.raises(ValueError, match="not a single string"):
        gears_split("A+ctrl")
    with pytest.raises(ValueError, match="no perturbation"):
        gears_split(["ctrl", "ctrl"])
    with pytest.raises(ValueError, match="unknown split 'combo'.*simulation"):
        gears_split(conditions, "combo")
    with pytest.raises(ValueError, match="seed must be an int"):
        gears_split(conditions, seed=-1)
    with pytest.raises(ValueError, match="seed must be an int"):
        gears_split(conditions, seed=1.5)
    with pytest.raises(ValueError, match="train_gene_set_size must be a number in \\(0, 1\\]"):
        gears_split(conditions, train_gene_set_size=0.0)
    with pytest.raises(ValueError, match="combo_seen2_train_frac"):
        gears_split(conditions, combo_seen2_train_frac=1.5)
    with pytest.raises(ValueError, match="split_path is only read for split='custom'"):
        gears_split(conditions, "simulation", split_path="x.json")


def test_too_small_errors_say_what_and_how():
    tiny = EXPECTED["condition_lists"]["tiny"]
    with pytest.raises(ValueError) as info:
        gears_split(tiny, "single", seed=1)
    message = str(info.value)
    # The test draw needs int(6 * 0.1) >= 1 singles: says how many there are and how to fix.
    assert "test set" in message and "KeyError: 'test'" in message
    assert "int(6 * 0.1)" in message and "at least 10" in message
    assert "custom split" in message
    with pytest.raises(
        ValueError,
        match="val set.*KeyError: 'val'.*int\\(2 \\* 0.1\\) = 0 "
        "of the 2 perturbations.*at least 10",
    ):
        gears_split(["ctrl", "A+ctrl", "B+ctrl"], "no_test")
    with pytest.raises(
        ValueError, match="train set.*int\\(2 \\* 0.75\\) = 1.*raise train_gene_set_size"
    ):
        gears_split(["ctrl", "A+ctrl", "B+ctrl"], "simulation")
    with pytest.raises(ValueError, match="test set.*lower train_gene_set_size"):
        gears_split(EXPECTED["condition_lists"]["adamson_like"], train_gene_set_size=1.0)
    with pytest.raises(ValueError, match="no doubles in the data"):
        gears_split(EXPECTED["condition_lists"]["adamson_like"], "combo_seen2")
    with pytest.raises(
        ValueError,
        match="val set.*1 gene\\(s\\) drawn from the 13 single-gene "
        "perturbations left in training have no single",
    ):
        gears_split(EXPECTED["condition_lists"]["mixed_spelling"], "single", seed=2)
    with pytest.raises(
        ValueError, match="simulation_single.*3 double.*'A\\+B'.*use split='simulation'"
    ):
        gears_split(tiny, "simulation_single")


def test_smaller_test_fraction_changes_only_list_splits():
    conditions = EXPECTED["condition_lists"]["adamson_like"]
    default = gears_split(conditions, "single", seed=1)
    larger = gears_split(conditions, "single", seed=1, combo_single_split_test_set_fraction=0.3)
    assert len(larger["test"]) > len(default["test"])


def _usable_case(split):
    return next(
        c
        for c in CASES
        if c["split"] == split and _gears_failure(c) is None and c["conditions"] == "norman_like"
    )


def test_custom_split_from_gears_pickle(tmp_path):
    case = _usable_case("simulation")
    path = tmp_path / "norman_simulation_1_0.75.pkl"
    with open(path, "wb") as f:
        pickle.dump(case["gears"]["sets"], f)
    conditions = EXPECTED["condition_lists"]["norman_like"]
    result = gears_split(conditions, "custom", split_path=str(path))
    for name in ("train", "val", "test"):
        assert result[name] == case["gears"]["sets"][name]
    # GEARS stores no subgroups with a custom split; ours follow the seen-gene rule.
    assert result["subgroups"] == _expected_derived_subgroups(result["train"], result["test"])


def test_json_round_trip_and_custom_from_json(tmp_path):
    conditions = EXPECTED["condition_lists"]["norman_like"]
    result = gears_split(conditions, "simulation", seed=2)
    path = tmp_path / "split.json"
    write_split_json(result, path)
    assert read_split_json(path) == result
    assert gears_split(conditions, "custom", split_path=str(path)) == result
    assert [p.name for p in tmp_path.iterdir()] == ["split.json"]


def test_custom_split_errors(tmp_path):
    conditions = EXPECTED["condition_lists"]["norman_like"]
    good = gears_split(conditions, "simulation", seed=1)

    def write(name, content):
        path = tmp_path / name
        path.write_text(json.dumps(content))
        return str(path)

    with pytest.raises(ValueError, match="needs split_path"):
        gears_split(conditions, "custom")
    with pytest.raises(ValueError, match="does not exist"):
        gears_split(conditions, "custom", split_path=str(tmp_path / "missing.pkl"))
    unknown = {
        "train": good["train"],
        "val": good["val"],
        "test": good["test"] + ["NOPE+ctrl", "X+Y"],
    }
    with pytest.raises(
        ValueError,
        match="'test' names 2 condition\\(s\\) absent from the data: 'NOPE\\+ctrl', 'X\\+Y'",
    ):
        gears_split(conditions, "custom", split_path=write("unknown.json", unknown))
    both = {"train": good["train"], "val": good["val"] + [good["train"][1]], "test": []}
    with pytest.raises(ValueError, match="is in both 'train' and 'val'"):
        gears_split(conditions, "custom", split_path=write("both.json", both))
    no_val = {"train": good["train"], "val": [], "test": good["test"]}
    with pytest.raises(ValueError, match="'val' is empty"):
        gears_split(conditions, "custom", split_path=write("noval.json", no_val))
    with pytest.raises(ValueError, match="unknown key\\(s\\) validation"):
        gears_split(
            conditions, "custom", split_path=write("key.json", {"train": [], "validation": []})
        )
    with pytest.raises(ValueError, match="lacks key\\(s\\) val"):
        gears_split(conditions, "custom", split_path=write("lack.json", {"train": []}))
    with pytest.raises(ValueError, match="expected a dict"):
        gears_split(conditions, "custom", split_path=write("list.json", [1, 2]))
    bad_group = dict(good, subgroups=dict(good["subgroups"], unseen_single=[good["train"][1]]))
    with pytest.raises(ValueError, match="not in the test set"):
        gears_split(conditions, "custom", split_path=write("group.json", bad_group))
    text_path = tmp_path / "split.pkl"
    text_path.write_text("not a pickle")
    with pytest.raises(ValueError, match="not a readable pickle"):
        gears_split(conditions, "custom", split_path=str(text_path))
    json_path = tmp_path / "split.json"
    json_path.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        gears_split(conditions, "custom", split_path=str(json_path))


def test_write_split_json_leaves_nothing_half_written(tmp_path):
    conditions = EXPECTED["condition_lists"]["norman_like"]
    result = gears_split(conditions, "simulation", seed=1)
    path = tmp_path / "split.json"
    write_split_json(result, path)
    before = path.read_text()
    broken = dict(result, subgroups={"unseen_single": []})
    with pytest.raises(ValueError, match="subgroups.*must have exactly the keys"):
        write_split_json(broken, path)
    with pytest.raises(ValueError, match="holds 3"):
        write_split_json(dict(result, val=[3]), path)
    assert path.read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["split.json"]
    with pytest.raises(ValueError, match="folder .* does not exist"):
        write_split_json(result, tmp_path / "missing" / "split.json")
    with pytest.raises(ValueError, match="lacks key\\(s\\) subgroups"):
        (tmp_path / "old.json").write_text(
            json.dumps({k: result[k] for k in ("train", "val", "test")})
        )
        read_split_json(tmp_path / "old.json")


def _load_make_expected():
    spec = importlib.util.spec_from_file_location(
        "make_expected", os.path.join(DATA_DIR, "make_expected.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_parity_with_installed_gears():
    """Fresh random condition lists against GEARS itself, when cell-gears is installed."""
    pytest.importorskip("gears.pertdata")
    make_expected = _load_make_expected()
    rng = np.random.RandomState(7)
    for trial in range(4):
        genes = [f"G{i}x{rng.randint(100)}" for i in range(rng.randint(12, 30))]
        singles = [f"{g}+ctrl" for g in genes if rng.rand() < 0.85]
        doubles = sorted({"+".join(rng.choice(genes, 2, replace=False)) for _ in range(15)})
        unique = ["ctrl"] + singles + doubles
        cells = [unique[i] for i in rng.permutation(len(unique) * 2) % len(unique)]
        for split in ("simulation", "single", "combo_seen1", "combo_seen2", "no_test"):
            seed = int(rng.randint(0, 1000))
            case = {
                "split": split,
                "seed": seed,
                "train_gene_set_size": 0.75,
                "combo_seen2_train_frac": 0.75,
                "gears": make_expected.run_gears(cells, split, seed),
            }
            failure = _gears_failure(case)
            if failure is not None:
                with pytest.raises(ValueError):
                    _run(case, cells)
                continue
            result = _run(case, cells)
            for name in ("train", "val", "test"):
                assert result[name] == case["gears"]["sets"].get(name, []), (trial, split)
            if case["gears"]["subgroups"] is not None:
                assert result["subgroups"] == case["gears"]["subgroups"]
