"""What float64 and remat cost: one APG step on a Brax env, time and compiled memory.

    python studies/window_cost.py [--env reacher] [--num-envs 64] [--repeats 10]

Rows: float32 against float64 (horizon 32), and remat off against on (horizons 64 and 128).
Time: the median of `--repeats` calls of one jitted `APG.step` after a warm-up call.
Memory: `temp_size_in_bytes` of XLA's `memory_analysis()` of the compiled step (the
temporaries, which hold what reverse mode keeps of the window). float64 rows run under
`jax.enable_x64(True)` with an env built without it (a float32 Brax system, cast by the
window). Writes
results/window_cost/<env>.csv.
"""

import argparse
import csv
import statistics
import time
from pathlib import Path

import jax
import jax.random as jr

import diffsim


def measure(env, strategy, policy, repeats: int) -> dict[str, float]:
    state = jax.jit(lambda k: strategy.init(env, policy, key=k))(jr.key(0))
    step = jax.jit(lambda s, k: strategy.step(env, s, key=k))
    tic = time.perf_counter()
    compiled = step.lower(state, jr.key(1)).compile()
    compile_seconds = time.perf_counter() - tic
    temp = compiled.memory_analysis().temp_size_in_bytes
    state, _ = jax.block_until_ready(compiled(state, jr.key(1)))  # warm-up
    times = []
    for i in range(repeats):
        tic = time.perf_counter()
        state, metrics = jax.block_until_ready(compiled(state, jr.key(2 + i)))
        times.append(time.perf_counter() - tic)
    return {
        "ms_per_step": 1e3 * statistics.median(times),
        "temp_mb": temp / 2**20,
        "compile_s": compile_seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--env", default="reacher")
    parser.add_argument("--num-envs", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", type=Path, default=Path("results/window_cost"))
    args = parser.parse_args()
    env = diffsim.make_env(args.env)  # built without x64: a float32 Brax system
    policy = diffsim.DeterministicPolicy(env.observation_size, env.action_size, key=jr.key(0))
    rows = []
    for horizon, float64, remat in (
        (32, False, False),
        (32, True, False),
        (64, False, False),
        (64, False, True),
        (128, False, False),
        (128, False, True),
    ):
        apg = diffsim.APG(num_envs=args.num_envs, horizon=horizon, float64=float64, remat=remat)
        row = {"horizon": horizon, "float64": float64, "remat": remat}
        with jax.enable_x64(float64):  # float32 rows run entirely in float32
            apg.check(env, policy)
            row.update(measure(env, apg, policy, args.repeats))
        rows.append(row)
        print(
            f"h={horizon:4d} float64={float64!s:5} remat={remat!s:5}"
            f" {row['ms_per_step']:8.1f} ms/step {row['temp_mb']:8.1f} MB temp"
            f" (compile {row['compile_s']:.0f} s)",
            flush=True,
        )
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{args.env}.csv"
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
