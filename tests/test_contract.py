"""`train` checks the strategy contract (`AbstractStrategy`) and names what is broken.

Each broken strategy below is the valid `Counter` with one obligation violated.
"""

from typing import ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import AbstractTestStrategy, gaussian
from jaxtyping import Array, Int

import diffsim

BUDGET = dict(total_steps=40, num_evals=3, num_eval_episodes=2, progress=False)


class CounterState(eqx.Module):
    policy: eqx.Module
    count: Int[Array, ""]


class Counter(AbstractTestStrategy[CounterState]):
    """Counts its iterations and leaves the policy alone; reports `env_steps = report`."""

    sweepable: ClassVar[tuple[str, ...]] = ()
    report: int = 10
    least: int = 10

    def init(self, env, policy, *, key):
        return CounterState(policy, jnp.zeros((), jnp.int32))

    def step(self, env, state, *, key):
        metrics = {"count": state.count.astype(jnp.float32), "env_steps": jnp.int32(self.report)}
        return CounterState(state.policy, state.count + 1), metrics

    def policy(self, state):
        return state.policy

    @property
    def steps_per_iteration(self):
        return 10

    @property
    def min_steps_per_iteration(self):
        return self.least

    @property
    def batch_size(self):
        return 1


class WithArray(Counter):
    scale: jax.Array = eqx.field(default_factory=lambda: jnp.ones(3))


class VectorMetric(Counter):
    def step(self, env, state, *, key):
        state, metrics = super().step(env, state, key=key)
        return state, {**metrics, "loss": jnp.zeros(3)}


class ListMetrics(Counter):
    def step(self, env, state, *, key):
        state, metrics = super().step(env, state, key=key)
        return state, list(metrics.values())


class FloatCount(Counter):
    def step(self, env, state, *, key):
        state, metrics = super().step(env, state, key=key)
        return CounterState(state.policy, state.count.astype(jnp.float32)), metrics


class GrowingState(Counter):
    def init(self, env, policy, *, key):
        return {"policy": policy, "count": jnp.zeros((), jnp.int32)}

    def step(self, env, state, *, key):
        new = {**state, "count": state["count"] + 1, "extra": jnp.zeros(2)}
        return new, {"count": state["count"].astype(jnp.float32)}

    def policy(self, state):
        return state["policy"]


class FractionalSteps(Counter):
    @property
    def steps_per_iteration(self):
        return 10.5


@pytest.fixture(scope="module")
def reach():
    return diffsim.make_env("reach")


@pytest.fixture
def no_compiling(monkeypatch):
    """Fail the test if XLA is asked to compile anything."""

    def refuse(*args, **kwargs):
        raise AssertionError("XLA compiled before the contract was checked")

    monkeypatch.setattr(jax.stages.Lowered, "compile", refuse)


def train(strategy, env, **kwargs):
    return diffsim.train(
        strategy, env, gaussian(env), key=jax.random.key(0), **{**BUDGET, **kwargs}
    )


def test_a_valid_strategy_trains_with_its_own_step_counts(reach):
    run = train(Counter(report=7, least=5), reach)
    np.testing.assert_array_equal(run.metrics["count"], np.arange(len(run.metrics["count"])))
    np.testing.assert_array_equal(run.metrics["env_steps"], 7.0)
    assert int(run.curve.env_steps[-1]) == 7 * len(run.metrics["count"])
    assert abs(int(run.curve.env_steps[-1]) - 40) <= 7


@pytest.mark.parametrize(
    ("strategy", "error", "match"),
    [
        (
            WithArray(),
            TypeError,
            r"WithArray\.scale is an array of shape \(3,\), which is unhashable.*recompile on"
            r" every call.*Python float",
        ),
        (
            VectorMetric(),
            ValueError,
            r"VectorMetric\.step's metrics\['loss'\] is float32\[3\]; metrics must be a dict"
            r" from names to scalars",
        ),
        (ListMetrics(), TypeError, r"ListMetrics\.step must return metrics as a dict.*got list"),
        (
            FloatCount(),
            ValueError,
            r"FloatCount\.step changes its state \(init -> step\): state\.count int32\[\] ->"
            r" float32\[\]",
        ),
        (GrowingState(), ValueError, r"GrowingState\.step changes its state.*\['extra'\] appears"),
        (
            FractionalSteps(),
            ValueError,
            r"FractionalSteps\.steps_per_iteration must be a positive int, got 10\.5",
        ),
        (
            Counter(least=20),
            ValueError,
            r"Counter\.min_steps_per_iteration must be an int in \[1, steps_per_iteration = 10\],"
            r" got 20",
        ),
    ],
)
def test_a_broken_contract_is_named_before_compiling(reach, no_compiling, strategy, error, match):
    with pytest.raises(error, match=match):
        train(strategy, reach)


@pytest.mark.parametrize("report", [2, 20])
def test_env_steps_outside_the_bounds_are_an_error_not_a_short_segment(reach, report):
    with pytest.raises(
        ValueError,
        match=rf"Counter\.step reported metrics\['env_steps'\] = {report}, outside"
        r" \[min_steps_per_iteration, steps_per_iteration\] = \[5, 10\]",
    ):
        train(Counter(report=report, least=5), reach)
