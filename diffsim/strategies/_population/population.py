"""A population of policies around a mean: the machinery `ES` and `GuidedES` share.

Every member scored on the same episodes (`population_episodes`, `score`), the mean's
observation normaliser updated from them (`with_statistics`), and the env-step count of a
generation. The evosax side (which algorithms, built how) is in `_algorithms.py`.
"""

import dataclasses

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
from equinox import AbstractVar
from jaxtyping import Array, Bool, Float, PRNGKeyArray

from ..._types import Env
from ...policies import trainable, update_normalizers
from ...rollout import Episodes, first_episodes, reset
from ...sharding import shard_batch
from .. import helpers
from ..base import AbstractStrategy, StrategyState
from ..helpers import all_finite, select


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


class Scores(eqx.Module):
    """A population's scored episodes and what is ranked: `returns`, each member's mean
    return (`Float[Array, "P"]`); `fitness`, `-returns` (evosax minimises) where a
    non-finite return ranks with the worst finite one; `bad`, the non-finite members."""

    episodes: Episodes
    returns: Float[Array, " P"]
    fitness: Float[Array, " P"]
    bad: Bool[Array, " P"]

    def metrics(self) -> dict[str, Float[Array, ""]]:
        """The population's returns (mean, best, worst), its non-finite members, and the env
        steps simulated to score it (`simulated_steps`: every member's envs step until the
        last episode of the population ends, so it can exceed the counted `env_steps`)."""
        return {
            "train_return": jnp.mean(self.returns),
            "max_return": jnp.max(self.returns),
            "min_return": jnp.min(self.returns),
            "nonfinite_members": jnp.sum(self.bad).astype(jnp.float32),
            "diverged": jnp.sum(self.episodes.diverged).astype(jnp.float32),
            "simulated_steps": (self.episodes.steps.size * jnp.max(self.episodes.length)).astype(
                jnp.float32
            ),
        }


def score(
    env: Env, policy: eqx.Module, population, *, key: PRNGKeyArray, num_episodes: int, max_length
) -> Scores:
    """`population_episodes`, each member's mean return and its fitness."""
    episodes = population_episodes(
        env, policy, population, key=key, num_episodes=num_episodes, max_length=max_length
    )
    returns = jnp.mean(episodes.returns, axis=-1)
    bad = ~jnp.isfinite(returns)
    worst = jnp.min(jnp.where(bad, jnp.inf, returns))
    return Scores(episodes, returns, -jnp.where(bad, worst, returns), bad)


def with_statistics(mean: eqx.Module, episodes: Episodes) -> eqx.Module:
    """The mean policy with its observation normaliser updated from the observations inside
    the scored episodes only, as the fitness saw them, unless that makes it non-finite (a
    diverged simulation must not poison the statistics every member shares)."""
    normalized = update_normalizers(mean, episodes.obs)
    return select(all_finite(normalized), normalized, mean)


class AbstractPopulationStrategy(AbstractStrategy[StrategyState]):
    """A strategy that scores `population_size` members around a mean (`ES`, `GuidedES`),
    each on the same `episodes_per_member` episodes of at most `rollout_length` steps
    (None: the env's episode length, set by `for_env`), searching with `std`.

    Its fields are declared by the final class, whose `__check_init__` calls
    `_check_population` first; from them this base fills in the rollout length
    (`for_env`), leaves `for_budget` to the identity, gives `batch_size =
    population_size`, counts the population's steps (`_population_steps`), checks the
    rollout length against the env (`_check_rollout_length`) and scores members
    (`_score`). A final class adds its fields, `sweepable`, `check`,
    `steps_per_iteration`, `min_steps_per_iteration`, `init`, `step` and `policy`
    (`docs/guides/extending.md`).
    """

    population_size: AbstractVar[int]
    episodes_per_member: AbstractVar[int]
    rollout_length: AbstractVar[int | None]
    std: AbstractVar[float]

    def _check_population(self) -> None:
        """Raise `ValueError` naming a bad size or `std`."""
        helpers.positive_int("population_size", self.population_size)
        helpers.positive_int("episodes_per_member", self.episodes_per_member)
        if self.rollout_length is not None:
            helpers.positive_int("rollout_length", self.rollout_length)
        helpers.positive("std", self.std)

    def for_env(self, env: Env):
        """This strategy with `rollout_length` set to the env's episode length if None."""
        if self.rollout_length is not None:
            return self
        return dataclasses.replace(self, rollout_length=env.episode_length)

    def for_budget(self, total_steps: int):
        """`self`: a population's settings do not depend on the budget."""
        del total_steps
        return self

    @property
    def batch_size(self) -> int:
        return self.population_size

    @property
    def _population_steps(self) -> int:
        """The most env steps a generation's population can count: `P x E x T`."""
        if self.rollout_length is None:
            raise ValueError(
                f"{type(self).__name__}(rollout_length=None) takes its length from the env:"
                " call strategy.for_env(env) first (train does)"
            )
        return self.population_size * self.episodes_per_member * self.rollout_length

    def _check_rollout_length(self, env: Env) -> None:
        length = env.episode_length
        if self.rollout_length is not None and self.rollout_length > length:
            raise ValueError(
                f"rollout_length={self.rollout_length} exceeds the episode_length {length} of"
                f" env {getattr(env, 'name', '')!r}; pass"
                f" {type(self).__name__}(rollout_length={length}) or less, or None for the env's"
            )

    def _rollout_length(self, env: Env) -> int:
        return env.episode_length if self.rollout_length is None else self.rollout_length

    def _score(self, env: Env, policy: eqx.Module, members, *, key: PRNGKeyArray) -> Scores:
        """`score` of `members` (leaves `[P, ...]`) combined with the rest of `policy`."""
        return score(
            env,
            policy,
            members,
            key=key,
            num_episodes=self.episodes_per_member,
            max_length=self._rollout_length(env),
        )
