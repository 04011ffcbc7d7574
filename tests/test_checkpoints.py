"""Checkpoints keep the latest and the best by the validation metric, in either direction."""

import numpy as np
import pytest

from scformer_jax.checkpoints import Checkpoints


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
