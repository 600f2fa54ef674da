"""Learning-rate schedules: linear warmup, then cosine to `min_lr_ratio`, linear to 0, or constant.

Optimizer update k (0-based) runs at `lr_factor(k)`: warmup ramps (k+1)/W, so the first update already
moves the weights (transformers' `get_*_with_warmup` give update 0 a factor 0/W = 0), reaching 1 at
update W-1; the decay then starts from 1 at update W and reaches its end value after the last update.
"""

from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import LambdaLR

from trainer.config import TrainingConfig


def lr_factor(kind: str, step: int, warmup: int, total_steps: int, min_ratio: float) -> float:
    if step < warmup:
        return (step + 1) / warmup
    if kind == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    if kind == "linear":
        return 1.0 - progress
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, training: TrainingConfig, total_steps: int) -> LambdaLR:
    warmup = min(training.warmup(total_steps), total_steps)

    def factor(step: int) -> float:
        return lr_factor(training.lr_scheduler, step, warmup, total_steps, training.min_lr_ratio)

    return LambdaLR(optimizer, factor)
