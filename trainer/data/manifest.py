"""Speech manifests in the seed format: one JSON object per line.

    {"transcript", "language", "wav_path", "duration", "sample_rate"} + optional "id", "speaker_id", "dnsmos",
    and the reference's optional "dnsmos_mos_ovr", "voice_description", "emotion", "style", "sound_effect"
    (kept on the sample; "dnsmos_mos_ovr" feeds dataset.min_dnsmos_score)

Manifests are streamed (local path or any fsspec URL, `.gz` etc. decompressed by suffix) so a
multi-million-line manifest never sits in memory. A line that cannot become a record is returned as a
`LineError` instead of raising: the caller decides where it goes, and nothing is lost silently.
"""

from __future__ import annotations

import json
import os
import posixpath
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from trainer import io
from trainer.errors import ConfigError

FieldTypes = Mapping[str, type | tuple[type, ...]]  # field -> the type(s) its value must have
REQUIRED_FIELDS: FieldTypes = {
    "transcript": str,
    "language": str,
    "wav_path": str,
    "duration": (int, float),
    "sample_rate": (int, float),
}
# What audio-only readers (codec training) require of a record: the audio, nothing about its text.
AUDIO_FIELDS: FieldTypes = {"wav_path": str}
OPTIONAL_NUMERIC_FIELDS = ("dnsmos", "dnsmos_mos_ovr")
OPTIONAL_STRING_FIELDS = ("voice_description", "emotion", "style", "sound_effect")


@dataclass(frozen=True)
class LineError:
    """A manifest line that is not a valid record. `reason` is a short machine-readable tag."""

    reason: str  # malformed_json | missing_field | invalid_field
    detail: str
    raw: str


def read_lines(url: str) -> Iterator[tuple[int, str]]:
    """(1-based line number, text without the newline) for every line, blank ones included.

    Bytes that are not UTF-8 are kept (replacement characters) so `parse_line` can reject the line
    with its number instead of aborting the whole stream.
    """
    with io.open_url(url, "rb", compression="infer") as f:
        for line_no, raw in enumerate(f, start=1):
            yield line_no, raw.decode("utf-8", errors="replace").rstrip("\r\n")


def parse_line(text: str, required: FieldTypes = REQUIRED_FIELDS) -> dict[str, Any] | LineError:
    """One manifest line -> its record, or why it is not one (`required`: field -> type(s) it must have)."""
    if "\ufffd" in text:
        return LineError("malformed_json", "line is not valid UTF-8", text)
    try:
        record = json.loads(text)
    except json.JSONDecodeError as err:
        return LineError("malformed_json", f"not JSON: {err}", text)
    if not isinstance(record, dict):
        return LineError("malformed_json", f"expected a JSON object, got {type(record).__name__}", text)
    missing = [name for name in required if record.get(name) is None]
    if missing:
        return LineError("missing_field", f"missing required field(s): {', '.join(missing)}", text)
    for name, kind in required.items():
        if not isinstance(record[name], kind) or isinstance(record[name], bool):
            return LineError("invalid_field", f"{name} has type {type(record[name]).__name__}", text)
    if "wav_path" in required and not record["wav_path"].strip():
        return LineError("invalid_field", "wav_path is empty", text)
    for name in OPTIONAL_NUMERIC_FIELDS:
        value = record.get(name)
        if value is not None and (not isinstance(value, (int, float)) or isinstance(value, bool)):
            return LineError("invalid_field", f"{name} has type {type(value).__name__}", text)
    for name in OPTIONAL_STRING_FIELDS:
        value = record.get(name)
        if value is not None and not isinstance(value, str):
            return LineError("invalid_field", f"{name} has type {type(value).__name__}", text)
    return record


def read_manifest(
    url: str, required: FieldTypes = REQUIRED_FIELDS
) -> Iterator[tuple[int, dict[str, Any] | LineError]]:
    """(1-based line number, record or LineError) for every non-blank line of the manifest at `url`."""
    for line_no, text in read_lines(url):
        if text.strip():
            yield line_no, parse_line(text, required)


def read_json_objects(url: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """(1-based line number, object) for every non-blank line of a small JSON-lines list (an eval test
    list, a held-out manifest). Unlike a training manifest, whose bad lines are counted and skipped,
    such a list is input the user wrote by hand: its first bad line stops the run, named by file and line."""
    for line_no, text in read_lines(url):
        if not text.strip():
            continue
        try:
            record = json.loads(text)
        except json.JSONDecodeError as err:
            raise ConfigError(f"{url}:{line_no}: not valid JSON: {err}") from None
        if not isinstance(record, dict):
            raise ConfigError(f"{url}:{line_no}: expected a JSON object, got {type(record).__name__}")
        yield line_no, record


def sample_id(record: dict[str, Any]) -> str:
    """Stable identity of a sample: its "id", else its wav_path as written in the manifest."""
    value = record.get("id")
    return str(value) if value is not None else str(record["wav_path"])


def resolve_wav_path(manifest_url: str, wav_path: str) -> str:
    """Absolute paths and URLs stay as they are; a relative path is taken from the manifest's directory
    (same filesystem and URL scheme as the manifest)."""
    if "://" in wav_path or wav_path.startswith("/"):
        return wav_path
    scheme, sep, path = str(manifest_url).rpartition("://")
    if not sep:
        path = os.path.abspath(path)
    return scheme + sep + posixpath.normpath(posixpath.join(posixpath.dirname(path), wav_path))


@dataclass(frozen=True)
class Utterance:
    """Held-out speech with its transcript (codec resynthesis checks)."""

    id: str
    wav: str
    text: str
    language: str
    speaker_id: str | None = None


def speaker_of(record: dict) -> str | None:
    """A manifest record's or eval item's `speaker_id` as text (None when it names none)."""
    speaker = record.get("speaker_id")
    return None if speaker is None else str(speaker)


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
                               record.get("language", "en"), speaker_of(record)))
        if max_items and len(found) >= max_items:
            break
    if not found:
        raise ConfigError(f"{url}: no utterances")
    return found
