"""`studies/ant_trot.py`: Brax's ant rewarded for tracking a reference trot, the contact
study's env with a dense, differentiable reward. One spring compile (slow)."""

import sys
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

import diffsim

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "studies"))
import ant_trot  # noqa: E402  (registers "ant_trot" with Brax)


def test_the_reference_is_a_trot_inside_the_joint_ranges():
    env = ant_trot.AntTrot.__new__(ant_trot.AntTrot)  # the reference needs no physics
    env.frequency, env.hip_amplitude, env.ankle_amplitude = 2.0, 0.35, 0.25
    times = jnp.linspace(0.0, 1.0, 41)
    ref = np.asarray(jax.vmap(env.reference)(times)).reshape(-1, 4, 2)  # (time, leg, joint)
    hips, ankles = ref[..., 0], ref[..., 1]
    np.testing.assert_allclose(hips[:, 0], hips[:, 2], atol=1e-6)  # diagonal pairs together
    np.testing.assert_allclose(hips[:, 1], -hips[:, 0], atol=1e-6)  # half a cycle apart
    assert np.abs(hips).max() == pytest.approx(0.35, abs=1e-3) and np.abs(hips).max() < 0.52
    assert np.abs(ankles).min() > 0.52 and np.abs(ankles).max() < 1.22  # ant.xml's ranges
    np.testing.assert_allclose(np.sign(ankles[0]), [1, -1, -1, 1])
    np.testing.assert_allclose(ref[0], ref[20], atol=1e-5)  # period 1 / frequency = 0.5 s


def test_bad_settings_are_refused_before_anything_builds():
    with pytest.raises(ValueError, match="width must be a number > 0, got 0.0"):
        diffsim.make_env("ant_trot", width=0.0)


@pytest.mark.slow
def test_ant_trot_rewards_tracking_and_its_window_has_a_finite_gradient(key):
    env = diffsim.make_env("ant_trot")
    assert (env.observation_size, env.action_size, env.episode_length) == (29, 8, 1000)
    apg = diffsim.APG(num_envs=2, horizon=4)
    policy = diffsim.DeterministicPolicy(29, 8, key=jr.key(1))
    state = apg.window.initial_env_state(env, policy, key=key)
    phase = 2 * np.pi * np.asarray(state.info["time"])  # the reference's phase, 1 cycle/s
    np.testing.assert_allclose(
        state.obs[:, -2:], np.stack([np.sin(phase), np.cos(phase)], -1), atol=1e-4
    )

    params, static = eqx.partition(policy, diffsim.trainable(policy))
    loss = lambda p: apg.loss(env, eqx.combine(p, static), state, key=key)
    (value, window), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    reward, q = np.asarray(window.traj.reward), np.asarray(window.env_state.pipeline_state.q)
    assert reward.shape == (4, 2) and np.all((reward > 0) & (reward <= 1))
    # the last step's reward is the tracking of the last state's joints, 4 x 0.05 s later
    end = np.asarray(window.env_state.info["time"])
    np.testing.assert_allclose(end, np.asarray(state.info["time"]) + 0.2, atol=1e-5)
    ref = np.asarray(jax.vmap(env.env.reference)(jnp.asarray(end)))  # the wrapped AntTrot
    want = np.exp(-np.sum((q[:, 7:] - ref) ** 2, -1) / 0.25)
    np.testing.assert_allclose(reward[-1], want, rtol=1e-4)
    np.testing.assert_allclose(float(value), -reward.mean(), rtol=1e-5)
    norms = [float(jnp.linalg.norm(g)) for g in jax.tree.leaves(grads)]
    assert all(np.isfinite(norms)) and max(norms) > 0


@pytest.mark.slow
def test_gait_stats_reads_ant_trot_as_the_ant(key):
    env = diffsim.make_env("ant_trot", episode_length=5)
    policy = diffsim.DeterministicPolicy(29, 8, key=jr.key(1))
    gait = diffsim.diagnostics.gait_stats(env, policy, key=key, num_envs=2, layout=ant_trot.GAIT)
    assert float(gait["episode_length"]) == 5 and 0.2 < float(gait["torso_height"]) < 1.0
    assert 0 < float(gait["return"]) <= 5 and float(gait["upright_fraction"]) == 1.0
