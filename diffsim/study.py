"""Studies: a grid of environments x strategies, each cell trained over vmapped seeds.

Each finished cell is saved to `<out>/<study>/<env>/<label>/` (see `Run.save`) before the
next starts; cells whose folder already holds a complete run are loaded, not retrained,
so an interrupted study resumes where it stopped and loses nothing finished.
"""

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import equinox as eqx
import jax.random as jr
from brax.envs.base import Env
from jaxtyping import PRNGKeyArray

from ._checkpoint import check_writable as _check_writable
from .results import Run, hyperparameters as _strategy_fields, load_run
from .strategies.base import AbstractStrategy
from .train import train_seeds


@dataclass(frozen=True)
class Cell:
    """One entry of a study grid.

    **Fields:** `env` (from `make_env`), `label` (e.g. `"PPO"`), `strategy`,
    `make_policy` (`(env, key) -> policy`; each seed gets its own initialisation),
    `total_steps`, `num_seeds` (None: the study's; e.g. fewer on a slow env) and
    `num_evals` (None: the study's; e.g. a finer grid where the steps to a return matter).

    **Example:**

    ```python
    make = lambda env, k: diffsim.GaussianPolicy(env.observation_size, env.action_size, key=k)
    cell = Cell(diffsim.make_env("reach"), "PPO", diffsim.PPO(), make, 200_000)
    ```
    """

    env: Env
    label: str
    strategy: AbstractStrategy
    make_policy: Callable[[Env, PRNGKeyArray], eqx.Module]
    total_steps: int
    num_seeds: int | None = None
    num_evals: int | None = None

    @property
    def name(self) -> str:
        return f"{self.env.name}/{self.label}"


def run_study(
    name: str,
    cells: Sequence[Cell],
    *,
    num_seeds: int = 8,
    seed: int = 0,
    out: str | Path = "results",
    num_evals: int = 20,
    num_eval_episodes: int = 16,
    progress: bool = True,
    reuse: Sequence[str | Path] = (),
) -> dict[tuple[str, str], Run]:
    """Train every cell with `train_seeds` over `num_seeds` seeds and `num_evals`
    evaluation points (or the cell's own `num_seeds`, `num_evals`); resume finished cells.

    Seeds are `jax.random.split(key(seed), num_seeds)`, the same for every cell. A cell
    whose folder (or the same cell's folder in one of the `reuse` studies, e.g.
    `"results/compare"`) holds a finished run of the same settings (strategy and its
    hyperparameters, env, budget, seeds, evaluations) is loaded instead of trained; one
    with other settings is trained again and overwritten, with a note.

    **Returns:** `{(env name, label): Run}` in the order of `cells`.

    **Example:**

    ```python
    env = diffsim.make_env("pendulum")
    make = lambda env, k: diffsim.GaussianPolicy(env.observation_size, env.action_size, key=k)
    runs = run_study("demo", [Cell(env, "PPO", diffsim.PPO(), make, 200_000)], num_seeds=4)
    ```
    """
    root = Path(out) / name
    labels = [c.name for c in cells]
    if len(set(labels)) != len(labels):
        raise ValueError(f"cells must have distinct env/label pairs, got {labels}")
    try:
        _check_writable(root)  # fail before any training
    except OSError as error:
        raise OSError(f"cannot write study results: {error}") from error
    # The grid's order, for load_study; a process training part of the grid adds its cells.
    listed = root / "cells.json"
    known = json.loads(listed.read_text()) if listed.exists() else []
    listed.write_text(json.dumps(known + [c for c in labels if c not in known]))
    runs = {}
    for cell in cells:
        path = root / cell.name
        seeds = cell.num_seeds or num_seeds
        evals = cell.num_evals or num_evals
        keys = jr.split(jr.key(seed), seeds)  # the same first keys for every cell
        wanted = _settings(cell, seeds, seed, evals, num_eval_episodes)
        found = _finished(cell, wanted, [root, *map(Path, reuse)], name)
        if found is not None:
            print(f"[{name}] {cell.name}: finished earlier, loaded from {found}")
            runs[cell.env.name, cell.label] = run = load_run(found)
            if found != path:
                run.save(path)
            continue
        run = train_seeds(
            cell.strategy,
            cell.env,
            lambda k, c=cell: c.make_policy(c.env, k),
            keys=keys,
            total_steps=cell.total_steps,
            num_evals=evals,
            num_eval_episodes=num_eval_episodes,
            progress=progress,
        )
        run.config["study"] = {"seed": seed, "num_evals_requested": evals}
        run.save(path)
        runs[cell.env.name, cell.label] = run
    return runs


def _settings(cell: Cell, num_seeds, seed, num_evals, num_eval_episodes) -> dict:
    """What a saved cell must match to be reused (as `run.config` records it)."""
    return {
        "strategy": type(cell.strategy).__name__,
        "env": cell.env.name,
        "episode_length": cell.env.episode_length,
        "total_steps_requested": cell.total_steps,
        "num_seeds": num_seeds,
        "seed": seed,
        "num_evals_requested": num_evals,
        "num_eval_episodes": num_eval_episodes,
    }


def _finished(cell: Cell, wanted: dict, roots: list[Path], study: str) -> Path | None:
    for root in roots:
        path = root / cell.name
        if not (path / "config.json").exists():
            continue
        config = json.loads((path / "config.json").read_text())
        saved = {**config, **config.get("study", {})}
        different = {k: (saved.get(k), v) for k, v in wanted.items() if saved.get(k) != v}
        hyper = config.get("hyperparameters")
        if hyper != _hyperparameters(cell):
            different["hyperparameters"] = "changed"
        if not different:
            return path
        if root == roots[0]:
            print(f"[{study}] {cell.name}: saved run has other settings {different}; retraining")
    return None


def _hyperparameters(cell: Cell) -> dict:
    """The cell's hyperparameters as `run.config` records them (after `train` fills in
    what the env and the budget decide)."""
    return _strategy_fields(cell.strategy.for_env(cell.env).for_budget(cell.total_steps))


def load_study(path: str | Path) -> dict[tuple[str, str], Run]:
    """Every finished cell below `path` (`<env>/<label>/config.json`), keyed `(env, label)`,
    in the order the study ran them (alphabetical for cells it did not list).

    **Example:**

    ```python
    runs = load_study("results/compare")
    runs["pendulum", "PPO"].curve.eval_return.shape   # (seeds, E, episodes)
    ```
    """
    path = Path(path)
    cells = sorted(f"{c.parent.parent.name}/{c.parent.name}" for c in path.glob("*/*/config.json"))
    if not cells:
        raise FileNotFoundError(
            f"no finished study cells under {path} (expected <env>/<label>/config.json)"
        )
    if (path / "cells.json").exists():  # the order the study ran them in
        order = json.loads((path / "cells.json").read_text())
        cells = [c for c in order if c in cells] + [c for c in cells if c not in order]
    return {tuple(c.split("/")): load_run(path / c) for c in cells}


def load_runs(paths: Sequence[str | Path]) -> dict[tuple[str, str], Run]:
    """Runs from saved-run folders and study folders, keyed `(env, label)`, for plotting.

    A folder holding `config.json` is one saved run (`Run.save`, `diffsim train --out`),
    labelled by its strategy (`run.config["strategy"]`) on its env (`run.config["env"]`); a
    run from `train_seeds` keeps its leading seed axis. Any other folder is read with
    `load_study`. Where two runs would share an env and a label, each of them is labelled by
    its folder name instead (a study cell by `<study>/<label>`), or by the path as given
    when those collide too.

    **Arguments:** `paths`: one or more folders, in plot order.

    **Returns:** `{(env name, label): Run}`, ready for `plotting.study_figure` and
    `plotting.final_scores`.

    **Raises:** `FileNotFoundError` naming a folder that does not exist or is neither kind.

    **Example:**

    ```python
    runs = load_runs(["results/ppo_run", "results/apg_run"])  # two `diffsim train --out`
    list(runs)   # [("reach", "PPO"), ("reach", "APG")]
    ```
    """
    if isinstance(paths, (str, Path)):
        paths = [paths]
    found = []  # (env, label, name, full name, run)
    for path in map(Path, paths):
        if (path / "config.json").is_file():
            run = load_run(path)
            env, label = run.config.get("env", "?"), run.config.get("strategy", path.name)
            found.append((env, label, path.name, str(path), run))
        elif path.is_dir() and any(path.glob("*/*/config.json")):
            for (env, label), run in load_study(path).items():
                name = f"{path.name}/{label}"
                found.append((env, label, name, f"{path}/{label}", run))
        else:
            kinds = (
                "a saved run (a `diffsim train --out` folder with config.json)",
                "a study folder (<env>/<label>/config.json)",
            )
            raise FileNotFoundError(
                f"{path} is neither {kinds[0]} nor {kinds[1]}"
                if path.exists()
                else f"{path} does not exist: expected {kinds[0]} or {kinds[1]}"
            )
    runs = {}
    for env, label, name, full, run in found:
        if sum((e, lab) == (env, label) for e, lab, *_ in found) > 1:
            same = sum(e == env and n == name for e, _, n, *_ in found)
            label = name if same == 1 else full
        if (env, label) in runs:  # the same folder given twice
            raise ValueError(f"{full} is given more than once")
        runs[env, label] = run
    return runs


def summary(runs: dict[tuple[str, str], Run], references: Sequence[str] = ("PPO",)) -> list[dict]:
    """One row per cell: final IQM with its 95% bootstrap CI, and for each reference
    strategy (e.g. PPO, ES) on the same env the probability of improvement over it and
    the env steps and training seconds to its final IQM (`None`: never reached).

    **Example:**

    ```python
    rows = summary(load_study("results/compare"), references=("PPO", "ES"))
    print(format_summary(rows, references=("PPO", "ES")))
    ```
    """
    import numpy as np

    from .stats import iqm, iqm_ci, probability_of_improvement, threshold_crossing

    finals = {k: np.asarray(r.curve.eval_return)[:, -1].mean(-1) for k, r in runs.items()}
    rows = []
    for (env, label), run in runs.items():
        mid, low, high = iqm_ci(finals[env, label][:, None])
        row = {
            "env": env,
            "strategy": label,
            "env_steps": run.config["total_steps"],
            "iqm": float(mid[0]),
            "low": float(low[0]),
            "high": float(high[0]),
        }
        for ref in references:
            if (env, ref) not in runs:
                continue
            target = finals[env, ref]
            hit = threshold_crossing(run, float(iqm(target)))
            row[f"p_over_{ref}"] = probability_of_improvement(finals[env, label], target)
            row[f"steps_to_{ref}"] = hit["env_steps"]
            row[f"seconds_to_{ref}"] = hit["wall_time"]
        for k in ("train", "eval", "compile"):
            row[f"{k}_s"] = run.config.get(f"{k}_seconds", float("nan"))
        rows.append(row)
    return rows


def format_summary(rows: list[dict], references: Sequence[str] = ("PPO",)) -> str:
    """`summary`'s rows as a fixed-width text table, one column group per reference.

    **Example:**

    ```python
    print(format_summary(summary(runs, references=("PPO",)), references=("PPO",)))
    ```
    """

    def fmt(value, spec: str) -> str:
        return "never" if value is None else "-" if value == "" else format(value, spec)

    head = f"{'env':<19}{'strategy':<10}{'env steps':>11}{'final IQM':>11}{'95% CI':>20}"
    for ref in references:
        head += f"{'P(>' + ref + ')':>10}{'steps to ' + ref:>16}{'s to ' + ref:>10}"
    head += f"{'train s':>9}{'eval s':>8}{'compile s':>10}"
    lines = [head]
    for r in rows:
        ci = f"[{r['low']:.1f}, {r['high']:.1f}]"
        line = f"{r['env']:<19}{r['strategy']:<10}{r['env_steps']:>11,}{r['iqm']:>11.1f}{ci:>20}"
        for ref in references:
            line += f"{fmt(r.get(f'p_over_{ref}', ''), '.2f'):>10}"
            line += f"{fmt(r.get(f'steps_to_{ref}', ''), ',d'):>16}"
            line += f"{fmt(r.get(f'seconds_to_{ref}', ''), '.1f'):>10}"
        line += f"{r['train_s']:>9.1f}{r['eval_s']:>8.1f}{r['compile_s']:>10.1f}"
        lines.append(line)
    return "\n".join(lines)
