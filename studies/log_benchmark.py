"""Does `train(..., log_dir=)` slow training? Training seconds with and without it.

    python studies/log_benchmark.py [--env pendulum] [--repeats 5] [--evals 50]

The same PPO run (4 seeds, 200k steps, `--evals` evaluation points, so `--evals` log
lines), compiled once, then timed `--repeats` times with and without a log folder,
interleaved so load drifts hit both alike. Training seconds come from `run.config` (they
exclude evaluation and compilation; the log line is written between segments, outside
them, so any cost would show in the end-to-end seconds, which are reported too). Prints a
table and writes results/benchmarks/log.json.
"""

import argparse
import json
import tempfile
import time
from pathlib import Path

import jax.random as jr
import numpy as np

import diffsim


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--env", default="pendulum")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--evals", type=int, default=50)
    parser.add_argument("--out", default="results/benchmarks/log.json")
    args = parser.parse_args()

    env = diffsim.make_env(args.env)
    make = lambda k: diffsim.GaussianPolicy(env.observation_size, env.action_size, key=k)
    keys = jr.split(jr.key(0), 4)

    def once(log_dir):
        tic = time.perf_counter()
        run = diffsim.train_seeds(
            diffsim.PPO(),
            env,
            make,
            keys=keys,
            total_steps=200_000,
            num_evals=args.evals,
            progress=False,
            log_dir=log_dir,
        )
        return run.config["train_seconds"], time.perf_counter() - tic

    once(None)  # compile
    times = {"without": [], "with": []}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.repeats):
            times["without"].append(once(None))
            times["with"].append(once(tmp))
    rows = {
        k: {
            "train_s_median": float(np.median([t for t, _ in v])),
            "end_to_end_s_median": float(np.median([e for _, e in v])),
            "train_s": [t for t, _ in v],
        }
        for k, v in times.items()
    }
    print(
        f"{args.env}, PPO, 4 seeds x 200k steps, {args.evals} evaluations; median of {args.repeats}"
    )
    print(f"{'log_dir':<10}{'train s':>10}{'end-to-end s':>14}")
    for k, r in rows.items():
        print(f"{k:<10}{r['train_s_median']:>10.2f}{r['end_to_end_s_median']:>14.2f}")
    ratio = rows["with"]["end_to_end_s_median"] / rows["without"]["end_to_end_s_median"]
    print(f"end-to-end with / without: {ratio:.3f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(dict(rows=rows, ratio=ratio), indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
