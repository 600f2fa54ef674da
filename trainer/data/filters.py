"""Which manifest records become training samples (the `dataset` config section).

Two checks at vectorize: `check_record` runs on the manifest record alone (cheap, before any audio is
read); `check_audio` runs on what the audio file really holds, because declared durations and rates are
often wrong. `check_sample` runs the reference's load-time set (all but the speaking-rate check) on a
vectorized sample record when SFT/RLHF load a dataset (its duration and sample rate are the file's,
measured at vectorize), as the reference filters at load.
Each returns None (keep) or a `Rejection` whose `reason` is a short stable tag used in rejects files,
summaries and metric labels.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from trainer.config import DatasetConfig


@dataclass(frozen=True)
class Rejection:
    reason: str
    detail: str


def language_allowed(language: str, allowed: list[str] | None) -> bool:
    """Case-insensitive; an allowed "en" admits "en-GB"/"en_us" (same primary subtag). None/[]: all."""
    if not allowed:
        return True
    tag = language.strip().lower().replace("_", "-")
    allowed_tags = {a.strip().lower().replace("_", "-") for a in allowed}
    return tag in allowed_tags or tag.split("-", 1)[0] in allowed_tags


def speech_chars(transcript: str) -> int:
    """Characters that are spoken-ish: whitespace runs count as one."""
    return len(" ".join(transcript.split()))


def check_record(record: dict[str, Any], config: DatasetConfig) -> Rejection | None:
    transcript = record["transcript"]
    if not transcript.strip():
        return Rejection("empty_transcript", "transcript is empty")
    # str.isalnum covers letters and digits of every script, so only punctuation/symbol text fails.
    if not any(ch.isalnum() for ch in transcript):
        return Rejection("punctuation_only_transcript", f"transcript has no letters or digits: {transcript!r}")
    if not language_allowed(record["language"], config.allowed_languages):
        return Rejection(
            "language_not_allowed", f"language {record['language']!r} not in {config.allowed_languages}"
        )
    dnsmos = dnsmos_score(record)
    if config.min_dnsmos_score and dnsmos is not None and dnsmos < config.min_dnsmos_score:
        return Rejection("low_dnsmos", f"dnsmos {dnsmos} < {config.min_dnsmos_score}")
    return None


def dnsmos_score(record: dict[str, Any]) -> float | None:
    """The record's DNSMOS overall score: the reference's "dnsmos_mos_ovr", else our "dnsmos"."""
    value = record.get("dnsmos_mos_ovr", record.get("dnsmos"))
    return None if value is None else float(value)


def check_audio(transcript: str, duration: float, sample_rate: int, config: DatasetConfig) -> Rejection | None:
    """Filters on the file's real duration and sample rate, and its speaking rate."""
    rejection = check_rate_and_duration(duration, sample_rate, config)
    if rejection:
        return rejection
    rate = speech_chars(transcript) / duration
    if not config.min_chars_per_second <= rate <= config.max_chars_per_second:
        return Rejection(
            "chars_per_second_outlier",
            f"{rate:.1f} chars/s outside [{config.min_chars_per_second}, {config.max_chars_per_second}]",
        )
    return None


def check_rate_and_duration(duration: float, sample_rate: int, config: DatasetConfig) -> Rejection | None:
    if sample_rate < config.min_sample_rate:
        return Rejection("low_sample_rate", f"file sample rate {sample_rate} Hz < {config.min_sample_rate} Hz")
    if duration < config.min_duration:
        return Rejection("too_short", f"{duration:.3f} s < {config.min_duration} s")
    if duration > config.max_duration:
        return Rejection("too_long", f"{duration:.3f} s > {config.max_duration} s")
    return None


def declared_mismatch_notes(
    record: dict[str, Any], duration: float, sample_rate: int, channels: int, config: DatasetConfig
) -> list[str]:
    """Differences between the manifest's claims and the file (kept on the sample; the file wins)."""
    notes = []
    if abs(float(record["duration"]) - duration) > config.duration_tolerance_s:
        notes.append(f"duration_mismatch: declared {float(record['duration']):.3f} s, file {duration:.3f} s")
    if int(record["sample_rate"]) != sample_rate:
        notes.append(f"sample_rate_mismatch: declared {int(record['sample_rate'])} Hz, file {sample_rate} Hz")
    if channels > 1:
        notes.append(f"downmixed: {channels} channels averaged to mono")
    return notes


def check_sample(record: dict[str, Any], config: DatasetConfig) -> Rejection | None:
    """The `dataset` filters the reference applies at load, on a vectorized sample record: text,
    language, DNSMOS, sample rate and duration (a record lacking duration or sample_rate skips the
    checks that need them). The speaking-rate outlier check is ours and stays at vectorize: data
    vectorized elsewhere (e.g. by the reference) never went through it, and the reference trains on it."""
    rejection = check_record(record, config)
    if rejection or record.get("duration") is None or record.get("sample_rate") is None:
        return rejection
    return check_rate_and_duration(float(record["duration"]), int(record["sample_rate"]), config)
