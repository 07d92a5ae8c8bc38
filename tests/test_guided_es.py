"""GuidedES: ES's population plus the analytic gradient of a window, blended or as a subspace."""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest
from conftest import deterministic, gaussian

import diffsim
from diffsim import cli
from diffsim._train import checkpoint as _checkpoint
from diffsim.envs import AutoResetEnv, Reach
from diffsim.strategies.guided_es import APGWindow, Blend, SHACWindow, Subspace, blend


class _FlatGradientReach(Reach):
    """Reach whose reward has a zero gradient (as a constant reward has): ES still ranks
    members by it, the analytic gradient is exactly 0."""

    def reward(self, s, action, next_s):
        return jax.lax.stop_gradient(super().reward(s, action, next_s))


def _leaves(policy):
    return jax.tree.leaves(eqx.filter(policy, eqx.is_inexact_array))


@pytest.mark.parametrize(
    "mode, shaping", [(Subspace(), "centered_rank"), (Blend(), "raw")], ids=["subspace", "blend"]
)
def test_zero_analytic_gradient_makes_the_es_update(key, mode, shaping):
    env = AutoResetEnv(_FlatGradientReach(), 100, name="flat_gradient_reach")
    policy = deterministic(env, hidden=(16,))
    common = dict(population_size=8, rollout_length=100, std=0.05, learning_rate=0.01)
    es = diffsim.ES(fitness_shaping=shaping, **common)
    guided = diffsim.GuidedES(mode=mode, gradient=APGWindow(num_envs=4, horizon=10), **common)
    es_state, guided_state = es.init(env, policy, key=key), guided.init(env, policy, key=key)
    es_step = jax.jit(lambda s, k: es.step(env, s, key=k))
    guided_step = jax.jit(lambda s, k: guided.step(env, s, key=k))
    for k in jr.split(jr.key(5), 2):  # two generations: Adam's state must agree too
        es_state, es_metrics = es_step(es_state, k)
        guided_state, metrics = guided_step(guided_state, k)
        assert float(metrics["analytic_grad_norm"]) == 0.0
        assert float(metrics["analytic_weight"]) == 0.0 and float(metrics["es_weight"]) == 1.0
        np.testing.assert_allclose(
            metrics["train_return"], es_metrics["train_return"], rtol=1e-5, atol=1e-6
        )
    moved = 0.0
    for g, e, p in zip(
        _leaves(guided.policy(guided_state)),
        _leaves(es.policy(es_state)),
        _leaves(policy),
        strict=True,
    ):
        np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-6)
        moved = max(moved, float(jnp.max(jnp.abs(e - p))))
    assert moved > 0.01  # two Adam steps of 0.01 moved the mean


def test_isotropic_subspace_stores_the_gradient_and_makes_the_es_update(key, envs):
    """`Subspace(alpha=1)` searches with `Sigma = I`: the (nonzero) analytic gradients fill
    the subspace, yet each generation is ES(fitness_shaping="centered_rank")'s."""
    env = envs("reach")
    policy = deterministic(env, hidden=(16,))
    common = dict(population_size=8, rollout_length=100, std=0.05, learning_rate=0.01)
    es = diffsim.ES(fitness_shaping="centered_rank", **common)
    guided = diffsim.GuidedES(
        mode=Subspace(dims=2, alpha=1.0), gradient=APGWindow(num_envs=4, horizon=10), **common
    )
    es_state, guided_state = es.init(env, policy, key=key), guided.init(env, policy, key=key)
    np.testing.assert_array_equal(guided_state.subspace, 0.0)
    es_step = jax.jit(lambda s, k: es.step(env, s, key=k))
    guided_step = jax.jit(lambda s, k: guided.step(env, s, key=k))
    norms = []
    for k in jr.split(jr.key(6), 2):
        es_state, es_metrics = es_step(es_state, k)
        guided_state, metrics = guided_step(guided_state, k)
        norms.append(float(metrics["analytic_grad_norm"]))
        assert norms[-1] > 0 and float(metrics["analytic_weight"]) == 0.0
        np.testing.assert_allclose(
            metrics["train_return"], es_metrics["train_return"], rtol=1e-5, atol=1e-6
        )
    # The two gradients, oldest first, are the rows of the subspace.
    np.testing.assert_allclose(np.linalg.norm(guided_state.subspace, axis=1), norms, rtol=1e-5)
    for g, e in zip(
        _leaves(guided.policy(guided_state)), _leaves(es.policy(es_state)), strict=True
    ):
        np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-6)


def test_blend_weights_follow_the_measured_variances():
    rng = np.random.default_rng(0)
    d = 6
    g_es, g_an = rng.normal(size=d), rng.normal(size=d)
    exact_es = jnp.tile(g_es, (4, 1))  # noise-free: every pair's estimate is the gradient
    exact_an = jnp.tile(g_an, (5, 1))
    noisy_es = jnp.asarray(g_es + rng.normal(size=(4, d)))
    noisy_an = jnp.asarray(g_an + 3 * rng.normal(size=(5, d)))
    every = jnp.ones(5, bool)

    both_exact = blend(exact_es, exact_an, every)  # no variance on either side: halves
    np.testing.assert_allclose([both_exact.es_weight, both_exact.analytic_weight], [0.5, 0.5])
    np.testing.assert_allclose(both_exact.gradient, (g_es + g_an) / 2, rtol=1e-5, atol=1e-6)
    exact_analytic = blend(noisy_es, exact_an, every)
    assert float(exact_analytic.analytic_weight) == 1.0
    np.testing.assert_allclose(exact_analytic.gradient, g_an, rtol=1e-5, atol=1e-6)
    exact_zeroth = blend(exact_es, noisy_an, every)
    assert float(exact_zeroth.analytic_weight) == 0.0
    np.testing.assert_allclose(exact_zeroth.gradient, g_es, rtol=1e-5, atol=1e-6)

    # Both noisy: w_an = v_es / (v_es + v_an), v = tr Cov / n of each mean.
    b = blend(noisy_es, noisy_an, every)
    v_es = np.var(np.asarray(noisy_es), axis=0, ddof=1).sum() / 4
    v_an = np.var(np.asarray(noisy_an), axis=0, ddof=1).sum() / 5
    w = v_es / (v_es + v_an)
    np.testing.assert_allclose([b.es_variance, b.analytic_variance], [v_es, v_an], rtol=1e-5)
    np.testing.assert_allclose([b.analytic_weight, b.es_weight], [w, 1 - w], rtol=1e-5)
    mean_es, mean_an = np.asarray(noisy_es).mean(0), np.asarray(noisy_an).mean(0)
    np.testing.assert_allclose(b.gradient, (1 - w) * mean_es + w * mean_an, rtol=1e-5)
    np.testing.assert_allclose(b.es_norm, np.linalg.norm(mean_es), rtol=1e-5)
    cosine = mean_es @ mean_an / np.linalg.norm(mean_es) / np.linalg.norm(mean_an)
    np.testing.assert_allclose(b.cosine, cosine, rtol=1e-5)

    # ES takes over where the analytic gradient is zero, non-finite or from < 2 envs.
    nan_row = noisy_an.at[2].set(jnp.nan)
    for an, kept in [
        (jnp.zeros((5, d)), every),
        (nan_row, every),
        (noisy_an, jnp.arange(5) == 0),
    ]:
        fallback = blend(noisy_es, an, kept)
        assert float(fallback.analytic_weight) == 0.0 and bool(fallback.ok)
        np.testing.assert_allclose(fallback.gradient, mean_es, rtol=1e-5, atol=1e-6)
    # A dropped (masked) env is ignored, not averaged in.
    dropped = blend(noisy_es, nan_row, jnp.arange(5) != 2)
    kept_rows = np.asarray(noisy_an)[[0, 1, 3, 4]]
    np.testing.assert_allclose(dropped.analytic_norm, np.linalg.norm(kept_rows.mean(0)), rtol=1e-5)
    assert 0 < float(dropped.analytic_weight) < 1
    # And the analytic gradient takes over where ES's estimate is not finite.
    broken_es = blend(noisy_es.at[0].set(jnp.inf), noisy_an, every)
    assert float(broken_es.analytic_weight) == 1.0 and float(broken_es.es_weight) == 0.0
    np.testing.assert_allclose(broken_es.gradient, mean_an, rtol=1e-5, atol=1e-6)


# Measured on reach (60k steps; this key, then jr.key(1)): final eval returns -22 (Blend,
# APG), -53/-58 (Subspace, APG), -19/-20 (Blend, SHAC), -58/-64 (Subspace, SHAC); the
# untrained policy -130. With SHAC's discount of 0.95 the blend follows a young critic and
# diverges on reach; 0.8 keeps the bootstrap short.
@pytest.mark.parametrize(
    "mode, gradient, threshold",
    [
        (Blend(), APGWindow(num_envs=16, horizon=20), -30.0),
        (Subspace(), SHACWindow(num_envs=16, horizon=20, discount=0.8), -90.0),
    ],
    ids=["blend-apg", "subspace-shac"],  # each mode and each gradient source once
)
def test_every_variant_learns_reach(envs, key, mode, gradient, threshold):
    env = envs("reach")
    guided = diffsim.GuidedES(mode=mode, gradient=gradient, population_size=16)
    run = diffsim.train(
        guided, env, deterministic(env), key=key, total_steps=60_000, num_evals=3, progress=False
    )
    returns = run.curve.eval_return.mean(-1)
    assert float(returns[0]) < -100 and float(returns[-1]) > threshold, returns
    assert float(returns[-1]) > float(returns[0]) + 30, returns
    assert float(np.max(run.metrics["skipped_updates"])) == 0.0
    weights = run.metrics["es_weight"] + run.metrics["analytic_weight"]
    np.testing.assert_allclose(weights, 1.0, rtol=1e-5, atol=1e-6)
    if isinstance(mode, Blend):  # a smooth task: the gradient carries the blend
        assert float(np.mean(run.metrics["analytic_weight"])) > 0.5
    else:  # every generation's gradient joined the subspace: its share 1 - alpha
        np.testing.assert_allclose(run.metrics["analytic_weight"], 1 - mode.alpha, rtol=1e-4)
    if isinstance(gradient, SHACWindow):
        assert np.all(np.isfinite(run.metrics["value_loss"]))


def test_checkpoint_resumes_to_the_uninterrupted_run(tmp_path, envs, monkeypatch):
    env = envs("reach")
    guided = diffsim.GuidedES(
        mode=Subspace(),
        gradient=SHACWindow(num_envs=4, horizon=10, critic_epochs=2, critic_minibatches=2),
        population_size=8,
    )
    args = dict(total_steps=6 * 840, num_evals=4, num_eval_episodes=4, progress=False)
    policy = deterministic(env, hidden=(16,))
    straight = diffsim.train(guided, env, policy, key=jr.key(3), **args)

    save = _checkpoint.save

    def save_then_die(root, index, *rest):
        path = save(root, index, *rest)
        if index == 1:
            raise RuntimeError("killed")
        return path

    monkeypatch.setattr(_checkpoint, "save", save_then_die)
    with pytest.raises(RuntimeError, match="killed"):
        diffsim.train(guided, env, policy, key=jr.key(3), checkpoint_dir=tmp_path, **args)
    monkeypatch.undo()
    resumed = diffsim.train(guided, env, policy, key=jr.key(3), resume_from=tmp_path, **args)
    np.testing.assert_array_equal(resumed.curve.eval_return, straight.curve.eval_return)
    np.testing.assert_array_equal(resumed.curve.env_steps, straight.curve.env_steps)
    for name in straight.metrics:
        np.testing.assert_array_equal(resumed.metrics[name], straight.metrics[name])
    for a, b in zip(_leaves(resumed.policy), _leaves(straight.policy), strict=True):
        np.testing.assert_array_equal(a, b)
    assert "es_variance" not in straight.metrics  # a blend's metric
    value_loss = straight.metrics["value_loss"]  # the critic trained every generation
    assert value_loss.shape == straight.metrics["loss"].shape
    assert np.all(np.isfinite(value_loss)) and np.all(value_loss > 0)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: diffsim.GuidedES(population_size=7), "population_size=7 must be even"),
        (
            lambda: diffsim.GuidedES(population_size=2),
            "Blend\\(\\) measures .* population_size >= 4",
        ),
        (
            lambda: diffsim.GuidedES(gradient=APGWindow(num_envs=1)),
            "num_envs >= 2; got .* num_envs=1",
        ),
        (
            lambda: diffsim.GuidedES(mode=Subspace(dims=5), population_size=8),
            "Subspace\\(dims=5\\) exceeds the 4 antithetic",
        ),
        (lambda: Subspace(alpha=1.5), "alpha must be a number in \\[0.0, 1.0\\], got 1.5"),
        (lambda: Subspace(dims=0), "dims must be a positive int, got 0"),
        (lambda: diffsim.GuidedES(std=0.0), "std must be a number > 0, got 0.0"),
        (lambda: APGWindow(horizon=0), "horizon must be a positive int, got 0"),
        (lambda: SHACWindow(discount=0.0), "discount must be a number in \\(0.0, 1.0\\], got 0.0"),
        (
            lambda: SHACWindow(num_envs=3, horizon=10, critic_minibatches=4),
            "critic_minibatches=4 must divide num_envs \\* horizon = 30",
        ),
    ],
)
def test_rejects_bad_hyperparameters(make, match):
    with pytest.raises(ValueError, match=match):
        make()


@pytest.mark.parametrize("kwargs", [{"mode": "subspace"}, {"gradient": "shac"}])
def test_rejects_the_old_string_settings(kwargs):
    # A ValueError from __check_init__, or the TypeError of the test run's type checker.
    with pytest.raises((TypeError, ValueError), match=repr(next(iter(kwargs.values())))):
        diffsim.GuidedES(**kwargs)


class _KeyLess(eqx.Module):
    inner: eqx.Module

    def __call__(self, obs):
        return self.inner(obs)


@pytest.mark.parametrize(
    "strategy, make_policy, match",
    [
        (
            diffsim.GuidedES(gradient=APGWindow(horizon=101)),
            deterministic,
            "horizon=101 \\(the gradient window\\) exceeds the episode_length 100 .*"
            " pass APGWindow\\(horizon=100\\)",
        ),
        (diffsim.GuidedES(rollout_length=200), deterministic, "rollout_length=200 exceeds"),
        (
            diffsim.GuidedES(mode=Subspace(dims=32), population_size=64),
            lambda env: deterministic(env, hidden=(1,)),
            "Subspace\\(dims=32\\) exceeds the 11 trainable parameters",
        ),
        (diffsim.GuidedES(), gaussian, "APGWindow\\(stochastic=False\\) acts with policy\\(obs\\)"),
        (
            diffsim.GuidedES(gradient=SHACWindow(stochastic=True)),
            lambda env: _KeyLess(deterministic(env)),
            "SHACWindow\\(stochastic=True\\) calls policy\\(obs, key=key\\)",
        ),
    ],
    ids=["horizon", "rollout", "subspace", "stochastic-policy", "key-less-policy"],
)
def test_train_rejects_bad_input_before_compiling(envs, key, strategy, make_policy, match):
    env = envs("reach")
    with pytest.raises(ValueError, match=match):
        diffsim.train(strategy, env, make_policy(env), key=key, total_steps=10**5, progress=False)


def test_cli_name():
    assert cli.strategies()["guided-es"] is diffsim.GuidedES
    args = cli._parser().parse_args(
        ["train", "guided-es", "--std", "0.1", "--population-size", "8"]
    )
    assert args.cls is diffsim.GuidedES and args.std == 0.1 and args.population_size == 8
    assert {"population_size", "std", "learning_rate"} <= set(args.hyperparameters)
