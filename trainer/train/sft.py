"""`tts-train sft`: supervised training of the SpeechLM on vectorized data (the seed's `training/main.py`).

    tts-train sft --config example/configs/sft.json [--run_name NAME] [--experiment_dir DIR] [--seed N]
                  [--use_wandb] [--project_name P] [--dry_run] [--compile_model]
    torchrun --nproc_per_node 8 -m trainer sft --config ...

`--dry_run` validates and prints the plan without training (trainer/plan.py).
"""

from __future__ import annotations

from trainer.config import TrainerConfig

FLAGS = {
    "run_name": "training.run_name",
    "use_wandb": "training.use_wandb",
    "dry_run": "training.dry_run",
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


def run(config: TrainerConfig) -> int:
    if config.training.dry_run:
        from trainer.plan import report, sft_plan

        return report(sft_plan(config))
    from trainer.train.loop import train

    return train(config)
