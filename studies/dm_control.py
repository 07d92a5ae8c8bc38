"""The DeepMind Control Suite on MJX: PPO, APG, SHAC, ES and GuidedES under the protocol.

    pip install -e '.[playground]'
    python studies/dm_control.py [--envs PendulumSwingup CartpoleBalance WalkerWalk]
                                 [--strategies PPO APG SHAC ES GuidedES]
                                 [--seeds 5] [--configs 3] [--tuning-seeds 2]
                                 [--out results] [--figures figures] [--allow-dirty]
    python studies/dm_control.py --report-only [--check]   # tables of the finished cells
    python studies/dm_control.py --throughput   # MJX against Brax spring, forward steps/s

MuJoCo Playground's DM Control Suite envs (`diffsim.make_env("WalkerWalk")`: MJX's JAX
implementation, Playground's episode length and control step), one swing-up, one balance
and one with contacts, WalkerWalk. (Not CheetahRun: Playground's CheetahRun reset settles
the body with 200 physics steps, and every strategy draws fresh starts per rollout, so its
training would simulate about 7 times the steps it counts; see the MJX gradients page.)
Every env keeps its model's own solver settings (WalkerWalk: 2
constraint-solver iterations, CartpoleBalance: 1, PendulumSwingup: no constraints), with
MJX's solver loop run as diffsim's bounded one (`bounded_solver=True`, the default) so that
reverse mode passes through it; every contender sees the same physics.
Rewards are DMC's smooth tolerances in [0, 1] per step (at most 1000 per episode).

The protocol of `studies/compare.py`: every contender searches `--configs` learning rates
(1/8 to 8 times its own) on `--tuning-seeds` seeds; the best is re-trained on `--seeds`
fresh seeds; the same env-step budget for every strategy on an env (`BUDGETS`), 16
evaluation episodes at 11 points; an untrained row and first-crossing ratios against PPO's
final IQM. Each finished cell is saved to results/dm_control/<env>/<strategy>/ at once
(the study resumes cell by cell). Writes results/dm_control/table.{txt,json},
results/dm_control/skipped.txt (updates skipped for a non-finite gradient, per cell) and
figures/dm_control_*.png.

`--throughput` times the forward rollout (64 envs x 100 steps, zero actions, after a
warm-up) of CheetahRun on MJX against Brax's halfcheetah on the spring backend, in one
process, and writes results/dm_control/throughput.txt.
"""

import csv
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import jax.random as jr

import diffsim
from diffsim.study import Cell, provenance_header

sys.path.insert(0, str(Path(__file__).parent))
import compare  # noqa: E402  (the protocol's options, search, policies and figures)

# env: env steps per seed, the same for every strategy on it.
# WalkerWalk's is smaller: each of its env steps is 10 physics steps with contacts, so even
# at 50k its gradient cells train for about 10 minutes and search for about 25 on one CPU
# core (`train s` and `tune s` in results/dm_control/table.txt); 300k would take hours.
BUDGETS = {"PendulumSwingup": 300_000, "CartpoleBalance": 300_000, "WalkerWalk": 50_000}
HORIZON = 32  # the differentiated window of APG, SHAC and GuidedES


def contenders(name: str):
    """(label, strategy, policy) in plot order: diffsim's defaults, with 16-env windows of
    `HORIZON` steps for the gradient methods and 200-step member episodes for ES."""
    window = dict(num_envs=16, horizon=HORIZON)
    return [
        ("PPO", diffsim.PPO(num_envs=64, unroll_length=32, discount=0.99), compare.gaussian),
        ("APG", diffsim.APG(**window, learning_rate=1e-3), compare.deterministic),
        ("SHAC", diffsim.SHAC(**window), compare.deterministic),
        *compare.evolution(window, rollout_length=200),
    ]


def cells(names, labels, configs: int) -> list[Cell]:
    return compare.grid_cells(names, labels, configs, contenders, lambda name, _: BUDGETS[name])


def throughput(num_envs: int = 64, length: int = 100) -> str:
    """Forward env steps/s of MJX CheetahRun and Brax spring halfcheetah, zero actions."""
    lines = [f"{'env':<13}{'engine':<16}{'envs':>6}{'steps':>7}{'env steps/s':>13}"]
    for name, engine in (("CheetahRun", "mjx"), ("halfcheetah", "brax spring")):
        env = diffsim.make_env(name)
        start = diffsim.reset(env, key=jr.key(0), num_envs=num_envs)

        @jax.jit
        def run(state, env=env):
            zeros = jnp.zeros((num_envs, env.action_size))
            step = jax.vmap(lambda s, a: env.step(s, a, ()))
            return jax.lax.scan(lambda s, _: (step(s, zeros), None), state, length=length)[0]

        jax.block_until_ready(run(start))  # compile and warm up
        tic = time.perf_counter()
        jax.block_until_ready(run(start))
        rate = num_envs * length / (time.perf_counter() - tic)
        lines.append(f"{name:<13}{engine:<16}{num_envs:>6}{length:>7}{rate:>13,.0f}")
    return "\n".join(lines)


def skipped_updates(root: Path) -> str:
    """Per cell whose strategy guards its gradient update (APG, SHAC, PPO): updates skipped
    for a non-finite gradient, how many of those fell in a window where an episode
    restarted, and the largest finite gradient norm, from each cell's metrics.csv (all
    reported seeds)."""
    lines = [
        f"{'env':<17}{'strategy':<10}{'updates':>8}{'skipped':>9}{'at a restart':>14}"
        f"{'windows with a restart':>24}{'max grad norm':>15}"
    ]
    for metrics in sorted(root.glob("*/*/metrics.csv")):
        rows = list(csv.DictReader(metrics.open()))
        if not rows or not {"skipped_updates", "episodes", "grad_norm"} <= rows[0].keys():
            continue
        skipped = [float(r["skipped_updates"]) > 0 for r in rows]
        restart = [float(r["episodes"]) > 0 for r in rows]
        norms = [float(r["grad_norm"]) for r in rows if r["grad_norm"] not in ("nan", "inf")]
        both = sum(s and r for s, r in zip(skipped, restart, strict=True))
        lines.append(
            f"{metrics.parts[-3]:<17}{metrics.parts[-2]:<10}{len(rows):>8}"
            f"{sum(skipped):>9}{both:>14}{sum(restart):>24}{max(norms, default=float('nan')):>15.3g}"
        )
    return "\n".join(lines)


def main() -> None:
    parser = compare.grid_parser(__doc__, BUDGETS, contenders, seeds=5, configs=3)
    parser.add_argument("--throughput", action="store_true", help="only the MJX/Brax timing")
    args = parser.parse_args()
    provenance, command = compare.start(parser, args)
    root = Path(args.out) / "dm_control"
    if args.throughput:
        text = provenance_header(provenance, command) + "\n\n" + throughput()
        root.mkdir(parents=True, exist_ok=True)
        (root / "throughput.txt").write_text(text + "\n")
        print(text)
        return
    runs = compare.grid_runs("dm_control", args, contenders, cells, num_evals=11)
    grid = cells(args.envs, args.strategies, args.configs)
    stale = compare.stale_cells("dm_control", grid, args, num_evals=11)
    compare.write_table(runs, root, provenance, command, stale=stale)
    skipped = skipped_updates(root)
    compare.write_text(root / "skipped.txt", skipped, provenance, command)
    print(skipped)
    compare.save_figures(runs, "dm_control", args.figures)


if __name__ == "__main__":
    main()
