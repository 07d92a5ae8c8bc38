"""Aggregate statistics across seeds (Agarwal et al. 2021): IQM and bootstrap intervals."""

import numpy as np
from jaxtyping import Array, Float
from scipy import stats


def iqm(scores: Float[Array, "seeds ..."] | np.ndarray, axis: int = 0) -> np.ndarray:
    """Interquartile mean along `axis`: the mean of the middle 50% of runs.

    **Example:**

    ```python
    iqm(np.array([0.0, 1, 2, 3, 100]))   # 2.0: robust to the outlier
    ```
    """
    return stats.trim_mean(np.asarray(scores, dtype=np.float64), 0.25, axis=axis)


def iqm_ci(
    scores: Float[Array, "seeds ..."] | np.ndarray,
    *,
    confidence: float = 0.95,
    resamples: int = 2000,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """IQM across seeds (axis 0) with a percentile bootstrap confidence interval.

    **Returns:** `(iqm, low, high)`, each of shape `scores.shape[1:]`. With one seed the
    interval collapses to the value.

    **Example:**

    ```python
    scores = run.curve.eval_return.mean(-1)   # (seeds, E): one score per seed and point
    mid, low, high = iqm_ci(scores)            # each (E,)
    ```
    """
    scores = np.asarray(scores, dtype=np.float64)
    mid = iqm(scores)
    if scores.shape[0] < 2 or np.all(scores == scores[:1]):
        return mid, mid.copy(), mid.copy()
    res = stats.bootstrap(
        (scores,),
        lambda x, axis: stats.trim_mean(x, 0.25, axis=axis),
        axis=0,
        vectorized=True,
        n_resamples=resamples,
        confidence_level=confidence,
        method="percentile",
        rng=np.random.default_rng(seed),
    )
    return mid, np.asarray(res.confidence_interval.low), np.asarray(res.confidence_interval.high)


def probability_of_improvement(x: np.ndarray, y: np.ndarray) -> float:
    """P(X > Y) for a random run of X and one of Y (ties count half): the
    Mann-Whitney U statistic over all pairs of the two samples of final scores.

    **Example:**

    ```python
    probability_of_improvement(np.array([3.0, 4.0]), np.array([1.0, 2.0]))   # 1.0
    ```
    """
    x, y = np.asarray(x, float)[:, None], np.asarray(y, float)[None, :]
    return float(np.mean((x > y) + 0.5 * (x == y)))


def threshold_crossing(run, threshold: float) -> dict[str, float | None]:
    """First evaluation point at which the IQM across seeds reaches `threshold`.

    **Returns:** `{"env_steps": ..., "wall_time": ...}` (medians over seeds of the env
    steps and training seconds at that point; seeds differ where a strategy's iterations
    count varying numbers of steps, as ES's do), or `None` values if the run never gets
    there.

    **Example:**

    ```python
    threshold_crossing(runs, 950.0)   # {"env_steps": 393216, "wall_time": 41.2}
    ```
    """
    scores = np.asarray(run.curve.eval_return).mean(-1)
    steps, times = np.asarray(run.curve.env_steps), np.asarray(run.curve.wall_time)
    if scores.ndim == 1:
        scores, steps, times = scores[None], steps[None], times[None]
    reached = np.nonzero(iqm(scores) >= threshold)[0]
    if len(reached) == 0:
        return {"env_steps": None, "wall_time": None}
    i = int(reached[0])
    return {"env_steps": int(np.median(steps[:, i])), "wall_time": float(np.median(times[:, i]))}
