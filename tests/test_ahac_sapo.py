"""AHAC's per-env gradient cut and stiffness signals, the critic ensembles of AHAC and SAPO,
and SAPO's checks. The contract (learning, no recompile, vmap over seeds, bad values) is
`test_conformance.py`'s."""

import dataclasses
import types
from typing import cast

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax
import pytest
from brax.envs.base import State
from conftest import deterministic, gaussian

import diffsim
from diffsim import Env
from diffsim.strategies._window.critic import CriticBatch, fit_critic
from diffsim.strategies._window.ensemble import ValueEnsemble
from diffsim.strategies._window.stiffness import (
    SIGNAL,
    StiffnessCut,
    segment_ends,
    stiffness,
    with_signal_slots,
)


@pytest.fixture(scope="module")
def reach():
    return diffsim.make_env("reach")


def _start(env, num_envs=2, length=8):
    return with_signal_slots(diffsim.reset(env, key=jr.key(0), num_envs=num_envs), length)


def test_window_options_keep_each_strategys_own_defaults():
    """The settings modules hold only what every strategy defaults alike: setting one of
    them keeps AHAC's and SAPO's published valve, decay and sampling."""
    remat = diffsim.WindowOptions(remat=True)
    for strategy in (diffsim.AHAC(options=remat), diffsim.SAPO(options=remat)):
        assert strategy.options.remat is True
        assert strategy.valve_max_norm == 100.0 and strategy.window.valve_max_norm == 100.0
        assert strategy.lr_decay is True and strategy.stochastic is True
    assert diffsim.SAPO(options=remat).max_grad_norm == 0.5


def test_cut_leaves_forward_values_unchanged(reach):
    policy = deterministic(reach)
    bare = diffsim.reset(reach, key=jr.key(0), num_envs=2)
    _, plain = diffsim.rollout(reach, policy, bare, key=jr.key(1), length=8)
    cut = cast(Env, StiffnessCut(reach, threshold=0.0, period=3, length=8))  # all "stiff"
    end, traj = diffsim.rollout(cut, policy, _start(reach), key=jr.key(1), length=8)
    for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(traj), strict=True):
        np.testing.assert_array_equal(a, b)
    assert end.info[SIGNAL].shape == (2, 8)
    np.testing.assert_array_equal(end.info["stiffness_step"], 0)  # back at the window start


@pytest.mark.parametrize("threshold, period, flows", [(1e9, 8, True), (0.0, 8, False)])
def test_cut_stops_the_gradient_through_the_state(reach, threshold, period, flows):
    """The last reward's gradient in the first action's perturbation reaches it only
    where no step in between was cut."""
    policy = deterministic(reach)
    start = _start(reach, num_envs=1, length=4)
    cut = cast(Env, StiffnessCut(reach, threshold=threshold, period=period, length=4))

    def last_reward(x):
        state = dataclasses.replace(start, obs=start.obs + x)
        state = dataclasses.replace(
            state, pipeline_state=jax.tree.map(lambda p: p + x[0, 0], state.pipeline_state)
        )
        _, traj = diffsim.rollout(cut, policy, state, key=jr.key(0), length=4)
        return traj.reward[-1].sum()

    grad = jax.grad(last_reward)(jnp.zeros_like(cast(jax.Array, start.obs)))
    assert bool(jnp.any(grad != 0)) == flows


def test_segment_ends_at_stiff_steps_and_periods():
    signal = jnp.array([[0.0], [900.0], [0.0], [0.0], [0.0], [0.0]])
    cut, stiff = segment_ends(signal, threshold=500.0, period=4)
    np.testing.assert_array_equal(cut[:, 0], [False, True, False, True, False, False])
    np.testing.assert_array_equal(stiff[:, 0], [False, True, False, False, False, False])


def _state(pipeline, obs=(0.0, 0.0), done=0.0, **info):
    return State(
        pipeline_state=pipeline,  # pyright: ignore[reportArgumentType]
        obs=jnp.asarray(obs),
        reward=jnp.zeros(()),
        done=jnp.asarray(done),
        info=info,
    )


def test_stiffness_signal_of_each_backend():
    mjx = types.SimpleNamespace(qfrc_constraint=jnp.array([3.0, 4.0]))
    generalized = types.SimpleNamespace(qf_constraint=jnp.array([6.0, 8.0]), qd=jnp.zeros(2))
    spring0, spring1 = (types.SimpleNamespace(qd=jnp.array(v)) for v in ([0.0, 0.0], [0.0, 2.0]))
    toy = {"x": jnp.zeros(2)}
    before = _state(toy, obs=(0.0, 0.0))
    assert stiffness(before, _state(mjx), dt=0.5) == 5.0  # pyright: ignore[reportArgumentType]
    assert stiffness(before, _state(generalized), dt=0.5) == 10.0  # pyright: ignore[reportArgumentType]
    assert stiffness(_state(spring0), _state(spring1), dt=0.5) == 4.0  # pyright: ignore[reportArgumentType]
    assert stiffness(before, _state(toy, final_obs=jnp.array([0.0, 3.0])), dt=0.5) == 3.0  # pyright: ignore[reportArgumentType]
    assert stiffness(before, _state(mjx, done=1.0), dt=0.5) == 0.0  # pyright: ignore[reportArgumentType]


def test_ensemble_fits_every_critic():
    critics = ValueEnsemble(
        3,
        num=3,
        hidden=(16,),
        activation="mish",
        layer_norm=True,
        norm_after_activation=True,
        key=jr.key(0),
    )
    obs = jr.normal(jr.key(1), (64, 3))
    assert critics(obs[0]).shape == (3,)
    assert critics.min(obs[0]) <= critics.mean(obs[0])
    batch = CriticBatch(obs=obs, target=jnp.sum(obs, 1), weight=jnp.ones(64))
    optimizer = optax.adam(1e-2)
    opt_state = optimizer.init(eqx.filter(critics, diffsim.trainable(critics)))
    fitted, _, _ = fit_critic(
        critics,
        opt_state,
        batch,
        jnp.asarray(True),
        key=jr.key(2),
        optimizer=optimizer,
        epochs=50,
        minibatches=2,
    )
    before = jnp.mean((jax.vmap(critics)(obs) - batch.target[:, None]) ** 2, 0)
    after = jnp.mean((jax.vmap(fitted)(obs) - batch.target[:, None]) ** 2, 0)
    assert bool(jnp.all(after < 0.5 * before)), (before, after)


def test_ahac_lengthens_its_horizon_without_stiffness(reach):
    """On a contact-free env the dual step lengthens the horizon from `horizon_min`."""
    ahac = diffsim.AHAC(
        num_envs=2,
        horizon=8,
        horizon_min=2,
        horizon_lr=0.01,
        critic_epochs=1,
        critic_minibatches=1,
        value_hidden=(8,),
        lr_decay=False,
    )
    policy = gaussian(reach)
    state = ahac.init(reach, policy, key=jr.key(0))
    state, metrics = jax.jit(lambda s: ahac.step(reach, s, key=jr.key(1)))(state)
    assert float(metrics["horizon"]) == 2.0
    assert float(state.horizon) > 2.0
    assert float(metrics["window_length"]) == pytest.approx(2.0)
    assert float(metrics["cut_windows"]) == 0.0
    assert float(metrics["env_steps"]) == 16.0


def test_sapo_needs_a_policy_with_a_density(reach):
    with pytest.raises(ValueError, match="SAPO needs a policy with sample"):
        diffsim.SAPO(num_envs=2, horizon=8).check(reach, deterministic(reach))
    diffsim.SAPO(num_envs=2, horizon=8).check(reach, gaussian(reach))


@pytest.mark.parametrize(
    "make, field, value",
    [
        (diffsim.AHAC, "horizon_min", 100),
        (diffsim.AHAC, "value_activation", "swish"),
        (diffsim.SAPO, "num_critics", 0),
        (diffsim.SAPO, "critic_minibatches", 3),
    ],
)
def test_bad_settings_are_refused(make, field, value):
    with pytest.raises(ValueError, match=field):
        make(**{field: value})
