"""Tuning a study cell: a search over float hyperparameters as one `train_sweep` program on
tuning seeds, then the best configuration re-trained on fresh seeds.

Selection never sees the reported seeds: the tuning keys come from their own stream
(`tuning_keys`) and are checked to be disjoint from the reported ones.
"""

import dataclasses
import itertools
import json
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import jax.random as jr
import numpy as np

from .._results.files import atomic_write
from .._train.checkpoint import key_data, latest
from .._train.sweep import check_sweepable
from ..results import Run
from ..stats import aggregate, aggregate_name
from ..train import train_sweep

Search = Mapping[str, Sequence[float]]
TUNING_STREAM = 0x74756E65  # folded into the study's seed: the tuning keys' own stream
# The tuning runs' first seed index: their evaluation episodes are never a reported seed's.
TUNING_EPISODES = 1_000_000


def log_grid(low: float, high: float, num: int) -> list[float]:
    """`num` values from `low` to `high`, evenly spaced on a log scale (3 significant
    digits), e.g. for a learning-rate search.

    **Example:**

    ```python
    log_grid(1e-4, 1e-2, 3)   # [0.0001, 0.001, 0.01]
    ```
    """
    if not (isinstance(num, int) and num >= 1):
        raise ValueError(f"log_grid needs num >= 1 values, got {num!r}")
    if not (0 < low <= high) or not (math.isfinite(low) and math.isfinite(high)):
        raise ValueError(f"log_grid needs 0 < low <= high, got low={low!r}, high={high!r}")
    values = np.geomspace(low, high, num) if num > 1 else np.array([low])
    return [float(f"{v:.3g}") for v in values]


def configs(search: Search) -> list[dict[str, float]]:
    """Every configuration of `search`, in `train_sweep`'s order (`itertools.product` of
    the lists in the dict's order, the last name varying fastest)."""
    names = list(search)
    return [
        dict(zip(names, values, strict=True))
        for values in itertools.product(*(search[n] for n in names))
    ]


def size(search: Search | None) -> int:
    """How many configurations a cell trains when tuned (1: not tuned)."""
    return 1 if not search else math.prod(len(v) for v in search.values())


def check_search(strategy, search: Search, where: str) -> dict[str, list[float]]:
    """`search` as plain lists of floats, after checking that each name is in
    `type(strategy).sweepable` and that the strategy accepts every configuration (before
    training)."""
    owner = type(strategy).__name__
    if not isinstance(search, Mapping) or not search:
        raise ValueError(
            f"{where}: search must be a non-empty dict from sweepable fields of {owner} to"
            f" lists of values, got {search!r}; {owner}.sweepable ="
            f" {getattr(type(strategy), 'sweepable', ())!r}"
        )
    out = {}
    for name, values in search.items():
        try:  # one compiled train_sweep program: only `sweepable` fields
            check_sweepable(strategy, name)
        except ValueError as error:
            raise ValueError(f"{where}: search[{name!r}]: {error}") from None
        if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or not values:
            raise ValueError(f"{where}: search[{name!r}] must be a non-empty list, got {values!r}")
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            raise ValueError(f"{where}: search[{name!r}] holds {values!r}; expected numbers")
        out[name] = [float(v) for v in values]
    for config in configs(out):
        try:
            dataclasses.replace(strategy, **config)
        except ValueError as error:
            raise ValueError(f"{where}: search config {config}: {error}") from None
    return out


def tuning_keys(seed: int, num: int, reported: jax.Array) -> jax.Array:
    """`num` tuning keys from their own stream of the study's `seed`, checked to share no
    key with the `reported` ones."""
    keys = jr.split(jr.fold_in(jr.key(seed), TUNING_STREAM), num)
    ours = {tuple(k) for k in key_data(keys).tolist()}
    if ours & {tuple(k) for k in key_data(reported).tolist()}:  # never, but it is the contract
        raise RuntimeError(f"tuning keys of seed {seed} overlap the reported keys")
    return keys


def tune(
    strategy,
    env,
    factory: Callable,
    search: Search,
    *,
    keys: jax.Array,
    partial: Path | None = None,
    **train,
) -> dict[str, Any]:
    """Train every configuration of `search` on the tuning `keys` (one `train_sweep`) and
    pick the one with the best final `aggregate` over seeds (NaN counts as the worst).

    **Widening.** Where a one-field search picks its smallest or largest value, the search
    goes on past that edge: as many new values, at the same log spacing (`widened`), up to
    `MAX_WIDENINGS` more rounds or until the strategy refuses the values. Each round is the
    same compiled program (the values are traced). The record lists every configuration
    tried, so the table shows the effort spent.

    **Resuming.** With `partial`, round `i` checkpoints at every evaluation into
    `partial/round-i` and resumes from there: a process killed in the middle of a search
    loses at most one evaluation interval, and the search it finishes is the uninterrupted
    one (`resumable`).

    **Returns:** the record saved as the cell's `tuning.json`: the search and its
    widenings, configs, per-config scores and final returns per seed, each config's curve
    of the aggregate, the chosen config, the tuning keys and seconds."""
    rounds = [_round(strategy, env, factory, search, keys, train, partial)]
    searches: list[Search] = [dict(search)]
    while len(rounds) <= MAX_WIDENINGS:
        tried = [c for r in rounds for c in r["configs"]]
        scores = np.concatenate([r["scores"] for r in rounds])
        wider = widened(strategy, tried, tried[int(np.nanargmax(_worst_nan(scores)))])
        if wider is None:
            break
        searches.append(wider)
        rounds.append(_round(strategy, env, factory, wider, keys, train, partial, len(rounds)))
    tried = [c for r in rounds for c in r["configs"]]
    scores = np.concatenate([r["scores"] for r in rounds])
    finals = np.concatenate([r["finals"] for r in rounds])
    best = int(np.argmax(_worst_nan(scores)))
    return {
        "search": {k: list(v) for k, v in search.items()},
        "widened": [{k: list(v) for k, v in w.items()} for w in searches[1:]],
        "configs": tried,
        "tuning_seeds": len(keys),
        "stat": aggregate_name(len(keys)),
        "scores": [_number(s) for s in scores],
        "chosen_index": best,
        "chosen": tried[best],
        "final_returns": [[_number(x) for x in row] for row in finals],
        "env_steps": rounds[0]["env_steps"],
        "curves": [c for r in rounds for c in r["curves"]],
        "tuning_keys": key_data(keys).tolist(),
        "seconds": {k: sum(r["seconds"][k] for r in rounds) for k in rounds[0]["seconds"]},
    }


MAX_WIDENINGS = 2  # more search rounds past an edge, at most


def widened(strategy, tried: list[dict], best: dict) -> dict[str, list[float]] | None:
    """The next round of a one-field search whose `best` value is the smallest or largest
    `tried`: as many values again past that edge at the search's log spacing, those the
    strategy accepts; None where the best is interior, the search has several fields or
    fewer than 2 values, or no value past the edge is valid."""
    names = {name for config in tried for name in config}
    if len(names) != 1:
        return None
    (name,) = names
    values = sorted({c[name] for c in tried})
    if len(values) < 2 or min(values) <= 0 or best[name] not in (values[0], values[-1]):
        return None
    step = (values[-1] / values[0]) ** (1 / (len(values) - 1))
    sign = 1 if best[name] == values[-1] else -1
    new = [float(f"{best[name] * step ** (sign * k):.3g}") for k in range(1, len(values) + 1)]
    valid = []
    for value in new:
        try:
            dataclasses.replace(strategy, **{name: value})
        except ValueError:
            break  # past the field's bound: stop there
        valid.append(value)
    return {name: valid} if valid else None


def _worst_nan(scores: np.ndarray) -> np.ndarray:
    return np.where(np.isnan(scores), -np.inf, scores)


def _round(
    strategy, env, factory, search: Search, keys, train: dict, partial: Path | None, index=0
) -> dict[str, Any]:
    """Search round `index`: its configs, scores and per-seed finals, curves and seconds
    (checkpointed as `round-{index}` under `partial`, `resumable`). A finished round's
    record is kept there too (`round-{index}.json`, a few kB, small enough to commit
    where the checkpoints are not), and a round whose record exists is read, not trained:
    a search spans sessions that each finish some of its rounds."""
    resume = resumable(partial, f"round-{index}")
    train = {**train, **resume}
    kept = partial / f"round-{index}.json" if partial is not None and resume else None
    if kept is not None and kept.exists():
        saved = json.loads(kept.read_text())
        nan = lambda x: np.array(x, dtype=float)  # (JSON's None is a NaN score)
        return {**saved, "scores": nan(saved["scores"]), "finals": nan(saved["finals"])}
    sweep = train_sweep(
        strategy, env, factory, sweep=search, keys=keys, seed_index=TUNING_EPISODES, **train
    )
    finals = np.asarray(sweep.curve.eval_return)[:, :, -1].mean(-1)  # (configs, seeds)
    returns = np.asarray(sweep.curve.eval_return).mean(-1)  # (configs, seeds, evals)
    record = {
        "configs": sweep.config["sweep"],
        "scores": np.array([float(aggregate(f)) for f in finals]),
        "finals": finals,
        "env_steps": np.median(np.asarray(sweep.curve.env_steps), axis=(0, 1)).tolist(),
        "curves": [[_number(aggregate(r[:, e])) for e in range(r.shape[1])] for r in returns],
        "seconds": {
            k: sweep.config[f"{k}_seconds"] for k in ("compile", "train", "eval", "checkpoint")
        },
    }
    if kept is not None:
        plain = {**record, "scores": _numbers(record["scores"]), "finals": _numbers(finals)}
        atomic_write(kept, json.dumps(plain).encode())
    return record


def retrain(
    strategy,
    env,
    factory: Callable,
    chosen: dict,
    *,
    keys: jax.Array,
    partial: Path | None = None,
    **train,
) -> Run:
    """`chosen` trained on the fresh `keys`, as a `train_seeds` run (leading seed axis);
    with `partial`, checkpointed into and resumed from `partial/retrain` (`resumable`).

    It runs as a one-config `train_sweep`: the same program as the tuning sweep whenever
    `len(keys)` equals the tuning sweep's configs x seeds, so XLA's persistent
    compilation cache serves it without a second compile."""
    one = {name: [value] for name, value in chosen.items()}
    train = {**train, **resumable(partial, "retrain")}
    run = train_sweep(strategy, env, factory, sweep=one, keys=keys, **train)
    first = lambda x: x[0] if eqx.is_array(x) else x
    config = {k: v for k, v in run.config.items() if k not in ("sweep", "num_configs")}
    config["hyperparameters"] = {**config["hyperparameters"], **chosen}
    return Run(
        policy=jax.tree.map(first, run.policy),
        curve=jax.tree.map(first, run.curve),
        metrics=jax.tree.map(first, run.metrics),
        config=config,
    )


def resumable(partial: Path | None, name: str) -> dict[str, Any]:
    """`train_sweep`'s checkpoint arguments for the run `name` of a cell whose unfinished
    runs are kept under `partial`: it checkpoints into `partial/name` and resumes from
    there when an earlier process left a checkpoint. Nothing without `partial`, or across
    the processes of `jax.distributed` (where `train` does not checkpoint)."""
    if partial is None or jax.process_count() > 1:
        return {}
    folder = partial / name
    return {"checkpoint_dir": folder, "resume_from": folder if latest(folder) else None}


def _numbers(a) -> list:
    """An array as nested lists of `_number`s."""
    return [_numbers(x) for x in a] if np.ndim(a) > 1 else [_number(x) for x in a]


def _number(x) -> float | None:
    """A float for JSON (None for NaN, which JSON cannot hold)."""
    x = float(x)
    return None if math.isnan(x) else x
