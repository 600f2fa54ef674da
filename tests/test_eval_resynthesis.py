"""`tts-train eval --codec_model_path C` without a SpeechLM judges the codec: encode -> decode of
held-out speech, scored by pocketsphinx (WER) and resemblyzer (SIM of the copy to the original)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from trainer.audio import read_audio
from trainer.cli import main
from trainer.codec import Codec, tiny_codec_config

REPO = Path(__file__).resolve().parents[1]
MANIFEST = REPO / "example" / "configs" / "samples.jsonl"
EVAL_LIST = REPO / "example" / "configs" / "eval_list.jsonl"


@pytest.fixture(scope="module")
def codec_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("codec") / "codec"
    Codec.from_config(tiny_codec_config()).save(str(out))
    return out


def _eval(codec_dir: Path, test_list: Path, out: Path, items: int) -> dict:
    code = main(["eval", "--codec_model_path", str(codec_dir), "--test_list", str(test_list),
                 "--output_dir", str(out), "--set", "eval.use_dnsmos=false", "--set", f"eval.max_items={items}"])
    assert code == 0
    return json.loads((out / "results.json").read_text())


def test_codec_alone_is_judged_on_its_copies_of_a_manifest(codec_dir: Path, tmp_path) -> None:
    if not MANIFEST.exists():
        pytest.skip("example dataset not generated")
    results = _eval(codec_dir, MANIFEST, tmp_path / "out", 3)
    assert results["mode"] == "resynthesis" and len(results["items"]) == 3
    truth, copy = results["aggregate"]["ground_truth"], results["aggregate"]["model"]
    # The flite originals are understood; an untrained codec's copies are not, and sound like no one.
    assert truth["wer"] < 0.5 and copy["wer"] > 0.8, (truth, copy)
    assert copy["sim"] < 0.8
    # The written copy is the codec's encode -> decode of the original, at the codec's output rate.
    codec = Codec.load(str(codec_dir))
    first = json.loads(MANIFEST.read_text().splitlines()[0])
    original = read_audio(str(MANIFEST.parent / first["wav_path"]))
    expected = codec.decode(codec.encode([original.samples], original.sample_rate))[0]
    written, rate = sf.read(tmp_path / "out" / results["items"][0]["model"]["wav"], dtype="float32")
    assert rate == codec.output_sample_rate and len(written) == len(expected)
    assert np.corrcoef(written, expected)[0, 1] > 0.99  # equal up to the 16-bit WAV rounding
    assert (tmp_path / "out" / "report.html").read_text().count("<audio") == 6
    # The manifest's first three utterances are three voices: each is also judged on its own.
    voices = [json.loads(line)["speaker_id"] for line in MANIFEST.read_text().splitlines()[:3]]
    by_speaker = results["by_speaker"]
    assert sorted(by_speaker) == sorted(voices)
    for item, voice in zip(results["items"], voices, strict=True):
        assert by_speaker[voice]["model"]["items"] == 1
        assert by_speaker[voice]["model"]["sim"] == pytest.approx(item["model"]["sim"])


def test_a_test_list_is_read_through_its_target_wavs(codec_dir: Path, tmp_path) -> None:
    if not EVAL_LIST.exists():
        pytest.skip("example dataset not generated")
    results = _eval(codec_dir, EVAL_LIST, tmp_path / "out", 1)
    texts = [json.loads(line)["target_text"] for line in EVAL_LIST.read_text().splitlines()[:1]]
    assert [it["target_text"] for it in results["items"]] == texts


def test_a_list_without_transcripts_fails_with_its_line(codec_dir: Path, tmp_path, capsys) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"wav_path": "a.flac", "transcript": "hi"}) + "\n" + json.dumps({"wav_path": "b.flac"}))
    code = main(["eval", "--codec_model_path", str(codec_dir), "--test_list", str(bad), "--output_dir",
                 str(tmp_path / "out")])
    assert code != 0
    assert f"{bad}:2: needs wav_path + transcript" in capsys.readouterr().err
    # A line that is JSON but not an object is named too (it used to end in an AttributeError).
    bad.write_text(json.dumps({"wav_path": "a.flac", "transcript": "hi"}) + "\n" + json.dumps(["b.flac", "hi"]))
    assert main(["eval", "--codec_model_path", str(codec_dir), "--test_list", str(bad), "--output_dir",
                 str(tmp_path / "out")]) == 2
    assert f"{bad}:2: expected a JSON object, got list" in capsys.readouterr().err
