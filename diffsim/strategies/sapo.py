"""Soft analytic policy optimisation (Xing et al. 2025): a maximum-entropy first-order
actor-critic. SHAC's window with an entropy bonus in the reward, a learned temperature,
and two averaged critics without a target copy.

The window and the actor loss come from `_windows.py` (shared with `APG` and `SHAC`); the
critics from `_ensemble_critic.py`, shared with `AHAC`.
"""

from collections.abc import Callable
from typing import Any, ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import optax
from brax.envs.base import State
from jaxtyping import Array, Float, PRNGKeyArray

from .._types import Env, Metrics, Trajectory
from ..policies import trainable
from . import helpers
from ._window.ensemble import AbstractEnsembleCritic, EnsembleCritic, ValueEnsemble
from ._window.options import UpdateOptions, WindowOptions
from ._window.strategy import WINDOW_SWEEPABLE, AbstractWindowStrategy
from ._window.window import Window, shac_loss, update_normalizers_from
from .helpers import episode_stats, guarded_update


class SAPOState(eqx.Module):
    """`policy` and its optimiser state, the `critic` ensemble, the carried env batch, and
    the log-temperature `log_alpha` with its optimiser state."""

    policy: eqx.Module
    policy_opt: optax.OptState
    critic: EnsembleCritic
    env_state: State
    log_alpha: Float[Array, ""]
    alpha_opt: optax.OptState


class SAPO(AbstractWindowStrategy[SAPOState], AbstractEnsembleCritic):
    """Soft analytic policy optimisation (Xing et al. 2025): SHAC's window with a
    maximum-entropy objective, a learned temperature and two critics.

    The policy acts with reparameterised samples `a = tanh(u)`, `u ~ N(mu(s), sigma(s))`
    (a `GaussianPolicy`, or any policy with `sample` and `log_prob(obs, action,
    pre_squash=u)`). Each step's entropy is estimated by the sample's negative log-density
    `H_t = -log pi(a_t | s_t)` (differentiable in theta through `a_t` and `pi`), and scaled by
    the target entropy `H* = -target_entropy_scale * act_dim`:

        H^_t = (H_t + |H*|) / (2 |H*|),      r'_t = r_t + alpha H^_t.

    One `step` rolls out `horizon` steps from the carried, gradient-cut env batch and
    descends SHAC's window loss on `r'` (segments end at episode ends and the window end)
    bootstrapped with the critics' average:

        L(theta) = -1/(B H) sum_b sum_segments [ sum_{k<n} g^k r'_{t0+k}
                                                 + g^n (1 - term) V_mean(next_obs_{t0+n-1}) ].

    Then every critic fits TD(lambda) targets of `r'` and the critics' minimum (no target
    critic), and the temperature descends

        J(log alpha) = alpha |H*| (mean_{t,b} H_t - H*),

    so that `alpha` grows while the policy's entropy is below the target. The actor, the
    critics and `log_alpha` use AdamW (`update.adam_b1`, `update.adam_b2`, `weight_decay`)
    after a global-norm clip at `max_grad_norm` (0.5); the learning rates decay linearly
    with `lr_decay` (on by default, as published).

    `valve_max_norm` (100 by default), `options`, `update` and the checks before compiling
    are as in `SHAC`; SAPO always acts stochastically (`stochastic` must stay True).
    `metrics["alpha"]` is the temperature,
    `metrics["entropy"]` the mean `H_t`, `metrics["env_steps"]` `num_envs * horizon`.

    - `num_critics`, `value_hidden`, `value_activation`, `value_layer_norm`: the critics,
      each hidden layer a Linear, a LayerNorm, then the activation.
    - `target_entropy_scale`: `H* = -target_entropy_scale * act_dim`.
    - `init_alpha`, `alpha_learning_rate`: the temperature's start and learning rate.

    **Example:**

    ```python
    policy = diffsim.GaussianPolicy(env.observation_size, env.action_size,
                                    hidden=(128, 64, 32), activation="silu",
                                    state_dependent_std=True, key=k1)
    run = diffsim.train(diffsim.SAPO(), env, policy, key=k2, total_steps=1_000_000)
    run.metrics["alpha"], run.metrics["entropy"]
    ```
    """

    sweepable: ClassVar[tuple[str, ...]] = (
        ("actor_learning_rate", "critic_learning_rate", "alpha_learning_rate", "init_alpha")
        + ("target_entropy_scale", "discount", "gae_lambda", "weight_decay")
        + WINDOW_SWEEPABLE
    )
    num_envs: int = 64
    horizon: int = 32
    actor_learning_rate: float | Callable[[Array], Array] = 2e-3
    critic_learning_rate: float | Callable[[Array], Array] = 5e-4
    stochastic: bool = True
    valve_max_norm: float | None = 100.0
    options: WindowOptions = WindowOptions()
    alpha_learning_rate: float = 5e-3
    init_alpha: float = 1.0
    target_entropy_scale: float = 0.5
    discount: float = 0.99
    gae_lambda: float = 0.95
    num_critics: int = 2
    critic_epochs: int = 16
    critic_minibatches: int = 4
    value_hidden: tuple[int, ...] = (64, 64)
    value_activation: str = "silu"
    value_layer_norm: bool = True
    weight_decay: float = 0.01
    max_grad_norm: float = 0.5
    lr_decay: bool = True
    lr_decay_steps: int | None = None
    update: UpdateOptions = UpdateOptions()

    def __check_init__(self):
        helpers.learning_rate("actor_learning_rate", self.actor_learning_rate)
        helpers.check_decay(self, "actor_learning_rate", "critic_learning_rate")
        helpers.positive("alpha_learning_rate", self.alpha_learning_rate)
        helpers.positive("init_alpha", self.init_alpha)
        helpers.positive("target_entropy_scale", self.target_entropy_scale)
        helpers.in_range("weight_decay", self.weight_decay, 0.0, 1.0)
        if self.stochastic is not True:
            raise ValueError(
                f"stochastic must be True: SAPO's entropy needs sampled actions, got"
                f" {self.stochastic!r}"
            )

    def for_budget(self, total_steps: int) -> "SAPO":
        """With `lr_decay`, decay over the run's `total_steps` unless `lr_decay_steps` is set."""
        return helpers.with_budget(self, total_steps, "actor_learning_rate", "critic_learning_rate")

    def check(self, env: Env, policy: eqx.Module) -> None:
        self.window.check(env, policy)
        obs = jax.ShapeDtypeStruct((env.observation_size,), jnp.float32)

        def density(p, o):
            action, pre_squash = p.sample(o, key=jr.key(0))
            return p.log_prob(o, action, pre_squash=pre_squash)

        try:
            jax.eval_shape(density, policy, obs)
        except Exception as error:
            raise ValueError(
                "SAPO needs a policy with sample(obs, key=) -> (action, pre_squash) and"
                " log_prob(obs, action, pre_squash=) (e.g. diffsim.GaussianPolicy);"
                f" {type(policy).__name__} has not: {error}"
            ) from error

    @property
    def _norm_after_activation(self) -> bool:
        return False

    def _adamw(self, learning_rate, updates_per_iteration: int = 1):
        """AdamW after a global-norm clip, its rate decayed with `lr_decay`."""
        rate: Any = self._decayed(learning_rate, updates_per_iteration)
        update = self.update
        clips = [] if update.max_grad_value is None else [optax.clip(update.max_grad_value)]
        adamw = optax.adamw(
            rate,
            b1=update.adam_b1,
            b2=update.adam_b2,
            eps=update.adam_eps,
            weight_decay=self.weight_decay,
        )
        return optax.chain(*clips, optax.clip_by_global_norm(self.max_grad_norm), adamw)

    def _critic_optimizer(self) -> optax.GradientTransformation:
        return self._adamw(self.critic_learning_rate, self.critic_epochs * self.critic_minibatches)

    def _alpha_optimizer(self) -> optax.GradientTransformation:
        return self._adamw(self.alpha_learning_rate)

    def init(self, env: Env, policy: eqx.Module, *, key: PRNGKeyArray) -> SAPOState:
        value_key, env_key = jr.split(key)
        log_alpha = jnp.log(jnp.asarray(self.init_alpha, jnp.float32))
        return SAPOState(
            policy=policy,
            policy_opt=self._adamw(self.actor_learning_rate).init(
                eqx.filter(policy, trainable(policy))
            ),
            critic=self._new_ensemble(env, key=value_key),
            env_state=self.window.initial_env_state(env, policy, key=env_key),
            log_alpha=log_alpha,
            alpha_opt=self._alpha_optimizer().init(log_alpha),
        )

    def policy(self, state: SAPOState) -> eqx.Module:
        return state.policy

    def entropy(self, policy, traj: Trajectory) -> Float[Array, "T B"]:
        """`H_t = -log pi(a_t | s_t)` of each step of the window, at the sampled `a_t`."""
        u = traj.extras["pre_squash"]
        log_prob = jax.vmap(jax.vmap(lambda o, a, p: policy.log_prob(o, a, pre_squash=p)))
        return -log_prob(traj.obs, traj.action, u)

    def _bonus(self, entropy: Float[Array, "T B"], alpha, action_size: int):
        """`alpha H^_t`, the entropy scaled by the target entropy's size."""
        size = self.target_entropy_scale * action_size
        return alpha * (entropy + size) / (2.0 * size)

    def env_losses(
        self,
        env: Env,
        policy: eqx.Module,
        critic: ValueEnsemble,
        alpha,
        env_state: State,
        *,
        key: PRNGKeyArray,
    ) -> tuple[Float[Array, " B"], Window]:
        """Each env's window loss (the equation above) with the critics' average as the
        bootstrap and the temperature `alpha`, and the window."""
        window = self.window(env, policy, env_state, key=key)
        traj = window.traj
        bonus = self._bonus(self.entropy(policy, traj), alpha, env.action_size)
        soft = eqx.tree_at(lambda t: t.reward, traj, traj.reward + bonus.astype(traj.reward.dtype))
        bootstrap = jax.lax.stop_gradient(critic).mean
        return shac_loss(soft, bootstrap, discount=self.discount), window

    def step(self, env: Env, state: SAPOState, *, key: PRNGKeyArray) -> tuple[SAPOState, Metrics]:
        rollout_key, critic_key = jr.split(key)
        alpha = jnp.exp(state.log_alpha)
        actor = self._actor_update(
            lambda policy, env_state, key: self.env_losses(
                env, policy, state.critic.value, alpha, env_state, key=key
            ),
            state.policy,
            state.policy_opt,
            state.env_state,
            self._adamw(self.actor_learning_rate),
            key=rollout_key,
        )
        grad, policy, policy_opt, traj = actor.grad, actor.policy, actor.opt_state, actor.traj
        entropy = jax.lax.stop_gradient(self.entropy(state.policy, traj)).astype(traj.reward.dtype)
        entropy = jnp.where(grad.kept[None] & jnp.isfinite(entropy), entropy, 0.0)
        bonus = self._bonus(entropy, alpha, env.action_size)
        soft = eqx.tree_at(lambda t: t.reward, traj, traj.reward + bonus)
        fit = self._update_critic(state.critic, soft, grad.kept, grad.ok, key=critic_key)
        policy = update_normalizers_from(policy, traj, grad.kept, fit.ok)
        # The temperature: alpha grows while the entropy is below the target.
        target = -self.target_entropy_scale * env.action_size
        mean_entropy = jnp.sum(entropy) / jnp.maximum(jnp.sum(grad.kept) * entropy.shape[0], 1)
        alpha_grad = jax.grad(lambda la: jnp.exp(la) * abs(target) * (mean_entropy - target))(
            state.log_alpha
        )
        log_alpha, alpha_opt = guarded_update(
            state.log_alpha, alpha_grad, state.alpha_opt, self._alpha_optimizer(), fit.ok
        )
        new = SAPOState(
            policy=policy,
            policy_opt=policy_opt,
            critic=fit.critic,
            env_state=grad.window.env_state,
            log_alpha=log_alpha,
            alpha_opt=alpha_opt,
        )
        metrics = {
            "loss": grad.loss.astype(jnp.float32),
            "value_loss": fit.loss.astype(jnp.float32),
            **self._gradient_metrics(grad),
            "skipped_updates": (~fit.ok).astype(jnp.float32),
            "alpha": alpha.astype(jnp.float32),
            "entropy": mean_entropy.astype(jnp.float32),
            "env_steps": jnp.asarray(self.steps_per_iteration, jnp.float32),
            **episode_stats(traj),
        }
        return new, metrics
