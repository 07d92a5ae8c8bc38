import os
import time
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pandas as pd
import pytest
from conftest import gaussian

import diffsim
from diffsim._train import program

TINY = diffsim.PPO(num_envs=8, unroll_length=16, num_epochs=2, num_minibatches=4)
BUDGET = dict(
    total_steps=4 * TINY.steps_per_iteration, num_evals=3, num_eval_episodes=4, progress=False
)


@pytest.fixture(scope="module")
def reach():
    return diffsim.make_env("reach")


class Seeded(NamedTuple):
    run: diffsim.Run
    make: Callable
    keys: jax.Array
    seconds: float  # the whole `train_seeds` call, by the clock around it


@pytest.fixture(scope="module")
def seeded(reach):
    make = lambda k: gaussian(reach, key=k)
    keys = jr.split(jr.key(7), 3)
    tic = time.perf_counter()
    run = diffsim.train_seeds(TINY, reach, make, keys=keys, **BUDGET)
    return Seeded(run, make, keys, time.perf_counter() - tic)


def test_run_layout(seeded):
    run = seeded.run
    assert run.curve.env_steps.shape == (3, 3) and run.curve.eval_return.shape == (3, 3, 4)
    np.testing.assert_array_equal(run.curve.env_steps[0], [0, 256, 512])
    assert np.all(np.diff(np.asarray(run.curve.wall_time), axis=1) > 0)
    assert run.metrics["policy_loss"].shape == (3, 4)  # 4 iterations
    assert run.policy.net.layers[0].weight.shape[0] == 3  # leading seed axis
    assert run.config["total_steps"] == 512 and run.config["num_seeds"] == 3
    assert run.config["versions"]["jax"] == jax.__version__


def test_seconds_are_disjoint_parts_of_the_run(seeded):
    """One training clock for all seeds: the curve's wall time ends at `train_seconds`. It
    counts neither compiling nor evaluating, so the four clocks add up to no more than the
    whole call took (a second counted twice would show); nothing was checkpointed."""
    config, wall_time = seeded.run.config, np.asarray(seeded.run.curve.wall_time)
    np.testing.assert_array_equal(wall_time, np.broadcast_to(wall_time[0], wall_time.shape))
    ms = 5e-4 + 1e-6  # the config rounds seconds to milliseconds; the curve is float32
    np.testing.assert_allclose(wall_time[:, -1], config["train_seconds"], rtol=0, atol=ms)
    parts = [config[f"{k}_seconds"] for k in ("compile", "train", "eval", "checkpoint")]
    assert parts[3] == 0.0 and sum(parts) <= seeded.seconds + 4 * ms


def test_seeds_differ_and_reproduce(seeded, reach):
    run, make, keys, _ = seeded
    returns = np.asarray(run.curve.eval_return[:, -1])
    assert not np.allclose(returns[0], returns[1])  # different seeds, different runs
    np.testing.assert_array_equal(run.curve.eval_return[:, 0].shape, (3, 4))
    again = diffsim.train_seeds(TINY, reach, make, keys=keys, **BUDGET)
    np.testing.assert_array_equal(again.curve.eval_return, run.curve.eval_return)
    same = diffsim.train_seeds(TINY, reach, make, keys=jnp.stack([keys[0], keys[0]]), **BUDGET)
    for a in jax.tree.leaves(same.policy):  # one training twice ...
        np.testing.assert_array_equal(a[0], a[1])
    # ... evaluated on each seed index's own episodes (paired across strategies)
    assert not np.allclose(same.curve.eval_return[0], same.curve.eval_return[1])


def test_evaluation_keys_are_shared_across_seeds_and_strategies(seeded):
    # Same initial policy per seed would give same initial returns; with a factory the
    # policies differ, but the evaluation episodes' start states are the same: compare
    # the first evaluation of two runs of the same policy under different training keys.
    env = diffsim.make_env("reach")
    policy = gaussian(env)
    a = diffsim.train(TINY, env, policy, key=jr.key(1), **BUDGET)
    b = diffsim.train(TINY, env, policy, key=jr.key(2), **BUDGET)
    np.testing.assert_array_equal(a.curve.eval_return[0], b.curve.eval_return[0])
    assert not np.array_equal(a.curve.eval_return[-1], b.curve.eval_return[-1])


def test_save_load_round_trip(seeded, tmp_path):
    run = seeded.run
    run.save(tmp_path / "run")
    back = diffsim.load_run(tmp_path / "run")
    for a, b in zip(jax.tree.leaves(run.policy), jax.tree.leaves(back.policy), strict=True):
        np.testing.assert_array_equal(a, b)
    for field in ("env_steps", "wall_time", "eval_return"):
        np.testing.assert_array_equal(getattr(back.curve, field), getattr(run.curve, field))
    assert back.metrics.keys() == run.metrics.keys()
    np.testing.assert_array_equal(back.metrics["value_loss"], run.metrics["value_loss"])
    assert back.config == run.config
    table = pd.read_csv(tmp_path / "run" / "curve.csv")
    assert len(table) == 9 and {"seed", "env_steps", "wall_time", "return_mean", "return_3"} <= set(
        table
    )
    np.testing.assert_allclose(
        table["return_mean"], np.asarray(run.curve.eval_return).mean(-1).ravel(), rtol=1e-6
    )


def test_single_run_round_trip_and_policy_acts(reach, tmp_path):
    run = diffsim.train(TINY, reach, gaussian(reach), key=jr.key(3), **BUDGET)
    back = diffsim.load_run(run.save(tmp_path / "one"))
    obs = jnp.ones(reach.observation_size)
    np.testing.assert_array_equal(back.policy(obs), run.policy(obs))
    np.testing.assert_array_equal(back.curve.eval_return, run.curve.eval_return)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (
            {"total_steps": 60},
            r"total_steps=60 is less than half of one PPO iteration \(128 env steps\)",
        ),
        ({"total_steps": 0}, "total_steps must be a positive int, got 0"),
        ({"num_evals": 1}, r"num_evals must be an int >= 2 .*got 1"),
        ({"num_eval_episodes": 0}, "num_eval_episodes must be a positive int, got 0"),
    ],
)
def test_bad_budgets_rejected(reach, kwargs, match):
    args = {**BUDGET, **kwargs}
    with pytest.raises(ValueError, match=match):
        diffsim.train(TINY, reach, gaussian(reach), key=jr.key(0), **args)


def test_shape_mismatch_rejected(reach):
    wrong = diffsim.GaussianPolicy(4, 2, key=jr.key(0))
    with pytest.raises(
        ValueError, match=r"cannot act on one observation of shape \(6,\) from 'reach'"
    ):
        diffsim.train(TINY, reach, wrong, key=jr.key(0), **BUDGET)
    one_dim = diffsim.GaussianPolicy(6, 1, key=jr.key(0))
    with pytest.raises(
        ValueError, match=r"returns actions of shape \(1,\), but 'reach' takes \(2,\)"
    ):
        diffsim.train(TINY, reach, one_dim, key=jr.key(0), **BUDGET)


def test_not_a_strategy_rejected(reach):
    # Under pytest the jaxtyping import hook checks annotations first; users get ours.
    with pytest.raises(
        TypeError, match="strategy must be a diffsim strategy|typechecking parameter 'strategy'"
    ):
        diffsim.train("ppo", reach, gaussian(reach), key=jr.key(0), **BUDGET)


def test_log_dir_gets_one_json_line_per_evaluation(reach, tmp_path):
    run = diffsim.train(TINY, reach, gaussian(reach), key=jr.key(3), log_dir=tmp_path, **BUDGET)
    log = pd.read_json(tmp_path / "log.jsonl", lines=True)
    assert list(log["eval"]) == [0, 1, 2] and set(log["strategy"]) == {"PPO"}
    np.testing.assert_array_equal(log["env_steps"], run.curve.env_steps)
    np.testing.assert_allclose(log["eval_return_mean"], run.curve.eval_return.mean(-1), rtol=1e-5)
    np.testing.assert_allclose(log["train_seconds"], run.curve.wall_time, rtol=1e-4, atol=1e-4)
    assert np.isfinite(log["policy_loss_mean"][1:]).all()
    assert (np.diff(log["time"]) > 0).all()  # Unix seconds at each line, in order


def test_unwritable_log_dir_fails_before_compiling(reach, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(OSError, match="cannot write to"):
        diffsim.train(
            TINY, reach, gaussian(reach), key=jr.key(3), log_dir=blocker / "logs", **BUDGET
        )


def test_programs_are_released_near_the_memory_map_limit(seeded):
    """Kept programs and JAX's compiled functions stay below the share of Linux's map limit
    and are dropped above it (last in the module: it empties the caches)."""
    if not os.path.exists("/proc/self/maps"):
        pytest.skip("no /proc: the release is a no-op there")
    f = jax.jit(lambda x: jnp.sin(x) * 3.0)
    f(jnp.ones(3)).block_until_ready()
    kept = len(program.PROGRAMS)
    assert kept >= 1  # `seeded`'s run
    assert not program.release_programs(share=1.0)
    assert len(program.PROGRAMS) == kept and f._cache_size() == 1
    assert program.release_programs(share=0.0)
    assert len(program.PROGRAMS) == 0 and f._cache_size() == 0
