"""Parallel strategies (torchtitan style: one small module each), chosen by `training.strategy`.

Every strategy offers the same surface to the loop, the `Strategy` protocol below.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Protocol

import torch
from torch import nn

from trainer.config import TrainingConfig
from trainer.errors import ConfigError

STRATEGIES = ("ddp", "fsdp", "deepspeed")


class Strategy(Protocol):
    name: str
    # True when the resume state holds the model weights too (sharded strategies); else they come
    # from the checkpoint's HF directory (or the LoRA adapter file).
    resume_has_model: bool
    # Autocast dtype for the forward, None where the strategy casts the model itself.
    autocast_dtype: torch.dtype | None

    def setup(self, objective: nn.Module) -> tuple[nn.Module, torch.optim.Optimizer]:
        """Wrap the objective; return it and the torch optimizer the LR scheduler drives."""
        ...

    def sync(self, module: nn.Module, last: bool) -> contextlib.AbstractContextManager:
        """Context for one micro-batch's forward+backward; gradients are synchronised on the `last` one."""
        ...

    def backward(self, module: nn.Module, loss: torch.Tensor) -> None:
        """Accumulate the gradient of `loss` (already scaled for accumulation); never steps."""
        ...

    def step(self, module: nn.Module, optimizer: torch.optim.Optimizer) -> float:
        """Clip, step the optimizer, zero the gradients; returns the gradient norm before clipping."""
        ...

    def full_state_dict(self, module: nn.Module) -> dict[str, torch.Tensor] | None:
        """Collective: the causal LM's full weights on rank 0 (None elsewhere) for the HF export."""
        ...

    def save_resume(self, module: nn.Module, optimizer: torch.optim.Optimizer, directory: Path) -> None:
        """Collective: optimizer and, where sharded, model state into `directory`."""
        ...

    def load_resume(self, module: nn.Module, optimizer: torch.optim.Optimizer, directory: Path) -> None:
        ...


def build_strategy(name: str, training: TrainingConfig, device: torch.device, lora: bool) -> Strategy:
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
