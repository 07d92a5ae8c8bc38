"""`Run`: the result of `train` / `train_seeds` / `train_sweep`, and its round trip to a
folder of data (`Run.save`, `load_run`), with the tables in `files`."""

import json
import os
import warnings
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
from jaxtyping import Array

from .. import _structure
from .._types import LearningCurve
from .files import (
    AtomicFile,
    atomic_write,
    curve_csv,
    metrics_csv,
    read_curve,
    read_table,
)


class Run(eqx.Module):
    """One training run, or a batch of seeds with a leading seed axis on every array (a
    `train_sweep` run: leading `(configs, seeds)` axes).

    **Fields:**

    - `policy`: the final policy (`eqx.Module`; leaves `[S, ...]` from `train_seeds`).
    - `curve`: the `LearningCurve`.
    - `metrics`: per-iteration training metrics, `Float[Array, "*runs iterations"]` each.
    - `config`: plain-JSON description: strategy hyperparameters, env, budget, versions,
      `compile_seconds`, `train_seeds`... `config["env_spec"]` records how to build the
      env again (`make_env`'s arguments; a class of your own by its import path).

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
          `numpy.genfromtxt(..., delimiter=",", names=True)`. A `train_sweep` run has one
          row per (config, seed, evaluation point), with a `config` column first.
        - `metrics.csv`: one row per (seed, iteration), or (config, seed, iteration).
        - `policy.eqx`: the policy's arrays (Equinox leaf serialisation, plain `.npy` data).
        - `policy.json`: the policy's structure as data (classes by allow-listed name,
          static fields, array shapes; see `diffsim.register_policy`). No pickle: opening
          the folder with `load_run` runs no code from it. A policy holding something that
          cannot be named (a lambda) gets no `policy.json`, with a warning; load it with
          `load_run(path, like=policy)`.
        """
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        atomic_write(path / "curve.csv", curve_csv(self.curve).encode())
        atomic_write(path / "metrics.csv", metrics_csv(self.metrics).encode())
        try:
            structure = {"format": _structure.FORMAT, "policy": _structure.encode(self.policy)}
        except TypeError as error:
            structure = None
            warnings.warn(
                f"saving {path} without policy.json: {error}. Load it with"
                " diffsim.load_run(path, like=<a policy of the same structure>)",
                stacklevel=2,
            )
        for stale in ("policy.pkl", "policy.json"):  # an older save into the same folder
            (path / stale).unlink(missing_ok=True)
        if structure is not None:
            atomic_write(path / "policy.json", json.dumps(structure, indent=1).encode())
        with AtomicFile(path / "policy.eqx") as f:
            eqx.tree_serialise_leaves(f, self.policy)
        # Last, so a folder with config.json holds a complete run (what study resumes on).
        atomic_write(path / "config.json", json.dumps(self.config, indent=2).encode())
        return path

    def make_env(self):
        """The env this run trained on, built again from `config["env_spec"]`
        (`diffsim.envs.from_config`). For an env class of your own this imports the module
        the run recorded (`"MODULE:CLASS"`, which must be importable here): the one piece
        of code a saved run can make Python run, and only when this method is called.

        **Example:**

        ```python
        run = diffsim.load_run("results/my_run")
        returns = diffsim.evaluate(run.make_env(), run.policy, key=jax.random.key(0))
        ```
        """
        from ..envs import from_config

        return from_config(self.config)


def load_run(path: str | os.PathLike, *, like: eqx.Module | None = None) -> Run:
    """Read a `Run` written by `Run.save`, exactly (float32 values round-trip bit for bit).

    **Arguments:**

    - `path`: the folder.
    - `like`: a policy of the same structure, used instead of the folder's `policy.json`.
      Needed for a policy whose classes are not registered (`diffsim.register_policy`) or
      that was saved without `policy.json`, and for folders in the old format (whose
      structure is a pickle, `policy.pkl`). A policy of one seed is enough for a run of many
      seeds: it is broadcast over the run's seed axes.

    Only data is read: classes and functions named in `policy.json` must be on
    diffsim's allow-list or registered, so opening a folder someone shared runs none of
    its code. A `policy.pkl` is never unpickled.

    **Raises:** `ValueError` for a folder in the old format, a name that is not
    allow-listed, or arrays that do not fit the structure.

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
    curve = read_curve(path / "curve.csv", seeded)
    if like is None:
        skeletons = [_policy_structure(path)]
    else:  # as given, or one seed's policy broadcast over the run's seed (sweep) axes
        lead = tuple(curve.eval_return.shape[:-2])
        skeletons = [like, _broadcast(like, lead)] if lead else [like]
    policy = _read_policy(path / "policy.eqx", skeletons)
    metrics = read_table(path / "metrics.csv", seeded, index="iteration")
    return Run(policy=policy, curve=curve, metrics=metrics, config=config)


def _policy_structure(path: Path) -> eqx.Module:
    """The abstract policy `policy.json` describes (arrays as `ShapeDtypeStruct`s)."""
    if (path / "policy.json").exists():
        data = json.loads((path / "policy.json").read_text())
        if not isinstance(data, dict) or data.get("format") != _structure.FORMAT:
            raise ValueError(
                f"{path}/policy.json is not a diffsim policy structure"
                f" (format {data.get('format') if isinstance(data, dict) else None!r},"
                f" expected {_structure.FORMAT!r})"
            )
        return _structure.decode(data["policy"])
    if (path / "policy.pkl").exists():
        raise ValueError(
            f"{path} is in diffsim's old format: its policy structure is a pickle"
            " (policy.pkl), which load_run does not open because unpickling runs code from"
            " the folder. If you trust it, pass like=<a policy of the same structure>, e.g."
            " load_run(path, like=diffsim.GaussianPolicy(obs_size, action_size,"
            " key=jax.random.key(0))); run.save(path) then rewrites it in the new format"
        )
    raise ValueError(
        f"{path} has no policy.json (its policy could not be stored as data when saved):"
        " pass like=<a policy of the same structure>"
    )


def _read_policy(file: Path, skeletons: list):
    """The arrays in `file` put into the first skeleton they fit (shapes, dtypes, count).
    `np.load` without pickles: an object array in the file is an error, not code."""
    for skeleton in skeletons[:-1]:
        try:
            return eqx.tree_deserialise_leaves(file, skeleton)
        except (ValueError, RuntimeError, OSError, EOFError):
            continue
    try:
        return eqx.tree_deserialise_leaves(file, skeletons[-1])
    except (ValueError, RuntimeError, OSError, EOFError) as error:
        raise ValueError(f"{file} does not fit the policy's structure: {error}") from error


def _broadcast(like, lead: tuple[int, ...]):
    """`like` with abstract arrays that have the leading axes `lead`."""
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct((*lead, *x.shape), x.dtype) if eqx.is_array(x) else x,
        like,
    )
