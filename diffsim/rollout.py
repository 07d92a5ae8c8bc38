"""The rollout core: the one place where training and evaluation step an environment.

Every strategy reaches the simulator through `rollout`: PPO collects its batches with
it, APG differentiates through it, ES `vmap`s it over a population, and `evaluate`
scores policies with it. Data reaches an update only through the `Trajectory` it returns.
"""

from typing import Any, cast

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
from brax.envs.base import State
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray

from ._episodes import (
    Episodes as Episodes,
    ended_before,
    episode_returns as episode_returns,
    episode_stats as episode_stats,
)
from ._types import Env, Trajectory
from .policies import RunningNorm
from .sharding import shard_batch


def reset(env: Env, *, key: PRNGKeyArray, num_envs: int) -> State:
    """Reset a batch of `num_envs` envs, one fresh key each; leaves get a leading `B` axis.

    **Example:**

    ```python
    env_state = diffsim.reset(env, key=jax.random.key(0), num_envs=64)
    env_state.obs.shape   # (64, env.observation_size)
    ```
    """
    return _reset(env, key, num_envs)


@eqx.filter_jit  # one compiled program when called eagerly (not one per Brax operation)
def _reset(env: Env, key: PRNGKeyArray, num_envs: int) -> State:
    return jax.vmap(env.reset)(jr.split(key, num_envs))


def from_resets(env: Env, key: PRNGKeyArray, num_envs: int) -> tuple[State, PRNGKeyArray]:
    """`num_envs` fresh resets from one half of `key`, and the other half to act with."""
    reset_key, act_key = jr.split(key)
    return reset(env, key=reset_key, num_envs=num_envs), act_key


class Action(eqx.Module):
    """What a policy did at one step: the env `action`, the Gaussian sample before the
    tanh squash (`pre_squash`, or `action` itself for policies without `sample`), and
    `log_prob` (0 for deterministic acting or policies without `log_prob`)."""

    action: Float[Array, " act"]
    pre_squash: Float[Array, " act"]
    log_prob: Float[Array, ""]


def _act(policy, obs, key, deterministic: bool) -> Action:
    """One observation in: the action, its pre-squash sample and its log-density."""
    if deterministic:
        action = policy(obs)
        return Action(action, action, jnp.zeros((), action.dtype))
    if hasattr(policy, "sample"):  # keeps the pre-squash sample: no arctanh round trip
        action, pre_squash = policy.sample(obs, key=key)
        # The log-density is a record for on-policy corrections, not a gradient path.
        log_prob = policy.log_prob(obs, action, pre_squash=jax.lax.stop_gradient(pre_squash))
        return Action(action, pre_squash, jax.lax.stop_gradient(log_prob))
    action = policy(obs, key=key)
    if hasattr(policy, "log_prob"):
        return Action(action, action, policy.log_prob(obs, jax.lax.stop_gradient(action)))
    return Action(action, action, jnp.zeros((), action.dtype))


def default_pool_size(length: int) -> int:
    """Fresh starts `rollout` draws per env and call: one per 32 steps (at least one).

    A Brax reset costs about a step; per env and call this draws `ceil(T / 32)` of them,
    about 3% of a rollout's steps, instead of a reset on every step."""
    return max(1, -(-length // 32))


def rollout(
    env: Env,
    policy: eqx.Module,
    env_state: State,
    *,
    key: PRNGKeyArray,
    length: int,
    deterministic: bool = False,
    num_starts: int | None = None,
) -> tuple[State, Trajectory]:
    """Run `policy` in a batch of envs for `length` steps.

    One `lax.scan` over time of a step written for one env and `vmap`ped over the batch.
    Differentiable end to end: gradients flow from rewards back through the simulator to
    the policy's parameters and to `env_state` (they stop at auto-resets). Envs from
    `make_env` auto-reset, so a batch can be rolled out for any `length`.

    Auto-resets take their starts from a pool of `num_starts` fresh draws per env, made
    once per call before the scan (`AutoResetEnv.starts`), so no step computes a reset.
    An env whose episodes end more often than that within the call reuses its last start;
    `traj.extras["reused_start"]` marks those steps. `num_starts=0` resets nothing (ended
    episodes keep stepping).

    **Arguments:**

    - `env`: an env from `make_env` (written for one instance).
    - `policy`: `policy(obs, *, key=None) -> action` on one observation.
    - `env_state`: a batch of states, leaves with a leading `B` axis (see `reset`).
    - `key`: randomness of the action sampling (keyword-only).
    - `length`: `T`, the number of steps.
    - `deterministic`: act with `policy(obs)` (no key) instead of sampling.
    - `num_starts`: starts drawn per env for this call; default `ceil(T / 32)`.

    **Returns:** `(env_state, trajectory)`: the batch's state after `T` steps and a
    `Trajectory` with leading axes `T B`. `extras` holds `"episode_return"`,
    `"reused_start"`, `"diverged"` (a non-finite step, which ended its episode) and, for
    policies with `sample`, `"pre_squash"` (the Gaussian sample before `tanh`).

    **Example:**

    ```python
    env = diffsim.make_env("pendulum")
    policy = diffsim.GaussianPolicy(env.observation_size, env.action_size, key=k1)
    state = diffsim.reset(env, key=k2, num_envs=16)
    state, traj = diffsim.rollout(env, policy, state, key=k3, length=100)
    traj.reward.shape   # (100, 16)
    ```
    """
    num_starts = default_pool_size(length) if num_starts is None else num_starts
    pooled = hasattr(env, "starts")  # a bare Brax env steps with its own API
    if pooled:
        starts_of = env.starts  # pyright: ignore[reportAttributeAccessIssue]  (AutoResetEnv)
        env_state, starts = jax.vmap(starts_of, in_axes=(0, None))(env_state, num_starts)
    else:
        starts = ()

    def one_env(state: State, starts, key: PRNGKeyArray) -> tuple[State, Trajectory]:
        """One step of one env: act, step, record the transition."""
        act = _act(policy, state.obs, key, deterministic)
        step: Any = env.step  # AutoResetEnv.step also takes the fresh-start pool
        next_state = step(state, act.action, starts) if pooled else step(state, act.action)
        info = next_state.info
        zeros = jnp.zeros_like(next_state.reward)
        extras = {k: info.get(k, zeros) for k in ("episode_return", "reused_start", "diverged")}
        if hasattr(policy, "sample") and not deterministic:
            extras["pre_squash"] = act.pre_squash
        transition = Trajectory(
            obs=cast(Array, state.obs),  # diffsim envs observe one flat vector
            action=act.action,
            reward=next_state.reward,
            done=next_state.done,
            truncation=info.get("truncation", zeros),
            next_obs=info.get("final_obs", next_state.obs),
            log_prob=act.log_prob,
            extras=extras,
        )
        return next_state, transition

    num_envs = env_state.done.shape[0]

    def step(state: State, key: PRNGKeyArray) -> tuple[State, Trajectory]:
        return jax.vmap(one_env)(state, starts, jr.split(key, num_envs))

    # scan(vmap(...)) writes the trajectory time-major directly (vmap(scan(...)) would
    # need a transpose of all of it, which costs ~8% on a cheap env).
    return jax.lax.scan(step, env_state, jr.split(key, length))


class _EpisodeLoop(eqx.Module):
    env_state: State
    returns: Float[Array, " B"]
    steps: Int[Array, " B"]
    diverged: Float[Array, " B"]
    alive: Bool[Array, " B"]
    obs: RunningNorm
    t: Int[Array, ""]
    key: PRNGKeyArray


def first_episodes(
    env: Env,
    policy: eqx.Module,
    env_state: State,
    *,
    key: PRNGKeyArray,
    max_length: int,
    deterministic: bool = True,
    chunk: int = 50,
) -> Episodes:
    """Play each env's current episode to its end (or `max_length` steps) and stop.

    Steps `rollout` in chunks of `chunk` steps inside a `lax.while_loop` that ends once
    every env's episode has ended, and resets nothing (`num_starts=0`). Rewards and
    observations after an env's episode end are masked out, so the chunk size changes the
    compute, never the result. Used by `evaluate` and by `ES` (one call per population).

    **Example:**

    ```python
    state = diffsim.reset(env, key=k1, num_envs=8)
    ep = first_episodes(env, policy, state, key=k2, max_length=env.episode_length)
    ep.returns.shape, ep.steps.shape   # (8,), (8,)
    ```
    """
    chunk = min(chunk, max_length)
    num_envs = env_state.done.shape[0]
    obs_size = cast(Array, env_state.obs).shape[-1]

    def body(loop: _EpisodeLoop) -> _EpisodeLoop:
        key, act_key = jr.split(loop.key)
        state, traj = rollout(
            env,
            policy,
            loop.env_state,
            key=act_key,
            length=chunk,
            deterministic=deterministic,
            num_starts=0,
        )
        in_time = (loop.t + jnp.arange(chunk) < max_length)[:, None]
        before = ended_before(traj.done)
        inside = loop.alive[None] & (before == 0) & in_time  # [chunk, B]
        weight = inside.astype(traj.reward.dtype)
        ended = jnp.any(inside & (traj.done > 0), axis=0)
        return _EpisodeLoop(
            env_state=state,
            returns=loop.returns + jnp.sum(jnp.where(inside, traj.reward, 0.0), axis=0),
            steps=loop.steps + jnp.sum(inside, axis=0, dtype=jnp.int32),
            diverged=loop.diverged + jnp.sum(jnp.where(inside, traj.extras["diverged"], 0.0), 0),
            alive=loop.alive & ~ended & (loop.t + chunk < max_length),
            obs=loop.obs.update(jnp.where(inside[..., None], traj.obs, 0.0), weight),
            t=loop.t + chunk,
            key=key,
        )

    zeros = jnp.zeros(num_envs, env_state.reward.dtype)
    loop = _EpisodeLoop(
        env_state=env_state,
        returns=zeros,
        steps=jnp.zeros(num_envs, jnp.int32),
        diverged=zeros,
        alive=jnp.ones(num_envs, bool),
        obs=RunningNorm(obs_size),
        t=jnp.zeros((), jnp.int32),
        key=key,
    )
    loop = jax.lax.while_loop(lambda loop: jnp.any(loop.alive), body, loop)
    return Episodes(
        returns=loop.returns, steps=loop.steps, diverged=loop.diverged, length=loop.t, obs=loop.obs
    )


def evaluate(
    env: Env,
    policy: eqx.Module,
    *,
    key: PRNGKeyArray,
    num_episodes: int = 16,
    deterministic: bool = True,
) -> Float[Array, " episodes"]:
    """Undiscounted return of `num_episodes` full episodes, one per env, from fresh resets.

    Plays every episode to its end with `first_episodes` (the deterministic policy by
    default; at most `env.episode_length` steps) and stops once all have ended. The same
    `key` gives the same initial states, so policies compared under one key see identical
    episodes.

    **Example:**

    ```python
    returns = diffsim.evaluate(env, policy, key=jax.random.key(0), num_episodes=8)
    returns.shape   # (8,)
    ```
    """
    state, act_key = from_resets(env, key, num_episodes)
    length = env.episode_length  # pyright: ignore[reportAttributeAccessIssue]
    episodes = first_episodes(
        env, policy, shard_batch(state), key=act_key, max_length=length, deterministic=deterministic
    )
    return episodes.returns
