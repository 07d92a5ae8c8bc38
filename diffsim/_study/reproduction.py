"""A reproduction report: a study trained afresh against its committed table."""

from . import ratios as _ratios


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
    return _ratios.format_ratio_ci(ratio) if isinstance(ratio, list) else "-"
