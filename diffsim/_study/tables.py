"""A study's tables as text: final scores against the untrained policy and the references,
the ratios at a common target with their intervals, and the tuning and its cost, under a
provenance header (`diffsim.results.provenance`)."""

import json
from pathlib import Path

import numpy as np

from . import ratios as _ratios
from .report import trained_state


def format_summary(
    table: dict, *, provenance: dict | None = None, command: str | None = None
) -> str:
    """`summary`'s numbers as text: a provenance header (`# ` lines: the command, commit,
    date, versions, machine, protocol; with `table["stale"]`, whether the cells hold the
    current code's key: None not checked, else the stale cells' names), then three tables: final scores, steps and seconds
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
    if provenance is not None and set(trained_at) - {trained_state(provenance)}:
        lines.append(
            "# cells trained at: " + ", ".join(f"{k} ({n} cells)" for k, n in trained_at.items())
        )
    if "stale" in table:  # whether the cells hold the current code's key (a study's --check)
        stale = table["stale"]
        if stale is None:
            lines.append("# cell keys: not checked against the current code")
        else:
            lines.append(
                "# cell keys: "
                + (f"stale (saved under another key): {', '.join(stale)}" if stale else "current")
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
        " held it; sooner, faster: whether the steps and time ratios' CIs exclude 1 (grid:"
        " the CI does, but not once widened by the evaluation grid, a crossing lying"
        " anywhere from one update past the evaluation before it)",
        f"{'env':<19}{'reference':<10}{'strategy':<11}{'target':>9}{'ref steps':>11}"
        f"{'steps':>10}{'steps ratio [CI]':>26}{'time ratio [CI]':>26}{'+compile':>10}"
        f"{'never%':>8}  {'sooner':<11} faster",
    ]
    for r in table["crossings"]:
        start = f"{r['env']:<19}{r['reference']:<10}{r['strategy']:<11}"
        if r["target"] is None:
            lines.append(f"{start}{'-':>9}  (no target: a side did not learn)")
            continue
        lines.append(
            f"{start}{r['target']:>9.1f}{_count(r['ref_steps']):>11}{_count(r['steps']):>10}"
            f"{_ratios.format_ratio_ci(r['steps_ratio']):>26}{_ratios.format_ratio_ci(r['seconds_ratio']):>26}"
            f"{_ratios.format_ratio(r['seconds_compiled_ratio'][0]):>10}{r['never']:>8.0%}  "
            f"{_ratios.verdict(r['steps_ratio'], r.get('steps_resolved')):<11} "
            f"{_ratios.verdict(r['seconds_ratio'], r.get('seconds_resolved'))}"
        )
    return "\n".join(lines)


def _count(steps: float | None) -> str:
    return "never" if steps is None else f"{steps:,.0f}"


def _cost_table(table: dict) -> str:
    lines = [
        "Tuning (configurations searched on tuning seeds; the best by its final statistic"
        " re-trained on the reported seeds; w: one more round past the edge of the search,"
        " each; *: at the edge of all values tried) and seconds (tune:"
        " the whole search; compile: the training program's, c: some loaded from JAX's"
        " persistent cache); others: cores other processes kept busy while the cell trained"
        " (!: its seconds are not clean; ?: not recorded); skipped: the share of iterations"
        " that skipped an update for a non-finite loss or gradient",
        f"{'env':<19}{'strategy':<11}{'configs':>8}{'t. seeds':>9}  {'chosen':<32}"
        f"{'score':>10}{'worst':>10}{'tune s':>9}{'train s':>9}{'eval s':>8}{'compile s':>10}"
        f"{'others':>8}{'skipped':>9}",
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
            f"{_skipped(r):>9}"
        )
    return "\n".join(lines)


def _compiled(row: dict) -> str:
    hits = (row.get("load") or {}).get("cache_hits")
    return f"{row['compile_s']:.1f}" + ("c" if hits else "")


def _skipped(row: dict) -> str:
    health = row.get("gradients")
    return "-" if health is None else f"{health['skipped']:.1%}"


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
