"""Reward functions by name. Each maps a `RewardBatch` to one value per completion in [0, 1]; NaN
means "could not score" and becomes the lowest reward in the scorer.

Model-based rewards split into `measure` (the raw metric: WER, cosine, OVRL, which the guard rails and
the eval harness log) and `reward` (the seed's mapping of that metric into [0, 1]).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from trainer.errors import ConfigError
from trainer.rl.rewards import rules
from trainer.rl.rewards.batch import RewardBatch
from trainer.scoring import asr, quality, speaker


class RewardFunc(ABC):
    name: str
    needs_reference_audio = False

    @abstractmethod
    def measure(self, batch: RewardBatch) -> np.ndarray:
        """The raw metric per completion (NaN where it cannot be computed)."""

    def reward(self, measured: np.ndarray) -> np.ndarray:
        return measured

    def __call__(self, batch: RewardBatch) -> np.ndarray:
        return self.reward(self.measure(batch))


class WERRewardFunc(RewardFunc):
    """exp(-2.5 * WER) of an ASR transcript against the target text (CER for zh/ja/ko). Nothing recognised
    scores MAX_ERROR_RATE, as in the seed (its empty-transcript WER 5.0), not the 1.0 of all words deleted:
    a silent or garbled completion must not earn exp(-2.5) for saying nothing."""

    name = "WERRewardFunc"

    def __init__(self, transcriber: asr.Transcriber):
        self.transcriber = transcriber
        self.last_transcripts: list[str] = []

    def measure(self, batch: RewardBatch) -> np.ndarray:
        valid = batch.valid
        index = np.flatnonzero(valid)
        texts = self.transcriber.transcribe(
            [batch.waves[i] for i in index], batch.sample_rate, [batch.languages[i] for i in index]
        )
        self.last_transcripts = [""] * len(batch)
        rates = np.full(len(batch), np.nan)
        for i, text in zip(index, texts, strict=True):
            self.last_transcripts[i] = text
            rates[i] = (asr.error_rate(text, batch.target_texts[i], batch.languages[i]) if text.strip()
                        else asr.MAX_ERROR_RATE)
        return rates

    def reward(self, measured: np.ndarray) -> np.ndarray:
        return np.exp(-2.5 * measured)


class SimilarityRewardFunc(RewardFunc):
    """(cos + 1) / 2 of speaker embeddings, voice prompt vs completion (reference embeddings cached)."""

    name = "SimilarityRewardFunc"
    needs_reference_audio = True

    def __init__(self, encoder: speaker.SpeakerEncoder, cache_size: int = 4096):
        self.encoder = encoder
        self.references = speaker.EmbeddingCache(encoder, cache_size)

    def measure(self, batch: RewardBatch) -> np.ndarray:
        valid = batch.valid
        completions = self.encoder.embed([w if ok else w[:0] for w, ok in zip(batch.waves, valid, strict=True)],
                                         batch.sample_rate)
        references = self.references.embed(batch.reference_keys, batch.references, batch.sample_rate)
        return speaker.cosine_similarity(references, completions)

    def reward(self, measured: np.ndarray) -> np.ndarray:
        return speaker.similarity_reward(measured)


class DNSMOSRewardFunc(RewardFunc):
    """(OVRL - 1) / 4 of DNSMOS, the no-reference quality of the completion."""

    name = "DNSMOSRewardFunc"

    def __init__(self, dnsmos: quality.DNSMOS):
        self.dnsmos = dnsmos

    def measure(self, batch: RewardBatch) -> np.ndarray:
        valid = batch.valid
        scores = self.dnsmos.score([w if ok else w[:0] for w, ok in zip(batch.waves, valid, strict=True)],
                                   batch.sample_rate)
        return np.array([s["ovrl"] for s in scores], dtype=np.float64)

    def reward(self, measured: np.ndarray) -> np.ndarray:
        return quality.dnsmos_reward(measured)


class DurationRewardFunc(RewardFunc):
    """Duration against the voice prompt's speaking rate (see rules.duration_reward)."""

    name = "DurationRewardFunc"
    needs_reference_audio = True

    def measure(self, batch: RewardBatch) -> np.ndarray:
        return np.array(
            [
                rules.duration_reward(
                    w.size / batch.sample_rate, target, ref_text, ref.size / batch.sample_rate, language
                )
                if ok
                else np.nan
                for w, ok, target, ref_text, ref, language in zip(
                    batch.waves, batch.valid, batch.target_texts, batch.reference_texts, batch.references,
                    batch.languages, strict=True,
                )
            ]
        )


class TruncationRewardFunc(RewardFunc):
    """0 for a completion cut at the length limit, 1 for one that ended with speech-end."""

    name = "TruncationRewardFunc"

    def measure(self, batch: RewardBatch) -> np.ndarray:
        return np.array([0.0 if t else 1.0 for t in batch.truncated])


class RepetitionRewardFunc(RewardFunc):
    """Share of distinct code n-grams (loops and long silences score low)."""

    name = "RepetitionRewardFunc"

    def measure(self, batch: RewardBatch) -> np.ndarray:
        return np.array([rules.repetition_reward(c) for c in batch.codes])


@dataclass(frozen=True)
class ScorerModels:
    """Which scorer models the model-based rewards load (local paths only)."""

    asr_backend: str = "pocketsphinx"
    asr_model_path: str | None = None
    speaker_backend: str = "resemblyzer"
    speaker_model_path: str | None = None
    dnsmos_personalized: bool = True  # the seed's DNSMOS reward (torchmetrics, personalized=True)
    device: str = "cpu"


REWARD_FUNCS: dict[str, Callable[[ScorerModels], RewardFunc]] = {
    "WERRewardFunc": lambda m: WERRewardFunc(asr.load_transcriber(m.asr_backend, m.asr_model_path, m.device)),
    "SimilarityRewardFunc": lambda m: SimilarityRewardFunc(
        speaker.load_speaker_encoder(m.speaker_backend, m.speaker_model_path, m.device)
    ),
    "DNSMOSRewardFunc": lambda m: DNSMOSRewardFunc(quality.DNSMOS(personalized=m.dnsmos_personalized)),
    "DurationRewardFunc": lambda m: DurationRewardFunc(),
    "TruncationRewardFunc": lambda m: TruncationRewardFunc(),
    "RepetitionRewardFunc": lambda m: RepetitionRewardFunc(),
}


def build_reward_funcs(names: list[str], models: ScorerModels) -> list[RewardFunc]:
    unknown = [n for n in names if n not in REWARD_FUNCS]
    if unknown:
        raise ConfigError(f"unknown reward function(s) {unknown}; known: {sorted(REWARD_FUNCS)}")
    if len(set(names)) != len(names):
        raise ConfigError(f"reward_funcs lists a function twice: {names}")
    return [REWARD_FUNCS[name](models) for name in names]
