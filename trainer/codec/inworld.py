"""Loading codecs trained by the Inworld reference trainer (`tts/training/codec/train_codec.py`).

Such a directory holds the reference's `model_config.json`

    {"model_type": <run name>, "sample_rate": 48000, "token_rate": 50, "hop_length": 160,
     "upsample_factors": [3, 2], "kernel_sizes": [...]}          (factors / kernels may be null)

and its Lightning-Fabric checkpoints `checkpoint_<step>.pt` / `final_model.pt`:
`{"model": TrainableDecoder state dict, "optimizer", "loss_statistics", "config"}`. The reference
trains the decoder only (its encoder is X-codec2's), so only the decoder loads from it. Keys:

    reference key prefix            our Codec attribute
    ------------------------------  -------------------
    generator.decoder.quantizer.    quantizer.          (ResidualFSQ project_in / project_out)
    generator.decoder.backbone.     backbone.
    generator.decoder.head.         head.
    generator.fc_post_a.            fc_post_a.
    generator.upsampler.            upsampler.          (upsample_layers.i, resnet_blocks.i, out_proj)

plus the weight-norm rename `.weight_g` / `.weight_v` -> `.parametrizations.weight.original0/1`.
`mpd.` / `msd.` (the discriminators) are not part of the codec. The reference's ResnetBlock builds a
timestep projection `temb_proj` (Linear(512, C)) by default that its upsampler never calls: those
keys are dropped. Everything else must map onto the codec strictly.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, ValidationError

from trainer.config import CodecModelConfig, format_validation_error
from trainer.errors import ConfigError

PREFIXES: dict[str, str] = {
    "generator.decoder.quantizer.": "quantizer.",
    "generator.decoder.backbone.": "backbone.",
    "generator.decoder.head.": "head.",
    "generator.fc_post_a.": "fc_post_a.",
    "generator.upsampler.": "upsampler.",
}
SUFFIXES: dict[str, str] = {
    ".weight_g": ".parametrizations.weight.original0",
    ".weight_v": ".parametrizations.weight.original1",
}
_UNUSED_TEMB = re.compile(r"^upsampler\.resnet_blocks\.\d+\.temb_proj\.(weight|bias)$")
# Checkpoint file names the reference writes, most preferred first (after our own model.safetensors / model.pt).
FINAL_CHECKPOINT = "final_model.pt"
_STEP_CHECKPOINT = re.compile(r"^checkpoint_(\d+)\.pt$")


class InworldCodecConfig(BaseModel):
    """The reference's model_config.json (tts/core/codec/decoding.py: DecoderConfig)."""

    model_config = ConfigDict(extra="forbid")

    model_type: str
    sample_rate: int
    token_rate: int
    hop_length: int
    upsample_factors: list[int] | None = None
    kernel_sizes: list[int] | None = None


def is_inworld_config(raw: Any) -> bool:
    return isinstance(raw, dict) and ("model_type" in raw or "kernel_sizes" in raw)


def codec_config(raw: dict, source: str) -> CodecModelConfig:
    """Our config for a reference-trained decoder: its rates and upsampler; the rest is X-codec2's shape."""
    try:
        ref = InworldCodecConfig.model_validate(raw)
        return CodecModelConfig(
            sample_rate=ref.sample_rate,
            token_rate=ref.token_rate,
            hop_length=ref.hop_length,
            upsample_factors=ref.upsample_factors or [],
            upsample_kernel_sizes=ref.kernel_sizes or [],
            upsampler="inworld",
        )
    except ValidationError as err:
        raise ConfigError(f"{source} (Inworld reference codec config): {format_validation_error(err)}") from None


def latest_checkpoint_name(names: list[str]) -> str | None:
    """final_model.pt, else the highest checkpoint_<step>.pt, among a directory's file names."""
    if FINAL_CHECKPOINT in names:
        return FINAL_CHECKPOINT
    steps = [(int(m.group(1)), name) for name in names if (m := _STEP_CHECKPOINT.match(name))]
    return max(steps)[1] if steps else None


def to_codec_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    mapped = {}
    for key, value in state.items():
        for theirs, ours in PREFIXES.items():
            if key.startswith(theirs):
                name = ours + key[len(theirs) :]
                for old, new in SUFFIXES.items():
                    if name.endswith(old):
                        name = name[: -len(old)] + new
                if not _UNUSED_TEMB.match(name):
                    mapped[name] = value
                break
    return mapped
