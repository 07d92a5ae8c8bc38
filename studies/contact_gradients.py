"""What explodes through contact, with and without each remedy: gradient norms of one
window on each contact env.

    python studies/contact_gradients.py [--envs halfcheetah ant WalkerWalk CartpoleBalance reach]
                                        [--windows 4] [--out results]

For each env, an untrained deterministic policy (seed 0) takes `--windows` consecutive APG
updates (16 envs x 32 steps, learning rate 1e-3, each window starting where the last one
ended) under each remedy of the shared first-order window:

- `plain`: no valve (`valve_max_norm=None`), no smoothing;
- `clip 1`: the per-step valve clips the cotangent through the env state to norm 1;
- `decay 0.9`: the valve multiplies it by 0.9 per step backward (D.Va's decay);
- `smooth 0.01`: Brax spring's contacts smoothed over 1 cm in the backward pass only
  (spring bodies only);
- `horizon 8`: the plain window, 8 steps long (16 x 8).

`CartpoleBalance` is measured plain only (`PLAIN_ONLY`): whether its gradient is finite.

    python studies/contact_gradients.py --train [--envs halfcheetah] [--seeds 2] [--out results]

`--train` measures the remedies over whole runs instead: SHAC as the contact study runs it
(64 envs x 32 steps, a stochastic actor, its published actor rate, remat), 300k env steps
(`TRAIN_STEPS`, the contact study's budget) on `--seeds` seeds under each of `TRAINED`
(no valve, the default valve, a tight clip, the decay, smoothing, an 8-step window); per remedy its final
and untrained mean returns per seed, its largest and median pre-clip gradient norm, its
largest per-step cotangent and its skipped updates, in
results/contact/remedies_training.txt. An exploration without a search: one rate, few
seeds, about 10 minutes per remedy on one CPU core.

Per env and remedy: the largest pre-clip gradient norm over the windows, the largest and
median per-step cotangent norm (the valve's probe measures it before any clip), and how
many windows had a non-finite gradient. Writes results/contact/gradients_by_remedy.txt
with its provenance, a row at a time (a crash loses no finished row). Brax bodies compile for about a minute per remedy on a CPU.
"""

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import equinox as eqx
import jax
import jax.random as jr
import numpy as np

import diffsim
from diffsim.results import DirtyTreeError, require_clean
from diffsim.study import gradient_health, provenance_header

sys.path.insert(0, str(Path(__file__).parent))
import contact  # noqa: E402  (SHAC's actor and evaluations as the contact study has them)

SPRING = ("halfcheetah", "ant", "hopper")
# Envs measured without remedies only: there the question is whether the gradient is
# finite at all (CartpoleBalance's non-finite gradients came from MJX's solver).
PLAIN_ONLY = ("CartpoleBalance",)
REMEDIES = {
    "plain": {},
    "clip 1": {"valve_max_norm": 1.0},
    "decay 0.9": {"valve_decay": 0.9},
    "smooth 0.01": {"contact_smoothing": 0.01},
    "horizon 8": {"horizon": 8},
}

TRAINED = {
    "none": {},
    "clip 100": {"valve_max_norm": 100.0},  # every first-order strategy's default
    "clip 1": {"valve_max_norm": 1.0},
    "decay 0.9": {"valve_decay": 0.9},
    "smooth 0.01": {"contact_smoothing": 0.01},
    "horizon 8": {"horizon": 8},  # 4x the updates, and the critic's fits, per env step
}
TRAIN_STEPS = 300_000


def settings(env, remedy: dict) -> dict:
    """A window strategy's fields for `remedy` on `env`: no valve (unless the remedy sets
    one), the remedy's `WindowOptions` fields in `options` (with `remat` on spring bodies),
    its other fields as they are."""
    names = {f.name for f in dataclasses.fields(diffsim.WindowOptions)}
    options = {k: v for k, v in remedy.items() if k in names}
    if env.name in SPRING:
        options["remat"] = True
    fields = {"valve_max_norm": None, **{k: v for k, v in remedy.items() if k not in names}}
    return {**fields, "options": diffsim.WindowOptions(**options)}


def measure(env, remedy: dict, windows: int) -> dict:
    """`windows` consecutive APG updates under `remedy` (`settings`); their gradient
    norms."""
    apg = diffsim.APG(num_envs=16, horizon=32, learning_rate=1e-3, **settings(env, remedy))
    strategy = apg.for_env(env).for_budget(10**6)
    policy = diffsim.DeterministicPolicy(env.observation_size, env.action_size, key=jr.key(0))
    state = strategy.init(env, policy, key=jr.key(1))
    step = eqx.filter_jit(strategy.step)
    rows = []
    for i in range(windows):
        state, metrics = step(env, state, key=jr.key(2 + i))
        rows.append({k: float(v) for k, v in metrics.items()})
    del step, state
    jax.clear_caches()  # one compiled window per remedy: free each (XLA's memory maps)
    norm = np.array([r["grad_norm"] for r in rows])
    return {
        "max_norm": float(np.nanmax(np.where(np.isfinite(norm), norm, np.nan), initial=0.0)),
        "step_max": max(r["grad_norm_step_max"] for r in rows),
        "step_median": float(np.median([r["grad_norm_step_median"] for r in rows])),
        "nonfinite": int(np.sum(~np.isfinite(norm)) + sum(r["skipped_updates"] for r in rows)),
    }


def train(env, remedy: dict, seeds: int) -> dict:
    """SHAC under `remedy` (`settings`) for `TRAIN_STEPS` on `seeds` seeds; how it ended
    and how its gradients went (`gradient_health`)."""
    shac = diffsim.SHAC(
        **{"num_envs": 64, "horizon": 32, "stochastic": True, **settings(env, remedy)}
    )
    run = diffsim.train_seeds(
        shac,
        env,
        lambda k: contact.stochastic(env, k),
        keys=jr.split(jr.key(0), seeds),
        total_steps=TRAIN_STEPS,
        num_evals=contact.EVALS,
        progress=False,
    )
    jax.clear_caches()
    returns = np.asarray(run.curve.eval_return).mean(-1)  # (seeds, evals)
    return {
        "untrained": returns[:, 0],
        "final": returns[:, -1],
        "seconds": run.config["train_seconds"],
        **gradient_health(run),
    }


def cases(names, remedies: dict, plain_only=()):
    """`(env name, env, label, remedy)` for each env of `names` (built when its first case is
    due) and each of `remedies` that applies to it: smoothing on spring bodies only, and
    nothing but the plain window on the envs of `plain_only`."""
    for name in names:
        env = diffsim.make_env(name)
        for label, remedy in remedies.items():
            if ("contact_smoothing" in remedy and name not in SPRING) or (
                name in plain_only and remedy
            ):
                continue
            yield name, env, label, remedy


def write_rows(out: str, name: str, head: str, rows, provenance, command) -> Path:
    """`head`, then each line of `rows`, printed and written with the provenance to
    `out/contact/name` as it lands (a crash later loses no finished row); that path."""
    path = Path(out) / "contact" / name
    lines = [head]
    path.parent.mkdir(parents=True, exist_ok=True)
    for line in rows:
        lines.append(line)
        print(line, flush=True)
        path.write_text(provenance_header(provenance, command) + "\n\n" + "\n".join(lines) + "\n")
    return path


def train_rows(args, provenance, command) -> None:
    """`--train`: one row per env and remedy of `TRAINED`, written as it lands."""
    head = (
        f"{'env':<13}{'remedy':<13}{'untrained':>11}{'final per seed':>22}{'max grad norm':>15}"
        f"{'median':>9}{'max step norm':>15}{'skipped':>9}{'train s':>9}"
    )

    def rows():
        for name, env, label, remedy in cases(args.envs, TRAINED):
            m = train(env, remedy, args.seeds)
            finals = " ".join(f"{x:.1f}" for x in m["final"])
            yield (
                f"{name:<13}{label:<13}{m['untrained'].mean():>11.1f}{finals:>22}"
                f"{m['grad_norm_max']:>15.3g}{m['grad_norm_median']:>9.3g}"
                f"{m.get('step_norm_max', np.nan):>15.3g}{m['skipped']:>9.1%}{m['seconds']:>9.0f}"
            )

    write_rows(args.out, "remedies_training.txt", head, rows(), provenance, command)


def measure_rows(args, provenance, command) -> None:
    """One row per env and remedy of `REMEDIES` (`measure`), written as it lands; then the
    whole table."""
    head = (
        f"{'env':<17}{'remedy':<13}{'max grad norm':>15}{'max step norm':>15}"
        f"{'median step norm':>18}{'non-finite':>12}{'seconds':>9}"
    )

    def rows():
        for name, env, label, remedy in cases(args.envs, REMEDIES, PLAIN_ONLY):
            tic = time.perf_counter()
            m = measure(env, remedy, args.windows)
            yield (
                f"{name:<17}{label:<13}{m['max_norm']:>15.3g}{m['step_max']:>15.3g}"
                f"{m['step_median']:>18.3g}{m['nonfinite']:>12}"
                f"{time.perf_counter() - tic:>9.0f}"
            )

    path = write_rows(args.out, "gradients_by_remedy.txt", head, rows(), provenance, command)
    print(path.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    envs = ["halfcheetah", "ant", "WalkerWalk", "CartpoleBalance", "reach"]
    parser.add_argument("--envs", nargs="+", default=None, help=f"default: {envs}")
    parser.add_argument("--windows", type=int, default=4)
    parser.add_argument("--train", action="store_true", help="whole SHAC runs per remedy")
    parser.add_argument("--seeds", type=int, default=2, help="with --train")
    parser.add_argument("--out", default="results")
    parser.add_argument("--allow-dirty", action="store_true")
    args = parser.parse_args()
    try:
        provenance = require_clean(allow_dirty=args.allow_dirty)
    except DirtyTreeError as error:
        parser.error(str(error))
    command = " ".join(["python", "studies/contact_gradients.py", *sys.argv[1:]])
    if args.train:
        args.envs = args.envs or ["halfcheetah"]
        return train_rows(args, provenance, command)
    args.envs = args.envs or envs
    measure_rows(args, provenance, command)


if __name__ == "__main__":
    main()
