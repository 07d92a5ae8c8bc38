"""REINFORCE with a learned value baseline: the reference strategy, written only against
diffsim's public API. Copy this file to start a strategy of your own."""

from typing import ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import optax
from brax.envs.base import State
from jaxtyping import PRNGKeyArray

import diffsim
from diffsim.strategies import helpers


class REINFORCEState(eqx.Module):
    """`models`: the `(policy, value)` pair; `opt_state`: Adam's state for both; and the
    env batch (leaves `[num_envs, ...]`) carried from one step to the next."""

    models: tuple[eqx.Module, diffsim.ValueFunction]
    opt_state: optax.OptState
    env_state: State


class REINFORCE(diffsim.AbstractStrategy[REINFORCEState]):
    """Policy gradient (Williams 1992) with a learned state-value baseline `V`.

    One `step` rolls out `B = num_envs` envs for `T = unroll_length` steps with
    `diffsim.rollout`, updates the observation statistics from them, takes the discounted
    returns `G` and advantages `A = G - V(s)` from `helpers.gae` with `lam=1` (a time
    limit or the end of the rollout bootstraps from `V`, a termination from 0),
    normalises `A` over the batch, and makes one Adam step on

        L = -mean_{t,b}[ log pi(a_t | s_t) A_t ]  +  mean_{t,b}[ (V(s_t) - G_t)^2 ] / 2

    (`learning_rate` for both; `discount` is gamma; `value_hidden` the critic's widths).
    An update whose loss or gradient is not finite is skipped and counted
    (`metrics["skipped_updates"]`). The policy needs `log_prob(obs, action, *,
    pre_squash=None)`, as `diffsim.GaussianPolicy` has.

    **Example:**

    ```python
    env = diffsim.make_env("reach")
    policy = diffsim.GaussianPolicy(env.observation_size, env.action_size, key=k1)
    run = diffsim.train(diffsim.REINFORCE(), env, policy, key=k2, total_steps=100_000)
    ```
    """

    sweepable: ClassVar[tuple[str, ...]] = ("learning_rate", "discount")
    num_envs: int = 16
    unroll_length: int = 16
    learning_rate: float = 1e-3
    discount: float = 0.97
    value_hidden: tuple[int, ...] = (64, 64)

    def __check_init__(self):
        helpers.positive_int("num_envs", self.num_envs)
        helpers.positive_int("unroll_length", self.unroll_length)
        helpers.positive("learning_rate", self.learning_rate)
        helpers.in_range("discount", self.discount, 0.0, 1.0, low_open=True)

    @property
    def steps_per_iteration(self) -> int:
        return self.num_envs * self.unroll_length

    @property
    def min_steps_per_iteration(self) -> int:
        return self.steps_per_iteration  # every step counts the same

    @property
    def batch_size(self) -> int:
        return self.num_envs  # the env axis, marked with `diffsim.shard_batch`

    def for_env(self, env: diffsim.Env) -> "REINFORCE":
        del env
        return self  # nothing is left to the env

    def for_budget(self, total_steps: int) -> "REINFORCE":
        del total_steps
        return self  # nothing is left to the budget (see `helpers.with_budget` for a decay)

    def check(self, env: diffsim.Env, policy: eqx.Module) -> None:
        if not callable(getattr(policy, "log_prob", None)):
            raise ValueError(
                f"REINFORCE needs a stochastic policy with log_prob(obs, action);"
                f" {type(policy).__name__} has none (use diffsim.GaussianPolicy)"
            )

    def _optimizer(self) -> optax.GradientTransformation:
        return optax.adam(self.learning_rate)

    def init(self, env: diffsim.Env, policy: eqx.Module, *, key: PRNGKeyArray) -> REINFORCEState:
        value_key, env_key = jr.split(key)
        value = diffsim.ValueFunction(env.observation_size, hidden=self.value_hidden, key=value_key)
        models = (policy, value)
        params = eqx.filter(models, diffsim.trainable(models))
        env_state = diffsim.reset(env, key=env_key, num_envs=self.num_envs)
        return REINFORCEState(
            models, self._optimizer().init(params), diffsim.shard_batch(env_state)
        )

    def policy(self, state: REINFORCEState) -> eqx.Module:
        return state.models[0]

    def step(
        self, env: diffsim.Env, state: REINFORCEState, *, key: PRNGKeyArray
    ) -> tuple[REINFORCEState, diffsim.Metrics]:
        env_state = diffsim.shard_batch(state.env_state)
        env_state, traj = diffsim.rollout(
            env, self.policy(state), env_state, key=key, length=self.unroll_length
        )
        fresh = diffsim.update_normalizers(state.models, traj.obs)
        models = helpers.select(jnp.all(jnp.isfinite(traj.obs)), fresh, state.models)
        over_tb = lambda f, *xs: jax.vmap(jax.vmap(f))(*xs)  # over time, then envs
        v, v_next = (over_tb(models[1], obs) for obs in (traj.obs, traj.next_obs))  # [T, B]
        gae = helpers.gae(
            traj.reward, v, v_next, traj.done, traj.truncation, discount=self.discount, lam=1.0
        )
        adv = (gae.advantage - gae.advantage.mean()) / (gae.advantage.std() + 1e-8)

        def loss(models):
            pi, critic = models
            log_prob = lambda o, a, u: pi.log_prob(o, a, pre_squash=u)
            log_probs = over_tb(log_prob, traj.obs, traj.action, traj.extras.get("pre_squash"))
            policy_loss = -jnp.mean(log_probs * adv)
            value_loss = 0.5 * jnp.mean((over_tb(critic, traj.obs) - gae.value_target) ** 2)
            return policy_loss + value_loss, {"policy_loss": policy_loss, "value_loss": value_loss}

        (total, metrics), grads = eqx.filter_value_and_grad(loss, has_aux=True)(models)
        ok = jnp.isfinite(total) & helpers.all_finite(grads)
        models, opt_state = helpers.guarded_update(
            models, grads, state.opt_state, self._optimizer(), ok
        )
        metrics["skipped_updates"] = (~ok).astype(jnp.float32)
        metrics.update(helpers.episode_stats(traj))
        metrics["env_steps"] = jnp.asarray(self.steps_per_iteration, jnp.float32)  # counted
        return REINFORCEState(models, opt_state, env_state), metrics
