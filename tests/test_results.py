"""Saved runs hold data only: policies round-trip through policy.json + policy.eqx exactly,
and opening a crafted folder runs none of its code."""

import json
import pickle

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

import diffsim
from diffsim import LearningCurve, Run

OBS, ACT, SEEDS = 5, 2, 3

KINDS = {
    "gaussian": lambda k: diffsim.GaussianPolicy(OBS, ACT, hidden=(8, 4), key=k),
    "gaussian_state_std": lambda k: diffsim.GaussianPolicy(
        OBS, ACT, hidden=(6,), state_dependent_std=True, key=k
    ),
    "deterministic": lambda k: diffsim.DeterministicPolicy(OBS, ACT, hidden=(8, 8), key=k),
    "value": lambda k: diffsim.ValueFunction(OBS, hidden=(7,), key=k),
    "mlp_relu": lambda k: diffsim.MLP(OBS, ACT, hidden=(9,), activation=jax.nn.relu, key=k),
}


def _with_stats(policy, key):
    """Non-trivial normaliser statistics, so they are checked too."""
    return diffsim.update_normalizers(policy, jr.normal(key, (16, OBS)) * 3 + 1)


def _run(policy, seeds: int | None) -> Run:
    lead = () if seeds is None else (seeds,)
    curve = LearningCurve(
        env_steps=jnp.zeros((*lead, 2), jnp.int32) + jnp.array([0, 100], jnp.int32),
        wall_time=jnp.zeros((*lead, 2)),
        eval_return=jnp.ones((*lead, 2, 3)),
    )
    config = {"env": "reach", "backend": "jax", "episode_length": 100, "num_seeds": seeds}
    return Run(policy=policy, curve=curve, metrics={}, config=config)


def _assert_same(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)  # classes and static fields
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert type(x) is type(y) and np.shape(x) == np.shape(y)
        assert np.asarray(x).dtype == np.asarray(y).dtype
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("kind", sorted(KINDS))
@pytest.mark.parametrize("seeds", [None, SEEDS])
def test_builtin_policies_round_trip_exactly(kind, seeds, key, tmp_path):
    make = lambda k: _with_stats(KINDS[kind](k), jr.fold_in(k, 1))  # MLP: no statistics
    policy = make(key) if seeds is None else eqx.filter_vmap(make)(jr.split(key, seeds))
    _run(policy, seeds).save(tmp_path)
    assert not (tmp_path / "policy.pkl").exists()
    structure = json.loads((tmp_path / "policy.json").read_text())
    assert structure["policy"]["module"].startswith("diffsim.")
    back = diffsim.load_run(tmp_path).policy
    _assert_same(back, policy)
    obs = jnp.linspace(-1, 1, OBS)
    one = policy if seeds is None else jax.tree.map(lambda x: x[1], policy)
    back_one = back if seeds is None else jax.tree.map(lambda x: x[1], back)
    np.testing.assert_array_equal(back_one(obs), one(obs))


class Scaled(eqx.Module):
    """A user policy: a float field, a custom activation and a diffsim MLP inside."""

    net: diffsim.MLP
    gain: float
    squash: object = eqx.field(static=True)

    def __call__(self, obs, *, key=None):
        return self.squash(self.gain * self.net(obs))


def soft_clip(x):
    return x / (1 + jnp.abs(x))


def test_user_policy_needs_registering_then_round_trips(key, tmp_path):
    policy = Scaled(diffsim.MLP(OBS, ACT, hidden=(4,), key=key), 2.5, soft_clip)
    _run(policy, None).save(tmp_path)
    with pytest.raises(ValueError, match=r"'tests?\.test_results\.Scaled'|test_results\.Scaled"):
        diffsim.load_run(tmp_path)
    assert diffsim.register_policy(Scaled) is Scaled
    with pytest.raises(ValueError, match="soft_clip.*not an allow-listed function"):
        diffsim.load_run(tmp_path)
    diffsim.register_policy(soft_clip)
    back = diffsim.load_run(tmp_path).policy
    _assert_same(back, policy)
    assert back.gain == 2.5 and back.squash is soft_clip


def test_like_reads_any_structure_and_seed_axes(key, tmp_path):
    """like= needs no registration, and one seed's policy reads a run of many seeds."""
    make = lambda k: diffsim.GaussianPolicy(OBS, ACT, hidden=(4,), key=k)
    policy = eqx.filter_vmap(make)(jr.split(key, SEEDS))
    _run(policy, SEEDS).save(tmp_path)
    _assert_same(diffsim.load_run(tmp_path, like=make(jr.key(9))).policy, policy)
    with pytest.raises(ValueError, match="does not fit"):
        diffsim.load_run(tmp_path, like=diffsim.GaussianPolicy(OBS, ACT, hidden=(5,), key=key))


def test_unnameable_policy_saves_with_a_warning_and_loads_with_like(key, tmp_path):
    policy = Scaled(diffsim.MLP(OBS, ACT, hidden=(4,), key=key), 1.0, lambda x: x)
    with pytest.warns(UserWarning, match="without policy.json"):
        _run(policy, None).save(tmp_path)
    with pytest.raises(ValueError, match="no policy.json.*like="):
        diffsim.load_run(tmp_path)
    back = diffsim.load_run(tmp_path, like=policy).policy
    np.testing.assert_array_equal(back.net.layers[0].weight, policy.net.layers[0].weight)


# --- Folders crafted to run code -------------------------------------------------------


def _payload(marker) -> bytes:
    """A pickle that creates `marker` when unpickled."""

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    return pickle.dumps(Evil())


@pytest.fixture
def saved(key, tmp_path):
    """A genuine saved run of a Gaussian policy; tests then tamper with its files."""
    path = tmp_path / "run"
    _run(diffsim.GaussianPolicy(OBS, ACT, hidden=(4,), key=key), None).save(path)
    return path


def test_the_payload_is_live(tmp_path):
    """Guard: unpickling the payload really runs code, so the tests below can fail."""
    pickle.loads(_payload(tmp_path / "ran"))
    assert (tmp_path / "ran").exists()


def test_old_format_folder_gets_a_clear_error_and_runs_nothing(saved, tmp_path):
    marker = tmp_path / "pwned"
    (saved / "policy.json").unlink()
    (saved / "policy.pkl").write_bytes(_payload(marker))
    with pytest.raises(ValueError, match=r"old format.*policy\.pkl.*like="):
        diffsim.load_run(saved)
    assert not marker.exists()
    # The documented way forward: read with like=, then save again in the new format.
    like = diffsim.GaussianPolicy(OBS, ACT, hidden=(4,), key=jr.key(7))
    run = diffsim.load_run(saved, like=like)
    assert not marker.exists()
    run.save(saved)
    assert not (saved / "policy.pkl").exists()
    _assert_same(diffsim.load_run(saved).policy, run.policy)


@pytest.mark.parametrize(
    ("where", "name"),
    [("class", "os.system"), ("class", "builtins.eval"), ("function", "os.system")],
)
def test_json_naming_other_code_is_refused(saved, where, name):
    data = json.loads((saved / "policy.json").read_text())
    if where == "class":
        data["policy"]["module"] = name
        message = f"'{name}'.*not an allow-listed policy class"
    else:
        data["policy"]["fields"]["net"]["fields"]["activation"] = {"function": name}
        message = f"'{name}'.*not an allow-listed function"
    (saved / "policy.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match=message):
        diffsim.load_run(saved)


def test_pickled_arrays_in_policy_eqx_are_not_loaded(saved, tmp_path):
    marker = tmp_path / "pwned"
    with open(saved / "policy.eqx", "wb") as f:
        np.lib.format.write_array(f, np.array([_Reduce(marker)], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="policy.eqx"):
        diffsim.load_run(saved)
    assert not marker.exists()


class _Reduce:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_register_policy_rejects_non_modules():
    with pytest.raises(TypeError, match="eqx.Module"):
        diffsim.register_policy(dict)
    with pytest.raises(ValueError, match="diffsim's own"):
        diffsim.register_policy(Scaled, name="diffsim.GaussianPolicy")
