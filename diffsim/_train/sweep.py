"""`train_sweep`'s grid: validating a sweep before anything compiles, and the runs it makes."""

import dataclasses
import itertools
import re
import typing
from collections.abc import Mapping, Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from ..results import Run
from ..strategies.base import AbstractStrategy


class Grid(eqx.Module):
    """A sweep's combinations: `configs[c][j]` is the value of `names[j]` in config `c`."""

    names: tuple[str, ...]
    configs: tuple[tuple[float, ...], ...]

    def listing(self) -> list[dict[str, float]]:
        """One dict per config, in the order of the config axis."""
        return [dict(zip(self.names, values, strict=True)) for values in self.configs]

    def per_run(self, num_seeds: int) -> dict[str, Float[Array, " runs"]]:
        """Each swept value for every run (config-major: run `c * num_seeds + s`), weakly
        typed like the Python floats they stand for, so dtypes come out as in `train`."""
        return {
            name: jnp.stack([jnp.asarray(c[j]) for c in self.configs for _ in range(num_seeds)])
            for j, name in enumerate(self.names)
        }

    def unflatten(self, run: Run, lead: tuple[int, int]) -> Run:
        """`run` (a flat batch of runs) with `(configs, seeds)` leading axes and the sweep
        recorded in its config."""
        split = lambda x: x.reshape(*lead, *x.shape[1:]) if eqx.is_array(x) else x
        config = dict(run.config, sweep=self.listing(), num_configs=len(self.configs))
        config["hyperparameters"] = dict(config["hyperparameters"])
        for j, name in enumerate(self.names):  # one value per config
            config["hyperparameters"][name] = [c[j] for c in self.configs]
        return Run(
            policy=jax.tree.map(split, run.policy),
            curve=jax.tree.map(split, run.curve),
            metrics=jax.tree.map(split, run.metrics),
            config=config,
        )

    def untraceable(self, strategy: AbstractStrategy, error: Exception) -> str:
        what = " or ".join(self.names)
        return (
            f"{type(strategy).__name__} uses {what} in Python control flow or as a shape"
            f" ({type(error).__name__} while tracing), so it cannot vary inside one compiled"
            f" program; loop over its values with diffsim.train_seeds instead"
        )


def is_float_field(field: dataclasses.Field) -> bool:
    """A field annotated `float` (alone or in a union: `float | None`, a float or schedule)
    and not static: what a name in `sweepable` must be."""
    if field.metadata.get("static", False) or not field.init:
        return False
    kind = field.type
    if isinstance(kind, str):  # `from __future__ import annotations`
        return re.search(r"\bfloat\b", kind) is not None
    return kind is float or float in typing.get_args(kind)


def check_sweepable(strategy: AbstractStrategy, name: str) -> None:
    """Raise `ValueError` naming `name` and listing `type(strategy).sweepable` unless the
    strategy's class declares `name` sweepable, and it is a float field (no class may
    declare another)."""
    owner = type(strategy).__name__
    sweepable = tuple(getattr(type(strategy), "sweepable", ()))
    listing = f"{owner}.sweepable = {sweepable!r}"
    fields = {f.name: f for f in dataclasses.fields(strategy)}
    holder = _holder(strategy, name) if name not in fields else None
    if holder is not None:  # a field of a settings module (`options`, `update`)
        inner = getattr(strategy, holder)
        raise ValueError(
            f"{owner}.{holder}.{name} (= {getattr(inner, name)!r}) is not sweepable: the"
            f" fields of {type(inner).__name__} are constants of the compiled program. Loop"
            f" over its values with train_seeds instead (for v in values: diffsim.train_seeds("
            f"dataclasses.replace(strategy, {holder}=dataclasses.replace(strategy.{holder},"
            f" {name}=v)), ...)). What can vary: {listing}"
        )
    if name not in fields:
        raise ValueError(f"{owner} has no hyperparameter {name!r}; what can vary: {listing}")
    if name not in sweepable:
        raise ValueError(
            f"{owner}.{name} (= {getattr(strategy, name)!r}) is not sweepable: it is not a"
            f" float or it changes shapes or control flow, so each value needs its own"
            f" compiled program. Loop over its values with train_seeds instead (for v in"
            f" values: diffsim.train_seeds(dataclasses.replace(strategy, {name}=v), ...))."
            f" What can vary: {listing}"
        )
    if not is_float_field(fields[name]):
        raise ValueError(
            f"{owner}.sweepable names {name!r}, which is not a (non-static) float field;"
            f" only those can be traced: fix {owner}.sweepable"
        )


def _holder(strategy: AbstractStrategy, name: str) -> str | None:
    """The field of `strategy` that holds a module with a field `name`, if one does."""
    for field in dataclasses.fields(strategy):
        inner = getattr(strategy, field.name)
        if dataclasses.is_dataclass(inner) and name in {f.name for f in dataclasses.fields(inner)}:
            return field.name
    return None


def sweep_grid(strategy: AbstractStrategy, sweep: Mapping[str, Any]) -> Grid:
    """Validate `sweep` against `strategy` (before anything compiles: every name must be in
    `type(strategy).sweepable`) and list its combinations (`itertools.product` in the
    dict's order: the last name varies fastest)."""
    if not isinstance(strategy, AbstractStrategy):
        raise TypeError(
            f"strategy must be a diffsim strategy (PPO, APG, ES, ...), got {strategy!r}"
        )
    owner = type(strategy).__name__
    if not isinstance(sweep, Mapping) or not sweep:
        raise ValueError(
            f"sweep must be a non-empty dict from a sweepable hyperparameter of {owner} to a"
            f" list of values, got {sweep!r}; {owner}.sweepable = {type(strategy).sweepable!r}"
        )
    columns = [_column(strategy, name, values) for name, values in sweep.items()]
    grid = Grid(tuple(sweep), tuple(itertools.product(*columns)))
    for config in grid.listing():  # checks that relate fields to each other
        try:
            dataclasses.replace(strategy, **config)
        except ValueError as error:
            raise ValueError(f"sweep config {config}: {error}") from None
    return grid


def _column(strategy: AbstractStrategy, name: str, values) -> tuple:
    """The values of one swept field, each checked by the strategy itself."""
    check_sweepable(strategy, name)
    if isinstance(values, (str, bytes, Mapping)) or not isinstance(values, (Sequence, np.ndarray)):
        raise ValueError(f"sweep[{name!r}] must be a list of numbers, got {values!r}")
    if len(values) == 0:
        raise ValueError(f"sweep[{name!r}] is empty: give at least one value")
    for value in values:
        if np.ndim(value) != 0 or not np.issubdtype(np.asarray(value).dtype, np.number):
            raise ValueError(f"sweep[{name!r}] holds {value!r}; its values must be numbers")
        try:  # the strategy's own checks name the bad value
            dataclasses.replace(strategy, **{name: float(value)})
        except ValueError as error:
            raise ValueError(f"sweep[{name!r}]: {error}") from None
    return tuple(float(v) for v in values)
