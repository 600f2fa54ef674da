"""The main job, shortened: `ttsctl run` of the example pipeline (every stage, real configs, a few
steps each) on the local backend, then a check of every stage's outputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import soundfile as sf
import yaml

from controller.cli import main
from trainer.data.shards import read_shard

REPO = Path(__file__).resolve().parents[1]
SHORTEN = {
    "codec": ["codec.train.max_steps=4", "codec.train.log_steps=2"],
    "vectorize": [],
    "sft": ["training.max_steps=4", "training.eval_steps=2", "training.logging_steps=1",
            "checkpointing.save_steps=2"],
    "rlhf": ["rlhf_training.max_steps=1", "rlhf_training.guard_rail_steps=1"],
    "eval": ["eval.max_items=2", "eval.sampling.max_new_tokens=50"],
}


def shortened_spec(tmp_path: Path) -> Path:
    spec = yaml.safe_load((REPO / "example" / "pipeline.yaml").read_text())
    records = [json.loads(line) for line in (REPO / "example/configs/samples.jsonl").read_text().splitlines()]
    manifest = tmp_path / "manifest.jsonl"
    with manifest.open("w") as fh:
        for record in records[:16]:
            record["wav_path"] = str((REPO / "example/configs" / record["wav_path"]).resolve())
            fh.write(json.dumps(record) + "\n")
    spec["storage"] = {"data": str(tmp_path / "data"), "checkpoints": str(tmp_path / "ckpt"),
                       "outputs": str(tmp_path / "out")}
    for name, stage in spec["stages"].items():
        if isinstance(stage.get("config"), str):
            stage["config"] = str(REPO / "example" / stage["config"])
        stage["overrides"] = [*SHORTEN.get(name, []), "metrics.port=0"]
    spec["stages"]["vectorize"]["overrides"].append(f"vectorize.dataset_path={manifest}")
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


@pytest.mark.timeout(1200)
def test_shortened_example_pipeline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.setenv("TTSCTL_HOME", str(tmp_path / "home"))
    monkeypatch.chdir(REPO)  # the example configs' relative paths (eval list) resolve from the repo root
    assert main(["run", str(shortened_spec(tmp_path)), "--backend", "local"]) == 0
    out = capsys.readouterr().out
    for stage in ("codec", "vectorize", "merge", "sft", "export-sft", "rlhf", "export-rlhf", "eval"):
        assert f"<== {stage}: succeeded" in out
    assert f"evaluation report:            {tmp_path}/out/eval/report.html" in out

    from trainer.codec import Codec

    codec = Codec.load(str(tmp_path / "ckpt" / "codec" / "final"))
    vectorized = tmp_path / "data" / "vectorized"
    summary = json.loads((vectorized / "vectorize_summary.json").read_text())
    assert summary["accepted"]["total"] == 16
    merged = read_shard(str(vectorized), "train")  # the seed's layout: raw int32 codes + start offsets
    assert merged.bounds[-1] == len(merged.codes) > 0 and merged.codes.max() < codec.codebook_size

    from transformers import AutoModelForCausalLM, AutoTokenizer

    sft_metrics = [json.loads(line) for line in (tmp_path / "ckpt/sft/metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in sft_metrics if "loss" in r] == [1, 2, 3, 4]
    for source in ("sft", "rlhf"):
        serving = tmp_path / "out" / "export" / source
        model = AutoModelForCausalLM.from_pretrained(serving)
        AutoTokenizer.from_pretrained(serving)
        assert json.loads((serving / "speechlm.json").read_text())["codebook_size"] == codec.codebook_size
        assert model.get_input_embeddings().weight.shape[0] > codec.codebook_size
        assert (tmp_path / "ckpt" / source / "final_model" / "config.json").is_file()

    eval_dir = tmp_path / "out" / "eval"
    results = json.loads((eval_dir / "results.json").read_text())
    for row in ("model", "ground_truth"):
        assert {"wer", "sim", "dnsmos", "rtf"} <= set(results["aggregate"][row])
    assert results["aggregate"]["model"]["items"] == 2
    for item in results["items"]:
        info = sf.info(str(eval_dir / item["model"]["wav"]))
        assert info.samplerate == codec.output_sample_rate and info.duration >= 0.5
    html = (eval_dir / "report.html").read_text()
    for plot in ("curves.png", "spectrogram.png", "histograms.png"):
        assert (eval_dir / plot).is_file() and f'src="{plot}"' in html


@pytest.mark.timeout(1200)
def test_shortened_demo_starts_from_the_shipped_models(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       capsys) -> None:
    """`make demo` (example/demo.yaml), shortened: the shipped SpeechLM fine-tuned on the demo's
    phone-aligned speech with the shipped codec, GRPO'd and evaluated; no codec is trained."""
    monkeypatch.setenv("TTSCTL_HOME", str(tmp_path / "home"))
    monkeypatch.chdir(REPO)
    spec = yaml.safe_load((REPO / "example" / "demo.yaml").read_text())
    assert "codec" not in spec["stages"] and spec["codec_model_path"] == "example/models/codec-small"
    lines = (REPO / "example/configs/speech.jsonl").read_text().splitlines()[:8]
    manifest = tmp_path / "speech.jsonl"
    manifest.write_text("".join(json.dumps({**json.loads(line), "wav_path": str(
        (REPO / "example/configs" / json.loads(line)["wav_path"]).resolve())}) + "\n" for line in lines))
    spec["storage"] = {"data": str(tmp_path / "data"), "checkpoints": str(tmp_path / "ckpt"),
                       "outputs": str(tmp_path / "out")}
    short = {**SHORTEN, "sft": [*SHORTEN["sft"], "training.batch_size=1"],
             "rlhf": [*SHORTEN["rlhf"], "rlhf_training.max_completion_length=200"],
             "eval": ["eval.max_items=2"]}
    for name, stage in spec["stages"].items():
        if isinstance(stage.get("config"), str):
            stage["config"] = str(REPO / "example" / stage["config"])
        stage["overrides"] = [*short.get(name, []), "metrics.port=0"]
    spec["stages"]["vectorize"]["overrides"] += [f"vectorize.dataset_path={manifest}", "vectorize.val_fraction=0"]
    path = tmp_path / "demo.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    assert main(["run", str(path), "--backend", "local"]) == 0
    out = capsys.readouterr().out
    for stage in ("vectorize", "merge", "sft", "export-sft", "rlhf", "export-rlhf", "eval"):
        assert f"<== {stage}: succeeded" in out
    summary = json.loads((tmp_path / "data" / "vectorized" / "vectorize_summary.json").read_text())
    assert summary["accepted"]["total"] == 8 and not summary["notes"].get("approximate_phone_times")
    sft_config = json.loads((tmp_path / "home" / "runs" / "demo" / "configs" / "sft.json").read_text())
    assert sft_config["modeling"]["parameters"]["model_name"] == "example/models/speechlm-small"
    # Fine-tuned from the shipped model: its first loss is a trained model's, not ln(4,096 codes) ~ 8.3.
    first = next(json.loads(line) for line in (tmp_path / "ckpt" / "sft" / "metrics.jsonl").read_text().splitlines()
                 if "loss" in json.loads(line))
    assert first["loss"] < 5.0
    serving = json.loads((tmp_path / "out" / "export" / "rlhf" / "speechlm.json").read_text())
    assert serving["prompt_format"] == "phones"
    results = json.loads((tmp_path / "out" / "eval" / "results.json").read_text())
    assert results["aggregate"]["model"]["items"] == 2 and results["aggregate"]["model"]["failed"] == 0
