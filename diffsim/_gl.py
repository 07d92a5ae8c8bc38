"""Pick MuJoCo's headless OpenGL backend before anything imports `mujoco`.

MuJoCo chooses its GL backend once, when `mujoco` is first imported (Brax imports it), from
`$MUJOCO_GL`. Its default, GLFW, needs a display. On a Linux machine without one and with
an EGL library installed, diffsim sets `MUJOCO_GL=egl` (GPU or Mesa EGL, no display
needed), so `diffsim.render` works headless. A value set by the user is kept, and nothing
is changed when `mujoco` was imported before diffsim.
"""

import ctypes.util
import os
import sys


def default_gl() -> str | None:
    """The `MUJOCO_GL` value diffsim would choose here (`"egl"` or None)."""
    if sys.platform != "linux" or os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"):
        return None
    if os.environ.get("PYOPENGL_PLATFORM", "egl").lower() != "egl":
        return None
    return "egl" if ctypes.util.find_library("EGL") else None


if "mujoco" not in sys.modules and "MUJOCO_GL" not in os.environ and default_gl():
    os.environ["MUJOCO_GL"] = "egl"
