"""Decode every completion once, then let each reward function score the whole batch.

The seed decoded each completion inside every reward function (three decodes per completion with
WER+SIM+DNSMOS) and scored one clip at a time; here one batched `Codec.decode` (prompt codes + generated
codes decoded together, prompt part trimmed) feeds all functions, and each scores in batches.
`bench/rewards.py` measures the difference.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np

from trainer.audio import resample
from trainer.rl.rewards.batch import RewardBatch
from trainer.rl.rewards.functions import RewardFunc

log = logging.getLogger(__name__)
ANALYSIS_SAMPLE_RATE = 16000
LOWEST_REWARD = 0.0


@dataclass
class ScoreResult:
    rewards: dict[str, np.ndarray]  # reward function name -> reward per completion, in [0, 1]
    measures: dict[str, np.ndarray]  # reward function name -> raw metric (WER, cosine, OVRL...)
    total: np.ndarray  # weighted sum
    batch: RewardBatch
    seconds: dict[str, float] = field(default_factory=dict)  # "decode" and per function


class RewardScorer:
    def __init__(self, codec, funcs: list[RewardFunc], weights: list[float] | None = None,
                 reference_cache_size: int = 4096):
        self.codec = codec
        self.funcs = funcs
        self.weights = np.asarray(weights if weights is not None else [1.0] * len(funcs), dtype=np.float64)
        if len(self.weights) != len(funcs):
            raise ValueError(f"{len(self.weights)} weights for {len(funcs)} reward functions")
        self.reference_cache_size = reference_cache_size
        self._reference_audio: dict[str, np.ndarray] = {}

    @property
    def names(self) -> list[str]:
        return [f.name for f in self.funcs]

    def decode(self, codes: list[np.ndarray], prompt_codes: list[np.ndarray] | None) -> list[np.ndarray]:
        """16 kHz waveforms of `codes` (each decoded after its prompt); an empty array where decoding
        failed or there were no codes, so one bad completion never sinks the batch."""
        out = [np.zeros(0, dtype=np.float32) for _ in codes]
        todo = [i for i, c in enumerate(codes) if len(c)]
        if not todo:
            return out
        try:
            waves = self.codec.decode(
                [np.asarray(codes[i]) for i in todo],
                prompt_codes=None if prompt_codes is None else [np.asarray(prompt_codes[i]) for i in todo],
            )
        except Exception as err:  # retry one by one to isolate the failing completion
            log.warning("batched decode failed (%s); decoding one by one", err)
            waves = []
            for i in todo:
                try:
                    prompt = None if prompt_codes is None else [np.asarray(prompt_codes[i])]
                    waves.append(self.codec.decode([np.asarray(codes[i])], prompt_codes=prompt)[0])
                except Exception as item_err:
                    log.warning("decode of completion %d failed: %s", i, item_err)
                    waves.append(np.zeros(0, dtype=np.float32))
        for i, wave in zip(todo, waves, strict=True):
            out[i] = resample(np.asarray(wave, dtype=np.float32), self.codec.output_sample_rate,
                              ANALYSIS_SAMPLE_RATE)
        return out

    def _references(self, keys: list[str], prompt_codes: list[np.ndarray]) -> list[np.ndarray]:
        """Voice-prompt audio decoded from its codes, once per distinct prompt. Decoded (not read from the
        original file) so completion and reference carry the same codec colouring and SIM measures the
        language model's voice cloning, not codec fidelity."""
        missing = {k: i for i, k in reversed(list(enumerate(keys))) if k not in self._reference_audio}
        if missing:
            waves = self.decode([prompt_codes[i] for i in missing.values()], None)
            self._reference_audio.update(zip(missing, waves, strict=True))
        refs = [self._reference_audio[k] for k in keys]
        while len(self._reference_audio) > self.reference_cache_size:
            self._reference_audio.pop(next(iter(self._reference_audio)))
        return refs

    def score(
        self,
        codes: list[np.ndarray],
        prompt_codes: list[np.ndarray],
        target_texts: list[str],
        reference_texts: list[str],
        languages: list[str],
        reference_keys: list[str] | None = None,
        truncated: list[bool] | None = None,
    ) -> ScoreResult:
        seconds: dict[str, float] = {}
        start = time.perf_counter()
        waves = self.decode(codes, prompt_codes)
        keys = reference_keys or [",".join(map(str, np.asarray(p)[:64])) + f"/{len(p)}" for p in prompt_codes]
        needs_reference = any(f.needs_reference_audio for f in self.funcs)
        references = self._references(keys, prompt_codes) if needs_reference else [w[:0] for w in waves]
        seconds["decode"] = time.perf_counter() - start
        batch = RewardBatch(
            waves=waves, references=references, reference_keys=keys, reference_texts=reference_texts,
            target_texts=target_texts, languages=languages, codes=[np.asarray(c) for c in codes],
            truncated=list(truncated) if truncated is not None else [False] * len(codes),
            sample_rate=ANALYSIS_SAMPLE_RATE,
        )
        valid = batch.valid
        rewards: dict[str, np.ndarray] = {}
        measures: dict[str, np.ndarray] = {}
        for func in self.funcs:
            start = time.perf_counter()
            measured = self._measure(func, batch)
            reward = np.asarray(func.reward(measured), dtype=np.float64)
            reward = np.where(valid & np.isfinite(reward), reward, LOWEST_REWARD)
            measures[func.name] = measured
            rewards[func.name] = reward
            seconds[func.name] = time.perf_counter() - start
        total = sum((w * rewards[f.name] for w, f in zip(self.weights, self.funcs, strict=True)),
                    start=np.zeros(len(codes)))
        return ScoreResult(rewards=rewards, measures=measures, total=total, batch=batch, seconds=seconds)

    @staticmethod
    def _measure(func: RewardFunc, batch: RewardBatch) -> np.ndarray:
        """A scorer that fails on the batch is retried clip by clip; a clip it still fails on is NaN
        (lowest reward). A training run never dies on one odd waveform."""
        try:
            return np.asarray(func.measure(batch), dtype=np.float64)
        except Exception as err:
            log.warning("%s failed on the batch (%s); scoring one by one", func.name, err)
        out = np.full(len(batch), np.nan)
        for i in range(len(batch)):
            single = RewardBatch(
                waves=[batch.waves[i]], references=[batch.references[i]],
                reference_keys=[batch.reference_keys[i]], reference_texts=[batch.reference_texts[i]],
                target_texts=[batch.target_texts[i]], languages=[batch.languages[i]], codes=[batch.codes[i]],
                truncated=[batch.truncated[i]], sample_rate=batch.sample_rate,
            )
            try:
                out[i] = float(func.measure(single)[0])
            except Exception as err:
                log.warning("%s failed on completion %d: %s", func.name, i, err)
        return out
