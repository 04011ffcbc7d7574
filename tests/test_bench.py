"""The benchmark scripts run: --help, tiny smoke runs, their tables and FLOP counts."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import headroom, quality  # noqa: E402


@pytest.mark.parametrize(
    "script",
    [
        "run.py",
        "jax_bench.py",
        "data_bench.py",
        "gpu_bench.py",
        "quality.py",
        "headroom.py",
        "diagnose.py",
    ],
)
def test_bench_help(script):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / script), "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "usage" in proc.stdout


def test_gpu_sh_is_valid_bash():
    proc = subprocess.run(
        ["bash", "-n", str(ROOT / "bench" / "gpu.sh")], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr


def _json_line(text):
    return json.loads(text.strip().splitlines()[-1])


@pytest.mark.parametrize("mode,attention", [("train", "chunked"), ("eval", "full")])
def test_jax_bench_smoke_no_recompilation(capsys, mode, attention):
    from bench import jax_bench

    assert (
        jax_bench.main(
            [
                "--seq-len",
                "32",
                "--batch",
                "4",
                "--steps",
                "1",
                "--extra-batches",
                "2",
                "--mode",
                mode,
                "--attention",
                attention,
                "--block-size",
                "8",
                "--n-genes",
                "50",
                "--json",
            ]
        )
        == 0
    )
    record = _json_line(capsys.readouterr().out)
    assert record["mode"] == mode and record["attention"] == attention
    assert record["tokens"] == 33 and record["calls"] == 4
    # Four calls on two different batches: traced and compiled once.
    assert record["traces"] == 1 and record["compiles"] == 1
    assert record["cells_per_s"] > 0 and record["peak_rss_gb"] > 0
    assert 0 < record["fraction_of_peak"] < 1
    if mode == "train":
        assert np.isfinite(record["loss"])


def test_model_flops_counts_matmuls():
    from bench.jax_bench import model_flops

    # One layer, d=2, d_hid=3, L=5, batch 1, forward: per token 8*4 + 4*6 + 4*5*2 = 96 per
    # layer, plus 2*4 + 4*2 = 16 outside the layers.
    assert model_flops(batch=1, tokens=5, embsize=2, d_hid=3, nlayers=1, train=False) == 5 * 112
    assert model_flops(batch=2, tokens=5, embsize=2, d_hid=3, nlayers=1, train=True) == 3 * 1120


def test_gpu_bench_cpu_smoke(capsys):
    from bench import gpu_bench

    assert gpu_bench.main(["--cpu-smoke", "--json"]) == 0
    record = _json_line(capsys.readouterr().out)
    assert record["cpu_smoke"] and record["traces"] == 1 and np.isfinite(record["loss"])
    assert record["ms_per_step"] > 0 and record["dtype"] == "bfloat16"


def test_data_bench_stages_on_tiny_data(tmp_path):
    from bench import data_bench

    path = data_bench.dataset_path(tmp_path, "tiny", 0)
    data_bench.generate(path, "tiny", 0)
    record = data_bench.measure(path, batches=2, batch_size=4, max_seq_len=32)
    assert record["n_genes"] == 40 and record["n_paired"] == record["n_train_cells"] > 0
    assert record["batches_timed"] == 2 and record["batch_shape"][0] == 4
    assert record["total_s"] >= record["load_s"] > 0


def test_run_table_and_summary():
    from bench import run

    def rec(cells, peak, **extra):
        return {
            "cells_per_s": cells,
            "sec_per_step": 32 / cells,
            "peak_rss_gb": peak,
            "batch": 32,
            "compile_s": 4.0,
            "traces": 1,
            "compiles": 1,
            "fraction_of_peak": 0.3,
            **extra,
        }

    rows = [
        {
            "case": "train-512",
            "seq_len": 512,
            "mode": "train",
            "ours": rec(40.0, 1.1),
            "ref": rec(10.0, 2.6),
        },
        {
            "case": "train-1536",
            "seq_len": 1536,
            "mode": "train",
            "ours": rec(6.0, 2.0),
            "ref": rec(1.0, 17.0),
        },
        {
            "case": "train-5045",
            "seq_len": 5045,
            "mode": "train",
            "ours": rec(0.8, 4.5),
            "ref": {"error": "out of memory", "peak_rss_gb": 20.0},
        },
    ]
    table = "\n".join(run.format_table(rows, {"total_s": 1.8, "peak_rss_gb": 1.7}))
    assert "4.0x" in table and "6.0x" in table and "OOM" in table and "1.8 s" in table
    line = run.summary_line(rows)
    assert line.startswith("Train step at sequence 1536") and "6.0x" in line
    assert "5045 the original ran out of memory" in line


# bench/quality.py and bench/headroom.py


def test_a_cached_run_is_reused_only_for_its_own_config(tmp_path, capsys):
    config = ROOT / "tests" / "configs" / "tiny.yaml"
    workdir = tmp_path / "runs" / "tiny" / "recommended" / "seed1"
    first = quality.run_one(config, ["train.epochs=1"], workdir, fresh=False)
    stamp = (workdir / "eval" / "metrics.json").stat().st_mtime_ns
    assert quality.run_one(config, ["train.epochs=1"], workdir, fresh=False) == first
    assert (workdir / "eval" / "metrics.json").stat().st_mtime_ns == stamp
    capsys.readouterr()
    quality.run_one(config, ["train.epochs=1", "optim.lr=1e-3"], workdir, fresh=False)
    assert "not the one asked for" in capsys.readouterr().out
    assert (workdir / "eval" / "metrics.json").stat().st_mtime_ns != stamp


def test_win_counts_compare_with_the_chosen_baselines_and_subgroups():
    table = {}
    for row, values in {
        "recommended": (0.5, 0.3),
        "additive": (0.4, 0.4),
        "coexpression": (0.6, 0.2),
    }.items():
        for subgroup, value in zip(("overall", "combo_seen0"), values):
            for metric in quality.WIN_METRICS:
                table[(row, subgroup, metric)] = (value, 0.0, 1)
    won, total, lost = quality.wins(table)
    assert (won, total) == (0, 4)
    assert any("coexpression" in cell for cell in lost) and any("additive" in c for c in lost)
    # Against the simple baselines on the scored subgroups (combo_seen0 left out): all won.
    assert quality.wins(
        table, baselines=quality.SIMPLE_BASELINES, subgroups=quality.SCORED_SUBGROUPS
    )[:2] == (2, 2)
    # Level, to float rounding (the same prediction), is not a win; half a thousandth is.
    for metric in quality.WIN_METRICS:
        table[("recommended", "overall", metric)] = (0.4 + 1e-7, 0.0, 1)
    simple = dict(baselines=quality.SIMPLE_BASELINES, subgroups=quality.SCORED_SUBGROUPS)
    won, total, lost = quality.wins(table, **simple)
    assert (won, total) == (0, 2) and "overall/pearson_delta (0.400 vs additive 0.400)" in lost
    for metric in quality.WIN_METRICS:
        table[("recommended", "overall", metric)] = (0.4 + quality.WIN_MARGIN, 0.0, 1)
    assert quality.wins(table, **simple)[:2] == (2, 2)


def test_paired_comparison_takes_the_strongest_baseline_per_cell():
    import pandas as pd

    def frame(offsets):
        rows = []
        for i, off in enumerate(offsets):
            cond, sub = f"G{i}+ctrl", "unseen_single"
            for method, value in {
                "model": 0.5 + off,
                "additive": 0.5,
                "train_mean": 0.1,
                "coexpression": 0.9,  # not a simple baseline: never the comparison
            }.items():
                rows.append(
                    {"condition": cond, "method": method, "subgroup": sub}
                    | {m: value for m in quality.WIN_METRICS}
                )
        return pd.DataFrame(rows)

    # Two split seeds; the model is ahead of additive on 3 of 4 perturbations.
    result = quality.paired([frame([0.2, 0.1]), frame([0.1, -0.2])], n_boot=500)
    base, mean, low, high, won, n = result[("unseen_single", "pearson_delta")]
    assert base == "additive" and (won, n) == (3, 4)
    assert mean == pytest.approx(0.05) and low <= mean <= high and low < 0 < high
    assert result[("overall", "pearson_de_delta")][1:2] == (pytest.approx(0.05),)
    assert ("combo_seen2", "pearson_delta") not in result  # no such perturbation
    text = quality.format_paired("x", result)
    assert "| unseen_single | pearson_delta | additive | +0.050 |" in text and "3/4" in text


def test_train_seeds_give_every_split_seed_one_run_per_train_seed(tmp_path, monkeypatch, capsys):
    import pandas as pd

    trained = []

    def fake_run_one(config_path, overrides, workdir, fresh):
        # The model's score is the train seed's number / 100; every baseline scores 0.1.
        train_seed = next((int(o.split("=")[1]) for o in overrides if "train.seed" in o), 42)
        trained.append((workdir.relative_to(tmp_path / "runs").as_posix(), overrides))
        score = {m: train_seed / 100 for m in quality.WIN_METRICS}
        (workdir / "eval").mkdir(parents=True)
        pd.DataFrame(
            [
                {"condition": "G1+ctrl", "method": method, "subgroup": "unseen_single"}
                | {m: (v if method == "model" else 0.1) for m, v in score.items()}
                for method in ("model", *quality.SIMPLE_BASELINES)
            ]
        ).to_csv(workdir / "eval" / quality.PER_PERTURBATION)
        result = {"overall": score, "per_subgroup": {"unseen_single": score}}
        base = {"overall": {m: 0.1 for m in score}, "per_subgroup": {}}
        return {"model": result, "baselines": {b: base for b in quality.BASELINES}}

    monkeypatch.setattr(quality, "run_one", fake_run_one)
    args = ["--datasets", "simulated", "--configs", "recommended", "--out", str(tmp_path)]
    assert quality.main([*args, "--seeds", "1", "2", "--train-seeds", "40", "50"]) == 0
    out = capsys.readouterr().out
    folders = [f for f, _ in trained]
    assert folders == [f"simulated/recommended/seed{s}-train{t}" for s in (1, 2) for t in (40, 50)]
    assert all(f"train.seed={f[-2:]}" in o and f"data.split_seed={f[-9]}" in o for f, o in trained)
    # The table averages the four runs: (0.40 + 0.50) / 2 over both split seeds.
    assert "split seeds [1, 2] x train seeds [40, 50]" in out
    assert "| recommended | 0.450 +- 0.058 |" in out
    assert "| unseen_single | pearson_delta | control | +0.350 |" in out and "4/4" in out
    # Without --train-seeds: the config's own seed, one run (and folder) per split seed.
    trained.clear()
    assert quality.main([*args, "--seeds", "3"]) == 0
    assert trained == [("simulated/recommended/seed3", trained[0][1])]
    assert not any("train.seed" in o for o in trained[0][1])


def test_baseline_rows_come_from_the_recommended_runs():
    def metrics(model, shrunk):
        result = {"overall": {m: model for m in quality.WIN_METRICS}, "per_subgroup": {}}
        base = {
            b: {"overall": {m: 0.1 for m in quality.WIN_METRICS}, "per_subgroup": {}}
            for b in quality.BASELINES
        }
        base["additive_shrunk"] = {
            "overall": {m: shrunk for m in quality.WIN_METRICS},
            "per_subgroup": {},
        }
        return {"model": result, "baselines": base}

    # The seed config shrinks under the normal prior (0.2), the recommended one adaptively
    # (0.3): the additive_shrunk row is the recommended config's, whatever the order.
    table = quality.summarize({"seed": [metrics(0.1, 0.2)], "recommended": [metrics(0.4, 0.3)]})
    assert table[("additive_shrunk", "overall", "pearson_delta")][0] == pytest.approx(0.3)
    assert table[("seed", "overall", "pearson_delta")][0] == pytest.approx(0.1)
    only = quality.summarize({"seed": [metrics(0.1, 0.2)]})
    assert only[("additive_shrunk", "overall", "pearson_delta")][0] == pytest.approx(0.2)


def test_unknown_ablation_is_refused(capsys):
    with pytest.raises(SystemExit):
        quality.main(["--ablations", "no such option", "--datasets", "simulated"])
    assert "unknown ablation" in capsys.readouterr().err


def test_headroom_knows_the_true_direction_of_unseen_singles():
    scores = headroom.headroom("simulated", [1], truth_cells=500)
    true = np.mean(scores[("unseen_single", "coexpression (true direction)")], axis=0)
    typical = np.mean(scores[("unseen_single", "coexpression (training direction)")], axis=0)
    # The simulator's random knock-down / activation of unseen genes is what the typical
    # direction gets wrong; knowing it, the control cells' co-expression predicts well.
    assert true[0] > typical[0] + 0.2 and true[0] > 0.4
    assert {
        "additive (measured singles)",
        "additive (measured singles, shrunk)",
        "network joint response (true, every double additive)",
        "sum of the true singles",
        "true profile (perfect predictor)",
    } <= {predictor for subgroup, predictor in scores if subgroup == "combo_seen2"}
    # The truths are the same network's expectations: a perfect predictor beats every
    # estimate from the measured cells, and the sum of the true singles beats the sum of the
    # measured ones (whose sampling noise is the room above `additive`).
    for subgroup in ("unseen_single", "combo_seen2"):
        rows = {p: np.mean(v, axis=0) for (g, p), v in scores.items() if g == subgroup}
        perfect = rows.pop("true profile (perfect predictor)")
        assert all(perfect[0] > other[0] for other in rows.values()), rows
    combo = {p: np.mean(v, axis=0) for (g, p), v in scores.items() if g == "combo_seen2"}
    assert combo["sum of the true singles"][0] > combo["additive (measured singles)"][0] + 0.05


def test_data_bench_cases_on_tiny_data(tmp_path):
    import argparse

    from bench import data_bench

    path = data_bench.dataset_path(tmp_path, "tiny", 0)
    args = argparse.Namespace(
        preset="tiny",
        seed=0,
        path=str(path),
        batch_size=8,
        eval_batch_size=8,
        cache_mb=1,
        batches=3,
        steps=1,
    )
    generated = data_bench.run_case("generate", args)
    assert generated["cached"] is False and path.exists()
    loaded = data_bench.run_case("load", args)
    assert loaded["n_genes"] == 40 and loaded["n_paired"] == loaded["n_train_cells"] > 0
    assert loaded["peak_rss_gb"] > 0 and loaded["wall_s"] > 0
    batches = data_bench.run_case("batches", args)
    assert batches["batch_shape"][0] == 8 and batches["batches_per_s"] > 0
    assert batches["train_step_s"] > 0
    assert batches["batches_per_train_step"] == pytest.approx(
        batches["batches_per_s"] * batches["train_step_s"]
    )


def test_data_bench_counts_cases_on_tiny_data(tmp_path):
    import argparse

    import h5py

    from bench import data_bench

    raw, prepared = data_bench.counts_paths(tmp_path, "tiny", 0)
    args = argparse.Namespace(
        preset="tiny",
        seed=0,
        counts=True,
        raw_path=str(raw),
        path=str(prepared),
        batch_size=8,
        eval_batch_size=8,
        cache_mb=1,
    )
    generated = data_bench.run_case("generate", args)
    assert generated["cached"] is False and raw.exists() and not prepared.exists()
    with h5py.File(raw, "r") as f:
        assert "rank_genes_groups_cov_all" not in f["uns"]
    made = data_bench.run_case("prepare", args)
    assert made["prepare_s"] > 0 and made["file_gb"] > 0 and prepared.exists()
    loaded = data_bench.run_case("load", args)
    assert loaded["n_genes"] == 40 and loaded["n_paired"] == loaded["n_train_cells"] > 0
