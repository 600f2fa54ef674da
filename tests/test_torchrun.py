"""`python -m trainer.torchrun`: torchrun whose exit code a PyTorchJob's ExitCode restart policy can act on
(plain torchrun ends with 1 whatever happened to its workers)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

TORCHRUN = [sys.executable, "-m", "trainer.torchrun", "--standalone", "--nproc-per-node", "1", "--no-python"]


@pytest.mark.parametrize(("script", "code"), [
    ("exit 0", 0),
    ("exit 3", 3),  # a bug or bad input: permanent
    ("exit 143", 143),  # the trainer stopped before its end (distributed.STOPPED): retried
    ("import os, signal; os.kill(os.getpid(), signal.SIGKILL)", 137),  # OOM-killed: retried
])
def test_exit_code_tells_a_stopped_stage_from_a_failed_one(script: str, code: int) -> None:
    command = ["sh", "-c", script] if script.startswith("exit") else [sys.executable, "-c", script]
    result = subprocess.run([*TORCHRUN, *command], capture_output=True, text=True, timeout=120)
    assert result.returncode == code, result.stderr[-2000:]


def test_sigterm_to_torchrun_ends_with_143() -> None:
    """A deleted or preempted pod: the runtime SIGTERMs torchrun, which stops its workers."""
    proc = subprocess.Popen([*TORCHRUN, "sh", "-c", "echo started; sleep 60"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    deadline = time.time() + 60
    while "started" not in proc.stdout.readline():
        assert proc.poll() is None and time.time() < deadline
    os.kill(proc.pid, signal.SIGTERM)
    assert proc.wait(timeout=60) == 143
