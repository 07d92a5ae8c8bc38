"""A saved run's files: atomic writes (a temp file, then a rename) and the CSV tables of
its curve and metrics, one row per evaluation or iteration and run."""

import os
import tempfile
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
from jaxtyping import Array

from .._types import LearningCurve


class AtomicFile:
    """Write to a temp file in the same folder, then rename over the target."""

    def __init__(self, target: Path):
        self.target = target

    def __enter__(self):
        fd, self.tmp = tempfile.mkstemp(dir=self.target.parent, prefix=f".{self.target.name}.")
        self.file = os.fdopen(fd, "wb")
        return self.file

    def __exit__(self, exc_type, *_):
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        if exc_type is None:
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(self.tmp, 0o666 & ~umask)  # mkstemp's 0600 would hide a shared run
            os.replace(self.tmp, self.target)
        else:
            os.unlink(self.tmp)


def atomic_write(target: Path, data: bytes) -> None:
    with AtomicFile(target) as f:
        f.write(data)


def index_columns(runs: tuple[int, ...]) -> list[str]:
    """The columns that say which run a row belongs to: `config, seed` for a sweep's
    `(configs, seeds)` axes, else `seed` (0 for a single run)."""
    return ["config", "seed"] if len(runs) == 2 else ["seed"]


def run_indices(runs: tuple[int, ...]) -> list[tuple[int, ...]]:
    """Each run's index values, in row order (a single run is seed 0)."""
    return [index or (0,) for index in np.ndindex(runs)]


def curve_csv(curve: LearningCurve) -> str:
    returns = np.asarray(curve.eval_return)
    runs, (points, n) = returns.shape[:-2], returns.shape[-2:]
    steps, times = (np.asarray(x).reshape(-1, points) for x in (curve.env_steps, curve.wall_time))
    returns = returns.reshape(-1, points, n)
    header = [*index_columns(runs), "env_steps", "wall_time", "return_mean"]
    lines = [",".join(header + [f"return_{i}" for i in range(n)])]
    for r, index in enumerate(run_indices(runs)):
        at = ",".join(map(str, index))
        for e in range(points):
            values = [repr(float(v)) for v in returns[r, e]]
            mean = repr(float(returns[r, e].mean()))
            lines.append(
                f"{at},{int(steps[r, e])},{float(times[r, e])!r},{mean}," + ",".join(values)
            )
    return "\n".join(lines) + "\n"


def metrics_csv(metrics: dict[str, Array]) -> str:
    names = sorted(metrics)
    if not names:
        return "seed,iteration\n"
    runs = np.shape(metrics[names[0]])[:-1]
    cols = [np.asarray(metrics[k]).reshape(-1, np.shape(metrics[k])[-1]) for k in names]
    lines = [",".join([*index_columns(runs), "iteration", *names])]
    for r, index in enumerate(run_indices(runs)):
        at = ",".join(map(str, index))
        for i in range(cols[0].shape[1]):
            lines.append(f"{at},{i}," + ",".join(repr(float(c[r, i])) for c in cols))
    return "\n".join(lines) + "\n"


def read_columns(path: Path) -> dict[str, np.ndarray]:
    table: Any = np.genfromtxt(path, delimiter=",", names=True, dtype=np.float64, ndmin=1)
    return {name: np.atleast_1d(table[name]) for name in table.dtype.names}


def run_shape(cols: dict[str, np.ndarray], seeded: bool) -> tuple[int, ...]:
    """The leading run axes of a table (removing its index columns): `(configs, seeds)`
    for a sweep, `(seeds,)` for `train_seeds`, `()` for one run."""
    seeds = cols.pop("seed")
    num = int(seeds.max()) + 1 if len(seeds) else 1
    if "config" in cols:
        configs = cols.pop("config")
        return (int(configs.max()) + 1 if len(configs) else 1, num)
    return (num,) if seeded else ()


def by_run(column: np.ndarray, runs: tuple[int, ...]) -> np.ndarray:
    return column.reshape(*runs, -1, *column.shape[1:])


def read_curve(path: Path, seeded: bool) -> LearningCurve:
    cols = read_columns(path)
    runs = run_shape(cols, seeded)
    episodes = np.stack(
        [cols[k] for k in cols if k.startswith("return_") and k != "return_mean"], -1
    )
    return LearningCurve(
        env_steps=jnp.asarray(by_run(cols["env_steps"].astype(np.int32), runs)),
        wall_time=jnp.asarray(by_run(cols["wall_time"].astype(np.float32), runs)),
        eval_return=jnp.asarray(by_run(episodes.astype(np.float32), runs)),
    )


def read_table(path: Path, seeded: bool, index: str) -> dict[str, Array]:
    cols = read_columns(path)
    runs = run_shape(cols, seeded)
    cols.pop(index)
    return {k: jnp.asarray(by_run(v.astype(np.float32), runs)) for k, v in cols.items()}
