"""`select_run`: one configuration, or one seed, out of a sweep or seed run."""

from collections.abc import Mapping
from typing import Any

import equinox as eqx
import jax
import numpy as np

from .run import Run


def run_axes(run: Run) -> tuple[str, ...]:
    """The names of a run's leading axes: `()` for one run (`train`), `("seed",)` for
    `train_seeds`, `("config", "seed")` for `train_sweep`.

    **Example:** `run_axes(sweep_run) == ("config", "seed")`.
    """
    lead = np.ndim(run.curve.eval_return) - 2
    return (("config", "seed"), ("seed",), ())[2 - lead] if 0 <= lead <= 2 else ()


def select_run(
    run: Run, *, config: int | Mapping[str, float] | None = None, seed: int | None = None
) -> Run:
    """One configuration, or one seed (or both), out of a sweep or seed run.

    Every array of the run (the policy, the curve, the metrics) is indexed on its leading
    axes, and `run.config` is rewritten to describe what is left, so the result saves and
    loads like a run trained that way (`select_run(...).save(p)` then `load_run(p)` gives
    it back):

    - `config=c` on a `train_sweep` run (axes `(C, S)`) gives a `train_seeds`-like run
      (axes `(S,)`) whose `config["hyperparameters"]` hold config `c`'s values.
    - `seed=s` on a `train_seeds` run (axes `(S,)`) gives a single run (no leading axis);
      on a sweep it keeps the seed axis with length 1 (axes `(C, 1)`).
    - Both at once on a sweep give a single run.

    `config["selected"]` records what was picked: `{"config": c, "seed": s}`.

    **Arguments:**

    - `run`: from `train_seeds` or `train_sweep` (or loaded with `load_run`).
    - `config`: the index of a configuration in `run.config["sweep"]`, or a dict of swept
      values that matches exactly one of them (`{"learning_rate": 1e-3}`; values are
      compared with a relative tolerance of 1e-6).
    - `seed`: the index of a seed, in `[0, S)`.

    **Raises:** `ValueError` naming the bad value and the valid ones: an index out of
    range, a value or name not in the sweep, a dict that matches several configurations,
    or a `config` for a run that is not a sweep (a `seed` for a single run).

    **Example:**

    ```python
    sweep = diffsim.train_sweep(diffsim.APG(), env, policy,
                                sweep={"learning_rate": [1e-3, 3e-3]}, keys=keys, total_steps=50_000)
    best = diffsim.select_run(sweep, config={"learning_rate": 3e-3})   # axes (seeds,)
    one = diffsim.select_run(sweep, config=1, seed=0)                  # a single run
    one.curve.eval_return.shape                                        # (E, episodes)
    ```
    """
    axes = run_axes(run)
    picked: dict[str, Any] = dict(run.config.get("selected") or {})
    index: list[Any] = [slice(None)] * len(axes)
    new = dict(run.config)
    if config is not None:
        if "config" not in axes:
            raise ValueError(
                f"config={config!r}, but this run is not a sweep (its leading axes are"
                f" {axes or 'none'}); only a train_sweep run has configurations"
            )
        c = _config_index(run, config)
        index[0] = c
        picked["config"] = c
        _to_one_config(new, c)
    if seed is not None:
        if "seed" not in axes:
            raise ValueError(
                f"seed={seed!r}, but this is a single run (no seed axis); only runs of"
                f" train_seeds or train_sweep have seeds"
            )
        num = np.shape(run.curve.eval_return)[axes.index("seed")]
        s = _index("seed", seed, num)
        keep = "config" in axes and config is None  # a sweep keeps its seed axis, length 1
        index[axes.index("seed")] = slice(s, s + 1) if keep else s
        picked["seed"] = s
        new["num_seeds"] = 1 if keep else None
    new["selected"] = picked
    at = tuple(index)
    pick = lambda x: x[at] if eqx.is_array(x) else x
    return Run(
        policy=jax.tree.map(pick, run.policy),
        curve=jax.tree.map(pick, run.curve),
        metrics={k: v[at] for k, v in run.metrics.items()},
        config=new,
    )


def _index(what: str, value, size: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{what} must be an int index in [0, {size}), got {value!r}")
    if not 0 <= value < size:
        raise ValueError(f"{what}={value} is out of range: this run has {size} {what}s [0, {size})")
    return int(value)


def _config_index(run: Run, config: int | Mapping[str, float]) -> int:
    listing: list[dict[str, float]] = run.config["sweep"]
    if not isinstance(config, Mapping):
        return _index("config", config, len(listing))
    names = list(listing[0])
    unknown = [name for name in config if name not in names]
    if unknown:
        raise ValueError(
            f"config={dict(config)!r} names {unknown[0]!r}, which the sweep does not vary;"
            f" it varies: {', '.join(names)}"
        )
    same = lambda a, b: bool(np.isclose(float(a), float(b), rtol=1e-6, atol=0.0))
    found = [
        c
        for c, values in enumerate(listing)
        if all(same(values[name], value) for name, value in config.items())
    ]
    if len(found) != 1:
        what = "matches no configuration" if not found else f"matches {len(found)} configurations"
        raise ValueError(
            f"config={dict(config)!r} {what}; the sweep's configurations are {listing}"
            + ("" if not found else ": give a value for every swept name, or an index")
        )
    return found[0]


def _to_one_config(config: dict, c: int) -> None:
    """`config` (a sweep's) rewritten in place to describe its configuration `c` alone."""
    values = config.pop("sweep")[c]
    config.pop("num_configs", None)
    config["hyperparameters"] = {**config["hyperparameters"], **values}
