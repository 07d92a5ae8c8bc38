"""The `diffsim` command: `train`, `study`, `plot`, `render`, `envs`. Run `diffsim --help`."""

import argparse
import os
import runpy
import sys
import warnings
from pathlib import Path

import jax
import numpy as np

import diffsim

from ._cli_train import (
    add_train_parser,
    run_train,
    strategies,
    strategy_registry,
    with_cwd,
)

STUDIES_ENV = "DIFFSIM_STUDIES"  # extra folders of study scripts, `os.pathsep`-separated


def _parser(
    user: dict[str, type] | None = None, *, load_strategies: bool = True
) -> argparse.ArgumentParser:
    """The command's parser; `user` adds `train` sub-commands for `MODULE:CLASS` specs.
    With `load_strategies=False` (another command than `train`) no strategy is loaded:
    that imports Brax, which takes seconds."""
    parser = argparse.ArgumentParser(
        prog="diffsim", description="Optimize control policies in differentiable physics."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = commands.add_parser(
        "train",
        help="train one strategy on one env (seeds vmapped)",
        description=(
            "Train one strategy on one env; seeds run in one compiled program. STRATEGY is a"
            " registered name below or MODULE:CLASS, a strategy class of your own (importable"
            " from the current directory or sys.path), e.g. `diffsim train my_algos:MyStrategy"
            " --env reach`; `--strategy MODULE:CLASS` says the same. Each takes its"
            " hyperparameters as options: `diffsim train ppo --help`."
        ),
    )
    kinds = train.add_subparsers(dest="strategy", required=True, metavar="STRATEGY")
    known = strategies() if load_strategies else {}
    for name, cls in {**known, **(user or {})}.items():
        add_train_parser(kinds, name, cls)
    _add_results_parsers(commands)
    commands.add_parser(
        "envs",
        help="list environments with observation and action sizes",
        description="List the env names make_env knows, from tables (nothing is built).",
    )
    return parser


def _add_results_parsers(commands) -> None:
    """`study`, `plot` and `render`: the commands that make results and show them."""
    study = commands.add_parser(
        "study",
        help="run a study script (a path, or a name such as compare)",
        description=(
            "Run a study script with the given arguments. NAME is looked up, in order, in"
            " ./studies, in the studies/ folder next to the installed diffsim package (a source"
            f" checkout) and in the folders of ${STUDIES_ENV} (separated by {os.pathsep!r})."
        ),
    )
    study.add_argument("script", metavar="NAME|PATH", help="e.g. compare, or studies/compare.py")
    study.add_argument("args", nargs=argparse.REMAINDER, help="passed to the script")

    plot = commands.add_parser(
        "plot",
        help="plot learning curves of `train --out` folders or a study folder",
        description=(
            "Plot one panel per env and one line per run. Each folder is a saved run"
            " (`diffsim train --out DIR`), labelled by its strategy (by its folder name where"
            " two would share a label), or a study folder such as results/compare."
        ),
    )
    plot.add_argument(
        "results", nargs="+", metavar="DIR", help="train --out folders and/or study folders"
    )
    plot.add_argument("-o", "--output", required=True, help="figure file (.png, .pdf, ...)")
    plot.add_argument("--x", choices=["env_steps", "wall_time", "final"], default="env_steps")

    render = commands.add_parser(
        "render",
        help="watch a saved run's policy: one episode as .gif, .mp4, .png strip or .html",
        description=(
            "Write one deterministic episode of a saved run's policy (a `train --out` folder)"
            " to FILE; the format follows the extension: .gif, .mp4, .png (a strip of still"
            " frames) or .html (Brax's interactive viewer for Brax envs)."
        ),
    )
    render.add_argument("run", metavar="RUN_DIR", help="a saved run, e.g. results/p")
    render.add_argument("-o", "--output", required=True, metavar="FILE", help="output file")
    render.add_argument(
        "--seed", type=int, default=0, help="which of the run's seeds to show (0-based); default 0"
    )
    render.add_argument(
        "--length", type=int, default=None, help="at most this many steps; default one episode"
    )
    render.add_argument(
        "--episode",
        type=int,
        default=0,
        metavar="K",
        help="key of the episode's initial state, jax.random.key(K); default 0",
    )


def study_dirs() -> list[tuple[str, Path]]:
    """Where `diffsim study NAME` looks for `NAME.py`, in order, as `(origin, folder)`:
    `./studies`, the `studies/` folder next to the installed package (a source checkout), and
    each folder in `$DIFFSIM_STUDIES` (separated by `os.pathsep`).

    **Example:** `[str(d) for _, d in study_dirs()][0] == "studies"`.
    """
    dirs = [("./studies", Path("studies"))]
    dirs.append(
        ("next to the diffsim package", Path(diffsim.__file__).resolve().parents[1] / "studies")
    )
    dirs += [
        (f"${STUDIES_ENV}", Path(d)) for d in os.environ.get(STUDIES_ENV, "").split(os.pathsep) if d
    ]
    return dirs


def find_study(name: str) -> Path:
    """The script `diffsim study NAME` runs: a path as given (`studies/compare.py`), or the
    first `NAME.py` in `study_dirs()`. Raises `FileNotFoundError` listing where it looked
    and the studies it found there.

    **Example:** `find_study("compare")` from a checkout is `studies/compare.py`.
    """
    given = Path(name)
    if given.suffix or len(given.parts) > 1:
        if not given.is_file():
            raise FileNotFoundError(f"no study script {name!r}")
        return given
    looked = []
    for origin, folder in study_dirs():
        if (folder / f"{name}.py").is_file():
            return folder / f"{name}.py"
        found = sorted(p.stem for p in folder.glob("*.py")) if folder.is_dir() else None
        what = "no such folder" if found is None else (", ".join(found) or "no scripts")
        looked.append(f"{folder} ({origin}): {what}")
    if not os.environ.get(STUDIES_ENV):
        looked.append(f"${STUDIES_ENV}: unset")
    raise FileNotFoundError(f"no study {name!r}; looked in\n  " + "\n  ".join(looked))


def _study(args) -> None:
    script = find_study(args.script)
    sys.argv = [str(script), *args.args]
    sys.path.insert(0, str(script.parent))  # as `python studies/NAME.py` would: sibling imports
    try:
        runpy.run_path(str(script), run_name="__main__")
    finally:
        sys.path.remove(str(script.parent))


def _plot(args) -> None:
    from . import plotting
    from .study import load_runs

    runs = load_runs(args.results)
    fig = (
        plotting.final_scores(runs) if args.x == "final" else plotting.study_figure(runs, x=args.x)
    )
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.output, dpi=120)
    print(f"wrote {args.output} ({len(runs)} runs)")


def _render(args) -> None:
    from .render import _check_path, render

    _check_path(Path(args.output))  # a bad extension fails before loading or compiling
    run = diffsim.load_run(args.run)
    env = with_cwd(run.make_env)  # a user's env class: imported by its recorded path
    leading = np.asarray(run.curve.eval_return).ndim - 2  # seed (and sweep) axes
    count = int(np.prod(np.shape(run.curve.eval_return)[:leading]))
    if not 0 <= args.seed < count:
        raise ValueError(f"--seed {args.seed} is out of range: {args.run} holds {count} seed(s)")
    policy = jax.tree.map(
        lambda x: (
            x.reshape(-1, *x.shape[leading:])[args.seed] if leading and hasattr(x, "ndim") else x
        ),
        run.policy,
    )
    key = jax.random.key(args.episode)
    path = render(env, policy, args.output, key=key, length=args.length)
    print(f"wrote {path} ({env.name}, seed {args.seed})")


def _envs() -> None:
    """The table of `diffsim.envs._catalog`: sizes known without building (or importing)
    any env, so it prints at once and MuJoCo has nothing to warn about."""
    from .envs import _catalog as catalog

    tables = [("toy", catalog.TOY), ("brax", catalog.BRAX)]
    if catalog.installed("mujoco_playground"):
        tables.append(("mjx", catalog.PLAYGROUND))
    if catalog.installed("gymnax"):
        tables.append(("gymnax", {f"gymnax:{k}": v for k, v in catalog.GYMNAX.items()}))
    width = 2 + max(len(name) for _, table in tables for name in table)
    print(f"{'name':<{width}}{'kind':<8}{'obs':>5}{'act':>5}{'episode':>9}")
    for kind, table in tables:
        for name, (obs, act, length) in sorted(table.items(), key=lambda kv: kv[0].lower()):
            print(f"{name:<{width}}{kind:<8}{obs:>5}{act:>5}{length:>9}")
    print("\n...or any env class of your own: --env MODULE:CLASS (see docs: Environments)")


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `diffsim` command.

    **Example:**

    ```bash
    diffsim train ppo --env pendulum --steps 200000 --seeds 4 --learning-rate 3e-4
    diffsim train my_algos:MyStrategy --env reach --steps 20000   # a class of your own
    diffsim plot results/compare -o figures/compare.png
    diffsim plot results/ppo_run results/apg_run -o curves.png   # `train --out` folders
    ```
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        argv, user = _user_strategy(argv)
    except ValueError as error:
        print(f"diffsim: error: {error}", file=sys.stderr)
        return 2
    args = _parser(user, load_strategies=argv[:1] == ["train"]).parse_args(argv)
    with warnings.catch_warnings():  # restores the process's own display afterwards
        warnings.showwarning = _show_warning
        return _dispatch(args)


def _user_strategy(argv: list[str]) -> tuple[list[str], dict[str, type]]:
    """`train MODULE:CLASS ...` (or `train --strategy SPEC ...`): the class it names,
    resolved before parsing so that its fields become options. Returns the arguments with
    the spec in the strategy's place, and `{spec: class}` (empty without a spec)."""
    if len(argv) < 2 or argv[0] != "train":
        return argv, {}
    rest = argv[1:]
    if rest[0] == "--strategy" and len(rest) > 1:
        rest = [rest[1], *rest[2:]]
    elif rest[0].startswith("--strategy="):
        rest = [rest[0].partition("=")[2], *rest[1:]]
    spec = rest[0]
    if spec.startswith("-"):
        return argv, {}
    if ":" not in spec:
        return ["train", *rest], {}  # a registered name, or argparse lists the valid ones
    return ["train", *rest], {spec: with_cwd(lambda: strategy_registry().resolve(spec))}


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings as one line on stderr, like errors: `diffsim: warning: ...`, no source line."""
    print(f"diffsim: warning: {message}", file=sys.stderr if file is None else file)


def _dispatch(args: argparse.Namespace) -> int:
    try:
        if args.command == "train":
            run_train(args)
        elif args.command == "study":
            _study(args)
        elif args.command == "plot":
            _plot(args)
        elif args.command == "render":
            _render(args)
        else:
            _envs()
    except (ValueError, TypeError, FileNotFoundError, OSError) as error:
        print(f"diffsim: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("diffsim: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
