"""First-order methods through contact: PPO, SHAC, AHAC and SAPO at equal env-step budgets.

    python studies/contact.py [--envs halfcheetah ant WalkerWalk ant_trot]
                              [--strategies PPO SHAC AHAC SAPO] [--strategies APG ES GuidedES]
                              [--seeds 5] [--configs 3] [--tuning-seeds 2]
                              [--out results] [--figures figures] [--allow-dirty]
    python studies/contact.py --report-only   # tables and figures of the finished cells

Brax `halfcheetah` and `ant` (spring backend, Brax's rewards, 1000-step episodes), MuJoCo
Playground's `WalkerWalk` (MJX, contacts) and `ant_trot` (`studies/ant_trot.py`: the ant
rewarded for tracking a reference trot of its joints, a dense, differentiable reward
through the same contacts, the setting of MJX's APG tutorial). Every contender on an env
gets the same budget (`BUDGET`, 300k env steps: first-order methods claim sample efficiency, so a small equal
budget is their natural test), the same tuning effort (`--configs` learning rates from 1/8
to 8 times its own on `--tuning-seeds` seeds, widened past an edge), `--seeds` fresh seeds,
16 evaluation episodes at `EVALS` points and an untrained row. The first-order contenders
run with their defaults through contact: SHAC as published (64 envs x 32 steps), AHAC
(per-env windows cut where contact gets stiff, a learned horizon) and SAPO (maximum
entropy), each with the gradient valve of the shared window; APG, ES and GuidedES join with
`--strategies` where the machine affords them.

Writes results/contact/table.{txt,json} (final IQM with 95% CI, P(>PPO), P(>untrained),
ratios at a common target with CIs, the tuning), gradients.txt (per cell: updates, the share
skipped for a non-finite gradient, the largest and median pre-clip gradient norm and the
largest per-step cotangent norm), gait.txt (how the final policies move) and
figures/contact_*.png. A gradient cell trains 11 runs of 300k steps: tens of minutes per
cell on a CPU core (hours on WalkerWalk); run one process per core and commit each cell as
it lands.
"""

import sys
from pathlib import Path

import numpy as np

import diffsim
from diffsim.study import Cell, gradient_health

sys.path.insert(0, str(Path(__file__).parent))
import ant_trot  # noqa: E402  (registers the env "ant_trot")
import compare  # noqa: E402  (the protocol's options, search, policies and figures)
import locomotion  # noqa: E402  (PPO's settings per body, gaits)

ENVS = ("halfcheetah", "ant", "WalkerWalk", ant_trot.NAME)
BUDGET = 300_000  # env steps per seed, the same for every contender on every env
EVALS = 16  # every 20k env steps
DEFAULT = ("PPO", "SHAC", "AHAC", "SAPO")
PPO_WALKER = diffsim.PPO(num_envs=64, unroll_length=32, discount=0.99)  # studies/dm_control.py
# PPO's settings per env: the locomotion study's on the Brax bodies (ant's on ant_trot).
PPO = {**locomotion.PPO, ant_trot.NAME: locomotion.ANT_PPO, "WalkerWalk": PPO_WALKER}


def stochastic(env, key):
    """SAPO's and AHAC's actor: a squashed Gaussian with a learned, state-dependent std."""
    return diffsim.GaussianPolicy(
        env.observation_size, env.action_size, state_dependent_std=True, key=key
    )


def contenders(name: str):
    """(label, strategy, policy) in plot order. On the Brax bodies every differentiated
    window rematerialises each physics substep in the backward pass (`options.remat`)."""
    brax = name != "WalkerWalk"
    remat = {"options": diffsim.WindowOptions(remat=True)} if brax else {}
    window = dict(num_envs=16, horizon=32, **remat)
    return [
        ("PPO", PPO[name], compare.gaussian),
        ("SHAC", diffsim.SHAC(num_envs=64, horizon=32, stochastic=True, **remat), stochastic),
        ("AHAC", diffsim.AHAC(**remat), stochastic),
        ("SAPO", diffsim.SAPO(**remat), stochastic),
        ("APG", diffsim.APG(**window, learning_rate=1e-3), compare.deterministic),
        *compare.evolution(window, rollout_length=100),
    ]


def cells(names, labels, configs: int) -> list[Cell]:
    return compare.grid_cells(names, labels, configs, contenders, lambda *_: BUDGET, EVALS)


def gradients(runs) -> str:
    """Per cell with gradient metrics (`diffsim.study.gradient_health`): updates over the
    reported seeds, the share skipped for a non-finite gradient, the largest and median
    pre-clip gradient norm, and the largest per-step cotangent norm in a window."""
    rows = []
    for (name, label), run in runs.items():
        health = gradient_health(run)
        if health is None or "grad_norm_max" not in health:
            continue
        rest = (
            f"{health['updates']:>9}{health['skipped']:>9.1%}{health['grad_norm_max']:>11.3g}"
            f"{health['grad_norm_median']:>13.3g}{health.get('step_norm_max', np.nan):>15.3g}"
        )
        rows.append((name, label, rest))
    heads = f"{'updates':>9}{'skipped':>9}{'max norm':>11}{'median norm':>13}{'max step norm':>15}"
    return compare.cell_table(heads, rows)


def main():
    parser = compare.grid_parser(
        __doc__, ENVS, contenders, seeds=5, configs=3, default_labels=DEFAULT
    )
    args = parser.parse_args()
    provenance, command = compare.start(parser, args)
    root = Path(args.out) / "contact"
    runs = compare.grid_runs("contact", args, contenders, cells, num_evals=EVALS)
    grid = cells(args.envs, args.strategies, args.configs)
    stale = compare.stale_cells("contact", grid, args, num_evals=EVALS)
    compare.write_table(runs, root, provenance, command, stale=stale)
    text = gradients(runs)
    compare.write_text(root / "gradients.txt", text, provenance, command)
    print(text)
    brax = {k: r for k, r in runs.items() if k[0] != "WalkerWalk"}
    layouts = {ant_trot.NAME: ant_trot.GAIT}
    gait = locomotion.format_gaits(locomotion.gaits(brax, root, layouts=layouts)) if brax else ""
    compare.write_text(root / "gait.txt", gait, provenance, command)
    print(gait)
    compare.save_figures(runs, "contact", args.figures)


if __name__ == "__main__":
    main()
