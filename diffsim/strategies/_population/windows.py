"""GuidedES's gradient sources: the differentiable window whose analytic gradient at the
mean guides the search, APG's (`APGWindow`) or SHAC's with its critic (`SHACWindow`)."""

import abc
from collections.abc import Callable

import equinox as eqx
import jax
import optax
from brax.envs.base import State
from jaxtyping import Array, Float, PRNGKeyArray

from ..._types import Env, Metrics
from .._window.critic import AbstractSHACCritic, Critic
from .._window.env import carried_dtype
from .._window.gradient import WindowGradient
from .._window.options import WindowOptions
from .._window.window import AbstractWindowed, Window, apg_loss, clipped_adam


class AbstractGuideWindow(AbstractWindowed):
    """A window whose loss GuidedES differentiates at the distribution mean, per env
    (`num_envs` envs, `horizon` steps, carried across generations, gradient-cut, staggered
    as in `APG`), with whatever state the loss needs (a critic, or None)."""

    @abc.abstractmethod
    def init(self, env: Env, *, key: PRNGKeyArray) -> Critic | None:
        """The loss's state before the first generation."""

    @abc.abstractmethod
    def losses(
        self, env: Env, policy, env_state: State, critic: Critic | None, *, key: PRNGKeyArray
    ) -> tuple[Float[Array, " B"], Window]:
        """The window loss of each env, and the window."""

    @abc.abstractmethod
    def update(
        self, critic: Critic | None, grad: WindowGradient, env_state: State, *, key: PRNGKeyArray
    ) -> tuple[Critic | None, Metrics]:
        """The loss's state after a generation's window (`grad`, run from `env_state`), and
        what to log about it."""


class APGWindow(AbstractGuideWindow):
    """APG's window as GuidedES's gradient source: the loss of env `b` is
    `L_b = -1/H sum_t r_t^b`, its mean reward over the window (see `diffsim.APG`).

    **Fields:** `num_envs`, `horizon`: the window; `stochastic`: act with reparameterised
    samples `policy(obs, key=k)` (False needs a deterministic policy); `valve_max_norm`
    and `options` (`diffsim.WindowOptions`: float64, remat, the valve's decay, contact
    smoothing): as in `APG` (the valve at 100, the options off, by default).

    **Example:**

    ```python
    diffsim.GuidedES(gradient=APGWindow(num_envs=16, horizon=20))
    diffsim.GuidedES(gradient=APGWindow(options=diffsim.WindowOptions(remat=True)))
    ```
    """

    num_envs: int = eqx.field(default=16, static=True)
    horizon: int = eqx.field(default=32, static=True)
    stochastic: bool = eqx.field(default=False, static=True)
    valve_max_norm: float | None = 100.0
    options: WindowOptions = WindowOptions()

    def init(self, env: Env, *, key: PRNGKeyArray) -> None:
        del env, key

    def losses(self, env, policy, env_state, critic, *, key):
        window = self.window(env, policy, env_state, key=key)
        return apg_loss(window.traj), window

    def update(self, critic, grad, env_state, *, key):
        del grad, env_state, key
        return critic, {}


class SHACWindow(AbstractGuideWindow, AbstractSHACCritic):
    """SHAC's critic-bootstrapped window as GuidedES's gradient source, with its critic.

    The loss of env `b` is SHAC's actor loss (see `diffsim.SHAC`) with the target critic
    `V'` at every segment end; after each generation the critic fits the window's
    TD(lambda) targets and `V'` follows by Polyak averaging, exactly as `SHAC` trains it
    (`metrics["value_loss"]`), with SHAC's clipped Adam (clip 1.0, Adam (0.7, 0.95)).

    **Fields:** `num_envs`, `horizon`, `stochastic`, `valve_max_norm`, `options` as in
    `APGWindow`;
    `discount`, `gae_lambda`, `target_alpha`, `critic_epochs`, `critic_minibatches`
    (dividing `num_envs * horizon`), `critic_learning_rate`, `reward_scale`,
    `value_hidden`, `value_activation`: as in `SHAC`.

    **Example:**

    ```python
    diffsim.GuidedES(gradient=SHACWindow(num_envs=8, horizon=16, discount=0.99))
    ```
    """

    num_envs: int = eqx.field(default=16, static=True)
    horizon: int = eqx.field(default=32, static=True)
    discount: float = 0.95
    gae_lambda: float = 0.95
    target_alpha: float = 0.2
    critic_epochs: int = eqx.field(default=16, static=True)
    critic_minibatches: int = eqx.field(default=4, static=True)
    critic_learning_rate: float | Callable[[Array], Array] = 1e-3
    reward_scale: float = 1.0
    value_hidden: tuple[int, ...] = eqx.field(default=(64, 64), static=True)
    value_activation: str = eqx.field(default="tanh", static=True)
    stochastic: bool = eqx.field(default=False, static=True)
    valve_max_norm: float | None = 100.0
    options: WindowOptions = WindowOptions()

    def _critic_optimizer(self) -> optax.GradientTransformation:
        return clipped_adam(self.critic_learning_rate)

    def init(self, env: Env, *, key: PRNGKeyArray) -> Critic:
        return self._new_critic(env, key=key)

    def losses(self, env, policy, env_state, critic, *, key):
        assert critic is not None
        return self._actor_losses(self.window, env, policy, critic.target, env_state, key=key)

    def update(self, critic, grad, env_state, *, key):
        assert critic is not None
        traj = carried_dtype(jax.lax.stop_gradient(grad.window.traj), env_state)
        fit = self._update_critic(critic, traj, grad.kept, grad.ok, key=key)
        return fit.critic, {"value_loss": fit.loss}
