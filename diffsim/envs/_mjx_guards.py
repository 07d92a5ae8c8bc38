"""The guards `PlaygroundEnv.step` traces MJX and Playground under, so that reverse mode goes
through an MJX step and gives finite gradients: MJX's solver loop as a bounded scan
(`_bounded_solver`), a solver backward pass that passes on only finite cotangents
(`_finite_solver_backward`), and Playground's smooth reward with a finite gradient
(`_finite_tolerance`). Each swaps one attribute of MJX or Playground for the time of a
`with` block; forward values are unchanged.
"""

import contextlib
import functools
from types import SimpleNamespace

import jax
import jax.numpy as jnp


def _bounded_while_loop(cond_fun, body_fun, init_val, *, max_iter: int):
    """`lax.while_loop` as a scan of `max_iter` steps that stop changing the carry once
    `cond_fun` is false: the same result when the loop ends within `max_iter` iterations,
    and reverse-differentiable.

    """

    def step(carry, _):
        value, running = carry
        value = jax.lax.cond(running, body_fun, lambda v: v, value)
        return (value, running & cond_fun(value)), None

    return jax.lax.scan(step, (init_val, cond_fun(init_val)), length=max_iter)[0][0]


@jax.custom_vjp
def _finite_cotangent(x):
    """The identity; backward, non-finite entries of the cotangent become 0."""
    return x


def _finite_cotangent_fwd(x):
    return x, None


def _finite_cotangent_bwd(_, ct):
    def finite(c):
        if not jnp.issubdtype(c.dtype, jnp.inexact):  # integer leaves: float0 cotangents
            return c
        return jnp.where(jnp.isfinite(c), c, jnp.zeros_like(c))

    return (jax.tree.map(finite, ct),)


_finite_cotangent.defvjp(_finite_cotangent_fwd, _finite_cotangent_bwd)


def _tolerance(x, bounds=(0.0, 0.0), margin=0.0, sigmoid="gaussian", value_at_margin=0.1):
    """Playground's `reward.tolerance` (DM Control's smooth reward), with the same values
    and a finite gradient everywhere. Playground's takes the distance to the bound as
    `x - upper` and feeds it to the sigmoid even inside the bounds, where `jnp.where`
    discards it: with an infinite bound that distance is infinite and the discarded
    branch's derivative is `0 * inf = nan` (the gaussian), which `jnp.where` passes on.
    WalkerWalk's standing reward, `bounds=(1.2, inf)`, has a NaN gradient whenever the
    torso is above 1.2 m. Here the distance is 0 inside the bounds."""
    from mujoco_playground._src import reward

    lower, upper = bounds
    if lower > upper or margin < 0:
        raise ValueError(
            f"tolerance: bounds {bounds} and margin {margin}: need lower <= upper, margin >= 0"
        )
    x = jnp.asarray(x)
    in_bounds = (lower <= x) & (x <= upper)
    if margin == 0:  # an indicator: nothing to differentiate
        return jnp.where(in_bounds, 1.0, 0.0)
    distance = (jnp.maximum(lower - x, 0.0) + jnp.maximum(x - upper, 0.0)) / margin
    value = reward._sigmoids(distance, value_at_margin, sigmoid)  # noqa: SLF001
    return jnp.where(in_bounds, 1.0, value)


@contextlib.contextmanager
def _swapped(owner, name: str, value):
    """`owner.name` is `value` inside the block and restored on exit (tracing is
    single-threaded: nothing else traces MJX or Playground meanwhile)."""
    original = getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, original)


def _finite_tolerance():
    """While tracing inside it, Playground's envs compute their rewards with `_tolerance`
    (they call `reward.tolerance` through the module, so swapping its attribute reaches
    them)."""
    from mujoco_playground._src import reward

    return _swapped(reward, "tolerance", _tolerance)


def _finite_solver_backward():
    """While tracing inside it, MJX's constraint solver passes back only finite cotangents
    to its input (`_finite_cotangent` on the data it is given): a non-finite entry becomes
    0. Reverse mode through the solver can give one (measured on CartpoleBalance: one env's
    window gradient NaN from one step back while all its rewards and observations are
    finite; with the backward pass cut through the solver it is finite, and the other
    envs' gradients change by at most 7.5e-9). So such an entry cuts the gradient through
    the solver at that step, for that env, instead of making the whole window's gradient
    NaN. Forward values are unchanged."""
    from mujoco.mjx._src import solver

    solve = solver.solve
    return _swapped(solver, "solve", lambda m, d: solve(m, _finite_cotangent(d)))


def _bounded_solver(iterations: int):
    """While tracing inside it, MJX's solver (`mujoco.mjx._src.solver.solve`, whose one loop
    is `jax.lax.while_loop` over at most `opt.iterations` iterations) loops with
    `_bounded_while_loop` of `iterations` steps: the solver module's `jax` is swapped for a
    copy whose `lax.while_loop` is bounded."""
    from mujoco.mjx._src import solver

    lax = SimpleNamespace(**vars(jax.lax))
    lax.while_loop = functools.partial(_bounded_while_loop, max_iter=iterations)
    return _swapped(solver, "jax", SimpleNamespace(**(vars(jax) | {"lax": lax})))
