"""`train`, `train_seeds` and `train_sweep`: a whole run as a pure function of a PRNG key.

A run is `num_evals - 1` segments. Each segment is one jit-compiled loop over strategy
iterations followed by an evaluation; the host only starts segments, reads the clock and
updates the progress bar in between. The machinery lives in private modules: the budget
plan, the checks of the inputs and of the strategy contract, the compiled program and its
cache, the host loop, sweep grids, the log and progress bar and checkpoints, one module
each in `diffsim._train`.
"""

import dataclasses
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
from jaxtyping import PRNGKeyArray

from ._train.loop import Options, run
from ._train.program import EVAL_SEED as EVAL_SEED, PolicyOrFactory
from ._train.sweep import sweep_grid
from ._types import Env, Keys
from .results import Run
from .strategies.base import AbstractStrategy


def train(
    strategy: AbstractStrategy,
    env: Env,
    policy: PolicyOrFactory,
    *,
    key: PRNGKeyArray,
    total_steps: int,
    num_evals: int = 20,
    num_eval_episodes: int = 16,
    progress: bool = True,
    checkpoint_dir: str | os.PathLike | None = None,
    checkpoint_every: int = 1,
    resume_from: str | os.PathLike | None = None,
    devices: Sequence[jax.Device] | None = None,  # pyright: ignore[reportInvalidTypeForm]
    log_dir: str | os.PathLike | None = None,
    seed_index: int = 0,
) -> Run:
    """Train `policy` on `env` with `strategy` for `total_steps` env steps.

    **Budget.** `total_steps` counts the env steps that feed updates, the same way for
    every strategy (`strategy.steps_per_iteration` per iteration; ES counts only the steps
    inside each member's scored episode). The run executes the number of iterations
    whose count is nearest `total_steps`, spread over `num_evals - 1` segments that differ
    by at most one iteration (for a fixed cost per iteration, the run ends within half an
    iteration of `total_steps`); `run.curve.env_steps` records the real count at
    every evaluation and `run.config["total_steps"]` the final one. A budget of fewer
    iterations than intervals evaluates after every iteration instead, with a warning.

    **Evaluation.** At `num_evals` points, the first before any training and the last at
    the end, the deterministic policy plays `num_eval_episodes` full episodes; they stop
    stepping once all have ended. Their starts come from a key fixed per seed index
    (seed `i` of `train_seeds` gets the same episodes under every strategy: paired
    comparisons), so start-state variance is part of the spread across seeds.

    **Clock.** Training, evaluation and checkpoint writing are timed apart:
    `run.curve.wall_time` counts training only; `run.config` has `train_seconds`,
    `eval_seconds`, `checkpoint_seconds` and `compile_seconds` (tracing and XLA, or loading
    from the persistent cache).

    **Checks.** The inputs and the strategy's contract (`AbstractStrategy`: hashable, step
    counts, metrics of scalars, a state that keeps its shapes) are checked before the
    training loop compiles; each step's env-step count, a traced value, after each
    segment.

    **Arguments:**

    - `strategy`: a `PPO`, `APG`, `ES`, ... instance.
    - `env`: from `diffsim.make_env`.
    - `policy`: an `eqx.Module` acting on one observation, or a function
      `key -> eqx.Module` (then each seed of `train_seeds` gets its own initialisation).
    - `key`: the run's only source of randomness (keyword-only).
    - `total_steps`: env-step budget for training (evaluation steps not counted).
    - `progress`: show a progress bar (env steps, steps/s, latest eval return).
    - `checkpoint_dir`: if given, the full training state (strategy state, env batch,
      keys) and the curve so far are written there after every `checkpoint_every`
      evaluations, atomically (a killed process leaves the previous checkpoint intact).
      Checked for writability before anything compiles.
    - `resume_from`: a `checkpoint_dir` of an earlier, interrupted call with the same
      arguments: training continues from its newest checkpoint and returns what the
      uninterrupted run would have (same final policy and curve; wall-clock continues).
    - `seed_index`: which seed of a study this run is: it picks the evaluation episodes
      (`train(..., key=keys[i], seed_index=i)` is seed `i` of `train_seeds`).
    - `log_dir`: if given, `log_dir/log.jsonl` gets one JSON line per evaluation as it
      happens (env steps, seconds, mean return overall and per seed, mean of each training
      metric over the segment): `pandas.read_json(path, lines=True)` reads it while the
      run goes on. Checked for writability before anything compiles.
    - `devices`: where to run (default `jax.devices()`). With several, the strategy's
      batch (`strategy.batch_size`: PPO's and APG's envs, ES's population) and the
      evaluation episodes are split over them along a `Mesh` axis `"batch"`, with
      `NamedSharding`s; the batch must divide evenly. Results equal the one-device run's
      up to float reassociation in the cross-device sums.

    **Returns:** a `Run` with `policy`, `curve` (`LearningCurve`, `E = num_evals`),
    `metrics` (`Float[Array, "iterations"]` each, one entry per iteration, including
    `"env_steps"`, the steps it counted) and `config`.

    **Example:**

    ```python
    env = diffsim.make_env("pendulum")
    policy = diffsim.GaussianPolicy(env.observation_size, env.action_size, key=k1)
    run = diffsim.train(diffsim.PPO(), env, policy, key=k2, total_steps=200_000)
    run.curve.eval_return.mean(-1)   # mean return at each evaluation point
    ```
    """
    return run(strategy, env, policy, key, _options(locals(), seeds=False))


def train_seeds(
    strategy: AbstractStrategy,
    env: Env,
    policy: PolicyOrFactory,
    *,
    keys: Keys,
    total_steps: int,
    num_evals: int = 20,
    num_eval_episodes: int = 16,
    progress: bool = True,
    checkpoint_dir: str | os.PathLike | None = None,
    checkpoint_every: int = 1,
    resume_from: str | os.PathLike | None = None,
    devices: Sequence[jax.Device] | None = None,  # pyright: ignore[reportInvalidTypeForm]
    log_dir: str | os.PathLike | None = None,
) -> Run:
    """`train` `vmap`ped over a batch of keys: many seeds, one compile, one program.

    Each seed is exactly `train(..., key=keys[i])` (same arithmetic, batched). Pass a
    policy factory `key -> policy` to give each seed its own initial weights.

    With several devices (`devices`, default `jax.devices()`: GPUs, TPUs, or CPU
    devices from `XLA_FLAGS=--xla_force_host_platform_device_count=N`), they form a
    `Mesh` with axes `("seeds", "batch")` and every array gets a `NamedSharding`: the
    seeds are split over `g = gcd(len(keys), len(devices))` devices and each seed's
    batch (as in `train`) over the remaining `len(devices) / g`, which must divide
    `strategy.batch_size`. So 8 seeds on 4 devices train 2 seeds per device, and 2 seeds
    on 4 devices split each seed's envs in two. Across hosts (processes), call
    `jax.distributed.initialize()` first, then make the same call in every process:
    `jax.devices()` then spans every host, and every process returns the whole `Run`
    (`docs/snippets/multihost.py` is a complete example). Checkpoints work in one process
    only; the other arguments are as in `train`.

    **Returns:** a `Run` whose `policy`, `curve` and `metrics` leaves have a leading seed
    axis `S = len(keys)`.

    **Example:**

    ```python
    make = lambda k: diffsim.GaussianPolicy(env.observation_size, env.action_size, key=k)
    runs = diffsim.train_seeds(diffsim.PPO(), env, make, keys=jax.random.split(key, 8),
                               total_steps=200_000)
    runs.curve.eval_return.shape   # (8, 20, 16)
    ```
    """
    _check_keys(keys)
    return run(strategy, env, policy, keys, _options(locals(), seeds=True))


def train_sweep(
    strategy: AbstractStrategy,
    env: Env,
    policy: PolicyOrFactory,
    *,
    sweep: Mapping[str, Any],
    keys: Keys,
    total_steps: int,
    num_evals: int = 20,
    num_eval_episodes: int = 16,
    progress: bool = True,
    checkpoint_dir: str | os.PathLike | None = None,
    checkpoint_every: int = 1,
    resume_from: str | os.PathLike | None = None,
    devices: Sequence[jax.Device] | None = None,  # pyright: ignore[reportInvalidTypeForm]
    seed_index: int = 0,
) -> Run:
    """`train_seeds` over every combination of float hyperparameters: one compiled program.

    `sweep` maps names of float fields of `strategy` (`learning_rate`, `std`,
    `entropy_coef`, `discount`, `actor_learning_rate`, ...) to lists of values. The
    configs are `itertools.product` of the lists in the dict's order (the last name varies
    fastest), and config `c`, seed `s` is exactly `train_seeds(dataclasses.replace(strategy,
    **run.config["sweep"][c]), ..., keys=keys)[s]`, up to float reassociation: the swept
    fields are traced values instead of constants, and all `C x S` runs are one batch (a
    `vmap` over runs, split over devices as seeds are in `train_seeds`). Seed `s` gets the
    same key, initial policy and evaluation episodes under every config (paired).

    Fields that set shapes or control flow (`num_envs`, `horizon`, `population_size`,
    flags, names) cannot vary inside one program: sweeping one is a `ValueError` that
    says to loop over `train_seeds` instead. So is an unknown name, an empty list, or a
    value the strategy itself rejects (each value is checked with `dataclasses.replace`),
    all before anything compiles. A float field that the strategy's code branches on in
    Python (ES's `weight_decay`) fails when traced, also with a `ValueError`, before XLA
    compiles. The values replace the fields after `train`'s `for_env` and `for_budget` (so
    PPO's learning-rate decay starts from each config's rate). `checkpoint_dir`,
    `checkpoint_every` and `resume_from` are `train`'s: a sweep killed part-way resumes to
    the uninterrupted result (a study's tuning rounds use this). `seed_index`: seed `s`
    evaluates on the episodes of seed index `seed_index + s` (a study's tuning uses indices
    past the reported seeds', so that tuning and reported evaluations never share an
    episode).

    **Returns:** a `Run` whose `policy`, `curve` and `metrics` leaves have leading axes
    `(C, S)`: `C = prod(len(v) for v in sweep.values())` configs and `S = len(keys)` seeds,
    e.g. `curve.eval_return: Float[Array, "C S E episodes"]`. `run.config["sweep"]` lists
    the configs in axis order (`[{"learning_rate": 1e-4}, ...]`), `num_configs` is `C` and
    `hyperparameters[name]` holds one value per config. `compile_seconds` and
    `train_seconds` are for the whole grid. `Run.save` / `load_run` round-trip it.

    **Example:**

    ```python
    run = diffsim.train_sweep(
        diffsim.PPO(), env, make_policy,
        sweep={"learning_rate": [1e-4, 3e-4, 1e-3], "entropy_coef": [0.0, 0.01]},
        keys=jax.random.split(key, 5), total_steps=200_000,
    )
    run.curve.eval_return.shape     # (6, 5, 20, 16): configs, seeds, evaluations, episodes
    run.config["sweep"][1]          # {"learning_rate": 0.0001, "entropy_coef": 0.01}
    final = run.curve.eval_return[:, :, -1].mean(-1)   # (6, 5): one score per config and seed
    ```
    """
    grid = sweep_grid(strategy, sweep)
    _check_keys(keys)
    options = _options(locals(), seeds=True)
    template = dataclasses.replace(strategy, **grid.listing()[0])  # its fields get replaced
    return run(template, env, policy, keys, options)


def _options(arguments: Mapping[str, Any], *, seeds: bool) -> Options:
    """`Options` from a public function's arguments (its `locals()`): those named like a
    field of `Options`; the fields it lacks keep their defaults."""
    fields = {field.name for field in dataclasses.fields(Options)}
    return Options(**{k: v for k, v in arguments.items() if k in fields}, seeds=seeds)


def _check_keys(keys) -> None:
    if not hasattr(keys, "shape") or len(keys) < 1:
        raise ValueError(f"keys must be a non-empty batch of PRNG keys, got {keys!r}")
