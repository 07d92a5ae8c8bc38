"""`render`: write one deterministic episode of a policy as a video, a strip of stills or HTML.

Brax envs are drawn by MuJoCo's offscreen renderer with a camera that tracks the root body
(headless Linux: EGL, see `diffsim._config.default_gl`); `.html` is Brax's interactive viewer. The toy
envs are drawn with matplotlib; any other env (your own, gymnax's) as a figure of its
observations, actions and reward over time (`_render/episode_plot.py`), or by a frame function
of your own (`render(..., frame=f)`). Videos are encoded by imageio (GIF through Pillow, MP4
through imageio-ffmpeg's bundled ffmpeg, from diffsim's `video` extra).
"""

import importlib.util
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import jax.random as jr
import numpy as np
from jaxtyping import Array, Float, PRNGKeyArray

from ._render.episode_plot import FrameScene, PlotScene
from ._render.scenes import MujocoScene, scene_for
from ._train.contract import check_acts
from .rollout import reset, rollout

FORMATS = (".gif", ".mp4", ".png", ".html")


class _Episode(eqx.Module):
    """One env's first episode, time-major: what `render` draws.

    **Fields:** `states` (the env's physical state before each step: Brax pipeline states,
    or a toy env's dict; leaves `[T, ...]`), `obs: Float[Array, "T obs"]` (what the policy
    saw at each step), `action: Float[Array, "T act"]`,
    `reward: Float[Array, " T"]`. `T` is the number of steps up to and including the one
    that ended the episode (or `length`).
    """

    states: Any
    obs: Float[Array, "T obs"]
    action: Float[Array, "T act"]
    reward: Float[Array, " T"]


def render(
    env,
    policy: eqx.Module,
    path: str | os.PathLike,
    *,
    key: PRNGKeyArray,
    length: int | None = None,
    fps: float | None = None,
    stills: int = 6,
    frame: Callable[[Any, np.ndarray, float], np.ndarray] | None = None,
) -> Path:
    """Write one deterministic episode of `policy` in `env` to `path`; returns `path`.

    The episode starts from `env.reset` under `key`, acts with `policy(obs)` (no key)
    through `diffsim.rollout`, and stops at the first episode end or after `length` steps.
    One frame per step, showing the state the action was taken in. The format follows the
    extension:

    - `.gif`, `.mp4`: a video at real time (`1 / env.dt` frames per second) unless `fps`.
    - `.png`: one image, a horizontal strip of `stills` evenly spaced frames (an env drawn
      as a figure of its signals: that figure, over the whole episode).
    - `.html`: Brax envs: Brax's interactive 3-D viewer (`brax.io.html`; it loads its
      JavaScript from a CDN when opened). Toy envs: a matplotlib JavaScript animation.
      Not for MuJoCo Playground envs.

    Brax and MuJoCo Playground envs are drawn by MuJoCo's offscreen renderer with a camera that tracks the root
    body from the side, so a running Ant stays in view. That needs OpenGL: on headless
    Linux diffsim selects EGL (`MUJOCO_GL=egl`) when `mujoco` is first imported; without
    any GL, `.gif`/`.mp4`/`.png` raise an error and `.html` still works. Toy envs (`reach`,
    `pendulum`, `ball`) are drawn with matplotlib. Every other env (your own
    `AbstractEnv`, gymnax's) is drawn as a figure: observations, actions and reward
    against the step, one line per entry, with a cursor moving over the steps in a
    video; or, with `frame`, by your own drawing function.

    **Arguments:**

    - `env`: an env from `diffsim.make_env`.
    - `policy`: a policy for ONE observation (for a `train_seeds` run pick one seed, e.g.
      `jax.tree.map(lambda x: x[0], run.policy)`).
    - `path`: the output file; its folder is created.
    - `key`: draws the initial state (keyword-only).
    - `length`: at most this many steps; default `env.episode_length`.
    - `fps`: video frame rate; default real time.
    - `stills`: frames in a `.png` strip.
    - `frame`: your own drawing, `frame(state, action, reward) -> uint8[H, W, 3]` (floats
      in [0, 1] work too), called once per frame (`T` times for a video of `T` steps,
      `stills` times for a `.png`) with the env's state before the step (its own pytree,
      as NumPy arrays), the action taken in it and its reward. Not for `.html`.

    **Returns:** `Path(path)`.

    **Raises:** `ValueError` for an unknown extension (before any compute), a bad
    `length`, or a policy that does not fit `env`; `OSError` naming `MUJOCO_GL` when a
    Brax frame needs OpenGL and none is available.

    **Example:**

    ```python
    env = diffsim.make_env("pendulum")
    run = diffsim.load_run("figures/runs/pendulum")
    policy = jax.tree.map(lambda x: x[0], run.policy)   # seed 0
    diffsim.render(env, policy, "pendulum.gif", key=jax.random.key(0))
    diffsim.render(env, policy, "pendulum.png", key=jax.random.key(0))   # still frames
    diffsim.render(my_env, policy, "signals.png", key=jax.random.key(0))  # any env: a figure
    ```
    """
    path = Path(path)
    suffix = _check_path(path)
    length = env.episode_length if length is None else length
    if not isinstance(length, int) or isinstance(length, bool) or length < 1:
        raise ValueError(f"length must be a positive int, got {length!r}")
    if not isinstance(stills, int) or stills < 1:
        raise ValueError(f"stills must be a positive int, got {stills!r}")
    if fps is not None and not fps > 0:
        raise ValueError(f"fps must be > 0, got {fps!r}")
    scene = scene_for(env) if frame is None else FrameScene(env, frame)
    if suffix == ".html" and isinstance(scene, FrameScene):
        raise ValueError(f"render(frame=...) writes .gif, .mp4 or .png, got {str(path)!r}")
    if suffix == ".html" and isinstance(scene, MujocoScene) and scene.sys is None:
        raise ValueError(
            f"render draws {env.name!r} (a MuJoCo Playground env) as .gif, .mp4 or .png;"
            f" .html is Brax's viewer, for Brax envs, got {str(path)!r}"
        )
    _check_policy(env, policy)
    episode = jax.device_get(_episode(env, policy, key, length))
    fps = fps or _real_time_fps(env)
    path.parent.mkdir(parents=True, exist_ok=True)
    steps = int(episode.reward.shape[0])
    if suffix == ".html":
        path.write_text(scene.html(episode, fps))
        return path
    if suffix == ".png":
        import imageio.v3 as iio

        if isinstance(scene, PlotScene):
            iio.imwrite(path, scene.png(episode))
            return path
        picks = np.unique(np.linspace(0, steps - 1, min(stills, steps)).round().astype(int))
        iio.imwrite(path, _strip(scene.frames(episode, picks)))
        return path
    frames = scene.frames(episode, np.arange(steps))
    _write_video(path, frames, fps=fps)
    return path


def _write_video(path: Path, frames: list[np.ndarray], *, fps: float) -> Path:
    """Encode RGB frames (`uint8[H, W, 3]` each) as `.gif` (Pillow) or `.mp4` (H.264 via
    imageio-ffmpeg)."""
    path = Path(path)
    suffix = path.suffix.lower()
    with warnings.catch_warnings():
        # imageio-ffmpeg starts ffmpeg with fork + exec at once: JAX's warning about forking
        # a multithreaded process does not apply.
        warnings.filterwarnings("ignore", r"os\.fork\(\) was called", RuntimeWarning)
        _encode(path, suffix, np.stack(frames), fps)
    return path


def _encode(path: Path, suffix: str, frames: np.ndarray, fps: float) -> None:
    import imageio.v3 as iio

    if suffix == ".gif":
        iio.imwrite(path, frames, extension=".gif", duration=1000 / fps, loop=0)
    elif suffix == ".mp4":
        iio.imwrite(
            path,
            frames,
            extension=".mp4",
            plugin="FFMPEG",
            fps=fps,
            codec="libx264",
            macro_block_size=1,
            quality=7,
        )
    else:
        raise ValueError(f"_write_video writes .gif or .mp4, got {str(path)!r}")


def _check_path(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix not in FORMATS:
        raise ValueError(
            f"cannot render to {str(path)!r}: unknown extension {suffix or '(none)'!r};"
            f" valid extensions: {list(FORMATS)}"
        )
    if suffix == ".mp4" and not _ffmpeg_available():
        raise ValueError(
            f"cannot render to {str(path)!r}: .mp4 needs imageio-ffmpeg, which diffsim's"
            " `video` extra installs (pip install 'diffsim[video]'); .gif, .png and .html"
            " need nothing more"
        )
    return suffix


def _ffmpeg_available() -> bool:
    """Whether imageio-ffmpeg (its bundled ffmpeg encodes `.mp4`) is installed."""
    return importlib.util.find_spec("imageio_ffmpeg") is not None


def _check_policy(env, policy) -> None:
    """The policy acts on one observation of `env` with one action: checked abstractly."""
    hint = " (a run of several seeds: pick one, jax.tree.map(lambda x: x[0], run.policy))"
    check_acts(env, policy, type(policy).__name__, hint)


@eqx.filter_jit
def _steps(env, policy, reset_key, act_key, length: int):
    """`length` steps of one env through `diffsim.rollout`, one step per scan iteration so
    that every state is kept. `env` and `length` are static: one compile per pair."""
    start = reset(env, key=reset_key, num_envs=1)

    def step(state, key):
        after, traj = rollout(env, policy, state, key=key, length=1, deterministic=True)
        seen = (traj.obs[0, 0], traj.action[0, 0], traj.reward[0, 0], traj.done[0, 0])
        return after, (state.pipeline_state, *seen)

    return jax.lax.scan(step, start, jr.split(act_key, length))[1]


def _episode(env, policy, key: PRNGKeyArray, length: int) -> _Episode:
    """The first episode from `reset(key)`, cut at its end (or at `length` steps)."""
    reset_key, act_key = jr.split(key)
    states, obs, action, reward, done = _steps(env, policy, reset_key, act_key, length)
    ended = np.flatnonzero(np.asarray(done) > 0)
    steps = int(ended[0]) + 1 if len(ended) else length
    return _Episode(
        states=jax.tree.map(lambda x: x[:steps, 0], states),
        obs=obs[:steps],
        action=action[:steps],
        reward=reward[:steps],
    )


def _real_time_fps(env) -> float:
    dt = getattr(env.unwrapped, "dt", None)
    if dt is None:
        return 30.0
    try:
        return float(np.clip(1.0 / float(dt), 1.0, 50.0))
    except (TypeError, ValueError, ZeroDivisionError):
        return 30.0


def _strip(frames: list[np.ndarray], gap: int = 4) -> np.ndarray:
    """Frames side by side with white gaps."""
    height = frames[0].shape[0]
    white = np.full((height, gap, 3), 255, np.uint8)
    parts = [p for f in frames for p in (f, white)][:-1]
    return np.concatenate(parts, axis=1)
