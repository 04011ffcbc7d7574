"""train.py end to end on a tiny config: outputs, resume, corrupt checkpoints, NaN handling."""

import json
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

import train as train_cli
from scformer_jax import runs, training
from scformer_jax.config import load_config

TINY = "tests/configs/tiny.yaml"
ROOT = Path(__file__).resolve().parents[1]


def run_train(workdir, *overrides):
    args = ["--config", TINY, "--workdir", str(workdir), "--no-progress"]
    for o in overrides:
        args += ["--set", o]
    return train_cli.main(args)


def final_params(workdir, which="latest"):
    _, params, meta = runs.restore_params(workdir, which=which)
    return params, meta


def test_smoke_run_writes_everything(tmp_path, capsys):
    assert run_train(tmp_path / "run") == 0
    out = capsys.readouterr().out
    assert f"Run folder: {tmp_path / 'run'}" in out
    run = tmp_path / "run"
    for name in ("config.yaml", "split.json", "metrics.jsonl", "summary.json"):
        assert (run / name).is_file(), name
    assert any((run / "tensorboard").iterdir())
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    kinds = {r["kind"] for r in records}
    assert kinds == {"train", "epoch"}
    epochs = [r for r in records if r["kind"] == "epoch"]
    assert len(epochs) == 2 and all("val_pearson_delta" in r for r in epochs)
    assert load_config(run / "config.yaml").data.path == "simulated:tiny"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["epochs_run"] == 2 and summary["best_epoch"] in (1, 2)
    params, meta = final_params(run, "best")
    # The best checkpoint is the one saved at the best epoch, with the best value.
    assert meta["loop"]["epoch"] == summary["best_epoch"]
    assert meta["epoch_metrics"]["val_pearson_delta"] == summary["best_value"]
    assert all(np.all(np.isfinite(x)) for x in jax.tree_util.tree_leaves(params))


def test_training_lowers_the_loss(tmp_path):
    assert run_train(tmp_path / "run", "train.epochs=3") == 0
    records = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").open()]
    epochs = [r for r in records if r["kind"] == "epoch"]
    assert epochs[-1]["train_mse"] < epochs[0]["train_mse"]
    assert epochs[-1]["val_mse"] < epochs[0]["val_mse"]


class Interrupt(Exception):
    pass


def test_resume_after_interruption_reaches_same_parameters(tmp_path, monkeypatch):
    assert run_train(tmp_path / "straight", "train.epochs=3") == 0
    reference, _ = final_params(tmp_path / "straight")

    # Kill the second run in the middle of its second epoch.
    from scformer_jax.data import batching

    original = batching.BatchLoader.epoch
    calls = {"n": 0}

    def dying_epoch(self, epoch_index, start_batch=0):
        for i, batch in enumerate(original(self, epoch_index, start_batch)):
            if self.shuffle and epoch_index == 1 and i == 3:
                raise Interrupt("killed")
            calls["n"] += 1
            yield batch

    monkeypatch.setattr(batching.BatchLoader, "epoch", dying_epoch)
    with pytest.raises(Interrupt):
        run_train(tmp_path / "resumed", "train.epochs=3")
    monkeypatch.setattr(batching.BatchLoader, "epoch", original)
    assert run_train(tmp_path / "resumed", "train.epochs=3") == 0
    resumed, meta = final_params(tmp_path / "resumed")
    assert meta["loop"]["epoch"] == 3
    for a, b in zip(jax.tree_util.tree_leaves(reference), jax.tree_util.tree_leaves(resumed)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_corrupt_checkpoint_is_skipped_with_a_warning(tmp_path):
    run = tmp_path / "run"
    assert run_train(run, "train.epochs=1") == 0
    ckpt_dir = run / "checkpoints"
    steps = sorted(int(p.name) for p in ckpt_dir.iterdir() if p.name.isdigit())
    bogus = ckpt_dir / str(steps[-1] + 1000)
    (bogus / "state").mkdir(parents=True)
    (bogus / "state" / "garbage").write_text("not a checkpoint")
    with pytest.warns(UserWarning, match="Skipping unreadable checkpoint"):
        assert run_train(run, "train.epochs=2") == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["epochs_run"] == 2


def test_non_finite_loss_stops_with_the_step(tmp_path, capsys):
    code = run_train(tmp_path / "run", "optim.lr=1e30", "optim.decay=1.0")
    assert code == 3
    err = capsys.readouterr().err
    assert "Non-finite loss" in err and "at step" in err


def test_bad_config_key_is_a_clear_error(tmp_path, capsys):
    assert run_train(tmp_path / "run", "optim.learning_rate=1") == 2
    err = capsys.readouterr().err
    assert "learning_rate" in err and "Valid keys" in err
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_two_processes_equal_one_process(tmp_path):
    script = ROOT / "tests" / "multiprocess_step.py"
    env_single = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu"}
    import os

    base_env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    single = subprocess.run(
        [sys.executable, str(script), "--out", str(tmp_path / "single.npz")],
        env={**base_env, **env_single},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert single.returncode == 0, single.stderr[-3000:]
    port = 12000 + os.getpid() % 20000
    env_multi = {"XLA_FLAGS": "--xla_force_host_platform_device_count=1", "JAX_PLATFORMS": "cpu"}
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                str(script),
                "--out",
                str(tmp_path / f"multi{i}.npz"),
                "--coordinator-address",
                f"localhost:{port}",
                "--num-processes",
                "2",
                "--process-id",
                str(i),
            ],
            env={**base_env, **env_multi},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    a = np.load(tmp_path / "single.npz")
    for i in range(2):
        b = np.load(tmp_path / f"multi{i}.npz")
        assert sorted(a.files) == sorted(b.files)
        for key in a.files:
            np.testing.assert_allclose(a[key], b[key], rtol=1e-5, atol=1e-5, err_msg=key)


@pytest.mark.slow
def test_two_train_processes_read_their_share_and_equal_one_process(tmp_path):
    """train.py in 2 processes (1 device each; each assembles only its half of every
    batch, the batch-wise gene set exchanged between them) takes the same steps as 1
    process with 2 devices."""
    import os

    base_env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    settings = [
        "data.include_zero_gene=batch-wise",
        "data.max_seq_len=24",
        "train.epochs=1",
        "train.max_steps=6",
        "train.log_interval=1",
    ]

    def command(workdir, *extra):
        cmd = [sys.executable, str(ROOT / "train.py"), "--config", TINY, "--workdir", str(workdir)]
        cmd += ["--no-progress", *extra]
        for s in settings:
            cmd += ["--set", s]
        return cmd

    one = subprocess.run(
        command(tmp_path / "one"),
        env={**base_env, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"},
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    assert one.returncode == 0, one.stderr[-3000:]
    port = 14000 + os.getpid() % 20000
    procs = [
        subprocess.Popen(
            command(
                tmp_path / "two",
                "--coordinator-address",
                f"localhost:{port}",
                "--num-processes",
                "2",
                "--process-id",
                str(i),
            ),
            env={**base_env, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
        for i in range(2)
    ]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    assert "each assembles (and reads the cells of) its 8 rows" in outs[0][0]

    def losses(workdir):
        records = [json.loads(line) for line in (workdir / "metrics.jsonl").open()]
        return [(r["step"], r["loss"]) for r in records if r["kind"] == "train"]

    a, b = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert [s for s, _ in a] == [s for s, _ in b] == list(range(1, 7))
    np.testing.assert_allclose([x for _, x in a], [x for _, x in b], rtol=1e-5, atol=1e-6)
    pa, _ = final_params(tmp_path / "one")
    pb, _ = final_params(tmp_path / "two")
    for x, y in zip(jax.tree_util.tree_leaves(pa), jax.tree_util.tree_leaves(pb)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=1e-5)


def test_resume_with_another_config_is_refused(tmp_path, capsys):
    run = tmp_path / "run"
    assert run_train(run, "train.epochs=1") == 0
    before = (run / "config.yaml").read_text()
    assert run_train(run, "train.epochs=2", "model.embsize=32") == 2
    err = capsys.readouterr().err
    assert "model.embsize: 16 -> 32" in err and "new --workdir" in err
    assert (run / "config.yaml").read_text() == before
    assert run_train(run, "train.epochs=2") == 0  # more epochs may be asked for


def test_max_steps_mid_epoch_then_resume_equals_straight_run(tmp_path):
    assert run_train(tmp_path / "straight", "train.epochs=2") == 0
    reference, _ = final_params(tmp_path / "straight")
    assert run_train(tmp_path / "split", "train.epochs=2", "train.max_steps=7") == 0
    _, meta = final_params(tmp_path / "split")
    assert meta["loop"]["epoch"] == 0 and meta["loop"]["batch_in_epoch"] == 7
    assert run_train(tmp_path / "split", "train.epochs=2") == 0
    resumed, _ = final_params(tmp_path / "split")
    for a, b in zip(jax.tree_util.tree_leaves(reference), jax.tree_util.tree_leaves(resumed)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    steps = [
        json.loads(line)["step"]
        for line in (tmp_path / "split/metrics.jsonl").open()
        if json.loads(line)["kind"] == "train"
    ]
    assert steps == sorted(set(steps))  # no step logged twice


def test_bad_data_path_writes_nothing(tmp_path, capsys):
    run = tmp_path / "run"
    assert run_train(run, "data.path=/nonexistent/data.h5ad") == 2
    assert "Cannot train" in capsys.readouterr().err
    assert not run.exists()


@pytest.mark.parametrize(
    "tty,flag,want", [(True, [], True), (False, [], False), (True, ["--no-progress"], False)]
)
def test_progress_bar_only_on_a_terminal(tmp_path, monkeypatch, tty, flag, want):
    """Cluster job logs (stderr not a terminal) get log lines, not a redrawn bar."""
    seen = {}

    def fake_train(config, workdir, *, progress):
        seen["progress"] = progress
        return {
            "workdir": str(workdir),
            "steps": 0,
            "best_metric": "val_mse",
            "best_value": None,
            "best_epoch": None,
        }

    monkeypatch.setattr(training, "train_and_evaluate", fake_train)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: tty, raising=False)
    assert train_cli.main(["--config", TINY, "--workdir", str(tmp_path / "run")] + flag) == 0
    assert seen["progress"] is want


def test_training_log_line_shows_mre_only_when_asked():
    metrics = {"loss": 0.5, "mse": 0.5, "mre": 123456.0}
    assert "mre" not in training._format_bar(metrics, 1e-4, 10.0, 3.2)
    assert "mre 123456.000" in training._format_bar(metrics, 1e-4, 10.0, 3.2, mre=True)
    assert load_config(TINY).train.log_mre is False


@pytest.mark.parametrize("drop_last,redraw", [(True, False), (False, True)])
def test_data_keys_reach_the_train_loader_only(data_tiny, drop_last, redraw):
    config = load_config(
        TINY, [f"data.drop_last={str(drop_last).lower()}", f"data.redraw_pairing={redraw}"]
    )
    n = len(data_tiny.cells_of(data_tiny.conditions))
    kw = dict(batch_size=32, prior=None)
    train = training._loader(data_tiny, data_tiny.conditions, config, train=True, **kw)
    val = training._loader(data_tiny, data_tiny.conditions, config, train=False, **kw)
    assert len(train) == (n // 32 if drop_last else -(-n // 32))
    assert len(val) == -(-n // 32)  # validation scores every cell
    assert np.array_equal(train.pairing(0), train.pairing(1)) is not redraw
    assert np.array_equal(val.pairing(0), val.pairing(1))


def test_update_ema_matches_a_numpy_reference_under_jit():
    rng = np.random.default_rng(0)
    params = {"a": rng.normal(size=(3, 4)).astype(np.float32), "b": rng.normal(size=5)}
    params["b"] = params["b"].astype(np.float32)
    ema = jax.tree_util.tree_map(np.copy, params)  # the initialisation: no weight
    history = []
    update = jax.jit(training.update_ema, static_argnames="decay")
    for step in range(1, 40):
        params = jax.tree_util.tree_map(lambda p: p + rng.normal(size=p.shape), params)
        params = jax.tree_util.tree_map(lambda p: p.astype(np.float32), params)
        history.append(params)
        ema = update(ema, params, step, decay=0.9)
    # The weighted mean of the parameters after each step, weights 0.9 ** (age in steps).
    weights = 0.9 ** np.arange(len(history))[::-1]
    ref = {
        k: np.tensordot(weights, np.stack([h[k] for h in history]).astype(np.float64), 1)
        / weights.sum()
        for k in params
    }
    for got, want in zip(jax.tree_util.tree_leaves(ema), jax.tree_util.tree_leaves(ref)):
        assert got.dtype == np.float32
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_ema_run_evaluates_the_average_and_resumes_it(tmp_path):
    from scformer_jax.checkpoints import Checkpoints

    assert run_train(tmp_path / "straight", "train.epochs=2", "optim.ema_decay=0.9") == 0
    evaluated, _ = final_params(tmp_path / "straight")
    ckpts = Checkpoints(tmp_path / "straight" / runs.CHECKPOINTS_DIR)
    try:
        _, saved, _ = ckpts.restore(None, step=ckpts.steps()[-1])
    finally:
        ckpts.close()
    # What eval and predict read is the average, and the average is not the parameters.
    leaves = jax.tree_util.tree_leaves
    for a, b in zip(leaves(evaluated), leaves(saved["ema_params"])):
        np.testing.assert_array_equal(a, b)
    assert any(not np.allclose(a, b) for a, b in zip(leaves(saved["params"]), leaves(evaluated)))
    # A run stopped mid-epoch resumes the average where it was.
    args = ("train.epochs=2", "optim.ema_decay=0.9")
    assert run_train(tmp_path / "split", *args, "train.max_steps=7") == 0
    assert run_train(tmp_path / "split", *args) == 0
    resumed, _ = final_params(tmp_path / "split")
    for a, b in zip(leaves(evaluated), leaves(resumed)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_training_reads_each_training_perturbation_once(tmp_path, monkeypatch, cell_reads):
    """The priors, the mean targets and the gene embedding share one pass over the training
    cells' moments."""
    from scformer_jax.data.splits import read_split_json

    datasets = []
    load = runs.load_data

    def keep(config):
        dataset, split = load(config)
        datasets.append(dataset)
        return dataset, split

    monkeypatch.setattr(runs, "load_data", keep)
    assert run_train(tmp_path / "run", "train.epochs=1", "train.max_steps=2") == 0
    split = read_split_json(tmp_path / "run" / "split.json")
    train = [c for c in dict.fromkeys(split["train"]) if c != "ctrl"]
    cells = datasets[0].condition_cells
    assert [cell_reads[tuple(cells[c].tolist())] for c in train] == [1] * len(train)
