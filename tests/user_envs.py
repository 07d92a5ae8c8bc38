"""A user's own env in a module of its own: `tests/test_user_env.py` trains it from the CLI
as `--env user_envs:Cart --env-arg gain=2.0` and renders the saved run in a new process.

`Cart` is the example of `diffsim.envs.AbstractEnv`'s docstring, run here (so the
documented example keeps working), with episodes of 20 steps."""

import textwrap

import diffsim


def _documented_example() -> dict:
    """The names `AbstractEnv`'s docstring example defines, run as this module's code."""
    doc = diffsim.envs.AbstractEnv.__doc__ or ""
    code = textwrap.dedent(doc.split("```python\n", 1)[1].split("```", 1)[0])
    names = {"__name__": __name__}
    exec(code, names)
    return names


class Cart(_documented_example()["Cart"]):
    """A cart on a line, pushed toward 0: obs (position, velocity), action a force."""

    default_episode_length = 20
