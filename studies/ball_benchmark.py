"""The tutorial's first experiment: why JAX at all (falling balls, NumPy vs JAX).

    .venv/bin/python studies/ball_benchmark.py [--balls 4096 8192 16384 32768 65536]
                                               [--steps 100] [--repeats 31]

N balls with 2-D positions and velocities fall under gravity (-9.8 along y, dt 0.1,
semi-implicit Euler; arrays `(2, N)`) for 100 steps. The same simulation function is
timed with four array back ends:

- `numpy`: plain NumPy, a Python loop over steps;
- `jnp (no jit)`: `jax.numpy` with the same Python loop, every op dispatched eagerly;
- `jit (cpu)`: the whole 100-step simulation compiled with `jax.jit` on the CPU;
- `jit (gpu)`: the same on a GPU, only if `jax.devices("gpu")` finds one (otherwise the
  column is skipped with a note).

Each entry is the median wall-clock of `--repeats` calls after one warm-up call; for the
jitted columns the compile time (one per number of balls: the shapes change) is reported
apart. Everything is float32. Prints a table, plots time vs number of balls (log-log) to
figures/ball_benchmark.png and writes results/ball_benchmark.json. Takes well under a
minute (about 10 s on 2 CPU cores).
"""

import argparse
import json
import os
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

os.environ.setdefault("DIFFSIM_CACHE_DIR", "0")  # measure real compiles, not cache loads
import diffsim  # noqa: E402

GRAVITY = -9.8
DT = 0.1


def simulate(xp, pos, vel, steps: int):
    """`steps` steps of falling balls with array module `xp` (numpy or jax.numpy).

    `pos` and `vel` are `(2, N)`: x and y rows (structure of arrays, so that NumPy
    broadcasts along the long axis; an `(N, 2)` layout makes NumPy ~10x slower at 64k).
    """
    dv = xp.asarray([[0.0], [DT * GRAVITY]], dtype=pos.dtype)
    for _ in range(steps):
        vel = vel + dv
        pos = pos + DT * vel
    return pos, vel


def initial_state(num_balls: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    pos = rng.uniform([0.0, 10.0], [10.0, 100.0], size=(num_balls, 2)).T.astype(np.float32)
    vel = rng.normal(0.0, 1.0, size=(2, num_balls)).astype(np.float32)
    return np.ascontiguousarray(pos), vel


def median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        tic = time.perf_counter()
        fn()
        times.append(time.perf_counter() - tic)
    return float(np.median(times))


def gpu_device():
    """The first GPU, or None (with the reason) when JAX has none."""
    try:
        gpus = jax.devices("gpu")
    except RuntimeError as error:
        return None, f"no GPU backend ({str(error).splitlines()[0]})"
    if not gpus:
        return None, "jax.devices('gpu') is empty"
    return gpus[0], None


def time_backends(num_balls: int, steps: int, repeats: int, gpu) -> dict:
    pos, vel = initial_state(num_balls)
    row: dict = {"balls": num_balls}

    row["numpy_s"] = median_seconds(lambda: simulate(np, pos, vel, steps), repeats)

    jpos, jvel = jnp.asarray(pos), jnp.asarray(vel)
    row["jnp_s"] = median_seconds(
        lambda: jax.block_until_ready(simulate(jnp, jpos, jvel, steps)), repeats
    )

    devices = [("cpu", jax.devices("cpu")[0])] + ([("gpu", gpu)] if gpu is not None else [])
    for name, device in devices:
        dpos, dvel = jax.device_put(pos, device), jax.device_put(vel, device)
        fn = jax.jit(lambda p, v: simulate(jnp, p, v, steps))
        tic = time.perf_counter()
        compiled = fn.lower(dpos, dvel).compile()
        row[f"jit_{name}_compile_s"] = time.perf_counter() - tic
        row[f"jit_{name}_s"] = median_seconds(
            lambda c=compiled, p=dpos, v=dvel: jax.block_until_ready(c(p, v)), repeats
        )

    # All back ends compute the same thing (float32; summation order may differ slightly).
    ref = simulate(np, pos, vel, steps)[0]
    got = np.asarray(jax.jit(lambda p, v: simulate(jnp, p, v, steps))(jpos, jvel)[0])
    row["max_abs_diff_numpy_vs_jit"] = float(np.max(np.abs(ref - got)))
    return row


def plot(rows, columns, path: Path, steps: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), constrained_layout=True)
    balls = [r["balls"] for r in rows]
    for key, label, marker in columns:
        ax.plot(balls, [1e3 * r[key] for r in rows], marker=marker, lw=2, label=label)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(balls, [f"{b // 1024}k" for b in balls])
    ax.set_xlabel("number of balls")
    ax.set_ylabel(f"time per {steps}-step simulation (ms, median)")
    ax.set_title(f"Falling balls, {steps} steps: NumPy vs JAX ({jax.devices()[0].platform})")
    ax.grid(alpha=0.3, which="both")
    ax.legend(frameon=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=150)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--balls", type=int, nargs="+", default=[4096, 8192, 16384, 32768, 65536])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=31)
    parser.add_argument("--out", default="results/ball_benchmark.json")
    parser.add_argument("--figure", default="figures/ball_benchmark.png")
    args = parser.parse_args()

    gpu, gpu_note = gpu_device()
    rows = [time_backends(n, args.steps, args.repeats, gpu) for n in args.balls]

    columns = [
        ("numpy_s", "NumPy", "o"),
        ("jnp_s", "jax.numpy (no jit)", "s"),
        ("jit_cpu_s", "jax.jit (CPU)", "^"),
    ]
    if gpu is not None:
        columns.append(("jit_gpu_s", f"jax.jit (GPU: {gpu.device_kind})", "v"))

    header = f"{'balls':>7}" + "".join(f"{label + ' ms':>22}" for _, label, _ in columns)
    header += f"{'jit cpu compile s':>19}"
    if gpu is not None:
        header += f"{'jit gpu compile s':>19}"
    print(f"\nfalling balls, {args.steps} steps, median of {args.repeats} (float32)")
    print(header)
    for r in rows:
        line = f"{r['balls']:>7}" + "".join(f"{1e3 * r[key]:>22.2f}" for key, _, _ in columns)
        line += f"{r['jit_cpu_compile_s']:>19.3f}"
        if gpu is not None:
            line += f"{r['jit_gpu_compile_s']:>19.3f}"
        print(line)
    if gpu_note:
        print(f"jit (gpu): skipped, {gpu_note}")
    print()
    for r in rows:
        print(
            f"{r['balls']:>6} balls: jax.jit (CPU) is {r['numpy_s'] / r['jit_cpu_s']:.1f}x faster"
            f" than NumPy; jax.numpy without jit takes {r['jnp_s'] / r['numpy_s']:.1f}x NumPy's time"
        )

    meta = dict(
        steps=args.steps,
        dt=DT,
        gravity=GRAVITY,
        repeats=args.repeats,
        dtype="float32",
        gpu=None if gpu is None else str(gpu),
        gpu_note=gpu_note,
        devices=[str(d) for d in jax.devices()],
        cpu_count=os.cpu_count(),
        load_average=os.getloadavg(),
        versions=diffsim.results.versions(),
    )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(dict(meta=meta, rows=rows), indent=2))
    plot(rows, columns, Path(args.figure), args.steps)
    print(f"wrote {args.out} and {args.figure}")


if __name__ == "__main__":
    main()
