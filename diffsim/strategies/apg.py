"""Analytic policy gradients: back-propagate the reward through the simulator.

Two final strategies share the helpers below:

- `APG`: truncated back-propagation through time (Brax APG, Freeman et al. 2021). The
  policy ascends the reward summed over a differentiable window of `horizon` steps.
- `SHAC`: short-horizon actor-critic (Xu et al. 2022). The same window, plus a critic
  that values the window's end, so short windows still see the long-term return.

Both step the env only through `diffsim.rollout`, carry the env batch across updates
(cutting gradients at window boundaries with `stop_gradient`; the env wrapper cuts them at
auto-resets), clip gradients, and skip an update whose loss or gradient is not finite.
"""

from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import optax
from brax.envs.base import Env, State
from jaxtyping import Array, Float, PRNGKeyArray

from .._types import Metrics, Trajectory
from ..policies import ValueFunction, trainable, update_normalizers
from ..rollout import episode_stats, reset, rollout
from ..sharding import shard_batch
from . import _checks as check
from ._guard import all_finite, guarded_update, select
from .base import AbstractStrategy
from .returns import gae

# --------------------------------------------------------------------------- helpers


class _Window(eqx.Module):
    """What a differentiable window leaves behind: the env batch after it and the data."""

    env_state: State
    traj: Trajectory


def _optimizer(
    learning_rate,
    max_grad_norm: float,
    max_grad_value: float | None,
    b1: float,
    b2: float,
    eps: float,
) -> optax.GradientTransformation:
    clips = [] if max_grad_value is None else [optax.clip(max_grad_value)]
    clips.append(optax.clip_by_global_norm(max_grad_norm))
    return optax.chain(*clips, optax.adam(learning_rate, b1=b1, b2=b2, eps=eps))


def _to_float64(tree):
    return jax.tree.map(lambda x: x.astype(jnp.float64) if eqx.is_inexact_array(x) else x, tree)


def _like(tree, reference):
    """Cast `tree`'s floating leaves back to the dtypes of `reference`'s."""
    return jax.tree.map(
        lambda x, r: x.astype(r.dtype) if eqx.is_inexact_array(x) else x, tree, reference
    )


def _carried_dtype(traj: Trajectory, env_state: State) -> Trajectory:
    """A (float64) window's data in the dtype of the carried env state's observations."""
    dtype = env_state.obs.dtype
    return jax.tree.map(lambda x: x.astype(dtype) if eqx.is_inexact_array(x) else x, traj)


def _check_x64(float64: bool) -> None:
    if float64 and not jax.config.read("jax_enable_x64"):
        raise ValueError(
            "float64=True needs 64-bit JAX, which cannot be switched on inside jit: call"
            " jax.config.update('jax_enable_x64', True) (or run under jax.enable_x64(True))"
            " before training, or use float64=False"
        )


def _window(
    env: Env, policy, env_state: State, *, key, horizon: int, stochastic: bool, float64: bool
) -> _Window:
    """The differentiable window: `horizon` steps of `rollout` from a gradient-cut state.

    With `float64` the policy and the env state are cast to float64 for the window (x64
    must be on); the env state after it is cast back, so the carried state keeps its dtype.
    """
    start = jax.lax.stop_gradient(env_state)  # truncated BPTT: nothing flows to past windows
    start = shard_batch(start)
    if float64:
        policy, start = _to_float64((policy, start))
    end, traj = rollout(env, policy, start, key=key, length=horizon, deterministic=not stochastic)
    return _Window(_like(end, env_state) if float64 else end, traj)


def _stagger(env: Env, policy, env_state: State, *, key: PRNGKeyArray, stochastic: bool) -> State:
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


def _initial_env_state(strategy, env: Env, policy, *, key) -> State:
    """`strategy.num_envs` fresh envs, staggered unless windows align with episodes."""
    reset_key, stagger_key = jr.split(key)
    env_state = shard_batch(reset(env, key=reset_key, num_envs=strategy.num_envs))
    if strategy.horizon % env.episode_length == 0:
        return env_state  # windows aligned with episodes: full-episode BPTT
    return _stagger(env, policy, env_state, key=stagger_key, stochastic=strategy.stochastic)


def _check_policy(strategy, env: Env, policy: eqx.Module) -> None:
    _check_x64(strategy.float64)
    if strategy.stochastic:
        obs = jax.ShapeDtypeStruct((env.observation_size,), jnp.float32)
        try:
            jax.eval_shape(lambda p, o: p(o, key=jr.key(0)), policy, obs)  # policy may be abstract
        except Exception as error:
            raise ValueError(
                f"{type(strategy).__name__}(stochastic=True) calls policy(obs, key=key) for reparameterised"
                f" samples; {type(policy).__name__} cannot: {error}"
            ) from error


def _check_common(strategy) -> None:
    check.positive_int("num_envs", strategy.num_envs)
    check.positive_int("horizon", strategy.horizon)
    check.positive("max_grad_norm", strategy.max_grad_norm)
    if strategy.max_grad_value is not None:
        check.positive("max_grad_value", strategy.max_grad_value)
    check.in_range("adam_b1", strategy.adam_b1, 0.0, 1.0)
    check.in_range("adam_b2", strategy.adam_b2, 0.0, 1.0)
    check.positive("adam_eps", strategy.adam_eps)
    for name in ("stochastic", "float64"):
        if not isinstance(getattr(strategy, name), bool):
            raise ValueError(f"{name} must be a bool, got {getattr(strategy, name)!r}")


# --------------------------------------------------------------------------- APG


class APGState(eqx.Module):
    """`policy`, its optimiser state, and the env batch carried across windows."""

    policy: eqx.Module
    opt_state: optax.OptState
    env_state: State


class APG(AbstractStrategy[APGState]):
    """Analytic policy gradients by truncated back-propagation through time.

    One `step`: from the carried env batch (gradient-cut: `stop_gradient`), roll out
    `horizon` steps in `num_envs` envs with `diffsim.rollout` and ascend the mean reward

        L(theta) = -1/(B H) sum_b sum_{t<H} r_t^b(theta),   theta <- Adam(clip(grad L)),

    differentiating through the simulator. Gradients also stop at auto-resets, so a window
    never credits an action with the next episode's reward. Episodes start staggered
    (each env is first stepped `U[0, episode_length)` times with the initial policy)
    unless `horizon` is a multiple of the episode length, where windows align with
    episodes: `horizon=env.episode_length` is full-episode BPTT. The observation
    statistics are frozen within the window and updated after the update.

    Defaults: Brax's window (h=32, 64 envs, Adam (0.7, 0.95)) with global-norm clip 1.0
    and lr 3e-3, which solves the toy `reach` (-12 after 100k steps) and `pendulum`
    (swing-up, 154 after 400k steps); Brax's 1e-3 was still at -88 on pendulum at 200k.

    If the loss or the gradient is not finite the update is skipped (policy and optimiser
    state unchanged) and counted: `metrics["skipped_updates"]` is 1.0 for that iteration.
    `metrics["grad_norm"]` is the global gradient norm before clipping.

    **Fields:**

    - `num_envs`, `horizon`: `B` and `H`; one step is `B * H` env steps.
    - `learning_rate`: a float or an optax schedule of the update count.
    - `max_grad_norm`: global-norm clip; `max_grad_value`: optional elementwise clip first.
    - `adam_b1`, `adam_b2`, `adam_eps`: Adam's constants (`(0.7, 0.95)` as in Brax/SHAC).
    - `stochastic`: act with reparameterised samples `policy(obs, key=k)` (e.g. a
      `GaussianPolicy`); False acts with `policy(obs)`.
    - `float64`: run the window in float64 (policy and env state cast for the window;
      parameters keep their dtype). Needs `jax.config.update("jax_enable_x64", True)`
      before training: x64 cannot be switched on inside jit, so `train` rejects
      `float64=True` without it.

    **Example:**

    ```python
    env = diffsim.make_env("reach")
    policy = diffsim.DeterministicPolicy(env.observation_size, env.action_size, key=k1)
    run = diffsim.train(diffsim.APG(horizon=32), env, policy, key=k2, total_steps=200_000)
    ```
    """

    num_envs: int = 64
    horizon: int = 32
    learning_rate: float | Callable[[Array], Array] = 3e-3
    max_grad_norm: float = 1.0
    max_grad_value: float | None = None
    adam_b1: float = 0.7
    adam_b2: float = 0.95
    adam_eps: float = 1e-8
    stochastic: bool = False
    float64: bool = False

    def __check_init__(self):
        _check_common(self)
        check.learning_rate("learning_rate", self.learning_rate)

    @property
    def steps_per_iteration(self) -> int:
        return self.num_envs * self.horizon

    @property
    def batch_size(self) -> int:
        return self.num_envs

    def check(self, env: Env, policy: eqx.Module) -> None:
        _check_policy(self, env, policy)

    def _optimizer(self) -> optax.GradientTransformation:
        return _optimizer(
            self.learning_rate,
            self.max_grad_norm,
            self.max_grad_value,
            self.adam_b1,
            self.adam_b2,
            self.adam_eps,
        )

    def init(self, env: Env, policy: eqx.Module, *, key: PRNGKeyArray) -> APGState:
        return APGState(
            policy=policy,
            opt_state=self._optimizer().init(eqx.filter(policy, trainable(policy))),
            env_state=_initial_env_state(self, env, policy, key=key),
        )

    def policy(self, state: APGState) -> eqx.Module:
        return state.policy

    def loss(
        self, env: Env, policy: eqx.Module, env_state: State, *, key: PRNGKeyArray
    ) -> tuple[Float[Array, ""], _Window]:
        """The window loss `-mean(reward)` over `H x B` steps, and the window itself.

        Differentiable in `policy`; exactly zero gradient to `env_state` (the truncation).
        """
        _check_x64(self.float64)
        window = _window(
            env,
            policy,
            env_state,
            key=key,
            horizon=self.horizon,
            stochastic=self.stochastic,
            float64=self.float64,
        )
        return -jnp.mean(window.traj.reward), window

    def step(self, env: Env, state: APGState, *, key: PRNGKeyArray) -> tuple[APGState, Metrics]:
        params, static = eqx.partition(state.policy, trainable(state.policy))
        loss_fn = lambda p: self.loss(env, eqx.combine(p, static), state.env_state, key=key)
        (loss, window), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        ok = jnp.isfinite(loss) & all_finite(grads)
        policy, opt_state = guarded_update(
            state.policy, grads, state.opt_state, self._optimizer(), ok
        )

        traj = _carried_dtype(jax.lax.stop_gradient(window.traj), state.env_state)
        obs_ok = ok & jnp.all(jnp.isfinite(traj.obs))
        policy = select(obs_ok, _like(update_normalizers(policy, traj.obs), policy), policy)
        new = APGState(policy=policy, opt_state=opt_state, env_state=window.env_state)
        metrics = {
            "loss": loss.astype(jnp.float32),
            "grad_norm": optax.tree.norm(grads).astype(jnp.float32),
            "skipped_updates": (~ok).astype(jnp.float32),
            **episode_stats(traj),
        }
        return new, metrics


# --------------------------------------------------------------------------- SHAC


class SHACState(eqx.Module):
    """`policy`, the critic `value` and its Polyak-averaged `target_value`, both optimiser
    states, and the carried env batch."""

    policy: eqx.Module
    value: ValueFunction
    target_value: ValueFunction
    policy_opt: optax.OptState
    value_opt: optax.OptState
    env_state: State


class _Segments(eqx.Module):
    """Scan carry of the actor loss: the discounted reward of each env's open segment
    and the discount `gamma^k` its next reward gets (k steps since the segment began)."""

    reward_sum: Float[Array, " B"]
    discount: Float[Array, " B"]


class _CriticFit(eqx.Module):
    value: ValueFunction
    opt_state: optax.OptState


class _CriticBatch(eqx.Module):
    obs: Float[Array, "N obs"]
    target: Float[Array, " N"]


class SHAC(AbstractStrategy[SHACState]):
    """Short-horizon actor-critic (Xu et al. 2022): APG's window plus a learned critic.

    One `step` rolls out `horizon` steps from the carried, gradient-cut env batch and
    ascends the window's discounted reward with the target critic at every segment end:

        L(theta) = -1/(B H) sum_b sum_segments [ sum_{k<n} g^k r_{t0+k}
                                                 + g^n (1 - term) V'(next_obs_{t0+n-1}) ],

    where a segment runs from the window start or an episode start to the window end or an
    episode end (`n` steps), `term` is 1 only at a true termination (a time limit bootstraps
    from the critic's value of the last real observation), `g = discount` and `V'` is the
    target critic (constant in theta, differentiated through its input). Then the critic
    `V` fits TD(lambda) targets computed on the window with `V'` (`gae`) for
    `critic_epochs x critic_minibatches` Adam steps on `0.5 (V - G)^2`, and

        V' <- target_alpha * V' + (1 - target_alpha) * V.

    Observation statistics (policy and critics) are frozen within the window and updated
    after the updates. Non-finite actor loss or gradient skips the whole iteration's
    updates (`metrics["skipped_updates"]`, 1.0 in an iteration that skipped). Clipping, Adam constants,
    `stochastic` and `float64` are as in `APG`.

    Defaults follow Xu et al. (h=32, 64 envs, lambda 0.95, target_alpha 0.2, 16 x 4 critic
    steps, Adam (0.7, 0.95), clip 1.0, actor lr 2e-3) except `discount=0.95` (paper: 0.99):
    on the toy `reach` task 0.99 lets the actor climb the young critic's extrapolation and
    diverge (eval return -100 -> -365 in 100k steps), while 0.95 reaches -20 there and
    swings `pendulum` up (151 after 600k steps).

    **Example:**

    ```python
    shac = diffsim.SHAC(horizon=32, actor_learning_rate=2e-3)
    run = diffsim.train(shac, env, policy, key=key, total_steps=500_000)
    ```
    """

    num_envs: int = 64
    horizon: int = 32
    actor_learning_rate: float | Callable[[Array], Array] = 2e-3
    critic_learning_rate: float | Callable[[Array], Array] = 1e-3
    discount: float = 0.95
    gae_lambda: float = 0.95
    target_alpha: float = 0.2
    critic_epochs: int = 16
    critic_minibatches: int = 4
    reward_scale: float = 1.0
    value_hidden: tuple[int, ...] = (64, 64)
    max_grad_norm: float = 1.0
    max_grad_value: float | None = None
    adam_b1: float = 0.7
    adam_b2: float = 0.95
    adam_eps: float = 1e-8
    stochastic: bool = False
    float64: bool = False

    def __check_init__(self):
        _check_common(self)
        check.learning_rate("actor_learning_rate", self.actor_learning_rate)
        check.learning_rate("critic_learning_rate", self.critic_learning_rate)
        check.in_range("discount", self.discount, 0.0, 1.0, low_open=True)
        check.in_range("gae_lambda", self.gae_lambda, 0.0, 1.0)
        check.in_range("target_alpha", self.target_alpha, 0.0, 1.0)
        check.positive("reward_scale", self.reward_scale)
        check.positive_int("critic_epochs", self.critic_epochs)
        check.positive_int("critic_minibatches", self.critic_minibatches)
        if (self.num_envs * self.horizon) % self.critic_minibatches:
            raise ValueError(
                f"critic_minibatches={self.critic_minibatches} must divide num_envs * horizon"
                f" = {self.num_envs * self.horizon}"
            )

    @property
    def steps_per_iteration(self) -> int:
        return self.num_envs * self.horizon

    @property
    def batch_size(self) -> int:
        return self.num_envs

    def check(self, env: Env, policy: eqx.Module) -> None:
        _check_policy(self, env, policy)

    def _optimizer(self, learning_rate) -> optax.GradientTransformation:
        return _optimizer(
            learning_rate,
            self.max_grad_norm,
            self.max_grad_value,
            self.adam_b1,
            self.adam_b2,
            self.adam_eps,
        )

    def init(self, env: Env, policy: eqx.Module, *, key: PRNGKeyArray) -> SHACState:
        value_key, env_key = jr.split(key)
        value = ValueFunction(env.observation_size, hidden=self.value_hidden, key=value_key)
        return SHACState(
            policy=policy,
            value=value,
            target_value=value,
            policy_opt=self._optimizer(self.actor_learning_rate).init(
                eqx.filter(policy, trainable(policy))
            ),
            value_opt=self._optimizer(self.critic_learning_rate).init(
                eqx.filter(value, trainable(value))
            ),
            env_state=_initial_env_state(self, env, policy, key=env_key),
        )

    def policy(self, state: SHACState) -> eqx.Module:
        return state.policy

    def loss(
        self,
        env: Env,
        policy: eqx.Module,
        critic: ValueFunction,
        env_state: State,
        *,
        key: PRNGKeyArray,
    ) -> tuple[Float[Array, ""], _Window]:
        """The actor's window loss (the equation above) with `critic` as `V'`, and the window.

        Differentiable in `policy` (through the simulator and `critic`'s input); exactly
        zero gradient to `env_state` and to `critic`'s parameters.
        """
        _check_x64(self.float64)
        window = _window(
            env,
            policy,
            env_state,
            key=key,
            horizon=self.horizon,
            stochastic=self.stochastic,
            float64=self.float64,
        )
        traj = window.traj
        critic = jax.lax.stop_gradient(_to_float64(critic) if self.float64 else critic)
        next_value = jax.vmap(jax.vmap(critic))(traj.next_obs)
        reward = traj.reward * self.reward_scale
        termination = traj.done * (1.0 - traj.truncation)
        segment_end = traj.done.at[-1].set(1.0)  # the window end closes every open segment

        def accumulate(carry: _Segments, xs) -> tuple[_Segments, Float[Array, " B"]]:
            r, v, term, end = xs
            reward_sum = carry.reward_sum + carry.discount * r
            discount = carry.discount * self.discount
            closed = end * (reward_sum + discount * (1.0 - term) * v)
            fresh = 1.0 - end
            return _Segments(reward_sum * fresh, discount * fresh + end), closed

        ones = jnp.ones_like(reward[0])
        _, closed = jax.lax.scan(
            accumulate, _Segments(0.0 * ones, ones), (reward, next_value, termination, segment_end)
        )
        return -jnp.sum(closed) / reward.size, window

    def _critic_targets(self, target: ValueFunction, traj: Trajectory) -> Float[Array, "T B"]:
        values = jax.vmap(jax.vmap(target))(traj.obs)
        next_values = jax.vmap(jax.vmap(target))(traj.next_obs)
        return gae(
            traj.reward * self.reward_scale,
            values,
            next_values,
            traj.done,
            traj.truncation,
            discount=self.discount,
            lam=self.gae_lambda,
        ).value_target

    def _fit_critic(
        self, fit: _CriticFit, batch: _CriticBatch, ok, *, key
    ) -> tuple[_CriticFit, Float[Array, ""]]:
        opt = self._optimizer(self.critic_learning_rate)
        loss_fn = lambda v, mb: 0.5 * jnp.mean((jax.vmap(v)(mb.obs) - mb.target) ** 2)

        def minibatch(fit: _CriticFit, mb: _CriticBatch) -> tuple[_CriticFit, Float[Array, ""]]:
            loss, grads = eqx.filter_value_and_grad(loss_fn)(fit.value, mb)
            good = ok & jnp.isfinite(loss) & all_finite(grads)
            value, opt_state = guarded_update(fit.value, grads, fit.opt_state, opt, good)
            return _CriticFit(value, opt_state), loss

        def epoch(fit: _CriticFit, key: PRNGKeyArray) -> tuple[_CriticFit, Float[Array, " M"]]:
            order = jr.permutation(key, batch.target.shape[0])
            shuffled = jax.tree.map(
                lambda x: x[order].reshape(self.critic_minibatches, -1, *x.shape[1:]), batch
            )
            return jax.lax.scan(minibatch, fit, shuffled)

        fit, losses = jax.lax.scan(epoch, fit, jr.split(key, self.critic_epochs))
        return fit, jnp.mean(losses)

    def step(self, env: Env, state: SHACState, *, key: PRNGKeyArray) -> tuple[SHACState, Metrics]:
        rollout_key, critic_key = jr.split(key)
        # Actor: gradient of the window loss, bootstrapped with the target critic.
        params, static = eqx.partition(state.policy, trainable(state.policy))
        loss_fn = lambda p: self.loss(
            env, eqx.combine(p, static), state.target_value, state.env_state, key=rollout_key
        )
        (loss, window), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        ok = jnp.isfinite(loss) & all_finite(grads)
        policy, policy_opt = guarded_update(
            state.policy, grads, state.policy_opt, self._optimizer(self.actor_learning_rate), ok
        )

        # Critic: TD(lambda) targets from the target critic, then Polyak averaging.
        traj = _carried_dtype(jax.lax.stop_gradient(window.traj), state.env_state)
        targets = self._critic_targets(state.target_value, traj)
        batch = _CriticBatch(traj.obs.reshape(-1, traj.obs.shape[-1]), targets.reshape(-1))
        ok = ok & all_finite(batch)
        fit, value_loss = self._fit_critic(
            _CriticFit(state.value, state.value_opt), batch, ok, key=critic_key
        )
        value = fit.value
        alpha = self.target_alpha
        target = eqx.combine(
            jax.tree.map(
                lambda t, v: alpha * t + (1 - alpha) * v,
                eqx.filter(state.target_value, trainable(value)),
                eqx.filter(value, trainable(value)),
            ),
            eqx.filter(value, trainable(value), inverse=True),
        )
        target = select(ok, target, state.target_value)

        # Observation statistics, frozen during the window, now take in its observations.
        models = (policy, value)
        policy, value = select(ok, _like(update_normalizers(models, traj.obs), models), models)
        target = eqx.tree_at(lambda v: v.norm, target, value.norm)
        new = SHACState(
            policy=policy,
            value=value,
            target_value=target,
            policy_opt=policy_opt,
            value_opt=fit.opt_state,
            env_state=window.env_state,
        )
        metrics = {
            "loss": loss.astype(jnp.float32),
            "value_loss": value_loss,
            "grad_norm": optax.tree.norm(grads).astype(jnp.float32),
            "skipped_updates": (~ok).astype(jnp.float32),
            **episode_stats(traj),
        }
        return new, metrics
