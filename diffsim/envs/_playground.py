"""MuJoCo Playground's DeepMind Control Suite envs on MJX, as Brax `Env`s for `AutoResetEnv`.

`playground` (PyPI; the module `mujoco_playground`) is optional: it is imported only when a
Playground name is asked for. Its DM Control Suite models ship inside its wheel; its
locomotion and manipulation robots are fetched with a `git clone` of mujoco_menagerie at
first use, which diffsim never starts: those names get an error instead.
"""

import contextlib
import copy
import functools
import importlib
import math
from collections.abc import Callable, Mapping
from types import SimpleNamespace
from typing import Any

import jax
import jax.numpy as jnp
from brax.envs.base import Env, State

from ._mjx_guards import _bounded_solver, _finite_solver_backward, _finite_tolerance
from ._wrapper import AutoResetEnv

INSTALL_HINT = "pip install 'diffsim[playground]' (the playground package)"
# Playground 0.2.0 defaults to MuJoCo Warp (no gradients, no CPU); MJX's JAX implementation
# runs everywhere JAX does and is what `jax.grad` can go through.
MJX_IMPL = "jax"


@functools.cache
def _playground() -> SimpleNamespace | None:
    """Playground's `dm_control_suite`, `registry` and `mjx_env` modules (imported on first
    use: importing playground takes seconds), or None without playground."""
    try:
        return SimpleNamespace(
            **{
                part: importlib.import_module(f"mujoco_playground._src.{part}")
                for part in ("dm_control_suite", "registry", "mjx_env")
            }
        )
    except ImportError:
        return None


def playground_names() -> list[str]:
    """The Playground envs `make_env` builds: every DM Control Suite env of
    `mujoco_playground` (its models ship in the wheel). `[]` without `playground`."""
    pg = _playground()
    return sorted(pg.dm_control_suite.ALL_ENVS) if pg else []


def is_playground_name(name: str) -> bool:
    """Whether `make_env` hands `name` to Playground: a CamelCase name (Playground's naming;
    Brax's and the toy envs' names are lower case). Playground itself then says whether it
    knows the name, needs a download for it, or is not installed."""
    return name[:1].isupper()


class PlaygroundEnv(Env):
    """One Playground `MjxEnv` behind Brax's `Env` API, so that `AutoResetEnv`, `rollout` and
    every strategy step it like a Brax env.

    Playground's `State` holds the MJX data in `data` where Brax's has `pipeline_state`;
    this adapter moves it across and keeps Playground's `metrics` and `info` (its `rng`, for
    instance) as they are. An action is held for `action_repeat` physics control steps, whose
    rewards are summed (as Brax's `EpisodeWrapper` does); the step is done where any of them
    is. Observations must be flat arrays (every state-based DM Control Suite env's are).

    MJX's constraint solver runs up to `opt.iterations` iterations in a `lax.while_loop`,
    which JAX cannot reverse-differentiate. With `bounded_solver` (default) this adapter runs
    that loop as a `lax.scan` of exactly `opt.iterations` steps, each a no-op once MJX's own
    stopping test holds: the same iterations and the same result, and `jax.grad` goes
    through it at any iteration count.

    **Arguments:**

    - `env`: a Playground `MjxEnv` built with `impl="jax"`.
    - `action_repeat`: control steps per `step` (Playground's config gives 1 to every DM
      Control Suite env).
    - `bounded_solver`: run MJX's solver loop as the bounded scan above (False: MJX's own
      `while_loop`, forward only where the solver iterates more than once).

    **Example:**

    ```python
    from mujoco_playground import dm_control_suite
    inner = dm_control_suite.load("CartpoleBalance", config_overrides={"impl": "jax"})
    env = PlaygroundEnv(inner, action_repeat=1)
    state = env.step(env.reset(jax.random.key(0)), jnp.zeros(env.action_size))
    ```
    """

    def __init__(self, env, action_repeat: int = 1, bounded_solver: bool = True):
        self.env = env
        self.action_repeat = action_repeat
        self.bounded_solver = bounded_solver
        self._nefc: int | None = None

    def reset(self, rng: jax.Array) -> State:
        return State(**_fields(self.env.reset(rng), pipeline_state="data"))

    def step(self, state: State, action: jax.Array) -> State:
        def repeat(inner, _):
            inner = self.env.step(inner, action)
            return inner, (inner.reward, inner.done)

        pg = _playground()
        assert pg is not None  # a PlaygroundEnv holds a Playground env: playground is there
        inner = pg.mjx_env.State(**_fields(state, data="pipeline_state"))
        loop = contextlib.nullcontext()
        if self.bounded_solver:
            loop = _bounded_solver(int(self.mjx_model.opt.iterations))
        with loop, _finite_tolerance(), _finite_solver_backward():
            inner, (rewards, dones) = jax.lax.scan(repeat, inner, length=self.action_repeat)
        summed: dict[str, Any] = {
            "reward": jnp.sum(rewards, axis=0),
            "done": jnp.max(dones, axis=0),
        }
        return State(**(_fields(inner, pipeline_state="data") | summed))

    @property
    def observation_size(self) -> int:
        return int(jax.eval_shape(self.reset, jax.random.key(0)).obs.shape[-1])

    @property
    def action_size(self) -> int:
        return int(self.env.action_size)

    @property
    def backend(self) -> str:
        """`"mjx"` where MJX's constraint solver runs its `lax.while_loop` (constraints, more
        than one solver iteration, and no `bounded_solver`), which JAX cannot
        reverse-differentiate; `"mjx-differentiable"` where it runs a bounded scan, one
        iteration, or none (no constraint rows)."""
        iterates = int(self.mjx_model.opt.iterations) > 1 and self.constraint_rows > 0
        return "mjx" if iterates and not self.bounded_solver else "mjx-differentiable"

    @property
    def constraint_rows(self) -> int:
        """Rows of MJX's constraint Jacobian (joint limits, contacts, ...) after a reset;
        with none, MJX skips its solver."""
        if self._nefc is None:
            data = jax.eval_shape(self.reset, jax.random.key(0)).pipeline_state
            self._nefc = int(data._impl.efc_J.shape[0])
        return self._nefc

    @property
    def dt(self) -> float:
        """Seconds of simulated time per `step`."""
        return float(self.env.dt) * self.action_repeat

    @property
    def mj_model(self):
        """The MuJoCo model (for rendering)."""
        return self.env.mj_model

    @property
    def mjx_model(self):
        """The MJX model the env steps with."""
        return self.env.mjx_model

    def with_mjx_model(self, change: Callable) -> "PlaygroundEnv":
        """A copy of this env stepping with `change(mjx_model)` (e.g. cast to float64, or a
        changed solver option); this env is untouched."""
        inner = copy.copy(self.env)
        inner._mjx_model = change(self.env.mjx_model)
        out = copy.copy(self)
        out.env = inner
        return out


def _fields(state, **physics: str) -> dict[str, Any]:
    """The fields Brax's and Playground's `State` share, plus the physics one renamed
    (`pipeline_state="data"`: Brax's `pipeline_state` is Playground's `data`)."""
    shared = {f: getattr(state, f) for f in ("obs", "reward", "done", "metrics", "info")}
    return shared | {new: getattr(state, old) for new, old in physics.items()}


def _download_error(name: str, names: list[str]) -> ValueError:
    return ValueError(
        f"Playground env {name!r} loads its robot from mujoco_menagerie, which Playground"
        f" downloads with `git clone` at first use; diffsim does not download assets and"
        f" builds only the Playground envs whose models ship in the package: {names}"
    )


def _check_iterations(solver_iterations) -> None:
    if solver_iterations is not None and (
        not isinstance(solver_iterations, int)
        or isinstance(solver_iterations, bool)
        or solver_iterations < 1
    ):
        raise ValueError(
            f"solver_iterations must be a positive int or None, got {solver_iterations!r}"
        )


def make_playground_env(
    name: str,
    *,
    backend: str | None = None,
    episode_length: int | None = None,
    solver_iterations: int | None = None,
    bounded_solver: bool = True,
    **config_overrides,
) -> AutoResetEnv:
    """A Playground DM Control Suite env on MJX's JAX implementation, wrapped in
    `AutoResetEnv`; what `diffsim.make_env` calls for a Playground name.

    **Arguments:**

    - `name`: one of `playground_names()` (e.g. `"CartpoleBalance"`, `"CheetahRun"`).
    - `backend`: `None` or `"mjx"` (the only one).
    - `episode_length`: env steps per episode; default Playground's (its config's
      `episode_length` divided by its `action_repeat`).
    - `solver_iterations`: MJX's constraint-solver iterations (`opt.iterations`); default
      the model's own.
    - `bounded_solver`: run the solver's `while_loop` as a scan of `solver_iterations` steps
      (the same result; `PlaygroundEnv`), so that `jax.grad` (APG, SHAC, GuidedES) goes
      through the step at any iteration count. False: MJX's own loop, which reverse mode
      cannot pass unless `solver_iterations=1`.
    - `**config_overrides`: entries of Playground's env config (e.g. `ctrl_dt=0.02`).

    **Returns:** an `AutoResetEnv` of `observation_size`, `action_size`, `episode_length`.

    **Raises:** `ImportError` naming the `playground` extra without it; `ValueError` for
    a name needing a download, an unknown name or config key, or a bad value.

    **Example:**

    ```python
    env = diffsim.make_env("CartpoleSwingup")                       # 1000 steps of 0.01 s
    env = diffsim.make_env("CheetahRun", solver_iterations=1)       # a cheaper solver
    ```
    """
    pg = _playground()
    if pg is None:
        raise ImportError(
            f"{name!r} looks like a MuJoCo Playground env, and playground is not installed:"
            f" {INSTALL_HINT}"
        )
    if name not in pg.dm_control_suite.ALL_ENVS:
        if name in pg.registry.ALL_ENVS:
            raise _download_error(name, playground_names())
        raise ValueError(
            f"unknown Playground environment {name!r}; valid names: {playground_names()}"
        )
    if backend not in (None, "mjx"):
        raise ValueError(
            f"Playground env {name!r} runs on MJX only; got backend={backend!r}, expected"
            " None or 'mjx'"
        )
    _check_iterations(solver_iterations)
    env, config = _load(pg.dm_control_suite, name, config_overrides, bounded_solver)
    if solver_iterations is not None:
        env = env.with_mjx_model(
            lambda m: m.replace(opt=m.opt.replace(iterations=solver_iterations))
        )
    length = episode_length or math.ceil(config.episode_length / env.action_repeat)
    return AutoResetEnv(env, length, name=name)


def _load(suite, name: str, overrides: Mapping, bounded_solver: bool):
    """Playground's env `name` on MJX's JAX implementation with its config (defaults updated
    by `overrides`), both checked before anything compiles."""
    if overrides.get("impl", MJX_IMPL) != MJX_IMPL:
        raise ValueError(
            f"impl={overrides['impl']!r}: diffsim runs Playground envs on MJX's JAX"
            f" implementation (impl={MJX_IMPL!r}), the one JAX can differentiate and run on CPU"
        )
    config = suite.get_default_config(name).lock()  # locked: an unknown key raises
    try:
        config.update_from_flattened_dict({**overrides, "impl": MJX_IMPL})
    except (KeyError, AttributeError, TypeError) as error:
        raise ValueError(
            f"bad config override for Playground env {name!r}: {error}; its config keys:"
            f" {sorted(config.keys())}"
        ) from error
    inner = suite.load(name, config=config)
    obs = jax.eval_shape(inner.reset, jax.random.key(0)).obs
    if not isinstance(obs, jax.ShapeDtypeStruct) or len(obs.shape) != 1:
        raise ValueError(
            f"Playground env {name!r} observes {jax.tree.map(lambda x: x.shape, obs)}; diffsim"
            " needs one flat observation vector"
        )
    env = PlaygroundEnv(inner, int(config.action_repeat), bounded_solver)
    return env, config
