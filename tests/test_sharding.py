"""Seeds split over 4 virtual CPU devices give the 1-device results, and really are split.

XLA's device count is fixed when JAX starts, so the check runs in a child process with
XLA_FLAGS=--xla_force_host_platform_device_count=4.
"""

import json
import os
import subprocess
import sys
import textwrap

CHILD = textwrap.dedent(
    """
    import json
    import jax, jax.random as jr, numpy as np
    import diffsim

    assert jax.device_count() == 4, jax.devices()
    env = diffsim.make_env("reach")
    make = lambda k: diffsim.GaussianPolicy(env.observation_size, env.action_size, key=k)
    ppo = diffsim.PPO(num_envs=8, unroll_length=16, num_epochs=2, num_minibatches=4)
    args = dict(total_steps=4 * ppo.steps_per_iteration, num_evals=3, num_eval_episodes=4, progress=False)
    keys = jr.split(jr.key(0), 8)
    four = diffsim.train_seeds(ppo, env, make, keys=keys, **args)
    one = diffsim.train_seeds(ppo, env, make, keys=keys, devices=jax.devices()[:1], **args)
    leaf = jax.tree.leaves(four.policy)[0]
    try:
        diffsim.train_seeds(ppo, env, make, keys=keys[:3], **args)
        error = None
    except ValueError as e:
        error = str(e)
    print(json.dumps({
        "max_diff": float(np.max(np.abs(np.asarray(four.curve.eval_return) - np.asarray(one.curve.eval_return)))),
        "scale": float(np.max(np.abs(np.asarray(one.curve.eval_return)))),
        "policy_devices": len(leaf.sharding.device_set),
        "policy_spec": str(getattr(leaf.sharding, "spec", None)),
        "one_device_devices": len(jax.tree.leaves(one.policy)[0].sharding.device_set),
        "error": error,
    }))
    """
)


def test_seeds_shard_over_four_devices_with_the_same_results(tmp_path):
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    out = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["policy_devices"] == 4 and "seeds" in result["policy_spec"]
    assert result["one_device_devices"] == 1
    assert result["max_diff"] <= 1e-4 * max(1.0, result["scale"])
    assert "3 seeds cannot be split evenly over 4 devices" in result["error"]
