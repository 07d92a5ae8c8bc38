"""`make_env`: one name space over Brax's environments and diffsim's toy envs."""

import warnings

import brax.envs

from ._playground import is_playground_name, make_playground_env
from ._toy import TOY_ENVS
from ._wrapper import AutoResetEnv

BRAX_BACKENDS = ("spring", "generalized", "positional", "mjx")
DEFAULT_BACKEND = "spring"  # differentiable and the fastest Brax backend on CPU
DEFAULT_EPISODE_LENGTH = 1000

# Brax warns, for every env it builds (`brax.io.mjcf.load_model`, a UserWarning), that it is
# no longer actively maintained. diffsim builds on Brax knowingly, so the warning is noise over
# every command's first lines, and under `python -W error` it would make every Brax env
# unbuildable. `make_env` hides exactly this message, only while Brax builds the env.
_BRAX_UNMAINTAINED = r"Brax System, \w+ and environments are not actively being maintained"
# Brax's contact code reads `mjx.Data.ncon`, which MuJoCo deprecates; it warns each time a
# Brax step is traced. Not shown by default (a DeprecationWarning outside `__main__`), but an
# error under `-W error` that users cannot fix: ignore this one message when it comes from Brax.
warnings.filterwarnings(
    "ignore",
    message=r"Accessing `ncon` directly from `Data` is deprecated",
    category=DeprecationWarning,
    module=r"brax\.",
)


def toy_names() -> list[str]:
    """The built-in pure-JAX toy envs: `['ball', 'pendulum', 'reach']`."""
    return sorted(TOY_ENVS)


def brax_names() -> list[str]:
    """Every environment in Brax's registry (`brax.envs`)."""
    return sorted(brax.envs._envs)


def names() -> list[str]:
    """Every name `make_env` accepts: the toy envs, then Brax's."""
    return toy_names() + brax_names()


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
    elif name in brax.envs._envs:
        backend = DEFAULT_BACKEND if backend is None else backend
        if backend not in BRAX_BACKENDS:
            raise ValueError(
                f"unknown backend {backend!r} for {name!r}; valid backends: {list(BRAX_BACKENDS)}"
            )
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", _BRAX_UNMAINTAINED, UserWarning)
                env = brax.envs.get_environment(name, backend=backend, **kwargs)
        except (ValueError, TypeError, NotImplementedError) as error:
            raise ValueError(
                f"brax could not build {name!r} with backend {backend!r}: {error}"
            ) from error
        length = episode_length or DEFAULT_EPISODE_LENGTH
    elif is_playground_name(name):  # MuJoCo Playground's DM Control Suite, on MJX
        return make_playground_env(name, backend=backend, episode_length=episode_length, **kwargs)
    else:
        raise ValueError(f"unknown environment {name!r}; valid names: {names()}")
    return AutoResetEnv(env, length, name=name)
