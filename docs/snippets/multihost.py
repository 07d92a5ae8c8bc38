"""Train 4 seeds of PPO across processes (hosts) with `jax.distributed`.

Every process runs this same script. On one machine, for example:

    python multihost.py results/multihost localhost:12345 2 0 &
    python multihost.py results/multihost localhost:12345 2 1

The arguments after the output folder are the coordinator's address, the number of
processes and this process's index. Leave them out where `jax.distributed.initialize()`
finds them by itself (SLURM, Open MPI, Cloud TPU, or `JAX_COORDINATOR_ADDRESS`).

`jax.devices()` then lists the devices of every process, and `train_seeds` splits the
seeds over them. Every process returns the whole `Run`; process 0 saves it.
"""

import sys

import jax

out, *cluster = sys.argv[1:]
jax.config.update("jax_cpu_collectives_implementation", "gloo")  # how CPUs talk
if cluster:
    address, num_processes, process_id = cluster
    jax.distributed.initialize(address, int(num_processes), int(process_id))
else:
    jax.distributed.initialize()

# After initialize: importing diffsim (evosax) already creates arrays on a device.
import jax.random as jr  # noqa: E402

import diffsim  # noqa: E402

env = diffsim.make_env("reach")
ppo = diffsim.PPO(num_envs=8, unroll_length=16, num_epochs=2, num_minibatches=4)
make_policy = lambda k: diffsim.GaussianPolicy(env.observation_size, env.action_size, key=k)
run = diffsim.train_seeds(
    ppo,
    env,
    make_policy,
    keys=jr.split(jr.key(0), 4),
    total_steps=4 * ppo.steps_per_iteration,
    num_evals=3,
    num_eval_episodes=4,
    progress=False,
)
if jax.process_index() == 0:
    run.save(out)
final = run.curve.eval_return[:, -1].mean(-1).tolist()
print(f"process {jax.process_index()} of {jax.process_count()}: final returns {final}")
