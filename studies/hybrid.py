"""Gradients and evolution together: PPO, APG, SHAC, ES and GuidedES on four envs.

    python studies/hybrid.py [--seeds 10] [--configs 5] [--tuning-seeds 2] [--out results]
                             [--figures figures] [--allow-dirty]
    python studies/hybrid.py --report-only [--check]   # tables of the finished cells

The contenders of the main study (`studies/compare.py`: the same settings, the same
learning-rate search and protocol, so its finished cells in <out>/compare are reused) plus
`GuidedES` (blend mode: ES's population fitness and the analytic gradient of a 32-step
window at the mean, weighted by their measured variances), on `reach`, `pendulum`, Brax
`inverted_pendulum` and Brax `reacher` (spring backend, no contacts, a smooth reward).
Every contender searches the same number of learning rates on tuning seeds; the best is
re-trained on fresh seeds. Equal env-step budgets per env, 16 evaluation episodes per
point. Prints the tables (steps and seconds to PPO's and to ES's final IQM on both sides)
and writes <out>/hybrid/table.txt|json and figures/hybrid_*.png.
"""

import argparse
import sys
from pathlib import Path

import diffsim
from diffsim.study import load_study

sys.path.insert(0, str(Path(__file__).parent))
import compare  # noqa: E402  (the main study's contenders, search and options)

BUDGETS = {**compare.BUDGETS, "inverted_pendulum": 400_000, "reacher": 200_000}


def contenders(env):
    """The main study's contenders and GuidedES at ES's population (64; GuidedES's default
    is 32), so that the two differ only in the guide."""
    es = next(s for label, s, _ in compare.strategies(env) if label == "ES")
    guided = diffsim.GuidedES(population_size=es.population_size)
    return [*compare.strategies(env), ("GuidedES", guided, compare.deterministic)]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    compare.protocol_arguments(parser, seeds=10, configs=5)
    compare.report_only_argument(parser)
    args = parser.parse_args()
    provenance, command = compare.start(parser, args)

    grid = compare.cells(BUDGETS, args.configs, contenders)
    root = Path(args.out) / "hybrid"
    if args.report_only:
        runs = load_study(root)
    else:
        runs = compare.train("hybrid", grid, args, num_evals=11, reuse=[Path(args.out) / "compare"])
    stale = compare.stale_cells("hybrid", grid, args, num_evals=11)
    compare.write_table(runs, root, provenance, command, ("PPO", "ES"), stale=stale)
    compare.save_figures(runs, "hybrid", args.figures)


if __name__ == "__main__":
    main()
