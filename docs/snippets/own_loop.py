"""Train APG on `reach` with a loop of your own: bind, then `init`/`step`/`policy` under
`eqx.filter_jit`, with your own metrics log. `tests/test_research.py` runs this file.

Run it: `python docs/snippets/own_loop.py` (well under a minute on a laptop CPU).
"""

import equinox as eqx
import jax
import numpy as np

import diffsim

TOTAL_STEPS = 10_240  # env steps, counted as `train` counts them

env = diffsim.make_env("reach")
policy = diffsim.DeterministicPolicy(env.observation_size, env.action_size, key=jax.random.key(0))
# One call binds the strategy to the env and the budget: with `lr_decay` the learning rate
# decays to 0 over TOTAL_STEPS (without `bind` it would stay constant, with a warning).
# Any strategy fits here: `diffsim.PPO()` with a GaussianPolicy, `diffsim.ES()`, ...
strategy = diffsim.APG(num_envs=8, horizon=16, lr_decay=True)
strategy = strategy.bind(env, total_steps=TOTAL_STEPS)

init = eqx.filter_jit(lambda policy, key: strategy.init(env, policy, key=key))
step = eqx.filter_jit(lambda state, key: strategy.step(env, state, key=key))
score = eqx.filter_jit(
    lambda state, key: diffsim.evaluate(env, strategy.policy(state), key=key, num_episodes=8)
)

key, init_key = jax.random.split(jax.random.key(1))
state = init(policy, init_key)
eval_key = jax.random.key(2)  # the same evaluation episodes every time
before = float(score(state, eval_key).mean())

history = []  # your own log: one dict of floats per iteration
env_steps = 0
while env_steps < TOTAL_STEPS:
    key, step_key = jax.random.split(key)
    state, metrics = step(state, step_key)
    env_steps += int(metrics["env_steps"])  # every built-in strategy reports it
    history.append({"env_steps": env_steps, **{k: float(v) for k, v in metrics.items()}})
    if len(history) % 8 == 0:
        # `train_return` is NaN in iterations where no episode ended: average with nanmean.
        recent = np.nanmean([h["train_return"] for h in history[-8:]])
        print(f"{env_steps:>7} env steps  train_return {recent:8.2f}")

after = float(score(state, eval_key).mean())
print(f"evaluation return: {before:.1f} before, {after:.1f} after {env_steps} env steps")
trained = strategy.policy(state)  # a plain eqx.Module acting on one observation
