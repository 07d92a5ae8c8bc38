"""The cache key of a study cell: a fingerprint of what the cell computes, not of the
files its code happens to live in.

A run is three traced programs (`_program`: `start`, `segment`, `evaluate`). Their jaxprs
hold every operation a run performs: the strategy's update and its helpers, the policy's
layers and widths, the env's dynamics and reward, the evaluation, and every constant
(hyperparameters, physics parameters). Printed without source information and without
the names of the Python functions they were traced from, they change with the maths and
with nothing else: a comment, a renamed function or a moved file keeps the fingerprint;
another learning rate, a wider network, another reward or another helper's arithmetic
changes it. Host-side logic (the budget plan, tuning, statistics) is not in a jaxpr:
`PROTOCOL_VERSION` stands for it, and is raised by hand when that logic changes.
"""

import hashlib
import re

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
from jax.extend.core import ClosedJaxpr, DropVar, Jaxpr, Var

from .._train import program as _program
from .._train.loop import Options, _prepare
from .._types import Env
from ..strategies.base import AbstractStrategy

# Raise when the host-side logic that shapes a cell's numbers changes: the budget plan
# (`_plan`), the tuning rule (`_tuning`), seeds and evaluation keys chosen on the host.
PROTOCOL_VERSION = 2

# What the printed jaxpr holds that is not maths: the names of jitted Python functions
# (`pjit[name=...]`) and addresses of Python objects.
_NOT_MATHS = (re.compile(r"\bname=[^\s\]]+"), re.compile(r"0x[0-9a-f]+"))


def jaxpr_digest(closed: ClosedJaxpr, digest) -> None:
    """Feed `closed`'s text (source information and function names left out, no sub-jaxpr
    shared) and its constants' dtypes, shapes and bytes into `digest`."""
    text = _unshared(closed.jaxpr).pretty_print(source_info=False, name_stack=False)
    for pattern in _NOT_MATHS:
        text = pattern.sub("", text)
    digest.update(text.encode())
    for const in closed.consts:
        array = np.asarray(jax.random.key_data(const) if _is_key(const) else const)
        digest.update(f"{array.dtype}{array.shape}".encode())
        digest.update(np.ascontiguousarray(array).tobytes())


def _unshared(jaxpr: Jaxpr) -> Jaxpr:
    """`jaxpr` rebuilt so that no two places share a sub-jaxpr or a variable object. JAX's
    printer pulls a sub-jaxpr that two equations hold as one object up to a numbered
    definition and names variables by object, and which equal sub-jaxprs are one object
    depends on what the process traced before (JAX's tracing caches): the same program
    printed otherwise after another cell's. Rebuilt, the text depends on the maths alone."""
    fresh: dict[Var, Var] = {}

    def bind(v):
        if isinstance(v, DropVar):
            return v
        fresh[v] = Var(v.aval, v.initial_qdd, v.final_qdd)
        return fresh[v]

    def use(v):
        return fresh.get(v, v) if isinstance(v, Var) else v  # (a Literal stays)

    def copy(param):
        if isinstance(param, ClosedJaxpr):
            return param.map_jaxpr(_unshared)
        if isinstance(param, Jaxpr):
            return _unshared(param)
        if isinstance(param, tuple | list) and any(
            isinstance(p, Jaxpr | ClosedJaxpr) for p in param
        ):
            return type(param)(copy(p) for p in param)
        return param

    constvars, invars = [bind(v) for v in jaxpr.constvars], [bind(v) for v in jaxpr.invars]
    eqns = []
    for e in jaxpr.eqns:
        ins, params = [use(v) for v in e.invars], {k: copy(v) for k, v in e.params.items()}
        eqns.append(e.replace(invars=ins, outvars=[bind(v) for v in e.outvars], params=params))
    outvars = [use(v) for v in jaxpr.outvars]
    return jaxpr.replace(constvars=constvars, invars=invars, eqns=eqns, outvars=outvars)


def _is_key(x) -> bool:
    return isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jax.dtypes.prng_key)


def program_fingerprint(
    strategy: AbstractStrategy,
    env: Env,
    policy,
    *,
    num_seeds: int,
    total_steps: int,
    num_evals: int,
    num_eval_episodes: int,
) -> str:
    """The fingerprint of `train_seeds(strategy, env, policy, keys=<num_seeds keys>,
    total_steps=..., num_evals=..., num_eval_episodes=...)`'s computation: a hash of its
    traced programs (traced, not compiled: seconds, not minutes). The keys' values are not
    part of it (they are data; a study records its seeds beside it).

    **Returns:** `"sha256:<hex>"`.

    **Example:**

    ```python
    make = lambda k: diffsim.GaussianPolicy(env.observation_size, env.action_size, key=k)
    program_fingerprint(diffsim.PPO(), env, make, num_seeds=5, total_steps=100_000,
                        num_evals=11, num_eval_episodes=16)   # "sha256:9b2e..."
    ```
    """
    options = Options(total_steps, num_evals, num_eval_episodes, False, seeds=True)
    strategy, plan = _prepare(strategy, env, policy, options)
    job = _program.Job(strategy, env, policy, plan, num_eval_episodes, True, None)
    params = eqx.filter(policy, eqx.is_array) if isinstance(policy, eqx.Module) else None
    keys = jr.split(jr.key(0), num_seeds)
    start, segment, evaluate = _program._functions(job)
    carry = jax.eval_shape(start, params, keys, None)
    digest = hashlib.sha256()
    for closed in (
        jax.make_jaxpr(start)(params, keys, None),
        jax.make_jaxpr(segment)(carry, jnp.zeros((), jnp.int32)),
        jax.make_jaxpr(evaluate)(carry, jnp.arange(num_seeds)),
    ):
        jaxpr_digest(closed, digest)
    for leaf in jax.tree.leaves(params):  # a policy given as a module: its initial weights
        digest.update(np.ascontiguousarray(np.asarray(leaf)).tobytes())
    return f"sha256:{digest.hexdigest()}"
