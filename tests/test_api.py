import inspect

import pytest

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
    assert callable(diffsim.envs.names) and callable(diffsim.envs.toy_names)
    assert callable(diffsim.plotting.learning_curves)


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
