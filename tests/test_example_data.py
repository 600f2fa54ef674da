"""The shipped example dataset: real speech, the seed manifest format, paths that resolve."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import soundfile as sf

from trainer.data.manifest import LineError, read_manifest, resolve_wav_path

CONFIGS = Path(__file__).resolve().parents[1] / "example" / "configs"


def test_manifest_resolves_to_real_speech_files() -> None:
    manifest = str(CONFIGS / "samples.jsonl")
    records = []
    for line_no, record in read_manifest(manifest):
        assert not isinstance(record, LineError), f"line {line_no}: {record}"
        path = Path(resolve_wav_path(manifest, record["wav_path"]))
        assert path.is_file(), f"line {line_no}: {path} missing"
        info = sf.info(str(path))
        assert info.samplerate == record["sample_rate"] == 16000 and info.channels == 1
        assert abs(info.duration - record["duration"]) < 0.01
        records.append(record)
    assert len(records) >= 100
    durations = [r["duration"] for r in records]
    assert min(durations) >= 1.0 and max(durations) <= 15.0 and max(durations) > 10.0
    assert len(Counter(r["speaker_id"] for r in records)) >= 4
    assert all(r["transcript"].strip() and r["language"] == "en" for r in records)
    total_bytes = sum((CONFIGS.parent / "wavs" / p.name).stat().st_size for p in (CONFIGS.parent / "wavs").iterdir())
    assert total_bytes <= 15 * 2**20


def test_eval_list_prompts_and_targets_exist() -> None:
    eval_list = CONFIGS / "eval_list.jsonl"
    items = [json.loads(line) for line in eval_list.read_text().splitlines()]
    train_texts = {json.loads(line)["transcript"] for line in (CONFIGS / "samples.jsonl").read_text().splitlines()}
    assert items
    for item in items:
        for key in ("prompt_wav", "target_wav"):
            assert Path(resolve_wav_path(str(eval_list), item[key])).is_file()
        assert item["prompt_text"] in train_texts
        # Held-out: the target sentence is never a training transcript (nor part of one).
        assert not any(item["target_text"] in t for t in train_texts)
