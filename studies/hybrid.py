"""Gradients and evolution together: PPO, APG, SHAC, ES and GuidedES on four envs.

    python studies/hybrid.py [--seeds 8] [--out results]

The contenders of the main study (`studies/compare.py`, same settings and budgets, so its
finished cells in results/compare are reused) plus `GuidedES` (blend mode: ES's
population fitness and the analytic gradient of a 32-step window at the mean, weighted by
their measured variances), on `reach`, `pendulum`, `inverted_pendulum` and Brax `reacher`
(spring backend, no contacts, a smooth reward). 8 seeds per cell, equal env-step budgets
per env, 16 evaluation episodes per point. Prints a table with the env steps and training
seconds each strategy needs to reach PPO's final IQM and ES's, and writes
results/hybrid/table.txt|json and figures/hybrid_*.png.
"""

import argparse
import json
import sys
from pathlib import Path

import diffsim
from diffsim.plotting import final_scores, study_figure
from diffsim.study import Cell, format_summary, run_study, summary

sys.path.insert(0, str(Path(__file__).parent))
import compare  # noqa: E402  (the main study's contenders and budgets)

BUDGETS = {**compare.BUDGETS, "reacher": 200_000}


def guided(env):
    return diffsim.GuidedES()


def cells():
    grid = []
    for name, steps in BUDGETS.items():
        env = diffsim.make_env(name)
        contenders = [*compare.strategies(env), ("GuidedES", guided(env), compare.deterministic)]
        grid += [Cell(env, label, s, policy, steps) for label, s, policy in contenders]
    return grid


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=8)
    parser.add_argument("--out", default="results")
    args = parser.parse_args()

    runs = run_study(
        "hybrid",
        cells(),
        num_seeds=args.seeds,
        out=args.out,
        num_evals=11,
        num_eval_episodes=16,
        reuse=[Path(args.out) / "compare"],
    )
    references = ("PPO", "ES")
    rows = summary(runs, references=references)
    text = format_summary(rows, references=references)
    print("\n" + text)
    root = Path(args.out) / "hybrid"
    (root / "table.txt").write_text(text + "\n")
    (root / "table.json").write_text(json.dumps(rows, indent=2))
    for x in ("env_steps", "wall_time"):
        study_figure(runs, x=x).savefig(f"figures/hybrid_{x}.png", dpi=120)
    final_scores(runs).savefig("figures/hybrid_final.png", dpi=120)
    print("wrote figures/hybrid_env_steps.png, figures/hybrid_wall_time.png, hybrid_final.png")


if __name__ == "__main__":
    main()
