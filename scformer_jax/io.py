"""File-system helpers: atomic writes, permissions that follow the umask, the run-folder lock
and one-line descriptions of I/O errors.

Every output file appears whole or not at all, with the mode ``open()`` would give it.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import os
import socket
import tempfile
from pathlib import Path
from typing import Iterator


def current_umask() -> int:
    """The process umask, read without changing it where the OS allows."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # no way to read it without setting it: set it straight back
    os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode a new file gets from ``open()`` under the current umask."""
    return 0o666 & ~current_umask()


def folder_mode() -> int:
    """The mode a new folder gets from ``mkdir`` under the current umask."""
    return 0o777 & ~current_umask()


def make_temp_dir(parent: str | os.PathLike, prefix: str) -> Path:
    """A new folder in `parent` (``tempfile.mkdtemp``) with the mode ``mkdir`` would give it,
    for outputs staged there and renamed into place."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    os.chmod(path, folder_mode())
    return path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yields a temporary path beside `path`; renames it onto `path` when the block succeeds
    and removes it when the block fails. The file gets the mode ``open()`` would give it."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{suffix}", dir=path.parent)
    except OSError as e:
        raise _naming(e, path) from e
    os.close(fd)
    try:
        yield Path(tmp)
        # mkstemp creates the file 0600 and writers such as h5py may replace it.
        os.chmod(tmp, file_mode())
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(e, OSError) and e.filename in (None, tmp):
            raise _naming(e, path) from e
        raise


def _naming(error: OSError, path: Path) -> OSError:
    """`error` with `path` as its file name (a full disk reports none; mkstemp names the
    temporary file rather than the output), same type and errno."""
    if error.errno is None:
        return error
    try:
        return type(error)(error.errno, error.strerror, str(path))
    except TypeError:
        return OSError(error.errno, error.strerror, str(path))


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def describe_os_error(error: OSError) -> str:
    """``"PATH: cause"`` in one line, e.g. ``"runs/a/metrics.jsonl: No space left on device"``."""
    cause = error.strerror or str(error)
    if error.filename is None:
        return cause
    return f"{os.fsdecode(error.filename)}: {cause}"


# ---------------------------------------------------------------------------------------------
# Run-folder lock

LOCK_FILE = "train.lock"


class RunFolderLockedError(RuntimeError):
    """Another process writes the run folder; the message names it and what to do."""


class RunFolderLock:
    """One writer per run folder: ``WORKDIR/train.lock`` holds the writer's host and pid.

    The holder keeps an exclusive ``flock`` on the file for as long as it runs, so the kernel
    drops the lock when the process dies, however it dies. A lock file left behind by a dead
    process (no ``flock`` on it) is stale: it is reported and taken over. Where the file
    system cannot lock files, the lock is the file itself (created exclusively): one that
    exists is treated as held, and the message says how to clear it.

    Args:
      workdir: the run folder (created, with its parents, when missing).
    """

    def __init__(self, workdir: str | os.PathLike):
        self.workdir = Path(workdir)
        self.path = self.workdir / LOCK_FILE
        self._fd: int | None = None
        self._created: list[Path] = []
        self.stale_holder: dict | None = None

    def _holder_text(self, holder: dict | None) -> str:
        if not holder:
            return "an unknown process"
        return (
            f"pid {holder.get('pid')} on host {holder.get('host')!r} (started "
            f"{holder.get('started')})"
        )

    def _read_holder(self, fd: int) -> dict | None:
        os.lseek(fd, 0, os.SEEK_SET)
        raw = b""
        while chunk := os.read(fd, 65536):
            raw += chunk
        try:
            holder = json.loads(raw.decode()) if raw.strip() else None
        except (UnicodeDecodeError, json.JSONDecodeError):
            holder = {"pid": "?", "host": "?", "started": "?"}
        return holder if isinstance(holder, dict) or holder is None else None

    def _locked_error(self, holder: dict | None, reason: str) -> RunFolderLockedError:
        return RunFolderLockedError(
            f"Run folder {self.workdir} is in use: {reason} {self._holder_text(holder)} holds "
            f"{self.path}. Two writers would mix their checkpoints and metrics: wait for it to "
            f"finish, stop it, or train into another --workdir. If no such process runs any "
            f"more, clear the lock with: rm {self.path}"
        )

    def acquire(self) -> "RunFolderLock":
        """Takes the lock or raises :class:`RunFolderLockedError` naming the holder."""
        missing = []
        parent = self.workdir
        while not parent.exists():
            missing.append(parent)
            parent = parent.parent
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._created = missing
        try:
            self._take()
        except BaseException:
            self._remove_created()
            raise
        return self

    def _take(self) -> None:
        for _ in range(10):
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, file_mode())
                created = True
            except FileExistsError:
                try:
                    fd = os.open(self.path, os.O_RDWR)
                except FileNotFoundError:  # its holder just removed it
                    continue
                created = False
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES) and created:
                    # No file locks here (some network file systems): the file we created
                    # is the lock.
                    self._hold(fd, holder=None)
                    return
                holder = self._read_holder(fd)
                os.close(fd)
                if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise self._locked_error(holder, "a running process,") from None
                raise self._locked_error(
                    holder, f"this file system cannot lock files ({e.strerror}), and"
                ) from None
            # The holder may have removed the file between our open and flock: then we hold
            # a lock on a deleted file, and must try again on the new one.
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            self._hold(fd, holder=self._read_holder(fd))
            return
        raise self._locked_error(None, "processes keep replacing the lock;")

    def _hold(self, fd: int, *, holder: dict | None) -> None:
        self.stale_holder = holder
        record = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started": datetime.datetime.now().isoformat(timespec="seconds"),
        }
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, (json.dumps(record) + "\n").encode())
        self._fd = fd

    def stale_message(self) -> str | None:
        """What was taken over, when the lock file was left behind by a dead process."""
        if self.stale_holder is None:
            return None
        return (
            f"Took over a stale lock in {self.path}: {self._holder_text(self.stale_holder)} "
            "no longer holds it (it was killed or crashed)."
        )

    def release(self, *, remove_empty: bool = True) -> None:
        """Removes the lock file and lets go of the lock; with `remove_empty`, also the
        folders :meth:`acquire` created when nothing else was written into them."""
        if self._fd is None:
            return
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        os.close(self._fd)
        self._fd = None
        if remove_empty:
            self._remove_created()

    def _remove_created(self) -> None:
        for folder in self._created:  # deepest first
            try:
                folder.rmdir()
            except OSError:
                break
        self._created = []

    def __enter__(self) -> "RunFolderLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
