"""The gradient of a window loss with respect to the policy's parameters, batched or per env.

- batched: one backward pass of the mean over envs (a non-finite env spoils the whole
  gradient, and the strategy skips its update);
- per env (`per_env=True`): `jax.vmap` over envs of `jax.grad` of one env's window, so each
  env's backward pass is its own. Envs whose window diverged (a non-finite reward or
  observation, or a non-finite loss or gradient) drop out of the mean; the others update.

Given the window's `horizon`, it also differentiates a probe (`_valve.with_probe`), whose
gradient is the norm of the cotangent through the env state at every step of every env's
window (`WindowGradient.step_norms`).
"""

import dataclasses
from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
from brax.envs.base import State
from jaxtyping import Array, Bool, Float, PRNGKeyArray

from ..._types import Env, Trajectory
from ...policies import trainable
from ...sharding import shard_batch
from ..helpers import all_finite
from .valve import PROBE, with_probe
from .window import AbstractWindowed, Window, WindowSpec, apg_loss

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
    - `step_norms`: `Float[Array, "B H"]`, the norm of the cotangent of env `b`'s loss
      through its env state before step `t` (before the valve clips or decays it), or None
      without a `horizon`.
    """

    loss: Float[Array, ""]
    grads: eqx.Module
    window: Window
    kept: Bool[Array, " B"]
    ok: Bool[Array, ""]
    per_env_loss: Float[Array, " B"]
    per_env_grads: eqx.Module | None
    step_norms: Float[Array, "B H"] | None = None

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
    loss_fn: LossFn,
    params,
    static,
    env_state: State,
    *,
    key: PRNGKeyArray,
    per_env: bool,
    horizon: int | None = None,
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

    With `horizon` (the window's `H`; `loss_fn` must run a `WindowSpec`), `step_norms` is
    the gradient of a zero probe carried through the window: the per-step cotangent norms.

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
    probe = None if horizon is None else with_probe(env_state, horizon).info[PROBE]
    if per_env:
        return _per_env_gradient(loss_fn, params, static, env_state, probe, key=key)

    def mean_loss(p, probe):
        start = env_state if probe is None else _probed(env_state, probe)
        losses, win = loss_fn(eqx.combine(p, static), start, key)
        return jnp.mean(losses), (losses, win)

    (loss, (losses, win)), (grads, norms) = jax.value_and_grad(
        mean_loss, argnums=(0, 1), has_aux=True
    )(params, probe)
    kept = jnp.ones(losses.shape, bool)
    ok = jnp.isfinite(loss) & all_finite(grads)
    return WindowGradient(loss, grads, win, kept, ok, losses, None, norms)


def _probed(env_state: State, probe) -> State:
    return dataclasses.replace(env_state, info={**env_state.info, PROBE: probe})


def _per_env_gradient(
    loss_fn: LossFn, params, static, env_state: State, probe, *, key: PRNGKeyArray
) -> WindowGradient:
    def one_env(start: State, probe, key: PRNGKeyArray):
        def loss(p, probe):
            batch = jax.tree.map(lambda x: x[None], start)  # a batch of one env
            batch = batch if probe is None else _probed(batch, probe[None])
            losses, win = loss_fn(eqx.combine(p, static), batch, key)
            return losses[0], win

        return jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(params, probe)

    num_envs = env_state.done.shape[0]
    start = shard_batch(env_state)
    (losses, wins), (per_grads, norms) = jax.vmap(one_env)(start, probe, jr.split(key, num_envs))
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
    return WindowGradient(loss, grads, win, kept, ok, losses, per_grads, norms)


def window_step_norms(
    windowed: AbstractWindowed, env: Env, policy: eqx.Module, *, key: PRNGKeyArray
) -> Float[Array, "B H"]:
    """The per-step cotangent norms of one window: `num_envs` fresh, staggered envs (as a
    strategy's first window), `horizon` steps with `windowed`'s settings (valve, contact
    smoothing, float64, remat), differentiated for APG's loss of each env (its mean reward
    over the window). Entry `[b, t]` is the norm of the cotangent of env `b`'s loss through
    its env state before step `t`, measured before the valve clips or decays it; its growth
    towards small `t` is the growth of the gradient backward through time.

    **Arguments:** `windowed`: `APG`, `SHAC` or a GuidedES window (its window settings are
    used); `env` from `diffsim.make_env`; `policy` acting on one observation; `key`.

    **Returns:** `Float[Array, "B H"]`.

    **Example:**

    ```python
    env = diffsim.make_env("pendulum")
    policy = diffsim.DeterministicPolicy(3, 1, key=jax.random.key(0))
    norms = diffsim.diagnostics.window_step_norms(diffsim.APG(num_envs=4, horizon=16), env,
                                                  policy, key=jax.random.key(1))
    norms.shape   # (4, 16)
    ```
    """
    spec = windowed.window
    spec.check(env, policy)
    return _step_norms(spec, env, policy, key)


@eqx.filter_jit  # one compiled program when called eagerly
def _step_norms(spec: WindowSpec, env: Env, policy, key: PRNGKeyArray) -> Array:
    start_key, key = jr.split(key)
    env_state = spec.initial_env_state(env, policy, key=start_key)
    params, static = eqx.partition(policy, trainable(policy))

    def losses(pol, env_state, key):
        window = spec(env, pol, env_state, key=key)
        return apg_loss(window.traj), window

    grad = window_gradient(
        losses, params, static, env_state, key=key, per_env=False, horizon=spec.horizon
    )
    assert grad.step_norms is not None
    return grad.step_norms
