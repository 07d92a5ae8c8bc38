import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest
from conftest import deterministic
from evosax.algorithms import PGPE

import diffsim
from diffsim.strategies.es import ALGORITHMS
from diffsim.train import EVAL_SEED

NAMED = ["Open_ES", "PGPE", "SNES", "ARS", "Sep_CMA_ES"]


def _member(population, static, i: int):
    return eqx.combine(jax.tree.map(lambda x: x[i], population), static)


def _small(env, **kwargs):
    return diffsim.ES(
        **{
            "population_size": 8,
            "episodes_per_member": 2,
            "rollout_length": env.episode_length,
            **kwargs,
        }
    )


def test_solves_reach(envs):
    env = envs("reach")
    policy = deterministic(env, hidden=(32, 32))
    es = diffsim.ES(population_size=32, rollout_length=env.episode_length)
    run = diffsim.train(
        es, env, policy, key=jr.key(0), total_steps=400_000, num_evals=3, progress=False
    )
    returns = run.curve.eval_return.mean(-1)
    assert returns[0] < -80  # a nearly still policy
    assert returns[-1] > -30, returns  # a good one returns about -10
    assert run.config["steps_per_iteration"] == 32 * 1 * 100
    # The returned policy is the distribution mean, a plain policy `evaluate` accepts.
    assert isinstance(run.policy, diffsim.DeterministicPolicy)
    again = diffsim.evaluate(env, run.policy, key=jr.fold_in(jr.key(EVAL_SEED), 0))
    np.testing.assert_allclose(again, run.curve.eval_return[-1], rtol=1e-5, atol=1e-4)
    # Normaliser statistics come from every observation inside the scored episodes.
    assert float(run.policy.norm.count) == run.config["total_steps"]
    assert float(policy.norm.count) == 0


def test_fitness_is_a_direct_evaluation_of_each_member(envs, key):
    env = envs("pendulum")
    es = _small(env)
    state = es.init(env, deterministic(env), key=key)
    params, static = eqx.partition(state.policy, diffsim.trainable(state.policy))
    algo = es._evosax(params)
    population, _ = algo.ask(jr.key(3), state.evosax, es._hyperparams(algo))
    eval_key = jr.key(4)
    returns = jax.jit(lambda p: es.evaluate_population(env, state, p, key=eval_key))(population)
    assert returns.shape == (8,)
    members = [_member(population, static, i) for i in range(8)]
    evaluate = jax.jit(lambda m: diffsim.evaluate(env, m, key=eval_key, num_episodes=2).mean())
    direct = [evaluate(m) for m in members]
    np.testing.assert_allclose(returns, jnp.stack(direct), rtol=1e-5, atol=1e-4)
    assert len(set(np.round(np.asarray(returns), 3))) == 8  # members differ


def test_step_ranks_the_evaluated_population_and_updates_the_normaliser(envs, key):
    env = envs("pendulum")
    es = _small(env)
    state = es.init(env, deterministic(env), key=key)
    step_key = jr.key(7)
    new, metrics = jax.jit(lambda s: es.step(env, s, key=step_key))(state)

    # Reproduce the generation: step splits its key into (ask, evaluate, tell).
    ask_key, eval_key, _ = jr.split(step_key, 3)
    params, static = eqx.partition(state.policy, diffsim.trainable(state.policy))
    algo = es._evosax(params)
    population, _ = algo.ask(ask_key, state.evosax, es._hyperparams(algo))
    returns = es.evaluate_population(env, state, population, key=eval_key)
    np.testing.assert_allclose(metrics["train_return"], returns.mean(), rtol=1e-5)
    np.testing.assert_allclose(metrics["max_return"], returns.max(), rtol=1e-5)
    # pendulum never terminates: every member's 2 envs are simulated for the whole episode
    full = 8 * 2 * env.episode_length
    assert float(metrics["env_steps"]) == float(metrics["simulated_steps"]) == full

    # One normaliser for all members, updated with all P x T x E observations.
    reset_key, _ = jr.split(eval_key)
    start = diffsim.reset(env, key=reset_key, num_envs=2)
    run = jax.jit(
        lambda m: (
            diffsim.rollout(env, m, start, key=key, length=env.episode_length, deterministic=True)[
                1
            ].obs
        )
    )
    obs = jnp.stack([run(_member(population, static, i)) for i in range(8)])
    norm = es.policy(new).norm
    assert float(norm.count) == 8 * env.episode_length * 2
    np.testing.assert_allclose(norm.mean, obs.reshape(-1, 3).mean(0), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(norm.var, obs.reshape(-1, 3).var(0), rtol=1e-3, atol=1e-5)

    # The best member is kept with the (older) normaliser it was evaluated under.
    best = es.best_policy(new)
    np.testing.assert_allclose(new.best_return, returns.max(), rtol=1e-5)
    assert float(best.norm.count) == 0
    i = int(jnp.argmax(returns))
    np.testing.assert_array_equal(best.net.layers[0].weight, population.net.layers[0].weight[i])
    # The mean moved, and stays a policy of the same structure.
    assert jax.tree.structure(es.policy(new)) == jax.tree.structure(state.policy)
    assert not jnp.allclose(es.policy(new).net.layers[0].weight, state.policy.net.layers[0].weight)


@pytest.mark.parametrize("algorithm", [*NAMED, PGPE])
def test_every_named_algorithm_runs(envs, key, algorithm):
    env = envs("reach")
    es = _small(env, algorithm=algorithm)
    state = es.init(env, deterministic(env, hidden=(16,)), key=key)
    # The state keeps its types from init on: one trace for every generation.
    step = eqx.filter_jit(
        eqx.debug.assert_max_traces(lambda s, k: es.step(env, s, key=k), max_traces=1)
    )
    for k in jr.split(key, 3):
        state, metrics = step(state, k)
    for name, value in metrics.items():
        assert jnp.isfinite(value), name
    leaves = jax.tree.leaves(eqx.filter(es.policy(state), eqx.is_inexact_array))
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in leaves)
    assert 0 < float(metrics["std"]) < 0.1  # the small initial std reached evosax
    assert float(state.best_return) >= float(metrics["max_return"])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"population_size": 7}, "population_size=7 must be even"),
        ({"algorithm": "PGPE", "population_size": 7}, "PGPE rejects population_size=7"),
        ({"algorithm": "OpenES"}, "'OpenES'.*valid names: .*Open_ES"),
        ({"algorithm": "SimpleGA"}, "valid names"),
        ({"algorithm": int}, "algorithm must be a name or an evosax"),
        ({"std": 0.0}, "std must be a number > 0, got 0.0"),
        ({"std": -0.1}, "std must be a number > 0, got -0.1"),
        ({"population_size": 0}, "population_size must be a positive int, got 0"),
        ({"rollout_length": 0}, "rollout_length must be a positive int, got 0"),
        ({"learning_rate": -1.0}, "learning_rate must be a number > 0"),
        ({"weight_decay": -1.0}, "weight_decay must be a number in"),
        ({"fitness_shaping": "rank"}, "fitness_shaping must be one of"),
        ({"algorithm": "SNES", "fitness_shaping": "raw"}, "SNES ranks the population"),
        ({"algorithm": "Sep_CMA_ES", "weight_decay": 0.01}, "weight_decay=0.01 needs"),
    ],
)
def test_rejects_bad_hyperparameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        diffsim.ES(**kwargs)


def test_rejects_rollouts_longer_than_episodes_before_compiling(envs):
    env = envs("reach")
    with pytest.raises(ValueError, match="rollout_length=1000 exceeds the episode_length 100"):
        diffsim.train(
            diffsim.ES(rollout_length=1000),
            env,
            deterministic(env),
            key=jr.key(0),
            total_steps=10**8,
            progress=False,
        )


def test_valid_settings_construct():
    assert "Open_ES" in ALGORITHMS and "SimpleGA" not in ALGORITHMS
    es = diffsim.ES(algorithm="SNES", population_size=7, weight_decay=0.0)
    assert es.for_env(diffsim.make_env("reach")).steps_per_iteration == 7 * 1 * 100
    assert es.min_steps_per_iteration == 7  # ES counts the steps inside scored episodes
    # An odd population without antithetic sampling reaches evosax as it is.
    snes = diffsim.ES(population_size=7, antithetic=False, algorithm="SNES")
    assert snes._evosax(np.zeros(3, np.float32)).population_size == 7
    # Weight decay with a schedule: AdamW's decoupled step, -lr * wd * m on a zero gradient.
    decayed = diffsim.ES(weight_decay=1e-3, learning_rate=lambda count: 0.01)
    mean = jnp.array([1.0, -2.0])
    optimizer = decayed._optimizer()
    updates, _ = optimizer.update(jnp.zeros(2), optimizer.init(mean), mean)
    np.testing.assert_allclose(updates, -0.01 * 1e-3 * mean, rtol=1e-6)
