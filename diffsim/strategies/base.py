"""`AbstractStrategy`: what `train` needs from an optimiser of policies, and what it owes."""

import abc
from typing import Generic, TypeVar

import equinox as eqx
from jaxtyping import PRNGKeyArray

from .._types import Env, Metrics

StrategyState = TypeVar("StrategyState")
Bound = TypeVar("Bound", bound="AbstractStrategy")


class AbstractStrategy(eqx.Module, Generic[StrategyState]):
    """An optimiser of policies: hyperparameters as frozen fields, everything that changes
    in an explicit state.

    A new strategy is a final subclass: hyperparameters as typed fields (validated in
    `__check_init__`, raising `ValueError` that names the bad value; the validators of
    `diffsim.strategies.helpers` do this), a state `eqx.Module`, the class variable
    `sweepable` and every member below. Every member is abstract here, and a strategy
    implements each one, trivially where it has nothing to do (`for_env` returning `self`,
    `check` accepting everything): no method of this class is ever overridden, and reading
    one strategy file shows all it does. `bind` is the one concrete (final) method. It
    steps the env only through `diffsim.rollout` / `diffsim.reset`. The file to copy is
    the reference strategy `diffsim/strategies/reinforce.py`; the shared tools (guarded
    optimiser step, finite checks, schedules, GAE and discounted returns, episode
    statistics) are public in `diffsim.strategies.helpers`. A first-order strategy can
    start from `diffsim.AbstractWindowStrategy`, a population one from
    `diffsim.AbstractPopulationStrategy` (`docs/guides/extending.md`).

    **Call order.** `train` calls, in this order:

    1. `check(env, policy)` on an *abstract* policy (from `jax.eval_shape`: leaves are
       `jax.ShapeDtypeStruct`s, so read shapes and types, never values);
    2. `for_env(env)`, then reads `steps_per_iteration` and `min_steps_per_iteration`
       (the budget plan), then `for_budget(total_steps)`, then reads `batch_size`;
    3. under `jax.jit` (and `jax.vmap` over seeds), on the strategy that `for_budget`
       returned:

    ```python
    state = strategy.init(env, policy, key=k0)
    while count_is_short_of_the_target:             # a lax.while_loop inside train
        state, metrics = strategy.step(env, state, key=k)
    policy = strategy.policy(state)                 # evaluated, and returned in the Run
    ```

    In a loop of your own, `strategy.bind(env, total_steps=...)` does step 2 in one call
    (`docs/guides/own-loop.md`).

    **What `train` checks** (each with an error naming the strategy and the value): the
    strategy is hashable; the step counts and `batch_size` are positive ints; `step`
    returns a state with the same pytree structure, shapes and dtypes as `init`'s and
    metrics that are a dict of scalars; every `metrics["env_steps"]` lies within the
    step-count bounds.

    **Obligations** that are not checked, or only in part:

    - *Hashable, with no array fields.* Compiled programs are cached by strategy, so a
      field holding a jax or numpy array makes the strategy unhashable and would recompile
      on every call (`train` refuses it). Store Python floats, ints or tuples, and build
      arrays inside `init` or `step`.
    - *Sweepable floats.* `sweepable` (a `ClassVar`, so it is no hyperparameter itself)
      names the float fields `train_sweep` and a study's tuning search may vary, e.g.
      `sweepable: ClassVar[tuple[str, ...]] = ("learning_rate", "discount")`; any other
      name is refused before compiling, with the list. `train_sweep` replaces those fields
      with traced scalars after `for_budget`, so a sweepable field must not drive Python
      control flow (`if self.x > 0:`) or shapes: use `jnp.where`/`lax.cond` on it, or
      leave it out of `sweepable` (fields that set shapes or control flow are ints, bools
      or strings, and never sweepable). `()` sweeps nothing.
    - *Only the trainable leaves are optimised*: update
      `eqx.filter(policy, diffsim.trainable(policy))` and nothing else. A policy's
      `RunningNorm` statistics are float arrays too; they change only through
      `diffsim.update_normalizers`.
    - *Sharding.* Call `diffsim.shard_batch` on the axis `batch_size` names (the env batch,
      or the population) right where it is created or received: on the env state that
      `diffsim.reset` returns in `init`, on a population before it is `vmap`ped. It is a
      no-op on one device; with several, `train` splits that axis over them.
    """

    sweepable: eqx.AbstractClassVar[tuple[str, ...]]
    """The float fields `train_sweep` may vary (traced), in any order; `()` for none."""

    @abc.abstractmethod
    def init(self, env: Env, policy: eqx.Module, *, key: PRNGKeyArray) -> StrategyState:
        """The initial state: the policy, and everything that changes (critic, optimiser
        state, env batch, counters).

        Runs under `jax.jit`. The state is the carry of a loop, so every later `step` must
        return one with the same pytree structure, shapes and dtypes.

        **Arguments:**

        - `env`: the env (from `diffsim.make_env`).
        - `policy`: an `eqx.Module` acting on one observation; with a policy factory,
          each seed's own initialisation.
        - `key`: the randomness of initialisation (keyword-only).
        """

    @abc.abstractmethod
    def step(
        self, env: Env, state: StrategyState, *, key: PRNGKeyArray
    ) -> tuple[StrategyState, Metrics]:
        """One iteration: collect data from the env, then make as many updates as the
        method calls for (PPO: epochs x minibatches updates; SHAC: one actor update and many
        critic updates; APG and ES: one).

        Runs under `jax.jit`, inside a loop over iterations.

        **Returns:** `(state, metrics)`:

        - `state`: the same pytree structure, shapes and dtypes as `init`'s.
        - `metrics`: a dict from names to float scalars (`Float[Array, ""]`), with the same
          keys at every step (reduce batches, e.g. with `.mean()`). `train` stacks them
          into `run.metrics`, one entry per iteration. An optional `"env_steps"` is the
          env steps this step counted, in [`min_steps_per_iteration`,
          `steps_per_iteration`]; without it every step counts `steps_per_iteration`.
        """

    @abc.abstractmethod
    def policy(self, state: StrategyState) -> eqx.Module:
        """The policy to evaluate or deploy, a plain `eqx.Module` acting on one
        observation (deterministic where the method allows). Runs under `jax.jit`."""

    @property
    @abc.abstractmethod
    def steps_per_iteration(self) -> int:
        """Env steps one `step` counts: the steps whose data feed its updates (the x-axis
        of every learning curve), the same way for every strategy. A strategy whose count
        varies (ES: the steps inside each member's scored episode) returns the most one
        step can count here, and the real count of each step as `metrics["env_steps"]`.
        A positive Python int, read after `for_env`."""

    @property
    @abc.abstractmethod
    def min_steps_per_iteration(self) -> int:
        """The fewest env steps one `step` can count: `steps_per_iteration` unless the count
        varies (ES). `train` sizes its per-segment buffers with it, so a step that reports
        fewer is an error. A positive Python int, read after `for_env`."""

    @property
    @abc.abstractmethod
    def batch_size(self) -> int:
        """Envs (or population members) one `step` runs side by side: the axis the strategy
        marks with `diffsim.shard_batch` and `train` splits over devices, which must divide
        it. A positive Python int, read after `for_budget`."""

    @abc.abstractmethod
    def for_env(self: Bound, env: Env) -> Bound:
        """This strategy with settings left to the env filled in (e.g. ES's rollout length
        from the episode length), or `self` where nothing is. Called once, right after
        `check`. It must be idempotent (`s.for_env(env).for_env(env) == s.for_env(env)`)."""

    @abc.abstractmethod
    def for_budget(self: Bound, total_steps: int) -> Bound:
        """This strategy with settings left to the run's env-step budget filled in (e.g.
        PPO's learning-rate decay length; `diffsim.strategies.helpers.with_budget`), or
        `self` where nothing is. Called once, after the step counts are read; it must leave
        them and `batch_size` unchanged, and be idempotent."""

    def bind(self: Bound, env: Env, *, total_steps: int) -> Bound:
        """This strategy ready to run `total_steps` env steps on `env` in a loop of your
        own: `self.for_env(env).for_budget(total_steps)`, what `train` does before
        compiling. Without it, settings left to the env or the budget stay unset: PPO's
        learning-rate decay (`lr_decay`, on by default) has no length and the rate stays
        constant (with a warning), ES has no rollout length. Bind once, then jit
        `init`/`step`/`policy`. Final: a strategy customises `for_env` and `for_budget`.

        **Arguments:**

        - `env`: the env the loop steps (from `diffsim.make_env`).
        - `total_steps`: the env steps the loop will count, a positive int: run
          iterations while the sum of `metrics["env_steps"]` is below it.

        **Returns:** the bound strategy (a new, equally frozen one).

        **Example:**

        ```python
        strategy = diffsim.PPO().bind(env, total_steps=200_000)
        state = eqx.filter_jit(strategy.init)(env, policy, key=key)
        ```
        """
        if not isinstance(total_steps, int) or isinstance(total_steps, bool) or total_steps < 1:
            raise ValueError(f"total_steps must be a positive int, got {total_steps!r}")
        return self.for_env(env).for_budget(total_steps)

    @abc.abstractmethod
    def check(self, env: Env, policy: eqx.Module) -> None:
        """Raise `ValueError` if this strategy cannot train `policy` on `env` (PPO: a policy
        without `log_prob`); return None where it can train anything.

        Called first, before compiling, on an abstract policy: its arrays are
        `jax.ShapeDtypeStruct`s (shapes and dtypes, no values).
        """
