"""Differentiable windows: the gradient machinery APG, SHAC and GuidedES share.

A window is `horizon` steps of `diffsim.rollout` from a gradient-cut env batch. Its loss is
computed per env (`apg_loss`: the mean reward; `shac_loss`: the discounted reward with a
critic bootstrap at every segment end), and `window_gradient` differentiates it in one of
two ways:

- batched: one backward pass of the mean over envs (a non-finite env spoils the whole
  gradient, and the strategy skips its update);
- per env (`per_env=True`): `jax.vmap` over envs of `jax.grad` of one env's window, so each
  env's backward pass is its own. Envs whose window diverged (a non-finite reward or
  observation, or a non-finite loss or gradient) drop out of the mean; the others update.

A window can run in float64 (`float64_env`: the policy, the env state and the Brax system's
constants are cast for the window) and rematerialise each env step in the backward pass
(`rematerialized`: `jax.checkpoint` around `env.step`). `check_window` rejects, before
anything compiles, what a window cannot do: a backend that cannot be reverse-differentiated,
a horizon longer than the episode, and remat or float64 where they cannot apply.

The critic helpers (`critic_batch`, `fit_critic`, `polyak`) are SHAC's, also used by
GuidedES's critic-bootstrapped gradient.
"""

import copy
import weakref

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax
from brax.base import System
from brax.envs.base import Env, State, Wrapper
from jaxtyping import Array, Bool, Float, PRNGKeyArray

from .._types import Scalar, Trajectory
from ..policies import ValueFunction, trainable, update_normalizers
from ..rollout import reset, rollout
from ..sharding import shard_batch
from . import helpers
from .helpers import all_finite, gae, guarded_update, select


class Window(eqx.Module):
    """What a differentiable window leaves behind: the env batch after it and the data
    (`traj`, leading axes `T B`)."""

    env_state: State
    traj: Trajectory


# --------------------------------------------------------------------------- set-up


def optimizer(
    learning_rate,
    *,
    max_grad_norm: Scalar,
    max_grad_value: Scalar | None,
    b1: Scalar,
    b2: Scalar,
    eps: Scalar,
) -> optax.GradientTransformation:
    """Adam after an optional elementwise clip and a global-norm clip."""
    clips = [] if max_grad_value is None else [optax.clip(max_grad_value)]
    clips.append(optax.clip_by_global_norm(max_grad_norm))
    return optax.chain(*clips, optax.adam(learning_rate, b1=b1, b2=b2, eps=eps))


def strategy_optimizer(strategy, learning_rate) -> optax.GradientTransformation:
    """`optimizer` with the clip and Adam fields of an APG-like `strategy`."""
    return optimizer(
        learning_rate,
        max_grad_norm=strategy.max_grad_norm,
        max_grad_value=strategy.max_grad_value,
        b1=strategy.adam_b1,
        b2=strategy.adam_b2,
        eps=strategy.adam_eps,
    )


def to_float64(tree):
    """Every floating leaf of `tree` as float64 (x64 must be on)."""
    return jax.tree.map(lambda x: x.astype(jnp.float64) if eqx.is_inexact_array(x) else x, tree)


def like(tree, reference):
    """Cast `tree`'s floating leaves back to the dtypes of `reference`'s."""
    return jax.tree.map(
        lambda x, r: x.astype(r.dtype) if eqx.is_inexact_array(x) else x, tree, reference
    )


def carried_dtype(traj: Trajectory, env_state: State) -> Trajectory:
    """A (float64) window's data in the dtype of the carried env state's observations."""
    dtype = env_state.obs.dtype
    return jax.tree.map(lambda x: x.astype(dtype) if eqx.is_inexact_array(x) else x, traj)


def check_x64(float64: bool) -> None:
    if float64 and not jax.config.read("jax_enable_x64"):
        raise ValueError(
            "float64=True needs 64-bit JAX, which cannot be switched on inside jit: call"
            " jax.config.update('jax_enable_x64', True) (or run under jax.enable_x64(True))"
            " before training, or use float64=False"
        )


def check_common(strategy) -> None:
    """The checks of the fields APG and SHAC share."""
    helpers.positive_int("num_envs", strategy.num_envs)
    helpers.positive_int("horizon", strategy.horizon)
    helpers.positive("max_grad_norm", strategy.max_grad_norm)
    if strategy.max_grad_value is not None:
        helpers.positive("max_grad_value", strategy.max_grad_value)
    helpers.in_range("adam_b1", strategy.adam_b1, 0.0, 1.0)
    helpers.in_range("adam_b2", strategy.adam_b2, 0.0, 1.0)
    helpers.positive("adam_eps", strategy.adam_eps)
    check_flags(strategy, "stochastic", "float64", "remat", "mask_nonfinite_envs")


def check_flags(strategy, *names: str) -> None:
    for name in names:
        if not isinstance(getattr(strategy, name), bool):
            raise ValueError(f"{name} must be a bool, got {getattr(strategy, name)!r}")


def check_policy(strategy, env: Env, policy: eqx.Module) -> None:
    """float64 needs x64; `stochastic=True` needs a policy that samples with a key."""
    check_x64(strategy.float64)
    if strategy.stochastic:
        obs = jax.ShapeDtypeStruct((env.observation_size,), jnp.float32)
        try:
            jax.eval_shape(lambda p, o: p(o, key=jr.key(0)), policy, obs)  # policy may be abstract
        except Exception as error:
            raise ValueError(
                f"{type(strategy).__name__}(stochastic=True) calls policy(obs, key=key) for"
                f" reparameterised samples; {type(policy).__name__} cannot: {error}"
            ) from error


# --------------------------------------------------------------------------- window envs

# Backends whose step JAX cannot reverse-differentiate, and why.
NOT_DIFFERENTIABLE = {
    "mjx": (
        "whose constraint solver runs in a lax.while_loop, which JAX cannot reverse-differentiate"
    ),
}

_FLOAT64_ENVS: "weakref.WeakKeyDictionary[Env, Env]" = weakref.WeakKeyDictionary()


def _to_float64_constant(x):
    if isinstance(x, (np.ndarray, jax.Array)) and jnp.issubdtype(x.dtype, jnp.floating):
        return jnp.asarray(np.asarray(x, np.float64))
    return x


def _cast_system(env: Env) -> Env:
    """A shallow copy of the wrapper chain down to the Brax env holding `sys`, whose `sys` has
    float64 floating leaves; an env without a Brax system (a toy env) is returned as is."""
    if isinstance(env, Wrapper):
        inner = _cast_system(env.env)
        if inner is env.env:
            return env
        out = copy.copy(env)
        out.env = inner
        return out
    system = vars(env).get("sys")
    if not isinstance(system, System):
        return env
    out = copy.copy(env)
    out.sys = jax.tree.map(_to_float64_constant, system)
    return out


def float64_env(env: Env) -> Env:
    """`env` with its Brax system's constants (`env.unwrapped.sys`: masses, inertias,
    geometry, gains, ...) in float64, so that a float64 state is stepped in float64.

    A copy down the wrapper chain (the original is untouched), built once per env and
    cached. A toy env (no Brax system; its constants are Python floats) comes back as is.
    x64 must be on.

    **Example:**

    ```python
    jax.config.update("jax_enable_x64", True)
    env64 = float64_env(diffsim.make_env("reacher"))
    env64.unwrapped.sys.link.inertia.mass.dtype   # float64
    ```
    """
    check_x64(True)
    cached = _FLOAT64_ENVS.get(env)
    if cached is None:
        with jax.ensure_compile_time_eval():
            cached = _cast_system(env)
        if cached is env:
            return env
        _FLOAT64_ENVS[env] = cached
    return cached


class Rematerialized(Wrapper):
    """`env` whose `step` is wrapped in `jax.checkpoint`: reverse mode keeps only each step's
    inputs (the env state and the action) and recomputes the step's internals (the physics
    substeps, contacts) during the backward pass. Everything else is `env`'s.

    **Example:**

    ```python
    _, traj = diffsim.rollout(Rematerialized(env), policy, state, key=key, length=128)
    ```
    """

    def step(self, state: State, action: jax.Array, starts=None) -> State:
        step = jax.checkpoint(self.env.step, prevent_cse=False)  # inside a scan: no CSE risk
        return step(state, action) if starts is None else step(state, action, starts)


def env_backend(env: Env) -> str | None:
    """The Brax backend `env` steps with (`"jax"` for toy envs), or None if it has none."""
    try:
        return env.backend
    except (AttributeError, NotImplementedError):
        return None


def _float64_problem(env: Env) -> str | None:
    """Why a float64 reset, start pool and step of `env` is not float64 throughout (the
    first line of its jaxpr that computes in float32, or the error tracing it raised), or
    None. Traced only (nothing is compiled)."""

    def one_step(key):
        state = to_float64(env.reset(key))
        action = jnp.zeros(env.action_size, jnp.float64)
        if hasattr(env, "starts"):
            state, starts = env.starts(state, 1)
            return env.step(state, action, starts)
        return env.step(state, action)

    try:
        jaxpr = jax.make_jaxpr(one_step)(jr.key(0))
    except Exception as error:  # e.g. a float32 constant that breaks a scan's carry types
        return f"its float64 step fails to trace: {type(error).__name__}: {error}"[:300]
    for line in str(jaxpr).splitlines():
        if "f32" in line:
            return f"its float64 step still computes in float32 (`{line.strip()[:120]}`)"
    return None


def check_window(strategy, env: Env) -> None:
    """Reject, before compiling, a window `strategy` cannot differentiate on `env`:

    - an env whose backend JAX cannot reverse-differentiate (Brax `mjx`);
    - `horizon` longer than the env's episode;
    - `remat=True` with `horizon=1` (a window of one step has nothing to rematerialise);
    - `float64=True` without x64, or on an env that still computes in float32 once its state
      and Brax system are float64 (traced, not compiled).
    """
    label, name = type(strategy).__name__, getattr(env, "name", "")
    backend = env_backend(env)
    if backend in NOT_DIFFERENTIABLE:
        raise ValueError(
            f"{label} differentiates through the simulator, but env {name!r} uses Brax's"
            f" {backend!r} backend, {NOT_DIFFERENTIABLE[backend]}; build it with"
            f" diffsim.make_env({name!r}, backend='spring') (or 'generalized', 'positional')"
        )
    length = env.episode_length
    if strategy.horizon > length:
        raise ValueError(
            f"horizon={strategy.horizon} (the gradient window) exceeds the episode_length"
            f" {length} of env {name!r}; pass {label}(horizon={length}) or less"
        )
    if strategy.remat and strategy.horizon == 1:
        raise ValueError(
            f"remat=True with horizon=1: a one-step window keeps the same memory with or"
            f" without rematerialisation and only pays a second forward pass; pass"
            f" {label}(remat=False), or a longer horizon"
        )
    check_x64(strategy.float64)
    if strategy.float64:
        problem = _float64_problem(float64_env(env))
        if problem is not None:
            raise ValueError(
                f"float64=True cannot apply to env {name!r}: with its state and Brax system"
                f" in float64, {problem}; make the env's own constants and dtypes follow its"
                f" inputs, or pass float64=False"
            )


# --------------------------------------------------------------------------- the window


def window(strategy, env: Env, policy, env_state: State, *, key) -> Window:
    """The differentiable window of `strategy` (APG, SHAC, GuidedES): `strategy.horizon`
    steps of `rollout` from a gradient-cut state, acting with reparameterised samples if
    `strategy.stochastic`.

    With `strategy.float64` the policy, the env state and the env's Brax system
    (`float64_env`) are float64 for the window (x64 must be on); the env state after it is
    cast back, so the carried state keeps its dtype. With `strategy.remat` each env step is
    rematerialised in the backward pass (`Rematerialized`).
    """
    check_x64(strategy.float64)
    horizon, stochastic = strategy.horizon, strategy.stochastic
    float64, remat = strategy.float64, strategy.remat
    start = jax.lax.stop_gradient(env_state)  # truncated BPTT: nothing flows to past windows
    start = shard_batch(start)
    if float64:
        env = float64_env(env)
        policy, start = to_float64((policy, start))
    if remat:
        env = Rematerialized(env)
    end, traj = rollout(env, policy, start, key=key, length=horizon, deterministic=not stochastic)
    return Window(like(end, env_state) if float64 else end, traj)


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


def initial_env_state(strategy, env: Env, policy, *, key) -> State:
    """`strategy.num_envs` fresh envs, staggered unless windows align with episodes."""
    reset_key, stagger_key = jr.split(key)
    env_state = shard_batch(reset(env, key=reset_key, num_envs=strategy.num_envs))
    if strategy.horizon % env.episode_length == 0:
        return env_state  # windows aligned with episodes: full-episode BPTT
    return stagger(env, policy, env_state, key=stagger_key, stochastic=strategy.stochastic)


# --------------------------------------------------------------------------- losses


def apg_loss(traj: Trajectory) -> Float[Array, " B"]:
    """APG's window loss of each env: `-1/H sum_t r_t^b`. The batch loss is the mean."""
    return -jnp.mean(traj.reward, axis=0)


class _Segments(eqx.Module):
    """Scan carry of SHAC's actor loss: the discounted reward of each env's open segment
    and the discount `gamma^k` its next reward gets (k steps since the segment began)."""

    reward_sum: Float[Array, " B"]
    discount: Float[Array, " B"]


def shac_loss(
    traj: Trajectory, critic: ValueFunction, *, discount: Scalar, reward_scale: Scalar = 1.0
) -> Float[Array, " B"]:
    """SHAC's actor loss of each env (the batch loss is the mean over envs):

        L_b = -1/H sum_segments [ sum_{k<n} g^k r_{t0+k} + g^n (1 - term) V'(next_obs_{t0+n-1}) ]

    A segment runs from the window start or an episode start to the window end or an
    episode end (`n` steps); `term` is 1 only at a true termination (a time limit
    bootstraps from the critic's value of the last real observation). `critic` is `V'`,
    used as given (pass it through `stop_gradient` to keep its parameters constant).

    NaN-safe: a terminated step's bootstrap is exactly 0 by `jnp.where` on both the value
    and the critic's input, so a diverged (non-finite) next observation reaches neither
    the loss nor its backward pass, and segments are restarted by `jnp.where`, so a
    non-finite reward stays in its own segment.
    """
    term = traj.done * (1.0 - traj.truncation) > 0
    safe_next = jnp.where(term[..., None], jnp.zeros_like(traj.next_obs), traj.next_obs)
    next_value = jnp.where(term, 0.0, jax.vmap(jax.vmap(critic))(safe_next))
    reward = traj.reward * reward_scale
    segment_end = traj.done.at[-1].set(1.0) > 0  # the window end closes every open segment

    def accumulate(carry: _Segments, xs) -> tuple[_Segments, Float[Array, " B"]]:
        r, v, end = xs
        reward_sum = carry.reward_sum + carry.discount * r
        next_discount = carry.discount * discount
        closed = jnp.where(end, reward_sum + next_discount * v, 0.0)
        restart = _Segments(jnp.where(end, 0.0, reward_sum), jnp.where(end, 1.0, next_discount))
        return restart, closed

    ones = jnp.ones_like(reward[0])
    _, closed = jax.lax.scan(
        accumulate, _Segments(0.0 * ones, ones), (reward, next_value, segment_end)
    )
    return -jnp.sum(closed, axis=0) / reward.shape[0]


# --------------------------------------------------------------------------- gradients


class WindowGradient(eqx.Module):
    """The result of `window_gradient`.

    **Fields:**

    - `loss`: the mean window loss over the kept envs.
    - `grads`: its gradient (a pytree like the parameters).
    - `window`: the window, leading axes `T B` (per env or batched, the same layout).
    - `kept`: `Bool[Array, "B"]`, the envs in the mean (all True unless `per_env`).
    - `ok`: the loss and gradient are finite and at least one env was kept.
    - `per_env_loss`: `Float[Array, "B"]`; `per_env_grads`: the gradient of each env's
      loss (leaves `[B, ...]`), or None unless `per_env`.
    """

    loss: Float[Array, ""]
    grads: eqx.Module
    window: Window
    kept: Bool[Array, " B"]
    ok: Bool[Array, ""]
    per_env_loss: Float[Array, " B"]
    per_env_grads: eqx.Module | None

    @property
    def masked_envs(self) -> Float[Array, ""]:
        """Envs dropped from the mean (a float, for metrics)."""
        return jnp.sum(~self.kept).astype(jnp.float32)


def _diverged(traj: Trajectory) -> Bool[Array, " B"]:
    """Envs whose window holds a non-finite reward or observation, or a diverged step."""
    bad = ~jnp.all(jnp.isfinite(traj.reward), axis=0)
    for obs in (traj.obs, traj.next_obs):
        bad = bad | ~jnp.all(jnp.isfinite(obs), axis=(0, *range(2, obs.ndim)))
    if "diverged" in traj.extras:
        bad = bad | jnp.any(traj.extras["diverged"] > 0, axis=0)
    return bad


def _rows_finite(tree) -> Bool[Array, " B"]:
    """Per leading index: every floating leaf of `tree` is finite there."""
    leaves = jax.tree.leaves(eqx.filter(tree, eqx.is_inexact_array))
    return jnp.all(
        jnp.stack([jnp.all(jnp.isfinite(x.reshape(x.shape[0], -1)), axis=1) for x in leaves]),
        axis=0,
    )


def window_gradient(
    loss_fn, params, static, env_state: State, *, key: PRNGKeyArray, per_env: bool
) -> WindowGradient:
    """Differentiate a per-env window loss with respect to the policy's parameters.

    `loss_fn(policy, env_state, key) -> (Float[Array, "B"], Window)` computes the loss of
    each env of the batch `env_state` (any batch size, also 1). The batch loss is the mean
    over envs; with `per_env`, over the kept envs only:

        kept_b = window b finite (rewards, observations, no diverged step), L_b and grad L_b finite
        L = 1/|kept| sum_{b kept} L_b,     grad L = 1/|kept| sum_{b kept} grad L_b

    `per_env` runs `jax.vmap` over envs of `jax.value_and_grad` of a one-env window (each
    env's actions sampled from `jr.split(key, B)[b]`, so a stochastic policy draws other
    samples than the batched window does). A dropped env contributes exactly 0: its
    backward pass never mixes with the others', so no `0 * NaN` can reach their sum.

    **Example:**

    ```python
    def losses(pol, env_state, key):
        w = window(strategy, env, pol, env_state, key=key)
        return apg_loss(w.traj), w

    params, static = eqx.partition(policy, diffsim.trainable(policy))
    g = window_gradient(losses, params, static, env_state, key=key, per_env=True)
    g.grads, g.masked_envs   # the mean gradient of the kept envs, the envs dropped
    ```
    """
    if not per_env:

        def mean_loss(p):
            losses, win = loss_fn(eqx.combine(p, static), env_state, key)
            return jnp.mean(losses), (losses, win)

        (loss, (losses, win)), grads = jax.value_and_grad(mean_loss, has_aux=True)(params)
        kept = jnp.ones(losses.shape, bool)
        ok = jnp.isfinite(loss) & all_finite(grads)
        return WindowGradient(loss, grads, win, kept, ok, losses, None)

    def one_env(start: State, key: PRNGKeyArray):
        def loss(p):
            batch = jax.tree.map(lambda x: x[None], start)  # a batch of one env
            losses, win = loss_fn(eqx.combine(p, static), batch, key)
            return losses[0], win

        return jax.value_and_grad(loss, has_aux=True)(params)

    num_envs = env_state.done.shape[0]
    start = shard_batch(env_state)
    (losses, wins), per_grads = jax.vmap(one_env)(start, jr.split(key, num_envs))
    # Back to the batched layout: env states [B, 1, ...] -> [B, ...]; data [B, T, 1, ...]
    # -> [T, B, ...].
    win = Window(
        env_state=jax.tree.map(lambda x: x[:, 0], wins.env_state),
        traj=jax.tree.map(lambda x: jnp.moveaxis(x[:, :, 0], 0, 1), wins.traj),
    )
    kept = ~_diverged(win.traj) & jnp.isfinite(losses) & _rows_finite(per_grads)
    count = jnp.sum(kept)
    denominator = jnp.maximum(count, 1).astype(losses.dtype)

    def kept_mean(x):
        mask = kept.reshape(-1, *([1] * (x.ndim - 1)))
        return jnp.sum(jnp.where(mask, x, 0.0), axis=0) / denominator.astype(x.dtype)

    loss = kept_mean(losses)
    grads = jax.tree.map(kept_mean, per_grads)
    ok = (count > 0) & jnp.isfinite(loss) & all_finite(grads)
    return WindowGradient(loss, grads, win, kept, ok, losses, per_grads)


def update_normalizers_from(models, traj: Trajectory, kept: Bool[Array, " B"], ok):
    """`models` with their observation statistics updated from the window's observations of
    the kept envs, unless not `ok` or any of those observations is non-finite."""
    mask = jnp.broadcast_to(kept[None], traj.obs.shape[:2])
    obs = jnp.where(mask[..., None], traj.obs, 0.0)
    updated = like(update_normalizers(models, obs, mask.astype(obs.dtype)), models)
    return select(ok & jnp.all(jnp.isfinite(obs)), updated, models)


# --------------------------------------------------------------------------- critic


class Critic(eqx.Module):
    """SHAC's critic: `value` (trained), its Polyak-averaged `target` (the bootstrap) and
    the optimiser state of `value`."""

    value: ValueFunction
    target: ValueFunction
    opt_state: optax.OptState


class CriticBatch(eqx.Module):
    """Flattened critic data: observations, TD(lambda) targets, and a 0/1 weight per row
    (0 for the rows of envs dropped from the window gradient)."""

    obs: Float[Array, "N obs"]
    target: Float[Array, " N"]
    weight: Float[Array, " N"]


def critic_batch(
    target: ValueFunction,
    traj: Trajectory,
    kept: Bool[Array, " B"],
    *,
    discount: Scalar,
    gae_lambda: Scalar,
    reward_scale: Scalar = 1.0,
) -> CriticBatch:
    """TD(lambda) targets of the target critic on the window (`gae`), flattened; the rows of
    dropped envs carry weight 0 and zeros instead of their (maybe non-finite) data."""
    values = jax.vmap(jax.vmap(target))(traj.obs)
    next_values = jax.vmap(jax.vmap(target))(traj.next_obs)
    targets = gae(
        traj.reward * reward_scale,
        values,
        next_values,
        traj.done,
        traj.truncation,
        discount=discount,
        lam=gae_lambda,
    ).value_target
    keep = jnp.broadcast_to(kept[None], targets.shape)
    obs = jnp.where(keep[..., None], traj.obs, 0.0)
    return CriticBatch(
        obs=obs.reshape(-1, obs.shape[-1]),
        target=jnp.where(keep, targets, 0.0).reshape(-1),
        weight=keep.astype(targets.dtype).reshape(-1),
    )


def fit_critic(
    value: ValueFunction,
    opt_state: optax.OptState,
    batch: CriticBatch,
    ok: Bool[Array, ""],
    *,
    key: PRNGKeyArray,
    optimizer: optax.GradientTransformation,
    epochs: int,
    minibatches: int,
) -> tuple[ValueFunction, optax.OptState, Float[Array, ""]]:
    """`epochs x minibatches` Adam steps on the weighted `0.5 (V - G)^2` (shuffled each
    epoch); none applied unless `ok` and the step's loss and gradient are finite."""

    def loss_fn(v, mb: CriticBatch):
        error = (jax.vmap(v)(mb.obs) - mb.target) ** 2
        return 0.5 * jnp.sum(mb.weight * error) / jnp.maximum(jnp.sum(mb.weight), 1.0)

    def minibatch(carry, mb: CriticBatch):
        v, opt = carry
        loss, grads = eqx.filter_value_and_grad(loss_fn)(v, mb)
        good = ok & jnp.isfinite(loss) & all_finite(grads)
        return guarded_update(v, grads, opt, optimizer, good), loss

    def epoch(carry, key: PRNGKeyArray):
        order = jr.permutation(key, batch.target.shape[0])
        shuffled = jax.tree.map(lambda x: x[order].reshape(minibatches, -1, *x.shape[1:]), batch)
        return jax.lax.scan(minibatch, carry, shuffled)

    (value, opt_state), losses = jax.lax.scan(epoch, (value, opt_state), jr.split(key, epochs))
    return value, opt_state, jnp.mean(losses)


def polyak(target: ValueFunction, value: ValueFunction, alpha) -> ValueFunction:
    """`alpha * target + (1 - alpha) * value` on the trainable leaves; the rest from `value`."""
    spec = trainable(value)
    mixed = jax.tree.map(
        lambda t, v: alpha * t + (1 - alpha) * v,
        eqx.filter(target, spec),
        eqx.filter(value, spec),
    )
    return eqx.combine(mixed, eqx.filter(value, spec, inverse=True))
