"""A first-order strategy on `diffsim.AbstractWindowStrategy`: the gradient, through the
simulator, of a window's *discounted* reward (APG weighs every step alike). Only public
names; `docs/guides/extending.md` shows it and `tests/test_extending.py` trains it."""

from typing import Any, ClassVar

import equinox as eqx
import jax.numpy as jnp
import optax

import diffsim
from diffsim.strategies import helpers


class DiscountedAPGState(eqx.Module):
    policy: eqx.Module
    opt_state: optax.OptState
    env_state: Any  # the env batch carried from one window to the next


class DiscountedAPG(diffsim.AbstractWindowStrategy[DiscountedAPGState]):
    """Descend `L = -1/(B H) sum_b sum_{t<H} discount^t r_t^b` with clipped Adam, one window
    of `horizon` steps in `num_envs` envs per `step`."""

    sweepable: ClassVar[tuple[str, ...]] = ("learning_rate", "discount", "max_grad_norm")
    learning_rate: float = 3e-3
    discount: float = 0.99
    # The window's and the optimiser's settings, which the base declares as AbstractVars.
    num_envs: int = 16
    horizon: int = 16
    stochastic: bool = False
    float64: bool = False
    remat: bool = False
    valve_max_norm: float | None = None
    valve_decay: float = 1.0
    contact_smoothing: float | None = eqx.field(default=None, static=True)
    max_grad_norm: float = 1.0
    max_grad_value: float | None = None
    adam_b1: float = 0.7
    adam_b2: float = 0.95
    adam_eps: float = 1e-8
    mask_nonfinite_envs: bool = False
    lr_decay: bool = False
    lr_decay_steps: int | None = None

    def __check_init__(self):
        helpers.positive("learning_rate", self.learning_rate)
        helpers.in_range("discount", self.discount, 0.0, 1.0, low_open=True)

    def check(self, env, policy) -> None:
        self.window.check(env, policy)  # backend, horizon, a key-taking policy if stochastic

    def for_budget(self, total_steps: int) -> "DiscountedAPG":
        return helpers.with_budget(self, total_steps, "learning_rate")  # the decay's length

    def init(self, env, policy, *, key) -> DiscountedAPGState:
        params = eqx.filter(policy, diffsim.trainable(policy))
        opt_state = self._optimizer(self.learning_rate).init(params)
        return DiscountedAPGState(
            policy, opt_state, self.window.initial_env_state(env, policy, key=key)
        )

    def policy(self, state: DiscountedAPGState) -> eqx.Module:
        return state.policy

    def env_losses(self, env, policy, env_state, *, key):
        """Each env's loss `-1/H sum_t discount^t r_t` and the window."""
        window = self.window(env, policy, env_state, key=key)
        weights = self.discount ** jnp.arange(self.horizon)
        return -jnp.mean(weights[:, None] * window.traj.reward, axis=0), window

    def step(self, env, state: DiscountedAPGState, *, key):
        update = self._actor_update(  # the window's gradient and one guarded Adam step
            lambda policy, env_state, key: self.env_losses(env, policy, env_state, key=key),
            state.policy,
            state.opt_state,
            state.env_state,
            self._optimizer(self.learning_rate),
            key=key,
        )
        grad, traj = update.grad, update.traj
        fresh = diffsim.update_normalizers(update.policy, traj.obs)
        policy = helpers.select(grad.ok & jnp.all(jnp.isfinite(traj.obs)), fresh, update.policy)
        metrics = {
            "loss": grad.loss.astype(jnp.float32),
            **self._gradient_metrics(grad),
            **helpers.episode_stats(traj),
            "env_steps": jnp.asarray(self.steps_per_iteration, jnp.float32),
        }
        return DiscountedAPGState(policy, update.opt_state, grad.window.env_state), metrics
