"""What `train` checks of its inputs and of the strategy's contract (`AbstractStrategy`).

Everything that can be checked is checked before XLA compiles: the inputs and the
strategy's hashability on the host, the shapes of `step`'s state and metrics while
tracing. The env-step count of each iteration is a traced value; it is checked on the
host after each segment.
"""

import dataclasses
import sys
import warnings
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np

from .._types import VanishingGradientWarning
from ..policies import trainable
from ..strategies.base import AbstractStrategy

SENSITIVITY_FLOOR = 1e-3  # see VanishingGradientWarning


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


def gradient_metric(strategy: AbstractStrategy, metrics: dict) -> str | None:
    """The metric holding the norm of the gradient through the simulator: GuidedES's
    `analytic_grad_norm`, a window strategy's (APG, SHAC, AHAC, SAPO) `grad_norm`; None
    for a strategy that does not differentiate the env (PPO's `grad_norm` is a score
    function's)."""
    from ..strategies._window.strategy import AbstractWindowStrategy

    if "analytic_grad_norm" in metrics:
        return "analytic_grad_norm"
    if isinstance(strategy, AbstractWindowStrategy) and "grad_norm" in metrics:
        return "grad_norm"
    return None


def warn_vanishing(strategy: AbstractStrategy, policy, metrics: dict, *, batched: bool) -> None:
    """On the host after the first segment: `VanishingGradientWarning` if, for some run,
    the median over the segment's updates of the relative sensitivity
    `grad_norm * (1 + ||theta||) / |loss|` is below `SENSITIVITY_FLOOR` (see the warning's
    docstring). `metrics`: `[*runs, iterations]` arrays; `policy`: the runs' policies
    (a leading run axis if `batched`)."""
    name = gradient_metric(strategy, metrics)
    if name is None:
        return
    norm = np.asarray(metrics[name], np.float64)
    loss = np.abs(np.asarray(metrics.get("loss", np.ones_like(norm)), np.float64))
    leaves = jax.tree.leaves(eqx.filter(policy, trainable(policy)))
    axes = lambda x: tuple(range(1 if batched else 0, np.ndim(x)))
    theta = np.sqrt(sum(np.sum(np.square(np.asarray(x, np.float64)), axis=axes(x)) for x in leaves))
    with np.errstate(divide="ignore", invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN runs: no update ran
        sensitivity = np.where(norm == 0, 0.0, norm * (1 + np.asarray(theta)[..., None]) / loss)
        sensitivity[~np.isfinite(norm) | ~np.isfinite(loss)] = np.nan
        median = np.nanmedian(sensitivity, axis=-1)
        median_norm = np.nanmedian(np.where(np.isfinite(norm), norm, np.nan), axis=-1)
    median, median_norm = np.atleast_1d(median), np.atleast_1d(median_norm)
    low = median < SENSITIVITY_FLOOR
    if not np.any(low):
        return
    updates = int(np.max(np.sum(np.isfinite(sensitivity), axis=-1)))
    runs = f" in {int(np.sum(low))} of {low.size} runs" if low.size > 1 else ""
    warnings.warn(
        f"{type(strategy).__name__}'s gradient through the env vanishes{runs}: over the first"
        f" {updates} updates the median {name} was {float(np.min(median_norm[low])):.3g},"
        f" a relative sensitivity grad_norm * (1 + ||theta||) / |loss| of"
        f" {float(np.min(median[low])):.3g} (< {SENSITIVITY_FLOOR:g}), so the policy learns"
        f" nothing from the simulator. Likely causes: a reward without a gradient with respect"
        f" to the action (an alive bonus, an indicator or a threshold), a jax.lax.stop_gradient"
        f" in the reward or the dynamics, or a gymnax env without transition gradients. ES and"
        f" PPO need no gradient through the env (docs: guides/gradients.md)",
        VanishingGradientWarning,
        stacklevel=_user_level(sys._getframe()),
    )


def _user_level(frame) -> int:
    """The `stacklevel`, for a warning raised in `frame`, of its first caller outside
    diffsim (and the type checkers that wrap its functions under test): the user's
    `train`."""
    level = 1
    internal = ("diffsim.", "jaxtyping", "beartype", "typeguard")
    while frame is not None:
        name = frame.f_globals.get("__name__", "")
        if not (name.startswith(internal) or frame.f_code.co_filename.startswith("<")):
            return level
        frame, level = frame.f_back, level + 1
    return 1
