"""Parallel strategies (torchtitan style: one small module each), chosen by `training.strategy`.

Every strategy offers the same surface to the loop: `setup` (wrap + optimizer), `sync` (gradient
sync only on the last micro-batch), `backward`, `step` (clip + optimizer step), `full_state_dict`
(collective; the causal LM's full weights on rank 0 for the HF export), `save_resume`/`load_resume`
(collective; optimizer and, where sharded, model state).
"""

from __future__ import annotations

from typing import Any

import torch

from trainer.config import TrainingConfig
from trainer.errors import ConfigError

STRATEGIES = ("ddp", "fsdp", "deepspeed")


def build_strategy(name: str, training: TrainingConfig, device: torch.device, lora: bool) -> Any:
    if name == "ddp":
        from trainer.train.parallel.ddp import DDPStrategy

        return DDPStrategy(training, device, lora)
    if name == "fsdp":
        from trainer.train.parallel.fsdp import FSDPStrategy

        return FSDPStrategy(training, device, lora)
    if name == "deepspeed":
        from trainer.train.parallel.deepspeed import DeepSpeedStrategy

        return DeepSpeedStrategy(training, device, lora)
    raise ConfigError(f"training.strategy: unknown strategy {name!r} (choose from {', '.join(STRATEGIES)})")


def adamw(params: list[torch.nn.Parameter], training: TrainingConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW with decay on matrices only; fused kernel on CUDA."""
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": training.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(
        groups, lr=training.learning_rate, betas=(training.adam_beta1, training.adam_beta2), eps=training.adam_eps,
        fused=device.type == "cuda",
    )


def trainable(module: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in module.parameters() if p.requires_grad]
