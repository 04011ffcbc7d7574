"""bench/quality.py: its cached runs are reused only for the config they were trained with."""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import quality  # noqa: E402


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


def test_unknown_ablation_is_refused(capsys):
    import pytest

    with pytest.raises(SystemExit):
        quality.main(["--ablations", "no such option", "--datasets", "simulated"])
    assert "unknown ablation" in capsys.readouterr().err


def test_headroom_knows_the_true_direction_of_unseen_singles():
    import headroom
    import numpy as np

    scores = headroom.headroom("simulated", [1])
    true = np.mean(scores[("unseen_single", "coexpression (true direction)")], axis=0)
    typical = np.mean(scores[("unseen_single", "coexpression (training direction)")], axis=0)
    # The simulator's random knock-down / activation of unseen genes is what the typical
    # direction gets wrong; knowing it, the control cells' co-expression predicts well.
    assert true[0] > typical[0] + 0.2 and true[0] > 0.4
    assert {"additive (measured singles)", "network joint response (replicate)"} <= {
        predictor for subgroup, predictor in scores if subgroup == "combo_seen2"}
