"""Generalised advantage estimation, shared by the strategies that learn a critic."""

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from .._types import Scalar


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
