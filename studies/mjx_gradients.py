"""Gradients through MJX: their accuracy, the one-iteration solver's error, and their cost.

    pip install -e '.[playground]'
    python studies/mjx_gradients.py [--envs PendulumSwingup CartpoleSwingup CheetahRun ...]
                                    [--repeats 7] [--out results] [--allow-dirty]

For each MuJoCo Playground DM Control Suite env (MJX's JAX implementation, the model's own
solver iterations, which diffsim runs as a bounded scan: `PlaygroundEnv`), in one process:

- `fd_rel_err`: float64; a 10-step window from a reset under fixed actions, and as the
  objective a fixed random linear function of the observations plus the reward, summed
  over the window. Reverse mode through the step against central differences (eps 1e-6)
  along 3 random directions in action space: the largest relative error.
- `bounded_obs_err`: float32; the same 200 random actions from the same start through
  MJX's own `while_loop` and through the bounded scan: the largest observation difference,
  relative to the observations' largest magnitude (the two should agree to rounding).
- `one_iter_obs_err`, `one_iter_return_err`: the same with one solver iteration
  (`solver_iterations=1`) against the model's own count, and the difference of the summed
  rewards (relative to the model's, or absolute where that is below 1).
- cost (`studies/gradient_cost.py`'s functions and clock: 64 envs x 16 steps, a
  deterministic 64x64 policy, medians of `--repeats` interleaved rounds): forward env
  steps/s with MJX's own `while_loop` and with the bounded scan, and `value_and_grad` over
  forward per env step with the bounded scan, at the model's iterations and at one. The
  window's loss is its summed reward: PendulumSwingup's is an indicator, flat almost
  everywhere, so JAX prunes that gradient and its ratio is not a gradient's cost.

Prints the table and writes results/mjx_gradients/table.{txt,json}, rewritten after each
env: the header has this run's provenance, each row the commit that measured it, and rows
of envs not measured in this run are kept from the saved table.
Refuses an uncommitted tree unless --allow-dirty.
"""

import argparse
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import jax.random as jr

import diffsim
from diffsim.results import DirtyTreeError, require_clean
from diffsim.study import provenance_header

sys.path.insert(0, str(Path(__file__).parent))
import gradient_cost  # noqa: E402  (the compiled functions and their clock)

ENVS = ("PendulumSwingup", "CartpoleSwingup", "CheetahRun", "WalkerWalk")
FD_STEPS, SOLVER_STEPS, NUM_ENVS, HORIZON = 10, 200, 64, 16


def _observed(env, key, actions):
    """Observations and rewards of `actions` from `env.reset(key)`, nothing reset on the way."""

    def body(state, action):
        state = env.step(state, action, ())
        return state, (state.obs, state.reward)

    return jax.lax.scan(body, env.reset(key), actions)[1]


def finite_differences(name: str) -> float:
    """The largest relative error of reverse mode against central differences (float64)."""
    with jax.enable_x64(True):
        env = diffsim.make_env(name)
        keys = jr.split(jr.key(0), 3)
        weights = jr.normal(keys[0], (env.observation_size,), jnp.float64)
        actions = 0.5 * jnp.sin(jnp.arange(FD_STEPS, dtype=jnp.float64))[:, None]
        actions = jnp.broadcast_to(actions, (FD_STEPS, env.action_size))

        def objective(a):
            obs, reward = _observed(env, keys[1], a)
            return jnp.sum(obs @ weights) + jnp.sum(reward)

        value, grad = jax.jit(objective), jax.jit(jax.grad(objective))(actions)
        errors, eps = [], 1e-6
        for direction in jr.normal(keys[2], (3, *actions.shape), jnp.float64):
            fd = (value(actions + eps * direction) - value(actions - eps * direction)) / (2 * eps)
            errors.append(abs(float(jnp.vdot(grad, direction) - fd)) / max(abs(float(fd)), 1e-12))
        return max(errors)


def variants(name: str) -> dict:
    """The env three ways: the bounded scan at the model's iterations (`"bounded"`), MJX's
    own loop (`"loop"`), and the bounded scan at one iteration (`"one"`)."""
    return {
        "bounded": diffsim.make_env(name),
        "loop": diffsim.make_env(name, bounded_solver=False),
        "one": diffsim.make_env(name, solver_iterations=1),
    }


def solver_errors(envs: dict) -> dict[str, float]:
    """Over 200 random actions: MJX's own loop against the bounded scan, and one solver
    iteration against the model's own count (observation differences over the largest
    observation magnitude, and the summed rewards' relative difference)."""
    own, loop, one = envs["bounded"], envs["loop"], envs["one"]
    actions = jr.uniform(jr.key(1), (SOLVER_STEPS, own.action_size), minval=-1.0, maxval=1.0)
    run = jax.jit(_observed, static_argnums=0)
    (obs, rew), (obs_loop, _), (obs_one, rew_one) = (
        run(e, jr.key(2), actions) for e in (own, loop, one)
    )
    scale = jnp.max(jnp.abs(obs))
    return {
        "bounded_obs_err": float(jnp.max(jnp.abs(obs_loop - obs)) / scale),
        "one_iter_obs_err": float(jnp.max(jnp.abs(obs_one - obs)) / scale),
        "one_iter_return_err": float(abs(rew_one.sum() - rew.sum()) / max(abs(rew.sum()), 1.0)),
    }


def cost(envs: dict, repeats: int) -> dict[str, float]:
    """Forward env steps/s (MJX's loop, the bounded scan) and value_and_grad / forward."""
    compiled = {}
    for label, env in envs.items():
        kinds = ("forward",) if label == "loop" else ("forward", "value_and_grad")
        for kind, c in gradient_cost.build(env, HORIZON, NUM_ENVS, kinds).items():
            compiled[f"{label}/{kind}"] = c
    seconds = gradient_cost.time_all(compiled, repeats)
    rate = lambda k: compiled[k].env_steps / seconds[k]  # noqa: E731
    return {
        "iterations": int(envs["bounded"].unwrapped.mjx_model.opt.iterations),
        "loop_steps_per_s": rate("loop/forward"),
        "bounded_steps_per_s": rate("bounded/forward"),
        "vg_over_forward": seconds["bounded/value_and_grad"] / seconds["bounded/forward"],
        "one_iter_vg_over_forward": seconds["one/value_and_grad"] / seconds["one/forward"],
        "compile_s": sum(c.compile_s for c in compiled.values()),
    }


def format_table(rows: list[dict]) -> str:
    head = (
        f"{'env':<17}{'iters':>6}{'fd rel. err':>13}{'bounded obs err':>17}"
        f"{'1-iter obs err':>16}{'1-iter ret err':>16}"
        f"{'loop steps/s':>14}{'bounded steps/s':>17}{'vg/fwd':>8}{'vg/fwd 1-iter':>15}"
        f"{'commit':>9}"
    )
    lines = [head]
    for r in rows:
        lines.append(
            f"{r['env']:<17}{r['iterations']:>6}{r['fd_rel_err']:>13.1e}{r['bounded_obs_err']:>17.1e}"
            f"{r['one_iter_obs_err']:>16.1e}{r['one_iter_return_err']:>16.1e}"
            f"{r['loop_steps_per_s']:>14,.0f}{r['bounded_steps_per_s']:>17,.0f}"
            f"{r['vg_over_forward']:>7.2f}x{r['one_iter_vg_over_forward']:>14.2f}x"
            f"{r['commit']:>9}"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--envs", nargs="+", default=list(ENVS))
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", type=Path, default=Path("results"))
    parser.add_argument("--allow-dirty", action="store_true")
    args = parser.parse_args()
    unknown = sorted(set(args.envs) - set(diffsim.envs.playground_names()))
    if unknown:
        parser.error(f"not Playground DM Control Suite envs: {unknown}")
    try:
        provenance = require_clean(allow_dirty=args.allow_dirty)
    except DirtyTreeError as error:
        parser.error(str(error))
    command = " ".join(["python studies/mjx_gradients.py", *sys.argv[1:]])
    folder = args.out / "mjx_gradients"
    folder.mkdir(parents=True, exist_ok=True)
    # Rows of other envs measured earlier are kept, each with its own commit and date; the
    # table is rewritten after each env, so a cut run keeps what it measured.
    saved = folder / "table.json"
    rows = json.loads(saved.read_text())["rows"] if saved.exists() else []
    for name in args.envs:
        envs = variants(name)
        row = {"env": name, "fd_rel_err": finite_differences(name)} | solver_errors(envs)
        row |= cost(envs, args.repeats)
        row |= {"commit": provenance["commit"][:7], "date": provenance["date"][:10]}
        rows = [r for r in rows if r["env"] != name] + [row]
        print(format_table(rows[-1:]).splitlines()[-1], flush=True)
        text = provenance_header(provenance, command) + "\n\n" + format_table(rows)
        (folder / "table.txt").write_text(text + "\n")
        record = dict(command=command, provenance=provenance, rows=rows)
        saved.write_text(json.dumps(record, indent=1) + "\n")
    print((folder / "table.txt").read_text())


if __name__ == "__main__":
    main()
