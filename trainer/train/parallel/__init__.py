"""Parallel strategies (torchtitan style: one small module each), chosen by `training.strategy`.

Every strategy offers the same surface to the loop, the `Strategy` protocol (parallel/base.py).
"""

from __future__ import annotations

import torch

from trainer.config import TrainingConfig
from trainer.errors import ConfigError
from trainer.train.parallel.base import Strategy
from trainer.train.parallel.ddp import DDPStrategy
from trainer.train.parallel.deepspeed import DeepSpeedStrategy
from trainer.train.parallel.fsdp import FSDPStrategy

STRATEGIES: dict[str, type[Strategy]] = {"ddp": DDPStrategy, "fsdp": FSDPStrategy, "deepspeed": DeepSpeedStrategy}


def build_strategy(name: str, training: TrainingConfig, device: torch.device, lora: bool) -> Strategy:
    if name not in STRATEGIES:
        raise ConfigError(f"training.strategy: unknown strategy {name!r} (choose from {', '.join(STRATEGIES)})")
    return STRATEGIES[name](training, device, lora)
