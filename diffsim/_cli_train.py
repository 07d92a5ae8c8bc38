"""`diffsim train`'s half of the command: strategy fields as options, the run's options,
and the run itself (`cli.py` holds the command and its other sub-commands)."""

import argparse
import dataclasses
import json
import os
import sys
import typing

import equinox as eqx
import jax
import numpy as np

import diffsim

from ._train.checkpoint import check_writable


def strategies() -> dict[str, type]:
    """Strategy classes by command-line name, from `diffsim.strategies.registry`."""
    return strategy_registry().strategies()


def _add_hyperparameters(
    parser: argparse.ArgumentParser, cls: type, prefix: str = "", *, optional: bool = False
) -> list[str]:
    """One option per frozen field with a plain default (numbers, flags, int tuples,
    strings); a settings module's fields (`options`, `update`) count as the class's own
    (`--remat`); a field whose default is another module (GuidedES's `gradient` and `mode`)
    becomes a component (`_add_components`). With `optional`, options default to None."""
    added = []
    for field in dataclasses.fields(cls):
        default = field.default
        flag = "--" + (prefix + field.name).replace("_", "-")
        if field.name in _settings().held(cls):
            added += _add_hyperparameters(parser, type(default), prefix, optional=optional)
            continue
        if isinstance(default, eqx.Module) and not prefix:
            _add_component(parser, cls, field.name, default)
            added.append(field.name)
            continue
        if optional and any(a.dest == prefix + field.name for a in parser._actions):
            added.append(field.name)  # a field two kinds share: one option
            continue
        if isinstance(default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default)
        elif isinstance(default, (int, float, str)):
            parser.add_argument(
                flag,
                type=type(default),
                default=default,
                metavar=type(default).__name__.upper(),
                help=f"default {default}",
            )
        elif isinstance(default, tuple) and all(isinstance(v, int) for v in default):
            parser.add_argument(
                flag,
                type=_int_tuple,
                default=default,
                metavar="N,N,...",
                help=f"default {','.join(map(str, default))}",
            )
        else:
            continue
        added.append(field.name)
    return added


def _settings():
    """`strategies._window.options`, imported when first needed (it imports Brax)."""
    from .strategies._window import options

    return options


def _final_subclasses(base: type) -> list[type]:
    """The concrete classes below `base` (equinox: abstract or final)."""
    found = []
    for sub in base.__subclasses__():
        found += [sub] if not getattr(sub, "__abstractmethods__", None) else []
        found += _final_subclasses(sub)
    return list(dict.fromkeys(found))


def _add_component(parser: argparse.ArgumentParser, cls: type, name: str, default) -> None:
    """`--NAME KIND` picks the component's class (e.g. `--gradient shac-window`), and
    `--NAME-FIELD VALUE` sets its fields (`--gradient-horizon 16`): the fields of every kind
    are listed, and one that the chosen kind lacks is an error."""
    base = typing.get_type_hints(cls).get(name, type(default))
    command_name = strategy_registry().command_name
    fallback = command_name(type(default))
    kinds = {command_name(k): k for k in _final_subclasses(base)} or {fallback: type(default)}
    parser.add_argument(
        "--" + name.replace("_", "-"),
        dest=f"{name}.kind",
        choices=list(kinds),
        default=fallback,
        help=f"{cls.__name__}.{name}; default {fallback}",
    )
    for kind in kinds.values():
        for field in _add_hyperparameters(parser, kind, prefix=f"{name}_", optional=True):
            parser.set_defaults(**{f"{name}_{field}": None})
    parser.set_defaults(**{f"{name}.kinds": kinds})


def _component(args, name: str):
    """The module `_add_component`'s options describe."""
    kinds = getattr(args, f"{name}.kinds")
    kind = kinds[getattr(args, f"{name}.kind")]
    given = {
        n: getattr(args, f"{name}_{n}")
        for k in kinds.values()
        for n in _settings().option_names(k)
        if getattr(args, f"{name}_{n}", None) is not None
    }
    wrong = sorted(set(given) - _settings().option_names(kind))
    if wrong:
        flags = ", ".join("--" + f"{name}_{w}".replace("_", "-") for w in wrong)
        raise ValueError(
            f"{flags} do not apply to {kind.__name__} (--{name} {strategy_registry().command_name(kind)})"
        )
    return kind(**_settings().grouped(kind, given))


def strategy_from(args):
    """The strategy the parsed options describe."""
    values = {}
    for name in args.hyperparameters:
        values[name] = (
            _component(args, name) if hasattr(args, f"{name}.kinds") else getattr(args, name)
        )
    return args.cls(**_settings().grouped(args.cls, values))


def strategy_registry():
    """`diffsim.strategies.registry`, imported when first needed (it imports Brax)."""
    from .strategies import registry

    return registry


def add_train_parser(kinds, name: str, cls: type) -> None:
    """`diffsim train NAME`: the strategy's fields, then the run's options."""
    sub = kinds.add_parser(
        name,
        help=f"{cls.__name__}; hyperparameters as options",
        description=(cls.__doc__ or "").split("\n\n")[0],
    )
    sub.set_defaults(hyperparameters=_add_hyperparameters(sub, cls), cls=cls)
    sub.add_argument(
        "--env",
        default="pendulum",
        help="env name (see `diffsim envs`), gymnax:NAME, or MODULE:CLASS (an env class of"
        " your own, importable from the current directory or sys.path); default pendulum",
    )
    sub.add_argument(
        "--env-arg",
        action="append",
        default=[],
        type=env_arg,
        metavar="KEY=VALUE",
        help="a keyword argument of the env's constructor, repeatable; VALUE is read as JSON"
        " where it parses (2.0, true, [1,2]), else as a string",
    )
    sub.add_argument("--backend", default=None, help="Brax backend (default spring)")
    sub.add_argument("--episode-length", type=int, default=None)
    sub.add_argument("--steps", type=int, default=200_000, help="env-step budget; default 200000")
    sub.add_argument(
        "--seeds", type=int, default=1, help="number of seeds, trained at once; default 1"
    )
    sub.add_argument("--seed", type=int, default=0, help="base seed; default 0")
    sub.add_argument("--num-evals", type=int, default=20)
    sub.add_argument("--eval-episodes", type=int, default=16)
    sub.add_argument(
        "--policy",
        choices=["gaussian", "deterministic"],
        default=None,
        help="default: deterministic, or gaussian where the strategy's check() rejects it",
    )
    sub.add_argument(
        "--hidden",
        type=_int_tuple,
        default=(64, 64),
        metavar="N,N,...",
        help="policy hidden widths; default 64,64",
    )
    sub.add_argument("--out", default=None, help="save the run to this folder")
    sub.add_argument(
        "--log-dir",
        default=None,
        help="write LOG_DIR/log.jsonl, one JSON line per evaluation, as the run goes",
    )
    sub.add_argument(
        "--threshold",
        type=float,
        default=None,
        help="report when the IQM first reaches this return",
    )


def env_arg(text: str) -> tuple[str, object]:
    """`"gain=2.0"` -> `("gain", 2.0)`; a VALUE that is not JSON stays a string."""
    key, sep, value = text.partition("=")
    if not sep or not key.isidentifier():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def _int_tuple(text: str) -> tuple[int, ...]:
    """`"64,64"` -> `(64, 64)`; argparse reports a `ValueError` as an invalid value."""
    return tuple(int(v) for v in text.split(","))


def run_train(args) -> None:
    from .stats import iqm_ci, threshold_crossing

    env = with_cwd(
        lambda: diffsim.make_env(
            args.env, backend=args.backend, episode_length=args.episode_length, **dict(args.env_arg)
        )
    )
    strategy = strategy_from(args)
    if args.seeds < 1:
        raise ValueError(f"--seeds must be >= 1, got {args.seeds}")
    policy_cls = _policy_class(args.policy, strategy, env, args.hidden)
    make = lambda key: policy_cls(
        env.observation_size, env.action_size, hidden=args.hidden, key=key
    )
    if args.out:
        check_writable(args.out)  # not after an hour of training
    keys = jax.random.split(jax.random.key(args.seed), args.seeds)
    run = diffsim.train_seeds(
        strategy,
        env,
        make,
        keys=keys,
        total_steps=args.steps,
        num_evals=args.num_evals,
        num_eval_episodes=args.eval_episodes,
        log_dir=args.log_dir,
    )
    final = np.asarray(run.curve.eval_return)[:, -1].mean(-1)
    mid, low, high = iqm_ci(final[:, None])
    print(
        f"{args.cls.__name__} on {env.name}: {run.config['total_steps']:,} env steps x {args.seeds} seeds, "
        f"final eval return IQM {mid[0]:.1f} [{low[0]:.1f}, {high[0]:.1f}], "
        f"train {run.config['train_seconds']:.1f} s, compile {run.config['compile_seconds']:.1f} s"
    )
    if args.threshold is not None:
        hit = threshold_crossing(run, args.threshold)
        if hit["env_steps"] is None:
            print(f"IQM never reached {args.threshold}")
        else:
            print(
                f"IQM first >= {args.threshold} at {hit['env_steps']:,} env steps, {hit['wall_time']:.1f} s"
            )
    if args.out:
        print(f"saved to {run.save(args.out)}")


def _policy_class(kind: str | None, strategy, env, hidden: tuple[int, ...]) -> type:
    """`--policy`'s class; by default deterministic, unless the strategy's `check` rejects
    a deterministic policy (PPO, REINFORCE: they need `log_prob`), then Gaussian."""
    if kind is not None:
        return diffsim.GaussianPolicy if kind == "gaussian" else diffsim.DeterministicPolicy
    example = eqx.filter_eval_shape(
        diffsim.DeterministicPolicy,
        env.observation_size,
        env.action_size,
        hidden=hidden,
        key=jax.random.key(0),
    )
    try:
        strategy.check(env, example)
    except ValueError:
        return diffsim.GaussianPolicy
    return diffsim.DeterministicPolicy


def with_cwd(build):
    """`build()` with the current directory on `sys.path` (as under `python -m`), so that
    `MODULE:CLASS` finds a module next to the user; the console script's path lacks it."""
    here = os.getcwd()
    added = here not in sys.path
    if added:
        sys.path.insert(0, here)
    try:
        return build()
    finally:
        if added:
            sys.path.remove(here)
