"""Evolution strategies: any distribution-based evosax 0.3 algorithm over the rollout core."""

import dataclasses
import inspect
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax
from brax.envs.base import Env
from evosax.algorithms import distribution_based_algorithms
from evosax.algorithms.distribution_based.base import DistributionBasedAlgorithm
from evosax.core import fitness_shaping as shaping
from jaxtyping import Array, Float, PRNGKeyArray

from .._types import Metrics
from ..policies import trainable, update_normalizers
from ..rollout import Episodes, first_episodes, reset
from ..sharding import shard_batch
from . import helpers
from .base import AbstractStrategy
from .helpers import all_finite, select

# Algorithms whose ask/tell does not fit "sample a population around one mean, rank it":
# several means (SV_*), a surrogate gradient to supply (GuidedES), or unrolled partial
# evaluations (NoiseReuseES, PersistentES), or required arguments beyond the population
# size and the solution (RandomSearch's sampling_fn).
_UNSUPPORTED = {"GuidedES", "NoiseReuseES", "PersistentES", "SV_CMA_ES", "SV_Open_ES"}


def _required_arguments(cls: type) -> list[str]:
    params = list(inspect.signature(cls.__init__).parameters.values())[1:]
    return [
        p.name
        for p in params
        if p.default is inspect.Parameter.empty
        and p.name not in ("population_size", "solution")
        and p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    ]


ALGORITHMS: dict[str, type] = {
    name: cls
    for name, cls in distribution_based_algorithms.items()
    if name not in _UNSUPPORTED and not _required_arguments(cls)
}
"""The evosax algorithms `ES` accepts by name (also accepted: the classes themselves)."""

_SHAPING = {
    "centered_rank": shaping.centered_rank_fitness_shaping_fn,
    "standardize": shaping.standardize_fitness_shaping_fn,
    "normalize": shaping.normalize_fitness_shaping_fn,
    "raw": shaping.identity_fitness_shaping_fn,
}


def _slim_metrics(key, population, fitness, state, params) -> dict:
    """Replaces evosax's default metrics (three parameter-sized vectors per generation)."""
    del key, population, fitness, state, params
    return {}


def _strong(tree):
    """Drop weak types (evosax mixes Python scalars into its state), so the state's types
    are the same after `init` and after every `step` and `step` compiles once."""
    return jax.tree.map(lambda x: jnp.asarray(x, dtype=jnp.result_type(x)), tree)


def _signature(cls: type) -> dict[str, inspect.Parameter]:
    return dict(inspect.signature(cls.__init__).parameters)


def _uses_rank_weights(cls: type) -> bool:
    """True for algorithms (SNES, xNES, CMA-ES family...) whose update is defined on their
    own rank-based recombination weights rather than on an arbitrary shaped fitness."""
    default = _signature(cls).get("fitness_shaping_fn")
    return default is not None and default.default is shaping.weights_fitness_shaping_fn


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


class ES(AbstractStrategy[ESState]):
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
        for name in ("population_size", "episodes_per_member"):
            helpers.positive_int(name, getattr(self, name))
        if self.rollout_length is not None:
            helpers.positive_int("rollout_length", self.rollout_length)
        helpers.positive("std", self.std)
        helpers.learning_rate("learning_rate", self.learning_rate)
        helpers.in_range("weight_decay", self.weight_decay, 0.0, float("inf"))
        if not isinstance(self.antithetic, bool):
            raise ValueError(f"antithetic must be a bool, got {self.antithetic!r}")
        cls = self._algorithm_class()
        sig = _signature(cls)
        if self.fitness_shaping not in _SHAPING:
            raise ValueError(
                f"fitness_shaping must be one of {sorted(_SHAPING)}, got {self.fitness_shaping!r}"
            )
        if _uses_rank_weights(cls) and self.fitness_shaping != "centered_rank":
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

    def _algorithm_class(self) -> type:
        algorithm = self.algorithm
        if isinstance(algorithm, str):
            if algorithm not in ALGORITHMS:
                raise ValueError(
                    f"algorithm {algorithm!r} is not a supported evosax distribution-based"
                    f" algorithm; valid names: {', '.join(sorted(ALGORITHMS))}"
                )
            return ALGORITHMS[algorithm]
        if not (isinstance(algorithm, type) and issubclass(algorithm, DistributionBasedAlgorithm)):
            raise ValueError(
                f"algorithm must be a name or an evosax distribution-based algorithm class,"
                f" got {algorithm!r}; valid names: {', '.join(sorted(ALGORITHMS))}"
            )
        if algorithm.__name__ in _UNSUPPORTED or _required_arguments(algorithm):
            raise ValueError(
                f"algorithm {algorithm.__name__} does not fit ES's ask/evaluate/tell loop;"
                f" valid names: {', '.join(sorted(ALGORITHMS))}"
            )
        return algorithm

    def for_env(self, env: Env) -> "ES":
        """This ES with `rollout_length` set to the env's episode length if it was None."""
        return with_episode_length(self, env)

    @property
    def steps_per_iteration(self) -> int:
        return population_steps(self)

    @property
    def min_steps_per_iteration(self) -> int:
        return self.population_size * self.episodes_per_member

    @property
    def batch_size(self) -> int:
        return self.population_size

    def check(self, env: Env, policy: eqx.Module) -> None:
        if self.rollout_length is not None and self.rollout_length > env.episode_length:
            raise ValueError(
                f"rollout_length={self.rollout_length} exceeds the episode_length"
                f" {env.episode_length} of env {getattr(env, 'name', '')!r}; pass"
                f" ES(rollout_length={env.episode_length}) or less, or None for the env's"
            )

    def _optimizer(self) -> optax.GradientTransformation:
        if self.weight_decay:
            return optax.adamw(self.learning_rate, weight_decay=self.weight_decay)
        return optax.adam(self.learning_rate)

    def _evosax(self, params) -> DistributionBasedAlgorithm:
        """The evosax algorithm for parameters shaped like `params` (may be traced)."""
        cls = self._algorithm_class()
        sig = _signature(cls)
        kwargs: dict[str, Any] = {"metrics_fn": _slim_metrics}
        if "optimizer" in sig:
            kwargs["optimizer"] = self._optimizer()
        if "std_schedule" in sig:
            kwargs["std_schedule"] = optax.constant_schedule(self.std)
        if "use_antithetic_sampling" in sig:
            kwargs["use_antithetic_sampling"] = self.antithetic
        if "fitness_shaping_fn" in sig and not _uses_rank_weights(cls):
            kwargs["fitness_shaping_fn"] = _SHAPING[self.fitness_shaping]
        # Only shapes matter: build from concrete zeros, evaluated eagerly even under jit.
        solution = jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), params)
        with jax.ensure_compile_time_eval():
            return cls(population_size=self.population_size, solution=solution, **kwargs)

    def _hyperparams(self, es: DistributionBasedAlgorithm):
        with jax.ensure_compile_time_eval():
            hp = es.default_params
        if hasattr(hp, "std_init"):
            hp = hp.replace(std_init=jnp.asarray(self.std, jnp.result_type(float)))
        return hp

    def init(self, env: Env, policy: eqx.Module, *, key: PRNGKeyArray) -> ESState:
        self.check(env, policy)
        params = eqx.filter(policy, trainable(policy))
        es = self._evosax(params)
        return ESState(
            policy=policy,
            best=policy,
            best_return=jnp.asarray(-jnp.inf, dtype=jnp.result_type(float)),
            evosax=_strong(es.init(key, params, self._hyperparams(es))),
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
        return jnp.mean(self.for_env(env)._episodes(env, state, population, key).returns, -1)

    def _episodes(self, env: Env, state: ESState, population, key: PRNGKeyArray) -> Episodes:
        return population_episodes(
            env,
            state.policy,
            population,
            key=key,
            num_episodes=self.episodes_per_member,
            max_length=self.rollout_length,
        )

    def step(self, env: Env, state: ESState, *, key: PRNGKeyArray) -> tuple[ESState, Metrics]:
        ask_key, eval_key, tell_key = jr.split(key, 3)
        params, static = eqx.partition(state.policy, trainable(state.policy))
        es = self._evosax(params)
        hp = self._hyperparams(es)
        population, es_state = es.ask(ask_key, state.evosax, hp)  # leaves [P, ...]
        episodes = self._episodes(env, state, population, eval_key)
        returns = jnp.mean(episodes.returns, axis=-1)
        # A member whose rollout went non-finite ranks with the worst finite one; if the
        # update itself is not finite (or no member was), the generation is skipped.
        bad = ~jnp.isfinite(returns)
        worst = jnp.min(jnp.where(bad, jnp.inf, returns))
        fitness = -jnp.where(bad, worst, returns)
        told, _ = es.tell(tell_key, population, fitness, es_state, hp)
        ok = ~jnp.all(bad) & all_finite(es.get_mean(told))
        es_state = _strong(select(ok, told, state.evosax))

        # The best member, kept with the normaliser its return was measured under.
        i = jnp.argmax(jnp.where(jnp.isnan(returns), -jnp.inf, returns))
        better = returns[i] > state.best_return
        member = eqx.combine(jax.tree.map(lambda x: x[i], population), static)
        arrays, rest = eqx.partition(state.best, eqx.is_array)
        new_arrays = eqx.filter(member, eqx.is_array)
        best = eqx.combine(
            jax.tree.map(lambda new, old: jnp.where(better, new, old), new_arrays, arrays), rest
        )

        mean = eqx.combine(es.get_mean(es_state), static)
        # Observations inside the scored episodes only, as the fitness saw them; a diverged
        # simulation must not poison the statistics every member shares.
        normalized = update_normalizers(mean, episodes.obs)
        normalized = select(all_finite(normalized), normalized, mean)
        new_state = ESState(
            policy=normalized,
            best=best,
            best_return=jnp.where(better, returns[i], state.best_return),
            evosax=es_state,
        )
        metrics = {
            "env_steps": jnp.sum(episodes.steps).astype(jnp.float32),
            "train_return": jnp.mean(returns),
            "max_return": jnp.max(returns),
            "min_return": jnp.min(returns),
            "nonfinite_members": jnp.sum(bad).astype(jnp.float32),
            "diverged": jnp.sum(episodes.diverged).astype(jnp.float32),
            "skipped_updates": (~ok).astype(jnp.float32),
            "mean_norm": jnp.linalg.norm(es_state.mean),
        }
        if hasattr(es_state, "std"):  # a scalar or one per parameter (before CMA's scaling)
            metrics["std"] = jnp.mean(es_state.std)
        return new_state, metrics


def with_episode_length(strategy, env: Env):
    """`strategy` (ES or GuidedES) with `rollout_length` set to the env's episode length if
    it is None."""
    if strategy.rollout_length is not None:
        return strategy
    return dataclasses.replace(strategy, rollout_length=env.episode_length)


def population_steps(strategy) -> int:
    """The most env steps a generation's population can count: `P x E x rollout_length`."""
    if strategy.rollout_length is None:
        raise ValueError(
            f"{type(strategy).__name__}(rollout_length=None) takes its length from the env:"
            " call strategy.for_env(env) first (train does)"
        )
    return strategy.population_size * strategy.episodes_per_member * strategy.rollout_length


def population_episodes(
    env: Env, policy: eqx.Module, population, *, key: PRNGKeyArray, num_episodes: int, max_length
) -> Episodes:
    """Every member of `population` plays the same `num_episodes` episodes to their end.

    `population`: trainable parameters with a leading `P` axis, combined with the rest of
    `policy` (its normaliser). One `jax.vmap` over members of `diffsim.rollout`'s
    `first_episodes` (deterministic acting, at most `max_length` steps, stopping once
    every member's episodes have ended), with the members split over devices.

    **Returns:** `Episodes` with `returns` and `steps` of shape `[P, num_episodes]` and
    the observation statistics of each member (`[P]`-batched `RunningNorm`).

    **Example:**

    ```python
    pop = jax.tree.map(lambda x: x[None].repeat(8, 0), eqx.filter(policy, trainable(policy)))
    ep = population_episodes(env, policy, pop, key=key, num_episodes=2, max_length=100)
    ep.returns.shape   # (8, 2)
    ```
    """
    _, static = eqx.partition(policy, trainable(policy))
    # Every member starts from the same env states (`evaluate`'s key convention).
    reset_key, act_key = jr.split(key)
    env_state = reset(env, key=reset_key, num_envs=num_episodes)

    def member(params) -> Episodes:
        return first_episodes(
            env, eqx.combine(params, static), env_state, key=act_key, max_length=max_length
        )

    return jax.vmap(member)(shard_batch(population))
