"""What a GRPO run reports: Prometheus metrics, the metrics.jsonl scalars, and guard-rail evaluations.

Guard rails: every `guard_rail_steps` the policy speaks a fixed set of held-out prompts and the run logs
WER, speaker similarity, DNSMOS and speaking rate (`guard/*` scalars). Published GRPO-for-TTS results
show SIM and prosody can regress while the WER reward improves; these curves make that visible.
"""

from __future__ import annotations

import json
import logging
import time

import numpy as np
import torch
from prometheus_client import Counter, Gauge, Histogram
from transformers import TrainerCallback

from trainer import io
from trainer.audio import write_wav
from trainer.metrics import ScalarLog
from trainer.model.prompt import PromptFormat
from trainer.rl.prompts import RlPrompt
from trainer.rl.rewards.functions import DNSMOSRewardFunc, RewardFunc, SimilarityRewardFunc, WERRewardFunc
from trainer.rl.rewards.rules import speaking_rate
from trainer.rl.rewards.scorer import RewardScorer, ScoreResult

log = logging.getLogger(__name__)

REWARD = Gauge("speechlm_rl_reward", "Mean reward of the last scored batch", ["reward_fn"])
ROLLOUT_SECONDS = Histogram(
    "speechlm_rl_rollout_duration_seconds", "Generating one batch of completions (excluding reward scoring)",
    buckets=(0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600),
)
WEIGHT_SYNC_SECONDS = Histogram(
    "speechlm_rl_weight_sync_duration_seconds", "Pushing the policy weights to the vLLM rollout server",
    buckets=(0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60),
)
STEPS = Counter("speechlm_rl_steps_total", "GRPO optimiser steps done")
LOSS = Gauge("speechlm_rl_loss", "GRPO policy loss of the last logged step")


def record_rewards(result: ScoreResult) -> None:
    """Prometheus gauges of the last scored batch."""
    for name, values in result.rewards.items():
        REWARD.labels(reward_fn=name).set(float(np.mean(values)))
    REWARD.labels(reward_fn="total").set(float(np.mean(result.total)))


class ScalarLogCallback(TrainerCallback):
    """TRL's logged scalars (loss, reward, rewards/<fn>/mean, completions/mean_length, ...) -> metrics.jsonl,
    plus the step counter."""

    def __init__(self, scalars: ScalarLog):
        self.scalars = scalars

    def on_log(self, args, state, control, logs=None, **kwargs):
        values = {k: float(v) for k, v in (logs or {}).items() if isinstance(v, (int, float))}
        if "loss" in values:
            LOSS.set(values["loss"])
        if values:
            self.scalars.log(state.global_step, **values)

    def on_step_end(self, args, state, control, **kwargs):
        STEPS.inc()


class GuardRails(TrainerCallback):
    def __init__(self, prompts: list[RlPrompt], prompt_format: PromptFormat, scorer: RewardScorer,
                 generation_kwargs: dict, every: int, scalars: ScalarLog, seed: int):
        self.prompts = prompts
        self.prompt_format = prompt_format
        self.scorer = scorer
        self.generation_kwargs = generation_kwargs
        self.every = every
        self.scalars = scalars
        self.seed = seed
        self.last: tuple[int, dict[str, float]] | None = None  # (step, values) of the latest measurement

    @staticmethod
    def scorer_functions(reward_funcs: list[RewardFunc], build) -> list[RewardFunc]:
        """WER, SIM and DNSMOS, reusing the reward functions' loaded models where they exist."""
        by_type = {type(f): f for f in reward_funcs}
        return [by_type.get(cls) or build(cls.name) for cls in (WERRewardFunc, SimilarityRewardFunc, DNSMOSRewardFunc)]

    @torch.no_grad()
    def evaluate(self, model) -> dict[str, float]:
        vocab = self.prompt_format.vocab
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        completions = []
        # The same draws every time, and the training RNG streams (CPU and GPU) left untouched.
        with torch.random.fork_rng(devices=list(range(torch.cuda.device_count()))):
            torch.manual_seed(self.seed)
            for p in self.prompts:
                ids = self.prompt_format.tokenizer(p.prompt, add_special_tokens=False, return_tensors="pt")
                input_ids = ids["input_ids"].to(device)
                out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                     **self.generation_kwargs)
                completions.append(out[0, input_ids.shape[1] :].tolist())
        model.train(was_training)
        result = self.scorer.score(
            [vocab.codes_from_ids(c) for c in completions], [np.asarray(p.prompt_codes) for p in self.prompts],
            [p.target_text for p in self.prompts], [p.reference_text for p in self.prompts],
            [p.language for p in self.prompts], reference_keys=[p.reference_key for p in self.prompts],
            truncated=[vocab.speech_end_id not in c for c in completions],
        )
        seconds = [w.size / result.batch.sample_rate for w in result.batch.waves]
        rates = [speaking_rate(p.target_text, s, p.language) for p, s in zip(self.prompts, seconds, strict=True)]

        def mean(values) -> float:
            values = np.asarray(values, dtype=np.float64)
            return float(np.nanmean(values)) if np.isfinite(values).any() else float("nan")

        return {
            "guard/wer": mean(result.measures[WERRewardFunc.name]),
            "guard/sim": mean(result.measures[SimilarityRewardFunc.name]),
            "guard/dnsmos": mean(result.measures[DNSMOSRewardFunc.name]),
            "guard/chars_per_second": mean(rates),
            "guard/truncated": float(np.mean(result.batch.truncated)),
        }

    def _run(self, state, model) -> None:
        if not state.is_world_process_zero or (self.last is not None and self.last[0] == state.global_step):
            return
        start = time.perf_counter()
        values = self.evaluate(model)
        self.last = (state.global_step, values)
        self.scalars.log(state.global_step, **values, **{"guard/seconds": time.perf_counter() - start})
        log.info("guard rails at step %d: %s", state.global_step, values)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % self.every == 0:
            self._run(state, model)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self._run(state, model)


class SaveCompletions(TrainerCallback):
    """Every `every` steps, keep the step's completions for listening: WAVs (16 kHz, as scored) and a
    JSONL of texts, rewards and raw metrics under `<run>/completions/step_<N>/` (the seed's
    `save_completions_steps`)."""

    def __init__(self, run_url: str, every: int):
        self.run_url = run_url
        self.every = every
        self.last: ScoreResult | None = None

    def remember(self, result: ScoreResult) -> None:
        self.last = result

    def on_step_end(self, args, state, control, **kwargs):
        if self.last is None or state.global_step % self.every or not state.is_world_process_zero:
            return
        batch, directory = self.last.batch, io.join(self.run_url, "completions", f"step_{state.global_step}")
        rows = []
        for i, wave in enumerate(batch.waves):
            if wave.size:
                write_wav(io.join(directory, f"{i:03d}.wav"), wave, batch.sample_rate)
            rows.append({
                "index": i, "target_text": batch.target_texts[i], "reference_key": batch.reference_keys[i],
                "truncated": batch.truncated[i], "seconds": wave.size / batch.sample_rate,
                "total": float(self.last.total[i]),
                **{f"reward/{k}": float(v[i]) for k, v in self.last.rewards.items()},
                **{f"measure/{k}": float(v[i]) for k, v in self.last.measures.items()},
            })
        io.write_text_atomic(io.join(directory, "completions.jsonl"), "".join(json.dumps(r) + "\n" for r in rows))
