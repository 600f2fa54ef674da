"""What every reward function sees: one batch of decoded completions plus the context they are judged in."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class RewardBatch:
    """Completions of one scoring call. `waves` and `references` are 16 kHz mono float32 (the rate every
    scorer model wants: resampled once, shared by all reward functions)."""

    waves: list[np.ndarray]  # decoded completions (prompt part trimmed); empty where decoding failed
    references: list[np.ndarray]  # the voice prompt's audio, for speaker similarity
    reference_keys: list[str]  # identifies a reference across calls (caches its embedding)
    reference_texts: list[str]  # transcript of the voice prompt
    target_texts: list[str]  # the text the completion should speak (WER ground truth)
    languages: list[str]
    codes: list[np.ndarray]  # generated audio codes
    truncated: list[bool]  # hit the completion-length limit without a speech-end token
    sample_rate: int = 16000

    def __len__(self) -> int:
        return len(self.waves)

    @property
    def valid(self) -> np.ndarray:
        """Completions with audio to judge; the others get the lowest reward."""
        return np.array([w.size > 0 and bool(np.isfinite(w).all()) for w in self.waves], dtype=bool)
