"""The weights of any training checkpoint: which kind it is, its state dict, and that state dict made to
fit a SpeechLM (wrapper prefixes stripped, LoRA merged). `export` and `import` both read through here.

Kinds (detected from the files): an HF SpeechLM directory, a peft LoRA adapter, a sharded FSDP state
(torch.distributed.checkpoint), a DeepSpeed state, one state-dict file; and the Inworld trainer's
checkpoints, which `tts-train import` converts (their audio-token ids are sorted as strings).
"""

from __future__ import annotations

import io as _stdio
import pickle
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load as load_safetensors
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from trainer import io
from trainer.config import LoraConfig
from trainer.errors import ConfigError, StageError
from trainer.model.lora import merge_lora_state_dict
from trainer.model.vocab import SPEECHLM_FILE

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


def load_state_file(url: str) -> dict[str, torch.Tensor]:
    if url.endswith(".safetensors"):
        return load_safetensors(io.read_bytes(url))
    return state_dict_of(read_torch_file(url), url)


def load_fsdp(url: str) -> dict[str, torch.Tensor]:
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
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint  # lazy: optional dep
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


SEED_CONFIG = "training_config.json"


def parent_dir(url: str) -> str:
    url = url.rstrip("/")
    return url.rsplit("/", 1)[0] if "/" in url else "."


def is_seed_checkpoint(url: str) -> bool:
    """Whether `url` (a file or directory) is, or sits in, a seed checkpointing directory (and is not
    one of our SpeechLM directories, e.g. an import written inside it)."""
    if io.exists(io.join(url, SPEECHLM_FILE)):
        return False
    directory = url if io.exists(io.join(url, SEED_CONFIG)) else parent_dir(url)
    return io.exists(io.join(directory, SEED_CONFIG)) and not io.exists(io.join(directory, SPEECHLM_FILE))


def seed_hint(url: str) -> str:
    return (f"{url} was written by the Inworld trainer (sorted audio-token ids): convert it first with "
            f"`tts-train import --checkpoint_path {url} --output_path DIR --base_model_path BASE_LLM`")
