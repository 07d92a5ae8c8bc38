"""Running a study grid: each cell's task loads a finished cell of the same key or trains
it, under the cell's lock, in this process or on an executor's workers."""

import dataclasses
import json
import os
import shutil
import socket
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax.random as jr

from .._results.files import atomic_write as _atomic_write
from .._train.checkpoint import key_data
from ..envs import AutoResetEnv as Env
from ..results import load_run, provenance
from ..train import train_seeds
from . import tuning
from .cellmeter import meter
from .cells import Cell, CellTask, EnvSpec, Submitter, fingerprinted, portable, tasks
from .cellstore import CellLock, copy_dir, differences, replace_dir, saved_key


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
    check: bool = False,
) -> dict[tuple[str, str], Any]:
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

    **Checking.** `check=True` trains nothing either: it prints, per cell, whether its
    saved run has the current key (`current`), would be trained again and why (`stale:
    differs in [...]`, naming the settings and hyperparameters that differ) or has no run
    yet (`not trained`), and returns these states by cell.

    **Executor.** With `executor` (anything with `submit(fn, arg)` returning a future with
    `result()`: a `concurrent.futures.ProcessPoolExecutor`, a Dask `Client`, a submitit
    `AutoExecutor` for SLURM, Ray's `concurrent.futures` pool), each cell is one task and
    the tasks run at once, as the executor schedules them. The task must pickle: `make_policy` a top-level function, the env rebuilt in the worker
    with `make_env(env.name, backend=..., episode_length=...)` where it does not pickle
    (Brax envs). A lock file per cell (`<env>/<label>.lock`) makes two workers, or two
    studies started at once, train a cell once: the second waits, then loads it.

    **Failures.** A cell that raises does not stop the others; once all are done,
    `RuntimeError` names the failed cells (finished cells are on disk).

    **Returns:** `{(env name, label): Run}` in the order of `cells` (with `check=True`,
    `{(env name, label): state}`).

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
    jobs = tasks(
        name,
        root,
        cells,
        dict(num_seeds=num_seeds, seed=seed, num_evals=num_evals, episodes=num_eval_episodes),
        dict(progress=progress, reuse=tuple(map(str, reuse)), tuning_seeds=tuning_seeds),
        allow_unequal_search,
    )
    if restamp and check:
        raise ValueError("restamp=True and check=True: pick one (check only reads the cells)")
    if restamp:
        stamp = {"provenance": provenance()}
        jobs = [dataclasses.replace(job, restamp=stamp) for job in jobs]
    jobs = [dataclasses.replace(job, check=check) for job in jobs]
    if not check:
        check_writable(root)  # fail before any training
        # The grid's order, for load_study; a process training part of the grid adds its own.
        listed = root / "cells.json"
        known = json.loads(listed.read_text()) if listed.exists() else []
        labels = [c.name for c in cells]
        _atomic_write(listed, json.dumps(known + [c for c in labels if c not in known]).encode())
    if executor is not None:
        jobs = [portable(job) for job in jobs]  # checked before anything is submitted
        futures = [executor.submit(run_task, job) for job in jobs]
        outcomes = [outcome(f.result) for f in futures]
    else:
        outcomes = [outcome(lambda job=job: run_task(job)) for job in jobs]
    runs, failed = {}, []
    for cell, (status, error) in zip(cells, outcomes, strict=True):
        if error is not None:
            print(f"[{name}] {cell.name}: failed: {type(error).__name__}: {error}")
            failed.append((cell.name, error))
            continue
        print(f"[{name}] {cell.name}: {status}")
        if check:
            runs[cell.env.name, cell.label] = status
        elif (root / cell.name / "config.json").exists():  # (re-stamped or none)
            runs[cell.env.name, cell.label] = load_run(root / cell.name)
    if failed:
        listing = "; ".join(f"{c}: {type(e).__name__}: {e}" for c, e in failed)
        raise RuntimeError(
            f"{len(failed)} of {len(cells)} cells of study {name!r} failed ({listing});"
            f" the {len(runs)} finished cells are saved under {root}"
        ) from failed[0][1]
    return runs


def check_writable(root: Path) -> None:
    """Prove a file can be written in `root` (a probe of its own name: several processes
    may start the same study at once)."""
    try:
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=root, prefix=".write-test-") as probe:
            probe.write(b"0" * 4096)
            probe.flush()
    except OSError as error:
        raise OSError(f"cannot write study results to {root}: {error.strerror or error}") from error


def outcome(call: Callable[[], str]) -> tuple[str, BaseException | None]:
    """What a cell's task reported, or the error it raised."""
    try:
        return call(), None
    except Exception as error:  # noqa: BLE001  (reported with the others at the end)
        return "", error


def run_task(job: CellTask) -> str:
    """One cell's task (in this process or an executor's worker): load it if finished,
    else train it, holding the cell's lock; returns what happened."""
    path = job.path
    env = job.env.build() if isinstance(job.env, EnvSpec) else job.env
    if job.check:  # reads only: no lock
        return checked(fingerprinted(job, env))
    with CellLock(path.with_name(f"{path.name}.lock")):
        job = fingerprinted(job, env)
        if job.restamp is not None:
            return restamp_cell(job, path)
        found = finished(job)
        if found is not None:
            if found != path:
                copy_dir(found, path)
            return f"finished earlier, loaded from {found}"
        if (saved := saved_key(path)) is not None:
            different = differences(saved, job.settings)
            print(f"[{job.study}] {path}: saved run differs in {different}; retraining")
        partial = unfinished(job)
        replace_dir(path, lambda tmp: train_cell(job, env, tmp, partial))
        shutil.rmtree(partial, ignore_errors=True)
        return f"trained, saved to {path}"


def unfinished(job: CellTask) -> Path:
    """The folder beside the cell where its runs checkpoint while it trains
    (`.LABEL.partial/`: the tuning rounds, the re-training): what a process killed in the
    middle of the cell leaves for the next one to resume. Emptied first when it holds
    another key's runs; deleted once the cell is saved."""
    partial = job.path.with_name(f".{job.path.name}.partial")
    stamp = partial / "settings.json"
    if partial.exists() and (not stamp.exists() or json.loads(stamp.read_text()) != job.settings):
        shutil.rmtree(partial)
    partial.mkdir(parents=True, exist_ok=True)
    _atomic_write(stamp, json.dumps(job.settings, indent=1).encode())
    return partial


def restamp_cell(job: CellTask, path: Path) -> str:
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
    return f"re-stamped: {differences(old, job.settings)}"


def checked(job: CellTask) -> str:
    """Whether `job`'s cell holds a run of its key (see `run_study`'s `check`)."""
    if finished(job) is not None:
        return "current"
    saved = saved_key(job.path)
    return (
        "not trained" if saved is None else f"stale: differs in {differences(saved, job.settings)}"
    )


def train_cell(job: CellTask, env: Env, folder: Path, partial: Path | None = None) -> None:
    """Train the cell (tuning first if it has a search) and save it into `folder`; with
    `partial`, each of its runs checkpoints there and resumes from there
    (`tuning.resumable`)."""
    keys = jr.split(jr.key(job.seed), job.num_seeds)  # the same first keys for every cell
    factory = lambda k: job.make_policy(env, k)
    train: dict[str, Any] = dict(
        total_steps=job.total_steps,
        num_evals=job.num_evals,
        num_eval_episodes=job.num_eval_episodes,
        progress=job.progress,
    )
    study: dict[str, Any] = {"seed": job.seed, "num_evals_requested": job.num_evals}
    with meter() as load:
        if job.search:
            tuning_keys = tuning.tuning_keys(job.seed, job.tuning_seeds, keys)
            record = tuning.tune(
                job.strategy, env, factory, job.search, keys=tuning_keys, partial=partial, **train
            )
            chosen = record["chosen"]
            run = tuning.retrain(
                job.strategy, env, factory, chosen, keys=keys, partial=partial, **train
            )
            record["report_keys"] = key_data(keys).tolist()
            (folder / "tuning.json").write_text(json.dumps(record, indent=1))
            per_seed = ("final_returns", "curves", "env_steps", "tuning_keys", "report_keys")
            study["tuning"] = {k: v for k, v in record.items() if k not in per_seed}
        else:
            resume = tuning.resumable(partial, "seeds")
            run = train_seeds(job.strategy, env, factory, keys=keys, **train, **resume)
    study["load"] = load
    study["settings"] = job.settings
    study["provenance"] = provenance()
    study["trained_by"] = {"pid": os.getpid(), "host": socket.gethostname()}
    run.config["study"] = study
    run.save(folder)


def finished(job: CellTask) -> Path | None:
    """The first folder of this cell, in the study's root and then in `job.reuse`'s, that
    holds a finished run of its key."""
    roots = [Path(job.root), *map(Path, job.reuse)]
    folders = (root / job.settings["env"] / job.label for root in roots)
    return next((folder for folder in folders if saved_key(folder) == job.settings), None)
