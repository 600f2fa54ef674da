"""`tts-train rlhf`: GRPO alignment of a SpeechLM with TRL's `GRPOTrainer`.

Why TRL: it is the reference GRPO implementation (Dr. GRPO loss, truncation masking, vLLM server
rollouts with NCCL weight sync) and the seed used it; we add what TTS needs around it: prompts built
from vectorized data, token constraints so every completion decodes, decode-once batched rewards,
guard rails, SFT-compatible checkpoints and metrics.

Supported stacks (tested by tests/test_grpo.py on the CPU one):
    image / dev stack        torch          transformers  trl      vllm
    rollout + trainer (GPU)  2.7 (cu128)    4.55-4.57     0.21.0   0.10.1.1   (`trl vllm-serve` server)
    CPU dev / CI             2.13 (cpu)     4.57.6        0.21.0   -          (local HF generate)
trl 0.21-0.23 import-fail with transformers 5.x, and trl 1.x needs transformers 5: keep the pair.

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
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch
from datasets import Dataset
from transformers import TrainerCallback
from trl import GRPOConfig, GRPOTrainer

from trainer import distributed, io, metrics
from trainer.config import TrainerConfig
from trainer.errors import ConfigError, StageError
from trainer.model.build import load_speechlm, save_speechlm
from trainer.model.prompt import PromptFormat
from trainer.model.vocab import AudioVocab
from trainer.rl import rollout
from trainer.rl.prompts import as_rows, build_prompts
from trainer.rl.rewards import REWARD_FUNCS, RewardScorer, ScorerModels, build_reward_funcs
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
from trainer.train import checkpoint

log = logging.getLogger(__name__)

FLAGS = {
    "base_model_dir": "rlhf_training.base_model_dir",
    "codec_model_path": "rlhf_training.codec_model_path",
    "use_vllm": "rlhf_training.use_vllm",
    "max_steps": "rlhf_training.max_steps",
    "run_name": "training.run_name",
    "output_dir": "training.output_dir",
    # The reference's rlhf_main.py flags.
    "experiment_dir": "training.output_dir",
    "project_name": "training.project_name",
    "use_wandb": "training.use_wandb",
    "vllm_server_host": "rlhf_training.vllm_server_host",
    "vllm_server_timeout": "rlhf_training.vllm_server_timeout_s",
    "dry_run": "training.dry_run",
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


def validate(config: TrainerConfig) -> None:
    rl = config.rlhf_training
    if not rl.base_model_dir:
        raise ConfigError("rlhf_training.base_model_dir is required (an exported SFT model directory)")
    if not io.exists(rl.base_model_dir):
        raise ConfigError(f"rlhf_training.base_model_dir not found: {rl.base_model_dir}")
    if not config.train_weighted_datasets:
        raise ConfigError("train_weighted_datasets is empty: GRPO builds its prompts from vectorized data")
    for url in [*config.train_weighted_datasets, *config.val_weighted_datasets]:
        if not io.exists(url):
            raise ConfigError(f"dataset path {url!r} does not exist")
    if rl.use_vllm:
        rollout.check_weight_sync()
    if config.training.precision == "fp16":
        raise ConfigError("training.precision=fp16 is not supported for GRPO; use bf16 or fp32")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    generation_batch = rl.per_device_train_batch_size * world * config.training.gradient_accumulation_steps
    if generation_batch % rl.num_generations:
        raise ConfigError(
            f"per_device_train_batch_size ({rl.per_device_train_batch_size}) x processes ({world}) x "
            f"gradient_accumulation_steps ({config.training.gradient_accumulation_steps}) = {generation_batch} "
            f"completions per generation must be divisible by num_generations ({rl.num_generations})"
        )


def grpo_args(config: TrainerConfig, hf_output_dir: str, vocab: AudioVocab, vocab_size: int) -> GRPOConfig:
    t, rl, ck = config.training, config.rlhf_training, config.checkpointing
    cuda = torch.cuda.is_available()
    max_steps = rl.max_steps or t.max_steps or -1
    if rl.use_vllm:
        server = rollout.vllm_server(rl)
        generation_kwargs = rollout.vllm_sampling_kwargs(vocab, rl.min_completion_length)
        vllm = {"vllm_mode": "server", "vllm_server_base_url": server.base_url,
                "vllm_server_timeout": rl.vllm_server_timeout_s}
    else:
        generation_kwargs = rollout.hf_generation_kwargs(vocab, vocab_size, rl.min_completion_length)
        vllm = {}
    return GRPOConfig(
        output_dir=hf_output_dir,
        run_name=t.run_name,
        seed=t.seed,
        learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler,
        warmup_steps=t.warmup_steps,
        warmup_ratio=t.warmup_ratio or 0.0,
        weight_decay=t.weight_decay,
        adam_beta1=t.adam_beta1,
        adam_beta2=t.adam_beta2,
        adam_epsilon=t.adam_eps,
        max_grad_norm=t.max_grad_norm,
        num_train_epochs=t.num_epochs,
        max_steps=max_steps,
        per_device_train_batch_size=rl.per_device_train_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        gradient_checkpointing=t.gradient_checkpointing,
        bf16=cuda and t.precision == "bf16",
        use_cpu=not cuda,
        logging_steps=t.logging_steps,
        save_strategy="steps",
        save_steps=ck.save_steps,
        save_total_limit=None,  # pruning is ours, on the published step_<N> directories
        report_to=["wandb"] if t.use_wandb else [],
        dataloader_num_workers=0,
        disable_dropout=True,
        num_generations=rl.num_generations,
        max_prompt_length=None,  # prompts over rlhf_training.max_prompt_length are dropped, never cut
        max_completion_length=rl.max_completion_length,
        temperature=rl.temperature,
        top_p=rl.top_p,
        top_k=rl.top_k or None,
        repetition_penalty=rl.repetition_penalty,
        num_iterations=rl.num_iterations,
        beta=rl.kl_beta,
        scale_rewards=rl.scale_rewards,
        loss_type=rl.loss_type,
        mask_truncated_completions=rl.mask_truncated_completions,
        reward_weights=rl.reward_weights,
        use_vllm=rl.use_vllm,
        generation_kwargs=generation_kwargs,
        **vllm,
    )


class SpeechGRPOTrainer(GRPOTrainer):
    """GRPOTrainer plus rollout/weight-sync timings (Prometheus and the logged scalars)."""

    def __init__(self, *args, rewards: TrlRewards, **kwargs):
        self.rewards = rewards
        super().__init__(*args, **kwargs)

    def _generate_and_score_completions(self, inputs):
        start = time.perf_counter()
        scoring_before = self.rewards.seconds_total
        output = super()._generate_and_score_completions(inputs)
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

    def _move_model_to_vllm(self):
        start = time.perf_counter()
        super()._move_model_to_vllm()
        WEIGHT_SYNC_SECONDS.observe(time.perf_counter() - start)
        self._metrics["train"]["timing/weight_sync_seconds"].append(time.perf_counter() - start)


class PublishCheckpoints(TrainerCallback):
    """Turns transformers' `checkpoint-<N>` into the SFT layout `checkpoints/step_<N>` (+ speechlm.json,
    the codec reference and the `_COMPLETE` marker), published atomically, and prunes old ones.

    Every rank writes part of `checkpoint-<N>` (rank 0 the model, optimizer and trainer state, each rank
    its `rng_state_<rank>.pth`) with no barrier before `on_save`, so publishing starts with one. A local
    output dir is shared by the ranks: rank 0 renames the complete directory. Otherwise each rank has its
    own scratch `checkpoint-<N>`: every rank uploads its files, rank 0 marks the upload complete, and each
    rank deletes its scratch copy (a pod's disk would fill with one model per save otherwise)."""

    def __init__(self, run: str, vocab: AudioVocab, codec_url: str, keep: int | None):
        self.run = run
        self.vocab = vocab
        self.codec_url = codec_url
        self.keep = keep

    def _add_speechlm_files(self, directory: Path) -> None:
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


def run(config: TrainerConfig) -> int:
    if config.training.dry_run:
        from trainer.plan import report, rlhf_plan

        return report(rlhf_plan(config))
    validate(config)
    rl, t = config.rlhf_training, config.training
    if t.use_wandb and t.project_name:
        os.environ["WANDB_PROJECT"] = t.project_name  # read by transformers' WandbCallback
    run = checkpoint.run_url(config.training)
    metrics.serve(config.metrics.port)
    scalars = metrics.ScalarLog(io.join(run, "metrics.jsonl"), "rlhf")
    device = "cuda" if torch.cuda.is_available() else "cpu"

    ck = config.checkpointing
    weights_only = ck.only_load_model_weights and ck.checkpoint_file_to_resume_from
    model, tokenizer, vocab = load_speechlm(ck.checkpoint_file_to_resume_from if weights_only else rl.base_model_dir)
    prompt_format = PromptFormat(tokenizer, vocab, config.modeling.parameters.enable_text_normalization)
    train_prompts = build_prompts(
        config.train_weighted_datasets, "train", prompt_format, rl.max_prompt_length,
        config.dataset, t.seed, vllm_server=rl.use_vllm,
    )
    guard_prompts = _guard_prompts(config, prompt_format)

    from trainer.codec import Codec

    codec_url = resolve_codec(config)
    codec = Codec.load(codec_url, device=device, components=("decoder",))
    models = ScorerModels(rl.asr_backend, rl.asr_model_path, rl.speaker_backend, rl.speaker_model_path,
                          rl.dnsmos_personalized, device)
    funcs = build_reward_funcs(rl.reward_funcs, models)
    completions = SaveCompletions(run, rl.save_completions_steps)

    def on_scored(result) -> None:
        record_rewards(result)
        completions.remember(result)

    rewards = TrlRewards(RewardScorer(codec, funcs, rl.reward_weights), vocab, on_scored=on_scored)
    guard_scorer = RewardScorer(codec, GuardRails.scorer_functions(funcs, lambda name: REWARD_FUNCS[name](models)))

    # TRL stops sampling and masks the loss at the tokenizer's eos: for a SpeechLM that is speech-end.
    policy_tokenizer = copy.deepcopy(tokenizer)
    policy_tokenizer.eos_token = vocab.speech_end
    policy_tokenizer.model_input_names = ["input_ids", "attention_mask"]  # LLaMA takes no token_type_ids
    vocab_size = model.get_input_embeddings().weight.shape[0]
    if io.is_local(run):  # shared by the ranks (a shared volume when multi-node)
        hf_dir = io.join(io.local_path(run), checkpoint.CHECKPOINTS)
        Path(hf_dir).mkdir(parents=True, exist_ok=True)
    else:  # this rank's scratch space; PublishCheckpoints uploads and empties it
        hf_dir = tempfile.mkdtemp(prefix="grpo-")
    args = grpo_args(config, hf_dir, vocab, vocab_size)
    guard_generation = {
        **rollout.hf_generation_kwargs(vocab, vocab_size, rl.min_completion_length),
        "max_new_tokens": rl.max_completion_length, "do_sample": True, "temperature": rl.temperature,
        "top_p": rl.top_p, "top_k": rl.top_k or None, "repetition_penalty": rl.repetition_penalty,
        "pad_token_id": vocab.pad_token_id, "eos_token_id": vocab.speech_end_id,
    }
    callbacks = [
        ScalarLogCallback(scalars),
        GuardRails(guard_prompts, prompt_format, guard_scorer, guard_generation, rl.guard_rail_steps, scalars,
                   t.seed),
        PublishCheckpoints(run, vocab, codec_url, config.checkpointing.keep_only_last_n_checkpoints),
        completions,
    ]
    adapter = None
    if config.modeling.lora.enabled:
        from trainer.model.lora import peft_config

        # The same adapter as SFT's: the added (audio) rows train too, so GRPO can move the codes.
        adapter = peft_config(config.modeling.lora, vocab, bool(model.config.tie_word_embeddings))
    server_group_port = rollout.vllm_server(rl).group_port if rl.use_vllm else 51216
    with rollout.speech_vllm_client(policy_tokenizer, server_group_port):
        trainer = SpeechGRPOTrainer(
            model=model, reward_funcs=rewards.functions(), args=args,
            train_dataset=Dataset.from_list(as_rows(train_prompts)), processing_class=policy_tokenizer,
            callbacks=callbacks, peft_config=adapter, rewards=rewards,
        )
    resume_url = resume_source(config, run)
    resume = str(checkpoint.local_copy(resume_url)) if resume_url else None
    try:
        trainer.train(resume_from_checkpoint=resume)
    finally:  # this rank's scratch copies: a downloaded resume state, a remote run's checkpoint dir
        if resume_url and not io.is_local(resume_url):
            shutil.rmtree(resume, ignore_errors=True)
        if not io.is_local(run):
            shutil.rmtree(hf_dir, ignore_errors=True)

    if trainer.accelerator.is_main_process:
        policy = trainer.accelerator.unwrap_model(trainer.model)
        if config.modeling.lora.enabled:
            policy = policy.merge_and_unload()
        final = io.join(run, checkpoint.FINAL_MODEL)
        with io.staged_dir(final) as staging:
            save_speechlm(policy, tokenizer, vocab, staging)
            write_codec_reference(str(staging), codec_url)
        log.info("final model: %s", final)
    scalars.close()
    return 0
