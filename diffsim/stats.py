"""Aggregate statistics across seeds (Agarwal et al. 2021): IQM and bootstrap intervals.

The IQM is meaningful from 5 seeds on (`MIN_IQM_SEEDS`); below that `aggregate` and
`aggregate_ci` use the plain mean, and `aggregate_name` says which one a table shows.
SciPy is imported only by the bootstrap (`iqm_ci`, `aggregate_ci`), not at import.
"""

import numpy as np
from jaxtyping import Array, Float

MIN_IQM_SEEDS = 5  # fewer seeds: a table shows the mean, not the IQM


def iqm(scores: Float[Array, "seeds ..."] | np.ndarray, axis: int = 0) -> np.ndarray:
    """Interquartile mean along `axis`: the mean of the middle 50% of runs (after cutting
    `int(n / 4)` runs at each end, as `scipy.stats.trim_mean(scores, 0.25)` does).

    **Example:**

    ```python
    iqm(np.array([0.0, 1, 2, 3, 100]))   # 2.0: robust to the outlier
    ```
    """
    scores = np.moveaxis(np.asarray(scores, dtype=np.float64), axis, 0)
    cut = int(0.25 * scores.shape[0])
    return np.asarray(np.sort(scores, axis=0)[cut : scores.shape[0] - cut].mean(0))


def aggregate_name(num_seeds: int) -> str:
    """`"IQM"` from `MIN_IQM_SEEDS` seeds on, else `"mean"`: what `aggregate` computes.

    **Example:**

    ```python
    aggregate_name(10), aggregate_name(3)   # ("IQM", "mean")
    ```
    """
    return "IQM" if num_seeds >= MIN_IQM_SEEDS else "mean"


def aggregate(scores: Float[Array, "seeds ..."] | np.ndarray) -> np.ndarray:
    """The IQM across seeds (axis 0), or the mean with fewer than `MIN_IQM_SEEDS` seeds.

    **Example:**

    ```python
    aggregate(np.array([0.0, 1, 2, 3, 100]))   # 2.0 (IQM of 5 seeds)
    aggregate(np.array([0.0, 1, 100]))         # 33.67 (mean of 3 seeds)
    ```
    """
    scores = np.asarray(scores, dtype=np.float64)
    return iqm(scores) if len(scores) >= MIN_IQM_SEEDS else np.asarray(scores.mean(0))


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
    return _bootstrap(iqm, scores, confidence=confidence, resamples=resamples, seed=seed)


def aggregate_ci(
    scores: Float[Array, "seeds ..."] | np.ndarray, **bootstrap
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`aggregate` (IQM, or the mean below `MIN_IQM_SEEDS` seeds) with a percentile
    bootstrap confidence interval; `bootstrap`: `iqm_ci`'s keywords.

    **Example:**

    ```python
    mid, low, high = aggregate_ci(np.array([[1.0], [2.0], [4.0]]))   # mean of 3 seeds
    ```
    """
    if len(np.asarray(scores)) >= MIN_IQM_SEEDS:
        return iqm_ci(scores, **bootstrap)
    return _bootstrap(lambda x, axis: np.asarray(np.mean(x, axis=axis)), scores, **bootstrap)


def _bootstrap(
    statistic, scores, *, confidence: float = 0.95, resamples: int = 2000, seed: int = 0
):
    from scipy import stats  # only here: `import diffsim` does not load SciPy

    scores = np.asarray(scores, dtype=np.float64)
    mid = statistic(scores, axis=0)
    if scores.shape[0] < 2 or np.all(scores == scores[:1]):
        return mid, mid.copy(), mid.copy()
    res = stats.bootstrap(
        (scores,),
        lambda x, axis: statistic(x, axis=axis),
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


def threshold_crossing(run, threshold: float) -> dict[str, int | float | None]:
    """First evaluation point at which the `aggregate` across seeds (the IQM; the mean
    below `MIN_IQM_SEEDS` seeds) reaches `threshold`.

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
    if scores.ndim > 2:
        raise ValueError(
            f"threshold_crossing takes one run or a train_seeds run, got a run with leading"
            f" axes {scores.shape[:-1]} (a train_sweep run: configs, seeds); pick one"
            f" configuration first with diffsim.select_run(run, config=c)"
        )
    if scores.ndim == 1:
        scores, steps, times = scores[None], steps[None], times[None]
    reached = np.nonzero(aggregate(scores) >= threshold)[0]
    if len(reached) == 0:
        return {"env_steps": None, "wall_time": None}
    i = int(reached[0])
    return {"env_steps": int(np.median(steps[:, i])), "wall_time": float(np.median(times[:, i]))}
