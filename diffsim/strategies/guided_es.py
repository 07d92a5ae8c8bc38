"""Evolution strategies guided by simulator gradients: the population's fitness and the
analytic gradient of a differentiable window, in one update."""

from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax
from brax.envs.base import Env, State
from evosax.algorithms import Open_ES
from evosax.core import fitness_shaping as shaping
from jax.flatten_util import ravel_pytree
from jaxtyping import Array, Bool, Float, PRNGKeyArray

from .._types import Metrics
from ..policies import ValueFunction, trainable, update_normalizers
from ..rollout import Episodes
from . import _windows as windows, helpers
from .base import AbstractStrategy
from .es import population_episodes, population_steps, with_episode_length
from .helpers import all_finite, select

MODES = ("blend", "subspace")
GRADIENTS = ("apg", "shac")


class GuidedESState(eqx.Module):
    """State of `GuidedES`.

    **Fields:**

    - `policy`: the distribution mean as a policy, with the current observation normaliser
      (what `GuidedES.policy` returns; the mean is also held flat in `evosax.mean`).
    - `evosax`: the state of evosax's `Open_ES` (flat mean, std, Adam state).
    - `env_state`: the env batch the gradient windows run in, carried across generations.
    - `subspace`: `Float[Array, "k d"]`, the `k` most recent analytic gradients (rows of
      zeros before there are `k` of them), which stretch the search in `"subspace"` mode.
    - `critic`: SHAC's critic (`windows.Critic`) with `gradient="shac"`, else None.
    """

    policy: eqx.Module
    evosax: Any
    env_state: State
    subspace: Float[Array, "k d"]
    critic: windows.Critic | None


class Blend(eqx.Module):
    """An inverse-variance blend of two gradient estimates (see `blend`). Scalars except
    `gradient` (`Float[Array, "d"]`); `ok` is False if neither source was usable."""

    gradient: Float[Array, " d"]
    es_weight: Float[Array, ""]
    analytic_weight: Float[Array, ""]
    es_norm: Float[Array, ""]
    analytic_norm: Float[Array, ""]
    cosine: Float[Array, ""]
    es_variance: Float[Array, ""]
    analytic_variance: Float[Array, ""]
    ok: Bool[Array, ""]


def _cosine(a: Float[Array, " d"], b: Float[Array, " d"]) -> Float[Array, ""]:
    norms = jnp.linalg.norm(a) * jnp.linalg.norm(b)
    return jnp.where(norms > 0, jnp.dot(a, b) / jnp.where(norms > 0, norms, 1.0), 0.0)


def _mean_and_variance(samples: Float[Array, "n d"], kept: Bool[Array, " n"]):
    """Mean of the kept rows and the total variance of that mean, `tr Cov / n`
    (unbiased); rows not kept contribute exactly 0 even if they are not finite."""
    weight = kept.astype(samples.dtype)
    count = jnp.sum(weight)
    safe = jnp.where(kept[:, None], samples, 0.0)
    mean = jnp.sum(safe, axis=0) / jnp.maximum(count, 1.0)
    spread = jnp.sum(weight[:, None] * (safe - mean) ** 2)
    variance = spread / jnp.maximum(count * (count - 1.0), 1.0)
    # Identical rows (a noise-free source) leave only the rounding of their mean: count it 0.
    rounding = (8 * jnp.finfo(samples.dtype).eps) ** 2 * jnp.sum(mean**2)
    return mean, jnp.where(variance <= rounding, 0.0, variance), count


def blend(
    es_pairs: Float[Array, "m d"],
    analytic: Float[Array, "b d"],
    analytic_kept: Bool[Array, " b"],
) -> Blend:
    """Combine ES's and the analytic gradient estimate by their measured variances.

    `es_pairs`: one estimate per antithetic pair, `g_j = (f(m + s e_j) - f(m - s e_j)) e_j / (2 s)`;
    `analytic`: one per env of the gradient window (rows not in `analytic_kept` are ignored).
    Both estimate the gradient of the same objective. With `g_es`, `g_an` the means and
    `v_es`, `v_an` the total variances of those means (`tr Cov / n`, from the spread of
    the rows):

        w_an = v_es / (v_es + v_an)   (1/2 if both are 0),   w_es = 1 - w_an,
        g = w_es g_es + w_an g_an,

    the minimum-variance convex combination of two independent unbiased estimates. The
    analytic estimate gets weight 0 where it is unusable: exactly zero (a reward that does
    not depend on the actions), non-finite, or from fewer than 2 envs; ES gets weight 0
    where its estimate is not finite. `ok` is False if neither is usable (`g = 0`).

    **Example:**

    ```python
    b = blend(es_pairs, per_env_grads, jnp.ones(per_env_grads.shape[0], bool))
    b.gradient, b.es_weight, b.analytic_weight
    ```
    """
    g_es, v_es, _ = _mean_and_variance(es_pairs, jnp.ones(es_pairs.shape[0], bool))
    g_an, v_an, count = _mean_and_variance(analytic, analytic_kept)
    es_ok = jnp.all(jnp.isfinite(g_es)) & jnp.isfinite(v_es)
    an_ok = (
        (count >= 2)
        & jnp.all(jnp.isfinite(g_an))
        & jnp.isfinite(v_an)
        & (jnp.linalg.norm(g_an) > 0)
    )
    total = v_es + v_an
    both = jnp.where(total > 0, v_es / jnp.where(total > 0, total, 1.0), 0.5)
    w_an = jnp.where(an_ok & es_ok, both, jnp.where(an_ok, 1.0, 0.0))
    g_es = jnp.where(es_ok, g_es, 0.0)
    g_an = jnp.where(an_ok, g_an, 0.0)
    return Blend(
        gradient=(1.0 - w_an) * g_es + w_an * g_an,
        es_weight=jnp.where(es_ok, 1.0 - w_an, 0.0),
        analytic_weight=w_an,
        es_norm=jnp.linalg.norm(g_es),
        analytic_norm=jnp.linalg.norm(g_an),
        cosine=_cosine(g_es, g_an),
        es_variance=v_es,
        analytic_variance=v_an,
        ok=es_ok | an_ok,
    )


def guided_directions(
    key: PRNGKeyArray, subspace: Float[Array, "k d"], *, num_pairs: int, alpha
) -> tuple[Float[Array, "m d"], Float[Array, ""]]:
    """`num_pairs` search directions `e ~ N(0, Sigma)` stretched along the span of the rows
    of `subspace` (Maheswaranathan et al. 2019, scaled so that `E |e|^2 = d` as for
    Open-ES's `e ~ N(0, I)`):

        Sigma = alpha I_d + (1 - alpha) d / k' U U^T,

    `U` an orthonormal basis (`d x k'`) of the nonzero gradients in `subspace`. Without
    any (`k' = 0`), `e = xi ~ N(0, I)` drawn exactly as Open-ES draws its half population
    from the same key. Returns the directions and `k'`.
    """
    num_dims = subspace.shape[1]
    xi = jr.normal(key, (num_pairs, num_dims))  # Open_ES's draw of its first half
    basis, singular, _ = jnp.linalg.svd(subspace.T, full_matrices=False)  # [d, k], [k]
    largest = jnp.max(singular)
    kept = (singular > jnp.finfo(singular.dtype).eps * num_dims * largest) & (largest > 0)
    rank = jnp.sum(kept)
    zeta = jr.normal(jr.fold_in(key, 1), (num_pairs, subspace.shape[0]), xi.dtype)
    along = (zeta * kept) @ basis.T
    scale = jnp.sqrt((1.0 - alpha) * num_dims / jnp.maximum(rank, 1))
    guided = jnp.sqrt(alpha) * xi + scale * along
    return jnp.where(rank > 0, guided, xi), rank.astype(jnp.float32)


def _slim_metrics(key, population, fitness, state, params) -> dict:
    del key, population, fitness, state, params
    return {}


def _strong(tree):
    """Drop weak types, so the state's types after `init` and `step` agree (one trace)."""
    return jax.tree.map(lambda x: jnp.asarray(x, dtype=jnp.result_type(x)), tree)


class GuidedES(AbstractStrategy[GuidedESState]):
    """Evolution strategies guided by the analytic gradient through the simulator.

    Let `theta` (`d` numbers) be the distribution mean (the policy's trainable parameters,
    flattened), `sigma = std`, `P = population_size` (antithetic pairs `m = P/2`) and
    `T = rollout_length`. One `step` (one generation):

    1. **Analytic gradient at the mean.** `horizon` steps of `diffsim.rollout` in
       `num_envs` envs carried across generations (staggered, gradient-cut, as in `APG`),
       differentiated per env (`jax.vmap` of `jax.grad`): APG's window loss
       `L_b = -1/H sum_t r_t^b` (`gradient="apg"`) or SHAC's critic-bootstrapped one
       (`gradient="shac"`, with a critic trained as `SHAC` trains it). Envs whose window
       diverged drop out (`metrics["masked_envs"]`). On the scale of a `T`-step return:
       `g_an^b = T grad L_b`, `g_an` their mean.
    2. **Population.** `"blend"`: `e_j ~ N(0, I)` (evosax's Open-ES `ask`). `"subspace"`:
       `g_an` joins the `subspace_dims` most recent gradients and `e_j` is drawn from
       `Sigma = alpha I + (1 - alpha) d/k U U^T` (see `guided_directions`). Members
       `theta +- sigma e_j`, marked with `diffsim.shard_batch`.
    3. **Fitness** `F_i`: each member's mean return over the same `episodes_per_member`
       episodes, played deterministically to their end (at most `T` steps), exactly as
       `ES` evaluates; non-finite ones rank with the worst finite one.
    4. **Update** with Adam (`learning_rate`) on the loss `-F`:
       - `"subspace"`: Open-ES's update on centred ranks `u_i` of `-F`,
         `g = 1/(P sigma) sum_i u_i e_i`; with `k` gradients in the subspace this is Guided
         ES's estimate of `Sigma grad`, a descent direction biased toward `U`.
       - `"blend"`: per-pair ES estimates `g_j = (f_j^+ - f_j^-) e_j / (2 sigma)` of the raw
         `f = -F` (so that both sources estimate the same gradient) and the per-env
         analytic ones are combined by inverse variance (`blend`):
         `g = w_es mean_j g_j + w_an g_an`, `w_an = v_es / (v_es + v_an)`. A zero,
         non-finite or noisy analytic gradient gets little or no weight, and then the update
         is Open-ES's on raw fitness.
    5. The observation normaliser takes in the observations of the scored episodes (as in
       `ES`); the critic's, the window's.

    With a zero analytic gradient (a reward flat in the actions, as on
    `inverted_pendulum`) both modes make the update (to float rounding) of
    `ES(fitness_shaping="centered_rank")` (`"subspace"`) or `ES(fitness_shaping="raw")`
    (`"blend"`) from the same key. evosax's own `GuidedES` is not used: it turns the
    missing (zero) gradients of its first generations into search along the first `k`
    coordinate axes, and its `std` is the perturbation's total size, not Open-ES's per
    coordinate, so it cannot reduce to `ES`.

    Logged every generation: `es_weight` and `analytic_weight` (in `"subspace"` mode the
    shares `alpha`, `1 - alpha` of the search variance, `1, 0` without gradients),
    `es_grad_norm`, `analytic_grad_norm` and their `grad_cosine` (both as descent directions
    of `-F`; in `"subspace"` mode the ES estimate is on the rank scale), and in `"blend"`
    mode `es_variance`, `analytic_variance`.

    `steps_per_iteration = P * episodes_per_member * T + num_envs * horizon` at most; the
    population counts the steps inside its scored episodes (`metrics["env_steps"]`).

    **Arguments** (all keyword, all with defaults):

    - `mode`: `"blend"` or `"subspace"`; `gradient`: `"apg"` or `"shac"`.
    - `population_size`, `episodes_per_member`, `rollout_length` (None: the env's episode
      length), `std`, `learning_rate`: as in `ES` (Open-ES, antithetic).
    - `num_envs`, `horizon`: the gradient window (`horizon <= episode_length`).
    - `subspace_dims`: `k`, gradients kept (at most `P/2` and the parameter count);
      `alpha`: the isotropic share of the search variance (`"subspace"` only). Along the
      subspace the std is `std * sqrt(alpha + (1 - alpha) d / k)`: the default 0.999 makes
      it about 2.4 `std` for the `d = 4.7k` parameters of a 64x64 policy on `reach`. The
      paper's 0.5 makes it about 50 `std`, far outside the region where the antithetic
      differences are linear. Measured on `reach` (2 seeds, 60k steps, 16 members):
      alpha 0.5 reached -91/-43, 0.99 reached -26/-43, 0.999 reached -28/-20, and ES
      -25/-46.
    - Defaults: a window of 16 envs x 32 steps and 32 members. `learning_rate=0.01` is
      Adam's step on the mean; in blend mode on `reach`, 0.003, 0.01 and 0.03 reached
      -26/-19, -15.5/-9.8 and -15/-15.
    - `stochastic`: the window acts with reparameterised samples `policy(obs, key=k)`;
      False needs a deterministic policy (a `GaussianPolicy`'s std would be searched but
      never used). Members are always evaluated by their deterministic action.
    - `float64`, `remat`: the window in float64, and rematerialised in the backward pass, as
      in `APG`.
    - `discount`, `gae_lambda`, `target_alpha`, `critic_epochs`, `critic_minibatches`,
      `critic_learning_rate`, `value_hidden`: SHAC's critic (`gradient="shac"` only).

    **Example:**

    ```python
    env = diffsim.make_env("reach")
    policy = diffsim.DeterministicPolicy(env.observation_size, env.action_size, key=k1)
    guided = diffsim.GuidedES(mode="blend", population_size=16, num_envs=16, horizon=20)
    run = diffsim.train(guided, env, policy, key=k2, total_steps=100_000)
    run.metrics["analytic_weight"]          # per generation: how much the gradient counted
    ```
    """

    mode: str = eqx.field(default="blend", static=True)
    gradient: str = eqx.field(default="apg", static=True)
    population_size: int = eqx.field(default=32, static=True)
    episodes_per_member: int = eqx.field(default=1, static=True)
    rollout_length: int | None = eqx.field(default=None, static=True)
    std: float = 0.05
    learning_rate: float | Callable[[Array], Array] = 0.01
    num_envs: int = eqx.field(default=16, static=True)
    horizon: int = eqx.field(default=32, static=True)
    subspace_dims: int = eqx.field(default=1, static=True)
    alpha: float = 0.999
    stochastic: bool = eqx.field(default=False, static=True)
    float64: bool = eqx.field(default=False, static=True)
    remat: bool = eqx.field(default=False, static=True)
    discount: float = 0.95
    gae_lambda: float = 0.95
    target_alpha: float = 0.2
    critic_epochs: int = eqx.field(default=16, static=True)
    critic_minibatches: int = eqx.field(default=4, static=True)
    critic_learning_rate: float | Callable[[Array], Array] = 1e-3
    value_hidden: tuple[int, ...] = eqx.field(default=(64, 64), static=True)

    def __check_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {list(MODES)}, got {self.mode!r}")
        if self.gradient not in GRADIENTS:
            raise ValueError(f"gradient must be one of {list(GRADIENTS)}, got {self.gradient!r}")
        for name in ("population_size", "episodes_per_member", "num_envs", "horizon"):
            helpers.positive_int(name, getattr(self, name))
        if self.rollout_length is not None:
            helpers.positive_int("rollout_length", self.rollout_length)
        if self.population_size % 2:
            raise ValueError(
                f"population_size={self.population_size} must be even (antithetic pairs)"
            )
        if self.mode == "blend" and (self.population_size < 4 or self.num_envs < 2):
            raise ValueError(
                f"mode='blend' measures each source's variance, which needs population_size"
                f" >= 4 and num_envs >= 2; got population_size={self.population_size},"
                f" num_envs={self.num_envs}"
            )
        helpers.positive_int("subspace_dims", self.subspace_dims)
        if self.subspace_dims > self.population_size // 2:
            raise ValueError(
                f"subspace_dims={self.subspace_dims} exceeds the {self.population_size // 2}"
                f" antithetic pairs of population_size={self.population_size}"
            )
        helpers.positive("std", self.std)
        helpers.learning_rate("learning_rate", self.learning_rate)
        helpers.in_range("alpha", self.alpha, 0.0, 1.0)
        windows.check_flags(self, "stochastic", "float64", "remat")
        helpers.in_range("discount", self.discount, 0.0, 1.0, low_open=True)
        helpers.in_range("gae_lambda", self.gae_lambda, 0.0, 1.0)
        helpers.in_range("target_alpha", self.target_alpha, 0.0, 1.0)
        helpers.positive_int("critic_epochs", self.critic_epochs)
        helpers.positive_int("critic_minibatches", self.critic_minibatches)
        helpers.learning_rate("critic_learning_rate", self.critic_learning_rate)
        if self.gradient == "shac" and (self.num_envs * self.horizon) % self.critic_minibatches:
            raise ValueError(
                f"critic_minibatches={self.critic_minibatches} must divide num_envs * horizon"
                f" = {self.num_envs * self.horizon}"
            )

    # ------------------------------------------------------------------ the contract

    def for_env(self, env: Env) -> "GuidedES":
        """This GuidedES with `rollout_length` set to the env's episode length if None."""
        return with_episode_length(self, env)

    @property
    def steps_per_iteration(self) -> int:
        return population_steps(self) + self.num_envs * self.horizon

    @property
    def min_steps_per_iteration(self) -> int:
        return self.population_size * self.episodes_per_member + self.num_envs * self.horizon

    @property
    def batch_size(self) -> int:
        return self.population_size

    def check(self, env: Env, policy: eqx.Module) -> None:
        length, name = env.episode_length, getattr(env, "name", "")
        windows.check_window(self, env)  # backend, horizon, remat, float64
        if self.rollout_length is not None and self.rollout_length > length:
            raise ValueError(
                f"rollout_length={self.rollout_length} exceeds the episode_length {length}"
                f" of env {name!r}; pass GuidedES(rollout_length={length}) or less, or None"
            )
        stochastic_policy = hasattr(policy, "sample") or hasattr(policy, "log_prob")
        if not self.stochastic and stochastic_policy:
            raise ValueError(
                f"GuidedES(stochastic=False) acts with policy(obs) only, so the std of the"
                f" stochastic {type(policy).__name__} would be searched but never used; pass"
                f" a DeterministicPolicy, or stochastic=True"
            )
        windows.check_policy(self, env, policy)  # stochastic=True needs a key-taking policy
        if self.mode == "subspace":
            spec = jax.eval_shape(lambda p: ravel_pytree(eqx.filter(p, trainable(p)))[0], policy)
            if self.subspace_dims > spec.shape[0]:
                raise ValueError(
                    f"subspace_dims={self.subspace_dims} exceeds the {spec.shape[0]} trainable"
                    f" parameters of {type(policy).__name__}"
                )

    def init(self, env: Env, policy: eqx.Module, *, key: PRNGKeyArray) -> GuidedESState:
        guided = self.for_env(env)
        guided.check(env, policy)
        env_key, critic_key, es_key = jr.split(key, 3)
        params = eqx.filter(policy, trainable(policy))
        es = guided._evosax(params)
        flat = ravel_pytree(params)[0]
        critic = None
        if self.gradient == "shac":
            value = ValueFunction(env.observation_size, hidden=self.value_hidden, key=critic_key)
            opt_state = self._critic_optimizer().init(eqx.filter(value, trainable(value)))
            critic = windows.Critic(value=value, target=value, opt_state=opt_state)
        return GuidedESState(
            policy=policy,
            evosax=_strong(es.init(es_key, params, guided._hyperparams(es))),
            env_state=windows.initial_env_state(self, env, policy, key=env_key),
            subspace=jnp.zeros((self.subspace_dims, flat.shape[0]), flat.dtype),
            critic=critic,
        )

    def policy(self, state: GuidedESState) -> eqx.Module:
        """The distribution mean with the current observation normaliser."""
        return state.policy

    # ------------------------------------------------------------------ pieces

    def _evosax(self, params) -> Open_ES:
        """evosax's Open-ES for parameters shaped like `params`, as `ES` builds it."""
        solution = jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), params)
        fitness_shaping = (
            shaping.centered_rank_fitness_shaping_fn
            if self.mode == "subspace"
            else shaping.identity_fitness_shaping_fn
        )
        with jax.ensure_compile_time_eval():
            return Open_ES(
                population_size=self.population_size,
                solution=solution,
                use_antithetic_sampling=True,
                optimizer=self._optimizer(),
                std_schedule=optax.constant_schedule(self.std),
                fitness_shaping_fn=fitness_shaping,
                metrics_fn=_slim_metrics,
            )

    def _hyperparams(self, es: Open_ES):
        with jax.ensure_compile_time_eval():
            hp = es.default_params
        if hasattr(hp, "std_init"):
            hp = hp.replace(std_init=jnp.asarray(self.std, jnp.result_type(float)))
        return hp

    def _optimizer(self) -> optax.GradientTransformation:
        return optax.adam(self.learning_rate)

    def _critic_optimizer(self) -> optax.GradientTransformation:
        """SHAC's critic optimiser (clip 1.0, Adam (0.7, 0.95))."""
        return windows.optimizer(
            self.critic_learning_rate,
            max_grad_norm=1.0,
            max_grad_value=None,
            b1=0.7,
            b2=0.95,
            eps=1e-8,
        )

    def _rollout_length(self, env: Env) -> int:
        return env.episode_length if self.rollout_length is None else self.rollout_length

    def _evaluate(self, env: Env, policy: eqx.Module, population, key: PRNGKeyArray) -> Episodes:
        """The population's scored episodes: the one place members are evaluated."""
        return population_episodes(
            env,
            policy,
            population,
            key=key,
            num_episodes=self.episodes_per_member,
            max_length=self._rollout_length(env),
        )

    def env_losses(
        self,
        env: Env,
        policy: eqx.Module,
        env_state: State,
        critic: windows.Critic | None,
        *,
        key: PRNGKeyArray,
    ) -> tuple[Float[Array, " B"], windows.Window]:
        """The window loss of each env (APG's, or SHAC's with `critic.target` as `V'`)."""
        window = windows.window(self, env, policy, env_state, key=key)
        if critic is None:
            return windows.apg_loss(window.traj), window
        target = windows.to_float64(critic.target) if self.float64 else critic.target
        losses = windows.shac_loss(
            window.traj, jax.lax.stop_gradient(target), discount=self.discount
        )
        return losses, window

    def _update_critic(self, critic: windows.Critic, grad, env_state: State, *, key):
        traj = windows.carried_dtype(jax.lax.stop_gradient(grad.window.traj), env_state)
        batch = windows.critic_batch(
            critic.target, traj, grad.kept, discount=self.discount, gae_lambda=self.gae_lambda
        )
        ok = grad.ok & all_finite(batch)
        value, opt_state, loss = windows.fit_critic(
            critic.value,
            critic.opt_state,
            batch,
            ok,
            key=key,
            optimizer=self._critic_optimizer(),
            epochs=self.critic_epochs,
            minibatches=self.critic_minibatches,
        )
        target = select(ok, windows.polyak(critic.target, value, self.target_alpha), critic.target)
        value = windows.update_normalizers_from(value, traj, grad.kept, ok)
        target = eqx.tree_at(lambda v: v.norm, target, value.norm)
        return windows.Critic(value=value, target=target, opt_state=opt_state), loss

    # ------------------------------------------------------------------ one generation

    def step(
        self, env: Env, state: GuidedESState, *, key: PRNGKeyArray
    ) -> tuple[GuidedESState, Metrics]:
        # The population's keys are those `ES.step` uses, so both make the same generation.
        ask_key, eval_key, tell_key = jr.split(key, 3)
        window_key, critic_key = jr.split(jr.fold_in(key, 1))
        params, static = eqx.partition(state.policy, trainable(state.policy))
        unravel = ravel_pytree(params)[1]
        ravel = lambda tree: ravel_pytree(tree)[0]
        es = self._evosax(params)
        hp = self._hyperparams(es)
        es_state = state.evosax
        half = self.population_size // 2

        # 1. The analytic gradient of the window loss at the mean, one per env.
        grad = windows.window_gradient(
            lambda policy, env_state, key: self.env_losses(
                env, policy, env_state, state.critic, key=key
            ),
            params,
            static,
            state.env_state,
            key=window_key,
            per_env=True,
        )
        scale = float(self._rollout_length(env))  # to the scale of a T-step return
        per_env = scale * jax.vmap(ravel)(grad.per_env_grads)
        g_an = scale * ravel(grad.grads)
        usable = grad.ok & (jnp.linalg.norm(g_an) > 0)

        # 2. The population around the mean.
        subspace = state.subspace
        if self.mode == "subspace":
            pushed = jnp.roll(subspace, -1, axis=0).at[-1].set(g_an.astype(subspace.dtype))
            subspace = select(usable, pushed, subspace)
            directions, rank = guided_directions(
                ask_key, subspace, num_pairs=half, alpha=self.alpha
            )
            flat = es_state.mean + es_state.std * jnp.concatenate([directions, -directions])
            population = jax.vmap(unravel)(flat)
        else:
            population, es_state = es.ask(ask_key, es_state, hp)  # leaves [P, ...]

        # 3. Fitness, exactly as ES measures it.
        episodes = self._evaluate(env, state.policy, population, eval_key)
        returns = jnp.mean(episodes.returns, axis=-1)
        bad = ~jnp.isfinite(returns)
        worst = jnp.min(jnp.where(bad, jnp.inf, returns))
        fitness = -jnp.where(bad, worst, returns)
        noise = (jax.vmap(ravel)(population) - es_state.mean) / es_state.std  # e_i
        shaped = es.fitness_shaping_fn(None, fitness, es_state, hp)
        es_pairs = (shaped[:half] - shaped[half:])[:, None] * noise[:half] / (2 * es_state.std)

        # 4. The update of the mean.
        if self.mode == "subspace":
            told, _ = es.tell(tell_key, population, fitness, es_state, hp)
            ok = ~jnp.all(bad) & all_finite(told.mean)
            es_weight = jnp.where(rank > 0, self.alpha, 1.0)
            g_es = jnp.dot(shaped, noise) / (self.population_size * es_state.std)
            source = {
                "es_weight": es_weight,
                "analytic_weight": 1.0 - es_weight,
                "es_grad_norm": jnp.linalg.norm(g_es),
                "analytic_grad_norm": jnp.where(usable, jnp.linalg.norm(g_an), 0.0),
                "grad_cosine": jnp.where(usable, _cosine(g_es, g_an), 0.0),
            }
        else:
            mix = blend(es_pairs, per_env, grad.kept)
            updates, opt_state = self._optimizer().update(
                mix.gradient, es_state.opt_state, es_state.mean
            )
            told = es_state.replace(
                mean=optax.apply_updates(es_state.mean, updates),
                opt_state=opt_state,
                generation_counter=es_state.generation_counter + 1,
            )
            ok = mix.ok & all_finite(told.mean)
            source = {
                "es_weight": mix.es_weight,
                "analytic_weight": mix.analytic_weight,
                "es_grad_norm": mix.es_norm,
                "analytic_grad_norm": mix.analytic_norm,
                "grad_cosine": mix.cosine,
                "es_variance": mix.es_variance,
                "analytic_variance": mix.analytic_variance,
            }
        es_state = _strong(select(ok, told, state.evosax))

        # 5. Observation statistics (from the scored episodes, as in ES) and the critic.
        mean = eqx.combine(es.get_mean(es_state), static)
        normalized = update_normalizers(mean, episodes.obs)
        normalized = select(all_finite(normalized), normalized, mean)
        critic, extra = state.critic, {}
        if critic is not None:
            critic, value_loss = self._update_critic(critic, grad, state.env_state, key=critic_key)
            extra["value_loss"] = value_loss
        new_state = GuidedESState(
            policy=normalized,
            evosax=es_state,
            env_state=grad.window.env_state,
            subspace=subspace,
            critic=critic,
        )
        metrics = {
            "env_steps": jnp.sum(episodes.steps) + self.num_envs * self.horizon,
            "train_return": jnp.mean(returns),
            "max_return": jnp.max(returns),
            "min_return": jnp.min(returns),
            "nonfinite_members": jnp.sum(bad),
            "diverged": jnp.sum(episodes.diverged),
            "skipped_updates": ~ok,
            "masked_envs": grad.masked_envs,
            "loss": grad.loss,
            **source,
            **extra,
            "mean_norm": jnp.linalg.norm(es_state.mean),
        }
        return new_state, {k: jnp.asarray(v, jnp.float32) for k, v in metrics.items()}
