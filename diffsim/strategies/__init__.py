"""The strategies: `base` (the contract), `registry`, `helpers`, one module per strategy.

Submodules load on first use (`diffsim.strategies.registry`, `diffsim.strategies.ppo`),
so `import diffsim` stays light."""

import importlib


def __getattr__(name: str):
    try:
        return importlib.import_module(f"{__name__}.{name}")
    except ModuleNotFoundError as error:
        if error.name != f"{__name__}.{name}":
            raise
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
