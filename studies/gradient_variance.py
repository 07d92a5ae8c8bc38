"""Variance of first-order (analytic) vs zeroth-order (ES) policy gradients vs horizon.

    python studies/gradient_variance.py [--envs pendulum inverted_pendulum] [--samples 32]
    python studies/gradient_variance.py --env halfcheetah ant     # Brax bodies, with contact
    python studies/gradient_variance.py --env reacher --horizons 1 4 --samples 4  # a smoke run
    python studies/gradient_variance.py --env halfcheetah ant hopper --replot  # from the CSVs
    python studies/gradient_variance.py --env PendulumSwingup CheetahRun  # MJX (Playground)

For each env, a freshly initialised deterministic policy, and horizons H up to the
longest: the mean and the total variance across env samples of the analytic gradient of
the H-step return (autodiff through `diffsim.rollout`) and of an antithetic
Gaussian-smoothing estimate of it (`diffsim.diagnostics.gradient_stats`). Prints a table,
writes results/gradient_variance/<env>.csv and figures/gradient_variance.png.

Expected picture (Metz et al. 2021, Suh et al. 2022): on the smooth pendulum the
analytic gradient's variance grows fast with H; on inverted_pendulum (reward +1 per step
alive, episode ends when the pole falls) the analytic gradient is exactly zero: the
return changes only through the discrete episode end, which only the zeroth-order
estimate sees.

On the Brax bodies (`halfcheetah`, `ant`, `hopper`; `reacher` has no contacts) the question
is how the analytic gradient's variance grows with H through contact, against ES's, which
sets the window length of APG and SHAC: the horizon where first-order variance overtakes
zeroth-order variance (or the cosine between the two means collapses) bounds useful windows.
`num_finite` counts the samples in each row: a rollout whose gradient overflows is left out
and counted, not allowed to turn the row into NaN. The study differentiates
`max(horizons)` steps of `samples` envs at once (reverse mode keeps every step), so on ant
with the default horizons expect minutes and a few GB; `--samples`, `--horizons` and
`--hidden` trade precision for time.
"""

import argparse
import csv
import time
from pathlib import Path

import jax.random as jr
import matplotlib
import numpy as np

import diffsim

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HORIZONS = {
    "pendulum": [1, 2, 4, 8, 16, 32, 64, 128, 200],
    "reach": [1, 2, 4, 8, 16, 32, 64, 100],
    "ball": [12, 16, 24, 32, 48, 60],
    "inverted_pendulum": [1, 2, 4, 8, 16, 32, 64],
    "reacher": [1, 2, 4, 8, 16, 32, 64, 128],
    "halfcheetah": [1, 2, 4, 8, 16, 32, 64, 128],
    "hopper": [1, 2, 4, 8, 16, 32, 64, 128],
    "ant": [1, 2, 4, 8, 16, 32, 64, 128],
    # MuJoCo Playground's DM Control Suite on MJX (`pip install playground`): no contacts
    # (PendulumSwingup, CartpoleSwingup: a rail limit) and contacts (CheetahRun, one solver
    # iteration, Playground's setting).
    "PendulumSwingup": [1, 2, 4, 8, 16, 32, 64, 128],
    "CartpoleSwingup": [1, 2, 4, 8, 16, 32, 64, 128],
    "CheetahRun": [1, 2, 4, 8, 16, 32, 64, 128],
}
COLUMNS = [
    "horizon",
    "first_order_var",
    "zeroth_order_var",
    "first_order_mean_norm",
    "zeroth_order_mean_norm",
    "cosine",
    "bias",
    "num_finite",
]
FLOOR = 1e-12  # exact zeros drawn here on the log axis


def study(name: str, args) -> dict[str, np.ndarray]:
    env = diffsim.make_env(name)  # Brax bodies: the spring backend, Brax's rewards
    policy = diffsim.DeterministicPolicy(
        env.observation_size, env.action_size, hidden=tuple(args.hidden), key=jr.key(args.seed)
    )
    horizons = args.horizons or HORIZONS[name]
    tic = time.perf_counter()
    stats = diffsim.diagnostics.gradient_stats(
        env,
        policy,
        key=jr.key(args.seed + 1),
        horizons=horizons,
        num_samples=args.samples,
        num_perturbations=args.perturbations,
        sigma=args.sigma,
    )
    seconds = time.perf_counter() - tic
    table = {c: np.asarray(getattr(stats, "horizons" if c == "horizon" else c)) for c in COLUMNS}
    print(
        f"\n{name} ({env.backend} backend): {args.samples} env samples, {args.perturbations}"
        f" antithetic pairs, sigma {args.sigma}, policy {tuple(args.hidden)};"
        f" {seconds:.1f} s including compile"
    )
    print(" ".join(f"{c:>22}" for c in COLUMNS))
    for i in range(len(table["horizon"])):
        print(" ".join(f"{table[c][i]:>22.4g}" for c in COLUMNS))
    return table


def read_csv(path: Path) -> dict[str, np.ndarray]:
    with path.open() as f:
        rows = list(csv.DictReader(f))
    return {c: np.array([float(r[c]) for r in rows]) for c in COLUMNS}


def write_csv(path: Path, table: dict[str, np.ndarray]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(COLUMNS)
        for i in range(len(table["horizon"])):
            writer.writerow([f"{table[c][i]:.6g}" for c in COLUMNS])


def plot(tables: dict[str, dict[str, np.ndarray]], path: Path) -> None:
    fig, axes = plt.subplots(1, len(tables), figsize=(5 * len(tables), 4), squeeze=False)
    for ax, (name, t) in zip(axes[0], tables.items(), strict=True):
        for column, label, style in (
            ("first_order_var", "first order (analytic)", "o-"),
            ("zeroth_order_var", "zeroth order (ES, antithetic)", "s--"),
        ):
            ax.plot(t["horizon"], np.maximum(t[column], FLOOR), style, label=label)
        ax.set(
            xscale="log",
            yscale="log",
            xlabel="horizon H (env steps)",
            ylabel="total gradient variance",
            title=name,
        )
        if np.all(t["first_order_var"] <= FLOOR):
            ax.text(
                0.05,
                0.12,
                f"analytic gradient exactly 0 (drawn at {FLOOR:g})",
                transform=ax.transAxes,
                fontsize=8,
            )
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("Variance of the gradient of the H-step return across env samples")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    print(f"\nwrote {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--envs",
        "--env",
        nargs="+",
        default=["pendulum", "inverted_pendulum"],
        choices=sorted(HORIZONS),
    )
    parser.add_argument(
        "--horizons", nargs="+", type=int, default=None, help="default: per env (HORIZONS)"
    )
    parser.add_argument("--hidden", nargs="+", type=int, default=[32, 32])
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--perturbations", type=int, default=64)
    parser.add_argument("--sigma", type=float, default=0.02)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("results/gradient_variance"))
    parser.add_argument(
        "--replot", action="store_true", help="draw the figure from the CSVs in --out, no compute"
    )
    parser.add_argument(
        "--figure",
        type=Path,
        default=None,
        help="default figures/gradient_variance.png, or gradient_variance_<envs>.png for other"
        " envs than the default ones",
    )
    args = parser.parse_args()
    if args.figure is None:
        default = args.envs == parser.get_default("envs")
        suffix = "" if default else "_" + "_".join(args.envs)
        args.figure = Path(f"figures/gradient_variance{suffix}.png")
    tables = {}
    for name in args.envs:
        if args.replot:
            tables[name] = read_csv(args.out / f"{name}.csv")
            continue
        tables[name] = study(name, args)
        write_csv(args.out / f"{name}.csv", tables[name])
    plot(tables, args.figure)


if __name__ == "__main__":
    main()
