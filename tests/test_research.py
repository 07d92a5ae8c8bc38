"""diffsim inside research code: the vanishing-gradient warning, `bind` and a loop of your
own, `metrics["env_steps"]` from every built-in strategy, `train_return` NaN where no
episode ended."""

import os
import runpy
import warnings

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest
from conftest import deterministic, gaussian

import diffsim
from diffsim._train import contract as _contract, log as _log
from diffsim.envs import AutoResetEnv, Reach
from diffsim.strategies import registry

APG = diffsim.APG(num_envs=4, horizon=10)
SNIPPET = os.path.join(os.path.dirname(__file__), "..", "docs", "snippets", "own_loop.py")


class DetachedReach(Reach):
    """Reach whose reward is cut from the graph: APG's gradient is exactly 0."""

    def reward(self, s, action, next_s):
        return jax.lax.stop_gradient(super().reward(s, action, next_s))


def train_apg(env) -> list[warnings.WarningMessage]:
    """APG for two segments of two iterations; the warnings it raised."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        diffsim.train(
            APG,
            env,
            deterministic(env),
            key=jr.key(0),
            total_steps=4 * APG.steps_per_iteration,
            num_evals=3,
            num_eval_episodes=2,
            progress=False,
        )
    return [w for w in caught if issubclass(w.category, diffsim.VanishingGradientWarning)]


def test_a_detached_reward_warns_once_naming_the_causes():
    found = train_apg(AutoResetEnv(DetachedReach(), 100, name="detached_reach"))
    assert len(found) == 1
    message = str(found[0].message)
    for cause in ("alive bonus", "stop_gradient", "gymnax", "grad_norm was 0"):
        assert cause in message
    assert found[0].filename == __file__  # points at the train call


@pytest.mark.parametrize("name", ["reach", "pendulum"])
def test_smooth_envs_do_not_warn(envs, name):
    assert train_apg(envs(name)) == []


def check(strategy, grad_norm, loss=1.0, *, metric="grad_norm", batched=False):
    """`warn_vanishing` on a policy of norm ~ 1 and constant metrics: the warnings."""
    policy = diffsim.DeterministicPolicy(2, 1, hidden=(2,), key=jr.key(0))
    if batched:
        policy = jax.tree.map(lambda x: jnp.stack([x, x]) if eqx.is_array(x) else x, policy)
    shape = (2, 5) if batched else (5,)
    metrics = {metric: np.full(shape, grad_norm), "loss": np.full(shape, loss)}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _contract.warn_vanishing(strategy, policy, metrics, batched=batched)
    return [w for w in caught if issubclass(w.category, diffsim.VanishingGradientWarning)]


def test_the_floor_is_relative_to_the_loss_and_the_parameters():
    assert len(check(APG, 0.0)) == 1
    assert len(check(APG, 1e-6, loss=1.0)) == 1  # S ~ 1e-6 * (1 + |theta|)
    assert check(APG, 1e-6, loss=1e-6) == []  # the same gradient of a tiny loss: fine
    assert check(APG, 0.1) == []
    assert check(APG, np.nan) == []  # skipped updates: not a vanishing gradient
    assert len(check(APG, 0.0, batched=True)) == 1
    assert "in 2 of 2 runs" in str(check(APG, 0.0, batched=True)[0].message)


def test_only_gradients_through_the_env_are_checked():
    assert check(diffsim.PPO(), 0.0) == []  # PPO's grad_norm is a score function's
    guided = diffsim.GuidedES()
    assert len(check(guided, 0.0, metric="analytic_grad_norm")) == 1


def test_bind_is_for_env_then_for_budget(envs):
    env = envs("reach")
    ppo = diffsim.PPO().bind(env, total_steps=50_000)
    assert ppo.lr_decay_steps == 50_000
    assert ppo.bind(env, total_steps=50_000) == ppo
    es = diffsim.ES().bind(env, total_steps=50_000)
    assert es.rollout_length == env.episode_length
    for bad in (0, -5, True):  # a float or None: refused by the type checker under test
        with pytest.raises(ValueError, match=f"total_steps must be a positive int, got {bad}"):
            diffsim.PPO().bind(env, total_steps=bad)


def test_an_unbound_decaying_strategy_warns_that_its_rate_stays_constant(envs):
    env = envs("reach")
    ppo = diffsim.PPO(num_envs=4, unroll_length=4, num_minibatches=2, num_epochs=1)
    init = lambda s: jax.eval_shape(lambda: s.init(env, gaussian(env), key=jr.key(0)))
    with pytest.warns(UserWarning, match=r"lr_decay is on .* strategy.bind\(env"):
        init(ppo)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        init(ppo.bind(env, total_steps=1000))


@pytest.mark.parametrize("name", sorted(registry.strategies()))
def test_every_built_in_strategy_reports_env_steps(envs, name):
    """Traced only (`jax.eval_shape`): the metrics of one `step` hold `env_steps`."""
    env = envs("reach")
    strategy = registry.resolve(name)().bind(env, total_steps=10**6)
    try:
        policy = gaussian(env)
        strategy.check(env, policy)
    except ValueError:
        policy = deterministic(env)

    def one_step():
        state = strategy.init(env, policy, key=jr.key(0))
        return strategy.step(env, state, key=jr.key(1))[1]

    metrics = jax.eval_shape(one_step)
    assert "env_steps" in metrics and metrics["env_steps"].shape == ()


def transitions(done: list[float]) -> diffsim.Trajectory:
    t = len(done)
    zeros = jnp.zeros((t, 1))
    return diffsim.Trajectory(
        obs=jnp.zeros((t, 1, 2)),
        action=jnp.zeros((t, 1, 1)),
        reward=zeros,
        done=jnp.asarray(done)[:, None],
        truncation=zeros,
        next_obs=jnp.zeros((t, 1, 2)),
        log_prob=zeros,
        extras={"episode_return": jnp.arange(t, dtype=jnp.float32)[:, None]},
    )


def test_train_return_is_nan_where_no_episode_ended_and_logs_average_the_rest():
    assert np.isnan(diffsim.helpers.episode_stats(transitions([0.0, 0.0, 0.0]))["train_return"])
    stats = diffsim.helpers.episode_stats(transitions([0.0, 1.0, 1.0]))
    assert float(stats["train_return"]) == 1.5 and float(stats["episodes"]) == 2
    assert _log._nanmean(np.array([np.nan, 1.0, 3.0])) == 2.0
    assert _log._nanmean(np.array([np.nan, np.nan])) is None


def test_the_own_loop_snippet_trains(capsys):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        runpy.run_path(SNIPPET, run_name="__main__")
    assert not [w for w in caught if "lr_decay" in str(w.message)]  # bound: it decays
    last = capsys.readouterr().out.strip().splitlines()[-1]
    before, after = (float(x) for x in last.split(":")[1].replace(" before,", "").split()[:2])
    assert last.startswith("evaluation return") and after > before + 20


def test_sweep_labels_use_one_notation_per_name():
    from diffsim.plotting import format_value

    assert [format_value(v) for v in (1e-3, 3e-4, 2.5e-4, 0.2, 64.0, 1e5)] == [
        "1e-3",
        "3e-4",
        "2.5e-4",
        "0.2",
        "64",
        "1e5",
    ]
    assert (
        format_value(0.01, scientific=True) == "1e-2" and format_value(0.0, scientific=True) == "0"
    )
