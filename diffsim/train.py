"""`train` and `train_seeds`: a whole run as a pure function of a PRNG key.

A run is `num_evals - 1` segments. Each segment is one jit-compiled `lax.scan` over
strategy iterations followed by an evaluation; the host only starts segments, reads the
clock and updates the progress bar in between. Keeping host callbacks out of the
compiled program lets JAX's persistent compilation cache store it (JAX refuses to cache
executables that call back to the host), so a second run of the same configuration does
not recompile; it also means every finished segment is on the host if a run dies.
"""

import time
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
from brax.envs.base import Env
from jaxtyping import Array, Float, PRNGKeyArray

from ._types import Keys, LearningCurve
from .results import Run, run_config
from .rollout import evaluate
from .strategies.base import AbstractStrategy

PolicyOrFactory = eqx.Module | Callable[[PRNGKeyArray], eqx.Module]
EVAL_SEED = 0  # evaluation episodes are drawn from this key, whatever the training key


class _Carry(eqx.Module):
    state: Any
    key: PRNGKeyArray


class _Segment(eqx.Module):
    eval_return: Float[Array, "*seeds episodes"]
    metrics: dict[str, Float[Array, "*seeds iterations"]]


class Plan(eqx.Module):
    """How `total_steps` is cut into iterations and evaluation segments."""

    num_evals: int
    iterations_per_eval: int
    steps_per_iteration: int

    @property
    def env_steps(self) -> np.ndarray:
        return np.arange(self.num_evals) * self.iterations_per_eval * self.steps_per_iteration

    @property
    def total_steps(self) -> int:
        return int(self.env_steps[-1])


def make_plan(strategy: AbstractStrategy, total_steps: int, num_evals: int) -> Plan:
    """Validate the budget and spread `num_evals` evaluations evenly over it."""
    if not isinstance(num_evals, int) or isinstance(num_evals, bool) or num_evals < 2:
        raise ValueError(f"num_evals must be an int >= 2 (first and last point), got {num_evals!r}")
    if not isinstance(total_steps, int) or isinstance(total_steps, bool) or total_steps < 1:
        raise ValueError(f"total_steps must be a positive int, got {total_steps!r}")
    per_iter = strategy.steps_per_iteration
    iterations = (total_steps // per_iter) // (num_evals - 1)
    if iterations < 1:
        raise ValueError(
            f"total_steps={total_steps} is smaller than {num_evals - 1} evaluation intervals of"
            f" one iteration each ({(num_evals - 1) * per_iter} env steps; one"
            f" {type(strategy).__name__} iteration is {per_iter} steps)"
        )
    return Plan(num_evals, iterations, per_iter)


def _check_inputs(strategy, env, policy, num_eval_episodes: int) -> None:
    """Everything that can be checked before compiling, with messages naming the value."""
    if not isinstance(strategy, AbstractStrategy):
        raise TypeError(
            f"strategy must be a diffsim strategy (PPO, APG, ES, ...), got {strategy!r}"
        )
    if not hasattr(env, "episode_length"):
        raise TypeError(f"env must come from diffsim.make_env, got {type(env).__name__}")
    if not isinstance(num_eval_episodes, int) or num_eval_episodes < 1:
        raise ValueError(f"num_eval_episodes must be a positive int, got {num_eval_episodes!r}")
    build = (lambda: policy) if isinstance(policy, eqx.Module) else (lambda: policy(jr.key(0)))
    example = jax.eval_shape(build)  # abstract: nothing is computed or compiled
    obs = jax.ShapeDtypeStruct((env.observation_size,), jnp.float32)
    try:
        action = jax.eval_shape(lambda o: build()(o), obs)
    except Exception as error:
        raise ValueError(
            f"policy {type(example).__name__} cannot act on one observation of shape"
            f" ({env.observation_size},) from {env.name!r}: {error}"
        ) from error
    if action.shape != (env.action_size,):
        raise ValueError(
            f"policy {type(example).__name__} returns actions of shape {action.shape}, but"
            f" {env.name!r} takes ({env.action_size},)"
        )
    strategy.check(env, example)


class _Program(eqx.Module):
    """The two compiled halves of a run: `start(params, keys)` and `segment(carry)`."""

    start: Callable
    segment: Callable


_PROGRAMS: dict[Any, _Program] = {}


def _compile(
    strategy, env, policy, keys, plan: Plan, num_eval_episodes: int, seeds: bool
) -> tuple[_Program, Any]:
    """Compile (or reuse) the run's two programs; returns them and the policy's arrays."""
    params, static = (
        eqx.partition(policy, eqx.is_array) if isinstance(policy, eqx.Module) else (None, policy)
    )
    signature = jax.tree.map(lambda x: (x.shape, x.dtype), (params, keys))
    memo = (
        strategy,
        env,
        static,
        jax.tree.structure(params),
        str(signature),
        plan,
        num_eval_episodes,
        seeds,
    )
    try:
        program = _PROGRAMS.get(memo)
    except TypeError:  # something unhashable in a user module: compile every time
        memo = program = None
    if program is None:
        program = _build(strategy, env, policy, params, keys, plan, num_eval_episodes, seeds)
        if memo is not None:
            _PROGRAMS[memo] = program
    return program, params


def _build(
    strategy, env, policy, params, keys, plan: Plan, num_eval_episodes: int, seeds: bool
) -> _Program:
    if isinstance(policy, eqx.Module):
        static = eqx.partition(policy, eqx.is_array)[1]
        make_policy = lambda params, key: eqx.combine(params, static)
    else:
        make_policy = lambda params, key: policy(key)
    eval_key = jr.key(EVAL_SEED)

    def evaluate_state(state) -> Float[Array, " episodes"]:
        return evaluate(env, strategy.policy(state), key=eval_key, num_episodes=num_eval_episodes)

    def start(params, key) -> tuple[_Carry, Float[Array, " episodes"]]:
        policy_key, init_key, run_key = jr.split(key, 3)
        state = strategy.init(env, make_policy(params, policy_key), key=init_key)
        return _Carry(state, run_key), evaluate_state(state)

    def segment(carry: _Carry) -> tuple[_Carry, _Segment]:
        key, seg_key = jr.split(carry.key)
        step = lambda state, key: strategy.step(env, state, key=key)
        state, metrics = jax.lax.scan(
            step, carry.state, jr.split(seg_key, plan.iterations_per_eval)
        )
        return _Carry(state, key), _Segment(evaluate_state(state), metrics)

    if seeds:
        start, segment = jax.vmap(start, in_axes=(None, 0)), jax.vmap(segment)
    start_c = jax.jit(start).lower(params, keys).compile()
    carry_shape = jax.eval_shape(start, params, keys)[0]
    segment_c = jax.jit(segment, donate_argnums=0).lower(carry_shape).compile()
    return _Program(start_c, segment_c)


def _execute(
    strategy, env, policy, keys, *, total_steps, num_evals, num_eval_episodes, progress, seeds
) -> Run:
    _check_inputs(strategy, env, policy, num_eval_episodes)
    plan = make_plan(strategy, total_steps, num_evals)
    tic = time.perf_counter()
    program, params = _compile(strategy, env, policy, keys, plan, num_eval_episodes, seeds)
    compile_seconds = time.perf_counter() - tic  # tracing + XLA (or cache loading); 0 if reused

    bar = _Progress(plan, strategy, env, enabled=progress)
    tic = time.perf_counter()
    carry, first = program.start(params, keys)
    returns, times, metrics = [np.asarray(first)], [time.perf_counter() - tic], []
    bar.update(float(np.mean(returns[-1])), 0)
    for i in range(1, plan.num_evals):
        carry, out = program.segment(carry)
        returns.append(np.asarray(out.eval_return))  # blocks until the segment is done
        times.append(time.perf_counter() - tic)
        metrics.append(jax.tree.map(np.asarray, out.metrics))
        bar.update(float(np.mean(returns[-1])), int(plan.env_steps[i]))
    bar.close()

    axis = 1 if seeds else 0  # the evaluation / iteration axis
    num = len(keys) if seeds else None
    curve = LearningCurve(
        env_steps=jnp.asarray(plan.env_steps if num is None else np.tile(plan.env_steps, (num, 1))),
        wall_time=jnp.asarray(
            np.array(times, np.float32)
            if num is None
            else np.tile(np.array(times, np.float32), (num, 1))
        ),
        eval_return=jnp.asarray(np.stack(returns, axis=axis)),
    )
    metrics = {
        k: jnp.asarray(np.concatenate([m[k] for m in metrics], axis=axis)) for k in metrics[0]
    }
    config = run_config(
        strategy,
        env,
        plan,
        num_eval_episodes=num_eval_episodes,
        num_seeds=num,
        compile_seconds=compile_seconds,
        train_seconds=times[-1],
    )
    return Run(policy=strategy.policy(carry.state), curve=curve, metrics=metrics, config=config)


class _Progress:
    """A tqdm bar over env steps showing steps/s and the latest mean eval return."""

    def __init__(self, plan: Plan, strategy, env, *, enabled: bool):
        self.bar = None
        if enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(
                total=plan.total_steps,
                unit="step",
                unit_scale=True,
                dynamic_ncols=True,
                desc=f"{type(strategy).__name__} {env.name}",
            )
        self.done = 0

    def update(self, eval_return: float, env_steps: int) -> None:
        if self.bar is not None:
            self.bar.update(env_steps - self.done)
            self.bar.set_postfix(eval_return=f"{eval_return:.1f}")
        self.done = env_steps

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def train(
    strategy: AbstractStrategy,
    env: Env,
    policy: PolicyOrFactory,
    *,
    key: PRNGKeyArray,
    total_steps: int,
    num_evals: int = 20,
    num_eval_episodes: int = 16,
    progress: bool = True,
) -> Run:
    """Train `policy` on `env` with `strategy` for `total_steps` env steps.

    Evaluations happen at `num_evals` evenly spaced env-step points, the first before any
    training and the last at the end, each scoring the deterministic policy on
    `num_eval_episodes` full episodes drawn from a fixed evaluation key: identical across
    training keys and strategies. `total_steps` is rounded down to whole iterations per
    evaluation interval (`run.config["total_steps"]` is what ran).

    Inputs are validated before anything compiles; compile time is measured separately
    (`run.config["compile_seconds"]`) and excluded from `run.curve.wall_time`.

    **Arguments:**

    - `strategy`: a `PPO`, `APG`, `ES`, ... instance.
    - `env`: from `diffsim.make_env`.
    - `policy`: an `eqx.Module` acting on one observation, or a function
      `key -> eqx.Module` (then each seed of `train_seeds` gets its own initialisation).
    - `key`: the run's only source of randomness (keyword-only).
    - `total_steps`: env-step budget for training (evaluation steps not counted).
    - `progress`: show a progress bar (env steps, steps/s, latest eval return).

    **Returns:** a `Run` with `policy`, `curve` (`LearningCurve`, `E = num_evals`),
    `metrics` (`Float[Array, "iterations"]` each) and `config`.

    **Example:**

    ```python
    env = diffsim.make_env("pendulum")
    policy = diffsim.GaussianPolicy(env.observation_size, env.action_size, key=k1)
    run = diffsim.train(diffsim.PPO(), env, policy, key=k2, total_steps=200_000)
    run.curve.eval_return.mean(-1)   # mean return at each evaluation point
    ```
    """
    return _execute(
        strategy,
        env,
        policy,
        key,
        total_steps=total_steps,
        num_evals=num_evals,
        num_eval_episodes=num_eval_episodes,
        progress=progress,
        seeds=False,
    )


def train_seeds(
    strategy: AbstractStrategy,
    env: Env,
    policy: PolicyOrFactory,
    *,
    keys: Keys,
    total_steps: int,
    num_evals: int = 20,
    num_eval_episodes: int = 16,
    progress: bool = True,
) -> Run:
    """`train` `vmap`ped over a batch of keys: many seeds, one compile, one program.

    Each seed is exactly `train(..., key=keys[i])` (same arithmetic, batched). Pass a
    policy factory `key -> policy` to give each seed its own initial weights.

    **Returns:** a `Run` whose `policy`, `curve` and `metrics` leaves have a leading seed
    axis `S = len(keys)`.

    **Example:**

    ```python
    make = lambda k: diffsim.GaussianPolicy(env.observation_size, env.action_size, key=k)
    runs = diffsim.train_seeds(diffsim.PPO(), env, make, keys=jax.random.split(key, 8),
                               total_steps=200_000)
    runs.curve.eval_return.shape   # (8, 20, 16)
    ```
    """
    if not hasattr(keys, "shape") or len(keys) < 1:
        raise ValueError(f"keys must be a non-empty batch of PRNG keys, got {keys!r}")
    return _execute(
        strategy,
        env,
        policy,
        keys,
        total_steps=total_steps,
        num_evals=num_evals,
        num_eval_episodes=num_eval_episodes,
        progress=progress,
        seeds=True,
    )
