"""LoRA via peft (`modeling.lora`), and merging adapters into plain weights for HF/vLLM export.

Checkpoints always hold MERGED weights in their HF directory (any reader loads them without peft);
the adapter itself is kept in the resume state. `merge_lora_state_dict` works on a plain (gathered)
state dict, so every strategy exports the same way without copying or mutating the live model.
"""

from __future__ import annotations

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import get_peft_model
from transformers import PreTrainedModel

from trainer.config import LoraConfig

PEFT_PREFIX = "base_model.model."
ADAPTER = "default"


def apply_lora(lm: PreTrainedModel, lora: LoraConfig) -> torch.nn.Module:
    if lora.adapter_path:
        return _load_adapter(lm, lora)
    config = PeftLoraConfig(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=lora.target_modules,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(lm, config)


def _load_adapter(lm: PreTrainedModel, lora: LoraConfig) -> torch.nn.Module:
    """Continue training a saved peft adapter (the reference's `lora.adapter_path`)."""
    import tempfile

    from peft import PeftModel

    from trainer import io
    from trainer.errors import ConfigError

    config_url = io.join(lora.adapter_path, "adapter_config.json")
    if not io.exists(config_url):
        raise ConfigError(f"modeling.lora.adapter_path: {lora.adapter_path!r} holds no adapter_config.json")
    saved = io.read_json(config_url)
    # Merged checkpoints use this config's r/alpha, so they must be the adapter's.
    if (saved.get("r"), saved.get("lora_alpha")) != (lora.r, lora.alpha):
        raise ConfigError(
            f"modeling.lora: r={lora.r}, alpha={lora.alpha} but the adapter at {lora.adapter_path} has "
            f"r={saved.get('r')}, lora_alpha={saved.get('lora_alpha')}"
        )
    local = io.download_dir(lora.adapter_path, tempfile.mkdtemp(prefix="adapter-"))
    return PeftModel.from_pretrained(lm, local, is_trainable=True)


def merge_lora_state_dict(state: dict[str, torch.Tensor], lora: LoraConfig) -> dict[str, torch.Tensor]:
    """peft state dict (base + lora_A/lora_B) -> plain HF state dict with W + (alpha/r) B @ A."""
    scaling = lora.alpha / lora.r
    merged: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if ".lora_A." in key or ".lora_B." in key:
            continue
        name = key.removeprefix(PEFT_PREFIX)
        if ".base_layer." in key:
            prefix = key.split(".base_layer.")[0]
            name = name.replace(".base_layer.", ".")
            a = state.get(f"{prefix}.lora_A.{ADAPTER}.weight")
            b = state.get(f"{prefix}.lora_B.{ADAPTER}.weight")
            if key.endswith(".weight") and a is not None and b is not None:
                value = (value.float() + scaling * (b.float() @ a.float())).to(value.dtype)
        merged[name] = value
    return merged
