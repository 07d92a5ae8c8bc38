"""GuidedES's two ways of using the analytic gradient in an ES generation: `Blend` combines
it with ES's estimate by inverse variance, `Subspace` stretches the search along it."""

import abc
from typing import Any, ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
import optax
from equinox import AbstractClassVar
from jax.flatten_util import ravel_pytree
from jaxtyping import Array, Bool, Float, PRNGKeyArray

from .. import helpers
from ..helpers import all_finite, select
from .estimates import blend, cosine, guided_directions
from .population import Scores


class Analytic(eqx.Module):
    """The window's analytic gradient of `-F` at the mean, flattened (`d` numbers) and on
    the scale of a `T`-step return: `mean` (`g_an`), `per_env` (`Float[Array, "B d"]`),
    the envs `kept` in the mean, and whether it is `usable` (finite and nonzero)."""

    mean: Float[Array, " d"]
    per_env: Float[Array, "B d"]
    kept: Bool[Array, " B"]
    usable: Bool[Array, ""]


class Asked(eqx.Module):
    """A generation's `population` (leaves `[P, ...]`) with the evosax state it was drawn
    from, the `subspace` after it (None in `Blend`) and the `rank` of that subspace."""

    population: Any
    es_state: Any
    subspace: Float[Array, "k d"] | None
    rank: Float[Array, ""]


class Told(eqx.Module):
    """The updated evosax state, whether the update is usable (`ok`), and the metrics of the
    two gradient estimates."""

    es_state: Any
    ok: Bool[Array, ""]
    metrics: dict[str, Float[Array, ""]]


def _es_estimate(es, es_state, hp, population, fitness: Float[Array, " P"]):
    """Each member's search direction `e_i = (theta_i - m) / sigma` (`[P, d]`) and its
    shaped fitness."""
    flat = jax.vmap(lambda tree: ravel_pytree(tree)[0])(population)
    noise = (flat - es_state.mean) / es_state.std
    return noise, es.fitness_shaping_fn(None, fitness, es_state, hp)


class AbstractGuideMode(eqx.Module):
    """How a GuidedES generation draws its population around the mean and updates the mean,
    given the analytic gradient. `fitness_shaping` names evosax's shaping of `-F`."""

    fitness_shaping: AbstractClassVar[str]

    @abc.abstractmethod
    def check(self, *, population_size: int, num_envs: int) -> None:
        """Raise `ValueError` if this mode cannot work with these sizes."""

    def check_params(self, num_params: int, policy: str) -> None:
        """Raise `ValueError` if this mode cannot search `num_params` parameters."""
        del num_params, policy

    def init(self, num_params: int, dtype) -> Float[Array, "k d"] | None:
        """The mode's state before the first generation (the search subspace, or None)."""
        del num_params, dtype

    @abc.abstractmethod
    def ask(
        self, key: PRNGKeyArray, es, es_state, hp, *, subspace, analytic: Analytic, unravel
    ) -> Asked:
        """The generation's population around the mean."""

    @abc.abstractmethod
    def tell(
        self, key: PRNGKeyArray, es, hp, *, asked: Asked, scores: Scores, analytic: Analytic
    ) -> Told:
        """The update of the mean from the population's fitness and the analytic gradient."""


class Blend(AbstractGuideMode):
    """Open-ES's population (`e_j ~ N(0, I)`) and an update on the inverse-variance blend of
    two gradient estimates of `f = -F` (raw fitness, so both estimate the same gradient):

        g_j = (f_j^+ - f_j^-) e_j / (2 sigma)   (one per antithetic pair),
        g = w_es mean_j g_j + w_an g_an,        w_an = v_es / (v_es + v_an),

    `v` the variance of each mean, from the spread of its rows (the analytic one's: one row
    per env of the window; see `diffsim.strategies.guided_es.blend`). A zero, non-finite or
    noisy analytic gradient gets little or no weight, and then the update is Open-ES's on
    raw fitness. Needs `population_size >= 4` and a window of `num_envs >= 2`. Logged:
    `es_weight`, `analytic_weight`, `es_grad_norm`, `analytic_grad_norm`, `grad_cosine`,
    `es_variance`, `analytic_variance`.

    **Example:** `diffsim.GuidedES(mode=Blend())`.
    """

    fitness_shaping: ClassVar[str] = "raw"

    def check(self, *, population_size: int, num_envs: int) -> None:
        if population_size < 4 or num_envs < 2:
            raise ValueError(
                f"Blend() measures each source's variance, which needs population_size >= 4"
                f" and a window of num_envs >= 2; got population_size={population_size},"
                f" num_envs={num_envs}"
            )

    def ask(self, key, es, es_state, hp, *, subspace, analytic, unravel) -> Asked:
        del analytic, unravel
        population, es_state = es.ask(key, es_state, hp)  # leaves [P, ...]
        return Asked(population, es_state, subspace, jnp.zeros(()))

    def tell(self, key, es, hp, *, asked, scores, analytic) -> Told:
        del key
        es_state, half = asked.es_state, es.population_size // 2
        noise, shaped = _es_estimate(es, es_state, hp, asked.population, scores.fitness)
        es_pairs = (shaped[:half] - shaped[half:])[:, None] * noise[:half] / (2 * es_state.std)
        mix = blend(es_pairs, analytic.per_env, analytic.kept)
        updates, opt_state = es.optimizer.update(mix.gradient, es_state.opt_state, es_state.mean)
        told = es_state.replace(
            mean=optax.apply_updates(es_state.mean, updates),
            opt_state=opt_state,
            generation_counter=es_state.generation_counter + 1,
        )
        metrics = {
            "es_weight": mix.es_weight,
            "analytic_weight": mix.analytic_weight,
            "es_grad_norm": mix.es_norm,
            "analytic_grad_norm": mix.analytic_norm,
            "grad_cosine": mix.cosine,
            "es_variance": mix.es_variance,
            "analytic_variance": mix.analytic_variance,
        }
        return Told(told, mix.ok & all_finite(told.mean), metrics)


class Subspace(AbstractGuideMode):
    """Guided ES (Maheswaranathan et al. 2019): the analytic gradient joins the `dims` most
    recent ones, and the population `theta +- sigma e_j` is drawn from

        e ~ N(0, Sigma),   Sigma = alpha I_d + (1 - alpha) d / k U U^T

    (`U` an orthonormal basis of the `k` gradients; see `guided_es.guided_directions`),
    then updated as Open-ES does, on centred ranks `u_i` of `-F`: `g = 1/(P sigma) sum_i
    u_i e_i`, Guided ES's estimate of `Sigma grad`, a descent direction biased toward `U`.

    **Fields:** `dims` (`k`, at most `population_size / 2` and the parameter count);
    `alpha`, the isotropic share of the search variance. Along the subspace the std is
    `std * sqrt(alpha + (1 - alpha) d / k)`, so an `alpha` far from 1 stretches the
    search far outside the region where the antithetic differences are linear for
    policies of thousands of parameters. Logged: `es_weight` and `analytic_weight` (the
    shares `alpha`, `1 - alpha` of the search variance; `1, 0` without gradients),
    `es_grad_norm` (on the rank scale), `analytic_grad_norm`, `grad_cosine`.

    **Example:** `diffsim.GuidedES(mode=Subspace(dims=2, alpha=0.99))`.
    """

    fitness_shaping: ClassVar[str] = "centered_rank"
    dims: int = eqx.field(default=1, static=True)
    alpha: float = 0.999

    def __check_init__(self):
        helpers.positive_int("dims", self.dims)
        helpers.in_range("alpha", self.alpha, 0.0, 1.0)

    def check(self, *, population_size: int, num_envs: int) -> None:
        if self.dims > population_size // 2:
            raise ValueError(
                f"Subspace(dims={self.dims}) exceeds the {population_size // 2} antithetic"
                f" pairs of population_size={population_size}"
            )

    def check_params(self, num_params: int, policy: str) -> None:
        if self.dims > num_params:
            raise ValueError(
                f"Subspace(dims={self.dims}) exceeds the {num_params} trainable parameters of"
                f" {policy}"
            )

    def init(self, num_params: int, dtype) -> Float[Array, "k d"]:
        return jnp.zeros((self.dims, num_params), dtype)

    def ask(self, key, es, es_state, hp, *, subspace, analytic, unravel) -> Asked:
        pushed = jnp.roll(subspace, -1, axis=0).at[-1].set(analytic.mean.astype(subspace.dtype))
        subspace = select(analytic.usable, pushed, subspace)
        directions, rank = guided_directions(
            key, subspace, num_pairs=es.population_size // 2, alpha=self.alpha
        )
        flat = es_state.mean + es_state.std * jnp.concatenate([directions, -directions])
        return Asked(jax.vmap(unravel)(flat), es_state, subspace, rank)

    def tell(self, key, es, hp, *, asked, scores, analytic) -> Told:
        es_state = asked.es_state
        told, _ = es.tell(key, asked.population, scores.fitness, es_state, hp)
        noise, shaped = _es_estimate(es, es_state, hp, asked.population, scores.fitness)
        g_es = jnp.dot(shaped, noise) / (es.population_size * es_state.std)
        es_weight = jnp.where(asked.rank > 0, self.alpha, 1.0)
        metrics = {
            "es_weight": es_weight,
            "analytic_weight": 1.0 - es_weight,
            "es_grad_norm": jnp.linalg.norm(g_es),
            "analytic_grad_norm": jnp.where(analytic.usable, jnp.linalg.norm(analytic.mean), 0.0),
            "grad_cosine": jnp.where(analytic.usable, cosine(g_es, analytic.mean), 0.0),
        }
        return Told(told, ~jnp.all(scores.bad) & all_finite(told.mean), metrics)
