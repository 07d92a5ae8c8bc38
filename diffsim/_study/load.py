"""Reading finished study cells back, for tables and plots."""

import json
from collections.abc import Sequence
from pathlib import Path

from ..results import Run, load_run


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
    found = [c.relative_to(path).parts for c in path.glob("*/*/config.json")]
    # (hidden folders are cells being written or replaced: `_cellstore.replace_dir`)
    cells = sorted(f"{e}/{label}" for e, label, _ in found if not (e[0] == "." or label[0] == "."))
    if not cells:
        raise FileNotFoundError(
            f"no finished study cells under {path} (expected <env>/<label>/config.json)"
        )
    if (path / "cells.json").exists():  # the order the study ran them in
        order = json.loads((path / "cells.json").read_text())
        cells = [c for c in order if c in cells] + [c for c in cells if c not in order]
    return {(c.split("/")[0], c.split("/")[1]): load_run(path / c) for c in cells}


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
