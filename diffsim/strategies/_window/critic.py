"""The critics' update (`AbstractCriticFit._update_critic`, with the observation
statistics): SHAC's, shared by `SHAC` and GuidedES's `SHACWindow` (`AbstractSHACCritic`),
and the ensembles of `AHAC` and `SAPO` (`ensemble.py`).

The critic `V` fits TD(lambda) targets computed on a window (`critic_batch`; SHAC's with
the target critic `V'`) for `epochs x minibatches` Adam steps on `0.5 (V - G)^2`
(`fit_critic`; an output with a trailing axis of `K` critics fits each to the same
targets), then SHAC's `V' <- target_alpha V' + (1 - target_alpha) V` (`polyak`).
"""

import abc
from collections.abc import Callable, Mapping
from typing import Any, Generic, TypeVar

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import optax
from brax.envs.base import State
from equinox import AbstractVar
from jaxtyping import Array, Bool, Float, PRNGKeyArray

from ..._types import Env, Scalar, Trajectory
from ...policies import ACTIVATIONS, ValueFunction, trainable
from .. import helpers
from ..helpers import all_finite, gae, guarded_update, select
from .window import Window, WindowSpec, shac_window_losses, update_normalizers_from

CriticT = TypeVar("CriticT", bound=eqx.Module)


class AbstractCritic(eqx.Module):
    """A critic as a strategy's state holds it: the trained `value` and its optimiser
    state `opt_state` (a final class may hold more, e.g. SHAC's target critic)."""

    value: AbstractVar[Any]
    opt_state: AbstractVar[optax.OptState]


StateT = TypeVar("StateT", bound=AbstractCritic)


class Critic(AbstractCritic):
    """SHAC's critic: `value` (trained), its Polyak-averaged `target` (the bootstrap) and
    the optimiser state of `value`."""

    value: ValueFunction
    target: ValueFunction
    opt_state: optax.OptState


class CriticBatch(eqx.Module):
    """Flattened critic data: observations, TD(lambda) targets, and a 0/1 weight per row
    (0 for the rows of envs dropped from the window gradient)."""

    obs: Float[Array, "N obs"]
    target: Float[Array, " N"]
    weight: Float[Array, " N"]


def critic_batch(
    target: Callable[[Float[Array, " obs"]], Float[Array, ""]],
    traj: Trajectory,
    kept: Bool[Array, " B"],
    *,
    discount: Scalar,
    gae_lambda: Scalar,
    reward_scale: Scalar = 1.0,
) -> CriticBatch:
    """TD(lambda) targets of the target critic on the window (`gae`), flattened; the rows of
    dropped envs carry weight 0 and zeros instead of their (maybe non-finite) data.
    `target` is any function of one observation to a scalar (a `ValueFunction`, or the
    minimum over an ensemble's critics)."""
    values = jax.vmap(jax.vmap(target))(traj.obs)
    next_values = jax.vmap(jax.vmap(target))(traj.next_obs)
    targets = gae(
        traj.reward * reward_scale,
        values,
        next_values,
        traj.done,
        traj.truncation,
        discount=discount,
        lam=gae_lambda,
    ).value_target
    keep = jnp.broadcast_to(kept[None], targets.shape)
    obs = jnp.where(keep[..., None], traj.obs, 0.0)
    return CriticBatch(
        obs=obs.reshape(-1, obs.shape[-1]),
        target=jnp.where(keep, targets, 0.0).reshape(-1),
        weight=keep.astype(targets.dtype).reshape(-1),
    )


def fit_critic(
    value: CriticT,
    opt_state: optax.OptState,
    batch: CriticBatch,
    ok: Bool[Array, ""],
    *,
    key: PRNGKeyArray,
    optimizer: optax.GradientTransformation,
    epochs: int,
    minibatches: int,
) -> tuple[CriticT, optax.OptState, Float[Array, ""]]:
    """`epochs x minibatches` optimiser steps on the weighted `0.5 (V - G)^2` (shuffled each
    epoch); none applied unless `ok` and the step's loss and gradient are finite. A `value`
    whose output has a trailing axis (an ensemble's `K` critics) fits every critic to the
    same targets, its loss the mean over critics."""

    def loss_fn(v, mb: CriticBatch):
        predicted = jax.vmap(v)(mb.obs)  # [N] or [N, K]
        target = mb.target.reshape(-1, *([1] * (predicted.ndim - 1)))
        error = ((predicted - target) ** 2).reshape(predicted.shape[0], -1).mean(axis=1)
        return 0.5 * jnp.sum(mb.weight * error) / jnp.maximum(jnp.sum(mb.weight), 1.0)

    def minibatch(carry, mb: CriticBatch):
        v, opt = carry
        loss, grads = eqx.filter_value_and_grad(loss_fn)(v, mb)
        good = ok & jnp.isfinite(loss) & all_finite(grads)
        return guarded_update(v, grads, opt, optimizer, good), loss

    def epoch(carry, key: PRNGKeyArray):
        order = jr.permutation(key, batch.target.shape[0])
        shuffled = jax.tree.map(lambda x: x[order].reshape(minibatches, -1, *x.shape[1:]), batch)
        return jax.lax.scan(minibatch, carry, shuffled)

    (value, opt_state), losses = jax.lax.scan(epoch, (value, opt_state), jr.split(key, epochs))
    return value, opt_state, jnp.mean(losses)


class CriticUpdate(eqx.Module, Generic[StateT]):
    """The result of a critic update: the new `critic`, the mean `loss` of its fit, and `ok`
    (False where the window or its targets were not finite: nothing changed)."""

    critic: StateT
    loss: Float[Array, ""]
    ok: Bool[Array, ""]


class AbstractCriticFit(eqx.Module, Generic[StateT]):
    """What SHAC's critic and the ensembles share, from the settings the final class
    declares: `discount`, `gae_lambda`, `critic_epochs`, `critic_minibatches` (dividing
    `num_envs * horizon`), `critic_learning_rate`, the critic's optimiser
    (`_critic_optimizer`), its data (`_critic_batch`) and what follows a fit (`_fitted`)."""

    num_envs: AbstractVar[int]
    horizon: AbstractVar[int]
    discount: AbstractVar[float]
    gae_lambda: AbstractVar[float]
    critic_epochs: AbstractVar[int]
    critic_minibatches: AbstractVar[int]
    critic_learning_rate: AbstractVar[float | Callable[[Array], Array]]

    def __check_init__(self):
        helpers.learning_rate("critic_learning_rate", self.critic_learning_rate)
        helpers.in_range("discount", self.discount, 0.0, 1.0, low_open=True)
        helpers.in_range("gae_lambda", self.gae_lambda, 0.0, 1.0)
        helpers.positive_int("critic_epochs", self.critic_epochs)
        helpers.positive_int("critic_minibatches", self.critic_minibatches)
        if (self.num_envs * self.horizon) % self.critic_minibatches:
            raise ValueError(
                f"critic_minibatches={self.critic_minibatches} must divide num_envs * horizon"
                f" = {self.num_envs * self.horizon}"
            )

    @abc.abstractmethod
    def _critic_optimizer(self) -> optax.GradientTransformation:
        """The critic's optimiser."""

    @abc.abstractmethod
    def _critic_batch(self, critic: StateT, traj: Trajectory, kept) -> CriticBatch:
        """What `critic.value` fits on a window: TD(lambda) targets (`critic_batch`)."""

    @abc.abstractmethod
    def _fitted(self, critic: StateT, value, opt_state, traj: Trajectory, kept, ok) -> StateT:
        """The new critic from the fitted `value` and its `opt_state` (both unchanged unless
        `ok`), the observation statistics taking in the window's observations where `ok`."""

    def _new_opt_state(self, value: eqx.Module) -> optax.OptState:
        """`_critic_optimizer`'s state for the trainable leaves of `value`."""
        return self._critic_optimizer().init(eqx.filter(value, trainable(value)))

    def _fit(
        self, value: CriticT, opt_state: optax.OptState, batch: CriticBatch, ok, *, key
    ) -> tuple[CriticT, optax.OptState, Float[Array, ""], Bool[Array, ""]]:
        """`fit_critic` of `value` on `batch` unless not `ok` or `batch` is not finite, and
        that `ok`."""
        ok = ok & all_finite(batch)
        value, opt_state, loss = fit_critic(
            value,
            opt_state,
            batch,
            ok,
            key=key,
            optimizer=self._critic_optimizer(),
            epochs=self.critic_epochs,
            minibatches=self.critic_minibatches,
        )
        return value, opt_state, loss, ok

    def _update_critic(
        self,
        critic: StateT,
        traj: Trajectory,
        kept: Bool[Array, " B"],
        ok: Bool[Array, ""],
        *,
        key: PRNGKeyArray,
    ) -> CriticUpdate[StateT]:
        """One critic update on a window's data `traj` (not differentiated; in the carried
        dtype; its `reward` what the critic should value), its envs `kept`, unless not `ok`:
        the fit of `critic.value` to `_critic_batch`, then `_fitted`."""
        batch = self._critic_batch(critic, traj, kept)
        value, opt_state, loss, ok = self._fit(critic.value, critic.opt_state, batch, ok, key=key)
        return CriticUpdate(self._fitted(critic, value, opt_state, traj, kept, ok), loss, ok)


def polyak(target: ValueFunction, value: ValueFunction, alpha) -> ValueFunction:
    """`alpha * target + (1 - alpha) * value` on the trainable leaves; the rest from `value`."""
    spec = trainable(value)
    mixed = jax.tree.map(
        lambda t, v: alpha * t + (1 - alpha) * v,
        eqx.filter(target, spec),
        eqx.filter(value, spec),
    )
    return eqx.combine(mixed, eqx.filter(value, spec, inverse=True))


class AbstractSHACCritic(AbstractCriticFit[Critic]):
    """SHAC's actor loss and critic, from the settings the final class (`SHAC`,
    `SHACWindow`) declares as fields: those of `AbstractCriticFit`, `target_alpha`,
    `reward_scale`, `value_hidden` and `value_activation`."""

    target_alpha: AbstractVar[float]
    reward_scale: AbstractVar[float]
    value_hidden: AbstractVar[tuple[int, ...]]
    value_activation: AbstractVar[str]

    def __check_init__(self):
        check_activation(self.value_activation, ACTIVATIONS)
        helpers.in_range("target_alpha", self.target_alpha, 0.0, 1.0)
        helpers.positive("reward_scale", self.reward_scale)

    def _new_critic(self, env: Env, *, key: PRNGKeyArray) -> Critic:
        """A fresh `ValueFunction` as both critics, and its optimiser state."""
        value = ValueFunction(
            env.observation_size,
            hidden=self.value_hidden,
            activation=self.value_activation,
            key=key,
        )
        return Critic(value=value, target=value, opt_state=self._new_opt_state(value))

    def _actor_losses(
        self,
        window: WindowSpec,
        env: Env,
        policy,
        critic: ValueFunction,
        env_state: State,
        *,
        key: PRNGKeyArray,
    ) -> tuple[Float[Array, " B"], Window]:
        """SHAC's actor loss of each env on `window` with `critic` as `V'`, and the window."""
        return shac_window_losses(
            window,
            env,
            policy,
            critic,
            env_state,
            key=key,
            discount=self.discount,
            reward_scale=self.reward_scale,
        )

    def _critic_batch(self, critic: Critic, traj: Trajectory, kept) -> CriticBatch:
        """TD(lambda) targets of `critic.target` (`V'`), the rewards scaled by `reward_scale`."""
        return critic_batch(
            critic.target,
            traj,
            kept,
            discount=self.discount,
            gae_lambda=self.gae_lambda,
            reward_scale=self.reward_scale,
        )

    def _fitted(self, critic: Critic, value, opt_state, traj: Trajectory, kept, ok) -> Critic:
        """Polyak averaging, then both critics' observation statistics (the target shares the
        value's) take in the window's observations."""
        target = select(ok, polyak(critic.target, value, self.target_alpha), critic.target)
        value = update_normalizers_from(value, traj, kept, ok)
        target = eqx.tree_at(lambda v: v.norm, target, value.norm)
        return Critic(value=value, target=target, opt_state=opt_state)


def check_activation(name: str, valid: Mapping) -> None:
    """Refuse, naming it, a `value_activation` that is not a name in `valid`."""
    if name not in valid:
        raise ValueError(f"value_activation must be one of {sorted(valid)}, got {name!r}")
