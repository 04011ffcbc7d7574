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
