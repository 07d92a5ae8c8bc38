"""A user's own env in a module of its own: `tests/test_user_env.py` trains it from the CLI
as `--env user_envs:Cart --env-arg gain=2.0` and renders the saved run in a new process."""

import jax
import jax.numpy as jnp

import diffsim


class Cart(diffsim.envs.AbstractEnv):
    """A cart on a line, pushed toward 0: obs (position, velocity), action a force."""

    obs_size, act_size, default_episode_length = 2, 1, 20

    def __init__(self, gain: float = 1.0):
        self.gain = gain

    def init(self, key):
        return {"x": jax.random.uniform(key, (), minval=-1.0, maxval=1.0), "v": jnp.zeros(())}

    def dynamics(self, s, action):
        v = s["v"] + 0.1 * self.gain * action[0]
        return {"x": s["x"] + 0.1 * v, "v": v}

    def observe(self, s):
        return jnp.stack([s["x"], s["v"]])

    def reward(self, s, action, next_s):
        return -(next_s["x"] ** 2) - 0.01 * jnp.sum(action**2)
