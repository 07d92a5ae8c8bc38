"""Learning curves with IQM lines and 95% bootstrap bands across seeds (matplotlib only).

The figures are `matplotlib.figure.Figure`s made without pyplot (save them with
`fig.savefig`); matplotlib is imported when a function here first draws, not by
`import diffsim`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np

from ._results.select import run_axes, select_run
from .results import Run
from .stats import iqm_ci

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

_X_LABELS = {"env_steps": "env steps", "wall_time": "wall-clock time (s, compile excluded)"}
STRATEGY_COLORS = {"PPO": "tab:blue", "APG": "tab:orange", "SHAC": "tab:green", "ES": "tab:red"}


def color_for(label: str, index: int) -> str:
    """A stable color per strategy name (the first word of the label), else the cycle.

    **Example:**

    ```python
    color_for("PPO (gamma 0.97)", 0)   # "tab:blue", as for every PPO curve
    ```
    """
    return STRATEGY_COLORS.get(label.split()[0], f"C{(index + 4) % 10}")


def learning_curves(
    runs_by_label: Mapping[str, Run],
    *,
    x: str = "env_steps",
    ax: Axes | None = None,
    title: str | None = None,
    confidence: float = 0.95,
) -> Figure:
    """Plot each run's IQM evaluation return across seeds with a bootstrap band.

    The line is `diffsim.stats.iqm_ci`'s IQM of the per-seed mean returns at each
    evaluation point, the band its percentile bootstrap interval; the x value of a point
    is the median across seeds.

    **Arguments:**

    - `runs_by_label`: label -> `Run`. A run from `train_seeds` (leading seed axis) is one
      line with a band; a single `train` run is one seed, drawn without a band; a
      `train_sweep` run (leading `(configs, seeds)` axes) is one line and band per
      configuration, labelled by its values (`"APG learning_rate=1e-3"`).
    - `x`: `"env_steps"` or `"wall_time"`.
    - `ax`: draw into this axes (else a new figure).
    - `title`: axes title; default names the env, the number of seeds and the budget.

    **Returns:** the figure.

    **Example:**

    ```python
    fig = diffsim.plotting.learning_curves({"PPO": ppo_runs, "ES": es_runs}, x="wall_time")
    fig.savefig("figures/curves.png", dpi=150)
    fig = diffsim.plotting.learning_curves({"APG": sweep_run})   # one band per config
    ```
    """
    if x not in _X_LABELS:
        raise ValueError(f"x must be one of {list(_X_LABELS)}, got {x!r}")
    if not runs_by_label:
        raise ValueError("runs_by_label is empty: nothing to plot")
    if ax is None:
        ax = _figure(figsize=(6.0, 4.0)).subplots()
    seeds, budget, env = set(), 0, set()
    for i, (label, run, color) in enumerate(_lines(runs_by_label)):
        scores = np.asarray(run.curve.eval_return).mean(-1)  # (seeds, E) or (E,)
        xs = np.asarray(getattr(run.curve, x), dtype=float)
        if scores.ndim == 1:
            scores, xs = scores[None], xs[None]
        mid, low, high = iqm_ci(scores, confidence=confidence)
        xs = np.median(xs, axis=0)
        color = color or color_for(label, i)
        ax.plot(xs, mid, label=label, color=color, lw=2)
        if scores.shape[0] > 1:
            ax.fill_between(xs, low, high, color=color, alpha=0.2, lw=0)
        seeds.add(scores.shape[0])
        budget = max(budget, int(np.asarray(run.curve.env_steps).max()))
        env.add(run.config.get("env", "?"))
    ax.set_xlabel(_X_LABELS[x])
    ax.set_ylabel("evaluation return (IQM)")
    if title is None:
        n = "/".join(str(s) for s in sorted(seeds))
        what = "1 seed" if seeds == {1} else f"IQM of {n} seeds, {int(confidence * 100)}% CI"
        title = f"{', '.join(sorted(env))}: {what}, {budget:,} steps"
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(frameon=False)
    return _root(ax)


def _lines(runs_by_label: Mapping[str, Run]) -> list[tuple[str, Run, str | None]]:
    """`(label, run, color)` per line: a sweep run becomes one per configuration, labelled
    by its values and colored from the cycle (None: the label's strategy color)."""
    out: list[tuple[str, Run, str | None]] = []
    for label, run in runs_by_label.items():
        if run_axes(run) != ("config", "seed"):
            out.append((label, run, None))
            continue
        listing = run.config["sweep"]
        # One notation per name: 1e-3 and 1e-2, not 1e-3 and 0.01.
        sci = {k: any(_tiny_or_huge(c[k]) for c in listing) for k in listing[0]}
        for c, values in enumerate(listing):
            named = " ".join(f"{k}={format_value(v, scientific=sci[k])}" for k, v in values.items())
            color = f"C{len(out) % 10}"
            out.append((f"{label} {named}", select_run(run, config=c), color))
    return out


def _tiny_or_huge(value: float) -> bool:
    return value != 0 and (abs(value) < 1e-2 or abs(value) >= 1e4)


def format_value(value: float, *, scientific: bool | None = None) -> str:
    """A swept value as a short label: `1e-3`, `3e-4`, `0.2`, `64`. `scientific`: force
    the notation (default: scientific below 1e-2 and from 1e4 on).

    **Example:** `format_value(0.001) == "1e-3"`, `format_value(0.01, scientific=True) ==
    "1e-2"`.
    """
    value = float(value)
    if value != 0 and (scientific or (scientific is None and _tiny_or_huge(value))):
        mantissa, exponent = f"{value:.2e}".split("e")
        mantissa = mantissa.rstrip("0").rstrip(".")
        return f"{mantissa}e{int(exponent)}"
    return f"{value:.3g}"


def _figure(figsize: tuple[float, float]) -> Figure:
    """A new figure with constrained layout, made without pyplot (no global figure list)."""
    from matplotlib.figure import Figure

    return Figure(figsize=figsize, layout="constrained")


def _root(ax: Axes) -> Figure:
    """The top-level figure `ax` is drawn in (through any subfigures)."""
    figure = ax.get_figure(root=True)
    assert figure is not None, "an Axes in use belongs to a figure"
    return figure


def study_figure(runs: Mapping[tuple[str, str], Run], *, x: str = "env_steps") -> Figure:
    """One learning-curve panel per env, one line per strategy label.

    **Arguments:** `runs`: `{(env name, label): Run}`, as `run_study` or `load_study`
    return; `x`: `"env_steps"` or `"wall_time"`.

    **Example:**

    ```python
    fig = study_figure(diffsim.study.load_study("results/compare"), x="wall_time")
    fig.savefig("figures/compare_wall_time.png")
    ```
    """
    envs = list(dict.fromkeys(env for env, _ in runs))
    if not envs:
        raise ValueError("no runs to plot")
    fig = _figure(figsize=(4.6 * len(envs), 3.8))
    axes = fig.subplots(1, len(envs), squeeze=False)
    for ax, env in zip(axes[0], envs, strict=True):
        learning_curves({label: run for (e, label), run in runs.items() if e == env}, x=x, ax=ax)
    return fig


def final_scores(runs: Mapping[tuple[str, str], Run], *, confidence: float = 0.95) -> Figure:
    """Final evaluation return per env and strategy: IQM across seeds with its interval.
    A `train_sweep` run gives one row per configuration, labelled by its values.

    **Example:**

    ```python
    final_scores(runs).savefig("figures/compare_final.png")
    ```
    """
    envs = list(dict.fromkeys(env for env, _ in runs))
    fig = _figure(figsize=(3.6 * len(envs), 3.2))
    axes = fig.subplots(1, len(envs), squeeze=False)
    for ax, env in zip(axes[0], envs, strict=True):
        lines = _lines({label: run for (e, label), run in runs.items() if e == env})
        labels = [label for label, _, _ in lines]
        for i, (label, run, color) in enumerate(lines):
            scores = np.asarray(run.curve.eval_return)[..., -1, :].mean(-1).reshape(-1, 1)
            mid, low, high = iqm_ci(scores, confidence=confidence)
            ax.errorbar(
                [mid[0]],
                [i],
                xerr=[[mid[0] - low[0]], [high[0] - mid[0]]],
                fmt="o",
                color=color or color_for(label, i),
                capsize=4,
            )
        ax.set_yticks(range(len(labels)), labels)
        ax.set_ylim(-0.5, len(labels) - 0.5)
        ax.set_xlabel("final evaluation return (IQM)")
        ax.set_title(env, fontsize=10)
        ax.grid(alpha=0.3, axis="x")
    return fig
