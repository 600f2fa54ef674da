"""`tts-train import`: a SpeechLM trained by the Inworld trainer (the seed) -> our serving directory.

    tts-train import --checkpoint_path experiments/my_run/final_model.pt --output_path runs/imported \\
        --base_model_path /models/Llama-3.2-1B-Instruct --codec_model_path /models/xcodec2

What the seed leaves in its checkpointing directory (tts/training/main.py, checkpointing.py):
- the tokenizer: the base LLM's text vocabulary, then 8 tags and the `<|s_N|>` strings added in sorted
  STRING order (`<|s_0|>, <|s_1|>, <|s_10|>, ...`), then `<|extra_token_i|>` up to 193,856 rows; pad = eos;
- `training_config.json`, and Fabric checkpoints `checkpoint_<step>.pt` / `final_model.pt`:
  {"model": state dict, "optimizer", "loss_statistics", "config"} (a directory under DeepSpeed).

Import keeps the text rows and ids, moves every added row to our layout by token string (tags by name,
`<|s_N|>` to audio_offset + N right after speech-end) and keeps the extra-token rows, in order, as the
padding rows after the audio block. Both matrices (embedding, untied head) are a row permutation of the
seed's, so the imported model gives the same logits, and the same softmax over the whole vocabulary, for
the same prompt. The architecture is the config.json of --base_model_path (the seed's
modeling.parameters.model_name; its weights are not read), else that model_name when it is a local
directory, else our LLaMA-3.2-1B shape when model_name names that model. `--checkpoint_path` is a seed
checkpoint file (or DeepSpeed directory) with the tokenizer beside it, or the checkpointing directory
itself (final_model.pt, else the latest checkpoint_<step>.pt). Options are the export.* keys.
"""

from __future__ import annotations

import json
import logging
import re
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from tokenizers import AddedToken
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig, PreTrainedTokenizerBase

from trainer import io
from trainer.config import LoraConfig, TrainerConfig
from trainer.errors import ConfigError, StageError
from trainer.model.build import PRESETS, extend_tokenizer, save_speechlm, set_generation_ids
from trainer.model.prompt import FORMATS
from trainer.model.vocab import SPEECHLM_FILE, AudioVocab
from trainer.serve import export
from trainer.serve.layout import ship_codec
from trainer.serve.weights import (
    SEED_CONFIG,
    align_state_dict,
    load_deepspeed,
    parent_dir,
    read_torch_file,
    state_dict_of,
)

log = logging.getLogger(__name__)

FLAGS = export.FLAGS  # import reads the `export` section: same flags, same keys
# The seed's 8 tags (tts/core/constants.py); the prompt uses the inworld format's 4.
SEED_TAGS = (
    "<|speech_start|>", "<|speech_end|>", "<|text_prompt_start|>", "<|text_prompt_end|>",
    "<|voice_description_start|>", "<|voice_description_end|>", "<|sound_effect_start|>", "<|sound_effect_end|>",
)
AUDIO = re.compile(r"<\|s_(\d+)\|>")
EXTRA = re.compile(r"<\|extra_token_(\d+)\|>")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
# Hub names the seed trains from whose shape we ship (trainer/model/build.py presets).
KNOWN_BASES = {"llama-3.2-1b": "llama-3.2-1b", "llama-3.2-1b-instruct": "llama-3.2-1b"}


def locate(url: str) -> tuple[str, str]:
    """(weights URL, directory holding the seed's tokenizer and training_config.json)."""
    if io.isdir(url) and io.exists(io.join(url, "tokenizer.json")):
        names = io.listdir(url)
        if "final_model.pt" in names:
            return io.join(url, "final_model.pt"), url
        steps = [(int(m.group(1)), n) for n in names if (m := re.fullmatch(r"checkpoint_(\d+)\.pt", n))]
        if not steps:
            raise ConfigError(f"{url}: no final_model.pt or checkpoint_<step>.pt in the seed's checkpoint directory")
        return io.join(url, max(steps)[1]), url
    return url, parent_dir(url)


@dataclass(frozen=True)
class SeedVocab:
    """The seed tokenizer's added tokens: they fill rows [text_rows, rows) in sorted-string order."""

    ids: dict[str, int]  # tag / <|s_N|> / <|extra_token_i|> -> seed id
    text_rows: int
    rows: int
    codebook_size: int
    tokenizer_json: dict


def read_seed_vocab(directory: str) -> SeedVocab:
    path = io.join(directory, "tokenizer.json")
    if not io.exists(path):
        raise ConfigError(
            f"{directory}: no tokenizer.json beside the checkpoint (the seed saves its tokenizer into "
            "checkpointing.directory, next to final_model.pt)"
        )
    try:
        data = io.read_json(path)
        added = {t["content"]: int(t["id"]) for t in data["added_tokens"]}
    except (ValueError, KeyError, TypeError) as err:
        raise ConfigError(f"{path}: not a Hugging Face tokenizer file ({err})") from None
    ids = {t: i for t, i in added.items() if t in SEED_TAGS or AUDIO.fullmatch(t) or EXTRA.fullmatch(t)}
    missing = [t for t in FORMATS["inworld"].tags if t not in ids]
    codes = sorted(int(m.group(1)) for t in ids if (m := AUDIO.fullmatch(t)))
    if missing or not codes:
        raise ConfigError(f"{path}: not a seed SpeechLM tokenizer (missing {missing or ['<|s_N|> tokens']})")
    if codes != list(range(len(codes))):
        raise ConfigError(f"{path}: the audio tokens are not <|s_0|>..<|s_{len(codes) - 1}|> (gaps or duplicates)")
    text_rows = min(ids.values())
    rows = text_rows + len(ids)
    others = [i for t, i in added.items() if t not in ids] + list(data.get("model", {}).get("vocab", {}).values())
    if sorted(ids.values()) != list(range(text_rows, rows)) or any(i >= text_rows for i in others):
        raise ConfigError(f"{path}: the seed's added tokens are not the last {len(ids)} rows of the vocabulary")
    return SeedVocab(ids, text_rows, rows, len(codes), data)


def _text_tokenizer(directory: str, seed: SeedVocab) -> PreTrainedTokenizerBase:
    """The seed's tokenizer without its added rows: the base LLM's text tokenizer, ids unchanged."""
    with tempfile.TemporaryDirectory(prefix="seed-tokenizer-") as tmp:
        data = dict(seed.tokenizer_json)
        data["added_tokens"] = [t for t in data["added_tokens"] if int(t["id"]) < seed.text_rows]
        Path(tmp, "tokenizer.json").write_text(json.dumps(data))
        for name in TOKENIZER_FILES[1:]:
            if io.exists(io.join(directory, name)):
                Path(tmp, name).write_bytes(io.read_bytes(io.join(directory, name)))
        config_path = Path(tmp, "tokenizer_config.json")
        if config_path.exists():
            config = json.loads(config_path.read_text())
            decoder = config.get("added_tokens_decoder") or {}
            config["added_tokens_decoder"] = {k: v for k, v in decoder.items() if int(k) < seed.text_rows}
            config_path.write_text(json.dumps(config))
        tokenizer = AutoTokenizer.from_pretrained(tmp)
    if len(tokenizer) != seed.text_rows:
        raise ConfigError(f"{directory}: its text vocabulary has {len(tokenizer)} tokens, expected {seed.text_rows}")
    return tokenizer


def build_tokenizer(directory: str, seed: SeedVocab) -> tuple[PreTrainedTokenizerBase, AudioVocab]:
    """Text tokenizer + the seed's unused tags + our inworld layout; rows stay the seed's count."""
    tokenizer = _text_tokenizer(directory, seed)
    unused = [t for t in SEED_TAGS if t in seed.ids and t not in FORMATS["inworld"].tags]
    tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in unused], special_tokens=True)
    vocab = extend_tokenizer(tokenizer, seed.codebook_size, "inworld")
    return tokenizer, replace(vocab, vocab_size=seed.rows)


def row_order(seed: SeedVocab, tokenizer: PreTrainedTokenizerBase) -> torch.Tensor:
    """order[new_id] = seed id: text rows in place, named tokens by string, extra tokens as padding."""
    new = tokenizer.get_vocab()
    extras = sorted((int(m.group(1)), i) for t, i in seed.ids.items() if (m := EXTRA.fullmatch(t)))
    order = torch.arange(seed.rows)
    for token, seed_id in seed.ids.items():
        if not EXTRA.fullmatch(token):
            order[new[token]] = seed_id
    order[len(tokenizer):] = torch.tensor([i for _, i in extras], dtype=torch.long)
    if len(tokenizer) + len(extras) != seed.rows or not torch.equal(order.sort().values, torch.arange(seed.rows)):
        raise StageError("internal: the imported vocabulary is not a permutation of the seed's")
    return order


def _seed_config(obj: object, directory: str) -> dict:
    """The experiment config the seed stores in each checkpoint, else its training_config.json."""
    if isinstance(obj, dict) and isinstance(obj.get("config"), dict):
        return obj["config"]
    path = io.join(directory, SEED_CONFIG)
    try:
        return io.read_json(path) if io.exists(path) else {}
    except ValueError as err:
        raise ConfigError(f"{path}: not JSON ({err})") from None


def architecture(base_model_path: str | None, seed_config: dict, rows: int) -> tuple[PretrainedConfig, str]:
    model_name = str(((seed_config.get("modeling") or {}).get("parameters") or {}).get("model_name") or "")
    source = base_model_path or (model_name if model_name and io.exists(io.join(model_name, "config.json")) else "")
    if source:
        if not io.exists(io.join(source, "config.json")):
            raise ConfigError(f"--base_model_path {source}: no config.json (the base LLM's Hugging Face directory)")
        with tempfile.TemporaryDirectory(prefix="seed-base-") as tmp:
            Path(tmp, "config.json").write_bytes(io.read_bytes(io.join(source, "config.json")))
            config = AutoConfig.from_pretrained(tmp)
    elif (preset := KNOWN_BASES.get(model_name.rstrip("/").rsplit("/", 1)[-1].lower())) is not None:
        source = f"{model_name} (our {preset} preset shape)"
        config = PRESETS[preset][1](rows)
    else:
        raise ConfigError(
            f"set --base_model_path to a local copy of the base LLM {model_name or '(the seed config names none)'}"
            " (only its config.json is read)"
        )
    config.vocab_size = rows
    return config, source


def _lora(state: dict[str, torch.Tensor], seed_config: dict, url: str) -> LoraConfig:
    seed_lora = seed_config.get("lora") or {}
    if not any(".lora_A." in k for k in state):
        return LoraConfig()
    if "r" not in seed_lora or "lora_alpha" not in seed_lora:
        raise ConfigError(f"{url} holds LoRA weights but its config has no lora.r / lora.lora_alpha to merge them")
    return LoraConfig(enabled=True, r=int(seed_lora["r"]), alpha=int(seed_lora["lora_alpha"]))


def _reorder_rows(model: torch.nn.Module, state: dict[str, torch.Tensor], order: torch.Tensor, url: str) -> None:
    matrices = [m.weight for m in (model.get_input_embeddings(), model.get_output_embeddings()) if m is not None]
    names = {n for n, p in model.named_parameters() if any(p is w for w in matrices)}
    for name in names & set(state):
        if state[name].shape[0] != order.numel():
            raise ConfigError(
                f"{url}: {name} has {state[name].shape[0]} rows but the tokenizer beside it has {order.numel()}"
            )
        state[name] = state[name].index_select(0, order)


def import_checkpoint(config: TrainerConfig) -> str:
    cfg = config.export
    url = export.checkpoint_source(cfg)
    if cfg.codec_model_path and not io.exists(cfg.codec_model_path):
        raise ConfigError(f"export.codec_model_path not found: {cfg.codec_model_path}")
    weights, directory = locate(url)
    if io.exists(io.join(directory, SPEECHLM_FILE)):
        raise ConfigError(f"{directory} is already a SpeechLM directory of this trainer: use it as it is")
    # Cheap checks first: the weights are memory-mapped, the tokenizer (193,856 entries) is read last.
    if io.isdir(weights):  # Fabric's DeepSpeed strategy saves a directory
        obj, state = None, load_deepspeed(weights)
    else:
        obj = read_torch_file(weights)
        state = state_dict_of(obj, weights)
    embedding = next((v for k, v in state.items() if k.endswith("embed_tokens.weight")), None)
    if embedding is None:
        raise ConfigError(f"{weights}: no embed_tokens.weight; not a SpeechLM checkpoint of the Inworld trainer")
    seed_config = _seed_config(obj, directory)
    arch, source = architecture(cfg.base_model_path, seed_config, embedding.shape[0])
    seed = read_seed_vocab(directory)
    tokenizer, vocab = build_tokenizer(directory, seed)
    model = AutoModelForCausalLM.from_config(arch, torch_dtype=embedding.dtype)
    state = align_state_dict(state, model, _lora(state, seed_config, weights))
    _reorder_rows(model, state, row_order(seed, tokenizer), weights)
    try:
        model.load_state_dict(state, strict=False)  # a tied head is absent from `state`
    except RuntimeError as err:
        raise StageError(f"{weights} does not fit the architecture of {source}: {str(err).splitlines()[-1]}") from None
    set_generation_ids(model, vocab)
    log.info(
        "imported %s: %d text rows kept, %d audio codes at %d..%d, %d rows (architecture: %s)", weights,
        seed.text_rows, vocab.codebook_size, vocab.audio_offset, vocab.audio_end - 1, vocab.vocab_size, source,
    )
    with io.staged_dir(cfg.output_path) as staging:
        save_speechlm(model, tokenizer, vocab, staging)
        if cfg.codec_model_path:
            ship_codec(cfg.codec_model_path, staging, cfg.copy_codec)
        else:
            log.warning("no --codec_model_path: infer/eval will need the codec path passed explicitly")
    return cfg.output_path


def run(config: TrainerConfig) -> int:
    log.info("serving directory: %s", import_checkpoint(config))
    return 0
