"""Built-in toy environments: pure JAX, smooth, differentiable, compile in seconds.

Each is an `AbstractEnv` (`_base.py`, the interface for an env of your own): written for
one env, with the Brax `Env` interface, so Brax wrappers and `jax.vmap` apply. The physical
state is a dict in `State.pipeline_state`. None of them terminates early; `make_env` adds
the time limit.
"""

import jax
import jax.numpy as jnp
import jax.random as jr

from ._base import AbstractEnv, PhysState

AbstractToyEnv = AbstractEnv
"""The name `AbstractEnv` had before it was public; existing subclasses keep working."""


def _norm(x: jax.Array) -> jax.Array:
    """Euclidean norm that stays differentiable at zero."""
    return jnp.sqrt(jnp.sum(x**2) + 1e-6)


class Reach(AbstractEnv):
    """A damped 2-D point mass pushed toward a random target.

    obs = (position, velocity, target - position), 6 numbers; action = force, 2 numbers.
    reward = -|position - target| - 0.01 |action|^2 per step, dt = 0.05 s. What each
    strategy reaches on it: the main comparison study (`studies/compare.py`, in the docs).

    **Example:**

    ```python
    env = diffsim.make_env("reach")   # with time limit and auto-reset
    ```
    """

    obs_size, act_size, default_episode_length = 6, 2, 100
    dt, max_accel, damping = 0.05, 4.0, 1.0

    def init(self, key: jax.Array) -> PhysState:
        k_pos, k_target = jr.split(key)
        return {
            "pos": jr.uniform(k_pos, (2,), minval=-1.0, maxval=1.0),
            "vel": jnp.zeros(2),
            "target": jr.uniform(k_target, (2,), minval=-1.0, maxval=1.0),
        }

    def dynamics(self, s: PhysState, action: jax.Array) -> PhysState:
        vel = s["vel"] + self.dt * (self.max_accel * action - self.damping * s["vel"])
        return {**s, "pos": s["pos"] + self.dt * vel, "vel": vel}

    def observe(self, s: PhysState) -> jax.Array:
        return jnp.concatenate([s["pos"], s["vel"], s["target"] - s["pos"]])

    def reward(self, s: PhysState, action: jax.Array, next_s: PhysState) -> jax.Array:
        return -_norm(next_s["pos"] - next_s["target"]) - 0.01 * jnp.sum(action**2)


class Pendulum(AbstractEnv):
    """Pendulum swing-up with a weak motor (it must swing to get up), as in Gym's Pendulum.

    The angle is 0 upright; it starts anywhere with a small spin. obs = (cos, sin, angular
    velocity); action = torque / 2. reward = cos(angle) - 0.01 omega^2 - 0.001 torque^2,
    at most 1 per step; dt = 0.05 s, 200 steps. What each strategy reaches on it: the main
    comparison study (`studies/compare.py`, in the docs).

    **Example:**

    ```python
    env = diffsim.make_env("pendulum")   # with time limit and auto-reset
    ```
    """

    obs_size, act_size, default_episode_length = 3, 1, 200
    dt, gravity, length, mass, max_torque = 0.05, 10.0, 1.0, 1.0, 2.0

    def init(self, key: jax.Array) -> PhysState:
        k_theta, k_omega = jr.split(key)
        return {
            "theta": jr.uniform(k_theta, (), minval=-jnp.pi, maxval=jnp.pi),
            "omega": jr.uniform(k_omega, (), minval=-1.0, maxval=1.0),
        }

    def dynamics(self, s: PhysState, action: jax.Array) -> PhysState:
        torque = self.max_torque * action[0]
        g, m, l_ = self.gravity, self.mass, self.length
        omega = s["omega"] + self.dt * (
            3 * g / (2 * l_) * jnp.sin(s["theta"]) + 3 * torque / (m * l_**2)
        )
        return {"theta": s["theta"] + self.dt * omega, "omega": omega}

    def observe(self, s: PhysState) -> jax.Array:
        return jnp.stack([jnp.cos(s["theta"]), jnp.sin(s["theta"]), s["omega"]])

    def reward(self, s: PhysState, action: jax.Array, next_s: PhysState) -> jax.Array:
        torque = self.max_torque * action[0]
        return jnp.cos(next_s["theta"]) - 0.01 * next_s["omega"] ** 2 - 0.001 * torque**2


class Ball(AbstractEnv):
    """Throw a ball at a target: the seed's falling ball (gravity -9.8), now with a goal.

    For the first `throw_steps` steps a hand holds the ball and the action accelerates it
    (up to 30 m/s^2 per axis, against gravity); then the ball flies freely and actions do
    nothing. From the release on, reward = -|ball - target| per step, so an action pays
    off only tens of steps later. The target hangs 2-4 m away at 0.5-1.5 m height.
    obs = (position, velocity, target - position, held, time fraction), 8 numbers; dt =
    0.05 s, 60 steps. Letting the ball drop scores far below any thrown ball's return.

    **Example:**

    ```python
    env = diffsim.make_env("ball")   # with time limit and auto-reset
    ```
    """

    obs_size, act_size, default_episode_length = 8, 2, 60
    dt, gravity, max_accel, throw_steps = 0.05, 9.8, 30.0, 10

    def init(self, key: jax.Array) -> PhysState:
        k_pos, k_tx, k_ty = jr.split(key, 3)
        return {
            "pos": jnp.array([0.0, 1.0]) + jr.uniform(k_pos, (2,), minval=-0.1, maxval=0.1),
            "vel": jnp.zeros(2),
            "target": jnp.stack(
                [
                    jr.uniform(k_tx, (), minval=2.0, maxval=4.0),
                    jr.uniform(k_ty, (), minval=0.5, maxval=1.5),
                ]
            ),
            "t": jnp.zeros(()),
        }

    def _held(self, s: PhysState) -> jax.Array:
        return s["t"] < self.throw_steps

    def dynamics(self, s: PhysState, action: jax.Array) -> PhysState:
        push = jnp.where(self._held(s), self.max_accel * action, 0.0)
        vel = s["vel"] + self.dt * (push + jnp.array([0.0, -self.gravity]))
        return {**s, "pos": s["pos"] + self.dt * vel, "vel": vel, "t": s["t"] + 1}

    def observe(self, s: PhysState) -> jax.Array:
        held = jnp.asarray(self._held(s), dtype=float)
        phase = s["t"] / self.default_episode_length
        return jnp.concatenate(
            [s["pos"], s["vel"], s["target"] - s["pos"], jnp.stack([held, phase])]
        )

    def reward(self, s: PhysState, action: jax.Array, next_s: PhysState) -> jax.Array:
        flying = ~self._held(next_s)
        return jnp.where(flying, -_norm(next_s["pos"] - next_s["target"]), 0.0)


TOY_ENVS: dict[str, type[AbstractEnv]] = {"reach": Reach, "pendulum": Pendulum, "ball": Ball}
