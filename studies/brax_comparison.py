"""Throughput of diffsim's PPO / APG / ES against Brax's own trainers, same hyperparameters.

    .venv/bin/python studies/brax_comparison.py [--trainers ppo apg es] [--steps 819200]
                                                [--es-generations 32] [--evals 9] [--skip 2]

Env: Brax `inverted_pendulum`, spring backend, 1000-step episodes, on the CPU.

Brax's trainers (`brax.training.agents.{ppo,apg,es}.train`) fail on jax 0.10
(`jax.device_put_replicated` was removed), so they run in a separate pinned virtualenv,
`.venv-brax/` (jax==0.9.2, jaxlib==0.9.2, brax==0.14.2), created on first use, as a
subprocess running the helper embedded below (`BRAX_HELPER`) that prints one JSON line.
diffsim's side runs in this process with `diffsim.train`. The two sides run one after the
other, never at the same time.

Matched per trainer (Brax name / diffsim name):

- PPO: 128 envs, unroll 16 (Brax `batch_size` 32 x `num_minibatches` 4 = 128 sequences,
  one unroll per training step), 4 epochs (`num_updates_per_batch`) x 4 minibatches of 512
  samples, lr 3e-4, discount 0.97, GAE 0.95, clip 0.2, entropy 1e-3, reward scaling 10,
  grad-norm clip 0.5, observation normalisation, bootstrap on time-out; policy 64x64 tanh
  with a state-dependent std (Brax's tanh-normal: softplus of a network output, ~0.69 at
  the start; diffsim: `state_dependent_std=True, init_std=0.69`), value 64x64 tanh.
  (Brax ignores `noise_std_type`/`init_noise_std` for its default tanh-normal policy.)
- APG: 64 envs, horizon 32, lr 1e-3 (no decay), Adam (0.7, 0.95), elementwise clip 1 then
  global-norm clip 1, stochastic (reparameterised) actions with a state-dependent std
  starting at ~0.069 (Brax APG's `var_scale` 0.1), obs normalisation, policy 64x64 tanh
  (Brax's default layer norm off). inverted_pendulum's reward is a constant +1 while alive: the gradient is
  zero, XLA prunes the backward pass on both sides, so this measures rollout + update.
- ES: 64 perturbations per generation (Brax `population_size` 32 antithetic pairs),
  std 0.05, Adam lr 0.01, centred-rank fitness shaping, full 1000-step episodes, obs
  normalisation, policy 64x64 tanh. Brax samples actions from its tanh-Gaussian (std
  ~0.69) during ES rollouts; diffsim's ES acts deterministically.

Throughput is env steps per second of training, compile and evaluation excluded, in
steady state: both trainers run in `--evals - 1` chunks (Brax "epochs", diffsim segments)
and the first `--skip` (2) chunks are left out on both sides: Brax's training epoch
compiles on its first call and, as measured here, takes as long again on the second (a
second compile), then runs ~10x faster. diffsim compiles ahead of time. Brax's times come
from its `progress_fn` (`training/walltime`), diffsim's from `run.curve.wall_time`, which
counts training only. Env steps are counted the same way on both sides: for PPO and APG
every simulated step; for ES only the steps inside each member's scored episode (Brax's
`num_env_steps`, from its `obs_weights`; diffsim's ES stops simulating a population
once every member's episode has ended, Brax's simulates all `2 x population x 1000`
steps of every generation). Both sides get the same budget in those steps.

End-to-end time to solve: seconds from the start of the trainer (subprocess for Brax,
`diffsim.train` for diffsim) to the first evaluation whose mean return is at least
`--solve` (950), compile and evaluation included. The final evaluation return (16
deterministic episodes) is reported too.

Prints a table and writes results/brax_comparison.json.
"""

import argparse
import json
import os
import subprocess
import textwrap
import time
from pathlib import Path

import jax
import jax.random as jr
import numpy as np

os.environ.setdefault("DIFFSIM_CACHE_DIR", "0")  # real compiles on both sides, no cache loads
import diffsim  # noqa: E402

ENV = "inverted_pendulum"
BACKEND = "spring"
EPISODE_LENGTH = 1000
EVAL_EPISODES = 16
HIDDEN = (64, 64)
BRAX_VENV = Path(".venv-brax")
BRAX_PINS = ["jax==0.9.2", "jaxlib==0.9.2", "brax==0.14.2"]

PPO = dict(
    num_envs=128,
    unroll_length=16,
    num_epochs=4,
    num_minibatches=4,
    learning_rate=3e-4,
    discount=0.97,
    gae_lambda=0.95,
    clip_epsilon=0.2,
    entropy_coef=1e-3,
    reward_scale=10.0,
    max_grad_norm=0.5,
    init_std=0.69,  # Brax's tanh-normal: std = softplus(net output) + 0.001, ~0.69 at 0
)
APG = dict(
    num_envs=64,
    horizon=32,
    learning_rate=1e-3,
    adam_b=(0.7, 0.95),
    grad_clip=1.0,
    init_std=0.069,  # Brax APG's tanh-normal has var_scale 0.1
)
ES = dict(population_size=64, std=0.05, learning_rate=0.01)

BRAX_HELPER = textwrap.dedent(
    r'''
    """Brax's side of studies/brax_comparison.py: run one Brax trainer, print one JSON line."""
    import functools, json, sys, time
    import jax, jax.numpy as jnp
    from brax import envs
    from flax import linen

    cfg = json.loads(sys.argv[1])
    env = envs.get_environment(cfg["env"], backend=cfg["backend"])
    log = []
    t0 = time.time()

    def progress(step, metrics):
        log.append(dict(
            step=int(step),
            time=time.time() - t0,
            walltime=float(metrics.get("training/walltime", float("nan"))),
            sps=float(metrics.get("training/sps", float("nan"))),
            eval_return=float(metrics.get("eval/episode_reward", float("nan"))),
        ))
        print(f"[brax {cfg['trainer']}] {log[-1]}", file=sys.stderr, flush=True)

    hidden, act = tuple(cfg["hidden"]), linen.tanh
    common = dict(environment=env, episode_length=cfg["episode_length"], num_evals=cfg["evals"],
                  num_eval_envs=cfg["eval_episodes"], deterministic_eval=True,
                  normalize_observations=True, progress_fn=progress, seed=cfg["seed"])
    p = cfg["params"]
    if cfg["trainer"] == "ppo":
        from brax.training.agents.ppo import networks, train as ppo
        factory = functools.partial(
            networks.make_ppo_networks, policy_hidden_layer_sizes=hidden,
            value_hidden_layer_sizes=hidden, activation=act)
        ppo.train(num_timesteps=cfg["steps"], num_envs=p["num_envs"],
                  unroll_length=p["unroll_length"], batch_size=p["num_envs"] // p["num_minibatches"],
                  num_minibatches=p["num_minibatches"], num_updates_per_batch=p["num_epochs"],
                  learning_rate=p["learning_rate"], discounting=p["discount"],
                  gae_lambda=p["gae_lambda"], clipping_epsilon=p["clip_epsilon"],
                  entropy_cost=p["entropy_coef"], reward_scaling=p["reward_scale"],
                  max_grad_norm=p["max_grad_norm"], bootstrap_on_timeout=True,
                  network_factory=factory, **common)
    elif cfg["trainer"] == "apg":
        from brax.training.agents.apg import networks, train as apg
        factory = functools.partial(networks.make_apg_networks, hidden_layer_sizes=hidden,
                                    activation=act, layer_norm=False)
        apg.train(policy_updates=cfg["steps"] // (p["num_envs"] * p["horizon"]),
                  num_envs=p["num_envs"], horizon_length=p["horizon"],
                  learning_rate=p["learning_rate"], adam_b=tuple(p["adam_b"]),
                  use_schedule=False, max_gradient_norm=p["grad_clip"],
                  network_factory=factory, **common)
        # progress_fn gets the epoch index for APG: convert to env steps
        updates_per_epoch = round(cfg["steps"] // (p["num_envs"] * p["horizon"]) / (cfg["evals"] - 1))
        for row in log:
            row["step"] *= updates_per_epoch * p["num_envs"] * p["horizon"]
    elif cfg["trainer"] == "es":
        from brax.training.agents.es import networks, train as es
        factory = functools.partial(networks.make_es_networks, hidden_layer_sizes=hidden,
                                    activation=act)
        es.train(num_timesteps=cfg["steps"], population_size=p["population_size"] // 2,
                 perturbation_std=p["std"], learning_rate=p["learning_rate"],
                 fitness_shaping=es.FitnessShaping.CENTERED_RANK, network_factory=factory,
                 **common)
    total = time.time() - t0
    print(json.dumps(dict(log=log, total_s=total, jax=jax.__version__,
                          devices=[str(d) for d in jax.devices()])))
    '''
)


def ensure_brax_venv() -> Path:
    """Create `.venv-brax/` with the pinned jax/brax on first use; return its python."""
    python = BRAX_VENV / "bin" / "python"
    stamp = BRAX_VENV / ".installed"
    if stamp.exists():
        return python
    print(f"setting up {BRAX_VENV}/ with {' '.join(BRAX_PINS)} (first use, a few minutes)")
    if not python.exists():
        subprocess.run(["python3", "-m", "venv", str(BRAX_VENV)], check=True)
    pip = [str(python), "-m", "pip", "install", "--quiet"]
    subprocess.run([*pip, "--upgrade", "pip"], check=True)
    subprocess.run([*pip, *BRAX_PINS], check=True)
    trainers = ", ".join(f"brax.training.agents.{t}.train" for t in ("ppo", "apg", "es"))
    subprocess.run([str(python), "-c", f"import {trainers}"], check=True)
    stamp.touch()
    return python


def steady_state(steps, seconds, skip: int) -> tuple[float, float, list[float]]:
    """(steps/s over chunks `skip:`, compile estimate, per-chunk steps/s) of training chunks.

    The compile estimate is the time of the first `skip` chunks beyond what they would
    have taken at the steady rate.
    """
    steps, seconds = np.asarray(steps, float), np.asarray(seconds, float)
    rate = steps[skip:].sum() / seconds[skip:].sum()
    return (
        float(rate),
        float(seconds[:skip].sum() - steps[:skip].sum() / rate),
        list(steps / seconds),
    )


def run_brax(trainer: str, steps: int, evals: int, seed: int, skip: int, solve: float) -> dict:
    params = {"ppo": PPO, "apg": APG, "es": ES}[trainer]
    cfg = dict(
        trainer=trainer,
        env=ENV,
        backend=BACKEND,
        episode_length=EPISODE_LENGTH,
        eval_episodes=EVAL_EPISODES,
        hidden=list(HIDDEN),
        steps=steps,
        evals=evals,
        seed=seed,
        params=params,
    )
    python = ensure_brax_venv()
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    tic = time.perf_counter()
    proc = subprocess.run(
        [str(python), "-c", BRAX_HELPER, json.dumps(cfg)],
        stdout=subprocess.PIPE,  # the JSON result; Brax's progress and errors go to stderr
        text=True,
        env=env,
    )
    wall = time.perf_counter() - tic
    if proc.returncode != 0:
        raise RuntimeError(f"Brax {trainer} failed (exit {proc.returncode}; see its stderr above)")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    log = out["log"]
    # log[0]: initial eval (before any training); log[i>=1]: after training chunk i.
    trained = log[1:]
    last = trained[-1]
    steps_done = np.diff([0] + [r["step"] for r in trained])
    seconds = np.diff([0.0] + [r["walltime"] for r in trained])
    steady_sps, compile_s, per_chunk = steady_state(steps_done, seconds, skip)
    return dict(
        side="brax",
        trainer=trainer,
        env_steps=last["step"],
        steady_steps_per_s=steady_sps,
        chunk_steps_per_s=per_chunk,
        compile_s_estimate=compile_s,
        train_walltime_s=last["walltime"],
        end_to_end_s=wall,
        final_return=last["eval_return"],
        solve_s=next((r["time"] for r in log if r["eval_return"] >= solve), None),
        curve=[(r["step"], r["eval_return"]) for r in log],
        log=log,
        jax=out["jax"],
    )


def diffsim_strategy(trainer: str, env):
    obs, act = env.observation_size, env.action_size
    if trainer == "ppo":
        p = PPO
        strategy = diffsim.PPO(
            num_envs=p["num_envs"],
            unroll_length=p["unroll_length"],
            num_epochs=p["num_epochs"],
            num_minibatches=p["num_minibatches"],
            learning_rate=p["learning_rate"],
            discount=p["discount"],
            gae_lambda=p["gae_lambda"],
            clip_epsilon=p["clip_epsilon"],
            entropy_coef=p["entropy_coef"],
            reward_scale=p["reward_scale"],
            max_grad_norm=p["max_grad_norm"],
            value_hidden=HIDDEN,
        )
        make = lambda k: diffsim.GaussianPolicy(
            obs, act, hidden=HIDDEN, init_std=p["init_std"], state_dependent_std=True, key=k
        )
    elif trainer == "apg":
        p = APG
        strategy = diffsim.APG(
            num_envs=p["num_envs"],
            horizon=p["horizon"],
            learning_rate=p["learning_rate"],
            adam_b1=p["adam_b"][0],
            adam_b2=p["adam_b"][1],
            max_grad_value=p["grad_clip"],
            max_grad_norm=p["grad_clip"],
            stochastic=True,
        )
        make = lambda k: diffsim.GaussianPolicy(
            obs, act, hidden=HIDDEN, init_std=p["init_std"], state_dependent_std=True, key=k
        )
    else:
        p = ES
        strategy = diffsim.ES(
            population_size=p["population_size"],
            std=p["std"],
            learning_rate=p["learning_rate"],
            rollout_length=EPISODE_LENGTH,
            fitness_shaping="centered_rank",
        )
        make = lambda k: diffsim.DeterministicPolicy(obs, act, hidden=HIDDEN, key=k)
    return strategy, make


def run_diffsim(trainer: str, steps: int, evals: int, seed: int, skip: int, solve: float) -> dict:
    tic = time.perf_counter()
    env = diffsim.make_env(ENV, backend=BACKEND, episode_length=EPISODE_LENGTH)
    strategy, make = diffsim_strategy(trainer, env)
    log_dir = Path("results/brax_comparison_log") / trainer
    run = diffsim.train(
        strategy,
        env,
        make,
        key=jr.key(seed),
        total_steps=steps,
        num_evals=evals,
        num_eval_episodes=EVAL_EPISODES,
        progress=False,
        log_dir=log_dir,
    )
    wall = time.perf_counter() - tic
    wall_time = np.asarray(run.curve.wall_time, dtype=float)  # training only
    env_steps = np.asarray(run.curve.env_steps)
    returns = np.asarray(run.curve.eval_return).mean(-1)
    steady_sps, _, per_chunk = steady_state(np.diff(env_steps), np.diff(wall_time), skip)
    lines = [json.loads(x) for x in (log_dir / "log.jsonl").read_text().splitlines()]
    setup = wall - run.config["compile_seconds"] - lines[-1]["train_seconds"]
    setup -= lines[-1]["eval_seconds"]  # env building, host work: spread evenly below
    elapsed = [
        run.config["compile_seconds"] + x["train_seconds"] + x["eval_seconds"] + setup
        for x in lines
    ]
    solved = [t for t, r in zip(elapsed, returns, strict=True) if r >= solve]
    return dict(
        side="diffsim",
        trainer=trainer,
        env_steps=int(env_steps[-1]),
        steady_steps_per_s=steady_sps,
        chunk_steps_per_s=per_chunk,
        compile_s_estimate=float(run.config["compile_seconds"]),
        train_walltime_s=float(wall_time[-1]),
        eval_s=float(run.config["eval_seconds"]),
        end_to_end_s=wall,
        final_return=float(returns[-1]),
        solve_s=solved[0] if solved else None,
        curve=[(int(s), float(r)) for s, r in zip(env_steps, returns, strict=True)],
        jax=jax.__version__,
    )


def _num(x: float | None) -> str:
    return "n/a" if x is None or np.isnan(x) else f"{x:.1f}"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trainers", nargs="+", default=["ppo", "apg", "es"])
    parser.add_argument("--steps", type=int, default=819_200, help="PPO/APG env-step budget")
    parser.add_argument(
        "--es-steps",
        type=int,
        default=2_500_000,
        help="ES budget in steps inside scored episodes (both sides count these)",
    )
    parser.add_argument("--solve", type=float, default=950.0, help="return that counts as solved")
    parser.add_argument("--evals", type=int, default=9, help="evaluations: evals-1 chunks")
    parser.add_argument(
        "--skip", type=int, default=2, help="chunks left out of the steady-state rate"
    )
    parser.add_argument("--sides", nargs="+", default=["brax", "diffsim"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="results/brax_comparison.json")
    args = parser.parse_args()

    # Rows of an earlier run for the sides and trainers not run now are kept (so one side
    # can be re-measured alone, e.g. `--sides diffsim`).
    rerun = {(side, t) for side in args.sides for t in args.trainers}
    earlier = json.loads(Path(args.out).read_text())["rows"] if Path(args.out).exists() else []
    rows = [r for r in earlier if (r["side"], r["trainer"]) not in rerun and "error" not in r]
    for trainer in args.trainers:
        steps = args.es_steps if trainer == "es" else args.steps
        for side, fn in (("brax", run_brax), ("diffsim", run_diffsim)):
            if side not in args.sides:
                continue
            print(f"--- {side} {trainer}: {steps:,} env steps", flush=True)
            try:
                row = fn(trainer, steps, args.evals, args.seed, args.skip, args.solve)
            except Exception as error:  # report and go on with the other trainers
                row = dict(side=side, trainer=trainer, error=f"{type(error).__name__}: {error}")
                print(row["error"][-2000:], flush=True)
            row["load_average"] = os.getloadavg()
            rows.append(row)
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(dict(rows=rows), indent=2, default=str))

    print(f"\n{ENV} ({BACKEND}): steady-state env steps/s, compile and evaluation excluded")
    header = (
        f"{'trainer':<8}{'side':<9}{'env steps':>11}{'steps/s':>11}{'compile s':>11}"
        f"{'train s':>9}{'end-to-end s':>14}{'solved at s':>13}{'final return':>14}"
    )
    print(header)
    for r in rows:
        if "error" in r:
            print(f"{r['trainer']:<8}{r['side']:<9}  FAILED: {r['error'].splitlines()[0][:80]}")
            continue
        print(
            f"{r['trainer']:<8}{r['side']:<9}{r['env_steps']:>11,}{r['steady_steps_per_s']:>11,.0f}"
            f"{_num(r['compile_s_estimate']):>11}{r['train_walltime_s']:>9.1f}"
            f"{r['end_to_end_s']:>14.1f}{_num(r['solve_s']):>13}{r['final_return']:>14.1f}"
        )
    print(
        "compile s: diffsim's ahead-of-time compile of its two programs (training and"
        " evaluation);\n  Brax's, estimated as the time its first --skip training chunks took"
        " beyond the steady rate\n  (Brax's evaluation compiles are not in it; n/a for ES)."
        "\ntrain s: training time, evaluation excluded; Brax's includes its compiles."
        "\nend-to-end s: the whole train() call (subprocess for Brax), compile and evaluation"
        " included.\nsolved at s: end-to-end seconds to the first evaluation >= --solve."
    )
    print("\nper-chunk env steps/s (the first --skip chunks are left out of steps/s above):")
    for r in rows:
        if "error" not in r:
            chunks = " ".join(f"{x / 1e3:.1f}k" for x in r["chunk_steps_per_s"])
            print(f"  {r['trainer']:<5}{r['side']:<9}{chunks}")
    ratios = {}
    for trainer in args.trainers:
        pair = {r["side"]: r for r in rows if r["trainer"] == trainer and "error" not in r}
        if len(pair) == 2:
            ratios[trainer] = (
                pair["diffsim"]["steady_steps_per_s"] / pair["brax"]["steady_steps_per_s"]
            )
            print(f"{trainer}: diffsim / Brax steady-state throughput = {ratios[trainer]:.2f}x")
    meta = dict(
        env=ENV,
        backend=BACKEND,
        episode_length=EPISODE_LENGTH,
        eval_episodes=EVAL_EPISODES,
        hidden=HIDDEN,
        ppo=PPO,
        apg=APG,
        es=ES,
        evals=args.evals,
        cpu_count=os.cpu_count(),
        devices=[str(d) for d in jax.devices()],
        versions=diffsim.results.versions(),
        brax_venv=BRAX_PINS,
    )
    Path(args.out).write_text(
        json.dumps(dict(meta=meta, rows=rows, ratios=ratios), indent=2, default=str)
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
