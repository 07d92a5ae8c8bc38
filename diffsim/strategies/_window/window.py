"""Differentiable windows: the gradient machinery APG, SHAC and GuidedES share.

A window (`WindowSpec`) is `horizon` steps of `diffsim.rollout` in `num_envs` envs from a
gradient-cut env batch. Its loss is computed per env (`apg_loss`: the mean reward;
`shac_loss`: the discounted reward with a critic bootstrap at every segment end), and
`_window_gradient.window_gradient` differentiates it, batched or per env. The gradient
valve and backward-only contact smoothing (`_valve.py`, `_contact.py`) are settings of the
window.

The env a window steps (float64, rematerialised) and the checks before compiling are in
`_window_env.py`; SHAC's critic, also used by GuidedES, in `_critic.py`.
"""

import dataclasses
from typing import cast

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import optax
from brax.envs.base import State
from equinox import AbstractVar
from jaxtyping import Array, Bool, Float, PRNGKeyArray

from ..._types import Env, Scalar, Trajectory
from ...policies import ValueFunction, update_normalizers
from ...rollout import reset, rollout
from ...sharding import shard_batch
from .. import helpers
from ..helpers import select
from .env import (
    Rematerialized,
    check_env,
    check_x64,
    env_backend,
    float64_env,
    like,
    to_float64,
)
from .losses import apg_loss as apg_loss, shac_loss as shac_loss
from .options import UpdateOptions, WindowOptions, check_bools
from .valve import PROBE, Valved, pop_probe


def clipped_adam(
    learning_rate, *, max_grad_norm: Scalar = 1.0, update: UpdateOptions | None = None
) -> optax.GradientTransformation:
    """Adam with `update`'s constants after its optional elementwise clip and a
    global-norm clip. The defaults are Brax APG's and SHAC's (clip 1.0, Adam (0.7, 0.95))."""
    update = UpdateOptions() if update is None else update
    clips = [] if update.max_grad_value is None else [optax.clip(update.max_grad_value)]
    clips.append(optax.clip_by_global_norm(max_grad_norm))
    adam = optax.adam(learning_rate, b1=update.adam_b1, b2=update.adam_b2, eps=update.adam_eps)
    return optax.chain(*clips, adam)


class Window(eqx.Module):
    """What a differentiable window leaves behind: the env batch after it and the data
    (`traj`, leading axes `T B`)."""

    env_state: State
    traj: Trajectory


class WindowSpec(eqx.Module):
    """A differentiable window: `horizon` steps of `diffsim.rollout` in `num_envs` envs,
    acting with reparameterised samples `policy(obs, key=k)` if `stochastic`, computed as
    `options` says (`WindowOptions`: float64, rematerialised). `owner` names the class
    whose settings these are, in error messages.

    The gradient valve (`_valve.valve`, identity forward) sits on the env state before
    every step: backward, the cotangent of one env's loss through that state is clipped to
    norm `valve_max_norm` (None: no clip) and multiplied by `options.valve_decay` (1.0:
    none). `options.contact_smoothing` (a width in metres, None: off) smooths Brax spring's
    contacts in the backward pass only. Forward values are unchanged by all three.

    **Example:**

    ```python
    spec = WindowSpec(num_envs=16, horizon=32, stochastic=False, owner="APG")
    env_state = spec.initial_env_state(env, policy, key=k1)
    window = spec(env, policy, env_state, key=k2)   # window.traj.reward: [32, 16]
    ```
    """

    num_envs: int = eqx.field(static=True)
    horizon: int = eqx.field(static=True)
    stochastic: bool = eqx.field(static=True)
    owner: str = eqx.field(static=True)
    valve_max_norm: Scalar | None = None
    options: WindowOptions = WindowOptions()

    def __check_init__(self):
        helpers.positive_int("num_envs", self.num_envs)
        helpers.positive_int("horizon", self.horizon)
        check_bools(stochastic=self.stochastic)
        # (a swept value arrives traced: its concrete values were checked by train_sweep)
        if self.valve_max_norm is not None and not isinstance(self.valve_max_norm, jax.Array):
            helpers.positive("valve_max_norm", self.valve_max_norm)

    @property
    def float64(self) -> bool:
        """Whether the window runs in float64 (`options.float64`)."""
        return self.options.float64

    @property
    def valve_on(self) -> bool:
        """Whether the valve changes the cotangent (a clip or a decay)."""
        decay = self.options.valve_decay
        return self.valve_max_norm is not None or not (
            isinstance(decay, (int, float)) and decay == 1.0
        )

    def check(self, env: Env, policy: eqx.Module) -> None:
        """Reject, before compiling, a window that cannot run on `env` (`check_env`), and a
        `stochastic` window whose policy cannot sample with a key."""
        options = self.options
        check_env(
            env,
            owner=self.owner,
            horizon=self.horizon,
            remat=options.remat,
            float64=options.float64,
        )
        backend = env_backend(env)
        if options.contact_smoothing is not None and backend != "spring":
            raise ValueError(
                f"{self.owner}(options=WindowOptions(contact_smoothing="
                f"{options.contact_smoothing!r})) smooths the"
                f" contacts of Brax's spring backend only; env"
                f" {getattr(env, 'name', '')!r} uses {backend!r}: pass contact_smoothing=None"
            )
        if self.stochastic:
            obs = jax.ShapeDtypeStruct((env.observation_size,), jnp.float32)
            try:
                jax.eval_shape(lambda p, o: p(o, key=jr.key(0)), policy, obs)  # maybe abstract
            except Exception as error:
                raise ValueError(
                    f"{self.owner}(stochastic=True) calls policy(obs, key=key) for"
                    f" reparameterised samples; {type(policy).__name__} cannot: {error}"
                ) from error

    def __call__(self, env: Env, policy, env_state: State, *, key: PRNGKeyArray) -> Window:
        """The window from `env_state` (gradient-cut). With `float64` the policy, the env
        state and the env's Brax system (`float64_env`) are float64 for the window (x64 must
        be on); the env state after it is cast back, so the carried state keeps its dtype.

        A probe in `env_state.info` (`_valve.with_probe`, as `window_gradient` adds one)
        is kept differentiable: its gradient is the per-step cotangent norms."""
        check_x64(self.float64)
        env_state, probe = pop_probe(env_state)
        start = jax.lax.stop_gradient(env_state)  # truncated BPTT: nothing flows to the past
        start = shard_batch(start)
        smooth = self.options.contact_smoothing
        valved = probe is not None or self.valve_on or smooth is not None
        if valved:
            if probe is None:
                probe = jnp.zeros((start.done.shape[0], self.horizon), start.done.dtype)
            start = dataclasses.replace(start, info={**start.info, PROBE: probe})
        if self.float64:
            env = cast(Env, float64_env(env))
            policy, start = to_float64((policy, start))
        if self.options.remat:
            env = cast(Env, Rematerialized(env))  # steps like the env it wraps
        if valved:
            env = self._valved(env, units=start.done.shape[0])
        end, traj = rollout(
            env, policy, start, key=key, length=self.horizon, deterministic=not self.stochastic
        )
        end, _ = pop_probe(end)
        return Window(like(end, env_state) if self.float64 else end, traj)

    def _valved(self, env: Env, *, units: int) -> Env:
        """`env` behind the valve of these settings (`units`: the envs of the batch, whose
        mean loss is differentiated)."""
        return cast(
            Env,
            Valved(
                env,
                max_norm=self.valve_max_norm,
                decay=self.options.valve_decay,
                units=units,
                contact_smoothing=self.options.contact_smoothing,
            ),
        )

    def initial_env_state(self, env: Env, policy, *, key: PRNGKeyArray) -> State:
        """`num_envs` fresh envs, staggered unless windows align with episodes."""
        reset_key, stagger_key = jr.split(key)
        env_state = shard_batch(reset(env, key=reset_key, num_envs=self.num_envs))
        if self.horizon % env.episode_length == 0:
            return env_state  # windows aligned with episodes: full-episode BPTT
        return stagger(env, policy, env_state, key=stagger_key, stochastic=self.stochastic)


class AbstractWindowed(eqx.Module):
    """Anything that rolls out a differentiable window (`APG`, `SHAC`, GuidedES's gradient
    sources): the window's settings as fields of the final class (those with the same
    defaults everywhere in one `options: WindowOptions`), and the `WindowSpec` built from
    them (validated on construction)."""

    num_envs: AbstractVar[int]
    horizon: AbstractVar[int]
    stochastic: AbstractVar[bool]
    valve_max_norm: AbstractVar[float | None]
    options: AbstractVar[WindowOptions]

    def __check_init__(self):
        self.window  # noqa: B018  (validates the window's settings)

    @property
    def window(self) -> WindowSpec:
        """The differentiable window of these settings."""
        return WindowSpec(
            num_envs=self.num_envs,
            horizon=self.horizon,
            stochastic=self.stochastic,
            owner=type(self).__name__,
            valve_max_norm=self.valve_max_norm,
            options=self.options,
        )


def stagger(env: Env, policy, env_state: State, *, key: PRNGKeyArray, stochastic: bool) -> State:
    """Desynchronise episodes: step env `i` of the batch `k_i ~ U[0, episode_length)` times.

    Every step goes through `rollout` (one step at a time, keeping the old state where an
    env has already taken its `k_i` steps). These steps are not counted as training steps.
    """
    num_envs = env_state.done.shape[0]
    length = env.episode_length
    count_key, step_key = jr.split(key)
    counts = jr.randint(count_key, (num_envs,), 0, length)

    def advance(state: State, xs) -> tuple[State, None]:
        t, k = xs
        stepped, _ = rollout(env, policy, state, key=k, length=1, deterministic=not stochastic)
        keep = t < counts

        def pick(new, old):
            mask = jnp.broadcast_to(keep.reshape(-1, *([1] * (new.ndim - 1))), new.shape)
            return jax.lax.select(mask, new, old)

        return jax.tree.map(pick, stepped, state), None

    state, _ = jax.lax.scan(
        advance, env_state, (jnp.arange(length - 1), jr.split(step_key, length - 1))
    )
    return state


def shac_window_losses(
    spec: WindowSpec,
    env: Env,
    policy,
    critic: ValueFunction,
    env_state: State,
    *,
    key: PRNGKeyArray,
    discount: Scalar,
    reward_scale: Scalar = 1.0,
) -> tuple[Float[Array, " B"], Window]:
    """The window of `spec` and SHAC's loss of each env on it (`shac_loss`), with `critic`
    as `V'`: constant in its parameters, differentiated through its input."""
    window = spec(env, policy, env_state, key=key)
    critic = jax.lax.stop_gradient(to_float64(critic) if spec.float64 else critic)
    return shac_loss(window.traj, critic, discount=discount, reward_scale=reward_scale), window


def update_normalizers_from(models, traj: Trajectory, kept: Bool[Array, " B"], ok):
    """`models` with their observation statistics updated from the window's observations of
    the kept envs, unless not `ok` or any of those observations is non-finite."""
    mask = jnp.broadcast_to(kept[None], traj.obs.shape[:2])
    obs = jnp.where(mask[..., None], traj.obs, 0.0)
    updated = like(update_normalizers(models, obs, mask.astype(obs.dtype)), models)
    return select(ok & jnp.all(jnp.isfinite(obs)), updated, models)
