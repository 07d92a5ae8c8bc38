"""The one wrapper every diffsim env wears: time limit, auto-reset, episode returns."""

import contextlib
import dataclasses
import warnings
from collections.abc import Iterator
from typing import cast

import jax
import jax.numpy as jnp
import jax.random as jr
from brax.envs.base import Env, State, Wrapper

from ._base import AbstractEnv, check_env

_OWN_INFO = (
    "steps",
    "truncation",
    "episode_return",
    "final_obs",
    "reset_key",
    "start_index",
    "reused_start",
    "diverged",
)
# Brax's contact code reads `mjx.Data.ncon`, which MuJoCo deprecates: a DeprecationWarning
# each time a Brax step is traced. Not shown by default, but an error under `-W error` that
# users cannot fix. Ignored for this one message from Brax, only while diffsim traces its
# wrapped env (`_quiet_brax`), so the user's own code keeps its warnings.
_NCON = r"Accessing `ncon` directly from `Data` is deprecated"


@contextlib.contextmanager
def _quiet_brax() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", _NCON, DeprecationWarning, module=r"brax\.")
        yield


class AutoResetEnv(Wrapper):
    """Adds a time limit, auto-reset from fresh starts, episode-return tracking, and an end
    to diverged episodes.

    `step` returns the post-reset state where an episode ended, so a batch of envs can be
    stepped forever. What the episode's last step looked like stays in `state.info`:

    - `"steps"`: steps taken in the current episode (0 right after a reset).
    - `"truncation"`: 1.0 where the step ended the episode only by the time limit.
    - `"episode_return"`: the return so far; where `state.done`, the finished episode's.
    - `"final_obs"`: the observation the step produced, before any reset (the last finite
      one if the step diverged).
    - `"diverged"`: 1.0 where the step produced a non-finite observation or reward. Such a
      step terminates its episode, and its reward is recorded as 0, so no NaN reaches a
      return, a bootstrap or a loss, and the env restarts from a fresh state.
    - `"reset_key"`: the key fresh starts are drawn from. Unlike Brax's `AutoResetWrapper`,
      which replays each env's first state, every episode starts from a fresh draw.

    **Where starts come from.** `step(state, action)` draws one fresh reset per call (the
    Brax API, for use outside diffsim). `diffsim.rollout` instead draws a pool of starts
    once per call with `starts(state, num)` and passes it to `step(state, action, starts)`:
    the env's `i`-th episode end within the rollout restarts from `starts[i]`, and only
    when more than `num` episodes end does it reuse the last one (`info["reused_start"]` is
    1.0 there). With `num = 0` nothing is reset: an ended episode keeps stepping (what
    evaluation wants: it scores first episodes and stops).

    The reset is a `jnp.where` on `done`, so gradients stop at episode boundaries.
    Everything is written for ONE env; batch with `jax.vmap`.

    **Arguments:**

    - `env`: any Brax `Env` (a Brax system or a diffsim toy env).
    - `episode_length`: the time limit in env steps.
    - `name`: the registry name, for messages and saved configs.
    - `spec`: how to build the env again (`make_env` sets it; see `from_config`), or None.

    An `AbstractEnv` is checked against its interface here (`check_env`: traced, not
    compiled), so a wrong size or shape is reported before anything compiles.

    **Example:**

    ```python
    env = AutoResetEnv(brax.envs.get_environment("hopper", backend="spring"), 1000, "hopper")
    state, pool = jax.vmap(env.starts, in_axes=(0, None))(state, 4)
    state = jax.vmap(env.step)(state, actions, pool)   # ended episodes restart from the pool
    ```
    """

    def __init__(self, env: Env, episode_length: int, name: str = "", spec: dict | None = None):
        if isinstance(env, AbstractEnv):
            check_env(env)
        super().__init__(env)
        self.episode_length = episode_length
        self.name = name
        self.spec = spec
        self._obs_size: int | None = None

    @property
    def observation_size(self) -> int:
        # Brax's property runs an un-jitted reset on every access; trace it once instead.
        if self._obs_size is None:
            with _quiet_brax():
                obs = jax.eval_shape(self.env.reset, jr.key(0)).obs
            self._obs_size = int(obs.shape[-1])
        return self._obs_size

    def reset(self, rng: jax.Array) -> State:
        reset_key, key = jr.split(rng)
        with _quiet_brax():
            state = self.env.reset(key)
        zero = jnp.zeros(())  # the default float dtype: float64 under jax.enable_x64
        info = {
            **state.info,
            "steps": jnp.zeros((), jnp.int32),
            "truncation": zero,
            "episode_return": zero,
            "final_obs": state.obs,
            "reset_key": reset_key,
            "start_index": jnp.zeros((), jnp.int32),
            "reused_start": zero,
            "diverged": zero,
        }
        return dataclasses.replace(state, reward=zero, done=zero, info=info)

    def starts(self, state: State, num: int) -> tuple[State, State | tuple]:
        """`num` fresh starts for this env (leaves `[num, ...]`), and `state` with its
        `reset_key` advanced and its pool position at 0 (`num = 0`: an empty pool, `()`).
        For `rollout`; one env."""
        keys = jr.split(state.info["reset_key"], num + 1)
        reset_key = keys[0]
        pool = jax.vmap(self.reset)(keys[1:]) if num else ()
        info = {**state.info, "reset_key": reset_key, "start_index": jnp.zeros((), jnp.int32)}
        return dataclasses.replace(state, info=info), pool

    def step(self, state: State, action: jax.Array, starts: State | tuple | None = None) -> State:
        info = state.info
        # The inner env sees `done = 0`, as under Brax's AutoResetWrapper: Brax envs without a
        # termination (halfcheetah, reacher, ...) never write `done` and pass on the one they
        # are given, so the previous step's end would end every following step.
        with _quiet_brax():
            stepped = self.env.step(
                dataclasses.replace(state, done=jnp.zeros_like(state.done)), action
            )
        steps = info["steps"] + 1
        reward = jnp.asarray(stepped.reward, dtype=info["episode_return"].dtype)
        obs = cast(jax.Array, stepped.obs)  # diffsim's envs observe one flat array
        finite = jnp.isfinite(reward) & jnp.all(jnp.isfinite(obs))
        reward = jnp.where(finite, reward, 0.0)
        final_obs = jnp.where(finite, obs, cast(jax.Array, state.obs))
        terminated = (stepped.done > 0) | ~finite
        time_up = steps >= self.episode_length
        done = terminated | time_up
        episode_return = jnp.where(state.done > 0, 0.0, info["episode_return"]) + reward

        index, reset_key = info["start_index"], info["reset_key"]
        no = jnp.zeros((), bool)
        if starts is None:  # the plain Brax API: one fresh draw per call
            reset_key, key = jr.split(reset_key)
            fresh, restart, reused = self.reset(key), done, no
        elif isinstance(starts, State):  # a pool of starts (an empty one is `()`)
            num = starts.done.shape[0]
            fresh = jax.tree.map(lambda x: x[jnp.minimum(index, num - 1)], starts)
            restart, reused = done, done & (index >= num)
            index = index + done
        else:  # an empty pool: nothing restarts
            fresh, restart, reused = stepped, no, no
        inner_keys = [k for k in fresh.info if k not in _OWN_INFO]
        pipeline_state, obs, inner_info = jax.tree.map(
            lambda new, old: jnp.where(restart, new, old),
            (fresh.pipeline_state, fresh.obs, {k: fresh.info[k] for k in inner_keys}),
            (stepped.pipeline_state, stepped.obs, {k: stepped.info[k] for k in inner_keys}),
        )
        info = {
            **inner_info,
            "steps": jnp.where(restart, 0, steps),
            "truncation": jnp.asarray(time_up & ~terminated, dtype=reward.dtype),
            "episode_return": episode_return,
            "final_obs": final_obs,
            "reset_key": reset_key,
            "start_index": index,
            "reused_start": jnp.asarray(reused, dtype=reward.dtype),
            "diverged": jnp.asarray(~finite, dtype=reward.dtype),
        }
        return dataclasses.replace(
            stepped,
            pipeline_state=pipeline_state,
            obs=obs,
            reward=reward,
            done=jnp.asarray(done, dtype=reward.dtype),
            info=info,
        )
