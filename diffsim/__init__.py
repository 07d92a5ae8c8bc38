"""diffsim: optimize control policies in differentiable physics with JAX.

PPO, analytic policy gradients and evolution strategies over one vmapped rollout core.
"""

from . import (
    _config,
    diagnostics as diagnostics,
    envs as envs,
    plotting as plotting,
    stats as stats,
    study as study,
)
from ._select import select_run as select_run
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
from .strategies import helpers as helpers, registry as _registry
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
from .strategies.reinforce import REINFORCE as REINFORCE, REINFORCEState as REINFORCEState
from .strategies.shac import SHAC as SHAC, SHACState as SHACState
from .train import train as train, train_seeds as train_seeds, train_sweep as train_sweep

register_strategy = _registry.register
for _cls in (PPO, APG, SHAC, ES, GuidedES, REINFORCE):
    register_strategy(_cls)

_config.enable_compilation_cache()
__version__ = "0.1.0"
