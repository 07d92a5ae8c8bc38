"""`AbstractWindowStrategy`: what `APG`, `SHAC`, `AHAC` and `SAPO` share, a policy trained
on the gradient of a differentiable window with clipped Adam."""

import abc
import dataclasses
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import optax
from brax.envs.base import State
from equinox import AbstractVar
from jaxtyping import Array, Float, PRNGKeyArray

from ..._types import Env, Trajectory
from ...policies import trainable
from .. import helpers
from ..base import AbstractStrategy, StrategyState
from ..helpers import guarded_update
from .env import carried_dtype
from .gradient import LossFn, WindowGradient, window_gradient
from .options import UpdateOptions
from .valve import step_norm_stats
from .window import AbstractWindowed, Window, clipped_adam

WINDOW_SWEEPABLE = ("max_grad_norm", "valve_max_norm")
"""The float fields every window strategy declares and `train_sweep` may vary: the
gradient's clip and the valve's; a final class's `sweepable` adds its own. (The fields of
`options` and `update` are constants of the compiled program: loop over them.)"""


class ActorUpdate(eqx.Module):
    """One actor update of a window strategy: the window's `grad` (`WindowGradient`), the
    updated `policy` and `opt_state` (unchanged where the update was skipped), and the
    window's trajectory `traj`, detached and in the carried dtype, for critics and
    normalisers."""

    grad: WindowGradient
    policy: Any
    opt_state: Any
    traj: Trajectory


class AbstractWindowStrategy(AbstractStrategy[StrategyState], AbstractWindowed):
    """A strategy whose `step` differentiates a window (`WindowSpec`: `horizon` steps in
    `num_envs` envs) and updates the policy with Adam after a gradient clip.

    Its fields are declared by the final class (`APG`, `SHAC`): `num_envs`, `horizon`,
    `stochastic`, `valve_max_norm`, `max_grad_norm`, `lr_decay`, `lr_decay_steps` (whose
    defaults differ between strategies) and `options: WindowOptions`, `update:
    UpdateOptions` (the same defaults everywhere); from them this base builds
    the window (`self.window`, whose `check(env, policy)` a final class's `check` calls),
    counts the steps (`steps_per_iteration = min_steps_per_iteration = num_envs * horizon`,
    `batch_size = num_envs`), leaves `for_env` to the identity, builds the optimiser
    (`_optimizer`, decayed over the budget with `lr_decay`) and takes the window's
    gradient (`_gradient`, per env with `mask_nonfinite_envs`), one guarded update
    (`_actor_update`) and its statistics (`_gradient_metrics`). A final class adds its
    fields, `sweepable`, `check`, `for_budget`, `init`, `step`, `policy` and `env_losses`
    (`docs/guides/extending.md`); `loss`, their mean, is shared.
    """

    max_grad_norm: AbstractVar[float]
    lr_decay: AbstractVar[bool]
    lr_decay_steps: AbstractVar[int | None]
    update: AbstractVar[UpdateOptions]

    def __check_init__(self):
        helpers.positive("max_grad_norm", self.max_grad_norm)

    @property
    def steps_per_iteration(self) -> int:
        return self.num_envs * self.horizon

    @property
    def min_steps_per_iteration(self) -> int:
        return self.steps_per_iteration  # every step of the window feeds the update

    @property
    def batch_size(self) -> int:
        return self.num_envs

    def for_env(self, env: Env):
        """`self`: a window's settings do not depend on the env (its checks are `check`'s)."""
        del env
        return self

    @abc.abstractmethod
    def env_losses(
        self, env: Env, policy: eqx.Module, *args: Any, key: PRNGKeyArray
    ) -> tuple[Float[Array, " B"], Window]:
        """Each env's window loss and the window: `policy` plays `horizon` steps from an
        env state among `args` (the final class's signature says which, with its critics or
        temperature)."""

    def loss(
        self, env: Env, policy: eqx.Module, *args: Any, key: PRNGKeyArray
    ) -> tuple[Float[Array, ""], Window]:
        """The window loss: the mean over envs of `env_losses(env, policy, *args, key=key)`,
        and the window.

        Differentiable in `policy` (through the simulator and a critic's input); exactly
        zero gradient to the env state (the truncation) and to a critic's parameters.

        **Example:** `value, window = shac.loss(env, policy, critic, env_state, key=key)`.
        """
        losses, window = self.env_losses(env, policy, *args, key=key)
        return jnp.mean(losses), window

    def _decayed(self, learning_rate, updates_per_iteration: int = 1):
        """`learning_rate` decayed with `lr_decay` over `lr_decay_steps` env steps
        (`updates_per_iteration` updates per iteration; `helpers.decayed`)."""
        return helpers.decayed(
            learning_rate,
            lr_decay=self.lr_decay,
            lr_decay_steps=self.lr_decay_steps,
            steps_per_iteration=self.steps_per_iteration,
            updates_per_iteration=updates_per_iteration,
        )

    def _optimizer(self, learning_rate, updates_per_iteration: int = 1, max_grad_norm=None):
        """Clipped Adam with this strategy's constants (`max_grad_norm` unless another clip
        is given, then without the elementwise clip), its rate `_decayed`."""
        update = self.update
        if max_grad_norm is not None:
            update = dataclasses.replace(update, max_grad_value=None)
        return clipped_adam(
            self._decayed(learning_rate, updates_per_iteration),
            max_grad_norm=self.max_grad_norm if max_grad_norm is None else max_grad_norm,
            update=update,
        )

    def _gradient_metrics(self, grad: WindowGradient) -> dict[str, Float[Array, ""]]:
        """What every window strategy logs about its gradient: `grad_norm` (the global norm
        before clipping), `grad_norm_step_max` and `grad_norm_step_median` (the per-step
        cotangent norms of the window, `_valve.step_norm_stats`), `skipped_updates` (1.0 if
        the update was skipped) and `masked_envs`."""
        return {
            "grad_norm": optax.tree.norm(grad.grads).astype(jnp.float32),
            **step_norm_stats(grad.step_norms),
            "skipped_updates": (~grad.ok).astype(jnp.float32),
            "masked_envs": grad.masked_envs,
        }

    def _gradient(
        self, loss_fn: LossFn, policy: eqx.Module, env_state: State, *, key: PRNGKeyArray
    ) -> WindowGradient:
        """The gradient of the mean of `loss_fn`'s per-env losses in `policy`'s trainable
        parameters, per env (diverged envs dropped) with `mask_nonfinite_envs`, with the
        per-step cotangent norms of its window (`step_norms`)."""
        params, static = eqx.partition(policy, trainable(policy))
        return window_gradient(
            loss_fn,
            params,
            static,
            env_state,
            key=key,
            per_env=self.update.mask_nonfinite_envs,
            horizon=self.horizon,
        )

    def _actor_update(
        self,
        loss_fn: LossFn,
        policy: eqx.Module,
        opt_state: optax.OptState,
        env_state: State,
        optimizer: optax.GradientTransformation,
        *,
        key: PRNGKeyArray,
    ) -> ActorUpdate:
        """The window's gradient (`_gradient`), one guarded `optimizer` step of the policy
        (skipped where the gradient is not finite) and the window's detached trajectory."""
        grad = self._gradient(loss_fn, policy, env_state, key=key)
        policy, opt_state = guarded_update(policy, grad.grads, opt_state, optimizer, grad.ok)
        traj = carried_dtype(jax.lax.stop_gradient(grad.window.traj), env_state)
        return ActorUpdate(grad, policy, opt_state, traj)
