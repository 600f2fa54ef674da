"""FSDP2 (`fully_shard`): parameters, gradients and optimizer state sharded across ranks.

Each decoder layer is its own shard group (all-gathered just before it runs), the rest (embeddings,
final norm, head) is the root group. bf16 uses FSDP's mixed precision (bf16 compute, fp32 master
weights and gradient reduction). Resume state is a sharded torch.distributed.checkpoint (each rank
writes its own shard); the HF export gathers a full state dict on rank 0.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from trainer import distributed
from trainer.config import TrainingConfig
from trainer.train.parallel.base import adamw, clip_and_step, trainable


class FSDPStrategy:
    name = "fsdp"
    resume_has_model = True

    def __init__(self, training: TrainingConfig, device: torch.device, lora: bool):
        self.training = training
        self.device = device
        self.lora = lora
        # FSDP casts parameters itself; no autocast on top.
        self.autocast_dtype = None

    def setup(self, objective: nn.Module) -> tuple[nn.Module, torch.optim.Optimizer]:
        objective.to(self.device)
        policy = MixedPrecisionPolicy(
            param_dtype=torch.bfloat16 if self.training.precision == "bf16" else None, reduce_dtype=torch.float32
        )
        for layer in objective._causal_lm().model.layers:
            fully_shard(layer, mp_policy=policy)
        fully_shard(objective, mp_policy=policy)
        return objective, adamw(trainable(objective), self.training, self.device)

    def sync(self, module: nn.Module, last: bool) -> contextlib.AbstractContextManager:
        module.set_requires_gradient_sync(last)
        return contextlib.nullcontext()

    def backward(self, module: nn.Module, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self, module: nn.Module, optimizer: torch.optim.Optimizer) -> float:
        norm = clip_and_step(module, optimizer, self.training)
        return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)

    def full_state_dict(self, module: nn.Module) -> dict[str, torch.Tensor] | None:
        state = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if not distributed.is_main():
            return None
        return {k.removeprefix("lm."): v for k, v in state.items()}

    def save_resume(self, module: nn.Module, optimizer: torch.optim.Optimizer, directory: Path) -> None:
        model_state, optim_state = get_state_dict(module, optimizer)
        dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(directory / "sharded"))

    def load_resume(self, module: nn.Module, optimizer: torch.optim.Optimizer, directory: Path) -> None:
        model_state, optim_state = get_state_dict(module, optimizer)
        state = {"model": model_state, "optim": optim_state}
        dcp.load(state, checkpoint_id=str(directory / "sharded"))
        set_state_dict(module, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
