import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

import diffsim
from diffsim.policies import RunningNorm, update_normalizers


def test_running_norm_matches_numpy_over_split_batches(key):
    data = jr.normal(key, (300, 3)) * jnp.array([1.0, 5.0, 0.1]) + jnp.array([2.0, -1.0, 0.0])
    norm = RunningNorm(3)
    for chunk in (data[:7], data[7:100], data[100:]):
        norm = norm.update(chunk)
    np.testing.assert_allclose(norm.mean, data.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(norm.var, data.var(0), rtol=1e-4)
    assert float(norm.count) == 300


def test_normalisation_is_gradient_stopped_and_not_trainable(key):
    policy = diffsim.DeterministicPolicy(3, 1, key=key)
    policy = update_normalizers(policy, jr.normal(key, (50, 3)) + 4.0)
    assert float(policy.norm.count) == 50
    grads = eqx.filter_grad(lambda p: jnp.sum(p(jnp.ones(3))))(policy)
    np.testing.assert_array_equal(grads.norm.mean, 0.0)
    params = eqx.filter(policy, diffsim.trainable(policy))
    assert params.norm.mean is None and params.net.layers[0].weight is not None


@pytest.mark.parametrize("state_dependent_std", [False, True])
def test_gaussian_log_prob_is_the_squashed_density(key, state_dependent_std):
    policy = diffsim.GaussianPolicy(
        4, 2, key=key, init_std=0.7, state_dependent_std=state_dependent_std
    )
    obs = jnp.arange(4.0)
    mean, log_std = policy.distribution(obs)
    np.testing.assert_allclose(jnp.exp(log_std), 0.7, rtol=1e-2 if state_dependent_std else 1e-6)
    action = policy(obs, key=jr.key(3))
    # Change of variables by hand: N(u; mean, std) / |d tanh(u) / du|.
    u = jnp.arctanh(action)
    std = jnp.exp(log_std)
    expected = jnp.sum(
        -0.5 * ((u - mean) / std) ** 2
        - jnp.log(std * jnp.sqrt(2 * jnp.pi))
        - jnp.log(1 - jnp.tanh(u) ** 2)
    )
    np.testing.assert_allclose(policy.log_prob(obs, action), expected, rtol=1e-4)
    np.testing.assert_allclose(
        policy.entropy(obs), jnp.sum(log_std + 0.5 * jnp.log(2 * jnp.pi * jnp.e)), rtol=1e-6
    )
    np.testing.assert_allclose(policy(obs), jnp.tanh(mean))


def test_policies_act_on_one_observation_and_vmap(key):
    for policy in (
        diffsim.GaussianPolicy(5, 3, key=key),
        diffsim.DeterministicPolicy(5, 3, key=key),
    ):
        assert policy(jnp.ones(5)).shape == (3,)
        assert jax.vmap(policy)(jnp.ones((8, 5))).shape == (8, 3)
    value = diffsim.ValueFunction(5, key=key)
    assert value(jnp.ones(5)).shape == ()


def test_mlp_shapes_and_final_scale(key):
    mlp = diffsim.MLP(4, 2, hidden=(8, 8), final_scale=0.0, key=key)
    assert len(mlp.layers) == 3
    np.testing.assert_array_equal(mlp(jnp.ones(4)), 0.0)


def test_bad_std_rejected(key):
    with pytest.raises(ValueError, match="init_std must be > 0, got -1.0"):
        diffsim.GaussianPolicy(3, 1, init_std=-1.0, key=key)
