"""A study cell's folder on shared storage: a per-cell lock and atomic replacement.

Any number of processes, on one machine or many sharing a file system, may run the same
study: `CellLock` lets one of them train a cell while the others wait (and then load it),
and `replace_dir` makes a finished cell appear all at once, so a reader never sees half
of one and a failure never leaves one behind.
"""

import contextlib
import json
import os
import shutil
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path


class CellLock:
    """An exclusive lock on one cell: the file `path`, created with `O_CREAT | O_EXCL`
    (atomic on local and NFS v3+ file systems), holding the owner's pid, host and a token.

    While held, a thread touches the file every `heartbeat` seconds. A lock is stale, and
    is broken, when its owner is a dead process on this host or when it has not been
    touched for `stale_after` seconds (a crashed or unreachable host). `__enter__` waits,
    polling every `poll` seconds, until it holds the lock.

    **Example:**

    ```python
    with CellLock(root / "reach" / "PPO.lock"):
        ...  # train the cell unless another process finished it meanwhile
    ```
    """

    def __init__(
        self, path: Path, *, poll: float = 0.5, heartbeat: float = 10.0, stale_after: float = 120.0
    ):
        self.path, self.poll, self.heartbeat, self.stale_after = path, poll, heartbeat, stale_after
        self.owner = {"pid": os.getpid(), "host": socket.gethostname(), "token": uuid.uuid4().hex}
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    def __enter__(self) -> "CellLock":
        announced = False
        while not self._try_acquire():
            holder = _read(self.path)
            if self._is_stale(holder):
                _break(self.path, holder)
                continue
            if not announced and holder is not None:
                print(f"{self.path}: held by pid {holder['pid']} on {holder['host']}; waiting")
                announced = True
            time.sleep(self.poll)
        self._beat = threading.Thread(target=self._touch, daemon=True)
        self._beat.start()
        return self

    def __exit__(self, *_) -> None:
        self._stop.set()
        if self._beat is not None:
            self._beat.join()
        if _read(self.path) == self.owner:  # still ours (not broken as stale meanwhile)
            self.path.unlink(missing_ok=True)

    def _try_acquire(self) -> bool:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            json.dump(self.owner, f)
        return True

    def _touch(self) -> None:
        while not self._stop.wait(self.heartbeat):
            with contextlib.suppress(OSError):  # broken as stale: its owner finds out at exit
                os.utime(self.path)

    def _is_stale(self, holder: dict | None) -> bool:
        try:
            age = time.time() - self.path.stat().st_mtime
        except FileNotFoundError:
            return False  # released meanwhile: try again
        if age > self.stale_after:
            return True
        if holder is None:  # being written right now
            return False
        return holder.get("host") == self.owner["host"] and not _alive(holder.get("pid"))


def _read(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _alive(pid) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _break(path: Path, holder: dict | None) -> None:
    """Remove the stale lock `holder`. It is first renamed aside, so that of two processes
    breaking it at once only one succeeds; a lock that turns out to be a fresh one (taken
    between our look and the rename) is put back."""
    aside = path.with_name(f"{path.name}.stale-{uuid.uuid4().hex}")
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return
    if holder is not None and _read(aside) != holder:
        with contextlib.suppress(FileExistsError):  # a third process took the lock meanwhile
            os.link(aside, path)
    aside.unlink(missing_ok=True)
    print(f"{path}: broke a stale lock of {holder}")


def replace_dir(final: Path, fill: Callable[[Path], object]) -> None:
    """Write a folder atomically: `fill` writes into a fresh temporary folder next to
    `final`, which is then renamed to `final` (an older `final` is moved aside first and
    deleted after). If `fill` raises, the temporary folder is removed and `final` is left
    as it was."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.tmp-"))
    try:
        fill(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's 0700 would hide a shared cell
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old-{uuid.uuid4().hex}")
        os.rename(final, old)
    os.rename(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def copy_dir(source: Path, final: Path) -> None:
    """`source` copied to `final` atomically (see `replace_dir`)."""
    replace_dir(final, lambda tmp: shutil.copytree(source, tmp, dirs_exist_ok=True))


def differences(saved: dict | None, settings: dict) -> list[str]:
    """The names of the settings in which a saved cell's key differs from `settings`, a
    hyperparameter as `hyperparameters.<name>`."""
    saved = saved or {}
    names = sorted(set(saved) | set(settings))
    out = [k for k in names if k != "hyperparameters" and saved.get(k) != settings.get(k)]
    old, new = saved.get("hyperparameters") or {}, settings.get("hyperparameters") or {}
    fields = sorted(set(old) | set(new))
    return out + [f"hyperparameters.{k}" for k in fields if old.get(k, ...) != new.get(k, ...)]


def saved_key(path: Path) -> dict | None:
    """The key (`study.settings`) a cell folder's run was saved with, None without one."""
    config = path / "config.json"
    return (
        json.loads(config.read_text()).get("study", {}).get("settings") if config.exists() else None
    )
