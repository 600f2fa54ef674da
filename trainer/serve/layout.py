"""The serving directory: a plain Hugging Face model directory (what vLLM and `from_pretrained` load)
plus the codec that turns its audio tokens into sound.

    config.json, model.safetensors, tokenizer files, generation_config.json, speechlm.json
    codec.json   {"codec_model_path": "codec"}  (relative: the codec/ subdirectory; or an absolute URL)
    codec/       our codec directory (model.safetensors + model_config.json), when copied in
"""

from __future__ import annotations

import os
from pathlib import Path

from trainer import io
from trainer.codec.checkpoint import CONFIG_FILE, LEGACY_MODEL_FILE, MODEL_FILE

CODEC_REFERENCE = "codec.json"
CODEC_DIR = "codec"


def codec_path(model_dir: str) -> str | None:
    """The codec recorded in a serving directory (a URL), or None when it records none."""
    ref = io.join(model_dir, CODEC_REFERENCE)
    if not io.exists(ref):
        return None
    path = str(io.read_json(ref).get("codec_model_path") or "")
    if not path:
        return None
    if "://" in path or path.startswith("/"):
        return path
    return io.join(model_dir, path)


def write_codec_reference(model_dir: str, codec_url: str) -> None:
    """Record `codec_url` in `model_dir/codec.json`; local paths are made absolute (a relative path in
    the file means "inside the serving directory")."""
    if io.is_local(codec_url) and codec_url != CODEC_DIR:
        codec_url = os.path.abspath(io.local_path(codec_url))
    io.write_json_atomic(io.join(model_dir, CODEC_REFERENCE), {"codec_model_path": codec_url})


def ship_codec(codec_url: str, staging: Path, copy: bool) -> None:
    """Copy our codec directory into codec/ (self-contained output) or record where the codec lives."""
    directory = codec_url if io.isdir(codec_url) else codec_url.rstrip("/").rsplit("/", 1)[0]
    weights = next((n for n in (MODEL_FILE, LEGACY_MODEL_FILE) if io.exists(io.join(directory, n))), None)
    if copy and weights and io.exists(io.join(directory, CONFIG_FILE)):
        target = staging / CODEC_DIR
        target.mkdir()
        for name in (weights, CONFIG_FILE):
            (target / name).write_bytes(io.read_bytes(io.join(directory, name)))
        write_codec_reference(str(staging), CODEC_DIR)
    else:
        write_codec_reference(str(staging), codec_url)
