"""The rollout core: the one place where training and evaluation step an environment.

Every strategy reaches the simulator through `rollout`: PPO collects its batches with
it, APG differentiates through it, ES `vmap`s it over a population, and `evaluate`
scores policies with it. Data reaches an update only through the `Trajectory` it returns.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
from brax.envs.base import Env, State
from jaxtyping import Array, Float, PRNGKeyArray

from ._types import Trajectory
from .sharding import shard_batch


def reset(env: Env, *, key: PRNGKeyArray, num_envs: int) -> State:
    """Reset a batch of `num_envs` envs, one fresh key each; leaves get a leading `B` axis.

    **Example:**

    ```python
    env_state = diffsim.reset(env, key=jax.random.key(0), num_envs=64)
    env_state.obs.shape   # (64, env.observation_size)
    ```
    """
    return jax.vmap(env.reset)(jr.split(key, num_envs))


def _act(policy, obs, key, deterministic: bool):
    """One observation in: the action and, for stochastic policies, its log-density."""
    if deterministic:
        return policy(obs), jnp.zeros(())
    action = policy(obs, key=key)
    if hasattr(policy, "log_prob"):
        # The log-density is a record for off-/on-policy corrections, not a gradient path.
        return action, policy.log_prob(obs, jax.lax.stop_gradient(action))
    return action, jnp.zeros(())


def rollout(
    env: Env,
    policy: eqx.Module,
    env_state: State,
    *,
    key: PRNGKeyArray,
    length: int,
    deterministic: bool = False,
) -> tuple[State, Trajectory]:
    """Run `policy` in a batch of envs for `length` steps.

    One `lax.scan` over time of a step written for one env and `vmap`ped over the batch.
    Differentiable end to end: gradients flow from rewards back through the simulator to
    the policy's parameters and to `env_state` (they stop at auto-resets). Envs from
    `make_env` auto-reset, so a batch can be rolled out for any `length`.

    **Arguments:**

    - `env`: an env from `make_env` (written for one instance).
    - `policy`: `policy(obs, *, key=None) -> action` on one observation.
    - `env_state`: a batch of states, leaves with a leading `B` axis (see `reset`).
    - `key`: randomness of the action sampling (keyword-only).
    - `length`: `T`, the number of steps.
    - `deterministic`: act with `policy(obs)` (no key) instead of sampling.

    **Returns:** `(env_state, trajectory)`: the batch's state after `T` steps and a
    `Trajectory` with leading axes `T B`.

    **Example:**

    ```python
    env = diffsim.make_env("pendulum")
    policy = diffsim.GaussianPolicy(env.observation_size, env.action_size, key=k1)
    state = diffsim.reset(env, key=k2, num_envs=16)
    state, traj = diffsim.rollout(env, policy, state, key=k3, length=100)
    traj.reward.shape   # (100, 16)
    ```
    """

    def one_env(state: State, key: PRNGKeyArray) -> tuple[State, Trajectory]:
        """One step of one env: act, step, record the transition."""
        action, log_prob = _act(policy, state.obs, key, deterministic)
        next_state = env.step(state, action)
        info = next_state.info
        transition = Trajectory(
            obs=state.obs,
            action=action,
            reward=next_state.reward,
            done=next_state.done,
            truncation=info.get("truncation", jnp.zeros_like(next_state.done)),
            next_obs=info.get("final_obs", next_state.obs),
            log_prob=log_prob,
            extras={
                "episode_return": info.get("episode_return", jnp.zeros_like(next_state.reward))
            },
        )
        return next_state, transition

    num_envs = env_state.done.shape[0]

    def step(state: State, key: PRNGKeyArray) -> tuple[State, Trajectory]:
        return jax.vmap(one_env)(state, jr.split(key, num_envs))

    # scan(vmap(...)) writes the trajectory time-major directly (vmap(scan(...)) would
    # need a transpose of all of it, which costs ~8% on a cheap env).
    return jax.lax.scan(step, env_state, jr.split(key, length))


def episode_returns(traj: Trajectory) -> Float[Array, " B"]:
    """Return of each env's FIRST episode in `traj` (rewards after its end are dropped).

    Use on a rollout that starts at a reset and is at least one episode long.
    """
    before_end = jnp.cumsum(traj.done, axis=0) - traj.done  # episodes finished before t
    return jnp.sum(traj.reward * (before_end == 0), axis=0)


def episode_stats(traj: Trajectory) -> dict[str, Float[Array, ""]]:
    """`{"episodes": episodes finished in traj, "train_return": their mean return}`
    (0 when none finished), as strategies log them. Not differentiated."""
    traj = jax.lax.stop_gradient(traj)
    episodes = jnp.sum(traj.done)
    returns = jnp.sum(traj.extras["episode_return"] * traj.done) / jnp.maximum(episodes, 1)
    return {"episodes": episodes.astype(jnp.float32), "train_return": returns.astype(jnp.float32)}


def evaluate(
    env: Env,
    policy: eqx.Module,
    *,
    key: PRNGKeyArray,
    num_episodes: int = 16,
    deterministic: bool = True,
) -> Float[Array, " episodes"]:
    """Undiscounted return of `num_episodes` full episodes, one per env, from fresh resets.

    Runs `env.episode_length` steps through `rollout` (the deterministic policy by
    default) and sums each env's rewards up to its first episode end. The same `key`
    gives the same initial states, so policies compared under one key see identical
    episodes.

    **Example:**

    ```python
    returns = diffsim.evaluate(env, policy, key=jax.random.key(0), num_episodes=8)
    returns.shape   # (8,)
    ```
    """
    reset_key, act_key = jr.split(key)
    state = shard_batch(reset(env, key=reset_key, num_envs=num_episodes))
    _, traj = rollout(
        env, policy, state, key=act_key, length=env.episode_length, deterministic=deterministic
    )
    return episode_returns(traj)
