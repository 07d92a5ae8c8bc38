"""The window losses of each env: APG's mean reward (`apg_loss`) and SHAC's discounted
reward with a critic bootstrap at every segment end (`shac_loss`). Re-exported by
`_windows.py`."""

from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from ..._types import Scalar, Trajectory


def apg_loss(traj: Trajectory) -> Float[Array, " B"]:
    """APG's window loss of each env: `-1/H sum_t r_t^b`. The batch loss is the mean."""
    return -jnp.mean(traj.reward, axis=0)


class _Segments(eqx.Module):
    """Scan carry of SHAC's actor loss: the discounted reward of each env's open segment
    and the discount `gamma^k` its next reward gets (k steps since the segment began)."""

    reward_sum: Float[Array, " B"]
    discount: Float[Array, " B"]


def shac_loss(
    traj: Trajectory,
    critic: Callable[[Float[Array, " obs"]], Float[Array, ""]],
    *,
    discount: Scalar,
    reward_scale: Scalar = 1.0,
) -> Float[Array, " B"]:
    """SHAC's actor loss of each env (the batch loss is the mean over envs):

        L_b = -1/H sum_segments [ sum_{k<n} g^k r_{t0+k} + g^n (1 - term) V'(next_obs_{t0+n-1}) ]

    A segment runs from the window start or an episode start to the window end or an
    episode end (`n` steps); `term` is 1 only at a true termination (a time limit
    bootstraps from the critic's value of the last real observation). `critic` is `V'`,
    used as given (pass it through `stop_gradient` to keep its parameters constant).

    NaN-safe: a terminated step's bootstrap is exactly 0 by `jnp.where` on both the value
    and the critic's input, so a diverged (non-finite) next observation reaches neither
    the loss nor its backward pass, and segments are restarted by `jnp.where`, so a
    non-finite reward stays in its own segment.
    """
    term = traj.done * (1.0 - traj.truncation) > 0
    safe_next = jnp.where(term[..., None], jnp.zeros_like(traj.next_obs), traj.next_obs)
    next_value = jnp.where(term, 0.0, jax.vmap(jax.vmap(critic))(safe_next))
    reward = traj.reward * reward_scale
    segment_end = traj.done.at[-1].set(1.0) > 0  # the window end closes every open segment

    def accumulate(carry: _Segments, xs) -> tuple[_Segments, Float[Array, " B"]]:
        r, v, end = xs
        reward_sum = carry.reward_sum + carry.discount * r
        next_discount = carry.discount * discount
        closed = jnp.where(end, reward_sum + next_discount * v, 0.0)
        restart = _Segments(jnp.where(end, 0.0, reward_sum), jnp.where(end, 1.0, next_discount))
        return restart, closed

    ones = jnp.ones_like(reward[0])
    _, closed = jax.lax.scan(
        accumulate, _Segments(0.0 * ones, ones), (reward, next_value, segment_end)
    )
    return -jnp.sum(closed, axis=0) / reward.shape[0]
