"""Gradient hygiene in the shared window: the gradient valve (clip and decay of the cotangent
through the env state at every step), backward-only contact smoothing on Brax spring, and
the per-step gradient-norm metrics. Toy envs and tiny windows; one short spring window."""

import dataclasses
from typing import Any, cast

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest
from conftest import deterministic

import diffsim
from diffsim._types import Env
from diffsim.rollout import rollout
from diffsim.strategies._window import contact as contact
from diffsim.strategies._window.gradient import window_gradient
from diffsim.strategies._window.valve import Valved, valve, with_probe
from diffsim.strategies.guided_es import APGWindow

VALVE: dict[str, Any] = dict(valve_max_norm=0.05, options=diffsim.WindowOptions(valve_decay=0.8))


class Constant(eqx.Module):
    def __call__(self, obs, *, key=None):
        return jnp.full((1,), 0.3, obs.dtype)


def _bitwise(a, b) -> None:
    leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(leaves_a) == len(leaves_b)
    for x, y in zip(leaves_a, leaves_b, strict=True):
        if eqx.is_inexact_array(x):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _gradient(apg, env, policy, env_state, key, *, per_env: bool, horizon=None):
    params, static = eqx.partition(policy, diffsim.trainable(policy))
    return window_gradient(
        lambda p, s, k: apg.env_losses(env, p, s, key=k),
        params,
        static,
        env_state,
        key=key,
        per_env=per_env,
        horizon=horizon,
    )


@pytest.mark.parametrize("name", ["reach", "pendulum"])
def test_valve_leaves_the_forward_pass_bitwise_equal(envs, key, name):
    env = envs(name)
    policy = deterministic(env)
    plain, valved = diffsim.APG(num_envs=3, horizon=6), diffsim.APG(num_envs=3, horizon=6, **VALVE)
    state = plain.window.initial_env_state(env, policy, key=key)

    def run(apg, s):
        return jax.jit(
            lambda s: _gradient(apg, env, policy, s, jr.key(3), per_env=False, horizon=6)
        )(s)

    a, b = run(plain, state), run(valved, state)
    _bitwise((a.window, a.per_env_loss), (b.window, b.per_env_loss))
    np.testing.assert_allclose(a.step_norms[:, -1], b.step_norms[:, -1], rtol=1e-6)
    assert not np.allclose(a.step_norms[:, 0], b.step_norms[:, 0])  # the valve did act


def test_valve_bounds_and_decays_the_cotangent_through_the_state(envs, key):
    """The cotangent reaching a window's start state through its first step: at most
    `max_norm`, and multiplied by `decay ** H` by the decay when the loss is the
    last step's reward (every path from it to the start crosses `H` valves)."""
    env, horizon = envs("pendulum"), 5
    policy = Constant()  # no path from the state to an action: every path crosses the valves
    state = diffsim.reset(env, key=key, num_envs=1)

    def start_cotangent(max_norm, decay):
        def last_reward(arrays):
            start = with_probe(eqx.combine(arrays, rest), horizon)
            wrapped = cast(Env, Valved(env, max_norm=max_norm, decay=decay, units=1))
            _, traj = rollout(wrapped, policy, start, key=key, length=horizon, deterministic=True)
            return traj.reward[-1, 0]

        arrays, rest = eqx.partition(state, eqx.is_inexact_array)
        grads = jax.jit(jax.grad(last_reward))(arrays)
        return grads, float(optax_norm(grads))

    plain, plain_norm = start_cotangent(None, 1.0)
    assert plain_norm > 0.1  # a cotangent worth bounding
    _, clipped = start_cotangent(0.1, 1.0)
    assert 0 < clipped <= 0.1 * (1 + 1e-6)  # at most the bound (clips at later steps shrink it)
    decayed, _ = start_cotangent(None, 0.5)
    for a, b in zip(jax.tree.leaves(decayed), jax.tree.leaves(plain), strict=True):
        np.testing.assert_allclose(a, 0.5**horizon * b, rtol=1e-5, atol=1e-12)


def optax_norm(tree):
    return jnp.sqrt(sum(jnp.sum(x**2) for x in jax.tree.leaves(tree)))


def test_valve_alone_clips_and_measures():
    """`valve`'s backward on one cotangent: the norm shifted into the probe, the cotangent
    scaled to `max_norm / units`."""
    carried, probe = {"x": jnp.array([3.0, 4.0])}, jnp.zeros(3)
    _, vjp = jax.vjp(lambda c, p: valve(c, p, 1.0, 0.5, 2.0), carried, probe)
    ct_carried, ct_probe = vjp(({"x": jnp.array([3.0, 4.0])}, jnp.array([7.0, 8.0, 9.0])))
    np.testing.assert_allclose(ct_probe, [10.0, 7.0, 8.0])  # units * |ct| = 2 * 5
    np.testing.assert_allclose(ct_carried["x"], 0.5 * (1.0 / 10.0) * np.array([3.0, 4.0]))


@pytest.mark.parametrize("per_env", [False, True])
def test_step_norms_are_the_cotangents_at_each_step(envs, key, per_env):
    """The last step's norm is `|d r_{H-1} / d state_{H-1}| / H` with the action held fixed
    (APG's loss of one env), computed here without the window; batched and per env agree."""
    env, horizon = envs("reach"), 4
    policy = deterministic(env)
    apg = diffsim.APG(num_envs=2, horizon=horizon, valve_max_norm=None)
    state = diffsim.reset(env, key=key, num_envs=2)
    grad = jax.jit(lambda s: _gradient(apg, env, policy, s, key, per_env=per_env, horizon=horizon))(
        state
    )
    before_last, _ = rollout(env, policy, state, key=key, length=horizon - 1, deterministic=True)
    before_last = dataclasses.replace(before_last, info={})  # a bare step: no auto-reset keys

    def last_step_norm(one):
        action = policy(one.obs)
        arrays, rest = eqx.partition(one, eqx.is_inexact_array)
        step = lambda a: env.unwrapped.step(eqx.combine(a, rest), action).reward / horizon
        return optax_norm(jax.grad(step)(arrays))

    expected = jax.vmap(last_step_norm)(before_last)
    assert grad.step_norms.shape == (2, horizon)
    assert bool(jnp.all(jnp.isfinite(grad.step_norms)))
    np.testing.assert_allclose(grad.step_norms[:, -1], expected, rtol=1e-5)


def test_probe_and_valve_off_leave_the_gradient_exact(envs, key):
    """With the valve and smoothing off, measuring the per-step norms changes nothing:
    the same loss and gradient bitwise, and central differences agree (float64)."""
    env, horizon = envs("pendulum"), 6
    policy = deterministic(env, hidden=(8,))
    apg = diffsim.APG(num_envs=2, horizon=horizon, valve_max_norm=None)
    with jax.enable_x64(True):
        state = diffsim.reset(env, key=key, num_envs=2)
        policy = jax.tree.map(
            lambda x: x.astype(jnp.float64) if eqx.is_inexact_array(x) else x, policy
        )
        run = jax.jit(
            lambda pol, h: _gradient(apg, env, pol, state, key, per_env=False, horizon=h),
            static_argnums=1,
        )
        measured, plain = run(policy, horizon), run(policy, None)
        _bitwise((measured.loss, measured.grads), (plain.loss, plain.grads))
        params, static = eqx.partition(policy, diffsim.trainable(policy))
        direction = jax.tree.map(lambda x: jr.normal(jr.key(7), x.shape, x.dtype), params)
        eps = 1e-6
        loss = lambda s: (
            run(
                eqx.combine(jax.tree.map(lambda p, d: p + s * eps * d, params, direction), static),
                None,
            ).loss
        )
        central = (loss(1.0) - loss(-1.0)) / (2 * eps)
        analytic = sum(
            jnp.vdot(g, d)
            for g, d in zip(
                jax.tree.leaves(measured.grads), jax.tree.leaves(direction), strict=True
            )
        )
        assert abs(float(central)) > 1e-4
        np.testing.assert_allclose(analytic, central, rtol=1e-6)


def test_metrics_report_the_gradient_norms(envs, key):
    env = envs("reach")
    policy = deterministic(env)
    apg = diffsim.APG(num_envs=2, horizon=4)
    state = apg.init(env, policy, key=key)
    _, metrics = jax.jit(lambda s: apg.step(env, s, key=jr.key(9)))(state)
    grad = jax.jit(lambda s: _gradient(apg, env, policy, s, jr.key(9), per_env=False, horizon=4))(
        state.env_state
    )
    norms = np.asarray(grad.step_norms).ravel()
    for name in ("grad_norm", "grad_norm_step_max", "grad_norm_step_median", "skipped_updates"):
        assert metrics[name].shape == ()
    np.testing.assert_allclose(metrics["grad_norm_step_max"], norms.max(), rtol=1e-5)
    np.testing.assert_allclose(metrics["grad_norm_step_median"], np.median(norms), rtol=1e-5)
    flat = jnp.concatenate([x.ravel() for x in jax.tree.leaves(grad.grads)])
    np.testing.assert_allclose(metrics["grad_norm"], jnp.linalg.norm(flat), rtol=1e-5)
    assert float(metrics["skipped_updates"]) == 0.0
    shac = diffsim.SHAC(num_envs=2, horizon=4, critic_epochs=1, critic_minibatches=1, **VALVE)
    _, metrics = jax.jit(lambda s: shac.step(env, s, key=key))(shac.init(env, policy, key=key))
    assert 0 < float(metrics["grad_norm_step_median"]) <= float(metrics["grad_norm_step_max"])


@pytest.mark.parametrize(
    "make, name",
    [
        (lambda cls: cls(valve_max_norm=0.0), "valve_max_norm"),
        (lambda cls: cls(options=diffsim.WindowOptions(valve_decay=0.0)), "valve_decay"),
        (lambda cls: cls(options=diffsim.WindowOptions(valve_decay=1.5)), "valve_decay"),
        (lambda cls: cls(options=diffsim.WindowOptions(contact_smoothing=-0.01)), "smoothing"),
    ],
)
def test_bad_valve_settings_are_rejected(make, name):
    for cls in (diffsim.APG, diffsim.SHAC, APGWindow):
        with pytest.raises(ValueError, match=name):
            make(cls)


def test_contact_smoothing_needs_the_spring_backend(envs):
    env = envs("reach")
    with pytest.raises(ValueError, match="spring"):
        apg = diffsim.APG(options=diffsim.WindowOptions(contact_smoothing=0.01))
        apg.check(env, deterministic(env))


def test_penetrating_is_hard_forward_and_smooth_backward():
    dist = jnp.array([-0.02, -1e-4, 0.0, 1e-4, 0.02])
    np.testing.assert_array_equal(contact.penetrating(dist, 0.01), [1.0, 1.0, 0.0, 0.0, 0.0])
    grad = jax.vmap(jax.grad(contact.penetrating), in_axes=(0, None))(dist, 0.01)
    soft = jax.vmap(jax.grad(lambda d: jax.nn.sigmoid(-d / 0.01)))(dist)
    np.testing.assert_allclose(grad, soft, rtol=1e-6)
    assert bool(jnp.all(grad < 0))  # nearer (smaller dist) means more contact


def test_a_masked_candidates_infinite_impulse_leaves_the_smoothed_gradient_finite():
    """Brax computes an impulse for every contact candidate and masks it with the
    indicator: a candidate far from contact may carry an infinite impulse. Its cotangent
    through the surrogate must be 0, not `0 * inf`; a near one keeps its gradient."""
    masked = lambda d, impulse: contact.penetrating(d, 0.01) * impulse
    far = jax.grad(masked)(jnp.asarray(1.0), jnp.asarray(jnp.inf))
    assert far == 0.0
    near = jax.grad(masked)(jnp.asarray(0.005), jnp.asarray(2.0))
    soft = jax.grad(lambda d: jax.nn.sigmoid(-d / 0.01))(0.005)
    np.testing.assert_allclose(near, 2.0 * soft, rtol=1e-6)


def test_diagnostics_window_step_norms(envs, key):
    env = envs("pendulum")
    remat = diffsim.WindowOptions(valve_decay=0.8, remat=True)
    apg = diffsim.APG(num_envs=2, horizon=4, **{**VALVE, "options": remat})
    norms = diffsim.diagnostics.window_step_norms(apg, env, deterministic(env), key=key)
    assert norms.shape == (2, 4)
    assert bool(jnp.all(jnp.isfinite(norms) & (norms > 0)))


@pytest.mark.filterwarnings("ignore:Accessing:DeprecationWarning")  # Brax reads mjx.Data.ncon
def test_smoothed_spring_contacts_match_brax_forward_and_differ_backward(envs):
    """Our `resolve` against Brax spring's, on hopper with its foot pushed into the floor
    and moving down: the same delta-velocities bitwise; a gradient in the foot's height
    that Brax's hard indicator does not have."""
    from brax.spring import collisions

    env = envs("hopper")
    sys = env.unwrapped.sys
    start = jax.jit(env.reset)(jr.key(0)).pipeline_state

    def pressed(depth, state=start):
        x = state.x.replace(pos=state.x.pos.at[:, 2].add(-depth))
        x_i = state.x_i.replace(pos=state.x_i.pos.at[:, 2].add(-depth))
        xd_i = state.xd_i.replace(vel=state.xd_i.vel.at[:, 2].set(-0.5))
        return state.replace(x=x, x_i=x_i, xd_i=xd_i)

    def total(resolve):
        return jax.jit(jax.value_and_grad(lambda d: jnp.sum(resolve(sys, pressed(d)).vel)))

    brax_resolve = total(collisions.resolve)
    our_resolve = total(lambda sys, state: contact.resolve(sys, state, 0.01))
    theirs, ours = brax_resolve(0.0405), our_resolve(0.0405)
    _bitwise(theirs[0], ours[0])
    assert float(theirs[0]) != 0.0  # a contact pushes
    assert abs(float(ours[1]) - float(theirs[1])) > 1e-3  # the smoothed indicator's share
    # The foot just above the floor: no contact acts, one is near. The same (zero) forward;
    # a finite, bounded gradient (Brax's `/ (contacts + 1e-8)` would scale it by 1e8)
    theirs, ours = brax_resolve(0.03), our_resolve(0.03)
    _bitwise(theirs[0], ours[0])
    assert float(theirs[0]) == 0.0 and float(theirs[1]) == 0.0
    assert 0.0 < abs(float(ours[1])) < 1e5, ours


def test_the_solver_guard_passes_back_only_finite_cotangents():
    """`_finite_cotangent` (which guards the input of MJX's constraint solver while a
    Playground step is traced) is the identity forward; backward, a non-finite cotangent
    entry becomes 0 and the finite ones pass unchanged. Without it the gradient is NaN."""
    from diffsim.envs._mjx_guards import _finite_cotangent

    f = lambda x, guard: jnp.sum(jnp.sqrt(guard(x)) * jnp.array([0.0, 2.0]))  # sqrt'(0) = inf
    x = jnp.array([0.0, 4.0])
    assert f(x, _finite_cotangent) == f(x, lambda v: v) == 4.0
    np.testing.assert_array_equal(jax.grad(f)(x, _finite_cotangent), [0.0, 0.5])
    assert not np.isfinite(np.asarray(jax.grad(f)(x, lambda v: v))[0])  # 0 * inf
    mixed = {"i": jnp.array([1, 2]), "x": x}  # integer leaves (float0 cotangents) pass
    g = jax.grad(lambda t: f(_finite_cotangent(t)["x"], lambda v: v), allow_int=True)(mixed)
    np.testing.assert_array_equal(g["x"], [0.0, 0.5])
