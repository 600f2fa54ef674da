"""`tts-train sft`: supervised training of the SpeechLM on vectorized data (the seed's `training/main.py`).

    tts-train sft --config example/configs/sft.json [--run_name NAME] [--use_wandb] [--dry_run] [--compile_model]
    torchrun --nproc_per_node 8 -m trainer sft --config ...
"""

from __future__ import annotations

from trainer.config import TrainerConfig

FLAGS = {
    "run_name": "training.run_name",
    "use_wandb": "training.use_wandb",
    "dry_run": "training.dry_run",
    "compile_model": "training.compile_model",
}


def run(config: TrainerConfig) -> int:
    from trainer.train.loop import train

    return train(config)
