"""The gradient of a window loss with respect to the policy's parameters, batched or per env.

- batched: one backward pass of the mean over envs (a non-finite env spoils the whole
  gradient, and the strategy skips its update);
- per env (`per_env=True`): `jax.vmap` over envs of `jax.grad` of one env's window, so each
  env's backward pass is its own. Envs whose window diverged (a non-finite reward or
  observation, or a non-finite loss or gradient) drop out of the mean; the others update.
"""

from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
from brax.envs.base import State
from jaxtyping import Array, Bool, Float, PRNGKeyArray

from .._types import Trajectory
from ..sharding import shard_batch
from ._windows import Window
from .helpers import all_finite

LossFn = Callable[[eqx.Module, State, PRNGKeyArray], tuple[Float[Array, " B"], Window]]
"""`loss_fn(policy, env_state, key) -> (loss of each env, window)`."""


class WindowGradient(eqx.Module):
    """The result of `window_gradient`.

    **Fields:**

    - `loss`: the mean window loss over the kept envs.
    - `grads`: its gradient (a pytree like the parameters).
    - `window`: the window, leading axes `T B` (per env or batched, the same layout).
    - `kept`: `Bool[Array, "B"]`, the envs in the mean (all True unless `per_env`).
    - `ok`: the loss and gradient are finite and at least one env was kept.
    - `per_env_loss`: `Float[Array, "B"]`; `per_env_grads`: the gradient of each env's
      loss (leaves `[B, ...]`), or None unless `per_env`.
    """

    loss: Float[Array, ""]
    grads: eqx.Module
    window: Window
    kept: Bool[Array, " B"]
    ok: Bool[Array, ""]
    per_env_loss: Float[Array, " B"]
    per_env_grads: eqx.Module | None

    @property
    def masked_envs(self) -> Float[Array, ""]:
        """Envs dropped from the mean (a float, for metrics)."""
        return jnp.sum(~self.kept).astype(jnp.float32)


def _diverged(traj: Trajectory) -> Bool[Array, " B"]:
    """Envs whose window holds a non-finite reward or observation, or a diverged step."""
    bad = ~jnp.all(jnp.isfinite(traj.reward), axis=0)
    for obs in (traj.obs, traj.next_obs):
        bad = bad | ~jnp.all(jnp.isfinite(obs), axis=(0, *range(2, obs.ndim)))
    if "diverged" in traj.extras:
        bad = bad | jnp.any(traj.extras["diverged"] > 0, axis=0)
    return bad


def _rows_finite(tree) -> Bool[Array, " B"]:
    """Per leading index: every floating leaf of `tree` is finite there."""
    leaves = jax.tree.leaves(eqx.filter(tree, eqx.is_inexact_array))
    return jnp.all(
        jnp.stack([jnp.all(jnp.isfinite(x.reshape(x.shape[0], -1)), axis=1) for x in leaves]),
        axis=0,
    )


def window_gradient(
    loss_fn: LossFn, params, static, env_state: State, *, key: PRNGKeyArray, per_env: bool
) -> WindowGradient:
    """Differentiate a per-env window loss with respect to the policy's parameters.

    `loss_fn(policy, env_state, key) -> (Float[Array, "B"], Window)` computes the loss of
    each env of the batch `env_state` (any batch size, also 1). The batch loss is the mean
    over envs; with `per_env`, over the kept envs only:

        kept_b = window b finite (rewards, observations, no diverged step), L_b and grad L_b finite
        L = 1/|kept| sum_{b kept} L_b,     grad L = 1/|kept| sum_{b kept} grad L_b

    `per_env` runs `jax.vmap` over envs of `jax.value_and_grad` of a one-env window (each
    env's actions sampled from `jr.split(key, B)[b]`, so a stochastic policy draws other
    samples than the batched window does). A dropped env contributes exactly 0: its
    backward pass never mixes with the others', so no `0 * NaN` can reach their sum.

    **Example:**

    ```python
    def losses(pol, env_state, key):
        w = spec(env, pol, env_state, key=key)     # a WindowSpec
        return apg_loss(w.traj), w

    params, static = eqx.partition(policy, diffsim.trainable(policy))
    g = window_gradient(losses, params, static, env_state, key=key, per_env=True)
    g.grads, g.masked_envs   # the mean gradient of the kept envs, the envs dropped
    ```
    """
    if per_env:
        return _per_env_gradient(loss_fn, params, static, env_state, key=key)

    def mean_loss(p):
        losses, win = loss_fn(eqx.combine(p, static), env_state, key)
        return jnp.mean(losses), (losses, win)

    (loss, (losses, win)), grads = jax.value_and_grad(mean_loss, has_aux=True)(params)
    kept = jnp.ones(losses.shape, bool)
    ok = jnp.isfinite(loss) & all_finite(grads)
    return WindowGradient(loss, grads, win, kept, ok, losses, None)


def _per_env_gradient(
    loss_fn: LossFn, params, static, env_state: State, *, key: PRNGKeyArray
) -> WindowGradient:
    def one_env(start: State, key: PRNGKeyArray):
        def loss(p):
            batch = jax.tree.map(lambda x: x[None], start)  # a batch of one env
            losses, win = loss_fn(eqx.combine(p, static), batch, key)
            return losses[0], win

        return jax.value_and_grad(loss, has_aux=True)(params)

    num_envs = env_state.done.shape[0]
    start = shard_batch(env_state)
    (losses, wins), per_grads = jax.vmap(one_env)(start, jr.split(key, num_envs))
    # Back to the batched layout: env states [B, 1, ...] -> [B, ...]; data [B, T, 1, ...]
    # -> [T, B, ...].
    win = Window(
        env_state=jax.tree.map(lambda x: x[:, 0], wins.env_state),
        traj=jax.tree.map(lambda x: jnp.moveaxis(x[:, :, 0], 0, 1), wins.traj),
    )
    kept = ~_diverged(win.traj) & jnp.isfinite(losses) & _rows_finite(per_grads)
    count = jnp.sum(kept)
    denominator = jnp.maximum(count, 1).astype(losses.dtype)

    def kept_mean(x):
        mask = kept.reshape(-1, *([1] * (x.ndim - 1)))
        return jnp.sum(jnp.where(mask, x, 0.0), axis=0) / denominator.astype(x.dtype)

    loss = kept_mean(losses)
    grads = jax.tree.map(kept_mean, per_grads)
    ok = (count > 0) & jnp.isfinite(loss) & all_finite(grads)
    return WindowGradient(loss, grads, win, kept, ok, losses, per_grads)
