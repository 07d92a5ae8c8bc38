"""The building blocks of diffsim's policies: `RunningNorm` (observation statistics, kept
out of gradients and optimisers), the activations networks take by name, and `MLP`.

`update_normalizers` and `trainable` find every `RunningNorm` inside any module, so they work
on user-written policies as on `diffsim.policies`' own.
"""

from collections.abc import Callable, Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
from jaxtyping import Array, Float, PRNGKeyArray


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
