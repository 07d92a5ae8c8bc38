"""SHAC's critic: one update, shared by `SHAC` and GuidedES's `SHACWindow` through
`AbstractSHACCritic`.

The critic `V` fits TD(lambda) targets computed on a window with the target critic `V'`
(`critic_batch`) for `epochs x minibatches` Adam steps on `0.5 (V - G)^2` (`fit_critic`),
then `V' <- target_alpha V' + (1 - target_alpha) V` (`polyak`).
`AbstractSHACCritic._update_critic` is the whole update, with the observation statistics.
`critic_batch` and `fit_critic` also serve the ensembles of `AHAC` and `SAPO`
(`_ensemble_critic.py`): a critic whose output has a trailing axis of `K` critics fits
every one of them to the same targets.
"""

import abc
from collections.abc import Callable
from typing import TypeVar

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


class Critic(eqx.Module):
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


class AbstractCriticFit(eqx.Module):
    """The fit of a window's critic data that SHAC's critic and the ensembles of `AHAC` and
    `SAPO` share: `critic_epochs x critic_minibatches` steps of `_critic_optimizer`."""

    critic_epochs: AbstractVar[int]
    critic_minibatches: AbstractVar[int]

    @abc.abstractmethod
    def _critic_optimizer(self) -> optax.GradientTransformation:
        """The critic's optimiser."""

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


def polyak(target: ValueFunction, value: ValueFunction, alpha) -> ValueFunction:
    """`alpha * target + (1 - alpha) * value` on the trainable leaves; the rest from `value`."""
    spec = trainable(value)
    mixed = jax.tree.map(
        lambda t, v: alpha * t + (1 - alpha) * v,
        eqx.filter(target, spec),
        eqx.filter(value, spec),
    )
    return eqx.combine(mixed, eqx.filter(value, spec, inverse=True))


class CriticUpdate(eqx.Module):
    """The result of a critic update: the new `critic`, the mean `loss` of its fit, and `ok`
    (False where the window or its targets were not finite: nothing changed)."""

    critic: Critic
    loss: Float[Array, ""]
    ok: Bool[Array, ""]


class AbstractSHACCritic(AbstractCriticFit):
    """SHAC's actor loss and critic, from the settings the final class (`SHAC`,
    `SHACWindow`) declares as fields: `discount`, `gae_lambda`, `target_alpha`,
    `critic_epochs`, `critic_minibatches` (dividing `num_envs * horizon`),
    `critic_learning_rate`, `reward_scale`, `value_hidden`, `value_activation`, and the
    critic's optimiser (`_critic_optimizer`)."""

    num_envs: AbstractVar[int]
    horizon: AbstractVar[int]
    discount: AbstractVar[float]
    gae_lambda: AbstractVar[float]
    target_alpha: AbstractVar[float]
    critic_epochs: AbstractVar[int]
    critic_minibatches: AbstractVar[int]
    critic_learning_rate: AbstractVar[float | Callable[[Array], Array]]
    reward_scale: AbstractVar[float]
    value_hidden: AbstractVar[tuple[int, ...]]
    value_activation: AbstractVar[str]

    def __check_init__(self):
        helpers.learning_rate("critic_learning_rate", self.critic_learning_rate)
        if self.value_activation not in ACTIVATIONS:
            raise ValueError(
                f"value_activation must be one of {sorted(ACTIVATIONS)}, got"
                f" {self.value_activation!r}"
            )
        helpers.in_range("discount", self.discount, 0.0, 1.0, low_open=True)
        helpers.in_range("gae_lambda", self.gae_lambda, 0.0, 1.0)
        helpers.in_range("target_alpha", self.target_alpha, 0.0, 1.0)
        helpers.positive("reward_scale", self.reward_scale)
        check_critic_fit(self.critic_epochs, self.critic_minibatches, self.num_envs * self.horizon)

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

    def _update_critic(
        self,
        critic: Critic,
        traj: Trajectory,
        kept: Bool[Array, " B"],
        ok: Bool[Array, ""],
        *,
        key: PRNGKeyArray,
    ) -> CriticUpdate:
        """One critic update on a window's data `traj` (not differentiated; in the carried
        dtype), its envs `kept`, unless not `ok`: TD(lambda) targets of `critic.target`,
        the fit of `critic.value`, Polyak averaging, then both critics' observation
        statistics take in the window's observations (the target shares the value's)."""
        batch = critic_batch(
            critic.target,
            traj,
            kept,
            discount=self.discount,
            gae_lambda=self.gae_lambda,
            reward_scale=self.reward_scale,
        )
        value, opt_state, loss, ok = self._fit(critic.value, critic.opt_state, batch, ok, key=key)
        target = select(ok, polyak(critic.target, value, self.target_alpha), critic.target)
        value = update_normalizers_from(value, traj, kept, ok)
        target = eqx.tree_at(lambda v: v.norm, target, value.norm)
        return CriticUpdate(Critic(value=value, target=target, opt_state=opt_state), loss, ok)


def check_critic_fit(epochs, minibatches, window_steps: int) -> None:
    """Refuse, naming the value, a critic fit of `epochs` over `minibatches` minibatches
    that is not positive or does not divide a window's `window_steps` samples."""
    helpers.positive_int("critic_epochs", epochs)
    helpers.positive_int("critic_minibatches", minibatches)
    if window_steps % minibatches:
        raise ValueError(
            f"critic_minibatches={minibatches} must divide num_envs * horizon = {window_steps}"
        )
