"""Checkpoints of a training run in progress: the full carry and the curve so far.

A checkpoint is a folder `ckpt-<evaluation index>` written as `ckpt-<i>.tmp` and renamed
when complete, so a process killed mid-write leaves the previous checkpoint intact.
`_before_rename` marks the last moment of a write, for tests to fail or kill there.
"""

import json
import os
import shutil
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np


def _is_key(x) -> bool:
    return jnp.issubdtype(x.dtype, jax.dtypes.prng_key)


def key_data(x) -> np.ndarray:
    """`x` as a plain array: the raw data of a typed PRNG key array, else `x` itself."""
    return np.asarray(jr.key_data(x) if _is_key(x) else x)


def check_writable(path: str | os.PathLike) -> Path:
    """Create `path` if needed and prove a file can be written there, or raise OSError."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write-test"
        probe.write_bytes(b"0" * 4096)
        probe.unlink()
    except OSError as error:
        raise OSError(f"cannot write to {path}: {error.strerror or error}") from error
    return path


def save(root: Path, index: int, carry, history: dict[str, Any], meta: dict) -> Path:
    """Write checkpoint `index` (the carry after that evaluation, and the history).

    A write that fails (disk full, folder gone) removes its partial folder and raises an
    `OSError` naming the newest checkpoint that is still complete."""
    final = root / f"ckpt-{index:06d}"
    tmp = root / f"ckpt-{index:06d}.tmp"
    try:
        _write(tmp, carry, history, {**meta, "index": index})
        _before_rename(tmp, index)
        os.replace(tmp, final)
    except OSError as error:
        shutil.rmtree(tmp, ignore_errors=True)
        kept = latest(root)
        raise OSError(
            f"could not write checkpoint {index} to {root}: {error.strerror or error};"
            f" the newest complete checkpoint is {kept.name if kept else 'none'}"
        ) from error
    for old in root.glob("ckpt-*"):
        if old != final and not old.name.endswith(".tmp"):
            shutil.rmtree(old, ignore_errors=True)
    return final


def _before_rename(tmp: Path, index: int) -> None:
    """Called when checkpoint `index` is written and synced in `tmp`, before the rename that
    makes it complete. Does nothing: a fault-injection point, which tests replace to raise
    (an `OSError` takes `save`'s clean-up path) or to kill the process inside a write."""
    del tmp, index


def _write(tmp: Path, carry, history: dict[str, Any], meta: dict) -> None:
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    leaves = jax.tree.leaves(carry)
    keys = [str(jr.key_impl(x)) if _is_key(x) else "" for x in leaves]
    arrays: dict[str, Any] = {f"leaf_{i}": key_data(x) for i, x in enumerate(leaves)}
    np.savez(tmp / "carry.npz", **arrays)
    arrays = {k: np.asarray(v) for k, v in history.items()}
    np.savez(tmp / "history.npz", **arrays)
    (tmp / "meta.json").write_text(json.dumps({**meta, "key_impls": keys}))
    for f in tmp.iterdir():  # durable before the rename makes it visible
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())


def latest(root: Path) -> Path | None:
    done = sorted(p for p in Path(root).glob("ckpt-*") if not p.name.endswith(".tmp"))
    return done[-1] if done else None


def load(root: str | os.PathLike, carry_like, meta: dict) -> tuple[Any, dict[str, np.ndarray], int]:
    """The newest complete checkpoint under `root`: (carry, history, evaluation index)."""
    path = latest(Path(root))
    if path is None:
        raise FileNotFoundError(f"no complete checkpoint (ckpt-*/) in {root}")
    saved = json.loads((path / "meta.json").read_text())
    index, impls = saved.pop("index"), saved.pop("key_impls")
    if saved != meta:
        diff = {
            k: (saved.get(k), meta.get(k))
            for k in set(saved) | set(meta)
            if saved.get(k) != meta.get(k)
        }
        raise ValueError(f"checkpoint {path} is from a different run (saved vs now): {diff}")
    likes, treedef = jax.tree.flatten(carry_like)
    with np.load(path / "carry.npz") as data:
        leaves = [data[f"leaf_{i}"] for i in range(len(likes))]
    leaves = [
        jr.wrap_key_data(x, impl=impl) if impl else jax.numpy.asarray(x, like.dtype)
        for x, like, impl in zip(leaves, likes, impls, strict=True)
    ]
    with np.load(path / "history.npz") as data:
        history = {k: data[k] for k in data.files}
    return jax.tree.unflatten(treedef, leaves), history, index
