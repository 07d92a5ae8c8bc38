"""Where one training iteration's time goes: rollout, returns, update, and evaluation.

    python studies/profile_iteration.py [--env inverted_pendulum] [--repeats 20]

For PPO, APG, SHAC and ES with their default settings (ES: population 64, full episodes),
each piece is compiled on its own, warmed up, and timed as the median of `--repeats`
calls on a state reached after a few iterations:

- rollout: the env steps one iteration collects (`diffsim.rollout` with the strategy's
  batch; for ES a population drawn around the mean with the strategy's std, playing its
  scored episodes until all have ended);
- returns: GAE over that batch (PPO), TD(lambda) targets (SHAC); none for APG and ES;
- step: one whole `strategy.step`; update = step - rollout - returns (for APG and SHAC
  the update includes the backward pass through the simulator);
- evaluation: `diffsim.evaluate` of 16 episodes with the current policy.

Prints a table and writes results/benchmarks/profile_<env>.json.
"""

import argparse
import json
import time
from pathlib import Path

import equinox as eqx
import jax
import jax.random as jr
import numpy as np

import diffsim
from diffsim.strategies.es import population_episodes
from diffsim.strategies.helpers import gae


def timed(fn, *args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))  # compile and warm up
    times = []
    for _ in range(repeats):
        tic = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - tic)
    return float(np.median(times))


def pieces(name, strategy, env, state, key):
    """The jittable rollout and returns pieces of one iteration of `strategy`."""
    if name == "ES":
        params = eqx.filter(state.policy, diffsim.trainable(state.policy))
        noise = lambda x, k: x + strategy.std * jr.normal(k, (strategy.population_size, *x.shape))
        leaves, treedef = jax.tree.flatten(params)
        keys = jr.split(key, len(leaves))
        pop = jax.tree.unflatten(treedef, [noise(x, k) for x, k in zip(leaves, keys, strict=True)])
        rollout = lambda s: (
            population_episodes(
                env, s.policy, pop, key=key, num_episodes=1, max_length=env.episode_length
            ).steps
        )
        return rollout, None
    length = strategy.unroll_length if name == "PPO" else strategy.horizon
    deterministic = name in ("APG", "SHAC")
    rollout = lambda s: diffsim.rollout(
        env, s.policy, s.env_state, key=key, length=length, deterministic=deterministic
    )[1]
    if name == "APG":
        return rollout, None
    critic = "value" if name == "PPO" else "target_value"

    def returns(s, traj):
        value = getattr(s, critic)
        v = jax.vmap(jax.vmap(value))
        return gae(
            traj.reward,
            v(traj.obs),
            v(traj.next_obs),
            traj.done,
            traj.truncation,
            discount=strategy.discount,
            lam=strategy.gae_lambda,
        ).advantage

    return rollout, returns


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--env", default="inverted_pendulum")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", default="results/benchmarks")
    return parser.parse_args()


def profile(name: str, strategy, cls, env, obs: int, act: int, *, repeats: int) -> dict:
    """One row of the table: the timed pieces of one iteration of `strategy` on `env`."""
    key = jr.key(0)
    step = jax.jit(lambda s, k, strategy=strategy: strategy.step(env, s, key=k))
    state = jax.jit(
        lambda k, strategy=strategy, cls=cls: strategy.init(env, cls(obs, act, key=k), key=k)
    )(key)
    for i in range(3):  # a few updates in, so the policy is not the initial one
        state, metrics = step(state, jr.key(i))
    rollout_fn, returns_fn = pieces(name, strategy, env, state, key)
    rollout_j = jax.jit(rollout_fn)
    t_rollout = timed(rollout_j, state, repeats=repeats)
    t_returns = 0.0
    if returns_fn is not None:
        traj = rollout_j(state)
        t_returns = timed(jax.jit(returns_fn), state, traj, repeats=repeats)
    t_step = timed(step, state, key, repeats=repeats)
    evaluate = jax.jit(
        lambda s, strategy=strategy: diffsim.evaluate(env, strategy.policy(s), key=jr.key(1))
    )
    t_eval = timed(evaluate, state, repeats=repeats)
    steps = float(metrics.get("env_steps", strategy.steps_per_iteration))
    return dict(
        strategy=name,
        env_steps=steps,
        rollout_ms=1e3 * t_rollout,
        returns_ms=1e3 * t_returns,
        update_ms=1e3 * max(t_step - t_rollout - t_returns, 0.0),
        step_ms=1e3 * t_step,
        eval_ms=1e3 * t_eval,
        steps_per_s=steps / t_step,
    )


def print_table(env_name: str, repeats: int, rows: list[dict]) -> None:
    print(f"\n{env_name}: one iteration, median of {repeats} (ms)")
    print(
        f"{'strategy':<9}{'env steps':>10}{'rollout':>9}{'returns':>9}{'update':>9}"
        f"{'step':>9}{'steps/s':>10}{'eval (16 ep)':>14}"
    )
    for r in rows:
        print(
            f"{r['strategy']:<9}{r['env_steps']:>10,.0f}{r['rollout_ms']:>9.1f}"
            f"{r['returns_ms']:>9.1f}{r['update_ms']:>9.1f}{r['step_ms']:>9.1f}"
            f"{r['steps_per_s']:>10,.0f}{r['eval_ms']:>14.1f}"
        )


def write_rows(out: Path, env_name: str, rows: list[dict]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"profile_{env_name}.json"
    path.write_text(
        json.dumps(
            dict(
                env=env_name,
                devices=[str(d) for d in jax.devices()],
                versions=diffsim.results.versions(),
                rows=rows,
            ),
            indent=2,
        )
    )
    print(f"wrote {path}")


def main():
    args = parse_args()
    env = diffsim.make_env(args.env)
    obs, act = env.observation_size, env.action_size
    contenders = {
        "PPO": (diffsim.PPO(), diffsim.GaussianPolicy),
        "APG": (diffsim.APG(), diffsim.DeterministicPolicy),
        "SHAC": (diffsim.SHAC(), diffsim.DeterministicPolicy),
        "ES": (diffsim.ES().for_env(env), diffsim.DeterministicPolicy),
    }
    rows = []
    for name, (strategy, cls) in contenders.items():
        rows.append(profile(name, strategy, cls, env, obs, act, repeats=args.repeats))
        print(rows[-1], flush=True)
    print_table(args.env, args.repeats, rows)
    write_rows(Path(args.out), args.env, rows)


if __name__ == "__main__":
    main()
