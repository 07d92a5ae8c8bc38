"""`train` and `train_seeds`: a whole run as a pure function of a PRNG key.

A run is `num_evals - 1` segments. Each segment is one jit-compiled `lax.scan` over
strategy iterations followed by an evaluation; the host only starts segments, reads the
clock and updates the progress bar in between. Keeping host callbacks out of the
compiled program lets JAX's persistent compilation cache store it (JAX refuses to cache
executables that call back to the host), so a second run of the same configuration does
not recompile; it also means every finished segment is on the host if a run dies.
"""

import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
from brax.envs.base import Env
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from jaxtyping import Array, Float, PRNGKeyArray

from . import _checkpoint as checkpoint
from ._types import Keys, LearningCurve
from .results import Run, run_config
from .rollout import evaluate
from .sharding import SEEDS, make_mesh, shard_seeds
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
    carry_shape: Any  # abstract `_Carry`, to restore checkpoints into
    carry_sharding: Any  # where each leaf of the carry lives (None on one device)


_PROGRAMS: dict[Any, _Program] = {}


def _compile(
    strategy, env, policy, keys, plan: Plan, num_eval_episodes: int, seeds: bool, mesh: Mesh | None
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
        mesh,
    )
    try:
        program = _PROGRAMS.get(memo)
    except TypeError:  # something unhashable in a user module: compile every time
        memo = program = None
    if program is None:
        program = _build(strategy, env, policy, params, keys, plan, num_eval_episodes, seeds, mesh)
        if memo is not None:
            _PROGRAMS[memo] = program
    return program, params


def _build(
    strategy,
    env,
    policy,
    params,
    keys,
    plan: Plan,
    num_eval_episodes: int,
    seeds: bool,
    mesh: Mesh | None,
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

    # Seeds go over the mesh's "seeds" axis; inside each run, strategies split their
    # batch over "batch" (`shard_batch`). Without a mesh both are no-ops.
    if seeds:
        start = _then(shard_seeds, jax.vmap(start, in_axes=(None, 0), spmd_axis_name=SEEDS))
        segment = _then(shard_seeds, jax.vmap(segment, spmd_axis_name=SEEDS))
    if mesh is None:
        carry_shape = jax.eval_shape(start, params, keys)[0]
        start_c = jax.jit(start).lower(params, keys).compile()
        segment_c = jax.jit(segment, donate_argnums=0).lower(carry_shape).compile()
        return _Program(start_c, segment_c, carry_shape, None)

    # The carry keeps the layout `start` gives it.
    replicated = NamedSharding(mesh, P())
    by_seed = NamedSharding(mesh, P(SEEDS)) if seeds else replicated
    with jax.set_mesh(mesh):
        carry_shape = jax.eval_shape(start, params, keys)[0]
        start_j = jax.jit(start, in_shardings=(replicated, by_seed))
        start_c = start_j.lower(params, keys).compile()
        carry_sharding = start_c.output_shardings[0]
        segment_j = jax.jit(
            segment,
            in_shardings=(carry_sharding,),
            out_shardings=(carry_sharding, by_seed),
            donate_argnums=0,
        )
        segment_c = segment_j.lower(carry_shape).compile()
    return _Program(start_c, segment_c, carry_shape, carry_sharding)


def _then(g: Callable, f: Callable) -> Callable:
    return lambda *args: g(f(*args))


def _execute(
    strategy,
    env,
    policy,
    keys,
    *,
    total_steps,
    num_evals,
    num_eval_episodes,
    progress,
    seeds,
    checkpoint_dir=None,
    checkpoint_every=1,
    resume_from=None,
    devices=None,
) -> Run:
    _check_inputs(strategy, env, policy, num_eval_episodes)
    plan = make_plan(strategy, total_steps, num_evals)
    if not isinstance(checkpoint_every, int) or checkpoint_every < 1:
        raise ValueError(f"checkpoint_every must be a positive int, got {checkpoint_every!r}")
    if checkpoint_dir is not None:
        checkpoint_dir = checkpoint.check_writable(checkpoint_dir)  # fail before compiling
    if resume_from is not None and checkpoint.latest(Path(resume_from)) is None:
        raise FileNotFoundError(f"resume_from={str(resume_from)!r} holds no complete checkpoint")
    mesh = make_mesh(
        devices,
        num_seeds=len(keys) if seeds else None,
        batch_size=strategy.batch_size,
        owner=type(strategy).__name__,
    )
    if mesh is not None:
        keys = jax.device_put(keys, NamedSharding(mesh, P(SEEDS) if seeds else P()))
    tic = time.perf_counter()
    program, params = _compile(strategy, env, policy, keys, plan, num_eval_episodes, seeds, mesh)
    compile_seconds = time.perf_counter() - tic  # tracing + XLA (or cache loading); 0 if reused
    meta = {
        "strategy": repr(strategy),
        "env": env.name,
        "episode_length": env.episode_length,
        "plan": [plan.num_evals, plan.iterations_per_eval, plan.steps_per_iteration],
        "num_eval_episodes": num_eval_episodes,
        "seeds": seeds,
        "keys": checkpoint.key_data(keys).tolist(),
    }

    bar = _Progress(plan, strategy, env, enabled=progress)
    if resume_from is None:
        tic = time.perf_counter()
        carry, first = program.start(params, keys)
        history = {
            "eval_return": np.asarray(first)[None],
            "wall_time": np.array([time.perf_counter() - tic]),
        }
        done = 0
    else:
        carry, history, done = checkpoint.load(resume_from, program.carry_shape, meta)
        if program.carry_sharding is not None:
            carry = jax.device_put(carry, program.carry_sharding)
        tic = time.perf_counter() - float(history["wall_time"][-1])  # the clock continues
    bar.update(float(np.mean(history["eval_return"][-1])), int(plan.env_steps[done]))
    for i in range(done + 1, plan.num_evals):
        carry, out = program.segment(carry)
        returns = np.asarray(out.eval_return)  # blocks until the segment is done
        history = _append(history, returns, time.perf_counter() - tic, out.metrics)
        bar.update(float(np.mean(returns)), int(plan.env_steps[i]))
        if checkpoint_dir is not None and (i % checkpoint_every == 0 or i == plan.num_evals - 1):
            checkpoint.save(checkpoint_dir, i, carry, history, meta)
    bar.close()

    returns = np.moveaxis(history["eval_return"], 0, 1 if seeds else 0)
    times = history["wall_time"]
    metrics = {k[len("metric/") :]: v for k, v in history.items() if k.startswith("metric/")}
    num = len(keys) if seeds else None
    tile = (lambda x: x) if num is None else (lambda x: np.tile(x, (num, 1)))
    curve = LearningCurve(
        env_steps=jnp.asarray(tile(plan.env_steps)),
        wall_time=jnp.asarray(tile(times.astype(np.float32))),
        eval_return=jnp.asarray(returns),
    )
    metrics = {k: jnp.asarray(v) for k, v in metrics.items()}
    config = run_config(
        strategy,
        env,
        plan,
        num_eval_episodes=num_eval_episodes,
        num_seeds=num,
        compile_seconds=compile_seconds,
        train_seconds=float(times[-1]),
        mesh=None if mesh is None else dict(mesh.shape),
    )
    return Run(policy=strategy.policy(carry.state), curve=curve, metrics=metrics, config=config)


def _append(history: dict, returns, seconds: float, metrics) -> dict:
    """History with one more evaluation; metrics concatenate along the iteration axis."""
    out = {
        "eval_return": np.concatenate([history["eval_return"], returns[None]]),
        "wall_time": np.append(history["wall_time"], seconds),
    }
    axis = returns.ndim - 1  # iterations follow the seed axis, if any
    for name, value in metrics.items():
        key, value = f"metric/{name}", np.asarray(value)
        out[key] = np.concatenate([history[key], value], axis=axis) if key in history else value
    return out


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
    checkpoint_dir: str | os.PathLike | None = None,
    checkpoint_every: int = 1,
    resume_from: str | os.PathLike | None = None,
    devices: Sequence[jax.Device] | None = None,
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
    - `checkpoint_dir`: if given, the full training state (strategy state, env batch,
      keys) and the curve so far are written there after every `checkpoint_every`
      evaluations, atomically (a killed process leaves the previous checkpoint intact).
      Checked for writability before anything compiles.
    - `resume_from`: a `checkpoint_dir` of an earlier, interrupted call with the same
      arguments: training continues from its newest checkpoint and returns what the
      uninterrupted run would have (same final policy and curve; wall-clock continues).
    - `devices`: where to run (default `jax.devices()`). With several, the strategy's
      batch (`strategy.batch_size`: PPO's and APG's envs, ES's population) and the
      evaluation episodes are split over them along a `Mesh` axis `"batch"`, with
      `NamedSharding`s; the batch must divide evenly. Results equal the one-device run's
      up to float reassociation in the cross-device sums.

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
        checkpoint_dir=checkpoint_dir,
        checkpoint_every=checkpoint_every,
        resume_from=resume_from,
        devices=devices,
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
    checkpoint_dir: str | os.PathLike | None = None,
    checkpoint_every: int = 1,
    resume_from: str | os.PathLike | None = None,
    devices: Sequence[jax.Device] | None = None,
) -> Run:
    """`train` `vmap`ped over a batch of keys: many seeds, one compile, one program.

    Each seed is exactly `train(..., key=keys[i])` (same arithmetic, batched). Pass a
    policy factory `key -> policy` to give each seed its own initial weights.

    With several devices (`devices`, default `jax.devices()`: GPUs, TPUs, or CPU
    devices from `XLA_FLAGS=--xla_force_host_platform_device_count=N`), they form a
    `Mesh` with axes `("seeds", "batch")` and every array gets a `NamedSharding`: the
    seeds are split over `g = gcd(len(keys), len(devices))` devices and each seed's
    batch (as in `train`) over the remaining `len(devices) / g`, which must divide
    `strategy.batch_size`. So 8 seeds on 4 devices train 2 seeds per device, and 2 seeds
    on 4 devices split each seed's envs in two. Across hosts, call
    `jax.distributed.initialize()` first, then use the same call: `jax.devices()` then
    spans every host. Checkpoint and other arguments are as in `train`.

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
        checkpoint_dir=checkpoint_dir,
        checkpoint_every=checkpoint_every,
        resume_from=resume_from,
        devices=devices,
        seeds=True,
    )
