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
    # The window's and the optimiser's settings, which the base declares as AbstractVars;
    # float64, remat, Adam's constants, ... are in `options` and `update`.
    num_envs: int = 16
    horizon: int = 16
    stochastic: bool = False
    valve_max_norm: float | None = None
    options: diffsim.WindowOptions = diffsim.WindowOptions()
    max_grad_norm: float = 1.0
    lr_decay: bool = False
    lr_decay_steps: int | None = None
    update: diffsim.UpdateOptions = diffsim.UpdateOptions()

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
        def losses(policy, env_state, key):  # each env's loss, as `_actor_update` wants it
            return self.env_losses(env, policy, env_state, key=key)

        optimizer = self._optimizer(self.learning_rate)
        update = self._actor_update(  # the window's gradient and one guarded Adam step
            losses, state.policy, state.opt_state, state.env_state, optimizer, key=key
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
