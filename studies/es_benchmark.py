"""ES generation throughput next to the raw rollout core at the same batch size.

One ES generation rolls out `population x episodes` envs for `length` steps (one
`vmap` over `diffsim.rollout`) and then asks/tells evosax and updates the normaliser.
Three programs, each `generations` iterations of `population x episodes` envs for
`length` steps:

- `es`: `ES.step` (ask, population rollouts, tell, normaliser, best member);
- `population_rollout`: the same population rollouts alone (`ES.evaluate_population`), so
  `es / population_rollout - 1` is the cost of evosax and bookkeeping (should be < 10%);
- `rollout_core`: `diffsim.rollout` with ONE policy on the same batch, the raw core; the
  gap to `population_rollout` is the cost of per-member parameters.

Both programs are jitted and warmed up first; compile time is reported separately.
Numbers go to `results/es_benchmark.json`.

    .venv/bin/python studies/es_benchmark.py --env inverted_pendulum --backend spring
"""

import argparse
import json
import os
import time
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np

os.environ.setdefault("DIFFSIM_CACHE_DIR", "0")  # measure real compiles, not cache loads
import diffsim  # noqa: E402


def compile_and_time(programs: dict, *, repeats: int) -> dict[str, tuple[float, float]]:
    """`{name: (compile seconds, median seconds per call)}` of jitted `(fn, *args)` programs.

    The timed calls are interleaved (one call of each program per round), so a change in
    the machine's load affects all programs alike.
    """
    compiled, compile_seconds = {}, {}
    for name, (fn, *args) in programs.items():
        tic = time.perf_counter()
        compiled[name] = jax.jit(fn).lower(*args).compile()
        compile_seconds[name] = time.perf_counter() - tic
        jax.block_until_ready(compiled[name](*args))  # warm up
    times = {name: [] for name in programs}
    for _ in range(repeats):
        for name, (_, *args) in programs.items():
            tic = time.perf_counter()
            jax.block_until_ready(compiled[name](*args))
            times[name].append(time.perf_counter() - tic)
    return {name: (compile_seconds[name], float(np.median(times[name]))) for name in programs}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--env", default="inverted_pendulum")
    parser.add_argument("--backend", default="spring")
    parser.add_argument("--population", type=int, default=64)
    parser.add_argument("--episodes", type=int, default=2, help="episodes per member")
    parser.add_argument("--length", type=int, default=200, help="rollout length")
    parser.add_argument("--generations", type=int, default=5, help="generations per timed call")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--hidden", type=int, nargs="*", default=[32, 32])
    parser.add_argument("--out", default="results/es_benchmark.json")
    return parser.parse_args()


def es_programs(args: argparse.Namespace, env, es: diffsim.ES, policy, num_envs: int) -> dict:
    """The three programs (`es`, `population_rollout`, `rollout_core`) with their arguments."""

    def es_generations(state, key):
        step = lambda s, k: es.step(env, s, key=k)
        state, metrics = jax.lax.scan(step, state, jr.split(key, args.generations))
        return state.policy, metrics["train_return"]  # keep the result alive

    def rollouts(policy, key):
        def one(carry, key):
            reset_key, act_key = jr.split(key)
            state = diffsim.reset(env, key=reset_key, num_envs=num_envs)
            _, traj = diffsim.rollout(
                env, policy, state, key=act_key, length=args.length, deterministic=True
            )
            return carry + jnp.sum(traj.reward) + jnp.sum(traj.obs), None

        total, _ = jax.lax.scan(one, jnp.zeros(()), jr.split(key, args.generations))
        return total

    def population_rollouts(state, population, key):
        def one(carry, key):
            returns = es.evaluate_population(env, state, population, key=key)
            return carry + jnp.sum(returns), None

        total, _ = jax.lax.scan(one, jnp.zeros(()), jr.split(key, args.generations))
        return total

    state = es.init(env, policy, key=jr.key(0))
    # A population like the ones ES samples: the mean plus small noise.
    population = jax.tree.map(
        lambda x: x + 0.05 * jr.normal(jr.key(3), (args.population, *x.shape)),
        eqx.filter(policy, diffsim.trainable(policy)),
    )
    return {
        "es": (es_generations, state, jr.key(2)),
        "population_rollout": (population_rollouts, state, population, jr.key(2)),
        "rollout_core": (rollouts, policy, jr.key(2)),
    }


def summary(
    args: argparse.Namespace, env, num_envs: int, steps_per_call: int, timings: dict
) -> dict:
    """What `results/es_benchmark.json` records: the setting, each program's rates, overheads."""
    return {
        "env": args.env,
        "backend": env.backend,
        "population": args.population,
        "episodes_per_member": args.episodes,
        "num_envs": num_envs,
        "rollout_length": args.length,
        "generations_per_call": args.generations,
        "env_steps_per_call": steps_per_call,
        "devices": [str(d) for d in jax.devices()],
        **{
            name: {
                "compile_seconds": compile_seconds,
                "seconds_per_generation": seconds / args.generations,
                "env_steps_per_second": steps_per_call / seconds,
            }
            for name, (compile_seconds, seconds) in timings.items()
        },
        # ES over the same population rollouts: evosax ask/tell, normaliser, best member.
        "es_bookkeeping_fraction": timings["es"][1] / timings["population_rollout"][1] - 1.0,
        # ES over one policy's rollouts: also the cost of per-member parameters.
        "es_overhead_fraction": timings["es"][1] / timings["rollout_core"][1] - 1.0,
    }


def print_summary(
    args: argparse.Namespace, env, num_envs: int, timings: dict, result: dict
) -> None:
    print(
        f"{args.env} ({env.backend}): {args.population} members x {args.episodes} episodes"
        f" = {num_envs} envs, {args.length} steps, {args.generations} generations per call"
    )
    print(f"{'':>20} {'compile s':>10} {'s / gen':>9} {'env steps/s':>12}")
    for name in timings:
        r = result[name]
        print(
            f"{name:>20} {r['compile_seconds']:>10.1f} {r['seconds_per_generation']:>9.4f}"
            f" {r['env_steps_per_second']:>12,.0f}"
        )
    print(
        f"evosax ask/tell + bookkeeping: {100 * result['es_bookkeeping_fraction']:+.1f}%"
        f" of the population rollouts"
    )
    print(f"ES over the rollout core with one policy: {100 * result['es_overhead_fraction']:+.1f}%")


def main() -> None:
    args = parse_args()
    backend = args.backend if args.env not in diffsim.envs.toy_names() else None
    env = diffsim.make_env(args.env, backend=backend, episode_length=max(args.length, 1000))
    policy = diffsim.DeterministicPolicy(
        env.observation_size, env.action_size, hidden=tuple(args.hidden), key=jr.key(1)
    )
    num_envs = args.population * args.episodes
    es = diffsim.ES(
        population_size=args.population,
        episodes_per_member=args.episodes,
        rollout_length=args.length,
    )
    steps_per_call = args.generations * es.steps_per_iteration
    timings = compile_and_time(es_programs(args, env, es, policy, num_envs), repeats=args.repeats)
    result = summary(args, env, num_envs, steps_per_call, timings)
    print_summary(args, env, num_envs, timings, result)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
