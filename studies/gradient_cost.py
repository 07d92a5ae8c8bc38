"""What a gradient costs: the differentiated window against the forward rollout, per env step.

    python studies/gradient_cost.py [--envs reacher halfcheetah] [--horizons 8 16 32]
                                    [--variants plain fastgrad] [--repeats 7]
    python studies/gradient_cost.py --report-only
    python studies/gradient_cost.py --profile --envs halfcheetah ant [--horizons 16]

For each (env, horizon, variant) cell, in ONE process and side by side, with the same batch
(`--num-envs`, default 64) and a deterministic 64x64 policy:

- `forward`: `diffsim.rollout` of `H` steps and the summed reward (the loss, no gradient);
- `value_and_grad`: `jax.value_and_grad` of that loss in the policy's parameters;
- `apg_step`: one jitted `APG.step` (`H` x `B` env steps);
- `shac_step`: one jitted `SHAC.step` (`H` x `B` env steps, critic fit included);
- `ppo_iteration`: one jitted `PPO.step` with `unroll_length=H` (a Gaussian 64x64 policy).

Every function is compiled first (compile seconds, XLA's temporary memory
`memory_analysis().temp_size_in_bytes`, and XLA's cost analysis: flops and bytes accessed,
numbers that do not depend on the machine's load), warmed up, then timed `--repeats` times
in interleaved rounds (each round times every function once, `jax.block_until_ready`), and
the median is kept. `ratio` is the function's time per env step over `forward`'s, measured
in the same rounds. Each row records `os.getloadavg()`.

Variants: `plain` is the env as `make_env` builds it (what a window steps with `remat=False`);
`remat` wraps it in the strategies' `Rematerialized` (`remat=True`: each physics substep
recomputed in the backward pass); `remat_step` checkpoints each whole env step instead (what
`remat=True` did until now).

Prints the table and writes it to results/gradient_cost/table.txt. Resumable: rows are
appended to results/gradient_cost/cells.csv after each cell, and a cell already there is
skipped (`--redo` measures it again). Each row names the commit that measured it; the
script refuses an uncommitted tree unless `--allow-dirty`, and writes the last run's
provenance (versions, machine, date) to provenance.json. `--profile` writes the op-class
breakdown of the backward pass (results/gradient_cost/profile_<env>_h<H>.csv) instead.
"""

import argparse
import collections
import csv
import json
import math
import os
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr

import diffsim
from diffsim.results import DirtyTreeError, require_clean
from diffsim.strategies._window.window import Rematerialized

OUT = Path("results/gradient_cost")
ENVS = ("reacher", "halfcheetah", "ant", "hopper", "reach", "pendulum", "ball")
KINDS = ("forward", "value_and_grad", "apg_step", "shac_step", "ppo_iteration")
VARIANTS: dict[str, Callable] = {
    "plain": lambda env: env,  # remat=False (the default)
    "remat": Rematerialized,  # remat=True: each physics substep under jax.checkpoint
    "remat_step": lambda env: Rematerialized(env, substeps=False),  # each whole env step
}
FIELDS = (
    "env",
    "horizon",
    "variant",
    "kind",
    "num_envs",
    "env_steps",
    "ms",
    "us_per_env_step",
    "ratio",
    "compile_s",
    "temp_mb",
    "gflops",
    "gbytes_accessed",
    "repeats",
    "loadavg_1m",
    "device",
    "jax",
    "commit",
)


class Compiled(eqx.Module):
    """A compiled function, its inputs, and what XLA says about it."""

    fn: Callable = eqx.field(static=True)
    args: tuple
    env_steps: int = eqx.field(static=True)
    compile_s: float = eqx.field(static=True)
    temp_mb: float = eqx.field(static=True)
    gflops: float = eqx.field(static=True)
    gbytes: float = eqx.field(static=True)
    carries: bool = eqx.field(static=True)  # the output's first element is the next state


def compile_one(fn: Callable, args: tuple, env_steps: int, *, carries: bool) -> Compiled:
    tic = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    compile_s = time.perf_counter() - tic
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost  # older jax returns a list
    return Compiled(
        fn=compiled,
        args=args,
        env_steps=env_steps,
        compile_s=compile_s,
        temp_mb=compiled.memory_analysis().temp_size_in_bytes / 2**20,
        gflops=float(cost.get("flops", 0.0)) / 1e9,
        gbytes=float(cost.get("bytes accessed", 0.0)) / 1e9,
        carries=carries,
    )


def window_loss(env, horizon: int):
    """The summed reward of an `H`-step deterministic window, a function of the policy."""

    def loss(params, static, env_state, key):
        policy = eqx.combine(params, static)
        start = jax.lax.stop_gradient(env_state)
        _, traj = diffsim.rollout(env, policy, start, key=key, length=horizon, deterministic=True)
        return jnp.sum(traj.reward)

    return loss


def build(env, horizon: int, num_envs: int, kinds) -> dict[str, Compiled]:
    """Compile every function of one cell on `env` (already wrapped by its variant)."""
    keys = jr.split(jr.key(0), 8)
    policy = diffsim.DeterministicPolicy(env.observation_size, env.action_size, key=keys[0])
    params, static = eqx.partition(policy, eqx.is_inexact_array)
    apg = diffsim.APG(num_envs=num_envs, horizon=horizon)
    env_state = jax.jit(lambda k: apg.init(env, policy, key=k))(keys[1]).env_state
    loss = window_loss(env, horizon)
    steps = num_envs * horizon
    out = {}
    for kind in kinds:
        if kind == "forward":
            fn = lambda p, s, k: loss(p, static, s, k)  # noqa: E731
            out[kind] = compile_one(fn, (params, env_state, keys[2]), steps, carries=False)
        elif kind == "value_and_grad":
            fn = lambda p, s, k: jax.value_and_grad(loss)(p, static, s, k)  # noqa: E731
            out[kind] = compile_one(fn, (params, env_state, keys[2]), steps, carries=False)
        else:
            strategy, acting = strategy_for(kind, env, horizon, num_envs, keys[3])
            state = jax.jit(lambda k, st=strategy, a=acting: st.init(env, a, key=k))(keys[4])
            fn = lambda s, k, st=strategy: st.step(env, s, key=k)  # noqa: E731
            steps_k = strategy.steps_per_iteration
            out[kind] = compile_one(fn, (state, keys[5]), steps_k, carries=True)
    return out


def strategy_for(kind: str, env, horizon: int, num_envs: int, key):
    if kind == "apg_step":
        policy = diffsim.DeterministicPolicy(env.observation_size, env.action_size, key=key)
        return diffsim.APG(num_envs=num_envs, horizon=horizon), policy
    if kind == "shac_step":
        policy = diffsim.DeterministicPolicy(env.observation_size, env.action_size, key=key)
        return diffsim.SHAC(num_envs=num_envs, horizon=horizon), policy
    policy = diffsim.GaussianPolicy(env.observation_size, env.action_size, key=key)
    ppo = diffsim.PPO(num_envs=num_envs, unroll_length=horizon).for_budget(10**7)
    return ppo, policy


def time_all(compiled: dict[str, Compiled], repeats: int) -> dict[str, float]:
    """Median seconds of each function over `repeats` interleaved rounds (after a warm-up)."""
    args = {kind: c.args for kind, c in compiled.items()}
    times: dict[str, list[float]] = {kind: [] for kind in compiled}
    for round_ in range(repeats + 1):
        for kind, c in compiled.items():
            key = jr.fold_in(jr.key(7), round_)
            call = (*args[kind][:-1], key)
            tic = time.perf_counter()
            out = jax.block_until_ready(c.fn(*call))
            elapsed = time.perf_counter() - tic
            if c.carries:  # a strategy step carries its state to the next call
                args[kind] = (out[0], key)
            if round_:
                times[kind].append(elapsed)
    return {kind: statistics.median(t) for kind, t in times.items()}


def measure_cell(name: str, horizon: int, variant: str, args, commit: str) -> list[dict]:
    env = VARIANTS[variant](diffsim.make_env(name))
    compiled = build(env, horizon, args.num_envs, args.kinds)
    seconds = time_all(compiled, args.repeats)
    forward = seconds["forward"] / compiled["forward"].env_steps if "forward" in seconds else None
    rows = []
    for kind, c in compiled.items():
        per_step = seconds[kind] / c.env_steps
        rows.append(
            {
                "env": name,
                "horizon": horizon,
                "variant": variant,
                "kind": kind,
                "num_envs": args.num_envs,
                "env_steps": c.env_steps,
                "ms": round(1e3 * seconds[kind], 4),
                "us_per_env_step": round(1e6 * per_step, 4),
                "ratio": round(per_step / forward, 3) if forward else "",
                "compile_s": round(c.compile_s, 2),
                "temp_mb": round(c.temp_mb, 3),
                "gflops": round(c.gflops, 5),
                "gbytes_accessed": round(c.gbytes, 5),
                "repeats": args.repeats,
                "loadavg_1m": round(os.getloadavg()[0], 2),
                "device": jax.devices()[0].device_kind or platform.processor(),
                "jax": jax.__version__,
                "commit": commit,
            }
        )
    return rows


def read_rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with path.open() as f:
        return list(csv.DictReader(f))


def append_rows(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists()
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        if new:
            writer.writeheader()
        writer.writerows(rows)


def format_table(rows: list[dict]) -> str:
    """One line per cell: forward env steps/s, each function's time per env step over the
    forward's, and the temporary memory of `value_and_grad`."""
    cells: dict[tuple, dict[str, dict]] = {}
    for row in rows:
        cells.setdefault((row["env"], int(row["horizon"]), row["variant"]), {})[row["kind"]] = row
    head = f"{'env':12} {'H':>3} {'variant':10} {'fwd steps/s':>11}"
    lines = [head + "".join(f" {k:>14}" for k in KINDS[1:]) + f" {'vg temp MB':>10}"]
    for (env, horizon, variant), kinds in sorted(cells.items()):
        fwd = kinds.get("forward")
        line = f"{env:12} {horizon:3d} {variant:10}"
        line += f" {1e6 / float(fwd['us_per_env_step']):11,.0f}" if fwd else f" {'':>11}"
        for kind in KINDS[1:]:
            ratio = kinds.get(kind, {}).get("ratio", "")
            line += f" {float(ratio):13.2f}x" if ratio != "" else f" {'':>14}"
        vg = kinds.get("value_and_grad")
        line += f" {float(vg['temp_mb']):10.1f}" if vg else f" {'':>10}"
        lines.append(line.rstrip())
    return "\n".join(lines)


# --------------------------------------------------------------------------- --profile
# XLA's CPU runtime launches one kernel ("thunk") per unfused HLO op or fusion; with 64
# small envs, each costs about a microsecond whatever it computes, so the count of kernel
# launches per call (loop bodies times their trip counts) and the bytes they write explain
# most of a call's time. Read from the optimized HLO (`compiled.as_text()`).

_BYTES = {"f32": 4, "s32": 4, "u32": 4, "pred": 1, "f64": 8, "s64": 8, "u64": 8, "s8": 1, "u8": 1}
_HEAD = re.compile(r"^(ENTRY )?%(\S+) \(.*\) -> .* \{$")
_INST = re.compile(r"^\s*(?:ROOT )?%(\S+) = (.*?) ([a-z][a-z0-9\-]*)\((.*)$")
_SHAPE = re.compile(r"\b(f32|s32|u32|pred|f64|s64|u64|s8|u8)\[([0-9,]*)\]")
_FREE = {"parameter", "constant", "tuple", "get-tuple-element", "bitcast", "after-all"}
_CLASSES = (
    "scatter",
    "gather",
    "dynamic-update-slice",
    "dynamic-slice",
    "dot",
    "sort",
    "reduce",
    "concatenate",
    "pad",
    "transpose",
    "copy",
)


def _nbytes(type_text: str) -> int:
    total = 0
    for dtype, dims in _SHAPE.findall(type_text):
        total += _BYTES[dtype] * math.prod(int(d) for d in dims.split(",") if d)
    return total


def parse_hlo(text: str) -> tuple[dict[str, list[tuple[str, str, str, str]]], str]:
    """Computations of an HLO module: name -> [(instruction, type, opcode, rest)], entry."""
    comps: dict[str, list] = {}
    entry, current = "", None
    for line in text.splitlines():
        head = _HEAD.match(line)
        if head:
            current = head.group(2)
            comps[current] = []
            entry = current if head.group(1) else entry
        elif line.startswith("}"):
            current = None
        elif current is not None and (inst := _INST.match(line)):
            comps[current].append(inst.groups())
    return comps, entry


def _ops(comps, name: str) -> set[str]:
    out = set()
    for _, _, op, rest in comps.get(name, []):
        out.add(op)
        if op == "fusion":
            out |= _ops(comps, re.search(r"calls=%([\w.\-]+)", rest).group(1))
    return out


def _kernel_class(comps, op: str, rest: str) -> str:
    """A kernel's class: its op, or for a fusion the costliest op class it contains."""
    fused = op == "fusion"
    ops = _ops(comps, re.search(r"calls=%([\w.\-]+)", rest).group(1)) if fused else {op}
    for name in _CLASSES:
        if name in ops:
            return name
    return "elementwise" if fused else op


def _written(comps, comp: str, op: str, rest: str, type_text: str) -> int:
    """Bytes a kernel writes: its output, or the update of an in-place dynamic-update-slice."""
    if "dynamic-update-slice" in (op, _kernel_class(comps, op, rest)):
        inner = re.search(r"calls=%([\w.\-]+)", rest).group(1) if op == "fusion" else comp
        types = {n: t for n, t, _, _ in comps[inner]}
        for _, _, o, r in comps[inner]:
            if o == "dynamic-update-slice":
                return _nbytes(types.get(re.findall(r"%([\w.\-]+)", r)[1], ""))
    return _nbytes(type_text)


def kernel_profile(text: str) -> dict[tuple[str, str], list[int]]:
    """(class, "fwd"|"bwd") -> [kernel launches per call, bytes written per call], with
    while-loop bodies counted their known trip count of times. "bwd" kernels are those
    JAX's metadata names as transposes (reverse mode)."""
    comps, entry = parse_hlo(text)
    acc: dict[tuple[str, str], list[int]] = collections.defaultdict(lambda: [0, 0])

    def walk(comp: str, count: int) -> None:
        for _, type_text, op, rest in comps[comp]:
            if op in _FREE:
                continue
            if op == "while":
                trips = re.search(r'"known_trip_count":\{"n":"(\d+)"', rest)
                n = int(trips.group(1)) if trips else 1
                walk(re.search(r"body=%([\w.\-]+)", rest).group(1), count * n)
                walk(re.search(r"condition=%([\w.\-]+)", rest).group(1), count * (n + 1))
                continue
            if op in ("call", "conditional"):
                for called in re.findall(r"%([\w.\-]+)", rest.split("),", 1)[-1]):
                    if called in comps:
                        walk(called, count)
                continue
            name = re.search(r'op_name="([^"]*)"', rest)
            direction = "bwd" if name and "transpose(" in name.group(1) else "fwd"
            entry_ = acc[(_kernel_class(comps, op, rest), direction)]
            entry_[0] += count
            entry_[1] += count * _written(comps, comp, op, rest, type_text)

    walk(entry, 1)
    return dict(acc)


def profile(args) -> None:
    """Kernel launches and bytes written per op class, forward against value_and_grad."""
    for name in args.envs:
        for horizon in args.horizons:
            for variant in args.variants:
                env = VARIANTS[variant](diffsim.make_env(name))
                compiled = build(env, horizon, args.num_envs, ["forward", "value_and_grad"])
                rows = []
                for kind, c in compiled.items():
                    text = c.fn.as_text()
                    (OUT / "hlo").mkdir(parents=True, exist_ok=True)
                    for (cls, direction), (launches, written) in kernel_profile(text).items():
                        rows.append(
                            {
                                "env": name,
                                "horizon": horizon,
                                "variant": variant,
                                "kind": kind,
                                "class": cls,
                                "direction": direction,
                                "launches": launches,
                                "mb_written": round(written / 2**20, 3),
                                "env_steps": c.env_steps,
                            }
                        )
                path = OUT / f"profile_{name}_h{horizon}_{variant}.csv"
                with path.open("w", newline="") as f:
                    writer = csv.DictWriter(f, fieldnames=list(rows[0]))
                    writer.writeheader()
                    writer.writerows(sorted(rows, key=lambda r: -r["launches"]))
                print_profile(rows)
                print(f"wrote {path}")


def print_profile(rows: list[dict]) -> None:
    totals = collections.Counter()
    for row in rows:
        totals[row["kind"]] += row["launches"]
    fwd = totals["forward"]
    print(
        "launches per call: " + ", ".join(f"{k} {v:,} ({v / fwd:.2f}x)" for k, v in totals.items())
    )
    for row in sorted(rows, key=lambda r: -r["launches"])[:20]:
        print(
            f"  {row['kind']:15} {row['class']:21} {row['direction']} {row['launches']:9,}"
            f" launches {row['mb_written']:9.2f} MB"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--envs", nargs="+", default=list(ENVS))
    parser.add_argument("--horizons", nargs="+", type=int, default=[8, 16, 32])
    parser.add_argument("--variants", nargs="+", default=["plain"], choices=list(VARIANTS))
    parser.add_argument("--kinds", nargs="+", default=list(KINDS), choices=list(KINDS))
    parser.add_argument("--num-envs", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", type=Path, default=OUT / "cells.csv")
    parser.add_argument("--redo", action="store_true", help="measure cells already in --out")
    parser.add_argument("--report-only", action="store_true")
    parser.add_argument("--profile", action="store_true", help="op-class breakdown instead")
    parser.add_argument("--allow-dirty", action="store_true", help="measure uncommitted code")
    args = parser.parse_args()
    if "forward" not in args.kinds:
        args.kinds = ["forward", *args.kinds]
    if args.profile:
        profile(args)
        return
    if not args.report_only:
        try:  # the commit that measured each row, on a clean tree unless --allow-dirty
            prov = require_clean(allow_dirty=args.allow_dirty)
        except DirtyTreeError as error:
            sys.exit(str(error))
        commit = f"{prov['commit'][:10]}{'-dirty' if prov['dirty'] else ''}"
        (args.out.parent / "provenance.json").write_text(json.dumps(prov, indent=1) + "\n")
        for name in args.envs:
            for horizon in args.horizons:
                for variant in args.variants:
                    done = {
                        (r["env"], int(r["horizon"]), r["variant"]) for r in read_rows(args.out)
                    }
                    if (name, horizon, variant) in done and not args.redo:
                        print(f"skip {name} H={horizon} {variant}: already in {args.out}")
                        continue
                    tic = time.perf_counter()
                    rows = measure_cell(name, horizon, variant, args, commit)
                    append_rows(args.out, rows)
                    print(f"{name} H={horizon} {variant}: {time.perf_counter() - tic:.0f} s")
                    print(format_table(rows))
    table = format_table(read_rows(args.out))
    print(table)
    (args.out.parent / "table.txt").write_text(table + "\n")


if __name__ == "__main__":
    main()
