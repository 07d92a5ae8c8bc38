"""The comparison protocol: training-only clocks, paired evaluation, pooled resets, diverged
envs that end, and what ES counts as an env step. (Exact budgets: test_conformance.py.)"""

import itertools
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest
from brax.envs.base import Wrapper
from conftest import NaNReach, deterministic

import diffsim
from diffsim.envs import AutoResetEnv, Reach
from diffsim.policies import trainable
from diffsim.rollout import first_episodes
from diffsim.strategies.es import population_episodes

APG = diffsim.APG(num_envs=8, horizon=12)  # 96 env steps per iteration
ES = diffsim.ES(population_size=8)


class Ending(Wrapper):
    """Reach that terminates once the point leaves the disc of radius 0.6."""

    def step(self, state, action):
        state = self.env.step(state, action)
        out = jnp.linalg.norm(state.pipeline_state["pos"]) > 0.6
        return state.replace(done=out.astype(state.reward.dtype))


@pytest.fixture(scope="module")
def reach():
    return diffsim.make_env("reach")


SMALL = dict(total_steps=300, num_evals=20, progress=False)  # 3 APG iterations


def test_small_budget_evaluates_after_every_iteration(reach):
    with pytest.warns(UserWarning, match=r"3 APG iteration\(s\).*num_evals=4"):
        run = diffsim.train(APG, reach, deterministic(reach), key=jr.key(0), **SMALL)
    np.testing.assert_array_equal(run.curve.env_steps, [0, 96, 192, 288])


def test_clocks_count_training_evaluation_and_checkpoints_apart(reach, tmp_path, monkeypatch):
    """With a clock that advances one second per reading, every timed call lasts exactly
    one second, so each clock's total counts the calls it timed: the wall-time curve
    counts the start and the 3 training segments only, not the 4 evaluations or the 3
    checkpoint writes."""
    ticks = itertools.count()
    monkeypatch.setattr(time, "perf_counter", lambda: float(next(ticks)))
    with pytest.warns(UserWarning, match="iteration"):
        run = diffsim.train(
            APG, reach, deterministic(reach), key=jr.key(0), checkpoint_dir=tmp_path, **SMALL
        )
    np.testing.assert_array_equal(run.curve.wall_time, [1.0, 2.0, 3.0, 4.0])
    assert run.config["train_seconds"] == 4.0
    assert run.config["eval_seconds"] == 4.0
    assert run.config["checkpoint_seconds"] == 3.0


def test_evaluation_is_paired_by_seed_index(reach):
    policy = deterministic(reach)
    same_keys = jnp.stack([jr.key(1), jr.key(1)])
    run = diffsim.train_seeds(
        APG,
        reach,
        policy,
        keys=same_keys,
        total_steps=192,
        num_evals=2,
        num_eval_episodes=4,
        progress=False,
    )
    # same policy, same training: different episodes for the two seed indices ...
    assert not np.allclose(run.curve.eval_return[0, 0], run.curve.eval_return[1, 0])
    # ... and seed index 0 sees exactly what `train` and every other strategy sees.
    es = diffsim.train(
        ES,
        reach,
        policy,
        key=jr.key(5),
        total_steps=1600,
        num_evals=2,
        num_eval_episodes=4,
        progress=False,
    )
    np.testing.assert_allclose(es.curve.eval_return[0], run.curve.eval_return[0, 0], rtol=1e-6)


def test_evaluation_stops_when_episodes_end_and_matches_full_rollout(key):
    env = AutoResetEnv(Ending(Reach()), 100, "ending")
    policy = deterministic(env)
    reset_key, act_key = jr.split(key)
    state = diffsim.reset(env, key=reset_key, num_envs=16)
    ep = jax.jit(lambda s: first_episodes(env, policy, s, key=act_key, max_length=100, chunk=7))(
        state
    )
    _, traj = diffsim.rollout(
        env, policy, state, key=act_key, length=100, deterministic=True, num_starts=0
    )
    first_end = np.argmax(np.asarray(traj.done) > 0, axis=0)
    ended = np.asarray(traj.done).any(0)
    length = np.where(ended, first_end + 1, 100)
    assert ended.any() and (length < 100).any()  # some episodes terminate early
    np.testing.assert_array_equal(ep.steps, length)
    mask = np.arange(100)[:, None] < length[None]
    np.testing.assert_allclose(ep.returns, (np.asarray(traj.reward) * mask).sum(0), rtol=1e-5)
    obs = np.asarray(traj.obs)[mask]
    np.testing.assert_allclose(ep.obs.mean, obs.mean(0), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(ep.obs.var, obs.var(0), rtol=1e-3, atol=1e-5)
    assert float(ep.obs.count) == mask.sum()
    # the loop ran whole chunks of 7 until the last episode ended (or 100 steps had passed)
    assert int(ep.length) == min(-(-length.max() // 7) * 7, -(-100 // 7) * 7)


def test_es_counts_steps_inside_scored_episodes(key):
    env = AutoResetEnv(Ending(Reach()), 100, "ending")
    es = diffsim.ES(population_size=6, episodes_per_member=3).for_env(env)
    policy = deterministic(env)
    state = es.init(env, policy, key=key)
    new, metrics = jax.jit(lambda s: es.step(env, s, key=key))(state)
    ask_key, eval_key, _ = jr.split(key, 3)
    # the same population and episodes, measured one member at a time
    params = eqx.filter(policy, trainable(policy))
    evo = es._evosax(params)
    population, _ = evo.ask(ask_key, state.evosax, es._hyperparams(evo))
    ep = population_episodes(env, policy, population, key=eval_key, num_episodes=3, max_length=100)
    assert ep.steps.shape == (6, 3)
    assert int(metrics["env_steps"]) == int(ep.steps.sum())
    assert int(metrics["env_steps"]) < es.steps_per_iteration  # episodes ended early


def test_pooled_starts_are_fresh_distinct_and_reuses_counted(key):
    env = diffsim.make_env("reach", episode_length=5)
    policy = deterministic(env)
    state = diffsim.reset(env, key=key, num_envs=3)
    starts = []
    for num, reuses in ((4, 0), (2, 2 * 3)):  # 20 steps = 4 episode ends per env
        s, traj = diffsim.rollout(
            env, policy, state, key=key, length=20, deterministic=True, num_starts=num
        )
        assert float(traj.extras["reused_start"].sum()) == reuses
        first_obs = np.asarray(traj.obs[5::5])  # the obs right after each reset: [3, B, obs]
        starts.append(first_obs)
    fresh = starts[0].reshape(-1, env.observation_size)
    assert len(np.unique(fresh.round(6), axis=0)) == len(fresh)  # 9 distinct starts
    # a second call draws new starts (the key advanced), not the same pool again
    s2, traj2 = diffsim.rollout(
        env, policy, s, key=key, length=20, deterministic=True, num_starts=4
    )
    again = np.asarray(traj2.obs[5::5]).reshape(-1, env.observation_size)
    assert not np.isin(again.round(6), fresh.round(6)).all(axis=1).any()


def test_diverged_env_ends_and_others_keep_updating(key):
    env = AutoResetEnv(NaNReach(), 100, "nan-reach")
    policy = deterministic(env)
    state = diffsim.reset(env, key=key, num_envs=16)
    _, traj = diffsim.rollout(env, policy, state, key=key, length=100, deterministic=True)
    diverged = np.asarray(traj.extras["diverged"]) > 0
    assert diverged.any() and not diverged.all()
    assert np.all(np.asarray(traj.done)[diverged] > 0)  # a diverged step ends its episode
    assert np.all(np.isfinite(np.asarray(traj.reward))) and np.all(np.isfinite(traj.next_obs))
    # APG on it: no update is lost to one bad env
    run = diffsim.train(
        diffsim.APG(num_envs=16, horizon=20),
        env,
        policy,
        key=key,
        total_steps=16 * 20 * 20,
        num_evals=2,
        num_eval_episodes=8,
        progress=False,
    )
    assert run.metrics["diverged"].sum() > 0
    assert run.metrics["skipped_updates"].sum() == 0
    assert np.all(np.isfinite(np.asarray(run.metrics["loss"])))
