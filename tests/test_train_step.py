"""The train step: data-parallel equivalence, objective switches, no recompilation."""

import dataclasses
import functools
import time

import chex
import jax
import numpy as np
import pytest

from scformer_jax import parallel
from scformer_jax.config import ObjectiveConfig, OptimConfig
from scformer_jax.model import TransformerGenerator
from scformer_jax.training import create_train_state, train_step
from tests.tiny_model import TRAIN_STEP_MODEL, random_batch

MODEL = TRAIN_STEP_MODEL


def fresh_state(model_config=MODEL, lr=1e-4):
    # Adam's first step is lr * g / (|g| + eps): for gradients that are exactly 0 in exact
    # arithmetic (e.g. the attention key bias) it scales float noise up to ~lr, so the
    # equivalence tests use the seed's lr (1e-4) to stay within 1e-5.
    state, _ = create_train_state(model_config, OptimConfig(lr=lr), 10, jax.random.PRNGKey(0))
    return state


def single_device_step(state, batch, rng, objective, model_config=MODEL):
    fn = jax.jit(
        functools.partial(
            train_step,
            model=TransformerGenerator(model_config),
            objective=objective,
            axis_name=None,
        )
    )
    return fn(state, jax.tree_util.tree_map(np.asarray, batch), rng)


def multi_device_step(state, batch, rng, objective, model_config=MODEL):
    p_step = parallel.pmap(
        functools.partial(train_step, model=TransformerGenerator(model_config), objective=objective)
    )
    new_state, metrics = p_step(
        parallel.replicate(state), parallel.shard_batch(batch), parallel.replicate(rng)
    )
    return parallel.unreplicate(new_state), jax.tree_util.tree_map(lambda m: m[0], metrics)


def assert_trees_close(a, b, tol=1e-5):
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=tol, atol=tol)


@pytest.mark.parametrize(
    "objective",
    [
        ObjectiveConfig(),
        ObjectiveConfig(cls=True, mvc=True, ecs=True, cce=True),
    ],
    ids=["mse", "all"],
)
def test_two_devices_equal_one_device(objective):
    assert jax.local_device_count() == 2, "tests/conftest.py forces two CPU devices"
    batch = random_batch(n_pad_rows=2)
    state = fresh_state()
    rng = jax.random.PRNGKey(3)
    one, m_one = single_device_step(state, batch, rng, objective)
    two, m_two = multi_device_step(state, batch, rng, objective)
    assert_trees_close(one.params, two.params)
    for key in m_one:
        np.testing.assert_allclose(m_one[key], m_two[key], rtol=1e-5, atol=1e-6)


def test_padding_rows_do_not_change_the_update():
    objective = ObjectiveConfig(cls=True, ecs=True)
    state = fresh_state()
    rng = jax.random.PRNGKey(0)
    real = random_batch(batch=6, seed=1)
    padded = random_batch(batch=8, seed=1, n_pad_rows=2)
    # The first 6 rows of `padded` are the same cells as `real` (same seed, same draws).
    padded = jax.tree_util.tree_map(
        lambda p, r: np.concatenate([np.asarray(r), np.asarray(p)[6:]]), padded, real
    )
    padded = dataclasses.replace(padded, cell_weights=np.array([1] * 6 + [0] * 2, np.float32))
    a, _ = single_device_step(state, real, rng, objective)
    b, _ = single_device_step(state, padded, rng, objective)
    assert_trees_close(a.params, b.params)


@pytest.mark.parametrize("switch", ["mse", "cls", "cce", "mvc", "ecs"])
def test_each_objective_lowers_its_loss(switch):
    model_config = dataclasses.replace(MODEL, dropout=0.1)
    objective = ObjectiveConfig(**({} if switch == "mse" else {switch: True}))
    state = fresh_state(model_config, lr=3e-3)
    step = jax.jit(
        functools.partial(
            train_step,
            model=TransformerGenerator(model_config),
            objective=objective,
            axis_name=None,
        )
    )
    batch = jax.tree_util.tree_map(np.asarray, random_batch(batch=16, seed=2))
    history = []
    for i in range(30):
        state, metrics = step(state, batch, jax.random.PRNGKey(i))
        history.append(float(metrics[switch]))
    assert np.all(np.isfinite(history))
    assert np.mean(history[-5:]) < np.mean(history[:5]), history


def test_train_step_is_traced_once():
    objective = ObjectiveConfig()
    model = TransformerGenerator(MODEL)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(state, batch, rng):
        return train_step(state, batch, rng, model=model, objective=objective, axis_name=None)

    state = fresh_state()
    for seed in range(3):
        state, _ = step(
            state,
            jax.tree_util.tree_map(np.asarray, random_batch(seed=seed)),
            jax.random.PRNGKey(seed),
        )


def test_one_channel_batch_fails_in_the_train_step():
    batch = random_batch()
    bad = dataclasses.replace(batch, inputs=batch.inputs[..., :1])
    with pytest.raises(AssertionError, match="index 1 is out of bounds"):
        single_device_step(fresh_state(), bad, jax.random.PRNGKey(0), ObjectiveConfig())


def test_prefetch_draws_ahead_in_a_thread_keeps_order_and_stops_on_close():
    import threading

    drawn = []
    released = threading.Event()

    def source(n):
        for i in range(n):
            if i == 3:  # the consumer holds item 0 until the thread has drawn items 1-3
                released.wait(timeout=10)
            drawn.append((i, threading.current_thread().name))
            yield i

    fed = parallel.prefetch(source(8), size=2)
    assert next(fed) == 0
    deadline = time.time() + 10
    while len(drawn) < 3 and time.time() < deadline:
        time.sleep(0.01)
    assert [i for i, _ in drawn] == [0, 1, 2], "the thread draws up to size items ahead"
    assert {name for _, name in drawn} == {"scformer-prefetch"}
    released.set()
    assert [next(fed) for _ in range(3)] == [1, 2, 3]
    fed.close()  # a mid-epoch stop: the thread stops without draining the source
    assert not any(t.name == "scformer-prefetch" for t in threading.enumerate())
    assert len(drawn) < 8

    assert list(parallel.prefetch(source(0))) == []
    released.set()
    assert list(parallel.prefetch(iter(range(5)), size=1)) == [0, 1, 2, 3, 4]

    def failing():
        yield "a"
        raise OSError("disk read failed")

    fed = parallel.prefetch(failing())
    assert next(fed) == "a"
    with pytest.raises(OSError, match="disk read failed"):
        next(fed)


def test_host_exchanges_keep_their_keys_apart_and_name_a_missing_process():
    import os
    import subprocess
    import sys

    port = 15000 + os.getpid() % 20000
    script = f"""
import jax
import numpy as np
jax.distributed.initialize("localhost:{port}", num_processes=1, process_id=0)
from scformer_jax.parallel import HostExchange
first, second = HostExchange(timeout_s=10), HostExchange(timeout_s=10)
a = first(np.arange(3))
b = second(np.arange(3) + 10)
c = first(np.arange(3) + 20)
print(a[0].tolist(), b[0].tolist(), c[0].tolist())
# A process that never comes (here: a second one that does not exist) is named, not a
# bare deadline error.
lonely = HostExchange(timeout_s=0.5)
lonely.count = 2
try:
    lonely(np.arange(3))
except RuntimeError as e:
    print("named:", "process 1's part of input exchange 0" in str(e))
"""
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.splitlines()
    assert lines[-2:] == ["[0, 1, 2] [10, 11, 12] [20, 21, 22]", "named: True"]
