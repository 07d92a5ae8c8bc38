"""The examples of `docs/guides/extending.md` (`docs/examples/`), which use only public
names, train on the toy env "reach" and do what their docstrings say."""

import sys
from pathlib import Path

import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

import diffsim

sys.path.insert(0, str(Path(__file__).parents[1] / "docs" / "examples"))
from population_strategy import EliteMean  # noqa: E402
from window_strategy import DiscountedAPG  # noqa: E402


@pytest.fixture(scope="module")
def reach():
    return diffsim.make_env("reach")


def improves(strategy, env, total_steps: int) -> tuple[float, float]:
    """The mean evaluation return before training and after `total_steps` env steps."""
    policy = diffsim.DeterministicPolicy(env.observation_size, env.action_size, key=jr.key(1))
    run = diffsim.train(
        strategy, env, policy, key=jr.key(2), total_steps=total_steps, num_evals=3,
        num_eval_episodes=8, progress=False,
    )  # fmt: skip
    returns = np.asarray(run.curve.eval_return).mean(axis=-1)
    return float(returns[0]), float(returns[-1])


def test_the_window_strategy_learns_reach(reach):
    first, last = improves(DiscountedAPG(num_envs=8, horizon=16), reach, 6_000)
    assert last > first + 1.0, (first, last)


def test_the_window_strategy_without_discount_has_apgs_loss(reach):
    """With `discount=1` every step weighs alike: each env's loss is APG's."""
    policy = diffsim.DeterministicPolicy(reach.observation_size, reach.action_size, key=jr.key(0))
    ours, apg = (
        DiscountedAPG(discount=1.0, num_envs=4, horizon=8),
        diffsim.APG(num_envs=4, horizon=8),
    )
    env_state = ours.window.initial_env_state(reach, policy, key=jr.key(1))
    mine, _ = ours.env_losses(reach, policy, env_state, key=jr.key(2))
    theirs, _ = apg.env_losses(reach, policy, env_state, key=jr.key(2))
    np.testing.assert_allclose(mine, theirs, rtol=1e-6)
    half, window = DiscountedAPG(discount=0.5, num_envs=4, horizon=8).env_losses(
        reach, policy, env_state, key=jr.key(2)
    )
    weights = 0.5 ** jnp.arange(8)[:, None]
    np.testing.assert_allclose(half, -jnp.mean(weights * window.traj.reward, 0), rtol=1e-6)


def test_the_population_strategy_learns_reach(reach):
    strategy = EliteMean(population_size=16, num_elites=4, rollout_length=50, std=0.1)
    first, last = improves(strategy, reach, 24_000)
    assert last > first + 1.0, (first, last)


def test_the_examples_declare_float_sweepables():
    assert DiscountedAPG.sweepable == ("learning_rate", "discount", "max_grad_norm")
    assert EliteMean.sweepable == ("std",)
    env = diffsim.make_env("reach")
    policy = diffsim.DeterministicPolicy(env.observation_size, env.action_size, key=jr.key(0))
    with pytest.raises(ValueError, match=r"EliteMean.num_elites .* is not sweepable"):
        diffsim.train_sweep(
            EliteMean(), env, policy, sweep={"num_elites": [4.0]},
            keys=jr.split(jr.key(0), 1), total_steps=1,
        )  # fmt: skip
