"""diffsim: optimize control policies in differentiable physics with JAX.

PPO, analytic policy gradients and evolution strategies over one vmapped rollout core.

Every public name below is imported on first use (PEP 562), so `import diffsim` costs
about what `import jax` does: Brax, MuJoCo and Playground load when an env or a strategy is
first asked for. To export a name, add it to `_EXPORTS` (name -> module) and to the
`TYPE_CHECKING` block (what type checkers and readers see); `tests/test_imports.py` checks
that the two agree and that `import diffsim` loads neither Brax nor MuJoCo.
"""

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

from . import _config

# Public name -> the module it comes from ("" for a submodule of the same name).
_EXPORTS: dict[str, str] = {
    **dict.fromkeys(
        [
            "diagnostics",
            "envs",
            "plotting",
            "policies",
            "results",
            "sharding",
            "stats",
            "strategies",
            "study",
        ],
        "",
    ),
    "register_policy": "._structure",
    **dict.fromkeys(
        ["Env", "LearningCurve", "Metrics", "Trajectory", "VanishingGradientWarning"], "._types"
    ),
    "select_run": "._results.select",
    "make_env": ".envs",
    **dict.fromkeys(
        [
            "MLP",
            "DeterministicPolicy",
            "GaussianPolicy",
            "RunningNorm",
            "ValueFunction",
            "trainable",
            "update_normalizers",
        ],
        ".policies",
    ),
    "render": ".render",
    **dict.fromkeys(["Run", "load_run"], ".results"),
    **dict.fromkeys(["evaluate", "reset", "rollout"], ".rollout"),
    "shard_batch": ".sharding",
    "helpers": ".strategies",
    "register_strategy": ".strategies.registry:register",
    **dict.fromkeys(["AHAC", "AHACState"], ".strategies.ahac"),
    **dict.fromkeys(["APG", "APGState"], ".strategies.apg"),
    "AbstractStrategy": ".strategies.base",
    "AbstractWindowStrategy": ".strategies._window.strategy",
    **dict.fromkeys(["UpdateOptions", "WindowOptions"], ".strategies._window.options"),
    "AbstractPopulationStrategy": ".strategies._population.population",
    **dict.fromkeys(["ES", "ESState"], ".strategies.es"),
    **dict.fromkeys(
        ["APGWindow", "Blend", "GuidedES", "GuidedESState", "SHACWindow", "Subspace"],
        ".strategies.guided_es",
    ),
    **dict.fromkeys(["PPO", "PPOState"], ".strategies.ppo"),
    **dict.fromkeys(["REINFORCE", "REINFORCEState"], ".strategies.reinforce"),
    **dict.fromkeys(["SAPO", "SAPOState"], ".strategies.sapo"),
    **dict.fromkeys(["SHAC", "SHACState"], ".strategies.shac"),
    **dict.fromkeys(["train", "train_seeds", "train_sweep"], ".train"),
}
_NO_BRAX = {"envs", "stats"}  # submodules that import Brax themselves only when needed

if TYPE_CHECKING:
    from . import (
        diagnostics as diagnostics,
        envs as envs,
        plotting as plotting,
        policies as policies,
        results as results,
        sharding as sharding,
        stats as stats,
        strategies as strategies,
        study as study,
    )
    from ._results.select import select_run as select_run
    from ._structure import register_policy as register_policy
    from ._types import (
        Env as Env,
        LearningCurve as LearningCurve,
        Metrics as Metrics,
        Trajectory as Trajectory,
        VanishingGradientWarning as VanishingGradientWarning,
    )
    from .envs import make_env as make_env
    from .policies import (
        MLP as MLP,
        DeterministicPolicy as DeterministicPolicy,
        GaussianPolicy as GaussianPolicy,
        RunningNorm as RunningNorm,
        ValueFunction as ValueFunction,
        trainable as trainable,
        update_normalizers as update_normalizers,
    )
    from .render import render as render
    from .results import Run as Run, load_run as load_run
    from .rollout import evaluate as evaluate, reset as reset, rollout as rollout
    from .sharding import shard_batch as shard_batch
    from .strategies import helpers as helpers
    from .strategies._population.population import (
        AbstractPopulationStrategy as AbstractPopulationStrategy,
    )
    from .strategies._window.options import (
        UpdateOptions as UpdateOptions,
        WindowOptions as WindowOptions,
    )
    from .strategies._window.strategy import AbstractWindowStrategy as AbstractWindowStrategy
    from .strategies.ahac import AHAC as AHAC, AHACState as AHACState
    from .strategies.apg import APG as APG, APGState as APGState
    from .strategies.base import AbstractStrategy as AbstractStrategy
    from .strategies.es import ES as ES, ESState as ESState
    from .strategies.guided_es import (
        APGWindow as APGWindow,
        Blend as Blend,
        GuidedES as GuidedES,
        GuidedESState as GuidedESState,
        SHACWindow as SHACWindow,
        Subspace as Subspace,
    )
    from .strategies.ppo import PPO as PPO, PPOState as PPOState
    from .strategies.registry import register as register_strategy  # noqa: F401
    from .strategies.reinforce import REINFORCE as REINFORCE, REINFORCEState as REINFORCEState
    from .strategies.sapo import SAPO as SAPO, SAPOState as SAPOState
    from .strategies.shac import SHAC as SHAC, SHACState as SHACState
    from .train import train as train, train_seeds as train_seeds, train_sweep as train_sweep


def __getattr__(name: str) -> Any:
    """Import a public name on first use and keep it (PEP 562)."""
    value = _config.lazy_attribute(__name__, _EXPORTS, name, brax=name not in _NO_BRAX)
    if name == "strategies":  # `diffsim.strategies.registry`, as before names were lazy
        importlib.import_module(".strategies.registry", __name__)
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})


class _Package(types.ModuleType):
    """diffsim's module type: importing the submodule `diffsim.train` (or `.render`) must
    not replace the function `diffsim.train` (or `diffsim.render`), as Python's import
    system would by setting the package attribute of the submodule's name."""

    def __setattr__(self, name: str, value: Any) -> None:
        if isinstance(value, types.ModuleType) and _EXPORTS.get(name, "") != "":
            return  # the submodule stays reachable as sys.modules["diffsim." + name]
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
_config.enable_compilation_cache()
__version__ = "0.1.0"
