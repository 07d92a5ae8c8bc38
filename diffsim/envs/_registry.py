"""`make_env`: one name space over Brax's environments and diffsim's toy envs."""

import contextlib
import sys
import warnings
from collections.abc import Iterator
from typing import Any

import brax.envs
import mujoco as _mujoco

from ._playground import is_playground_name, make_playground_env, playground_names
from ._toy import TOY_ENVS
from ._wrapper import AutoResetEnv

BRAX_BACKENDS = ("spring", "generalized", "positional", "mjx")
DEFAULT_BACKEND = "spring"  # differentiable and the fastest Brax backend on CPU
DEFAULT_EPISODE_LENGTH = 1000
# The environments Brax 0.14 ships. Brax has no public call that lists its registry, so the
# names are listed here; an env added with `brax.envs.register_environment` is built by
# `make_env` all the same (through the public `brax.envs.get_environment`), just not listed.
_BRAX_ENVS = (
    "ant",
    "fast",
    "halfcheetah",
    "hopper",
    "humanoid",
    "humanoidstandup",
    "inverted_double_pendulum",
    "inverted_pendulum",
    "pusher",
    "reacher",
    "swimmer",
    "walker2d",
)

# Brax warns, for every env it builds (`brax.io.mjcf.load_model`, a UserWarning), that it is
# no longer actively maintained. diffsim builds on Brax knowingly, so the warning is noise over
# every command's first lines, and under `python -W error` it would make every Brax env
# unbuildable. MuJoCo's compiler prints (from C, not through Python's warnings) that Brax's
# half_cheetah.xml uses the deprecated `settotalmass`. Both are hidden only while `make_env`
# builds a Brax env (`_quiet_build`); the user's own models keep their warnings.
_BRAX_UNMAINTAINED = r"Brax System, \w+ and environments are not actively being maintained"
_SETTOTALMASS = "'settotalmass' is deprecated"


@contextlib.contextmanager
def _quiet_build() -> Iterator[None]:
    """Hide Brax's "not maintained" warning and MuJoCo's `settotalmass` deprecation while
    the body of the `with` runs; every other MuJoCo warning passes on to the handler in
    place before (MuJoCo's own, which prints it, if none)."""
    mujoco: Any = _mujoco  # a compiled module: its attributes are not visible to pyright
    previous = mujoco.get_mju_user_warning()

    def handler(message: str) -> None:
        if _SETTOTALMASS in message:
            return
        if previous is not None:
            previous(message)
        else:  # what MuJoCo's default handler prints
            print(f"WARNING: {message}\n", file=sys.stderr, flush=True)

    mujoco.set_mju_user_warning(handler)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", _BRAX_UNMAINTAINED, UserWarning)
            yield
    finally:
        mujoco.set_mju_user_warning(previous)


def toy_names() -> list[str]:
    """The built-in pure-JAX toy envs: `['ball', 'pendulum', 'reach']`."""
    return sorted(TOY_ENVS)


def brax_names() -> list[str]:
    """The environments Brax ships (`ant`, `halfcheetah`, ...), all buildable by `make_env`."""
    return sorted(_BRAX_ENVS)


def names() -> list[str]:
    """Every name `make_env` lists: the toy envs, Brax's, then MuJoCo Playground's DM
    Control Suite envs where `playground` is installed (`playground_names()`). (An env
    registered with `brax.envs.register_environment` is accepted too, though not listed.)"""
    return toy_names() + brax_names() + playground_names()


def make_env(
    name: str, *, backend: str | None = None, episode_length: int | None = None, **kwargs
) -> AutoResetEnv:
    """Build an environment by name, ready for `diffsim.rollout` and every strategy.

    The env is written for ONE instance (batch it with `jax.vmap`, as `rollout` does),
    auto-resets with fresh random initial states, ends episodes at `episode_length` steps
    (flagged as truncation, apart from termination) and tracks episode returns; see
    `diffsim.envs.AutoResetEnv`.

    **Arguments:**

    - `name`: a toy env (`diffsim.envs.toy_names()`) or any `brax.envs` name.
    - `backend`: Brax physics backend, one of `"spring"` (default: differentiable and
      fastest on CPU), `"generalized"`, `"positional"`, `"mjx"`. Toy envs take none.
    - `episode_length`: the time limit; default 1000 for Brax envs, the env's own for toys
      (reach 100, pendulum 200, ball 60).
    - `**kwargs`: passed to the env's constructor.

    **Returns:** an `AutoResetEnv` with `observation_size`, `action_size`, `episode_length`.

    **Raises:** `ValueError` naming the bad value and listing the valid ones.

    **Example:**

    ```python
    env = diffsim.make_env("inverted_pendulum")          # spring backend, 1000 steps
    env = diffsim.make_env("pendulum", episode_length=100)
    ```
    """
    if episode_length is not None and (
        not isinstance(episode_length, int)
        or isinstance(episode_length, bool)
        or episode_length < 1
    ):
        raise ValueError(f"episode_length must be a positive int, got {episode_length!r}")
    if name in TOY_ENVS:
        if backend is not None:
            raise ValueError(
                f"toy env {name!r} is pure JAX and takes no backend, got backend={backend!r}"
            )
        env = TOY_ENVS[name](**kwargs)
        length = episode_length or env.default_episode_length
    elif is_playground_name(name):  # MuJoCo Playground's DM Control Suite, on MJX
        return make_playground_env(name, backend=backend, episode_length=episode_length, **kwargs)
    else:
        backend = DEFAULT_BACKEND if backend is None else backend
        if backend not in BRAX_BACKENDS:
            raise ValueError(
                f"unknown backend {backend!r} for {name!r}; valid backends: {list(BRAX_BACKENDS)}"
            )
        env = _build_brax(name, backend, kwargs)
        length = episode_length or DEFAULT_EPISODE_LENGTH
    return AutoResetEnv(env, length, name=name)


def _build_brax(name: str, backend: str, kwargs: dict) -> brax.envs.Env:
    """`brax.envs.get_environment(name, backend=backend, **kwargs)`, quietly (`_quiet_build`),
    with Brax's errors turned into `ValueError`s that name the env."""
    try:
        with _quiet_build():
            return brax.envs.get_environment(name, backend=backend, **kwargs)
    except KeyError as error:
        if error.args != (name,):  # a KeyError from inside the env's constructor
            raise
        raise ValueError(f"unknown environment {name!r}; valid names: {names()}") from None
    except (ValueError, TypeError, NotImplementedError) as error:
        raise ValueError(
            f"brax could not build {name!r} with backend {backend!r}: {error}"
        ) from error
