"""Shared array aliases and the named pytrees that flow between modules."""

from typing import TYPE_CHECKING, Any, TypeAlias

import equinox as eqx
from jaxtyping import Array, Bool, Float, Int, Key as KeyArray, PRNGKeyArray, UInt32

if TYPE_CHECKING:  # what strategies receive from `train`: diffsim's own wrapped env
    from .envs._wrapper import AutoResetEnv as Env  # noqa: F401
else:  # at run time (and for jaxtyping's checks) any Brax env
    from brax.envs.base import Env  # noqa: F401
"""The env type strategies and the rollout core take: a Brax `Env`; the type checker sees
diffsim's `AutoResetEnv` (from `make_env`), whose `episode_length` and fresh-start pool they use."""

Metrics: TypeAlias = dict[str, Float[Array, ""]]
"""Scalar training diagnostics of one strategy step, by name."""

Scalar: TypeAlias = float | Float[Array, ""]
"""A hyperparameter: a Python float, or a traced scalar when `train_sweep` vmaps over it."""

Key: TypeAlias = PRNGKeyArray
Keys: TypeAlias = KeyArray[Array, " seeds"] | UInt32[Array, "seeds 2"]
"""A batch of PRNG keys (new-style or raw uint32 pairs), one per seed."""


class Trajectory(eqx.Module):
    """A batch of transitions, time-major: leading axes `T` (time) and `B` (env batch).

    **Fields:**

    - `obs`: `Float[Array, "T B obs"]`, the observation the action was chosen from.
    - `action`: `Float[Array, "T B act"]`, the env action in [-1, 1].
    - `reward`: `Float[Array, "T B"]`, the reward of the transition.
    - `done`: `Float[Array, "T B"]`, 1.0 where the episode ended at this step (terminated
      or truncated); the env auto-reset after it.
    - `truncation`: `Float[Array, "T B"]`, 1.0 where it ended only by the time limit.
    - `next_obs`: `Float[Array, "T B obs"]`, the observation after the action, taken before
      any auto-reset (what a critic bootstraps from at a time limit).
    - `log_prob`: `Float[Array, "T B"]`, the log-density of `action` under the acting
      policy (zero for deterministic rollouts or policies without `log_prob`).
    - `extras`: dict of further `Float[Array, "T B ..."]`; `"episode_return"` holds the
      return of the episode so far (the whole episode's return where `done`).

    **Example:**

    ```python
    _, traj = diffsim.rollout(env, policy, state, key=key, length=100)
    traj.reward.shape            # (100, num_envs)
    traj.reward.sum(0).mean()    # summed reward per env, averaged
    ```
    """

    # `*tb` is `T B` for a rollout; a single transition, built inside the scan, has none.
    obs: Float[Array, "*tb obs"]
    action: Float[Array, "*tb act"]
    reward: Float[Array, "*tb"]
    done: Float[Array, "*tb"]
    truncation: Float[Array, "*tb"]
    next_obs: Float[Array, "*tb obs"]
    log_prob: Float[Array, "*tb"]
    extras: dict[str, Array]


class LearningCurve(eqx.Module):
    """Evaluation results of one run at `E` fixed env-step points.

    **Fields:**

    - `env_steps`: `Int[Array, "E"]`, env steps consumed by training when evaluated.
    - `wall_time`: `Float[Array, "E"]`, seconds since training started, compile excluded.
    - `eval_return`: `Float[Array, "E episodes"]`, undiscounted return of each evaluation
      episode (deterministic policy, the same evaluation keys at every point).

    From `train_seeds` every field has a leading seed axis.

    **Example:**

    ```python
    curve = run.curve
    curve.eval_return.mean(-1)   # mean return at each evaluation point, shape (E,)
    ```
    """

    env_steps: Int[Array, "*seeds E"]
    wall_time: Float[Array, "*seeds E"]
    eval_return: Float[Array, "*seeds E episodes"]


class VanishingGradientWarning(UserWarning):
    """`train` found that a first-order strategy's gradient carries no signal: over the
    first segment of updates its median relative sensitivity

        S = grad_norm * (1 + ||theta||) / |loss|

    (`grad_norm`: the norm of the gradient through the simulator, `metrics["grad_norm"]`
    of APG, SHAC, AHAC and SAPO or `metrics["analytic_grad_norm"]` of GuidedES;
    `theta`: the policy's trainable parameters; `loss`: `metrics["loss"]`, 1 where none
    is reported) stayed below `1e-3`, or the gradient was exactly zero. To first order,
    moving every parameter by the parameters' whole norm would change the loss by less
    than 0.1%. On the smooth toy envs `S` is 0.5-60 (reach, pendulum and ball under APG
    and SHAC).

    Likely causes: a reward without a gradient with respect to the action (an alive
    bonus, an indicator or a threshold), a `jax.lax.stop_gradient` in the reward or the
    dynamics, or a gymnax env without transition gradients. Silence it with
    `warnings.simplefilter("ignore", diffsim.VanishingGradientWarning)`.

    **Example:**

    ```python
    with warnings.catch_warnings():
        warnings.simplefilter("error", diffsim.VanishingGradientWarning)
        diffsim.train(diffsim.APG(), env, policy, key=key, total_steps=100_000)
    ```
    """


__all__ = [
    "Any",
    "Array",
    "Bool",
    "Float",
    "Int",
    "Key",
    "Keys",
    "LearningCurve",
    "Metrics",
    "Scalar",
    "Trajectory",
    "VanishingGradientWarning",
]
