"""Codec resynthesis scoring: encode -> decode held-out speech and judge the copy with the eval scorers.

A codec is only as good as what a listener hears back: pocketsphinx WER of the resynthesised clip
against its transcript, and speaker similarity of the copy to the original. `tts-train eval` runs this
when given a codec but no SpeechLM (`eval.codec_model_path` without `eval.model_path`), and
`codec-train` runs it every `codec.train.eval_steps` on `codec.train.eval_list`, so the curve of WER
against step is in metrics.jsonl.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from trainer import io
from trainer.audio import read_audio
from trainer.data.manifest import read_json_objects, resolve_wav_path
from trainer.errors import ConfigError


@dataclass(frozen=True)
class Utterance:
    id: str
    wav: str
    text: str
    language: str


def read_utterances(url: str, max_items: int | None = None) -> list[Utterance]:
    """Speech with transcripts from a seed-format manifest (`wav_path`, `transcript`) or an eval test
    list (`target_wav`, `target_text`); relative paths are taken from the list's directory."""
    if not io.exists(url):
        raise ConfigError(f"{url}: resynthesis list not found")
    found = []
    for line_no, record in read_json_objects(url):
        wav = record.get("wav_path") or record.get("target_wav")
        text = record.get("transcript") or record.get("target_text")
        if not wav or not text:
            raise ConfigError(f"{url}:{line_no}: needs wav_path + transcript or target_wav + target_text")
        found.append(Utterance(str(record.get("id", f"item_{line_no:04d}")), resolve_wav_path(url, wav), text,
                               record.get("language", "en")))
        if max_items and len(found) >= max_items:
            break
    if not found:
        raise ConfigError(f"{url}: no utterances")
    return found


Clip = tuple[np.ndarray, int]  # (samples, sample rate)


def resynthesize(codec: Any, utterances: list[Utterance]) -> tuple[list[Clip], list[Clip]]:
    """(originals, copies): each original through `codec.encode` then `codec.decode`."""
    originals = []
    for u in utterances:
        audio = read_audio(u.wav)
        originals.append((audio.samples, audio.sample_rate))
    codes = codec.encode([w for w, _ in originals], [sr for _, sr in originals])
    copies = [(w, codec.output_sample_rate) for w in codec.decode(codes)]
    return originals, copies


def score_resynthesis(scorers: Any, utterances: list[Utterance], originals: list[Clip],
                      copies: list[Clip]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Per-item rows and the aggregate (corpus WER, mean SIM of copy to original, mean DNSMOS)."""
    from trainer.eval.harness import aggregate

    texts = [u.text for u in utterances]
    languages = [u.language for u in utterances]
    references = scorers.embed_references([u.wav for u in utterances], originals)
    rows = scorers.score(copies, references, texts, languages)
    return rows, aggregate(rows, texts, languages)
