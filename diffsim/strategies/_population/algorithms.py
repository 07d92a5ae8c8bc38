"""The evosax side of `ES` and `GuidedES`: which distribution-based algorithms fit the
ask/evaluate/tell loop, and how one is built for a policy's parameters."""

import inspect
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from evosax.algorithms import distribution_based_algorithms
from evosax.algorithms.distribution_based.base import DistributionBasedAlgorithm
from evosax.core import fitness_shaping as shaping

# Algorithms whose ask/tell does not fit "sample a population around one mean, rank it":
# several means (SV_*), a surrogate gradient to supply (GuidedES), or unrolled partial
# evaluations (NoiseReuseES, PersistentES), or required arguments beyond the population
# size and the solution (RandomSearch's sampling_fn).
_UNSUPPORTED = {"GuidedES", "NoiseReuseES", "PersistentES", "SV_CMA_ES", "SV_Open_ES"}


def _required_arguments(cls: type) -> list[str]:
    params = list(inspect.signature(cls.__init__).parameters.values())[1:]
    return [
        p.name
        for p in params
        if p.default is inspect.Parameter.empty
        and p.name not in ("population_size", "solution")
        and p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    ]


ALGORITHMS: dict[str, type] = {
    name: cls
    for name, cls in distribution_based_algorithms.items()
    if name not in _UNSUPPORTED and not _required_arguments(cls)
}
"""The evosax algorithms `ES` accepts by name (also accepted: the classes themselves)."""

SHAPING = {
    "centered_rank": shaping.centered_rank_fitness_shaping_fn,
    "standardize": shaping.standardize_fitness_shaping_fn,
    "normalize": shaping.normalize_fitness_shaping_fn,
    "raw": shaping.identity_fitness_shaping_fn,
}
"""Fitness shapings by name."""


def signature(cls: type) -> dict[str, inspect.Parameter]:
    """The parameters of `cls.__init__` by name."""
    return dict(inspect.signature(cls.__init__).parameters)


def uses_rank_weights(cls: type) -> bool:
    """True for algorithms (SNES, xNES, CMA-ES family...) whose update is defined on their
    own rank-based recombination weights rather than on an arbitrary shaped fitness."""
    default = signature(cls).get("fitness_shaping_fn")
    return default is not None and default.default is shaping.weights_fitness_shaping_fn


def algorithm_class(algorithm: str | type) -> type:
    """The evosax class of `algorithm` (a name in `ALGORITHMS` or a class), or `ValueError`
    naming the valid ones."""
    valid = f"valid names: {', '.join(sorted(ALGORITHMS))}"
    if isinstance(algorithm, str):
        if algorithm not in ALGORITHMS:
            raise ValueError(
                f"algorithm {algorithm!r} is not a supported evosax distribution-based"
                f" algorithm; {valid}"
            )
        return ALGORITHMS[algorithm]
    if not (isinstance(algorithm, type) and issubclass(algorithm, DistributionBasedAlgorithm)):
        raise ValueError(
            f"algorithm must be a name or an evosax distribution-based algorithm class,"
            f" got {algorithm!r}; {valid}"
        )
    if algorithm.__name__ in _UNSUPPORTED or _required_arguments(algorithm):
        raise ValueError(
            f"algorithm {algorithm.__name__} does not fit ES's ask/evaluate/tell loop; {valid}"
        )
    return algorithm


def settings(
    cls: type, *, optimizer: optax.GradientTransformation, std, antithetic: bool, shaping: str
) -> dict[str, Any]:
    """The keyword arguments of `cls` among an optax `optimizer` for the mean, a constant
    `std`, `antithetic` sampling and a fitness `shaping` (by name) that it takes."""
    sig = signature(cls)
    kwargs: dict[str, Any] = {}
    if "optimizer" in sig:
        kwargs["optimizer"] = optimizer
    if "std_schedule" in sig:
        kwargs["std_schedule"] = optax.constant_schedule(std)
    if "use_antithetic_sampling" in sig:
        kwargs["use_antithetic_sampling"] = antithetic
    if "fitness_shaping_fn" in sig and not uses_rank_weights(cls):
        kwargs["fitness_shaping_fn"] = SHAPING[shaping]
    return kwargs


def slim_metrics(key, population, fitness, state, params) -> dict:
    """Replaces evosax's default metrics (three parameter-sized vectors per generation)."""
    del key, population, fitness, state, params
    return {}


def build(cls: type, params, *, population_size: int, **kwargs):
    """The evosax algorithm `cls` for parameters shaped like `params` (which may be traced:
    only shapes matter, so it is built from concrete zeros, eagerly even under jit), with
    `slim_metrics` and the further keyword arguments `kwargs`."""
    solution = jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), params)
    with jax.ensure_compile_time_eval():
        return cls(
            population_size=population_size, solution=solution, metrics_fn=slim_metrics, **kwargs
        )


def hyperparams(es, std):
    """`es`'s default parameters, with the initial std `std` where it has one."""
    with jax.ensure_compile_time_eval():
        hp = es.default_params
    if hasattr(hp, "std_init"):
        hp = hp.replace(std_init=jnp.asarray(std, jnp.result_type(float)))
    return hp


def strong(tree):
    """Drop weak types (evosax mixes Python scalars into its state), so the state's types
    are the same after `init` and after every `step` and `step` compiles once."""
    return jax.tree.map(lambda x: jnp.asarray(x, dtype=jnp.result_type(x)), tree)
