"""The compiled program of a run, and the cache that reuses it across identical calls.

A program is three executables over one carry: `start(params, keys, hyper)` (initial
state), `segment(carry, target)` (iterations until the env-step count is nearest
`target`, one `lax.while_loop`) and `evaluate(carry, seed_index)`. Keeping host
callbacks out of them lets JAX's persistent compilation cache store them (JAX refuses to
cache executables that call back to the host), so a second run of the same
configuration does not recompile.
"""

import functools
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray

from .._config import compiler_options
from .._types import Env
from ..rollout import evaluate
from ..sharding import SEEDS, shard_seeds
from ..strategies.base import AbstractStrategy
from .contract import check_step
from .plan import Plan

PolicyOrFactory = eqx.Module | Callable[[PRNGKeyArray], eqx.Module]
EVAL_SEED = 0  # evaluation episodes are drawn from this key (folded with the seed index)


class Carry(eqx.Module):
    state: Any
    key: PRNGKeyArray
    env_steps: Int[Array, ""]  # env steps counted so far (what fed an update)
    last_steps: Int[Array, ""]  # env steps of the latest iteration
    hyper: dict[str, Float[Array, ""]] | None  # this run's swept hyperparameters (train_sweep)


class Segment(eqx.Module):
    metrics: dict[str, Float[Array, "*seeds rows"]]  # one row per iteration, NaN past the end
    iterations: Int[Array, "*seeds"]


class Job(eqx.Module):
    """What a program computes, apart from its arrays: `seeds` batches whole runs (a
    sweep's configs x seeds, flattened); `mesh` is None on one device."""

    strategy: AbstractStrategy  # after for_env and for_budget
    env: Env
    policy: PolicyOrFactory
    plan: Plan
    num_eval_episodes: int
    seeds: bool
    mesh: Mesh | None


class Program(eqx.Module):
    """The compiled parts of a run, each timed on its own. `hyper` holds the swept
    hyperparameters of each run (`train_sweep`), else None."""

    start: Callable
    segment: Callable
    evaluate: Callable
    carry_shape: Any  # abstract `Carry`, to restore checkpoints into
    carry_sharding: Any  # where each leaf of the carry lives (None on one device)


# Compiled runs kept for reuse by a later identical call, newest last. Bounded: each XLA CPU
# executable holds hundreds of memory maps, and a process past the kernel's
# vm.max_map_count (65,530 by default) aborts in its next compile (`release_programs`).
PROGRAMS: OrderedDict[Any, Program] = OrderedDict()
MAX_PROGRAMS = 8
MAX_MAP_COUNT = "/proc/sys/vm/max_map_count"


def release_programs(share: float = 0.5) -> bool:
    """Drop every kept program and JAX's caches of compiled functions once this process
    holds more than `share` of the memory maps Linux allows a process; returns whether it
    did.

    XLA's CPU backend keeps each compiled kernel's code, constants and data mapped (three
    maps a kernel, thousands for a program that trains on a Brax body) while the program is
    cached, so a few programs of that size reach the limit (`vm.max_map_count`, 65,530 by
    default) whatever `MAX_PROGRAMS` says, and LLVM then fails to compile with "Cannot
    allocate memory" (a study process training a grid of cells crashed so). Below the
    share nothing is dropped. No-op where `/proc` is absent."""
    try:
        with open(MAX_MAP_COUNT) as limit:
            over = memory_maps() > share * int(limit.read())
    except (OSError, ValueError):
        return False
    if over:
        drop_programs()
    return over


def drop_programs() -> None:
    """Drop every kept program and JAX's caches of compiled functions."""
    PROGRAMS.clear()
    jax.clear_caches()


def memory_maps() -> int:
    """The memory maps this process holds (Linux's /proc; OSError elsewhere)."""
    with open("/proc/self/maps", "rb") as maps:
        return sum(1 for _ in maps)


def compile_run(job: Job, keys, hyper) -> tuple[Program, Any]:
    """Compile (or reuse) the run's program; returns it and the policy's arrays."""
    params, static = (
        eqx.partition(job.policy, eqx.is_array)
        if isinstance(job.policy, eqx.Module)
        else (None, job.policy)
    )
    signature = jax.tree.map(lambda x: (x.shape, x.dtype), (params, keys, hyper))
    parts = (job.strategy, job.env, static, job.plan, job.num_eval_episodes, job.seeds)
    memo = (*parts, job.mesh, jax.tree.structure(params), str(signature))
    try:
        program = PROGRAMS.get(memo)
    except TypeError:  # something unhashable in a user's policy: compile every time
        memo = program = None
    if program is None:
        release_programs()
        program = _build(job, params, keys, hyper)
        if memo is not None:
            PROGRAMS[memo] = program
            while len(PROGRAMS) > MAX_PROGRAMS:
                PROGRAMS.popitem(last=False)
    elif memo is not None:
        PROGRAMS.move_to_end(memo)
    return program, params


def _configured(job: Job, hyper) -> AbstractStrategy:
    """The strategy of one run: a sweep's fields hold that run's (traced) values."""
    if hyper is None:
        return job.strategy
    names = sorted(hyper)
    fields = lambda s: [getattr(s, name) for name in names]
    return eqx.tree_at(fields, job.strategy, [hyper[name] for name in names])


def _start(job: Job, params, key, hyper) -> Carry:
    policy_key, init_key, run_key = jr.split(key, 3)
    if isinstance(job.policy, eqx.Module):
        policy = eqx.combine(params, eqx.partition(job.policy, eqx.is_array)[1])
    else:
        policy = job.policy(policy_key)
    state = _configured(job, hyper).init(job.env, policy, key=init_key)
    zero = jnp.zeros((), jnp.int32)
    return Carry(state, run_key, zero, zero + job.plan.steps_per_iteration, hyper)


def _evaluate(job: Job, carry: Carry, seed_index) -> Float[Array, " episodes"]:
    # Paired evaluation: episode starts differ between seeds, never between strategies.
    key = jr.fold_in(jr.key(EVAL_SEED), seed_index)
    policy = _configured(job, carry.hyper).policy(carry.state)
    return evaluate(job.env, policy, key=key, num_episodes=job.num_eval_episodes)


def _iteration(job: Job, carry: Carry) -> tuple[Carry, dict[str, Array]]:
    key, step_key = jr.split(carry.key)
    strategy = _configured(job, carry.hyper)
    out = strategy.step(job.env, carry.state, key=step_key)
    check_step(strategy, carry.state, out)  # at trace time: shapes only
    state, metrics = out[0], dict(out[1])
    steps = jnp.asarray(metrics.pop("env_steps", job.plan.steps_per_iteration), jnp.int32)
    metrics = {**metrics, "env_steps": steps.astype(jnp.float32)}
    return Carry(state, key, carry.env_steps + steps, steps, carry.hyper), metrics


def _segment(job: Job, carry: Carry, target) -> tuple[Carry, Segment]:
    rows = job.plan.max_iterations
    iteration = functools.partial(_iteration, job)
    shapes = jax.eval_shape(iteration, carry)[1]
    buffers = {k: jnp.full((rows,), jnp.nan, jnp.float32) for k in shapes}

    def more(loop) -> Bool[Array, ""]:
        carry, _, i = loop
        return (2 * carry.env_steps + carry.last_steps < 2 * target) & (i < rows)

    def body(loop):
        carry, buffers, i = loop
        carry, metrics = iteration(carry)
        buffers = {k: b.at[i].set(metrics[k].astype(jnp.float32)) for k, b in buffers.items()}
        return carry, buffers, i + 1

    carry, buffers, i = jax.lax.while_loop(more, body, (carry, buffers, jnp.zeros((), int)))
    return carry, Segment(buffers, i)


def _functions(job: Job) -> tuple[Callable, Callable, Callable]:
    """`start`, `segment` and `evaluate` of the whole batch of runs. Runs (seeds; a sweep's
    configs x seeds) go over the mesh's "seeds" axis; inside each run, strategies split
    their batch over "batch" (`shard_batch`). Without a mesh both are no-ops."""
    start, segment, evaluate_ = (functools.partial(f, job) for f in (_start, _segment, _evaluate))
    if not job.seeds:
        return start, segment, evaluate_
    then = lambda f: lambda *args: shard_seeds(f(*args))
    return (
        then(jax.vmap(start, in_axes=(None, 0, 0), spmd_axis_name=SEEDS)),
        then(jax.vmap(segment, in_axes=(0, None), spmd_axis_name=SEEDS)),
        then(jax.vmap(evaluate_, spmd_axis_name=SEEDS)),
    )


def _build(job: Job, params, keys, hyper) -> Program:
    functions, args = _functions(job), (params, keys, hyper)
    index = jnp.arange(len(keys)) if job.seeds else jnp.zeros((), int)
    target = jnp.zeros((), jnp.int32)
    if job.mesh is None:
        return _build_local(functions, args, index, target)
    return _build_sharded(job.mesh, job.seeds, functions, args, index, target)


def _build_local(functions, args, index, target) -> Program:
    start, segment, evaluate_ = functions
    carry_shape = jax.eval_shape(start, *args)
    lowered = (  # every trace (and the contract checks in it) before any XLA compile
        jax.jit(start).lower(*args),
        jax.jit(segment, donate_argnums=0).lower(carry_shape, target),
        jax.jit(evaluate_).lower(carry_shape, index),
    )
    options = compiler_options()
    start_c, segment_c, evaluate_c = (f.compile(compiler_options=options) for f in lowered)
    return Program(start_c, segment_c, evaluate_c, carry_shape, None)


def _build_sharded(mesh: Mesh, seeds: bool, functions, args, index, target) -> Program:
    """As `_build_local` over a mesh; the carry keeps the layout `start` gives it."""
    start, segment, evaluate_ = functions
    replicated = NamedSharding(mesh, P())
    by_seed = NamedSharding(mesh, P(SEEDS)) if seeds else replicated
    with jax.set_mesh(mesh):
        carry_shape = jax.eval_shape(start, *args)
        start_c = jax.jit(start, in_shardings=(replicated, by_seed, by_seed))
        start_c = start_c.lower(*args).compile(compiler_options=compiler_options())
        carry_sharding = start_c.output_shardings
        segment_l = jax.jit(
            segment,
            in_shardings=(carry_sharding, replicated),
            out_shardings=(carry_sharding, by_seed),
            donate_argnums=0,
        ).lower(carry_shape, target)
        evaluate_l = jax.jit(
            evaluate_, in_shardings=(carry_sharding, by_seed), out_shardings=by_seed
        ).lower(carry_shape, index)
    options = compiler_options()
    segment_c, evaluate_c = (f.compile(compiler_options=options) for f in (segment_l, evaluate_l))
    return Program(start_c, segment_c, evaluate_c, carry_shape, carry_sharding)
