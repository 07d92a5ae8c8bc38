"""Throughput of the rollout core against a hand-written loop, and of PPO.

    python studies/rollout_benchmark.py [--envs inverted_pendulum reach] [--batch 128]

For each env: env steps/s of `diffsim.rollout` and of a hand-written `vmap`/`scan`
loop over `env.step` that records the same data with the same policy (sampling with
log-probabilities, and deterministic), then of one `PPO.step`. Everything is compiled and
warmed up first; compile time is reported apart. Prints a table and writes
results/benchmarks/rollout.json.
"""

import argparse
import functools
import json
import time
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np

import diffsim


def hand_written(env, policy, state, key, *, length, deterministic):
    """The loop one would write without diffsim: scan over time, vmap over envs."""

    def body(state, key):
        keys = jr.split(key, state.obs.shape[0])
        if deterministic:
            action = jax.vmap(policy)(state.obs)
            log_prob = jnp.zeros(state.obs.shape[0])
        else:
            action = jax.vmap(lambda o, k: policy(o, key=k))(state.obs, keys)
            log_prob = jax.vmap(policy.log_prob)(state.obs, action)
        next_state = jax.vmap(env.step)(state, action)
        info = next_state.info  # the same fields diffsim.rollout records
        return next_state, (
            state.obs,
            action,
            next_state.reward,
            next_state.done,
            log_prob,
            info["truncation"],
            info["final_obs"],
            info["episode_return"],
        )

    return jax.lax.scan(body, state, jr.split(key, length))


def core(env, policy, state, key, *, length, deterministic):
    return diffsim.rollout(env, policy, state, key=key, length=length, deterministic=deterministic)


def ppo_step(ppo, env, state, key):
    return ppo.step(env, state, key=key)


def compile_timed(fn, *args):
    """(compiled fn, compile seconds), warmed up once."""
    tic = time.perf_counter()
    compiled = eqx.filter_jit(fn).lower(*args).compile()
    compile_s = time.perf_counter() - tic
    jax.block_until_ready(compiled(*args))
    return compiled, compile_s


def interleaved(compiled_fns, args, repeats):
    """Median seconds per call of each compiled fn, timed alternately so that machine
    noise and drift hit all of them alike."""
    times = [[] for _ in compiled_fns]
    for _ in range(repeats):
        for i, fn in enumerate(compiled_fns):
            tic = time.perf_counter()
            jax.block_until_ready(fn(*args))
            times[i].append(time.perf_counter() - tic)
    return [float(np.median(t)) for t in times]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--envs", nargs="+", default=["inverted_pendulum", "reach"])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--length", type=int, default=500)
    parser.add_argument("--repeats", type=int, default=40)
    parser.add_argument("--out", default="results/benchmarks/rollout.json")
    return parser.parse_args()


def measure_env(name: str, *, batch: int, length: int, repeats: int) -> list[dict]:
    """The rows of one env: hand-written loop and `diffsim.rollout` (sampled, deterministic),
    then one `PPO.step`."""
    rows = []
    env = diffsim.make_env(name)
    policy = diffsim.GaussianPolicy(env.observation_size, env.action_size, key=jr.key(0))
    state = diffsim.reset(env, key=jr.key(1), num_envs=batch)
    steps = batch * length
    for deterministic in (False, True):
        mode = "deterministic" if deterministic else "sampled"
        args_ = (policy, state, jr.key(2))
        fns = [
            functools.partial(f, env, length=length, deterministic=deterministic)
            for f in (hand_written, core)
        ]
        compiled = [compile_timed(f, *args_) for f in fns]
        seconds = interleaved([c for c, _ in compiled], args_, repeats)
        for label, (_, compile_s), secs in zip(
            ("hand-written", "diffsim.rollout"), compiled, seconds, strict=True
        ):
            rows.append(
                dict(
                    env=name,
                    what=f"{label} ({mode})",
                    steps_per_s=steps / secs,
                    compile_s=compile_s,
                )
            )
    ppo = diffsim.PPO(num_envs=batch, unroll_length=16, num_minibatches=16)
    ppo_state = ppo.init(env, policy, key=jr.key(3))
    step = functools.partial(ppo_step, ppo, env)
    compiled, compile_s = compile_timed(step, ppo_state, jr.key(4))
    (secs,) = interleaved([compiled], (ppo_state, jr.key(4)), repeats)
    rows.append(
        dict(
            env=name,
            what=f"PPO.step ({batch} envs x 16, {ppo.num_epochs}x{ppo.num_minibatches} minibatches)",
            steps_per_s=ppo.steps_per_iteration / secs,
            compile_s=compile_s,
        )
    )
    return rows


def print_rows(rows: list[dict]) -> None:
    print(f"\n{'env':<20}{'what':<52}{'env steps/s':>14}{'compile s':>11}")
    for r in rows:
        print(f"{r['env']:<20}{r['what']:<52}{r['steps_per_s']:>14,.0f}{r['compile_s']:>11.1f}")


def add_ratios(envs: list[str], rows: list[dict]) -> None:
    """Prints and appends to `rows` the ratio core / hand-written of each env and mode."""
    by = {(r["env"], r["what"]): r["steps_per_s"] for r in rows}
    print()
    for name in envs:
        for mode in ("sampled", "deterministic"):
            ratio = by[(name, f"diffsim.rollout ({mode})")] / by[(name, f"hand-written ({mode})")]
            print(f"{name}: diffsim.rollout / hand-written ({mode}) = {ratio:.3f}")
            rows.append(dict(env=name, what=f"ratio core/hand-written ({mode})", ratio=ratio))


def main():
    args = parse_args()
    rows = []
    for name in args.envs:
        rows += measure_env(name, batch=args.batch, length=args.length, repeats=args.repeats)
    print_rows(rows)
    add_ratios(args.envs, rows)
    meta = dict(
        batch=args.batch,
        length=args.length,
        devices=[str(d) for d in jax.devices()],
        versions=diffsim.results.versions(),
    )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(dict(meta=meta, rows=rows), indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
