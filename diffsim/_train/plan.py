"""The budget plan: how `total_steps` is cut into evaluation segments."""

import warnings
from collections.abc import Sequence

import equinox as eqx

from ..strategies.base import AbstractStrategy


class Plan(eqx.Module):
    """How `total_steps` is cut into evaluation segments.

    `targets[k]` is the env-step count at which evaluation `k` should happen
    (`targets[0] = 0`, `targets[-1] = total_steps`). A segment runs iterations until its
    count is nearest its target: it stops before an iteration that would overshoot the
    target by more than that iteration's steps leave it short (the next iteration is
    assumed to cost what the last one did). For a strategy with a fixed cost per
    iteration the run therefore ends within half an iteration of `total_steps`, and
    segments differ by at most one iteration.
    """

    targets: tuple[int, ...]
    steps_per_iteration: int  # the most one iteration can count
    min_steps_per_iteration: int  # the fewest one iteration can count
    max_iterations: int  # rows of the per-segment metrics buffer

    @property
    def num_evals(self) -> int:
        return len(self.targets)

    @property
    def total_steps(self) -> int:
        return self.targets[-1]


def _stops(targets: Sequence[int], per_iter: int) -> list[int]:
    """Counted steps after each segment for a fixed cost per iteration (the device rule)."""
    steps, out = 0, []
    for target in targets:
        while 2 * steps + per_iter < 2 * target:
            steps += per_iter
        out.append(steps)
    return out


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def step_counts(strategy: AbstractStrategy) -> tuple[int, int]:
    """`(steps_per_iteration, min_steps_per_iteration)`, checked: positive ints, the
    fewest no more than the most."""
    name = type(strategy).__name__
    most, least = strategy.steps_per_iteration, strategy.min_steps_per_iteration
    if not _is_count(most) or most < 1:
        raise ValueError(f"{name}.steps_per_iteration must be a positive int, got {most!r}")
    if not _is_count(least) or not 1 <= least <= most:
        raise ValueError(
            f"{name}.min_steps_per_iteration must be an int in [1, steps_per_iteration ="
            f" {most}], got {least!r}"
        )
    return most, least


def make_plan(strategy: AbstractStrategy, total_steps: int, num_evals: int) -> Plan:
    """Validate the budget and spread `num_evals` evaluations evenly over it.

    A budget of fewer iterations than evaluation intervals is run with one evaluation
    after every iteration (`num_evals = iterations + 1`), with a warning saying so.
    """
    if not _is_count(num_evals) or num_evals < 2:
        raise ValueError(f"num_evals must be an int >= 2 (first and last point), got {num_evals!r}")
    if not _is_count(total_steps) or total_steps < 1:
        raise ValueError(f"total_steps must be a positive int, got {total_steps!r}")
    per_iter, least = step_counts(strategy)
    name = type(strategy).__name__
    if 2 * total_steps < per_iter:
        raise ValueError(
            f"total_steps={total_steps} is less than half of one {name} iteration"
            f" ({per_iter} env steps): nothing would run"
        )
    iterations = max(1, round(total_steps / per_iter))
    if least == per_iter and iterations < num_evals - 1:
        warnings.warn(
            f"total_steps={total_steps} is {iterations} {name} iteration(s) of {per_iter} env"
            f" steps, fewer than the {num_evals - 1} evaluation intervals asked for: evaluating"
            f" after every iteration instead (num_evals={iterations + 1})",
            stacklevel=6,  # the caller of train
        )
        num_evals = iterations + 1
    targets = tuple(round(k * total_steps / (num_evals - 1)) for k in range(num_evals))
    if least == per_iter:  # fixed cost: the exact number of iterations of each segment
        stops = _stops(targets, per_iter)
        rows = max(b - a for a, b in zip(stops, stops[1:], strict=False)) // per_iter
    else:  # counted per iteration: at most the longest segment over the cheapest iteration
        longest = max(b - a for a, b in zip(targets, targets[1:], strict=False))
        rows = -(-(longest + per_iter) // least)
    return Plan(targets, per_iter, least, max(1, rows))
