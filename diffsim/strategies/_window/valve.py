"""The gradient valve: what a differentiable window does to the cotangent flowing backward
through the env state it carries from step to step.

`valve` is the identity in the forward pass. In the backward pass it measures the norm of
the cotangent arriving at the env state before a step, clips it to `max_norm` and
multiplies it by `decay` (D.Va's decay of the gradient backward through time), and writes
the measured norm into the cotangent of a probe: a `Float[Array, "H"]` of zeros carried in
`state.info[PROBE]`, whose cotangent after the whole backward pass holds the norm at every
step of the window (`step_norms`). `Valved` is the env wrapper that applies it at every
step, and smooths contacts in the backward pass (`_contact.py`) where asked.
"""

import contextlib
import dataclasses
from collections.abc import Callable, Iterator

import equinox as eqx
import jax
import jax.numpy as jnp
from brax.envs.base import State, Wrapper
from jaxtyping import Array, Float

from ..._types import Env, Scalar
from .contact import smoothed_contacts

PROBE = "grad_probe"
"""The key of `state.info` that carries the valve's probe through a window."""


@jax.custom_vjp
def valve(carried, probe: Float[Array, " H"], max_norm, decay, units):
    """Identity on `(carried, probe)`. Backward: with `n = units * |ct(carried)|` (the
    global norm over `carried`'s leaves, in units of one env's loss: `units` is the number
    of envs whose mean is differentiated),

        ct(carried) <- decay * min(1, max_norm / n) * ct(carried)
        ct(probe)   <- (n, ct(probe)[0], ..., ct(probe)[H-2])     (shifted in at the front)

    so that after `H` steps the probe's cotangent is `(n_0, ..., n_{H-1})`. `max_norm` may
    be `inf` and `decay` 1: the cotangent is then multiplied by exactly 1."""
    del max_norm, decay, units
    return carried, probe


def _valve_fwd(carried, probe, max_norm, decay, units):
    return (carried, probe), (max_norm, decay, units)


def _valve_bwd(res, cts):
    max_norm, decay, units = res
    ct_carried, ct_probe = cts
    leaves = jax.tree.leaves(ct_carried)
    squares = [jnp.sum(jnp.square(x.astype(ct_probe.dtype))) for x in leaves]
    norm = units * jnp.sqrt(sum(squares, jnp.zeros((), ct_probe.dtype)))
    clip = jnp.where(norm > max_norm, max_norm / norm, 1.0)
    scale = (decay * clip).astype(ct_probe.dtype)
    ct_carried = jax.tree.map(lambda x: x * scale.astype(x.dtype), ct_carried)
    ct_probe = jnp.concatenate([norm[None], ct_probe[:-1]])
    zero = jnp.zeros_like
    return ct_carried, ct_probe, zero(max_norm), zero(decay), zero(units)


valve.defvjp(_valve_fwd, _valve_bwd)


def with_probe(env_state: State, horizon: int) -> State:
    """`env_state` (a batch, leaves `[B, ...]`) with a zero probe `[B, horizon]` in its
    info, in the dtype of its observations."""
    num_envs, dtype = env_state.done.shape[0], jnp.result_type(env_state.obs)  # pyright: ignore[reportArgumentType]
    probe = jnp.zeros((num_envs, horizon), dtype)
    return dataclasses.replace(env_state, info={**env_state.info, PROBE: probe})


def pop_probe(env_state: State) -> tuple[State, Array | None]:
    """`env_state` without its probe, and the probe (None if it has none)."""
    info = dict(env_state.info)
    probe = info.pop(PROBE, None)
    return dataclasses.replace(env_state, info=info), probe


class Valved(Wrapper):
    """`env` whose `step` passes the inexact leaves of its input state through `valve`
    (the probe travels in `state.info[PROBE]`, which `env` never sees), and traces `env`'s
    step with contacts smoothed in the backward pass if `contact_smoothing` is a width.

    **Example:**

    ```python
    env = Valved(env, max_norm=10.0, decay=0.99, units=16)
    state = with_probe(state, horizon=32)
    end, traj = diffsim.rollout(env, policy, state, key=key, length=32)
    ```
    """

    def __init__(
        self,
        env: Env,
        *,
        max_norm: Scalar | None,
        decay: Scalar,
        units: int,
        contact_smoothing: Scalar | None = None,
    ):
        super().__init__(env)
        self.max_norm = jnp.inf if max_norm is None else max_norm
        self.decay = decay
        self.units = units
        self.contact_smoothing = contact_smoothing

    @contextlib.contextmanager
    def _physics(self) -> Iterator[None]:
        if self.contact_smoothing is None:
            yield
        else:
            with smoothed_contacts(self.contact_smoothing):
                yield

    def step(self, state: State, action: jax.Array, starts=None) -> State:
        state, probe = pop_probe(state)
        if probe is None:
            raise ValueError(f"a Valved env steps a state with info[{PROBE!r}]; see with_probe")
        arrays, rest = eqx.partition(state, eqx.is_inexact_array)
        arrays, probe = valve(arrays, probe, self.max_norm, self.decay, float(self.units))
        state = eqx.combine(arrays, rest)
        step: Callable = self.env.step  # an AutoResetEnv's step also takes its start pool
        with self._physics():
            stepped = step(state, action) if starts is None else step(state, action, starts)
        return dataclasses.replace(stepped, info={**stepped.info, PROBE: probe})


def step_norm_stats(step_norms: Float[Array, "B H"] | None) -> dict[str, Float[Array, ""]]:
    """`grad_norm_step_max` and `grad_norm_step_median`: the largest and the median per-step
    cotangent norm of a window (over envs and steps; NaN entries ignored; NaN if there are
    none)."""
    if step_norms is None:
        nan = jnp.full((), jnp.nan, jnp.float32)
        return {"grad_norm_step_max": nan, "grad_norm_step_median": nan}
    norms = step_norms.astype(jnp.float32).reshape(-1)
    return {
        "grad_norm_step_max": jnp.nanmax(norms),
        "grad_norm_step_median": jnp.nanmedian(norms),
    }
