"""Scorer models come from local directories or fsspec URLs (pre-staged volumes, buckets), never a hub."""

from __future__ import annotations

import tempfile

from trainer import io
from trainer.errors import ConfigError


def local_model_dir(url: str, key: str) -> str:
    """A local path holding the model directory at `url` (downloaded once when remote).

    `key` names the config field in the error message."""
    if not io.exists(url):
        raise ConfigError(f"{key}: model directory not found: {url}")
    if io.is_local(url):
        return io.local_path(url)
    return str(io.download_dir(url, tempfile.mkdtemp(prefix="scorer-model-")))
