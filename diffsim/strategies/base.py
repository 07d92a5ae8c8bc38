"""`AbstractStrategy`: what `train` needs from an optimiser of policies."""

import abc
from typing import Generic, TypeVar

import equinox as eqx
from brax.envs.base import Env
from jaxtyping import PRNGKeyArray

from .._types import Metrics

StrategyState = TypeVar("StrategyState")


class AbstractStrategy(eqx.Module, Generic[StrategyState]):
    """An optimiser of policies: hyperparameters as frozen fields, everything that changes
    in an explicit state.

    `train` only ever calls the methods below, and each call is pure and jittable:

    ```python
    state = strategy.init(env, policy, key=k0)
    for k in keys:                                  # a lax.scan inside train
        state, metrics = strategy.step(env, state, key=k)
    policy = strategy.policy(state)
    ```

    A new strategy is a final subclass: hyperparameters as typed fields (validated in
    `__check_init__`, raising `ValueError` that names the bad value), a state `eqx.Module`,
    and the five members below. It steps the env only through `diffsim.rollout`.
    """

    @abc.abstractmethod
    def init(self, env: Env, policy: eqx.Module, *, key: PRNGKeyArray) -> StrategyState:
        """Initial state: the policy (and any critic, optimiser state, env batch)."""

    @abc.abstractmethod
    def step(
        self, env: Env, state: StrategyState, *, key: PRNGKeyArray
    ) -> tuple[StrategyState, Metrics]:
        """One iteration: collect `steps_per_iteration` env steps and update once."""

    @abc.abstractmethod
    def policy(self, state: StrategyState) -> eqx.Module:
        """The policy to evaluate or deploy, a plain `eqx.Module` on one observation."""

    @property
    @abc.abstractmethod
    def steps_per_iteration(self) -> int:
        """Env steps one `step` counts: the steps whose data feed its update (the x-axis of
        every learning curve). A strategy whose count varies (ES: the steps inside each
        member's scored episode) returns the most one step can count here, and the real
        count of each step as `metrics["env_steps"]`."""

    @property
    def min_steps_per_iteration(self) -> int:
        """The fewest env steps one `step` can count (equal to `steps_per_iteration` unless
        the count varies)."""
        return self.steps_per_iteration

    @property
    @abc.abstractmethod
    def batch_size(self) -> int:
        """Envs (or population members) one `step` runs side by side: the axis the strategy
        marks with `diffsim.shard_batch` and `train` splits over devices."""

    def for_env(self, env: Env) -> "AbstractStrategy":
        """This strategy with settings left to the env filled in (e.g. ES's rollout length
        from the episode length). `train` calls it first. The default returns `self`."""
        del env
        return self

    def for_budget(self, total_steps: int) -> "AbstractStrategy":
        """This strategy with settings left to the run's env-step budget filled in (e.g.
        PPO's learning-rate decay length). `train` calls it. The default returns `self`."""
        del total_steps
        return self

    def check(self, env: Env, policy: eqx.Module) -> None:
        """Raise `ValueError` if this strategy cannot train `policy` on `env`.

        Called by `train` before compiling. The default accepts everything.
        """
        del env, policy
