"""What is measured about episodes: the `Episodes` record of `first_episodes`, and what a
`Trajectory` says about its episodes (which steps come after an episode's end, each env's
first return, what strategies log about a training rollout)."""

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from ._networks import RunningNorm
from ._types import Trajectory


class Episodes(eqx.Module):
    """The first episode of each env of a batch, as `first_episodes` measures it.

    **Fields:**

    - `returns`: `Float[Array, "B"]`, the undiscounted return of each env's first episode.
    - `steps`: `Int[Array, "B"]`, the env steps inside it (at most `max_length`).
    - `diverged`: `Float[Array, "B"]`, 1 where it ended on a non-finite step (see `rollout`).
    - `length`: `Int[Array, ""]`, the steps every env of the batch was simulated for (a
      multiple of the chunk, at least `max(steps)`): the batch's simulation cost is
      `B x length` env steps.
    - `obs`: a `RunningNorm` with the count, mean and variance of the observations inside
      these episodes (what a normaliser should learn from them).
    """

    returns: Float[Array, " B"]
    steps: Int[Array, " B"]
    diverged: Float[Array, " B"]
    length: Int[Array, ""]
    obs: RunningNorm


def ended_before(done: Float[Array, " T *batch"]) -> Float[Array, " T *batch"]:
    """The episodes each env finished before step `t` (its first episode where 0)."""
    return jnp.cumsum(done, axis=0) - done


def episode_returns(traj: Trajectory) -> Float[Array, " B"]:
    """Return of each env's FIRST episode in `traj` (rewards after its end are dropped).

    Use on a rollout that starts at a reset and is at least one episode long.
    """
    return jnp.sum(traj.reward * (ended_before(traj.done) == 0), axis=0)


def episode_stats(traj: Trajectory) -> dict[str, Float[Array, ""]]:
    """What strategies log about a training rollout. Not differentiated.

    `"episodes"`: episodes that ended in `traj`; `"train_return"`: their mean return (NaN
    when none ended: average it over iterations with `np.nanmean`); `"diverged"`: steps
    that went non-finite (each ended its episode); `"reused_starts"`: episodes that
    restarted from a reused start (see `rollout`).
    """
    traj = jax.lax.stop_gradient(traj)
    episodes = jnp.sum(traj.done)
    ended = jnp.where(traj.done > 0, traj.extras["episode_return"], 0.0)
    mean = jnp.sum(ended) / jnp.maximum(episodes, 1)
    stats = {"episodes": episodes, "train_return": jnp.where(episodes > 0, mean, jnp.nan)}
    for name, extra in (("diverged", "diverged"), ("reused_starts", "reused_start")):
        if extra in traj.extras:
            stats[name] = jnp.sum(traj.extras[extra])
    return {k: v.astype(jnp.float32) for k, v in stats.items()}
