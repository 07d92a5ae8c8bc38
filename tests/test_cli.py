"""The `diffsim` command, run in-process through `diffsim.cli.main` (issue 13, item 5)."""

import re
import shutil
import subprocess
import sys
import warnings

import pytest

from diffsim import cli
from diffsim.study import load_runs

BRAX_WARNING = "not actively being maintained"
# APG on `reach`: 4 envs x 25 steps per iteration, 20 iterations, 3 evaluations of 2 episodes.
TINY_APG = ["--num-envs", "4", "--horizon", "25", "--steps", "2000", "--num-evals", "3"]
TINY_APG += ["--eval-episodes", "2"]


@pytest.fixture(scope="module")
def train_folders(tmp_path_factory):
    """Two `diffsim train apg --env reach --out DIR` folders (seeds 0 and 1, 2 seeds each)."""
    root = tmp_path_factory.mktemp("runs")
    for name, seed in (("first", "0"), ("second", "1")):
        argv = ["train", "apg", "--env", "reach", *TINY_APG, "--seeds", "2", "--seed", seed]
        assert cli.main([*argv, "--out", str(root / name)]) == 0
    return root / "first", root / "second"


def test_plot_of_two_train_folders_writes_a_png(train_folders, tmp_path, capsys):
    capsys.readouterr()
    out = tmp_path / "figs" / "curves.png"
    assert cli.main(["plot", *map(str, train_folders), "-o", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000
    assert capsys.readouterr().out.strip() == f"wrote {out} (2 runs)"
    final = tmp_path / "final.png"
    assert cli.main(["plot", str(train_folders[0]), "-o", str(final), "--x", "final"]) == 0
    assert final.stat().st_size > 5_000


def test_train_folders_are_labelled_by_strategy_or_by_folder_name_when_labels_collide(
    train_folders, tmp_path
):
    first, second = train_folders
    runs = load_runs([first])
    assert list(runs) == [("reach", "APG")]
    assert runs["reach", "APG"].curve.eval_return.shape == (2, 3, 2)  # seeds, evals, episodes
    assert list(load_runs([first, second])) == [("reach", "first"), ("reach", "second")]
    # a study folder (<env>/<label>/) next to a train folder: the cell becomes <study>/<label>
    shutil.copytree(first, tmp_path / "study" / "reach" / "APG")
    assert list(load_runs([tmp_path / "study", second])) == [
        ("reach", "study/APG"),
        ("reach", "second"),
    ]
    with pytest.raises(ValueError, match="given more than once"):
        load_runs([first, first])


def test_plot_of_a_folder_that_is_no_run_is_a_one_line_error(train_folders, tmp_path, capsys):
    bogus = tmp_path / "bogus"
    bogus.mkdir()
    (bogus / "notes.txt").write_text("not a run")
    out = tmp_path / "x.png"
    assert cli.main(["plot", str(train_folders[0]), str(bogus), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"diffsim: error: {bogus} is neither")
    assert "train --out" in err and "<env>/<label>/config.json" in err
    assert cli.main(["plot", str(tmp_path / "missing"), "-o", str(out)]) == 2
    assert f"{tmp_path / 'missing'} does not exist" in capsys.readouterr().err
    assert not out.exists()


def test_brax_deprecation_warning_is_not_printed(capsys):
    """`train` builds `inverted_pendulum` through the CLI's path, then stops before compiling
    (a budget below one iteration): Brax's "not maintained" warning must not show."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # shown even if an earlier test built a Brax env
        code = cli.main(["train", "es", "--env", "inverted_pendulum", "--steps", "1"])
    out, err = capsys.readouterr()
    assert code == 2 and err.startswith("diffsim: error: ") and "total_steps" in err
    assert BRAX_WARNING not in out + err
    assert not [w for w in caught if BRAX_WARNING in str(w.message)]


def test_a_warning_is_one_line_on_stderr(monkeypatch, capsys):
    """Warnings raised while a command runs are shown as `diffsim: warning: ...`."""
    monkeypatch.setattr(cli, "_envs", lambda: warnings.warn("budget reduced", stacklevel=2))
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        assert cli.main(["envs"]) == 0
    assert capsys.readouterr().err == "diffsim: warning: budget reduced\n"


def test_library_users_running_with_w_error_can_import_and_build_brax_envs():
    """`python -W error`: importing diffsim (Brax imports JAXopt, deprecated), building a Brax
    env (Brax warns it is unmaintained) and tracing its step (MuJoCo deprecates `ncon`)."""
    code = (
        "import jax, jax.numpy as jnp, diffsim\n"
        "env = diffsim.make_env('inverted_pendulum')\n"
        "state = jax.eval_shape(env.reset, jax.random.key(0))\n"
        "jax.eval_shape(env.step, state, jnp.zeros(env.action_size))\n"
        "print('ok')\n"
    )
    result = subprocess.run(
        [sys.executable, "-W", "error", "-c", code], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "ok"


def test_es_on_reach_runs_with_its_default_rollout_length(capsys):
    argv = ["train", "es", "--env", "reach", "--steps", "20000", "--num-evals", "3"]
    assert cli.main([*argv, "--eval-episodes", "2"]) == 0  # reach's episodes are 100 steps
    assert "ES on reach" in capsys.readouterr().out


def test_a_small_budget_runs_with_fewer_evaluation_points_and_says_so(capsys):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code = cli.main(["train", "apg", "--env", "reach", "--steps", "30000"])
    out, err = capsys.readouterr()
    note = out + err + "".join(str(w.message) for w in caught)
    assert code == 0 and "APG on reach" in out
    assert re.search(r"evaluat\w*", note) and re.search(r"fewer|reduced|instead", note)
