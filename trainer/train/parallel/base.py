"""What every parallel strategy offers the loop (the `Strategy` protocol), and the parts they share."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Protocol

import torch
from torch import nn

from trainer.config import TrainingConfig


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


def clip_and_step(module: nn.Module, optimizer: torch.optim.Optimizer, training: TrainingConfig) -> torch.Tensor:
    """Element-wise clip (the reference's gradient_clip_value), norm clip, step, zero the gradients;
    returns the gradient norm before clipping (a DTensor under FSDP)."""
    if training.gradient_clip_value:
        torch.nn.utils.clip_grad_value_(trainable(module), training.gradient_clip_value)
    norm = torch.nn.utils.clip_grad_norm_(trainable(module), training.max_grad_norm or float("inf"))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return norm
