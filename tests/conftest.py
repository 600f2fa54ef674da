"""Shared test fixtures. Tests run on CPU with tiny models; the example data ships in the repo."""

from __future__ import annotations

import os
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
