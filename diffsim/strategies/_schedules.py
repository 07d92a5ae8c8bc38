"""Linear learning-rate decay over a run's env-step budget, shared by PPO, APG and SHAC.

A strategy with `lr_decay: bool` and `lr_decay_steps: int | None` decays each float learning
rate linearly to 0 over `lr_decay_steps` env steps; `train` fills `lr_decay_steps` with the
run's budget through `strategy.for_budget(total_steps)` (`with_budget` here). optax counts
updates, not env steps, so the decay length is converted: `lr_decay_steps /
steps_per_iteration` iterations times the updates each iteration makes.
"""

import dataclasses

import optax

from . import _checks as check


def decayed(
    learning_rate,
    *,
    lr_decay: bool,
    lr_decay_steps: int | None,
    steps_per_iteration: int,
    updates_per_iteration: int = 1,
):
    """`learning_rate`, or with `lr_decay` and a known `lr_decay_steps` the optax schedule

        lr(n) = learning_rate * max(0, 1 - n / N),   N = round(lr_decay_steps /
                steps_per_iteration * updates_per_iteration)   (at least 1)

    of the update count `n`. A schedule given as `learning_rate` is returned unchanged.

    **Example:**

    ```python
    lr = decayed(3e-4, lr_decay=True, lr_decay_steps=10**6, steps_per_iteration=4096,
                 updates_per_iteration=160)   # PPO: 5 epochs x 32 minibatches
    ```
    """
    if not lr_decay or lr_decay_steps is None or callable(learning_rate):
        return learning_rate
    updates = lr_decay_steps / steps_per_iteration * updates_per_iteration
    return optax.linear_schedule(learning_rate, 0.0, max(1, round(updates)))


def check_decay(strategy, *rates: str) -> None:
    """`lr_decay` is a bool; `lr_decay_steps` None or a positive int, which needs float
    learning rates (the decay's start) where `lr_decay` is on."""
    if not isinstance(strategy.lr_decay, bool):
        raise ValueError(f"lr_decay must be a bool, got {strategy.lr_decay!r}")
    if strategy.lr_decay_steps is None:
        return
    check.positive_int("lr_decay_steps", strategy.lr_decay_steps)
    for name in rates:
        if strategy.lr_decay and callable(getattr(strategy, name)):
            raise ValueError(
                f"lr_decay_steps needs a float {name} (the decay's start), got a schedule"
                f" {getattr(strategy, name)!r}"
            )


def with_budget(strategy, total_steps: int, *rates: str):
    """`strategy` with `lr_decay_steps=total_steps` if it decays (`lr_decay`), the length is
    not set yet and every learning rate in `rates` is a float; else `strategy` itself."""
    if not strategy.lr_decay or strategy.lr_decay_steps is not None:
        return strategy
    if any(callable(getattr(strategy, name)) for name in rates):
        return strategy
    return dataclasses.replace(strategy, lr_decay_steps=total_steps)
