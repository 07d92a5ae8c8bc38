"""How many env steps APG and SHAC need to reach PPO's final return on the toy envs (#3).

    python studies/sample_efficiency.py [--seeds 10] [--configs 5] [--tuning-seeds 2]
                                        [--out results] [--figures figures] [--allow-dirty]

PPO is the `make study` cell (same budget, keys, settings and learning-rate search; loaded
from <out>/compare/ when it is there, trained otherwise). APG and SHAC get small batches, a
budget a fraction of PPO's, an evaluation after every few iterations (so the step at which
their IQM first reaches PPO's final IQM is measured finely) and the same number of
learning rates searched as PPO. The ratio is PPO's first crossing of its own final IQM
over the strategy's first crossing, both read off the curves. Prints the study's tables
and writes them with their provenance to <out>/sample_efficiency/table.txt|json, and
figures/sample_efficiency.png.
"""

import argparse
from pathlib import Path

import compare
from compare import BUDGETS, deterministic, gaussian, protocol_arguments, rate_search, start

import diffsim
from diffsim.plotting import study_figure
from diffsim.study import Cell, run_study, summary, write_summary

# Small batches: many cheap updates per env step. The pendulum SHAC settings are the best
# of a 30-config sweep (envs 1-16, horizon 16-64, rates, discount 0.95-0.995, clipping,
# critic fit): swing-up needs a longer discount than SHAC's default 0.95.
FAST = {
    "reach": (
        10_000,
        [
            ("APG", diffsim.APG(num_envs=4, horizon=25, learning_rate=1e-2)),
            ("SHAC", diffsim.SHAC(num_envs=4, horizon=25, critic_minibatches=4)),
        ],
    ),
    "pendulum": (
        100_000,
        [
            ("APG", diffsim.APG(num_envs=4, horizon=32, learning_rate=1e-2)),
            (
                "SHAC",
                diffsim.SHAC(num_envs=2, horizon=32, actor_learning_rate=3e-3, discount=0.98),
            ),
        ],
    ),
}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    protocol_arguments(parser, seeds=10, configs=5)
    args = parser.parse_args()
    provenance, command = start(parser, args)

    envs = {name: diffsim.make_env(name) for name in FAST}
    protocol = compare.protocol(args)
    ppo = diffsim.PPO()
    ppo_runs = run_study(  # exactly the `make study` cells: reused from its results if there
        "sample_efficiency_ppo",
        [
            Cell(envs[n], "PPO", ppo, gaussian, BUDGETS[n], search=rate_search(ppo, args.configs))
            for n in FAST
        ],
        num_evals=11,
        num_eval_episodes=16,
        reuse=[Path(args.out) / "compare"],
        **protocol,
    )
    fast = run_study(
        "sample_efficiency",
        [
            Cell(envs[n], label, s, deterministic, budget, search=rate_search(s, args.configs))
            for n, (budget, contenders) in FAST.items()
            for label, s in contenders
        ],
        num_evals=51,
        num_eval_episodes=16,
        **protocol,
    )
    if args.check:
        return  # the cells' states are printed; no tables
    runs = {**ppo_runs, **fast}
    runs = {k: runs[k] for k in sorted(runs, key=lambda k: list(FAST).index(k[0]))}
    table = summary(runs, references=("PPO",))
    root = Path(args.out) / "sample_efficiency"
    path = write_summary(root, table, provenance=provenance, command=command)
    print("\n" + path.read_text())
    Path(args.figures).mkdir(parents=True, exist_ok=True)
    study_figure(runs, x="env_steps").savefig(f"{args.figures}/sample_efficiency.png", dpi=120)
    print(f"wrote {args.figures}/sample_efficiency.png")


if __name__ == "__main__":
    main()
