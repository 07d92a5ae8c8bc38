"""One prepared run for an accelerator: throughput, gradient cost and compile times, one CSV.

    python studies/device_check.py [--out results/device/<device>.csv] [--budget-s 420]
    python studies/device_check.py --smoke      # tiny sizes on a toy env, runs on a CPU

Sections (each row records its compile seconds and the device's name):

1. `rollout`: `diffsim.rollout` env steps/s on ant (spring) at 256 to 8,192 envs, 100 steps,
   a deterministic 64x64 policy.
2. `ppo`: one `PPO.step` (2,048 envs x 16 steps), env steps/s.
3. `gradient_cost`: `studies/gradient_cost.py`'s cells for ant and halfcheetah at horizon 16
   (forward, value_and_grad, APG.step, SHAC.step; 64 envs), each ratio to the forward.
4. `es`: ES generations/s at populations 64 to 1,024 (episodes of 100 steps).

Each timing is the median of `--repeats` calls after a warm-up, with
`jax.block_until_ready`. Rows are appended to the CSV as they are measured, and a section
that would start after `--budget-s` seconds is skipped and recorded as skipped, so the
script ends within its budget on one GPU. `--smoke` uses the toy env `reach` and tiny sizes.
"""

import argparse
import csv
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import jax.random as jr

import diffsim

sys.path.insert(0, str(Path(__file__).parent))
import gradient_cost  # noqa: E402  (beside this file)

FIELDS = ("device", "platform", "section", "env", "size", "metric", "value", "unit", "ms")
FIELDS += ("compile_s", "repeats", "jax")
SECTIONS = ("rollout", "ppo", "gradient_cost", "es")


def device_name() -> str:
    device = jax.devices()[0]
    return f"{device.platform}-{device.device_kind}".replace(" ", "_").replace("/", "_")


def timed(fn, args, repeats: int, carry: bool = False) -> tuple[float, float]:
    """(compile seconds, median seconds per call) of `jax.jit(fn)` on `args`."""
    tic = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    compile_s = time.perf_counter() - tic
    out = jax.block_until_ready(compiled(*args))  # warm-up
    times = []
    for i in range(repeats):
        call = (out[0], jr.key(i)) if carry else args
        tic = time.perf_counter()
        out = jax.block_until_ready(compiled(*call))
        times.append(time.perf_counter() - tic)
    return compile_s, statistics.median(times)


class Writer:
    """Appends rows to the CSV as they come, each with the device's name."""

    def __init__(self, path: Path, repeats: int):
        self.path, self.repeats = path, repeats
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", newline="") as f:
            csv.DictWriter(f, fieldnames=FIELDS).writeheader()

    def row(self, section, env, size, metric, value, unit, seconds=None, compile_s=None):
        row = {
            "device": jax.devices()[0].device_kind,
            "platform": jax.devices()[0].platform,
            "section": section,
            "env": env,
            "size": size,
            "metric": metric,
            "value": value if isinstance(value, str) else round(value, 3),
            "unit": unit,
            "ms": "" if seconds is None else round(1e3 * seconds, 3),
            "compile_s": "" if compile_s is None else round(compile_s, 2),
            "repeats": self.repeats,
            "jax": jax.__version__,
        }
        with self.path.open("a", newline="") as f:
            csv.DictWriter(f, fieldnames=FIELDS).writerow(row)
        print(f"{section:13} {env:12} {size:>6} {metric:22} {row['value']:>12} {unit}", flush=True)


def rollout_section(out: Writer, env_name: str, sizes, length: int, repeats: int) -> None:
    env = diffsim.make_env(env_name)
    policy = diffsim.DeterministicPolicy(env.observation_size, env.action_size, key=jr.key(0))
    for num_envs in sizes:
        state = diffsim.reset(env, key=jr.key(1), num_envs=num_envs)

        def run(policy, state, key):
            _, traj = diffsim.rollout(
                env, policy, state, key=key, length=length, deterministic=True
            )
            return jnp.sum(traj.reward)

        compile_s, seconds = timed(run, (policy, state, jr.key(2)), repeats)
        steps = num_envs * length
        out.row(
            "rollout",
            env_name,
            num_envs,
            "env_steps_per_s",
            steps / seconds,
            "1/s",
            seconds,
            compile_s,
        )


def ppo_section(out: Writer, env_name: str, num_envs: int, unroll: int, repeats: int) -> None:
    env = diffsim.make_env(env_name)
    policy = diffsim.GaussianPolicy(env.observation_size, env.action_size, key=jr.key(0))
    ppo = diffsim.PPO(num_envs=num_envs, unroll_length=unroll).for_budget(10**8)
    state = jax.jit(lambda k: ppo.init(env, policy, key=k))(jr.key(1))
    compile_s, seconds = timed(
        lambda s, k: ppo.step(env, s, key=k), (state, jr.key(2)), repeats, carry=True
    )
    steps = ppo.steps_per_iteration
    out.row(
        "ppo", env_name, num_envs, "env_steps_per_s", steps / seconds, "1/s", seconds, compile_s
    )


def gradient_section(out: Writer, env_names, horizon: int, num_envs: int, repeats: int) -> None:
    args = argparse.Namespace(
        num_envs=num_envs,
        repeats=repeats,
        kinds=["forward", "value_and_grad", "apg_step", "shac_step"],
    )
    for name in env_names:
        for row in gradient_cost.measure_cell(name, horizon, "plain", args):
            seconds = float(row["ms"]) / 1e3
            size = f"{num_envs}x{horizon}"
            ratio = row["ratio"]
            out.row(
                "gradient_cost",
                name,
                size,
                f"{row['kind']}_ratio",
                float(ratio),
                "x",
                seconds,
                float(row["compile_s"]),
            )


def es_section(out: Writer, env_name: str, populations, length: int, repeats: int) -> None:
    env = diffsim.make_env(env_name, episode_length=length)
    policy = diffsim.DeterministicPolicy(env.observation_size, env.action_size, key=jr.key(0))
    for population in populations:
        es = diffsim.ES(population_size=population, rollout_length=length).for_env(env)
        state = jax.jit(lambda k, es=es: es.init(env, policy, key=k))(jr.key(1))
        compile_s, seconds = timed(
            lambda s, k, es=es: es.step(env, s, key=k), (state, jr.key(2)), repeats, carry=True
        )
        out.row(
            "es", env_name, population, "generations_per_s", 1 / seconds, "1/s", seconds, compile_s
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on `reach` (CPU)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--budget-s", type=float, default=420.0, help="ignored with --smoke")
    parser.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=SECTIONS)
    args = parser.parse_args()
    start = time.perf_counter()
    if args.smoke:
        body, bodies, sizes, length = "reach", ["reach"], [8, 16], 10
        ppo_envs, pops, repeats = 16, [8, 16], 2
    else:
        body, bodies, sizes, length = "ant", ["ant", "halfcheetah"], [256, 1024, 4096, 8192], 100
        ppo_envs, pops, repeats = 2048, [64, 256, 1024], args.repeats
    out = Writer(args.out or Path("results/device") / f"{device_name()}.csv", repeats)
    sections = (
        ("rollout", lambda: rollout_section(out, body, sizes, length, repeats)),
        ("ppo", lambda: ppo_section(out, body, ppo_envs, 16, repeats)),
        (
            "gradient_cost",
            lambda: gradient_section(
                out, bodies, 16 if not args.smoke else 4, 64 if not args.smoke else 8, repeats
            ),
        ),
        ("es", lambda: es_section(out, body, pops, length, repeats)),
    )
    for name, run in sections:
        elapsed = time.perf_counter() - start
        if name not in args.sections:
            continue
        if elapsed > args.budget_s and not args.smoke:
            out.row(name, body, "", "skipped_after_s", elapsed, "s")
            continue
        run()
    out.row("total", body, "", "wall_s", time.perf_counter() - start, "s")
    print(f"wrote {out.path}")


if __name__ == "__main__":
    main()
