"""`make_env`: one name space over diffsim's toy envs, Brax's, MuJoCo Playground's,
gymnax's and the user's own env classes (`"MODULE:CLASS"`)."""

import contextlib
import sys
import warnings
from collections.abc import Iterator
from typing import Any

import brax.envs
import mujoco as _mujoco
from brax.envs.base import Env

from ._catalog import BRAX_BACKENDS as BRAX_BACKENDS, brax_names, gymnax_names, toy_names
from ._gymnax import PREFIX as GYMNAX_PREFIX, make_gymnax
from ._playground import is_playground_name, make_playground_env, playground_names
from ._spec import class_path, env_class, spec_of
from ._toy import TOY_ENVS
from ._wrapper import AutoResetEnv

DEFAULT_BACKEND = "spring"  # differentiable and the fastest Brax backend on CPU
DEFAULT_EPISODE_LENGTH = 1000
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


def names() -> list[str]:
    """Every name `make_env` lists: the toy envs, Brax's, MuJoCo Playground's DM Control
    Suite envs where `playground` is installed (`playground_names()`), then gymnax's
    continuous-action envs where `gymnax` is (`"gymnax:Pendulum-v1"`, ...). (An env
    registered with `brax.envs.register_environment` is accepted too, though not listed;
    so is any env class of your own, as `"MODULE:CLASS"`.)"""
    return toy_names() + brax_names() + playground_names() + gymnax_names()


def make_env(
    name: str | type,
    *,
    backend: str | None = None,
    episode_length: int | None = None,
    **kwargs,
) -> AutoResetEnv:
    """Build an environment, ready for `diffsim.rollout` and every strategy.

    The env is written for ONE instance (batch it with `jax.vmap`, as `rollout` does),
    auto-resets with fresh random initial states, ends episodes at `episode_length` steps
    (flagged as truncation, apart from termination) and tracks episode returns; see
    `diffsim.envs.AutoResetEnv`. It records how to build it again (`env.spec`, plain
    JSON: the name or import path, the backend, the episode length and `kwargs`), which
    `train` saves with a run so that `Run.make_env()` works in another process.

    **Arguments:**

    - `name`: a toy env (`diffsim.envs.toy_names()`), any `brax.envs` name, a MuJoCo
      Playground DM Control Suite name (`"CheetahRun"`), `"gymnax:NAME"` (a continuous
      gymnax env, transition gradients on), or an env class of your own: the class
      itself or `"MODULE:CLASS"` (a `diffsim.envs.AbstractEnv` subclass, or any Brax
      `Env` class with a `default_episode_length` or an `episode_length` given here).
    - `backend`: Brax physics backend, one of `"spring"` (default: differentiable and
      fastest on CPU), `"generalized"`, `"positional"`, `"mjx"`. Other envs take none.
    - `episode_length`: the time limit; default 1000 for Brax envs, the env's own for toys
      (reach 100, pendulum 200, ball 60), your class's `default_episode_length`, gymnax's
      `max_steps_in_episode`.
    - `**kwargs`: passed to the env's constructor (for a saved run: plain JSON values).

    **Returns:** an `AutoResetEnv` with `observation_size`, `action_size`, `episode_length`.

    **Raises:** `ValueError` naming the bad value and listing the valid ones; for your own
    class, `TypeError`/`ValueError` naming the member that breaks `AbstractEnv`'s
    interface and the shape expected (checked by tracing, before anything compiles).

    **Example:**

    ```python
    env = diffsim.make_env("inverted_pendulum")          # spring backend, 1000 steps
    env = diffsim.make_env("pendulum", episode_length=100)
    env = diffsim.make_env("gymnax:Pendulum-v1")
    env = diffsim.make_env("my_envs:Cart", gain=2.0)     # your own class, by import path
    ```
    """
    if episode_length is not None and (
        not isinstance(episode_length, int)
        or isinstance(episode_length, bool)
        or episode_length < 1
    ):
        raise ValueError(f"episode_length must be a positive int, got {episode_length!r}")
    if isinstance(name, str) and name.startswith(GYMNAX_PREFIX):
        _no_backend(name, backend)
        env = make_gymnax(name.removeprefix(GYMNAX_PREFIX), **kwargs)
        length = episode_length or env.default_episode_length
    elif isinstance(name, type) or ":" in name:
        _no_backend(name, backend)
        env, path = _own_env(name, episode_length, kwargs)
        length = episode_length or env.default_episode_length  # pyright: ignore[reportAttributeAccessIssue]
        label = path or type(env).__name__
        return AutoResetEnv(env, length, name=label, spec=spec_of(path, None, length, kwargs))
    elif name in TOY_ENVS:
        _no_backend(name, backend)
        env = TOY_ENVS[name](**kwargs)
        length = episode_length or env.default_episode_length
    elif is_playground_name(name):  # MuJoCo Playground's DM Control Suite, on MJX
        built = make_playground_env(name, backend=backend, episode_length=episode_length, **kwargs)
        built.spec = spec_of(name, backend, built.episode_length, kwargs)
        return built
    else:
        backend = DEFAULT_BACKEND if backend is None else backend
        if backend not in BRAX_BACKENDS:
            raise ValueError(
                f"unknown backend {backend!r} for {name!r}; valid backends: {list(BRAX_BACKENDS)}"
            )
        env = _build_brax(name, backend, kwargs)
        length = episode_length or DEFAULT_EPISODE_LENGTH
    spec = spec_of(name, backend, length, kwargs)
    return AutoResetEnv(env, length, name=name, spec=spec)


def _no_backend(name, backend: str | None) -> None:
    if backend is not None:
        raise ValueError(f"env {name!r} is pure JAX and takes no backend, got backend={backend!r}")


def _own_env(name: str | type, episode_length: int | None, kwargs: dict) -> tuple[Env, str | None]:
    """A user's env class (or `"MODULE:CLASS"`) built with `kwargs`, and its import path
    (None where another process could not import it)."""
    cls = env_class(name) if isinstance(name, str) else name
    if not (isinstance(cls, type) and issubclass(cls, Env)):
        raise ValueError(
            f"env {name!r} is {cls!r}: write a diffsim.envs.AbstractEnv subclass (or a Brax Env)"
        )
    path = name if isinstance(name, str) else class_path(cls)
    env = cls(**kwargs)
    if episode_length is None and not isinstance(getattr(env, "default_episode_length", None), int):
        raise TypeError(
            f"{cls.__name__} must set default_episode_length (an int), or pass episode_length="
        )
    return env, path


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
