"""A study's tables: final scores against the untrained policy and the references, steps
and seconds to each reference's final score on both sides, and the tuning and its cost,
under a provenance header (`diffsim.results.provenance`)."""

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from . import _ratios
from .results import Run
from .stats import (
    aggregate,
    aggregate_ci,
    aggregate_name,
    probability_of_improvement,
)

DID_NOT_LEARN = "did not learn"


def _scores(run: Run, point: int) -> np.ndarray:
    """Each seed's mean return over the episodes of evaluation `point`."""
    return np.asarray(run.curve.eval_return)[:, point].mean(-1)


def untrained_scores(run: Run) -> np.ndarray:
    """Each seed's mean return before training: the curve at env step 0, `(seeds,)`.

    **Example:**

    ```python
    untrained_scores(runs["reach", "PPO"])   # e.g. array([-104.1, -98.7, ...])
    ```
    """
    steps = np.asarray(run.curve.env_steps)[:, 0]
    if np.any(steps != 0):
        raise ValueError(f"the run's first evaluation is at env step {steps.max()}, not 0")
    return _scores(run, 0)


def summary(runs: dict[tuple[str, str], Run], references: Sequence[str] = ("PPO",)) -> dict:
    """The numbers of a study's tables, as plain JSON.

    - `cells`: one row per cell: `seeds`, `stat` (`"IQM"`, or `"mean"` below 5 seeds),
      `final` with its 95% bootstrap CI (`low`, `high`), `untrained` (the same statistic
      at env step 0), `p_over_untrained` (P(final > untrained) over pairs of seeds),
      `learned` (the CI's lower end lies above `untrained`), `p_over_<REF>` for each
      reference on the env (None where the budgets differ by more than 5%), seconds, and
      `tuning` (None for an untuned cell).
    - `untrained`: one row per env: the statistic over every cell's seeds at env step 0.
    - `crossings`: per env, reference and other cell: a common target below both finals
      and both sides' crossings of it, with the steps and seconds ratios (reference /
      cell) and their bootstrap CIs over seeds on both sides (`diffsim._ratios`); `target`
      None where a side did not learn.

    **Example:**

    ```python
    table = summary(load_study("results/compare"), references=("PPO",))
    print(format_summary(table, provenance=diffsim.results.provenance()))
    ```
    """
    cells = [_cell_row(env, label, run, runs, references) for (env, label), run in runs.items()]
    untrained = []
    for env in dict.fromkeys(env for env, _ in runs):
        pooled = np.concatenate([untrained_scores(r) for (e, _), r in runs.items() if e == env])
        mid, low, high = aggregate_ci(pooled)
        untrained.append(
            {
                "env": env,
                "seeds": len(pooled),
                "stat": aggregate_name(len(pooled)),
                "score": float(mid),
                "low": float(low),
                "high": float(high),
            }
        )
    crossings = [
        row
        for ref in references
        for env in dict.fromkeys(env for env, _ in runs)
        if (env, ref) in runs
        for row in _crossings(env, ref, runs)
    ]
    trained_at: dict[str, int] = {}
    for run in runs.values():
        state = _state(run.config.get("study", {}).get("provenance"))
        trained_at[state] = trained_at.get(state, 0) + 1
    return {
        "references": list(references),
        "cells": cells,
        "untrained": untrained,
        "crossings": crossings,
        "trained_at": trained_at,
    }


def _state(provenance: dict | None) -> str:
    """`"<short commit>"`, with `" dirty"` for a dirty tree, or `"unknown"`."""
    if not provenance or provenance.get("commit") is None:
        return "unknown"
    return provenance["commit"][:10] + (" dirty" if provenance.get("dirty") else "")


def _cell_row(env: str, label: str, run: Run, runs: dict, references: Sequence[str]) -> dict:
    final, start = _scores(run, -1), untrained_scores(run)
    mid, low, high = aggregate_ci(final)
    untrained = float(aggregate(start))
    row: dict[str, Any] = {
        "env": env,
        "strategy": label,
        "env_steps": run.config["total_steps"],
        "seeds": len(final),
        "stat": aggregate_name(len(final)),
        "final": float(mid),
        "low": float(low),
        "high": float(high),
        "untrained": untrained,
        "p_over_untrained": probability_of_improvement(final, start),
        "learned": bool(low > untrained),
    }
    for ref in references:
        if (env, ref) in runs:  # final scores compare only at the same budget (else None)
            other = runs[env, ref]
            same = _same_budget(run.config["total_steps"], other.config["total_steps"])
            p = probability_of_improvement(final, _scores(other, -1)) if same else None
            row[f"p_over_{ref}"] = p
    for k in ("train", "eval"):
        row[f"{k}_s"] = run.config.get(f"{k}_seconds", float("nan"))
    row["compile_s"] = _ratios.compile_seconds(run)
    row["load"] = run.config.get("study", {}).get("load")  # None: trained before it was kept
    tuning = run.config.get("study", {}).get("tuning")
    row["tuning"] = tuning and {
        "configs": len(tuning["configs"]),
        "tuning_seeds": tuning["tuning_seeds"],
        "stat": tuning["stat"],
        "chosen": tuning["chosen"],
        "at_edge": _at_edge(tuning),
        "widened": len(tuning.get("widened", [])),
        "scores": tuning["scores"],
        "seconds": sum(tuning["seconds"].values()),
    }
    return row


def _at_edge(tuning: dict) -> list[str]:
    """The fields whose chosen value is the smallest or largest of all tried (widenings
    included): the search did not bracket the best."""
    edge = []
    for k, v in tuning["chosen"].items():
        tried = [c[k] for c in tuning["configs"]]
        if len(set(tried)) > 1 and v in (min(tried), max(tried)):
            edge.append(k)
    return edge


def _same_budget(a: int, b: int) -> bool:
    """Whether two runs' env-step budgets are equal up to iteration rounding (5%)."""
    return abs(a - b) <= 0.05 * max(a, b)


def _crossings(env: str, ref: str, runs: dict) -> list[dict]:
    """Both sides' first crossings of a common target (`_ratios`) and the ratios with their
    bootstrap intervals, for every other cell on env against the reference."""
    base = runs[env, ref]
    rows = []
    for (e, label), run in runs.items():
        if e != env or label == ref:
            continue
        pooled = np.concatenate([untrained_scores(base), untrained_scores(run)])
        untrained = float(aggregate(pooled))
        finals = float(aggregate(_scores(base, -1))), float(aggregate(_scores(run, -1)))
        target = _ratios.common_target(untrained, *finals)
        row = {
            "env": env,
            "reference": ref,
            "strategy": label,
            "untrained": untrained,
            "reference_final": finals[0],
            "final": finals[1],
            "target": target,
        }
        if target is not None:
            row.update(_ratios.crossing_ratios(_ratios.side(base), _ratios.side(run), target))
        rows.append(row)
    return rows


def format_summary(
    table: dict, *, provenance: dict | None = None, command: str | None = None
) -> str:
    """`summary`'s numbers as text: a provenance header (`# ` lines: the command, commit,
    date, versions, machine, protocol), then three tables: final scores, steps and seconds
    to each reference's final score, and tuning and cost.

    **Example:**

    ```python
    text = format_summary(summary(runs), provenance=diffsim.results.provenance(),
                          command="python studies/compare.py")
    ```
    """
    blocks = [_header(table, provenance, command)] if provenance or command else []
    blocks += [_scores_table(table), _crossings_table(table), _cost_table(table)]
    return "\n\n".join(b for b in blocks if b)


def provenance_header(provenance: dict | None, command: str | None) -> str:
    """`# ` lines naming the command that wrote a table and its provenance (commit and
    whether the tree was dirty, date, package versions, machine), for any results table.

    **Example:**

    ```python
    text = provenance_header(diffsim.results.provenance(), "python studies/x.py") + "\n" + table
    ```
    """
    lines = [] if command is None else [f"# written by: {command}"]
    if provenance is not None:
        state = {True: "dirty: " + ", ".join(provenance["changed"]), False: "clean"}
        machine = provenance["machine"]
        lines += [
            f"# commit: {provenance['commit']} ({state.get(provenance['dirty'], 'no git')})",
            f"# date: {provenance['date']}",
            "# versions: " + ", ".join(f"{k} {v}" for k, v in provenance["versions"].items()),
            f"# machine: {machine['cpu']}, {machine['cpu_count']} CPUs, accelerator"
            f" {', '.join(machine['accelerator'])} ({machine['platform']})",
        ]
    return "\n".join(lines)


def _header(table: dict, provenance: dict | None, command: str | None) -> str:
    lines = [provenance_header(provenance, command)]
    cells = table["cells"]
    trained_at = table.get("trained_at") or {}
    if provenance is not None and set(trained_at) - {_state(provenance)}:
        lines.append(
            "# cells trained at: " + ", ".join(f"{k} ({n} cells)" for k, n in trained_at.items())
        )
    seeds = sorted({c["seeds"] for c in cells})
    tuned = {(c["tuning"]["configs"], c["tuning"]["tuning_seeds"]) for c in cells if c["tuning"]}
    search = "; ".join(f"{n} configurations x {t} tuning seeds" for n, t in sorted(tuned)) or "none"
    lines.append(
        f"# protocol: {'/'.join(map(str, seeds))} seeds per cell (IQM from 5 seeds, else the"
        f" mean); tuning per contender: {search}; the chosen configuration re-trained on the"
        " reported seeds, disjoint from the tuning seeds"
    )
    return "\n".join(lines)


def _scores_table(table: dict) -> str:
    refs = [r for r in table["references"] if any(f"p_over_{r}" in c for c in table["cells"])]
    head = (
        f"{'env':<19}{'strategy':<11}{'env steps':>10}{'seeds':>6}{'stat':>6}{'final':>10}"
        f"{'95% CI':>21}{'untrained':>11}{'P(>untr.)':>10}{'learned':>8}"
    )
    head += "".join(f"{'P(>' + r + ')':>10}" for r in refs)
    lines = [
        "Final return over seeds with its 95% bootstrap CI; untrained: the same statistic at"
        " env step 0; learned: the CI's lower end lies above it",
        head,
    ]
    for env_row in table["untrained"]:
        ci = f"[{env_row['low']:.1f}, {env_row['high']:.1f}]"
        lines.append(
            f"{env_row['env']:<19}{'untrained':<11}{0:>10,}{env_row['seeds']:>6}"
            f"{env_row['stat']:>6}{env_row['score']:>10.1f}{ci:>21}{'-':>11}{'-':>10}{'-':>8}"
            + "".join(f"{'-':>10}" for _ in refs)
        )
        for r in (c for c in table["cells"] if c["env"] == env_row["env"]):
            ci = f"[{r['low']:.1f}, {r['high']:.1f}]"
            lines.append(
                f"{r['env']:<19}{r['strategy']:<11}{r['env_steps']:>10,}{r['seeds']:>6}"
                f"{r['stat']:>6}{r['final']:>10.1f}{ci:>21}{r['untrained']:>11.1f}"
                f"{r['p_over_untrained']:>10.2f}{'yes' if r['learned'] else 'no':>8}"
                + "".join(_p(r.get(f"p_over_{ref}")) for ref in refs)
            )
    return "\n".join(lines)


def _p(value: float | None) -> str:
    return f"{'-' if value is None else format(value, '.2f'):>10}"


def _crossings_table(table: dict) -> str:
    if not table["crossings"]:
        return ""
    lines = [
        f"Env steps and training seconds to a common target ({_ratios.TARGET_FRACTION:.0%} of"
        " the way from the untrained score to the lower of the two finals), reached and held"
        f" for {_ratios.HOLD} evaluations; ratio: the reference's / the strategy's, with its"
        " 95% bootstrap CI over seeds on both sides (never: the strategy never held it);"
        " +compile: seconds with each side's compile; never%: resamples where a side never"
        " held it; sooner: whether the steps ratio's CI excludes 1",
        f"{'env':<19}{'reference':<10}{'strategy':<11}{'target':>9}{'ref steps':>11}"
        f"{'steps':>10}{'steps ratio [CI]':>26}{'time ratio [CI]':>26}{'+compile':>10}"
        f"{'never%':>8}  sooner",
    ]
    for r in table["crossings"]:
        start = f"{r['env']:<19}{r['reference']:<10}{r['strategy']:<11}"
        if r["target"] is None:
            lines.append(f"{start}{'-':>9}  (no target: a side did not learn)")
            continue
        lines.append(
            f"{start}{r['target']:>9.1f}{_count(r['ref_steps']):>11}{_count(r['steps']):>10}"
            f"{_ratio_ci(r['steps_ratio']):>26}{_ratio_ci(r['seconds_ratio']):>26}"
            f"{_ratio(r['seconds_compiled_ratio'][0]):>10}{r['never']:>8.0%}  "
            f"{sooner(r['steps_ratio'])}"
        )
    return "\n".join(lines)


def _count(steps: float | None) -> str:
    return "never" if steps is None else f"{steps:,.0f}"


def _ratio(value: float) -> str:
    if np.isnan(value):
        return "-"
    return "never" if value == 0 else "inf" if np.isinf(value) else f"{value:.2f}x"


def _ratio_ci(ratio: list[float]) -> str:
    value, low, high = ratio
    return f"{_ratio(value)} [{_ratio(low).rstrip('x')}, {_ratio(high).rstrip('x')}]"


def sooner(ratio: list[float]) -> str:
    """`"yes"` where a ratio's CI `[value, low, high]` lies above 1, `"no"` where it lies
    below, else `"CI spans 1"`: what a table may call faster.

    **Example:** `sooner([9.8, 4.9, 19.6]) == "yes"`.
    """
    _, low, high = ratio
    return "yes" if low > 1 else "no" if high < 1 else "CI spans 1"


def _cost_table(table: dict) -> str:
    lines = [
        "Tuning (configurations searched on tuning seeds; the best by its final statistic"
        " re-trained on the reported seeds; w: one more round past the edge of the search,"
        " each; *: at the edge of all values tried) and seconds (tune:"
        " the whole search; compile: the training program's, c: some loaded from JAX's"
        " persistent cache); others: cores other processes kept busy while the cell trained"
        " (!: its seconds are not clean; ?: not recorded)",
        f"{'env':<19}{'strategy':<11}{'configs':>8}{'t. seeds':>9}  {'chosen':<32}"
        f"{'score':>10}{'worst':>10}{'tune s':>9}{'train s':>9}{'eval s':>8}{'compile s':>10}"
        f"{'others':>8}",
    ]
    for r in table["cells"]:
        t = r["tuning"]
        if t is None:
            tuned = f"{1:>8}{'-':>9}  {'(not tuned)':<32}{'-':>10}{'-':>10}{'-':>9}"
        else:
            scores = [s if s is not None else float("nan") for s in t["scores"]]
            chosen = ", ".join(
                f"{k}={v:.3g}" + ("*" if k in t["at_edge"] else "") for k, v in t["chosen"].items()
            )
            configs = f"{t['configs']}" + ("w" * t.get("widened", 0))
            tuned = (
                f"{configs:>8}{t['tuning_seeds']:>9}  {chosen:<32}"
                f"{np.nanmax(scores):>10.1f}{np.nanmin(scores):>10.1f}{t['seconds']:>9.1f}"
            )
        lines.append(
            f"{r['env']:<19}{r['strategy']:<11}{tuned}"
            f"{r['train_s']:>9.1f}{r['eval_s']:>8.1f}{_compiled(r):>10}{_others(r):>8}"
        )
    return "\n".join(lines)


def _compiled(row: dict) -> str:
    hits = (row.get("load") or {}).get("cache_hits")
    return f"{row['compile_s']:.1f}" + ("c" if hits else "")


def _others(row: dict) -> str:
    load = row.get("load")
    if not load or load.get("other_cores") is None:
        return "?"
    return f"{load['other_cores']:.2f}" + ("!" if load["busy"] else "")


def write_summary(
    folder: str | Path, table: dict, *, provenance: dict, command: str, name: str = "table"
) -> Path:
    """Write `<folder>/<name>.txt` (`format_summary`) and `<name>.json` (the numbers, the
    provenance and the command); returns the text file's path.

    **Example:**

    ```python
    write_summary("results/compare", summary(runs), provenance=prov,
                  command="python studies/compare.py")
    ```
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    text = format_summary(table, provenance=provenance, command=command)
    (folder / f"{name}.txt").write_text(text + "\n")
    record = {"command": command, "provenance": provenance, **table}
    (folder / f"{name}.json").write_text(json.dumps(record, indent=2))
    return folder / f"{name}.txt"


def reproduction(table: dict, committed: dict) -> str:
    """A reproduction report: each cell's final statistic and CI beside the committed
    table's, and each ratio beside the committed one; they agree where the two 95% CIs
    overlap. `table` and `committed` are `summary`s (the committed one as its
    `table.json` reads back).

    **Example:**

    ```python
    committed = json.loads(Path("results/compare/table.json").read_text())
    print(reproduction(summary(runs), committed))
    ```
    """
    old = {(c["env"], c["strategy"]): c for c in committed.get("cells", [])}
    lines = [
        "Reproduction: final statistic [95% CI] here and in the committed table; agree: the"
        " CIs overlap",
        f"{'env':<19}{'strategy':<11}{'here':>28}{'committed':>28}  agree",
    ]
    agreed = []
    for c in table["cells"]:
        o = old.get((c["env"], c["strategy"]))
        here = f"{c['final']:.1f} [{c['low']:.1f}, {c['high']:.1f}]"
        there = "-" if o is None else f"{o['final']:.1f} [{o['low']:.1f}, {o['high']:.1f}]"
        ok = None if o is None else _overlap((c["low"], c["high"]), (o["low"], o["high"]))
        agreed.append(ok)
        lines.append(f"{c['env']:<19}{c['strategy']:<11}{here:>28}{there:>28}  {_yes(ok)}")
    old_ratios = {(r["env"], r["reference"], r["strategy"]): r for r in committed["crossings"]}
    lines += ["", f"{'env':<19}{'ratio':<16}{'here':>28}{'committed':>28}  agree"]
    for r in table["crossings"]:
        o = old_ratios.get((r["env"], r["reference"], r["strategy"]), {})
        for what in ("steps_ratio", "seconds_ratio"):
            mine, theirs = r.get(what), o.get(what)
            ok = None
            if isinstance(mine, list) and isinstance(theirs, list):
                ok = _overlap(mine[1:], theirs[1:])
            agreed.append(ok)
            name = f"{r['strategy']}/{r['reference']} {what.split('_')[0]}"
            lines.append(
                f"{r['env']:<19}{name:<16}{_ci_or_dash(mine):>28}{_ci_or_dash(theirs):>28}"
                f"  {_yes(ok)}"
            )
    checked = [a for a in agreed if a is not None]
    lines.append(f"\n{sum(checked)} of {len(checked)} numbers agree with the committed table")
    return "\n".join(lines)


def _overlap(a, b) -> bool:
    return bool(max(a[0], b[0]) <= min(a[1], b[1]))


def _yes(ok: bool | None) -> str:
    return "-" if ok is None else "yes" if ok else "NO"


def _ci_or_dash(ratio) -> str:
    return _ratio_ci(ratio) if isinstance(ratio, list) else "-"
