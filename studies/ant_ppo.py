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


def main():
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
    args = parser.parse_args()

    env = diffsim.make_env("ant", backend="spring", episode_length=1000)
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

    returns = np.asarray(run.curve.eval_return).mean(-1)  # (seeds, evals)
    compile_s = float(run.config["compile_seconds"])
    train_s = float(run.config["train_seconds"])
    steps = int(np.asarray(run.curve.env_steps)[0, -1])
    initial = float(iqm(returns[:, 0]))
    final = float(iqm(returns[:, -1]))
    _, low, high = iqm_ci(returns[:, -1:])
    final_ci = [float(low[0]), float(high[0])]
    best = float(iqm(returns.max(axis=1)))
    platform = jax.devices()[0].platform
    ours = dict(
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
    for i, s in enumerate(np.asarray(run.curve.env_steps)[0]):
        print(f"  {int(s):>9,} steps  " + "  ".join(f"{r:8.1f}" for r in returns[:, i]))

    seed0 = jax.tree.map(lambda x: x[0] if eqx.is_array(x) else x, run.policy)
    moves = eqx.filter_jit(gait_stats)(env, seed0, key=jr.key(123), num_envs=16)
    moves = {k: float(v) for k, v in moves.items()}
    print(
        "\nfinal policy of seed 0, 16 deterministic episodes: torso height {torso_height:.2f} m,"
        " forward velocity {forward_velocity:.2f} m/s, upright {upright_fraction:.1%} of"
        " steps, episode length {episode_length:.0f}, return {return:.0f}".format(**moves)
    )
    ours["final_policy_gait"] = moves

    summary = dict(
        tutorial=TUTORIAL,
        diffsim=ours,
        ppo=run.config["hyperparameters"],
        devices=[str(d) for d in jax.devices()],
        versions=diffsim.results.versions(),
    )
    Path(args.out, "summary.json").write_text(json.dumps(summary, indent=2, default=str))

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
        f"{steps:,} steps in {train_s / 60:.1f} min on {os.cpu_count()} CPU cores"
        f" (tutorial: 41 min, P100)",
        fontsize=10,
    )
    Path(args.figure).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.figure, dpi=150)
    print(f"\nwrote {args.out}/ and {args.figure}")


if __name__ == "__main__":
    main()
