"""Gradient diagnostics: first-order (analytic) versus zeroth-order (ES) policy gradients.

Analytic gradients through a simulator are unbiased and low-variance on short, smooth
horizons, but their variance can grow exponentially with the horizon on chaotic dynamics
(Metz et al. 2021), and they are zero or biased where the reward is flat or the dynamics
stiff (Suh et al. 2022). `gradient_stats` measures both estimators of the same gradient,
as a function of the horizon, so a study can show where each one wins. `window_step_norms`
measures, per step of one window, the norm of the cotangent flowing backward through the
env state: where a gradient grows or explodes along the window. `gait_stats` says how a
trained policy moves, so that no return hides an exploit.
"""

from collections.abc import Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
from jax.flatten_util import ravel_pytree
from jaxtyping import Array, Float, Int, PRNGKeyArray

from ._episodes import ended_before
from ._gait import (
    GAIT_FIELDS as GAIT_FIELDS,
    GAIT_LAYOUT as GAIT_LAYOUT,
    GAIT_SPANS as GAIT_SPANS,
    gait_stats as gait_stats,
)
from ._types import Env
from .policies import trainable
from .rollout import reset, rollout
from .strategies._window.gradient import window_step_norms as window_step_norms


class GradientStats(eqx.Module):
    """Statistics of two estimators of `grad_theta E[R_H]`, one row per horizon.

    `R_H` is the undiscounted reward summed over the first `H` steps of an episode from a
    fresh reset (rewards after the episode's end are dropped). `P` is the number of
    trainable parameters, `K` the number of horizons.

    **Fields:**

    - `horizons`: `Int[Array, "K"]`.
    - `first_order_mean`, `zeroth_order_mean`: `Float[Array, "K P"]`, the mean over env
      samples of each estimate (flattened like `jax.flatten_util.ravel_pytree` of the
      trainable parameters).
    - `first_order_var`, `zeroth_order_var`: `Float[Array, "K"]`, total variance across
      env samples (trace of the covariance: sum over parameters of the unbiased variance).
    - `first_order_mean_norm`, `zeroth_order_mean_norm`: `Float[Array, "K"]`, norms of
      the means.
    - `cosine`: `Float[Array, "K"]`, cosine similarity between the two means.
    - `bias`: `Float[Array, "K"]`, `|first_order_mean - zeroth_order_mean|`: how far the
      analytic gradient is from the gradient of the Gaussian-smoothed objective.
    - `num_finite`: `Int[Array, "K"]`, the env samples in each row's statistics: those whose
      two estimates are finite at that horizon (a rollout that diverges, e.g. through a
      stiff contact, is left out and counted here; variances need at least 2, else NaN).
    """

    horizons: Int[Array, " K"]
    first_order_mean: Float[Array, "K P"]
    zeroth_order_mean: Float[Array, "K P"]
    first_order_var: Float[Array, " K"]
    zeroth_order_var: Float[Array, " K"]
    first_order_mean_norm: Float[Array, " K"]
    zeroth_order_mean_norm: Float[Array, " K"]
    cosine: Float[Array, " K"]
    bias: Float[Array, " K"]
    num_finite: Int[Array, " K"]


def _stats(horizons: Array, fo: Float[Array, "S K P"], zo: Float[Array, "S K P"]) -> GradientStats:
    ok = jnp.all(jnp.isfinite(fo), -1) & jnp.all(jnp.isfinite(zo), -1)  # [S, K]
    count = jnp.sum(ok, 0)
    fo, zo = jnp.where(ok[..., None], fo, 0.0), jnp.where(ok[..., None], zo, 0.0)
    fo_mean = fo.sum(0) / jnp.maximum(count, 1)[:, None]
    zo_mean = zo.sum(0) / jnp.maximum(count, 1)[:, None]

    def total_var(x, mean):  # unbiased, over the finite samples
        spread = jnp.sum(jnp.where(ok[..., None], (x - mean) ** 2, 0.0), axis=(0, 2))
        return jnp.where(count >= 2, spread / jnp.maximum(count - 1, 1), jnp.nan)

    fo_norm, zo_norm = jnp.linalg.norm(fo_mean, axis=-1), jnp.linalg.norm(zo_mean, axis=-1)
    cosine = jnp.sum(fo_mean * zo_mean, -1) / jnp.maximum(fo_norm * zo_norm, 1e-30)
    return GradientStats(
        horizons=horizons,
        first_order_mean=fo_mean,
        zeroth_order_mean=zo_mean,
        first_order_var=total_var(fo, fo_mean),
        zeroth_order_var=total_var(zo, zo_mean),
        first_order_mean_norm=fo_norm,
        zeroth_order_mean_norm=zo_norm,
        cosine=cosine,
        bias=jnp.linalg.norm(fo_mean - zo_mean, axis=-1),
        num_finite=count,
    )


def gradient_stats(
    env: Env,
    policy: eqx.Module,
    *,
    key: PRNGKeyArray,
    horizons: Sequence[int],
    num_samples: int = 32,
    num_perturbations: int = 32,
    sigma: float = 0.02,
    deterministic: bool = True,
) -> GradientStats:
    """First- and zeroth-order gradients of the `H`-step return, for every `H` in `horizons`.

    For each of `num_samples` env samples `i` (a fresh reset and an action-noise key, both
    drawn from `key`):

        first order:   g1_i = grad_theta R_H(theta; i)              (autodiff through rollout)
        zeroth order:  g0_i = 1/(2 sigma N) sum_j [R_H(theta + sigma e_j; i)
                                                   - R_H(theta - sigma e_j; i)] e_j,
                       e_j ~ N(0, I), N = num_perturbations (antithetic, ES-style)

    over the policy's trainable parameters (`diffsim.trainable`). Both use the same env
    sample, so they estimate the same gradient (the zeroth-order one that of the
    Gaussian-smoothed return). One rollout of `max(horizons)` steps serves every horizon
    (rewards are summed causally), so the whole study compiles once.

    **Arguments:**

    - `env`: from `diffsim.make_env`; `policy`: acts on one observation.
    - `key`: the samples' randomness (keyword-only).
    - `horizons`: the `K` horizons, positive ints.
    - `num_samples`: `S`, env samples the mean and variance are taken over (>= 2).
    - `num_perturbations`: `N`, antithetic pairs per sample for the zeroth-order estimate.
    - `sigma`: the Gaussian smoothing scale in parameter space.
    - `deterministic`: act with `policy(obs)`; False samples `policy(obs, key=k)`.

    **Returns:** a `GradientStats` with one row per horizon.

    **Example:**

    ```python
    env = diffsim.make_env("pendulum")
    policy = diffsim.DeterministicPolicy(3, 1, key=jax.random.key(0))
    stats = diffsim.diagnostics.gradient_stats(env, policy, key=jax.random.key(1),
                                               horizons=[1, 10, 100])
    stats.first_order_var.shape   # (3,)
    ```
    """
    horizons = [int(h) for h in horizons]
    if not horizons or min(horizons) < 1:
        raise ValueError(f"horizons must be a non-empty list of positive ints, got {horizons!r}")
    if not isinstance(num_samples, int) or num_samples < 2:
        raise ValueError(f"num_samples must be an int >= 2, got {num_samples!r}")
    if not isinstance(num_perturbations, int) or num_perturbations < 1:
        raise ValueError(f"num_perturbations must be a positive int, got {num_perturbations!r}")
    if not sigma > 0:
        raise ValueError(f"sigma must be > 0, got {sigma!r}")

    params, static = eqx.partition(policy, trainable(policy))
    flat, unravel = ravel_pytree(params)
    length, index = max(horizons), jnp.asarray(horizons) - 1

    def partial_returns(flat, env_state, act_key) -> Float[Array, " K"]:
        pol = eqx.combine(unravel(flat), static)
        _, traj = rollout(
            env, pol, env_state, key=act_key, length=length, deterministic=deterministic
        )
        reward, done = traj.reward[:, 0], traj.done[:, 0]
        return jnp.cumsum(reward * (ended_before(done) == 0))[index]

    def one_sample(key: PRNGKeyArray) -> tuple[Float[Array, "K P"], Float[Array, "K P"]]:
        reset_key, act_key, eps_key = jr.split(key, 3)
        env_state = reset(env, key=reset_key, num_envs=1)
        first = jax.jacrev(partial_returns)(flat, env_state, act_key)
        eps = jr.normal(eps_key, (num_perturbations, flat.size), flat.dtype)
        ret = jax.vmap(lambda e: partial_returns(flat + sigma * e, env_state, act_key))
        diff = ret(eps) - ret(-eps)  # [N, K]
        zeroth = diff.T @ eps / (2 * sigma * num_perturbations)
        return first, zeroth

    @jax.jit
    def run(key):
        fo, zo = jax.vmap(one_sample)(jr.split(key, num_samples))
        return _stats(jnp.asarray(horizons), fo, zo)

    return run(key)
