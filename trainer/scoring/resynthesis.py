"""Codec resynthesis scoring: encode -> decode held-out speech and judge the copy with the eval scorers.

A codec is only as good as what a listener hears back: pocketsphinx WER of the resynthesised clip
against its transcript, and speaker similarity of the copy to the original. `tts-train eval` runs this
when given a codec but no SpeechLM (`eval.codec_model_path` without `eval.model_path`), and
`codec-train` runs it every `codec.train.eval_steps` on `codec.train.eval_list`, so the curve of WER
against step is in metrics.jsonl. The held-out lists are read by `trainer.data.manifest.read_utterances`.
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np

from trainer.audio import read_audio
from trainer.scoring.scorers import Scorers, aggregate

Clip = tuple[np.ndarray, int]  # (samples, sample rate)


class Transcribed(Protocol):
    """Speech to resynthesise: its audio file, transcript and language (`trainer.data.manifest.Utterance`)."""

    @property
    def wav(self) -> str: ...
    @property
    def text(self) -> str: ...
    @property
    def language(self) -> str: ...


def resynthesize(codec: Any, utterances: list[Transcribed]) -> tuple[list[Clip], list[Clip]]:
    """(originals, copies): each original through `codec.encode` then `codec.decode`."""
    originals = []
    for u in utterances:
        audio = read_audio(u.wav)
        originals.append((audio.samples, audio.sample_rate))
    codes = codec.encode([w for w, _ in originals], [sr for _, sr in originals])
    copies = [(w, codec.output_sample_rate) for w in codec.decode(codes)]
    return originals, copies


def score_resynthesis(scorers: Scorers, utterances: list[Transcribed], originals: list[Clip],
                      copies: list[Clip]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Per-item rows and the aggregate (corpus WER, mean SIM of copy to original, mean DNSMOS)."""
    texts = [u.text for u in utterances]
    languages = [u.language for u in utterances]
    references = scorers.embed_references([u.wav for u in utterances], originals)
    rows = scorers.score(copies, references, texts, languages)
    return rows, aggregate(rows, texts, languages)
