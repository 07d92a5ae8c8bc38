"""A study's numbers, as plain JSON (what `tables` prints): final scores against the
untrained policy and the references, ratios at a common target (`ratios`), the tuning and
its cost, and where each cell was trained."""

from collections.abc import Sequence
from typing import Any

import numpy as np

from ..results import Run
from ..stats import (
    aggregate,
    aggregate_ci,
    aggregate_name,
    probability_of_improvement,
)
from . import ratios as _ratios

DID_NOT_LEARN = "did not learn"


def _scores(run: Run, point: int) -> np.ndarray:
    """Each seed's mean return over the episodes of evaluation `point`."""
    return np.asarray(run.curve.eval_return)[:, point].mean(-1)


def untrained_scores(run: Run) -> np.ndarray:
    """Each seed's mean return before training: the curve at env step 0, `(seeds,)`.

    **Example:**

    ```python
    untrained_scores(runs["reach", "PPO"])   # e.g. array([-104.1, -98.7, ...])
    ```
    """
    steps = np.asarray(run.curve.env_steps)[:, 0]
    if np.any(steps != 0):
        raise ValueError(f"the run's first evaluation is at env step {steps.max()}, not 0")
    return _scores(run, 0)


def summary(runs: dict[tuple[str, str], Run], references: Sequence[str] = ("PPO",)) -> dict:
    """The numbers of a study's tables, as plain JSON.

    - `cells`: one row per cell: `seeds`, `stat` (`"IQM"`, or `"mean"` below 5 seeds),
      `final` with its 95% bootstrap CI (`low`, `high`), `untrained` (the same statistic
      at env step 0), `p_over_untrained` (P(final > untrained) over pairs of seeds),
      `learned` (the CI's lower end lies above `untrained`), `p_over_<REF>` for each
      reference on the env (None where the budgets differ by more than 5%), seconds, and
      `tuning` (None for an untuned cell).
    - `untrained`: one row per env: the statistic over every cell's seeds at env step 0.
    - `crossings`: per env, reference and other cell: a common target below both finals
      and both sides' crossings of it, with the steps and seconds ratios (reference /
      cell) and their bootstrap CIs over seeds on both sides (`diffsim._ratios`); `target`
      None where a side did not learn.

    **Example:**

    ```python
    table = summary(load_study("results/compare"), references=("PPO",))
    print(format_summary(table, provenance=diffsim.results.provenance()))
    ```
    """
    cells = [_cell_row(env, label, run, runs, references) for (env, label), run in runs.items()]
    untrained = []
    for env in dict.fromkeys(env for env, _ in runs):
        pooled = np.concatenate([untrained_scores(r) for (e, _), r in runs.items() if e == env])
        mid, low, high = aggregate_ci(pooled)
        untrained.append(
            {
                "env": env,
                "seeds": len(pooled),
                "stat": aggregate_name(len(pooled)),
                "score": float(mid),
                "low": float(low),
                "high": float(high),
            }
        )
    crossings = [
        row
        for ref in references
        for env in dict.fromkeys(env for env, _ in runs)
        if (env, ref) in runs
        for row in _crossings(env, ref, runs)
    ]
    trained_at: dict[str, int] = {}
    for run in runs.values():
        state = trained_state(run.config.get("study", {}).get("provenance"))
        trained_at[state] = trained_at.get(state, 0) + 1
    return {
        "references": list(references),
        "cells": cells,
        "untrained": untrained,
        "crossings": crossings,
        "trained_at": trained_at,
    }


def trained_state(provenance: dict | None) -> str:
    """`"<short commit>"`, with `" dirty"` for a dirty tree, or `"unknown"`."""
    if not provenance or provenance.get("commit") is None:
        return "unknown"
    return provenance["commit"][:10] + (" dirty" if provenance.get("dirty") else "")


def _cell_row(env: str, label: str, run: Run, runs: dict, references: Sequence[str]) -> dict:
    final, start = _scores(run, -1), untrained_scores(run)
    mid, low, high = aggregate_ci(final)
    untrained = float(aggregate(start))
    row: dict[str, Any] = {
        "env": env,
        "strategy": label,
        "env_steps": run.config["total_steps"],
        "seeds": len(final),
        "stat": aggregate_name(len(final)),
        "final": float(mid),
        "low": float(low),
        "high": float(high),
        "untrained": untrained,
        "p_over_untrained": probability_of_improvement(final, start),
        "learned": bool(low > untrained),
    }
    for ref in references:
        if (env, ref) in runs:  # final scores compare only at the same budget (else None)
            other = runs[env, ref]
            same = _same_budget(run.config["total_steps"], other.config["total_steps"])
            p = probability_of_improvement(final, _scores(other, -1)) if same else None
            row[f"p_over_{ref}"] = p
    for k in ("train", "eval"):
        row[f"{k}_s"] = run.config.get(f"{k}_seconds", float("nan"))
    row["compile_s"] = _ratios.compile_seconds(run)
    row["load"] = run.config.get("study", {}).get("load")  # None: trained before it was kept
    row["gradients"] = gradient_health(run)
    tuning = run.config.get("study", {}).get("tuning")
    row["tuning"] = tuning and {
        "configs": len(tuning["configs"]),
        "tuning_seeds": tuning["tuning_seeds"],
        "stat": tuning["stat"],
        "chosen": tuning["chosen"],
        "at_edge": _at_edge(tuning),
        "widened": len(tuning.get("widened", [])),
        "scores": tuning["scores"],
        "seconds": sum(tuning["seconds"].values()),
    }
    return row


def gradient_health(run: Run) -> dict[str, Any] | None:
    """How a run's updates went, over its seeds' iterations: `updates` (iterations that
    ran), `skipped` (the share of them that skipped an update for a non-finite loss or
    gradient), and where the strategy reports them the largest and median pre-clip
    gradient norm (`grad_norm_max`, `grad_norm_median`) and the largest norm of the
    cotangent at one env step of a window (`step_norm_max`). None for a strategy that
    reports no `skipped_updates`.

    **Example:**

    ```python
    gradient_health(runs["halfcheetah", "SHAC"])["skipped"]   # e.g. 0.0
    ```
    """
    metrics = {k: np.asarray(v, np.float64) for k, v in run.metrics.items()}
    if "skipped_updates" not in metrics:
        return None
    ran = (
        np.isfinite(metrics["env_steps"])
        if "env_steps" in metrics
        else np.ones_like(metrics["skipped_updates"], bool)
    )
    updates = int(ran.sum())
    health = {
        "updates": updates,
        "skipped": float(np.sum(metrics["skipped_updates"][ran] > 0)) / max(updates, 1),
    }
    if "grad_norm" in metrics:
        norms = metrics["grad_norm"][ran & np.isfinite(metrics["grad_norm"])]
        health["grad_norm_max"] = float(norms.max()) if norms.size else float("nan")
        health["grad_norm_median"] = float(np.median(norms)) if norms.size else float("nan")
    if "grad_norm_step_max" in metrics:
        health["step_norm_max"] = float(np.nanmax(metrics["grad_norm_step_max"][ran]))
    return health


def _at_edge(tuning: dict) -> list[str]:
    """The fields whose chosen value is the smallest or largest of all tried (widenings
    included): the search did not bracket the best."""
    edge = []
    for k, v in tuning["chosen"].items():
        tried = [c[k] for c in tuning["configs"]]
        if len(set(tried)) > 1 and v in (min(tried), max(tried)):
            edge.append(k)
    return edge


def _same_budget(a: int, b: int) -> bool:
    """Whether two runs' env-step budgets are equal up to iteration rounding (5%)."""
    return abs(a - b) <= 0.05 * max(a, b)


def _crossings(env: str, ref: str, runs: dict) -> list[dict]:
    """Both sides' first crossings of a common target (`_ratios`) and the ratios with their
    bootstrap intervals, for every other cell on env against the reference."""
    base = runs[env, ref]
    rows = []
    for (e, label), run in runs.items():
        if e != env or label == ref:
            continue
        pooled = np.concatenate([untrained_scores(base), untrained_scores(run)])
        untrained = float(aggregate(pooled))
        finals = float(aggregate(_scores(base, -1))), float(aggregate(_scores(run, -1)))
        target = _ratios.common_target(untrained, *finals)
        row = {
            "env": env,
            "reference": ref,
            "strategy": label,
            "untrained": untrained,
            "reference_final": finals[0],
            "final": finals[1],
            "target": target,
        }
        if target is not None:
            row.update(_ratios.crossing_ratios(_ratios.side(base), _ratios.side(run), target))
        rows.append(row)
    return rows
