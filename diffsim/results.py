"""`Run`: the result of `train` / `train_seeds`, and its round trip to a folder."""

import contextlib
import dataclasses
import json
import os
import pickle
import platform
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array

from ._types import LearningCurve


class Run(eqx.Module):
    """One training run, or a batch of seeds with a leading seed axis on every array.

    **Fields:**

    - `policy`: the final policy (`eqx.Module`; leaves `[S, ...]` from `train_seeds`).
    - `curve`: the `LearningCurve`.
    - `metrics`: per-iteration training metrics, `Float[Array, "*seeds iterations"]` each.
    - `config`: plain-JSON description: strategy hyperparameters, env, budget, versions,
      `compile_seconds`, `train_seeds`...

    **Example:**

    ```python
    run.save("results/my_run")
    same = diffsim.load_run("results/my_run")
    ```
    """

    policy: eqx.Module
    curve: LearningCurve
    metrics: dict[str, Array]
    config: dict[str, Any]

    def save(self, path: str | os.PathLike) -> Path:
        """Write the run to the folder `path` (created if needed); returns the path.

        Files, each written atomically (temp file + rename), `config.json` last so that
        its presence marks a complete run:

        - `config.json`: `config`.
        - `curve.csv`: one row per (seed, evaluation point): `seed, env_steps, wall_time,
          return_mean, return_0, return_1, ...`; readable by `pandas.read_csv` and
          `numpy.genfromtxt(..., delimiter=",", names=True)`.
        - `metrics.csv`: one row per (seed, iteration).
        - `policy.eqx` (Equinox leaf serialisation) and `policy.pkl` (its structure).
        """
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        _atomic_write(path / "curve.csv", _curve_csv(self.curve).encode())
        _atomic_write(path / "metrics.csv", _metrics_csv(self.metrics).encode())
        skeleton = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype) if eqx.is_array(x) else x, self.policy
        )
        # An unpicklable user module is fine: load_run(path, like=policy) still works.
        with contextlib.suppress(pickle.PicklingError, AttributeError, TypeError):
            _atomic_write(path / "policy.pkl", pickle.dumps(skeleton))
        with _atomic_file(path / "policy.eqx") as f:
            eqx.tree_serialise_leaves(f, self.policy)
        # Last, so a folder with config.json holds a complete run (what study resumes on).
        _atomic_write(path / "config.json", json.dumps(self.config, indent=2).encode())
        return path


def load_run(path: str | os.PathLike, *, like: eqx.Module | None = None) -> Run:
    """Read a `Run` written by `Run.save`, exactly (float32 values round-trip bit for bit).

    **Arguments:**

    - `path`: the folder.
    - `like`: a policy of the same structure, needed only when the policy's structure
      could not be pickled (a user module holding an unpicklable function).

    **Example:**

    ```python
    run = diffsim.load_run("results/my_run")
    action = run.policy(obs)
    ```
    """
    path = Path(path)
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"{path} holds no saved run (no config.json)")
    config = json.loads((path / "config.json").read_text())
    seeded = config.get("num_seeds") is not None
    if like is None:
        if not (path / "policy.pkl").exists():
            raise ValueError(
                f"{path}/policy.pkl is missing: pass like=<a policy of the same structure>"
            )
        like = pickle.loads((path / "policy.pkl").read_bytes())
    like = jax.tree.map(
        lambda x: jnp.zeros(x.shape, x.dtype) if isinstance(x, jax.ShapeDtypeStruct) else x, like
    )
    policy = eqx.tree_deserialise_leaves(path / "policy.eqx", like)
    curve = _read_curve(path / "curve.csv", seeded)
    metrics = _read_table(path / "metrics.csv", seeded, index="iteration")
    return Run(policy=policy, curve=curve, metrics=metrics, config=config)


def run_config(
    strategy, env, plan, *, num_eval_episodes, num_seeds, compile_seconds, train_seconds, mesh
) -> dict:
    """The JSON-able record of a run: what ran, on what, how long it took.

    `mesh`: devices per axis (`{"seeds": s, "batch": b}`) when the run was split over
    several devices, else None."""
    hyper = {f.name: _jsonable(getattr(strategy, f.name)) for f in dataclasses.fields(strategy)}
    return {
        "strategy": type(strategy).__name__,
        "hyperparameters": hyper,
        "env": env.name,
        "backend": env.backend,
        "episode_length": env.episode_length,
        "total_steps": plan.total_steps,
        "num_evals": plan.num_evals,
        "steps_per_iteration": plan.steps_per_iteration,
        "iterations": (plan.num_evals - 1) * plan.iterations_per_eval,
        "num_eval_episodes": num_eval_episodes,
        "num_seeds": num_seeds,
        "compile_seconds": round(compile_seconds, 3),
        "train_seconds": round(train_seconds, 3),
        "versions": versions(),
        "machine": {"platform": platform.platform(), "devices": [str(d) for d in jax.devices()]},
        "mesh": mesh,
    }


def versions() -> dict[str, str]:
    out = {}
    for name in ("diffsim", "jax", "jaxlib", "brax", "equinox", "optax", "evosax"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def _jsonable(value):
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    if isinstance(value, (tuple, list)):
        return [_jsonable(v) for v in value]
    if isinstance(value, type):
        return value.__name__
    return getattr(value, "__name__", repr(value))


class _atomic_file:
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
            os.replace(self.tmp, self.target)
        else:
            os.unlink(self.tmp)


def _atomic_write(target: Path, data: bytes) -> None:
    with _atomic_file(target) as f:
        f.write(data)


def _seed_rows(array: np.ndarray, seeded: bool) -> np.ndarray:
    return array if seeded else array[None]


def _curve_csv(curve: LearningCurve) -> str:
    seeded = curve.eval_return.ndim == 3
    steps, times, returns = (
        _seed_rows(np.asarray(x), seeded)
        for x in (curve.env_steps, curve.wall_time, curve.eval_return)
    )
    n = returns.shape[-1]
    lines = ["seed,env_steps,wall_time,return_mean," + ",".join(f"return_{i}" for i in range(n))]
    for s in range(returns.shape[0]):
        for e in range(returns.shape[1]):
            values = [repr(float(v)) for v in returns[s, e]]
            mean = repr(float(returns[s, e].mean()))
            lines.append(
                f"{s},{int(steps[s, e])},{float(times[s, e])!r},{mean}," + ",".join(values)
            )
    return "\n".join(lines) + "\n"


def _metrics_csv(metrics: dict[str, Array]) -> str:
    names = sorted(metrics)
    if not names:
        return "seed,iteration\n"
    seeded = metrics[names[0]].ndim == 2
    cols = [_seed_rows(np.asarray(metrics[k]), seeded) for k in names]
    lines = ["seed,iteration," + ",".join(names)]
    for s in range(cols[0].shape[0]):
        for i in range(cols[0].shape[1]):
            lines.append(f"{s},{i}," + ",".join(repr(float(c[s, i])) for c in cols))
    return "\n".join(lines) + "\n"


def _read_columns(path: Path) -> dict[str, np.ndarray]:
    table = np.genfromtxt(path, delimiter=",", names=True, dtype=np.float64, ndmin=1)
    return {name: np.atleast_1d(table[name]) for name in table.dtype.names}


def _by_seed(column: np.ndarray, seeds: np.ndarray, seeded: bool) -> np.ndarray:
    num = int(seeds.max()) + 1 if len(seeds) else 1
    out = column.reshape(num, -1, *column.shape[1:])
    return out if seeded else out[0]


def _read_curve(path: Path, seeded: bool) -> LearningCurve:
    cols = _read_columns(path)
    seeds = cols["seed"]
    episodes = np.stack(
        [cols[k] for k in cols if k.startswith("return_") and k != "return_mean"], -1
    )
    return LearningCurve(
        env_steps=jnp.asarray(_by_seed(cols["env_steps"].astype(np.int32), seeds, seeded)),
        wall_time=jnp.asarray(_by_seed(cols["wall_time"].astype(np.float32), seeds, seeded)),
        eval_return=jnp.asarray(_by_seed(episodes.astype(np.float32), seeds, seeded)),
    )


def _read_table(path: Path, seeded: bool, index: str) -> dict[str, Array]:
    cols = _read_columns(path)
    seeds = cols.pop("seed")
    cols.pop(index)
    return {k: jnp.asarray(_by_seed(v.astype(np.float32), seeds, seeded)) for k, v in cols.items()}
