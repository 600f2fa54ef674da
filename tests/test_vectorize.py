"""`tts-train vectorize`: the example set, every bad-input kind, kill -9 + resume, two ranks."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from prometheus_client import REGISTRY

from trainer import cli
from trainer.codec import Codec, tiny_codec_config
from trainer.data import shards
from trainer.data.vectorize import split_of

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "example" / "configs" / "samples.jsonl"
QUIET = ["--set", "metrics.port=0"]


@pytest.fixture(scope="module")
def codec_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("codec") / "tiny"
    Codec.from_config(tiny_codec_config()).save(str(path))
    return path


def vectorize(codec: Path, manifest: Path, out: Path, *extra: str) -> int:
    return cli.main(
        ["vectorize", "--codec_model_path", str(codec), "--dataset_path", str(manifest), "--output_dir", str(out),
         *QUIET, *extra]
    )


def example_records() -> list[dict]:
    return [json.loads(line) for line in EXAMPLE.read_text().splitlines()]


def absolute(record: dict) -> dict:
    return {**record, "wav_path": str((EXAMPLE.parent / record["wav_path"]).resolve())}


def write_manifest(path: Path, lines: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line + "\n" for line in lines))
    return path


def outputs(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.is_file()}


def lines_in(out: Path, pattern: str) -> list[int]:
    return [json.loads(line)["line"] for p in sorted(out.glob(pattern)) for line in p.read_text().splitlines()]


@pytest.fixture(scope="module")
def small_manifest(tmp_path_factory) -> Path:
    """The 24 shortest example clips (absolute paths) plus a bad line, for runs repeated several times."""
    records = sorted(example_records(), key=lambda r: r["duration"])[:24]
    lines = [json.dumps(absolute(r)) for r in records]
    lines.insert(5, "{broken")
    return write_manifest(tmp_path_factory.mktemp("small") / "samples.jsonl", lines)


# Small shards (7 units) and batches so a run takes long enough to be killed midway.
SMALL = ["--set", "vectorize.samples_per_shard=4", "--set", "vectorize.val_fraction=0.2", "--batch_size", "2"]


@pytest.fixture(scope="module")
def small_reference(codec_dir, small_manifest, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("reference")
    assert vectorize(codec_dir, small_manifest, out, *SMALL) == 0
    return out


def test_example_set(codec_dir, tmp_path):
    out = tmp_path / "out"
    seed_flags = ["--batch_size", "8", "--run_name", "example", "--use_wandb"]
    assert vectorize(codec_dir, EXAMPLE, out, *seed_flags, "--set", "vectorize.samples_per_shard=50") == 0
    records = example_records()
    summary = json.loads((out / "vectorize_summary.json").read_text())
    assert summary["units"] == 3 and summary["lines"] == len(records)
    assert summary["accepted"]["total"] == len(records) and summary["rejected"]["total"] == 0
    info = json.loads((out / "dataset_info.json").read_text())
    assert info["codebook_size"] == 256 and info["token_rate"] == 50 and info["codec_model_path"] == str(codec_dir)

    seen = {}
    for split in shards.SPLITS:
        assert shards.shard_ids(str(out), split) == [0, 1, 2]
        for i in range(3):
            shard = shards.read_shard(str(out), split, i)
            shards.validate_shard(shard, 256, f"{split}_{i}")
            assert shard.codes.dtype == np.int32 and shard.bounds.dtype == np.int64
            assert [r["line"] for r in shard.records] == sorted(r["line"] for r in shard.records)
            for k, record in enumerate(shard.records):
                original = records[record["line"] - 1]
                assert record["id"] == original["id"] and record["transcript"] == original["transcript"]
                assert split_of(original, 0.05) == split
                assert Path(record["resolved_wav_path"]).exists()
                # One code per 20 ms of the file, the last frame padded.
                assert len(shard.sample(k)) == record["num_codes"] == int(np.ceil(record["duration"] * 50 - 1e-6))
                seen[record["line"]] = split
    assert sorted(seen) == list(range(1, len(records) + 1)) and not lines_in(out, "rejects_*.jsonl")
    assert summary["accepted"]["val"] == sum(s == "val" for s in seen.values()) > 0
    declared_hours = sum(r["duration"] for r in records) / 3600
    assert summary["audio_hours"]["total"] == pytest.approx(declared_hours, rel=0.02)


def _tone(seconds: float, rate: int = 16000, channels: int = 1) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    wave = 0.3 * np.sin(2 * np.pi * 220 * t).astype(np.float32)
    return np.stack([wave, 0.5 * wave], axis=1) if channels == 2 else wave


@contextmanager
def pushgateway() -> Iterator[dict]:
    """A local HTTP server that records the one push it receives."""
    received: dict = {}

    class Handler(BaseHTTPRequestHandler):
        def do_PUT(self):
            received["path"] = self.path
            received["body"] = self.rfile.read(int(self.headers["Content-Length"])).decode()
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    received["url"] = f"http://127.0.0.1:{server.server_port}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield received
    finally:
        server.shutdown()
        server.server_close()


def test_bad_inputs_are_rejected_with_reasons(codec_dir, tmp_path):
    wavs = tmp_path / "data" / "wavs"
    wavs.mkdir(parents=True)
    good = [absolute(r) for r in sorted(example_records(), key=lambda r: r["duration"])[:4]]
    source = Path(good[0]["wav_path"]).read_bytes()
    (wavs / "truncated.flac").write_bytes(source[: len(source) // 2])
    (wavs / "garbage.wav").write_bytes(b"RIFF" + os.urandom(3000))
    sf.write(wavs / "empty.wav", np.zeros(0, dtype=np.float32), 16000)
    sf.write(wavs / "stereo.wav", _tone(2.0, channels=2), 16000)
    sf.write(wavs / "rate24k.wav", _tone(2.0, 24000), 24000)
    sf.write(wavs / "rate8k.wav", _tone(2.0, 8000), 8000)
    sf.write(wavs / "short.wav", _tone(0.2), 16000)
    sf.write(wavs / "long.wav", _tone(31.0), 16000)

    def rec(wav: str, **change) -> str:
        base = {"id": wav, "transcript": "A short test sentence.", "language": "en", "duration": 2.0,
                "sample_rate": 16000, "wav_path": f"wavs/{wav}"}
        return json.dumps({**base, **change})

    # (line, expected outcome): "train"/"val" for accepted, else the reject reason.
    cases = [
        (json.dumps(good[0]), "accepted"),
        (rec("nowhere.flac"), "missing_file"),
        (rec("truncated.flac"), "unreadable_audio"),
        (rec("garbage.wav"), "unreadable_audio"),
        (rec("empty.wav"), "empty_audio"),
        (rec("stereo.wav"), "accepted"),  # downmixed, noted
        (json.dumps({**good[1], "duration": 99.0}), "accepted"),  # wrong declared duration, noted
        (rec("rate24k.wav"), "accepted"),  # declared 16 kHz, file 24 kHz: noted, resampled
        (rec("rate8k.wav", sample_rate=8000), "low_sample_rate"),
        (rec("short.wav", duration=0.2, transcript="Hi."), "too_short"),
        (rec("long.wav", duration=31.0), "too_long"),
        (json.dumps({**good[2], "transcript": "  "}), "empty_transcript"),
        (json.dumps({**good[2], "transcript": "... ?!"}), "punctuation_only_transcript"),
        (json.dumps({**good[2], "language": "de"}), "language_not_allowed"),
        (json.dumps({**good[2], "transcript": "word " * 200}), "chars_per_second_outlier"),
        (json.dumps({**good[2], "dnsmos": 1.5}), "low_dnsmos"),
        ('{"transcript": "unterminated', "malformed_json"),
        (json.dumps({k: v for k, v in good[3].items() if k != "wav_path"}), "missing_field"),
        (json.dumps({**good[3], "duration": "two seconds"}), "invalid_field"),
        ("", "blank"),
        (json.dumps({**good[3], "dnsmos": 3.9}), "accepted"),
    ]
    manifest = write_manifest(tmp_path / "data" / "manifest.jsonl", [line for line, _ in cases])
    out = tmp_path / "out"
    counted = {"missing_file": 1, "unreadable_audio": 2, "malformed_json": 1}
    before = {r: REGISTRY.get_sample_value("speechlm_vectorize_rejects_total", {"reason": r}) or 0 for r in counted}
    with pushgateway() as pushed:
        code = vectorize(
            codec_dir, manifest, out, "--set", 'dataset.allowed_languages=["en"]',
            "--set", "dataset.min_dnsmos_score=3.0",
            "--set", f"vectorize.pushgateway_url={pushed['url']}", "--run_name", "bad",
        )
    assert code == 1  # more than half the lines are rejected (vectorize.max_reject_fraction = 0.5)
    for reason, n in counted.items():
        assert REGISTRY.get_sample_value("speechlm_vectorize_rejects_total", {"reason": reason}) == before[reason] + n
    assert pushed["path"] == "/metrics/job/vectorize-bad"
    assert 'speechlm_vectorize_summary_items{status="rejected"} 15.0' in pushed["body"]
    assert 'speechlm_vectorize_summary_rejects{reason="unreadable_audio"} 2.0' in pushed["body"]

    rejects = {r["line"]: r for r in map(json.loads, (out / "rejects_0.jsonl").read_text().splitlines())}
    samples = {}
    for split in shards.SPLITS:
        shard = shards.read_shard(str(out), split, 0)
        shards.validate_shard(shard, 256, split)
        samples.update({r["line"]: r for r in shard.records})
    for line_no, (raw, expected) in enumerate(cases, start=1):
        if expected == "accepted":
            assert line_no in samples and line_no not in rejects, line_no
        elif expected == "blank":
            assert line_no not in samples and line_no not in rejects
        else:
            assert rejects[line_no]["reason"] == expected, (line_no, rejects.get(line_no))
            assert rejects[line_no]["raw"] == raw and line_no not in samples
    assert "downmixed" in samples[6]["notes"][0]
    assert samples[7]["notes"][0].startswith("duration_mismatch") and samples[7]["duration"] < 99
    assert samples[8]["notes"][0].startswith("sample_rate_mismatch") and samples[8]["sample_rate"] == 24000
    # 2 s at 24 kHz -> 32,000 samples at 16 kHz; X-codec2 pads 320 - n % 320, so an exact multiple of the
    # hop gets one frame more: 32,000 // 320 + 1.
    assert samples[8]["num_codes"] == 101

    summary = json.loads((out / "vectorize_summary.json").read_text())
    expected_reasons = [e for _, e in cases if e not in ("accepted", "blank")]
    assert summary["rejected"]["total"] == len(expected_reasons)
    assert summary["rejected"]["by_reason"] == {r: expected_reasons.count(r) for r in set(expected_reasons)}
    assert summary["accepted"]["total"] == 5 and summary["blank_lines"] == 1
    assert summary["notes"] == {"downmixed": 1, "duration_mismatch": 1, "sample_rate_mismatch": 1}


def test_kill_9_then_resume_matches_an_uninterrupted_run(codec_dir, small_manifest, small_reference, tmp_path):
    out = tmp_path / "out"
    command = [sys.executable, "-m", "trainer", "vectorize", "--codec_model_path", str(codec_dir),
               "--dataset_path", str(small_manifest), "--output_dir", str(out), *QUIET, *SMALL]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO)
    try:
        deadline = time.monotonic() + 120
        while len(list(out.glob("_done_*.json"))) < 2 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    done_at_kill = len(list(out.glob("_done_*.json")))
    assert proc.returncode == -signal.SIGKILL
    assert 2 <= done_at_kill < 7 and not (out / "vectorize_summary.json").exists()
    # Whatever the kill caught mid-write, make sure an unfinished unit has a stale shard and temp file.
    unfinished = min(i for i in range(7) if not (out / f"_done_{i}.json").exists())
    (out / f"train_codes_{unfinished}.npy").write_bytes(b"half-written")
    (out / f"rejects_{unfinished}.jsonl.tmp-deadbeef").write_bytes(b"{")

    assert vectorize(codec_dir, small_manifest, out, *SMALL) == 0
    assert outputs(out) == outputs(small_reference)
    assert not list(out.glob("*.tmp-*"))
    # A third run has nothing left to do and changes nothing.
    assert vectorize(codec_dir, small_manifest, out, *SMALL) == 0
    assert outputs(out) == outputs(small_reference)


def test_two_ranks_take_disjoint_units(codec_dir, small_manifest, small_reference, tmp_path, monkeypatch):
    out = tmp_path / "out"
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert vectorize(codec_dir, small_manifest, out, *SMALL) == 0
    assert sorted(p.name for p in out.glob("_done_*.json")) == ["_done_1.json", "_done_3.json", "_done_5.json"]
    assert not (out / "vectorize_summary.json").exists()  # rank 0's units are missing
    rank1_lines = set(lines_in(out, "*_samples_*.jsonl") + lines_in(out, "rejects_*.jsonl"))

    monkeypatch.setenv("RANK", "0")
    assert vectorize(codec_dir, small_manifest, out, *SMALL) == 0  # finishes last: writes the summary
    all_lines = lines_in(out, "*_samples_*.jsonl") + lines_in(out, "rejects_*.jsonl")
    rank0_lines = set(all_lines) - rank1_lines
    assert len(all_lines) == len(set(all_lines)) == 25
    assert rank1_lines and rank0_lines and not rank1_lines & rank0_lines
    assert outputs(out) == outputs(small_reference)


def test_resume_refuses_changed_settings_or_manifest(codec_dir, small_manifest, tmp_path, capsys):
    manifest = write_manifest(tmp_path / "m.jsonl", small_manifest.read_text().splitlines()[:6])
    out = tmp_path / "out"
    settings = ["--set", "vectorize.samples_per_shard=2"]
    assert vectorize(codec_dir, manifest, out, *settings) == 0
    assert vectorize(codec_dir, manifest, out, *settings, "--set", "dataset.min_duration=1.0") == 2
    assert "min_duration" in capsys.readouterr().err

    lines = manifest.read_text().splitlines()
    lines[2] = lines[2].replace('"language": "en"', '"language": "en-GB"')
    write_manifest(manifest, lines)
    assert vectorize(codec_dir, manifest, out, *settings) == 1
    assert "manifest lines 3-4 changed" in capsys.readouterr().err


def test_missing_inputs_are_config_errors(codec_dir, tmp_path, capsys):
    assert cli.main(["vectorize", "--dataset_path", str(EXAMPLE), "--output_dir", str(tmp_path), *QUIET]) == 2
    assert "codec_model_path" in capsys.readouterr().err
    assert vectorize(codec_dir, tmp_path / "nope.jsonl", tmp_path / "out") == 2
    assert "manifest not found" in capsys.readouterr().err


def test_seed_flags_val_split_and_num_workers(codec_dir, small_manifest, small_reference, tmp_path, caplog, capsys):
    out = tmp_path / "out"
    seed_style = ["--set", "vectorize.samples_per_shard=4", "--batch_size", "2", "--val_split", "0.2"]
    assert vectorize(codec_dir, small_manifest, out, *seed_style, "--num_workers", "0") == 0
    assert outputs(out) == outputs(small_reference)  # same split, same shards as val_fraction=0.2 with threads
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any(m.startswith("--val_split: ") and "hashes below it" in m for m in warned)
    assert vectorize(codec_dir, small_manifest, out, "--num_workers", "-1") == 2
    assert "vectorize.num_workers" in capsys.readouterr().err


def test_seed_flag_dry_run_takes_the_first_lines_only(codec_dir, tmp_path, capsys):
    good = [json.dumps(absolute(r)) for r in sorted(example_records(), key=lambda r: r["duration"])[:3]]
    missing = [json.dumps({**json.loads(good[0]), "wav_path": f"/missing/{i}.wav"}) for i in range(52)]
    manifest = write_manifest(tmp_path / "m.jsonl", good + missing)
    out = tmp_path / "out"
    settings = ["--batch_size", "1", "--set", "vectorize.samples_per_shard=20",
                "--set", "vectorize.max_reject_fraction=1"]
    assert vectorize(codec_dir, manifest, out, *settings, "--dry_run") == 0
    summary = json.loads((out / "vectorize_summary.json").read_text())
    assert summary["lines"] == 50 and summary["units"] == 3  # batch_size 1 x world 1 x 50
    assert summary["accepted"]["total"] == 3 and summary["rejected"]["total"] == 47
    assert sorted(lines_in(out, "*_samples_*.jsonl") + lines_in(out, "rejects_*.jsonl")) == list(range(1, 51))
    assert json.loads((out / "dataset_info.json").read_text())["dry_run_lines"] == 50
    capsys.readouterr()
    assert vectorize(codec_dir, manifest, out, *settings) == 2  # a full run into the dry run's directory
    assert "dry_run_lines: 50 -> None" in capsys.readouterr().err


# Inductor needs over 15 minutes on a 2-core CPU to compile even the tiny codec: GPU machines only.
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_seed_flag_compile_model_gives_the_same_codes(codec_dir, small_manifest, tmp_path):
    manifest = write_manifest(tmp_path / "m.jsonl", small_manifest.read_text().splitlines()[:3])
    eager, compiled = tmp_path / "eager", tmp_path / "compiled"
    assert vectorize(codec_dir, manifest, eager) == 0
    assert vectorize(codec_dir, manifest, compiled, "--compile_model") == 0
    for split in shards.SPLITS:
        a, b = shards.read_shard(str(eager), split, 0), shards.read_shard(str(compiled), split, 0)
        assert a.records == b.records
        np.testing.assert_array_equal(a.codes, b.codes)
    assert sum(len(shards.read_shard(str(eager), s, 0)) for s in shards.SPLITS) == 3
