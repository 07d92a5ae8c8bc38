"""Proximal policy optimisation (Schulman et al. 2017), entirely inside jit."""

from collections.abc import Callable
from typing import ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import optax
from brax.envs.base import State
from jaxtyping import Array, Float, PRNGKeyArray

from .._types import Env, Metrics, Trajectory
from ..policies import ValueFunction, trainable, update_normalizers
from ..rollout import reset, rollout
from ..sharding import shard_batch
from . import helpers
from ._ppo_parts import Batch, log_prob_at, optimizer
from .base import AbstractStrategy
from .helpers import all_finite, decayed, episode_stats, gae, guarded_update, select


class PPOState(eqx.Module):
    """`policy`, `value` (the critic), their optimiser's state, and the env batch."""

    policy: eqx.Module
    value: ValueFunction
    opt: optax.OptState
    env_state: State


# Minibatch updates per loop iteration: a loop iteration has a fixed cost on XLA's CPU
# backend, paid a quarter as often with 4; on 32 minibatches of two 64x64 networks 4 was
# faster than 1 and than unrolling all of them.
_UNROLL = 4

# The minibatch loop's carry: `((policy, value), optimiser state)`.
_Carry = tuple[tuple[eqx.Module, ValueFunction], optax.OptState]


class PPO(AbstractStrategy[PPOState]):
    """Proximal policy optimisation with a clipped surrogate and a separate critic.

    One `step`: roll out `num_envs x unroll_length` steps with `diffsim.rollout`, compute
    GAE(lambda) (bootstrapping on time limits, not on terminations), then
    `num_epochs` passes of `num_minibatches` shuffled minibatches, each minimising

        L = -E[min(r A, clip(r, 1-eps, 1+eps) A)] + value_coef * E[(V - G)^2] / 2
            - entropy_coef * E[H],          r = pi(a|s) / pi_old(a|s),

    with advantages normalised per minibatch; with `value_clip` the value error is also
    taken at `V_old + clip(V - V_old, -value_clip, value_clip)` and the larger one kept.
    Policy and critic share one Adam, each gradient clipped to `max_grad_norm` on its own
    (the same updates as one clipped Adam per network). With `lr_decay` (default) both rates
    decay linearly to 0 over `lr_decay_steps` env steps, which `train` sets to the run's
    budget unless given (in a loop of your own, `bind(env, total_steps=...)` sets it;
    without it the rate stays constant, with a warning). A minibatch whose
    loss or gradient is not finite is skipped and counted (`metrics["skipped_updates"]`).

    Observation statistics are updated first and `pi_old`, `V_old` recomputed under them;
    `pi_old` is taken at the stored pre-squash sample, not at `arctanh(a)`.
    `shuffle="samples"` permutes transitions, `"envs"` whole env trajectories
    (`num_minibatches` must divide `num_envs`). The policy needs `log_prob` and `entropy`.

    **Example:**

    ```python
    ppo = diffsim.PPO(num_envs=32, learning_rate=3e-4)
    run = diffsim.train(ppo, env, policy, key=key, total_steps=500_000)
    ```
    """

    sweepable: ClassVar[tuple[str, ...]] = (
        "learning_rate",
        "max_grad_norm",
        "adam_eps",
        "discount",
        "gae_lambda",
    ) + ("clip_epsilon", "value_coef", "value_clip", "entropy_coef", "reward_scale")
    num_envs: int = 64
    unroll_length: int = 64
    num_epochs: int = 5
    num_minibatches: int = 32
    learning_rate: float | Callable[[Array], Array] = 3e-4
    max_grad_norm: float = 0.5
    adam_eps: float = 1e-5
    discount: float = 0.97
    gae_lambda: float = 0.95
    clip_epsilon: float = 0.2
    value_coef: float = 0.5
    value_clip: float | None = None
    entropy_coef: float = 0.0
    normalize_advantages: bool = True
    reward_scale: float = 1.0
    value_hidden: tuple[int, ...] = (64, 64)
    lr_decay: bool = True
    lr_decay_steps: int | None = None
    shuffle: str = "samples"

    def __check_init__(self):
        for name in ("num_envs", "unroll_length", "num_epochs", "num_minibatches"):
            helpers.positive_int(name, getattr(self, name))
        batch = self.num_envs * self.unroll_length
        if batch % self.num_minibatches:
            raise ValueError(
                f"num_minibatches={self.num_minibatches} must divide num_envs * unroll_length"
                f" = {batch}"
            )
        if self.shuffle not in ("envs", "samples"):
            raise ValueError(f"shuffle must be 'envs' or 'samples', got {self.shuffle!r}")
        if self.shuffle == "envs" and self.num_envs % self.num_minibatches:
            raise ValueError(
                f"num_minibatches={self.num_minibatches} must divide num_envs={self.num_envs}"
                f" with shuffle='envs' (whole env trajectories per minibatch); use"
                f" shuffle='samples' or another num_minibatches"
            )
        if self.value_clip is not None:
            helpers.positive("value_clip", self.value_clip)
        helpers.check_decay(self, "learning_rate")
        helpers.learning_rate("learning_rate", self.learning_rate)
        for name in ("max_grad_norm", "adam_eps", "clip_epsilon", "reward_scale"):
            helpers.positive(name, getattr(self, name))
        helpers.in_range("discount", self.discount, 0.0, 1.0, low_open=True)
        helpers.in_range("gae_lambda", self.gae_lambda, 0.0, 1.0)
        helpers.in_range("value_coef", self.value_coef, 0.0, float("inf"))
        helpers.in_range("entropy_coef", self.entropy_coef, 0.0, float("inf"))

    @property
    def steps_per_iteration(self) -> int:
        return self.num_envs * self.unroll_length

    @property
    def min_steps_per_iteration(self) -> int:
        return self.steps_per_iteration

    def for_env(self, env: Env) -> "PPO":
        del env
        return self

    def for_budget(self, total_steps: int) -> "PPO":
        """With `lr_decay`, decay over the run's `total_steps` unless `lr_decay_steps` is set."""
        return helpers.with_budget(self, total_steps, "learning_rate")

    @property
    def batch_size(self) -> int:
        return self.num_envs

    def check(self, env: Env, policy: eqx.Module) -> None:
        missing = [m for m in ("log_prob", "entropy") if not callable(getattr(policy, m, None))]
        if missing:
            raise ValueError(
                f"PPO needs a stochastic policy with log_prob(obs, action) and entropy(obs);"
                f" {type(policy).__name__} has no {', '.join(missing)} (use GaussianPolicy)"
            )

    def _optimizer(self) -> optax.GradientTransformation:
        learning_rate = decayed(  # optax counts minibatch updates
            self.learning_rate,
            lr_decay=self.lr_decay,
            lr_decay_steps=self.lr_decay_steps,
            steps_per_iteration=self.steps_per_iteration,
            updates_per_iteration=self.num_epochs * self.num_minibatches,
        )
        return optimizer(learning_rate, self.max_grad_norm, self.adam_eps)

    def init(self, env: Env, policy: eqx.Module, *, key: PRNGKeyArray) -> PPOState:
        value_key, env_key = jr.split(key)
        value = ValueFunction(env.observation_size, hidden=self.value_hidden, key=value_key)
        models = (policy, value)
        return PPOState(
            policy=policy,
            value=value,
            opt=self._optimizer().init(eqx.filter(models, trainable(models))),
            env_state=shard_batch(reset(env, key=env_key, num_envs=self.num_envs)),
        )

    def policy(self, state: PPOState) -> eqx.Module:
        return state.policy

    def _loss(self, models, batch: Batch) -> tuple[Float[Array, ""], Metrics]:
        policy, value = models
        log_prob = jax.vmap(log_prob_at, in_axes=(None, 0, 0, 0))(
            policy, batch.obs, batch.action, batch.pre_squash
        )
        log_ratio = log_prob - batch.log_prob
        ratio = jnp.exp(log_ratio)
        adv = batch.advantage
        if self.normalize_advantages:
            adv = (adv - adv.mean()) / (adv.std() + 1e-8)
        clipped = jnp.clip(ratio, 1 - self.clip_epsilon, 1 + self.clip_epsilon)
        policy_loss = -jnp.mean(jnp.minimum(ratio * adv, clipped * adv))

        v = jax.vmap(value)(batch.obs)
        value_err = (v - batch.value_target) ** 2
        if self.value_clip is not None:
            v_clip = batch.value + jnp.clip(v - batch.value, -self.value_clip, self.value_clip)
            value_err = jnp.maximum(value_err, (v_clip - batch.value_target) ** 2)
        value_loss = 0.5 * jnp.mean(value_err)
        entropy = jnp.mean(jax.vmap(policy.entropy)(batch.obs))

        loss = policy_loss + self.value_coef * value_loss - self.entropy_coef * entropy
        return loss, {
            "policy_loss": policy_loss,
            "value_loss": value_loss,
            "entropy": entropy,
            "approx_kl": jnp.mean((ratio - 1) - log_ratio),
            "clip_fraction": jnp.mean(jnp.abs(ratio - 1) > self.clip_epsilon),
        }

    def _batch(self, policy, value: ValueFunction, traj: Trajectory) -> Batch:
        """The update's data, with behaviour log-probs and values recomputed under the
        current (just updated) observation statistics."""
        pre_squash = traj.extras.get("pre_squash")
        over_tb = lambda f: jax.vmap(jax.vmap(f))
        log_prob = over_tb(lambda o, a, u: log_prob_at(policy, o, a, u))(
            traj.obs, traj.action, pre_squash
        )
        values = over_tb(value)(traj.obs)
        next_values = over_tb(value)(traj.next_obs)
        targets = gae(
            traj.reward * self.reward_scale,
            values,
            next_values,
            traj.done,
            traj.truncation,
            discount=self.discount,
            lam=self.gae_lambda,
        )
        # Minibatches of whole env trajectories ([B, T] -> shuffle B) gather rows of T
        # contiguous samples, cheaper than a gather of single samples.
        env_major = lambda x: None if x is None else jnp.swapaxes(x, 0, 1)
        return jax.tree.map(
            env_major,
            Batch(
                obs=traj.obs,
                action=traj.action,
                pre_squash=pre_squash,
                log_prob=log_prob,
                advantage=targets.advantage,
                value_target=targets.value_target,
                value=values,
            ),
        )

    def _minibatches(self, batch: Batch, key: PRNGKeyArray) -> Batch:
        """`num_minibatches` shuffled minibatches, leaves `[M, N / M, ...]`."""
        m = self.num_minibatches
        if self.shuffle == "envs":
            order = jr.permutation(key, self.num_envs)
            split = lambda x: x[order].reshape(m, -1, *x.shape[2:])
        else:
            order = jr.permutation(key, self.steps_per_iteration)
            split = lambda x: x.reshape(-1, *x.shape[2:])[order].reshape(m, -1, *x.shape[2:])
        return jax.tree.map(split, batch)

    def step(self, env: Env, state: PPOState, *, key: PRNGKeyArray) -> tuple[PPOState, Metrics]:
        rollout_key, shuffle_key = jr.split(key)
        env_state, traj = rollout(
            env,
            state.policy,
            shard_batch(state.env_state),
            key=rollout_key,
            length=self.unroll_length,
        )
        # Observation statistics first, so the update and its behaviour log-probs and
        # values all see the statistics the next rollout will act with.
        obs_ok = jnp.all(jnp.isfinite(traj.obs))
        policy, value = select(
            obs_ok,
            update_normalizers((state.policy, state.value), traj.obs),
            (state.policy, state.value),
        )
        batch = self._batch(policy, value, traj)
        opt = self._optimizer()
        grad_fn = eqx.filter_value_and_grad(self._loss, has_aux=True)

        def minibatch_step(carry: _Carry, mb: Batch) -> tuple[_Carry, Metrics]:
            models, opt_state = carry
            (loss, metrics), grads = grad_fn(models, mb)
            ok = jnp.isfinite(loss) & all_finite(grads)  # else skip this minibatch
            metrics["grad_norm"] = optax.tree.norm(eqx.filter(grads[0], eqx.is_inexact_array))
            metrics["skipped_updates"] = jnp.asarray(~ok, jnp.float32)
            return guarded_update(models, grads, opt_state, opt, ok), metrics

        def epoch(carry: _Carry, key: PRNGKeyArray) -> tuple[_Carry, dict[str, Array]]:
            minibatches = self._minibatches(batch, key)
            return jax.lax.scan(minibatch_step, carry, minibatches, unroll=_UNROLL)

        keys = jr.split(shuffle_key, self.num_epochs)
        ((policy, value), opt_state), metrics = jax.lax.scan(
            epoch, ((policy, value), state.opt), keys
        )
        state = PPOState(policy=policy, value=value, opt=opt_state, env_state=env_state)
        skipped = jnp.sum(metrics.pop("skipped_updates"))
        metrics = jax.tree.map(jnp.nanmean, metrics)
        metrics["skipped_updates"] = skipped  # minibatch updates skipped this iteration
        metrics.update(episode_stats(traj))
        metrics["env_steps"] = jnp.asarray(self.steps_per_iteration, jnp.float32)
        return state, metrics
