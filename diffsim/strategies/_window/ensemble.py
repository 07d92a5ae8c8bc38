"""Critic ensembles without a target copy: the critics of `AHAC` (3, Mish, LayerNorm after
the activation) and `SAPO` (2, SiLU, LayerNorm before it).

`ValueEnsemble` holds `K` critics `V_k(obs)` over one shared observation normaliser (their
parameters stacked on a leading axis, evaluated with `eqx.filter_vmap`). One update
(`AbstractCriticFit._update_critic`) computes TD(lambda) targets on a window with the
current critics' minimum (`critic_batch`, no target critic), fits every critic to them for
`epochs x minibatches` optimiser steps (`fit_critic`, the loss the mean over critics), then
lets the normaliser take in the window's observations.
"""

import abc
from collections.abc import Callable, Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import optax
from equinox import AbstractVar
from jaxtyping import Array, Float, PRNGKeyArray

from ..._types import Env, Trajectory
from ...policies import ACTIVATIONS, RunningNorm
from .. import helpers
from .critic import AbstractCritic, AbstractCriticFit, CriticBatch, check_activation, critic_batch
from .window import update_normalizers_from


def mish(x: Array) -> Array:
    """Mish (Misra 2019): `x * tanh(softplus(x))`, AHAC's activation."""
    return x * jnp.tanh(jax.nn.softplus(x))


CRITIC_ACTIVATIONS: dict[str, Callable[[Array], Array]] = {**ACTIVATIONS, "mish": mish}
"""The activations an ensemble critic takes by name: `diffsim.policies.ACTIVATIONS` and
`"mish"`."""


class CriticNet(eqx.Module):
    """One critic's network on a normalised observation: hidden `Linear` layers, each
    followed by the activation and, with `layer_norm`, a `LayerNorm` (after the activation
    if `norm_after_activation`, as AHAC's; before it otherwise, as SAPO's), then a linear
    output. `Float[Array, "obs"] -> Float[Array, ""]`."""

    layers: tuple[eqx.nn.Linear, ...]
    norms: tuple[eqx.nn.LayerNorm, ...]
    activation: Callable[[Array], Array] = eqx.field(static=True)
    norm_after_activation: bool = eqx.field(static=True)

    def __init__(
        self,
        in_size: int,
        *,
        hidden: Sequence[int],
        activation: str,
        layer_norm: bool,
        norm_after_activation: bool,
        key: PRNGKeyArray,
    ):
        sizes = (in_size, *hidden, 1)
        keys = jr.split(key, len(sizes) - 1)
        self.layers = tuple(
            eqx.nn.Linear(a, b, key=k) for a, b, k in zip(sizes[:-1], sizes[1:], keys, strict=True)
        )
        self.norms = tuple(eqx.nn.LayerNorm(h) for h in hidden) if layer_norm else ()
        self.activation = CRITIC_ACTIVATIONS[activation]
        self.norm_after_activation = norm_after_activation

    def __call__(self, x: Float[Array, " obs"]) -> Float[Array, ""]:
        for i, layer in enumerate(self.layers[:-1]):
            x = layer(x)
            if self.norms and not self.norm_after_activation:
                x = self.norms[i](x)
            x = self.activation(x)
            if self.norms and self.norm_after_activation:
                x = self.norms[i](x)
        return self.layers[-1](x)[0]


class ValueEnsemble(eqx.Module):
    """`K` state-value critics over one observation normaliser:
    `Float[Array, "obs"] -> Float[Array, "K"]`, every critic's value.

    **Example:**

    ```python
    critics = ValueEnsemble(env.observation_size, num=3, hidden=(400, 200),
                            activation="mish", layer_norm=True, norm_after_activation=True,
                            key=jax.random.key(0))
    critics(obs).shape   # (3,)
    critics.min(obs), critics.mean(obs)
    ```
    """

    norm: RunningNorm
    nets: CriticNet  # every array leaf stacked on a leading axis of size K

    def __init__(self, obs_size: int, *, num: int, key: PRNGKeyArray, **net):
        self.norm = RunningNorm(obs_size)
        self.nets = eqx.filter_vmap(lambda k: CriticNet(obs_size, key=k, **net))(jr.split(key, num))

    def __call__(self, obs: Float[Array, " obs"]) -> Float[Array, " K"]:
        x = self.norm(obs)
        return eqx.filter_vmap(lambda net: net(x))(self.nets)

    def min(self, obs: Float[Array, " obs"]) -> Float[Array, ""]:
        """The smallest of the critics' values."""
        return jnp.min(self(obs))

    def mean(self, obs: Float[Array, " obs"]) -> Float[Array, ""]:
        """The critics' average value."""
        return jnp.mean(self(obs))


class EnsembleCritic(AbstractCritic):
    """The critics (`value`) and their optimiser state."""

    value: ValueEnsemble
    opt_state: optax.OptState


class AbstractEnsembleCritic(AbstractCriticFit[EnsembleCritic]):
    """An ensemble critic from the settings the final class (`AHAC`, `SAPO`) declares: those
    of `AbstractCriticFit`, `num_critics`, `value_hidden`, `value_activation` (a name in
    `CRITIC_ACTIVATIONS`), `value_layer_norm` and the place of the LayerNorm
    (`_norm_after_activation`). Its targets bootstrap from the critics' minimum."""

    num_critics: AbstractVar[int]
    value_hidden: AbstractVar[tuple[int, ...]]
    value_activation: AbstractVar[str]
    value_layer_norm: AbstractVar[bool]

    def __check_init__(self):
        helpers.positive_int("num_critics", self.num_critics)
        check_activation(self.value_activation, CRITIC_ACTIVATIONS)
        if not isinstance(self.value_layer_norm, bool):
            raise ValueError(f"value_layer_norm must be a bool, got {self.value_layer_norm!r}")

    @property
    @abc.abstractmethod
    def _norm_after_activation(self) -> bool:
        """Whether each hidden layer's LayerNorm follows its activation."""

    def _new_ensemble(self, env: Env, *, key: PRNGKeyArray) -> EnsembleCritic:
        """Fresh critics and their optimiser state."""
        value = ValueEnsemble(
            env.observation_size,
            num=self.num_critics,
            key=key,
            hidden=self.value_hidden,
            activation=self.value_activation,
            layer_norm=self.value_layer_norm,
            norm_after_activation=self._norm_after_activation,
        )
        return EnsembleCritic(value=value, opt_state=self._new_opt_state(value))

    def _critic_batch(self, critic: EnsembleCritic, traj: Trajectory, kept) -> CriticBatch:
        """TD(lambda) targets of the critics' minimum (no target critic)."""
        return critic_batch(
            critic.value.min, traj, kept, discount=self.discount, gae_lambda=self.gae_lambda
        )

    def _fitted(
        self, critic: EnsembleCritic, value, opt_state, traj: Trajectory, kept, ok
    ) -> EnsembleCritic:
        """The shared normaliser takes in the window's observations."""
        del critic
        value = update_normalizers_from(value, traj, kept, ok)
        return EnsembleCritic(value=value, opt_state=opt_state)
