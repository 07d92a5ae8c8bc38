import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest
from conftest import deterministic, gaussian

import diffsim
from diffsim.envs import AutoResetEnv, Reach
from diffsim.results import hyperparameters
from diffsim.rollout import default_pool_size
from diffsim.strategies._window import window as windows
from diffsim.strategies._window.gradient import window_gradient

MASKED = diffsim.UpdateOptions(mask_nonfinite_envs=True)


class _DivergingReach(Reach):
    """Reach that blows up (NaN state and NaN derivatives, as a simulator can) at the 5th
    step of every episode whose target lies right of x = `right_of`; otherwise exactly
    Reach."""

    right_of = 0.0

    def init(self, key):
        return {**super().init(key), "t": jnp.zeros(())}

    def dynamics(self, s, action):
        new = super().dynamics(s, action)
        t = s["t"] + 1.0
        blow_up = (t >= 5) & (s["target"][0] > self.right_of)
        root = jnp.sqrt(jnp.where(blow_up, -1.0, 1.0) + 0.0 * new["pos"][0])  # 1, or NaN
        return {**new, "pos": new["pos"] * root, "t": t}


class _AlwaysDivergingReach(_DivergingReach):
    right_of = -2.0  # every episode blows up at its 5th step


class _TerminatingReach(Reach):
    """Reach that terminates (not a time limit) when the point crosses x = 0.3."""

    def step(self, state, action):
        state = super().step(state, action)
        return state.replace(done=jnp.asarray(state.pipeline_state["pos"][0] > 0.3, dtype=float))


def _params(policy):
    return eqx.partition(policy, diffsim.trainable(policy))


def _pooled(env, state, horizon):
    """The starts `rollout` draws for a window of `horizon` steps."""
    return jax.vmap(env.starts, in_axes=(0, None))(state, default_pool_size(horizon))


def _unrolled_apg_loss(params, static, env, state, horizon):
    """The APG window loss written out: vmap(env.step) in a Python loop."""
    policy = eqx.combine(params, static)
    state, starts = _pooled(env, state, horizon)
    total = 0.0
    for _ in range(horizon):
        state = jax.vmap(env.step)(state, jax.vmap(policy)(state.obs), starts)
        total = total + jnp.sum(state.reward)
    return -total / (horizon * state.reward.shape[0])


def _unrolled_shac_loss(params, static, critic, env, state, horizon, gamma):
    """SHAC's actor loss as in Xu et al.'s reference code (rew_acc, gamma reset at done)."""
    policy = eqx.combine(params, static)
    num_envs = state.reward.shape[0]
    rew_acc, disc, loss = jnp.zeros(num_envs), jnp.ones(num_envs), 0.0
    state, starts = _pooled(env, state, horizon)
    for t in range(horizon):
        state = jax.vmap(env.step)(state, jax.vmap(policy)(state.obs), starts)
        done, trunc = state.done, state.info["truncation"]
        next_value = jax.vmap(critic)(state.info["final_obs"]) * (1.0 - done * (1.0 - trunc))
        rew_acc = rew_acc + disc * state.reward
        closes = jnp.ones(num_envs) if t == horizon - 1 else done
        loss = loss - jnp.sum(closes * (rew_acc + gamma * disc * next_value))
        disc = jnp.where(done > 0, 1.0, disc * gamma)
        rew_acc = jnp.where(done > 0, 0.0, rew_acc)
    return loss / (horizon * num_envs)


def test_apg_gradient_equals_hand_unrolled_loss(key):
    env = diffsim.make_env("pendulum", episode_length=15)  # the window crosses a reset
    apg = diffsim.APG(num_envs=3, horizon=20)
    policy = deterministic(env, hidden=(16,))
    state = diffsim.reset(env, key=key, num_envs=3)
    params, static = _params(policy)
    loss_fn = lambda p: apg.loss(env, eqx.combine(p, static), state, key=key)[0]
    loss, grads = jax.value_and_grad(loss_fn)(params)
    ref_loss, ref_grads = jax.value_and_grad(_unrolled_apg_loss)(params, static, env, state, 20)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads), strict=True):
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-7)
    assert optax_norm(grads) > 0


def optax_norm(tree):
    return float(jnp.sqrt(sum(jnp.sum(x**2) for x in jax.tree.leaves(tree))))


def test_shac_loss_bootstraps_like_the_reference(key):
    env = AutoResetEnv(_TerminatingReach(), 6, name="terminating_reach")
    shac = diffsim.SHAC(num_envs=4, horizon=16, discount=0.9, critic_minibatches=1)
    policy = deterministic(env, hidden=(16,))
    critic = diffsim.ValueFunction(env.observation_size, hidden=(8,), key=jr.key(7))
    state = diffsim.reset(env, key=key, num_envs=4)
    params, static = _params(policy)
    loss_fn = lambda p: shac.loss(env, eqx.combine(p, static), critic, state, key=key)
    (loss, window), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    traj = window.traj
    terminated = traj.done * (1 - traj.truncation)
    assert terminated.sum() > 0 and traj.truncation.sum() > 0  # both kinds of episode end
    ref_loss, ref_grads = jax.value_and_grad(_unrolled_shac_loss)(
        params, static, critic, env, state, 16, 0.9
    )
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads), strict=True):
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-7)


def test_gradient_is_cut_at_the_window_boundary(key):
    env = diffsim.make_env("reach")
    policy = deterministic(env)
    critic = diffsim.ValueFunction(env.observation_size, key=jr.key(3))
    state = diffsim.reset(env, key=key, num_envs=4)
    apg, shac = diffsim.APG(num_envs=4, horizon=10), diffsim.SHAC(num_envs=4, horizon=10)
    to_state = {
        "apg": lambda s: apg.loss(env, policy, s, key=key)[0],
        "shac": lambda s: shac.loss(env, policy, critic, s, key=key)[0],
        # Control: the same window without the cut does depend on its start state.
        "uncut": lambda s: (
            -jnp.mean(
                diffsim.rollout(env, policy, s, key=key, length=10, deterministic=True)[1].reward
            )
        ),
    }
    grads = {name: eqx.filter_grad(f)(state) for name, f in to_state.items()}
    for name in ("apg", "shac"):
        for leaf in jax.tree.leaves(eqx.filter(grads[name], eqx.is_inexact_array)):
            np.testing.assert_array_equal(leaf, 0.0)
    assert jnp.abs(grads["uncut"].pipeline_state["pos"]).sum() > 0
    # Nor do SHAC's actor gradients reach the critic's parameters.
    critic_grads = eqx.filter_grad(lambda c: shac.loss(env, policy, c, state, key=key)[0])(critic)
    for leaf in jax.tree.leaves(critic_grads):
        np.testing.assert_array_equal(leaf, 0.0)


def test_staggered_starts_and_full_episode_windows(key, envs):
    env = envs("reach", episode_length=20)
    policy = deterministic(env)
    staggered = diffsim.APG(num_envs=16, horizon=5).init(env, policy, key=key)
    assert len(np.unique(staggered.env_state.info["steps"])) > 5
    full = diffsim.APG(num_envs=4, horizon=20)
    state = full.init(env, policy, key=key)
    np.testing.assert_array_equal(state.env_state.info["steps"], 0)
    _, window = full.loss(env, policy, state.env_state, key=key)
    np.testing.assert_array_equal(window.traj.done[-1], 1.0)  # each window is one episode
    np.testing.assert_array_equal(window.traj.done[:-1], 0.0)
    assert full.steps_per_iteration == 80


@pytest.mark.parametrize(
    "strategy", [diffsim.APG(num_envs=8, horizon=10), diffsim.SHAC(num_envs=8, horizon=10)]
)
def test_nan_guard_skips_updates(key, strategy):
    env = AutoResetEnv(_AlwaysDivergingReach(), 100, name="always_diverging_reach")
    policy = deterministic(env)
    state = strategy.init(env, policy, key=key)
    step = jax.jit(lambda s, k: strategy.step(env, s, key=k))
    skipped = 0.0
    for k in jr.split(key, 3):
        state, metrics = step(state, k)
        skipped += float(metrics["skipped_updates"])
    assert skipped == 3.0
    assert not np.isfinite(float(metrics["grad_norm"]))
    assert float(metrics["masked_envs"]) == 0.0  # masking is off by default
    before, after = _params(policy)[0], _params(strategy.policy(state))[0]
    for b, a in zip(jax.tree.leaves(before), jax.tree.leaves(after), strict=True):
        assert jnp.all(jnp.isfinite(a))
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(strategy.policy(state).norm.count, 0.0)  # stats untouched
    if isinstance(strategy, diffsim.SHAC):
        assert all(
            jnp.all(jnp.isfinite(x))
            for x in jax.tree.leaves(eqx.filter(state.value, eqx.is_inexact_array))
        )


# Budgets and thresholds from measurements (seed 0): reach, still policy ~ -100, good ~ -10;
# pendulum, untrained ~ -120, swung up ~ 150.
@pytest.mark.parametrize(
    "name, strategy, make_policy, total_steps, threshold",
    [
        ("reach", diffsim.APG(), deterministic, 100_000, -30.0),  # measured -11.8
        ("reach", diffsim.APG(stochastic=True), gaussian, 100_000, -30.0),  # -10.8
        ("pendulum", diffsim.APG(), deterministic, 400_000, 100.0),  # 153.9
        ("reach", diffsim.SHAC(), deterministic, 100_000, -50.0),  # -19.5
    ],
    ids=["reach-apg-deterministic", "reach-apg-gaussian", "pendulum-apg", "reach-shac"],
)
def test_solves_toy_envs(key, envs, name, strategy, make_policy, total_steps, threshold):
    env = envs(name)
    run = diffsim.train(
        strategy,
        env,
        make_policy(env),
        key=key,
        total_steps=total_steps,
        num_evals=3,
        progress=False,
    )
    returns = run.curve.eval_return.mean(-1)
    assert float(returns[-1]) > threshold, returns
    assert float(returns[-1]) > float(returns[0]) + 30
    assert float(run.metrics["skipped_updates"][-1]) == 0.0
    assert np.all(np.isfinite(run.metrics["grad_norm"]))


@pytest.mark.parametrize(
    "make, bad",
    [
        (lambda: diffsim.APG(horizon=0), "0"),
        (lambda: diffsim.APG(learning_rate=-1.0), "-1.0"),
        (lambda: diffsim.APG(max_grad_norm=0.0), "0.0"),
        (lambda: diffsim.UpdateOptions(max_grad_value=-3.0), "-3.0"),
        (lambda: diffsim.UpdateOptions(adam_b1=1.5), "1.5"),
        (lambda: diffsim.SHAC(discount=0.0), "0.0"),
        (lambda: diffsim.SHAC(target_alpha=1.5), "1.5"),
        (lambda: diffsim.SHAC(critic_minibatches=3), "3"),
        (lambda: diffsim.SHAC(critic_learning_rate=0.0), "0.0"),
    ],
)
def test_rejects_bad_hyperparameters(make, bad):
    with pytest.raises(ValueError, match=bad):
        make()


def test_hyperparameters_flatten_the_settings_modules():
    """A study's key lists `options`' and `update`'s fields under their own names, as when
    the strategies declared them, and GuidedES's gradient as the repr it had then."""
    hyper = hyperparameters(diffsim.SHAC(update=MASKED))
    assert hyper["remat"] is False and hyper["adam_b1"] == 0.7
    assert hyper["mask_nonfinite_envs"] is True
    assert "options" not in hyper and "update" not in hyper
    remat = diffsim.APGWindow(num_envs=64, horizon=8, options=diffsim.WindowOptions(remat=True))
    gradient = hyperparameters(diffsim.GuidedES(gradient=remat))["gradient"]
    assert gradient == "APGWindow(num_envs=64, horizon=8, remat=True)"
    assert hyperparameters(diffsim.GuidedES())["gradient"] == "APGWindow()"


def test_train_rejects_before_compiling(key, envs):
    env = envs("reach")

    class NoKey(eqx.Module):
        inner: eqx.Module

        def __call__(self, obs):
            return self.inner(obs)

    with pytest.raises(ValueError, match="float64"):
        diffsim.train(
            diffsim.APG(options=diffsim.WindowOptions(float64=True)),
            env,
            deterministic(env),
            key=key,
            total_steps=10**5,
        )
    with pytest.raises(ValueError, match="NoKey"):
        diffsim.train(
            diffsim.SHAC(stochastic=True),
            env,
            NoKey(deterministic(env)),
            key=key,
            total_steps=10**5,
        )


def test_float64_window(key):
    env = diffsim.make_env("pendulum")
    policy = deterministic(env, hidden=(16,))
    state = diffsim.reset(env, key=key, num_envs=2)  # float32, made before x64 is on
    params, static = _params(policy)
    with jax.enable_x64(True):
        apg = diffsim.APG(num_envs=2, horizon=30, options=diffsim.WindowOptions(float64=True))
        (loss, window), grads = jax.value_and_grad(
            lambda p: apg.loss(env, eqx.combine(p, static), state, key=key), has_aux=True
        )(params)
        assert loss.dtype == jnp.float64 and window.traj.reward.dtype == jnp.float64
        assert window.env_state.obs.dtype == jnp.float32  # the carried state keeps its dtype
        assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(grads))
        to64 = lambda t: jax.tree.map(
            lambda x: x.astype(jnp.float64) if eqx.is_inexact_array(x) else x, t
        )
        ref = _unrolled_apg_loss(to64(params), static, env, to64(state), 30)
        np.testing.assert_allclose(loss, ref, rtol=1e-12)
        new, metrics = jax.jit(lambda s: apg.step(env, s, key=key))(apg.init(env, policy, key=key))
        assert np.isfinite(float(metrics["grad_norm"]))
        assert all(
            x.dtype == jnp.float32
            for x in jax.tree.leaves(eqx.filter(new.policy, eqx.is_inexact_array))
        )
    with pytest.raises(ValueError, match="float64"):
        apg.loss(env, policy, state, key=key)


def test_gradient_diagnostics_agree_on_a_smooth_task(key):
    env = diffsim.make_env("reach")
    policy = deterministic(env, hidden=(8,))
    stats = diffsim.diagnostics.gradient_stats(
        env, policy, key=key, horizons=[2, 10, 40], num_samples=16, num_perturbations=64, sigma=0.01
    )
    np.testing.assert_array_equal(stats.horizons, [2, 10, 40])
    assert stats.first_order_mean.shape == stats.zeroth_order_mean.shape == (3, 74)
    assert np.all(np.asarray(stats.cosine) > 0.8), stats.cosine
    assert np.all(np.asarray(stats.first_order_var) < np.asarray(stats.zeroth_order_var))
    # The first-order mean is the gradient of the mean H-step return.
    params, static = _params(policy)
    flat, unravel = jax.flatten_util.ravel_pytree(params)
    keys = jr.split(key, 16)

    def mean_return(flat):
        def one(k):
            reset_key, act_key, _ = jr.split(k, 3)
            s = diffsim.reset(env, key=reset_key, num_envs=1)
            pol = eqx.combine(unravel(flat), static)
            return jnp.sum(
                diffsim.rollout(env, pol, s, key=act_key, length=10, deterministic=True)[1].reward
            )

        return jnp.mean(jax.vmap(one)(keys))

    np.testing.assert_allclose(
        stats.first_order_mean[1], jax.grad(mean_return)(flat), rtol=1e-4, atol=1e-6
    )


# --------------------------------------------------------------------------- per-env masking


def _one_diverging_env(env, key, num_envs):
    """A batch of fresh envs where only env 0 blows up, 2 steps into the window."""
    state = diffsim.reset(env, key=key, num_envs=num_envs)
    phys = dict(state.pipeline_state)
    target_x = -jnp.abs(phys["target"][:, 0]) - 0.1  # left of 0: never blows up
    phys["target"] = phys["target"].at[:, 0].set(target_x.at[0].set(0.5))
    phys["t"] = phys["t"].at[0].set(3.0)
    obs = jax.vmap(env.unwrapped.observe)(phys)
    return state.replace(pipeline_state=phys, obs=obs, info={**state.info, "final_obs": obs})


@pytest.mark.parametrize("name", ["apg", "shac"])
def test_masked_env_drops_out_and_the_others_update(key, name):
    env = AutoResetEnv(_DivergingReach(), 100, name="diverging_reach")
    policy = deterministic(env, hidden=(16,))
    state = _one_diverging_env(env, key, 6)
    if name == "apg":
        strategy = diffsim.APG(num_envs=6, horizon=10, update=MASKED)
        losses = lambda pol, s, k: strategy.env_losses(env, pol, s, key=k)
    else:
        strategy = diffsim.SHAC(
            num_envs=6,
            horizon=10,
            value_hidden=(8,),
            critic_minibatches=2,
            update=MASKED,
        )
        critic = strategy.init(env, policy, key=key).target_value
        losses = lambda pol, s, k: strategy.env_losses(env, pol, critic, s, key=k)
    params, static = _params(policy)
    masked = window_gradient(losses, params, static, state, key=key, per_env=True)
    np.testing.assert_array_equal(masked.kept, [False, True, True, True, True, True])
    assert bool(masked.ok) and float(masked.masked_envs) == 1.0
    # The same envs without env 0, differentiated as one batch: the same loss and gradient.
    rest = jax.tree.map(lambda x: x[1:], state)
    ref_loss, ref_grads = jax.value_and_grad(
        lambda p: jnp.mean(losses(eqx.combine(p, static), rest, key)[0])
    )(params)
    np.testing.assert_allclose(masked.loss, ref_loss, rtol=1e-5)
    for g, r in zip(jax.tree.leaves(masked.grads), jax.tree.leaves(ref_grads), strict=True):
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-7)
    assert optax_norm(ref_grads) > 0
    # Control: differentiated as one batch, env 0's NaN reaches every parameter.
    batched = window_gradient(losses, params, static, state, key=key, per_env=False)
    assert not bool(batched.ok)

    # A whole step: not skipped, finite, the parameters move, env 0 counted.
    start = eqx.tree_at(lambda s: s.env_state, strategy.init(env, policy, key=key), state)
    new, metrics = jax.jit(lambda s: strategy.step(env, s, key=key))(start)
    assert float(metrics["skipped_updates"]) == 0.0 and float(metrics["masked_envs"]) == 1.0
    assert np.isfinite(float(metrics["grad_norm"])) and np.isfinite(float(metrics["loss"]))
    after = _params(strategy.policy(new))[0]
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(after))
    assert not np.allclose(after.net.layers[0].weight, params.net.layers[0].weight)
    assert float(strategy.policy(new).norm.count) == 5 * 10  # statistics of the kept envs


def test_shac_bootstrap_of_a_terminated_step_is_exactly_zero():
    """A terminated step's next observation may be non-finite (a diverged simulator): it must
    reach neither the loss nor its gradient, where a `0 * V(NaN)` product would."""
    horizon, num_envs, size = 4, 3, 2
    critic = diffsim.ValueFunction(size, hidden=(8,), key=jr.key(0))
    next_obs = jnp.ones((horizon, num_envs, size)).at[1, 0].set(jnp.nan)
    done = jnp.zeros((horizon, num_envs)).at[1, 0].set(1.0)
    zeros = jnp.zeros((horizon, num_envs))
    traj = diffsim.Trajectory(
        obs=jnp.ones((horizon, num_envs, size)),
        action=jnp.zeros((horizon, num_envs, 1)),
        reward=jnp.ones((horizon, num_envs)),
        done=done,
        truncation=zeros,
        next_obs=next_obs,
        log_prob=zeros,
        extras={},
    )

    def loss(reward, next_obs):
        t = eqx.tree_at(lambda t: (t.reward, t.next_obs), traj, (reward, next_obs))
        return jnp.sum(windows.shac_loss(t, critic, discount=0.9))

    value, (g_reward, g_obs) = jax.value_and_grad(loss, argnums=(0, 1))(traj.reward, next_obs)
    assert np.isfinite(float(value))
    assert np.all(np.isfinite(g_reward)) and np.all(np.isfinite(g_obs))
    np.testing.assert_array_equal(g_obs[1, 0], 0.0)
    # Env 0: the segment ending at the termination earns 1 + 0.9 (no bootstrap); the next
    # one, 2 rewards and the critic at its end. Per env, the sum is divided by the horizon.
    v_end = critic(next_obs[-1, 0])
    expected = -(1.0 + 0.9 + (1.0 + 0.9 + 0.81 * v_end)) / horizon
    np.testing.assert_allclose(
        windows.shac_loss(traj, critic, discount=0.9)[0], expected, rtol=1e-6
    )
