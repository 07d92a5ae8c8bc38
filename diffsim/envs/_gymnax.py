"""gymnax's continuous-action envs behind Brax's `Env` API: `make_env("gymnax:NAME")`.

`gymnax` (PyPI, the `gymnax` extra) is imported only when a `gymnax:` name is asked for.
gymnax detaches every transition (`stop_gradient` on the next state and observation)
unless an env is configured with `with_transition_gradients()`, which the envs that
implement differentiable transitions offer. `make_env` turns it on wherever offered.
"""

import importlib
from typing import Any

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
from brax.envs.base import Env, State

PREFIX = "gymnax:"
INSTALL_HINT = "pip install 'diffsim[gymnax]' (the gymnax package)"


class GymnaxEnv(Env):
    """One gymnax env (continuous actions) as a Brax `Env`, for `AutoResetEnv`.

    diffsim's actions in [-1, 1] are mapped affinely onto the env's action box. The time
    limit and resets are `AutoResetEnv`'s (gymnax's own auto-reset in `env.step` is not
    used: this adapter calls `step_env` and `reset_env`); an episode ends early where
    gymnax says it terminated. The env's state is `pipeline_state`; its step key rides in
    `info["gymnax_key"]`.

    **Arguments:**

    - `env`: a gymnax `Environment` whose action space is a `Box`.
    - `params`: its `EnvParams` (default `env.default_params`).
    - `transition_gradients`: configure the env with gymnax's `with_transition_gradients()`
      (only where `env.supports_transition_gradients`; elsewhere gradients stop at every
      step, and first-order strategies learn nothing).

    **Example:**

    ```python
    import gymnax
    inner, params = gymnax.make("Pendulum-v1")
    env = GymnaxEnv(inner, params)   # what make_env("gymnax:Pendulum-v1") wraps
    ```
    """

    def __init__(self, env: Any, params: Any = None, transition_gradients: bool = True):
        from gymnax.environments import spaces

        params = env.default_params if params is None else params
        box = env.action_space(params)
        if not isinstance(box, spaces.Box):
            raise ValueError(
                f"gymnax env {env.name!r} has discrete actions ({type(box).__name__});"
                " diffsim's policies act in a continuous box: use a continuous env such as"
                " gymnax:Pendulum-v1"
            )
        self.differentiable = bool(transition_gradients and env.supports_transition_gradients)
        self.env = env.with_transition_gradients() if self.differentiable else env
        self.params = params
        self._low = np.broadcast_to(np.asarray(box.low, np.float64), box.shape)
        self._high = np.broadcast_to(np.asarray(box.high, np.float64), box.shape)

    def reset(self, rng: jax.Array) -> State:
        key, reset_key = jr.split(rng)
        obs, inner = self.env.reset_env(reset_key, self.params)
        inner = jax.tree.map(jnp.asarray, inner)  # gymnax starts its `time` as a Python int
        zero = jnp.zeros(())
        return State(
            pipeline_state=inner,  # pyright: ignore[reportArgumentType]  (gymnax's state)
            obs=_flat(obs),
            reward=zero,
            done=zero,
            info={"gymnax_key": key},
        )

    def step(self, state: State, action: jax.Array) -> State:
        key, step_key = jr.split(state.info["gymnax_key"])
        action = jnp.clip(action, -1.0, 1.0)
        low, high = (jnp.asarray(x, action.dtype) for x in (self._low, self._high))
        scaled = low + (action + 1.0) * 0.5 * (high - low)
        obs, inner, reward, done, _ = self.env.step_env(
            step_key, state.pipeline_state, scaled, self.params
        )
        dtype = jnp.zeros(()).dtype
        return state.replace(  # pyright: ignore[reportAttributeAccessIssue]  (flax dataclass)
            pipeline_state=inner,
            obs=_flat(obs),
            reward=jnp.asarray(reward, dtype).reshape(()),
            done=jnp.asarray(done, dtype).reshape(()),
            info={**state.info, "gymnax_key": key},
        )

    @property
    def observation_size(self) -> int:
        return int(jax.eval_shape(self.reset, jr.key(0)).obs.shape[-1])

    @property
    def action_size(self) -> int:
        return int(self._low.shape[-1])

    @property
    def default_episode_length(self) -> int:
        return int(self.params.max_steps_in_episode)

    @property
    def backend(self) -> str:
        return "gymnax" if self.differentiable else "gymnax-detached"


def _flat(obs: jax.Array) -> jax.Array:
    return jnp.asarray(obs, jnp.zeros(()).dtype).reshape(-1)


def make_gymnax(name: str, **kwargs) -> GymnaxEnv:
    """`GymnaxEnv` of `gymnax.make(name, **kwargs)`; `name` without the `gymnax:` prefix.

    **Raises:** `ImportError` naming the extra without gymnax; `ValueError` for an unknown
    name (listing gymnax's) or a discrete-action env.
    """
    try:
        gymnax = importlib.import_module("gymnax")
    except ImportError as error:
        raise ImportError(f"make_env({PREFIX + name!r}) needs gymnax: {INSTALL_HINT}") from error
    if name not in gymnax.registered_envs:
        raise ValueError(
            f"unknown gymnax env {name!r}; gymnax's: {', '.join(gymnax.registered_envs)}"
        )
    env, params = gymnax.make(name, **kwargs)
    return GymnaxEnv(env, params)
