"""`FastGrad` (one-hot gather transposes, unrolled substeps) against the plain env: the same
forward values and the same gradients, in float64, over a short window."""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

import diffsim
from diffsim._fastgrad import FastGrad, onehot_transposes
from diffsim.strategies._windows import float64_env, to_float64


def test_onehot_gather_matches_plain_gather_and_its_gradient():
    idx = jnp.array([2, 0, 2, 1, 3])
    x = jr.normal(jr.key(0), (4, 3))
    w = jr.normal(jr.key(1), (5, 3))

    def f(x):
        return jnp.sum(jnp.take(x, idx, axis=0, mode="wrap") * w)

    fast = onehot_transposes(f)
    assert float(fast(x)) == float(f(x))
    np.testing.assert_allclose(jax.grad(fast)(x), jax.grad(f)(x), rtol=1e-6, atol=1e-6)
    # the transpose of the rewritten gather is a matmul, not a scatter-add
    text = str(jax.make_jaxpr(jax.grad(fast))(x))
    assert "scatter" not in text and "dot_general" in text
    assert "scatter" in str(jax.make_jaxpr(jax.grad(f))(x))


def test_onehot_gather_under_vmap_and_out_of_bounds_fill():
    idx = jnp.array([0, 5, 1])  # 5 is out of bounds: filled with 0, no gradient

    def f(x):
        return jnp.sum(x.at[idx].get(mode="fill", fill_value=0.0) ** 2)

    xs = jr.normal(jr.key(2), (7, 4))
    fast = jax.vmap(jax.grad(onehot_transposes(f)))(xs)
    plain = jax.vmap(jax.grad(f))(xs)
    np.testing.assert_allclose(fast, plain, rtol=1e-6, atol=1e-6)
    assert float(jnp.abs(fast[:, 2:]).sum()) == 0.0


@pytest.mark.parametrize(
    ("name", "onehot", "unroll"),
    [("reacher", True, False)],  # unrolled substeps: studies/gradient_cost.py (minutes to compile)
)
def test_fastgrad_window_matches_plain(name, onehot, unroll):
    with jax.enable_x64(True):
        env = diffsim.make_env(name)
        env64 = float64_env(env)
        fast = FastGrad(env64, onehot=onehot, unroll=unroll)
        policy = diffsim.DeterministicPolicy(env.observation_size, env.action_size, key=jr.key(0))
        params, static = eqx.partition(to_float64(policy), eqx.is_inexact_array)
        state = to_float64(diffsim.reset(env64, key=jr.key(1), num_envs=2))

        def loss(params, env):
            policy = eqx.combine(params, static)
            _, traj = diffsim.rollout(
                env, policy, state, key=jr.key(2), length=3, deterministic=True
            )
            return jnp.sum(traj.reward), traj.obs

        (value, obs), grad = jax.jit(jax.value_and_grad(lambda p: loss(p, env64), has_aux=True))(
            params
        )
        (value_f, obs_f), grad_f = jax.jit(
            jax.value_and_grad(lambda p: loss(p, fast), has_aux=True)
        )(params)
        assert obs.dtype == jnp.float64
        np.testing.assert_allclose(obs_f, obs, rtol=0, atol=1e-9)
        np.testing.assert_allclose(value_f, value, rtol=0, atol=1e-9)
        for a, b in zip(jax.tree.leaves(grad_f), jax.tree.leaves(grad), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-9)
        assert max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(grad)) > 1e-6
