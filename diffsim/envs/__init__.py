"""Environments: `make_env` and the registry of names."""

from ._playground import (
    PlaygroundEnv as PlaygroundEnv,
    make_playground_env as make_playground_env,
    playground_names as playground_names,
)
from ._registry import (
    BRAX_BACKENDS as BRAX_BACKENDS,
    brax_names as brax_names,
    make_env as make_env,
    names as names,
    toy_names as toy_names,
)
from ._toy import (
    AbstractToyEnv as AbstractToyEnv,
    Ball as Ball,
    Pendulum as Pendulum,
    Reach as Reach,
)
from ._wrapper import AutoResetEnv as AutoResetEnv
