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

_ATANH_BOUND = 1.0 - 1e-6
_LOG_2PI_E = math.log(2 * math.pi * math.e)


class RunningNorm(eqx.Module):
    """Running mean and variance of observations, applied as `(obs - mean) / std`.

    The statistics are constants to autodiff (`stop_gradient`); only `update` changes them,
    returning a new module (Chan et al.'s parallel merge, exact for any batch split).

    **Example:**

    ```python
    norm = RunningNorm(3).update(obs_batch)   # obs_batch: Float[Array, "... 3"]
    z = norm(obs)                             # obs: Float[Array, "3"]
    ```
    """

    mean: Float[Array, " obs"]
    var: Float[Array, " obs"]
    count: Float[Array, ""]

    def __init__(self, size: int):
        self.mean = jnp.zeros(size)
        self.var = jnp.ones(size)
        self.count = jnp.zeros(())

    def __call__(self, obs: Float[Array, " obs"]) -> Float[Array, " obs"]:
        mean, var = jax.lax.stop_gradient((self.mean, self.var))
        return (obs - mean) / jnp.sqrt(var + 1e-8)

    def update(
        self, obs: Float[Array, "... obs"], mask: Float[Array, "..."] | None = None
    ) -> "RunningNorm":
        """Merge a batch of observations (any leading axes) into the statistics; with
        `mask` (the leading shape of `obs`, 0 or 1), only the observations where it is 1."""
        batch = obs.reshape(-1, obs.shape[-1])
        w = jnp.ones(batch.shape[0], batch.dtype) if mask is None else mask.reshape(-1)
        n = jnp.sum(w)
        mean = jnp.sum(w[:, None] * batch, 0) / jnp.maximum(n, 1)
        var = jnp.sum(w[:, None] * (batch - mean) ** 2, 0) / jnp.maximum(n, 1)
        return self.merge(n, mean, var)

    def merge(
        self, count: Float[Array, "*n"], mean: Float[Array, "*n obs"], var: Float[Array, "*n obs"]
    ) -> "RunningNorm":
        """Merge the moments of other batches (`count` observations with `mean`, `var`;
        any leading axes `n`, pooled first) into the statistics (Chan et al.)."""
        count = count.reshape(-1).astype(self.count.dtype)
        mean, var = mean.reshape(-1, mean.shape[-1]), var.reshape(-1, var.shape[-1])
        n = jnp.sum(count)
        b_mean = jnp.sum(count[:, None] * mean, 0) / jnp.maximum(n, 1)
        b_var = jnp.sum(count[:, None] * (var + (mean - b_mean) ** 2), 0) / jnp.maximum(n, 1)
        total = self.count + n
        delta = b_mean - self.mean
        new_mean = self.mean + delta * n / jnp.maximum(total, 1)
        m2 = self.var * self.count + b_var * n + delta**2 * self.count * n / jnp.maximum(total, 1)
        # Before the first update the prior var is 1 with weight 0; an empty batch keeps it.
        new_var = jnp.where(total > 0, m2 / jnp.maximum(total, 1), self.var)
        return eqx.tree_at(lambda r: (r.mean, r.var, r.count), self, (new_mean, new_var, total))


def tanh(x: Array) -> Array:
    """`jnp.tanh` as a plain module-level function, so policies pickle by reference."""
    return jnp.tanh(x)


ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "tanh": tanh,
    "elu": jax.nn.elu,
    "relu": jax.nn.relu,
    "gelu": jax.nn.gelu,
    "silu": jax.nn.silu,
    "softplus": jax.nn.softplus,
    "leaky_relu": jax.nn.leaky_relu,
}
"""The activations networks take by name (`MLP(..., activation="elu")`). Each is a function
`load_run` may rebuild, so a policy using one round-trips through `Run.save`."""


def get_activation(name: str | Callable[[Array], Array]) -> Callable[[Array], Array]:
    """The activation function `name` names in `ACTIVATIONS`; a function is returned as is.

    **Raises:** `ValueError` for an unknown name, listing the valid ones.

    **Example:**

    ```python
    get_activation("elu") is jax.nn.elu   # True
    ```
    """
    if isinstance(name, str):
        if name not in ACTIVATIONS:
            raise ValueError(f"unknown activation {name!r}; valid names: {sorted(ACTIVATIONS)}")
        return ACTIVATIONS[name]
    if not callable(name):
        raise ValueError(
            f"activation must be a name in {sorted(ACTIVATIONS)} or a function, got {name!r}"
        )
    return name


def _is_norm(x) -> bool:
    return isinstance(x, RunningNorm)


def update_normalizers(
    module, obs: Float[Array, "... obs"] | RunningNorm, mask: Float[Array, "..."] | None = None
):
    """Return `module` with every `RunningNorm` inside it updated with `obs` (where `mask`
    is 1, if given), or merged with the statistics of another `RunningNorm`.

    **Example:**

    ```python
    policy = update_normalizers(policy, traj.obs)   # traj.obs: Float[Array, "T B obs"]
    ```
    """
    if isinstance(obs, RunningNorm):
        fn = lambda x: x.merge(obs.count, obs.mean, obs.var)
    else:
        fn = lambda x: x.update(obs, mask)
    return jax.tree.map(lambda x: fn(x) if _is_norm(x) else x, module, is_leaf=_is_norm)


def trainable(module):
    """Filter spec for `eqx.partition`: floating arrays, minus `RunningNorm` statistics.

    **Example:**

    ```python
    params, static = eqx.partition(policy, trainable(policy))
    ```
    """
    return jax.tree.map(
        lambda x: False if _is_norm(x) else eqx.is_inexact_array(x), module, is_leaf=_is_norm
    )


class MLP(eqx.Module):
    """A multi-layer perceptron on one input vector.

    **Arguments:**

    - `in_size`, `out_size`: input and output widths.
    - `hidden`: widths of the hidden layers, e.g. `(64, 64)`.
    - `activation`: applied after every hidden layer: a name in `ACTIVATIONS` (`"tanh"`,
      the default, `"elu"`, `"relu"`, ...) or a function.
    - `final_scale`: multiplies the last layer's initial weights; small values (0.01) start
      a policy near zero output.
    - `key`: initialisation key (keyword-only).

    `Float[Array, "in"] -> Float[Array, "out"]`.

    **Example:**

    ```python
    mlp = MLP(4, 1, hidden=(32, 32), key=jax.random.key(0))
    y = mlp(jnp.ones(4))   # shape (1,)
    ```
    """

    layers: tuple[eqx.nn.Linear, ...]
    activation: Callable[[Array], Array] = eqx.field(static=True)

    def __init__(
        self,
        in_size: int,
        out_size: int,
        *,
        hidden: Sequence[int] = (64, 64),
        activation: str | Callable[[Array], Array] = "tanh",
        final_scale: float = 1.0,
        key: PRNGKeyArray,
    ):
        sizes = (in_size, *hidden, out_size)
        keys = jr.split(key, len(sizes) - 1)
        layers = [
            eqx.nn.Linear(a, b, key=k) for a, b, k in zip(sizes[:-1], sizes[1:], keys, strict=True)
        ]
        last = layers[-1]
        assert last.bias is not None  # eqx.nn.Linear(use_bias=True)
        layers[-1] = eqx.tree_at(
            lambda lin: (lin.weight, lin.bias),
            last,
            (last.weight * final_scale, jnp.zeros_like(last.bias)),
        )
        self.layers = tuple(layers)
        self.activation = get_activation(activation)

    def __call__(self, x: Float[Array, " in"]) -> Float[Array, " out"]:
        for layer in self.layers[:-1]:
            x = self.activation(layer(x))
        return self.layers[-1](x)


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
        self.norm = RunningNorm(obs_size)
        self.net = MLP(
            obs_size, out, hidden=hidden, activation=activation, final_scale=0.01, key=key
        )
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
        self.norm = RunningNorm(obs_size)
        self.net = MLP(
            obs_size, action_size, hidden=hidden, activation=activation, final_scale=0.01, key=key
        )

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
        self.norm = RunningNorm(obs_size)
        self.net = MLP(obs_size, 1, hidden=hidden, activation=activation, key=key)

    def __call__(self, obs: Float[Array, " obs"]) -> Float[Array, ""]:
        return self.net(self.norm(obs))[0]
