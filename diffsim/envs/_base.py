"""`AbstractEnv`: the interface for an env of your own, and `check_env`, its checks."""

import abc
from typing import ClassVar

import jax
import jax.numpy as jnp
from brax.envs.base import Env, State
from jaxtyping import Array, Float, PRNGKeyArray

PhysState = dict[str, jax.Array]
"""An env's own state: any pytree of arrays (a dict of named arrays is customary)."""


class AbstractEnv(Env):
    """The base class of an env of your own: four pure functions of ONE env and three sizes.

    Subclass it, set the three class attributes and write the four methods; `make_env`
    (with the class itself or `"MODULE:CLASS"`), `train`, the CLI (`--env MODULE:CLASS`),
    `render`, `load_run` and `evaluate` then take it like a built-in env. The built-in toy
    envs (`Reach`, `Pendulum`, `Ball`) are written this way; `AbstractToyEnv` is another
    name for this class. Write everything for one env: diffsim batches with `jax.vmap`.

    **Class attributes** (positive ints):

    - `obs_size`: the length of the observation, `observe(s).shape == (obs_size,)`.
    - `act_size`: the length of the action `dynamics` and `reward` receive.
    - `default_episode_length`: steps per episode unless `make_env(episode_length=...)`.

    **Methods** (all pure functions of their arguments, written with `jax.numpy`):

    - `init(key: PRNGKeyArray) -> state`: a random initial state, any pytree of arrays.
    - `dynamics(state, action: Float[Array, "act"]) -> state`: the next state, with the
      same structure, shapes and dtypes. `action` is clipped to [-1, 1] before the call.
    - `observe(state) -> Float[Array, "obs"]`: what the policy sees.
    - `reward(state, action, next_state) -> Float[Array, ""]`: a scalar. For first-order
      strategies (APG, SHAC, ...) it should depend smoothly on `action` through
      `next_state` (no `stop_gradient`, no indicator alone).

    Episodes never end early (the time limit ends them); for a terminating env write a
    Brax `Env` instead. Constructor arguments are your own: `make_env(MyEnv, gain=2.0)`
    passes `gain=2.0` on and a saved run records it (as JSON, so plain values only).

    **Raises** (from `make_env`, before anything compiles): `TypeError` naming a missing
    size; `ValueError` naming the method whose output has the wrong shape or structure.

    **Example:**

    ```python
    import jax, jax.numpy as jnp, diffsim

    class Cart(diffsim.envs.AbstractEnv):
        obs_size, act_size, default_episode_length = 2, 1, 50

        def __init__(self, gain: float = 1.0):
            self.gain = gain

        def init(self, key):
            return {"x": jax.random.uniform(key, (), minval=-1.0, maxval=1.0), "v": jnp.zeros(())}

        def dynamics(self, s, action):
            v = s["v"] + 0.1 * self.gain * action[0]
            return {"x": s["x"] + 0.1 * v, "v": v}

        def observe(self, s):
            return jnp.stack([s["x"], s["v"]])

        def reward(self, s, action, next_s):
            return -next_s["x"] ** 2 - 0.01 * jnp.sum(action**2)

    env = diffsim.make_env(Cart, gain=2.0)   # or "my_module:Cart" from another file
    ```
    """

    default_episode_length: ClassVar[int]
    obs_size: ClassVar[int]
    act_size: ClassVar[int]

    @abc.abstractmethod
    def init(self, key: PRNGKeyArray) -> PhysState:
        """A random initial state (any pytree of arrays)."""

    @abc.abstractmethod
    def dynamics(self, s: PhysState, action: Float[Array, " act"]) -> PhysState:
        """The state after `action` (in [-1, 1]); same structure, shapes and dtypes."""

    @abc.abstractmethod
    def observe(self, s: PhysState) -> Float[Array, " obs"]:
        """The observation of `s`, shape `(obs_size,)`."""

    @abc.abstractmethod
    def reward(
        self, s: PhysState, action: Float[Array, " act"], next_s: PhysState
    ) -> Float[Array, ""]:
        """The scalar reward of the transition `s -> next_s` under `action`."""

    def reset(self, rng: jax.Array) -> State:
        s = self.init(rng)
        zero = jnp.zeros(())
        # The pipeline state is the env's own pytree of arrays, not a Brax pipeline State.
        return State(pipeline_state=s, obs=self.observe(s), reward=zero, done=zero)  # pyright: ignore[reportArgumentType]

    def step(self, state: State, action: jax.Array) -> State:
        action = jnp.clip(action, -1.0, 1.0)
        s: PhysState = state.pipeline_state  # pyright: ignore[reportAssignmentType]
        next_s = self.dynamics(s, action)
        return state.replace(  # pyright: ignore[reportAttributeAccessIssue]  (flax dataclass)
            pipeline_state=next_s,
            obs=self.observe(next_s),
            reward=self.reward(s, action, next_s),
            done=jnp.zeros(()),
        )

    @property
    def observation_size(self) -> int:
        return self.obs_size

    @property
    def action_size(self) -> int:
        return self.act_size

    @property
    def backend(self) -> str:
        return "jax"


_SIZES = {
    "obs_size": "the length of the observation observe(state) returns",
    "act_size": "the length of the action vector dynamics and reward take",
    "default_episode_length": "steps per episode unless make_env(episode_length=...)",
}


def check_env(env: AbstractEnv) -> None:
    """Check `env` against the `AbstractEnv` interface by tracing each method once with
    `jax.eval_shape` (nothing is compiled or run).

    **Raises:** `TypeError` for a missing or non-int size, `ValueError` naming the method
    whose output has the wrong shape, structure or dtype, and the shape it should have.

    **Example:** `check_env(MyEnv())`, or let `make_env(MyEnv)` call it.
    """
    name = type(env).__name__
    for member, what in _SIZES.items():
        value = getattr(env, member, None)
        if value is None:
            raise TypeError(f"{name} must set {member} (an int: {what})")
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise TypeError(f"{name}.{member} must be a positive int ({what}), got {value!r}")
    key = jax.eval_shape(jax.random.key, 0)  # abstract values only: nothing compiles
    state = _trace(name, "init(key)", env.init, key)
    obs = _trace(name, "observe(state)", env.observe, state)
    if getattr(obs, "shape", None) != (env.obs_size,):
        raise ValueError(
            f"{name}.observe must return shape ({env.obs_size},) (obs_size = {env.obs_size}),"
            f" got {_describe(obs)}"
        )
    action = jax.ShapeDtypeStruct((env.act_size,), jnp.result_type(float))
    call = f"dynamics(state, action of shape ({env.act_size},))"
    after = _trace(name, call, env.dynamics, state, action)
    if _describe(after) != _describe(state):
        raise ValueError(
            f"{name}.dynamics must return a state like init's (same structure, shapes and"
            f" dtypes): init gave {_describe(state)}, dynamics gave {_describe(after)}"
        )
    reward = _trace(name, "reward(state, action, next_state)", env.reward, state, action, after)
    if getattr(reward, "shape", None) != ():
        raise ValueError(f"{name}.reward must return a scalar (shape ()), got {_describe(reward)}")


def _trace(name: str, call: str, fn, *args):
    """`jax.eval_shape(fn, *args)`, an error inside saying which method was traced."""
    try:
        return jax.eval_shape(fn, *args)
    except Exception as error:
        error.add_note(f"(while diffsim traced {name}.{call} to check the env's shapes)")
        raise


def _describe(tree) -> str:
    """`{'v': float32[], 'x': float32[2]}`-like text of a traced pytree's shapes and dtypes."""
    leaves = jax.tree_util.tree_leaves_with_path(tree)
    if len(leaves) == 1 and not leaves[0][0]:
        leaf = leaves[0][1]
        return f"shape {tuple(leaf.shape)} ({leaf.dtype})"
    parts = [f"{jax.tree_util.keystr(p)}: {x.dtype}{list(x.shape)}" for p, x in leaves]
    return f"{jax.tree.structure(tree).num_leaves} arrays {{{', '.join(parts)}}}"
