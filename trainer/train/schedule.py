"""Learning-rate schedules (warmup then cosine to `min_lr_ratio`, linear to 0, or constant)."""

from __future__ import annotations

import torch
from transformers import (
    get_constant_schedule_with_warmup,
    get_cosine_with_min_lr_schedule_with_warmup,
    get_linear_schedule_with_warmup,
)

from trainer.config import TrainingConfig


def build_scheduler(
    optimizer: torch.optim.Optimizer, training: TrainingConfig, total_steps: int
) -> torch.optim.lr_scheduler.LRScheduler:
    warmup = training.warmup(total_steps)
    if training.lr_scheduler == "cosine":
        return get_cosine_with_min_lr_schedule_with_warmup(
            optimizer, warmup, total_steps, min_lr_rate=training.min_lr_ratio
        )
    if training.lr_scheduler == "linear":
        return get_linear_schedule_with_warmup(optimizer, warmup, total_steps)
    return get_constant_schedule_with_warmup(optimizer, warmup)
