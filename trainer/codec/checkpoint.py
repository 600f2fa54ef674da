"""Reading codec checkpoints: our directory / model.safetensors (or an older release's model.pt), an
original X-codec2 Lightning .ckpt, or a decoder the Inworld reference trainer wrote (its
model_config.json + final_model.pt / checkpoint_<N>.pt)."""

from __future__ import annotations

import io as _stdio
import json
import logging
import pickle
from collections.abc import Callable, Sequence
from typing import Any, Protocol, TypeVar

import torch
from pydantic import ValidationError
from safetensors.torch import load as load_bytes

from trainer import io
from trainer.codec import inworld, xcodec2
from trainer.config import CodecModelConfig, format_validation_error
from trainer.errors import ConfigError

log = logging.getLogger(__name__)

MODEL_FILE = "model.safetensors"
# Written by releases before 2026-12: read, never written.
LEGACY_MODEL_FILE = "model.pt"
CONFIG_FILE = "model_config.json"


class CodecModule(Protocol):
    """What loading needs of the codec module (trainer.codec.model.Codec), which builds on this file."""

    config: CodecModelConfig

    def codec_state_dict(self) -> dict[str, torch.Tensor]: ...

    def load_state_dict(self, state_dict: dict[str, torch.Tensor], strict: bool = True) -> Any: ...

    def to(self, device: torch.device) -> Any: ...


C = TypeVar("C", bound=CodecModule)

ENCODER_PREFIXES = ("acoustic_encoder.", "semantic_adapter.", "fc_prior.")
DECODER_PREFIXES = ("fc_post_a.", "backbone.", "upsampler.", "head.")


def _torch_load(url: str) -> Any:
    data = io.read_bytes(url)
    try:
        return torch.load(_stdio.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        # Lightning checkpoints may pickle hyper-parameter objects; only load files you trust.
        log.warning("%s holds more than tensors; unpickling it fully", url)
        return torch.load(_stdio.BytesIO(data), map_location="cpu", weights_only=False)


def _read_safetensors(url: str) -> dict[str, Any]:
    """Our safetensors codec file as the {"model", "components"} dict a model.pt holds."""
    data = io.read_bytes(url)
    # The format's header: little-endian u64 length, then JSON whose "__metadata__" holds our strings.
    header = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])
    components = json.loads(header.get("__metadata__", {}).get("components", '["encoder", "decoder"]'))
    return {"model": load_bytes(data), "components": components}


def _read_config(url: str, raw: Any) -> CodecModelConfig:
    try:
        return CodecModelConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(f"{url}: {format_validation_error(err)}") from None


def keep_components(state: dict[str, torch.Tensor], components: Sequence[str]) -> dict[str, torch.Tensor]:
    """Drop the weights of components that are not being loaded."""
    dropped: tuple[str, ...] = ()
    if "encoder" not in components:
        dropped += ENCODER_PREFIXES
    if "decoder" not in components:
        dropped += DECODER_PREFIXES
    return {k: v for k, v in state.items() if not k.startswith(dropped)} if dropped else state


def load_strict(model: CodecModule, state: dict[str, torch.Tensor], source: str) -> None:
    """Load `state` into `model`, failing with every missing / unexpected / mis-shaped key listed."""
    expected = model.codec_state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mis_shaped = sorted(
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in set(state) & set(expected)
        if state[k].shape != expected[k].shape
    )
    if missing or unexpected or mis_shaped:
        parts = [f"{source} does not match the codec ({model.config.codebook_size} codes)"]
        sections = (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", mis_shaped))
        for title, keys in sections:
            if keys:
                shown = "\n    ".join(keys[:50]) + (f"\n    ... and {len(keys) - 50} more" if len(keys) > 50 else "")
                parts.append(f"  {title} ({len(keys)}):\n    {shown}")
        raise ConfigError("\n".join(parts))
    model.load_state_dict(state, strict=False)


def read_codec_state(
    url: str, semantic_model_path: str | None = None
) -> tuple[CodecModelConfig, dict[str, torch.Tensor], list[str], str]:
    """(config, state dict in our names, components saved, description) of a codec checkpoint."""
    if not io.exists(url):
        raise ConfigError(f"codec checkpoint not found: {url}")
    if io.isdir(url):
        model_url, config_url = io.join(url, MODEL_FILE), io.join(url, CONFIG_FILE)
        if not io.exists(model_url):
            model_url = io.join(url, LEGACY_MODEL_FILE)
        if not io.exists(model_url):  # a directory the Inworld reference trainer wrote
            reference = inworld.latest_checkpoint_name(io.listdir(url))
            model_url = io.join(url, reference) if reference else model_url
    else:
        model_url, config_url = url, io.join(url.rstrip("/").rsplit("/", 1)[0], CONFIG_FILE)
    if not io.exists(model_url):
        raise ConfigError(
            f"{url}: no {MODEL_FILE} or {LEGACY_MODEL_FILE} (nor the reference trainer's {inworld.FINAL_CHECKPOINT} / "
            "checkpoint_<step>.pt) in the codec directory"
        )
    obj = _read_safetensors(model_url) if model_url.endswith(".safetensors") else _torch_load(model_url)
    if xcodec2.is_xcodec2_checkpoint(obj):
        config = xcodec2.xcodec2_config(semantic_model_path)
        state = xcodec2.to_codec_state_dict(obj["state_dict"])
        return config, state, ["encoder", "decoder"], f"X-codec2 checkpoint {url}"
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        if not io.exists(config_url):
            raise ConfigError(f"{url}: {CONFIG_FILE} is missing beside {model_url.rsplit('/', 1)[-1]}")
        raw = io.read_json(config_url)
        if inworld.is_inworld_config(raw):
            state = inworld.to_codec_state_dict(obj["model"])
            return inworld.codec_config(raw, config_url), state, ["decoder"], f"Inworld reference codec {model_url}"
        config = _read_config(config_url, raw)
        if semantic_model_path:
            config = config.model_copy(update={"semantic": semantic_model_path})
        return config, obj["model"], list(obj.get("components", ["encoder", "decoder"])), f"codec checkpoint {url}"
    raise ConfigError(
        f"{url} is neither a codec checkpoint ({{'model': state_dict}}, ours or the reference trainer's) nor an "
        "X-codec2 Lightning checkpoint (top-level 'state_dict' with CodecEnc./generator. keys)"
    )


def load_codec(
    build: Callable[[CodecModelConfig, Sequence[str]], C],
    url: str,
    device: torch.device,
    components: Sequence[str],
    semantic_model_path: str | None,
) -> C:
    config, state, saved, source = read_codec_state(url, semantic_model_path)
    absent = [c for c in components if c not in saved]
    if absent:
        raise ConfigError(f"{url} holds only the codec {saved}; {absent} cannot be loaded from it")
    model = build(config, components)
    load_strict(model, keep_components(state, components), source)
    return model.to(device).eval()
