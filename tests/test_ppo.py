import equinox as eqx
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest
from conftest import deterministic, gaussian

import diffsim
from diffsim.strategies.returns import gae

TINY = diffsim.PPO(num_envs=8, unroll_length=16, num_epochs=2, num_minibatches=4)


def _gae_reference(reward, value, next_value, done, trunc, discount, lam):
    """Plain-Python GAE, one env at a time, written from the definition."""
    T, B = reward.shape
    adv = np.zeros((T, B))
    for b in range(B):
        running = 0.0
        for t in reversed(range(T)):
            terminal = done[t, b] and not trunc[t, b]
            bootstrap = 0.0 if terminal else next_value[t, b]
            delta = reward[t, b] + discount * bootstrap - value[t, b]
            running = delta + (0.0 if done[t, b] else discount * lam * running)
            adv[t, b] = running
    return adv, adv + value


def test_gae_matches_python_reference(key):
    k = jr.split(key, 5)
    T, B = 13, 4
    reward, value, next_value = (jr.normal(k[i], (T, B)) for i in range(3))
    done = (jr.uniform(k[3], (T, B)) < 0.2).astype(jnp.float32)
    trunc = done * (jr.uniform(k[4], (T, B)) < 0.5)
    targets = gae(reward, value, next_value, done, trunc, discount=0.97, lam=0.9)
    adv, ret = _gae_reference(
        *(np.asarray(x) for x in (reward, value, next_value, done, trunc)), 0.97, 0.9
    )
    assert done.sum() > 0 and trunc.sum() > 0 and (done - trunc).sum() > 0
    np.testing.assert_allclose(targets.advantage, adv, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(targets.value_target, ret, rtol=1e-5, atol=1e-5)


def test_step_does_not_recompile(key, envs):
    env = envs("reach")
    state = TINY.init(env, gaussian(env), key=key)
    step = eqx.filter_jit(
        eqx.debug.assert_max_traces(lambda s, k: TINY.step(env, s, key=k), max_traces=1)
    )
    state, m1 = step(state, jr.key(1))
    state, m2 = step(state, jr.key(2))  # a second trace would raise
    assert np.isfinite(m2["policy_loss"]) and float(m2["approx_kl"]) >= 0
    assert float(state.policy.norm.count) == 2 * TINY.steps_per_iteration


def test_ppo_improves_on_the_first_update(key, envs):
    env = envs("reach")
    state = TINY.init(env, gaussian(env), key=key)
    state, metrics = eqx.filter_jit(lambda s: TINY.step(env, s, key=key))(state)
    # The surrogate starts at ratio 1; after the epochs the policy moved but stayed close.
    assert 0 < float(metrics["approx_kl"]) < 0.1
    assert float(metrics["clip_fraction"]) < 0.5


def test_ppo_solves_pendulum_swing_up(key, envs):
    env = envs("pendulum")
    run = diffsim.train(
        diffsim.PPO(), env, gaussian(env), key=key, total_steps=200_000, num_evals=5, progress=False
    )
    first, last = run.curve.eval_return.mean(-1)[jnp.array([0, -1])]
    assert float(first) < 0 and float(last) > 100  # untrained ~ -120, swung up and balanced ~ 150


@pytest.mark.slow
def test_ppo_learns_inverted_pendulum(key, envs):
    env = envs("inverted_pendulum")
    run = diffsim.train(
        diffsim.PPO(),
        env,
        gaussian(env),
        key=key,
        total_steps=100_000,
        num_evals=3,
        num_eval_episodes=4,
        progress=False,
    )
    first, last = run.curve.eval_return.mean(-1)[jnp.array([0, -1])]
    assert float(first) < 150 and float(last) > 400  # of 1000 (one point per step upright)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_envs": 0}, "num_envs must be a positive int, got 0"),
        ({"num_minibatches": 7}, r"num_minibatches=7 must divide num_envs \* unroll_length = 4096"),
        ({"learning_rate": -1e-3}, "learning_rate must be a number > 0, got -0.001"),
        ({"discount": 1.5}, r"discount must be a number in \(0.0, 1.0\], got 1.5"),
        ({"gae_lambda": -0.1}, r"gae_lambda must be a number in \[0.0, 1.0\], got -0.1"),
        ({"clip_epsilon": 0.0}, "clip_epsilon must be a number > 0, got 0.0"),
    ],
)
def test_bad_hyperparameters_rejected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        diffsim.PPO(**kwargs)


def test_ppo_needs_a_stochastic_policy(key, envs):
    env = envs("reach")
    with pytest.raises(ValueError, match="DeterministicPolicy has no log_prob, entropy"):
        diffsim.train(TINY, env, deterministic(env), key=key, total_steps=10_000, progress=False)
