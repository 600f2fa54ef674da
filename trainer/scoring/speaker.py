"""Speaker embeddings and similarity, shared by the SIM reward and the eval harness.

Backends (local files only):
- `resemblyzer`: the GE2E d-vector encoder whose 17 MB weights ship in the PyPI wheel (offline; its
  similarities are not comparable to published WavLM SIM numbers, but rank voices consistently).
- `wavlm-ecapa`: a local Hugging Face `WavLMForXVector` directory (e.g. wavlm-base-plus-sv), the
  transformers-native stand-in for the WavLM + ECAPA-TDNN verifier used by Seed-TTS-eval and the seed.

`embed` returns L2-normalised rows; an empty clip gets a NaN row, so its similarity is NaN and the
reward maps it to the lowest value instead of crashing.
"""

from __future__ import annotations

import warnings
from collections import OrderedDict
from typing import Protocol

import numpy as np

from trainer.audio import resample
from trainer.errors import ConfigError
from trainer.scoring.model_files import local_model_dir

SPEAKER_SAMPLE_RATE = 16000


class SpeakerEncoder(Protocol):
    def embed(self, waves: list[np.ndarray], sample_rate: int) -> np.ndarray: ...


def cosine_similarity(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine of two [N, D] embedding matrices (NaN where either row is NaN or zero)."""
    a = np.atleast_2d(a).astype(np.float64)
    b = np.atleast_2d(b).astype(np.float64)
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(norms > 0, (a * b).sum(axis=1) / norms, np.nan)


def similarity_reward(cosine: np.ndarray) -> np.ndarray:
    """The seed's mapping (cos + 1) / 2 into [0, 1]."""
    return (np.asarray(cosine) + 1.0) / 2.0


def _l2_normalise(rows: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(norms > 0, rows / norms, np.nan)


class ResemblyzerEncoder:
    """Resemblyzer's utterance embedding (mean of 1.6 s partial windows), batched: the partial windows
    of every clip go through the LSTM in one forward pass instead of one pass per clip."""

    def __init__(self, device: str = "cpu") -> None:
        import torch  # lazy: scoring imports no torch until a backend is built

        with warnings.catch_warnings():  # resemblyzer imports a deprecated scipy namespace
            warnings.simplefilter("ignore", DeprecationWarning)
            # lazy: each speaker backend loads only its own library
            from resemblyzer import VoiceEncoder, audio

        self._torch = torch
        self._audio = audio
        self.model = VoiceEncoder(device=device, verbose=False)
        self.device = device

    def _preprocess(self, wave: np.ndarray, sample_rate: int) -> np.ndarray:
        wave = resample(wave, sample_rate, SPEAKER_SAMPLE_RATE)
        if not np.any(wave):  # digital silence: no level to normalise (log of 0)
            return wave
        wave = self._audio.normalize_volume(wave, self._audio.audio_norm_target_dBFS, increase_only=True)
        trimmed = self._audio.trim_long_silences(wave)
        # The VAD finds no voice in some synthetic or noisy clips: keep the whole clip then.
        return trimmed if trimmed.size >= SPEAKER_SAMPLE_RATE // 10 else wave

    def embed(self, waves: list[np.ndarray], sample_rate: int) -> np.ndarray:
        windows: list[np.ndarray] = []
        owners: list[int] = []
        for i, wave in enumerate(waves):
            if wave.size == 0:
                continue
            wave = self._preprocess(wave, sample_rate)
            wav_slices, mel_slices = self.model.compute_partial_slices(len(wave), rate=1.3, min_coverage=0.75)
            wave = np.pad(wave, (0, max(0, wav_slices[-1].stop - len(wave))))
            mel = self._audio.wav_to_mel_spectrogram(wave)
            windows.extend(mel[s] for s in mel_slices)
            owners.extend([i] * len(mel_slices))
        out = np.full((len(waves), 256), np.nan, dtype=np.float32)
        if not windows:
            return out
        with self._torch.inference_mode():
            partial = self.model(self._torch.from_numpy(np.stack(windows)).to(self.device)).cpu().numpy()
        owners_arr = np.asarray(owners)
        for i in np.unique(owners_arr):
            out[i] = partial[owners_arr == i].mean(axis=0)
        return _l2_normalise(out)


class WavLMEncoder:
    """x-vectors from a local `WavLMForXVector` checkpoint; clips are padded into batches."""

    def __init__(self, model_path: str, device: str = "cpu", batch_size: int = 16) -> None:
        # lazy: the wavlm-ecapa backend only (torch + transformers)
        import torch
        from transformers import AutoFeatureExtractor, WavLMForXVector

        self._torch = torch
        self.device = device
        self.batch_size = batch_size
        self.feature_extractor = AutoFeatureExtractor.from_pretrained(model_path)
        self.model = WavLMForXVector.from_pretrained(model_path).to(device).eval()

    def embed(self, waves: list[np.ndarray], sample_rate: int) -> np.ndarray:
        dim = self.model.config.xvector_output_dim
        out = np.full((len(waves), dim), np.nan, dtype=np.float32)
        present = [i for i, w in enumerate(waves) if w.size]
        for start in range(0, len(present), self.batch_size):
            chunk = present[start : start + self.batch_size]
            audio = [resample(waves[i], sample_rate, SPEAKER_SAMPLE_RATE) for i in chunk]
            inputs = self.feature_extractor(
                audio, sampling_rate=SPEAKER_SAMPLE_RATE, padding=True, return_attention_mask=True,
                return_tensors="pt",
            ).to(self.device)
            with self._torch.inference_mode():
                out[chunk] = self.model(**inputs).embeddings.float().cpu().numpy()
        return _l2_normalise(out)


class EmbeddingCache:
    """Embeddings of reference clips by key, least recently used dropped beyond `size`: a voice prompt
    recurs (every GRPO prompt is shared by `num_generations` completions and comes back across steps;
    eval items share prompt wavs), so each is embedded once."""

    def __init__(self, encoder: SpeakerEncoder, size: int = 4096):
        self.encoder = encoder
        self.size = size
        self._rows: OrderedDict[str, np.ndarray] = OrderedDict()

    def embed(self, keys: list[str], waves: list[np.ndarray], sample_rate: int) -> np.ndarray:
        """One row per key; `waves[i]` is the clip of `keys[i]`, embedded (batched) only when not cached."""
        first = {k: i for i, k in reversed(list(enumerate(keys))) if k not in self._rows}
        if first:
            rows = self.encoder.embed([waves[i] for i in first.values()], sample_rate)
            self._rows.update(zip(first, rows, strict=True))
        out = np.stack([self._rows[k] for k in keys])
        for key in keys:
            self._rows.move_to_end(key)
        while len(self._rows) > self.size:
            self._rows.popitem(last=False)
        return out


def load_speaker_encoder(backend: str, model_path: str | None = None, device: str = "cpu") -> SpeakerEncoder:
    if backend == "resemblyzer":
        return ResemblyzerEncoder(device=device)
    if backend == "wavlm-ecapa":
        if not model_path:
            raise ConfigError("speaker backend 'wavlm-ecapa' needs a local model directory (speaker_model_path)")
        return WavLMEncoder(local_model_dir(model_path, "speaker_model_path"), device=device)
    raise ConfigError(f"unknown speaker backend {backend!r}: expected 'resemblyzer' or 'wavlm-ecapa'")
