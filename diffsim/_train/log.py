"""What a run reports while it goes: the JSON-lines log and the progress bar."""

import json
import time

import numpy as np

from . import checkpoint
from .plan import Plan


class Log:
    """`log_dir/log.jsonl`: one JSON line per evaluation, written as it happens."""

    def __init__(self, log_dir, strategy, env):
        self.path = None
        if log_dir is not None:
            self.path = checkpoint.check_writable(log_dir) / "log.jsonl"
            self.path.write_text("")
            self.label = {"strategy": type(strategy).__name__, "env": env.name}

    def write(self, index: int, history: dict, metrics: dict) -> None:
        if self.path is None:
            return
        returns = history["eval_return"][-1]
        seconds = history["seconds"][-1]
        line = {
            **self.label,
            "eval": index,
            "time": time.time(),  # when the line was written (Unix seconds)
            "env_steps": float(np.mean(history["env_steps"][-1])),
            "train_seconds": float(seconds[0]),
            "eval_seconds": float(seconds[1]),
            "eval_return_mean": float(np.mean(returns)),
            "eval_return_per_seed": np.mean(returns, axis=-1).reshape(-1).tolist(),
            **{f"{k}_mean": _nanmean(v) for k, v in metrics.items() if v.size},
        }
        with self.path.open("a") as f:
            f.write(json.dumps(line) + "\n")


def _nanmean(values: np.ndarray) -> float | None:
    """The mean over the entries that are not NaN (`train_return` is NaN in iterations
    where no episode ended), or None (JSON null) where every entry is NaN."""
    kept = values[~np.isnan(values)]
    return float(np.mean(kept)) if kept.size else None


class Progress:
    """A tqdm bar over env steps showing steps/s and the latest mean eval return."""

    def __init__(self, plan: Plan, strategy, env, *, enabled: bool):
        self.bar = None
        if enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(
                total=plan.total_steps,
                unit="step",
                unit_scale=True,
                dynamic_ncols=True,
                desc=f"{type(strategy).__name__} {env.name}",
            )
        self.done = 0

    def update(self, history: dict) -> None:
        env_steps = int(np.mean(history["env_steps"][-1]))
        if self.bar is not None:
            self.bar.update(env_steps - self.done)
            self.bar.set_postfix(eval_return=f"{np.mean(history['eval_return'][-1]):.1f}")
        self.done = env_steps

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
