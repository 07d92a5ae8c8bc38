"""Adaptive horizon actor-critic (Georgiev et al. 2024): SHAC's window, cut per env where
contact gets stiff, with a learned horizon and an ensemble of critics.

The window and the actor loss come from `_windows.py` (shared with `APG` and `SHAC`); the
per-env cut and the stiffness signal of each backend from `_stiffness.py`; the critics
from `_ensemble_critic.py`, shared with `SAPO`.
"""

from collections.abc import Callable
from typing import ClassVar, cast

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import optax
from brax.envs.base import State
from jaxtyping import Array, Float, Int, PRNGKeyArray

from .._types import Env, Metrics
from ..policies import RunningNorm, trainable
from . import helpers
from ._window.ensemble import AbstractEnsembleCritic, EnsembleCritic, ValueEnsemble
from ._window.options import UpdateOptions, WindowOptions
from ._window.stiffness import SIGNAL, StiffnessCut, segment_ends, with_signal_slots
from ._window.strategy import WINDOW_SWEEPABLE, AbstractWindowStrategy
from ._window.window import Window, shac_loss, update_normalizers_from
from .helpers import episode_stats


class AHACState(eqx.Module):
    """`policy` and its optimiser state, the `critic` ensemble, the carried env batch (with
    its stiffness slots), the learned `horizon` (a float in `[horizon_min, horizon]`) and the
    running statistics of the actor's per-env window losses (`returns`)."""

    policy: eqx.Module
    policy_opt: optax.OptState
    critic: EnsembleCritic
    env_state: State
    horizon: Float[Array, ""]
    returns: RunningNorm


class AHAC(AbstractWindowStrategy[AHACState], AbstractEnsembleCritic):
    """Adaptive horizon actor-critic (Georgiev et al. 2024): SHAC whose gradient windows end,
    per env, where contact gets stiff, with a learned horizon and `num_critics` critics.

    One `step` rolls out `horizon` steps (the longest window) from the carried,
    gradient-cut env batch. Within it, env `b`'s gradient segment ends after step `t` if

        s_t^b > C      (a stiff step: `contact_threshold`)   or   (t + 1) mod round(h) = 0,

    where `s_t^b` is the step's stiffness signal (see `diffsim.strategies._stiffness` for each
    backend's) and `h` the learned horizon. At a segment end the state carried on is cut from
    the gradient (`stop_gradient`) and the segment bootstraps from the critics' minimum
    `V_min(next_obs)`; episode ends are segment ends as in `SHAC`. The actor descends

        L(theta) = 1/B sum_b L_b / sigma,   L_b = -sum_segments [ sum_{k<n} g^k r_{t0+k}
                                                  + g^n (1 - term) V_min(next_obs_{t0+n-1}) ],

    `sigma` the running standard deviation of the per-env losses `L_b` over past iterations
    with `normalize_returns` (`horizon` without). Then every critic fits TD(lambda) targets of
    `V_min` on the window (no target critic; the loss the mean over critics; clipped at
    `critic_max_grad_norm`), and the horizon takes a projected dual step on the constraint
    `s <= C`:

        h <- clip(h + horizon_lr * mean_{t,b}(C - s_t^b), horizon_min, horizon).

    Steps below the threshold lengthen the windows, stiff ones shorten them. Every step of
    the window feeds the update, so one `step` counts `num_envs * horizon` env steps
    (`metrics["env_steps"]`). `metrics["window_length"]` is the mean length of the gradient
    segments, `metrics["cut_windows"]` the segments ended by a stiff step, `metrics["horizon"]`
    the learned horizon, `metrics["stiffness"]` the mean signal.

    `max_grad_norm`, `stochastic` (on by default), `valve_max_norm` (100 by default),
    `lr_decay` (on by default, as published), `options`, `update` and the checks before
    compiling are as in `SHAC`; the observation statistics of the policy and critics are
    frozen within the window.

    - `horizon`: the longest window (static); `horizon_min`: the shortest learned horizon,
      where it starts.
    - `num_critics`, `value_hidden`, `value_activation` (`"mish"` or a name in
      `diffsim.policies.ACTIVATIONS`), `value_layer_norm`: the critics, each hidden layer
      followed by the activation then a LayerNorm.

    **Example:**

    ```python
    ahac = diffsim.AHAC(num_envs=64, contact_threshold=500.0)
    policy = diffsim.GaussianPolicy(env.observation_size, env.action_size, key=k1)
    run = diffsim.train(ahac, env, policy, key=k2, total_steps=1_000_000)
    run.metrics["window_length"], run.metrics["cut_windows"]
    ```
    """

    sweepable: ClassVar[tuple[str, ...]] = (
        ("horizon_lr", "contact_threshold", "actor_learning_rate", "critic_learning_rate")
        + ("discount", "gae_lambda", "critic_max_grad_norm")
        + WINDOW_SWEEPABLE
    )
    num_envs: int = 64
    horizon: int = 64
    stochastic: bool = True
    valve_max_norm: float | None = 100.0
    options: WindowOptions = WindowOptions()
    horizon_min: int = 8
    horizon_lr: float = 2e-3
    contact_threshold: float = 500.0
    actor_learning_rate: float | Callable[[Array], Array] = 2e-3
    critic_learning_rate: float | Callable[[Array], Array] = 5e-4
    discount: float = 0.99
    gae_lambda: float = 0.95
    num_critics: int = 3
    critic_epochs: int = 16
    critic_minibatches: int = 4
    value_hidden: tuple[int, ...] = (400, 200)
    value_activation: str = "mish"
    value_layer_norm: bool = True
    critic_max_grad_norm: float = 100.0
    normalize_returns: bool = True
    max_grad_norm: float = 1.0
    lr_decay: bool = True
    lr_decay_steps: int | None = None
    update: UpdateOptions = UpdateOptions()

    def __check_init__(self):
        helpers.learning_rate("actor_learning_rate", self.actor_learning_rate)
        helpers.check_decay(self, "actor_learning_rate", "critic_learning_rate")
        helpers.positive_int("horizon_min", self.horizon_min)
        if self.horizon_min > self.horizon:
            raise ValueError(
                f"horizon_min={self.horizon_min} must not exceed horizon={self.horizon}"
            )
        helpers.positive("horizon_lr", self.horizon_lr)
        helpers.positive("contact_threshold", self.contact_threshold)
        helpers.positive("critic_max_grad_norm", self.critic_max_grad_norm)
        if not isinstance(self.normalize_returns, bool):
            raise ValueError(f"normalize_returns must be a bool, got {self.normalize_returns!r}")

    def for_budget(self, total_steps: int) -> "AHAC":
        """With `lr_decay`, decay over the run's `total_steps` unless `lr_decay_steps` is set."""
        return helpers.with_budget(self, total_steps, "actor_learning_rate", "critic_learning_rate")

    def check(self, env: Env, policy: eqx.Module) -> None:
        self.window.check(env, policy)

    @property
    def _norm_after_activation(self) -> bool:
        return True

    def _critic_optimizer(self) -> optax.GradientTransformation:
        updates = self.critic_epochs * self.critic_minibatches
        return self._optimizer(self.critic_learning_rate, updates, self.critic_max_grad_norm)

    def init(self, env: Env, policy: eqx.Module, *, key: PRNGKeyArray) -> AHACState:
        value_key, env_key = jr.split(key)
        env_state = self.window.initial_env_state(env, policy, key=env_key)
        return AHACState(
            policy=policy,
            policy_opt=self._optimizer(self.actor_learning_rate).init(
                eqx.filter(policy, trainable(policy))
            ),
            critic=self._new_ensemble(env, key=value_key),
            env_state=with_signal_slots(env_state, self.horizon),
            horizon=jnp.asarray(float(self.horizon_min)),
            returns=RunningNorm(1),
        )

    def policy(self, state: AHACState) -> eqx.Module:
        return state.policy

    def _period(self, horizon: Float[Array, ""]) -> Int[Array, ""]:
        return jnp.clip(jnp.round(horizon), self.horizon_min, self.horizon).astype(jnp.int32)

    def env_losses(
        self,
        env: Env,
        policy: eqx.Module,
        critic: ValueEnsemble,
        env_state: State,
        horizon: Float[Array, ""],
        *,
        key: PRNGKeyArray,
    ) -> tuple[Float[Array, " B"], Window]:
        """Each env's window loss `L_b` (the equation above, before the division by `sigma`)
        with the learned `horizon` and `critic`'s minimum as the bootstrap, and the window
        (its env state holds each step's stiffness signal in `info["stiffness"]`)."""
        period = self._period(horizon)
        cut_env = cast(
            Env,
            StiffnessCut(env, threshold=self.contact_threshold, period=period, length=self.horizon),
        )
        window = self.window(cut_env, policy, env_state, key=key)
        traj = window.traj
        signal = jnp.swapaxes(window.env_state.info[SIGNAL], 0, 1).astype(traj.reward.dtype)
        cut, _ = segment_ends(signal, threshold=self.contact_threshold, period=period)
        ended = traj.done > 0
        segmented = eqx.tree_at(
            lambda t: (t.done, t.truncation),
            traj,
            (
                jnp.where(cut, 1.0, traj.done).astype(traj.done.dtype),
                jnp.where(cut & ~ended, 1.0, traj.truncation).astype(traj.truncation.dtype),
            ),
        )
        bootstrap = jax.lax.stop_gradient(critic).min
        losses = shac_loss(segmented, bootstrap, discount=self.discount)
        return losses * self.horizon, window

    def step(self, env: Env, state: AHACState, *, key: PRNGKeyArray) -> tuple[AHACState, Metrics]:
        rollout_key, critic_key = jr.split(key)
        if self.normalize_returns:
            scale = jnp.sqrt(state.returns.var[0] + 1e-5)
        else:
            scale = jnp.asarray(float(self.horizon))
        actor = self._actor_update(
            lambda policy, env_state, key: self._scaled(
                self.env_losses(env, policy, state.critic.value, env_state, state.horizon, key=key),
                scale,
            ),
            state.policy,
            state.policy_opt,
            state.env_state,
            self._optimizer(self.actor_learning_rate),
            key=rollout_key,
        )
        grad, policy, policy_opt, traj = actor.grad, actor.policy, actor.opt_state, actor.traj
        fit = self._update_critic(state.critic, traj, grad.kept, grad.ok, key=critic_key)
        policy = update_normalizers_from(policy, traj, grad.kept, fit.ok)
        # The horizon's dual step, and the statistics of the per-env losses.
        signal = jnp.swapaxes(grad.window.env_state.info[SIGNAL], 0, 1).astype(jnp.float32)
        signal = jnp.where(grad.kept[None] & jnp.isfinite(signal), signal, 0.0)
        slack = jnp.mean(self.contact_threshold - signal)
        horizon = jnp.clip(
            state.horizon + self.horizon_lr * slack, self.horizon_min, self.horizon
        ).astype(state.horizon.dtype)
        raw = jax.lax.stop_gradient(grad.per_env_loss * scale).astype(state.returns.var.dtype)
        mask = (grad.kept & fit.ok & jnp.isfinite(raw)).astype(raw.dtype)
        returns = state.returns.update(jnp.where(mask > 0, raw, 0.0)[:, None], mask)
        new = AHACState(
            policy=policy,
            policy_opt=policy_opt,
            critic=fit.critic,
            env_state=grad.window.env_state,
            horizon=jnp.where(fit.ok, horizon, state.horizon),
            returns=returns,
        )
        return new, self._metrics(grad, fit.loss, fit.ok, traj, signal, state.horizon)

    @staticmethod
    def _scaled(out: tuple[Float[Array, " B"], Window], scale) -> tuple[Float[Array, " B"], Window]:
        losses, window = out
        return losses / jax.lax.stop_gradient(scale).astype(losses.dtype), window

    def _metrics(self, grad, value_loss, ok, traj, signal, horizon) -> Metrics:
        """The iteration's metrics: losses, gradient, counters, windows and episodes."""
        cut, stiff = segment_ends(
            signal, threshold=self.contact_threshold, period=self._period(horizon)
        )
        ends = cut.at[-1].set(True) | (traj.done > 0)
        kept = grad.kept[None]
        segments = jnp.maximum(jnp.sum(ends & kept), 1)
        steps = jnp.sum(jnp.broadcast_to(kept, ends.shape))
        metrics = {
            "loss": grad.loss.astype(jnp.float32),
            "value_loss": value_loss.astype(jnp.float32),
            **self._gradient_metrics(grad),
            "skipped_updates": (~ok).astype(jnp.float32),
            "window_length": (steps / segments).astype(jnp.float32),
            "cut_windows": jnp.sum(stiff & (traj.done <= 0) & kept).astype(jnp.float32),
            "horizon": horizon.astype(jnp.float32),
            "stiffness": jnp.mean(signal).astype(jnp.float32),
            "env_steps": jnp.asarray(self.steps_per_iteration, jnp.float32),
        }
        return {**metrics, **episode_stats(traj)}
