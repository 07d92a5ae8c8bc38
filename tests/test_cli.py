"""The `diffsim` command, run in-process through `diffsim.cli.main` (issue 13, item 5)."""

import importlib
import json
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

import diffsim
from diffsim import _cli_train, cli
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


# A strategy of the user's own, outside the package: analytic gradients of a short window,
# written only against diffsim's public API. Its fields cover every option type the CLI makes.
USER_STRATEGY = '''
from typing import ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
import optax

import diffsim


class MyState(eqx.Module):
    policy: eqx.Module
    opt_state: optax.OptState
    env_state: object


def optimizer(strategy):
    """Adam at the strategy's rate, after a clip of the gradient's norm at 1 if it asks."""
    adam = optax.adam(strategy.learning_rate)
    return optax.chain(optax.clip_by_global_norm(1.0), adam) if strategy.clip else adam


class MyStrat(diffsim.AbstractStrategy[MyState]):
    """A user's strategy: one Adam step on a short window's summed reward."""

    num_envs: int = 8
    horizon: int = 10
    learning_rate: float = 1e-3
    clip: bool = True
    widths: tuple[int, ...] = (8,)
    tag: str = "plain"
    sweepable: ClassVar[tuple[str, ...]] = ("learning_rate",)

    @property
    def batch_size(self) -> int:
        return self.num_envs

    @property
    def steps_per_iteration(self) -> int:
        return self.batch_size * self.horizon

    @property
    def min_steps_per_iteration(self) -> int:
        return self.steps_per_iteration

    def check(self, env, policy):
        pass  # any policy will do

    def for_env(self, env):
        return self

    def for_budget(self, total_steps):
        return self

    def init(self, env, policy, *, key):
        params = eqx.filter(policy, diffsim.trainable(policy))
        env_state = diffsim.reset(env, key=key, num_envs=self.num_envs)
        return MyState(policy, optimizer(self).init(params), env_state)

    def step(self, env, state, *, key):
        params, static = eqx.partition(state.policy, diffsim.trainable(state.policy))

        def loss(params):
            policy = eqx.combine(params, static)
            end, traj = diffsim.rollout(
                env, policy, state.env_state, key=key, length=self.horizon, deterministic=True
            )
            return -jnp.mean(traj.reward), end

        (value, end), grads = eqx.filter_value_and_grad(loss, has_aux=True)(params)
        updates, opt_state = optimizer(self).update(grads, state.opt_state, params)
        policy = eqx.apply_updates(state.policy, updates)
        return MyState(policy, opt_state, jax.lax.stop_gradient(end)), {"loss": value}

    def policy(self, state):
        return state.policy
'''


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    """`usermod_cli.py` in a temporary folder on sys.path (and the current directory
    elsewhere, so the module is found through sys.path, not the working directory)."""
    folder = tmp_path / "code"
    folder.mkdir()
    (folder / "usermod_cli.py").write_text(USER_STRATEGY)
    monkeypatch.syspath_prepend(str(folder))
    monkeypatch.chdir(tmp_path)
    yield "usermod_cli"
    sys.modules.pop("usermod_cli", None)


@pytest.mark.parametrize("form", ["positional", "option"])
def test_a_user_strategy_class_trains_with_its_fields_as_options(
    user_module, tmp_path, capsys, form
):
    spec = f"{user_module}:MyStrat"
    options = ["--learning-rate", "0.01", "--horizon", "5", "--no-clip", "--widths", "4,4"]
    options += ["--tag", "custom", "--num-envs", "4"]
    run = ["--env", "reach", "--steps", "400", "--num-evals", "2", "--eval-episodes", "2"]
    head = ["train", spec] if form == "positional" else ["train", "--strategy", spec]
    out_dir = tmp_path / "run"
    assert cli.main([*head, *options, *run, "--out", str(out_dir)]) == 0
    out = capsys.readouterr().out
    assert re.search(
        r"^MyStrat on reach: 400 env steps x 1 seeds, final eval return IQM -?\d", out, re.M
    )
    config = json.loads((out_dir / "config.json").read_text())
    assert config["strategy"] == "MyStrat" and config["total_steps"] == 400
    hyper = config["hyperparameters"]
    assert (hyper["learning_rate"], hyper["horizon"], hyper["num_envs"]) == (0.01, 5, 4)
    assert (hyper["clip"], hyper["widths"], hyper["tag"]) == (False, [4, 4], "custom")


def test_a_user_strategy_lists_its_fields_in_help(user_module, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train", f"{user_module}:MyStrat", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for option in (
        "--learning-rate FLOAT",
        "--horizon INT",
        "--clip, --no-clip",
        "--widths N,N,...",
    ):
        assert option in out
    assert "--tag STR" in out and "default plain" in out


def test_train_help_lists_the_registered_strategies(capsys):
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    out = capsys.readouterr().out
    for name in ("ppo", "apg", "shac", "es", "guided-es"):
        assert re.search(rf"^\s+{name}\s", out, re.M), name
    assert "MODULE:CLASS" in out


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        (
            "no_such_module_xyz:Thing",
            r"strategy 'no_such_module_xyz:Thing': cannot load 'Thing' from module 'no_such_module_xyz'",
        ),
        ("json:Nothing", r"cannot load 'Nothing' from module 'json'"),
        (
            "json:JSONDecoder",
            r"strategy 'json:JSONDecoder' is .*JSONDecoder.*not a diffsim.AbstractStrategy subclass",
        ),
    ],
)
def test_a_bad_strategy_spec_is_a_one_line_error(spec, match, capsys):
    assert cli.main(["train", spec, "--env", "reach"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("diffsim: error: ") and err.count("\n") == 1
    assert re.search(match, err), err


def test_an_unknown_strategy_name_lists_the_known_ones(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train", "nope", "--env", "reach"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'nope'" in err and "'ppo'" in err and "'guided-es'" in err


STUDY_SCRIPT = """
import sys
from helper_mod import WORD  # a sibling module, as `python studies/NAME.py` finds it
print(WORD, sys.argv[1:])
"""


def test_study_is_found_from_another_directory(tmp_path, monkeypatch, capsys):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "probe_study.py").write_text(STUDY_SCRIPT)
    (folder / "helper_mod.py").write_text("WORD = 'found'\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # no ./studies here
    monkeypatch.setenv(cli.STUDIES_ENV, str(folder))
    assert cli.find_study("probe_study") == folder / "probe_study.py"
    assert cli.main(["study", "probe_study", "--flag", "3"]) == 0
    assert capsys.readouterr().out == "found ['--flag', '3']\n"
    # the repository's own studies, next to the package, from any directory
    repo_studies = Path(cli.diffsim.__file__).resolve().parents[1] / "studies"
    assert cli.find_study("compare") == repo_studies / "compare.py"


def test_an_unknown_study_says_where_it_looked(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(cli.STUDIES_ENV, raising=False)
    assert cli.main(["study", "no_such_study"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("diffsim: error: no study 'no_such_study'; looked in")
    assert "studies (./studies): no such folder" in err
    repo_studies = Path(cli.diffsim.__file__).resolve().parents[1] / "studies"
    assert f"{repo_studies} (next to the diffsim package): " in err and "compare" in err
    assert f"${cli.STUDIES_ENV}: unset" in err


def test_envs_lists_sizes_without_mujocos_settotalmass_warning(monkeypatch, capfd):
    """halfcheetah's model uses `settotalmass`, which MuJoCo calls deprecated from C (on the
    process's stderr, hence `capfd`); `diffsim envs` must not show it."""
    monkeypatch.setattr(cli.diffsim.envs, "names", lambda: ["reach", "halfcheetah"])
    assert cli.main(["envs"]) == 0
    out, err = capfd.readouterr()
    assert re.search(r"^halfcheetah\s+brax\s+17\s+6\s+1000$", out, re.M), out
    assert re.search(r"^reach\s+toy\s+6\s+2\s+100$", out, re.M)
    assert "settotalmass" not in out + err


def test_render_to_mp4_without_imageio_ffmpeg_names_the_extra(monkeypatch, tmp_path, capsys):
    """Checked before the run is loaded: the folder need not exist."""
    render_module = importlib.import_module("diffsim.render")  # `diffsim.render` is the function
    monkeypatch.setattr(render_module, "_ffmpeg_available", lambda: False)
    out = tmp_path / "episode.mp4"
    assert cli.main(["render", str(tmp_path / "no_run"), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"diffsim: error: cannot render to {str(out)!r}: .mp4 needs")
    assert "pip install 'diffsim[video]'" in err and not out.exists()


def test_guided_es_components_from_options():
    """GuidedES's gradient source and mode are objects: `--gradient KIND` picks the class and
    `--gradient-FIELD` sets its fields; a field the chosen class lacks is an error."""
    parser = cli._parser()
    args = parser.parse_args(
        ["train", "guided-es", "--gradient", "shac-window", "--gradient-horizon", "8"]
        + ["--gradient-discount", "0.8", "--mode", "subspace", "--mode-alpha", "0.99"]
    )
    built = _cli_train.strategy_from(args)
    assert built.gradient == diffsim.SHACWindow(horizon=8, discount=0.8)
    assert built.mode == diffsim.Subspace(alpha=0.99)
    assert _cli_train.strategy_from(parser.parse_args(["train", "guided-es"])) == diffsim.GuidedES()
    wrong = parser.parse_args(["train", "guided-es", "--gradient-discount", "0.8"])
    with pytest.raises(ValueError, match="--gradient-discount do not apply to APGWindow"):
        _cli_train.strategy_from(wrong)


def test_window_settings_modules_are_flat_options():
    """The fields of `WindowOptions` and `UpdateOptions` are options of the strategy (and of
    GuidedES's gradient source) under their own names, as `hyperparameters` records them."""
    parser = cli._parser()
    args = parser.parse_args(["train", "apg", "--remat", "--adam-b1", "0.9", "--num-envs", "8"])
    assert _cli_train.strategy_from(args) == diffsim.APG(
        num_envs=8,
        options=diffsim.WindowOptions(remat=True),
        update=diffsim.UpdateOptions(adam_b1=0.9),
    )
    assert _cli_train.strategy_from(parser.parse_args(["train", "ahac"])) == diffsim.AHAC()
    args = parser.parse_args(["train", "guided-es", "--gradient-remat", "--gradient-horizon", "8"])
    remat = diffsim.WindowOptions(remat=True)
    assert _cli_train.strategy_from(args).gradient == diffsim.APGWindow(horizon=8, options=remat)


def test_env_args_are_json_where_they_parse_and_a_bad_env_is_one_line(capsys):
    assert _cli_train.env_arg("gain=2.0") == ("gain", 2.0)
    assert _cli_train.env_arg("sizes=[1, 2]") == ("sizes", [1, 2])
    assert _cli_train.env_arg("mode=fast") == ("mode", "fast")
    with pytest.raises(SystemExit):
        cli.main(["train", "apg", "--env", "reach", "--env-arg", "no-equals-sign"])
    assert "expected KEY=VALUE" in capsys.readouterr().err
    assert cli.main(["train", "apg", "--env", "user_envs:Nope", "--steps", "10"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "env 'user_envs:Nope': cannot load 'Nope'" in err
