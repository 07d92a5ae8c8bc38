"""Where a result came from: the commit, package versions and machine (`provenance`), and
the check that a results table is written from a clean commit (`require_clean`).
Re-exported by `diffsim.results`."""

import datetime
import os
import platform
import socket
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

import jax

PACKAGES = ("diffsim", "jax", "jaxlib", "brax", "mujoco", "equinox", "optax", "evosax")
# Folders the studies write into: their changes do not make a tree "dirty" for provenance.
OUTPUTS = ("results/", "figures/")


def versions() -> dict[str, str]:
    """The installed versions of diffsim and the packages its numbers depend on.

    **Example:**

    ```python
    versions()["jax"]   # e.g. "0.10.2"; "not installed" for a missing package
    ```
    """
    out = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def machine() -> dict[str, Any]:
    """The machine a result came from: CPU model and logical core count, host name,
    platform, Python, and the accelerators JAX sees (`jax.devices()`).

    **Example:**

    ```python
    machine()["accelerator"]   # e.g. ["TFRT_CPU_0"] or ["cuda:0"]
    ```
    """
    devices = jax.devices()
    return {
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "host": socket.gethostname(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "accelerator": [str(d) for d in devices],
        "device_kind": devices[0].device_kind if devices else None,
    }


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def provenance(repo: str | os.PathLike | None = None) -> dict[str, Any]:
    """Where a results table comes from: the git commit, whether the tree was dirty, the
    package versions (`versions`), the machine (`machine`) and the date.

    **Arguments:** `repo`: a folder inside the git checkout (default: the one holding
    this diffsim package, i.e. the repository whose `studies/` wrote the result).

    **Returns:** a plain-JSON dict: `commit` (full hash, None outside a git checkout),
    `dirty` (True when tracked or untracked files other than the study outputs under
    `results/` and `figures/` differ from the commit; None outside a checkout),
    `changed` (up to 20 of those paths), `date` (UTC, ISO 8601), `versions`, `machine`.

    **Example:**

    ```python
    prov = diffsim.results.provenance()
    prov["commit"][:7], prov["dirty"], prov["versions"]["brax"]
    ```
    """
    root = Path(repo) if repo is not None else Path(__file__).resolve().parent.parent
    commit, changed = _git_state(root)
    return {
        "commit": commit,
        "dirty": None if commit is None else bool(changed),
        "changed": changed[:20],
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "versions": versions(),
        "machine": machine(),
    }


def _git_state(root: Path) -> tuple[str | None, list[str]]:
    """(HEAD's hash, the changed paths outside `OUTPUTS`), or (None, []) outside git."""

    def git(*args: str) -> str:
        done = subprocess.run(
            ["git", "-C", str(root), *args], capture_output=True, text=True, timeout=30
        )
        if done.returncode != 0:
            raise OSError(done.stderr.strip())
        return done.stdout

    try:
        commit = git("rev-parse", "HEAD").strip()
        status = git("status", "--porcelain", "--untracked-files=all")
    except (OSError, subprocess.SubprocessError):
        return None, []
    paths = [line[3:].split(" -> ")[-1].strip('"') for line in status.splitlines()]
    return commit, [p for p in paths if p and not p.startswith(OUTPUTS)]


class DirtyTreeError(RuntimeError):
    """A study asked to write a table that README quotes from a tree that is not a clean
    commit (see `require_clean`)."""


def require_clean(*, allow_dirty: bool = False, repo: str | os.PathLike | None = None) -> dict:
    """`provenance(repo)`, after checking that the tree is a clean git commit.

    Studies call it before training, so that a table README quotes names a commit that
    holds the code which wrote it. Changes under `results/` and `figures/` (what studies
    write) do not count.

    **Raises:** `DirtyTreeError` listing the changed files (or saying the folder is not a
    git checkout), unless `allow_dirty` (a study's `--allow-dirty`); the provenance then
    records `dirty: True`.

    **Example:**

    ```python
    prov = diffsim.results.require_clean(allow_dirty=args.allow_dirty)
    ```
    """
    prov = provenance(repo)
    if prov["dirty"] is not False and not allow_dirty:
        where = (
            "this is not a git checkout, so the table could not name its commit"
            if prov["commit"] is None
            else f"uncommitted changes: {', '.join(prov['changed'])}"
        )
        raise DirtyTreeError(
            f"refusing to write a results table from a dirty tree ({where}). Commit the"
            " changes first, or pass --allow-dirty (the table then records dirty: true)"
        )
    return prov
