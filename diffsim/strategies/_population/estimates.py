"""The gradient estimates GuidedES combines: the inverse-variance `blend` of ES's and the
analytic one, and Guided ES's search directions along recent gradients."""

import equinox as eqx
import jax.numpy as jnp
import jax.random as jr
from jaxtyping import Array, Bool, Float, PRNGKeyArray


class BlendEstimate(eqx.Module):
    """An inverse-variance blend of two gradient estimates (see `blend`). Scalars except
    `gradient` (`Float[Array, "d"]`); `ok` is False if neither source was usable."""

    gradient: Float[Array, " d"]
    es_weight: Float[Array, ""]
    analytic_weight: Float[Array, ""]
    es_norm: Float[Array, ""]
    analytic_norm: Float[Array, ""]
    cosine: Float[Array, ""]
    es_variance: Float[Array, ""]
    analytic_variance: Float[Array, ""]
    ok: Bool[Array, ""]


def cosine(a: Float[Array, " d"], b: Float[Array, " d"]) -> Float[Array, ""]:
    """The cosine of the angle between `a` and `b` (0 if either is zero)."""
    norms = jnp.linalg.norm(a) * jnp.linalg.norm(b)
    return jnp.where(norms > 0, jnp.dot(a, b) / jnp.where(norms > 0, norms, 1.0), 0.0)


def _mean_and_variance(samples: Float[Array, "n d"], kept: Bool[Array, " n"]):
    """Mean of the kept rows and the total variance of that mean, `tr Cov / n`
    (unbiased); rows not kept contribute exactly 0 even if they are not finite."""
    weight = kept.astype(samples.dtype)
    count = jnp.sum(weight)
    safe = jnp.where(kept[:, None], samples, 0.0)
    mean = jnp.sum(safe, axis=0) / jnp.maximum(count, 1.0)
    spread = jnp.sum(weight[:, None] * (safe - mean) ** 2)
    variance = spread / jnp.maximum(count * (count - 1.0), 1.0)
    # Identical rows (a noise-free source) leave only the rounding of their mean: count it 0.
    rounding = (8 * jnp.finfo(samples.dtype).eps) ** 2 * jnp.sum(mean**2)
    return mean, jnp.where(variance <= rounding, 0.0, variance), count


def blend(
    es_pairs: Float[Array, "m d"],
    analytic: Float[Array, "b d"],
    analytic_kept: Bool[Array, " b"],
) -> BlendEstimate:
    """Combine ES's and the analytic gradient estimate by their measured variances.

    `es_pairs`: one estimate per antithetic pair, `g_j = (f(m + s e_j) - f(m - s e_j)) e_j / (2 s)`;
    `analytic`: one per env of the gradient window (rows not in `analytic_kept` are ignored).
    Both estimate the gradient of the same objective. With `g_es`, `g_an` the means and
    `v_es`, `v_an` the total variances of those means (`tr Cov / n`, from the spread of
    the rows):

        w_an = v_es / (v_es + v_an)   (1/2 if both are 0),   w_es = 1 - w_an,
        g = w_es g_es + w_an g_an,

    the minimum-variance convex combination of two independent unbiased estimates. The
    analytic estimate gets weight 0 where it is unusable: exactly zero (a reward that does
    not depend on the actions), non-finite, or from fewer than 2 envs; ES gets weight 0
    where its estimate is not finite. `ok` is False if neither is usable (`g = 0`).

    **Example:**

    ```python
    b = blend(es_pairs, per_env_grads, jnp.ones(per_env_grads.shape[0], bool))
    b.gradient, b.es_weight, b.analytic_weight
    ```
    """
    g_es, v_es, _ = _mean_and_variance(es_pairs, jnp.ones(es_pairs.shape[0], bool))
    g_an, v_an, count = _mean_and_variance(analytic, analytic_kept)
    es_ok = jnp.all(jnp.isfinite(g_es)) & jnp.isfinite(v_es)
    an_ok = (
        (count >= 2)
        & jnp.all(jnp.isfinite(g_an))
        & jnp.isfinite(v_an)
        & (jnp.linalg.norm(g_an) > 0)
    )
    total = v_es + v_an
    both = jnp.where(total > 0, v_es / jnp.where(total > 0, total, 1.0), 0.5)
    w_an = jnp.where(an_ok & es_ok, both, jnp.where(an_ok, 1.0, 0.0))
    g_es = jnp.where(es_ok, g_es, 0.0)
    g_an = jnp.where(an_ok, g_an, 0.0)
    return BlendEstimate(
        gradient=(1.0 - w_an) * g_es + w_an * g_an,
        es_weight=jnp.where(es_ok, 1.0 - w_an, 0.0),
        analytic_weight=w_an,
        es_norm=jnp.linalg.norm(g_es),
        analytic_norm=jnp.linalg.norm(g_an),
        cosine=cosine(g_es, g_an),
        es_variance=v_es,
        analytic_variance=v_an,
        ok=es_ok | an_ok,
    )


def guided_directions(
    key: PRNGKeyArray, subspace: Float[Array, "k d"], *, num_pairs: int, alpha
) -> tuple[Float[Array, "m d"], Float[Array, ""]]:
    """`num_pairs` search directions `e ~ N(0, Sigma)` stretched along the span of the rows
    of `subspace` (Maheswaranathan et al. 2019, scaled so that `E |e|^2 = d` as for
    Open-ES's `e ~ N(0, I)`):

        Sigma = alpha I_d + (1 - alpha) d / k' U U^T,

    `U` an orthonormal basis (`d x k'`) of the nonzero gradients in `subspace`. Without
    any (`k' = 0`), `e = xi ~ N(0, I)` drawn exactly as Open-ES draws its half population
    from the same key. Returns the directions and `k'`.
    """
    num_dims = subspace.shape[1]
    xi = jr.normal(key, (num_pairs, num_dims))  # Open_ES's draw of its first half
    basis, singular, _ = jnp.linalg.svd(subspace.T, full_matrices=False)  # [d, k], [k]
    largest = jnp.max(singular)
    kept = (singular > jnp.finfo(singular.dtype).eps * num_dims * largest) & (largest > 0)
    rank = jnp.sum(kept)
    zeta = jr.normal(jr.fold_in(key, 1), (num_pairs, subspace.shape[0]), xi.dtype)
    along = (zeta * kept) @ basis.T
    scale = jnp.sqrt((1.0 - alpha) * num_dims / jnp.maximum(rank, 1))
    guided = jnp.sqrt(alpha) * xi + scale * along
    return jnp.where(rank > 0, guided, xi), rank.astype(jnp.float32)
