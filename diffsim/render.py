"""`render`: write one deterministic episode of a policy as a video, a strip of stills or HTML.

Brax envs are drawn by MuJoCo's offscreen renderer with a camera that tracks the root body
(headless Linux: EGL, see `diffsim._gl`); `.html` is Brax's interactive viewer. The toy
envs are drawn with matplotlib; any other env (your own, gymnax's) as a figure of its
observations, actions and reward over time (`_episode_plot.py`), or by a frame function
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

from ._contract import check_acts
from ._episode_plot import FrameScene, PlotScene
from .envs._toy import Ball, Pendulum, Reach
from .rollout import reset, rollout

FORMATS = (".gif", ".mp4", ".png", ".html")
_SIZE = (320, 240)  # width, height of Brax frames; multiples of 16, as H.264 wants
_TOY_INCHES, _TOY_DPI = 4.0, 80  # 320 x 320 toy frames


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
    scene = _scene(env) if frame is None else FrameScene(env, frame)
    if suffix == ".html" and isinstance(scene, FrameScene):
        raise ValueError(f"render(frame=...) writes .gif, .mp4 or .png, got {str(path)!r}")
    if suffix == ".html" and isinstance(scene, _MujocoScene) and scene.sys is None:
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


# ---------------------------------------------------------------------------------------
# Scenes: how one kind of env turns an Episode into frames and HTML.


class _MujocoScene:
    """MuJoCo offscreen frames with a tracking camera, for Brax envs (their `sys.mj_model`,
    states with `q`, `qd`) and Playground's (their `mj_model`, MJX data with `qpos`,
    `qvel`); Brax's HTML viewer for Brax envs."""

    def __init__(self, env):
        inner = env.unwrapped
        self.env = env
        self.sys = getattr(inner, "sys", None)  # Brax's System; None for Playground envs
        self.model = inner.sys.mj_model if self.sys is not None else inner.mj_model

    def frames(self, episode: _Episode, picks) -> list[np.ndarray]:
        import mujoco as _mujoco

        mujoco: Any = _mujoco  # a compiled module: its attributes are not visible to pyright
        model = self.model
        try:
            renderer = mujoco.Renderer(model, height=_SIZE[1], width=_SIZE[0])
        except Exception as error:  # no GL context of any kind: say how to get one
            raise OSError(
                f"cannot draw {self.env.name!r}: MuJoCo found no OpenGL context"
                f" (MUJOCO_GL={os.environ.get('MUJOCO_GL', '(unset: glfw, needs a display)')};"
                f" {type(error).__name__}: {error}). On a headless machine set MUJOCO_GL=egl"
                " (or osmesa) before Python starts; .html needs no OpenGL"
            ) from error
        try:
            data = mujoco.MjData(model)
            camera = _tracking_camera(mujoco, model, data)
            states = episode.states
            q = np.asarray(states.q if self.sys is not None else states.qpos)
            qd = np.asarray(states.qd if self.sys is not None else states.qvel)
            out = []
            for t in picks:
                data.qpos[:], data.qvel[:] = q[t], qd[t]
                mujoco.mj_forward(model, data)
                renderer.update_scene(data, camera=camera)
                out.append(renderer.render().copy())
            return out
        finally:
            renderer.close()

    def html(self, episode: _Episode, fps: float) -> str:
        del fps
        from brax.io import html

        assert self.sys is not None  # render() refuses .html for Playground envs first

        steps = int(episode.reward.shape[0])
        states = [jax.tree.map(lambda x, t=t: x[t], episode.states) for t in range(steps)]
        return html.render(self.sys, states)


def _tracking_camera(mujoco, model, data):
    """A camera sized to the robot (its geoms' extent at the initial pose, floor excluded).

    A robot whose root body moves (a free or sliding root joint: Ant, HalfCheetah, the
    cart of InvertedPendulum) is tracked from the side, so it stays in view as it runs. A
    fixed-base robot (Reacher) is watched from above at a fixed point."""
    mujoco.mj_forward(model, data)
    camera = mujoco.MjvCamera()
    mujoco.mjv_defaultFreeCamera(model, camera)
    attached = model.geom_bodyid > 0
    if model.nbody < 2 or not attached.any():
        return camera
    root = 1
    joints = model.jnt_type[
        model.body_jntadr[root] : model.body_jntadr[root] + model.body_jntnum[root]
    ]
    free, slide = mujoco.mjtJoint.mjJNT_FREE, mujoco.mjtJoint.mjJNT_SLIDE
    moving = bool(np.isin(joints, [int(free), int(slide)]).any())
    centre = data.subtree_com[root] if moving else data.xpos[root]
    reach = np.linalg.norm(data.geom_xpos[attached] - centre, axis=-1) + model.geom_rbound[attached]
    camera.distance = float(max(3.0 * reach.max(), 0.3))
    if moving:
        camera.type = mujoco.mjtCamera.mjCAMERA_TRACKING
        camera.trackbodyid = root
        camera.azimuth, camera.elevation = 90.0, -20.0
    else:
        camera.lookat[:] = centre
        camera.distance = float(max(2.0 * reach.max(), 0.3))
        camera.azimuth, camera.elevation = 90.0, -60.0
    return camera


class _ToyScene:
    """A matplotlib figure for one toy env; `draw(ax, episode)` returns `update(t)`."""

    def __init__(self, env, draw: Callable):
        self.env = env
        self.draw = draw

    def _figure(self, episode: _Episode):
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        fig = Figure(figsize=(_TOY_INCHES, _TOY_INCHES), dpi=_TOY_DPI)
        canvas = FigureCanvasAgg(fig)
        ax = fig.add_axes((0.02, 0.02, 0.96, 0.88))
        ax.set_aspect("equal")
        ax.set_xticks([])
        ax.set_yticks([])
        title = ax.set_title("", fontsize=10)
        update = self.draw(ax, episode)
        returns = np.concatenate([[0.0], np.cumsum(episode.reward)])

        def frame(t: int):
            update(t)
            title.set_text(f"{self.env.name}   step {t}   return {returns[t]:.1f}")

        return fig, canvas, frame

    def frames(self, episode: _Episode, picks) -> list[np.ndarray]:
        _, canvas, frame = self._figure(episode)
        out = []
        for t in picks:
            frame(int(t))
            canvas.draw()
            out.append(np.asarray(canvas.buffer_rgba())[..., :3].copy())
        return out

    def html(self, episode: _Episode, fps: float) -> str:
        from matplotlib.animation import FuncAnimation

        fig, _, frame = self._figure(episode)
        steps = int(episode.reward.shape[0])
        animation = FuncAnimation(fig, frame, frames=steps, interval=1000 / fps, blit=False)
        return animation.to_jshtml(fps=max(1, round(fps)), default_mode="loop")


def _draw_reach(ax, episode: _Episode):
    pos, target = np.asarray(episode.states["pos"]), np.asarray(episode.states["target"])
    action = np.asarray(episode.action)
    _square_limits(ax, np.concatenate([pos, target, [[-1.3, -1.3], [1.3, 1.3]]]), pad=0.3)
    ax.add_patch(_rectangle((-1, -1), 2, 2))  # where positions and targets start
    ax.plot(*target[0], marker="x", color="tab:red", markersize=14, mew=3)
    (trail,) = ax.plot([], [], color="tab:blue", alpha=0.4)
    (force,) = ax.plot([], [], color="tab:orange", lw=2)
    (mass,) = ax.plot([], [], "o", color="tab:blue", markersize=12)

    def update(t: int):
        trail.set_data(pos[: t + 1, 0], pos[: t + 1, 1])
        mass.set_data([pos[t, 0]], [pos[t, 1]])
        tip = pos[t] + 0.3 * action[t]
        force.set_data([pos[t, 0], tip[0]], [pos[t, 1], tip[1]])

    return update


def _draw_pendulum(ax, episode: _Episode):
    theta = np.asarray(episode.states["theta"])
    torque = np.asarray(episode.action)[:, 0]
    ax.set_xlim(-1.4, 1.4)
    ax.set_ylim(-1.4, 1.4)
    circle = np.linspace(0, 2 * np.pi, 100)
    ax.plot(np.cos(circle), np.sin(circle), color="0.85", ls="--", lw=1)
    ax.plot([0], [1.0], marker="_", color="tab:green", markersize=20, mew=3)  # upright
    (rod,) = ax.plot([], [], color="0.2", lw=4, solid_capstyle="round")
    (bob,) = ax.plot([], [], "o", color="tab:blue", markersize=16)
    ax.plot([0], [0], "o", color="0.2", markersize=6)
    (motor,) = ax.plot([], [], color="tab:orange", lw=5)

    def update(t: int):
        x, y = np.sin(theta[t]), np.cos(theta[t])  # angle 0 is upright
        rod.set_data([0, x], [0, y])
        bob.set_data([x], [y])
        arc = np.linspace(0, 1.2 * torque[t], 20)  # the torque as an arc at the pivot
        motor.set_data(0.25 * np.sin(theta[t] + arc), 0.25 * np.cos(theta[t] + arc))

    return update


def _draw_ball(ax, episode: _Episode):
    pos, target = np.asarray(episode.states["pos"]), np.asarray(episode.states["target"])
    held = np.asarray(episode.states["t"]) < Ball.throw_steps
    _square_limits(ax, np.concatenate([pos, target[:1], [[0.0, 0.0]]]), pad=0.5)
    ax.axhline(0.0, color="0.5", lw=1)
    ax.plot(*target[0], "o", color="tab:red", markersize=14, alpha=0.8)
    (trail,) = ax.plot([], [], color="tab:blue", alpha=0.4)
    (hand,) = ax.plot([], [], "s", color="0.6", markersize=16)
    (ball,) = ax.plot([], [], "o", color="tab:blue", markersize=10)

    def update(t: int):
        trail.set_data(pos[: t + 1, 0], pos[: t + 1, 1])
        ball.set_data([pos[t, 0]], [pos[t, 1]])
        hand.set_data(([pos[t, 0]], [pos[t, 1] - 0.15]) if held[t] else ([], []))

    return update


def _square_limits(ax, points: np.ndarray, pad: float) -> None:
    """Equal x and y ranges that hold every point (`[N, 2]`) with `pad` to spare."""
    low, high = points.min(0) - pad, points.max(0) + pad
    half = float((high - low).max()) / 2
    centre = (low + high) / 2
    ax.set_xlim(centre[0] - half, centre[0] + half)
    ax.set_ylim(centre[1] - half, centre[1] + half)


def _rectangle(xy, w, h):
    from matplotlib.patches import Rectangle

    return Rectangle(xy, w, h, fill=False, ec="0.8", ls="--")


_TOY_DRAW: dict[type, Callable] = {Reach: _draw_reach, Pendulum: _draw_pendulum, Ball: _draw_ball}


def _scene(env):
    if not hasattr(env, "episode_length"):
        raise TypeError(f"env must come from diffsim.make_env, got {type(env).__name__}")
    inner = env.unwrapped
    for cls, draw in _TOY_DRAW.items():
        if isinstance(inner, cls):
            return _ToyScene(env, draw)
    if hasattr(getattr(inner, "sys", None), "mj_model") or hasattr(inner, "mj_model"):
        return _MujocoScene(env)
    return PlotScene(env)  # an env with no picture of its own: its signals over time
