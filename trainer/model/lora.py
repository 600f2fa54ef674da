"""LoRA via peft (`modeling.lora`), and merging adapters into plain weights for HF/vLLM export.

Checkpoints always hold MERGED weights in their HF directory (any reader loads them without peft);
the adapter itself is kept in the resume state. `merge_lora_state_dict` works on a plain (gathered)
state dict, so every strategy exports the same way without copying or mutating the live model.

The rows the SpeechLM added to the text LLM (the prompt format's tags, the audio codes) start at a
random init, so LoRA alone would train around frozen noise: they are trained too, and only they. We
use peft's trainable tokens (`trainable_token_indices`) on the input embedding rather than
`modules_to_save`: it trains (added rows x hidden) parameters instead of two full (vocab x hidden)
copies (~0.8 B parameters at LLaMA-3 vocab, each with AdamW state), and leaves the pretrained text
rows frozen as LoRA intends. With tied embeddings (our presets, LLaMA-3.2) peft ties the head to the
same trainable rows. An untied head is trained whole through `modules_to_save`: peft 0.17.1's
trainable-tokens layer cannot wrap an `nn.Linear` (it reads `embedding_dim`).
"""

from __future__ import annotations

import tempfile

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model
from transformers import PreTrainedModel

from trainer import io
from trainer.config import LoraConfig
from trainer.errors import ConfigError
from trainer.model.vocab import AudioVocab

PEFT_PREFIX = "base_model.model."
ADAPTER = "default"
_TOKEN_BASE = ".token_adapter.base_layer."
_TOKEN_DELTA = f".token_adapter.trainable_tokens_delta.{ADAPTER}"
_SAVED = f".modules_to_save.{ADAPTER}."


def added_token_rows(vocab: AudioVocab) -> list[int]:
    """Embedding rows the SpeechLM added: the prompt format's tags, speech-end and the audio codes."""
    return sorted(set(vocab.special_tokens.values()) | set(range(vocab.audio_offset, vocab.audio_end)))


def peft_config(lora: LoraConfig, vocab: AudioVocab, tied: bool) -> PeftLoraConfig:
    """The adapter SFT and GRPO both train: LoRA on `target_modules`, plus the rows the SpeechLM added
    (peft trainable tokens: a model whose audio rows stayed at their random init cannot speak); an
    untied head trains whole, as peft cannot put trainable tokens on a Linear."""
    return PeftLoraConfig(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=lora.target_modules,
        task_type="CAUSAL_LM", trainable_token_indices=added_token_rows(vocab),
        modules_to_save=None if tied else ["lm_head"],
    )


def apply_lora(lm: PreTrainedModel, lora: LoraConfig, vocab: AudioVocab) -> torch.nn.Module:
    if lora.adapter_path:
        return _load_adapter(lm, lora)
    return get_peft_model(lm, peft_config(lora, vocab, bool(lm.config.tie_word_embeddings)))


def _load_adapter(lm: PreTrainedModel, lora: LoraConfig) -> torch.nn.Module:
    """Continue training a saved peft adapter (the reference's `lora.adapter_path`)."""
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


def merge_lora_state_dict(
    state: dict[str, torch.Tensor], lora: LoraConfig, token_rows: list[int] | None = None
) -> dict[str, torch.Tensor]:
    """peft state dict -> plain HF state dict: W + (alpha/r) B @ A, trained token rows written into their
    matrices (`token_rows`: `added_token_rows(vocab)`, the indices peft trained), saved modules unwrapped."""
    scaling = lora.alpha / lora.r
    merged: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if ".lora_A." in key or ".lora_B." in key or ".trainable_tokens_delta." in key or ".original_module." in key:
            continue
        name = key.removeprefix(PEFT_PREFIX)
        if _TOKEN_BASE in key:
            prefix = key.split(_TOKEN_BASE)[0]
            if token_rows is None:
                raise ValueError(f"{key}: merging trained token rows needs their indices (token_rows)")
            delta = state[prefix + _TOKEN_DELTA]
            value = value.index_copy(0, torch.tensor(token_rows, device=value.device), delta.to(value))
            name = name.replace(_TOKEN_BASE, ".")
        elif _SAVED in key:
            name = name.replace(_SAVED, ".")
        elif ".base_layer." in key:
            prefix = key.split(".base_layer.")[0]
            name = name.replace(".base_layer.", ".")
            a = state.get(f"{prefix}.lora_A.{ADAPTER}.weight")
            b = state.get(f"{prefix}.lora_B.{ADAPTER}.weight")
            if key.endswith(".weight") and a is not None and b is not None:
                value = (value.float() + scaling * (b.float() @ a.float())).to(value.dtype)
        merged[name] = value
    return merged
