"""`--dry_run` of `tts-train sft|rlhf`: validate the config and print the run plan; never train.

The plan is what the run would do: model, data (samples found and kept by the `dataset` filters),
optimiser, clipping, schedule, strategy, resume source, logging. Inputs a real run would stop on
(missing datasets, base model, checkpoint, codec, a batch that does not divide) are listed under
`problems` and logged; the dry run still exits 0 because the config itself is valid (schema errors
exit 2 before any plan is built). When every input is there, SFT also builds the trainer and
computes the loss of one batch without a backward pass, as the reference's dry run does.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import torch

from trainer import io
from trainer.config import TrainerConfig
from trainer.errors import ConfigError, StageError
from trainer.train import checkpoint

log = logging.getLogger(__name__)


def _optimizer(config: TrainerConfig) -> dict[str, Any]:
    t = config.training
    return {
        "optimizer": {"type": "AdamW", "learning_rate": t.learning_rate, "betas": [t.adam_beta1, t.adam_beta2],
                      "eps": t.adam_eps, "weight_decay": t.weight_decay},
        "clipping": {"max_grad_norm": t.max_grad_norm or None, "gradient_clip_value": t.gradient_clip_value},
    }


def _schedule(config: TrainerConfig, total_steps: int | None) -> dict[str, Any]:
    t = config.training
    return {
        "type": t.lr_scheduler,
        "total_steps": total_steps,
        "warmup_steps": t.warmup(total_steps) if total_steps is not None else None,
        "warmup": f"{t.warmup_ratio} x total steps" if t.warmup_ratio is not None else f"{t.warmup_steps} steps",
    }


def _datasets(config: TrainerConfig, problems: list[str]) -> dict[str, list[dict[str, Any]]]:
    from trainer.data.dataset import VectorizedSplit

    out: dict[str, list[dict[str, Any]]] = {}
    for split, weighted in (("train", config.train_weighted_datasets), ("val", config.val_weighted_datasets)):
        rows = []
        for url, weight in weighted.items():
            row: dict[str, Any] = {"url": url, "weight": weight, "exists": io.exists(url)}
            if not row["exists"]:
                problems.append(f"{split}_weighted_datasets: dataset path {url!r} does not exist")
            else:
                try:
                    data = VectorizedSplit(url, split, dataset_filter=config.dataset)
                    row.update(samples=len(data), kept_by_filters=int((~data.rejected).sum()))
                except (ConfigError, StageError) as err:
                    problems.append(f"{split}_weighted_datasets: {err}")
            rows.append(row)
        out[split] = rows
    if not config.train_weighted_datasets:
        problems.append("train_weighted_datasets is empty: name at least one vectorized dataset")
    return out


def _resume(explicit: str | None, weights_only: bool, problems: list[str]) -> dict[str, Any]:
    if not explicit:
        return {"source": "the run's latest complete checkpoint, if any"}
    found = io.exists(explicit)
    if not found:
        problems.append(f"checkpointing.checkpoint_file_to_resume_from: {explicit!r} does not exist")
    return {"source": explicit, "exists": found, "model_weights_only": weights_only}


def _sft_model(config: TrainerConfig, problems: list[str]) -> dict[str, Any]:
    from trainer.model.build import PRESETS, preset

    p = config.modeling.parameters
    model: dict[str, Any] = {"name": p.model_name, "codebook_size": p.codebook_size, "max_seq_len": p.max_seq_len,
                             "prompt_format": p.prompt_format}
    if p.model_name in PRESETS:
        llama_config, _, _ = preset(p.model_name, p.codebook_size, p.prompt_format)
        from transformers import LlamaForCausalLM

        with torch.device("meta"):
            model["parameters"] = sum(t.numel() for t in LlamaForCausalLM(llama_config).parameters())
        model["source"] = "preset (random init)"
    elif io.exists(p.model_name):
        model["source"] = "local model directory"
    else:
        model["source"] = "missing"
        problems.append(f"modeling.parameters.model_name: {p.model_name!r} is neither a preset "
                        f"({', '.join(PRESETS)}) nor an existing local model directory")
    lora = config.modeling.lora
    if lora.enabled:
        model["lora"] = lora.model_dump(mode="json")
    return model


def _common(config: TrainerConfig, stage: str, run_dir: str) -> dict[str, Any]:
    t = config.training
    return {
        "stage": stage,
        "run_dir": run_dir,
        "strategy": t.strategy,
        "precision": t.precision,
        "world_size": int(os.environ.get("WORLD_SIZE", "1")),
        "seed": t.seed,
        **_optimizer(config),
        "logging": {"wandb": t.use_wandb, "project_name": t.project_name, "logging_steps": t.logging_steps},
        "checkpointing": {"save_steps": config.checkpointing.save_steps,
                          "keep_only_last_n_checkpoints": config.checkpointing.keep_only_last_n_checkpoints},
    }


def sft_plan(config: TrainerConfig) -> dict[str, Any]:

    t = config.training
    problems: list[str] = []
    if t.precision == "fp16":
        problems.append("training.precision=fp16 is not supported for SFT (no loss scaling); use bf16 or fp32")
    plan = _common(config, "sft", checkpoint.run_url(config.training))
    plan["model"] = _sft_model(config, problems)
    plan["data"] = _datasets(config, problems)
    plan["batch"] = {"batch_size": t.batch_size, "gradient_accumulation_steps": t.gradient_accumulation_steps,
                     "packing": t.packing, "pack_length": t.pack_length, "num_workers": t.num_workers}
    ck = config.checkpointing
    plan["resume"] = _resume(ck.checkpoint_file_to_resume_from, ck.only_load_model_weights, problems)
    total = t.max_steps
    if not problems:
        total, plan["first_batch_loss"], plan["model"]["parameters"] = _sft_first_batch(config)
    plan["schedule"] = _schedule(config, total)
    plan["problems"] = problems
    return plan


def _sft_first_batch(config: TrainerConfig) -> tuple[int, float, int]:
    """Build the trainer as a run would; the loss of its first micro-batch, no backward pass."""
    from trainer import distributed
    from trainer.train.loop import SFTTrainer

    t = config.training
    try:
        trainer = SFTTrainer(config)
        steps_per_epoch = trainer.train_data.batches_per_epoch(0) // t.gradient_accumulation_steps
        batch, _ = next(trainer.train_data.iterate(trainer.sampler))
        trainer.module.eval()
        with torch.no_grad(), trainer._autocast():
            ce_sum, count = trainer.module(batch.to(trainer.device))
        parameters = sum(p.numel() for p in trainer.base_lm.parameters())
        return t.max_steps or t.num_epochs * steps_per_epoch, float(ce_sum) / max(float(count), 1.0), parameters
    finally:
        distributed.shutdown()


def rlhf_plan(config: TrainerConfig) -> dict[str, Any]:
    from trainer.rl import grpo
    from trainer.rl.rewards import REWARD_FUNCS

    rl, t = config.rlhf_training, config.training
    problems: list[str] = []
    plan = _common(config, "rlhf", checkpoint.run_url(config.training))
    base = rl.base_model_dir
    plan["model"] = {"base_model_dir": base, "exists": bool(base) and io.exists(base)}
    if not base:
        problems.append("rlhf_training.base_model_dir is required (an exported SFT model directory)")
    elif not plan["model"]["exists"]:
        problems.append(f"rlhf_training.base_model_dir not found: {base}")
    plan["data"] = _datasets(config, problems)
    unknown = [name for name in rl.reward_funcs if name not in REWARD_FUNCS]
    if unknown:
        problems.append(f"rlhf_training.reward_funcs: unknown {unknown}; known: {sorted(REWARD_FUNCS)}")
    plan["rewards"] = {"funcs": rl.reward_funcs, "weights": rl.reward_weights, "asr_backend": rl.asr_backend,
                       "speaker_backend": rl.speaker_backend}
    plan["grpo"] = {
        "num_generations": rl.num_generations, "per_device_train_batch_size": rl.per_device_train_batch_size,
        "max_prompt_length": rl.max_prompt_length, "max_completion_length": rl.max_completion_length,
        "min_completion_length": rl.min_completion_length, "kl_beta": rl.kl_beta, "loss_type": rl.loss_type,
        "num_iterations": rl.num_iterations, "scale_rewards": rl.scale_rewards,
        "sampling": {"temperature": rl.temperature, "top_p": rl.top_p, "top_k": rl.top_k,
                     "repetition_penalty": rl.repetition_penalty},
        "rollouts": "vLLM server" if rl.use_vllm else "local generate",
    }
    if rl.use_vllm:
        from trainer.rl import rollout

        server = rollout.vllm_server(rl)
        plan["grpo"]["vllm_server"] = {"url": server.base_url, "group_port": server.group_port,
                                       "timeout_s": rl.vllm_server_timeout_s}
    ck = config.checkpointing
    plan["resume"] = _resume(ck.checkpoint_file_to_resume_from, ck.only_load_model_weights, problems)
    if not problems:
        try:
            grpo.validate(config)
            plan["codec"] = grpo.resolve_codec(config)
        except ConfigError as err:
            problems.append(str(err))
    plan["schedule"] = _schedule(config, rl.max_steps or t.max_steps)
    plan["problems"] = problems
    return plan


def report(plan: dict[str, Any]) -> int:
    """Print the plan (JSON, stdout) and log each problem; 0: the config is valid."""
    print(json.dumps(plan, indent=2, default=str))
    for problem in plan["problems"]:
        log.warning("dry run: a real run would stop here: %s", problem)
    log.info("dry run done: configuration valid, %d problem(s) with the inputs, nothing trained",
             len(plan["problems"]))
    return 0
