"""Conformance: every registered strategy keeps the contract of `diffsim.AbstractStrategy`.

The strategies come from the registry (`diffsim.strategies.registry.strategies()`), so a
new one is checked as soon as it is registered; `TOY` gives each a tiny configuration
that learns the toy "reach" task, and a registered strategy missing from `TOY` fails.
The runs are made once per strategy (the `runs` fixture) and shared by the checks; the
4-device checks run in one child process (XLA's device count is fixed when JAX starts),
started with the first strategy's runs so that it works alongside them.
"""

import dataclasses
import json
import os
import subprocess
import sys
import textwrap
import typing
from collections.abc import Callable
from pathlib import Path

import equinox as eqx
import jax
import jax.random as jr
import numpy as np
import pytest
from conftest import (
    COMPILE,
    FOUR_DEVICES,
    TRACE,
    NaNReach,
    assert_same_arithmetic,
    compiles,
    deterministic,
    gaussian,
    outcome,
)

import diffsim
from diffsim._train import checkpoint as _checkpoint


@dataclasses.dataclass(frozen=True)
class Toy:
    """A strategy's settings for these checks: `strategy` (small; its batch divides over 4
    devices), `policy(env, key)`, an env-step budget in which it learns "reach", one
    hyperparameter with a value the strategy must refuse, values for the sweepable fields
    whose default is None (a sweep needs numbers), and the float fields that cannot be
    swept (each with the reason; `sweepable` must leave them out)."""

    strategy: diffsim.AbstractStrategy
    policy: Callable
    total_steps: int
    invalid: tuple[str, typing.Any]
    sweep_values: dict = dataclasses.field(default_factory=dict)
    untraceable: dict = dataclasses.field(default_factory=dict)


WINDOW = dict(num_envs=8, horizon=16)  # the differentiated windows of APG, SHAC, AHAC, SAPO
CRITIC = dict(WINDOW, critic_epochs=2, critic_minibatches=2)  # SHAC's, AHAC's, SAPO's fit


def windowed(strategy, policy, invalid, **sweep_values) -> Toy:
    """The `Toy` of a strategy with a differentiated window: 10k env steps, and
    `sweep_values` for its sweepable fields whose default is None."""
    return Toy(strategy, policy, 10_000, invalid=invalid, sweep_values=sweep_values)


TOY = {
    "ppo": Toy(
        diffsim.PPO(num_envs=16, unroll_length=32, num_epochs=4, num_minibatches=8),
        gaussian,
        50_000,  # learns "reach" by 58-84% of the untrained return (6 seeds)
        invalid=("num_epochs", 0),
        sweep_values={"value_clip": 1.0},
    ),
    "apg": windowed(diffsim.APG(**WINDOW), deterministic, ("horizon", -1), valve_max_norm=10.0),
    "shac": windowed(diffsim.SHAC(**CRITIC), deterministic, ("discount", 0.0), valve_max_norm=10.0),
    "ahac": windowed(
        diffsim.AHAC(**CRITIC, horizon_min=4, value_hidden=(32, 32)),
        gaussian,
        ("contact_threshold", -1.0),
    ),
    "sapo": windowed(diffsim.SAPO(**CRITIC), gaussian, ("target_entropy_scale", 0.0)),
    "es": Toy(
        diffsim.ES(population_size=8, rollout_length=50),
        deterministic,
        40_000,
        invalid=("std", -0.1),
        untraceable={"weight_decay": "ES picks AdamW or Adam by whether weight_decay is 0"},
    ),
    "guided-es": Toy(
        diffsim.GuidedES(
            population_size=8, rollout_length=50, gradient=diffsim.APGWindow(num_envs=4, horizon=10)
        ),
        deterministic,
        40_000,
        invalid=("population_size", 0),
    ),
    "reinforce": Toy(
        diffsim.REINFORCE(),
        gaussian,
        50_000,  # learns "reach" by 42-65% of the untrained return (6 seeds)
        invalid=("learning_rate", -1.0),
    ),
}
NAMES = sorted(diffsim.strategies.registry.strategies())
NUM_EVALS, EPISODES = 3, 8


def toy(name: str) -> Toy:
    if name not in TOY:
        pytest.fail(f"strategy {name!r} is registered but has no settings in TOY: add them")
    return TOY[name]


def float_fields(strategy) -> list[str]:
    """The fields `train_sweep` could trace: annotated `float`, alone or in a union."""
    kinds = {f.name: f.type for f in dataclasses.fields(strategy) if not f.metadata.get("static")}
    return [n for n, kind in kinds.items() if kind is float or float in typing.get_args(kind)]


def budget(toy: Toy) -> dict:
    return dict(
        total_steps=toy.total_steps,
        num_evals=NUM_EVALS,
        num_eval_episodes=EPISODES,
        progress=False,
    )


KEYS = jr.split(jr.key(7), 2)


def train_one(t: Toy, env, make: Callable, **kwargs) -> diffsim.Run:
    """Seed 1 of `train_seeds(..., keys=KEYS)` (`make`: key -> policy), trained alone."""
    return diffsim.train(t.strategy, env, make, key=KEYS[1], seed_index=1, **budget(t), **kwargs)


def leaves(tree) -> list[np.ndarray]:
    return [np.asarray(x) for x in jax.tree.leaves(eqx.filter(tree, eqx.is_array))]


def assert_same_run(a: diffsim.Run, b: diffsim.Run, **tolerance) -> None:
    np.testing.assert_array_equal(a.curve.env_steps, b.curve.env_steps)
    np.testing.assert_allclose(a.curve.eval_return, b.curve.eval_return, **tolerance)
    for x, y in zip(leaves(a.policy), leaves(b.policy), strict=True):
        np.testing.assert_allclose(x, y, **tolerance)


# --- the 4-device child: trains every strategy as `runs` trains `one`, on 4 devices ------

CHILD = textwrap.dedent(
    """
    import json, sys, traceback
    import jax, numpy as np
    sys.path.insert(0, sys.argv[1])
    import diffsim
    from conftest import outcome
    from test_conformance import NAMES, toy, train_one

    assert jax.device_count() == 4, jax.devices()
    env = diffsim.make_env("reach")
    out = {}
    for name in NAMES:
        try:
            t = toy(name)
            run = train_one(t, env, lambda k: t.policy(env, k))
            np.savez(f"{name}.npz", **outcome(run))
            out[name] = {"mesh": run.config["mesh"]}
        except Exception:
            out[name] = {"error": traceback.format_exc()[-3000:]}
    print(json.dumps(out))
    """
)


class Child:
    """The 4-device child process; `result()` waits for it and returns, per strategy, the
    run's mesh or the error it raised."""

    def __init__(self, folder: Path):
        (folder / "child.py").write_text(CHILD)
        self.folder, self.out = folder, None
        tests = Path(__file__).parent
        path = os.pathsep.join([str(tests.parent), os.environ.get("PYTHONPATH", "")])
        env = {
            **os.environ,
            "XLA_FLAGS": FOUR_DEVICES,
            "PYTHONPATH": path,
        }  # this checkout's diffsim
        self.process = subprocess.Popen(
            [sys.executable, "child.py", str(tests)],
            cwd=folder,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def result(self) -> dict:
        if self.out is None:
            out, err = self.process.communicate(timeout=1800)
            assert self.process.returncode == 0, err[-3000:]
            self.out = json.loads(out.strip().splitlines()[-1])
        return self.out


@pytest.fixture(scope="module")
def child(tmp_path_factory):
    child = Child(tmp_path_factory.mktemp("four_devices"))
    yield child
    if child.process.poll() is None:
        child.process.kill()
        child.process.communicate()


# --- the shared runs of one strategy ------------------------------------------------------


@pytest.fixture(scope="module", params=NAMES)
def name(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def reach():
    return diffsim.make_env("reach")


class Runs(typing.NamedTuple):
    toy: Toy
    seeds: diffsim.Run  # train_seeds over `keys`
    one: diffsim.Run  # train(key=keys[1], seed_index=1)
    again: diffsim.Run  # the same call once more
    resumed: diffsim.Run  # stopped after its first checkpoint, then resumed
    first: typing.Any  # traces and compiles of `one`
    counts: typing.Any  # of `again`, the interrupted call and the resume


@pytest.fixture(scope="module")
def runs(name, reach, child, tmp_path_factory) -> Runs:
    del child  # started: it trains while this process does
    t = toy(name)
    make = lambda k: t.policy(reach, k)  # one object: a new function would be a new program
    seeds = diffsim.train_seeds(t.strategy, reach, make, keys=KEYS, **budget(t))
    with compiles() as first:
        one = train_one(t, reach, make)
    ckpt = tmp_path_factory.mktemp(f"ckpt-{name}")
    save = _checkpoint.save

    def save_then_stop(root, index, *args):
        save(root, index, *args)
        raise KeyboardInterrupt  # the process dies right after its first checkpoint

    with compiles() as counts:
        again = train_one(t, reach, make)
        with pytest.MonkeyPatch.context() as patch, pytest.raises(KeyboardInterrupt):
            patch.setattr(_checkpoint, "save", save_then_stop)
            train_one(t, reach, make, checkpoint_dir=ckpt)
        resumed = train_one(t, reach, make, resume_from=ckpt)
    assert [p.name for p in ckpt.iterdir()] == ["ckpt-000001"]
    yield Runs(t, seeds, one, again, resumed, first, counts)
    jax.clear_caches()  # the next strategy compiles its own programs


# --- the checks ---------------------------------------------------------------------------


def test_every_toy_setting_is_a_registered_strategy():
    assert set(TOY) <= set(NAMES), f"TOY has unregistered names: {set(TOY) - set(NAMES)}"
    for name, t in TOY.items():
        assert type(t.strategy) is diffsim.strategies.registry.resolve(name)


def test_learns_the_toy_task(runs):
    """The final evaluation beats the untrained policy's (the first one, same episodes)
    clearly, pooled over seeds and episodes."""
    returns = np.asarray(runs.seeds.curve.eval_return)  # [S, E, episodes]
    untrained, final = returns[:, 0].mean(), returns[:, -1].mean()
    assert final > untrained + 0.2 * abs(untrained), (untrained, final)


def test_second_identical_call_compiles_nothing(runs):
    """The first call compiled its programs (start, segment, evaluate); the same call
    again, interrupted, and resumed reuse them: no trace of them, no XLA compile."""
    assert runs.first[COMPILE] >= 3, dict(runs.first)
    assert runs.counts[COMPILE] == 0, dict(runs.counts)
    assert runs.counts[TRACE] < runs.first[TRACE], (dict(runs.first), dict(runs.counts))
    assert_same_run(runs.again, runs.one, rtol=0, atol=0)


def test_a_seed_of_train_seeds_is_train(runs):
    seed = jax.tree.map(lambda x: x[1] if eqx.is_array(x) else x, runs.seeds)
    assert_same_arithmetic(outcome(seed), outcome(runs.one))
    assert not np.allclose(runs.seeds.curve.eval_return[0], runs.seeds.curve.eval_return[1])


def test_budget_is_exact_within_one_iteration(runs, reach):
    """The run ends within half an iteration of `total_steps`, and every evaluation within
    half an iteration of its evenly spaced target."""
    per_iter = runs.toy.strategy.for_env(reach).steps_per_iteration
    total = runs.toy.total_steps
    steps = np.asarray(runs.seeds.curve.env_steps)  # [S, E]
    assert runs.seeds.config["total_steps_requested"] == total
    assert abs(runs.seeds.config["total_steps"] - total) <= per_iter / 2
    np.testing.assert_array_equal(steps.max(0)[-1], runs.seeds.config["total_steps"])
    targets = np.linspace(0, total, NUM_EVALS)
    assert np.all(np.abs(steps - targets) <= per_iter / 2), (steps, targets)


def test_env_steps_stay_within_bounds(runs, reach):
    strategy = runs.toy.strategy.for_env(reach).for_budget(runs.toy.total_steps)
    steps = np.asarray(runs.seeds.metrics["env_steps"])  # [S, iterations], NaN-padded
    ran = steps[np.isfinite(steps)]
    assert ran.size >= len(KEYS) * (NUM_EVALS - 1)
    assert ran.min() >= strategy.min_steps_per_iteration
    assert ran.max() <= strategy.steps_per_iteration
    np.testing.assert_array_equal(np.nansum(steps, -1), runs.seeds.curve.env_steps[:, -1])


def test_for_env_and_for_budget_are_idempotent(name, reach):
    strategy = toy(name).strategy
    once = strategy.for_env(reach)
    assert once.for_env(reach) == once
    budgeted = once.for_budget(12_345)
    assert budgeted.for_budget(12_345) == budgeted
    for size in ("steps_per_iteration", "min_steps_per_iteration", "batch_size"):
        assert getattr(budgeted, size) == getattr(once, size), size


def test_sweepable_names_float_fields_that_exist(name):
    """`sweepable` is a class variable (no field, so no part of the study's key) naming,
    once each, fields that exist and are floats (what `train_sweep` traces); the floats it
    leaves out are those `TOY` says cannot be traced, and sweeping one is refused at once."""
    t = toy(name)
    cls = type(t.strategy)
    fields = [f.name for f in dataclasses.fields(cls)]
    assert "sweepable" not in fields and isinstance(cls.sweepable, tuple)
    assert len(set(cls.sweepable)) == len(cls.sweepable), cls.sweepable
    assert set(cls.sweepable) <= set(fields), set(cls.sweepable) - set(fields)
    assert set(cls.sweepable) <= set(float_fields(t.strategy)), cls.sweepable
    assert set(float_fields(t.strategy)) - set(cls.sweepable) == set(t.untraceable)
    for field in t.untraceable:
        with pytest.raises(ValueError, match=f"{cls.__name__}.{field} .* is not sweepable"):
            diffsim.train_sweep(
                t.strategy,
                diffsim.make_env("reach"),
                t.policy,
                sweep={field: [0.1]},
                keys=KEYS,
                total_steps=1,
            )


def test_bad_hyperparameter_is_refused_naming_it(name):
    """The strategy's `__check_init__` refuses the value, naming the field and the value,
    before anything compiles (constructing the strategy is all it takes)."""
    strategy = toy(name).strategy
    field, value = toy(name).invalid
    kwargs = {f.name: getattr(strategy, f.name) for f in dataclasses.fields(strategy)}
    with pytest.raises(ValueError, match=f"{field}.*{value}"):
        type(strategy)(**{**kwargs, field: value})


def test_resumes_from_a_checkpoint_to_the_same_result(runs):
    assert_same_run(runs.resumed, runs.one, rtol=0, atol=0)
    for metric, values in runs.one.metrics.items():
        np.testing.assert_array_equal(runs.resumed.metrics[metric], values)


def test_save_load_round_trip(runs, tmp_path):
    back = diffsim.load_run(runs.seeds.save(tmp_path / "run"))
    assert_same_run(back, runs.seeds, rtol=0, atol=0)
    np.testing.assert_array_equal(back.curve.wall_time, runs.seeds.curve.wall_time)
    assert back.metrics.keys() == runs.seeds.metrics.keys()
    for metric, values in runs.seeds.metrics.items():
        np.testing.assert_array_equal(back.metrics[metric], values)
    assert back.config == runs.seeds.config


def test_runs_on_four_devices_with_the_same_result(runs, child, name):
    """`train` splits the strategy's batch over 4 devices and gives the 1-device result,
    up to float reassociation (a mean over 4 devices sums in another order): exact at the
    start, statistically at the end (`assert_same_arithmetic`). A wrong split (a quarter of
    the batch, one device's gradient) changes the first update at once."""
    assert child.result()[name] == {"mesh": {"seeds": 1, "batch": 4}}
    four = dict(np.load(child.folder / f"{name}.npz"))
    assert_same_arithmetic(four, outcome(runs.one))


COUNTERS = ("diverged", "nonfinite_members", "masked_envs", "skipped_updates")


@pytest.fixture(scope="module")
def nan_sweep(name) -> tuple[diffsim.Run, dict]:
    """`train_sweep` over every float field at once (one value each), on "reach" with a
    reward that is NaN wherever the point is right of x = 0.5 (where a quarter of the
    episodes start). One program serves the sweep and the NaN checks."""
    t = toy(name)
    env = diffsim.envs.AutoResetEnv(NaNReach(), 100, name="nan_reach")
    names = type(t.strategy).sweepable
    values = {n: t.sweep_values.get(n, getattr(t.strategy, n)) for n in names}
    assert names and all(isinstance(v, float) for v in values.values()), values
    args = dict(keys=KEYS, num_evals=2, num_eval_episodes=4, progress=False)
    args["total_steps"] = 4 * t.strategy.for_env(env).steps_per_iteration
    make = lambda k: t.policy(env, k)
    sweep = {n: [v] for n, v in values.items()}
    return diffsim.train_sweep(t.strategy, env, make, sweep=sweep, **args), sweep


def test_sweep_traces_every_sweepable_field(nan_sweep):
    """Every field the strategy declares sweepable arrives as a traced value, and the run
    completes."""
    run, sweep = nan_sweep
    assert run.config["sweep"] == [{n: v[0] for n, v in sweep.items()}]
    assert run.curve.eval_return.shape == (1, len(KEYS), 2, 4)
    for field, (value,) in sweep.items():
        assert run.config["hyperparameters"][field] == [value]


def test_survives_nan_rewards(nan_sweep):
    """The run finishes with finite parameters and returns, and the strategy reports the
    non-finite steps it met or the updates it dropped."""
    run, _ = nan_sweep
    assert all(np.all(np.isfinite(x)) for x in leaves(run.policy))
    assert np.all(np.isfinite(np.asarray(run.curve.eval_return)))
    counted = {c: float(np.nansum(run.metrics[c])) for c in COUNTERS if c in run.metrics}
    assert sum(counted.values()) > 0, f"none of {COUNTERS} counted anything: {counted}"
