"""The audio-token vocabulary laid over a text tokenizer.

Layout of the token ids: [text vocabulary][prompt-format specials][<|s_0|> ... <|s_{K-1}|>][padding].
Audio token `<|s_N|>` has id `audio_offset + N` (contiguous, unlike the seed's sorted insertion), and
the format's speech-end token sits right before `<|s_0|>` so the "audio head" (codes + speech-end)
is one contiguous slice of the output matrix: `[audio_offset - 1, audio_offset + codebook_size)`.
The layout is recorded in `speechlm.json` beside the model so every reader agrees on it; `tts-train
import` (trainer/serve/reference_import.py) moves a seed model's rows into it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from trainer import io

if TYPE_CHECKING:
    import torch

    ArrayOrTensor = np.ndarray | torch.Tensor

SPEECHLM_FILE = "speechlm.json"
AUDIO_TOKEN = "<|s_{}|>"
FORMAT_VERSION = 1


def audio_token(code: int) -> str:
    return AUDIO_TOKEN.format(code)


@dataclass(frozen=True)
class AudioVocab:
    audio_offset: int
    codebook_size: int
    prompt_format: str
    # Special token string -> id, for the prompt format's tags (speech start/end, text start/end...).
    special_tokens: dict[str, int] = field(default_factory=dict)
    speech_start: str = ""
    speech_end: str = ""
    # Phone-aligned formats: the tag after each phone's codes (right before speech-end); "" otherwise.
    end_of_phone: str = ""
    pad_token_id: int = 0
    # Rows of the embedding matrix (>= audio_offset + codebook_size; padded to a multiple of 64).
    vocab_size: int = 0
    format_version: int = FORMAT_VERSION

    @property
    def speech_start_id(self) -> int:
        return self.special_tokens[self.speech_start]

    @property
    def speech_end_id(self) -> int:
        return self.special_tokens[self.speech_end]

    @property
    def end_of_phone_id(self) -> int:
        return self.special_tokens[self.end_of_phone]

    @property
    def head_specials(self) -> list[int]:
        """The non-audio ids a completion may hold: [end-of-phone,] speech-end."""
        return [self.end_of_phone_id, self.speech_end_id] if self.end_of_phone else [self.speech_end_id]

    @property
    def audio_end(self) -> int:
        """One past the last audio id."""
        return self.audio_offset + self.codebook_size

    def completion_ids(self) -> list[int]:
        """The ids a generated completion may hold: audio tokens, end-of-phone (phone formats) and
        speech-end (sampling constraints)."""
        return [*range(self.audio_offset, self.audio_end), *self.head_specials]

    @property
    def audio_head_contiguous(self) -> bool:
        """Whether the head specials sit right before `<|s_0|>` (rows [head_start, audio_end))."""
        specials = self.head_specials
        return specials == list(range(self.audio_offset - len(specials), self.audio_offset))

    @property
    def head_start(self) -> int:
        return self.audio_offset - len(self.head_specials)

    def code_ids(self, codes: np.ndarray | list[int]) -> np.ndarray:
        codes = np.asarray(codes, dtype=np.int64)
        if codes.size and (codes.min() < 0 or codes.max() >= self.codebook_size):
            raise ValueError(
                f"audio code out of range [0, {self.codebook_size}): min {codes.min()}, max {codes.max()}"
            )
        return codes + self.audio_offset

    def is_audio(self, ids: ArrayOrTensor) -> ArrayOrTensor:
        """Mask of the audio ids; a numpy array for an array, a tensor (same device) for a tensor."""
        return (ids >= self.audio_offset) & (ids < self.audio_end)

    def codes_from_ids(self, ids: np.ndarray | list[int]) -> np.ndarray:
        """Audio codes of a generated id sequence: stops at speech-end, skips non-audio ids."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        end = np.flatnonzero(ids == self.speech_end_id)
        if end.size:
            ids = ids[: end[0]]
        return (ids[self.is_audio(ids)] - self.audio_offset).astype(np.int64)

    def to_json(self) -> dict:
        return asdict(self)

    def save(self, directory: str | Path) -> None:
        Path(directory, SPEECHLM_FILE).write_text(json.dumps(self.to_json(), indent=2, sort_keys=True) + "\n")

    @classmethod
    def from_json(cls, data: dict) -> AudioVocab:
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)

    @classmethod
    def load(cls, directory: str | Path) -> AudioVocab:
        """Read `speechlm.json` from a local directory or any fsspec URL."""
        return cls.from_json(io.read_json(io.join(str(directory), SPEECHLM_FILE)))
