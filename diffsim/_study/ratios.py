"""Speed-up ratios a reviewer accepts: both sides' first crossings of one common target,
with a bootstrap confidence interval over seeds on both sides.

**The target** is common to the two sides and below both finals: `TARGET_FRACTION` of the
way from the untrained score (both sides' seeds pooled) to the lower of the two final
scores. A side reaches it at the first evaluation from which its statistic across seeds
(`diffsim.stats.aggregate`: the IQM, the mean below 5 seeds) stays at or above it for
`HOLD` evaluations in a row. Where the lower final is not above the untrained score there
is no target (one side did not learn).

**The ratio** is the reference's env steps (or training seconds) to the target over the
contender's: above 1 the contender got there sooner. Seeds are resampled with replacement
on both sides at once; a resample where the contender never holds the target counts as a
ratio of 0, one where the reference never does as infinity, so the interval says "never"
where the data do, and `never` gives the share of resamples where either side never got
there. Training seconds are also given with each side's compile seconds added.

**The evaluation grid** limits what a crossing says: a side first holding the target at an
evaluation got there somewhere after the first update past the evaluation before it. Two
sides on grids a few steps apart (19,968 and 20,000 env steps) can have a ratio whose seed
interval excludes 1 without either being sooner. So each ratio also has a *resolved*
interval, the bootstrap taken with the reference's earliest possible crossing over the
contender's latest for its low end, and the other way round for its high end; `verdict`
calls a side sooner only where that interval excludes 1.
"""

from typing import NamedTuple

import numpy as np

from ..results import Run
from ..stats import MIN_IQM_SEEDS

TARGET_FRACTION = 0.8
HOLD = 2


class Side(NamedTuple):
    """One cell's curves: `scores` `(seeds, E)` (mean return over the episodes of each
    evaluation), `steps` and `seconds` `(E,)` (medians over seeds), `compile` seconds and
    `iteration`, the env steps of one update (0: unknown)."""

    scores: np.ndarray
    steps: np.ndarray
    seconds: np.ndarray
    compile: float
    iteration: float = 0.0


def side(run: Run) -> Side:
    """The `Side` of a run from `train_seeds` (a study cell)."""
    scores = np.asarray(run.curve.eval_return, np.float64).mean(-1)
    steps = np.median(np.asarray(run.curve.env_steps), 0)
    seconds = np.median(np.asarray(run.curve.wall_time), 0)
    iteration = float(run.config.get("steps_per_iteration") or 0.0)
    return Side(scores, steps, seconds, compile_seconds(run), iteration)


def compile_seconds(run: Run) -> float:
    """The seconds to compile a cell's training program: its own, or, where its re-training
    reused the compiled search (`run_study`'s tuning), the search's."""
    tuning = run.config.get("study", {}).get("tuning") or {}
    searched = (tuning.get("seconds") or {}).get("compile", 0.0)
    return float(max(run.config.get("compile_seconds") or 0.0, searched))


def common_target(untrained: float, final_a: float, final_b: float) -> float | None:
    """`TARGET_FRACTION` of the way from `untrained` to the lower final, or None."""
    lower = min(final_a, final_b)
    if not lower > untrained:
        return None
    return untrained + TARGET_FRACTION * (lower - untrained)


def _aggregate(scores: np.ndarray) -> np.ndarray:
    """`stats.aggregate` over axis -2 of `(..., seeds, E)`, vectorised over the rest."""
    n = scores.shape[-2]
    if n < MIN_IQM_SEEDS:
        return scores.mean(-2)
    cut = int(0.25 * n)
    return np.sort(scores, axis=-2)[..., cut : n - cut, :].mean(-2)


def first_held(curves: np.ndarray, target: float) -> np.ndarray:
    """Per curve `(..., E)`, the first evaluation from which it holds `target` for `HOLD`
    evaluations in a row; -1 where it never does."""
    above = curves >= target
    held = np.ones(above.shape[:-1] + (above.shape[-1] - HOLD + 1,), bool)
    for k in range(HOLD):
        held &= above[..., k : above.shape[-1] - HOLD + 1 + k]
    return np.where(held.any(-1), held.argmax(-1), -1)


def _earliest(clock: np.ndarray, s: Side) -> np.ndarray:
    """Per evaluation, the earliest `clock` at which a crossing first seen there can have
    happened: one update after the evaluation before it (at it where no update lies
    between; at the evaluation itself for the first), the clock interpolated by env steps."""
    steps_between = np.diff(s.steps)
    after_one = np.where(
        steps_between > 0, np.minimum(1.0, s.iteration / np.maximum(steps_between, 1)), 0.0
    )
    return np.concatenate([clock[:1], clock[:-1] + after_one * np.diff(clock)])


def _reference_over_contender(
    ref_at: np.ndarray, other_at: np.ndarray, ref_x, other_x
) -> np.ndarray:
    """reference / contender at their crossings (evaluation indices, -1: never): 0 where
    only the contender never got there, inf where only the reference never did (or the
    contender was there at the start), NaN where neither did."""
    a = np.where(ref_at >= 0, ref_x[np.maximum(ref_at, 0)], np.inf)
    b = np.where(other_at >= 0, other_x[np.maximum(other_at, 0)], np.inf)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = a / b
    out = np.where((other_at >= 0) & (b == 0), np.inf, out)
    return np.where((ref_at < 0) & (other_at < 0), np.nan, out)


def crossing_ratios(
    ref: Side, other: Side, target: float, *, resamples: int = 2000, seed: int = 0
) -> dict:
    """Both sides' crossings of `target` and the reference / contender ratios, each with
    a 95% percentile-bootstrap interval over seeds on both sides.

    **Returns:** `{"ref_steps", "steps", "ref_seconds", "seconds"}` (None: never) and, for
    `"steps"`, `"seconds"` and `"seconds_compiled"` (compile seconds added to both sides),
    `"<what>_ratio": [value, low, high]` (0: the contender never got there; inf: the
    reference never did) and `"<what>_resolved": [low, high]`, the interval widened by
    the evaluation grid (module docstring), with `"never"`: the share of resamples where
    either side never held the target.

    **Example:**

    ```python
    ratios = crossing_ratios(side(runs["reach", "PPO"]), side(runs["reach", "APG"]), -20.0)
    ratios["steps_ratio"]   # [9.8, 4.9, 19.6]
    ```
    """
    rng = np.random.default_rng(seed)
    at = [first_held(_aggregate(s.scores), target) for s in (ref, other)]
    resampled = [
        first_held(
            _aggregate(s.scores[rng.integers(0, len(s.scores), (resamples, len(s.scores)))]), target
        )
        for s in (ref, other)
    ]
    out: dict = {"target": target}
    for name, s, i in (("ref", ref, at[0]), ("", other, at[1])):
        prefix = f"{name}_" if name else ""
        out[f"{prefix}steps"] = None if i < 0 else float(s.steps[i])
        out[f"{prefix}seconds"] = None if i < 0 else float(s.seconds[i])
    clocks = {
        "steps": (ref.steps, other.steps),
        "seconds": (ref.seconds, other.seconds),
        "seconds_compiled": (ref.seconds + ref.compile, other.seconds + other.compile),
    }
    for name, (x_ref, x_other) in clocks.items():
        value = float(_reference_over_contender(at[0], at[1], x_ref, x_other))
        low, high = _interval(resampled, x_ref, x_other, x_ref, x_other)
        out[f"{name}_ratio"] = [value, low, high]
        early_ref, early_other = _earliest(x_ref, ref), _earliest(x_other, other)
        resolved = _interval(resampled, early_ref, x_other, x_ref, early_other)
        out[f"{name}_resolved"] = list(resolved)
    out["never"] = float(np.mean((resampled[0] < 0) | (resampled[1] < 0)))
    return out


def _interval(resampled, ref_low, other_low, ref_high, other_high) -> tuple[float, float]:
    """The 2.5% quantile of the resampled ratios on the `_low` clocks and the 97.5% one on
    the `_high` clocks (NaN: neither side ever got there)."""
    bounds = []
    for q, x_ref, x_other in ((0.025, ref_low, other_low), (0.975, ref_high, other_high)):
        boot = _reference_over_contender(resampled[0], resampled[1], x_ref, x_other)
        boot = boot[~np.isnan(boot)]
        bounds.append(float(np.quantile(boot, q, method="inverted_cdf")) if boot.size else np.nan)
    return bounds[0], bounds[1]


def format_ratio(value: float) -> str:
    if np.isnan(value):
        return "-"
    return "never" if value == 0 else "inf" if np.isinf(value) else f"{value:.2f}x"


def format_ratio_ci(ratio: list[float]) -> str:
    value, low, high = ratio
    return (
        f"{format_ratio(value)} [{format_ratio(low).rstrip('x')}, {format_ratio(high).rstrip('x')}]"
    )


def verdict(ratio: list[float], resolved: list[float] | None = None) -> str:
    """What a table may call sooner (or faster) from a ratio's CI `[value, low, high]` and
    its `resolved` interval `[low, high]` (widened by the evaluation grid): `"yes"` where
    both lie above 1, `"no"` where both lie below, `"grid"` where the CI excludes 1 but the
    resolved interval does not (the evaluations are too far apart to tell), else
    `"CI spans 1"`.

    **Example:** `verdict([9.8, 4.9, 19.6], [2.4, 21.0]) == "yes"`;
    `verdict([1.0016, 1.0016, 2.0], [0.5, 2.0]) == "grid"`.
    """
    _, low, high = ratio
    resolved_low, resolved_high = resolved if resolved is not None else (low, high)
    if low > 1:
        return "yes" if resolved_low > 1 else "grid"
    if high < 1:
        return "no" if resolved_high < 1 else "grid"
    return "CI spans 1"
