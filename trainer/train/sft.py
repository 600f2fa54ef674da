"""`tts-train sft`: supervised training of the SpeechLM on vectorized data (the seed's `training/main.py`).

    tts-train sft --config example/configs/sft.json [--run_name NAME] [--experiment_dir DIR] [--seed N]
                  [--use_wandb] [--project_name P] [--dry_run] [--compile_model]
    torchrun --nproc_per_node 8 -m trainer sft --config ...

`--dry_run` validates and prints the plan without training (`plan`; checks in trainer/train/preflight.py).
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import LlamaForCausalLM

from trainer import distributed, io
from trainer.config import TrainerConfig
from trainer.model.build import PRESETS, preset
from trainer.train import checkpoint, preflight
from trainer.train.loop import SFTTrainer, train

FLAGS = {
    "run_name": "training.run_name",
    "use_wandb": "training.use_wandb",
    "dry_run": "dry_run",
    "compile_model": "training.compile_model",
    # The reference's training/main.py flags. Its run directory is <experiment_dir>/<run_name>, as ours.
    "seed": "training.seed",
    "experiment_dir": "training.output_dir",
    "project_name": "training.project_name",
}
REFUSED_FLAGS = {
    "pretraining_mode": "the reference's pretraining mode trains on raw code streams "
    "({split}_pretraining_codes.npy), which no stage writes; sft trains on vectorized (text, codes) samples only",
}


def problems(config: TrainerConfig) -> list[str]:
    """What stops an SFT run before anything is built, one message each."""
    model = config.modeling.parameters.model_name
    found = [] if model in PRESETS or io.exists(model) else [
        f"modeling.parameters.model_name: {model!r} is neither a preset ({', '.join(PRESETS)}) nor an existing "
        "local model directory"]
    return [*preflight.precision_problems(config, "SFT", "no loss scaling"), *found,
            *preflight.dataset_problems(config), *preflight.resume_problems(config)]


def plan(config: TrainerConfig) -> dict[str, Any]:
    """The dry run's plan; with every input there, the loss of one batch as the reference's dry run."""
    t, p = config.training, config.modeling.parameters
    found = problems(config)
    out = preflight.common_plan(config, "sft", checkpoint.run_url(t))
    out["model"] = {"name": p.model_name, "codebook_size": p.codebook_size, "max_seq_len": p.max_seq_len,
                    "prompt_format": p.prompt_format,
                    "source": "preset (random init)" if p.model_name in PRESETS else "local model directory"}
    if p.model_name in PRESETS:
        with torch.device("meta"):
            llama = LlamaForCausalLM(preset(p.model_name, p.codebook_size, p.prompt_format)[0])
        out["model"]["parameters"] = sum(t.numel() for t in llama.parameters())
    if config.modeling.lora.enabled:
        out["model"]["lora"] = config.modeling.lora.model_dump(mode="json")
    out["data"] = preflight.datasets_plan(config, found)
    out["batch"] = {"batch_size": t.batch_size, "gradient_accumulation_steps": t.gradient_accumulation_steps,
                    "packing": t.packing, "pack_length": t.pack_length, "num_workers": t.num_workers}
    total = t.max_steps
    if not found:
        total, out["first_batch_loss"], out["model"]["parameters"] = _first_batch(config)
    out["schedule"] = preflight.schedule_plan(config, total)
    out["problems"] = found
    return out


def _first_batch(config: TrainerConfig) -> tuple[int, float, int]:
    """Build the trainer as a run would; the loss of its first micro-batch, no backward pass."""
    t = config.training
    try:
        trainer = SFTTrainer(config)
        steps_per_epoch = trainer.train_data.batches_per_epoch(0) // t.gradient_accumulation_steps
        batch, _ = next(trainer.train_data.iterate(trainer.sampler))
        trainer.module.eval()
        with torch.no_grad(), trainer.autocast():
            ce_sum, count = trainer.module(batch.to(trainer.device))
        parameters = sum(p.numel() for p in trainer.base_lm.parameters())
        return t.max_steps or t.num_epochs * steps_per_epoch, float(ce_sum) / max(float(count), 1.0), parameters
    finally:
        distributed.shutdown()


def run(config: TrainerConfig) -> int:
    if config.dry_run:
        return preflight.report(plan(config))
    preflight.require(problems(config))
    return train(config)
