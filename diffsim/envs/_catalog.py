"""The names `make_env` lists, with their sizes, known without importing Brax or MuJoCo.

`diffsim envs` prints these tables instead of building every env (which parses MJCF,
traces a reset and takes tens of seconds). `tests/test_envs.py` checks them against the
envs built for real.
"""

import importlib.util

BRAX_BACKENDS = ("spring", "generalized", "positional", "mjx")
# name -> (observation size, action size, default episode length)
Sizes = tuple[int, int, int]
TOY: dict[str, Sizes] = {"ball": (8, 2, 60), "pendulum": (3, 1, 200), "reach": (6, 2, 100)}
# The environments Brax 0.14 ships. Brax has no public call that lists its registry, so the
# names are listed here; an env added with `brax.envs.register_environment` is built by
# `make_env` all the same (through the public `brax.envs.get_environment`), just not listed.
BRAX: dict[str, Sizes] = {
    "ant": (27, 8, 1000),
    "fast": (2, 1, 1000),
    "halfcheetah": (17, 6, 1000),
    "hopper": (11, 3, 1000),
    "humanoid": (244, 17, 1000),
    "humanoidstandup": (244, 17, 1000),
    "inverted_double_pendulum": (8, 1, 1000),
    "inverted_pendulum": (4, 1, 1000),
    "pusher": (23, 7, 1000),
    "reacher": (11, 2, 1000),
    "swimmer": (8, 2, 1000),
    "walker2d": (17, 6, 1000),
}
# MuJoCo Playground 0.2's DM Control Suite (its models ship in its wheel).
PLAYGROUND: dict[str, Sizes] = {
    **dict.fromkeys(["AcrobotSwingup", "AcrobotSwingupSparse"], (6, 1, 1000)),
    "BallInCup": (8, 2, 1000),
    **dict.fromkeys(
        [
            "CartpoleBalance",
            "CartpoleBalanceSparse",
            "CartpoleSwingup",
            "CartpoleSwingupSparse",
        ],
        (5, 1, 1000),
    ),
    "CheetahRun": (17, 6, 1000),
    "FingerSpin": (9, 2, 1000),
    **dict.fromkeys(["FingerTurnEasy", "FingerTurnHard"], (12, 2, 1000)),
    "FishSwim": (24, 5, 1000),
    **dict.fromkeys(["HopperHop", "HopperStand"], (15, 4, 1000)),
    **dict.fromkeys(["HumanoidRun", "HumanoidStand", "HumanoidWalk"], (67, 21, 1000)),
    "PendulumSwingup": (3, 1, 1000),
    "PointMass": (4, 2, 1000),
    **dict.fromkeys(["ReacherEasy", "ReacherHard"], (6, 2, 1000)),
    "SwimmerSwimmer6": (25, 5, 1000),
    **dict.fromkeys(["WalkerRun", "WalkerStand", "WalkerWalk"], (24, 6, 1000)),
}
# gymnax 1.0's continuous-action envs: `make_env("gymnax:" + name)`. All five implement
# transition gradients (gymnax's `with_transition_gradients`), which `make_env` turns on.
GYMNAX: dict[str, Sizes] = {
    "Pendulum-v1": (3, 1, 200),
    "MountainCarContinuous-v0": (2, 1, 999),
    "PointRobot-misc": (6, 2, 100),
    "Reacher-misc": (8, 2, 100),
    "Swimmer-misc": (16, 2, 500),
}


def installed(module: str) -> bool:
    """Whether `module` can be imported, found without importing it."""
    return importlib.util.find_spec(module) is not None


def toy_names() -> list[str]:
    """The built-in pure-JAX toy envs: `['ball', 'pendulum', 'reach']`."""
    return sorted(TOY)


def brax_names() -> list[str]:
    """The environments Brax ships (`ant`, `halfcheetah`, ...), all buildable by `make_env`."""
    return sorted(BRAX)


def gymnax_names() -> list[str]:
    """gymnax's continuous-action envs as `make_env` names (`"gymnax:Pendulum-v1"`, ...);
    `[]` without the `gymnax` extra. Any other continuous gymnax env builds too."""
    return sorted(f"gymnax:{name}" for name in GYMNAX) if installed("gymnax") else []
