import os

# Tests share one compilation cache folder so a second run of the suite compiles little.
os.environ.setdefault(
    "DIFFSIM_CACHE_DIR", os.path.join(os.path.dirname(__file__), "..", ".venv", "jax-cache")
)
# The suite compiles hundreds of small programs and runs each briefly, so it is bound by
# compile time. Two XLA options for CPU code make it compile about twice as fast: LLVM's
# optimisation level 0 (tests/test_guided_es.py on a cold cache: 106 s at the default level,
# 85 s at 0) and XLA's older elemental emitters instead of its fusion emitters
# (tests/test_ppo.py and tests/test_guided_es.py on a cold cache, one core: 219 s, 138 s
# without the fusion emitters; the toy PPO program's XLA compile 13.9 s, 5.7 s). Both change
# how XLA generates machine code, not the programs (their jaxprs, which study keys read).
# Set before JAX starts; the child processes the tests start inherit them, and
# `diffsim._config.compiler_options()` defers to a level set in XLA_FLAGS.
SUITE_FLAGS = ["--xla_backend_optimization_level=0", "--xla_cpu_use_fusion_emitters=false"]
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    FLAGS = [os.environ.get("XLA_FLAGS", ""), *SUITE_FLAGS]
    os.environ["XLA_FLAGS"] = " ".join(filter(None, FLAGS))
# XLA_FLAGS for a child process with 4 virtual CPU devices (the suite's flags kept).
FOUR_DEVICES = f"{os.environ['XLA_FLAGS']} --xla_force_host_platform_device_count=4"

import contextlib  # noqa: E402
import importlib  # noqa: E402
import typing  # noqa: E402
from collections import Counter  # noqa: E402

import jax.numpy as jnp  # noqa: E402
import jax.random as jr  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from jax import monitoring  # noqa: E402

import diffsim  # noqa: E402
from diffsim.envs import Reach  # noqa: E402
from diffsim.strategies.base import StrategyState  # noqa: E402


class NaNReach(Reach):
    """Reach whose reward is NaN wherever the point is right of x = 0.5."""

    def reward(self, s, action, next_s):
        return jnp.where(next_s["pos"][0] > 0.5, jnp.nan, super().reward(s, action, next_s))


class AbstractTestStrategy(diffsim.AbstractStrategy[StrategyState]):
    """The base of the suite's test doubles: any env and policy will do (`check`), and
    neither the env nor the budget changes the settings (`for_env`, `for_budget`)."""

    def check(self, env, policy):
        pass

    def for_env(self, env):
        return self

    def for_budget(self, total_steps):
        return self


TRACE = "/jax/core/compile/jaxpr_trace_duration"  # one per function traced for jit
COMPILE = "/jax/core/compile/backend_compile_duration"  # one per XLA compile or cache load


@contextlib.contextmanager
def compiles():
    """Count what JAX traces and compiles inside the block, by function name:
    `counts[TRACE]` and `counts[COMPILE]` (totals) and `counts[TRACE, name]`. Counting
    compiles, not timing them, is how a test says "nothing was recompiled".

    **Example:** `with compiles() as counts: f(x)`, then `assert counts[TRACE] == 0`.
    """
    counts: Counter = Counter()

    def listen(event: str, duration: float, **kwargs) -> None:
        del duration
        if event in (TRACE, COMPILE):
            counts[event] += 1
            counts[event, kwargs.get("fun_name", "?")] += 1

    monitoring.register_event_duration_secs_listener(listen)
    try:
        yield counts
    finally:
        monitoring.unregister_event_duration_listener(listen)


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Free each test module's compiled programs when the module ends. One process that keeps
    every XLA executable of the suite alive holds tens of thousands of memory maps, and
    past the kernel's `vm.max_map_count` (65,530 here) XLA aborts in the middle of a compile."""
    yield
    importlib.import_module("diffsim._train.program").drop_programs()


def pytest_sessionfinish(session, exitstatus):
    if os.path.exists("/proc/self/maps"):
        maps = importlib.import_module("diffsim._train.program").memory_maps()
        print(f"\nmemory maps at the end of the session: {maps}")


# The longest test files, longest first: `make test` hands whole files to two workers
# (`--dist loadfile --no-loadscope-reorder`), and starting with the longest keeps both busy
# to the end. Seconds on one core, cold compilation cache (2026-12-07): conformance 293,
# study 176, playground 159, faults 93, gradients 83, apg 73, distributed 60, ppo 58,
# sharding 43; every other file under 35.
LONGEST_FIRST = (
    "test_conformance",
    "test_study",
    "test_playground",
    "test_faults",
    "test_gradients",
    "test_apg",
    "test_distributed",
    "test_ppo",
    "test_sharding",
)


def pytest_collection_modifyitems(items):
    """Order the files longest first (`LONGEST_FIRST`), the rest as collected."""
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.stem, len(rank)))


@pytest.fixture
def key():
    return jr.key(0)


@pytest.fixture(scope="session")
def envs():
    """One env object per name for the whole session, so compiled programs are reused."""
    cache = {}

    def get(name: str, **kwargs):
        k = (name, tuple(sorted(kwargs.items())))
        if k not in cache:
            cache[k] = diffsim.make_env(name, **kwargs)
        return cache[k]

    return get


def gaussian(env, key=None, **kwargs):
    key = jr.key(1) if key is None else key
    return diffsim.GaussianPolicy(env.observation_size, env.action_size, key=key, **kwargs)


def deterministic(env, key=None, **kwargs):
    key = jr.key(1) if key is None else key
    return diffsim.DeterministicPolicy(env.observation_size, env.action_size, key=key, **kwargs)


def outcome(run: diffsim.Run) -> dict[str, typing.Any]:
    """What `assert_same_arithmetic` compares, as arrays (a child process saves it)."""
    metrics = {f"metric:{k}": np.asarray(v) for k, v in run.metrics.items()}
    curve = {"env_steps": run.curve.env_steps, "eval_return": run.curve.eval_return}
    return {**{k: np.asarray(v) for k, v in curve.items()}, **metrics}


EXACT_ITERATIONS = 2  # iterations compared to float tolerance, before rounding drift grows


def assert_same_arithmetic(a: dict, b: dict) -> None:
    """`a` and `b` (`outcome`s of one run) are the same arithmetic up to the order of float
    sums, which XLA may change under `vmap` or across devices, and which depends on the
    CPU. Where that order cannot matter the check is exact: the env-step counts, the
    untrained policy's evaluation and the first iterations' metrics agree to float
    tolerance (a wrong batch, key or gradient changes them at once). Over hundreds of
    updates the rounding grows chaotically (PPO on `reach`: up to 0.8% of a return, and
    another CPU rounds otherwise), so the end of the run is checked statistically: both
    end within 5% of the learning progress of each other."""
    np.testing.assert_array_equal(a["env_steps"], b["env_steps"])
    first_eval, last_eval = (lambda r: r[..., 0, :]), (lambda r: r[..., -1, :])  # (evals, eps)
    np.testing.assert_allclose(
        first_eval(a["eval_return"]), first_eval(b["eval_return"]), rtol=1e-5, atol=1e-6
    )
    metrics = [k for k in b if k.startswith("metric:")]
    assert sorted(metrics) == sorted(k for k in a if k.startswith("metric:"))
    for k in metrics:  # (..., iterations)
        first = (..., slice(0, EXACT_ITERATIONS))
        np.testing.assert_allclose(a[k][first], b[k][first], rtol=1e-4, atol=1e-6, err_msg=k)
    start, final_a, final_b = (
        x.mean()
        for x in (
            first_eval(b["eval_return"]),
            last_eval(a["eval_return"]),
            last_eval(b["eval_return"]),
        )
    )
    assert abs(final_a - final_b) <= 0.05 * abs(final_b - start), (start, final_a, final_b)
