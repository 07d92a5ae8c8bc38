"""A cheaper backward pass through a Brax pipeline step, with the same forward physics.

Brax's spring pipeline gathers per-link and per-contact quantities with constant index
arrays (`Transform.take`, `x[parent_idx]`, `scan.link_types`). Reverse mode transposes each
gather into a scatter-add, which XLA's CPU backend runs as a serial loop per element. Here
the physics step is traced once to a jaxpr for one env and replayed with every gather whose
indices are compile-time constants wrapped in a `jax.custom_vjp`: the forward is the same
gather (bitwise the same values), the backward a dense matmul with a constant one-hot
matrix (the same sum, in another order). `FastGrad` applies this to an env's physics
substeps and can also unroll the substep loop (`lax.scan` in `PipelineEnv.pipeline_step`)
into straight-line code.
"""

import copy
import functools
import types
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from brax.envs.base import PipelineEnv, State, Wrapper
from jax import lax
from jax.core import Tracer
from jax.extend import core as jex_core

MAX_ONEHOT_ELEMENTS = 1 << 20  # larger gathers keep their scatter-add transpose


def _is_concrete(x) -> bool:
    return isinstance(x, (np.ndarray, np.generic, int, float, bool)) or (
        isinstance(x, jax.Array) and not isinstance(x, Tracer)
    )


def _source_map(operand_shape, dtype, indices, params) -> np.ndarray | None:
    """For each element of the gather's output (flattened), the flat operand index it
    reads, or -1 (a filled, out-of-bounds element); None if the map is too large."""
    size = int(np.prod(operand_shape, dtype=np.int64))
    probe = np.arange(1, size + 1, dtype=np.int32).reshape(operand_shape)
    with jax.ensure_compile_time_eval():
        probe_params = {**params, "fill_value": 0}
        out = np.asarray(lax.gather_p.bind(jnp.asarray(probe), indices, **probe_params))
    if out.size * size > MAX_ONEHOT_ELEMENTS:
        return None
    return out.reshape(-1).astype(np.int64) - 1


def _onehot_gather(operand, indices, params):
    """`lax.gather` with constant `indices` whose transpose is a one-hot matmul."""
    shape = tuple(jnp.shape(operand))
    source = _source_map(shape, operand.dtype, indices, params)
    if source is None:
        return lax.gather_p.bind(operand, indices, **params)
    size = int(np.prod(shape, dtype=np.int64))
    onehot = (source[:, None] == np.arange(size)[None, :]).astype(np.dtype(operand.dtype))

    @jax.custom_vjp
    def gather(x):
        return lax.gather_p.bind(x, indices, **params)

    def forward(x):
        return gather(x), None

    def backward(_, cotangent):
        flat = jnp.reshape(cotangent, (-1,)).astype(onehot.dtype)
        return (jnp.reshape(flat @ onehot, shape),)

    gather.defvjp(forward, backward)
    return gather(operand)


def _eval(jaxpr, consts, *args):
    """`jax.core.eval_jaxpr` that folds constants and swaps constant-index gathers."""
    env = {}

    def read(v):
        return v.val if isinstance(v, jex_core.Literal) else env[v]

    for var, val in zip(jaxpr.constvars, consts, strict=True):
        env[var] = val
    for var, val in zip(jaxpr.invars, args, strict=True):
        env[var] = val
    for eqn in jaxpr.eqns:
        invals = [read(v) for v in eqn.invars]
        name = eqn.primitive.name
        if name in ("pjit", "jit", "closed_call"):
            inner = eqn.params.get("jaxpr") or eqn.params.get("call_jaxpr")
            outvals = _eval(inner.jaxpr, inner.consts, *invals)
        elif all(_is_concrete(x) for x in invals) and not eqn.primitive.multiple_results:
            with jax.ensure_compile_time_eval():
                outvals = [_bind(eqn, invals)]
        elif name == "gather" and _is_concrete(invals[1]):
            outvals = [_onehot_gather(invals[0], np.asarray(invals[1]), eqn.params)]
        else:
            out = _bind(eqn, invals)
            outvals = out if eqn.primitive.multiple_results else [out]
        for var, val in zip(eqn.outvars, outvals, strict=True):
            env[var] = val
    return [read(v) for v in jaxpr.outvars]


def _bind(eqn, invals):
    return eqn.primitive.bind(*invals, **eqn.primitive.get_bind_params(eqn.params))


def onehot_transposes(fn):
    """`fn` with the same forward values whose constant-index gathers transpose to
    one-hot matmuls instead of scatter-adds. `fn` takes and returns pytrees of arrays;
    traced once per call (to a jaxpr of its inputs' shapes), so it works inside `vmap`."""

    @functools.wraps(fn)
    def wrapped(*args):
        flat, tree = jax.tree.flatten(args)
        specs = [jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x)) for x in flat]
        closed, out_shape = jax.make_jaxpr(
            lambda *xs: fn(*jax.tree.unflatten(tree, xs)), return_shape=True
        )(*specs)
        outs = _eval(closed.jaxpr, closed.consts, *flat)
        return jax.tree.unflatten(jax.tree.structure(out_shape), outs)

    return wrapped


def _fast_pipeline_step(self, pipeline_state, action, *, onehot: bool, unroll: bool):
    def substep(state):
        return self._pipeline.step(self.sys, state, action, self._debug)

    one = onehot_transposes(substep) if onehot else substep
    if unroll:  # the same substeps in the same order, as straight-line code
        for _ in range(self._n_frames):
            pipeline_state = one(pipeline_state)
        return pipeline_state
    return lax.scan(lambda s, _: (one(s), None), pipeline_state, (), self._n_frames)[0]


def _patched(env, onehot: bool, unroll: bool):
    """A shallow copy of the wrapper chain whose `PipelineEnv` steps with the fast path."""
    if isinstance(env, Wrapper):
        out = copy.copy(env)
        out.env = _patched(env.env, onehot, unroll)
        return out
    if not isinstance(env, PipelineEnv):
        return env  # a toy env: nothing to rewrite
    out = copy.copy(env)
    step = functools.partial(_fast_pipeline_step, onehot=onehot, unroll=unroll)
    out.pipeline_step = types.MethodType(step, out)
    return out


class FastGrad(Wrapper):
    """`env` whose physics step differentiates more cheaply; forward values are unchanged.

    **Arguments:** `env` (from `make_env`), `onehot` (constant-index gathers transpose to
    one-hot matmuls, not scatter-adds), `unroll` (the physics substeps as straight-line
    code, not a `lax.scan`), `remat` (each env step under `jax.checkpoint`: reverse mode
    stores the step's inputs, not one stacked buffer per intermediate, and recomputes the
    step in the backward pass).
    """

    def __init__(self, env, onehot: bool = True, unroll: bool = True, remat: bool = True):
        super().__init__(_patched(env, onehot, unroll))
        self.onehot, self.unroll, self.remat = onehot, unroll, remat

    def step(self, state: State, action: jax.Array, starts=None) -> State:
        inner: Callable = self.env.step  # an AutoResetEnv's step also takes its start pool

        def step(state, action, starts):
            return inner(state, action) if starts is None else inner(state, action, starts)

        step = jax.checkpoint(step, prevent_cse=False) if self.remat else step
        return step(state, action, starts)
