"""Every number traceable (issue 18, items 5 and 6): tables quoted in README.md and docs/
match the committed results file they name, written by a script that exists; results
record their commit, versions and machine; studies refuse a dirty tree unless told."""

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

import diffsim
from diffsim.results import PACKAGES, DirtyTreeError, provenance, require_clean

ROOT = Path(__file__).resolve().parent.parent
# `<!-- from results/<path> by python studies/<script>.py [args] -->`, on the line right
# before the fenced block it vouches for.
MARKER = re.compile(r"^<!-- from (results/\S+) by python (studies/[\w/.-]+\.py)(?: [^>]*)? -->$")


def _normal(line: str) -> str:
    return " ".join(line.split())


def quote_problems(root: Path, documents: list[Path]) -> list[str]:
    """What is wrong with the quoted tables of `documents` (paths under `root`): a marker
    that does not parse or is not followed by a fenced block, a results file or script
    that does not exist, a block line (whitespace-normalised) not in the results file."""
    problems = []
    for doc in documents:
        lines = doc.read_text().splitlines()
        where = lambda i: f"{doc.relative_to(root)}:{i + 1}"  # noqa: B023
        for i, line in enumerate(lines):
            if not line.startswith("<!-- from "):
                continue
            marker = MARKER.match(line.strip())
            if marker is None:
                problems.append(f"{where(i)}: malformed marker {line!r}")
                continue
            results, script = (root / marker[1]), (root / marker[2])
            if not script.is_file():
                problems.append(f"{where(i)}: no script {marker[2]}")
            if not results.is_file():
                problems.append(f"{where(i)}: no results file {marker[1]}")
                continue
            if i + 1 >= len(lines) or not lines[i + 1].startswith("```"):
                problems.append(f"{where(i)}: the marker is not followed by a fenced block")
                continue
            known = {_normal(x) for x in results.read_text().splitlines()}
            for j in range(i + 2, len(lines)):
                if lines[j].startswith("```"):
                    break
                if lines[j].strip() and _normal(lines[j]) not in known:
                    problems.append(f"{where(j)}: not in {marker[1]}: {lines[j].strip()!r}")
            else:
                problems.append(f"{where(i)}: the fenced block is not closed")
    return problems


def _documents(root: Path) -> list[Path]:
    readme = [root / "README.md"] if (root / "README.md").is_file() else []
    return readme + sorted((root / "docs").glob("**/*.md"))


def test_readme_and_docs_tables_match_their_results_files():
    assert quote_problems(ROOT, _documents(ROOT)) == []


TABLE = """# written by: python studies/demo.py
env       strategy    final
reach     PPO         -15.0
reach     APG         -10.8
"""


@pytest.fixture
def repo(tmp_path):
    (tmp_path / "results" / "demo").mkdir(parents=True)
    (tmp_path / "results" / "demo" / "table.txt").write_text(TABLE)
    (tmp_path / "studies").mkdir()
    (tmp_path / "studies" / "demo.py").write_text("")
    return tmp_path


def _readme(repo: Path, marker: str, block: str) -> list[str]:
    (repo / "README.md").write_text(f"# Demo\n\n{marker}\n```\n{block}```\n\nprose\n")
    return quote_problems(repo, _documents(repo))


GOOD = "<!-- from results/demo/table.txt by python studies/demo.py --seeds 10 -->"


def test_the_checker_accepts_a_faithful_quote_whitespace_aside(repo):
    block = "env strategy    final\nreach  PPO  -15.0\n\n   reach APG -10.8\n"
    assert _readme(repo, GOOD, block) == []


def test_the_checker_fails_a_quote_that_differs(repo):
    problems = _readme(repo, GOOD, "env strategy final\nreach PPO -15.1\n")
    assert problems == ["README.md:6: not in results/demo/table.txt: 'reach PPO -15.1'"]


@pytest.mark.parametrize(
    ("marker", "message"),
    [
        ("<!-- from results/demo/table.txt by python studies/nope.py -->", "no script"),
        ("<!-- from results/demo/nope.txt by python studies/demo.py -->", "no results file"),
        ("<!-- from results/demo/table.txt by studies/demo.py -->", "malformed marker"),
    ],
)
def test_the_checker_fails_a_marker_that_names_nothing(repo, marker, message):
    assert message in " ".join(_readme(repo, marker, "reach PPO -15.0\n"))


def test_the_checker_fails_a_marker_without_its_block(repo):
    (repo / "docs").mkdir()
    (repo / "docs" / "page.md").write_text(f"{GOOD}\n\n```\nreach PPO -15.0\n```\n")
    assert quote_problems(repo, _documents(repo)) == [
        "docs/page.md:1: the marker is not followed by a fenced block"
    ]


# --- provenance ---------------------------------------------------------------------------


def _git(repo: Path, *args: str) -> str:
    who = {
        f"GIT_{role}_{what}": "t" for role in ("AUTHOR", "COMMITTER") for what in ("NAME", "EMAIL")
    }
    env = {**who, "PATH": "/usr/bin:/bin"}
    done = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


@pytest.fixture
def checkout(tmp_path):
    _git(tmp_path, "init", "-q")
    (tmp_path / "code.py").write_text("x = 1\n")
    _git(tmp_path, "add", "code.py")
    _git(tmp_path, "commit", "-qm", "first")
    return tmp_path


def test_provenance_records_commit_versions_machine_and_date(checkout):
    prov = provenance(checkout)
    assert prov["commit"] == _git(checkout, "rev-parse", "HEAD") and len(prov["commit"]) == 40
    assert prov["dirty"] is False and prov["changed"] == []
    assert set(prov["versions"]) == set(PACKAGES)
    assert {"jax", "jaxlib", "brax", "mujoco", "equinox", "optax", "evosax", "diffsim"} <= set(
        PACKAGES
    )
    assert prov["versions"]["jax"] == __import__("jax").__version__
    machine = prov["machine"]
    assert machine["cpu"] and machine["cpu_count"] >= 1
    assert machine["accelerator"] == [str(d) for d in __import__("jax").devices()]
    assert re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00$", prov["date"])
    json.dumps(prov)  # plain JSON


def test_a_dirty_tree_is_refused_unless_allowed(checkout):
    (checkout / "results").mkdir()
    (checkout / "results" / "table.txt").write_text("what a study writes")
    (checkout / "figures").mkdir()
    (checkout / "figures" / "plot.png").write_bytes(b"")
    assert require_clean(repo=checkout)["dirty"] is False  # study outputs do not count
    (checkout / "code.py").write_text("x = 2\n")
    (checkout / "new.py").write_text("")
    with pytest.raises(DirtyTreeError, match=r"code\.py, new\.py.*--allow-dirty"):
        require_clean(repo=checkout)
    prov = require_clean(repo=checkout, allow_dirty=True)
    assert prov["dirty"] is True and prov["changed"] == ["code.py", "new.py"]


def test_outside_git_there_is_no_commit_to_name(tmp_path):
    assert provenance(tmp_path)["commit"] is None
    with pytest.raises(DirtyTreeError, match="not a git checkout"):
        require_clean(repo=tmp_path)


def test_study_scripts_refuse_a_dirty_tree_before_training(checkout, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(ROOT / "studies"))
    import compare

    (checkout / "code.py").write_text("x = 3\n")
    here = lambda allow_dirty: require_clean(allow_dirty=allow_dirty, repo=checkout)
    monkeypatch.setattr(compare, "require_clean", here)
    parser = argparse.ArgumentParser()
    compare.protocol_arguments(parser, seeds=10, configs=5)
    with pytest.raises(SystemExit):
        compare.start(parser, parser.parse_args([]))
    assert "refusing to write a results table from a dirty tree" in capsys.readouterr().err
    prov, command = compare.start(parser, parser.parse_args(["--allow-dirty"]))
    assert prov["dirty"] is True and command.startswith("python studies/")
    for script in (
        "compare",
        "hybrid",
        "locomotion",
        "dm_control",
        "sample_efficiency",
        "sensitivity",
    ):
        source = (ROOT / "studies" / f"{script}.py").read_text()
        options = ("protocol_arguments(parser", "grid_parser(", "allow_dirty_argument(parser")
        assert any(o in source for o in options) or '"--allow-dirty"' in source, script
        assert "start(parser, args)" in source, script  # the check, before any training


def test_stats_does_not_import_scipy_until_a_bootstrap_needs_it():
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('stats', {str(ROOT / 'diffsim' / 'stats.py')!r})\n"
        "stats = importlib.util.module_from_spec(spec); spec.loader.exec_module(stats)\n"
        "import numpy as np\n"
        "assert float(stats.iqm(np.array([0.0, 1, 2, 3, 100]))) == 2.0\n"
        "assert 'scipy' not in sys.modules, 'imported at import'\n"
        "stats.iqm_ci(np.arange(8.0))\n"
        "assert 'scipy' in sys.modules\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert diffsim.stats.MIN_IQM_SEEDS == 5


def _front_door(text: str) -> tuple[str, str]:
    """The strategies table and the "What has been measured" section of a front page."""
    table = "\n".join(line for line in text.splitlines() if line.startswith("| `diffsim."))
    measured = text.split("## What has been measured\n", 1)[1].split("\n## ", 1)[0]
    return table, measured.strip()


def test_the_docs_home_repeats_readmes_strategies_and_measurements():
    """docs/index.md repeats README's strategies table and "What has been measured" (links
    rebased from docs/), so the site's front page cannot fall behind README's."""
    readme = (ROOT / "README.md").read_text().replace("](docs/", "](")
    table, measured = _front_door(readme)
    assert table.count("\n") >= 6 and "results/" in measured
    assert _front_door((ROOT / "docs" / "index.md").read_text()) == (table, measured)
