"""Checkpoints, kills, determinism across processes, and results folders that cannot be written."""

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap

import jax
import jax.random as jr
import numpy as np
import pytest
from conftest import COMPILE, compiles, gaussian

import diffsim
from diffsim import cli
from diffsim._train import checkpoint as _checkpoint

TINY = diffsim.PPO(num_envs=8, unroll_length=16, num_epochs=2, num_minibatches=4)
ARGS = dict(
    total_steps=12 * TINY.steps_per_iteration, num_evals=13, num_eval_episodes=4, progress=False
)

# A child process that trains TINY on reach, into `out` as a run ("plain") or as checkpoints
# ("kill"), killing itself (SIGKILL) inside the write of checkpoint KILLED_AT: its files
# written and synced, the rename that would complete it not yet done.
KILLED_AT = 4
CHILD = textwrap.dedent(
    f"""
    import os, signal, sys
    import jax.random as jr
    import diffsim
    from diffsim._train import checkpoint as _checkpoint

    out, mode = sys.argv[1], sys.argv[2]

    def kill_inside_the_write(tmp, index):
        if index == {KILLED_AT}:
            os.kill(os.getpid(), signal.SIGKILL)

    if mode == "kill":
        _checkpoint._before_rename = kill_inside_the_write
    env = diffsim.make_env("reach")
    policy = diffsim.GaussianPolicy(env.observation_size, env.action_size, key=jr.key(1))
    ppo = diffsim.PPO(num_envs=8, unroll_length=16, num_epochs=2, num_minibatches=4)
    kwargs = dict(total_steps=12 * ppo.steps_per_iteration, num_evals=13, num_eval_episodes=4, progress=False)
    if mode == "kill":
        diffsim.train(ppo, env, policy, key=jr.key(5), checkpoint_dir=out, **kwargs)
    else:
        diffsim.train(ppo, env, policy, key=jr.key(5), **kwargs).save(out)
    """
)


def _child(tmp_path, out, mode):
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    env = {**os.environ, "DIFFSIM_CACHE_DIR": os.environ["DIFFSIM_CACHE_DIR"]}
    return subprocess.Popen([sys.executable, str(script), str(out), mode], env=env)


def _recording_saves(monkeypatch) -> dict[int, tuple[list[np.ndarray], dict[str, np.ndarray]]]:
    """Record what each checkpoint save of this process is given: index -> (the carry's
    leaves as stored, the history)."""
    saved, save = {}, _checkpoint.save

    def recording(root, index, carry, history, meta):
        leaves = [_checkpoint.key_data(x) for x in jax.tree.leaves(carry)]
        saved[index] = (leaves, {k: np.array(v) for k, v in history.items()})
        return save(root, index, carry, history, meta)

    monkeypatch.setattr(_checkpoint, "save", recording)
    return saved


def test_killed_run_resumes_to_the_uninterrupted_result(tmp_path, monkeypatch):
    """A process killed inside the write of checkpoint 4 leaves checkpoint 3 complete,
    holding what an uninterrupted run saves at evaluation 3; resuming from it ends bit for
    bit where the uninterrupted run ends."""
    ckpt = tmp_path / "ckpt"
    child = _child(tmp_path, ckpt, "kill")
    saved = _recording_saves(monkeypatch)  # meanwhile, the uninterrupted run here
    env = diffsim.make_env("reach")
    policy = gaussian(env, key=jr.key(1))
    straight = diffsim.train(
        TINY, env, policy, key=jr.key(5), checkpoint_dir=tmp_path / "straight", **ARGS
    )
    assert child.wait(timeout=600) == -signal.SIGKILL  # killed by the hook, not finished
    assert sorted(p.name for p in ckpt.iterdir()) == ["ckpt-000003", "ckpt-000004.tmp"]

    kept = ckpt / "ckpt-000003"
    assert json.loads((kept / "meta.json").read_text())["index"] == KILLED_AT - 1
    leaves, history = saved[KILLED_AT - 1]
    with np.load(kept / "carry.npz") as data:
        assert set(data.files) == {f"leaf_{i}" for i in range(len(leaves))}
        for i, leaf in enumerate(leaves):
            np.testing.assert_array_equal(data[f"leaf_{i}"], leaf)
    with np.load(kept / "history.npz") as data:
        assert set(data.files) == set(history)
        for name in set(history) - {"seconds"}:  # seconds: each process's own clock
            np.testing.assert_array_equal(data[name], history[name])

    resumed = diffsim.train(TINY, env, policy, key=jr.key(5), resume_from=ckpt, **ARGS)
    np.testing.assert_array_equal(resumed.curve.eval_return, straight.curve.eval_return)
    np.testing.assert_array_equal(resumed.curve.env_steps, straight.curve.env_steps)
    assert resumed.metrics.keys() == straight.metrics.keys()
    for name in straight.metrics:
        np.testing.assert_array_equal(resumed.metrics[name], straight.metrics[name])
    for a, b in zip(jax.tree.leaves(resumed.policy), jax.tree.leaves(straight.policy), strict=True):
        np.testing.assert_array_equal(a, b)


def _train_until_a_checkpoint_fails(env, folder, index: int, reason: str, newest: str) -> None:
    """Train TINY on `env` with checkpoints in `folder`; the write of checkpoint `index`
    fails for `reason`, and the error names `newest` as the newest complete checkpoint."""
    match = f"could not write checkpoint {index} to .*{folder.name}: {reason};"
    with pytest.raises(OSError, match=f"{match} the newest complete checkpoint is {newest}"):
        diffsim.train(TINY, env, gaussian(env), key=jr.key(5), checkpoint_dir=folder, **ARGS)


def test_a_write_failing_before_its_rename_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    """An I/O error inside the write of checkpoint 4 (its files written, not yet renamed):
    `train` names checkpoint 3 as the newest complete one, removes the partial folder, and
    checkpoint 3 holds what was saved at evaluation 3."""

    def fail_inside_the_write(tmp, index):
        if index == KILLED_AT:
            raise OSError(errno.EIO, "injected I/O error")

    saved = _recording_saves(monkeypatch)
    monkeypatch.setattr(_checkpoint, "_before_rename", fail_inside_the_write)
    env = diffsim.make_env("reach")
    _train_until_a_checkpoint_fails(env, tmp_path / "ckpt", 4, "injected I/O error", "ckpt-000003")
    assert [p.name for p in (tmp_path / "ckpt").iterdir()] == ["ckpt-000003"]
    with np.load(tmp_path / "ckpt" / "ckpt-000003" / "history.npz") as data:
        np.testing.assert_array_equal(data["eval_return"], saved[3][1]["eval_return"])
        np.testing.assert_array_equal(data["seconds"], saved[3][1]["seconds"])


def test_same_key_bit_identical_across_processes(tmp_path):
    children = [_child(tmp_path, tmp_path / f"run{i}", "plain") for i in range(2)]
    assert [c.wait() for c in children] == [0, 0]
    a, b = (diffsim.load_run(tmp_path / f"run{i}") for i in range(2))
    np.testing.assert_array_equal(a.curve.eval_return, b.curve.eval_return)
    assert a.curve.eval_return.std() > 0
    for x, y in zip(jax.tree.leaves(a.policy), jax.tree.leaves(b.policy), strict=True):
        np.testing.assert_array_equal(x, y)


def test_resume_refuses_a_different_run(tmp_path):
    env = diffsim.make_env("reach")
    diffsim.train(TINY, env, gaussian(env), key=jr.key(5), checkpoint_dir=tmp_path, **ARGS)
    with pytest.raises(ValueError, match="is from a different run"):
        diffsim.train(TINY, env, gaussian(env), key=jr.key(6), resume_from=tmp_path, **ARGS)
    with pytest.raises(FileNotFoundError, match="holds no complete checkpoint"):
        diffsim.train(
            TINY, env, gaussian(env), key=jr.key(5), resume_from=tmp_path / "nothing", **ARGS
        )


def test_unwritable_checkpoint_dir_fails_before_compiling(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    env = diffsim.make_env("reach")
    policy = gaussian(env)
    with compiles() as counts, pytest.raises(OSError, match="cannot write to .*a_file/ckpt"):
        diffsim.train(TINY, env, policy, key=jr.key(5), checkpoint_dir=blocker / "ckpt", **ARGS)
    assert counts[COMPILE] == 0  # refused before any XLA compile


def test_unwritable_study_folder_fails_before_training(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    cell = diffsim.study.Cell(diffsim.make_env("reach"), "PPO", TINY, gaussian, 10_000)
    with pytest.raises(OSError, match="cannot write"):
        diffsim.study.run_study("s", [cell], out=blocker, num_seeds=2, progress=False)


def test_study_cells_take_their_own_seeds_and_evaluations_and_resume(tmp_path, capsys):
    env, steps = diffsim.make_env("reach"), 4 * TINY.steps_per_iteration
    cells = [
        diffsim.study.Cell(env, "few", TINY, gaussian, steps, num_seeds=2, num_evals=3),
        diffsim.study.Cell(env, "fine", TINY, gaussian, steps, num_evals=5),
    ]
    study = dict(out=tmp_path, num_seeds=3, num_evals=2, num_eval_episodes=2, progress=False)
    runs = diffsim.study.run_study("s", cells, **study)
    assert runs["reach", "few"].curve.eval_return.shape == (2, 3, 2)
    assert runs["reach", "fine"].curve.eval_return.shape == (3, 5, 2)
    again = diffsim.study.run_study("s", cells, **study)
    assert capsys.readouterr().out.count("finished earlier") == 2
    for key, run in runs.items():
        np.testing.assert_array_equal(again[key].curve.eval_return, run.curve.eval_return)
    diffsim.study.run_study("s", cells[1:], **study)  # a process training part of the grid
    assert list(diffsim.study.load_study(tmp_path / "s")) == [("reach", "few"), ("reach", "fine")]


def test_a_cell_killed_while_training_resumes_its_finished_search(tmp_path):
    """A process killed while it re-trains a tuned cell leaves the search's rounds
    checkpointed beside the cell (`.LABEL.partial/`), and each finished round's record;
    the next run reads the record (its checkpoints gone, as in a fresh clone), trains no
    round again and saves what an uninterrupted run saves."""
    env, steps = diffsim.make_env("reach"), 3 * TINY.steps_per_iteration
    search = {"learning_rate": [1e-3, 3e-3], "clip_epsilon": [0.2]}  # two fields: one round
    cell = diffsim.study.Cell(env, "PPO", TINY, gaussian, steps, search=search)
    study = dict(num_seeds=4, tuning_seeds=2, num_evals=3, num_eval_episodes=2, progress=False)
    whole = diffsim.study.run_study("s", [cell], out=tmp_path / "whole", **study)
    save, saved = _checkpoint.save, []

    def recorded(root, index, *args):  # stops after the re-training's first segment
        saved.append((root.name, index))
        save(root, index, *args)
        if root.name == "retrain" and index == 1 and stop:
            raise KeyboardInterrupt

    out, stop = tmp_path / "killed", True
    with pytest.MonkeyPatch.context() as patch, pytest.raises(KeyboardInterrupt):
        patch.setattr(_checkpoint, "save", recorded)
        diffsim.study.run_study("s", [cell], out=out, **study)
    partial = out / "s" / "reach" / ".PPO.partial"
    assert ("round-0", 2) in saved and saved[-1] == ("retrain", 1)
    assert list(partial.glob("round-0/ckpt-000002")) and not (out / "s/reach/PPO").exists()

    # A finished round's record is enough without its checkpoints (what a commit keeps).
    assert json.loads((partial / "round-0.json").read_text())["configs"] == [
        {"learning_rate": 1e-3, "clip_epsilon": 0.2},
        {"learning_rate": 3e-3, "clip_epsilon": 0.2},
    ]
    shutil.rmtree(partial / "round-0")
    saved.clear()
    stop = False
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(_checkpoint, "save", recorded)
        resumed = diffsim.study.run_study("s", [cell], out=out, **study)
    assert saved == [("retrain", 2)]  # no round trained again; the re-training went on
    assert not partial.exists()  # the saved cell took its place
    np.testing.assert_array_equal(
        resumed["reach", "PPO"].curve.eval_return, whole["reach", "PPO"].curve.eval_return
    )
    tuned = [
        json.loads((o / "s/reach/PPO/tuning.json").read_text()) for o in (out, tmp_path / "whole")
    ]
    assert tuned[0]["scores"] == tuned[1]["scores"] and tuned[0]["configs"] == tuned[1]["configs"]


def _full_disk(folder):
    """A folder whose writability probe hits a full device: the kernel's /dev/full returns
    ENOSPC for every write, as a full disk does."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / ".write-test").symlink_to("/dev/full")
    return folder


def test_full_disk_fails_before_compiling(tmp_path, capsys):
    env = diffsim.make_env("reach")
    policy = gaussian(env)
    with (
        compiles() as counts,
        pytest.raises(OSError, match="cannot write to .*ckpt: No space left on device"),
    ):
        diffsim.train(
            TINY,
            env,
            policy,
            key=jr.key(5),
            checkpoint_dir=_full_disk(tmp_path / "ckpt"),
            **ARGS,
        )
    assert counts[COMPILE] == 0  # refused before any XLA compile
    args = [
        "train",
        "ppo",
        "--env",
        "reach",
        "--steps",
        "1000",
        "--out",
        str(_full_disk(tmp_path / "o")),
    ]
    assert cli.main(args) == 2  # at once: `--out` is checked before training
    assert "No space left on device" in capsys.readouterr().err


def test_a_checkpoint_write_that_fails_mid_run_says_so_and_leaves_no_partial_folder(tmp_path):
    """The disk fills after the start-up check: file writes beyond 8 KiB fail (RLIMIT_FSIZE,
    EFBIG), so the probe passes and the first checkpoint (the policy alone is ~40 KiB) fails."""
    import resource

    env = diffsim.make_env("reach")
    diffsim.train(TINY, env, gaussian(env), key=jr.key(5), **ARGS)  # compile outside the limit
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (8192, hard))
    try:
        _train_until_a_checkpoint_fails(env, tmp_path / "ckpt", 1, "File too large", "none")
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert list((tmp_path / "ckpt").iterdir()) == []  # the partial ckpt-000001.tmp is gone
