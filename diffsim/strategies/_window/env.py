"""The env a differentiable window steps, and what it rejects before compiling.

A window can run in float64 (`float64_env`: the Brax system's constants cast, with
`to_float64` for the policy and the env state) and rematerialise the physics in the
backward pass (`Rematerialized`). `check_env` rejects what a window cannot do on an env: a
backend that cannot be reverse-differentiated, a horizon longer than the episode, and remat
or float64 where they cannot apply. Shared by every window (`_windows.WindowSpec`).
"""

import copy
import functools
import weakref
from collections.abc import Callable
from typing import cast

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
from brax.base import System
from brax.envs.base import Env as BraxEnv, PipelineEnv, State, Wrapper
from jaxtyping import Array

from ..._types import Env, Trajectory
from ...envs._playground import is_playground_name

# Backends whose step JAX cannot reverse-differentiate, and why.
NOT_DIFFERENTIABLE = {
    "mjx": (
        "whose constraint solver runs in a lax.while_loop, which JAX cannot reverse-differentiate"
    ),
}

_FLOAT64_ENVS: "weakref.WeakKeyDictionary[Env, Env]" = weakref.WeakKeyDictionary()


def to_float64(tree):
    """Every floating leaf of `tree` as float64 (x64 must be on)."""
    return jax.tree.map(lambda x: x.astype(jnp.float64) if eqx.is_inexact_array(x) else x, tree)


def like(tree, reference):
    """Cast `tree`'s floating leaves back to the dtypes of `reference`'s."""
    return jax.tree.map(
        lambda x, r: x.astype(r.dtype) if eqx.is_inexact_array(x) else x, tree, reference
    )


def carried_dtype(traj: Trajectory, env_state: State) -> Trajectory:
    """A (float64) window's data in the dtype of the carried env state's observations."""
    dtype = cast(Array, env_state.obs).dtype  # diffsim envs observe one flat vector
    return jax.tree.map(lambda x: x.astype(dtype) if eqx.is_inexact_array(x) else x, traj)


def check_x64(float64: bool) -> None:
    """Raise `ValueError` if `float64` is asked for without 64-bit JAX."""
    if float64 and not jax.config.read("jax_enable_x64"):
        raise ValueError(
            "float64=True needs 64-bit JAX, which cannot be switched on inside jit: call"
            " jax.config.update('jax_enable_x64', True) (or run under jax.enable_x64(True))"
            " before training, or use float64=False"
        )


def _to_float64_constant(x):
    if isinstance(x, (np.ndarray, jax.Array)) and jnp.issubdtype(x.dtype, jnp.floating):
        return jnp.asarray(np.asarray(x, np.float64))
    return x


def _cast_system(env: Env) -> Env:
    """A shallow copy of the wrapper chain down to the Brax env holding `sys`, whose `sys` has
    float64 floating leaves; an env without a Brax system (a toy env) is returned as is."""
    if isinstance(env, Wrapper):
        inner = _cast_system(cast(Env, env.env))
        if inner is env.env:
            return env
        out = copy.copy(env)
        out.env = inner
        return out
    system = vars(env).get("sys")
    if not isinstance(system, System):
        return env
    out = copy.copy(env)
    out.sys = jax.tree.map(_to_float64_constant, system)  # pyright: ignore[reportAttributeAccessIssue]  (a Brax PipelineEnv)
    return out


def float64_env(env: Env) -> Env:
    """`env` with its Brax system's constants (`env.unwrapped.sys`: masses, inertias,
    geometry, gains, ...) in float64, so that a float64 state is stepped in float64.

    A copy down the wrapper chain (the original is untouched), built once per env and
    cached. A toy env (no Brax system; its constants are Python floats) comes back as is.
    x64 must be on.

    **Example:**

    ```python
    jax.config.update("jax_enable_x64", True)
    env64 = float64_env(diffsim.make_env("reacher"))
    env64.unwrapped.sys.link.inertia.mass.dtype   # float64
    ```
    """
    check_x64(True)
    cached = _FLOAT64_ENVS.get(env)
    if cached is None:
        with jax.ensure_compile_time_eval():
            cached = _cast_system(env)
        if cached is env:
            return env
        _FLOAT64_ENVS[env] = cached
    return cached


def _checkpointed_substeps(env: BraxEnv) -> BraxEnv | None:
    """A shallow copy of `env`'s wrapper chain whose Brax `PipelineEnv` runs each physics
    substep under `jax.checkpoint`, or None if `env` has no Brax pipeline (a toy env)."""
    if isinstance(env, Wrapper):
        inner = _checkpointed_substeps(env.env)
        if inner is None:
            return None
        out = copy.copy(env)
        out.env = inner
        return out
    if not isinstance(env, PipelineEnv):
        return None
    out = copy.copy(env)

    def pipeline_step(pipeline_state, action):  # Brax's, with each substep checkpointed
        @functools.partial(jax.checkpoint, prevent_cse=False)  # inside a scan: no CSE risk
        def substep(state, _):
            return out._pipeline.step(out.sys, state, action, out._debug), None  # noqa: SLF001

        return jax.lax.scan(substep, pipeline_state, (), out._n_frames)[0]  # noqa: SLF001

    out.pipeline_step = pipeline_step  # the same substeps as Brax's, in the same order
    return out


class Rematerialized(Wrapper):
    """`env` whose steps reverse mode recomputes instead of storing, with the same forward
    values. On a Brax env each physics substep runs under `jax.checkpoint`: the substep loop
    keeps one pipeline state per substep, not one stacked buffer per intermediate of the
    collision and spring code, and recomputes each substep in the backward pass. On an env
    without a Brax pipeline (the toy envs), or with `substeps=False`, the whole `step` is
    checkpointed instead. Everything else is `env`'s.

    **Example:**

    ```python
    _, traj = diffsim.rollout(Rematerialized(env), policy, state, key=key, length=128)
    ```
    """

    def __init__(self, env: Env, substeps: bool = True):
        checkpointed = _checkpointed_substeps(env) if substeps else None
        super().__init__(env if checkpointed is None else cast(Env, checkpointed))
        self.per_substep = checkpointed is not None

    def step(self, state: State, action: jax.Array, starts=None) -> State:
        step: Callable = self.env.step  # an AutoResetEnv's step also takes its start pool
        if not self.per_substep:
            step = jax.checkpoint(step, prevent_cse=False)  # inside a scan: no CSE risk
        return step(state, action) if starts is None else step(state, action, starts)


def env_backend(env: Env) -> str | None:
    """The Brax backend `env` steps with (`"jax"` for toy envs), or None if it has none."""
    try:
        return env.backend
    except (AttributeError, NotImplementedError):
        return None


def _float64_problem(env: Env) -> str | None:
    """Why a float64 reset, start pool and step of `env` is not float64 throughout (the
    first line of its jaxpr that computes in float32, or the error tracing it raised), or
    None. Traced only (nothing is compiled)."""

    def one_step(key):
        state = to_float64(env.reset(key))
        action = jnp.zeros(env.action_size, jnp.float64)
        if hasattr(env, "starts"):
            state, starts = env.starts(state, 1)
            return env.step(state, action, starts)
        return env.step(state, action)

    try:
        jaxpr = jax.make_jaxpr(one_step)(jr.key(0))
    except Exception as error:  # e.g. a float32 constant that breaks a scan's carry types
        return f"its float64 step fails to trace: {type(error).__name__}: {error}"[:300]
    for line in str(jaxpr).splitlines():
        if "f32" in line:
            return f"its float64 step still computes in float32 (`{line.strip()[:120]}`)"
    return None


def check_env(env: Env, *, owner: str, horizon: int, remat: bool, float64: bool) -> None:
    """Reject, before compiling, a window of `owner` (a class name, for the message) that
    cannot be differentiated on `env`:

    - an env whose backend JAX cannot reverse-differentiate (Brax `mjx`, or a Playground env
      built with `bounded_solver=False` whose MJX solver runs more than one iteration);
    - `horizon` longer than the env's episode;
    - `remat=True` with `horizon=1` (a window of one step has nothing to rematerialise);
    - `float64=True` without x64, or on an env that still computes in float32 once its state
      and Brax system are float64 (traced, not compiled).
    """
    name = getattr(env, "name", "")
    backend = env_backend(env)
    if backend in NOT_DIFFERENTIABLE and is_playground_name(name):
        raise ValueError(
            f"{owner} differentiates through the simulator, but Playground env {name!r} runs"
            f" MJX's constraint solver for more than one iteration in its own lax.while_loop,"
            f" which JAX cannot reverse-differentiate; build it with"
            f" diffsim.make_env({name!r}) (bounded_solver=True, the default) or"
            f" solver_iterations=1"
        )
    if backend in NOT_DIFFERENTIABLE:
        raise ValueError(
            f"{owner} differentiates through the simulator, but env {name!r} uses Brax's"
            f" {backend!r} backend, {NOT_DIFFERENTIABLE[backend]}; build it with"
            f" diffsim.make_env({name!r}, backend='spring') (or 'generalized', 'positional')"
        )
    length = env.episode_length
    if horizon > length:
        raise ValueError(
            f"horizon={horizon} (the gradient window) exceeds the episode_length {length} of"
            f" env {name!r}; pass {owner}(horizon={length}) or less"
        )
    if remat and horizon == 1:
        raise ValueError(
            f"options.remat=True with horizon=1: a one-step window keeps the same memory with"
            f" or without rematerialisation and only pays a second forward pass; pass"
            f" {owner}(options=WindowOptions(remat=False)), or a longer horizon"
        )
    check_x64(float64)
    if float64:
        problem = _float64_problem(float64_env(env))
        if problem is not None:
            raise ValueError(
                f"float64=True cannot apply to env {name!r}: with its state and Brax system"
                f" in float64, {problem}; make the env's own constants and dtypes follow its"
                f" inputs, or pass WindowOptions(float64=False)"
            )
