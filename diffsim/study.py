"""Studies: a grid of environments x strategies, each cell trained over vmapped seeds.

Each finished cell is saved to `<out>/<study>/<env>/<label>/` (see `Run.save`) at once and
atomically; cells whose folder already holds a finished run of the same settings (and the
same strategy code) are loaded, not retrained, so an interrupted study resumes where it
stopped and loses nothing finished. A cell may be tuned (`Cell.search`): its search runs
on tuning seeds and only the best configuration is trained on the reported seeds.
Cells run one after another, or one per task on an executor (`concurrent.futures`, Dask,
submitit for SLURM, ...), with a
per-cell lock so that no two workers train the same cell.
"""

import dataclasses
import json
import os
import pickle
import socket
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import equinox as eqx
import jax.random as jr
from jaxtyping import PRNGKeyArray

from . import _tuning
from ._cellmeter import meter as _meter
from ._cellstore import CellLock as _CellLock, copy_dir as _copy_dir, replace_dir as _replace_dir
from ._checkpoint import key_data as _key_data
from ._fingerprint import PROTOCOL_VERSION, program_fingerprint
from ._report import (
    format_summary as format_summary,
    provenance_header as provenance_header,
    reproduction as reproduction,
    sooner as sooner,
    summary as summary,
    untrained_scores as untrained_scores,
    write_summary as write_summary,
)
from ._tuning import log_grid as log_grid
from .envs import (
    AutoResetEnv as Env,
    make_env,
    names as _env_names,
    toy_names as _toy_names,
)
from .results import (
    Run,
    _atomic_write,
    hyperparameters as _strategy_fields,
    load_run,
    provenance as _provenance,
)
from .strategies.base import AbstractStrategy
from .train import train_seeds


@runtime_checkable
class Submitter(Protocol):
    """What `run_study(executor=...)` needs: `concurrent.futures.Executor.submit`'s shape.

    **Example:**

    ```python
    with concurrent.futures.ProcessPoolExecutor(4) as pool:   # a Submitter
        run_study("demo", cells, executor=pool)
    ```
    """

    def submit(self, fn: Callable, /, *args: Any) -> Any: ...


@dataclass(frozen=True)
class Cell:
    """One entry of a study grid.

    **Fields:** `env` (from `make_env`), `label` (e.g. `"PPO"`), `strategy`,
    `make_policy` (`(env, key) -> policy`; each seed gets its own initialisation; a
    top-level function if the study runs on an executor), `total_steps`, `num_seeds`
    (None: the study's; e.g. fewer on a slow env), `num_evals` (None: the study's; e.g. a
    finer grid where the steps to a return matter) and `search` (None: train `strategy`
    as it is). A `search` maps float fields of `strategy` to lists of values, e.g.
    `{"learning_rate": log_grid(1e-4, 1e-3, 3)}`; its configurations are the product of
    the lists, as in `diffsim.train_sweep`.

    **Example:**

    ```python
    make = lambda env, k: diffsim.GaussianPolicy(env.observation_size, env.action_size, key=k)
    cell = Cell(diffsim.make_env("reach"), "PPO", diffsim.PPO(), make, 200_000,
                search={"learning_rate": [1e-4, 3e-4, 1e-3]})
    ```
    """

    env: Env
    label: str
    strategy: AbstractStrategy
    make_policy: Callable[[Env, PRNGKeyArray], eqx.Module]
    total_steps: int
    num_seeds: int | None = None
    num_evals: int | None = None
    search: Mapping[str, Sequence[float]] | None = None

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
    tuning_seeds: int = 5,
    allow_unequal_search: bool = False,
    executor: "Submitter | None" = None,
    restamp: bool = False,
) -> dict[tuple[str, str], Run]:
    """Train every cell with `train_seeds` over `num_seeds` seeds and `num_evals`
    evaluation points (or the cell's own `num_seeds`, `num_evals`); resume finished cells.

    **Seeds.** The reported seeds are `jax.random.split(key(seed), num_seeds)`, the same
    for every cell. A tuned cell (`Cell.search`) first trains all its configurations on
    `tuning_seeds` keys from a separate stream (disjoint from the reported ones) as one
    `train_sweep` program, picks the configuration with the best final IQM over them (the
    mean below 5 tuning seeds), and re-trains only that one on the reported seeds. Its
    folder holds `tuning.json` (the search, every configuration's score and final returns
    per tuning seed, the chosen one, both sets of keys); `run.config["study"]["tuning"]`
    has the same without the per-seed data. Tip: with `num_seeds` equal to configurations
    x `tuning_seeds`, the re-training reuses the search's compiled program.

    **Equal effort.** Every contender on an env must search the same number of
    configurations (an untuned cell counts as one); otherwise `ValueError`, unless
    `allow_unequal_search`.

    **Reuse.** A cell is keyed by its computation: the fingerprint of its traced program
    (`diffsim._fingerprint`: the strategy's update, the policy's structure, the env's
    dynamics and reward, the evaluation and every constant; comments, renames and moved
    files keep it), a protocol version for the host-side logic, and its settings (budget,
    seeds, evaluations, search). A cell whose folder (or the same cell's folder in one of
    the `reuse` studies, e.g. `"results/compare"`) holds a finished run of the same key is
    loaded instead of trained; one with another key is trained again and replaced, with a
    note naming what differs. Each finished cell is written atomically.

    **Re-stamping.** After a change known to leave the numbers as they were but to change
    the key (a new protocol version, a new fingerprint scheme), `restamp=True` trains
    nothing: it writes each finished cell's new key into its `config.json`, keeping the old
    one and the re-stamp's provenance under `study.restamped`. Never re-stamp a cell whose
    maths changed: retrain it.

    **Executor.** With `executor` (anything with `submit(fn, arg)` returning a future with
    `result()`: a `concurrent.futures.ProcessPoolExecutor`, a Dask `Client`, a submitit
    `AutoExecutor` for SLURM, Ray's `concurrent.futures` pool), each cell is one task and
    the tasks run at once, as the executor schedules them. The task must pickle: `make_policy` a top-level function, the env rebuilt in the worker
    with `make_env(env.name, backend=..., episode_length=...)` where it does not pickle
    (Brax envs). A lock file per cell (`<env>/<label>.lock`) makes two workers, or two
    studies started at once, train a cell once: the second waits, then loads it.

    **Failures.** A cell that raises does not stop the others; once all are done,
    `RuntimeError` names the failed cells (finished cells are on disk).

    **Returns:** `{(env name, label): Run}` in the order of `cells`.

    **Example:**

    ```python
    env = diffsim.make_env("pendulum")
    lrs = {"learning_rate": log_grid(1e-4, 1e-3, 3)}
    runs = run_study("demo", [Cell(env, "PPO", diffsim.PPO(), make, 200_000, search=lrs)],
                     num_seeds=6, tuning_seeds=2)
    ```
    """
    if executor is not None and not callable(getattr(executor, "submit", None)):
        raise TypeError(f"executor must have a submit(fn, arg) method, got {executor!r}")
    root = Path(out) / name
    jobs = _jobs(
        name,
        root,
        cells,
        dict(num_seeds=num_seeds, seed=seed, num_evals=num_evals, episodes=num_eval_episodes),
        dict(progress=progress, reuse=tuple(map(str, reuse)), tuning_seeds=tuning_seeds),
        allow_unequal_search,
    )
    if restamp:
        stamp = {"provenance": _provenance()}
        jobs = [dataclasses.replace(job, restamp=stamp) for job in jobs]
    _check_writable(root)  # fail before any training
    # The grid's order, for load_study; a process training part of the grid adds its cells.
    listed = root / "cells.json"
    known = json.loads(listed.read_text()) if listed.exists() else []
    labels = [c.name for c in cells]
    _atomic_write(listed, json.dumps(known + [c for c in labels if c not in known]).encode())
    if executor is not None:
        jobs = [_portable(job) for job in jobs]  # checked before anything is submitted
        futures = [executor.submit(_run_job, job) for job in jobs]
        outcomes = [_outcome(f.result) for f in futures]
    else:
        outcomes = [_outcome(lambda job=job: _run_job(job)) for job in jobs]
    runs, failed = {}, []
    for cell, (status, error) in zip(cells, outcomes, strict=True):
        if error is not None:
            print(f"[{name}] {cell.name}: failed: {type(error).__name__}: {error}")
            failed.append((cell.name, error))
            continue
        print(f"[{name}] {cell.name}: {status}")
        if (root / cell.name / "config.json").exists():  # (re-stamping trains nothing)
            runs[cell.env.name, cell.label] = load_run(root / cell.name)
    if failed:
        listing = "; ".join(f"{c}: {type(e).__name__}: {e}" for c, e in failed)
        raise RuntimeError(
            f"{len(failed)} of {len(cells)} cells of study {name!r} failed ({listing});"
            f" the {len(runs)} finished cells are saved under {root}"
        ) from failed[0][1]
    return runs


def _check_writable(root: Path) -> None:
    """Prove a file can be written in `root` (a probe of its own name: several processes
    may start the same study at once)."""
    try:
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=root, prefix=".write-test-") as probe:
            probe.write(b"0" * 4096)
            probe.flush()
    except OSError as error:
        raise OSError(f"cannot write study results to {root}: {error.strerror or error}") from error


def _outcome(call: Callable[[], str]) -> tuple[str, BaseException | None]:
    """What a cell's task reported, or the error it raised."""
    try:
        return call(), None
    except Exception as error:  # noqa: BLE001  (reported with the others at the end)
        return "", error


@dataclass(frozen=True)
class _EnvSpec:
    """How a worker rebuilds an env that does not pickle (a Brax env)."""

    name: str
    backend: str
    episode_length: int

    def build(self) -> Env:
        backend = {} if self.name in _toy_names() else {"backend": self.backend}
        return make_env(self.name, episode_length=self.episode_length, **backend)


@dataclass(frozen=True)
class _Job:
    """Everything one cell's task needs, picklable once `_portable` has made it so."""

    study: str
    root: str
    env: Any  # Env, or an _EnvSpec in a worker's task
    label: str
    strategy: AbstractStrategy
    make_policy: Callable
    total_steps: int
    num_seeds: int
    num_evals: int
    num_eval_episodes: int
    seed: int
    search: dict[str, list[float]] | None
    tuning_seeds: int
    reuse: tuple[str, ...]
    progress: bool
    settings: dict[str, Any]
    restamp: dict[str, Any] | None = None  # the provenance of a re-stamp, else None

    @property
    def path(self) -> Path:
        return Path(self.root) / self.settings["env"] / self.label


def _jobs(name, root, cells, protocol: dict, run: dict, allow_unequal: bool) -> list[_Job]:
    """Check the grid (before any training) and describe each cell's task. `protocol`:
    `num_seeds`, `seed`, `num_evals`, `episodes`; `run`: `progress`, `reuse`,
    `tuning_seeds`."""
    tuning_seeds = run["tuning_seeds"]
    labels = [c.name for c in cells]
    if len(set(labels)) != len(labels):
        raise ValueError(f"cells must have distinct env/label pairs, got {labels}")
    if not isinstance(tuning_seeds, int) or tuning_seeds < 1:
        raise ValueError(f"tuning_seeds must be a positive int, got {tuning_seeds!r}")
    searches = {
        c.name: c.search and _tuning.check_search(c.strategy, c.search, c.name) for c in cells
    }
    sizes = {c.name: _tuning.size(searches[c.name]) for c in cells}
    for env in dict.fromkeys(c.env.name for c in cells):
        here = {n: s for n, s in sizes.items() if n.split("/")[0] == env}
        if len(set(here.values())) > 1 and not allow_unequal:
            raise ValueError(
                f"unequal tuning effort on {env}: configurations searched per cell {here}."
                " Give every contender a search of the same size (an untuned cell counts as"
                " 1), or pass allow_unequal_search=True and say so where the results appear"
            )
    jobs = []
    for cell in cells:
        seeds = cell.num_seeds or protocol["num_seeds"]
        evals = cell.num_evals or protocol["num_evals"]
        search = searches[cell.name] or None
        settings = _settings(
            cell, seeds, protocol["seed"], evals, protocol["episodes"], search, tuning_seeds
        )
        jobs.append(
            _Job(
                study=name,
                root=str(root),
                env=cell.env,
                label=cell.label,
                strategy=cell.strategy,
                make_policy=cell.make_policy,
                total_steps=cell.total_steps,
                num_seeds=seeds,
                num_evals=evals,
                num_eval_episodes=protocol["episodes"],
                seed=protocol["seed"],
                search=search,
                **run,
                settings=settings,
            )
        )
    return jobs


def _portable(job: _Job) -> _Job:
    """`job` ready for another process: its env replaced by how to rebuild it where the env
    does not pickle; a clear error for what cannot travel."""
    try:
        pickle.dumps(job.env)
        env = job.env
    except (pickle.PicklingError, TypeError, AttributeError):
        if job.env.name not in _env_names():
            raise ValueError(
                f"cell {job.settings['env']}/{job.label}: its env does not pickle and"
                f" {job.env.name!r} is not a make_env name, so an executor's worker cannot"
                " rebuild it"
            ) from None
        env = _EnvSpec(job.env.name, job.env.backend, job.env.episode_length)
    job = dataclasses.replace(job, env=env)
    try:
        pickle.dumps(job)
    except (pickle.PicklingError, TypeError, AttributeError) as error:
        raise ValueError(
            f"cell {job.settings['env']}/{job.label} cannot be sent to an executor ({error});"
            " make_policy must be a top-level function (not a lambda or a closure)"
        ) from None
    return job


def _run_job(job: _Job) -> str:
    """One cell's task (in this process or an executor's worker): load it if finished,
    else train it, holding the cell's lock; returns what happened."""
    path = job.path
    with _CellLock(path.with_name(f"{path.name}.lock")):
        env = job.env.build() if isinstance(job.env, _EnvSpec) else job.env
        job = _fingerprinted(job, env)
        found = _finished(job, [Path(job.root), *map(Path, job.reuse)])
        if found is not None and job.restamp is None:
            if found != path:
                _copy_dir(found, path)
            return f"finished earlier, loaded from {found}"
        if job.restamp is not None:
            return _restamp(job, path)
        _replace_dir(path, lambda tmp: _train(job, env, tmp))
        return f"trained, saved to {path}"


def _restamp(job: _Job, path: Path) -> str:
    """Write `job`'s key into its finished cell's config.json (see `run_study`)."""
    config_path = path / "config.json"
    if not config_path.exists():
        return "not trained: nothing to re-stamp"
    config = json.loads(config_path.read_text())
    old = config["study"]["settings"]
    if old == job.settings:
        return "already has this key"
    config["study"].setdefault("restamped", []).append({"from": old, **(job.restamp or {})})
    config["study"]["settings"] = job.settings
    _atomic_write(config_path, json.dumps(config, indent=2).encode())
    return f"re-stamped: {sorted(k for k in job.settings if old.get(k) != job.settings[k])}"


def _train(job: _Job, env: Env, folder: Path) -> None:
    """Train the cell (tuning first if it has a search) and save it into `folder`."""
    keys = jr.split(jr.key(job.seed), job.num_seeds)  # the same first keys for every cell
    factory = lambda k: job.make_policy(env, k)
    train: dict[str, Any] = dict(
        total_steps=job.total_steps,
        num_evals=job.num_evals,
        num_eval_episodes=job.num_eval_episodes,
        progress=job.progress,
    )
    study: dict[str, Any] = {"seed": job.seed, "num_evals_requested": job.num_evals}
    with _meter() as load:
        if job.search:
            tuning = _tuning.tuning_keys(job.seed, job.tuning_seeds, keys)
            record = _tuning.tune(job.strategy, env, factory, job.search, keys=tuning, **train)
            run = _tuning.retrain(job.strategy, env, factory, record["chosen"], keys=keys, **train)
            record["report_keys"] = _key_data(keys).tolist()
            (folder / "tuning.json").write_text(json.dumps(record, indent=1))
            per_seed = ("final_returns", "curves", "env_steps", "tuning_keys", "report_keys")
            study["tuning"] = {k: v for k, v in record.items() if k not in per_seed}
        else:
            run = train_seeds(job.strategy, env, factory, keys=keys, **train)
    study["load"] = load
    study["settings"] = job.settings
    study["provenance"] = _provenance()
    study["trained_by"] = {"pid": os.getpid(), "host": socket.gethostname()}
    run.config["study"] = study
    run.save(folder)


def _settings(cell: Cell, num_seeds, seed, num_evals, num_eval_episodes, search, tuning_seeds):
    """What a saved cell must match to be reused (`run.config["study"]["settings"]`), but
    for the fingerprint of its program (`"program"`), which `_run_job` traces in the
    worker that trains the cell."""
    strategy = cell.strategy.for_env(cell.env).for_budget(cell.total_steps)
    settings = {
        "strategy": type(cell.strategy).__name__,
        "hyperparameters": _strategy_fields(strategy),
        "program": None,
        "protocol": PROTOCOL_VERSION,
        "env": cell.env.name,
        "backend": cell.env.backend,
        "episode_length": cell.env.episode_length,
        "total_steps_requested": cell.total_steps,
        "num_seeds": num_seeds,
        "seed": seed,
        "num_evals_requested": num_evals,
        "num_eval_episodes": num_eval_episodes,
        "search": search,
        "tuning_seeds": tuning_seeds if search else None,
    }
    return json.loads(json.dumps(settings))  # as it reads back from config.json


def _fingerprinted(job: _Job, env: Env) -> _Job:
    """`job` with the fingerprint of its computation in its settings (`_fingerprint`)."""
    program = program_fingerprint(
        job.strategy,
        env,
        lambda k: job.make_policy(env, k),
        num_seeds=job.num_seeds,
        total_steps=job.total_steps,
        num_evals=job.num_evals,
        num_eval_episodes=job.num_eval_episodes,
    )
    return dataclasses.replace(job, settings={**job.settings, "program": program})


def _finished(job: _Job, roots: list[Path]) -> Path | None:
    """The first of `roots` whose folder of this cell holds a finished run of its settings."""
    different = None
    for root in roots:
        path = root / job.settings["env"] / job.label
        if not (path / "config.json").exists():
            continue
        saved = json.loads((path / "config.json").read_text()).get("study", {}).get("settings")
        if saved == job.settings:
            return path
        if root == roots[0]:
            different = sorted(k for k in job.settings if (saved or {}).get(k) != job.settings[k])
    if different is not None:  # said only once no other root has it either
        print(f"[{job.study}] {job.path}: saved run differs in {different}; retraining")
    return None


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
