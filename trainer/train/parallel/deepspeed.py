"""DeepSpeed ZeRO-2/3 (`training.deepspeed_zero_stage`). DeepSpeed is in the `gpu` and `dev` extras
(it runs on CPU over gloo, so CI tests it); it is imported only when this strategy is chosen, with a
clear error when missing."""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from torch import nn

from trainer import distributed
from trainer.config import TrainingConfig
from trainer.errors import ConfigError
from trainer.train.parallel.base import adamw, trainable


def _import_deepspeed():
    try:
        # lazy: optional, only with strategy deepspeed
        import deepspeed
    except ImportError as err:
        raise ConfigError(
            "training.strategy=deepspeed needs the deepspeed package (pip install 'speechlm-tts-trainer[gpu]' "
            f"or deepspeed>=0.19.8): {err}"
        ) from None
    return deepspeed


class DeepSpeedStrategy:
    name = "deepspeed"
    resume_has_model = True

    def __init__(self, training: TrainingConfig, device: torch.device, lora: bool):
        self.training = training
        self.device = device
        self.lora = lora
        self.deepspeed = _import_deepspeed()
        self.autocast_dtype = None  # the engine casts the model itself

    def config(self) -> dict:
        t = self.training
        return {
            "train_micro_batch_size_per_gpu": t.batch_size,
            "gradient_accumulation_steps": t.gradient_accumulation_steps,
            # The loop owns the accumulation boundary: one `engine.step()` per optimizer step, after
            # all micro-batches' backwards (no micro-step counting inside the engine).
            "managed_gradient_accumulation": False,
            "gradient_clipping": t.max_grad_norm,
            "bf16": {"enabled": t.precision == "bf16"},
            "zero_optimization": {"stage": t.deepspeed_zero_stage, "overlap_comm": True, "contiguous_gradients": True,
                                  "stage3_gather_16bit_weights_on_model_save": True},
            "steps_per_print": 1 << 30,
        }

    def setup(self, objective: nn.Module) -> tuple[nn.Module, torch.optim.Optimizer]:
        objective.to(self.device)
        optimizer = adamw(trainable(objective), self.training, self.device)
        engine, _, _, _ = self.deepspeed.initialize(model=objective, optimizer=optimizer, config=self.config())
        # The LR scheduler drives the torch AdamW: the ZeRO wrapper the engine returns is no
        # torch.optim.Optimizer, and it reads its learning rates from this optimizer's param groups.
        return engine, optimizer

    def sync(self, module: nn.Module, last: bool) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()  # ZeRO reduces/partitions per backward; `step` is the boundary

    def backward(self, module: nn.Module, loss: torch.Tensor) -> None:
        # The loop already scales the loss for accumulation: no second 1/accum from the engine.
        module.backward(loss, scale_wrt_gas=False)

    def step(self, module: nn.Module, optimizer: torch.optim.Optimizer) -> float:
        module.step()  # reduce, clip (gradient_clipping), update, zero the gradients
        norm = module.get_global_grad_norm()
        return float(norm) if norm is not None else 0.0

    def full_state_dict(self, module: nn.Module) -> dict[str, torch.Tensor] | None:
        if self.training.deepspeed_zero_stage == 3:
            state = module._zero3_consolidated_16bit_state_dict()
        else:
            state = module.module.state_dict() if distributed.is_main() else None
        if not distributed.is_main() or state is None:
            return None
        return {k.removeprefix("lm."): v.detach().cpu() for k, v in state.items()}

    def save_resume(self, module: nn.Module, optimizer: torch.optim.Optimizer, directory: Path) -> None:
        module.save_checkpoint(str(directory / "deepspeed"), tag="state")

    def load_resume(self, module: nn.Module, optimizer: torch.optim.Optimizer, directory: Path) -> None:
        module.load_checkpoint(str(directory / "deepspeed"), tag="state")
