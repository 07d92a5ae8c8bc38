"""Hyperparameter sensitivity: final IQM of PPO, APG, SHAC and ES against their learning
rate and one more hyperparameter each, on `pendulum` and `inverted_pendulum`.

    python studies/sensitivity.py [--seeds 5] [--out results] [--figures figures] [--tiny]
                                  [--allow-dirty]

Each (env, strategy, hyperparameter) is one `diffsim.train_sweep`: 5 values x 5 seeds in
one compiled program, the other settings as in `make study` (studies/compare.py). Each
sweep is saved to results/sensitivity/<env>/<strategy>-<name>/ as soon as it finishes;
re-running loads finished sweeps. For one grid (PPO's learning rate on pendulum) the
same 5 values are also trained one at a time with `train_seeds`, with the persistent
compilation cache off for both, to compare compile and training seconds.

Prints a table, writes it with its provenance to results/sensitivity/table.txt and
summary.json, and figures/sensitivity.png. Refuses a tree with uncommitted changes unless
--allow-dirty.
`--tiny` (2 values, 2 seeds, 10k steps, pendulum only) checks that everything runs and
writes to results/sensitivity_tiny/ and figures/sensitivity_tiny.png instead.
"""

import argparse
import dataclasses
import json
import time
from pathlib import Path

import jax
import jax.random as jr
import matplotlib.pyplot as plt
import numpy as np
from compare import allow_dirty_argument, start, strategies

import diffsim
from diffsim.plotting import color_for
from diffsim.stats import aggregate_ci, aggregate_name
from diffsim.study import provenance_header

BUDGETS = {"pendulum": 200_000, "inverted_pendulum": 300_000}

# Per strategy: (hyperparameter, 5 values, log-scaled x axis). The first is the learning
# rate. The values bracket the setting of `make study` (dotted line in the figure).
SWEEPS = {
    "PPO": [
        ("learning_rate", [3e-5, 1e-4, 3e-4, 1e-3, 3e-3], True),
        ("clip_epsilon", [0.05, 0.1, 0.2, 0.3, 0.4], False),
    ],
    "APG": [
        ("learning_rate", [1e-3, 3e-3, 1e-2, 3e-2, 1e-1], True),
        ("max_grad_norm", [0.1, 0.3, 1.0, 3.0, 10.0], True),
    ],
    "SHAC": [
        ("actor_learning_rate", [2e-4, 6e-4, 2e-3, 6e-3, 2e-2], True),
        ("discount", [0.9, 0.95, 0.97, 0.99, 0.995], False),
    ],
    "ES": [
        ("learning_rate", [3e-3, 1e-2, 3e-2, 1e-1, 3e-1], True),
        ("std", [0.01, 0.02, 0.05, 0.1, 0.2], True),
    ],
}
TIMED = ("pendulum", "PPO", "learning_rate")  # the grid also run one config at a time


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--out", default="results")
    parser.add_argument("--figures", default="figures", help="where the figure is written")
    parser.add_argument("--tiny", action="store_true", help="2 values, 2 seeds, 10k steps")
    allow_dirty_argument(parser)
    parser.add_argument(
        "--finished-only",
        action="store_true",
        help="report the sweeps already saved, train nothing (the rest are listed as not run)",
    )
    return parser


def main():
    parser = _parser()
    args = parser.parse_args()
    provenance, command = start(parser, args)

    name = "sensitivity_tiny" if args.tiny else "sensitivity"
    out = Path(args.out) / name
    budgets = {"pendulum": 10_000} if args.tiny else BUDGETS
    seeds = 2 if args.tiny else args.seeds
    settings = dict(num_evals=3 if args.tiny else 11, num_eval_episodes=16)
    keys = jr.split(jr.key(0), seeds)  # as in run_study: seed i is the same everywhere
    pick = (lambda values: values[::4]) if args.tiny else (lambda values: values)

    envs = {env: diffsim.make_env(env) for env in budgets}
    contenders = {env: {label: (s, p) for label, s, p in strategies(envs[env])} for env in budgets}

    timing = None
    env_name, label, param = TIMED
    if env_name in budgets:  # first, before any program of this grid is in memory
        strategy, policy = contenders[env_name][label]
        values = pick(dict((n, v) for n, v, _ in SWEEPS[label])[param])
        timing = time_grid(
            strategy,
            envs[env_name],
            policy,
            param,
            values,
            keys,
            budgets[env_name],
            settings,
            out / env_name / f"{label}-{param}",
        )

    runs = sweeps(envs, budgets, contenders, out, keys, settings, pick, args.finished_only)

    rows = summary(runs)
    lines = table(rows)
    print("\n" + "\n".join(lines))
    if timing is not None:
        print("\n" + "\n".join(timing_lines(timing)))
    out.mkdir(parents=True, exist_ok=True)
    header = provenance_header(provenance, command)
    (out / "table.txt").write_text(header + "\n\n" + "\n".join(lines) + "\n")
    record = {"command": command, "provenance": provenance, "rows": rows, "timing": timing}
    (out / "summary.json").write_text(json.dumps(record, indent=2))
    studied = {label: s for label, s, _ in strategies(next(iter(envs.values())))}
    defaults = {(s, p): getattr(studied[s], p) for s in SWEEPS for p, _, _ in SWEEPS[s]}
    figure = plot(rows, list(budgets), defaults)
    Path(args.figures).mkdir(parents=True, exist_ok=True)
    figure.savefig(f"{args.figures}/{name}.png", dpi=120)
    print(f"wrote {out / 'summary.json'} and {args.figures}/{name}.png")


def sweeps(envs, budgets, contenders, out, keys, settings, pick, finished_only) -> dict:
    """Every (env, strategy, hyperparameter) sweep: loaded where saved, else trained (one
    `train_sweep` each) and saved, unless `finished_only`."""
    runs = {}
    for env_name, steps in budgets.items():
        env = envs[env_name]
        for label, (strategy, policy) in contenders[env_name].items():
            for param, values, _ in SWEEPS[label]:
                path = out / env_name / f"{label}-{param}"
                if (path / "config.json").exists():
                    runs[env_name, label, param] = diffsim.load_run(path)
                    continue
                if finished_only:
                    print(f"not run: {env_name} {label} {param}")
                    continue
                run = diffsim.train_sweep(
                    strategy,
                    env,
                    lambda k, env=env, make=policy: make(env, k),
                    sweep={param: pick(values)},
                    keys=keys,
                    total_steps=steps,
                    **settings,
                )
                run.save(path)
                runs[env_name, label, param] = run
    return runs


def time_grid(strategy, env, policy, param, values, keys, steps, settings, path) -> dict:
    """One grid as a sweep and as a loop of `train_seeds`, both compiled from scratch.

    The sweep is saved to `path` (its sensitivity cell). Seconds: `compile` (tracing and
    XLA), `train` (training programs only), `eval` (evaluations), `total` (the call)."""
    cached = path.parent.parent / "timing.json"
    if cached.exists() and (path / "config.json").exists():
        return json.loads(cached.read_text())
    make = lambda k: policy(env, k)
    jax.config.update("jax_enable_compilation_cache", False)  # nothing loaded from disk
    try:
        tic = time.perf_counter()
        sweep = diffsim.train_sweep(
            strategy, env, make, sweep={param: values}, keys=keys, total_steps=steps, **settings
        )
        sweep_total = time.perf_counter() - tic
        loop, loop_total = [], 0.0
        for value in values:
            tic = time.perf_counter()
            one = dataclasses.replace(strategy, **{param: value})
            loop.append(
                diffsim.train_seeds(one, env, make, keys=keys, total_steps=steps, **settings)
            )
            loop_total += time.perf_counter() - tic
    finally:
        jax.config.update("jax_enable_compilation_cache", True)
    sweep.save(path)
    seconds = lambda cfgs, what: sum(c[f"{what}_seconds"] for c in cfgs)
    finals = [_final(run) for run in loop]
    timing = {
        "grid": {"env": env.name, "strategy": type(strategy).__name__, param: values},
        "seeds": len(keys),
        "total_steps": steps,
        "sweep": {
            "compile": sweep.config["compile_seconds"],
            "train": sweep.config["train_seconds"],
            "eval": sweep.config["eval_seconds"],
            "total": round(sweep_total, 3),
        },
        "loop": {
            "compile": round(seconds([r.config for r in loop], "compile"), 3),
            "train": round(seconds([r.config for r in loop], "train"), 3),
            "eval": round(seconds([r.config for r in loop], "eval"), 3),
            "total": round(loop_total, 3),
        },
        # Same arithmetic up to float reassociation, which long training can amplify.
        "max_abs_final_return_difference": float(np.max(np.abs(np.stack(finals) - _final(sweep)))),
    }
    cached.parent.mkdir(parents=True, exist_ok=True)
    cached.write_text(json.dumps(timing, indent=2))
    return timing


def _final(run) -> np.ndarray:
    """Each run's mean return over the episodes of its last evaluation."""
    return np.asarray(run.curve.eval_return)[..., -1, :].mean(-1)


def summary(runs) -> list[dict]:
    """One row per (env, strategy, hyperparameter, value): final IQM over seeds (the mean
    below 5 seeds: `stat`), 95% CI."""
    rows = []
    for (env, label, param), run in runs.items():
        final = _final(run)  # (configs, seeds)
        for c, config in enumerate(run.config["sweep"]):
            mid, low, high = aggregate_ci(final[c][:, None])
            rows.append(
                {
                    "env": env,
                    "strategy": label,
                    "hyperparameter": param,
                    "value": config[param],
                    "stat": aggregate_name(len(final[c])),
                    "iqm": float(mid[0]),
                    "low": float(low[0]),
                    "high": float(high[0]),
                    "env_steps": run.config["total_steps"],
                    "seeds": run.config["num_seeds"],
                    "sweep_compile_s": run.config["compile_seconds"],
                    "sweep_train_s": run.config["train_seconds"],
                }
            )
    return rows


def table(rows) -> list[str]:
    header = (
        f"{'env':<19}{'strategy':<9}{'hyperparameter':<21}{'value':>9}{'stat':>6}{'final':>11}"
        f"{'95% CI':>20}{'sweep train s':>15}{'compile s':>11}"
    )
    return [header] + [
        f"{r['env']:<19}{r['strategy']:<9}{r['hyperparameter']:<21}{r['value']:>9.3g}"
        f"{r['stat']:>6}{r['iqm']:>11.1f}{_ci(r):>20}"
        f"{r['sweep_train_s']:>15.1f}{r['sweep_compile_s']:>11.1f}"
        for r in rows
    ]


def _ci(row) -> str:
    return f"[{row['low']:.1f}, {row['high']:.1f}]"


def timing_lines(t) -> list[str]:
    grid = ", ".join(f"{k}={v}" for k, v in t["grid"].items())
    lines = [f"One grid ({grid}; {t['seeds']} seeds, {t['total_steps']:,} steps), no disk cache:"]
    lines.append(f"{'':<30}{'compile s':>10}{'train s':>10}{'eval s':>10}{'total s':>10}")
    for what, label in (
        ("sweep", "train_sweep (one program)"),
        ("loop", "train_seeds, one at a time"),
    ):
        s = t[what]
        lines.append(
            f"{label:<30}{s['compile']:>10.1f}{s['train']:>10.1f}{s['eval']:>10.1f}"
            f"{s['total']:>10.1f}"
        )
    lines.append(
        f"max |final return difference| sweep vs loop: {t['max_abs_final_return_difference']:.3g}"
    )
    return lines


def plot(rows, envs, defaults) -> plt.Figure:
    """One panel per (strategy, hyperparameter), a line per env: final IQM with its 95% CI.

    Each env has its own y axis (the second on the right), as their returns differ in
    scale; the dotted line marks the setting of `make study`."""
    labels = list(SWEEPS)
    fig, axes = plt.subplots(
        2, len(labels), figsize=(4.5 * len(labels), 7), constrained_layout=True, squeeze=False
    )
    for j, label in enumerate(labels):
        for i, (param, _, log) in enumerate(SWEEPS[label]):
            ax = axes[i, j]
            handles = []
            for k, env in enumerate(envs):
                key = (env, label, param)
                cell = [r for r in rows if (r["env"], r["strategy"], r["hyperparameter"]) == key]
                if not cell:
                    continue
                target = ax if k == 0 else ax.twinx()
                x = np.array([r["value"] for r in cell])
                mid, low, high = (np.array([r[f] for r in cell]) for f in ("iqm", "low", "high"))
                color = f"C{k}"
                handles += target.plot(x, mid, "o-", color=color, label=env)
                target.fill_between(x, low, high, color=color, alpha=0.2)
                target.tick_params(axis="y", colors=color)
            ax.axvline(defaults[label, param], color="0.6", ls=":", lw=1)
            if log:
                ax.set_xscale("log")
            ax.set_xlabel(param)
            ax.set_title(label, color=color_for(label, j))
            if j == 0:
                ax.set_ylabel("final IQM return (95% CI)")
            ax.legend(handles=handles, fontsize=8)
    fig.suptitle(
        "Sensitivity: final IQM across seeds against one hyperparameter"
        " (dotted: the setting of `make study`)"
    )
    return fig


if __name__ == "__main__":
    main()
