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
    config = PeftLoraConfig(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=lora.target_modules,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(lm, config)


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
