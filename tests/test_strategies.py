"""Conformance: every strategy obeys the same contract (one list, the same checks)."""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest
from conftest import NaNReach, deterministic, gaussian

import diffsim

# (strategy with a tiny budget, policy maker, hyperparameters one of which is invalid)
UNDER_TEST = {
    "PPO": (
        diffsim.PPO(num_envs=8, unroll_length=16, num_epochs=2, num_minibatches=4),
        gaussian,
        {"num_epochs": 0},
    ),
    "APG": (diffsim.APG(num_envs=8, horizon=16), deterministic, {"horizon": -1}),
    "APG-stochastic": (
        diffsim.APG(num_envs=8, horizon=16, stochastic=True),
        gaussian,
        {"learning_rate": 0.0},
    ),
    "SHAC": (
        diffsim.SHAC(num_envs=8, horizon=16, critic_minibatches=2),
        deterministic,
        {"discount": 0.0},
    ),
    "ES": (diffsim.ES(population_size=8, rollout_length=50), deterministic, {"std": -0.1}),
    "GuidedES": (
        diffsim.GuidedES(population_size=8, rollout_length=50, num_envs=4, horizon=10),
        deterministic,
        {"mode": "typo"},
    ),
}
IDS = list(UNDER_TEST)


@pytest.fixture(scope="module")
def reach():
    return diffsim.make_env("reach")


@pytest.mark.parametrize("name", IDS)
def test_step_is_pure_and_does_not_recompile(name, reach):
    strategy, make, _ = UNDER_TEST[name]
    state = strategy.init(reach, make(reach), key=jr.key(0))
    step = eqx.filter_jit(
        eqx.debug.assert_max_traces(lambda s, k: strategy.step(reach, s, key=k), max_traces=1)
    )
    s1, m1 = step(state, jr.key(1))
    s2, m2 = step(s1, jr.key(2))  # a second trace would raise
    again, m1_again = step(state, jr.key(1))  # same state and key: same result
    for a, b in zip(
        jax.tree.leaves(eqx.filter(s1, eqx.is_array)),
        jax.tree.leaves(eqx.filter(again, eqx.is_array)),
        strict=True,
    ):
        if jnp.issubdtype(a.dtype, jnp.floating):
            np.testing.assert_array_equal(a, b)
    assert m1.keys() == m2.keys() and all(np.isfinite(v) for v in m2.values())
    policy = strategy.policy(s2)
    assert policy(jnp.zeros(reach.observation_size)).shape == (reach.action_size,)


@pytest.mark.parametrize("name", IDS)
def test_train_seeds_vmaps_over_seeds(name, reach):
    strategy, make, _ = UNDER_TEST[name]
    keys = jr.split(jr.key(3), 2)
    budget = 2 * strategy.steps_per_iteration
    run = diffsim.train_seeds(
        strategy,
        reach,
        lambda k: make(reach, k),
        keys=keys,
        total_steps=budget,
        num_evals=3,
        num_eval_episodes=4,
        progress=False,
    )
    assert run.curve.eval_return.shape == (2, 3, 4)
    assert np.all(np.isfinite(run.curve.eval_return))
    assert not np.array_equal(run.curve.eval_return[0, -1], run.curve.eval_return[1, -1])
    assert run.config["strategy"] == type(strategy).__name__


@pytest.mark.parametrize("name", IDS)
def test_bad_hyperparameter_rejected_before_compiling(name):
    strategy, _, bad = UNDER_TEST[name]
    ((field, value),) = bad.items()
    kwargs = {f: getattr(strategy, f) for f in strategy.__dataclass_fields__ if f != field}
    with pytest.raises(ValueError, match=f"{field}.*{value}"):
        type(strategy)(**{**kwargs, field: value})


@pytest.mark.parametrize("name", IDS)
def test_nan_rewards_end_episodes_and_never_reach_the_parameters(name):
    """A NaN reward ends its env's episode (the wrapper records reward 0 and `diverged`),
    so no update is lost and the parameters stay finite."""
    strategy, make, _ = UNDER_TEST[name]
    env = diffsim.envs.AutoResetEnv(NaNReach(), 100, name="nan_reach")
    state = strategy.init(env, make(env), key=jr.key(0))
    step = eqx.filter_jit(lambda s, k: strategy.step(env, s, key=k))
    diverged = skipped = 0.0
    for k in jr.split(jr.key(1), 4):
        state, metrics = step(state, k)
        diverged += float(metrics.get("diverged", 1.0))
        skipped += float(metrics.get("skipped_updates", 0.0))
    params = eqx.filter(strategy.policy(state), eqx.is_inexact_array)
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(params))
    assert skipped == 0 and diverged > 0
