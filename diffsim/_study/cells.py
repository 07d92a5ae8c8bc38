"""A study's grid: its cells, and the task each becomes (everything a worker needs to
load or train it), keyed by the cell's computation (`fingerprint`)."""

import dataclasses
import json
import pickle
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import equinox as eqx
from jaxtyping import PRNGKeyArray

from ..envs import AutoResetEnv as Env, make_env, names as env_names, toy_names
from ..results import hyperparameters
from ..strategies.base import AbstractStrategy
from . import tuning
from .fingerprint import PROTOCOL_VERSION, program_fingerprint


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


@dataclass(frozen=True)
class EnvSpec:
    """How a worker rebuilds an env that does not pickle (a Brax env)."""

    name: str
    backend: str
    episode_length: int

    def build(self) -> Env:
        backend = {} if self.name in toy_names() else {"backend": self.backend}
        return make_env(self.name, episode_length=self.episode_length, **backend)


@dataclass(frozen=True)
class CellTask:
    """Everything one cell's task needs, picklable once `portable` has made it so."""

    study: str
    root: str
    env: Any  # Env, or an EnvSpec in a worker's task
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
    check: bool = False  # only say whether the saved cell has this key (`run_study`)

    @property
    def path(self) -> Path:
        return Path(self.root) / self.settings["env"] / self.label


def tasks(name, root, cells, protocol: dict, run: dict, allow_unequal: bool) -> list[CellTask]:
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
        c.name: c.search and tuning.check_search(c.strategy, c.search, c.name) for c in cells
    }
    sizes = {c.name: tuning.size(searches[c.name]) for c in cells}
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
        key = settings(
            cell, seeds, protocol["seed"], evals, protocol["episodes"], search, tuning_seeds
        )
        jobs.append(
            CellTask(
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
                settings=key,
            )
        )
    return jobs


def portable(job: CellTask) -> CellTask:
    """`job` ready for another process: its env replaced by how to rebuild it where the env
    does not pickle; a clear error for what cannot travel."""
    try:
        pickle.dumps(job.env)
        env = job.env
    except (pickle.PicklingError, TypeError, AttributeError):
        if job.env.name not in env_names():
            raise ValueError(
                f"cell {job.settings['env']}/{job.label}: its env does not pickle and"
                f" {job.env.name!r} is not a make_env name, so an executor's worker cannot"
                " rebuild it"
            ) from None
        env = EnvSpec(job.env.name, job.env.backend, job.env.episode_length)
    job = dataclasses.replace(job, env=env)
    try:
        pickle.dumps(job)
    except (pickle.PicklingError, TypeError, AttributeError) as error:
        raise ValueError(
            f"cell {job.settings['env']}/{job.label} cannot be sent to an executor ({error});"
            " make_policy must be a top-level function (not a lambda or a closure)"
        ) from None
    return job


def settings(cell: Cell, num_seeds, seed, num_evals, num_eval_episodes, search, tuning_seeds):
    """What a saved cell must match to be reused (`run.config["study"]["settings"]`), but
    for the fingerprint of its program (`"program"`), which `run_task` traces in the
    worker that trains the cell."""
    strategy = cell.strategy.for_env(cell.env).for_budget(cell.total_steps)
    settings = {
        "strategy": type(cell.strategy).__name__,
        "hyperparameters": hyperparameters(strategy),
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


def fingerprinted(job: CellTask, env: Env) -> CellTask:
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
