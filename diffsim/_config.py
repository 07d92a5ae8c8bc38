"""The process settings diffsim uses: the persistent compilation cache (turned on at import,
the one JAX setting `import diffsim` makes), the XLA compiler options diffsim's own programs
are compiled with (per program, never through `XLA_FLAGS`), and MuJoCo's headless OpenGL
backend (`default_gl`)."""

import contextlib
import ctypes.util
import functools
import importlib
import io
import os
import sys
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax


def default_gl() -> str | None:
    """The `MUJOCO_GL` value diffsim would choose here (`"egl"` or None).

    MuJoCo chooses its GL backend once, when `mujoco` is first imported (Brax imports it),
    from `$MUJOCO_GL`. Its default, GLFW, needs a display. On a Linux machine without one
    and with an EGL library installed, diffsim sets `MUJOCO_GL=egl` (GPU or Mesa EGL, no
    display needed) when this module is imported, before Brax imports MuJoCo, so
    `diffsim.render` works headless. A value set by the user is kept, and nothing is
    changed when `mujoco` was imported before diffsim.
    """
    if sys.platform != "linux" or os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"):
        return None
    if os.environ.get("PYOPENGL_PLATFORM", "egl").lower() != "egl":
        return None
    return "egl" if ctypes.util.find_library("EGL") else None


if "mujoco" not in sys.modules and "MUJOCO_GL" not in os.environ and default_gl():
    os.environ["MUJOCO_GL"] = "egl"

# LLVM's optimisation level for XLA's CPU code in the programs `train` compiles. Level 1
# compiles faster than XLA's default at about the same training speed (level 0 compiles
# faster still but trains several times slower). Passed per program as a compiler option, so
# neither the process's `XLA_FLAGS` nor anyone else's JAX programs are touched.
CPU_OPTIMIZATION_LEVEL = 1


def compiler_options() -> dict[str, Any]:
    """XLA compiler options for diffsim's own compiled programs, for
    `jax.jit(f).lower(...).compile(compiler_options=...)`.

    On a CPU backend: `{"xla_backend_optimization_level": 1}`, unless the user set a level
    in `$XLA_FLAGS` (then `{}`, and theirs applies). On other backends: `{}`.

    **Example:**

    ```python
    compiled = jax.jit(f).lower(x).compile(compiler_options=compiler_options())
    ```
    """
    if "xla_backend_optimization_level" in os.environ.get("XLA_FLAGS", ""):
        return {}
    if jax.default_backend() != "cpu":
        return {}
    return {"xla_backend_optimization_level": CPU_OPTIMIZATION_LEVEL}


def cache_dir() -> Path | None:
    """Where compiled programs are cached across processes.

    `$DIFFSIM_CACHE_DIR` if set (empty or `0` turns the cache off), else JAX's own
    `$JAX_COMPILATION_CACHE_DIR`, else `$XDG_CACHE_HOME/diffsim/jax` (`~/.cache/...`).
    """
    value = os.environ.get("DIFFSIM_CACHE_DIR")
    if value is not None:
        return Path(value).expanduser() if value not in ("", "0") else None
    if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return Path(os.environ["JAX_COMPILATION_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "diffsim" / "jax"


def enable_compilation_cache() -> None:
    """Turn on JAX's persistent compilation cache at `cache_dir()` (nothing if that is None).

    `import diffsim` calls it: the one process-wide setting diffsim makes at import.
    """
    path = cache_dir()
    if path is None:
        return
    jax.config.update("jax_compilation_cache_dir", str(path))
    # Cache everything that takes noticeable time to compile on a CPU.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


@functools.cache
def import_brax() -> None:
    """Import Brax (and with it MuJoCo) once, quietly; `import diffsim` does not (it would
    take seconds): `diffsim`'s and `diffsim.envs`' lazy attributes call this first.

    Stdout is muted (MuJoCo's MJX may print "Failed to import warp", an optional GPU
    backend); real errors still raise. Brax imports JAXopt, whose DeprecationWarning ("no
    longer maintained") users cannot act on and which would stop diffsim under `python -W
    error`; the filter lives only while Brax is imported (`catch_warnings` restores the
    process's own).
    """
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.filterwarnings("ignore", "JAXopt is no longer maintained", DeprecationWarning)
        import brax.envs  # noqa: F401


def lazy_attribute(package: str, exports: Mapping[str, str], name: str, *, brax: bool = True):
    """A package's public `name` imported on first use (PEP 562), kept in the package (so
    that the package's `__getattr__`, which calls this, runs once per name) and returned.

    `exports[name]` is the module it comes from, relative to `package` (`".module"`, or
    `".module:attribute"` where the attribute has another name), or `""` for the
    submodule of that name. Brax is imported first (`import_brax`) unless `brax` is false.

    **Raises:** `AttributeError` for a name not in `exports`, as for any module.
    """
    if name not in exports:
        raise AttributeError(f"module {package!r} has no attribute {name!r}")
    if brax:
        import_brax()
    module, _, attribute = exports[name].partition(":")
    if module:
        value = getattr(importlib.import_module(module, package), attribute or name)
    else:
        value = importlib.import_module(f".{name}", package)
    vars(sys.modules[package])[name] = value
    return value
