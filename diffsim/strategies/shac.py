"""Short-horizon actor-critic (Xu et al. 2022): APG's window plus a learned critic that
values the window's end, so short windows still see the long-term return.

The window and the actor loss come from `_windows.py`, shared with `APG` and `GuidedES`;
the critic's update from `_critic.py`, shared with GuidedES's `SHACWindow`.
"""

from collections.abc import Callable
from typing import ClassVar

import equinox as eqx
import jax.numpy as jnp
import jax.random as jr
import optax
from brax.envs.base import State
from jaxtyping import Array, Float, PRNGKeyArray

from .._types import Env, Metrics
from ..policies import ValueFunction, trainable
from . import helpers
from ._window.critic import AbstractSHACCritic, Critic
from ._window.options import UpdateOptions, WindowOptions
from ._window.strategy import WINDOW_SWEEPABLE, AbstractWindowStrategy
from ._window.window import Window, update_normalizers_from
from .helpers import episode_stats


class SHACState(eqx.Module):
    """`policy` and its optimiser state, the `critic` (`value`, its Polyak-averaged
    `target` and the value's optimiser state), and the carried env batch."""

    policy: eqx.Module
    policy_opt: optax.OptState
    critic: Critic
    env_state: State

    @property
    def value(self) -> ValueFunction:
        """The trained critic `V`."""
        return self.critic.value

    @property
    def target_value(self) -> ValueFunction:
        """The target critic `V'`, the bootstrap of the actor's loss."""
        return self.critic.target


class SHAC(AbstractWindowStrategy[SHACState], AbstractSHACCritic):
    """Short-horizon actor-critic (Xu et al. 2022): APG's window plus a learned critic.

    One `step` rolls out `horizon` steps from the carried, gradient-cut env batch and
    ascends the window's discounted reward with the target critic at every segment end:

        L(theta) = -1/(B H) sum_b sum_segments [ sum_{k<n} g^k r_{t0+k}
                                                 + g^n (1 - term) V'(next_obs_{t0+n-1}) ],

    where a segment runs from the window start or an episode start to the window end or an
    episode end (`n` steps), `term` is 1 only at a true termination (a time limit bootstraps
    from the critic's value of the last real observation), `g = discount` and `V'` is the
    target critic (constant in theta, differentiated through its input). A terminated
    step's bootstrap is exactly 0 (`jnp.where`, not a product), so a diverged next
    observation never reaches the loss. Then the critic `V` fits TD(lambda) targets
    computed on the window with `V'` (`gae`) for `critic_epochs x critic_minibatches` Adam
    steps on `0.5 (V - G)^2`, and

        V' <- target_alpha * V' + (1 - target_alpha) * V.

    Observation statistics (policy and critics) are frozen within the window and updated
    after the updates. Non-finite actor loss or gradient skips the whole iteration's
    updates (`metrics["skipped_updates"]`, 1.0 in an iteration that skipped); with
    `update.mask_nonfinite_envs` a diverged env drops out of the actor's mean, the
    critic's data and the statistics instead (`metrics["masked_envs"]`). `max_grad_norm`,
    `stochastic`, `options` (`WindowOptions`: float64, remat, the valve's decay, contact
    smoothing), `update` (`UpdateOptions`: Adam's constants, the elementwise clip, masking),
    the checks before compiling and the gradient metrics (`grad_norm`,
    `grad_norm_step_max`, `grad_norm_step_median`) are as in `APG`.

    As published (Xu et al.), SHAC's actor is stochastic: `stochastic=True` with a
    `GaussianPolicy` acts with reparameterised samples `tanh(mean + std * eps)`, so the
    window's gradient also trains the (state-independent, learned) std; the paper's
    networks are ELUs (`GaussianPolicy(..., activation="elu")`,
    `value_activation="elu"`), and both learning rates decay linearly
    (`lr_decay=True`). A deterministic actor (`stochastic=False`) stays available.

    - `valve_max_norm` (with `options.valve_decay`): the gradient valve, as in `APG`
      (100 by default; None gives the exact gradient of Xu et al. everywhere).
    - `value_hidden`, `value_activation`: the critic's hidden widths and activation (a
      name in `diffsim.policies.ACTIVATIONS`).
    - `lr_decay`, `lr_decay_steps`: decay both learning rates linearly to 0 over
      `lr_decay_steps` env steps (the actor's over its one update per iteration, the
      critic's over its `critic_epochs * critic_minibatches`), which `train` sets to the
      run's budget unless given, as in `PPO`. Off by default.

    Defaults follow Xu et al. (h=32, 64 envs, lambda 0.95, target_alpha 0.2, 16 x 4 critic
    steps, Adam (0.7, 0.95), clip 1.0, actor lr 2e-3) except `discount=0.95` (paper: 0.99):
    on short toy tasks 0.99 lets the actor climb a young critic's extrapolation.

    **Example:**

    ```python
    shac = diffsim.SHAC(horizon=32, actor_learning_rate=2e-3)
    run = diffsim.train(shac, env, policy, key=key, total_steps=500_000)
    ```
    """

    sweepable: ClassVar[tuple[str, ...]] = (
        ("actor_learning_rate", "critic_learning_rate", "discount", "gae_lambda")
        + ("target_alpha", "reward_scale")
        + WINDOW_SWEEPABLE
    )
    num_envs: int = 64
    horizon: int = 32
    actor_learning_rate: float | Callable[[Array], Array] = 2e-3
    critic_learning_rate: float | Callable[[Array], Array] = 1e-3
    stochastic: bool = False
    valve_max_norm: float | None = 100.0
    options: WindowOptions = WindowOptions()
    discount: float = 0.95
    gae_lambda: float = 0.95
    target_alpha: float = 0.2
    critic_epochs: int = 16
    critic_minibatches: int = 4
    reward_scale: float = 1.0
    value_hidden: tuple[int, ...] = (64, 64)
    value_activation: str = "tanh"
    max_grad_norm: float = 1.0
    lr_decay: bool = False
    lr_decay_steps: int | None = None
    update: UpdateOptions = UpdateOptions()

    def __check_init__(self):
        helpers.learning_rate("actor_learning_rate", self.actor_learning_rate)
        helpers.check_decay(self, "actor_learning_rate", "critic_learning_rate")

    def for_budget(self, total_steps: int) -> "SHAC":
        """With `lr_decay`, decay over the run's `total_steps` unless `lr_decay_steps` is set."""
        return helpers.with_budget(self, total_steps, "actor_learning_rate", "critic_learning_rate")

    def check(self, env: Env, policy: eqx.Module) -> None:
        self.window.check(env, policy)

    def _critic_optimizer(self) -> optax.GradientTransformation:
        """The critic's optimiser, decayed (if at all) over its `critic_epochs *
        critic_minibatches` updates per iteration."""
        updates = self.critic_epochs * self.critic_minibatches
        return self._optimizer(self.critic_learning_rate, updates)

    def init(self, env: Env, policy: eqx.Module, *, key: PRNGKeyArray) -> SHACState:
        value_key, env_key = jr.split(key)
        critic = self._new_critic(env, key=value_key)
        return SHACState(
            policy=policy,
            policy_opt=self._optimizer(self.actor_learning_rate).init(
                eqx.filter(policy, trainable(policy))
            ),
            critic=critic,
            env_state=self.window.initial_env_state(env, policy, key=env_key),
        )

    def policy(self, state: SHACState) -> eqx.Module:
        return state.policy

    def env_losses(
        self,
        env: Env,
        policy: eqx.Module,
        critic: ValueFunction,
        env_state: State,
        *,
        key: PRNGKeyArray,
    ) -> tuple[Float[Array, " B"], Window]:
        """The actor's window loss of each env (the equation above, per `b`) with `critic`
        as `V'`, and the window."""
        return self._actor_losses(self.window, env, policy, critic, env_state, key=key)

    def step(self, env: Env, state: SHACState, *, key: PRNGKeyArray) -> tuple[SHACState, Metrics]:
        rollout_key, critic_key = jr.split(key)
        # Actor: gradient of the window loss, bootstrapped with the target critic.
        actor = self._actor_update(
            lambda policy, env_state, key: self.env_losses(
                env, policy, state.critic.target, env_state, key=key
            ),
            state.policy,
            state.policy_opt,
            state.env_state,
            self._optimizer(self.actor_learning_rate),
            key=rollout_key,
        )
        grad, policy, policy_opt, traj = actor.grad, actor.policy, actor.opt_state, actor.traj
        # Critic: TD(lambda) targets from the target critic, then Polyak averaging.
        fit = self._update_critic(state.critic, traj, grad.kept, grad.ok, key=critic_key)
        # Observation statistics, frozen during the window, now take in its observations.
        policy = update_normalizers_from(policy, traj, grad.kept, fit.ok)
        new = SHACState(
            policy=policy, policy_opt=policy_opt, critic=fit.critic, env_state=grad.window.env_state
        )
        metrics = {
            "loss": grad.loss.astype(jnp.float32),
            "value_loss": fit.loss,
            **self._gradient_metrics(grad),
            "skipped_updates": (~fit.ok).astype(jnp.float32),
            **episode_stats(traj),
            "env_steps": jnp.asarray(self.steps_per_iteration, jnp.float32),
        }
        return new, metrics
