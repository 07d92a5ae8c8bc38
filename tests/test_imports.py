"""`import diffsim` changes no process-wide state beyond the compilation cache (issue 21,
item 8), and diffsim's own Brax env builds are quiet without hiding the user's warnings."""

import json
import os
import subprocess
import sys
from pathlib import Path

IMPORT_PROBE = """
import json, os, sys, warnings
import numpy  # numpy adds its own filters on import; diffsim's share is what follows
before_flags, before_filters = os.environ.get("XLA_FLAGS"), list(warnings.filters)
before_gl = os.environ.get("MUJOCO_GL")
import diffsim
print(json.dumps({
    "xla_flags": [before_flags, os.environ.get("XLA_FLAGS")],
    "filters_unchanged": warnings.filters == before_filters,
    "new_filters": [str(f) for f in warnings.filters if f not in before_filters],
    "file": diffsim.__file__,
    "modules": {m: m in sys.modules for m in ("matplotlib", "matplotlib.pyplot", "scipy.stats")},
}))
"""

# Brax's half_cheetah.xml uses `settotalmass`, which MuJoCo's compiler calls deprecated (a
# message MuJoCo prints from C). diffsim's own build must not show it; the same attribute in
# the user's own model, compiled afterwards, must still warn. (MuJoCo writes to stderr.)
SETTOTALMASS_PROBE = """
import sys
import diffsim
env = diffsim.make_env("halfcheetah")
print("BUILT", env.observation_size, file=sys.stderr, flush=True)
import mujoco
mujoco.MjModel.from_xml_string(
    '<mujoco><compiler settotalmass="3"/><worldbody><body><freejoint/>'
    '<geom size="0.1"/></body></worldbody></mujoco>'
)
print("USER MODEL DONE", file=sys.stderr, flush=True)
"""


ROOT = Path(__file__).resolve().parents[1]


def _python(code: str, cwd: Path, **env: str) -> subprocess.CompletedProcess:
    """Run `code` in a fresh interpreter importing this checkout's diffsim, in `cwd` (where
    MuJoCo's default warning handler writes MUJOCO_LOG.TXT)."""
    environ = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    path = os.pathsep.join(filter(None, [str(ROOT), environ.get("PYTHONPATH")]))
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=cwd,
        env={**environ, "PYTHONPATH": path, **env},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def _probe(cwd: Path, **env: str) -> dict:
    return json.loads(_python(IMPORT_PROBE, cwd, **env).stdout.strip().splitlines()[-1])


def test_import_leaves_xla_flags_and_warning_filters_alone(tmp_path):
    report = _probe(tmp_path)
    assert report["file"] == str(ROOT / "diffsim" / "__init__.py")  # this checkout's
    assert report["xla_flags"] == [None, None]
    assert report["filters_unchanged"], report["new_filters"]
    mine = _probe(tmp_path, XLA_FLAGS="--xla_cpu_enable_fast_math=false")
    assert mine["xla_flags"] == ["--xla_cpu_enable_fast_math=false"] * 2


def test_import_loads_neither_pyplot_nor_scipy_stats(tmp_path):
    """matplotlib loads when a plot is drawn; scipy.stats when a confidence interval is
    computed. (scipy itself comes with Brax: MuJoCo MJX imports `scipy.spatial`.)"""
    modules = _probe(tmp_path)["modules"]
    assert modules == {"matplotlib": False, "matplotlib.pyplot": False, "scipy.stats": False}


def test_diffsims_brax_builds_hide_settotalmass_but_user_models_keep_it(tmp_path):
    result = _python(SETTOTALMASS_PROBE, tmp_path)
    built, _, after = result.stderr.partition("BUILT 17")
    assert after, result.stderr[-2000:]  # halfcheetah observes 17 numbers
    assert "settotalmass" not in built + result.stdout
    user, done, _ = after.partition("USER MODEL DONE")
    assert done and "WARNING: compiler attribute 'settotalmass' is deprecated" in user


LAZY_PROBE = """
import json, sys
import diffsim
after_import = sorted(m for m in ("brax", "mujoco", "mujoco_playground", "gymnax", "optax")
                      if m in sys.modules)
assert diffsim.envs.toy_names() == ["ball", "pendulum", "reach"]
from diffsim import cli
cli.main(["envs"])
after_envs = sorted(m for m in ("brax", "mujoco", "mujoco_playground") if m in sys.modules)
print(json.dumps({"import": after_import, "envs": after_envs}))
"""


def test_import_and_the_envs_command_load_neither_brax_nor_mujoco(tmp_path):
    """`import diffsim` costs about what `import jax` does (issue 33, item 6): Brax, MuJoCo
    and Playground load when an env or a strategy is first asked for, and `diffsim envs`
    prints from tables without building an env (nothing for MuJoCo to warn about)."""
    result = _python(LAZY_PROBE, tmp_path)
    lines = result.stdout.strip().splitlines()
    assert json.loads(lines[-1]) == {"import": [], "envs": []}
    listed = [line.split()[0] for line in lines[1:-1] if line.strip() and "..." not in line]
    assert {"reach", "ant", "CheetahRun"} <= set(listed) and "WARNING" not in result.stderr
    assert "MODULE:CLASS" in result.stdout


def test_every_lazy_public_name_is_declared_for_type_checkers_and_imports():
    """`diffsim/__init__.py`'s `_EXPORTS` (what runs) and its `TYPE_CHECKING` imports (what
    readers and pyright see) list the same names, and each one resolves."""
    import ast

    import diffsim
    import diffsim.envs

    for module in (diffsim, diffsim.envs):
        tree = ast.parse(Path(module.__file__).read_text())
        guarded = next(n for n in tree.body if isinstance(n, ast.If))
        declared = {a.asname or a.name for n in guarded.body for a in n.names}  # pyright: ignore[reportAttributeAccessIssue]
        assert declared == set(module._EXPORTS), module.__name__
        for name in sorted(declared):
            assert getattr(module, name) is not None, name
    assert callable(diffsim.train) and callable(diffsim.render)  # not their submodules
