"""Checkpoints keep the latest and the best by the validation metric, in either direction."""

import numpy as np
import pytest

from scformer_jax.checkpoints import Checkpoints, restore_params


@pytest.mark.parametrize(
    "mode,values,best", [("max", [0.5, 0.9, 0.2], 2), ("min", [0.5, 0.2, 0.9], 2)]
)
def test_best_and_latest_are_kept(tmp_path, mode, values, best):
    ckpts = Checkpoints(tmp_path / "ckpt", best_mode=mode, keep_latest=1)
    for step, value in enumerate(values, start=1):
        ckpts.save(step, {"w": np.full(3, step, np.float32)}, {"step": step}, metric=value)
    ckpts.wait()
    assert ckpts.best_step() == best
    assert set(ckpts.steps()) == {best, len(values)}
    step, state, meta = ckpts.restore({"w": np.zeros(3, np.float32)}, step=best)
    assert step == best and meta["step"] == best
    np.testing.assert_array_equal(state["w"], np.full(3, best))
    latest = ckpts.restore({"w": np.zeros(3, np.float32)})
    assert latest[0] == len(values)
    ckpts.close()


def test_no_checkpoint_restores_to_none(tmp_path):
    ckpts = Checkpoints(tmp_path / "empty")
    assert ckpts.restore({"w": np.zeros(2)}) is None
    ckpts.close()


def test_an_unreadable_best_checkpoint_is_a_named_error_not_a_silent_substitute(tmp_path):
    directory = tmp_path / "ckpt"
    ckpts = Checkpoints(directory, best_mode="max", keep_latest=1)
    for step, value in [(1, 0.9), (2, 0.1)]:
        ckpts.save(step, {"params": {"w": np.full(3, step, np.float32)}}, {}, metric=value)
    ckpts.wait()
    ckpts.close()
    files = [p for p in (directory / "1" / "state").rglob("*") if p.is_file()]
    largest = max(files, key=lambda p: p.stat().st_size)
    largest.write_bytes(largest.read_bytes()[: largest.stat().st_size // 2])

    with pytest.warns(UserWarning, match="unreadable checkpoint step 1"):
        with pytest.raises(FileNotFoundError, match=r"best checkpoint .*\(step 1\) is unreadable"):
            restore_params(directory, which="best")
    step, params, _ = restore_params(directory, which="latest")
    assert step == 2
    np.testing.assert_array_equal(params["w"], np.full(3, 2))
