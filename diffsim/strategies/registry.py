"""One registry of strategy classes, shared by the CLI, plotting and the tests.

A strategy is known by a command-line name (`ppo`, `apg`, `shac`, `es`, `guided-es`,
`reinforce`). Three ways put a strategy of your own next to the built-in ones:

- `diffsim.register_strategy(MyStrategy)` (or as a class decorator) in your code;
- `MODULE:CLASS` wherever a name is taken (`diffsim train my_pkg.algos:MyStrategy`),
  which imports `MODULE` and takes its attribute `CLASS`;
- an entry point in the group `diffsim.strategies` of an installed package
  (`[project.entry-points."diffsim.strategies"]  mine = "my_pkg.algos:MyStrategy"`).

**Example:**

```python
@diffsim.register_strategy
class MyStrategy(diffsim.AbstractStrategy[MyState]):
    sweepable: ClassVar[tuple[str, ...]] = ("learning_rate",)
    learning_rate: float = 1e-3
    ...  # check, for_env, for_budget, init, step, policy and the step counts

diffsim.strategies.registry.resolve("mystrategy") is MyStrategy
```
"""

import importlib
import re
from importlib.metadata import entry_points

from .base import AbstractStrategy

ENTRY_POINT_GROUP = "diffsim.strategies"
# The built-in strategies, by their public name in `diffsim`: registered on the registry's
# first use, not at `import diffsim` (importing them imports Brax, which takes seconds).
BUILTIN = ("PPO", "APG", "SHAC", "AHAC", "SAPO", "ES", "GuidedES", "REINFORCE")
_REGISTERED: dict[str, type[AbstractStrategy]] = {}
_BUILTINS_LOADED: list[bool] = []


def _load_builtins() -> None:
    """Register `BUILTIN` (once; before anything else, so they keep their names)."""
    if _BUILTINS_LOADED:
        return
    _BUILTINS_LOADED.append(True)
    import diffsim

    for name in BUILTIN:
        register(getattr(diffsim, name))


def command_name(cls: type) -> str:
    """The default command-line name of a class: `GuidedES` -> `guided-es`, `PPO` -> `ppo`.

    **Example:** `command_name(diffsim.GuidedES) == "guided-es"`.
    """
    words = re.findall(r"[A-Z]+(?=[A-Z][a-z]|$)|[A-Z]?[a-z0-9]+|[A-Z]+", cls.__name__)
    return "-".join(w.lower() for w in words)


def register(cls: type[AbstractStrategy], name: str | None = None) -> type[AbstractStrategy]:
    """Add `cls` under `name` (default `command_name(cls)`) and return it, so it also
    works as a class decorator. Registering the same class twice is a no-op; another class
    under a taken name is a `ValueError`.

    **Example:** `diffsim.register_strategy(MyStrategy, name="mine")`.
    """
    if not (isinstance(cls, type) and issubclass(cls, AbstractStrategy)):
        raise TypeError(
            f"only subclasses of diffsim.AbstractStrategy can be registered, got {cls!r}"
        )
    _load_builtins()
    name = command_name(cls) if name is None else name
    if not re.fullmatch(r"[a-z][a-z0-9-]*", name):
        raise ValueError(f"a strategy name is lowercase letters, digits and '-', got {name!r}")
    if _REGISTERED.get(name, cls) is not cls:
        raise ValueError(f"strategy name {name!r} is taken by {_REGISTERED[name].__qualname__}")
    _REGISTERED[name] = cls
    return cls


def strategies() -> dict[str, type[AbstractStrategy]]:
    """Every known strategy by name: the built-in ones, then those registered in this
    process, then the entry points of installed packages (group `diffsim.strategies`).

    **Example:** `sorted(strategies())[:3] == ["apg", "es", "guided-es"]`.
    """
    _load_builtins()
    found = dict(_REGISTERED)
    for point in entry_points(group=ENTRY_POINT_GROUP):
        if point.name not in found:
            found[point.name] = point.load()
    return found


def resolve(spec: str | type[AbstractStrategy]) -> type[AbstractStrategy]:
    """The strategy class that `spec` names: a registered name (`"ppo"`), `"MODULE:CLASS"`
    (imported), or a class itself. Raises `ValueError` naming `spec` and the known names.

    **Example:** `resolve("guided-es") is diffsim.GuidedES`.
    """
    if isinstance(spec, type):
        found = spec
    elif ":" in spec:
        module, _, attribute = spec.partition(":")
        try:
            found = getattr(importlib.import_module(module), attribute)
        except (ImportError, AttributeError) as error:
            raise ValueError(
                f"strategy {spec!r}: cannot load {attribute!r} from module {module!r} ({error})"
            ) from error
    else:
        known = strategies()
        if spec not in known:
            raise ValueError(
                f"unknown strategy {spec!r}; known: {', '.join(known)}, or MODULE:CLASS"
            )
        found = known[spec]
    if not (isinstance(found, type) and issubclass(found, AbstractStrategy)):
        raise ValueError(f"strategy {spec!r} is {found!r}, not a diffsim.AbstractStrategy subclass")
    return found
