"""The settings every window class shares, with the same defaults everywhere: how the window
is computed (`WindowOptions`, for APG, SHAC, AHAC, SAPO and GuidedES's windows) and how a
strategy turns its gradient into an update (`UpdateOptions`, for the strategies).

Each class holds them as one field (`options`, `update`). What differs between strategies
(`max_grad_norm`, `stochastic`, `valve_max_norm`, `lr_decay`: each method's published
choice) stays a field of the strategy itself, so `AHAC(options=WindowOptions(remat=True))`
keeps AHAC's valve and decay. `diffsim.results.hyperparameters` records these fields under
their own names, as if the holder declared them.
"""

import dataclasses

import equinox as eqx
import jax

from ..._types import Scalar
from .. import helpers


def check_bools(**flags) -> None:
    """Raise `ValueError` naming the first of `flags` that is not a bool."""
    for name, value in flags.items():
        if not isinstance(value, bool):
            raise ValueError(f"{name} must be a bool, got {value!r}")


class WindowOptions(eqx.Module):
    """How a differentiable window is computed and differentiated; all off by default, the
    same for every window class (`APG`, `SHAC`, `AHAC`, `SAPO`, `APGWindow`, `SHACWindow`).

    - `float64`: run the window in float64: the policy, the env state and the Brax system's
      constants are cast for the window (`float64_env`); parameters and the carried env
      state keep their dtype. Needs `jax.config.update("jax_enable_x64", True)` before
      training: x64 cannot be switched on inside jit, so `train` rejects `float64=True`
      without it, and an env whose step still computes in float32.
    - `remat`: rematerialise the physics in the backward pass (`jax.checkpoint` around
      each Brax substep, or each step of an env without a Brax pipeline), so reverse mode
      stores states instead of all of the simulator's intermediates: long windows fit in
      memory, for a second forward pass of the physics.
    - `valve_decay`: the gradient valve's per-step decay of the cotangent through the env
      state (D.Va's; 1.0: none). Its clip, `valve_max_norm`, is the strategy's own field
      (its default differs between strategies).
    - `contact_smoothing`: a width in metres: Brax spring's contacts are smoothed in the
      backward pass only (straight-through, `sigmoid(-dist / width)`); forward physics is
      unchanged. Spring envs only; None is Brax's gradient.

    **Example:**

    ```python
    diffsim.SHAC(horizon=32, options=diffsim.WindowOptions(remat=True))
    diffsim.GuidedES(gradient=diffsim.APGWindow(options=diffsim.WindowOptions(float64=True)))
    ```
    """

    float64: bool = eqx.field(default=False, static=True)
    remat: bool = eqx.field(default=False, static=True)
    valve_decay: Scalar = 1.0
    contact_smoothing: float | None = eqx.field(default=None, static=True)  # a switch

    def __check_init__(self):
        check_bools(float64=self.float64, remat=self.remat)
        if not isinstance(self.valve_decay, jax.Array):
            helpers.in_range("valve_decay", self.valve_decay, 0.0, 1.0, low_open=True)
        if self.contact_smoothing is not None:
            helpers.positive("contact_smoothing", self.contact_smoothing)


class UpdateOptions(eqx.Module):
    """How a window strategy turns the window's gradient into the policy's update, beside
    its own `max_grad_norm` and `lr_decay`; the same defaults for every strategy (those of
    Brax's APG and of SHAC).

    - `mask_nonfinite_envs`: differentiate each env's window on its own (`jax.vmap` of
      `jax.grad` over envs) and drop diverged envs from the mean. It costs throughput
      (per-env parameter gradients), so it is off by default; a stochastic policy then
      draws its samples from per-env keys.
    - `max_grad_value`: clip each gradient element to `[-max_grad_value, max_grad_value]`
      before the global-norm clip (None: no elementwise clip).
    - `adam_b1`, `adam_b2`, `adam_eps`: Adam's constants (0.7, 0.95, 1e-8).

    **Example:**

    ```python
    diffsim.APG(update=diffsim.UpdateOptions(mask_nonfinite_envs=True, adam_b2=0.999))
    ```
    """

    mask_nonfinite_envs: bool = False
    max_grad_value: float | None = None
    adam_b1: float = 0.7
    adam_b2: float = 0.95
    adam_eps: float = 1e-8

    def __check_init__(self):
        check_bools(mask_nonfinite_envs=self.mask_nonfinite_envs)
        if self.max_grad_value is not None:
            helpers.positive("max_grad_value", self.max_grad_value)
        helpers.in_range("adam_b1", self.adam_b1, 0.0, 1.0)
        helpers.in_range("adam_b2", self.adam_b2, 0.0, 1.0)
        helpers.positive("adam_eps", self.adam_eps)


OPTIONS = (WindowOptions, UpdateOptions)
"""The settings modules whose fields count as their holder's own hyperparameters."""


def held(cls: type) -> dict[str, type]:
    """The fields of the dataclass `cls` whose default is a settings module, by name."""
    fields = dataclasses.fields(cls)
    return {f.name: type(f.default) for f in fields if type(f.default) in OPTIONS}


def option_names(cls: type) -> set[str]:
    """The names of `cls`'s settings, its settings modules' fields in their place."""
    inner = {f.name for kind in held(cls).values() for f in dataclasses.fields(kind)}
    return {f.name for f in dataclasses.fields(cls)} - set(held(cls)) | inner


def grouped(cls: type, values: dict) -> dict:
    """`values` named as by `option_names`, those of each settings module gathered into
    it: keyword arguments of `cls`."""
    values = dict(values)
    for name, kind in held(cls).items():
        inner = {f.name for f in dataclasses.fields(kind)} & set(values)
        values[name] = kind(**{n: values.pop(n) for n in inner})
    return values
