"""Runs split over 4 virtual CPU devices give the 1-device results, and really are split.
(That one run of every strategy gives its 1-device result on 4 devices: test_conformance.py.)

XLA's device count is fixed when JAX starts, so the checks run in one child process with
XLA_FLAGS=--xla_force_host_platform_device_count=4 and report back as JSON.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest
from conftest import FOUR_DEVICES

CHILD = textwrap.dedent(
    """
    import importlib, json
    import equinox as eqx, jax, jax.numpy as jnp, jax.random as jr, numpy as np
    from jax.sharding import Mesh
    import diffsim
    from diffsim._train import checkpoint as _checkpoint

    assert jax.device_count() == 4, jax.devices()
    out = {}
    env = diffsim.make_env("reach")
    gauss = lambda k: diffsim.GaussianPolicy(env.observation_size, env.action_size, key=k)
    det = lambda k: diffsim.DeterministicPolicy(env.observation_size, env.action_size, key=k)
    ppo = diffsim.PPO(num_envs=8, unroll_length=16, num_epochs=2, num_minibatches=4)
    es = diffsim.ES(population_size=8, rollout_length=50)
    one_device = jax.devices()[:1]

    def args(strategy):
        return dict(total_steps=4 * strategy.steps_per_iteration, num_evals=3,
                    num_eval_episodes=4, progress=False)

    def diff(a, b):
        a, b = np.asarray(a.curve.eval_return), np.asarray(b.curve.eval_return)
        return float(np.max(np.abs(a - b)) / max(1.0, np.max(np.abs(b))))

    def error(fn):
        try:
            fn()
        except ValueError as e:
            return str(e)

    # Seeds: 8 seeds on 4 devices -> 2 per device; 2 seeds -> a 2 x 2 mesh.
    keys = jr.split(jr.key(0), 8)
    four = diffsim.train_seeds(ppo, env, gauss, keys=keys, **args(ppo))
    one = diffsim.train_seeds(ppo, env, gauss, keys=keys, devices=one_device, **args(ppo))
    leaf = jax.tree.leaves(four.policy)[0]
    out["seeds"] = dict(diff=diff(four, one), mesh=four.config["mesh"], one_mesh=one.config["mesh"],
                        devices=len(leaf.sharding.device_set), spec=str(leaf.sharding.spec),
                        one_devices=len(jax.tree.leaves(one.policy)[0].sharding.device_set))
    two = diffsim.train_seeds(ppo, env, gauss, keys=keys[:2], **args(ppo))
    two_one = jax.tree.map(lambda x: x[:2] if eqx.is_array(x) else x, one)  # the same 2 seeds
    carry = list(importlib.import_module("diffsim._train.program").PROGRAMS.values())[-1].carry_sharding
    out["two_seeds"] = dict(diff=diff(two, two_one), mesh=two.config["mesh"],
                            env_spec=str(carry.state.env_state.obs.spec))

    # What is split inside a run: PPO's env batch, ES's population (seen in its returns).
    mesh = Mesh(np.array(jax.devices()).reshape(1, 4), ("seeds", "batch"))
    with jax.set_mesh(mesh):
        state = jax.jit(lambda k: ppo.init(env, gauss(jr.key(1)), key=k))(jr.key(0))
        out["ppo_env_spec"] = str(state.env_state.obs.sharding.spec)
        es_state = es.init(env, det(jr.key(1)), key=jr.key(0))
        params = eqx.filter(es_state.policy, diffsim.trainable(es_state.policy))
        population = jax.tree.map(lambda x: jnp.stack([x] * 8), params)
        returns = jax.jit(lambda s, p: es.evaluate_population(env, s, p, key=jr.key(3)))(es_state, population)
        out["es_returns_spec"] = str(returns.sharding.spec)

    # Resume on 4 devices: the run stops after its first checkpoint, then continues.
    save = _checkpoint.save
    def save_once(root, index, *a):
        save(root, index, *a)
        raise KeyboardInterrupt
    _checkpoint.save = save_once
    try:
        diffsim.train(ppo, env, gauss(jr.key(1)), key=jr.key(2), checkpoint_dir="ckpt", **args(ppo))
    except KeyboardInterrupt:
        pass
    _checkpoint.save = save
    resumed = diffsim.train(ppo, env, gauss(jr.key(1)), key=jr.key(2), resume_from="ckpt", **args(ppo))
    full = diffsim.train(ppo, env, gauss(jr.key(1)), key=jr.key(2), **args(ppo))
    out["resume_equal"] = bool(np.array_equal(resumed.curve.eval_return, full.curve.eval_return))

    odd = diffsim.PPO(num_envs=6, unroll_length=16, num_epochs=2, num_minibatches=2)
    out["batch_error"] = error(lambda: diffsim.train(odd, env, gauss(jr.key(1)), key=jr.key(0), **args(odd)))
    out["seed_error"] = error(lambda: diffsim.train_seeds(odd, env, gauss, keys=keys[:3], **args(odd)))
    print(json.dumps(out))
    """
)


@pytest.fixture(scope="module")
def four_devices(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sharding")
    (folder / "child.py").write_text(CHILD)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # this checkout's diffsim
    path = os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])
    env = {
        **os.environ,
        "XLA_FLAGS": FOUR_DEVICES,
        "PYTHONPATH": path,
    }
    out = subprocess.run(
        [sys.executable, "child.py"],
        cwd=folder,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_seeds_split_over_four_devices_with_the_same_results(four_devices):
    seeds = four_devices["seeds"]
    assert seeds["mesh"] == {"seeds": 4, "batch": 1} and seeds["one_mesh"] is None
    assert seeds["devices"] == 4 and "seeds" in seeds["spec"]
    assert seeds["one_devices"] == 1
    assert seeds["diff"] <= 1e-4


def test_fewer_seeds_than_devices_also_split_each_batch(four_devices):
    assert four_devices["two_seeds"]["mesh"] == {"seeds": 2, "batch": 2}
    assert four_devices["two_seeds"]["env_spec"] == "P('seeds', 'batch')"
    assert four_devices["two_seeds"]["diff"] <= 1e-4


def test_env_batch_and_population_really_are_split(four_devices):
    assert four_devices["ppo_env_spec"] == "P('batch',)"
    assert four_devices["es_returns_spec"] == "P('batch',)"


def test_resume_on_four_devices_equals_the_uninterrupted_run(four_devices):
    assert four_devices["resume_equal"]


def test_a_batch_that_does_not_divide_over_devices_is_rejected(four_devices):
    assert "PPO runs 6 envs or population members in parallel" in four_devices["batch_error"]
    assert "split evenly over 4 devices" in four_devices["batch_error"]
    assert "6 envs" in four_devices["seed_error"]
    assert "4 devices per seed group (3 seeds in 1)" in four_devices["seed_error"]
