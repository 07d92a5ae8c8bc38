"""The main comparison study (`make study`): strategies x environments, 8 seeds each.

    python studies/compare.py [--seeds 8] [--out results] [--quick]

Every cell trains all seeds at once (`train_seeds`, one compile) and is saved to
results/compare/<env>/<strategy>/ as soon as it finishes; re-running skips finished
cells. Prints the final-performance table and writes figures/compare_*.png (and .pdf).
"""

import argparse

import jax

import diffsim
from diffsim.plotting import final_scores, study_figure
from diffsim.stats import iqm_ci
from diffsim.study import Cell, run_study


def gaussian(env, key):
    return diffsim.GaussianPolicy(env.observation_size, env.action_size, key=key)


def deterministic(env, key):
    return diffsim.DeterministicPolicy(env.observation_size, env.action_size, key=key)


# Every strategy gets the same env-step budget on an env: curves are comparable per step.
BUDGETS = {"reach": 200_000, "pendulum": 400_000, "ball": 300_000, "inverted_pendulum": 600_000}


def strategies(env):
    """The contenders, each with its own policy kind, in plot order."""
    return [
        ("PPO", diffsim.PPO(), gaussian),
        ("APG", diffsim.APG(), deterministic),
        ("SHAC", diffsim.SHAC(), deterministic),
    ]


def cells(quick: bool):
    grid = []
    for name, steps in BUDGETS.items():
        env = diffsim.make_env(name)
        for label, strategy, policy in strategies(env):
            grid.append(Cell(env, label, strategy, policy, int(steps * (0.25 if quick else 1.0))))
    return grid


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=8)
    parser.add_argument("--out", default="results")
    parser.add_argument("--quick", action="store_true", help="a quarter of the budget")
    args = parser.parse_args()

    runs = run_study("compare", cells(args.quick), num_seeds=args.seeds, out=args.out)

    print(
        f"\n{'env':<20}{'strategy':<10}{'env steps':>11}{'IQM return':>12}{'95% CI':>22}{'train s':>9}{'compile s':>10}"
    )
    for (env, label), run in runs.items():
        final = run.curve.eval_return[:, -1].mean(-1)
        mid, low, high = iqm_ci(final[:, None])
        print(
            f"{env:<20}{label:<10}{run.config['total_steps']:>11,}{float(mid[0]):>12.1f}"
            f"{f'[{float(low[0]):.1f}, {float(high[0]):.1f}]':>22}{run.config['train_seconds']:>9.1f}"
            f"{run.config['compile_seconds']:>10.1f}"
        )

    figures = {f"compare_{x}": study_figure(runs, x=x) for x in ("env_steps", "wall_time")}
    figures["compare_final"] = final_scores(runs)
    for name, fig in figures.items():
        for ext in ("png", "pdf"):
            fig.savefig(f"figures/{name}.{ext}", dpi=120)
        print(f"wrote figures/{name}.png")
    print(f"devices: {jax.devices()}")


if __name__ == "__main__":
    main()
