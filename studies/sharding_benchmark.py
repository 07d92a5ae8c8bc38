"""Throughput of runs split over 1 vs 4 devices (virtual CPU devices here), three ways:

- `seeds`: `train_seeds` with 16 PPO seeds, the seeds split over the devices;
- `ppo-batch`: one PPO run, its env batch split over the devices;
- `es-population`: one ES run, its population split over the devices.

    python studies/sharding_benchmark.py [--env reach] [--seeds 16] [--steps 200000]

Each (case, device count) runs in its own process (XLA fixes the device count at
start-up via XLA_FLAGS=--xla_force_host_platform_device_count=N). On a 2-core CPU expect
no speed-up: the point is that split runs are correct and give the same curves. Prints a
table and writes results/benchmarks/sharding.json.
"""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path


def child(args) -> dict:
    import jax
    import jax.random as jr
    import numpy as np

    import diffsim

    env = diffsim.make_env(args.env)
    kw = dict(total_steps=args.steps, num_evals=5, progress=False)
    if args.case == "seeds":
        make = lambda k: diffsim.GaussianPolicy(env.observation_size, env.action_size, key=k)
        keys = jr.split(jr.key(0), args.seeds)
        run = diffsim.train_seeds(diffsim.PPO(), env, make, keys=keys, **kw)
        runs = args.seeds
    else:
        ppo = args.case == "ppo-batch"
        policy = (diffsim.GaussianPolicy if ppo else diffsim.DeterministicPolicy)(
            env.observation_size, env.action_size, key=jr.key(1)
        )
        strategy = diffsim.PPO() if ppo else diffsim.ES(rollout_length=min(500, env.episode_length))
        run = diffsim.train(strategy, env, policy, key=jr.key(0), **kw)
        runs = 1
    steps = run.config["total_steps"] * runs
    return {
        "case": args.case,
        "devices": jax.device_count(),
        "mesh": run.config["mesh"],
        "env_steps": steps,
        "train_s": run.config["train_seconds"],
        "compile_s": run.config["compile_seconds"],
        "steps_per_s": steps / run.config["train_seconds"],
        "final_return_mean": float(np.asarray(run.curve.eval_return)[..., -1, :].mean()),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--env", default="reach")
    parser.add_argument("--seeds", type=int, default=16)
    parser.add_argument("--steps", type=int, default=200_000)
    parser.add_argument("--device-counts", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--cases", nargs="+", default=["seeds", "ppo-batch", "es-population"])
    parser.add_argument("--case", help=argparse.SUPPRESS)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", default="results/benchmarks/sharding.json")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return

    rows = []
    for case in args.cases:
        for n in args.device_counts:
            env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={n}"}
            cmd = [sys.executable, __file__, "--child", "--case", case, "--env", args.env]
            cmd += ["--seeds", str(args.seeds), "--steps", str(args.steps)]
            out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    header = f"{'case':>14}{'devices':>8}{'mesh':>22}{'env steps':>12}{'train s':>9}"
    print(f"\n{header}{'compile s':>11}{'env steps/s':>14}{'final return':>14}")
    for r in rows:
        mesh = (
            "-" if r["mesh"] is None else f"seeds {r['mesh']['seeds']} x batch {r['mesh']['batch']}"
        )
        print(
            f"{r['case']:>14}{r['devices']:>8}{mesh:>22}{r['env_steps']:>12,}{r['train_s']:>9.1f}"
            f"{r['compile_s']:>11.1f}{r['steps_per_s']:>14,.0f}{r['final_return_mean']:>14.2f}"
        )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"env": args.env, "rows": rows}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
