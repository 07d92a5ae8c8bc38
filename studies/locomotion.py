"""Analytic gradients on Brax bodies: PPO, APG, SHAC, ES and GuidedES on locomotion.

    python studies/locomotion.py [--envs halfcheetah ant hopper] [--envs reacher]
                                 [--strategies PPO ES APG SHAC GuidedES]
                                 [--seeds 5] [--configs 3] [--tuning-seeds 2]
                                 [--out results] [--figures figures] [--allow-dirty]
    python studies/locomotion.py --report-only [--check]   # tables of the finished cells

Brax `halfcheetah`, `ant` and `hopper` (contact; `reacher`, without contacts, with `--envs
reacher`: the hybrid study has it under the same protocol), spring backend, Brax's reward
definitions unchanged, 1000-step episodes. Budgets (`BUDGETS`): the
strategies that only simulate forward (PPO, ES) get 1M env steps, a budget at which tuned
PPO learns (ant: ~3,600, `studies/ant_ppo.py`); the ones that differentiate the simulator
(APG, SHAC, GuidedES) get 300k, since each of their steps costs ~6 forward steps on these
bodies (results/gradient_cost/). The question is how many env steps and training seconds
each needs to reach tuned PPO's final return, which the unequal budgets do not bias
(first crossings); final returns are compared only between equal budgets. Every strategy
gets the same tuning effort: `--configs` learning rates (log-spaced from 1/8 to 8 times its
own, so 3 are 1/8, 1 and 8 times; SHAC's actor rate) on `--tuning-seeds` seeds, the best
re-trained on `--seeds` fresh seeds (5), with 16 evaluation episodes at 21 points (every
50k or 15k steps). The search is smaller than `make study`'s 5 rates because of the CPU:
a gradient cell trains 11 runs of 300k steps at ~2k env steps/s (about 30 min; run it pinned
to one core, `taskset -c 0`, so that training seconds compare like with like). Each
finished cell is saved to results/locomotion/<env>/<strategy>/ at once,
so an interrupted run resumes where it stopped; several processes may train the grid at
once (`--envs`, `--strategies`, or the same cells: a per-cell lock makes each train once).

After training, every cell's final policies are scored for how they move
(`diffsim.diagnostics.gait_stats`: forward velocity, torso height, upright fraction and
episode length, 8 deterministic episodes per seed). Prints the study's tables (untrained
row, final IQM with 95% bootstrap CI, P(>PPO), P(>untrained), env steps and training
seconds to PPO's final IQM on both sides, the tuning) and one of gaits, and writes them
with their provenance to results/locomotion/{table,gait}.{txt,json} and
figures/locomotion_*.png. Refuses a tree with uncommitted changes unless --allow-dirty.
"""

import json
import sys
import time
from pathlib import Path

import equinox as eqx
import jax.random as jr
import numpy as np

import diffsim
from diffsim.diagnostics import GAIT_FIELDS, gait_stats
from diffsim.stats import aggregate_ci, aggregate_name, probability_of_improvement

sys.path.insert(0, str(Path(__file__).parent))
import compare  # noqa: E402  (the learning-rate search and the shared options)

BODIES = ("halfcheetah", "ant", "hopper")  # the default --envs
ENVS = (*BODIES, "reacher")

# Env steps per seed: forward-only strategies 1M, those that differentiate the simulator 300k.
FORWARD_BUDGET, GRADIENT_BUDGET = 1_000_000, 300_000
BUDGETS = {"PPO": FORWARD_BUDGET, "ES": FORWARD_BUDGET}  # APG, SHAC, GuidedES: GRADIENT_BUDGET
EVALS = 21  # evaluations per run: every 50k steps at 1M, every 15k at 300k

# env: (envs, horizon) of the differentiated windows. The horizon is the longest power of
# two at which the analytic gradient's variance stays below ES's (studies/gradient_variance.py,
# results/gradient_variance/<env>.csv): halfcheetah crosses between 8 and 16 (at 32 it is
# 9e11 against ES's 2e5), ant between 64 and 128 and hopper not up to 128 (SHAC's
# published 32 kept for both), reacher has no contacts (32).
WINDOWS = {"reacher": (16, 32), "halfcheetah": (64, 8), "ant": (16, 32), "hopper": (16, 32)}


# PPO: settings adapted from Brax's per-env ones at 2048 envs (the same discount, unroll,
# entropy bonus, reward scaling and epochs; 64-100 envs, fewer minibatches); they are not
# Brax's settings, which assume 2048 envs. The learning rate is searched like everyone
# else's. halfcheetah: unroll 20, 8 epochs, discount 0.95, entropy 1e-3; reacher: unroll 50,
# 8 epochs, discount 0.95, entropy 1e-3, reward scaling 5 (Brax also repeats each action 4
# times, which diffsim does not). ant: the settings studies/ant_ppo.py measured (3,660 after
# 1M steps). Brax publishes no PPO settings for hopper (SAC only): ant's.
def _ppo(**settings) -> diffsim.PPO:
    """Brax's epochs and entropy bonus, shared by every env here."""
    return diffsim.PPO(num_epochs=8, entropy_coef=1e-3, **settings)


ANT_PPO = _ppo(  # studies/ant_ppo.py's settings: 3,660 after 1M steps
    num_envs=100, unroll_length=10, num_minibatches=4, discount=0.97, value_hidden=(128, 128)
)
PPO = {
    "reacher": _ppo(
        num_envs=64, unroll_length=50, num_minibatches=8, discount=0.95, reward_scale=5.0
    ),
    "halfcheetah": _ppo(num_envs=64, unroll_length=20, num_minibatches=4, discount=0.95),
    "ant": ANT_PPO,
    "hopper": ANT_PPO,
}


def gaussian(env, key):
    return diffsim.GaussianPolicy(env.observation_size, env.action_size, key=key)


def gaussian_elu(env, key):
    return diffsim.GaussianPolicy(env.observation_size, env.action_size, activation="elu", key=key)


def deterministic(env, key):
    return diffsim.DeterministicPolicy(env.observation_size, env.action_size, key=key)


def contenders(name: str):
    """(label, strategy, policy) in plot order.

    APG, SHAC and GuidedES differentiate windows of `WINDOWS[name]` (envs, horizon): 512
    env steps per window, with each physics substep rematerialised in the backward pass
    (`remat`: the same gradient in a tenth of the memory, results/gradient_cost/). SHAC as
    published (stochastic ELU actor, ELU critic, discount 0.99, linear LR decay). ES and
    GuidedES score their members on 100-step episodes."""
    num_envs, horizon = WINDOWS[name]
    window = dict(num_envs=num_envs, horizon=horizon, options=diffsim.WindowOptions(remat=True))
    shac = diffsim.SHAC(
        **window, stochastic=True, value_activation="elu", lr_decay=True, discount=0.99
    )
    return [
        ("PPO", PPO[name], gaussian),
        ("ES", diffsim.ES(population_size=32, rollout_length=100), deterministic),
        ("APG", diffsim.APG(**window, learning_rate=1e-3, lr_decay=True), deterministic),
        ("SHAC", shac, gaussian_elu),
        (
            "GuidedES",
            diffsim.GuidedES(gradient=diffsim.APGWindow(**window), rollout_length=100),
            deterministic,
        ),
    ]


def cells(names, labels, configs: int):
    """The grid's cells on the envs `names` whose strategy label is in `labels`, each
    searching `configs` learning rates."""
    budget = lambda _, label: BUDGETS.get(label, GRADIENT_BUDGET)
    return compare.grid_cells(names, labels, configs, contenders, budget, EVALS)


@eqx.filter_jit
def _gaits(env, policies, num_envs: int, layout):
    """`gait_stats` of every seed's policy (leading axis), one compile per env and policy kind."""
    gait = lambda p: gait_stats(env, p, key=jr.key(7), num_envs=num_envs, layout=layout)  # noqa: E731
    return eqx.filter_vmap(gait)(policies)


def gaits(runs, root: Path, *, num_envs: int = 8, layouts=None) -> list[dict]:
    """`gait_stats` of each cell's final policies, one row per cell: means over seeds of
    `num_envs` deterministic episodes each, and the per-seed values. Each row is saved as
    `<root>/<env>/<label>/gait.json` and reused when the cell has not changed since.
    `layouts`: `{env: layout}` for envs `GAIT_LAYOUT` does not know."""
    rows, envs = [], {}
    for (name, label), run in runs.items():
        path = root / name / label / "gait.json"
        config = root / name / label / "config.json"
        if path.exists() and path.stat().st_mtime >= config.stat().st_mtime:
            rows.append(json.loads(path.read_text()))
            continue
        env = envs.setdefault(name, diffsim.make_env(name))
        layout = (layouts or {}).get(name)
        stats = {k: np.asarray(v) for k, v in _gaits(env, run.policy, num_envs, layout).items()}
        row = {"env": name, "strategy": label}
        for k in GAIT_FIELDS:
            row[k] = float(np.mean(stats[k]))
            row[f"{k}_per_seed"] = stats[k].tolist()
        path.write_text(json.dumps(row, indent=2))
        rows.append(row)
    return rows


def format_gaits(rows: list[dict]) -> str:
    heads = (
        f"{'return':>9}{'ep. length':>11}{'fwd m/s':>9}"
        f"{'height m':>10}{'upright':>9}{'tip dist':>10}"
    )
    lines = [
        (
            r["env"],
            r["strategy"],
            f"{r['return']:>9.1f}{r['episode_length']:>11.0f}"
            f"{r['forward_velocity']:>9.2f}{r['torso_height']:>10.2f}"
            f"{r['upright_fraction']:>9.2f}{r['final_distance']:>10.3f}",
        )
        for r in rows
    ]
    return compare.cell_table(heads, lines).replace("nan", "  -")


def equal_budget(runs, steps: int = GRADIENT_BUDGET) -> list[dict]:
    """Every cell's statistic (95% bootstrap CI) at its evaluation nearest `steps` env steps,
    where the forward-only strategies' curves meet the gradient budget, with P(> PPO at the
    same point) over pairs of seeds: the comparison at equal env steps that the final
    returns, after different budgets, cannot give."""

    points = {}  # cell: (env step of the evaluation nearest `steps`, each seed's score there)
    for key, run in runs.items():
        env_steps = np.asarray(run.curve.env_steps)[0]
        point = int(np.argmin(np.abs(env_steps - steps)))
        points[key] = int(env_steps[point]), np.asarray(run.curve.eval_return)[:, point].mean(-1)
    rows = []
    for (name, label), (step, scores) in points.items():
        mid, low, high = aggregate_ci(scores)
        ppo = points.get((name, "PPO"))
        rows.append(
            dict(
                env=name,
                strategy=label,
                env_steps=step,
                seeds=len(scores),
                stat=aggregate_name(len(scores)),
                score=float(mid),
                low=float(low),
                high=float(high),
                p_over_PPO=None if ppo is None else probability_of_improvement(scores, ppo[1]),
            )
        )
    return rows


def format_equal_budget(rows: list[dict]) -> str:
    lines = []
    for r in rows:
        p = "-" if r["p_over_PPO"] is None else f"{r['p_over_PPO']:.2f}"
        ci = f"[{r['low']:.1f}, {r['high']:.1f}]"
        rest = (
            f"{r['env_steps']:>11,}{r['seeds']:>6}{r['stat']:>6}{r['score']:>10.1f}{ci:>21}{p:>9}"
        )
        lines.append((r["env"], r["strategy"], rest))
    heads = f"{'env steps':>11}{'seeds':>6}{'stat':>6}{'score':>10}{'95% CI':>21}{'P(>PPO)':>9}"
    return compare.cell_table(heads, lines)


def main():
    parser = compare.grid_parser(__doc__, ENVS, contenders, seeds=5, configs=3, default_envs=BODIES)
    args = parser.parse_args()
    provenance, command = compare.start(parser, args)

    tic = time.perf_counter()
    root = Path(args.out) / "locomotion"
    runs = compare.grid_runs("locomotion", args, contenders, cells, num_evals=EVALS)
    grid = cells(args.envs, args.strategies, args.configs)
    stale = compare.stale_cells("locomotion", grid, args, num_evals=EVALS)
    study_s = time.perf_counter() - tic
    compare.write_table(runs, root, provenance, command, stale=stale)

    def write(stem: str, text: str, rows: list[dict]) -> None:
        """results/locomotion/<stem>.txt under the provenance header, and its JSON."""
        compare.write_text(root / f"{stem}.txt", text, provenance, command)
        record = {"command": command, "provenance": provenance, "rows": rows}
        (root / f"{stem}.json").write_text(json.dumps(record, indent=2))

    same = equal_budget(runs)
    print(f"\nat {GRADIENT_BUDGET:,} env steps (the evaluation nearest it), every strategy:")
    same_text = format_equal_budget(same)
    print(same_text)
    write("equal_budget", same_text, same)

    gait_rows = gaits(runs, root)
    print("\nfinal policies, 8 deterministic episodes per seed (means over seeds):")
    gait_text = format_gaits(gait_rows)
    print(gait_text)
    write("gait", gait_text, gait_rows)

    compare.save_figures(runs, "locomotion", args.figures)
    total = time.perf_counter() - tic
    print(f"\nthis call: {study_s:.0f} s training and loading cells, {total:.0f} s in all")


if __name__ == "__main__":
    main()
