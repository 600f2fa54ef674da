"""Audio file io and resampling (soundfile + soxr: no torchaudio, which is CUDA-linked on PyPI)."""

from __future__ import annotations

import io as _stdio
from dataclasses import dataclass

import numpy as np
import soundfile as sf
import soxr

from trainer import io


class AudioError(ValueError):
    """The file is missing, unreadable, corrupt or empty. `reason` is a short machine-readable tag."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


@dataclass(frozen=True)
class Audio:
    samples: np.ndarray  # float32, mono, [-1, 1]
    sample_rate: int
    channels: int  # channels in the file before the downmix

    @property
    def duration(self) -> float:
        return len(self.samples) / self.sample_rate


def read_audio(url: str) -> Audio:
    """Read any soundfile-supported file (WAV, FLAC, OGG...) from a local path or fsspec URL, mono."""
    try:
        if io.is_local(url):
            data, sr = sf.read(io.local_path(url), dtype="float32", always_2d=True)
        else:
            data, sr = sf.read(_stdio.BytesIO(io.read_bytes(url)), dtype="float32", always_2d=True)
    except FileNotFoundError as err:
        raise AudioError("missing_file", f"{url} does not exist") from err
    except (sf.LibsndfileError, RuntimeError, OSError) as err:
        if not io.exists(url):
            raise AudioError("missing_file", f"{url} does not exist") from err
        raise AudioError("unreadable_audio", f"{url}: {err}") from err
    if data.shape[0] == 0:
        raise AudioError("empty_audio", f"{url} has no samples")
    channels = data.shape[1]
    mono = data.mean(axis=1) if channels > 1 else data[:, 0]
    if not np.isfinite(mono).all():
        raise AudioError("unreadable_audio", f"{url} contains NaN or inf samples")
    return Audio(np.ascontiguousarray(mono, dtype=np.float32), int(sr), channels)


def resample(samples: np.ndarray, from_rate: int, to_rate: int) -> np.ndarray:
    if from_rate == to_rate:
        return samples.astype(np.float32, copy=False)
    return soxr.resample(samples, from_rate, to_rate, quality="HQ").astype(np.float32, copy=False)


def write_wav(url: str, samples: np.ndarray, sample_rate: int) -> None:
    """16-bit PCM WAV, written atomically."""
    buf = _stdio.BytesIO()
    sf.write(buf, np.clip(samples, -1.0, 1.0), sample_rate, format="WAV", subtype="PCM_16")
    io.write_bytes_atomic(url, buf.getvalue())
