"""A population strategy on `diffsim.AbstractPopulationStrategy`: the cross-entropy method
with a fixed search std. Only public names; `docs/guides/extending.md` shows it and
`tests/test_extending.py` trains it."""

from typing import ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
from jax.flatten_util import ravel_pytree

import diffsim
from diffsim.strategies import helpers


class EliteMeanState(eqx.Module):
    policy: eqx.Module  # the search mean, as a policy


class EliteMean(diffsim.AbstractPopulationStrategy[EliteMeanState]):
    """Sample `P = population_size` members `theta + std * e_i`, `e_i ~ N(0, I)`, score each
    on the same `episodes_per_member` episodes, and move the mean to the average of the
    `num_elites` best: `theta <- theta + std * mean_{i in elites} e_i`."""

    sweepable: ClassVar[tuple[str, ...]] = ("std",)
    population_size: int = eqx.field(default=32, static=True)
    episodes_per_member: int = eqx.field(default=1, static=True)
    rollout_length: int | None = eqx.field(default=None, static=True)  # None: the env's
    std: float = 0.05
    num_elites: int = eqx.field(default=8, static=True)

    def __check_init__(self):
        self._check_population()  # population_size, episodes_per_member, rollout_length, std
        helpers.positive_int("num_elites", self.num_elites)
        if self.num_elites > self.population_size:
            raise ValueError(f"num_elites={self.num_elites} exceeds population_size")

    @property
    def steps_per_iteration(self) -> int:
        return self._population_steps  # P x E x rollout_length, the most a step counts

    @property
    def min_steps_per_iteration(self) -> int:
        return self.population_size * self.episodes_per_member  # every episode ends at once

    def check(self, env, policy) -> None:
        self._check_rollout_length(env)

    def init(self, env, policy, *, key) -> EliteMeanState:
        return EliteMeanState(policy)

    def policy(self, state: EliteMeanState) -> eqx.Module:
        return state.policy

    def step(self, env, state: EliteMeanState, *, key):
        noise_key, score_key = jr.split(key)
        params, static = eqx.partition(state.policy, diffsim.trainable(state.policy))
        flat, unravel = ravel_pytree(params)
        noise = jr.normal(noise_key, (self.population_size, flat.size), flat.dtype)
        members = jax.vmap(unravel)(flat + self.std * noise)  # leaves [P, ...]
        scores = self._score(env, state.policy, members, key=score_key)
        elites = jnp.argsort(scores.fitness)[: self.num_elites]  # fitness: -return, NaN-safe
        ok = ~jnp.all(scores.bad)
        mean = jnp.where(ok, flat + self.std * jnp.mean(noise[elites], axis=0), flat)
        metrics = {
            "env_steps": jnp.sum(scores.episodes.steps).astype(jnp.float32),
            **scores.metrics(),
            "skipped_updates": (~ok).astype(jnp.float32),
        }
        return EliteMeanState(eqx.combine(unravel(mean), static)), metrics
