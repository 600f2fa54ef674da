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

import io as _stdio
import logging
import pickle
import tempfile
from pathlib import Path

import torch

from trainer import io
from trainer.config import ExportConfig, LoraConfig, TrainerConfig
from trainer.errors import ConfigError, StageError
from trainer.model.build import load_speechlm, save_speechlm
from trainer.model.vocab import SPEECHLM_FILE
from trainer.serve import layout
from trainer.train.lora import added_token_rows, merge_lora_state_dict

log = logging.getLogger(__name__)

FLAGS = {
    "checkpoint_path": "export.checkpoint_path",
    "output_path": "export.output_path",
    "codec_model_path": "export.codec_model_path",
    "base_model_path": "export.base_model_path",
}
STATE_FILE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".safetensors")


def checkpoint_kind(url: str) -> str:
    if not io.isdir(url):
        if url.endswith(STATE_FILE_SUFFIXES):
            return "state_file"
        raise ConfigError(f"{url}: not a directory and not a state-dict file ({', '.join(STATE_FILE_SUFFIXES)})")
    names = set(io.listdir(url))
    if SPEECHLM_FILE in names and ({"model.safetensors", "model.safetensors.index.json"} & names
                                   or {"pytorch_model.bin", "pytorch_model.bin.index.json"} & names):
        return "hf"
    if "adapter_config.json" in names:
        return "lora"
    if ".metadata" in names or "sharded" in names:
        return "fsdp"
    if "latest" in names or any(n.startswith(("mp_rank_", "global_step")) for n in names) or "deepspeed" in names:
        return "deepspeed"
    raise ConfigError(
        f"{url}: unrecognised checkpoint (expected an HF SpeechLM directory, a LoRA adapter, an FSDP "
        "torch.distributed.checkpoint, a DeepSpeed checkpoint or a state-dict file)"
    )


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


def read_torch_file(url: str) -> object:
    """`torch.load` of a checkpoint file, tensors only (no arbitrary pickles); local files are memory-mapped
    so a Fabric checkpoint's optimizer state is never read into memory."""
    try:
        if io.is_local(url):
            return torch.load(io.local_path(url), map_location="cpu", weights_only=True, mmap=True)
        return torch.load(_stdio.BytesIO(io.read_bytes(url)), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        lines = str(err).strip().splitlines()
        reason = next((line.strip() for line in lines if "Unsupported global" in line), lines[0] if lines else "")
        raise ConfigError(f"{url}: holds objects other than tensors and plain containers ({reason})") from None
    except (RuntimeError, EOFError, OSError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ConfigError(f"{url}: not a readable PyTorch checkpoint ({first})") from None


def state_dict_of(obj: object, url: str) -> dict[str, torch.Tensor]:
    for key in ("model", "state_dict", "module"):  # Fabric / Lightning / DeepSpeed wrappers
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ConfigError(f"{url} does not hold a state dict of tensors")
    return obj


def _load_state_file(url: str) -> dict[str, torch.Tensor]:
    if url.endswith(".safetensors"):
        from safetensors.torch import load as load_safetensors

        return load_safetensors(io.read_bytes(url))
    return state_dict_of(read_torch_file(url), url)


def _load_fsdp(url: str) -> dict[str, torch.Tensor]:
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    local = io.download_dir(url, tempfile.mkdtemp(prefix="dcp-"))
    if not (local / ".metadata").exists() and (local / "sharded" / ".metadata").exists():
        local = local / "sharded"
    with tempfile.TemporaryDirectory() as tmp:
        target = Path(tmp) / "full.pt"
        dcp_to_torch_save(str(local), str(target))
        full = torch.load(target, map_location="cpu", weights_only=True, mmap=True)
    state = full.get("model", full)
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


def load_deepspeed(url: str) -> dict[str, torch.Tensor]:
    try:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    except ImportError as err:
        raise ConfigError(f"exporting a DeepSpeed checkpoint needs the deepspeed package: {err}") from None
    local = io.download_dir(url, tempfile.mkdtemp(prefix="deepspeed-"))
    if (local / "deepspeed").is_dir():
        local = local / "deepspeed"
    tags = [p.name for p in local.iterdir() if p.is_dir()]
    tag = None if (local / "latest").exists() else (tags[0] if len(tags) == 1 else None)
    return get_fp32_state_dict_from_zero_checkpoint(str(local), tag=tag)


def align_state_dict(state: dict[str, torch.Tensor], model: torch.nn.Module, lora: LoraConfig,
                     token_rows: list[int] | None = None) -> dict[str, torch.Tensor]:
    """Merge LoRA weights (and the token rows LoRA training trained, `token_rows`), strip wrapper
    prefixes and tied duplicates so `state` loads into `model`."""
    if any(".lora_A." in k for k in state):
        state = merge_lora_state_dict(state, lora, token_rows)
    expected = model.state_dict()
    anchor = next(name for name, p in model.named_parameters() if p is model.get_input_embeddings().weight)
    owner = next((k for k in state if k.endswith(anchor)), None)
    if owner is None:
        raise StageError(f"the checkpoint has no input embedding ({anchor}); is it a SpeechLM checkpoint?")
    prefix = owner[: -len(anchor)]
    state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    tied = {"lm_head.weight"} if getattr(model.config, "tie_word_embeddings", False) else set()
    state = {k: v for k, v in state.items() if k not in tied}
    missing = sorted(set(expected) - set(state) - tied)
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise StageError(
            f"the checkpoint does not match the base model: missing {missing[:10]}, unexpected {unexpected[:10]}"
        )
    return state


def _codec_source(cfg: ExportConfig, checkpoint_url: str, base: str | None) -> str | None:
    if cfg.codec_model_path:
        if not io.exists(cfg.codec_model_path):
            raise ConfigError(f"export.codec_model_path not found: {cfg.codec_model_path}")
        return cfg.codec_model_path
    for source in (checkpoint_url, base, _enclosing_speechlm(checkpoint_url)):
        if source and io.isdir(source) and layout.codec_path(source):
            return layout.codec_path(source)
    return None


def ship_codec(codec_url: str, staging: Path, copy: bool) -> None:
    """Copy our codec directory into codec/ (self-contained output) or record where the codec lives."""
    from trainer.codec.model import CONFIG_FILE, LEGACY_MODEL_FILE, MODEL_FILE

    directory = codec_url if io.isdir(codec_url) else codec_url.rstrip("/").rsplit("/", 1)[0]
    weights = next((n for n in (MODEL_FILE, LEGACY_MODEL_FILE) if io.exists(io.join(directory, n))), None)
    if copy and weights and io.exists(io.join(directory, CONFIG_FILE)):
        target = staging / layout.CODEC_DIR
        target.mkdir()
        for name in (weights, CONFIG_FILE):
            (target / name).write_bytes(io.read_bytes(io.join(directory, name)))
        layout.write_codec_reference(str(staging), layout.CODEC_DIR)
    else:
        layout.write_codec_reference(str(staging), codec_url)


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
    from trainer.serve.reference_import import is_seed_checkpoint, seed_hint

    for source in (url, cfg.base_model_path):
        if source and is_seed_checkpoint(source):
            raise ConfigError(seed_hint(source))
    kind = checkpoint_kind(url)
    log.info("exporting %s checkpoint %s", kind, url)
    base = None
    if kind == "hf":
        model, tokenizer, vocab = load_speechlm(url)
    elif kind == "lora":
        from peft import PeftModel

        adapter_base = str(io.read_json(io.join(url, "adapter_config.json")).get("base_model_name_or_path") or "")
        base = _base_model(cfg, url, adapter_base if adapter_base and io.exists(adapter_base) else None)
        model, tokenizer, vocab = load_speechlm(base)
        adapter = io.download_dir(url, tempfile.mkdtemp(prefix="adapter-"))
        model = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    else:
        base = _base_model(cfg, url)
        model, tokenizer, vocab = load_speechlm(base)
        loaders = {"state_file": _load_state_file, "fsdp": _load_fsdp, "deepspeed": load_deepspeed}
        state = align_state_dict(loaders[kind](url), model, config.modeling.lora, added_token_rows(vocab))
        model.load_state_dict(state, strict=False)
    model = model.to(getattr(torch, cfg.dtype))
    codec_url = _codec_source(cfg, url, base)
    with io.staged_dir(cfg.output_path) as staging:
        save_speechlm(model, tokenizer, vocab, staging)
        if codec_url:
            ship_codec(codec_url, staging, cfg.copy_codec)
        else:
            log.warning("no codec given or referenced: infer/eval will need the codec path passed explicitly")
    return cfg.output_path


def run(config: TrainerConfig) -> int:
    out = export(config)
    log.info("serving directory: %s", out)
    return 0

