"""DDP (and the single-process case): replicated model, all-reduced gradients, autocast for bf16."""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from trainer import distributed
from trainer.config import TrainingConfig
from trainer.train.parallel.base import adamw, clip_and_step, trainable


class DDPStrategy:
    name = "ddp"
    # Model weights resume from the checkpoint's HF directory (or adapter.pt with LoRA).
    resume_has_model = False

    def __init__(self, training: TrainingConfig, device: torch.device, lora: bool):
        self.training = training
        self.device = device
        self.lora = lora
        self.autocast_dtype = torch.bfloat16 if training.precision == "bf16" else None

    def setup(self, objective: nn.Module) -> tuple[nn.Module, torch.optim.Optimizer]:
        objective.to(self.device)
        module: nn.Module = objective
        if distributed.world_size() > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            module = DistributedDataParallel(objective, device_ids=ids)
        return module, adamw(trainable(objective), self.training, self.device)

    @staticmethod
    def unwrap(module: nn.Module) -> nn.Module:
        return module.module if isinstance(module, DistributedDataParallel) else module

    def sync(self, module: nn.Module, last: bool) -> contextlib.AbstractContextManager:
        if isinstance(module, DistributedDataParallel) and not last:
            return module.no_sync()
        return contextlib.nullcontext()

    def backward(self, module: nn.Module, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self, module: nn.Module, optimizer: torch.optim.Optimizer) -> float:
        norm = clip_and_step(module, optimizer, self.training)
        return float(norm)

    def full_state_dict(self, module: nn.Module) -> dict[str, torch.Tensor] | None:
        if not distributed.is_main():
            return None
        return {k: v.detach().cpu() for k, v in self.unwrap(module).lm.state_dict().items()}

    def save_resume(self, module: nn.Module, optimizer: torch.optim.Optimizer, directory: Path) -> None:
        if not distributed.is_main():
            return
        torch.save(optimizer.state_dict(), directory / "optimizer.pt")
        if self.lora:  # the HF dir holds merged weights; the adapter itself is resumed from here
            lm = self.unwrap(module).lm
            adapter = {n: p.detach().cpu() for n, p in lm.named_parameters() if p.requires_grad}
            torch.save(adapter, directory / "adapter.pt")

    def load_resume(self, module: nn.Module, optimizer: torch.optim.Optimizer, directory: Path) -> None:
        optimizer.load_state_dict(torch.load(directory / "optimizer.pt", map_location=self.device, weights_only=True))
        if self.lora:
            lm = self.unwrap(module).lm
            adapter = torch.load(directory / "adapter.pt", map_location=self.device, weights_only=True)
            lm.load_state_dict(adapter, strict=False)
