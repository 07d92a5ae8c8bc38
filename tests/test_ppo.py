import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax
import pytest
from conftest import deterministic, gaussian

import diffsim
from diffsim.strategies.helpers import gae

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
    ended = {k: v for k, v in m2.items() if k != "train_return"}  # NaN: no episode ended
    assert all(np.isfinite(float(v)) for v in ended.values()), m2
    assert float(state.policy.norm.count) == 2 * TINY.steps_per_iteration


def test_ppo_improves_on_the_first_update(key, envs):
    env = envs("reach")
    state = TINY.init(env, gaussian(env), key=key)
    state, metrics = eqx.filter_jit(lambda s: TINY.step(env, s, key=key))(state)
    # The surrogate starts at ratio 1; after the epochs the policy moved but stayed close.
    assert 0 < float(metrics["approx_kl"]) < 0.1
    assert float(metrics["clip_fraction"]) < 0.5


def _gaussian_kl(mean_p, log_std_p, mean_q, log_std_q):
    """KL(p || q) of two diagonal Gaussians, in closed form, summed over the last axis."""
    var_p, var_q = jnp.exp(2 * log_std_p), jnp.exp(2 * log_std_q)
    kl = log_std_q - log_std_p + (var_p + (mean_p - mean_q) ** 2) / (2 * var_q) - 0.5
    return kl.sum(-1)


def test_approx_kl_estimates_the_kl_from_the_behaviour_policy(key, envs):
    """PPO's `approx_kl` on a batch sampled by the behaviour policy estimates
    KL(behaviour || current): it matches the closed-form KL of the two pre-squash Gaussians
    (tanh is a bijection, so it leaves the KL unchanged), averaged over the batch's
    observations. The current policy halves the std and shifts the mean, so the KL is large
    and far from the reverse KL(current || behaviour) (0.81 vs 0.32 nats per dimension from
    the std alone): an estimator with a sign error or of the reverse direction fails."""
    env = envs("reach")
    ppo = diffsim.PPO(num_envs=64, unroll_length=64, num_epochs=1, num_minibatches=1)
    state = ppo.init(env, gaussian(env), key=key)
    old = state.policy
    new = eqx.tree_at(
        lambda p: (p.log_std, p.net.layers[-1].bias),
        old,
        (old.log_std - jnp.log(2.0), old.net.layers[-1].bias + 0.3),
    )
    _, traj = diffsim.rollout(env, old, state.env_state, key=jr.key(2), length=64)
    batch = ppo._batch(old, state.value, traj)  # behaviour log-probs of `old`, [B, T, ...]
    batch = jax.tree.map(lambda x: x.reshape(-1, *x.shape[2:]), batch)  # one minibatch
    _, metrics = ppo._loss((new, state.value), batch)
    at = lambda policy: jax.vmap(policy.distribution)(batch.obs)  # (mean, log_std) per sample
    kl = lambda p, q: _gaussian_kl(*at(p), *at(q))
    exact, reverse = float(kl(old, new).mean()), float(kl(new, old).mean())
    assert exact > 2 * reverse  # the two directions are told apart
    # 4,096 samples: the estimate's standard error is about 2% of the KL; 10% is 5 of them.
    assert float(metrics["approx_kl"]) == pytest.approx(exact, rel=0.1)


@pytest.mark.slow
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
        ({"shuffle": "rows"}, "shuffle must be 'envs' or 'samples', got 'rows'"),
        (
            {"shuffle": "envs", "num_minibatches": 128},
            "num_minibatches=128 must divide num_envs=64",
        ),
        ({"value_clip": 0.0}, "value_clip must be a number > 0, got 0.0"),
        ({"lr_decay_steps": 0}, "lr_decay_steps must be a positive int, got 0"),
        (
            {"lr_decay_steps": 10, "learning_rate": lambda n: 1e-3},
            "lr_decay_steps needs a float learning_rate",
        ),
    ],
)
def test_bad_hyperparameters_rejected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        diffsim.PPO(**kwargs)


def test_ppo_needs_a_stochastic_policy(key, envs):
    env = envs("reach")
    with pytest.raises(ValueError, match="DeterministicPolicy has no log_prob, entropy"):
        diffsim.train(TINY, env, deterministic(env), key=key, total_steps=10_000, progress=False)


def test_update_sees_the_new_observation_statistics_and_stored_samples(key, envs):
    """The behaviour log-probs PPO's ratio divides by are recomputed with the statistics the
    update uses (so the first minibatch's ratio is exactly 1), from the stored pre-squash
    sample rather than arctanh of the action."""
    env = envs("reach")
    ppo = diffsim.PPO(num_envs=8, unroll_length=16, num_epochs=1, num_minibatches=1)
    state = ppo.init(env, gaussian(env), key=key)
    state = eqx.tree_at(lambda s: s.policy.log_std, state, jnp.full(2, 1.5))  # wide: |u| > 3
    new, metrics = jax.jit(lambda s: ppo.step(env, s, key=key))(state)
    assert float(metrics["approx_kl"]) == pytest.approx(0.0, abs=1e-6)  # ratio 1 before moving
    assert float(new.policy.norm.count) == 8 * 16  # statistics updated this iteration
    _, traj = diffsim.rollout(env, state.policy, state.env_state, key=key, length=16)
    u = traj.extras["pre_squash"]
    assert float(jnp.max(jnp.abs(u))) > 3.0  # where arctanh(tanh(u)) would lose u
    exact = jax.vmap(jax.vmap(lambda o, a, u: state.policy.log_prob(o, a, pre_squash=u)))(
        traj.obs, traj.action, u
    )
    np.testing.assert_allclose(traj.log_prob, exact, rtol=1e-5, atol=1e-6)  # float32, fused


def test_lr_decays_linearly_over_the_budget():
    ppo = diffsim.PPO(num_envs=8, unroll_length=16, num_epochs=2, num_minibatches=4)
    decayed = ppo.for_budget(128 * 10)  # 10 iterations of 8 updates
    assert decayed.lr_decay_steps == 1280 and ppo.lr_decay_steps is None
    assert diffsim.PPO(lr_decay=False).for_budget(10_000).lr_decay_steps is None
    opt = decayed._optimizer()
    params = ({"w": jnp.ones(())}, {"w": jnp.ones(())})  # (policy, value)
    opt_state = opt.init(params)
    steps = []
    for _ in range(80):
        updates, opt_state = opt.update(params, opt_state, params)
        steps.append(float(-updates[0]["w"]))
    assert steps[0] == pytest.approx(3e-4, rel=1e-3) and steps[-1] < 1e-5


def test_one_optimiser_updates_as_a_clipped_adam_per_network(key, envs):
    """PPO's one Adam over (policy, value), each gradient clipped to max_grad_norm on its
    own, makes the updates of one clipped Adam per network, step after step: a policy
    gradient far above the clip and a value gradient far below it (a clip of their joint
    norm would shrink the value's step too)."""
    env = envs("reach")
    ppo = diffsim.PPO(max_grad_norm=0.5)
    models = (gaussian(env), diffsim.ValueFunction(env.observation_size, key=key))
    params = eqx.filter(models, diffsim.trainable(models))
    leaves, tree = jax.tree.flatten(params)
    keys = iter(jr.split(jr.key(3), 3 * len(leaves)))
    draw = lambda: jax.tree.unflatten(tree, [jr.normal(next(keys), x.shape) for x in leaves])
    separate = optax.chain(optax.clip_by_global_norm(0.5), optax.adam(3e-4, eps=1e-5))
    joint, two = ppo._optimizer(), [separate, separate]
    joint_state = joint.init(params)
    two_states = [separate.init(params[0]), separate.init(params[1])]
    for _ in range(3):
        g = draw()
        g = (jax.tree.map(lambda x: 10.0 * x, g[0]), jax.tree.map(lambda x: 1e-3 * x, g[1]))
        updates, joint_state = joint.update(g, joint_state, params)
        for i in range(2):
            expected, two_states[i] = two[i].update(g[i], two_states[i], params[i])
            for a, b in zip(jax.tree.leaves(updates[i]), jax.tree.leaves(expected), strict=True):
                np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-12)
        assert optax.tree.norm(updates[1]) > 0.0
