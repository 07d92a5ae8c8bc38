"""Evolution strategies: any distribution-based evosax 0.3 algorithm over the rollout core."""

from collections.abc import Callable
from typing import Any, ClassVar, cast

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax
from evosax.algorithms.distribution_based.base import DistributionBasedAlgorithm
from jaxtyping import Array, Float, PRNGKeyArray

from .._types import Env, Metrics
from ..policies import trainable
from . import helpers
from ._population import algorithms as algorithms
from ._population.algorithms import ALGORITHMS as ALGORITHMS
from ._population.population import (
    AbstractPopulationStrategy,
    population_episodes as population_episodes,
    with_statistics,
)
from .helpers import all_finite, select


class ESState(eqx.Module):
    """State of `ES`.

    **Fields:**

    - `policy`: the distribution mean as a policy, with the current observation
      normaliser (what `ES.policy` returns; the mean is also held flat in `evosax.mean`).
    - `best`: the best population member seen so far, with the normaliser it was
      evaluated under (what `ES.best_policy` returns).
    - `best_return`: its mean return over the episodes of its generation (`-inf` before
      the first step). One generation's keys only, so optimistically biased.
    - `evosax`: the evosax algorithm's state (flat mean, std, optimiser state, ...).
    """

    policy: eqx.Module
    best: eqx.Module
    best_return: Float[Array, ""]
    evosax: Any


class ES(AbstractPopulationStrategy[ESState]):
    """Evolution strategies: an evosax search distribution over the policy's parameters.

    The trainable parameters `theta = eqx.partition(policy, diffsim.trainable(policy))[0]`
    (observation-normaliser statistics excluded) are flattened to `d` numbers. One
    `step` (one generation):

    1. `ask`: sample `P = population_size` members `theta_i = m + sigma * z_i` (antithetic
       pairs `z, -z` where the algorithm supports it); a pytree with leaves `[P, ...]`.
    2. Evaluate every member with the deterministic policy on the same
       `E = episodes_per_member` episodes (reset keys shared across members): one
       `jax.vmap` over `diffsim.rollout`, `P x E` envs for `T = rollout_length` steps.
       `F_i` = the mean over its episodes of the return up to the first episode end.
    3. `tell` evosax the fitness `-F` (evosax minimises), shaped by centred ranks
       `u_i = rank(-F_i) / (P - 1) - 1/2` in [-0.5, 0.5] (the best member gets -0.5). For
       Open-ES the update of the mean `m` (`d` numbers) is

           g = 1 / (P sigma) * sum_i u_i z_i,      m <- m - Adam(g),

       a descent step on a smoothed estimate of the gradient of `-F`. PGPE, SNES, ARS,
       Sep-CMA-ES and the rest use their own update on the same evaluation; their std
       adaptation, if any, is theirs. Full CMA-ES and xNES keep `d x d` matrices: use
       Sep_CMA_ES or SNES for networks.
    4. Update the observation normaliser (shared by all members) with every
       observation the population saw (unmasked: after an episode ends the env
       auto-resets, so later observations are valid states of fresh episodes).

    `steps_per_iteration = population_size * episodes_per_member * rollout_length`.
    `rollout_length` may be shorter than the env's episodes (cheaper generations;
    `diffsim.train` always evaluates full episodes) but not longer.

    **Arguments** (all keyword, all with defaults):

    - `algorithm`: an evosax distribution-based algorithm, by name (`"Open_ES"`,
      `"PGPE"`, `"SNES"`, `"ARS"`, `"Sep_CMA_ES"`, ... see `diffsim.strategies.es.ALGORITHMS`)
      or as the class.
    - `population_size`: `P`; even when sampling is antithetic.
    - `episodes_per_member`: `E`, episodes averaged into each member's fitness.
    - `rollout_length`: `T`, steps per evaluation episode (<= `env.episode_length`).
    - `std`: initial standard deviation of the search distribution (evosax's default of
      1.0 is far too large for network weights).
    - `learning_rate`: Adam's step size on the mean (float or optax schedule), for
      algorithms that take an optax optimiser; CMA-ES-like ones have their own update.
    - `weight_decay`: decoupled weight decay on the mean (AdamW); needs an algorithm that
      takes an optimiser.
    - `antithetic`: mirrored sampling, where the algorithm has the option (Open-ES).
      PGPE and ARS are always antithetic; SNES and CMA-ES never.
    - `fitness_shaping`: `"centered_rank"`, `"standardize"`, `"normalize"` or `"raw"`.
      Algorithms whose update is defined on their own rank-based recombination weights
      (SNES, xNES, Sep_CMA_ES, CMA_ES, ...) always use those, and accept only the
      default, rank-based `"centered_rank"`.

    **Example:**

    ```python
    env = diffsim.make_env("pendulum")                    # 200-step episodes
    policy = diffsim.DeterministicPolicy(env.observation_size, env.action_size, key=k1)
    es = diffsim.ES(population_size=32, rollout_length=200)
    run = diffsim.train(es, env, policy, key=k2, total_steps=2_000_000)
    run.policy                                            # the final mean, as a policy

    state = es.init(env, policy, key=k3)                  # or drive it by hand
    state, metrics = jax.jit(lambda s, k: es.step(env, s, key=k))(state, k4)
    es.policy(state), es.best_policy(state)
    ```
    """

    sweepable: ClassVar[tuple[str, ...]] = ("std", "learning_rate")
    algorithm: str | type = eqx.field(default="Open_ES", static=True)
    population_size: int = eqx.field(default=64, static=True)
    episodes_per_member: int = eqx.field(default=1, static=True)
    rollout_length: int | None = eqx.field(default=None, static=True)
    std: float = 0.05
    learning_rate: float | Callable[[Array], Array] = 0.03
    weight_decay: float = 0.0
    antithetic: bool = eqx.field(default=True, static=True)
    fitness_shaping: str = eqx.field(default="centered_rank", static=True)

    def __check_init__(self):
        self._check_population()
        helpers.learning_rate("learning_rate", self.learning_rate)
        helpers.in_range("weight_decay", self.weight_decay, 0.0, float("inf"))
        if not isinstance(self.antithetic, bool):
            raise ValueError(f"antithetic must be a bool, got {self.antithetic!r}")
        cls = algorithms.algorithm_class(self.algorithm)
        sig = algorithms.signature(cls)
        if self.fitness_shaping not in algorithms.SHAPING:
            raise ValueError(
                f"fitness_shaping must be one of {sorted(algorithms.SHAPING)}, got"
                f" {self.fitness_shaping!r}"
            )
        if algorithms.uses_rank_weights(cls) and self.fitness_shaping != "centered_rank":
            raise ValueError(
                f"{cls.__name__} ranks the population with its own recombination weights;"
                f" fitness_shaping={self.fitness_shaping!r} is not available for it"
            )
        if "optimizer" not in sig and self.weight_decay != 0:
            raise ValueError(
                f"weight_decay={self.weight_decay!r} needs an algorithm with an optax"
                f" optimizer; {cls.__name__} has its own mean update"
            )
        if self.antithetic and "use_antithetic_sampling" in sig and self.population_size % 2:
            raise ValueError(
                f"population_size={self.population_size} must be even with antithetic"
                f" sampling (pass antithetic=False or an even population)"
            )
        try:  # the algorithm's own checks (e.g. PGPE and ARS need an even population)
            self._evosax(np.zeros(2, np.float32))
        except AssertionError as error:
            raise ValueError(
                f"{cls.__name__} rejects population_size={self.population_size}: {error}"
            ) from None

    @property
    def steps_per_iteration(self) -> int:
        return self._population_steps

    @property
    def min_steps_per_iteration(self) -> int:
        return self.population_size * self.episodes_per_member

    def check(self, env: Env, policy: eqx.Module) -> None:
        self._check_rollout_length(env)

    def _optimizer(self) -> optax.GradientTransformation:
        if self.weight_decay:
            return optax.adamw(
                cast(optax.ScalarOrSchedule, self.learning_rate), weight_decay=self.weight_decay
            )
        return optax.adam(cast(optax.ScalarOrSchedule, self.learning_rate))

    def _evosax(self, params) -> DistributionBasedAlgorithm:
        """The evosax algorithm for parameters shaped like `params` (may be traced)."""
        cls = algorithms.algorithm_class(self.algorithm)
        kwargs = algorithms.settings(
            cls,
            optimizer=self._optimizer(),
            std=self.std,
            antithetic=self.antithetic,
            shaping=self.fitness_shaping,
        )
        return algorithms.build(cls, params, population_size=self.population_size, **kwargs)

    def _hyperparams(self, es: DistributionBasedAlgorithm):
        return algorithms.hyperparams(es, self.std)

    def init(self, env: Env, policy: eqx.Module, *, key: PRNGKeyArray) -> ESState:
        self.check(env, policy)
        params = eqx.filter(policy, trainable(policy))
        es = self._evosax(params)
        return ESState(
            policy=policy,
            best=policy,
            best_return=jnp.asarray(-jnp.inf, dtype=jnp.result_type(float)),
            evosax=algorithms.strong(es.init(key, params, self._hyperparams(es))),
        )

    def policy(self, state: ESState) -> eqx.Module:
        """The distribution mean with the current observation normaliser."""
        return state.policy

    def best_policy(self, state: ESState) -> eqx.Module:
        """The best member seen so far, with the normaliser it was evaluated under."""
        return state.best

    def evaluate_population(
        self, env: Env, state: ESState, population, *, key: PRNGKeyArray
    ) -> Float[Array, " P"]:
        """The returns `step` ranks: each member's mean over `episodes_per_member` episodes.

        `population`: trainable parameters with a leading `P` axis (as evosax's `ask`
        returns them), combined with the rest of `state.policy` (its normaliser). Every
        member sees the same episodes. With `rollout_length == env.episode_length`, entry
        `i` equals `diffsim.evaluate(env, member_i, key=key, num_episodes=E).mean()`.
        """
        return self._score(env, state.policy, population, key=key).returns

    def step(self, env: Env, state: ESState, *, key: PRNGKeyArray) -> tuple[ESState, Metrics]:
        ask_key, eval_key, tell_key = jr.split(key, 3)
        params, static = eqx.partition(state.policy, trainable(state.policy))
        es = self._evosax(params)
        hp = self._hyperparams(es)
        members, es_state = es.ask(ask_key, state.evosax, hp)  # leaves [P, ...]
        scores = self._score(env, state.policy, members, key=eval_key)
        # A member whose rollout went non-finite ranks with the worst finite one; if the
        # update itself is not finite (or no member was), the generation is skipped.
        told, _ = es.tell(tell_key, members, scores.fitness, es_state, hp)
        ok = ~jnp.all(scores.bad) & all_finite(es.get_mean(told))
        es_state = algorithms.strong(select(ok, told, state.evosax))
        best, best_return = _best(state, members, static, scores.returns)
        new_state = ESState(
            policy=with_statistics(eqx.combine(es.get_mean(es_state), static), scores.episodes),
            best=best,
            best_return=best_return,
            evosax=es_state,
        )
        metrics = {
            "env_steps": jnp.sum(scores.episodes.steps).astype(jnp.float32),
            **scores.metrics(),
            "skipped_updates": (~ok).astype(jnp.float32),
            "mean_norm": jnp.linalg.norm(es_state.mean),
        }
        if hasattr(es_state, "std"):  # a scalar or one per parameter (before CMA's scaling)
            metrics["std"] = jnp.mean(es_state.std)
        return new_state, metrics


def _best(state: ESState, members, static, returns: Float[Array, " P"]):
    """The best member seen so far (with the normaliser its return was measured under) and
    its return."""
    i = jnp.argmax(jnp.where(jnp.isnan(returns), -jnp.inf, returns))
    better = returns[i] > state.best_return
    member = eqx.combine(jax.tree.map(lambda x: x[i], members), static)
    arrays, rest = eqx.partition(state.best, eqx.is_array)
    new_arrays = eqx.filter(member, eqx.is_array)
    best = eqx.combine(
        jax.tree.map(lambda new, old: jnp.where(better, new, old), new_arrays, arrays), rest
    )
    return best, jnp.where(better, returns[i], state.best_return)
