"""The main comparison study (`make study`): PPO, APG, SHAC and ES on `reach` and `pendulum`.

    python studies/compare.py [--seeds 10] [--configs 5] [--tuning-seeds 2] [--out results]
                              [--figures figures] [--full] [--allow-dirty]
                              [--report-only] [--reproduce results]

`make study` trains every cell afresh into results/local (untracked) and ends with a
reproduction report against the committed results/compare; `make study-table` rebuilds
the committed table from the committed cells in seconds (`--report-only`).

Equal tuning effort: every contender searches the same number of learning rates
(`--configs`, log-spaced from 1/8 to 8 times its default; SHAC's actor rate) on
`--tuning-seeds` seeds of their own, as one `train_sweep` program per cell. The rate with
the best final IQM is re-trained on `--seeds` fresh seeds, disjoint from the tuning seeds,
and only those are reported. With seeds = configs x tuning seeds (10 = 5 x 2) the
re-training reuses the search's compiled program. 16 evaluation episodes per point, the
same env-step budget for every strategy on an env.

Every cell is saved to <out>/compare/<env>/<strategy>/ (with tuning.json) as soon as it
finishes; re-running loads finished cells. Prints the tables (untrained row, P(>PPO),
P(>untrained), steps and seconds to PPO's final IQM on both sides, the tuning) and writes
them with their provenance to <out>/compare/table.txt|json, and figures/compare_*.png.
Refuses to run from a tree with uncommitted changes unless --allow-dirty. `--full` adds
the `ball` env and Brax's `inverted_pendulum` (400k steps; tens of minutes on a CPU).
"""

import argparse
import json
import sys
from pathlib import Path

import diffsim
from diffsim.plotting import final_scores, study_figure
from diffsim.results import DirtyTreeError, require_clean
from diffsim.study import (
    Cell,
    load_study,
    log_grid,
    provenance_header,
    reproduction,
    run_study,
    summary,
    write_summary,
)


def gaussian(env, key):
    return diffsim.GaussianPolicy(env.observation_size, env.action_size, key=key)


def deterministic(env, key):
    return diffsim.DeterministicPolicy(env.observation_size, env.action_size, key=key)


# Every strategy gets the same env-step budget on an env: curves are comparable per step.
BUDGETS = {"reach": 100_000, "pendulum": 300_000}
FULL_BUDGETS = {**BUDGETS, "ball": 300_000, "inverted_pendulum": 400_000}


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


def rate_search(strategy, configs: int) -> dict[str, list[float]]:
    """`configs` learning rates log-spaced from 1/8 to 8 times the strategy's own (the
    actor's for SHAC, AHAC and SAPO): the same search size for every contender."""
    field = "actor_learning_rate" if hasattr(strategy, "actor_learning_rate") else "learning_rate"
    rate = getattr(strategy, field)
    return {field: log_grid(rate / 8, rate * 8, configs)}


def cells(budgets: dict[str, int], configs: int, contenders=strategies) -> list[Cell]:
    grid = []
    for name, steps in budgets.items():
        env = diffsim.make_env(name)
        for label, strategy, policy in contenders(env):
            search = rate_search(strategy, configs)
            grid.append(Cell(env, label, strategy, policy, steps, search=search))
    return grid


def grid_cells(names, labels, configs: int, contenders, budget, num_evals=None) -> list[Cell]:
    """The cells of the envs `names` x the contenders (`contenders(name)`: label, strategy,
    policy) whose label is in `labels`, each searching `configs` learning rates
    (`rate_search`) over `budget(name, label)` env steps, with `num_evals` evaluations
    (None: the study's)."""
    grid = []
    for name in names:
        env = diffsim.make_env(name)
        for label, strategy, policy in contenders(name):
            if label in labels:
                search = rate_search(strategy, configs)
                steps = budget(name, label)
                grid.append(Cell(env, label, strategy, policy, steps, None, num_evals, search))
    return grid


def evolution(window: dict, rollout_length: int) -> list:
    """ES (32 members) and GuidedES (its gradient from an `APGWindow(**window)`), each
    scoring its members on `rollout_length`-step episodes: (label, strategy, policy)."""
    guided = diffsim.GuidedES(gradient=diffsim.APGWindow(**window), rollout_length=rollout_length)
    return [
        ("ES", diffsim.ES(population_size=32, rollout_length=rollout_length), deterministic),
        ("GuidedES", guided, deterministic),
    ]


def protocol_arguments(parser: argparse.ArgumentParser, *, seeds: int, configs: int) -> None:
    """The options every published study shares: seeds, search size, folders, --allow-dirty."""
    parser.add_argument("--seeds", type=int, default=seeds, help="reported seeds per cell")
    parser.add_argument("--configs", type=int, default=configs, help="configurations searched")
    parser.add_argument("--tuning-seeds", type=int, default=2, help="seeds per configuration")
    parser.add_argument("--out", default="results")
    parser.add_argument("--figures", default="figures", help="where figures are written")
    parser.add_argument(
        "--restamp",
        action="store_true",
        help="train nothing: write the current key into each finished cell (only after a"
        " change known to leave its numbers as they were; see docs/guides/studies.md)",
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="train nothing: say which cells hold a run of the current key, which would"
        " train again and why, and which have none (with --report-only: the tables, and"
        " their header names the stale cells)",
    )
    allow_dirty_argument(parser)


def allow_dirty_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--allow-dirty",
        action="store_true",
        help="write the tables from a tree with uncommitted changes (recorded as dirty)",
    )


def report_only_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="train nothing: the tables and figures from the finished cells in --out",
    )


def grid_parser(
    doc: str,
    envs,
    contenders,
    *,
    seeds: int,
    configs: int,
    default_envs=None,
    default_labels=None,
    report_only: bool = True,
) -> argparse.ArgumentParser:
    """The options of a study over a grid of envs x contenders (`contenders(name)`: label,
    strategy, policy): `--envs` and `--strategies` (the part to train or report, all of it
    unless `default_envs`, `default_labels`), the protocol's and `--report-only`."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    envs = list(envs)
    labels = list(dict.fromkeys(label for name in envs for label, *_ in contenders(name)))
    parser.add_argument("--envs", nargs="+", default=list(default_envs or envs), choices=envs)
    default_labels = list(default_labels or labels)
    parser.add_argument("--strategies", nargs="+", default=default_labels, choices=labels)
    protocol_arguments(parser, seeds=seeds, configs=configs)
    if report_only:
        report_only_argument(parser)
    return parser


def start(parser: argparse.ArgumentParser, args: argparse.Namespace) -> tuple[dict, str]:
    """The provenance (refusing a dirty tree unless --allow-dirty, before any training) and
    the command line that the tables will name."""
    if args.seeds < 5:
        print(f"note: {args.seeds} seeds per cell: tables show means, not IQMs (< 5 seeds)")
    writes = not getattr(args, "check", False) or getattr(args, "report_only", False)
    try:  # (--check alone writes nothing, so any tree will do)
        provenance = require_clean(allow_dirty=args.allow_dirty or not writes)
    except DirtyTreeError as error:
        parser.error(str(error))
    script = Path(sys.argv[0])
    return provenance, " ".join(["python", f"studies/{script.name}", *sys.argv[1:]])


def save_figures(runs, study: str, folder: str) -> None:
    Path(folder).mkdir(parents=True, exist_ok=True)
    figures = {f"{study}_{x}": study_figure(runs, x=x) for x in ("env_steps", "wall_time")}
    figures[f"{study}_final"] = final_scores(runs)
    for fig_name, fig in figures.items():
        fig.savefig(f"{folder}/{fig_name}.png", dpi=120)
    print(f"wrote {folder}/{study}_*.png")


def protocol(args: argparse.Namespace) -> dict:
    """`run_study`'s arguments from the protocol's options in `args` (`protocol_arguments`)."""
    names = ("tuning_seeds", "out", "restamp", "check")
    return {"num_seeds": args.seeds, **{name: getattr(args, name) for name in names}}


def train(study: str, cells: list[Cell], args: argparse.Namespace, *, num_evals: int, reuse=()):
    """`run_study` of `cells` under the protocol's options in `args` (`protocol_arguments`),
    16 evaluation episodes at `num_evals` points, loading finished cells from `reuse` too."""
    runs = run_study(
        study, cells, num_evals=num_evals, num_eval_episodes=16, reuse=reuse, **protocol(args)
    )
    if args.check and not getattr(args, "report_only", False):
        sys.exit(0)  # the cells' states are printed; no tables
    return runs


def grid_runs(study: str, args: argparse.Namespace, contenders, cells, *, num_evals: int):
    """The runs of a `grid_parser` study: with --report-only its finished cells in
    <out>/<study> of `args.envs` x `args.strategies`, in the grid's order; otherwise
    `train` of `cells(args.envs, args.strategies, args.configs)`."""
    if not args.report_only:
        grid = cells(args.envs, args.strategies, args.configs)
        return train(study, grid, args, num_evals=num_evals)
    found = load_study(Path(args.out) / study)
    grid = [(name, label) for name in args.envs for label, *_ in contenders(name)]
    return {k: found[k] for k in grid if k in found and k[1] in args.strategies}


def stale_cells(study: str, grid: list[Cell], args, *, num_evals: int) -> list[str] | None:
    """The cells of `grid` saved under another key than the current code's: none after
    training (it re-trains them); with --report-only, their names where --check is given
    too (the programs are traced, nothing is trained) and None (not checked) where not."""
    if not args.report_only:
        return []
    if not args.check:
        return None
    states = run_study(study, grid, num_evals=num_evals, num_eval_episodes=16, **protocol(args))
    return [f"{env}/{label}" for (env, label), state in states.items() if state.startswith("stale")]


def write_table(
    runs, root: Path, provenance: dict, command: str, references=("PPO",), stale=()
) -> dict:
    """The study's summary table, written with its provenance to `root`/table.{txt,json}
    and printed; `stale` (`stale_cells`) goes into its header."""
    table = {**summary(runs, references=references), "stale": None if stale is None else [*stale]}
    path = write_summary(root, table, provenance=provenance, command=command)
    print("\n" + path.read_text())
    return table


def cell_table(columns: str, rows) -> str:
    """A text table with a line per cell: the `env` and `strategy` columns, then the
    others (`columns`: their heads; each row: env, strategy, the rest of its line)."""
    head = f"{'env':<13}{'strategy':<10}{columns}"
    return "\n".join([head, *(f"{env:<13}{label:<10}{rest}" for env, label, rest in rows)])


def write_text(path: Path, text: str, provenance: dict, command: str) -> None:
    """`text` under the provenance header, to `path`."""
    path.write_text(provenance_header(provenance, command) + "\n\n" + text + "\n")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    protocol_arguments(parser, seeds=10, configs=5)
    parser.add_argument(
        "--full", action="store_true", help="add the ball env and Brax's inverted_pendulum"
    )
    report_only_argument(parser)
    parser.add_argument(
        "--reproduce",
        metavar="FOLDER",
        help="end with a reproduction report against FOLDER/compare/table.json",
    )
    args = parser.parse_args()
    provenance, command = start(parser, args)

    study = "compare_full" if args.full else "compare"
    grid = cells(FULL_BUDGETS if args.full else BUDGETS, args.configs)
    if args.report_only:
        runs = load_study(Path(args.out) / study)
    else:
        reuse = [Path(args.out) / "compare"] if args.full else []  # its reach, pendulum
        runs = train(study, grid, args, num_evals=11, reuse=reuse)
    stale = stale_cells(study, grid, args, num_evals=11)
    table = write_table(runs, Path(args.out) / study, provenance, command, stale=stale)
    save_figures(runs, study, args.figures)
    if args.reproduce:
        committed = json.loads((Path(args.reproduce) / study / "table.json").read_text())
        print("\n" + reproduction(table, committed))


if __name__ == "__main__":
    main()
