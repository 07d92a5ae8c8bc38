"""`train_seeds` across 2 processes gives the one-process result.

Two processes on this machine join with `jax.distributed` (a localhost coordinator, CPU
collectives over gloo) and run `docs/snippets/multihost.py`, the documentation's
multi-host example; a third runs it alone. The seeds are split over the two processes'
devices, and every process ends with the whole `Run`.
"""

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

import diffsim

ROOT = Path(__file__).resolve().parents[1]
SNIPPET = ROOT / "docs" / "snippets" / "multihost.py"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _start(out: Path, num_processes: int, process_id: int, port: int) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}  # this checkout's diffsim
    # The suite's XLA_FLAGS (compiler options; no device count): one CPU device each.
    args = [str(out), f"localhost:{port}", str(num_processes), str(process_id)]
    return subprocess.Popen(
        [sys.executable, str(SNIPPET), *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(two-process run, one-process run, the final returns each process printed)."""
    root = tmp_path_factory.mktemp("multihost")
    port, alone_port = _free_port(), _free_port()
    procs = [_start(root / "two", 2, i, port) for i in range(2)]
    procs.append(_start(root / "one", 1, 0, alone_port))
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    for p, output in zip(procs, outputs, strict=True):
        assert p.returncode == 0, output[-3000:]
    printed = [re.findall(r"final returns (\[.*\])", output) for output in outputs]
    return diffsim.load_run(root / "two"), diffsim.load_run(root / "one"), printed


def test_the_seeds_were_split_over_the_two_processes(runs):
    two, one, _ = runs
    assert (
        two.config["mesh"] == {"seeds": 2, "batch": 1}
        and len(two.config["machine"]["accelerator"]) == 2
    )
    assert one.config["mesh"] is None and len(one.config["machine"]["accelerator"]) == 1


def test_two_processes_give_the_one_process_result(runs):
    two, one, _ = runs
    assert two.curve.eval_return.shape == one.curve.eval_return.shape == (4, 3, 4)
    np.testing.assert_array_equal(two.curve.env_steps, one.curve.env_steps)
    final = lambda run: np.asarray(run.curve.eval_return[:, -1]).mean(-1)
    np.testing.assert_allclose(final(two), final(one), rtol=1e-4, atol=1e-3)
    assert np.ptp(final(one)) > 0  # four different seeds, not one copied
    sums = lambda run: [np.asarray(x).reshape(4, -1).sum(1) for x in jax.tree.leaves(run.policy)]
    for a, b in zip(sums(two), sums(one), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(
        two.metrics["policy_loss"], one.metrics["policy_loss"], rtol=1e-3, atol=1e-5
    )


def test_every_process_holds_the_whole_run(runs):
    _, _, printed = runs
    assert len(printed[0]) == len(printed[1]) == 1
    assert printed[0] == printed[1]  # process 1 printed the same four returns as process 0
