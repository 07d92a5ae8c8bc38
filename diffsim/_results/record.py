"""The JSON record of a run (`run.config`): what ran, on what, how long it took; with the
strategy's hyperparameters flattened so that a study's key does not depend on how its
settings are grouped."""

import dataclasses
import json
from typing import Any

import equinox as eqx

from .provenance import machine, versions


def hyperparameters(strategy) -> dict:
    """The strategy's fields as plain JSON values (what `run.config["hyperparameters"]`
    records). The fields of a settings module it holds (`diffsim.WindowOptions`,
    `diffsim.UpdateOptions`) count as its own, under their own names, and a module held as
    a field (GuidedES's `gradient`) is written as its repr with them flattened the same
    way: a study's key does not depend on how the settings are grouped.

    **Example:**

    ```python
    hyperparameters(diffsim.PPO())["learning_rate"]   # 0.0003
    hyperparameters(diffsim.SHAC())["remat"]           # False (SHAC().options.remat)
    ```
    """
    fields = {name: _jsonable(value) for name, value, _ in _flat_fields(strategy)}
    return json.loads(json.dumps(fields))


def _flat_fields(module) -> list[tuple[str, Any, Any]]:
    """`(name, value, default)` of each field of the dataclass `module`, those of a
    settings module (`_window.options.held`) in its place."""
    settings = _held(type(module))
    flat = []
    for field in dataclasses.fields(module):
        value = getattr(module, field.name)
        if field.name in settings:
            flat += _flat_fields(value)
        else:
            flat.append((field.name, value, field.default))
    return flat


def _held(cls: type) -> dict[str, type]:
    """`_window.options.held(cls)`: the settings modules `cls` holds, by field name."""
    from ..strategies._window.options import held  # (strategies load Brax: not before)

    return held(cls)


def _holds_options(value) -> bool:
    """Whether `value` is a dataclass instance that holds a settings module."""
    return (
        dataclasses.is_dataclass(value) and not isinstance(value, type) and bool(_held(type(value)))
    )


def _flat_repr(module) -> str:
    """`repr(module)` (equinox's: fields at their default left out, by identity) with the
    fields of its settings modules in their place."""
    shown = [(name, value) for name, value, default in _flat_fields(module) if value is not default]
    flat = dataclasses.make_dataclass(type(module).__name__, [name for name, _ in shown])
    return eqx.tree_pformat(flat(*[value for _, value in shown]))


def run_config(
    strategy,
    env,
    budget: dict,
    *,
    num_eval_episodes,
    num_seeds,
    compile_seconds,
    train_seconds,
    eval_seconds=0.0,
    checkpoint_seconds=0.0,
    mesh=None,
) -> dict:
    """The JSON-able record of a run: what ran, on what, how long it took.

    `budget`: `total_steps` (what ran), `total_steps_requested`, `num_evals`,
    `steps_per_iteration`, `iterations`. `mesh`: devices per axis (`{"seeds": s, "batch":
    b}`) when the run was split over several devices, else None."""
    return {
        "strategy": type(strategy).__name__,
        "hyperparameters": hyperparameters(strategy),
        "env": env.name,
        "backend": env.backend,
        "episode_length": env.episode_length,
        "env_spec": getattr(env, "spec", None),  # how to build it again: `Run.make_env`
        **budget,
        "num_eval_episodes": num_eval_episodes,
        "num_seeds": num_seeds,
        "compile_seconds": round(compile_seconds, 3),
        "train_seconds": round(train_seconds, 3),
        "eval_seconds": round(eval_seconds, 3),
        "checkpoint_seconds": round(checkpoint_seconds, 3),
        "versions": versions(),
        "machine": machine(),
        "mesh": mesh,
    }


def _jsonable(value):
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    if isinstance(value, (tuple, list)):
        return [_jsonable(v) for v in value]
    if isinstance(value, type):
        return value.__name__
    if _holds_options(value):
        return _flat_repr(value)
    return getattr(value, "__name__", repr(value))
