"""A user's own env (`diffsim.envs.AbstractEnv`) is first-class: named errors before any
compile, `make_env("MODULE:CLASS")`, a spec saved with the run, and (in new processes)
train from the CLI, load, evaluate and render (issue 33, item 3)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest
from conftest import COMPILE, compiles
from user_envs import Cart

import diffsim
from diffsim.envs import AbstractEnv

HERE = Path(__file__).resolve().parent


class _NoActSize(AbstractEnv):
    obs_size, default_episode_length = 2, 20
    init, dynamics, observe, reward = Cart.init, Cart.dynamics, Cart.observe, Cart.reward
    gain = 1.0


class _VectorReward(Cart):
    def reward(self, s, action, next_s):
        return jnp.stack([next_s["x"], next_s["v"]])  # shape (2,)


class _WrongObsSize(Cart):
    obs_size = 3  # observe gives 2 numbers


class _DroppedState(Cart):
    def dynamics(self, s, action):
        return {"x": s["x"] + action}  # no "v", and x becomes shape (1,)


@pytest.mark.parametrize(
    ("cls", "error", "match"),
    [
        (_NoActSize, TypeError, r"_NoActSize must set act_size \(an int: the length of the action"),
        (
            _VectorReward,
            ValueError,
            r"_VectorReward.reward must return a scalar \(shape \(\)\), got shape \(2,\)",
        ),  # fmt: skip
        (
            _WrongObsSize,
            ValueError,
            r"_WrongObsSize.observe must return shape \(3,\) \(obs_size = 3\), got shape \(2,\)",
        ),  # fmt: skip
        (_DroppedState, ValueError, r"_DroppedState.dynamics must return a state like init's"),
    ],
)
def test_each_bad_member_is_named_before_anything_compiles(cls, error, match):
    with compiles() as counts, pytest.raises(error, match=match):
        diffsim.make_env(cls)
    assert counts[COMPILE] == 0


def test_the_old_name_and_its_subclasses_keep_working():
    assert diffsim.envs.AbstractToyEnv is AbstractEnv is diffsim.envs.Reach.__mro__[1]
    env = diffsim.make_env(Cart, gain=2.0, episode_length=7)
    assert (env.observation_size, env.action_size, env.episode_length) == (2, 1, 7)
    assert env.spec == {
        "format": 1,
        "name": "user_envs:Cart",
        "backend": None,
        "episode_length": 7,
        "kwargs": {"gain": 2.0},
    }
    assert env.unwrapped.gain == 2.0


def test_a_spec_that_cannot_be_rebuilt_says_why():
    class Local(Cart):
        pass

    config = {"env": "Local", "env_spec": diffsim.make_env(Local).spec}
    with pytest.raises(ValueError, match=r"'Local' cannot be rebuilt: its class is defined in"):
        diffsim.envs.from_config(config)
    config["env_spec"] = diffsim.make_env(Cart, gain=jnp.float32(2.0)).spec
    with pytest.raises(ValueError, match=r"arguments \['gain'\] are not plain JSON values"):
        diffsim.envs.from_config(config)
    with pytest.raises(ValueError, match=r"env 'user_envs:Nope': cannot load 'Nope'"):
        diffsim.make_env("user_envs:Nope")


NEW_PROCESS = """
import json, sys
import jax, diffsim
run = diffsim.load_run(sys.argv[1])
assert "user_envs" not in sys.modules, "load_run imported the env's module"
env = run.make_env()
assert "user_envs" in sys.modules and env.unwrapped.gain == 2.0
policy = jax.tree.map(lambda x: x[0], run.policy)
returns = diffsim.evaluate(env, policy, key=jax.random.key(0), num_episodes=2)
from diffsim import cli
assert cli.main(["render", sys.argv[1], "-o", sys.argv[2]]) == 0
print(json.dumps({"returns": returns.tolist(), "spec": run.config["env_spec"]}))
"""


def test_a_user_env_trains_from_the_cli_then_loads_evaluates_and_renders_anew(tmp_path):
    """Two fresh processes, in the folder holding `user_envs.py` (as a user would)."""
    environ = {**os.environ, "PYTHONPATH": str(HERE.parent)}
    run, image = tmp_path / "run", tmp_path / "cart.png"
    train = [sys.executable, "-m", "diffsim.cli", "train", "apg", "--env", "user_envs:Cart"]
    train += ["--env-arg", "gain=2.0", "--steps", "400", "--num-envs", "2", "--horizon", "10"]
    train += ["--num-evals", "2", "--eval-episodes", "2", "--seeds", "2", "--out", str(run)]
    done = subprocess.run(train, cwd=HERE, env=environ, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "APG on user_envs:Cart" in done.stdout
    code = [sys.executable, "-c", NEW_PROCESS, str(run), str(image)]
    done = subprocess.run(code, cwd=HERE, env=environ, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["spec"]["name"] == "user_envs:Cart"
    assert report["spec"]["kwargs"] == {"gain": 2.0}
    assert len(report["returns"]) == 2 and all(r < 0 for r in report["returns"])
    assert image.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_apg_gradient_flows_through_a_user_env(key):
    env = diffsim.make_env(Cart)
    state = diffsim.reset(env, key=key, num_envs=1)

    def window(actions):
        def step(s, a):
            s = jax.vmap(env.step)(s, a[None])
            return s, s.reward[0]

        return jax.lax.scan(step, state, actions)[1].sum()

    grad = jax.grad(window)(jnp.full((5, 1), 0.1))
    assert jnp.all(jnp.isfinite(grad)) and jnp.abs(grad[0]).sum() > 0
