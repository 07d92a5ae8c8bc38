"""`render`'s scenes: how one kind of env turns an episode (`render._Episode`) into frames
and HTML. Brax and Playground envs through MuJoCo's offscreen renderer, the toy envs through
matplotlib, every other env as a figure of its signals (`episode_plot`)."""

import os
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from ..envs._toy import Ball, Pendulum, Reach
from .episode_plot import PlotScene

SIZE = (320, 240)  # width, height of MuJoCo frames; multiples of 16, as H.264 wants
_TOY_INCHES, _TOY_DPI = 4.0, 80  # 320 x 320 toy frames


class MujocoScene:
    """MuJoCo offscreen frames with a tracking camera, for Brax envs (their `sys.mj_model`,
    states with `q`, `qd`) and Playground's (their `mj_model`, MJX data with `qpos`,
    `qvel`); Brax's HTML viewer for Brax envs."""

    def __init__(self, env):
        inner = env.unwrapped
        self.env = env
        self.sys = getattr(inner, "sys", None)  # Brax's System; None for Playground envs
        self.model = inner.sys.mj_model if self.sys is not None else inner.mj_model

    def frames(self, episode: Any, picks) -> list[np.ndarray]:
        import mujoco as _mujoco

        mujoco: Any = _mujoco  # a compiled module: its attributes are not visible to pyright
        model = self.model
        try:
            renderer = mujoco.Renderer(model, height=SIZE[1], width=SIZE[0])
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

    def html(self, episode: Any, fps: float) -> str:
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

    def _figure(self, episode: Any):
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

    def frames(self, episode: Any, picks) -> list[np.ndarray]:
        _, canvas, frame = self._figure(episode)
        out = []
        for t in picks:
            frame(int(t))
            canvas.draw()
            out.append(np.asarray(canvas.buffer_rgba())[..., :3].copy())
        return out

    def html(self, episode: Any, fps: float) -> str:
        from matplotlib.animation import FuncAnimation

        fig, _, frame = self._figure(episode)
        steps = int(episode.reward.shape[0])
        animation = FuncAnimation(fig, frame, frames=steps, interval=1000 / fps, blit=False)
        return animation.to_jshtml(fps=max(1, round(fps)), default_mode="loop")


def _draw_reach(ax, episode: Any):
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


def _draw_pendulum(ax, episode: Any):
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


def _draw_ball(ax, episode: Any):
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


def scene_for(env):
    """The scene that draws `env`: MuJoCo, a toy env's picture, or its signals."""
    if not hasattr(env, "episode_length"):
        raise TypeError(f"env must come from diffsim.make_env, got {type(env).__name__}")
    inner = env.unwrapped
    for cls, draw in _TOY_DRAW.items():
        if isinstance(inner, cls):
            return _ToyScene(env, draw)
    if hasattr(getattr(inner, "sys", None), "mj_model") or hasattr(inner, "mj_model"):
        return MujocoScene(env)
    return PlotScene(env)  # an env with no picture of its own: its signals over time
