"""ES on Brax inverted_pendulum (spring backend, 1000-step episodes), several seeds at once.

The done-criterion of the ES issue: the IQM over 8 seeds of the final evaluation return
(16 full 1000-step episodes each, deterministic policy) is at least 950. Brax's own ES
reached 1000 after 2.3M env steps with population 64, std 0.05, lr 0.01.

Training rollouts may be shorter than the episode (`--rollout-length`); `train`
evaluates full episodes regardless.

    .venv/bin/python studies/es_inverted_pendulum.py   # 8 seeds, 1.44M steps, rollouts of 500
"""

import argparse
import json
import time
from pathlib import Path

import jax.random as jr
import numpy as np
from scipy.stats import trim_mean

import diffsim


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=8)
    parser.add_argument("--total-steps", type=int, default=1_500_000)
    parser.add_argument("--num-evals", type=int, default=6)
    parser.add_argument("--population", type=int, default=64)
    parser.add_argument("--episodes", type=int, default=1, help="episodes per member")
    parser.add_argument("--rollout-length", type=int, default=None)
    parser.add_argument("--std", type=float, default=0.05)
    parser.add_argument("--learning-rate", type=float, default=0.03)
    parser.add_argument("--algorithm", default="Open_ES")
    parser.add_argument("--hidden", type=int, nargs="*", default=[32, 32])
    parser.add_argument("--out", default="results/es_inverted_pendulum")
    args = parser.parse_args()

    env = diffsim.make_env("inverted_pendulum", backend="spring", episode_length=1000)
    es = diffsim.ES(
        algorithm=args.algorithm,
        population_size=args.population,
        episodes_per_member=args.episodes,
        rollout_length=args.rollout_length,
        std=args.std,
        learning_rate=args.learning_rate,
    )
    obs_size, act_size = env.observation_size, env.action_size
    make_policy = lambda key: diffsim.DeterministicPolicy(
        obs_size, act_size, hidden=tuple(args.hidden), key=key
    )
    tic = time.perf_counter()
    run = diffsim.train_seeds(
        es,
        env,
        make_policy,
        keys=jr.split(jr.key(0), args.seeds),
        total_steps=args.total_steps,
        num_evals=args.num_evals,
    )
    seconds = time.perf_counter() - tic

    per_seed = np.asarray(run.curve.eval_return.mean(-1))  # [seeds, evals]
    iqm = [float(trim_mean(per_seed[:, e], 0.25)) for e in range(per_seed.shape[1])]
    result = {
        "command": vars(args),
        "env_steps": [int(x) for x in np.median(np.asarray(run.curve.env_steps), axis=0)],
        "iqm_eval_return": iqm,
        "final_eval_return_per_seed": per_seed[:, -1].tolist(),
        "compile_seconds": run.config["compile_seconds"],
        "train_seconds": run.config["train_seconds"],
        "total_seconds": seconds,
    }
    print(f"{'env steps':>10} {'IQM return':>11}")
    for steps, value in zip(result["env_steps"], iqm, strict=True):
        print(f"{steps:>10} {value:>11.1f}")
    print("final return per seed:", np.round(per_seed[:, -1], 1).tolist())
    print(
        f"compile {result['compile_seconds']:.1f} s, train {result['train_seconds']:.1f} s,"
        f" total {seconds:.1f} s"
    )
    out = Path(args.out)
    run.save(out)
    (out / "summary.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
