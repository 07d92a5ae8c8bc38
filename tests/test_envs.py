import jax
import jax.numpy as jnp
import numpy as np
import pytest

import diffsim
from diffsim import envs, envs as envs_mod


def test_names_cover_toys_and_brax():
    assert envs.toy_names() == ["ball", "pendulum", "reach"]
    assert {"inverted_pendulum", "fast", "ant"} <= set(envs.brax_names())
    assert envs.names() == (
        envs.toy_names() + envs.brax_names() + envs.playground_names() + envs.gymnax_names()
    )


def test_the_size_tables_diffsim_envs_prints_match_the_envs(envs):
    """`diffsim envs` prints sizes from tables (nothing built): spot-checked against envs."""
    from diffsim.envs import _catalog

    for name, cls in {
        "reach": envs_mod.Reach,
        "pendulum": envs_mod.Pendulum,
        "ball": envs_mod.Ball,
    }.items():
        assert _catalog.TOY[name] == (cls.obs_size, cls.act_size, cls.default_episode_length)
    env = envs("inverted_pendulum")
    sizes = (env.observation_size, env.action_size, env.episode_length)
    assert _catalog.BRAX["inverted_pendulum"] == sizes
    gym = diffsim.make_env("gymnax:MountainCarContinuous-v0")
    sizes = (gym.observation_size, gym.action_size, gym.episode_length)
    assert _catalog.GYMNAX["MountainCarContinuous-v0"] == sizes


def test_gymnax_pendulum_gradient_is_nonzero_and_matches_finite_differences(key):
    """APG's gradient through gymnax's Pendulum-v1 (transition gradients on): the reward
    summed over a 6-step window w.r.t. the actions, in float64, against central
    differences. With gymnax's default (detached transitions) only the reward's direct
    term is left, -0.001 u^2 with torque u = 2a: d/da = -0.008 a, nothing through the
    dynamics."""
    with jax.enable_x64(True):
        env = diffsim.make_env("gymnax:Pendulum-v1")
        assert env.backend == "gymnax" and env.unwrapped.differentiable
        start = env.reset(key)
        actions = jnp.linspace(-0.4, 0.3, 6)[:, None]

        def window(actions, env=env):
            def step(state, action):
                state = env.step(state, action)
                return state, state.reward

            return jax.lax.scan(step, start, actions)[1].sum()

        grad = jax.grad(window)(actions)
        eps, fd = 1e-6, np.zeros(6)
        for t in range(6):
            bump = jnp.zeros_like(actions).at[t, 0].set(eps)
            fd[t] = (window(actions + bump) - window(actions - bump)) / (2 * eps)
        direct = -0.008 * np.asarray(actions[:, 0])
        through = np.asarray(grad[:, 0]) - direct  # what flows through the dynamics
        assert np.abs(through[:-1]).min() > 1e-3 and through[-1] == pytest.approx(0.0)
        np.testing.assert_allclose(grad[:, 0], fd, rtol=1e-5, atol=1e-8)
        import gymnax

        inner, params = gymnax.make("Pendulum-v1")  # as gymnax hands it out: detached
        detached = envs_mod.AutoResetEnv(envs_mod.GymnaxEnv(inner, params, False), 200)
        assert detached.backend == "gymnax-detached"
        flat = jax.grad(lambda a: window(a, env=detached))(actions)
        np.testing.assert_allclose(flat[:, 0], direct, rtol=1e-9)


def test_gymnax_refuses_discrete_actions_and_unknown_names():
    with pytest.raises(ValueError, match=r"'CartPole-v1' has discrete actions"):
        diffsim.make_env("gymnax:CartPole-v1")
    with pytest.raises(ValueError, match=r"unknown gymnax env 'Nope-v0'; gymnax's: CartPole"):
        diffsim.make_env("gymnax:Nope-v0")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"name": "cartpole"}, r"unknown environment 'cartpole'; valid names: \['ball'"),
        ({"name": "inverted_pendulum", "backend": "bullet"}, r"unknown backend 'bullet'.*'spring'"),
        ({"name": "pendulum", "backend": "spring"}, r"takes no backend, got backend='spring'"),
        (
            {"name": "pendulum", "episode_length": 0},
            r"episode_length must be a positive int, got 0",
        ),
        ({"name": "reach", "episode_length": -3}, r"positive int, got -3"),
        ({"name": "swimmer", "backend": "spring"}, r"brax could not build 'swimmer'"),
    ],
)
def test_bad_arguments_name_the_value(kwargs, match):
    with pytest.raises(ValueError, match=match):
        diffsim.make_env(**kwargs)


@pytest.mark.parametrize("name", ["reach", "pendulum", "ball"])
def test_toy_env_shapes_and_defaults(name, key):
    env = diffsim.make_env(name)
    cls = {"reach": envs.Reach, "pendulum": envs.Pendulum, "ball": envs.Ball}[name]
    assert env.episode_length == cls.default_episode_length
    state = env.reset(key)
    assert state.obs.shape == (env.observation_size,) == (cls.obs_size,)
    state = env.step(state, jnp.zeros(env.action_size))
    assert state.reward.shape == () and jnp.isfinite(state.reward)


def test_brax_env_defaults(envs):
    env = envs("inverted_pendulum")
    assert (env.backend, env.episode_length) == ("spring", 1000)
    assert (env.observation_size, env.action_size) == (4, 1)


def _run_zero_actions(env, state, steps):
    def body(state, _):
        state = env.step(state, jnp.zeros(env.action_size))
        return state, (
            state.done,
            state.info["truncation"],
            state.info["episode_return"],
            state.reward,
            state.obs,
            state.info["final_obs"],
        )

    return jax.lax.scan(body, state, length=steps)[1]


def test_time_limit_is_truncation_and_returns_are_tracked(key):
    env = diffsim.make_env("reach", episode_length=5)
    done, trunc, ep_ret, reward, obs, final_obs = jax.jit(_run_zero_actions, static_argnums=(0, 2))(
        env, env.reset(key), 12
    )
    np.testing.assert_array_equal(done, [0, 0, 0, 0, 1] * 2 + [0, 0])
    np.testing.assert_array_equal(trunc, done)  # reach never terminates: every end is a time limit
    np.testing.assert_allclose(ep_ret[4], reward[:5].sum(), rtol=1e-6)
    np.testing.assert_allclose(ep_ret[9], reward[5:10].sum(), rtol=1e-6)
    # After the reset the obs is a fresh start; final_obs keeps the episode's last one.
    assert not np.allclose(obs[4], final_obs[4])
    np.testing.assert_array_equal(obs[3], final_obs[3])


class _PassesDoneOn(envs.Reach):
    """Reach as Brax's halfcheetah and reacher are written: `step` never sets `done`, so the
    state's own `done` passes through."""

    def step(self, state, action):
        return super().step(state, action).replace(done=state.done)


def test_an_env_that_passes_done_on_restarts_once_per_time_limit(key):
    """An episode that ends at the time limit ends once: the next episode runs its full
    length (the inner env must not see the last step's `done`)."""
    env = envs.AutoResetEnv(_PassesDoneOn(), 3, name="passes_done_on")
    done, trunc, *_ = jax.jit(_run_zero_actions, static_argnums=(0, 2))(env, env.reset(key), 9)
    np.testing.assert_array_equal(done, [0, 0, 1] * 3)
    np.testing.assert_array_equal(trunc, done)


def test_termination_is_not_truncation(envs, key):
    env = envs("inverted_pendulum")
    state = env.reset(key)
    push = jnp.ones(env.action_size)  # full force topples the pole quickly

    def body(state, _):
        state = env.step(state, push)
        return state, (state.done, state.info["truncation"])

    done, trunc = jax.jit(lambda s: jax.lax.scan(body, s, length=200)[1])(state)
    assert done.sum() >= 1 and trunc.sum() == 0


def test_every_episode_starts_from_a_fresh_draw(key):
    env = diffsim.make_env("pendulum", episode_length=3)
    _, _, _, _, obs, _ = jax.jit(_run_zero_actions, static_argnums=(0, 2))(env, env.reset(key), 9)
    starts = np.asarray(obs[2::3])  # the obs right after each reset
    assert len({tuple(np.round(s, 5)) for s in starts}) == 3


def test_reset_gives_batch(key):
    env = diffsim.make_env("reach")
    state = diffsim.reset(env, key=key, num_envs=7)
    assert state.obs.shape == (7, 6) and state.done.shape == (7,)
    assert len(np.unique(np.asarray(state.obs[:, 4]))) == 7  # distinct targets
