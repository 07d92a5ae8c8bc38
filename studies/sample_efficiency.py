"""How many env steps APG and SHAC need to reach PPO's final return on the toy envs (#3).

    python studies/sample_efficiency.py [--seeds 8] [--out results]

PPO is the `make study` cell (same budget, keys and settings; loaded from
results/compare/ when it is there, trained otherwise). APG and SHAC get small batches, a
budget a fraction of PPO's and an evaluation after every few iterations, so the step at
which their IQM (over seeds) first reaches PPO's final IQM is measured finely. Prints a
table, writes results/sample_efficiency/table.json and figures/sample_efficiency.png.
"""

import argparse
import json
from pathlib import Path

import numpy as np
from compare import BUDGETS, deterministic, gaussian

import diffsim
from diffsim.plotting import study_figure
from diffsim.stats import iqm, threshold_crossing
from diffsim.study import Cell, run_study

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
    parser.add_argument("--seeds", type=int, default=8)
    parser.add_argument("--out", default="results")
    args = parser.parse_args()

    envs = {name: diffsim.make_env(name) for name in FAST}
    ppo = run_study(  # exactly the `make study` cells: reused from its results if there
        "sample_efficiency_ppo",
        [Cell(envs[n], "PPO", diffsim.PPO(), gaussian, BUDGETS[n]) for n in FAST],
        num_seeds=args.seeds,
        out=args.out,
        num_evals=11,
        num_eval_episodes=16,
        reuse=[Path(args.out) / "compare"],
    )
    fast = run_study(
        "sample_efficiency",
        [
            Cell(envs[n], label, strategy, deterministic, budget)
            for n, (budget, contenders) in FAST.items()
            for label, strategy in contenders
        ],
        num_seeds=args.seeds,
        out=args.out,
        num_evals=51,
        num_eval_episodes=16,
    )

    rows = []
    for (env, label), run in {**ppo, **fast}.items():
        reference = ppo[(env, "PPO")]
        target = float(iqm(np.asarray(reference.curve.eval_return)[:, -1].mean(-1)))
        ppo_steps = threshold_crossing(reference, target)["env_steps"]
        hit = threshold_crossing(run, target)
        steps = hit["env_steps"]
        rows.append(
            {
                "env": env,
                "strategy": label,
                "budget": run.config["total_steps"],
                "final_iqm": float(iqm(np.asarray(run.curve.eval_return)[:, -1].mean(-1))),
                "ppo_final_iqm": target,
                "steps_to_ppo_final": steps,
                "seconds_to_ppo_final": hit["wall_time"],
                "fewer_steps_than_ppo": None if not steps else ppo_steps / steps,
            }
        )

    header = f"{'env':<10}{'strategy':<9}{'budget':>9}{'final IQM':>11}{'PPO final':>11}"
    print(f"\n{header}{'steps to it':>13}{'s to it':>9}{'PPO steps / steps':>19}")
    for r in rows:
        steps = "never" if r["steps_to_ppo_final"] is None else f"{r['steps_to_ppo_final']:,}"
        ratio = r["fewer_steps_than_ppo"]
        seconds = r["seconds_to_ppo_final"]
        print(
            f"{r['env']:<10}{r['strategy']:<9}{r['budget']:>9,}{r['final_iqm']:>11.1f}"
            f"{r['ppo_final_iqm']:>11.1f}{steps:>13}{'-' if seconds is None else f'{seconds:.1f}':>9}"
            f"{'-' if ratio is None else f'{ratio:.1f}x':>19}"
        )
    out = Path(args.out) / "sample_efficiency" / "table.json"
    out.write_text(json.dumps(rows, indent=2))
    fig = study_figure({**ppo, **fast}, x="env_steps")
    for ext in ("png", "pdf"):
        fig.savefig(f"figures/sample_efficiency.{ext}", dpi=120)
    print(f"wrote {out} and figures/sample_efficiency.png")


if __name__ == "__main__":
    main()
