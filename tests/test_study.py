"""Studies (issue 18, issue 21 items 3 and 9): tuning on tuning seeds with equal effort,
reported on fresh seeds; the report's untrained row, P(> untrained), first-crossing ratios
and "did not learn"; cells keyed by their computation (the fingerprint) and re-stamped; an executor, a per-cell lock
and atomic cell folders."""

import dataclasses
import hashlib
import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import textwrap
import threading
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest
from conftest import deterministic, gaussian

import diffsim
from diffsim import LearningCurve, Run, study
from diffsim._study import (
    cells as _cells,
    fingerprint as _fingerprint,
    ratios as _ratios,
    tuning as _tuning,
)
from diffsim._study.cellstore import CellLock, replace_dir
from diffsim.stats import aggregate, iqm
from diffsim.study import program_fingerprint

TINY = diffsim.PPO(num_envs=8, unroll_length=16, num_epochs=2, num_minibatches=4)
STEPS = 4 * TINY.steps_per_iteration
QUIET = dict(num_evals=3, num_eval_episodes=2, progress=False)


def _keys(data) -> set:
    return {tuple(k) for k in np.asarray(data).reshape(len(data), -1).tolist()}


# --- tuning ------------------------------------------------------------------------------


def test_tuning_selects_on_tuning_seeds_and_reports_on_fresh_ones(tmp_path):
    env = diffsim.make_env("reach")
    search = {"learning_rate": [1e-5, 3e-3]}
    cell = study.Cell(env, "PPO", TINY, gaussian, STEPS, search=search)
    runs = study.run_study("t", [cell], out=tmp_path, num_seeds=4, tuning_seeds=2, **QUIET)
    run = runs["reach", "PPO"]
    record = json.loads((tmp_path / "t" / "reach" / "PPO" / "tuning.json").read_text())

    fresh = jr.split(jr.key(0), 4)  # the study's reported seeds
    assert _keys(record["report_keys"]) == _keys(jr.key_data(fresh))
    assert len(_keys(record["tuning_keys"])) == 2
    assert not _keys(record["tuning_keys"]) & _keys(record["report_keys"])

    # The search really ran on the tuning keys, and evaluated on episodes of its own: the
    # same sweep, trained here with the tuning's seed indices, agrees.
    factory = lambda k: gaussian(env, k)
    tuning = jr.wrap_key_data(np.asarray(record["tuning_keys"], dtype=np.uint32))
    train = dict(total_steps=STEPS, **QUIET)
    first = _tuning.TUNING_EPISODES
    sweep = diffsim.train_sweep(
        TINY, env, factory, sweep=search, keys=tuning, seed_index=first, **train
    )
    shared = diffsim.train_sweep(TINY, env, factory, sweep=search, keys=tuning, **train)
    untrained = lambda r: np.asarray(r.curve.eval_return)[:, :, 0]  # same policies, episodes?
    assert not np.allclose(untrained(sweep), untrained(shared))  # the reported seeds' are not
    finals = np.asarray(sweep.curve.eval_return)[:, :, -1].mean(-1)
    np.testing.assert_allclose(record["final_returns"][:2], finals, rtol=1e-6)
    np.testing.assert_allclose(record["scores"][:2], finals.mean(1), rtol=1e-6)  # 2 seeds
    # A best value at an edge widens the search past it: every configuration tried counts
    widened = [{"learning_rate": v} for w in record["widened"] for v in w["learning_rate"]]
    first = [{"learning_rate": 1e-5}, {"learning_rate": 3e-3}]
    assert record["configs"] == first + widened
    assert len(record["scores"]) == len(record["configs"]) == len(record["final_returns"])
    best = int(np.nanargmax(np.array(record["scores"], float)))
    assert record["chosen_index"] == best and record["chosen"] == record["configs"][best]
    assert run.config["study"]["tuning"]["chosen"] == record["chosen"]

    # Reported: the chosen config re-trained on the fresh seeds, not the tuning runs.
    chosen = dataclasses.replace(TINY, **record["chosen"])
    again = diffsim.train_seeds(chosen, env, factory, keys=fresh, **train)
    np.testing.assert_allclose(run.curve.eval_return, again.curve.eval_return, rtol=1e-5)
    assert run.curve.eval_return.shape == (4, 3, 2)
    assert run.config["hyperparameters"]["learning_rate"] == record["chosen"]["learning_rate"]
    tuned = np.asarray(record["final_returns"][best])  # the chosen config's tuning runs
    assert not np.allclose(np.asarray(run.curve.eval_return)[:2, -1].mean(-1), tuned)


def test_every_contender_on_an_env_searches_the_same_number_of_configs(tmp_path):
    env = diffsim.make_env("reach")
    apg = diffsim.APG(num_envs=4, horizon=16)
    two = {"learning_rate": [1e-3, 1e-2]}
    three = {"learning_rate": [1e-4, 3e-4, 1e-3]}
    unequal = [
        study.Cell(env, "PPO", TINY, gaussian, STEPS, search=three),
        study.Cell(env, "APG", apg, deterministic, STEPS, search=two),
    ]
    with pytest.raises(ValueError, match=r"unequal tuning effort on reach.*'reach/PPO': 3.*: 2"):
        study.run_study("s", unequal, out=tmp_path)
    untuned = [unequal[0], study.Cell(env, "APG", apg, deterministic, STEPS)]
    with pytest.raises(ValueError, match=r"'reach/APG': 1"):
        study.run_study("s", untuned, out=tmp_path)
    # Allowed explicitly: it gets past the check (and fails at the next one, the folder).
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(OSError, match="cannot write"):
        study.run_study("s", unequal, out=blocker, allow_unequal_search=True)
    # Across envs sizes may differ: only contenders on one env compete.
    other = study.Cell(diffsim.make_env("pendulum"), "APG", apg, deterministic, STEPS)
    with pytest.raises(OSError, match="cannot write"):
        study.run_study("s", [unequal[0], other], out=blocker)


@pytest.mark.parametrize(
    ("search", "message"),
    [
        ({"num_envs": [4.0, 8.0]}, r"reach/PPO: search\['num_envs'\].*not sweepable"),
        ({"learning_rat": [1e-3]}, r"no hyperparameter 'learning_rat'.*PPO.sweepable"),
        ({"learning_rate": []}, r"search\['learning_rate'\] must be a non-empty list"),
        ({"learning_rate": [-1.0]}, r"search config \{'learning_rate': -1.0\}"),
    ],
)
def test_a_bad_search_is_refused_before_training(tmp_path, search, message):
    cell = study.Cell(diffsim.make_env("reach"), "PPO", TINY, gaussian, STEPS, search=search)
    with pytest.raises(ValueError, match=message):
        study.run_study("s", [cell], out=tmp_path)
    assert not (tmp_path / "s").exists()


def test_log_grid():
    assert study.log_grid(1e-4, 1e-2, 3) == [1e-4, 1e-3, 1e-2]
    assert study.log_grid(3e-4 / 4, 3e-4 * 4, 5) == [7.5e-05, 0.00015, 0.0003, 0.0006, 0.0012]
    with pytest.raises(ValueError, match="0 < low <= high"):
        study.log_grid(0.0, 1.0, 3)


# --- the report --------------------------------------------------------------------------


def _run(returns, steps, seconds=None) -> Run:
    """A run with the given per-seed curves (seeds, E) of mean returns."""
    returns = np.asarray(returns, np.float32)
    seeds, points = returns.shape
    seconds = np.asarray(steps, np.float32) / 1000 if seconds is None else np.asarray(seconds)
    curve = LearningCurve(
        env_steps=jnp.tile(jnp.asarray(steps, jnp.int32), (seeds, 1)),
        wall_time=jnp.tile(jnp.asarray(seconds, jnp.float32), (seeds, 1)),
        eval_return=jnp.repeat(jnp.asarray(returns)[..., None], 2, -1),  # 2 equal episodes
    )
    policy = diffsim.MLP(1, 1, hidden=(2,), key=jr.key(0))
    config = {"total_steps": int(steps[-1]), "train_seconds": 1.0, "eval_seconds": 0.1}
    return Run(policy=policy, curve=curve, metrics={}, config=config)


STEPS_AT = [0, 1000, 2000, 3000, 4000]
OFFSETS = np.array([-2.0, -1.0, 0.0, 1.0, 2.0])[:, None]  # 5 seeds around the mean


def _study_runs() -> dict:
    ppo = [-100, -60, -30, -10, -10] + OFFSETS  # first reaches its final (-10) at 3000
    fast = [-100, -8, -5, -5, -5] + OFFSETS  # reaches -10 at 1000: 3x fewer steps
    never = [-100, -90, -80, -70, -60] + OFFSETS
    flat = [-50, -55, -60, -52, -51] + OFFSETS  # the baseline on "hard": ends below start
    other = [-50, -40, -30, -20, -10] + OFFSETS
    return {
        ("easy", "PPO"): _run(ppo, STEPS_AT, seconds=[0, 2, 4, 6, 8]),
        ("easy", "FAST"): _run(fast, STEPS_AT, seconds=[0, 1, 2, 3, 4]),
        ("easy", "SLOW"): _run(never, STEPS_AT),
        ("hard", "PPO"): _run(flat, STEPS_AT),
        ("hard", "FAST"): _run(other, STEPS_AT),
        ("few", "PPO"): _run(np.array(ppo)[:3], STEPS_AT),
    }


def test_ratios_cross_a_common_target_on_both_sides():
    """The target lies 80% of the way from the pooled untrained score to the lower final,
    is the same for both sides, and must be held for 2 evaluations."""
    table = study.summary(_study_runs(), references=("PPO",))
    rows = {(r["env"], r["strategy"]): r for r in table["crossings"]}
    assert ("easy", "PPO") not in rows  # no ratio of the reference with itself
    fast, slow = rows["easy", "FAST"], rows["easy", "SLOW"]
    assert fast["target"] == pytest.approx(-100 + 0.8 * (-10 + 100))  # PPO's final is lower
    assert (fast["ref_steps"], fast["steps"]) == (3000, 1000)  # PPO: -30 < -28 at 2000
    assert fast["steps_ratio"][0] == pytest.approx(3.0)
    assert fast["seconds_ratio"][0] == pytest.approx(6.0)
    assert fast["steps_ratio"][1] <= 3.0 <= fast["steps_ratio"][2] and fast["never"] == 0
    # SLOW ends at -60: the target is -68, which it reaches at its last evaluation only
    assert slow["target"] == pytest.approx(-100 + 0.8 * 40)
    assert (slow["ref_steps"], slow["steps"], slow["steps_ratio"][0]) == (1000, None, 0.0)
    text = study.format_summary(table)
    line = next(t for t in text.splitlines() if t.split()[:3] == ["easy", "PPO", "FAST"])
    assert "3.00x" in line and "6.00x" in line and line.endswith("yes")
    line = next(t for t in text.splitlines() if t.split()[:3] == ["easy", "PPO", "SLOW"])
    assert line.split()[5] == "never" and line.endswith("no")


def test_the_table_shows_the_share_of_skipped_updates():
    """Iterations that skipped an update count over the seeds' iterations that ran (NaN
    past a seed's end does not); a strategy without the metric shows "-"."""
    runs = _study_runs()
    nan = float("nan")
    runs["easy", "FAST"] = dataclasses.replace(
        runs["easy", "FAST"],
        metrics={
            "env_steps": jnp.array([[10.0, 10, 10, 10], [10, 10, nan, nan]]),
            "skipped_updates": jnp.array([[0.0, 3, 0, 0], [1, 0, nan, nan]]),
            "grad_norm": jnp.array([[1.0, nan, 2, 4], [nan, 8, nan, nan]]),
        },
    )
    health = study.gradient_health(runs["easy", "FAST"])
    assert health == {"updates": 6, "skipped": 2 / 6, "grad_norm_max": 8.0, "grad_norm_median": 3.0}
    assert study.gradient_health(runs["easy", "PPO"]) is None
    text = study.format_summary(study.summary(runs))
    rows = [t.split() for t in text.splitlines()[-6:]]
    assert [r[-1] for r in rows if r[:2] == ["easy", "FAST"]] == ["33.3%"]
    assert [r[-1] for r in rows if r[:2] == ["easy", "PPO"]] == ["-"]


def test_the_ratio_interval_resamples_seeds_on_both_sides():
    steps = np.arange(5) * 1000.0
    staggered = np.array([[0, 1, 1, 1, 1], [0, 0, 1, 1, 1], [0, 0, 0, 1, 1], [0, 0, 0, 0, 1]])
    varied = _ratios.Side(staggered.astype(float), steps, steps / 1000, 0.0)
    fixed = _ratios.Side(np.tile([0.0, 1, 1, 1, 1], (4, 1)), steps, steps / 1000, 0.0)
    assert list(_ratios.first_held(staggered.astype(float), 1.0)) == [1, 2, 3, -1]
    one = _ratios.crossing_ratios(varied, fixed, 0.5)  # mean curve 0, .25, .5, .75, 1
    value, low, high = one["steps_ratio"]
    assert value == 2.0 and low < 2.0 < high  # the reference's seeds were resampled
    other = _ratios.crossing_ratios(fixed, varied, 0.5)
    value, low, high = other["steps_ratio"]
    assert value == 0.5 and low < 0.5 < high  # and the contender's
    assert 0 < other["never"] < 0.5 and 0 < one["never"] < 0.5
    assert study.verdict([3.0, 1.5, 4.0]) == "yes" and study.verdict([3.0, 0.9, 4.0]) != "yes"


def test_a_ratio_is_sooner_only_where_the_evaluation_grid_resolves_it():
    # both first hold the target at their second evaluation, on grids 32 steps apart
    held_from = lambda i: np.tile((np.arange(5) >= i).astype(float), (5, 1))  # noqa: E731
    ref = _ratios.Side(held_from(1), np.arange(5) * 20_000.0, np.arange(5.0), 0)
    other = ref._replace(steps=np.arange(5) * 19_968.0)
    ratios = _ratios.crossing_ratios(ref, other, 0.5)
    value, low, _ = ratios["steps_ratio"]
    assert value == low == 20_000 / 19_968  # the seed interval excludes 1 ...
    assert ratios["steps_resolved"] == [0.0, np.inf]  # ... the grid does not: (0, 20k]
    assert study.verdict(ratios["steps_ratio"], ratios["steps_resolved"]) == "grid"
    later = other._replace(scores=held_from(3))
    ratios = _ratios.crossing_ratios(later, ref, 0.5)  # (39,936, 59,904] against (0, 20k]
    assert ratios["steps_resolved"] == [39_936 / 20_000, np.inf]
    assert study.verdict(ratios["steps_ratio"], ratios["steps_resolved"]) == "yes"
    ratios = _ratios.crossing_ratios(ref, later, 0.5)
    assert ratios["steps_resolved"] == [0.0, 20_000 / 39_936]
    assert study.verdict(ratios["steps_ratio"], ratios["steps_resolved"]) == "no"
    # ES: one update of 64,000 env steps between evaluations 1 and 2 (0, 0, 64k, 64k, 64k):
    # its crossing at 64k is exact; APG's (updates of 2,000) lies in (2k, 20k]
    es = _ratios.Side(held_from(2), np.array([0, 0, 64e3, 64e3, 64e3]), np.arange(5.0), 0, 64e3)
    apg = ref._replace(iteration=2_000.0)
    ratios = _ratios.crossing_ratios(es, apg, 0.5)
    assert ratios["steps_resolved"] == [64_000 / 20_000, 64_000 / 2_000]
    assert study.verdict(ratios["steps_ratio"], ratios["steps_resolved"]) == "yes"


def test_no_target_where_a_side_did_not_learn():
    table = study.summary(_study_runs(), references=("PPO",))
    hard = [r for r in table["crossings"] if r["env"] == "hard"]
    assert [r["strategy"] for r in hard] == ["FAST"]
    assert hard[0]["target"] is None and "steps_ratio" not in hard[0]
    lines = study.format_summary(table).splitlines()
    assert any(line.startswith("hard") and "did not learn" in line for line in lines)


def test_untrained_row_p_over_untrained_and_learned():
    table = study.summary(_study_runs(), references=("PPO",))
    cells = {(r["env"], r["strategy"]): r for r in table["cells"]}
    assert cells["easy", "FAST"]["untrained"] == pytest.approx(-100.0)
    assert cells["easy", "FAST"]["p_over_untrained"] == 1.0
    assert cells["easy", "FAST"]["learned"] is True
    assert cells["hard", "PPO"]["learned"] is False  # ends at -51 from -50
    assert cells["hard", "PPO"]["p_over_untrained"] < 0.5
    untrained = {r["env"]: r for r in table["untrained"]}
    assert untrained["easy"]["seeds"] == 15  # every cell's seeds at env step 0
    assert untrained["easy"]["score"] == pytest.approx(-100.0)
    lines = study.format_summary(table).splitlines()
    head = next(line for line in lines if line.startswith("env ") and "P(>untr.)" in line)
    assert "learned" in head and "P(>PPO)" in head
    assert any(line.split()[:2] == ["easy", "untrained"] for line in lines)
    fast = next(line for line in lines if line.split()[:2] == ["easy", "FAST"])
    assert fast.split()[-3:] == ["1.00", "yes", "1.00"]  # P(>untr.), learned, P(>PPO)


def test_fewer_than_5_seeds_print_a_mean_not_an_iqm():
    table = study.summary(_study_runs(), references=("PPO",))
    cells = {(r["env"], r["strategy"]): r for r in table["cells"]}
    few, many = cells["few", "PPO"], cells["easy", "PPO"]
    assert (few["seeds"], few["stat"], many["stat"]) == (3, "mean", "IQM")
    scores = np.array([-12.0, -11.0, -10.0])
    assert few["final"] == pytest.approx(scores.mean())
    lines = study.format_summary(table).splitlines()
    row = next(line for line in lines if line.split()[:2] == ["few", "PPO"])
    assert row.split()[3:5] == ["3", "mean"]
    assert aggregate(np.array([0.0, 1, 100])) == pytest.approx(101 / 3)
    assert aggregate(np.array([0.0, 1, 2, 3, 100])) == pytest.approx(
        iqm(np.array([0, 1, 2, 3, 100]))
    )


def test_the_table_carries_its_provenance(tmp_path):
    prov = diffsim.results.provenance()
    table = study.summary(_study_runs(), references=("PPO",))
    path = study.write_summary(tmp_path, table, provenance=prov, command="python studies/x.py")
    text = path.read_text()
    assert f"# commit: {prov['commit']}" in text
    assert "# written by: python studies/x.py" in text
    assert f"jax {prov['versions']['jax']}" in text and "brax" in text and "mujoco" in text
    assert f"{prov['machine']['cpu_count']} CPUs" in text
    record = json.loads((tmp_path / "table.json").read_text())
    assert record["provenance"]["commit"] == prov["commit"]
    assert record["provenance"]["machine"]["accelerator"] == prov["machine"]["accelerator"]
    assert record["command"] == "python studies/x.py"


# --- reuse, code hash, failures ------------------------------------------------------------


def test_a_changed_computation_retrains_the_cell_and_an_unchanged_one_loads(tmp_path, capsys):
    """The key is the cell's computation: the same cell loads; a wider network from a
    factory of the same name, or another reward, retrains, naming the program."""
    env = diffsim.make_env("reach")
    cell = study.Cell(env, "PPO", TINY, _policy, STEPS)
    first = study.run_study("c", [cell], out=tmp_path, num_seeds=2, **QUIET)
    settings = first["reach", "PPO"].config["study"]["settings"]
    assert settings["program"].startswith("sha256:") and settings["protocol"] >= 2
    study.run_study("c", [cell], out=tmp_path, num_seeds=2, **QUIET)
    assert "finished earlier" in capsys.readouterr().out
    global _WIDTH  # the same factory, by name and by object, now builds a wider network
    _WIDTH = 16
    try:
        study.run_study("c", [cell], out=tmp_path, num_seeds=2, **QUIET)
    finally:
        _WIDTH = 8
    out = capsys.readouterr().out
    assert "differs in ['program']; retraining" in out and "trained, saved" in out


_WIDTH = 8


def _policy(env, key):
    return diffsim.GaussianPolicy(env.observation_size, env.action_size, hidden=(_WIDTH,), key=key)


class _FarReach(diffsim.envs.Reach):
    """Reach with another reward (the distance to the target, squared)."""

    def reward(self, s, action, next_s):
        return 2.0 * super().reward(s, action, next_s)


def _twice(x):
    return jnp.sin(x) * 2.0


def _twice_too(x):  # the same maths and name, another function object
    return jnp.sin(x) * 2.0


_twice_too.__name__ = _twice_too.__qualname__ = "_twice"


def test_the_fingerprint_does_not_depend_on_what_the_process_traced_before():
    """JAX hands out one jaxpr object for two calls that hit its tracing cache, and two
    equal objects where it missed (after other traces): the printer shows the first as a
    shared definition and the second inline. The fingerprint reads the maths, not that."""
    shared = jax.make_jaxpr(lambda x: jax.jit(_twice)(jax.jit(_twice)(x)))(1.0)
    apart = jax.make_jaxpr(lambda x: jax.jit(_twice)(jax.jit(_twice_too)(x)))(1.0)
    assert str(shared) != str(apart)  # the printer does tell them apart

    def digest(closed):
        d = hashlib.sha256()
        _fingerprint.jaxpr_digest(closed, d)
        return d.hexdigest()

    assert digest(shared) == digest(apart)
    other = jax.make_jaxpr(lambda x: jax.jit(_twice)(jax.jit(jnp.cos)(x)))(1.0)
    assert digest(other) != digest(shared)


def test_the_fingerprint_follows_the_maths():
    """Another reward, a hyperparameter or a policy width change the fingerprint; the same
    cell built twice keeps it."""
    kw = dict(num_seeds=2, total_steps=STEPS, num_evals=3, num_eval_episodes=2)
    env = diffsim.make_env("reach")
    factory = lambda k: _policy(env, k)
    key = program_fingerprint(TINY, env, factory, **kw)
    assert key == program_fingerprint(TINY, diffsim.make_env("reach"), factory, **kw)
    other = [
        program_fingerprint(
            TINY, diffsim.envs.AutoResetEnv(_FarReach(), 100, name="reach"), factory, **kw
        ),
        program_fingerprint(dataclasses.replace(TINY, gae_lambda=0.9), env, factory, **kw),
        program_fingerprint(TINY, env, lambda k: diffsim.GaussianPolicy(6, 2, key=k), **kw),
    ]
    assert len({key, *other}) == 4


FINGERPRINT = """
import sys, jax.random as jr
import diffsim
from diffsim.study import program_fingerprint
assert diffsim.__file__.startswith(sys.argv[1]), diffsim.__file__
env = diffsim.make_env("reach")
make = lambda k: diffsim.GaussianPolicy(env.observation_size, env.action_size, key=k)
strategy = diffsim.PPO(num_envs=8, unroll_length=16, num_epochs=2, num_minibatches=4)
print(program_fingerprint(strategy, env, make, num_seeds=2, total_steps=2048, num_evals=3,
                          num_eval_episodes=2))
"""

EDITS = {
    "as it is": [],
    # comments and a renamed private function in the rollout core, and a moved module
    "comments, a rename": [
        ("rollout.py", "def _act(", "# a comment\n\n\ndef _policy_action(  # another\n"),
        ("rollout.py", "_act(policy", "_policy_action(policy"),
    ],
    # a helper's maths: GAE with the discount applied twice over a done
    "gae's maths": [
        (
            "strategies/helpers.py",
            "discount * lam * (1.0 - done_t)",
            "discount * lam * (1.0 - done_t) * 0.5",
        ),
    ],
}


def test_the_fingerprint_ignores_comments_and_renames_in_the_core(tmp_path):
    """Copies of the package with edits to its source, each fingerprinting the same cell
    in a process of its own: comments and a renamed function keep the key; a change to a
    helper's maths that no strategy file shows (GAE, used by PPO) changes it."""
    package = Path(diffsim.__file__).parent
    processes = {}
    for name, edits in EDITS.items():
        root = tmp_path / name.replace(" ", "_").replace(",", "").replace("'", "")
        shutil.copytree(package, root / "diffsim", ignore=shutil.ignore_patterns("__pycache__"))
        for file, old, new in edits:
            path = root / "diffsim" / file
            text = path.read_text()
            assert old in text, (file, old)
            path.write_text(text.replace(old, new))
        env = {**os.environ, "PYTHONPATH": str(root)}
        processes[name] = subprocess.Popen(
            [sys.executable, "-c", FINGERPRINT, str(root)],
            cwd=root,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
    keys = {}
    for name, process in processes.items():
        out, err = process.communicate(timeout=600)
        assert process.returncode == 0, err[-2000:]
        keys[name] = out.strip().splitlines()[-1]
    assert keys["as it is"].startswith("sha256:")
    assert keys["comments, a rename"] == keys["as it is"]
    assert keys["gae's maths"] != keys["as it is"]


def test_restamping_writes_the_new_key_and_trains_nothing(tmp_path, monkeypatch, capsys):
    cell = study.Cell(diffsim.make_env("reach"), "PPO", TINY, gaussian, STEPS)
    study.run_study("r", [cell], out=tmp_path, num_seeds=2, **QUIET)
    folder = tmp_path / "r" / "reach" / "PPO"
    before = (folder / "policy.eqx").read_bytes()
    monkeypatch.setattr(_cells, "PROTOCOL_VERSION", 99)
    capsys.readouterr()
    study.run_study("r", [cell], out=tmp_path, num_seeds=2, restamp=True, **QUIET)
    assert "re-stamped: ['protocol']" in capsys.readouterr().out
    config = json.loads((folder / "config.json").read_text())["study"]
    assert config["settings"]["protocol"] == 99
    assert config["restamped"][0]["from"]["protocol"] != 99
    assert "commit" in config["restamped"][0]["provenance"]
    assert (folder / "policy.eqx").read_bytes() == before
    study.run_study("r", [cell], out=tmp_path, num_seeds=2, **QUIET)
    assert "finished earlier" in capsys.readouterr().out
    # a cell never trained is not invented by a re-stamp
    other = study.Cell(diffsim.make_env("pendulum"), "PPO", TINY, gaussian, STEPS)
    study.run_study("r2", [other], out=tmp_path, num_seeds=2, restamp=True, **QUIET)
    assert "not trained: nothing to re-stamp" in capsys.readouterr().out
    assert not (tmp_path / "r2" / "pendulum" / "PPO" / "config.json").exists()


def test_checking_names_what_differs_and_writes_nothing(tmp_path, monkeypatch, capsys):
    env = diffsim.make_env("reach")
    cell = study.Cell(env, "PPO", TINY, gaussian, STEPS)
    study.run_study("c", [cell], out=tmp_path, num_seeds=2, **QUIET)
    files = lambda: sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    before = files()
    capsys.readouterr()
    faster = study.Cell(env, "PPO", dataclasses.replace(TINY, learning_rate=1e-3), gaussian, STEPS)
    unseen = study.Cell(env, "APG", diffsim.APG(num_envs=4, horizon=16), deterministic, STEPS)
    runs = study.run_study(
        "c",
        [cell, unseen],
        out=tmp_path,
        num_seeds=2,
        check=True,
        **QUIET,
    )
    out = capsys.readouterr().out
    assert files() == before  # nothing trained, loaded or written
    assert runs == {("reach", "PPO"): "current", ("reach", "APG"): "not trained"}
    assert "[c] reach/PPO: current" in out
    assert "[c] reach/APG: not trained" in out
    monkeypatch.setattr(_cells, "PROTOCOL_VERSION", 99)
    states = study.run_study("c", [faster], out=tmp_path, num_seeds=2, check=True, **QUIET)
    out = capsys.readouterr().out
    stale = "stale: differs in ['program', 'protocol', 'hyperparameters.learning_rate']"
    assert stale in out and states == {("reach", "PPO"): stale}
    # A table says whether its cells were checked, and names the stale ones.
    table = study.summary(study.load_study(tmp_path / "c"))
    header = lambda stale: study.format_summary({**table, "stale": stale}, command="c").splitlines()
    assert "# cell keys: not checked against the current code" in header(None)
    assert "# cell keys: stale (saved under another key): reach/PPO" in header(["reach/PPO"])
    assert "# cell keys: current" in header([])
    with pytest.raises(ValueError, match="restamp=True and check=True"):
        study.run_study("c", [cell], out=tmp_path, restamp=True, check=True, **QUIET)


def _broken_policy(env, key):
    raise RuntimeError("this policy factory is broken")


def test_a_failed_cell_loses_no_finished_one(tmp_path):
    env = diffsim.make_env("reach")
    cells = [
        study.Cell(env, "broken", TINY, _broken_policy, STEPS),
        study.Cell(env, "PPO", TINY, gaussian, STEPS),
    ]
    with pytest.raises(RuntimeError, match=r"1 of 2 cells .*reach/broken: RuntimeError: this"):
        study.run_study("f", cells, out=tmp_path, num_seeds=2, **QUIET)
    assert list(study.load_study(tmp_path / "f")) == [("reach", "PPO")]
    assert not (tmp_path / "f" / "reach" / "broken").exists()
    assert not [p for p in (tmp_path / "f" / "reach").iterdir() if p.name.startswith(".")]
    assert not list((tmp_path / "f" / "reach").glob("*.lock"))


# --- executor, lock, atomic folders ------------------------------------------------------


def test_a_process_pool_runs_the_grid_as_one_process_would(tmp_path):
    env = diffsim.make_env("reach")  # two cells of one kind: the workers share a compile
    cells = [study.Cell(env, label, TINY, gaussian, STEPS) for label in ("PPO", "PPO-2")]
    context = multiprocessing.get_context("spawn")  # JAX is multithreaded: no fork
    with ProcessPoolExecutor(2, mp_context=context) as pool:
        pooled = study.run_study("p", cells, out=tmp_path, num_seeds=2, executor=pool, **QUIET)
    assert list(pooled) == [("reach", "PPO"), ("reach", "PPO-2")]
    pids = {run.config["study"]["trained_by"]["pid"] for run in pooled.values()}
    assert os.getpid() not in pids  # trained in the workers
    alone = study.run_study("p", cells[:1], out=tmp_path / "alone", num_seeds=2, **QUIET)
    expected = alone["reach", "PPO"].curve.eval_return
    for run in pooled.values():  # the same settings and seeds: the same numbers
        np.testing.assert_array_equal(run.curve.eval_return, expected)


def test_a_dask_cluster_trains_each_cell_once(tmp_path, monkeypatch, capsys):
    """A Dask `distributed.Client` on a `LocalCluster` of two worker processes as the
    executor, with two studies of the same grid submitted at once: the cell lock makes
    each cell train once (the other task waits, then loads it), in the workers."""
    distributed = pytest.importorskip("distributed")  # the `test` extra has it
    tests = os.path.dirname(__file__)
    path = os.pathsep.join([tests, os.path.dirname(tests), os.environ.get("PYTHONPATH", "")])
    monkeypatch.setenv("PYTHONPATH", path)  # the workers import conftest's policy factory
    env = diffsim.make_env("reach")
    cells = [study.Cell(env, label, TINY, gaussian, STEPS) for label in ("PPO", "PPO-2")]
    cluster = distributed.LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
    )
    with cluster, distributed.Client(cluster) as client:
        # (Dask would merge two identical tasks into one: the two studies differ in progress)
        grid = lambda progress: study.run_study(
            "d", cells, out=tmp_path, num_seeds=2, executor=client, **{**QUIET, **progress}
        )
        with ThreadPoolExecutor(2) as both:
            runs = [both.submit(grid, dict(progress=p)) for p in (False, True)]
            first, second = [f.result() for f in runs]
    out = capsys.readouterr().out
    assert out.count(": trained, saved") == 2, out
    assert out.count(": finished earlier") == 2, out
    pids = {run.config["study"]["trained_by"]["pid"] for run in first.values()}
    assert os.getpid() not in pids and len(pids) >= 1
    for key, run in first.items():  # both studies return the one trained run
        np.testing.assert_array_equal(run.curve.eval_return, second[key].curve.eval_return)


def test_a_cell_that_cannot_travel_to_an_executor_is_refused_before_submitting(tmp_path):
    closure = lambda env, k: gaussian(env, k)
    cell = study.Cell(diffsim.make_env("reach"), "PPO", TINY, closure, STEPS)
    with ProcessPoolExecutor(1) as pool, pytest.raises(ValueError, match="top-level function"):
        study.run_study("x", [cell], out=tmp_path, executor=pool)


RACER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    sys.path[:0] = [sys.argv[3], sys.argv[4]]  # the tests, and this checkout's diffsim
    import diffsim
    from conftest import gaussian

    out, me = Path(sys.argv[1]), sys.argv[2]
    (out / f"ready-{me}").touch()
    while len(list(out.glob("ready-*"))) < 2:  # start together
        time.sleep(0.01)
    ppo = diffsim.PPO(num_envs=8, unroll_length=16, num_epochs=2, num_minibatches=4)
    cell = diffsim.study.Cell(diffsim.make_env("reach"), "PPO", ppo, gaussian,
                              4 * ppo.steps_per_iteration)
    diffsim.study.run_study("race", [cell], out=out, num_seeds=2, num_evals=3,
                            num_eval_episodes=2, progress=False)
    """
)


def test_two_processes_racing_for_a_cell_train_it_once(tmp_path):
    script = tmp_path / "racer.py"
    script.write_text(RACER)
    tests = os.path.dirname(__file__)
    racers = [
        subprocess.Popen(
            [sys.executable, str(script), str(tmp_path), str(i), tests, os.path.dirname(tests)],
            stdout=subprocess.PIPE,
            text=True,
            cwd=os.path.dirname(tests),
        )
        for i in range(2)
    ]
    outs = [r.communicate(timeout=600)[0] for r in racers]
    assert [r.returncode for r in racers] == [0, 0], outs
    trained = [o for o in outs if "reach/PPO: trained" in o]
    loaded = [o for o in outs if "reach/PPO: finished earlier" in o]
    assert (len(trained), len(loaded)) == (1, 1), outs
    run = diffsim.load_run(tmp_path / "race" / "reach" / "PPO")
    assert run.config["study"]["trained_by"]["pid"] == racers[outs.index(trained[0])].pid
    assert not list((tmp_path / "race" / "reach").glob("PPO.lock*"))


def _lock(path, pid, host, age=0.0):
    import time

    path.write_text(json.dumps({"pid": pid, "host": host, "token": "x"}))
    os.utime(path, (time.time() - age, time.time() - age))


def test_a_stale_lock_is_broken_and_a_live_one_waited_for(tmp_path):
    import socket

    path = tmp_path / "cell.lock"
    code = "import os; print(os.getpid())"
    dead = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout
    _lock(path, int(dead), socket.gethostname())  # a dead process on this host
    with CellLock(path, poll=0.01) as lock:
        assert json.loads(path.read_text()) == lock.owner
    assert not path.exists()
    _lock(path, 1, "another-host", age=1000)  # an unreachable host, silent for long
    with CellLock(path, poll=0.01, stale_after=60.0):
        assert json.loads(path.read_text())["pid"] == os.getpid()

    _lock(path, os.getppid(), socket.gethostname())  # alive: wait until it is released
    unlocked = []

    def release():
        unlocked.append(True)
        path.unlink()

    timer = threading.Timer(0.5, release)
    timer.start()
    with CellLock(path, poll=0.01):
        assert unlocked == [True]  # entered only once the holder let go
    timer.join()
    assert not path.exists()


def test_a_failed_write_leaves_the_previous_cell_folder_as_it_was(tmp_path):
    final = tmp_path / "cell"
    replace_dir(final, lambda tmp: (tmp / "config.json").write_text("old"))

    def half_then_fail(tmp):
        (tmp / "config.json").write_text("new")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        replace_dir(final, half_then_fail)
    assert (final / "config.json").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["cell"]
    replace_dir(final, lambda tmp: (tmp / "config.json").write_text("new"))
    assert (final / "config.json").read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["cell"]


def test_the_tuning_table_shows_the_choice_and_flags_one_at_the_edge_of_the_search():
    runs = _study_runs()
    search = {"learning_rate": [1e-4, 1e-3, 1e-2]}
    for label, best in (("PPO", 1), ("FAST", 2)):
        runs["easy", label].config["study"] = {
            "tuning": {
                "search": search,
                "configs": [{"learning_rate": v} for v in search["learning_rate"]],
                "tuning_seeds": 2,
                "stat": "mean",
                "scores": [-30.0, -20.0, -25.0] if best == 1 else [-9.0, -8.0, -7.0],
                "chosen_index": best,
                "chosen": {"learning_rate": search["learning_rate"][best]},
                "seconds": {"compile": 1.0, "train": 2.0, "eval": 0.5, "checkpoint": 0.0},
            }
        }
    lines = study.format_summary(study.summary(runs)).splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("Tuning"))
    rows = {tuple(line.split()[:2]): line.split() for line in lines[start + 2 :]}
    assert rows["easy", "PPO"][2:7] == ["3", "2", "learning_rate=0.001", "-20.0", "-30.0"]
    assert rows["easy", "FAST"][4] == "learning_rate=0.01*"
    assert rows["easy", "SLOW"][2:4] == ["1", "-"] and "(not tuned)" in " ".join(
        rows["easy", "SLOW"]
    )


def test_a_search_is_widened_past_the_edge_it_picks():
    tried = [{"learning_rate": v} for v in (1e-4, 1e-3, 1e-2)]
    widen = lambda best: _tuning.widened(TINY, tried, {"learning_rate": best})
    assert widen(1e-2) == {"learning_rate": [0.1, 1.0, 10.0]}
    assert widen(1e-4) == {"learning_rate": [1e-5, 1e-6, 1e-7]}
    assert widen(1e-3) is None  # interior: bracketed
    lam = [{"gae_lambda": v} for v in (0.6, 0.8)]  # past 1 the strategy refuses: stop there
    assert _tuning.widened(TINY, lam, {"gae_lambda": 0.8}) is None
    two = [{"learning_rate": 1e-3, "gae_lambda": 0.9}, {"learning_rate": 1e-2, "gae_lambda": 0.9}]
    assert _tuning.widened(TINY, two, two[1]) is None  # one-field searches only


def test_final_scores_compare_only_at_the_same_budget():
    """A contender trained on a third of PPO's budget still gets its first crossing of PPO's
    final score, but no P(>PPO): final returns after different budgets do not compare."""
    runs = _study_runs()
    runs["easy", "SHORT"] = _run([-100, -9, -5] + OFFSETS, [0, 500, 1300])
    table = study.summary(runs, references=("PPO",))
    cells = {(r["env"], r["strategy"]): r for r in table["cells"]}
    assert cells["easy", "SHORT"]["p_over_PPO"] is None
    assert cells["easy", "FAST"]["p_over_PPO"] == 1.0  # the same budget: compared
    short = next(r for r in table["crossings"] if r["strategy"] == "SHORT")
    assert (short["steps"], short["steps_ratio"][0]) == (500, pytest.approx(6.0))
    lines = study.format_summary(table).splitlines()
    row = next(x for x in lines if x.split()[:2] == ["easy", "SHORT"] and "yes" in x)
    assert row.split()[-1] == "-"  # P(>PPO)
