"""PPO's pieces that are not the algorithm: its update data, its optimiser, and the
log-probability it takes at a stored pre-squash sample."""

import equinox as eqx
import optax
from jaxtyping import Array, Float

from .._types import Scalar


class Batch(eqx.Module):
    """Update data; leading axes `[B, T]` (env-major), or `[N]` within a minibatch."""

    obs: Float[Array, "*n obs"]
    action: Float[Array, "*n act"]
    pre_squash: Float[Array, "*n act"] | None
    log_prob: Float[Array, "*n"]
    advantage: Float[Array, "*n"]
    value_target: Float[Array, "*n"]
    value: Float[Array, "*n"]


def optimizer(learning_rate, max_grad_norm: Scalar, eps: Scalar) -> optax.GradientTransformation:
    """One Adam over `(policy, value)`, after clipping each one's gradient to `max_grad_norm`
    on its own: the same updates as a clipped Adam per network (Adam is elementwise), with
    one optimiser state and one guarded update per minibatch."""
    clip = optax.clip_by_global_norm(max_grad_norm)

    def clip_each(updates, state, params=None):
        del params
        return tuple(clip.update(g, state)[0] for g in updates), state

    each = optax.GradientTransformation(lambda params: optax.EmptyState(), clip_each)
    return optax.chain(each, optax.adam(learning_rate, eps=eps))


def log_prob_at(policy, obs, action, pre_squash):
    """`policy.log_prob`, from the stored pre-squash sample where the policy takes one."""
    if pre_squash is None:
        return policy.log_prob(obs, action)
    return policy.log_prob(obs, action, pre_squash=pre_squash)
