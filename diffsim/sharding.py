"""Spreading a run over devices: one `Mesh` with a seed axis and a batch axis.

`train_seeds` `vmap`s whole runs over the `"seeds"` axis; inside a run, each strategy
marks its batch (PPO's and APG's env batch, ES's population) with `shard_batch`, which
splits it over the `"batch"` axis. Everything else (policy, optimiser state) is
replicated, and XLA inserts the reductions (gradient sums, fitness ranking) itself.

Across processes (`jax.distributed`) the mesh spans the devices of every process: `put`
places the same host values from each process on it, and `gather` brings results back
whole to every process.
"""

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, PartitionSpec as P

SEEDS, BATCH = "seeds", "batch"


def shard_batch(tree):
    """Split the leading axis of every leaf of `tree` over the current mesh's `"batch"` axis.

    A no-op outside a mesh (one device), for leaves without a leading axis, and for leaves
    whose leading axis does not divide evenly (those stay replicated: correct, just not
    parallel). Strategies call it on the arrays they run in parallel, so the same code runs
    on one device or many.

    **Example** (inside a strategy's `init` or `step`):

    ```python
    env_state = diffsim.shard_batch(diffsim.reset(env, key=key, num_envs=64))
    ```
    """
    size = _axis_size(BATCH)
    if size == 1:
        return tree

    def constrain(x):
        if getattr(x, "ndim", 0) == 0 or x.shape[0] % size:
            return x
        return jax.lax.with_sharding_constraint(x, P(BATCH))

    return jax.tree.map(constrain, tree)


def shard_seeds(tree):
    """Split the leading (seed) axis of every leaf over the `"seeds"` axis, leaving the
    layout of the other axes (a batch split by `shard_batch`) to the compiler. A no-op
    unless the current mesh splits seeds."""
    if _axis_size(SEEDS) == 1:
        return tree

    def constrain(x):
        return jax.lax.with_sharding_constraint(x, P(SEEDS, *[P.UNCONSTRAINED] * (x.ndim - 1)))

    return jax.tree.map(constrain, tree)


def put(tree, sharding):
    """`jax.device_put(tree, sharding)`, also where `sharding` spans the devices of
    several processes (`jax.distributed`): then every process passes the same values."""
    if jax.process_count() == 1:
        return jax.device_put(tree, sharding)

    def one(x):
        if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
            return jr.wrap_key_data(one(jr.key_data(x)), impl=jr.key_impl(x))
        return jax.device_put(np.asarray(x), sharding)

    return jax.tree.map(one, tree)


def gather(tree):
    """`tree` with each array that spans devices of other processes (`jax.distributed`)
    replaced by its whole value, on this process. A no-op in one process.

    Every process must call it with the same tree (it is a collective)."""
    if jax.process_count() == 1:
        return tree

    def whole(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return jnp.asarray(multihost_utils.process_allgather(x, tiled=True))
        return x

    return jax.tree.map(whole, tree)


def _axis_size(name: str) -> int:
    """Devices along axis `name` of the current mesh (1 outside a mesh or without it)."""
    mesh = jax.sharding.get_abstract_mesh()
    return 1 if mesh.empty or name not in mesh.axis_names else mesh.shape[name]


def make_mesh(
    devices: Sequence[jax.Device] | None,  # pyright: ignore[reportInvalidTypeForm]
    *,
    num_seeds: int | None,
    batch_size: int,
    owner: str,
) -> Mesh | None:
    """The `("seeds", "batch")` mesh of a run, or None on one device.

    Seeds take as many devices as divide them evenly (`gcd(num_seeds, devices)`; none for a
    single run); the rest split each run's batch, which must then divide evenly.
    """
    devices = list(jax.devices() if devices is None else devices)
    if len(devices) == 1:
        return None
    seeds = 1 if num_seeds is None else math.gcd(num_seeds, len(devices))
    batch = len(devices) // seeds
    if batch_size % batch:
        split = "" if num_seeds is None else f" per seed group ({num_seeds} seeds in {seeds})"
        raise ValueError(
            f"{owner} runs {batch_size} envs or population members in parallel, which cannot"
            f" be split evenly over {batch} devices{split}; use a batch that is a multiple"
            f" of {batch}, or pass devices=jax.devices()[:k] for a k that divides it"
        )
    return Mesh(np.array(devices).reshape(seeds, batch), (SEEDS, BATCH))
