"""The one wrapper every diffsim env wears: time limit, auto-reset, episode returns."""

import jax
import jax.numpy as jnp
import jax.random as jr
from brax.envs.base import Env, State, Wrapper

_OWN_INFO = ("steps", "truncation", "episode_return", "final_obs", "reset_key")


class AutoResetEnv(Wrapper):
    """Adds a time limit, auto-reset with fresh keys, and episode-return tracking.

    `step` returns the post-reset state where an episode ended, so a batch of envs can be
    stepped forever. What the episode's last step looked like stays in `state.info`:

    - `"steps"`: steps taken in the current episode (0 right after a reset).
    - `"truncation"`: 1.0 where the step ended the episode only by the time limit.
    - `"episode_return"`: the return so far; where `state.done`, the finished episode's.
    - `"final_obs"`: the observation the step produced, before any reset.
    - `"reset_key"`: the key the next reset draws from. Unlike Brax's `AutoResetWrapper`,
      which replays each env's first state, every episode starts from a fresh draw.

    The reset is a `jnp.where` on `done`, so gradients stop at episode boundaries.
    Everything is written for ONE env; batch with `jax.vmap`.

    **Arguments:**

    - `env`: any Brax `Env` (a Brax system or a diffsim toy env).
    - `episode_length`: the time limit in env steps.
    - `name`: the registry name, for messages and saved configs.

    **Example:**

    ```python
    env = AutoResetEnv(brax.envs.get_environment("hopper", backend="spring"), 1000, "hopper")
    state = jax.vmap(env.step)(state, actions)   # ended episodes restart by themselves
    ```
    """

    def __init__(self, env: Env, episode_length: int, name: str = ""):
        super().__init__(env)
        self.episode_length = episode_length
        self.name = name
        self._obs_size: int | None = None

    @property
    def observation_size(self) -> int:
        # Brax's property runs an un-jitted reset on every access; trace it once instead.
        if self._obs_size is None:
            obs = jax.eval_shape(self.env.reset, jr.key(0)).obs
            self._obs_size = int(obs.shape[-1])
        return self._obs_size

    def reset(self, rng: jax.Array) -> State:
        reset_key, key = jr.split(rng)
        state = self.env.reset(key)
        zero = jnp.zeros(())  # the default float dtype: float64 under jax.enable_x64
        info = {
            **state.info,
            "steps": jnp.zeros((), jnp.int32),
            "truncation": zero,
            "episode_return": zero,
            "final_obs": state.obs,
            "reset_key": reset_key,
        }
        return state.replace(reward=zero, done=zero, info=info)

    def step(self, state: State, action: jax.Array) -> State:
        info = state.info
        stepped = self.env.step(state, action)
        steps = info["steps"] + 1
        terminated = stepped.done > 0
        time_up = steps >= self.episode_length
        done = terminated | time_up
        reward = jnp.asarray(stepped.reward, dtype=float)  # some Brax envs give a Python float
        episode_return = jnp.where(state.done > 0, 0.0, info["episode_return"]) + reward

        reset_key, key = jr.split(info["reset_key"])
        fresh = self.env.reset(key)
        inner_keys = [k for k in fresh.info if k not in _OWN_INFO]
        picked = jax.tree.map(
            lambda new, old: jnp.where(done, new, old),
            (fresh.pipeline_state, fresh.obs, {k: fresh.info[k] for k in inner_keys}),
            (stepped.pipeline_state, stepped.obs, {k: stepped.info[k] for k in inner_keys}),
        )
        pipeline_state, obs, inner_info = picked
        info = {
            **inner_info,
            "steps": jnp.where(done, 0, steps),
            "truncation": jnp.asarray(time_up & ~terminated, dtype=float),
            "episode_return": episode_return,
            "final_obs": stepped.obs,
            "reset_key": reset_key,
        }
        return stepped.replace(
            pipeline_state=pipeline_state,
            obs=obs,
            reward=reward,
            done=jnp.asarray(done, dtype=float),
            info=info,
        )
