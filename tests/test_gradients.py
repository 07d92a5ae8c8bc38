"""Gradients through the simulator: a finite-difference check on Brax reacher, real float64
(the Brax system cast too), remat, SHAC as published (stochastic ELU actor, learning-rate
decay), and what a window rejects before compiling."""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax
import pytest
from conftest import deterministic, gaussian

import diffsim
from diffsim import LearningCurve, Run
from diffsim.envs import AutoResetEnv, Reach
from diffsim.rollout import from_resets, rollout
from diffsim.strategies._window import env as window_env
from diffsim.strategies.guided_es import APGWindow

REMAT = diffsim.WindowOptions(remat=True)
FLOAT64 = diffsim.WindowOptions(float64=True)


@pytest.fixture(scope="module")
def reacher():
    """Brax reacher (spring), built without x64: its system is float32, as users get it."""
    return diffsim.make_env("reacher")


def _params(policy):
    return eqx.partition(policy, diffsim.trainable(policy))


def _dot(a, b):
    return sum(jnp.vdot(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


def _floating_dtypes(tree) -> set:
    return {x.dtype for x in jax.tree.leaves(tree) if eqx.is_inexact_array(x)}


# --------------------------------------------------------------------------- float64


def test_float64_env_casts_the_brax_system(reacher):
    with jax.enable_x64(True):
        env64 = window_env.float64_env(reacher)
        assert window_env.float64_env(reacher) is env64  # built once per env
        assert _floating_dtypes(env64.unwrapped.sys) == {jnp.dtype("float64")}
        assert _floating_dtypes(reacher.unwrapped.sys) == {jnp.dtype("float32")}  # untouched
        assert (env64.episode_length, env64.name) == (reacher.episode_length, "reacher")
        # A float64 reset, start pool and step: no float32 anywhere in the traced program.
        assert window_env._float64_problem(env64) is None
        # Control: the uncast system drags float32 into the same program.
        problem = window_env._float64_problem(reacher)
        assert problem is not None and "float32" in problem
        toy = diffsim.make_env("reach")
        assert window_env.float64_env(toy) is toy  # no Brax system: nothing to cast


def _window_gradient(env, policy, state, key, *, horizon: int, remat: bool):
    """The float64 parameters and the jitted `value_and_grad` of APG's float64 window loss
    in them; its aux says whether the window ran in float64."""
    params, static = _params(policy)
    apg = diffsim.APG(
        num_envs=state.obs.shape[0],
        horizon=horizon,
        options=diffsim.WindowOptions(float64=True, remat=remat),
    )

    def loss(p):
        value, window = apg.loss(env, eqx.combine(p, static), state, key=key)
        return value, window.traj.reward.dtype == jnp.float64

    return window_env.to_float64(params), jax.jit(jax.value_and_grad(loss, has_aux=True))


def test_gradient_matches_central_differences_on_reacher(reacher, key):
    """The analytic gradient of APG's window loss through the spring pipeline (reacher has
    no contacts) against central differences along a random direction, in float64; with
    `remat` (each physics substep recomputed) the same loss and gradient to 1e-6."""
    policy = deterministic(reacher, hidden=(16,))
    state = diffsim.reset(reacher, key=key, num_envs=2)
    with jax.enable_x64(True):
        params, plain = _window_gradient(reacher, policy, state, key, horizon=8, remat=False)
        (value, float64), grad = plain(params)
        leaves, treedef = jax.tree.flatten(params)
        keys = jr.split(jr.key(5), len(leaves))
        direction = jax.tree.unflatten(
            treedef, [jr.normal(k, x.shape, jnp.float64) for k, x in zip(keys, leaves, strict=True)]
        )
        eps = 1e-5
        shift = lambda sign: jax.tree.map(lambda p, d: p + sign * eps * d, params, direction)
        central = (plain(shift(1.0))[0][0] - plain(shift(-1.0))[0][0]) / (2 * eps)
        assert bool(float64)  # the window ran in float64
        assert abs(float(central)) > 1e-3  # a gradient worth checking
        np.testing.assert_allclose(_dot(grad, direction), central, rtol=1e-6)
        _, remat = _window_gradient(reacher, policy, state, key, horizon=8, remat=True)
        (value_r, _), grad_r = remat(params)
        np.testing.assert_allclose(value_r, value, rtol=1e-12)
        assert max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(grad)) > 1e-6
        for a, b in zip(jax.tree.leaves(grad_r), jax.tree.leaves(grad), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-12)


# --------------------------------------------------------------------------- remat


class _SubsteppedReach(Reach):
    """Reach integrated in 16 substeps, each with a 64-wide nonlinear drag: like a physics
    engine, one env step computes many intermediates, which reverse mode keeps unless the
    step is rematerialised."""

    def dynamics(self, s, action):
        basis = jnp.linspace(-1.0, 1.0, 128).reshape(64, 2)
        for _ in range(16):
            s = super().dynamics(s, action)
            s = {**s, "vel": s["vel"] - 1e-3 * basis.T @ jnp.tanh(basis @ s["vel"])}
        return s


def test_remat_gives_the_same_gradient_in_less_memory(key):
    env = AutoResetEnv(_SubsteppedReach(), 100, name="substepped_reach")
    policy = deterministic(env, hidden=(16,))
    state = diffsim.reset(env, key=key, num_envs=8)
    params, static = _params(policy)

    def gradient(remat: bool):
        apg = diffsim.APG(num_envs=8, horizon=64, options=diffsim.WindowOptions(remat=remat))
        return jax.jit(jax.grad(lambda p: apg.loss(env, eqx.combine(p, static), state, key=key)[0]))

    plain, remat = gradient(False), gradient(True)
    for a, b in zip(jax.tree.leaves(plain(params)), jax.tree.leaves(remat(params)), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-8)
    memory = lambda f: f.lower(params).compile().memory_analysis().temp_size_in_bytes
    assert memory(remat) < 0.8 * memory(plain)
    # The window's env is wrapped; everything but `step` is the env's own.
    wrapped = window_env.Rematerialized(env)
    assert (wrapped.episode_length, wrapped.name, wrapped.observation_size) == (
        100,
        "substepped_reach",
        env.observation_size,
    )


# --------------------------------------------------------------------------- SHAC as published


def test_elu_networks_by_name_and_saved_runs_keep_them(key, tmp_path):
    mlp = diffsim.MLP(3, 2, hidden=(5,), activation="elu", key=key)
    assert mlp.activation is jax.nn.elu
    x = jnp.array([0.5, -2.0, 1.0])
    first, last = mlp.layers
    np.testing.assert_allclose(mlp(x), last(jax.nn.elu(first(x))), rtol=1e-6)
    assert diffsim.MLP(3, 2, key=key).activation is diffsim.policies.tanh  # the default
    with pytest.raises(ValueError, match="unknown activation 'elo'"):
        diffsim.MLP(3, 2, activation="elo", key=key)

    policy = diffsim.GaussianPolicy(3, 2, hidden=(4, 4), activation="elu", key=key)
    value = diffsim.ValueFunction(3, hidden=(4,), activation="relu", key=key)
    assert diffsim.DeterministicPolicy(3, 2, activation="elu", key=key).net.activation is (
        jax.nn.elu
    )
    curve = LearningCurve(
        env_steps=jnp.array([0, 10]), wall_time=jnp.zeros(2), eval_return=jnp.ones((2, 3))
    )
    for module in (policy, value):
        Run(policy=module, curve=curve, metrics={}, config={"env": "reach"}).save(tmp_path)
        back = diffsim.load_run(tmp_path).policy
        assert back.net.activation is module.net.activation
        np.testing.assert_array_equal(back(x), module(x))


def test_shac_stochastic_actor_learns_its_std(key):
    env = diffsim.make_env("reach")
    policy = gaussian(env, hidden=(16,), activation="elu")
    state = diffsim.reset(env, key=key, num_envs=8)
    params, static = _params(policy)

    def log_std_grad(stochastic: bool):
        shac = diffsim.SHAC(num_envs=8, horizon=10, stochastic=stochastic, value_hidden=(8,))
        critic = diffsim.ValueFunction(env.observation_size, hidden=(8,), key=jr.key(2))
        loss = lambda p: shac.loss(env, eqx.combine(p, static), critic, state, key=key)[0]
        return jax.grad(loss)(params).log_std

    assert float(jnp.abs(log_std_grad(True)).min()) > 0  # reparameterised: the std learns
    np.testing.assert_array_equal(log_std_grad(False), 0.0)  # the mean action ignores it

    shac = diffsim.SHAC(
        num_envs=8,
        horizon=10,
        stochastic=True,
        value_hidden=(8,),
        value_activation="elu",
        critic_minibatches=2,
    )
    start = shac.init(env, policy, key=key)
    assert start.value.net.activation is jax.nn.elu
    new, metrics = jax.jit(lambda s: shac.step(env, s, key=key))(start)
    assert float(metrics["skipped_updates"]) == 0.0 and np.isfinite(float(metrics["loss"]))
    assert not np.allclose(new.policy.log_std, policy.log_std)


# --------------------------------------------------------------------------- learning-rate decay


def test_apg_learning_rate_decays_linearly_over_the_budget(key, envs):
    env = envs("reach")
    policy = deterministic(env, hidden=(16,))
    base = diffsim.APG(num_envs=4, horizon=10)
    assert base.for_budget(10**6) is base  # off by default
    decaying = diffsim.APG(num_envs=4, horizon=10, lr_decay=True).for_budget(80)
    assert decaying.lr_decay_steps == 80  # train sets the run's budget: 2 updates here
    assert decaying.for_budget(10**6) is decaying  # a set length stays

    def deltas(strategy):
        state = strategy.init(env, policy, key=key)
        step = jax.jit(lambda s, k: strategy.step(env, s, key=k))
        out = []
        for k in jr.split(key, 2):
            new, _ = step(state, k)
            before, after = _params(state.policy)[0], _params(new.policy)[0]
            out.append(jax.tree.map(lambda a, b: a - b, after, before))
            state = new
        return out

    (const_1, const_2), (decay_1, decay_2) = deltas(base), deltas(decaying)
    leaves = map(jax.tree.leaves, (const_1, decay_1, const_2, decay_2))
    for c1, d1, c2, d2 in zip(*leaves, strict=True):
        # update 0: the full rate (a traced schedule's product rounds as XLA fuses it)
        np.testing.assert_allclose(d1, c1, rtol=1e-6, atol=1e-12)
        np.testing.assert_allclose(d2, 0.5 * c2, rtol=1e-3, atol=1e-9)  # update 1 of 2: half
    assert optax.tree.norm(const_2) > 0


def test_shac_decays_actor_and_critic_per_update(key, envs):
    """`lr_decay_steps` env steps are converted to each optimiser's updates: one actor update
    and `critic_epochs * critic_minibatches` critic updates per iteration."""
    env = envs("reach")
    policy = deterministic(env, hidden=(16,))
    common = dict(num_envs=4, horizon=10, value_hidden=(8,), critic_epochs=2, critic_minibatches=2)
    decaying = diffsim.SHAC(lr_decay=True, lr_decay_steps=3 * 40, **common)
    by_hand = diffsim.SHAC(
        actor_learning_rate=optax.linear_schedule(2e-3, 0.0, 3),
        critic_learning_rate=optax.linear_schedule(1e-3, 0.0, 3 * 4),
        **common,
    )
    assert by_hand.for_budget(10**6) is by_hand
    # Control: a critic decayed over 3 updates (the iterations, not its updates) differs.
    per_iteration = diffsim.SHAC(
        actor_learning_rate=optax.linear_schedule(2e-3, 0.0, 3),
        critic_learning_rate=optax.linear_schedule(1e-3, 0.0, 3),
        **common,
    )
    states = []
    for shac in (decaying, by_hand, per_iteration):
        state = shac.init(env, policy, key=key)
        step = jax.jit(lambda s, k, shac=shac: shac.step(env, s, key=k))
        for k in jr.split(key, 2):
            state, _ = step(state, k)
        states.append(eqx.filter((state.policy, state.value), eqx.is_inexact_array))
    for a, b in zip(*map(jax.tree.leaves, states[:2]), strict=True):
        np.testing.assert_array_equal(a, b)
    value_leaves = [jax.tree.leaves(value) for _, value in (states[0], states[2])]
    assert not all(np.array_equal(a, b) for a, b in zip(*value_leaves, strict=True))


# --------------------------------------------------------------------------- bad input


class _Float32Reach(Reach):
    """Reach whose dynamics insist on float32: float64 cannot apply to it."""

    def dynamics(self, s, action):
        return jax.tree.map(lambda x: x.astype(jnp.float32), super().dynamics(s, action))


@pytest.mark.parametrize(
    "make",
    [
        lambda: diffsim.APG(num_envs=4, horizon=10),
        lambda: diffsim.SHAC(num_envs=4, horizon=10),
        lambda: diffsim.GuidedES(
            population_size=4, gradient=APGWindow(num_envs=2, horizon=10), rollout_length=20
        ),
    ],
    ids=["APG", "SHAC", "GuidedES"],
)
def test_rejects_a_backend_it_cannot_differentiate(make, key):
    env = diffsim.make_env("reacher", backend="mjx", episode_length=20)
    policy = deterministic(env)
    with pytest.raises(ValueError, match="'mjx' backend, whose constraint solver runs in a lax"):
        diffsim.train(make(), env, policy, key=key, total_steps=1000, progress=False)


@pytest.mark.parametrize(
    "strategy, message",
    [
        (diffsim.APG(horizon=101), r"horizon=101 \(the gradient window\) exceeds the episode"),
        (diffsim.SHAC(horizon=128), r"horizon=128 .* pass SHAC\(horizon=100\) or less"),
        (diffsim.APG(horizon=1, options=REMAT), "remat=True with horizon=1"),
        (
            diffsim.GuidedES(gradient=APGWindow(horizon=1, options=REMAT)),
            r"pass APGWindow\(options=WindowOptions\(remat=False\)\)",
        ),
        (diffsim.SHAC(options=FLOAT64), "float64=True needs 64-bit JAX"),
    ],
)
def test_rejects_windows_that_cannot_apply(strategy, message, key, envs):
    env = envs("reach")
    with pytest.raises(ValueError, match=message):
        diffsim.train(strategy, env, deterministic(env), key=key, total_steps=10**5)


def test_rejects_float64_on_an_env_that_stays_float32(key):
    env = AutoResetEnv(_Float32Reach(), 100, name="float32_reach")
    policy = deterministic(env)
    with jax.enable_x64(True):
        with pytest.raises(ValueError, match="float64=True cannot apply to env 'float32_reach'"):
            diffsim.APG(options=FLOAT64).check(env, policy)
        diffsim.APG(options=FLOAT64).check(diffsim.make_env("reach"), policy)  # a float64 toy env


@pytest.mark.parametrize(
    "make, bad",
    [
        (lambda: diffsim.SHAC(lr_decay_steps=0), "lr_decay_steps must be a positive int, got 0"),
        (lambda: diffsim.SHAC(value_activation="elo"), "value_activation must be one of"),
        (
            lambda: diffsim.SHAC(
                lr_decay=True, lr_decay_steps=100, actor_learning_rate=optax.constant_schedule(0.1)
            ),
            "lr_decay_steps needs a float actor_learning_rate",
        ),
    ],
)
def test_rejects_bad_hyperparameters(make, bad):
    with pytest.raises(ValueError, match=bad):
        make()


def test_gait_stats_on_reacher(key):
    """Reacher never terminates: every episode runs its full length, the fingertip ends a
    finite distance from the target, and the body statistics do not apply (NaN)."""
    env = diffsim.make_env("reacher", episode_length=40)
    stats = diffsim.diagnostics.gait_stats(env, deterministic(env), key=key, num_envs=4)
    assert set(stats) == set(diffsim.diagnostics.GAIT_FIELDS)
    assert float(stats["episode_length"]) == 40.0
    assert 0.0 < float(stats["final_distance"]) < 0.5  # the arena is 0.4 m across
    assert -40.0 < float(stats["return"]) < 0.0  # -distance - control cost per step
    for name in ("forward_velocity", "torso_height", "upright_fraction"):
        assert jnp.isnan(stats[name]), name


def test_gait_stats_rejects_an_env_it_cannot_read(key, envs):
    with pytest.raises(ValueError, match="gait_stats knows the bodies .* got env 'pendulum'"):
        diffsim.diagnostics.gait_stats(envs("pendulum"), deterministic(envs("pendulum")), key=key)
    reacher, policy = envs("reacher"), deterministic(envs("reacher"))
    with pytest.raises(ValueError, match="num_envs must be a positive int, got 0"):
        diffsim.diagnostics.gait_stats(reacher, policy, key=key, num_envs=0)
    with pytest.raises(ValueError, match="layout field 'speed' is not one of"):
        diffsim.diagnostics.gait_stats(reacher, policy, key=key, layout={"speed": 0})
    with pytest.raises(
        ValueError, match=r"layout\['quaternion'\] must be .* 4 number.* of 11, got 8"
    ):
        diffsim.diagnostics.gait_stats(reacher, policy, key=key, layout={"quaternion": 8})


def test_gait_stats_reads_a_users_env_from_its_layout(key, envs):
    """pendulum's observation is (cos, sin, angular velocity): read cos as a 'height' and
    the angular velocity as a 'velocity', the statistics are those numbers' means."""
    env, policy = envs("pendulum"), deterministic(envs("pendulum"))
    stats = diffsim.diagnostics.gait_stats(
        env, policy, key=key, num_envs=2, layout={"height": 0, "velocity": 2}
    )
    env_state, act_key = from_resets(env, key, 2)
    _, traj = rollout(
        env, policy, env_state, key=act_key, length=env.episode_length, deterministic=True
    )
    assert not traj.done[:-1].any()  # one whole episode per env
    np.testing.assert_allclose(stats["torso_height"], traj.obs[..., 0].mean(), rtol=1e-5)
    np.testing.assert_allclose(stats["forward_velocity"], traj.obs[..., 2].mean(), rtol=1e-5)
    assert jnp.isnan(stats["upright_fraction"]) and jnp.isnan(stats["final_distance"])
