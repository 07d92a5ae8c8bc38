"""`train`, `train_seeds` and `train_sweep`: a whole run as a pure function of a PRNG key.

A run is `num_evals - 1` segments. Each segment is one jit-compiled `lax.scan` over
strategy iterations followed by an evaluation; the host only starts segments, reads the
clock and updates the progress bar in between. Keeping host callbacks out of the
compiled program lets JAX's persistent compilation cache store it (JAX refuses to cache
executables that call back to the host), so a second run of the same configuration does
not recompile; it also means every finished segment is on the host if a run dies.
"""

import dataclasses
import itertools
import json
import os
import re
import time
import typing
import warnings
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
from brax.envs.base import Env
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray

from . import _checkpoint as checkpoint
from ._types import Keys, LearningCurve
from .results import Run, run_config
from .rollout import evaluate
from .sharding import SEEDS, make_mesh, shard_seeds
from .strategies.base import AbstractStrategy

PolicyOrFactory = eqx.Module | Callable[[PRNGKeyArray], eqx.Module]
EVAL_SEED = 0  # evaluation episodes are drawn from this key (folded with the seed index)


class _Carry(eqx.Module):
    state: Any
    key: PRNGKeyArray
    env_steps: Int[Array, ""]  # env steps counted so far (what fed an update)
    last_steps: Int[Array, ""]  # env steps of the latest iteration
    hyper: dict[str, Float[Array, ""]] | None  # this run's swept hyperparameters (train_sweep)


class _Segment(eqx.Module):
    metrics: dict[str, Float[Array, "*seeds rows"]]  # one row per iteration, NaN past the end
    iterations: Int[Array, "*seeds"]


class Plan(eqx.Module):
    """How `total_steps` is cut into evaluation segments.

    `targets[k]` is the env-step count at which evaluation `k` should happen
    (`targets[0] = 0`, `targets[-1] = total_steps`). A segment runs iterations until its
    count is nearest its target: it stops before an iteration that would overshoot the
    target by more than that iteration's steps leave it short (the next iteration is
    assumed to cost what the last one did). For a strategy with a fixed cost per
    iteration the run therefore ends within half an iteration of `total_steps`, and
    segments differ by at most one iteration.
    """

    targets: tuple[int, ...]
    steps_per_iteration: int  # the most one iteration can count
    max_iterations: int  # rows of the per-segment metrics buffer

    @property
    def num_evals(self) -> int:
        return len(self.targets)

    @property
    def total_steps(self) -> int:
        return self.targets[-1]


def _stops(targets: Sequence[int], per_iter: int) -> list[int]:
    """Counted steps after each segment for a fixed cost per iteration (the device rule)."""
    steps, out = 0, []
    for target in targets:
        while 2 * steps + per_iter < 2 * target:
            steps += per_iter
        out.append(steps)
    return out


def make_plan(strategy: AbstractStrategy, total_steps: int, num_evals: int) -> Plan:
    """Validate the budget and spread `num_evals` evaluations evenly over it.

    A budget of fewer iterations than evaluation intervals is run with one evaluation
    after every iteration (`num_evals = iterations + 1`), with a warning saying so.
    """
    if not isinstance(num_evals, int) or isinstance(num_evals, bool) or num_evals < 2:
        raise ValueError(f"num_evals must be an int >= 2 (first and last point), got {num_evals!r}")
    if not isinstance(total_steps, int) or isinstance(total_steps, bool) or total_steps < 1:
        raise ValueError(f"total_steps must be a positive int, got {total_steps!r}")
    per_iter, least = strategy.steps_per_iteration, strategy.min_steps_per_iteration
    name = type(strategy).__name__
    if 2 * total_steps < per_iter:
        raise ValueError(
            f"total_steps={total_steps} is less than half of one {name} iteration"
            f" ({per_iter} env steps): nothing would run"
        )
    iterations = max(1, round(total_steps / per_iter))
    if least == per_iter and iterations < num_evals - 1:
        warnings.warn(
            f"total_steps={total_steps} is {iterations} {name} iteration(s) of {per_iter} env"
            f" steps, fewer than the {num_evals - 1} evaluation intervals asked for: evaluating"
            f" after every iteration instead (num_evals={iterations + 1})",
            stacklevel=3,
        )
        num_evals = iterations + 1
    targets = tuple(round(k * total_steps / (num_evals - 1)) for k in range(num_evals))
    if least == per_iter:  # fixed cost: the exact number of iterations of each segment
        stops = _stops(targets, per_iter)
        rows = max(b - a for a, b in zip(stops, stops[1:], strict=False)) // per_iter
    else:  # counted per iteration: at most the longest segment over the cheapest iteration
        longest = max(b - a for a, b in zip(targets, targets[1:], strict=False))
        rows = -(-(longest + per_iter) // least)
    return Plan(targets, per_iter, max(1, rows))


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
    """The compiled parts of a run: `start(params, keys, hyper)`, `segment(carry, target)`
    (training only) and `evaluate(carry, seed_index)` (only evaluation), each timed on its
    own. `hyper` holds the swept hyperparameters of each run (`train_sweep`), else None."""

    start: Callable
    segment: Callable
    evaluate: Callable
    carry_shape: Any  # abstract `_Carry`, to restore checkpoints into
    carry_sharding: Any  # where each leaf of the carry lives (None on one device)


# Compiled runs kept for reuse by a later identical call, newest last. Bounded: each XLA CPU
# executable holds hundreds of memory maps, and a process past the kernel's
# vm.max_map_count (65,530 by default) aborts in its next compile.
_PROGRAMS: OrderedDict[Any, _Program] = OrderedDict()
_MAX_PROGRAMS = 8


def _compile(
    strategy,
    env,
    policy,
    keys,
    hyper,
    plan: Plan,
    num_eval_episodes: int,
    seeds: bool,
    mesh: Mesh | None,
) -> tuple[_Program, Any]:
    """Compile (or reuse) the run's programs; returns them and the policy's arrays."""
    params, static = (
        eqx.partition(policy, eqx.is_array) if isinstance(policy, eqx.Module) else (None, policy)
    )
    signature = jax.tree.map(lambda x: (x.shape, x.dtype), (params, keys, hyper))
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
        program = _build(
            strategy, env, policy, params, keys, hyper, plan, num_eval_episodes, seeds, mesh
        )
        if memo is not None:
            _PROGRAMS[memo] = program
            while len(_PROGRAMS) > _MAX_PROGRAMS:
                _PROGRAMS.popitem(last=False)
    elif memo is not None:
        _PROGRAMS.move_to_end(memo)
    return program, params


def _build(
    strategy,
    env,
    policy,
    params,
    keys,
    hyper,
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
    per_iter = plan.steps_per_iteration

    def configured(hyper) -> AbstractStrategy:
        """The strategy of one run: a sweep's fields hold that run's (traced) values."""
        if hyper is None:
            return strategy
        names = sorted(hyper)
        fields = lambda s: [getattr(s, name) for name in names]
        return eqx.tree_at(fields, strategy, [hyper[name] for name in names])

    def start(params, key, hyper) -> _Carry:
        policy_key, init_key, run_key = jr.split(key, 3)
        state = configured(hyper).init(env, make_policy(params, policy_key), key=init_key)
        zero = jnp.zeros((), jnp.int32)
        return _Carry(state, run_key, zero, zero + per_iter, hyper)

    def evaluate_carry(carry: _Carry, seed_index) -> Float[Array, " episodes"]:
        # Paired evaluation: episode starts differ between seeds, never between strategies.
        key = jr.fold_in(jr.key(EVAL_SEED), seed_index)
        policy = configured(carry.hyper).policy(carry.state)
        return evaluate(env, policy, key=key, num_episodes=num_eval_episodes)

    def one_iteration(carry: _Carry) -> tuple[_Carry, dict[str, Array]]:
        key, step_key = jr.split(carry.key)
        state, metrics = configured(carry.hyper).step(env, carry.state, key=step_key)
        steps = jnp.asarray(metrics.pop("env_steps", per_iter), jnp.int32)
        metrics = {**metrics, "env_steps": steps.astype(jnp.float32)}
        return _Carry(state, key, carry.env_steps + steps, steps, carry.hyper), metrics

    def segment(carry: _Carry, target) -> tuple[_Carry, _Segment]:
        rows = plan.max_iterations
        shapes = jax.eval_shape(one_iteration, carry)[1]
        buffers = {k: jnp.full((rows,), jnp.nan, jnp.float32) for k in shapes}

        def more(loop) -> Bool[Array, ""]:
            carry, _, i = loop
            return (2 * carry.env_steps + carry.last_steps < 2 * target) & (i < rows)

        def body(loop):
            carry, buffers, i = loop
            carry, metrics = one_iteration(carry)
            buffers = {k: b.at[i].set(metrics[k].astype(jnp.float32)) for k, b in buffers.items()}
            return carry, buffers, i + 1

        carry, buffers, i = jax.lax.while_loop(more, body, (carry, buffers, jnp.zeros((), int)))
        return carry, _Segment(buffers, i)

    # Runs (seeds; a sweep's configs x seeds, flattened) go over the mesh's "seeds" axis;
    # inside each run, strategies split their batch over "batch" (`shard_batch`). Without a
    # mesh both are no-ops.
    if seeds:
        start = _then(shard_seeds, jax.vmap(start, in_axes=(None, 0, 0), spmd_axis_name=SEEDS))
        segment = _then(shard_seeds, jax.vmap(segment, in_axes=(0, None), spmd_axis_name=SEEDS))
        evaluate_carry = _then(shard_seeds, jax.vmap(evaluate_carry, spmd_axis_name=SEEDS))
    index = jnp.arange(len(keys)) if seeds else jnp.zeros((), int)
    target = jnp.zeros((), jnp.int32)
    if mesh is None:
        carry_shape = jax.eval_shape(start, params, keys, hyper)
        return _Program(
            start=jax.jit(start).lower(params, keys, hyper).compile(),
            segment=jax.jit(segment, donate_argnums=0).lower(carry_shape, target).compile(),
            evaluate=jax.jit(evaluate_carry).lower(carry_shape, index).compile(),
            carry_shape=carry_shape,
            carry_sharding=None,
        )

    # The carry keeps the layout `start` gives it.
    replicated = NamedSharding(mesh, P())
    by_seed = NamedSharding(mesh, P(SEEDS)) if seeds else replicated
    with jax.set_mesh(mesh):
        carry_shape = jax.eval_shape(start, params, keys, hyper)
        start_c = jax.jit(start, in_shardings=(replicated, by_seed, by_seed))
        start_c = start_c.lower(params, keys, hyper).compile()
        carry_sharding = start_c.output_shardings
        segment_c = jax.jit(
            segment,
            in_shardings=(carry_sharding, replicated),
            out_shardings=(carry_sharding, by_seed),
            donate_argnums=0,
        ).lower(carry_shape, target)
        evaluate_c = jax.jit(
            evaluate_carry, in_shardings=(carry_sharding, by_seed), out_shardings=by_seed
        ).lower(carry_shape, index)
    return _Program(start_c, segment_c.compile(), evaluate_c.compile(), carry_shape, carry_sharding)


def _then(g: Callable, f: Callable) -> Callable:
    return lambda *args: g(f(*args))


class _Clock:
    """Seconds spent training, evaluating and checkpointing, each summed on its own."""

    def __init__(self, train: float = 0.0, evaluation: float = 0.0, checkpoint: float = 0.0):
        self.seconds = {"train": train, "eval": evaluation, "checkpoint": checkpoint}

    def time(self, what: str, fn: Callable, *args):
        tic = time.perf_counter()
        out = jax.block_until_ready(fn(*args))
        self.seconds[what] += time.perf_counter() - tic
        return out


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
    log_dir=None,
    seed_index=0,
    grid: "_Grid | None" = None,
) -> Run:
    _check_inputs(strategy, env, policy, num_eval_episodes)
    strategy = strategy.for_env(env)
    plan = make_plan(strategy, total_steps, num_evals)
    strategy = strategy.for_budget(total_steps)
    if not isinstance(checkpoint_every, int) or checkpoint_every < 1:
        raise ValueError(f"checkpoint_every must be a positive int, got {checkpoint_every!r}")
    if checkpoint_dir is not None:
        checkpoint_dir = checkpoint.check_writable(checkpoint_dir)  # fail before compiling
    if resume_from is not None and checkpoint.latest(Path(resume_from)) is None:
        raise FileNotFoundError(f"resume_from={str(resume_from)!r} holds no complete checkpoint")
    log = _Log(log_dir, strategy, env)  # checks log_dir before compiling
    # A sweep trains its configs x seeds as one flat batch of runs (config-major), each with
    # its config's values in `hyper`; its arrays get the axes `(configs, seeds)` at the end.
    lead, hyper = ((len(keys),) if seeds else ()), None
    if grid is not None:
        lead, hyper = (len(grid.configs), len(keys)), grid.per_run(len(keys))
        keys = keys[np.tile(np.arange(len(keys)), len(grid.configs))]
    mesh = make_mesh(
        devices,
        num_seeds=len(keys) if seeds else None,
        batch_size=strategy.batch_size,
        owner=type(strategy).__name__,
    )
    if mesh is not None:
        keys, hyper = jax.device_put((keys, hyper), NamedSharding(mesh, P(SEEDS) if seeds else P()))
    tic = time.perf_counter()
    try:
        program, params = _compile(
            strategy, env, policy, keys, hyper, plan, num_eval_episodes, seeds, mesh
        )
    except (
        jax.errors.ConcretizationTypeError,
        jax.errors.TracerIntegerConversionError,
        jax.errors.TracerArrayConversionError,
    ) as error:
        if grid is None:
            raise
        raise ValueError(grid.untraceable(strategy, error)) from error
    compile_seconds = time.perf_counter() - tic  # tracing + XLA (or cache loading); 0 if reused
    meta = {
        "strategy": repr(strategy),
        "env": env.name,
        "episode_length": env.episode_length,
        "plan": [list(plan.targets), plan.steps_per_iteration, plan.max_iterations],
        "num_eval_episodes": num_eval_episodes,
        "seeds": seeds,
        "keys": checkpoint.key_data(keys).tolist(),
    }
    if not isinstance(seed_index, int) or isinstance(seed_index, bool) or seed_index < 0:
        raise ValueError(f"seed_index must be an int >= 0, got {seed_index!r}")
    index = np.arange(len(keys)) % lead[-1] if seeds else np.asarray(seed_index)  # seed i's
    if mesh is not None:
        index = jax.device_put(index, NamedSharding(mesh, P(SEEDS) if seeds else P()))

    bar = _Progress(plan, strategy, env, enabled=progress)
    if resume_from is None:
        clock = _Clock()
        carry = clock.time("train", program.start, params, keys, hyper)
        history = {"eval_return": np.asarray(clock.time("eval", program.evaluate, carry, index))}
        history = {k: v[None] for k, v in history.items()}
        history["env_steps"] = np.asarray(carry.env_steps)[None]
        history["seconds"] = np.array([list(clock.seconds.values())])
        done = 0
        log.write(0, history, {})
    else:
        carry, history, done = checkpoint.load(resume_from, program.carry_shape, meta)
        if program.carry_sharding is not None:
            carry = jax.device_put(carry, program.carry_sharding)
        clock = _Clock(*history["seconds"][-1])  # the clocks continue
    bar.update(history)
    for i in range(done + 1, plan.num_evals):
        target = np.int32(plan.targets[i])
        carry, out = clock.time("train", program.segment, carry, target)
        returns = np.asarray(clock.time("eval", program.evaluate, carry, index))
        metrics = _valid_rows(out)
        history = _append(history, returns, np.asarray(carry.env_steps), metrics)
        if checkpoint_dir is not None and (i % checkpoint_every == 0 or i == plan.num_evals - 1):
            history["seconds"][-1] = list(clock.seconds.values())
            clock.time("checkpoint", checkpoint.save, checkpoint_dir, i, carry, history, meta)
        history["seconds"][-1] = list(clock.seconds.values())
        bar.update(history)
        log.write(i, history, metrics)
    bar.close()

    seconds = history["seconds"]  # [E, 3]: train, eval, checkpoint, cumulative
    axis = 1 if seeds else 0
    num = len(keys) if seeds else None
    times = seconds[:, 0].astype(np.float32)
    curve = LearningCurve(
        env_steps=jnp.asarray(np.moveaxis(history["env_steps"], 0, axis)),
        wall_time=jnp.asarray(times if num is None else np.tile(times, (num, 1))),
        eval_return=jnp.asarray(np.moveaxis(history["eval_return"], 0, axis)),
    )
    metrics = {
        k[len("metric/") :]: jnp.asarray(v) for k, v in history.items() if k.startswith("metric/")
    }
    config = run_config(
        strategy,
        env,
        {
            "total_steps_requested": total_steps,
            "total_steps": int(np.max(history["env_steps"][-1])),
            "num_evals": plan.num_evals,
            "steps_per_iteration": plan.steps_per_iteration,
            "iterations": int(np.max(np.sum(np.isfinite(metrics["env_steps"]), axis=-1))),
        },
        num_eval_episodes=num_eval_episodes,
        num_seeds=lead[-1] if seeds else None,
        compile_seconds=compile_seconds,
        train_seconds=float(seconds[-1, 0]),
        eval_seconds=float(seconds[-1, 1]),
        checkpoint_seconds=float(seconds[-1, 2]),
        mesh=None if mesh is None else dict(mesh.shape),
    )
    run = Run(policy=strategy.policy(carry.state), curve=curve, metrics=metrics, config=config)
    return run if grid is None else grid.unflatten(run, lead)


class _Grid(eqx.Module):
    """A sweep's combinations: `configs[c][j]` is the value of `names[j]` in config `c`."""

    names: tuple[str, ...]
    configs: tuple[tuple[float, ...], ...]

    def listing(self) -> list[dict[str, float]]:
        """One dict per config, in the order of the config axis."""
        return [dict(zip(self.names, values, strict=True)) for values in self.configs]

    def per_run(self, num_seeds: int) -> dict[str, Float[Array, " runs"]]:
        """Each swept value for every run (config-major: run `c * num_seeds + s`), weakly
        typed like the Python floats they stand for, so dtypes come out as in `train`."""
        return {
            name: jnp.stack([jnp.asarray(c[j]) for c in self.configs for _ in range(num_seeds)])
            for j, name in enumerate(self.names)
        }

    def unflatten(self, run: Run, lead: tuple[int, int]) -> Run:
        """`run` (a flat batch of runs) with `(configs, seeds)` leading axes and the sweep
        recorded in its config."""
        split = lambda x: x.reshape(*lead, *x.shape[1:]) if eqx.is_array(x) else x
        config = dict(run.config, sweep=self.listing(), num_configs=len(self.configs))
        config["hyperparameters"] = dict(config["hyperparameters"])
        for j, name in enumerate(self.names):  # one value per config
            config["hyperparameters"][name] = [c[j] for c in self.configs]
        return Run(
            policy=jax.tree.map(split, run.policy),
            curve=jax.tree.map(split, run.curve),
            metrics=jax.tree.map(split, run.metrics),
            config=config,
        )

    def untraceable(self, strategy: AbstractStrategy, error: Exception) -> str:
        what = " or ".join(self.names)
        return (
            f"{type(strategy).__name__} uses {what} in Python control flow or as a shape"
            f" ({type(error).__name__} while tracing), so it cannot vary inside one compiled"
            f" program; loop over its values with diffsim.train_seeds instead"
        )


def _is_float_field(field: dataclasses.Field) -> bool:
    """A field annotated `float` (alone or in a union: `float | None`, a float or schedule)
    and not static."""
    if field.metadata.get("static", False) or not field.init:
        return False
    kind = field.type
    if isinstance(kind, str):  # `from __future__ import annotations`
        return re.search(r"\bfloat\b", kind) is not None
    return kind is float or float in typing.get_args(kind)


def _sweep_grid(strategy: AbstractStrategy, sweep: Mapping[str, Any]) -> _Grid:
    """Validate `sweep` against `strategy` (before anything compiles) and list its
    combinations (`itertools.product` in the dict's order: the last name varies fastest)."""
    if not isinstance(strategy, AbstractStrategy):
        raise TypeError(
            f"strategy must be a diffsim strategy (PPO, APG, ES, ...), got {strategy!r}"
        )
    owner = type(strategy).__name__
    fields = {f.name: f for f in dataclasses.fields(strategy)}
    floats = [name for name, f in fields.items() if _is_float_field(f)]
    if not isinstance(sweep, Mapping) or not sweep:
        raise ValueError(
            f"sweep must be a non-empty dict from a float hyperparameter of {owner} to a list"
            f" of values, got {sweep!r}; {owner} has: {', '.join(floats)}"
        )
    columns = []
    for name, values in sweep.items():
        if name not in fields:
            raise ValueError(
                f"{owner} has no hyperparameter {name!r}; the float hyperparameters"
                f" train_sweep can vary are: {', '.join(floats)}"
            )
        if name not in floats:
            raise ValueError(
                f"{owner}.{name} (= {getattr(strategy, name)!r}) is not a float"
                f" hyperparameter: it changes shapes or control flow, so each value needs its"
                f" own compiled program. Loop over its values with train_seeds instead"
                f" (for v in values: diffsim.train_seeds(dataclasses.replace(strategy,"
                f" {name}=v), ...)). train_sweep can vary: {', '.join(floats)}"
            )
        if isinstance(values, (str, bytes, Mapping)) or not isinstance(
            values, (Sequence, np.ndarray)
        ):
            raise ValueError(f"sweep[{name!r}] must be a list of numbers, got {values!r}")
        if len(values) == 0:
            raise ValueError(f"sweep[{name!r}] is empty: give at least one value")
        for value in values:
            if np.ndim(value) != 0 or not np.issubdtype(np.asarray(value).dtype, np.number):
                raise ValueError(f"sweep[{name!r}] holds {value!r}; its values must be numbers")
            try:  # the strategy's own checks name the bad value
                dataclasses.replace(strategy, **{name: float(value)})
            except ValueError as error:
                raise ValueError(f"sweep[{name!r}]: {error}") from None
        columns.append(tuple(float(v) for v in values))
    grid = _Grid(tuple(sweep), tuple(itertools.product(*columns)))
    for config in grid.listing():  # checks that relate fields to each other
        try:
            dataclasses.replace(strategy, **config)
        except ValueError as error:
            raise ValueError(f"sweep config {config}: {error}") from None
    return grid


def _valid_rows(out: _Segment) -> dict[str, np.ndarray]:
    """A segment's per-iteration metrics, cut to the most iterations any seed ran."""
    rows = int(np.max(np.asarray(out.iterations)))
    return {k: np.asarray(v)[..., :rows] for k, v in out.metrics.items()}


def _append(history: dict, returns, env_steps, metrics: dict) -> dict:
    """History with one more evaluation; metrics concatenate along the iteration axis."""
    out = {
        **history,
        "eval_return": np.concatenate([history["eval_return"], returns[None]]),
        "env_steps": np.concatenate([history["env_steps"], env_steps[None]]),
        "seconds": np.concatenate([history["seconds"], history["seconds"][-1:]]),
    }
    for name, value in metrics.items():
        key = f"metric/{name}"
        out[key] = np.concatenate([history[key], value], axis=-1) if key in history else value
    return out


class _Log:
    """`log_dir/log.jsonl`: one JSON line per evaluation, written as it happens."""

    def __init__(self, log_dir, strategy, env):
        self.path = None
        if log_dir is not None:
            self.path = checkpoint.check_writable(log_dir) / "log.jsonl"
            self.path.write_text("")
            self.label = {"strategy": type(strategy).__name__, "env": env.name}

    def write(self, index: int, history: dict, metrics: dict) -> None:
        if self.path is None:
            return
        returns = history["eval_return"][-1]
        seconds = history["seconds"][-1]
        line = {
            **self.label,
            "eval": index,
            "env_steps": float(np.mean(history["env_steps"][-1])),
            "train_seconds": float(seconds[0]),
            "eval_seconds": float(seconds[1]),
            "eval_return_mean": float(np.mean(returns)),
            "eval_return_per_seed": np.mean(returns, axis=-1).reshape(-1).tolist(),
            **{f"{k}_mean": float(np.nanmean(v)) for k, v in metrics.items() if v.size},
        }
        with self.path.open("a") as f:
            f.write(json.dumps(line) + "\n")


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

    def update(self, history: dict) -> None:
        env_steps = int(np.mean(history["env_steps"][-1]))
        if self.bar is not None:
            self.bar.update(env_steps - self.done)
            self.bar.set_postfix(eval_return=f"{np.mean(history['eval_return'][-1]):.1f}")
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
    log_dir: str | os.PathLike | None = None,
    seed_index: int = 0,
) -> Run:
    """Train `policy` on `env` with `strategy` for `total_steps` env steps.

    **Budget.** `total_steps` counts the env steps that feed updates, the same way for
    every strategy (`strategy.steps_per_iteration` per iteration; ES counts only the steps
    inside each member's scored episode). The run executes the number of iterations
    whose count is nearest `total_steps`, spread over `num_evals - 1` segments that differ
    by at most one iteration (see `Plan`); `run.curve.env_steps` records the real count at
    every evaluation and `run.config["total_steps"]` the final one. A budget of fewer
    iterations than intervals evaluates after every iteration instead, with a warning.

    **Evaluation.** At `num_evals` points, the first before any training and the last at
    the end, the deterministic policy plays `num_eval_episodes` full episodes; they stop
    stepping once all have ended. Their starts come from a key fixed per seed index
    (seed `i` of `train_seeds` gets the same episodes under every strategy: paired
    comparisons), so start-state variance is part of the spread across seeds.

    **Clock.** Training, evaluation and checkpoint writing are timed apart:
    `run.curve.wall_time` counts training only; `run.config` has `train_seconds`,
    `eval_seconds`, `checkpoint_seconds` and `compile_seconds` (tracing and XLA, or loading
    from the persistent cache). Inputs are validated before anything compiles.

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
    - `seed_index`: which seed of a study this run is: it picks the evaluation episodes
      (`train(..., key=keys[i], seed_index=i)` is seed `i` of `train_seeds`).
    - `log_dir`: if given, `log_dir/log.jsonl` gets one JSON line per evaluation as it
      happens (env steps, seconds, mean return overall and per seed, mean of each training
      metric over the segment): `pandas.read_json(path, lines=True)` reads it while the
      run goes on. Checked for writability before anything compiles.
    - `devices`: where to run (default `jax.devices()`). With several, the strategy's
      batch (`strategy.batch_size`: PPO's and APG's envs, ES's population) and the
      evaluation episodes are split over them along a `Mesh` axis `"batch"`, with
      `NamedSharding`s; the batch must divide evenly. Results equal the one-device run's
      up to float reassociation in the cross-device sums.

    **Returns:** a `Run` with `policy`, `curve` (`LearningCurve`, `E = num_evals`),
    `metrics` (`Float[Array, "iterations"]` each, one entry per iteration, including
    `"env_steps"`, the steps it counted) and `config`.

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
        log_dir=log_dir,
        seed_index=seed_index,
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
    log_dir: str | os.PathLike | None = None,
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
        log_dir=log_dir,
        seeds=True,
    )


def train_sweep(
    strategy: AbstractStrategy,
    env: Env,
    policy: PolicyOrFactory,
    *,
    sweep: Mapping[str, Any],
    keys: Keys,
    total_steps: int,
    num_evals: int = 20,
    num_eval_episodes: int = 16,
    progress: bool = True,
    devices: Sequence[jax.Device] | None = None,
) -> Run:
    """`train_seeds` over every combination of float hyperparameters: one compiled program.

    `sweep` maps names of float fields of `strategy` (`learning_rate`, `std`,
    `entropy_coef`, `discount`, `actor_learning_rate`, ...) to lists of values. The
    configs are `itertools.product` of the lists in the dict's order (the last name varies
    fastest), and config `c`, seed `s` is exactly `train_seeds(dataclasses.replace(strategy,
    **run.config["sweep"][c]), ..., keys=keys)[s]`, up to float reassociation: the swept
    fields are traced values instead of constants, and all `C x S` runs are one batch (a
    `vmap` over runs, split over devices as seeds are in `train_seeds`). Seed `s` gets the
    same key, initial policy and evaluation episodes under every config (paired).

    Fields that set shapes or control flow (`num_envs`, `horizon`, `population_size`,
    flags, names) cannot vary inside one program: sweeping one is a `ValueError` that
    says to loop over `train_seeds` instead. So is an unknown name, an empty list, or a
    value the strategy itself rejects (each value is checked with `dataclasses.replace`),
    all before anything compiles. A float field that the strategy's code branches on in
    Python (ES's `weight_decay`) fails when traced, also with a `ValueError`, before XLA
    compiles. The values replace the fields after `train`'s `for_env` and `for_budget` (so
    PPO's learning-rate decay starts from each config's rate). Checkpoints are not
    supported for sweeps.

    **Returns:** a `Run` whose `policy`, `curve` and `metrics` leaves have leading axes
    `(C, S)`: `C = prod(len(v) for v in sweep.values())` configs and `S = len(keys)` seeds,
    e.g. `curve.eval_return: Float[Array, "C S E episodes"]`. `run.config["sweep"]` lists
    the configs in axis order (`[{"learning_rate": 1e-4}, ...]`), `num_configs` is `C` and
    `hyperparameters[name]` holds one value per config. `compile_seconds` and
    `train_seconds` are for the whole grid. `Run.save` / `load_run` round-trip it.

    **Example:**

    ```python
    run = diffsim.train_sweep(
        diffsim.PPO(), env, make_policy,
        sweep={"learning_rate": [1e-4, 3e-4, 1e-3], "entropy_coef": [0.0, 0.01]},
        keys=jax.random.split(key, 5), total_steps=200_000,
    )
    run.curve.eval_return.shape     # (6, 5, 20, 16): configs, seeds, evaluations, episodes
    run.config["sweep"][1]          # {"learning_rate": 0.0001, "entropy_coef": 0.01}
    final = run.curve.eval_return[:, :, -1].mean(-1)   # (6, 5): one score per config and seed
    ```
    """
    grid = _sweep_grid(strategy, sweep)
    if not hasattr(keys, "shape") or len(keys) < 1:
        raise ValueError(f"keys must be a non-empty batch of PRNG keys, got {keys!r}")
    return _execute(
        dataclasses.replace(strategy, **grid.listing()[0]),  # the template; fields replaced
        env,
        policy,
        keys,
        total_steps=total_steps,
        num_evals=num_evals,
        num_eval_episodes=num_eval_episodes,
        progress=progress,
        devices=devices,
        seeds=True,
        grid=grid,
    )
