"""MuJoCo Playground's DM Control Suite envs through `make_env`, on MJX's JAX implementation.

`make` installs the `playground` extra; without it the module is skipped. Each test compiles
at most one small MJX program (CartpoleBalance, PendulumSwingup); those that do are `slow`.
"""

import importlib.util
import re
import subprocess

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest
from brax.envs.base import State

import diffsim
from diffsim import envs

# Skip without the extra. Found, not imported: every xdist worker collects this module, and
# importing Playground here would bypass diffsim's quiet import (JAXopt's DeprecationWarning).
if importlib.util.find_spec("mujoco_playground") is None:
    pytest.skip("needs the `playground` extra", allow_module_level=True)


@pytest.fixture(scope="module")
def cartpole():
    return diffsim.make_env("CartpoleBalance", episode_length=3)


def test_names_are_the_bundled_dm_control_suite():
    names = envs.playground_names()
    assert {
        "AcrobotSwingup",
        "CartpoleBalance",
        "CartpoleSwingup",
        "CheetahRun",
        "FingerSpin",
        "HopperHop",
        "PendulumSwingup",
        "ReacherEasy",
        "WalkerWalk",
    } <= set(names)
    assert not {n for n in names if n.startswith(("Go1", "G1", "Panda", "Aloha", "Spot"))}


def test_download_only_name_is_refused_without_cloning(monkeypatch):
    def no_subprocess(*args, **kwargs):
        raise AssertionError(f"make_env started a process: {args}")

    monkeypatch.setattr(subprocess, "Popen", no_subprocess)
    monkeypatch.setattr(subprocess, "run", no_subprocess)
    with pytest.raises(ValueError, match=r"'Go1JoystickFlatTerrain'.*mujoco_menagerie.*git clone"):
        diffsim.make_env("Go1JoystickFlatTerrain")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"backend": "spring"}, r"runs on MJX only; got backend='spring'"),
        ({"solver_iterations": 0}, r"solver_iterations must be a positive int or None, got 0"),
        ({"impl": "warp"}, r"impl='warp'.*impl='jax'"),
        ({"no_such_key": 1}, r"bad config override for Playground env 'CartpoleBalance'"),
        ({"episode_length": 0}, r"episode_length must be a positive int, got 0"),
    ],
)
def test_bad_arguments_name_the_value(kwargs, match):
    with pytest.raises(ValueError, match=match):
        diffsim.make_env("CartpoleBalance", **kwargs)


def test_unknown_camel_case_name_lists_the_valid_ones():
    with pytest.raises(
        ValueError, match=r"unknown Playground environment 'CartPole'.*'CheetahRun'"
    ):
        diffsim.make_env("CartPole")


def test_defaults_follow_playground_config(cartpole):
    env = diffsim.make_env("PendulumSwingup")
    assert (env.episode_length, env.observation_size, env.action_size) == (1000, 3, 1)
    assert env.unwrapped.dt == pytest.approx(0.02)  # Playground's ctrl_dt, action_repeat 1
    assert int(env.unwrapped.mjx_model.opt.iterations) == 4
    # No joint limits nor contacts: MJX skips its solver, so the step is differentiable.
    assert (env.unwrapped.constraint_rows, env.unwrapped.backend) == (0, "mjx-differentiable")
    # CartpoleBalance has a rail limit; one solver iteration (Playground's) is differentiable,
    # and so are two in the bounded loop; MJX's own while_loop over two is not.
    assert cartpole.unwrapped.constraint_rows > 0
    assert cartpole.unwrapped.backend == "mjx-differentiable"
    two = diffsim.make_env("CartpoleBalance", solver_iterations=2)
    assert (int(two.unwrapped.mjx_model.opt.iterations), two.unwrapped.backend) == (
        2,
        "mjx-differentiable",
    )
    looping = diffsim.make_env("CartpoleBalance", solver_iterations=2, bounded_solver=False)
    assert looping.unwrapped.backend == "mjx"
    assert int(cartpole.unwrapped.mjx_model.opt.iterations) == 1  # the first env is untouched


def _episodes(env, key, actions):
    """Reset, draw a pool of 2 fresh starts, and step through `actions` (one env)."""
    state, pool = env.starts(env.reset(key), 2)

    def body(state, action):
        state = env.step(state, action, pool)
        info = state.info
        return state, (state.obs, state.reward, state.done, info["episode_return"], info)

    return pool, jax.lax.scan(body, state, actions)[1]


@pytest.mark.slow  # compiles an MJX program
def test_auto_reset_fresh_starts_and_divergence(cartpole, key):
    """Episodes of 3 steps from a pool of 2 fresh starts; a NaN action at step 1 diverges."""
    actions = jnp.zeros((7, 1)).at[1].set(jnp.nan)
    pool, (obs, reward, done, ep_ret, info) = jax.jit(_episodes, static_argnums=0)(
        cartpole, key, actions
    )
    np.testing.assert_array_equal(done, [0, 1, 0, 0, 1, 0, 0])
    np.testing.assert_array_equal(info["diverged"], [0, 1, 0, 0, 0, 0, 0])
    np.testing.assert_array_equal(info["truncation"], [0, 0, 0, 0, 1, 0, 0])
    assert np.all(np.isfinite(obs)) and np.all(np.isfinite(reward)) and reward[1] == 0.0
    # The diverged episode restarts from the pool's first start, the next from its second.
    np.testing.assert_allclose(obs[1], pool.obs[0])
    np.testing.assert_allclose(obs[4], pool.obs[1])
    assert not np.allclose(pool.obs[0], pool.obs[1])
    np.testing.assert_allclose(ep_ret[1], reward[:2].sum(), rtol=1e-6)
    np.testing.assert_allclose(ep_ret[4], reward[2:5].sum(), rtol=1e-6)
    assert 0.0 < reward[0] <= 1.0  # DMC rewards are tolerances in [0, 1]
    np.testing.assert_array_equal(info["reused_start"], np.zeros(7))


def _rollout(env, key, actions):
    """The observations of `actions` from `env.reset(key)`, nothing reset on the way."""

    def body(state, action):
        state = env.step(state, action, ())
        return state, state.obs

    return jax.lax.scan(body, env.reset(key), actions)[1]


@pytest.mark.slow  # compiles an MJX program
def test_gradient_matches_finite_differences_float64(key):
    """PendulumSwingup in float64 (no contacts; its reward is an indicator, flat almost
    everywhere, so the objective is the pole's height and speed summed over 10 steps): the
    analytic gradient along random directions matches central differences."""

    def objective(env, actions):
        obs = _rollout(env, key, actions)
        return jnp.sum(obs[:, 1]) + 0.1 * jnp.sum(obs[:, 2] ** 2)

    with jax.enable_x64(True):
        env = diffsim.make_env("PendulumSwingup")
        assert env.unwrapped.mjx_model.body_mass.dtype == jnp.float64
        actions = 0.5 * jnp.sin(jnp.arange(10.0))[:, None]
        value = jax.jit(lambda a: objective(env, a))
        grad = jax.jit(jax.grad(lambda a: objective(env, a)))(actions)
        assert grad.dtype == jnp.float64 and float(jnp.abs(grad).max()) > 1e-3
        for direction in jr.normal(jr.key(1), (2, *actions.shape), jnp.float64):
            eps = 1e-6
            fd = (value(actions + eps * direction) - value(actions - eps * direction)) / (2 * eps)
            np.testing.assert_allclose(jnp.vdot(grad, direction), fd, rtol=1e-6)


def test_bounded_solver_loop_is_reverse_differentiable(key):
    """CartpoleBalance with four solver iterations: reverse mode fails to trace through MJX's
    own while_loop and traces through the bounded loop (nothing is compiled; the loop's
    values are `_bounded_while_loop`'s test below, and `studies/mjx_gradients.py` compares
    the two solvers' trajectories); the adapter leaves MJX's module as it found it."""
    from mujoco.mjx._src import solver

    actions = jnp.array([[0.9], [-0.7], [1.0]])
    for bounded in (True, False):
        env = diffsim.make_env(
            "CartpoleBalance", episode_length=3, solver_iterations=4, bounded_solver=bounded
        )
        grad = jax.grad(lambda a, env=env: _rollout(env, key, a)[:, 0].sum())
        if bounded:
            jax.make_jaxpr(grad)(actions)
        else:
            with pytest.raises(ValueError, match="Reverse-mode differentiation does not work"):
                jax.make_jaxpr(grad)(actions)
    assert solver.jax is jax


def test_listed_by_names_and_the_envs_command(monkeypatch, capsys):
    from diffsim import cli

    assert {"CartpoleBalance", "CheetahRun"} <= set(diffsim.envs.names())
    monkeypatch.setattr(cli.diffsim.envs, "names", lambda: ["reach", "CartpoleBalance"])
    assert cli.main(["envs"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^CartpoleBalance\s+mjx\s+5\s+1\s+1000$", out, re.M), out


@pytest.mark.slow  # compiles an MJX program
def test_render_draws_with_mujoco_and_refuses_html(cartpole, tmp_path):
    policy = diffsim.DeterministicPolicy(cartpole.observation_size, 1, key=jr.key(0))
    with pytest.raises(ValueError, match=r"'CartpoleBalance'.*\.gif, \.mp4 or \.png.*x\.html'"):
        diffsim.render(cartpole, policy, tmp_path / "x.html", key=jr.key(1))
    path = diffsim.render(cartpole, policy, tmp_path / "x.png", key=jr.key(1), stills=3)
    import imageio.v3 as iio

    strip = iio.imread(path)
    assert strip.ndim == 3 and strip.shape[1] > 2 * strip.shape[0]  # 3 frames side by side
    assert strip.std() > 1.0  # a drawn scene, not a blank image


def test_windows_on_a_looping_solver_name_the_fix():
    two = diffsim.make_env(
        "CartpoleBalance", episode_length=3, solver_iterations=2, bounded_solver=False
    )
    policy = diffsim.DeterministicPolicy(two.observation_size, 1, key=jr.key(0))
    with pytest.raises(ValueError, match=r"'CartpoleBalance'.*bounded_solver=True.*iterations=1"):
        diffsim.train(diffsim.APG(num_envs=2, horizon=2), two, policy, key=jr.key(0), total_steps=8)


STRATEGIES = {
    "PPO": diffsim.PPO(num_envs=4, unroll_length=3, num_minibatches=2, num_epochs=1),
    "APG": diffsim.APG(num_envs=2, horizon=3),
    "SHAC": diffsim.SHAC(num_envs=4, horizon=3),
    "ES": diffsim.ES(population_size=4, rollout_length=3),
    "GuidedES": diffsim.GuidedES(
        population_size=4, rollout_length=3, gradient=diffsim.APGWindow(num_envs=2, horizon=3)
    ),
}


@pytest.fixture(scope="module")
def pendulum():
    return diffsim.make_env("PendulumSwingup", episode_length=3)


@pytest.mark.slow  # compiles an MJX program per strategy
@pytest.mark.parametrize("name", list(STRATEGIES))
def test_every_strategy_steps_a_playground_env(name, pendulum):
    """Two `step`s of each strategy on PendulumSwingup (3-step episodes; the cheapest model
    to compile: no constraints), in one compiled program (a scan, so the step compiles
    once, and its state must come back with the structure it went in with): the policy
    changes, every metric is finite, and the episodes' mean return lies in [0, 3] (DMC
    rewards lie in [0, 1])."""
    strategy = STRATEGIES[name]
    kind = diffsim.GaussianPolicy if name == "PPO" else diffsim.DeterministicPolicy
    policy = kind(pendulum.observation_size, 1, key=jr.key(0))

    @eqx.filter_jit
    def two_steps(policy, key):
        init_key, step_key = jr.split(key)
        arrays, rest = eqx.partition(strategy.init(pendulum, policy, key=init_key), eqx.is_array)

        def step(arrays, k):
            state, m = strategy.step(pendulum, eqx.combine(arrays, rest), key=k)
            return eqx.filter(state, eqx.is_array), m

        arrays, metrics = jax.lax.scan(step, arrays, jr.split(step_key, 2))
        return strategy.policy(eqx.combine(arrays, rest)), metrics

    trained, metrics = two_steps(policy, jr.key(1))
    for metric, values in metrics.items():
        assert values.shape == (2,) and np.all(np.isfinite(values)), (metric, values)
    returns = np.asarray(metrics.get("train_return", 0.0))
    assert np.all((returns >= 0.0) & (returns <= 3.0)), returns
    before = jax.tree.leaves(eqx.filter(policy, eqx.is_inexact_array))
    after = jax.tree.leaves(eqx.filter(trained, eqx.is_inexact_array))
    assert any(not np.allclose(a, b) for a, b in zip(after, before, strict=True))


def test_bounded_while_loop_is_the_while_loop_and_differentiable():
    """`x <- x * c` while `x < 100`, at most 8 times: from 1 with c = 3 it stops at 3^5 = 243,
    the same value as lax.while_loop's, with d/dc 3^5 = 5 * 3^4 = 405 in reverse mode; a
    bound of 3 stops at 27, as MJX's `cond` does at `opt.iterations`."""
    from diffsim.envs._mjx_guards import _bounded_while_loop

    cond = lambda carry: carry[0] < 100.0
    body = lambda carry: (carry[0] * carry[1], carry[1])
    run = lambda c, n: _bounded_while_loop(cond, body, (jnp.float32(1.0), c), max_iter=n)[0]
    assert float(run(3.0, 8)) == float(jax.lax.while_loop(cond, body, (1.0, 3.0))[0]) == 243.0
    np.testing.assert_allclose(jax.grad(run)(3.0, 8), 405.0, rtol=1e-6)
    assert float(run(3.0, 3)) == 27.0


def test_reward_tolerance_has_playgrounds_values_and_a_finite_gradient():
    """Playground's `reward.tolerance` has a NaN gradient inside an infinite bound (its
    discarded gaussian branch sees an infinite distance): WalkerWalk's standing reward,
    bounds (1.2, inf). diffsim's has the same values and a finite gradient, and a
    `PlaygroundEnv` step computes rewards with it."""
    import dataclasses

    from mujoco_playground._src import reward

    from diffsim.envs._mjx_guards import _tolerance
    from diffsim.envs._playground import PlaygroundEnv

    x = jnp.linspace(-2.0, 3.0, 41)
    for bounds in ((1.2, jnp.inf), (-jnp.inf, 0.5), (-0.25, 0.25), (0.0, 0.0)):
        for sigmoid, at_margin in (("gaussian", 0.1), ("linear", 0.5), ("long_tail", 0.1)):
            args = dict(bounds=bounds, margin=0.6, sigmoid=sigmoid, value_at_margin=at_margin)
            np.testing.assert_allclose(_tolerance(x, **args), reward.tolerance(x, **args))
            grad = jax.vmap(jax.grad(lambda v, a=args: _tolerance(v, **a)))(x)
            assert np.all(np.isfinite(grad)), (bounds, sigmoid)
    indicator = dict(bounds=(-0.25, 0.25))  # margin 0: PendulumSwingup's reward
    np.testing.assert_array_equal(_tolerance(x, **indicator), reward.tolerance(x, **indicator))
    standing = dict(bounds=(1.2, jnp.inf), margin=0.6)
    assert np.isnan(jax.grad(lambda v: reward.tolerance(v, **standing))(1.5))
    np.testing.assert_allclose(jax.grad(lambda v: _tolerance(v, **standing))(1.5), 0.0)

    class Standing:  # an inner env whose reward is the standing tolerance of the action
        def step(self, state, action):
            return dataclasses.replace(state, reward=reward.tolerance(action[0], **standing))

    env = PlaygroundEnv(Standing(), bounded_solver=False)
    zero = jnp.zeros(())
    state = State(pipeline_state=None, obs=jnp.zeros(1), reward=zero, done=zero)
    reward_of = lambda a: env.step(state, a).reward
    for a, expected in ((1.5, 1.0), (0.9, float(reward.tolerance(0.9, **standing)))):
        np.testing.assert_allclose(reward_of(jnp.array([a])), expected, rtol=1e-6)
        assert np.all(np.isfinite(jax.grad(reward_of)(jnp.array([a]))))
    assert reward.tolerance is not _tolerance  # restored after tracing
