"""Validation helpers for strategies' `__check_init__`: one message format everywhere."""

from numbers import Real


def positive_int(name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def in_range(name: str, value, low: float, high: float, *, low_open: bool = False) -> None:
    ok = isinstance(value, Real) and not isinstance(value, bool)
    ok = ok and (low < value if low_open else low <= value) and value <= high
    if not ok:
        bracket = "(" if low_open else "["
        raise ValueError(f"{name} must be a number in {bracket}{low}, {high}], got {value!r}")


def positive(name: str, value) -> None:
    if not isinstance(value, Real) or isinstance(value, bool) or not value > 0:
        raise ValueError(f"{name} must be a number > 0, got {value!r}")


def learning_rate(name: str, value) -> None:
    """A positive float, or an optax schedule (a callable of the update count)."""
    if not callable(value):
        positive(name, value)
