"""AHAC's per-env gradient cut: where a step's contact gets stiff, or where the learned
horizon ends a segment, the state carried on is cut from the gradient (`stop_gradient`),
and the actor's loss bootstraps from the critics there.

`StiffnessCut` wraps the env a window steps. Each step it measures the stiffness signal of
the transition (`stiffness`, per backend) and writes it into the env state's
`info[SIGNAL]` (one slot per step of the window, `info[STEP]` the slot), so the loss finds
every step's signal in the window's final env state. The cut itself is a `jnp.where` on the
pipeline state and the observation the next step starts from; the recorded `next_obs` (the
critic's input at the cut) keeps its gradient.

Signals, by what the env's pipeline state holds:

- MJX data (Playground envs): `||qfrc_constraint||`, the constraint (contact, limit) force
  in generalised coordinates.
- Brax `generalized`: `||qf_constraint||`, the same force.
- Brax `spring` and `positional` (no contact force in their state): `||qd' - qd|| / dt`,
  the generalised acceleration, where a contact shows as a jump in velocity.
- anything else (the toy envs): `||next_obs - obs||`, the change of the observation.

A step that ended its episode records 0 (its pipeline state is the next episode's start).
"""

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from brax.envs.base import State, Wrapper
from jaxtyping import Array, Bool, Float

from ..._types import Env

SIGNAL = "stiffness"
STEP = "stiffness_step"


def stiffness(before: State, after: State, *, dt: float = 1.0) -> Float[Array, ""]:
    """The stiffness signal of one transition `before -> after` of one env (see the module
    docstring for which signal each backend gives; `dt`: the env's control step, which
    turns Brax spring's change of velocity into an acceleration). Not differentiated."""
    old: Any = before.pipeline_state
    new: Any = after.pipeline_state
    if hasattr(new, "qfrc_constraint"):  # MJX data
        signal = jnp.linalg.norm(new.qfrc_constraint)
    elif hasattr(new, "qf_constraint"):  # Brax generalized
        signal = jnp.linalg.norm(new.qf_constraint)
    elif hasattr(new, "qd") and hasattr(old, "qd"):  # Brax spring, positional
        signal = jnp.linalg.norm(new.qd - old.qd) / dt
    else:
        final_obs = after.info.get("final_obs", after.obs)
        signal = jnp.linalg.norm(jnp.asarray(final_obs) - jnp.asarray(before.obs))
    signal = jnp.where(after.done > 0, 0.0, signal)
    return jax.lax.stop_gradient(signal)


def segment_ends(
    signal: Float[Array, "T B"], *, threshold, period
) -> tuple[Bool[Array, "T B"], Bool[Array, "T B"]]:
    """`(cut, stiff)`: where a gradient segment ends after step `t` (a stiff step, or the
    end of a period of `period` steps), and where it ended because the step was stiff
    (`signal > threshold`)."""
    stiff = signal > threshold
    periodic = (jnp.arange(signal.shape[0]) + 1) % period == 0
    return stiff | periodic[:, None], stiff


def with_signal_slots(env_state: State, length: int) -> State:
    """A batch of env states (leading axis `B`) with empty signal slots for a window of
    `length` steps, as `StiffnessCut` needs them."""
    num_envs = env_state.done.shape[0]
    info = {
        **env_state.info,
        SIGNAL: jnp.zeros((num_envs, length), env_state.done.dtype),
        STEP: jnp.zeros((num_envs,), jnp.int32),
    }
    return dataclasses.replace(env_state, info=info)


class StiffnessCut(Wrapper):
    """`env` whose state is cut from the gradient after a stiff step (`signal > threshold`)
    and after every `period`-th step of a window of `length` steps. Forward values are the
    env's own. Its states carry the signal slots of `with_signal_slots`.

    **Example:**

    ```python
    state = with_signal_slots(diffsim.reset(env, key=k1, num_envs=8), 64)
    cut = StiffnessCut(env, threshold=500.0, period=16, length=64)
    end, traj = diffsim.rollout(cut, policy, state, key=k2, length=64)
    end.info[SIGNAL]   # [8, 64]: each step's signal
    ```
    """

    def __init__(self, env: Env, *, threshold, period, length: int):
        super().__init__(env)
        self.threshold = threshold
        self.period = period
        self.length = length

    def step(self, state: State, action: jax.Array, starts=None) -> State:
        info = state.info
        step, slots = info[STEP], info[SIGNAL]
        inner = dataclasses.replace(
            state, info={k: v for k, v in info.items() if k not in (SIGNAL, STEP)}
        )
        step_fn: Any = self.env.step  # an AutoResetEnv's step also takes its start pool
        after = step_fn(inner, action) if starts is None else step_fn(inner, action, starts)
        signal = stiffness(state, after, dt=float(getattr(self.env, "dt", 1.0)))
        cut = (signal > self.threshold) | ((step + 1) % self.period == 0)

        def cut_off(x):
            return jnp.where(cut, jax.lax.stop_gradient(x), x)

        pipeline_state, obs = jax.tree.map(cut_off, (after.pipeline_state, after.obs))
        info = {
            **after.info,
            SIGNAL: slots.at[step].set(signal.astype(slots.dtype)),
            STEP: (step + 1) % self.length,
        }
        return dataclasses.replace(after, pipeline_state=pipeline_state, obs=obs, info=info)
