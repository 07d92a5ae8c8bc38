"""How a saved run rebuilds its env: `make_env`'s arguments as JSON data (never a pickle).

`make_env` records them on the env it returns (`env.spec`), `train` copies them into
`run.config["env_spec"]`, and `Run.make_env()` / `from_config` call `make_env` with them
again. A user's env class is recorded by its import path `"MODULE:CLASS"`: rebuilding
imports that module, which is the only code a saved run makes Python run, and only when
the caller asks for the env (`load_run` itself imports nothing).
"""

import importlib
import json
from typing import Any

SPEC_FORMAT = 1


def class_path(cls: type) -> str | None:
    """`"MODULE:CLASS"` for a class another process can import, else None (a class from
    `__main__` or defined inside a function)."""
    if cls.__module__ == "__main__" or "<locals>" in cls.__qualname__:
        return None
    return f"{cls.__module__}:{cls.__qualname__}"


def env_class(spec: str) -> type:
    """The class `"MODULE:CLASS"` names (importing MODULE). Raises `ValueError` naming the
    spec when the module or the attribute cannot be found, or it is not a class."""
    module, _, attribute = spec.partition(":")
    try:
        found: Any = importlib.import_module(module)
        for part in attribute.split("."):
            found = getattr(found, part)
    except (ImportError, AttributeError) as error:
        raise ValueError(
            f"env {spec!r}: cannot load {attribute!r} from module {module!r} ({error}); is"
            " the module on sys.path (the current directory, PYTHONPATH or installed)?"
        ) from error
    if not isinstance(found, type):
        raise ValueError(f"env {spec!r} is {found!r}, not a class")
    return found


def spec_of(name: str | None, backend, episode_length: int, kwargs: dict) -> dict:
    """The record `from_config` rebuilds an env from. Where that is impossible (a class
    that cannot be imported by path, or arguments that are not plain JSON values) the
    record says why in `"unavailable"` instead of naming the env."""
    spec: dict[str, Any] = {"format": SPEC_FORMAT, "name": name, "backend": backend}
    spec |= {"episode_length": episode_length, "kwargs": {}}
    if name is None:
        return spec | {
            "unavailable": "its class is defined in __main__ or inside a function; define it"
            " in a module, then make_env('MODULE:CLASS')"
        }
    try:
        same = json.loads(json.dumps(kwargs)) == kwargs
    except (TypeError, ValueError):
        same = False
    if not same:
        return spec | {
            "name": None,
            "unavailable": f"its arguments {sorted(kwargs)} are not plain JSON values",
        }
    return spec | {"kwargs": kwargs}


def from_config(config: dict):
    """The env a saved run trained on, built again with `make_env` from
    `config["env_spec"]` (or, for runs saved before it existed, from `config["env"]`,
    `"backend"` and `"episode_length"`). A user's env class is imported by its recorded
    path `"MODULE:CLASS"`, which must be importable here.

    **Raises:** `ValueError` saying why a run's env cannot be rebuilt.

    **Example:**

    ```python
    run = diffsim.load_run("results/my_run")
    env = diffsim.envs.from_config(run.config)   # the same as run.make_env()
    ```
    """
    from ._registry import make_env

    spec = config.get("env_spec")
    if spec is None:  # a run saved before env specs: a registry name
        toy = config["env"] in _toy_names()
        backend = None if toy or config.get("backend") == "jax" else config.get("backend")
        return make_env(config["env"], backend=backend, episode_length=config.get("episode_length"))
    if spec.get("name") is None:
        raise ValueError(
            f"this run's env {config.get('env')!r} cannot be rebuilt:"
            f" {spec.get('unavailable', 'no name recorded')}"
        )
    return make_env(
        spec["name"],
        backend=spec.get("backend"),
        episode_length=spec.get("episode_length"),
        **spec.get("kwargs", {}),
    )


def _toy_names() -> list[str]:
    from ._catalog import toy_names

    return toy_names()
