"""Evolution strategies guided by simulator gradients: the population's fitness and the
analytic gradient of a differentiable window, in one update.

What varies is two objects: the gradient source (`APGWindow`, or `SHACWindow` with its
critic; `_guide_windows.py`) and the mode that uses its gradient (`Blend` or `Subspace`;
`_guide_modes.py`). The population is `ES`'s (`_population.py`, `_algorithms.py`).
"""

from collections.abc import Callable
from typing import Any, ClassVar, cast

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import optax
from brax.envs.base import State
from evosax.algorithms import Open_ES
from jax.flatten_util import ravel_pytree
from jaxtyping import Array, Float, PRNGKeyArray

from .._types import Env, Metrics
from ..policies import trainable
from . import helpers
from ._population import algorithms as algorithms
from ._population.estimates import (
    BlendEstimate as BlendEstimate,
    blend as blend,
    guided_directions as guided_directions,
)
from ._population.modes import (
    AbstractGuideMode as AbstractGuideMode,
    Analytic,
    Blend as Blend,
    Subspace as Subspace,
)
from ._population.population import AbstractPopulationStrategy, with_statistics
from ._population.windows import (
    AbstractGuideWindow as AbstractGuideWindow,
    APGWindow as APGWindow,
    SHACWindow as SHACWindow,
)
from ._window.critic import Critic
from ._window.gradient import WindowGradient, window_gradient
from ._window.valve import step_norm_stats
from .helpers import select


class GuidedESState(eqx.Module):
    """State of `GuidedES`.

    **Fields:**

    - `policy`: the distribution mean as a policy, with the current observation normaliser
      (what `GuidedES.policy` returns; the mean is also held flat in `evosax.mean`).
    - `evosax`: the state of evosax's `Open_ES` (flat mean, std, Adam state).
    - `env_state`: the env batch the gradient windows run in, carried across generations.
    - `subspace`: with `Subspace(dims=k)`, `Float[Array, "k d"]`, the `k` most recent
      analytic gradients (rows of zeros before there are `k` of them); else None.
    - `critic`: the critic of a `SHACWindow`, else None.
    """

    policy: eqx.Module
    evosax: Any
    env_state: State
    subspace: Float[Array, "k d"] | None
    critic: Critic | None


class GuidedES(AbstractPopulationStrategy[GuidedESState]):
    """Evolution strategies guided by the analytic gradient through the simulator.

    Let `theta` (`d` numbers) be the distribution mean (the policy's trainable parameters,
    flattened), `sigma = std`, `P = population_size` and `T = rollout_length`. One `step`
    (one generation):

    1. **Analytic gradient at the mean**, per env of the `gradient` window (`jax.vmap` of
       `jax.grad`): APG's window loss (`APGWindow`) or SHAC's critic-bootstrapped one
       (`SHACWindow`). Envs whose window diverged drop out (`metrics["masked_envs"]`). On
       the scale of a `T`-step return: `g_an^b = T grad L_b`, `g_an` their mean.
    2. **Population** `theta +- sigma e_j` (antithetic), drawn by the `mode`: `Blend`
       draws Open-ES's `e_j ~ N(0, I)`, `Subspace` stretches them along recent `g_an`.
       Members are marked with `diffsim.shard_batch`.
    3. **Fitness** `F_i`: each member's mean return over the same `episodes_per_member`
       episodes, played deterministically to their end (at most `T` steps), exactly as
       `ES` evaluates; non-finite ones rank with the worst finite one.
    4. **Update** of the mean with Adam (`learning_rate`) by the `mode`: `Blend` on the
       inverse-variance blend of ES's and the analytic estimate, `Subspace` on Open-ES's
       rank-based estimate from the stretched population.
    5. The observation normaliser takes in the observations of the scored episodes (as in
       `ES`); a `SHACWindow`'s critic is trained on the window.

    With a zero analytic gradient (a reward flat in the actions) both modes make the update
    (to float rounding) of `ES(fitness_shaping="raw")` (`Blend`) or
    `ES(fitness_shaping="centered_rank")` (`Subspace`) from the same key. evosax's own
    `GuidedES` is not used: it turns the missing (zero) gradients of its first generations
    into search along the first coordinate axes, and its `std` is the perturbation's total
    size, not Open-ES's per coordinate, so it cannot reduce to `ES`.

    Logged every generation: the mode's weights, norms and cosine of the two estimates
    (see `Blend`, `Subspace`), the window's `loss` and `masked_envs`, `value_loss` with a
    `SHACWindow`. `steps_per_iteration = P * episodes_per_member * T + num_envs * horizon`
    at most; the population counts the steps inside its scored episodes.

    **Fields** (all keyword, all with defaults):

    - `mode`: `Blend()` or `Subspace(dims, alpha)`.
    - `gradient`: `APGWindow(num_envs, horizon, ...)` or `SHACWindow(...)` with the
      critic's settings. The window acts by `policy(obs)` unless its `stochastic=True`,
      and then needs a policy that samples with a key.
    - `population_size`, `episodes_per_member`, `rollout_length` (None: the env's episode
      length), `std`, `learning_rate`: as in `ES` (Open-ES, antithetic). Members are always
      evaluated by their deterministic action.

    **Example:**

    ```python
    from diffsim.strategies.guided_es import APGWindow, Blend

    env = diffsim.make_env("reach")
    policy = diffsim.DeterministicPolicy(env.observation_size, env.action_size, key=k1)
    guided = diffsim.GuidedES(
        mode=Blend(), gradient=APGWindow(num_envs=16, horizon=20), population_size=16
    )
    run = diffsim.train(guided, env, policy, key=k2, total_steps=100_000)
    run.metrics["analytic_weight"]          # per generation: how much the gradient counted
    ```
    """

    sweepable: ClassVar[tuple[str, ...]] = ("std", "learning_rate")
    mode: AbstractGuideMode = Blend()
    gradient: AbstractGuideWindow = APGWindow()
    population_size: int = eqx.field(default=32, static=True)
    episodes_per_member: int = eqx.field(default=1, static=True)
    rollout_length: int | None = eqx.field(default=None, static=True)
    std: float = 0.05
    learning_rate: float | Callable[[Array], Array] = 0.01

    def __check_init__(self):
        self._check_population()
        if not isinstance(self.mode, AbstractGuideMode):
            raise ValueError(f"mode must be Blend() or Subspace(...), got {self.mode!r}")
        if not isinstance(self.gradient, AbstractGuideWindow):
            raise ValueError(
                f"gradient must be APGWindow(...) or SHACWindow(...), got {self.gradient!r}"
            )
        if self.population_size % 2:
            raise ValueError(
                f"population_size={self.population_size} must be even (antithetic pairs)"
            )
        self.mode.check(population_size=self.population_size, num_envs=self.gradient.num_envs)
        helpers.learning_rate("learning_rate", self.learning_rate)

    # ------------------------------------------------------------------ the contract

    @property
    def steps_per_iteration(self) -> int:
        return self._population_steps + self._window_steps

    @property
    def min_steps_per_iteration(self) -> int:
        return self.population_size * self.episodes_per_member + self._window_steps

    @property
    def _window_steps(self) -> int:
        return self.gradient.num_envs * self.gradient.horizon

    def check(self, env: Env, policy: eqx.Module) -> None:
        window = self.gradient.window
        window.check(env, policy)  # backend, horizon, remat, float64, a key-taking policy
        self._check_rollout_length(env)
        if not window.stochastic and (hasattr(policy, "sample") or hasattr(policy, "log_prob")):
            raise ValueError(
                f"{window.owner}(stochastic=False) acts with policy(obs) only, so the std of"
                f" the stochastic {type(policy).__name__} would be searched but never used;"
                f" pass a DeterministicPolicy, or {window.owner}(stochastic=True)"
            )
        flat = jax.eval_shape(lambda p: ravel_pytree(eqx.filter(p, trainable(p)))[0], policy)
        self.mode.check_params(flat.shape[0], type(policy).__name__)

    def init(self, env: Env, policy: eqx.Module, *, key: PRNGKeyArray) -> GuidedESState:
        guided = self.for_env(env)
        guided.check(env, policy)
        env_key, critic_key, es_key = jr.split(key, 3)
        params = eqx.filter(policy, trainable(policy))
        es = guided._evosax(params)
        flat = ravel_pytree(params)[0]
        return GuidedESState(
            policy=policy,
            evosax=algorithms.strong(es.init(es_key, params, algorithms.hyperparams(es, self.std))),
            env_state=self.gradient.window.initial_env_state(env, policy, key=env_key),
            subspace=self.mode.init(flat.shape[0], flat.dtype),
            critic=self.gradient.init(env, key=critic_key),
        )

    def policy(self, state: GuidedESState) -> eqx.Module:
        """The distribution mean with the current observation normaliser."""
        return state.policy

    # ------------------------------------------------------------------ one generation

    def _evosax(self, params) -> Open_ES:
        """evosax's Open-ES for parameters shaped like `params`, as `ES` builds it, with the
        mode's fitness shaping."""
        kwargs = algorithms.settings(
            Open_ES,
            optimizer=optax.adam(cast(optax.ScalarOrSchedule, self.learning_rate)),
            std=self.std,
            antithetic=True,
            shaping=self.mode.fitness_shaping,
        )
        return algorithms.build(Open_ES, params, population_size=self.population_size, **kwargs)

    def _analytic(
        self, env: Env, state: GuidedESState, params, static, *, key: PRNGKeyArray
    ) -> tuple[WindowGradient, Analytic]:
        """The window's gradient at the mean, per env, and flattened to `T`-step scale."""
        grad = window_gradient(
            lambda policy, env_state, key: self.gradient.losses(
                env, policy, env_state, state.critic, key=key
            ),
            params,
            static,
            state.env_state,
            key=key,
            per_env=True,
            horizon=self.gradient.horizon,
        )
        ravel = lambda tree: ravel_pytree(tree)[0]
        scale = float(self._rollout_length(env))  # to the scale of a T-step return
        mean = scale * ravel(grad.grads)
        per_env = scale * jax.vmap(ravel)(grad.per_env_grads)
        usable = grad.ok & (jnp.linalg.norm(mean) > 0)
        return grad, Analytic(mean=mean, per_env=per_env, kept=grad.kept, usable=usable)

    def step(
        self, env: Env, state: GuidedESState, *, key: PRNGKeyArray
    ) -> tuple[GuidedESState, Metrics]:
        # The population's keys are those `ES.step` uses, so both make the same generation.
        ask_key, eval_key, tell_key = jr.split(key, 3)
        window_key, critic_key = jr.split(jr.fold_in(key, 1))
        params, static = eqx.partition(state.policy, trainable(state.policy))
        es = self._evosax(params)
        hp = algorithms.hyperparams(es, self.std)
        grad, analytic = self._analytic(env, state, params, static, key=window_key)
        asked = self.mode.ask(
            ask_key,
            es,
            state.evosax,
            hp,
            subspace=state.subspace,
            analytic=analytic,
            unravel=ravel_pytree(params)[1],
        )
        scores = self._score(env, state.policy, asked.population, key=eval_key)
        told = self.mode.tell(tell_key, es, hp, asked=asked, scores=scores, analytic=analytic)
        es_state = algorithms.strong(select(told.ok, told.es_state, state.evosax))
        critic, critic_metrics = self.gradient.update(
            state.critic, grad, state.env_state, key=critic_key
        )
        new_state = GuidedESState(
            policy=with_statistics(eqx.combine(es.get_mean(es_state), static), scores.episodes),
            evosax=es_state,
            env_state=grad.window.env_state,
            subspace=asked.subspace,
            critic=critic,
        )
        metrics = {
            "env_steps": jnp.sum(scores.episodes.steps) + self._window_steps,
            **scores.metrics(),
            "skipped_updates": ~told.ok,
            "masked_envs": grad.masked_envs,
            **step_norm_stats(grad.step_norms),
            "loss": grad.loss,
            **told.metrics,
            **critic_metrics,
            "mean_norm": jnp.linalg.norm(es_state.mean),
        }
        return new_state, {k: jnp.asarray(v, jnp.float32) for k, v in metrics.items()}
