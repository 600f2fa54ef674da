"""Reference (seed) config keys -> our schema, applied to the raw mapping before validation.

The seed's `ExperimentConfig` (tts/utils/configuration.py) names some settings differently, keeps
run-time values in the file (`seed`, `world_size`, `checkpointing.directory`, ...) and has keys for
features we do not have. Here every one of its keys is either renamed to ours, converted (betas ->
adam_beta1/adam_beta2, the flat `codec` section -> codec.model/codec.train, the top-level `lora` ->
modeling.lora) or, when we cannot honour it, removed with one warning naming it and why. Anything
else stays, so a typo still fails validation with its key path.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

from trainer.errors import ConfigError

log = logging.getLogger("trainer.config")

# section -> key -> why it is not honoured. Warned when the value asks for something (not null/false/empty).
UNHONOURED: dict[str | None, dict[str, str]] = {
    None: {
        "seed": "the reference overwrites it from --seed at run time; use training.seed or --seed",
        "world_size": "a run-time value (the reference resets it on load); the launcher decides it",
        "model_size": "a run-time value (the reference resets it on load)",
        "vocab_size": "a run-time value (the reference resets it on load)",
        "wandb_url": "a run-time value (the reference resets it on load)",
    },
    "checkpointing": {
        "directory": "the reference resets it on load; checkpoints go to training.output_dir/training.run_name "
        "(--experiment_dir/--run_name)",
        "collect_health_stats": "parameter/gradient health statistics are not collected; the gradient norm is "
        "logged every step (grad_norm in metrics.jsonl)",
        "save_intermediate_generations": "no audio is generated at checkpoints; run `tts-train eval` or "
        "`tts-train infer` on a checkpoint",
        "validation_type": "belongs to save_intermediate_generations, which is not supported",
    },
    "dataset": {
        "allowed_ift_annotations": "instruction-finetuning annotations are not used (the reference never reads "
        "them either)",
        "total_training_steps": "computed from the data at run time (the reference overwrites it)",
        "steps_per_epoch": "computed from the data at run time (the reference overwrites it)",
        # Not a field of the reference schema: its own example_configs/sft.json sets it and its loader drops it.
        "randomize_slider": "not a key of the reference schema (its loader drops it)",
        "enable_rlhf_training": "the rlhf stage always builds its prompts from the vectorized datasets; the "
        "switch has no effect",
    },
}

# section -> reference key -> our key (same meaning, same unit); a dotted key is a subsection's.
RENAMED: dict[str, dict[str, str]] = {
    "dataset": {"min_audio_duration": "min_duration"},
    "rlhf_training": {key: f"sampling.{key}" for key in ("temperature", "top_p", "top_k", "repetition_penalty")},
}
# (section, key) of our earlier releases -> (section, key) now: one owner per knob.
MOVED: dict[str, str] = {
    "rlhf_training.max_steps": "training.max_steps",
    "training.dry_run": "dry_run",
    "vectorize.dry_run": "dry_run",
    "codec.train.dry_run": "dry_run",
}

# Lightning precision names the reference passes through for DDP.
PRECISION_ALIASES = {"bf16-mixed": "bf16", "32-true": "fp32", "32": "fp32", "16-mixed": "fp16"}

REFERENCE_CODEC_KEYS = (
    "audio_window_size", "sample_rate", "hop_length", "minimum_data_sample_rate", "upsample_factors", "kernel_sizes",
)


class CompatError(ValueError):
    """A reference key whose value cannot be mapped (the message names the key path)."""


def _requests_something(value: Any) -> bool:
    return value not in (None, False, "", [], {})


def _put(section: dict[str, Any], path: str, key: str, value: Any, source: str) -> None:
    """Set `key` from the reference key `source`, unless both are given with different values."""
    if key in section and section[key] != value:
        raise CompatError(f"{path}{source} ({value!r}) and {path}{key} ({section[key]!r}) disagree; set one")
    section[key] = value


def _training(section: dict[str, Any]) -> None:
    if "betas" in section:
        betas = section.pop("betas")
        if not isinstance(betas, (list, tuple)) or len(betas) != 2:
            raise CompatError(f"training.betas: expected two numbers [beta1, beta2], got {betas!r}")
        _put(section, "training.", "adam_beta1", betas[0], "betas[0]")
        _put(section, "training.", "adam_beta2", betas[1], "betas[1]")
    if "gradient_clip_value" in section and "max_grad_norm" not in section:
        # The reference clips values only (fabric.clip_gradients(clip_val=...)); no norm clipping on top.
        section["max_grad_norm"] = 0.0
    precision = section.get("precision")
    if isinstance(precision, str) and precision in PRECISION_ALIASES:
        section["precision"] = PRECISION_ALIASES[precision]


def _lora(raw: dict[str, Any]) -> None:
    """The reference's top-level `lora` (its presence enables LoRA) -> modeling.lora."""
    ref = raw.pop("lora")
    if ref is None:
        return
    if not isinstance(ref, dict):
        raise CompatError(f"lora: expected a mapping, got {type(ref).__name__}")
    modeling = raw.setdefault("modeling", {})
    if isinstance(modeling, dict) and isinstance(modeling.get("lora"), dict):
        raise CompatError("lora (reference) and modeling.lora are both set; use one")
    ref = dict(ref)
    task_type = ref.pop("task_type", "CAUSAL_LM")
    if task_type != "CAUSAL_LM":
        raise CompatError(f"lora.task_type: the SpeechLM is a causal LM; only 'CAUSAL_LM' applies, got {task_type!r}")
    bias = ref.pop("bias", "none")
    if bias != "none":
        log.warning("lora.bias=%r is not honoured: the LLaMA layers LoRA adapts have no bias terms", bias)
    ours: dict[str, Any] = {"enabled": True}
    for key, target in (("r", "r"), ("lora_alpha", "alpha"), ("lora_dropout", "dropout"),
                        ("target_modules", "target_modules"), ("adapter_path", "adapter_path")):
        if key in ref:
            ours[target] = ref.pop(key)
    if ours.get("target_modules") in ([], None):
        ours["target_modules"] = "all-linear"  # the reference's default: every linear layer
    if ref:
        raise CompatError(f"lora.{sorted(ref)[0]}: not a key of the reference's lora section (task_type, r, "
                          "lora_alpha, target_modules, lora_dropout, bias, adapter_path)")
    if isinstance(modeling, dict):
        modeling["lora"] = ours


def _codec(section: dict[str, Any]) -> None:
    """The reference's flat CodecTrainingConfig -> codec.model / codec.train."""
    if not any(key in section for key in REFERENCE_CODEC_KEYS):
        return
    model = section.setdefault("model", {})
    train = section.setdefault("train", {})
    if not isinstance(model, dict) or not isinstance(train, dict):
        return
    for key, target in (("sample_rate", "sample_rate"), ("hop_length", "hop_length"),
                        ("upsample_factors", "upsample_factors"), ("kernel_sizes", "upsample_kernel_sizes")):
        if key in section:
            value = section.pop(key)
            _put(model, "codec.model.", target, [] if value is None else value, key)
    if "minimum_data_sample_rate" in section:
        _put(train, "codec.train.", "min_sample_rate", section.pop("minimum_data_sample_rate"),
             "minimum_data_sample_rate")
    if "audio_window_size" in section:
        window = section.pop("audio_window_size")
        rate = model.get("sample_rate", 16000)
        if not isinstance(window, (int, float)) or isinstance(window, bool) or window <= 0:
            raise CompatError(f"codec.audio_window_size: expected a positive number of samples, got {window!r}")
        if not isinstance(rate, (int, float)) or isinstance(rate, bool) or rate <= 0:
            return  # validation reports codec.model.sample_rate
        _put(train, "codec.train.", "segment_seconds", window / rate, "audio_window_size")


def canonical_key(key: str) -> str:
    """Our dotted key path for a reference key or a key of an earlier release (others unchanged)."""
    if key in MOVED:
        return MOVED[key]
    section, _, rest = key.partition(".")
    renamed = RENAMED.get(section, {}).get(rest)
    return f"{section}.{renamed}" if renamed else key


def _section(raw: dict[str, Any], path: list[str], create: bool) -> dict[str, Any] | None:
    node: Any = raw
    for part in path:
        if not isinstance(node, dict) or (part not in node and not create):
            return None
        node = node.setdefault(part, {})
    return node if isinstance(node, dict) else None


def _move(raw: dict[str, Any], old: str, new: str) -> None:
    """Move the value at the dotted path `old` to `new` (a key of an earlier release of ours)."""
    *old_parents, old_key = old.split(".")
    source = _section(raw, old_parents, create=False)
    if source is None or old_key not in source:
        return
    value = source.pop(old_key)
    *new_parents, new_key = new.split(".")
    target = _section(raw, new_parents, create=True)
    if target is None:
        return  # validation reports the section that is not a mapping
    if new_key in target and target[new_key] != value:
        raise CompatError(f"{old} ({value!r}) and {new} ({target[new_key]!r}) disagree; set {new}")
    target[new_key] = value


def from_reference(data: dict[str, Any]) -> dict[str, Any]:
    """A copy of `data` with the reference's keys mapped to ours (see the module docstring)."""
    raw = copy.deepcopy(data)
    for section_name, keys in UNHONOURED.items():
        section = raw if section_name is None else raw.get(section_name)
        if not isinstance(section, dict):
            continue
        for key, why in keys.items():
            if key in section:
                value = section.pop(key)
                if _requests_something(value):
                    path = key if section_name is None else f"{section_name}.{key}"
                    log.warning("%s is not honoured: %s", path, why)
    for section_name, names in RENAMED.items():
        section = raw.get(section_name)
        if isinstance(section, dict):
            for old, new in names.items():
                if old in section:
                    *parents, key = new.split(".")
                    target = _section(section, parents, create=True)
                    if target is not None:
                        _put(target, f"{'.'.join([section_name, *parents])}.", key, section.pop(old), old)
    for old, new in MOVED.items():
        _move(raw, old, new)
    if isinstance(raw.get("training"), dict):
        _training(raw["training"])
    if "lora" in raw:
        _lora(raw)
    if isinstance(raw.get("codec"), dict):
        _codec(raw["codec"])
    return raw


def stage_notes(config: Any, stage: str) -> None:
    """Warnings (and errors) for reference keys whose effect depends on the stage that runs."""
    t = config.training
    if t.gradient_clip_value and stage == "rlhf":
        log.warning("training.gradient_clip_value is not honoured by rlhf (nor by the reference's): TRL clips "
                    "the gradient norm, training.max_grad_norm")
    elif t.gradient_clip_value and stage == "sft" and t.strategy == "deepspeed":
        log.warning("training.gradient_clip_value is not honoured with strategy deepspeed (nor by the "
                    "reference): DeepSpeed clips the gradient norm, training.max_grad_norm")
    if stage == "rlhf" and config.modeling.lora.enabled and config.modeling.lora.adapter_path:
        raise ConfigError("modeling.lora.adapter_path (lora.adapter_path) is supported by sft only; rlhf starts "
                          "a fresh adapter on rlhf_training.base_model_dir")
