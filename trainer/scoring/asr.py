"""Speech recognition and word/character error rates, shared by the WER reward and the eval harness.

Backends (local files only, never a hub download):
- `pocketsphinx`: offline English ASR whose acoustic model, language model and dictionary ship in the
  PyPI wheel. Far less accurate than Whisper, but deterministic (per clip) and tiny: the default for tests/demos.
- `whisper`: a local Hugging Face Whisper directory (e.g. whisper-large-v3 pre-staged on a volume),
  batched `generate` over padded log-mel features.

Error rates follow the seed: lower-cased, punctuation stripped, whitespace collapsed (jiwer transforms);
CER instead of WER for languages written without spaces between words (zh, ja, ko). Both sides are first
put in the spoken form the TTS model reads (numbers as words), so a correct "three" for "3" is no error.
"""

from __future__ import annotations

import math
from typing import Any, Protocol

import jiwer
import numpy as np

from trainer.audio import resample
from trainer.errors import ConfigError
from trainer.model.text_normalization import normalize_text
from trainer.scoring.model_files import local_model_dir

ASR_SAMPLE_RATE = 16000
CER_LANGUAGES = frozenset({"zh", "ja", "ko", "yue"})
# Error rate given to a transcript that cannot be scored (no audio); exp(-2.5 * 5) ~ 4e-6 reward.
MAX_ERROR_RATE = 5.0

_WORD_NORMALIZER = jiwer.Compose(
    [
        jiwer.ToLowerCase(),
        jiwer.RemovePunctuation(),
        jiwer.RemoveMultipleSpaces(),
        jiwer.Strip(),
        jiwer.ReduceToListOfListOfWords(),
    ]
)
_CHAR_NORMALIZER = jiwer.Compose(
    [
        jiwer.ToLowerCase(),
        jiwer.RemovePunctuation(),
        jiwer.RemoveWhiteSpace(replace_by_space=False),
        jiwer.Strip(),
        jiwer.ReduceToListOfListOfChars(),
    ]
)


def uses_cer(language: str | None) -> bool:
    return (language or "").lower().split("-")[0] in CER_LANGUAGES


def normalize_for_wer(text: str, language: str | None = "en") -> str:
    """The form both sides of an error rate are compared in: the spoken form the TTS model was given
    (`normalize_text` of that language, so "3" and "three" match), lower-cased, without punctuation."""
    text = normalize_text(text, language)
    if uses_cer(language):
        return "".join(_CHAR_NORMALIZER(text)[0]) if text.strip() else ""
    return " ".join(_WORD_NORMALIZER(text)[0]) if text.strip() else ""


def error_rate(hypothesis: str, reference: str, language: str | None = "en") -> float:
    """WER (or CER for zh/ja/ko) of one transcript, clipped to MAX_ERROR_RATE. An empty hypothesis
    scores 1.0 (every word deleted); an empty reference is a caller error."""
    ref, hyp = normalize_for_wer(reference, language), normalize_for_wer(hypothesis, language)
    if not ref:
        raise ValueError(f"reference text has no words after normalisation: {reference!r}")
    if not hyp:
        return 1.0
    transform = _CHAR_NORMALIZER if uses_cer(language) else _WORD_NORMALIZER
    measure = jiwer.cer if uses_cer(language) else jiwer.wer
    rate = measure(ref, hyp, reference_transform=transform, hypothesis_transform=transform)
    return float(min(rate, MAX_ERROR_RATE))


def corpus_error_rate(hypotheses: list[str], references: list[str], language: str | None = "en") -> float:
    """Corpus-level WER/CER: total edits over total reference words (what Seed-TTS-eval reports)."""
    normalized = [(normalize_for_wer(h, language), normalize_for_wer(r, language))
                  for h, r in zip(hypotheses, references, strict=True)]
    pairs = [(h, r) for h, r in normalized if r]
    if not pairs:
        raise ValueError("no reference text left after normalisation")
    transform = _CHAR_NORMALIZER if uses_cer(language) else _WORD_NORMALIZER
    hyps = [h or "<empty>" for h, _ in pairs]
    refs = [r for _, r in pairs]
    measure = jiwer.cer if uses_cer(language) else jiwer.wer
    return float(measure(refs, hyps, reference_transform=transform, hypothesis_transform=transform))


def wer_reward(rate: float) -> float:
    """The seed's mapping of an error rate to a reward in (0, 1]."""
    return math.exp(-2.5 * rate)


class Transcriber(Protocol):
    def transcribe(self, waves: list[np.ndarray], sample_rate: int, languages: list[str] | None = None
                   ) -> list[str]: ...


class PocketsphinxTranscriber:
    """CMU pocketsphinx with the US-English model shipped in its wheel.

    One decoder whose feature extraction is re-initialised before every clip. A decoder reused as it is
    carries adaptive feature-extraction state (likely its noise removal, on by default) from clip to clip,
    so a clip's transcript depended on which clips came before it (measured: 2 of 40 held-out transcripts
    changed when the list was read in reverse), which made eval rows and a GRPO group's rewards depend on
    their neighbours; resetting the cepstral mean (`set_cmn`) did not remove it. `reinit_feat` gives the
    transcripts of a fresh decoder per clip (80 of 80 model clips, either order) without reloading the
    acoustic model, language model and dictionary for each clip (bench/asr.py)."""

    def __init__(self) -> None:
        # lazy: each ASR backend loads only its own library
        from pocketsphinx import Decoder

        self._decoder = Decoder(samprate=ASR_SAMPLE_RATE, loglevel="FATAL")

    def transcribe(self, waves: list[np.ndarray], sample_rate: int, languages: list[str] | None = None
                   ) -> list[str]:
        texts = []
        for wave in waves:
            pcm = np.clip(resample(wave, sample_rate, ASR_SAMPLE_RATE), -1.0, 1.0)
            if pcm.size == 0:
                texts.append("")
                continue
            self._decoder.reinit_feat()
            texts.append(pocketsphinx_utterance(self._decoder, pcm))
        return texts


def pocketsphinx_utterance(decoder: Any, pcm: np.ndarray) -> str:
    """One utterance of float PCM at ASR_SAMPLE_RATE through a pocketsphinx decoder: its best hypothesis."""
    decoder.start_utt()
    decoder.process_raw((pcm * 32767).astype(np.int16).tobytes(), full_utt=True)
    decoder.end_utt()
    hyp = decoder.hyp()
    return hyp.hypstr if hyp is not None else ""


class WhisperTranscriber:
    """A local Hugging Face Whisper checkpoint; batches of clips go through one `generate` call per
    language (Whisper's language token is per batch)."""

    def __init__(self, model_path: str, device: str = "cpu", batch_size: int = 16) -> None:
        # lazy: the whisper backend only (torch + transformers)
        import torch
        from transformers import WhisperForConditionalGeneration, WhisperProcessor

        self._torch = torch
        self.device = device
        self.batch_size = batch_size
        self.processor = WhisperProcessor.from_pretrained(model_path)
        dtype = torch.float16 if device.startswith("cuda") else torch.float32
        self.model = WhisperForConditionalGeneration.from_pretrained(model_path, torch_dtype=dtype).to(device)
        self.model.eval()
        self._multilingual = bool(getattr(self.model.generation_config, "is_multilingual", False))

    def transcribe(self, waves: list[np.ndarray], sample_rate: int, languages: list[str] | None = None
                   ) -> list[str]:
        languages = languages or ["en"] * len(waves)
        texts = [""] * len(waves)
        by_language: dict[str, list[int]] = {}
        for i, (wave, language) in enumerate(zip(waves, languages, strict=True)):
            if wave.size:
                by_language.setdefault(language, []).append(i)
        for language, indices in by_language.items():
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start : start + self.batch_size]
                audio = [resample(waves[i], sample_rate, ASR_SAMPLE_RATE) for i in chunk]
                for i, text in zip(chunk, self._generate(audio, language), strict=True):
                    texts[i] = text.strip()
        return texts

    def _generate(self, audio: list[np.ndarray], language: str) -> list[str]:
        features = self.processor.feature_extractor(
            audio, sampling_rate=ASR_SAMPLE_RATE, return_tensors="pt"
        ).input_features.to(self.device, self.model.dtype)
        kwargs = {"language": language, "task": "transcribe"} if self._multilingual else {}
        with self._torch.inference_mode():
            ids = self.model.generate(features, **kwargs)
        return self.processor.batch_decode(ids, skip_special_tokens=True)


def load_transcriber(backend: str, model_path: str | None = None, device: str = "cpu") -> Transcriber:
    if backend == "pocketsphinx":
        return PocketsphinxTranscriber()
    if backend == "whisper":
        if not model_path:
            raise ConfigError("asr backend 'whisper' needs a local model directory (asr_model_path)")
        return WhisperTranscriber(local_model_dir(model_path, "asr_model_path"), device=device)
    raise ConfigError(f"unknown asr backend {backend!r}: expected 'pocketsphinx' or 'whisper'")
