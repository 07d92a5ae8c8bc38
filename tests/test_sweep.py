"""`train_sweep`: every config x seed in one program, each point equal to `train_seeds`."""

import dataclasses
import importlib
from typing import ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest
from conftest import AbstractTestStrategy, assert_same_arithmetic, deterministic, gaussian, outcome

import diffsim

APG = diffsim.APG(num_envs=4, horizon=25)
PPO = diffsim.PPO(num_envs=8, unroll_length=16, num_epochs=2, num_minibatches=4)
ES = diffsim.ES(population_size=8)
RATES = [3e-3, 1e-2, 3e-2]
SWEEP = {"std": [0.02, 0.1], "learning_rate": [0.01, 0.03, 0.1]}
LISTING = [
    {"std": std, "learning_rate": lr} for std in SWEEP["std"] for lr in SWEEP["learning_rate"]
]


def budget(strategy):
    return dict(
        total_steps=4 * strategy.steps_per_iteration,
        num_evals=3,
        num_eval_episodes=4,
        progress=False,
    )


@pytest.fixture(scope="module")
def keys():
    return jr.split(jr.key(0), 2)


@pytest.fixture(scope="module")
def es_sweep(envs, keys):
    env = envs("reach")
    make = lambda k: deterministic(env, k)
    return diffsim.train_sweep(ES, env, make, sweep=SWEEP, keys=keys, **budget(ES.for_env(env)))


def assert_same_runs(sweep_point, seeds_run):
    """One config of a sweep against `train_seeds`: the same arithmetic up to the order of
    float sums (`assert_same_arithmetic`), and final policies within 1e-3 of each other.
    Adam turns rounding in a near-zero gradient into a visible step, so four updates leave
    weights up to 6e-5 apart on this CPU (APG at 3e-2); a sweep point with another rate
    ends 0.3 (PPO) to 3.2 (APG) away."""
    assert_same_arithmetic(outcome(sweep_point), outcome(seeds_run))
    policies = (jax.tree.leaves(sweep_point.policy), jax.tree.leaves(seeds_run.policy))
    for a, b in zip(*policies, strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-3)


def point(run, c):
    """Config `c` of a sweep run, shaped as a `train_seeds` run."""
    return jax.tree.map(lambda x: x[c] if eqx.is_array(x) else x, run)


def test_shapes_and_listing_follow_configs_then_seeds(es_sweep):
    configs, seeds = len(LISTING), 2
    assert es_sweep.curve.eval_return.shape == (configs, seeds, 3, 4)
    assert es_sweep.curve.env_steps.shape == es_sweep.curve.wall_time.shape == (6, 2, 3)
    assert es_sweep.metrics["std"].shape == (configs, seeds, 4)
    for leaf in jax.tree.leaves(eqx.filter(es_sweep.policy, eqx.is_array)):
        assert leaf.shape[:2] == (configs, seeds)
    assert es_sweep.config["sweep"] == LISTING  # itertools.product: the last name fastest
    assert es_sweep.config["num_configs"] == configs and es_sweep.config["num_seeds"] == seeds
    assert es_sweep.config["hyperparameters"]["learning_rate"] == [0.01, 0.03, 0.1] * 2
    assert es_sweep.config["hyperparameters"]["population_size"] == 8
    # Each config runs with its own values: ES reports its search std every generation.
    stds = np.asarray(es_sweep.metrics["std"][:, :, 0])
    np.testing.assert_allclose(stds, np.repeat([[0.02], [0.1]], 3, axis=0).repeat(2, 1))


@pytest.mark.parametrize("c", [4])  # std 0.1, learning_rate 0.03: not the first config
def test_an_es_sweep_point_equals_train_seeds_with_those_values(es_sweep, envs, keys, c):
    env = envs("reach")
    strategy = dataclasses.replace(ES, **LISTING[c])
    make = lambda k: deterministic(env, k)
    alone = diffsim.train_seeds(strategy, env, make, keys=keys, **budget(ES.for_env(env)))
    assert_same_runs(point(es_sweep, c), alone)
    assert not np.allclose(es_sweep.curve.eval_return[0], alone.curve.eval_return)


def test_an_apg_sweep_point_equals_train_seeds_with_that_rate(envs, keys):
    env = envs("reach")
    make = lambda k: deterministic(env, k)
    run = diffsim.train_sweep(
        APG, env, make, sweep={"learning_rate": RATES}, keys=keys, **budget(APG)
    )
    assert run.config["sweep"] == [{"learning_rate": lr} for lr in RATES]
    alone = diffsim.train_seeds(
        dataclasses.replace(APG, learning_rate=RATES[2]), env, make, keys=keys, **budget(APG)
    )
    assert_same_runs(point(run, 2), alone)
    assert not np.allclose(run.curve.eval_return[0], alone.curve.eval_return)


def test_ppo_learning_rate_decay_starts_from_each_traced_rate(envs, keys):
    """PPO's `for_budget` decay (`optax.linear_schedule`) with a traced start."""
    env = envs("reach")
    make = lambda k: gaussian(env, k)
    rates = [1e-4, 3e-3]
    run = diffsim.train_sweep(
        PPO, env, make, sweep={"learning_rate": rates}, keys=keys, **budget(PPO)
    )
    assert run.config["hyperparameters"]["lr_decay_steps"] == 4 * PPO.steps_per_iteration
    alone = diffsim.train_seeds(
        dataclasses.replace(PPO, learning_rate=rates[1]), env, make, keys=keys, **budget(PPO)
    )
    assert_same_runs(point(run, 1), alone)


def test_shac_sweeps_over_discount_and_gradient_clip(envs, keys):
    """Fields that reach typed helpers (`gae`, the window loss, the optimiser) as traced
    scalars under the test-time type checker."""
    env = envs("reach")
    shac = diffsim.SHAC(num_envs=4, horizon=10, critic_epochs=1, critic_minibatches=1)
    sweep = {"discount": [0.9, 0.99], "max_grad_norm": [0.5, 2.0]}
    run = diffsim.train_sweep(
        shac, env, lambda k: deterministic(env, k), sweep=sweep, keys=keys, **budget(shac)
    )
    assert run.curve.eval_return.shape[:2] == (4, len(keys))
    assert np.all(np.isfinite(np.asarray(run.metrics["loss"])))


def test_a_sweep_round_trips_through_save_and_load(es_sweep, tmp_path):
    es_sweep.save(tmp_path / "sweep")
    header = (tmp_path / "sweep" / "curve.csv").read_text().splitlines()[0]
    assert header.startswith("config,seed,env_steps,")
    assert (tmp_path / "sweep" / "metrics.csv").read_text().startswith("config,seed,iteration,")
    back = diffsim.load_run(tmp_path / "sweep")
    arrays = lambda run: jax.tree.leaves(eqx.filter(run, eqx.is_array))
    for a, b in zip(arrays(back), arrays(es_sweep), strict=True):
        np.testing.assert_array_equal(a, b)
    assert back.config == es_sweep.config
    assert back.curve.eval_return.shape == (6, 2, 3, 4)


@pytest.fixture
def no_compiling(monkeypatch):
    """Fail the test if anything reaches the compiler."""

    def refuse(*args, **kwargs):
        raise AssertionError("compiled before rejecting the sweep")

    monkeypatch.setattr(importlib.import_module("diffsim._train.program"), "compile_run", refuse)


@pytest.mark.parametrize(
    "strategy, sweep, message",
    [
        (
            APG,
            {"learnig_rate": [1e-3]},
            r"no hyperparameter 'learnig_rate'.*sweepable.*learning_rate",
        ),
        (
            APG,
            {"num_envs": [4, 8]},
            r"num_envs .*not sweepable.*shapes or control flow.*train_seeds",
        ),
        (APG, {"stochastic": [0.0, 1.0]}, r"stochastic .*not sweepable"),
        (
            APG,
            {"adam_b1": [0.9]},
            r"APG.update.adam_b1 \(= 0.7\) is not sweepable: the fields of UpdateOptions"
            r".*replace\(strategy, update=dataclasses.replace\(strategy.update, adam_b1=v\)\)",
        ),
        (APG, {"remat": [1.0]}, r"APG.options.remat \(= False\) is not sweepable"),
        (PPO, {"value_hidden": [64.0]}, r"value_hidden .*not sweepable"),
        (diffsim.ES(), {"population_size": [8.0]}, r"population_size .*not sweepable"),
        (diffsim.ES(), {"algorithm": [1.0]}, r"algorithm .*not sweepable"),
        (APG, {"learning_rate": []}, r"sweep\['learning_rate'\] is empty"),
        (APG, {"learning_rate": [1e-3, -1.0]}, r"learning_rate must be a number > 0, got -1.0"),
        (PPO, {"discount": [0.9, 1.5]}, r"discount must be .*got 1.5"),
        (APG, {"learning_rate": ["fast"]}, r"holds 'fast'.*numbers"),
        (APG, {"learning_rate": 1e-3}, r"must be a list of numbers"),
        (APG, {}, r"non-empty dict.*learning_rate"),
    ],
)
def test_bad_sweeps_are_rejected_before_compiling(
    strategy, sweep, message, envs, keys, no_compiling
):
    env = envs("reach")
    policy = gaussian(env)
    with pytest.raises(ValueError, match=message):
        diffsim.train_sweep(strategy, env, policy, sweep=sweep, keys=keys, total_steps=10_000)


def test_a_field_not_in_sweepable_is_refused_before_compiling(envs, keys, no_compiling):
    """ES branches on `weight_decay` in Python (Adam or AdamW), so `ES.sweepable` leaves it
    out: sweeping it is refused at once, naming the value and listing what can vary."""
    env = envs("reach")
    with pytest.raises(ValueError) as caught:
        diffsim.train_sweep(
            diffsim.ES(population_size=8),
            env,
            deterministic(env),
            sweep={"weight_decay": [0.0, 0.1]},
            keys=keys,
            total_steps=3200,
        )
    assert str(caught.value) == (
        "ES.weight_decay (= 0.0) is not sweepable: it is not a float or it changes shapes or"
        " control flow, so each value needs its own compiled program. Loop over its values"
        " with train_seeds instead (for v in values:"
        " diffsim.train_seeds(dataclasses.replace(strategy, weight_decay=v), ...))."
        " What can vary: ES.sweepable = ('std', 'learning_rate')"
    )


class _BranchyState(eqx.Module):
    policy: eqx.Module


class _Branchy(AbstractTestStrategy[_BranchyState]):
    """Declares `scale` sweepable but branches on it in Python: a mistake `sweepable` cannot
    see, caught while tracing."""

    sweepable: ClassVar[tuple[str, ...]] = ("scale",)
    scale: float = 1.0

    steps_per_iteration = min_steps_per_iteration = batch_size = property(lambda self: 8)

    def init(self, env, policy, *, key):
        return _BranchyState(policy)

    def step(self, env, state, *, key):
        loss = 1.0 if self.scale > 0 else 0.0  # Python control flow on a swept field
        return state, {"loss": jnp.asarray(loss, jnp.float32)}

    def policy(self, state):
        return state.policy


def test_a_sweepable_float_used_in_control_flow_fails_while_tracing(envs, keys):
    env = envs("reach")
    with pytest.raises(ValueError, match=r"scale in Python control flow.*train_seeds"):
        diffsim.train_sweep(
            _Branchy(),
            env,
            deterministic(env),
            sweep={"scale": [0.0, 1.0]},
            keys=keys,
            total_steps=32,
            num_evals=2,
        )


def arrays(run) -> list[np.ndarray]:
    return [np.asarray(x) for x in jax.tree.leaves(eqx.filter(run, eqx.is_array))]


@pytest.mark.parametrize(
    "pick, shape, index",
    [
        (dict(config=4), (2, 3, 4), (4,)),
        (dict(config={"std": 0.1, "learning_rate": 0.03}), (2, 3, 4), (4,)),
        (dict(seed=1), (6, 1, 3, 4), (slice(None), slice(1, 2))),
        (dict(config=2, seed=0), (3, 4), (2, 0)),
    ],
    ids=["config-index", "config-values", "seed", "both"],
)
def test_select_run_picks_a_config_or_a_seed_and_round_trips(
    es_sweep, tmp_path, pick, shape, index
):
    one = diffsim.select_run(es_sweep, **pick)
    assert one.curve.eval_return.shape == shape
    whole = jax.tree.map(lambda x: x[index] if eqx.is_array(x) else x, es_sweep)
    for a, b in zip(arrays(one), arrays(whole), strict=True):
        np.testing.assert_array_equal(a, b)
    expected = {"config": index[0]} if "config" in pick else {}
    assert one.config["selected"] == {**expected, **{k: v for k, v in pick.items() if k == "seed"}}
    back = diffsim.load_run(one.save(tmp_path / "one"))
    for a, b in zip(arrays(back), arrays(one), strict=True):
        np.testing.assert_array_equal(a, b)
    assert back.config == one.config


def test_a_selected_config_reads_as_train_seeds_with_its_values(es_sweep):
    one = diffsim.select_run(es_sweep, config={"learning_rate": 0.03, "std": 0.02})
    assert one.config["hyperparameters"]["learning_rate"] == 0.03
    assert one.config["hyperparameters"]["std"] == 0.02
    assert "sweep" not in one.config and one.config["num_seeds"] == 2
    single = diffsim.select_run(one, seed=1)
    assert single.config["num_seeds"] is None
    assert single.config["selected"] == {"config": 1, "seed": 1}
    assert single.curve.eval_return.shape == (3, 4)


@pytest.mark.parametrize(
    "pick, message",
    [
        (dict(config=6), r"config=6 is out of range: this run has 6 configs \[0, 6\)"),
        (dict(config=-1), r"config=-1 is out of range"),
        (dict(seed=2), r"seed=2 is out of range: this run has 2 seeds"),
        (dict(config={"lr": 0.1}), r"names 'lr', which the sweep does not vary; it varies: std"),
        (dict(config={"std": 0.5}), r"matches no configuration; the sweep's configurations"),
        (dict(config={"std": 0.1}), r"matches 3 configurations.*every swept name"),
        (dict(seed=True), r"seed must be an int index in \[0, 2\), got True"),
    ],
)
def test_select_run_names_the_bad_value(es_sweep, pick, message):
    with pytest.raises(ValueError, match=message):
        diffsim.select_run(es_sweep, **pick)


def test_select_run_refuses_what_the_run_does_not_have(es_sweep):
    seeds = diffsim.select_run(es_sweep, config=0)
    with pytest.raises(ValueError, match=r"config=0, but this run is not a sweep"):
        diffsim.select_run(seeds, config=0)
    with pytest.raises(ValueError, match=r"seed=0, but this is a single run"):
        diffsim.select_run(diffsim.select_run(seeds, seed=0), seed=0)


def test_a_sweep_plots_one_iqm_band_per_config(es_sweep):
    from matplotlib.collections import PolyCollection

    from diffsim.plotting import learning_curves
    from diffsim.stats import iqm_ci

    ax = learning_curves({"ES": es_sweep}).axes[0]
    lines, bands = ax.get_lines(), [c for c in ax.collections if isinstance(c, PolyCollection)]
    assert [line.get_label() for line in lines] == [
        f"ES std={c['std']:g} learning_rate={c['learning_rate']:g}" for c in LISTING
    ]
    assert len(bands) == len(LISTING)
    for c, (line, band) in enumerate(zip(lines, bands, strict=True)):
        scores = np.asarray(es_sweep.curve.eval_return[c]).mean(-1)  # (seeds, E)
        mid, low, high = iqm_ci(scores)
        xs = np.median(np.asarray(es_sweep.curve.env_steps[c], float), axis=0)
        np.testing.assert_allclose(line.get_xdata(), xs)
        np.testing.assert_allclose(line.get_ydata(), mid, rtol=1e-6)
        outline = band.get_paths()[0].vertices  # fill_between: along `high`, back along `low`
        for x, lo, hi in zip(xs, low, high, strict=True):
            at = outline[np.isclose(outline[:, 0], x)][:, 1]
            np.testing.assert_allclose([at.min(), at.max()], [lo, hi], rtol=1e-6)


def test_diffsim_plot_draws_a_saved_sweep(es_sweep, tmp_path, capsys):
    from diffsim import cli

    folder = es_sweep.save(tmp_path / "sweep")
    for x in ("env_steps", "final"):
        out = tmp_path / f"{x}.png"
        assert cli.main(["plot", str(folder), "-o", str(out), "--x", x]) == 0
        assert out.stat().st_size > 0
    assert "wrote" in capsys.readouterr().out


def test_seed_statistics_of_a_whole_sweep_say_to_select_a_config(es_sweep):
    with pytest.raises(ValueError, match=r"leading axes \(6, 2\).*select_run\(run, config=c\)"):
        diffsim.stats.threshold_crossing(es_sweep, 0.0)
    one = diffsim.select_run(es_sweep, config=0)
    assert set(diffsim.stats.threshold_crossing(one, -1e9)) == {"env_steps", "wall_time"}
