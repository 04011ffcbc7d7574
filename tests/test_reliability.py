"""Failures injected where they hurt: non-finite steps at checkpoint time, a second writer,
corrupt checkpoints, runs killed before their first checkpoint, full and read-only disks,
bad gene names, bad --predict names, and the modes of written files."""

import errno
import json
import os
import signal
import stat
import struct
import subprocess
import sys
import time
import warnings
from pathlib import Path

import anndata
import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest
from scipy import sparse

import eval as eval_cli
import train as train_cli
from scformer_jax import checkpoints as checkpoints_lib
from scformer_jax import evaluation, parallel, runs, training
from scformer_jax.checkpoints import Checkpoints, CheckpointWriteError
from scformer_jax.data.__main__ import main as data_main
from scformer_jax.data.conditions import DataFormatError
from scformer_jax.data.gears_io import write_h5ad_atomic
from scformer_jax.data.prepare import prepare
from scformer_jax.data.splits import gears_split, write_split_json
from scformer_jax.io import (
    LOCK_FILE,
    RunFolderLock,
    RunFolderLockedError,
    make_temp_dir,
    write_text_atomic,
)

TINY = "tests/configs/tiny.yaml"
ROOT = Path(__file__).resolve().parents[1]
STEPS_PER_EPOCH = 11  # simulated:tiny at batch 16


def run_train(workdir, *overrides):
    args = ["--config", TINY, "--workdir", str(workdir), "--no-progress"]
    for o in overrides:
        args += ["--set", o]
    return train_cli.main(args)


def checkpoint_steps(workdir):
    return sorted(
        int(p.name) for p in (Path(workdir) / "checkpoints").iterdir() if p.name.isdigit()
    )


def metric_records(workdir, kind="train"):
    return [
        json.loads(line)
        for line in (Path(workdir) / "metrics.jsonl").open()
        if json.loads(line)["kind"] == kind
    ]


def all_finite(tree):
    return all(np.isfinite(np.asarray(x)).all() for x in jax.tree_util.tree_leaves(tree))


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


# ------------------------------------------------------------ 1. non-finite steps never saved


def poison_step(monkeypatch, step, *, grad_norm):
    """From `step` on, the train step returns NaN parameters (and a NaN gradient norm when
    `grad_norm`) while the loss stays finite: what an exploding update looks like."""
    original = training.make_p_train_step

    def make(model, objective):
        p_step = original(model, objective)

        def poisoned(state, batch, rng):
            state, metrics = p_step(state, batch, rng)
            if int(parallel.first_replica(state.step)) >= step:
                state = state.replace(
                    params=jax.tree_util.tree_map(lambda x: x * jnp.nan, state.params)
                )
                if grad_norm:
                    metrics = dict(metrics, grad_norm=metrics["grad_norm"] * jnp.nan)
            return state, metrics

        return poisoned

    monkeypatch.setattr(training, "make_p_train_step", make)


def test_non_finite_state_at_a_checkpoint_step_is_never_saved(tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    end_of_epoch_2 = 2 * STEPS_PER_EPOCH
    # Finite loss and gradient norm, NaN parameters exactly at the epoch-end checkpoint.
    poison_step(monkeypatch, end_of_epoch_2, grad_norm=False)
    assert run_train(run, "train.epochs=2") == 3
    err = capsys.readouterr().err
    assert f"Non-finite parameters or optimiser state at step {end_of_epoch_2}" in err
    assert f"step {STEPS_PER_EPOCH} in {run / 'checkpoints'}, is finite" in err
    assert checkpoint_steps(run) == [STEPS_PER_EPOCH]

    # The resumed run restores the finite checkpoint; a NaN gradient norm at the max_steps
    # checkpoint step stops it there, unsaved.
    monkeypatch.undo()
    stop = STEPS_PER_EPOCH + 3
    poison_step(monkeypatch, stop, grad_norm=True)
    assert run_train(run, "train.epochs=2", f"train.max_steps={stop}") == 3
    err = capsys.readouterr().err
    assert f"Non-finite grad_norm (nan) at step {stop}" in err and "not checkpointed" in err
    assert checkpoint_steps(run) == [STEPS_PER_EPOCH]
    _, params, meta = runs.restore_params(run, which="latest")
    assert all_finite(params) and meta["loop"]["epoch"] == 1


# ------------------------------------------------------------ 2. one writer per run folder


def start_first_writer(workdir):
    """A train.py process that keeps training into `workdir`; returns once it has written
    its first metrics."""
    proc = subprocess.Popen(
        [
            sys.executable,
            "train.py",
            "--config",
            TINY,
            "--workdir",
            str(workdir),
            "--no-progress",
            "--set",
            "train.epochs=1000",
        ],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    metrics = Path(workdir) / "metrics.jsonl"
    deadline = time.time() + 300
    while not (metrics.is_file() and metrics.stat().st_size) and proc.poll() is None:
        assert time.time() < deadline, "the first writer did not start training"
        time.sleep(0.5)
    assert proc.poll() is None, "the first writer ended early"
    return proc


def test_second_writer_fails_at_once_and_a_stale_lock_is_taken_over(tmp_path, capsys, caplog):
    run = tmp_path / "run"
    first = start_first_writer(run)
    try:
        started = time.time()
        assert run_train(run, "train.epochs=1") == 2
        assert time.time() - started < 10  # at once: no data loading, no compiling
        err = capsys.readouterr().err
        assert "Cannot train: Run folder" in err and "is in use" in err
        assert f"pid {first.pid}" in err and "another --workdir" in err
        with pytest.raises(RunFolderLockedError, match=f"rm {run / LOCK_FILE}"):
            RunFolderLock(run).acquire()
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    # kill -9 left the lock file behind; nobody holds it any more.
    assert json.loads((run / LOCK_FILE).read_text())["pid"] == first.pid
    with caplog.at_level("WARNING"):
        assert run_train(run, "train.epochs=1") == 0
    assert f"Took over a stale lock in {run / LOCK_FILE}: pid {first.pid}" in caplog.text
    assert not (run / LOCK_FILE).exists()


def test_lock_is_released_and_an_unused_new_folder_removed(tmp_path):
    lock = RunFolderLock(tmp_path / "a" / "b").acquire()
    assert (tmp_path / "a" / "b" / LOCK_FILE).is_file()
    lock.release()
    assert sorted(os.listdir(tmp_path)) == []
    with RunFolderLock(tmp_path / "c"):
        (tmp_path / "c" / "kept").write_text("x")
    assert sorted(os.listdir(tmp_path / "c")) == ["kept"]


def test_without_file_locks_the_lock_file_itself_is_the_lock(tmp_path, monkeypatch):
    from scformer_jax import io as io_lib

    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(io_lib.fcntl, "flock", no_locks)
    first = RunFolderLock(tmp_path).acquire()
    with pytest.raises(
        RunFolderLockedError,
        match=f"cannot lock files.*pid {os.getpid()}.*rm {tmp_path / LOCK_FILE}",
    ):
        RunFolderLock(tmp_path).acquire()
    first.release()
    RunFolderLock(tmp_path).acquire().release()
    assert not (tmp_path / LOCK_FILE).exists()


# ------------------------------------------------------------ 3. resume after corruption


def test_truncated_checkpoint_is_moved_aside_and_resume_goes_on(tmp_path):
    run = tmp_path / "run"
    assert run_train(run, "train.epochs=2", "train.keep_checkpoints=2") == 0
    newest = 2 * STEPS_PER_EPOCH
    assert checkpoint_steps(run)[-1] == newest
    files = [p for p in (run / "checkpoints" / str(newest) / "state").rglob("*") if p.is_file()]
    largest = max(files, key=lambda p: p.stat().st_size)
    largest.write_bytes(largest.read_bytes()[: largest.stat().st_size // 2])

    with pytest.warns(UserWarning, match=f"unreadable checkpoint step {newest}.*corrupt"):
        assert run_train(run, "train.epochs=3", "train.keep_checkpoints=2") == 0
    assert (run / "checkpoints" / "corrupt" / str(newest) / "state").is_dir()
    assert checkpoint_steps(run)[-1] == 3 * STEPS_PER_EPOCH
    steps = [r["step"] for r in metric_records(run)]
    assert steps == list(range(1, 3 * STEPS_PER_EPOCH + 1))
    assert [r["epoch"] for r in metric_records(run, "epoch")] == [1, 2, 3]
    # The step that was corrupt is written again and reads back.
    _, params, meta = runs.restore_params(run, which="latest")
    assert meta["loop"]["epoch"] == 3 and all_finite(params)


# ------------------------------------------------------------ 6. killed before a checkpoint


def read_events(folder):
    """(file, event) of every TensorBoard event under `folder`, files in name order."""
    from tensorboardX.proto.event_pb2 import Event

    out = []
    for path in sorted(Path(folder).glob("events.out.tfevents.*")):
        data = path.read_bytes()
        pos = 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos : pos + 8])
            event = Event()
            event.ParseFromString(data[pos + 12 : pos + 12 + length])
            out.append((path.name, event))
            pos += 12 + length + 4
    return out


def visible_scalar_steps(folder, tag):
    """Steps of `tag` as TensorBoard shows them: a SessionLog START at step T hides the
    earlier events at steps >= T."""
    steps = []
    for _, event in read_events(folder):
        if event.HasField("session_log") and event.session_log.status == 1:
            steps = [s for s in steps if s < event.step]
        for value in event.summary.value:
            if value.tag == tag:
                steps.append(event.step)
    return steps


class Killed(Exception):
    pass


def test_run_killed_before_its_first_checkpoint_restarts_clean(tmp_path, monkeypatch):
    from scformer_jax.data import batching

    run = tmp_path / "run"
    original = batching.BatchLoader.epoch

    def dying_epoch(self, epoch_index, start_batch=0):
        for i, batch in enumerate(original(self, epoch_index, start_batch)):
            if self.shuffle and i == 6:
                raise Killed
            yield batch

    monkeypatch.setattr(batching.BatchLoader, "epoch", dying_epoch)
    with pytest.raises(Killed):
        run_train(run, "train.epochs=1")
    killed_steps = [r["step"] for r in metric_records(run)]
    assert killed_steps == list(range(1, len(killed_steps) + 1)) and len(killed_steps) >= 3
    assert checkpoint_steps(run) == []
    monkeypatch.undo()

    assert run_train(run, "train.epochs=1") == 0
    steps = [r["step"] for r in metric_records(run)]
    assert steps == list(range(1, STEPS_PER_EPOCH + 1))
    assert visible_scalar_steps(run / "tensorboard", "train/loss") == steps
    # Without the purge marker TensorBoard would show the killed attempt's steps twice.
    assert sum(
        len([v for v in e.summary.value if v.tag == "train/loss"])
        for _, e in read_events(run / "tensorboard")
    ) == len(killed_steps) + len(steps)


# ------------------------------------------------------------ 7. full disk, 10. read-only


def fail_json_writes(monkeypatch, *, from_step):
    """orbax's JSON writer fails with ENOSPC for checkpoints from `from_step` on."""
    from orbax.checkpoint._src.handlers import json_checkpoint_handler as handler

    original = handler.JsonCheckpointHandler._save_fn

    async def full_disk(self, x, directory):
        step = int(Path(str(directory)).parent.name.split(".")[0])
        if step >= from_step:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(directory / self._filename))
        return await original(self, x, directory)

    monkeypatch.setattr(handler.JsonCheckpointHandler, "_save_fn", full_disk)


def test_full_disk_during_a_checkpoint_stops_there_in_one_line(tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    failing = 2 * STEPS_PER_EPOCH
    fail_json_writes(monkeypatch, from_step=failing)
    assert run_train(run, "train.epochs=3") == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [
        f"Cannot train: cannot write checkpoint step {failing} into {run / 'checkpoints'}: "
        "No space left on device"
    ]
    # Training stopped at the failed step: no third epoch, the older checkpoint is kept
    # and no partial step folder is left.
    assert max(r["step"] for r in metric_records(run)) == failing
    assert os.listdir(run / "checkpoints") == [str(STEPS_PER_EPOCH)]


def test_a_failed_save_waits_for_writer_threads_not_yet_running(monkeypatch):
    """A writer thread that orbax started but that is not running yet cannot be joined; the
    cleanup waits for it instead of failing with "cannot join thread before it is started"."""
    import threading

    finished = []
    writer = threading.Thread(target=lambda: finished.append(True))
    real_enumerate = threading.enumerate
    monkeypatch.setattr(threading, "enumerate", lambda: [*real_enumerate(), writer])
    starter = threading.Timer(0.05, writer.start)
    starter.start()
    before = set(real_enumerate())  # the starter included: only the writer is new
    checkpoints_lib._join_new_threads(before, timeout=10.0)
    assert finished == [True]


def test_checkpoint_write_errors_are_named_and_leave_nothing(tmp_path, monkeypatch):
    ckpts = Checkpoints(tmp_path / "ckpt")
    ckpts.save(1, {"w": np.ones(3, np.float32)}, {"step": 1}, metric=0.5)
    fail_json_writes(monkeypatch, from_step=2)
    with pytest.raises(CheckpointWriteError, match="step 2 .*No space left on device"):
        ckpts.save(2, {"w": np.ones(3, np.float32)}, {"step": 2}, metric=0.6)
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path / "ckpt")) == ["1"]
    # A disk too full for the next checkpoint is refused before orbax starts writing.
    monkeypatch.setattr(
        checkpoints_lib.shutil, "disk_usage", lambda path: type("Usage", (), {"free": 4096})()
    )
    with pytest.raises(CheckpointWriteError, match=r"step 3 .*No space left on device \(needs"):
        ckpts.save(3, {"w": np.ones(3, np.float32)}, {"step": 3}, metric=0.7)
    assert sorted(os.listdir(tmp_path / "ckpt")) == ["1"]
    assert ckpts.restore({"w": np.zeros(3, np.float32)})[0] == 1
    ckpts.close()


def test_metrics_write_error_names_the_file(tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"

    class FullDisk:
        def __init__(self, *args, **kwargs):
            pass

        def write(self, text):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def close(self):
            pass

    real_open = open
    monkeypatch.setattr(
        training,
        "open",
        lambda path, *a, **k: (
            FullDisk()
            if str(path).endswith("metrics.jsonl") and "a" in a
            else real_open(path, *a, **k)
        ),
        raising=False,
    )
    assert run_train(run, "train.epochs=1") == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"Cannot train: {run / 'metrics.jsonl'}: No space left on device"
    ]


def test_read_only_run_folder_is_one_line(tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    run.mkdir()
    real_open = os.open

    def read_only(path, flags, *args, **kwargs):
        if str(path).startswith(str(run)) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", read_only)
    assert run_train(run) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"Cannot train: {run / LOCK_FILE}: Read-only file system"
    ]
    assert os.listdir(run) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_run_folder_for_real(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    run.chmod(0o555)
    try:
        assert run_train(run) == 2
        assert capsys.readouterr().err.strip().splitlines() == [
            f"Cannot train: {run / LOCK_FILE}: Permission denied"
        ]
    finally:
        run.chmod(0o755)


def test_prepare_into_a_read_only_folder_is_one_line(tmp_path, monkeypatch, capsys):
    import tempfile

    source = tmp_path / "raw.h5ad"
    counts_adata(LABELS, GENES).write_h5ad(source)
    out = tmp_path / "out" / "data.h5ad"

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(out.parent / ".tmp123"))

    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    assert (
        data_main(
            [
                "prepare",
                str(source),
                str(out),
                "--perturbation-key",
                "target",
                "--control-label",
                "NT",
                "--de-backend",
                "numpy",
            ]
        )
        == 2
    )
    assert capsys.readouterr().err.strip().splitlines() == [f"error: {out}: Read-only file system"]


def test_atomic_write_errors_name_the_output(tmp_path, monkeypatch):
    import tempfile

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/somewhere/.tmpXYZ")

    monkeypatch.setattr(tempfile, "mkstemp", no_space)
    with pytest.raises(OSError, match="No space left") as info:
        write_text_atomic(tmp_path / "summary.json", "{}")
    assert info.value.filename == str(tmp_path / "summary.json")
    assert info.value.errno == errno.ENOSPC


# ------------------------------------------------------------ 4, 5. bad input to prepare


def counts_adata(labels, var_names):
    rng = np.random.default_rng(0)
    counts = rng.poisson(4.0, (len(labels), len(var_names))).astype(np.float32)
    return anndata.AnnData(
        X=sparse.csr_matrix(counts),
        obs=pd.DataFrame({"target": labels}, index=[f"c{i}" for i in range(len(labels))]),
        var=pd.DataFrame(
            {"ensembl": [f"ENSG{i:05d}" for i in range(len(var_names))]}, index=var_names
        ),
    )


GENES = [f"G{i}" for i in range(8)]
LABELS = ["NT"] * 10 + ["G1"] * 4 + ["G2"] * 4 + ["G1+G2"] * 4


def test_duplicate_gene_names_are_a_named_error(tmp_path, capsys):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # anndata warns about the non-unique names
        adata = counts_adata(LABELS, GENES[:6] + ["G1", "G1"])
    with pytest.raises(DataFormatError) as info:
        prepare(adata, perturbation_key="target", control_label="NT")
    message = str(info.value)
    assert "'G1' (3x)" in message and "var_names_make_unique()" in message
    assert "adata.var['ensembl']" in message

    source = tmp_path / "raw.h5ad"
    adata.write_h5ad(source)
    assert (
        data_main(
            [
                "prepare",
                str(source),
                str(tmp_path / "out.h5ad"),
                "--perturbation-key",
                "target",
                "--control-label",
                "NT",
            ]
        )
        == 2
    )
    assert "duplicated gene name" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["raw.h5ad"]


def test_loading_a_gears_file_with_duplicate_var_names_is_a_named_error(data_tiny_adata):
    from scformer_jax.data.dataset import PerturbData

    adata = data_tiny_adata.copy()
    names = list(adata.var_names)
    names[1] = names[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        adata.var_names = names
    with pytest.raises(DataFormatError, match=f"'{names[0]}' \\(2x\\).*var_names_make_unique"):
        PerturbData(adata, name="dup")


@pytest.mark.parametrize(
    "labels,why",
    [
        # A categorical column's codes: 0..2 perturbed, 3 the control.
        (["3"] * 10 + ["0"] * 4 + ["1"] * 4 + ["2"] * 4, "look like integer codes"),
        (["NT"] * 10 + ["X1"] * 4 + ["X2"] * 4 + ["X1+X2"] * 4, "none of the 2 perturbed genes"),
    ],
)
def test_labels_that_are_not_gene_names_need_a_flag(tmp_path, capsys, labels, why):
    control = labels[0]
    adata = counts_adata(labels, GENES)
    with pytest.raises(DataFormatError, match=why) as info:
        prepare(adata, perturbation_key="target", control_label=control)
    assert "--labels-are-gene-names" in str(info.value)

    source = tmp_path / "raw.h5ad"
    adata.write_h5ad(source)
    args = [
        "prepare",
        str(source),
        str(tmp_path / "out.h5ad"),
        "--perturbation-key",
        "target",
        "--control-label",
        control,
        "--de-backend",
        "numpy",
    ]
    assert data_main(args) == 2
    assert why in capsys.readouterr().err
    assert not (tmp_path / "out.h5ad").exists()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the unmeasured-gene warning
        assert data_main(args + ["--labels-are-gene-names"]) == 0
    assert (tmp_path / "out.h5ad").is_file()


# ------------------------------------------------------------ 8. modes, 9. eval --predict


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    old = os.umask(0o022)
    try:
        run = tmp_path_factory.mktemp("reliability") / "run"
        assert run_train(run, "train.epochs=1") == 0
    finally:
        os.umask(old)
    return run


def test_run_folder_files_follow_the_umask(trained_run):
    for name in ("config.yaml", "split.json", "summary.json", "metrics.jsonl"):
        assert stat.S_IMODE((trained_run / name).stat().st_mode) == 0o644, name
    for folder in (trained_run, trained_run / "checkpoints"):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o755, folder


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o002])
def test_written_files_and_folders_follow_the_umask(tmp_path, data_tiny_adata, umask):
    old = os.umask(umask)
    try:
        write_text_atomic(tmp_path / "a.txt", "x")
        write_h5ad_atomic(data_tiny_adata, tmp_path / "b.h5ad")
        write_split_json(
            gears_split(
                data_tiny_adata.obs["condition"].astype(str).unique(), split="simulation", seed=1
            ),
            tmp_path / "c.json",
        )
        folder = make_temp_dir(tmp_path, prefix=".stage-")
    finally:
        os.umask(old)
    for name in ("a.txt", "b.h5ad", "c.json"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o666 & ~umask, name
    assert stat.S_IMODE(folder.stat().st_mode) == 0o777 & ~umask


def test_eval_predict_checks_names_first(trained_run, monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(evaluation, "evaluate_run", lambda *a, **k: calls.append(a))
    assert eval_cli.main(["--workdir", str(trained_run), "--predict", "NOSUCHGENE"]) == 2
    assert "Unknown gene 'NOSUCHGENE'" in capsys.readouterr().err
    assert calls == []


def test_eval_predict_says_where_predictions_went(trained_run, capsys, umask_022, monkeypatch):
    from scformer_jax.predict import load_predictor

    genes = sorted(
        {
            g
            for c in load_predictor(str(trained_run)).dataset.conditions
            for g in c.split("+")
            if g != "ctrl"
        }
    )
    out = trained_run / "eval"
    # The evaluation and --predict share one load of the dataset and of the parameters.
    loads = {"dataset": 0, "params": 0}

    def counted(name, fn):
        def wrapper(*args, **kwargs):
            loads[name] += 1
            return fn(*args, **kwargs)

        return wrapper

    monkeypatch.setattr(runs, "load_dataset", counted("dataset", runs.load_dataset))
    monkeypatch.setattr(
        checkpoints_lib, "restore_params", counted("params", checkpoints_lib.restore_params)
    )
    assert (
        eval_cli.main(
            [
                "--workdir",
                str(trained_run),
                "--n-plots",
                "0",
                "--predict",
                genes[0],
                f"{genes[0]}+{genes[1]}",
            ]
        )
        == 0
    )
    assert loads == {"dataset": 1, "params": 1}
    text = capsys.readouterr().out
    assert f"{out / 'predict.h5ad'}" in text and f"{out / 'predict_cells.h5ad'}" in text
    assert anndata.read_h5ad(out / "predict.h5ad").n_obs == 2
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    for name in ("metrics.json", "report.md", "predict.h5ad"):
        assert stat.S_IMODE((out / name).stat().st_mode) == 0o644, name
