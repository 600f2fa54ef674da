"""`tts-train eval`: synthesise a test list, score model and ground truth, write results + report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import soundfile as sf
from speech_fixtures import make_codec, make_model

from trainer.cli import main

REPO = Path(__file__).resolve().parents[1]
EVAL_LIST = REPO / "example" / "configs" / "eval_list.jsonl"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("eval")
    return make_model(root / "model", make_codec(root / "codec"))


def _metrics(dir_: Path, stage: str, key: str) -> str:
    dir_.mkdir(parents=True)
    rows = [{"stage": stage, "step": s, "time": 0.0, key: 5.0 - s * 0.5} for s in range(1, 6)]
    (dir_ / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(dir_)


def test_eval_writes_results_report_and_audio(model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "eval"
    sft = _metrics(tmp_path / "sft", "sft", "loss")
    rlhf = _metrics(tmp_path / "rlhf", "rlhf", "reward_total")
    code = main([
        "eval", "--config", str(REPO / "example" / "configs" / "eval.yaml"),
        "--model_path", str(model_dir), "--output_dir", str(out),
        "--set", "eval.max_items=2", "--set", "eval.sampling.max_new_tokens=60",
        "--set", f'eval.metrics_dirs=["{sft}", "{rlhf}"]',
    ])
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    model, truth = results["aggregate"]["model"], results["aggregate"]["ground_truth"]
    assert model["items"] == truth["items"] == 2
    for agg in (model, truth):
        assert set(agg) >= {"wer", "sim", "dnsmos", "rtf", "failed"}
    # Ground truth is real flite speech: pocketsphinx understands it, the voice matches its prompt.
    assert truth["wer"] < 0.5 and truth["sim"] > 0.7 and truth["dnsmos"] > 2.0
    # An untrained model babbles: far worse than the ground truth, yet every item is scored.
    assert model["wer"] > truth["wer"] and model["failed"] == 0 and model["rtf"] > 0
    for item in results["items"]:
        for row in ("model", "ground_truth"):
            wav = out / item[row]["wav"]
            info = sf.info(str(wav))
            assert info.samplerate == 16000 and info.duration > 0.1
    html = (out / "report.html").read_text()
    for plot in ("curves.png", "spectrogram.png", "histograms.png"):
        assert (out / plot).stat().st_size > 5000 and f'src="{plot}"' in html
    assert html.count("<audio") == 4


def test_multi_voice_list_is_judged_per_voice(model_dir: Path, tmp_path: Path) -> None:
    items = [json.loads(line) for line in EVAL_LIST.read_text().splitlines()[:3]]
    for item, voice in zip(items, ("a", "b", "a"), strict=True):
        item["speaker_id"] = voice
        for key in ("prompt_wav", "target_wav"):
            item[key] = str((EVAL_LIST.parent / item[key]).resolve())
    test_list = tmp_path / "voices.jsonl"
    test_list.write_text("".join(json.dumps(it) + "\n" for it in items))
    out = tmp_path / "eval"
    assert main([
        "eval", "--config", str(REPO / "example" / "configs" / "eval.yaml"), "--model_path", str(model_dir),
        "--test_list", str(test_list), "--output_dir", str(out), "--set", "eval.sampling.max_new_tokens=60",
    ]) == 0
    results = json.loads((out / "results.json").read_text())
    by_speaker = results["by_speaker"]
    assert sorted(by_speaker) == ["a", "b"]
    assert by_speaker["a"]["model"]["items"] == 2 and by_speaker["b"]["ground_truth"]["items"] == 1
    for voice, rows in by_speaker.items():
        mine = [it for it in results["items"] if it["speaker_id"] == voice]
        for row in ("model", "ground_truth"):
            assert rows[row]["sim"] == pytest.approx(sum(it[row]["sim"] for it in mine) / len(mine))
    assert "voice a: model" in (out / "report.html").read_text()


def test_bad_test_list_fails_with_line_number(model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    bad = tmp_path / "list.jsonl"
    bad.write_text(json.dumps({"prompt_wav": "x.wav", "prompt_text": "hi", "target_text": "yo"}) + "\n{oops\n")
    code = main(["eval", "--test_list", str(bad), "--model_path", str(model_dir), "--output_dir", str(tmp_path)])
    assert code == 2
    assert f"{bad}:2: not valid JSON" in capsys.readouterr().err
    bad.write_text(json.dumps({"prompt_wav": "x.wav", "target_text": "yo"}) + "\n")
    assert main(["eval", "--test_list", str(bad), "--model_path", str(model_dir), "--output_dir", str(tmp_path)]) == 2
    assert "missing prompt_text" in capsys.readouterr().err
