"""Adapts the decode-once `RewardScorer` to TRL's reward-function protocol.

TRL calls each reward function in turn with the same completions
(`f(prompts, completions, completion_ids, **dataset_columns) -> list[float]`). The first call of a batch
decodes and scores everything once; the other functions read their column of that result.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import numpy as np

from trainer.model.vocab import AudioVocab
from trainer.rl.rewards.scorer import RewardScorer, ScoreResult

RewardCallable = Callable[..., list[float]]


def _fingerprint(completion_ids: list[list[int]], reference_keys: list[str]) -> str:
    digest = hashlib.sha1()
    for ids, key in zip(completion_ids, reference_keys, strict=True):
        digest.update(np.asarray(ids, dtype=np.int64).tobytes())
        digest.update(b"|" + key.encode() + b"\n")
    return digest.hexdigest()


class TrlRewards:
    def __init__(self, scorer: RewardScorer, vocab: AudioVocab,
                 on_scored: Callable[[ScoreResult], None] | None = None):
        self.scorer = scorer
        self.vocab = vocab
        self.on_scored = on_scored
        self._key: str | None = None
        self._result: ScoreResult | None = None
        self.seconds_total = 0.0  # time spent decoding and scoring, for the rollout timing

    def score(self, completion_ids: list[list[int]], prompt_codes: list[list[int]], reference_key: list[str],
              reference_text: list[str], target_text: list[str], language: list[str]) -> ScoreResult:
        key = _fingerprint(completion_ids, reference_key)
        if key != self._key or self._result is None:
            codes = [self.vocab.codes_from_ids(ids) for ids in completion_ids]
            truncated = [self.vocab.speech_end_id not in ids for ids in completion_ids]
            self._result = self.scorer.score(
                codes, [np.asarray(p, dtype=np.int64) for p in prompt_codes], target_text, reference_text,
                language, reference_keys=reference_key, truncated=truncated,
            )
            self._key = key
            self.seconds_total += sum(self._result.seconds.values())
            if self.on_scored is not None:
                self.on_scored(self._result)
        return self._result

    @property
    def last_result(self) -> ScoreResult | None:
        return self._result

    def functions(self) -> list[RewardCallable]:
        """One TRL reward function per scorer function, named like it (TRL logs rewards/<name>/mean)."""

        def make(name: str) -> RewardCallable:
            def reward(prompts, completions, completion_ids, prompt_codes, reference_key, reference_text,
                       target_text, language, **_) -> list[float]:
                result = self.score(completion_ids, prompt_codes, reference_key, reference_text, target_text,
                                    language)
                return result.rewards[name].tolist()

            reward.__name__ = name
            return reward

        return [make(name) for name in self.scorer.names]
