"""How `render` draws an env that has no picture of its own: a figure of the episode's
observations, actions and reward over time (`PlotScene`), or the user's own frame
function (`FrameScene`)."""

from collections.abc import Callable
from typing import Any

import jax
import numpy as np

_INCHES, _DPI = (6.4, 4.8), 80  # 512 x 384 frames


def episode_figure(episode: Any, name: str):
    """A matplotlib `Figure` of one episode: observations (one line per entry), actions
    (one line per entry) and reward (one line), against the step. With it, the function
    that moves a cursor to step `t` (`None` shows the whole episode without one)."""
    from matplotlib.figure import Figure

    obs, action = np.asarray(episode.obs), np.asarray(episode.action)
    reward = np.asarray(episode.reward)
    steps = np.arange(len(reward))
    fig = Figure(figsize=_INCHES, dpi=_DPI, layout="constrained")
    axes = fig.subplots(3, 1, sharex=True)
    panels = [("observation", obs), ("action", action), ("reward", reward[:, None])]
    for ax, (label, values) in zip(axes, panels, strict=True):
        for i in range(values.shape[1]):
            ax.plot(
                steps, values[:, i], lw=1.2, label=f"{label}[{i}]" if values.shape[1] > 1 else None
            )
        ax.set_ylabel(label)
        if 1 < values.shape[1] <= 8:
            ax.legend(fontsize=6, loc="upper right", ncols=min(values.shape[1], 4))
    axes[-1].set_xlabel("step")
    title = fig.suptitle(f"{name}: return {reward.sum():.2f} over {len(reward)} steps", fontsize=10)
    cursors = [ax.axvline(0, color="0.3", lw=0.8, ls=":") for ax in axes]
    for c in cursors:
        c.set_visible(False)
    returns = np.concatenate([[0.0], np.cumsum(reward)])

    def at(t: int | None) -> None:
        for c in cursors:
            c.set_visible(t is not None)
            if t is not None:
                c.set_xdata([t, t])
        if t is not None:
            title.set_text(f"{name}   step {t}   return {returns[t]:.2f}")

    return fig, at


class PlotScene:
    """The episode as a figure: `.png` one figure of the whole episode, `.gif`/`.mp4` the
    same figure with a cursor moving over the steps, `.html` a JavaScript animation."""

    whole_png = True

    def __init__(self, env):
        self.env = env

    def png(self, episode: Any) -> np.ndarray:
        fig, at = episode_figure(episode, self.env.name)
        at(None)
        return _pixels(fig)

    def frames(self, episode: Any, picks) -> list[np.ndarray]:
        fig, at = episode_figure(episode, self.env.name)
        out = []
        for t in picks:
            at(int(t))
            out.append(_pixels(fig))
        return out

    def html(self, episode: Any, fps: float) -> str:
        from matplotlib.animation import FuncAnimation

        fig, at = episode_figure(episode, self.env.name)
        steps = int(np.shape(episode.reward)[0])
        animation = FuncAnimation(fig, at, frames=steps, interval=1000 / fps, blit=False)
        return animation.to_jshtml(fps=max(1, round(fps)), default_mode="loop")


class FrameScene:
    """Frames drawn by the user's `frame(state, action, reward) -> uint8[H, W, 3]` (or
    floats in [0, 1]), called once per frame with the env's state before the step (its
    own pytree, as NumPy arrays), the action taken in it and the reward it earned."""

    whole_png = False

    def __init__(self, env, frame: Callable):
        self.env = env
        self.frame = frame

    def frames(self, episode: Any, picks) -> list[np.ndarray]:
        out = []
        for t in picks:
            state = jax.tree.map(lambda x, t=t: np.asarray(x[t]), episode.states)
            image = np.asarray(
                self.frame(state, np.asarray(episode.action[t]), float(episode.reward[t]))
            )
            out.append(_rgb(image, int(t)))
        return out

    def html(self, episode: Any, fps: float) -> str:
        raise ValueError("render(frame=...) writes .gif, .mp4 or .png, not .html")


def _rgb(image: np.ndarray, t: int) -> np.ndarray:
    """`image` as `uint8[H, W, 3]`: floats in [0, 1] scaled, an alpha channel dropped."""
    if image.ndim != 3 or image.shape[-1] not in (3, 4):
        raise ValueError(
            f"render's frame function must return an image of shape (H, W, 3) or (H, W, 4),"
            f" got shape {image.shape} at step {t}"
        )
    if np.issubdtype(image.dtype, np.floating):
        image = np.clip(image * 255.0 + 0.5, 0, 255)
    return image[..., :3].astype(np.uint8)


def _pixels(fig) -> np.ndarray:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()
