"""Equinox policies and critics. Each works on ONE observation; batch with `jax.vmap`.

The policy contract every strategy relies on is a call
`policy(obs, *, key=None) -> action`: `Float[Array, "obs"]` in, an env action in [-1, 1]
out, sampled (reparameterised, so differentiable) when a key is given and deterministic
when not. PPO also needs `policy.log_prob(obs, action)` and `policy.entropy(obs)`. Any
user-written `eqx.Module` with these methods works with the strategies.

Observation normalisation lives inside the modules as `RunningNorm` statistics: they are
gradient-stopped, strategies update them from rollouts with `update_normalizers`, and
`trainable` keeps them out of optimisers and ES perturbations, so a trained policy is
self-contained.
"""

import math
from collections.abc import Callable, Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
from jaxtyping import Array, Float, PRNGKeyArray

from ._networks import (
    ACTIVATIONS as ACTIVATIONS,
    MLP as MLP,
    RunningNorm as RunningNorm,
    get_activation as get_activation,
    tanh as tanh,
    trainable as trainable,
    update_normalizers as update_normalizers,
)

_ATANH_BOUND = 1.0 - 1e-6
_LOG_2PI_E = math.log(2 * math.pi * math.e)


def _normalised_mlp(
    obs_size: int,
    out_size: int,
    hidden: Sequence[int],
    activation: str | Callable[[Array], Array],
    final_scale: float,
    key: PRNGKeyArray,
) -> tuple[RunningNorm, MLP]:
    """The `norm` and `net` fields every policy here holds: `net(norm(obs))`."""
    norm = RunningNorm(obs_size)
    net = MLP(
        obs_size, out_size, hidden=hidden, activation=activation, final_scale=final_scale, key=key
    )
    return norm, net


class GaussianPolicy(eqx.Module):
    """A tanh-squashed Gaussian policy: `action = tanh(mean(obs) + std(obs) * eps)`.

    **Arguments:**

    - `obs_size`, `action_size`: env sizes (`env.observation_size`, `env.action_size`).
    - `hidden`: hidden widths of the mean network (default `(64, 64)`).
    - `activation`: its activation, a name in `ACTIVATIONS` or a function (default
      `"tanh"`; SHAC's paper uses `"elu"`).
    - `init_std`: initial standard deviation of the pre-squash Gaussian.
    - `state_dependent_std`: if True the network also outputs the log-std per
      observation; otherwise the log-std is one trainable vector.
    - `key`: initialisation key (keyword-only).

    `policy(obs, key=None)`: `Float[Array, "obs"] -> Float[Array, "act"]`, the mean action
    without a key, a reparameterised sample with one. `log_prob(obs, action)` is the
    density of a squashed action (change of variables); `entropy(obs)` that of the
    pre-squash Gaussian.

    **Example:**

    ```python
    policy = GaussianPolicy(env.observation_size, env.action_size, key=jax.random.key(0))
    action = policy(obs, key=jax.random.key(1))
    ```
    """

    norm: RunningNorm
    net: MLP
    log_std: Float[Array, " act"] | None
    action_size: int = eqx.field(static=True)

    def __init__(
        self,
        obs_size: int,
        action_size: int,
        *,
        hidden: Sequence[int] = (64, 64),
        activation: str | Callable[[Array], Array] = "tanh",
        init_std: float = 0.6,
        state_dependent_std: bool = False,
        key: PRNGKeyArray,
    ):
        if init_std <= 0:
            raise ValueError(f"init_std must be > 0, got {init_std!r}")
        out = 2 * action_size if state_dependent_std else action_size
        self.norm, self.net = _normalised_mlp(obs_size, out, hidden, activation, 0.01, key)
        if state_dependent_std:
            # Start every observation at init_std: the output bias carries log(init_std).
            last = self.net.layers[-1]
            assert last.bias is not None  # eqx.nn.Linear(use_bias=True)
            bias = last.bias.at[action_size:].set(math.log(init_std))
            self.net = eqx.tree_at(lambda n: n.layers[-1].bias, self.net, bias)
            self.log_std = None
        else:
            self.log_std = jnp.full(action_size, math.log(init_std), dtype=float)  # not weak-typed
        self.action_size = action_size

    def distribution(
        self, obs: Float[Array, " obs"]
    ) -> tuple[Float[Array, " act"], Float[Array, " act"]]:
        """Mean and log-std of the pre-squash Gaussian."""
        out = self.net(self.norm(obs))
        if self.log_std is None:
            mean, log_std = out[: self.action_size], out[self.action_size :]
        else:
            mean, log_std = out, self.log_std
        return mean, jnp.clip(log_std, -5.0, 2.0)

    def __call__(
        self, obs: Float[Array, " obs"], *, key: PRNGKeyArray | None = None
    ) -> Float[Array, " act"]:
        if key is None:
            return jnp.tanh(self.distribution(obs)[0])
        return self.sample(obs, key=key)[0]

    def sample(
        self, obs: Float[Array, " obs"], *, key: PRNGKeyArray
    ) -> tuple[Float[Array, " act"], Float[Array, " act"]]:
        """A reparameterised sample: `(tanh(u), u)` with `u = mean + std * eps`."""
        mean, log_std = self.distribution(obs)
        u = mean + jnp.exp(log_std) * jr.normal(key, mean.shape)
        return jnp.tanh(u), u

    def log_prob(
        self,
        obs: Float[Array, " obs"],
        action: Float[Array, " act"],
        *,
        pre_squash: Float[Array, " act"] | None = None,
    ) -> Float[Array, ""]:
        """Log-density of the squashed `action`. Pass the `pre_squash` sample `u` (from
        `sample`) where it is known: `arctanh(action)` loses precision near +-1."""
        mean, log_std = self.distribution(obs)
        if pre_squash is None:
            action = jnp.clip(action, -_ATANH_BOUND, _ATANH_BOUND)
            pre_squash = jnp.arctanh(action)
        u = pre_squash
        gauss = -0.5 * ((u - mean) / jnp.exp(log_std)) ** 2 - log_std - 0.5 * math.log(2 * math.pi)
        # log(1 - tanh(u)^2), written stably for large |u|
        log_det = 2.0 * (math.log(2.0) - u - jax.nn.softplus(-2.0 * u))
        return jnp.sum(gauss - log_det)

    def entropy(self, obs: Float[Array, " obs"]) -> Float[Array, ""]:
        _, log_std = self.distribution(obs)
        return jnp.sum(log_std + 0.5 * _LOG_2PI_E)


class DeterministicPolicy(eqx.Module):
    """`action = tanh(MLP(normalised obs))`; the key, if given, is ignored.

    **Arguments:** `obs_size`, `action_size`, `hidden=(64, 64)`, `activation="tanh"` (a
    name in `ACTIVATIONS` or a function), `key` (keyword-only).

    `Float[Array, "obs"] -> Float[Array, "act"]`.

    **Example:**

    ```python
    policy = DeterministicPolicy(env.observation_size, env.action_size, key=jax.random.key(0))
    action = policy(obs)
    ```
    """

    norm: RunningNorm
    net: MLP

    def __init__(
        self,
        obs_size: int,
        action_size: int,
        *,
        hidden: Sequence[int] = (64, 64),
        activation: str | Callable[[Array], Array] = "tanh",
        key: PRNGKeyArray,
    ):
        self.norm, self.net = _normalised_mlp(obs_size, action_size, hidden, activation, 0.01, key)

    def __call__(
        self, obs: Float[Array, " obs"], *, key: PRNGKeyArray | None = None
    ) -> Float[Array, " act"]:
        del key
        return jnp.tanh(self.net(self.norm(obs)))


class ValueFunction(eqx.Module):
    """A state-value critic `V(obs)`: `Float[Array, "obs"] -> Float[Array, ""]`.

    **Arguments:** `obs_size`, `hidden=(64, 64)`, `activation="tanh"` (a name in
    `ACTIVATIONS` or a function), `key` (keyword-only).

    **Example:**

    ```python
    value = ValueFunction(env.observation_size, key=jax.random.key(0))
    v = value(obs)   # shape ()
    ```
    """

    norm: RunningNorm
    net: MLP

    def __init__(
        self,
        obs_size: int,
        *,
        hidden: Sequence[int] = (64, 64),
        activation: str | Callable[[Array], Array] = "tanh",
        key: PRNGKeyArray,
    ):
        self.norm, self.net = _normalised_mlp(obs_size, 1, hidden, activation, 1.0, key)

    def __call__(self, obs: Float[Array, " obs"]) -> Float[Array, ""]:
        return self.net(self.norm(obs))[0]
