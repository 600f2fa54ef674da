"""Rule rewards: cheap checks on the generated codes and the decoded duration, no model involved.

- duration: the completion should last about as long as the target text takes at the voice prompt's
  own speaking rate (characters per second of the reference), reward exp(-|ln(actual / expected)|).
- truncation: 0 when the completion hit the length limit without a speech-end token, else 1.
- repetition: share of distinct code n-grams; a model stuck in a loop (or in silence) repeats n-grams.
"""

from __future__ import annotations

import numpy as np

from trainer.scoring.asr import normalize_for_wer

# Speaking rate assumed when the reference is too short to measure (typical read English, chars/s).
DEFAULT_CHARS_PER_SECOND = 14.0
REPETITION_NGRAM = 6


def spoken_chars(text: str, language: str | None) -> int:
    """Characters that take time to say: normalised text without spaces."""
    return len(normalize_for_wer(text, language).replace(" ", ""))


def speaking_rate(text: str, seconds: float, language: str | None) -> float:
    """Characters per second; NaN for empty audio."""
    return spoken_chars(text, language) / seconds if seconds > 0 else float("nan")


def duration_reward(actual_s: float, target_text: str, reference_text: str, reference_s: float,
                    language: str | None) -> float:
    rate = speaking_rate(reference_text, reference_s, language)
    if not np.isfinite(rate) or rate <= 0:
        rate = DEFAULT_CHARS_PER_SECOND
    expected = max(spoken_chars(target_text, language), 1) / rate
    if actual_s <= 0:
        return 0.0
    return float(np.exp(-abs(np.log(actual_s / expected))))


def repetition_reward(codes: np.ndarray, n: int = REPETITION_NGRAM) -> float:
    codes = np.asarray(codes).reshape(-1)
    if codes.size < 2 * n:
        return 1.0
    grams = np.lib.stride_tricks.sliding_window_view(codes, n)
    distinct = np.unique(grams, axis=0).shape[0]
    return float(distinct / grams.shape[0])
