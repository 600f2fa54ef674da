"""`tts-train export`: any checkpoint -> a serving directory (the seed's convert_checkpoint step).

    tts-train export --checkpoint_path runs/demo/checkpoints/sft/checkpoints/step_100 \\
        --output_path runs/demo/export/sft --codec_model_path runs/demo/codec/final

Accepted checkpoints (detected from their files):
- an HF SpeechLM directory (`speechlm.json` + weights): SFT/GRPO checkpoints and final models;
- a peft LoRA adapter directory (`adapter_config.json`): merged into its base with `merge_and_unload`;
- a sharded FSDP resume state (torch.distributed.checkpoint, `.metadata`), e.g. `step_N/resume/sharded`;
- a DeepSpeed resume state (`latest` / `mp_rank_*` files; consolidated with deepspeed's zero_to_fp32);
- one state-dict file (`.pt`/`.bin`/`.safetensors`, e.g. the seed's Fabric `final_model.pt`).
Weight-only checkpoints take architecture and tokenizer from `export.base_model_path`, else from the
nearest enclosing SpeechLM directory. Wrapper prefixes (DDP `module.`, torch.compile `_orig_mod.`,
our objective's wrapper) are stripped, and LoRA weights in a state dict are merged.

The output (see trainer/serve/layout.py) is written to a staging directory and published atomically:
safetensors + tokenizer + speechlm.json + codec reference, loadable by `from_pretrained` and vLLM.
"""

from __future__ import annotations

import logging
import tempfile

import torch
from peft import PeftModel

from trainer import io
from trainer.config import ExportConfig, TrainerConfig, section_flags
from trainer.errors import ConfigError
from trainer.model.build import load_speechlm, save_speechlm, vllm_servable
from trainer.model.lora import added_token_rows
from trainer.model.vocab import SPEECHLM_FILE
from trainer.serve import layout
from trainer.serve.weights import (
    align_state_dict,
    checkpoint_kind,
    is_seed_checkpoint,
    load_deepspeed,
    load_fsdp,
    load_state_file,
    seed_hint,
)

log = logging.getLogger(__name__)

FLAGS = section_flags("export", "checkpoint_path", "output_path", "codec_model_path", "base_model_path")


def _enclosing_speechlm(url: str) -> str | None:
    """The checkpoint itself or the nearest parent directory that is a SpeechLM directory."""
    current = url.rstrip("/")
    for _ in range(4):
        if io.exists(io.join(current, SPEECHLM_FILE)):
            return current
        if "/" not in current.strip("/"):
            break
        current = current.rsplit("/", 1)[0]
    return None


def _base_model(cfg: ExportConfig, checkpoint_url: str, fallback: str | None = None) -> str:
    base = cfg.base_model_path or _enclosing_speechlm(checkpoint_url) or fallback
    if not base or not io.exists(io.join(base, SPEECHLM_FILE)):
        raise ConfigError(
            f"{checkpoint_url} holds weights only: set --base_model_path to the SpeechLM directory "
            "(architecture + tokenizer) it was trained from"
        )
    return base


def _codec_source(cfg: ExportConfig, checkpoint_url: str, base: str | None) -> str | None:
    if cfg.codec_model_path:
        if not io.exists(cfg.codec_model_path):
            raise ConfigError(f"export.codec_model_path not found: {cfg.codec_model_path}")
        return cfg.codec_model_path
    for source in (checkpoint_url, base, _enclosing_speechlm(checkpoint_url)):
        if source and io.isdir(source) and layout.codec_path(source):
            return layout.codec_path(source)
    return None


def checkpoint_source(cfg: ExportConfig) -> str:
    """The `export` section's checkpoint URL, once both paths are given and the checkpoint exists."""
    if not cfg.checkpoint_path or not cfg.output_path:
        raise ConfigError("--checkpoint_path and --output_path (export.*) are required")
    url = cfg.checkpoint_path.rstrip("/")
    if not io.exists(url):
        raise ConfigError(f"checkpoint not found: {url}")
    return url


def export(config: TrainerConfig) -> str:
    cfg = config.export
    url = checkpoint_source(cfg)
    for source in (url, cfg.base_model_path):
        if source and is_seed_checkpoint(source):
            raise ConfigError(seed_hint(source))
    kind = checkpoint_kind(url)
    log.info("exporting %s checkpoint %s", kind, url)
    base = None
    if kind == "hf":
        model, tokenizer, vocab = load_speechlm(url)
    elif kind == "lora":
        adapter_base = str(io.read_json(io.join(url, "adapter_config.json")).get("base_model_name_or_path") or "")
        base = _base_model(cfg, url, adapter_base if adapter_base and io.exists(adapter_base) else None)
        model, tokenizer, vocab = load_speechlm(base)
        adapter = io.download_dir(url, tempfile.mkdtemp(prefix="adapter-"))
        model = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    else:
        base = _base_model(cfg, url)
        model, tokenizer, vocab = load_speechlm(base)
        loaders = {"state_file": load_state_file, "fsdp": load_fsdp, "deepspeed": load_deepspeed}
        state = align_state_dict(loaders[kind](url), model, config.modeling.lora, added_token_rows(vocab))
        model.load_state_dict(state, strict=False)
    unservable = vllm_servable(model.config)
    if unservable:  # a serving directory vLLM (rollouts, --use_vllm) cannot load is no serving directory
        raise ConfigError(f"{url}: vLLM cannot serve this model: {unservable}")
    model = model.to(getattr(torch, cfg.dtype))
    codec_url = _codec_source(cfg, url, base)
    with io.staged_dir(cfg.output_path) as staging:
        save_speechlm(model, tokenizer, vocab, staging)
        if codec_url:
            layout.ship_codec(codec_url, staging, cfg.copy_codec)
        else:
            log.warning("no codec given or referenced: infer/eval will need the codec path passed explicitly")
    return cfg.output_path


def run(config: TrainerConfig) -> int:
    out = export(config)
    log.info("serving directory: %s", out)
    return 0
