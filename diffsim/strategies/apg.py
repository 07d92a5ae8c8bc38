"""Analytic policy gradients: back-propagate the reward through the simulator.

`APG` is truncated back-propagation through time (Brax APG, Freeman et al. 2021): the
policy ascends the reward summed over a differentiable window of `horizon` steps. The
window, its loss and its gradient come from `_windows.py` and `_window_gradient.py`, shared
with `SHAC` and `GuidedES`; what APG shares with `SHAC` is `AbstractWindowStrategy`.
"""

from collections.abc import Callable
from typing import ClassVar

import equinox as eqx
import jax.numpy as jnp
import optax
from brax.envs.base import State
from jaxtyping import Array, Float, PRNGKeyArray

from .._types import Env, Metrics
from ..policies import trainable
from . import helpers
from ._window.options import UpdateOptions, WindowOptions
from ._window.strategy import WINDOW_SWEEPABLE, AbstractWindowStrategy
from ._window.window import Window, apg_loss, update_normalizers_from
from .helpers import episode_stats


class APGState(eqx.Module):
    """`policy`, its optimiser state, and the env batch carried across windows."""

    policy: eqx.Module
    opt_state: optax.OptState
    env_state: State


class APG(AbstractWindowStrategy[APGState]):
    """Analytic policy gradients by truncated back-propagation through time.

    One `step`: from the carried env batch (gradient-cut: `stop_gradient`), roll out
    `horizon` steps in `num_envs` envs with `diffsim.rollout` and ascend the mean reward

        L(theta) = -1/(B H) sum_b sum_{t<H} r_t^b(theta),   theta <- Adam(clip(grad L)),

    differentiating through the simulator. Gradients also stop at auto-resets, so a window
    never credits an action with the next episode's reward. Episodes start staggered
    (each env is first stepped `U[0, episode_length)` times with the initial policy)
    unless `horizon` equals the episode length, where windows align with episodes
    (full-episode BPTT). The observation statistics are frozen within the window and
    updated after the update.

    `train` rejects before compiling an env whose backend cannot be reverse-differentiated
    (Brax `mjx`), a `horizon` longer than the episode, and `options.remat` or
    `options.float64` where they cannot apply.

    Defaults: Brax's window (h=32, 64 envs, Adam (0.7, 0.95)) with global-norm clip 1.0,
    and lr 3e-3 (Brax: 1e-3).

    If the loss or the gradient is not finite the update is skipped (policy and optimiser
    state unchanged) and counted: `metrics["skipped_updates"]` is 1.0 for that iteration.
    With `update.mask_nonfinite_envs`, an env whose window diverged (a non-finite reward,
    observation or gradient) drops out of the mean instead and the others update
    (`metrics["masked_envs"]` counts the dropped envs). `metrics["grad_norm"]` is the
    global gradient norm before clipping; `metrics["grad_norm_step_max"]` and
    `metrics["grad_norm_step_median"]` the largest and the median norm of the cotangent of
    one env's loss through the env state at a step of the window (before the valve).

    **Fields:**

    - `num_envs`, `horizon`: `B` and `H`; one step is `B * H` env steps.
    - `learning_rate`: a float or an optax schedule of the update count.
    - `max_grad_norm`: the global-norm clip of the gradient.
    - `stochastic`: act with reparameterised samples `policy(obs, key=k)` (e.g. a
      `GaussianPolicy`); False acts with `policy(obs)`.
    - `valve_max_norm`: the gradient valve on the env state before each step of the
      window (identity forward): backward, the cotangent of one env's window loss through
      that state is clipped to norm `valve_max_norm` (None: no clip) and multiplied by
      `options.valve_decay` per step (D.Va's decay; 1.0: none). 100 by default, as in
      every first-order strategy: a bound that stiff contact exceeds by orders of
      magnitude and smooth dynamics rarely reach (where it does not act, the gradient is
      the exact one of Brax APG; `valve_max_norm=None` makes it so everywhere). The
      per-step norms it measures are logged either way (`grad_norm_step_max`,
      `grad_norm_step_median`), so a bound can be chosen from them.
    - `lr_decay`, `lr_decay_steps`: decay the learning rate linearly to 0 over
      `lr_decay_steps` env steps (one update per `num_envs * horizon`), which `train` sets
      to the run's budget unless given, as in `PPO`. Off by default.
    - `options`: how the window is computed (`diffsim.WindowOptions`: `float64`, `remat`,
      `valve_decay`, `contact_smoothing`; all off by default).
    - `update`: how its gradient becomes the update (`diffsim.UpdateOptions`:
      `mask_nonfinite_envs`, the elementwise clip `max_grad_value`, Adam's constants
      `(0.7, 0.95)` as in Brax and SHAC).

    **Example:**

    ```python
    env = diffsim.make_env("reach")
    policy = diffsim.DeterministicPolicy(env.observation_size, env.action_size, key=k1)
    run = diffsim.train(diffsim.APG(horizon=32), env, policy, key=k2, total_steps=200_000)
    ```
    """

    sweepable: ClassVar[tuple[str, ...]] = ("learning_rate", *WINDOW_SWEEPABLE)
    num_envs: int = 64
    horizon: int = 32
    learning_rate: float | Callable[[Array], Array] = 3e-3
    stochastic: bool = False
    valve_max_norm: float | None = 100.0
    options: WindowOptions = WindowOptions()
    max_grad_norm: float = 1.0
    lr_decay: bool = False
    lr_decay_steps: int | None = None
    update: UpdateOptions = UpdateOptions()

    def __check_init__(self):
        helpers.check_decay(self, "learning_rate")
        helpers.learning_rate("learning_rate", self.learning_rate)

    def for_budget(self, total_steps: int) -> "APG":
        """With `lr_decay`, decay over the run's `total_steps` unless `lr_decay_steps` is set."""
        return helpers.with_budget(self, total_steps, "learning_rate")

    def check(self, env: Env, policy: eqx.Module) -> None:
        self.window.check(env, policy)

    def init(self, env: Env, policy: eqx.Module, *, key: PRNGKeyArray) -> APGState:
        return APGState(
            policy=policy,
            opt_state=self._optimizer(self.learning_rate).init(
                eqx.filter(policy, trainable(policy))
            ),
            env_state=self.window.initial_env_state(env, policy, key=key),
        )

    def policy(self, state: APGState) -> eqx.Module:
        return state.policy

    def env_losses(
        self, env: Env, policy: eqx.Module, env_state: State, *, key: PRNGKeyArray
    ) -> tuple[Float[Array, " B"], Window]:
        """The window loss of each env, `-1/H sum_t r_t^b`, and the window itself."""
        window = self.window(env, policy, env_state, key=key)
        return apg_loss(window.traj), window

    def step(self, env: Env, state: APGState, *, key: PRNGKeyArray) -> tuple[APGState, Metrics]:
        actor = self._actor_update(
            lambda policy, env_state, key: self.env_losses(env, policy, env_state, key=key),
            state.policy,
            state.opt_state,
            state.env_state,
            self._optimizer(self.learning_rate),
            key=key,
        )
        grad, traj, opt_state = actor.grad, actor.traj, actor.opt_state
        policy = update_normalizers_from(actor.policy, traj, grad.kept, grad.ok)
        new = APGState(policy=policy, opt_state=opt_state, env_state=grad.window.env_state)
        metrics = {
            "loss": grad.loss.astype(jnp.float32),
            **self._gradient_metrics(grad),
            **episode_stats(traj),
            "env_steps": jnp.asarray(self.steps_per_iteration, jnp.float32),
        }
        return new, metrics
