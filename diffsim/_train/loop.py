"""The host side of a run: checks, compiling, then one segment and one evaluation at a
time, timed apart, checkpointed, logged; the history becomes a `Run` at the end.

The host only starts compiled segments (`_program`), reads the clock and reports in
between, so every finished segment is on the host if a run dies.
"""

import os
import time
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from .._types import LearningCurve
from ..results import Run, run_config
from ..sharding import SEEDS, gather, make_mesh, put
from ..strategies.base import AbstractStrategy
from . import checkpoint, program as _program
from .contract import check_env_steps, check_hashable, check_inputs, warn_vanishing
from .log import Log, Progress
from .plan import make_plan
from .program import Job, Program
from .sweep import Grid


class Options(eqx.Module):
    """The keyword arguments of `train` (see there), checked. `seeds`: the keys are a
    batch of runs (`train_seeds`); `grid`: the sweep of `train_sweep`."""

    total_steps: int
    num_evals: int
    num_eval_episodes: int
    progress: bool
    seeds: bool
    checkpoint_dir: str | os.PathLike | None = None
    checkpoint_every: int = 1
    resume_from: str | os.PathLike | None = None
    devices: Sequence[jax.Device] | None = None  # pyright: ignore[reportInvalidTypeForm]
    log_dir: str | os.PathLike | None = None
    seed_index: int = 0
    grid: Grid | None = None

    def __check_init__(self):
        if not isinstance(self.checkpoint_every, int) or self.checkpoint_every < 1:
            raise ValueError(
                f"checkpoint_every must be a positive int, got {self.checkpoint_every!r}"
            )
        index = self.seed_index
        if not isinstance(index, int) or isinstance(index, bool) or index < 0:
            raise ValueError(f"seed_index must be an int >= 0, got {index!r}")


class Setup(eqx.Module):
    """Everything the host loop reads and never changes: the compiled program and the
    batch of runs it trains (`lead`: the result's leading axes, `()`, `(seeds,)` or
    `(configs, seeds)`; `index`: each run's seed index, which picks its evaluation
    episodes; `meta`: what a checkpoint must match to be resumed)."""

    job: Job
    options: Options
    program: Program
    params: Any
    keys: Any
    hyper: Any
    index: Any
    lead: tuple[int, ...]
    meta: dict
    log: Log
    compile_seconds: float


class Clock:
    """Seconds spent training, evaluating and checkpointing, each summed on its own."""

    def __init__(self, train: float = 0.0, evaluation: float = 0.0, checkpoint: float = 0.0):
        self.seconds = {"train": train, "eval": evaluation, "checkpoint": checkpoint}

    def time(self, what: str, fn: Callable, *args):
        tic = time.perf_counter()
        out = jax.block_until_ready(fn(*args))
        self.seconds[what] += time.perf_counter() - tic
        return out


def run(strategy, env, policy, keys, options: Options) -> Run:
    """`train`, `train_seeds` and `train_sweep` once their own arguments are checked."""
    setup = _setup(strategy, env, policy, keys, options)
    carry, history, done = _begin(setup)
    clock = Clock(*history["seconds"][-1])  # a resumed run's clocks continue
    main = jax.process_index() == 0  # across processes, one bar
    bar = Progress(setup.job.plan, setup.job.strategy, env, enabled=options.progress and main)
    bar.update(history)
    for i in range(done + 1, setup.job.plan.num_evals):
        carry, history = _advance(setup, i, carry, history, clock)
        bar.update(history)
        if i == done + 1:  # once per call, on the first segment's updates
            policy = gather(setup.job.strategy.policy(carry.state))
            warn_vanishing(setup.job.strategy, policy, _metrics(history), batched=options.seeds)
    bar.close()
    return _finish(setup, carry, history)


def _prepare(strategy, env, policy, options: Options) -> tuple[AbstractStrategy, Any]:
    """The checks before compiling, in the order of the strategy contract: `check`,
    `for_env`, the step counts (the plan), `for_budget`, then `batch_size`."""
    check_inputs(strategy, env, policy, options.num_eval_episodes)
    strategy = strategy.for_env(env)
    plan = make_plan(strategy, options.total_steps, options.num_evals)
    strategy = strategy.for_budget(options.total_steps)
    check_hashable(strategy)
    size = strategy.batch_size
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise ValueError(
            f"{type(strategy).__name__}.batch_size must be a positive int, got {size!r}"
        )
    saving = options.checkpoint_dir is not None or options.resume_from is not None
    if saving and jax.process_count() > 1:
        raise ValueError(
            f"checkpoint_dir and resume_from work in one process only, not across the"
            f" {jax.process_count()} processes of jax.distributed"
        )
    if options.checkpoint_dir is not None:
        checkpoint.check_writable(options.checkpoint_dir)  # fail before compiling
    resume = options.resume_from
    if resume is not None and checkpoint.latest(Path(resume)) is None:
        raise FileNotFoundError(f"resume_from={str(resume)!r} holds no complete checkpoint")
    return strategy, plan


def _setup(strategy, env, policy, keys, options: Options) -> Setup:
    strategy, plan = _prepare(strategy, env, policy, options)
    log = Log(options.log_dir if jax.process_index() == 0 else None, strategy, env)
    # A sweep trains its configs x seeds as one flat batch of runs (config-major), each with
    # its config's values in `hyper`; its arrays get the axes `(configs, seeds)` at the end.
    # `index`: each run's seed index, which picks its evaluation episodes.
    lead: tuple[int, ...] = (len(keys),) if options.seeds else ()
    first = options.seed_index
    index = np.arange(first, first + len(keys)) if options.seeds else np.asarray(first)
    hyper, grid = None, options.grid
    if grid is not None:
        lead, hyper = (len(grid.configs), len(keys)), grid.per_run(len(keys))
        index = np.tile(index, len(grid.configs))
        keys = keys[index]
    runs = len(keys) if options.seeds else None
    mesh = make_mesh(
        options.devices,
        num_seeds=runs,
        batch_size=strategy.batch_size,
        owner=type(strategy).__name__,
    )
    job = Job(strategy, env, policy, plan, options.num_eval_episodes, options.seeds, mesh)
    meta = _meta(job, keys)
    if mesh is not None:  # across processes too: every process holds the same host values
        where = NamedSharding(mesh, P(SEEDS) if options.seeds else P())
        keys, hyper, index = put((keys, hyper, index), where)
    tic = time.perf_counter()
    program, params = _compile(job, keys, hyper, grid)
    seconds = time.perf_counter() - tic  # tracing + XLA (or cache loading); 0 if reused
    if mesh is not None:
        params = put(params, NamedSharding(mesh, P()))
    return Setup(job, options, program, params, keys, hyper, index, lead, meta, log, seconds)


def _compile(job: Job, keys, hyper, grid: Grid | None) -> tuple[Program, Any]:
    try:
        return _program.compile_run(job, keys, hyper)
    except (
        jax.errors.ConcretizationTypeError,
        jax.errors.TracerIntegerConversionError,
        jax.errors.TracerArrayConversionError,
    ) as error:
        if grid is None:
            raise
        raise ValueError(grid.untraceable(job.strategy, error)) from error


def _meta(job: Job, keys) -> dict:
    """What a checkpoint records of its run, to refuse resuming a different one."""
    plan, env = job.plan, typing.cast(Any, job.env)  # a diffsim env: named
    return {
        "strategy": repr(job.strategy),
        "env": env.name,
        "episode_length": env.episode_length,
        "plan": [list(plan.targets), plan.steps_per_iteration, plan.max_iterations],
        "num_eval_episodes": job.num_eval_episodes,
        "seeds": job.seeds,
        "keys": checkpoint.key_data(keys).tolist(),
    }


def _begin(setup: Setup) -> tuple[Any, dict[str, np.ndarray], int]:
    """The carry and history after the first evaluation, or where a checkpoint left them:
    `(carry, history, index of the last evaluation done)`."""
    program, options = setup.program, setup.options
    if options.resume_from is not None:
        carry, history, done = checkpoint.load(options.resume_from, program.carry_shape, setup.meta)
        if program.carry_sharding is not None:
            carry = jax.device_put(carry, program.carry_sharding)
        return carry, history, done
    clock = Clock()
    carry = clock.time("train", program.start, setup.params, setup.keys, setup.hyper)
    returns = np.asarray(gather(clock.time("eval", program.evaluate, carry, setup.index)))
    history = {
        "eval_return": returns[None],
        "env_steps": np.asarray(gather(carry.env_steps))[None],
        "seconds": np.array([list(clock.seconds.values())]),
    }
    setup.log.write(0, history, {})
    return carry, history, 0


def _advance(setup: Setup, i: int, carry, history: dict, clock: Clock):
    """Train segment `i`, evaluate, check the step counts, checkpoint and log."""
    program, plan, options = setup.program, setup.job.plan, setup.options
    carry, out = clock.time("train", program.segment, carry, np.int32(plan.targets[i]))
    returns = np.asarray(gather(clock.time("eval", program.evaluate, carry, setup.index)))
    metrics = _valid_rows(gather(out))
    counts = metrics["env_steps"]
    check_env_steps(
        setup.job.strategy, counts, plan.min_steps_per_iteration, plan.steps_per_iteration
    )
    history = _append(history, returns, np.asarray(gather(carry.env_steps)), metrics)
    due = i % options.checkpoint_every == 0 or i == plan.num_evals - 1
    if options.checkpoint_dir is not None and due:
        history["seconds"][-1] = list(clock.seconds.values())
        where = Path(options.checkpoint_dir)
        clock.time("checkpoint", checkpoint.save, where, i, carry, history, setup.meta)
    history["seconds"][-1] = list(clock.seconds.values())
    setup.log.write(i, history, metrics)
    return carry, history


def _valid_rows(out: _program.Segment) -> dict[str, np.ndarray]:
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


def _metrics(history: dict) -> dict[str, np.ndarray]:
    return {k[len("metric/") :]: v for k, v in history.items() if k.startswith("metric/")}


def _finish(setup: Setup, carry, history: dict) -> Run:
    """The `Run` of the history (evaluations first, moved behind the run axes)."""
    seeds, grid = setup.options.seeds, setup.options.grid
    axis = 1 if seeds else 0
    times = history["seconds"][:, 0].astype(np.float32)
    curve = LearningCurve(
        env_steps=jnp.asarray(np.moveaxis(history["env_steps"], 0, axis)),
        wall_time=jnp.asarray(np.tile(times, (len(setup.keys), 1)) if seeds else times),
        eval_return=jnp.asarray(np.moveaxis(history["eval_return"], 0, axis)),
    )
    metrics = {k: jnp.asarray(v) for k, v in _metrics(history).items()}
    policy = gather(setup.job.strategy.policy(carry.state))
    run = Run(policy=policy, curve=curve, metrics=metrics, config=_config(setup, history, metrics))
    return run if grid is None else grid.unflatten(run, (setup.lead[0], setup.lead[1]))


def _config(setup: Setup, history: dict, metrics: dict) -> dict:
    job, seconds = setup.job, history["seconds"]  # [E, 3]: train, eval, checkpoint, cumulative
    budget = {
        "total_steps_requested": setup.options.total_steps,
        "total_steps": int(np.max(history["env_steps"][-1])),
        "num_evals": job.plan.num_evals,
        "steps_per_iteration": job.plan.steps_per_iteration,
        "iterations": int(np.max(np.sum(np.isfinite(metrics["env_steps"]), axis=-1))),
    }
    return run_config(
        job.strategy,
        job.env,
        budget,
        num_eval_episodes=job.num_eval_episodes,
        num_seeds=setup.lead[-1] if job.seeds else None,
        compile_seconds=setup.compile_seconds,
        train_seconds=float(seconds[-1, 0]),
        eval_seconds=float(seconds[-1, 1]),
        checkpoint_seconds=float(seconds[-1, 2]),
        mesh=None if job.mesh is None else dict(job.mesh.shape),
    )
