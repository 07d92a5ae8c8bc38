"""What `train` checks of its inputs and of the strategy's contract (`AbstractStrategy`).

Everything that can be checked is checked before XLA compiles: the inputs and the
strategy's hashability on the host, the shapes of `step`'s state and metrics while
tracing. The env-step count of each iteration is a traced value; it is checked on the
host after each segment.
"""

import dataclasses
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np

from .strategies.base import AbstractStrategy


def check_inputs(strategy, env, policy, num_eval_episodes: int) -> None:
    """Everything that can be checked before compiling, with messages naming the value."""
    if not isinstance(strategy, AbstractStrategy):
        raise TypeError(
            f"strategy must be a diffsim strategy (PPO, APG, ES, ...), got {strategy!r}"
        )
    if not hasattr(env, "episode_length"):
        raise TypeError(f"env must come from diffsim.make_env, got {type(env).__name__}")
    if not isinstance(num_eval_episodes, int) or num_eval_episodes < 1:
        raise ValueError(f"num_eval_episodes must be a positive int, got {num_eval_episodes!r}")
    build: Any = (lambda: policy) if isinstance(policy, eqx.Module) else (lambda: policy(jr.key(0)))
    example = jax.eval_shape(build)  # abstract: nothing is computed or compiled
    check_acts(env, lambda o: build()(o), type(example).__name__)
    strategy.check(env, example)


def check_acts(env, act: Callable, name: str, hint: str = "") -> None:
    """`act` (a policy, or a function that builds one and calls it) takes one observation
    of `env` to one action: checked abstractly. `hint` ends both messages."""
    obs = jax.ShapeDtypeStruct((env.observation_size,), jnp.float32)
    try:
        action = jax.eval_shape(act, obs)
    except Exception as error:
        raise ValueError(
            f"policy {name} cannot act on one observation of shape ({env.observation_size},)"
            f" from {env.name!r}{hint}: {error}"
        ) from error
    if action.shape != (env.action_size,):
        raise ValueError(
            f"policy {name} returns actions of shape {action.shape}, but {env.name!r} takes"
            f" ({env.action_size},){hint}"
        )


def check_hashable(strategy: AbstractStrategy) -> None:
    """Compiled programs are cached by strategy: an unhashable one (an array field) would
    be traced and compiled again on every call."""
    try:
        hash(strategy)
        return
    except TypeError as error:
        reason = error
    name = type(strategy).__name__
    for field in dataclasses.fields(strategy):
        value = getattr(strategy, field.name)
        try:
            hash(value)
        except TypeError:
            what = type(value).__name__
            if hasattr(value, "shape"):
                what = f"an array of shape {np.shape(value)}"
            raise TypeError(
                f"{name}.{field.name} is {what}, which is unhashable: train caches its compiled"
                f" program by strategy, so an array field would recompile on every call."
                f" Store a Python float (or a tuple of them) or a static field instead, and"
                f" build arrays inside init or step"
            ) from None
    raise TypeError(f"{name} is unhashable ({reason}); train needs a hashable strategy")


def check_step(strategy: AbstractStrategy, before, out) -> None:
    """At trace time: `step` returned `(state, metrics)` with the state's structure,
    shapes and dtypes unchanged and `metrics` a dict of scalars."""
    name = type(strategy).__name__
    if not isinstance(out, tuple) or len(out) != 2:
        raise TypeError(f"{name}.step must return (state, metrics), got {type(out).__name__}")
    after, metrics = out
    if not isinstance(metrics, dict):
        raise TypeError(
            f"{name}.step must return metrics as a dict of scalars, got {type(metrics).__name__}"
        )
    for key, value in metrics.items():
        if not isinstance(key, str) or np.shape(value) != () or not _is_number(value):
            raise ValueError(
                f"{name}.step's metrics[{key!r}] is {_describe(value)}; metrics must be a dict"
                f" from names to scalars (reduce arrays, e.g. with .mean())"
            )
    changes = _changes(before, after)
    if changes:
        raise ValueError(
            f"{name}.step changes its state (init -> step): {'; '.join(changes)}. The state"
            f" must keep its pytree structure, shapes and dtypes across step"
        )


def _is_number(x) -> bool:
    if isinstance(x, (int, float, bool)):
        return True
    dtype = getattr(x, "dtype", None)
    return dtype is not None and (
        jnp.issubdtype(dtype, jnp.number) or jnp.issubdtype(dtype, jnp.bool_)
    )


def _describe(x) -> str:
    if not hasattr(x, "shape") and not isinstance(x, (int, float, bool)):
        return f"a {type(x).__name__}"
    dtype = getattr(x, "dtype", None) or jnp.asarray(x).dtype
    return f"{dtype}{list(np.shape(x))}"


def _changes(before, after) -> list[str]:
    """The differences between two states, each naming its leaf (`state.opt[0].mu`)."""
    paths = lambda tree: {
        jax.tree_util.keystr(path): leaf
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
    }
    old, new = paths(before), paths(after)
    out = [f"state{p} appears" for p in new if p not in old]
    out += [f"state{p} disappears" for p in old if p not in new]
    if not out and jax.tree.structure(before) != jax.tree.structure(after):
        out.append(f"the pytree changes from {jax.tree.structure(before)}")
    for path in old.keys() & new.keys():
        a, b = _describe(old[path]), _describe(new[path])
        if a != b:
            out.append(f"state{path} {a} -> {b}")
    return sorted(out)


def check_env_steps(strategy: AbstractStrategy, counts: np.ndarray, least: int, most: int):
    """On the host after a segment: every iteration's `metrics["env_steps"]` (NaN past the
    end of the segment) lies within [`least`, `most`]."""
    ran = counts[np.isfinite(counts)]
    bad = ran[(ran < least) | (ran > most)]
    if bad.size:
        name = type(strategy).__name__
        raise ValueError(
            f"{name}.step reported metrics['env_steps'] = {bad.flat[0]:g}, outside"
            f" [min_steps_per_iteration, steps_per_iteration] = [{least}, {most}]: the budget"
            f" plan counts on every step's count lying within those bounds"
        )
