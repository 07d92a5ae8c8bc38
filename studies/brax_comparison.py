"""diffsim's PPO and ES against Brax's own trainers: same settings, same clock, 3 repeats.

    python studies/brax_comparison.py [--pairs ppo es ppo-halfcheetah es-halfcheetah ...]
                                      [--repeats 3] [--out results] [--allow-dirty]
    python studies/brax_comparison.py --report-only   # the table of the finished runs

Each pair runs one trainer on one env (spring backend, 1000-step episodes) in Brax
(`brax.training.agents.{ppo,es}.train`) and in diffsim (`diffsim.train`) with identical
settings (`PAIRS`): the same networks (64x64 tanh policy and value), constant learning
rates on both sides (Brax's default schedule; diffsim's `lr_decay=False`), no gradient
clipping (Brax clips policy and value jointly, diffsim each on its own), the same
evaluation (16 deterministic episodes at the same points) and the same env-step budget.
`inverted_pendulum` with settings at which Brax's PPO solves it (>= 900), and
`halfcheetah` as a body (throughput; the budget is too short to learn much).

Both sides run the same way: a fresh Python process each (Brax's in `.venv-brax/`, with
jax==0.9.2 and brax==0.14.2, since Brax's trainers fail on jax 0.10; diffsim's in this
interpreter), under the same `XLA_FLAGS` (`FLAGS`, stated in the table) and no persistent
compilation cache, one after the other, never at the same time. Repeats alternate sides.

Per run:
- counted steps/s: steady state, env steps that feed updates over training seconds
  (evaluation excluded), from the third evaluation on (the first two chunks hold Brax's
  two compiles of its training epoch; diffsim compiles before training);
- simulated steps/s: env steps simulated per training second. The same as counted for
  PPO. For ES, Brax simulates every member's full 1000 steps (its `training/sps`), diffsim
  stops a generation once its last episode has ended (its `simulated_steps` metric);
- end-to-end seconds to solve: from launching the process (start-up, imports, compiles
  and evaluations included) to the first evaluation whose mean return reaches `solve`.

Prints the table (means over repeats, with min-max) and writes
results/brax_comparison/{runs.json,table.txt,table.json}. Finished runs are kept in
runs.json and not re-run. Refuses a dirty tree unless --allow-dirty.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np

FLAGS = "--xla_backend_optimization_level=1"  # diffsim's own CPU level, for both sides
BRAX_VENV = Path(".venv-brax")
BRAX_PINS = ["jax==0.9.2", "jaxlib==0.9.2", "brax==0.14.2"]
HIDDEN = (64, 64)
EVAL_EPISODES = 16
SKIP = 2  # chunks left out of the steady rates

# Shared PPO settings. One unroll per training step on Brax's side (batch_size x
# num_minibatches = num_envs), minibatches of whole env sequences (diffsim's
# shuffle="envs"), as Brax does. Time limits: Brax's default (`bootstrap_on_timeout=False`)
# drops the truncated step from GAE, diffsim bootstraps it with the value of the last state;
# Brax's `bootstrap_on_timeout=True` is not usable here: its inverted_pendulum marks every
# fall as a time-out (`info["time_out"] = done`), so falling is bootstrapped as if it were
# not a failure and PPO collapses (in every repeat of a first run), and halfcheetah sets no
# `time_out` at all (KeyError).
_PPO = dict(
    num_epochs=4,
    learning_rate=3e-4,
    discount=0.97,
    gae_lambda=0.95,
    clip_epsilon=0.2,
    entropy_coef=1e-2,
    reward_scale=10.0,
    # No gradient clipping on either side: Brax clips the joint norm of policy and value
    # gradients, diffsim each one's, so any finite threshold would differ.
    max_grad_norm=float("inf"),
    init_std=0.69,  # Brax's tanh-normal: softplus(net output) + 0.001, ~0.69 at the start
)
_ES = dict(population_size=64, std=0.05, learning_rate=0.01)


def _ppo(num_envs: int, unroll_length: int, num_minibatches: int) -> dict:
    """`_PPO` with `num_envs` x `unroll_length` steps per update, in `num_minibatches`."""
    return dict(
        _PPO, num_envs=num_envs, unroll_length=unroll_length, num_minibatches=num_minibatches
    )


# The inverted_pendulum PPO pair: 1024 envs x 10 steps per update in minibatches of 32 envs
# (128 updates per 10,240 env steps), 4M env steps. Brax's PPO reached 900 in all 3 repeats
# of a Brax-only run at these settings (first at 2.0M, 2.0M and 3.1M steps) and fell back
# below it later in two of them. At 8 minibatches it had not passed 90 by 0.8M steps; with
# unrolls of 5 steps (minibatches of 64 or of 1024 envs) it ended below 500 after 2-3M.
# name: trainer, env, env-step budget, evaluations, solved-at return, settings
PAIRS = {
    name: dict(trainer=trainer, env=env, steps=steps, evals=evals, solve=solve, params=params)
    for name, trainer, env, steps, evals, solve, params in (
        ("ppo", "ppo", "inverted_pendulum", 4_096_000, 9, 900.0, _ppo(1024, 10, 32)),
        ("es", "es", "inverted_pendulum", 2_560_000, 11, 900.0, _ES),
        ("ppo-halfcheetah", "ppo", "halfcheetah", 409_600, 5, float("inf"), _ppo(256, 20, 8)),
        ("es-halfcheetah", "es", "halfcheetah", 512_000, 5, float("inf"), _ES),
    )
}

BRAX_HELPER = textwrap.dedent(
    r'''
    """Brax's side of studies/brax_comparison.py: one Brax trainer, one JSON line out."""
    import functools, json, sys, time
    import jax
    from brax import envs
    from flax import linen

    cfg = json.loads(sys.argv[1])
    p = cfg["params"]
    env = envs.get_environment(cfg["env"], backend="spring")
    evals = []

    def progress(step, metrics):
        evals.append(dict(
            step=int(step), time=time.time(),
            walltime=float(metrics.get("training/walltime", 0.0)),
            sps=float(metrics.get("training/sps", "nan")),
            eval_return=float(metrics["eval/episode_reward"]),
        ))
        print(f"[brax] {evals[-1]}", file=sys.stderr, flush=True)

    hidden = tuple(cfg["hidden"])
    common = dict(environment=env, num_timesteps=cfg["steps"], episode_length=1000,
                  num_evals=cfg["evals"], num_eval_envs=cfg["eval_episodes"],
                  deterministic_eval=True, normalize_observations=True,
                  progress_fn=progress, seed=cfg["seed"])
    if cfg["trainer"] == "ppo":
        from brax.training.agents.ppo import networks, train as ppo
        factory = functools.partial(
            networks.make_ppo_networks, policy_hidden_layer_sizes=hidden,
            value_hidden_layer_sizes=hidden, activation=linen.tanh)
        ppo.train(num_envs=p["num_envs"], unroll_length=p["unroll_length"],
                  batch_size=p["num_envs"] // p["num_minibatches"],
                  num_minibatches=p["num_minibatches"], num_updates_per_batch=p["num_epochs"],
                  learning_rate=p["learning_rate"], discounting=p["discount"],
                  gae_lambda=p["gae_lambda"], clipping_epsilon=p["clip_epsilon"],
                  entropy_cost=p["entropy_coef"], reward_scaling=p["reward_scale"],
                  max_grad_norm=p["max_grad_norm"],
                  network_factory=factory, **common)
    else:
        from brax.training.agents.es import networks, train as es
        factory = functools.partial(networks.make_es_networks, hidden_layer_sizes=hidden,
                                    activation=linen.tanh)
        es.train(population_size=p["population_size"] // 2, perturbation_std=p["std"],
                 learning_rate=p["learning_rate"],
                 fitness_shaping=es.FitnessShaping.CENTERED_RANK, network_factory=factory,
                 **common)
    print(json.dumps(dict(evals=evals, jax=jax.__version__)))
    '''
)


def diffsim_child(cfg: dict) -> None:
    """diffsim's side, in its own process (`--child`): train, print one JSON line."""
    import jax.random as jr

    import diffsim

    env = diffsim.make_env(cfg["env"], backend="spring", episode_length=1000)
    p = dict(cfg["params"])
    obs, act, hidden = env.observation_size, env.action_size, tuple(cfg["hidden"])
    if cfg["trainer"] == "ppo":
        init_std = p.pop("init_std")
        strategy = diffsim.PPO(**p, value_hidden=hidden, lr_decay=False, shuffle="envs")
        policy = lambda k: diffsim.GaussianPolicy(
            obs, act, hidden=hidden, init_std=init_std, state_dependent_std=True, key=k
        )
    else:
        strategy = diffsim.ES(**p, rollout_length=1000, fitness_shaping="centered_rank")
        policy = lambda k: diffsim.DeterministicPolicy(obs, act, hidden=hidden, key=k)
    with tempfile.TemporaryDirectory() as log_dir:
        diffsim.train(
            strategy,
            env,
            policy,
            key=jr.key(cfg["seed"]),
            total_steps=cfg["steps"],
            num_evals=cfg["evals"],
            num_eval_episodes=cfg["eval_episodes"],
            progress=False,
            log_dir=log_dir,
        )
        lines = [json.loads(x) for x in (Path(log_dir) / "log.jsonl").read_text().splitlines()]
    evals, simulated = [], 0.0
    for before, line in zip([None, *lines], lines, strict=False):
        if before is not None and "simulated_steps_mean" in line:  # ES: per generation
            chunk = line["env_steps"] - before["env_steps"]
            simulated += chunk * line["simulated_steps_mean"] / line["env_steps_mean"]
        else:
            simulated = line["env_steps"]
        evals.append(
            dict(
                step=line["env_steps"],
                time=line["time"],
                walltime=line["train_seconds"],
                simulated=simulated,
                eval_return=line["eval_return_mean"],
            )
        )
    print(json.dumps(dict(evals=evals, jax=diffsim.results.versions()["jax"])))


def ensure_brax_venv() -> Path:
    """Create `.venv-brax/` with the pinned jax/brax on first use; return its python."""
    python = BRAX_VENV / "bin" / "python"
    if (BRAX_VENV / ".installed").exists():
        return python
    print(f"setting up {BRAX_VENV}/ with {' '.join(BRAX_PINS)} (first use, a few minutes)")
    subprocess.run([sys.executable, "-m", "venv", str(BRAX_VENV)], check=True)
    pip = [str(python), "-m", "pip", "install", "--quiet"]
    subprocess.run([*pip, "--upgrade", "pip"], check=True)
    subprocess.run([*pip, *BRAX_PINS], check=True)
    subprocess.run([str(python), "-c", "import brax.training.agents.ppo.train"], check=True)
    (BRAX_VENV / ".installed").touch()
    return python


def run_side(side: str, pair: dict, seed: int) -> dict:
    """Launch one side's process and measure it; returns the run's row."""
    cfg = dict(pair, seed=seed, hidden=list(HIDDEN), eval_episodes=EVAL_EPISODES)
    cfg["solve"] = None  # the child does not need it
    if side == "brax":
        command = [str(ensure_brax_venv()), "-c", BRAX_HELPER, json.dumps(cfg)]
    else:
        command = [sys.executable, __file__, "--child", json.dumps(cfg)]
    env = {k: v for k, v in os.environ.items() if "CACHE" not in k}
    env.update(XLA_FLAGS=FLAGS, DIFFSIM_CACHE_DIR="0", PYTHONWARNINGS="ignore")
    launched = time.time()
    proc = subprocess.run(command, stdout=subprocess.PIPE, text=True, env=env, check=False)
    end_to_end = time.time() - launched
    if proc.returncode != 0:
        raise RuntimeError(f"{side} exited with {proc.returncode} (its stderr is above)")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    evals = out["evals"]
    steps = np.diff([e["step"] for e in evals])[SKIP:]
    seconds = np.diff([e["walltime"] for e in evals])[SKIP:]
    if side == "brax" and pair["trainer"] == "es":  # every member's full episode
        simulated = float(np.mean([e["sps"] for e in evals[1 + SKIP :]]))
    elif side == "brax":
        simulated = float(steps.sum() / seconds.sum())
    else:
        sim = np.diff([e["simulated"] for e in evals])[SKIP:]
        simulated = float(sim.sum() / seconds.sum())
    solved = [e["time"] - launched for e in evals if e["eval_return"] >= pair["solve"]]
    return dict(
        side=side,
        seed=seed,
        counted_steps_per_s=float(steps.sum() / seconds.sum()),
        simulated_steps_per_s=simulated,
        train_s=evals[-1]["walltime"],
        end_to_end_s=end_to_end,
        solve_s=solved[0] if solved else None,
        env_steps=evals[-1]["step"],
        final_return=evals[-1]["eval_return"],
        curve=[(e["step"], e["eval_return"]) for e in evals],
        jax=out["jax"],
    )


def _spread(values) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "never"
    mean = float(np.mean(values))
    digits = 0 if mean >= 100 else 1
    return f"{mean:,.{digits}f} [{min(values):,.{digits}f}, {max(values):,.{digits}f}]"


def table(rows: list[dict], pairs: list[str], repeats: int) -> tuple[str, dict]:
    """The text table and its JSON: per pair and side, means over repeats [min, max]."""
    head = (
        f"{'pair':<17}{'side':<9}{'n':>3}{'counted steps/s':>28}{'simulated steps/s':>28}"
        f"{'s to solve (solved)':>28}{'final return':>26}"
    )
    lines, summary = [head], {}
    for name in pairs:
        for side in ("brax", "diffsim"):
            runs = [r for r in rows if r["pair"] == name and r["side"] == side]
            if not runs:
                continue
            solved = [r["solve_s"] for r in runs]
            count = sum(s is not None for s in solved)
            solve = f"{_spread(solved)} ({count}/{len(runs)})"
            lines.append(
                f"{name:<17}{side:<9}{len(runs):>3}"
                f"{_spread([r['counted_steps_per_s'] for r in runs]):>28}"
                f"{_spread([r['simulated_steps_per_s'] for r in runs]):>28}"
                f"{solve if PAIRS[name]['solve'] < float('inf') else '-':>28}"
                f"{_spread([r['final_return'] for r in runs]):>26}"
            )
            summary[f"{name}/{side}"] = runs
        both = {
            side: [r for r in rows if r["pair"] == name and r["side"] == side]
            for side in ("brax", "diffsim")
        }
        if all(both.values()):
            ratios = [
                d["counted_steps_per_s"] / b["counted_steps_per_s"]
                for b, d in zip(both["brax"], both["diffsim"], strict=False)
            ]
            summary[f"{name}/ratio"] = ratios
            lines.append(
                f"{'':<17}diffsim / Brax counted steps/s, per repeat: "
                + ", ".join(f"{x:.2f}x" for x in ratios)
            )
    lines += [
        "",
        f"Means over repeats [min, max]; up to {repeats} repeats (seeds 0..) per side,"
        " sides alternating, never at the same time.",
        f"Both sides: XLA_FLAGS={FLAGS}, no persistent compilation cache, a fresh process.",
        "counted steps/s: env steps that feed updates per training second (evaluation"
        f" excluded), from evaluation {SKIP + 1} on;",
        "  simulated steps/s: env steps simulated per training second (ES: Brax simulates"
        " every member's 1000 steps, diffsim stops at the last episode end).",
        "s to solve: seconds from launching the process (imports, compiles, evaluations"
        " included) to the first evaluation whose mean return reaches the pair's target;",
        "  the mean over the repeats that reached it, with how many did.",
    ]
    return "\n".join(lines), summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", nargs="+", default=list(PAIRS), choices=list(PAIRS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sides", nargs="+", default=["brax", "diffsim"])
    parser.add_argument("--out", type=Path, default=Path("results"))
    parser.add_argument("--allow-dirty", action="store_true")
    parser.add_argument("--report-only", action="store_true", help="run nothing: the table")
    args = parser.parse_args()

    from diffsim.results import DirtyTreeError, require_clean
    from diffsim.study import provenance_header

    try:
        provenance = require_clean(allow_dirty=args.allow_dirty)
    except DirtyTreeError as error:
        parser.error(str(error))
    folder = args.out / "brax_comparison"
    folder.mkdir(parents=True, exist_ok=True)
    record = folder / "runs.json"
    rows = json.loads(record.read_text())["rows"] if record.exists() else []
    for name in [] if args.report_only else args.pairs:
        for seed in range(args.repeats):
            for side in args.sides:
                settings = dict(PAIRS[name], solve=str(PAIRS[name]["solve"]), flags=FLAGS)
                done = [
                    r
                    for r in rows
                    if (r["pair"], r["side"], r["seed"]) == (name, side, seed)
                    and r["settings"] == settings
                ]
                if done:
                    continue
                print(f"--- {name} {side} seed {seed}", flush=True)
                row = run_side(side, PAIRS[name], seed)
                row.update(pair=name, settings=settings, commit=provenance["commit"])
                rows = [r for r in rows if (r["pair"], r["side"], r["seed"]) != (name, side, seed)]
                rows.append(row)
                record.write_text(json.dumps(dict(rows=rows), indent=1) + "\n")
    command = " ".join(["python studies/brax_comparison.py", *sys.argv[1:]])
    text, summary = table(rows, args.pairs, args.repeats)
    measured = sorted({r["commit"][:10] for r in rows if r["pair"] in args.pairs})
    text = (
        provenance_header(provenance, command)
        + f"\n# runs measured at: {', '.join(measured)}\n\n"
        + text
    )
    (folder / "table.txt").write_text(text + "\n")
    (folder / "table.json").write_text(
        json.dumps(dict(command=command, provenance=provenance, pairs=PAIRS, rows=summary)) + "\n"
    )
    print(text)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        diffsim_child(json.loads(sys.argv[2]))
    else:
        main()
