"""`diffsim.render` and `diffsim render`: toy envs through matplotlib, Brax envs through
MuJoCo (EGL when headless), videos through imageio."""

import base64
import ctypes.util
import importlib
import json
import os
import re
import warnings
import zlib

import equinox as eqx
import imageio.v3 as iio
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

import diffsim
from diffsim import cli

STEPS = 24  # a short pendulum episode
BRAX_STEPS = 12
_render_module = importlib.import_module("diffsim.render")  # `diffsim.render`: the function


class Constant(eqx.Module):
    """Always the same action, so a Brax arm visibly moves."""

    action: jax.Array

    def __call__(self, obs, *, key=None):
        return self.action


@pytest.fixture(scope="module")
def pendulum():
    return diffsim.make_env("pendulum", episode_length=STEPS)


@pytest.fixture(scope="module")
def swinging(pendulum):
    return diffsim.GaussianPolicy(
        pendulum.observation_size, pendulum.action_size, hidden=(8,), key=jr.key(0)
    )


def _frames(path):
    plugin = "FFMPEG" if path.suffix == ".mp4" else None
    with warnings.catch_warnings():  # reading an mp4 starts ffmpeg (fork + exec)
        warnings.filterwarnings("ignore", r"os\.fork\(\) was called", RuntimeWarning)
        return iio.imread(path, index=None, plugin=plugin)


@pytest.mark.parametrize("ext", [".gif", ".mp4"])
def test_toy_env_video_has_one_frame_per_step(pendulum, swinging, key, tmp_path, ext):
    # length beyond the episode: the video stops at the first episode end.
    path = diffsim.render(pendulum, swinging, tmp_path / f"a{ext}", key=key, length=3 * STEPS)
    frames = _frames(path)
    assert frames.shape == (STEPS, 320, 320, 3)
    assert np.abs(np.diff(frames.astype(float), axis=0)).max(axis=(1, 2, 3)).min() > 0
    assert frames.std() > 10  # a drawing, not a blank canvas


def test_length_cuts_the_episode_and_png_is_a_strip(pendulum, swinging, key, tmp_path):
    assert (
        _frames(diffsim.render(pendulum, swinging, tmp_path / "a.gif", key=key, length=5)).shape[0]
        == 5
    )
    strip = iio.imread(diffsim.render(pendulum, swinging, tmp_path / "s.png", key=key, stills=4))
    assert strip.shape[:2] == (320, 4 * 320 + 3 * 4)
    tiles = [strip[:, i * 324 : i * 324 + 320] for i in range(4)]
    assert all(not np.array_equal(a, b) for a, b in zip(tiles[:-1], tiles[1:], strict=True))


def test_toy_html_is_a_javascript_animation(pendulum, swinging, key, tmp_path):
    text = diffsim.render(pendulum, swinging, tmp_path / "a.html", key=key).read_text()
    assert "<script" in text and text.count("data:image/png;base64") == STEPS


def test_bad_extension_fails_before_any_compute(pendulum, tmp_path):
    misfit = diffsim.DeterministicPolicy(7, 1, hidden=(4,), key=jr.key(0))  # cannot act here
    with pytest.raises(ValueError, match=r"'\.avi'.*\['\.gif', '\.mp4', '\.png', '\.html'\]"):
        diffsim.render(pendulum, misfit, tmp_path / "x.avi", key=jr.key(0))
    assert not (tmp_path / "x.avi").exists()
    with pytest.raises(ValueError, match="length must be a positive int"):
        diffsim.render(pendulum, misfit, tmp_path / "x.gif", key=jr.key(0), length=0)
    with pytest.raises(ValueError, match="cannot act on one observation"):
        diffsim.render(pendulum, misfit, tmp_path / "x.gif", key=jr.key(0))


def test_policy_of_many_seeds_is_refused_with_a_hint(pendulum, tmp_path):
    make = lambda k: diffsim.DeterministicPolicy(3, 1, hidden=(4,), key=k)
    seeds = eqx.filter_vmap(make)(jr.split(jr.key(0), 2))
    with pytest.raises(ValueError, match=r"pick one"):
        diffsim.render(pendulum, seeds, tmp_path / "x.gif", key=jr.key(0))


# --- Brax: MuJoCo offscreen through EGL, and Brax's HTML viewer -------------------------


@pytest.fixture(scope="module")
def reacher():
    return diffsim.make_env("reacher")


@pytest.fixture(scope="module")
def arm(reacher):
    return Constant(jnp.full(reacher.action_size, 0.9))


NO_GL = (
    "no headless OpenGL for MuJoCo: MUJOCO_GL={gl!r} and libEGL {egl}. Install Mesa EGL"
    " (apt-get install libegl1 libegl-mesa0 libgl1-mesa-dri) and set MUJOCO_GL=egl"
)


@pytest.fixture
def headless_gl():
    """Skip where no headless GL is installed; fail in CI (`$CI` set), which installs
    Mesa EGL so that a Brax frame is drawn on every run."""
    gl = os.environ.get("MUJOCO_GL", "").lower()
    egl = ctypes.util.find_library("EGL")
    if gl == "osmesa" or (gl in ("egl", "") and egl is not None):  # "": diffsim picks EGL
        return
    reason = NO_GL.format(gl=gl, egl="is missing" if egl is None else f"is {egl}")
    if os.environ.get("CI"):
        pytest.fail(reason)
    pytest.skip(reason)


def test_brax_strip_and_gif_through_egl(headless_gl, reacher, arm, key, tmp_path):
    strip = iio.imread(
        diffsim.render(reacher, arm, tmp_path / "r.png", key=key, length=BRAX_STEPS, stills=3)
    )
    assert strip.shape == (240, 3 * 320 + 2 * 4, 3)
    first, last = strip[:, :320], strip[:, -320:]
    assert np.abs(first.astype(float) - last).mean() > 0.5  # the arm moved
    frames = _frames(diffsim.render(reacher, arm, tmp_path / "r.gif", key=key, length=BRAX_STEPS))
    assert frames.shape == (BRAX_STEPS, 240, 320, 3) and frames.std() > 10


def test_brax_html_holds_the_system_json(reacher, arm, key, tmp_path):
    text = diffsim.render(reacher, arm, tmp_path / "r.html", key=key, length=BRAX_STEPS).read_text()
    blob = max(re.findall(r"[A-Za-z0-9+/=]{200,}", text), key=len)
    system = json.loads(zlib.decompress(base64.b64decode(blob)))
    assert {"geoms", "states"} <= set(system)
    assert len(system["states"]["x"]) == BRAX_STEPS


def test_no_gl_is_a_clear_error_and_html_still_works(reacher, arm, key, tmp_path, monkeypatch):
    import mujoco

    def no_context(*args, **kwargs):
        raise RuntimeError("could not create an OpenGL context")

    monkeypatch.setattr(mujoco, "Renderer", no_context)
    with pytest.raises(OSError, match=r"MUJOCO_GL.*\.html needs no OpenGL"):
        diffsim.render(reacher, arm, tmp_path / "r.gif", key=key, length=BRAX_STEPS)
    assert diffsim.render(reacher, arm, tmp_path / "r.html", key=key, length=BRAX_STEPS).exists()


# --- Any env: a figure of its signals, or the user's frame function ----------------------


@pytest.fixture(scope="module")
def cart():
    from user_envs import Cart

    return diffsim.make_env(Cart, episode_length=5)


@pytest.fixture(scope="module")
def pusher(cart):
    return Constant(jnp.array([0.5]))


def test_an_env_without_a_picture_is_drawn_as_its_signals(cart, pusher, key, tmp_path):
    """A PNG of observations, actions and reward: one line per entry (2 + 1 + 1), plus one
    cursor per panel that only a video shows."""
    from diffsim._render import episode_plot

    path = diffsim.render(cart, pusher, tmp_path / "cart.png", key=key)
    assert iio.imread(path).shape == (384, 512, 3)
    episode = _render_module._episode(cart, pusher, key, 5)
    fig, _ = episode_plot.episode_figure(episode, cart.name)
    assert [len(ax.lines) - 1 for ax in fig.axes] == [2, 1, 1]
    action = fig.axes[1].lines[0].get_ydata()
    np.testing.assert_allclose(action, 0.5)  # the plotted values are the episode's
    np.testing.assert_allclose(fig.axes[2].lines[0].get_ydata(), episode.reward)
    assert _frames(diffsim.render(cart, pusher, tmp_path / "cart.gif", key=key)).shape[0] == 5


def test_a_frame_function_draws_every_step(cart, pusher, key, tmp_path):
    calls = []

    def frame(state, action, reward):
        calls.append((float(state["x"]), float(action[0]), reward))
        return np.full((16, 24, 3), len(calls) / 10)  # floats in [0, 1]; differing frames

    path = diffsim.render(cart, pusher, tmp_path / "own.gif", key=key, frame=frame)
    frames = _frames(path)
    assert len(calls) == frames.shape[0] == 5 and frames.shape[1:3] == (16, 24)
    assert [a for _, a, _ in calls] == [0.5] * 5
    with pytest.raises(ValueError, match=r"frame=\.\.\.\) writes .gif, .mp4 or .png"):
        diffsim.render(cart, pusher, tmp_path / "own.html", key=key, frame=frame)


# --- The command ------------------------------------------------------------------------


def test_cli_renders_a_saved_run(pendulum, tmp_path, capsys):
    make = lambda k: diffsim.GaussianPolicy(3, 1, hidden=(8,), key=k)
    policies = eqx.filter_vmap(make)(jr.split(jr.key(0), 2))
    curve = diffsim.LearningCurve(
        env_steps=jnp.zeros((2, 2), jnp.int32),
        wall_time=jnp.zeros((2, 2)),
        eval_return=jnp.zeros((2, 2, 4)),
    )
    config = {"env": "pendulum", "backend": "jax", "episode_length": STEPS, "num_seeds": 2}
    run = diffsim.Run(policy=policies, curve=curve, metrics={}, config=config)
    folder = run.save(tmp_path / "run")

    assert cli.main(["render", str(folder), "-o", str(tmp_path / "a.gif"), "--seed", "1"]) == 0
    assert _frames(tmp_path / "a.gif").shape[0] == STEPS
    assert "wrote" in capsys.readouterr().out
    # Seed 1 is seed 1's policy: the same frames as rendering it directly.
    one = jax.tree.map(lambda x: x[1], policies)
    direct = diffsim.render(pendulum, one, tmp_path / "b.gif", key=jr.key(0))
    np.testing.assert_array_equal(_frames(direct), _frames(tmp_path / "a.gif"))

    assert cli.main(["render", str(folder), "-o", str(tmp_path / "c.png"), "--length", "3"]) == 0
    assert cli.main(["render", str(folder), "-o", str(tmp_path / "x.gif"), "--seed", "2"]) == 2
    assert "--seed 2 is out of range" in capsys.readouterr().err
    assert cli.main(["render", str(tmp_path / "missing"), "-o", str(tmp_path / "x.avi")]) == 2
    assert "unknown extension '.avi'" in capsys.readouterr().err
