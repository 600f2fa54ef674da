"""Manifest reading (seed format), wav path resolution and the record/audio filters."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import fsspec
import pytest

from trainer.config import DatasetConfig
from trainer.data import filters
from trainer.data.manifest import LineError, read_manifest, resolve_wav_path, sample_id

GOOD = {"transcript": "Hello there.", "language": "en", "wav_path": "a.flac", "duration": 1.5, "sample_rate": 16000}


def _write(path: Path, lines: list[str | bytes]) -> Path:
    path.write_bytes(b"".join((ln if isinstance(ln, bytes) else ln.encode()) + b"\n" for ln in lines))
    return path


def test_read_manifest_numbers_lines_and_reports_bad_ones(tmp_path):
    manifest = _write(
        tmp_path / "m.jsonl",
        [
            json.dumps(GOOD),
            "",  # blank: skipped, but still counts for numbering
            "{not json",
            json.dumps([1, 2]),
            json.dumps({k: v for k, v in GOOD.items() if k != "language"}),
            json.dumps({**GOOD, "duration": "long"}),
            json.dumps({**GOOD, "sample_rate": True}),
            json.dumps({**GOOD, "wav_path": "  "}),
            json.dumps({**GOOD, "dnsmos": "good"}),
            b'{"transcript": "caf\xe9"}',  # Latin-1, not UTF-8
            json.dumps({**GOOD, "id": "x", "dnsmos": 3.2}),
        ],
    )
    items = list(read_manifest(str(manifest)))
    assert [n for n, _ in items] == [1, 3, 4, 5, 6, 7, 8, 9, 10, 11]
    outcome = {n: (r.reason if isinstance(r, LineError) else "ok") for n, r in items}
    assert outcome == {
        1: "ok", 3: "malformed_json", 4: "malformed_json", 5: "missing_field", 6: "invalid_field",
        7: "invalid_field", 8: "invalid_field", 9: "invalid_field", 10: "malformed_json", 11: "ok",
    }
    assert "language" in items[3][1].detail
    assert items[1][1].raw == "{not json"
    assert items[-1][1]["dnsmos"] == 3.2


def test_read_manifest_streams_remote_and_compressed(tmp_path):
    lines = [json.dumps({**GOOD, "id": f"u{i}"}) for i in range(3)]
    with fsspec.open("memory://manifests/m.jsonl", "w") as f:
        f.write("\n".join(lines) + "\n")
    assert [r["id"] for _, r in read_manifest("memory://manifests/m.jsonl")] == ["u0", "u1", "u2"]
    gz = tmp_path / "m.jsonl.gz"
    gz.write_bytes(gzip.compress(("\n".join(lines) + "\n").encode()))
    assert [n for n, _ in read_manifest(str(gz))] == [1, 2, 3]


def test_resolve_wav_path(tmp_path):
    manifest = tmp_path / "configs" / "samples.jsonl"
    assert resolve_wav_path(str(manifest), "../wavs/a.flac") == str(tmp_path / "wavs" / "a.flac")
    assert resolve_wav_path(str(manifest), "/abs/a.wav") == "/abs/a.wav"
    assert resolve_wav_path(str(manifest), "gs://b/a.wav") == "gs://b/a.wav"
    assert resolve_wav_path("gs://bucket/data/m.jsonl", "wavs/a.flac") == "gs://bucket/data/wavs/a.flac"
    assert resolve_wav_path("file:///data/sets/m.jsonl", "../a.flac") == "file:///data/a.flac"
    # A relative manifest path resolves against the working directory.
    assert Path(resolve_wav_path("samples.jsonl", "a.flac")).is_absolute()


def test_sample_id_falls_back_to_wav_path():
    assert sample_id({**GOOD, "id": 7}) == "7"
    assert sample_id(GOOD) == "a.flac"


@pytest.mark.parametrize(
    ("change", "config", "reason"),
    [
        ({"transcript": "   "}, {}, "empty_transcript"),
        ({"transcript": "?!... --"}, {}, "punctuation_only_transcript"),
        ({"language": "fr"}, {"allowed_languages": ["en"]}, "language_not_allowed"),
        ({"dnsmos": 2.0}, {"min_dnsmos_score": 3.0}, "low_dnsmos"),
        ({"language": "EN-gb"}, {"allowed_languages": ["en"]}, None),
        ({"transcript": "Привет, мир"}, {}, None),
        ({"dnsmos": 2.0}, {}, None),  # no threshold configured
        ({}, {"min_dnsmos_score": 3.0}, None),  # no dnsmos given
    ],
)
def test_check_record(change, config, reason):
    rejection = filters.check_record({**GOOD, **change}, DatasetConfig(**config))
    assert (rejection.reason if rejection else None) == reason


@pytest.mark.parametrize(
    ("transcript", "duration", "rate", "reason"),
    [
        ("Hello there.", 1.5, 8000, "low_sample_rate"),
        ("Hi.", 0.2, 16000, "too_short"),
        ("Hello there.", 31.0, 16000, "too_long"),
        ("a" * 200, 2.0, 16000, "chars_per_second_outlier"),
        ("Hi.", 20.0, 16000, "chars_per_second_outlier"),
        ("Hello there, how are you.", 2.0, 16000, None),
    ],
)
def test_check_audio(transcript, duration, rate, reason):
    rejection = filters.check_audio(transcript, duration, rate, DatasetConfig())
    assert (rejection.reason if rejection else None) == reason


def test_declared_mismatch_notes():
    config = DatasetConfig(duration_tolerance_s=0.1)
    assert filters.declared_mismatch_notes(GOOD, 1.55, 16000, 1, config) == []
    notes = filters.declared_mismatch_notes(GOOD, 2.0, 24000, 2, config)
    assert [n.split(":")[0] for n in notes] == ["duration_mismatch", "sample_rate_mismatch", "downmixed"]
