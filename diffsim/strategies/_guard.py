"""The NaN/inf guard every strategy applies: a non-finite update is skipped, not applied."""

import equinox as eqx
import jax
import jax.numpy as jnp
import optax
from jaxtyping import Array, Bool

from ..policies import trainable


def all_finite(tree) -> Bool[Array, ""]:
    """True if every floating leaf of `tree` is finite."""
    leaves = jax.tree.leaves(eqx.filter(tree, eqx.is_inexact_array))
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def select(ok: Bool[Array, ""], new, old):
    """`new` where `ok`, else `old`, leaf by leaf (array leaves only)."""
    return jax.tree.map(lambda n, o: jnp.where(ok, n, o) if eqx.is_array(n) else n, new, old)


def guarded_update(
    module, grads, opt_state, optimizer: optax.GradientTransformation, ok: Bool[Array, ""]
):
    """One optimiser step on `module`'s trainable leaves, or no change at all if not `ok`."""
    params = eqx.filter(module, trainable(module))
    updates, new_opt = optimizer.update(eqx.filter(grads, trainable(module)), opt_state, params)
    return select(ok, eqx.apply_updates(module, updates), module), select(ok, new_opt, opt_state)
