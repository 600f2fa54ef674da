"""What a training stage (sft, rlhf) checks before it starts, and the `--dry_run` plan built from it.

Each stage lists its own problems (`sft.problems`, `grpo.problems`) from the shared checks here, one
message per problem. A real run stops on them (`require`); a dry run prints the run plan (model, data
found and kept by the `dataset` filters, optimiser, clipping, schedule, strategy, resume source,
logging) with the problems listed and logged, and exits 0: the config itself is valid (schema errors
exit 2 before any plan is built).
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

from trainer import io
from trainer.config import TrainerConfig
from trainer.data.dataset import VectorizedSplit
from trainer.errors import ConfigError, StageError

log = logging.getLogger(__name__)


def require(problems: list[str]) -> None:
    """Stop a real run on the problems its stage found (all of them, one per line)."""
    if problems:
        raise ConfigError("\n".join(problems))


def precision_problems(config: TrainerConfig, stage: str, why: str) -> list[str]:
    if config.training.precision == "fp16":
        return [f"training.precision=fp16 is not supported for {stage} ({why}); use bf16 or fp32"]
    return []


def dataset_problems(config: TrainerConfig) -> list[str]:
    problems = []
    if not config.train_weighted_datasets:
        problems.append("train_weighted_datasets is empty: name at least one vectorized dataset")
    for split in ("train", "val"):
        for url in getattr(config, f"{split}_weighted_datasets"):
            if not io.exists(url):
                problems.append(f"{split}_weighted_datasets: dataset path {url!r} does not exist")
    return problems


def resume_problems(config: TrainerConfig) -> list[str]:
    explicit = config.checkpointing.checkpoint_file_to_resume_from
    if explicit and not io.exists(explicit):
        return [f"checkpointing.checkpoint_file_to_resume_from: {explicit!r} does not exist"]
    return []


# ------------------------------------------------------------------------------------ the plan
def datasets_plan(config: TrainerConfig, problems: list[str]) -> dict[str, list[dict[str, Any]]]:
    """Each dataset: weight, whether it exists, its samples and those the `dataset` filters keep."""
    out: dict[str, list[dict[str, Any]]] = {}
    for split in ("train", "val"):
        rows = []
        for url, weight in getattr(config, f"{split}_weighted_datasets").items():
            row: dict[str, Any] = {"url": url, "weight": weight, "exists": io.exists(url)}
            if row["exists"]:
                try:
                    data = VectorizedSplit(url, split, dataset_filter=config.dataset)
                    row.update(samples=len(data), kept_by_filters=int((~data.rejected).sum()))
                except (ConfigError, StageError) as err:
                    problems.append(f"{split}_weighted_datasets: {err}")
            rows.append(row)
        out[split] = rows
    return out


def schedule_plan(config: TrainerConfig, total_steps: int | None) -> dict[str, Any]:
    t = config.training
    return {
        "type": t.lr_scheduler,
        "total_steps": total_steps,
        "warmup_steps": t.warmup(total_steps) if total_steps is not None else None,
        "warmup": f"{t.warmup_ratio} x total steps" if t.warmup_ratio is not None else f"{t.warmup_steps} steps",
    }


def common_plan(config: TrainerConfig, stage: str, run_dir: str) -> dict[str, Any]:
    t, ck = config.training, config.checkpointing
    resume: dict[str, Any] = {"source": "the run's latest complete checkpoint, if any"}
    if ck.checkpoint_file_to_resume_from:
        resume = {"source": ck.checkpoint_file_to_resume_from, "exists": io.exists(ck.checkpoint_file_to_resume_from),
                  "model_weights_only": ck.only_load_model_weights}
    return {
        "stage": stage,
        "run_dir": run_dir,
        "strategy": t.strategy,
        "precision": t.precision,
        "world_size": int(os.environ.get("WORLD_SIZE", "1")),
        "seed": t.seed,
        "optimizer": {"type": "AdamW", "learning_rate": t.learning_rate, "betas": [t.adam_beta1, t.adam_beta2],
                      "eps": t.adam_eps, "weight_decay": t.weight_decay},
        "clipping": {"max_grad_norm": t.max_grad_norm or None, "gradient_clip_value": t.gradient_clip_value},
        "logging": {"wandb": t.use_wandb, "project_name": t.project_name, "logging_steps": t.logging_steps},
        "checkpointing": {"save_steps": ck.save_steps, "keep_only_last_n_checkpoints": ck.keep_only_last_n_checkpoints},
        "resume": resume,
    }


def report(plan: dict[str, Any]) -> int:
    """Print the plan (JSON, stdout) and log each problem; 0: the config is valid."""
    print(json.dumps(plan, indent=2, default=str))
    for problem in plan["problems"]:
        log.warning("dry run: a real run would stop here: %s", problem)
    log.info("dry run done: configuration valid, %d problem(s) with the inputs, nothing trained",
             len(plan["problems"]))
    return 0
