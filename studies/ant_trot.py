"""`ant_trot`: Brax's ant rewarded for tracking a reference trot of its joints.

    import ant_trot                       # registers "ant_trot" with Brax
    env = diffsim.make_env("ant_trot")    # spring backend, 1000-step episodes

A contact body with a dense, differentiable reward, the setting where analytic gradients
are known to beat PPO on a legged robot (MuJoCo's MJX APG tutorial, `training_apg.ipynb`:
a quadruped imitating a reference trot). The body, its physics and its termination are
Brax's `ant` unchanged (spring backend by default, the episode ends when the torso leaves
0.2-1.0 m); the reward is replaced by how closely the 8 hinge joints follow a periodic
reference, `exp(-|q - q_ref(t)|^2 / width^2)` in (0, 1] per step, and the observation gains
the reference's phase (`sin`, `cos`), so that a policy of the observation can follow it.

The reference is a trot: diagonal legs (1 and 3, 2 and 4) move together, half a cycle
apart from the other pair; each hip swings by `hip_amplitude` radians about 0 and each
ankle bends by `ankle_amplitude` about 0.87 rad (inside its 30-70 degree range), at
`frequency` cycles per second. It is an imitation task, not a locomotion reward: the table
it enters (`studies/contact.py --envs ant_trot`) says so.

A study script registers the env by importing this module (its gait layout: `GAIT`, the
ant's); a saved run of it rebuilds its env (`Run.make_env()`) in a process that has
imported it too.
"""

import brax.envs
import jax.numpy as jnp
from brax.envs.ant import Ant
from brax.envs.base import State
from jaxtyping import Array, Float

from diffsim.diagnostics import GAIT_LAYOUT
from diffsim.strategies.helpers import positive

NAME = "ant_trot"
ANKLE_CENTRE = 0.87  # rad: the middle of the ankles' |30-70| degree range
ANKLE_SIGNS = jnp.array([1.0, -1.0, -1.0, 1.0])  # ankle_1..4 bend to +, -, -, + (ant.xml)
LEG_PHASES = jnp.array([0.0, jnp.pi, 0.0, jnp.pi])  # diagonal pairs (1, 3) and (2, 4)


class AntTrot(Ant):
    """Brax's `Ant` whose reward is the tracking of a reference trot (module docstring).

    **Arguments:** `frequency=1.0` (gait cycles per second), `hip_amplitude=0.35` and
    `ankle_amplitude=0.25` (radians), `width=0.5` (radians: the joint error at which the
    reward falls to `1/e`); the rest go to Brax's `Ant` (`backend`, ...).

    Observation: Ant's 27 numbers, then `sin` and `cos` of the reference's phase (29).
    `state.info["time"]` is the episode's time in seconds; `state.metrics["tracking_error"]`
    the squared joint error of the step.
    """

    def __init__(
        self,
        frequency: float = 1.0,
        hip_amplitude: float = 0.35,
        ankle_amplitude: float = 0.25,
        width: float = 0.5,
        **kwargs,
    ):
        positive("frequency", frequency)
        positive("width", width)
        super().__init__(**kwargs)
        self.frequency, self.width = frequency, width
        self.hip_amplitude, self.ankle_amplitude = hip_amplitude, ankle_amplitude

    def reference(self, time: Float[Array, ""]) -> Float[Array, "8"]:
        """The reference joint angles at `time` seconds, in the order of `q[7:]`: hip_1,
        ankle_1, ..., hip_4, ankle_4."""
        phase = 2.0 * jnp.pi * self.frequency * time + LEG_PHASES
        hips = self.hip_amplitude * jnp.sin(phase)
        ankles = ANKLE_SIGNS * (ANKLE_CENTRE + self.ankle_amplitude * jnp.cos(phase))
        return jnp.stack([hips, ankles], axis=-1).reshape(8)

    def _observe(self, obs: Float[Array, "27"], time) -> Float[Array, "29"]:
        phase = 2.0 * jnp.pi * self.frequency * time
        return jnp.concatenate([obs, jnp.stack([jnp.sin(phase), jnp.cos(phase)])])

    def _tracking(self, state: State, time) -> State:
        """`state` with the tracking reward and error of its joints at `time`."""
        error = jnp.sum((state.pipeline_state.q[7:] - self.reference(time)) ** 2)
        metrics = {**state.metrics, "tracking_error": error}
        reward = jnp.exp(-error / self.width**2)
        info = {**state.info, "time": jnp.asarray(time, jnp.float32)}
        obs = self._observe(state.obs, time)
        return state.replace(obs=obs, reward=reward, metrics=metrics, info=info)

    def reset(self, rng) -> State:
        state = self._tracking(super().reset(rng), 0.0)
        return state.replace(reward=jnp.zeros_like(state.reward))

    def step(self, state: State, action) -> State:
        stepped = super().step(state.replace(obs=state.obs[:-2]), action)
        return self._tracking(stepped, state.info["time"] + self.dt)


brax.envs.register_environment(NAME, AntTrot)
GAIT = GAIT_LAYOUT["ant"]  # its observation starts with the ant's: `gait_stats`'s layout
