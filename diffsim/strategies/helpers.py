"""The public toolkit a strategy is written with: `__check_init__` validators, the guarded
optimiser step, schedules over an env-step budget, GAE, returns and episode statistics.

A strategy outside diffsim needs these, `diffsim`'s public functions (`rollout`, ...) and
one public base: `diffsim.AbstractStrategy`, `diffsim.AbstractWindowStrategy` (APG, SHAC,
AHAC, SAPO) or `diffsim.AbstractPopulationStrategy` (ES, GuidedES), whose documented
`_`-methods are there for subclasses (`docs/guides/extending.md`). The reference
`REINFORCE` uses nothing else; the other built-ins also use their family's private
machinery (`strategies/_window/`, `strategies/_population/`), which may change.

```python
from diffsim.strategies import helpers
class MyStrategy(diffsim.AbstractStrategy[MyState]):
    sweepable: ClassVar[tuple[str, ...]] = ("learning_rate",)
    learning_rate: float = 1e-3

    def __check_init__(self):
        helpers.positive("learning_rate", self.learning_rate)
```
"""

import dataclasses
import warnings
from numbers import Real

import equinox as eqx
import jax
import jax.numpy as jnp
import optax
from jaxtyping import Array, Bool, Float

from .._types import Scalar
from ..policies import trainable
from ..rollout import episode_stats as episode_stats

__all__ = [
    "Targets",
    "all_finite",
    "check_decay",
    "decayed",
    "discounted_returns",
    "episode_stats",
    "gae",
    "guarded_update",
    "in_range",
    "learning_rate",
    "positive",
    "positive_int",
    "select",
    "with_budget",
]

# --- validators: one message format for every `__check_init__` --------------------------


def positive_int(name: str, value) -> None:
    """Raise `ValueError` naming `name` unless `value` is an int >= 1 (not a bool).

    **Example:** `positive_int("num_envs", self.num_envs)` in `__check_init__`.
    """
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def in_range(name: str, value, low: float, high: float, *, low_open: bool = False) -> None:
    """Raise `ValueError` naming `name` unless `low <= value <= high` (`low < value` with
    `low_open`).

    **Example:** `in_range("discount", self.discount, 0.0, 1.0, low_open=True)`.
    """
    ok = isinstance(value, Real) and not isinstance(value, bool)
    if ok:
        x = float(value)
        ok = (low < x if low_open else low <= x) and x <= high
    if not ok:
        bracket = "(" if low_open else "["
        raise ValueError(f"{name} must be a number in {bracket}{low}, {high}], got {value!r}")


def positive(name: str, value) -> None:
    """Raise `ValueError` naming `name` unless `value` is a real number > 0.

    **Example:** `positive("max_grad_norm", self.max_grad_norm)`.
    """
    if not isinstance(value, Real) or isinstance(value, bool) or not float(value) > 0:
        raise ValueError(f"{name} must be a number > 0, got {value!r}")


def learning_rate(name: str, value) -> None:
    """Raise `ValueError` unless `value` is a positive float or an optax schedule (a
    callable of the update count).

    **Example:** `learning_rate("learning_rate", self.learning_rate)`.
    """
    if not callable(value):
        positive(name, value)


# --- the NaN/inf guard: a non-finite update is skipped, not applied ------------------


def all_finite(tree) -> Bool[Array, ""]:
    """True (a `Bool[Array, ""]`) if every floating leaf of `tree` is finite.

    **Example:** `ok = jnp.isfinite(loss) & all_finite(grads)`.
    """
    leaves = jax.tree.leaves(eqx.filter(tree, eqx.is_inexact_array))
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def select(ok: Bool[Array, ""], new, old):
    """`new` where `ok`, else `old`, leaf by leaf (array leaves only; both trees have the
    same structure).

    **Example:** `policy = select(ok, new_policy, old_policy)`.
    """
    return jax.tree.map(lambda n, o: jnp.where(ok, n, o) if eqx.is_array(n) else n, new, old)


def guarded_update(
    module, grads, opt_state, optimizer: optax.GradientTransformation, ok: Bool[Array, ""]
):
    """One optimiser step on `module`'s trainable leaves (`eqx.filter(module,
    trainable(module))`: never the running observation statistics), or no change at all
    to the module and the optimiser state if not `ok`.

    **Returns:** `(module, opt_state)`, updated or unchanged.

    **Example:**

    ```python
    loss, grads = eqx.filter_value_and_grad(loss_fn)(state.policy)
    ok = jnp.isfinite(loss) & all_finite(grads)
    policy, opt_state = guarded_update(state.policy, grads, state.opt_state, optimizer, ok)
    ```
    """
    params = eqx.filter(module, trainable(module))
    updates, new_opt = optimizer.update(eqx.filter(grads, trainable(module)), opt_state, params)
    return select(ok, eqx.apply_updates(module, updates), module), select(ok, new_opt, opt_state)


# --- learning-rate decay over a run's env-step budget --------------------------------


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
    With `lr_decay` but no `lr_decay_steps` (a strategy used without `bind` or `train`)
    the rate stays constant, with a warning that says so.

    **Example:**

    ```python
    lr = decayed(3e-4, lr_decay=True, lr_decay_steps=10**6, steps_per_iteration=4096,
                 updates_per_iteration=160)   # PPO: 5 epochs x 32 minibatches
    ```
    """
    if lr_decay and lr_decay_steps is None and not callable(learning_rate):
        warnings.warn(
            "lr_decay is on but the strategy knows no budget (lr_decay_steps=None), so its"
            " learning rate stays constant: bind it first, strategy.bind(env,"
            " total_steps=...) (train does), or set lr_decay_steps, or lr_decay=False",
            stacklevel=3,
        )
    if not lr_decay or lr_decay_steps is None or callable(learning_rate):
        return learning_rate
    updates = lr_decay_steps / steps_per_iteration * updates_per_iteration
    return optax.linear_schedule(learning_rate, 0.0, max(1, round(updates)))


def check_decay(strategy, *rates: str) -> None:
    """Raise `ValueError` unless `strategy.lr_decay` is a bool and `strategy.lr_decay_steps`
    None or a positive int, which needs float learning rates (the decay's start) in the
    fields named by `rates` where `lr_decay` is on.

    **Example:** `check_decay(self, "learning_rate")` in `__check_init__`.
    """
    if not isinstance(strategy.lr_decay, bool):
        raise ValueError(f"lr_decay must be a bool, got {strategy.lr_decay!r}")
    if strategy.lr_decay_steps is None:
        return
    positive_int("lr_decay_steps", strategy.lr_decay_steps)
    for name in rates:
        if strategy.lr_decay and callable(getattr(strategy, name)):
            raise ValueError(
                f"lr_decay_steps needs a float {name} (the decay's start), got a schedule"
                f" {getattr(strategy, name)!r}"
            )


def with_budget(strategy, total_steps: int, *rates: str):
    """`strategy` with `lr_decay_steps=total_steps` if it decays (`lr_decay`), the length is
    not set yet and every learning rate in `rates` is a float; else `strategy` itself.
    `train` calls `for_budget` once, so this is how a strategy's decay learns the budget.

    **Example:**

    ```python
    def for_budget(self, total_steps):
        return with_budget(self, total_steps, "learning_rate")
    ```
    """
    if not strategy.lr_decay or strategy.lr_decay_steps is not None:
        return strategy
    if any(callable(getattr(strategy, name)) for name in rates):
        return strategy
    return dataclasses.replace(strategy, lr_decay_steps=total_steps)


# --- returns ------------------------------------------------------------------------


class Targets(eqx.Module):
    """`advantage`: GAE(lambda) advantages; `value_target`: TD(lambda) returns
    (`advantage + value`). Both `Float[Array, "T ..."]`."""

    advantage: Float[Array, "T ..."]
    value_target: Float[Array, "T ..."]


def gae(
    reward: Float[Array, "T ..."],
    value: Float[Array, "T ..."],
    next_value: Float[Array, "T ..."],
    done: Float[Array, "T ..."],
    truncation: Float[Array, "T ..."],
    *,
    discount: Scalar,
    lam: Scalar,
) -> Targets:
    """GAE over a time-major batch that may cross episode boundaries.

    With termination `term = done * (1 - truncation)`:

        delta_t = r_t + discount * (1 - term_t) * V(next_obs_t) - V(obs_t)
        A_t     = delta_t + discount * lam * (1 - done_t) * A_{t+1},   A_T = 0

    so a time limit bootstraps from the critic's value of the last real observation
    (`next_value`, taken before the auto-reset), a true termination from zero, and no
    advantage leaks across an episode boundary. The last step bootstraps from
    `next_value`, so windows need no extra value.

    **Example:**

    ```python
    t = gae(traj.reward, v, v_next, traj.done, traj.truncation, discount=0.99, lam=0.95)
    t.advantage.shape == traj.reward.shape
    ```
    """
    termination = done * (1.0 - truncation)
    delta = reward + discount * (1.0 - termination) * next_value - value

    def backward(next_adv, xs):
        delta_t, done_t = xs
        adv = delta_t + discount * lam * (1.0 - done_t) * next_adv
        return adv, adv

    _, advantage = jax.lax.scan(backward, jnp.zeros_like(delta[0]), (delta, done), reverse=True)
    return Targets(advantage=advantage, value_target=advantage + value)


def discounted_returns(
    reward: Float[Array, "T ..."],
    done: Float[Array, "T ..."],
    *,
    discount: Scalar,
    bootstrap: Float[Array, "..."] | None = None,
) -> Float[Array, "T ..."]:
    """Discounted reward-to-go over a time-major batch that may cross episode boundaries:

        G_t = r_t + discount * (1 - done_t) * G_{t+1},   G_T = bootstrap (default 0)

    so no return leaks from one episode into the one before it.

    **Example:**

    ```python
    g = discounted_returns(traj.reward, traj.done, discount=0.99)   # shape of traj.reward
    ```
    """
    last = jnp.zeros_like(reward[0]) if bootstrap is None else bootstrap

    def backward(next_return, xs):
        r, d = xs
        g = r + discount * (1.0 - d) * next_return
        return g, g

    _, returns = jax.lax.scan(backward, last, (reward, done), reverse=True)
    return returns
