import equinox as eqx
import jax
import jax.flatten_util
import jax.numpy as jnp
import jax.random as jr
import numpy as np
from conftest import deterministic, gaussian

import diffsim
from diffsim.rollout import episode_returns


def test_shapes_and_log_probs(key):
    env = diffsim.make_env("reach")
    policy = gaussian(env)
    state = diffsim.reset(env, key=key, num_envs=5)
    state, traj = jax.jit(lambda s: diffsim.rollout(env, policy, s, key=key, length=11))(state)
    assert traj.obs.shape == traj.next_obs.shape == (11, 5, 6)
    assert traj.action.shape == (11, 5, 2)
    for x in (
        traj.reward,
        traj.done,
        traj.truncation,
        traj.log_prob,
        traj.extras["episode_return"],
    ):
        assert x.shape == (11, 5)
    assert state.obs.shape == (5, 6)
    # log_prob is the policy's density of the recorded action.
    expected = jax.vmap(jax.vmap(policy.log_prob))(traj.obs, traj.action)
    np.testing.assert_allclose(traj.log_prob, expected, rtol=1e-5)
    # Consecutive steps chain: the next step starts where the last one ended.
    np.testing.assert_array_equal(traj.obs[1:], traj.next_obs[:-1])


def test_matches_a_hand_written_loop(key):
    env = diffsim.make_env("pendulum")
    policy = deterministic(env)
    state = diffsim.reset(env, key=key, num_envs=3)
    _, traj = diffsim.rollout(env, policy, state, key=key, length=20, deterministic=True)
    rewards = []
    for _ in range(20):
        action = jax.vmap(policy)(state.obs)
        state = jax.vmap(env.step)(state, action)
        rewards.append(state.reward)
    np.testing.assert_allclose(traj.reward, jnp.stack(rewards), rtol=1e-5)


def _summed_reward(env, policy, state, key, length):
    _, traj = diffsim.rollout(env, policy, state, key=key, length=length)
    return jnp.sum(traj.reward)


def test_gradients_flow_to_every_layer(key):
    env = diffsim.make_env("reach")
    policy = gaussian(env)
    state = diffsim.reset(env, key=key, num_envs=4)
    grads = eqx.filter_grad(lambda p: _summed_reward(env, p, state, key, 30))(policy)
    for layer in grads.net.layers:
        assert jnp.all(jnp.isfinite(layer.weight)) and jnp.abs(layer.weight).sum() > 0
    assert jnp.abs(grads.log_std).sum() > 0  # reparameterised sampling


def test_gradient_matches_central_finite_differences_float64(key):
    with jax.enable_x64(True):
        env = diffsim.make_env("pendulum")
        policy = deterministic(env, key=jr.key(2), hidden=(16,))
        policy = jax.tree.map(
            lambda x: x.astype(jnp.float64) if eqx.is_inexact_array(x) else x, policy
        )
        state = diffsim.reset(env, key=key, num_envs=2)
        state = jax.tree.map(
            lambda x: x.astype(jnp.float64) if eqx.is_inexact_array(x) else x, state
        )
        params, static = eqx.partition(policy, diffsim.trainable(policy))
        flat, unflatten = jax.flatten_util.ravel_pytree(params)
        loss = jax.jit(
            lambda f: _summed_reward(env, eqx.combine(unflatten(f), static), state, key, 40)
        )
        grad = jax.grad(loss)(flat)
        directions = jr.normal(jr.key(5), (4, flat.size), jnp.float64)
        eps = 1e-6
        for d in directions:
            d = d / jnp.linalg.norm(d)
            fd = (loss(flat + eps * d) - loss(flat - eps * d)) / (2 * eps)
            np.testing.assert_allclose(grad @ d, fd, rtol=1e-4)


def test_gradient_stops_at_auto_reset(key):
    # Ten-step episodes: the reward after the reset cannot depend on the state before it.
    env = diffsim.make_env("reach", episode_length=10)
    policy = deterministic(env)
    state = diffsim.reset(env, key=key, num_envs=2)

    def later_reward(pos_shift):
        shifted = state.replace(
            pipeline_state={**state.pipeline_state, "pos": state.pipeline_state["pos"] + pos_shift}
        )
        _, traj = diffsim.rollout(env, policy, shifted, key=key, length=15, deterministic=True)
        return jnp.sum(traj.reward[10:]), jnp.sum(traj.reward[:10])

    after = jax.grad(lambda s: later_reward(s)[0])(jnp.zeros(2))
    before = jax.grad(lambda s: later_reward(s)[1])(jnp.zeros(2))
    np.testing.assert_array_equal(after, 0.0)
    assert jnp.abs(before).sum() > 0


def test_evaluate_scores_first_episode_only(key):
    env = diffsim.make_env("reach", episode_length=10)
    policy = deterministic(env)
    returns = diffsim.evaluate(env, policy, key=key, num_episodes=4)
    reset_key, act_key = jr.split(key)
    state = diffsim.reset(env, key=reset_key, num_envs=4)
    _, traj = diffsim.rollout(env, policy, state, key=act_key, length=25, deterministic=True)
    np.testing.assert_allclose(returns, traj.reward[:10].sum(0), rtol=1e-5)
    np.testing.assert_allclose(episode_returns(traj), returns, rtol=1e-5)
