"""Environments: `make_env`, the registry of names, and `AbstractEnv` for an env of your own.

The names and sizes (`names`, `toy_names`, ...) come without importing Brax or MuJoCo;
everything else is imported on first use (PEP 562), like `diffsim`'s own names.
"""

from typing import TYPE_CHECKING, Any

from .. import _config
from ._catalog import (
    BRAX_BACKENDS as BRAX_BACKENDS,
    brax_names as brax_names,
    gymnax_names as gymnax_names,
    toy_names as toy_names,
)

_EXPORTS = {
    **dict.fromkeys(["AbstractEnv", "check_env"], "._base"),
    **dict.fromkeys(["GymnaxEnv"], "._gymnax"),
    **dict.fromkeys(["PlaygroundEnv", "make_playground_env", "playground_names"], "._playground"),
    **dict.fromkeys(["make_env", "names"], "._registry"),
    "from_config": "._spec",
    **dict.fromkeys(["AbstractToyEnv", "Ball", "Pendulum", "Reach"], "._toy"),
    "AutoResetEnv": "._wrapper",
}

if TYPE_CHECKING:
    from ._base import AbstractEnv as AbstractEnv, check_env as check_env
    from ._gymnax import GymnaxEnv as GymnaxEnv
    from ._playground import (
        PlaygroundEnv as PlaygroundEnv,
        make_playground_env as make_playground_env,
        playground_names as playground_names,
    )
    from ._registry import make_env as make_env, names as names
    from ._spec import from_config as from_config
    from ._toy import (
        AbstractToyEnv as AbstractToyEnv,
        Ball as Ball,
        Pendulum as Pendulum,
        Reach as Reach,
    )
    from ._wrapper import AutoResetEnv as AutoResetEnv


def __getattr__(name: str) -> Any:
    """Import a public name on first use (Brax with it, quietly) and keep it."""
    return _config.lazy_attribute(__name__, _EXPORTS, name)


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
