"""The tutorial's headline run redone: PPO on Brax Ant for 1M env steps.

    .venv/bin/python studies/ant_ppo.py [--steps 1000000] [--seeds 5]

The 2021 tutorial collected Ant rollouts in a Python loop around a jitted step (32 envs x
2048 steps per iteration, 10 epochs x 64 minibatches); 1M env steps took 41 minutes on a
P100 and the average return went from about -286 to about -5.5. Here `diffsim.PPO` runs
the same budget on Brax `ant` (spring backend, 1000-step episodes) as one compiled program
on the CPU, with Brax-style settings scaled down for a 2-core machine: 100 envs x 10-step
unrolls (1000 env steps per iteration, so 1M steps is exactly 1000 iterations), discount
0.97, GAE lambda 0.95, 8 epochs x 4 minibatches of 250, Adam 3e-4, entropy bonus 1e-3,
observation normalisation (GaussianPolicy / ValueFunction), bootstrapping on time limits.

Evaluation: `--evals` points, each 16 full episodes of the deterministic policy (as the
tutorial's 16 envs x 1000 steps). Compile time is measured apart from training time
(JAX's persistent compilation cache is on, so a repeated run may load instead of compile).

Writes the run to results/ant_ppo/ (`Run.save`, plus summary.json with the table below),
the learning curve (vs env steps and vs wall-clock) to figures/ant_ppo.png, and prints
wall-clock and final return next to the tutorial's figures. Reward definitions differ:
the tutorial used the 2021 Brax Ant (with a contact cost), today's Brax `ant` has none, so
returns are comparable in spirit, not digit for digit.
"""

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.random as jr
import numpy as np

import diffsim
import diffsim.plotting
from diffsim.diagnostics import gait_stats
from diffsim.stats import iqm, iqm_ci

TUTORIAL = dict(
    hardware="1 P100 GPU",
    env_steps=1_000_000,
    wall_clock_s=41 * 60,
    initial_return=-286.0,
    final_return=-5.5,
)


class Training(NamedTuple):
    """The trained runs with the wall-clock and machine load around training."""

    run: diffsim.Run
    total_s: float
    load_before: tuple[float, float, float]
    load_after: tuple[float, float, float]


class Outcome(NamedTuple):
    """The numbers of the comparison, read from the run's curve and config."""

    returns: np.ndarray  # (seeds, evals)
    compile_s: float
    train_s: float
    steps: int
    initial: float
    final: float
    final_ci: list[float]
    best: float


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=1_000_000, help="env steps per seed")
    parser.add_argument("--seeds", type=int, default=5, help="seeds, vmapped in one program")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-envs", type=int, default=100)
    parser.add_argument("--unroll", type=int, default=10)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--minibatches", type=int, default=4)
    parser.add_argument("--evals", type=int, default=21, help="evaluation points incl. first")
    parser.add_argument("--out", default="results/ant_ppo")
    parser.add_argument("--figure", default="figures/ant_ppo.png")
    return parser.parse_args()


def train(args: argparse.Namespace, env) -> Training:
    """Trains PPO on all seeds in one program and saves the run to `args.out`."""
    obs_size, act_size = env.observation_size, env.action_size  # read once: it resets
    ppo = diffsim.PPO(
        num_envs=args.num_envs,
        unroll_length=args.unroll,
        num_epochs=args.epochs,
        num_minibatches=args.minibatches,
        learning_rate=3e-4,
        max_grad_norm=0.5,
        discount=0.97,
        gae_lambda=0.95,
        clip_epsilon=0.2,
        entropy_coef=1e-3,
        reward_scale=1.0,
        value_hidden=(128, 128),
    )

    def make_policy(key):
        return diffsim.GaussianPolicy(obs_size, act_size, hidden=(64, 64), key=key)

    load = os.getloadavg()
    tic = time.perf_counter()
    run = diffsim.train_seeds(
        ppo,
        env,
        make_policy,
        keys=jr.split(jr.key(args.seed), args.seeds),
        total_steps=args.steps,
        num_evals=args.evals,
        num_eval_episodes=16,
    )
    total_s = time.perf_counter() - tic
    load_after = os.getloadavg()
    run.save(args.out)
    return Training(run, total_s, load, load_after)


def outcome(run: diffsim.Run) -> Outcome:
    """IQMs over seeds of the eval returns (first, last, best) and the timings."""
    returns = np.asarray(run.curve.eval_return).mean(-1)  # (seeds, evals)
    compile_s = float(run.config["compile_seconds"])
    train_s = float(run.config["train_seconds"])
    steps = int(np.asarray(run.curve.env_steps)[0, -1])
    initial = float(iqm(returns[:, 0]))
    final = float(iqm(returns[:, -1]))
    _, low, high = iqm_ci(returns[:, -1:])
    final_ci = [float(low[0]), float(high[0])]
    best = float(iqm(returns.max(axis=1)))
    return Outcome(returns, compile_s, train_s, steps, initial, final, final_ci, best)


def our_figures(args: argparse.Namespace, training: Training, result: Outcome) -> dict[str, Any]:
    """This run's column of the table next to the tutorial's, as summary.json records it."""
    returns, compile_s, train_s, steps, initial, final, final_ci, best = result
    total_s, load, load_after = training.total_s, training.load_before, training.load_after
    platform = jax.devices()[0].platform
    return dict(
        hardware=f"{os.cpu_count()} shared CPU cores ({platform})",
        env_steps=steps,
        wall_clock_s=train_s,
        compile_s=compile_s,
        total_s=total_s,
        initial_return=initial,
        final_return=final,
        final_return_ci95=final_ci,
        final_return_per_seed=returns[:, -1].tolist(),
        best_return=best,
        seeds=args.seeds,
        load_average_before=load,
        load_average_after=load_after,
    )


def print_comparison(
    args: argparse.Namespace, training: Training, result: Outcome, ours: dict[str, Any]
) -> None:
    """Prints the table next to the tutorial's figures and the eval returns along training."""
    returns, compile_s, train_s, steps, initial, final, final_ci, best = result
    load, load_after = training.load_before, training.load_after
    agg = "IQM over seeds of " if args.seeds > 1 else ""
    print(f"\nPPO on Brax ant (spring, episode_length 1000); returns: {agg}mean of 16 episodes")
    print(f"{'':<28}{'tutorial (2021)':>20}{'diffsim (this run)':>28}")
    print(f"{'hardware':<28}{TUTORIAL['hardware']:>20}{ours['hardware']:>28}")
    print(f"{'env steps':<28}{TUTORIAL['env_steps']:>20,}{steps:>28,}")
    print(
        f"{'training wall-clock (min)':<28}{TUTORIAL['wall_clock_s'] / 60:>20.1f}{train_s / 60:>28.2f}"
    )
    print(f"{'compile (min)':<28}{'(not reported)':>20}{compile_s / 60:>28.2f}")
    print(
        f"{'env steps/s (training)':<28}{1e6 / TUTORIAL['wall_clock_s']:>20,.0f}{steps / train_s:>28,.0f}"
    )
    print(f"{'initial return':<28}{TUTORIAL['initial_return']:>20.1f}{initial:>28.1f}")
    print(f"{'final return':<28}{TUTORIAL['final_return']:>20.1f}{final:>28.1f}")
    ci = f"[{final_ci[0]:.0f}, {final_ci[1]:.0f}]"
    print(f"{'  95% bootstrap CI':<28}{'':>20}{ci:>28}")
    print(f"{'best return (any eval)':<28}{'':>20}{best:>28.1f}")
    print(
        f"load average before/after: {load[0]:.2f} / {load_after[0]:.2f} on {os.cpu_count()} cores"
    )
    print("\neval return along training (mean of 16 episodes, per seed):")
    for i, s in enumerate(np.asarray(training.run.curve.env_steps)[0]):
        print(f"  {int(s):>9,} steps  " + "  ".join(f"{r:8.1f}" for r in returns[:, i]))


def final_gait(env, run: diffsim.Run) -> dict[str, float]:
    """Prints and returns the gait of seed 0's final policy over 16 deterministic episodes."""
    seed0 = jax.tree.map(lambda x: x[0] if eqx.is_array(x) else x, run.policy)
    moves = eqx.filter_jit(gait_stats)(env, seed0, key=jr.key(123), num_envs=16)
    moves = {k: float(v) for k, v in moves.items()}
    print(
        "\nfinal policy of seed 0, 16 deterministic episodes: torso height {torso_height:.2f} m,"
        " forward velocity {forward_velocity:.2f} m/s, upright {upright_fraction:.1%} of"
        " steps, episode length {episode_length:.0f}, return {return:.0f}".format(**moves)
    )
    return moves


def write_summary(out: str, run: diffsim.Run, ours: dict[str, Any]) -> None:
    summary = dict(
        tutorial=TUTORIAL,
        diffsim=ours,
        ppo=run.config["hyperparameters"],
        devices=[str(d) for d in jax.devices()],
        versions=diffsim.results.versions(),
    )
    Path(out, "summary.json").write_text(json.dumps(summary, indent=2, default=str))


def plot(args: argparse.Namespace, run: diffsim.Run, result: Outcome) -> None:
    """The learning curve vs env steps and vs wall-clock, saved to `args.figure`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), constrained_layout=True)
    label = f"PPO ({args.seeds} seed{'s' if args.seeds > 1 else ''})"
    diffsim.plotting.learning_curves({label: run}, x="env_steps", ax=axes[0])
    diffsim.plotting.learning_curves({label: run}, x="wall_time", ax=axes[1])
    for ax in axes:
        ax.axhline(
            TUTORIAL["final_return"], color="gray", ls="--", lw=1, label="tutorial final (-5.5)"
        )
        ax.legend(frameon=False)
    axes[1].set_title(
        f"{result.steps:,} steps in {result.train_s / 60:.1f} min on {os.cpu_count()} CPU cores"
        f" (tutorial: 41 min, P100)",
        fontsize=10,
    )
    Path(args.figure).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.figure, dpi=150)


def main():
    args = parse_args()
    env = diffsim.make_env("ant", backend="spring", episode_length=1000)
    training = train(args, env)
    result = outcome(training.run)
    ours = our_figures(args, training, result)
    print_comparison(args, training, result, ours)
    ours["final_policy_gait"] = final_gait(env, training.run)
    write_summary(args.out, training.run, ours)
    plot(args, training.run, result)
    print(f"\nwrote {args.out}/ and {args.figure}")


if __name__ == "__main__":
    main()
