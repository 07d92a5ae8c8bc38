"""The main comparison study (`make study`): strategies x environments, 8 seeds each.

    python studies/compare.py [--seeds 8] [--out results] [--full]

Every cell trains all seeds at once (`train_seeds`, one compile) and is saved to
results/compare/<env>/<strategy>/ as soon as it finishes; re-running skips finished
cells. Prints the final-performance table and writes figures/compare_*.png (and .pdf).
"""

import argparse
import json
from pathlib import Path

import jax

import diffsim
from diffsim.plotting import final_scores, study_figure
from diffsim.study import Cell, format_summary, run_study, summary


def gaussian(env, key):
    return diffsim.GaussianPolicy(env.observation_size, env.action_size, key=key)


def deterministic(env, key):
    return diffsim.DeterministicPolicy(env.observation_size, env.action_size, key=key)


# Every strategy gets the same env-step budget on an env: curves are comparable per step.
BUDGETS = {"reach": 100_000, "pendulum": 300_000, "inverted_pendulum": 400_000}
FULL_BUDGETS = {**BUDGETS, "ball": 300_000, "inverted_pendulum": 1_000_000}


def strategies(env):
    """The contenders, each with its own policy kind, in plot order.

    APG and SHAC use small batches (measured: 4 envs x 25 steps reach reach's final
    return in ~4k steps; SHAC with a lighter critic fit costs a quarter as much per step).
    ES scores each member on one full episode and counts only the steps inside it.
    """
    return [
        ("PPO", diffsim.PPO(), gaussian),
        ("APG", diffsim.APG(num_envs=4, horizon=25, learning_rate=1e-2), deterministic),
        ("SHAC", diffsim.SHAC(num_envs=8, critic_epochs=4, critic_minibatches=2), deterministic),
        ("ES", diffsim.ES(), deterministic),
    ]


def cells(full: bool):
    grid = []
    for name, steps in (FULL_BUDGETS if full else BUDGETS).items():
        env = diffsim.make_env(name)
        for label, strategy, policy in strategies(env):
            grid.append(Cell(env, label, strategy, policy, steps))
    return grid


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=8)
    parser.add_argument("--out", default="results")
    parser.add_argument(
        "--full", action="store_true", help="add the ball env and 1M steps on inverted_pendulum"
    )
    args = parser.parse_args()

    study = "compare_full" if args.full else "compare"
    runs = run_study(
        study,
        cells(args.full),
        num_seeds=args.seeds,
        out=args.out,
        num_evals=11,
        num_eval_episodes=16,
    )

    rows = summary(runs, references=("PPO",))
    text = format_summary(rows, references=("PPO",))
    print("\n" + text)
    (Path(args.out) / study / "table.txt").write_text(text + "\n")
    (Path(args.out) / study / "table.json").write_text(json.dumps(rows, indent=2))

    figures = {f"{study}_{x}": study_figure(runs, x=x) for x in ("env_steps", "wall_time")}
    figures[f"{study}_final"] = final_scores(runs)
    for fig_name, fig in figures.items():
        for ext in ("png", "pdf"):
            fig.savefig(f"figures/{fig_name}.{ext}", dpi=120)
        print(f"wrote figures/{fig_name}.png")
    print(f"devices: {jax.devices()}")


if __name__ == "__main__":
    main()
