"""Reference (seed) interop: its configs load and dry-run, each key of its schema is accepted (mapped,
honoured or warned about once by name), typos still fail, the `dataset` filters apply at SFT/RL load,
and its CLI flags have the same effect here."""

from __future__ import annotations

import ast
import json
import logging
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from speechlm_fixtures import sft_config, write_vectorized

from trainer.cli import main
from trainer.config import DatasetConfig, load_config
from trainer.data import filters
from trainer.data.dataset import PackedData
from trainer.errors import ConfigError
from trainer.metrics import read_scalars
from trainer.model.build import build_speechlm
from trainer.model.prompt import PromptFormat
from trainer.rl.prompts import build_prompts

REPO = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).resolve().parent / "fixtures"
# The seed's own file where the shared folder sits beside the checkout (../shared), else its copy below.
SEED_SFT = next(
    (p for p in (REPO.parent / "shared", REPO.parent.parent / "shared")
     if (p / "seed" / "reference" / "example_configs" / "sft.json").exists()),
    REPO.parent / "shared",
) / "seed" / "reference" / "example_configs" / "sft.json"
REFERENCE_MIRROR = Path("/work/.mirror/inworld-ai+tts/repo")
SCHEMA = json.loads((FIXTURES / "reference_schema.json").read_text())
SECTIONS = {"TrainingConfig": "training", "CheckpointingConfig": "checkpointing", "DatasetConfig": "dataset",
            "RLHFConfig": "rlhf_training", "LoraConfig": "lora", "CodecTrainingConfig": "codec",
            "ModelingConfig": "modeling", "ExperimentConfig": ""}
# The reference's own example_configs/sft.json, as the seed ships it (used when the seed copy is absent).
SEED_SFT_JSON = {
    "training": {"seed": 777, "logging_steps": 150, "eval_steps": 300, "gradient_accumulation_steps": 1,
                 "gradient_clip_value": 1.0, "learning_rate": 1e-04, "betas": [0.9, 0.95], "warmup_ratio": 0.05,
                 "batch_size": 4, "weight_decay": 0.1, "precision": "bf16", "strategy": "ddp",
                 "gradient_checkpointing": False, "num_workers": 1},
    "modeling": {"parameters": {"codebook_size": 65536, "max_seq_len": 2048,
                                "model_name": "meta-llama/Llama-3.2-1B-Instruct", "enable_text_normalization": True}},
    "checkpointing": {"save_steps": 10000, "collect_health_stats": False, "save_intermediate_generations": True,
                      "only_load_model_weights": True, "keep_only_last_n_checkpoints": 10,
                      "checkpoint_file_to_resume_from": "/path/to/your/checkpoint.pt"},
    "train_weighted_datasets": {"/path/to/your/vectorized_dataset": 1.0},
    "val_weighted_datasets": {"/path/to/your/vectorized_dataset": 1.0},
    "dataset": {"randomize_slider": 0, "allowed_languages": [], "min_dnsmos_score": 0, "min_sample_rate": 0,
                "enable_rlhf_training": False},
}


@pytest.fixture()
def seed_sft(tmp_path_factory) -> Path:
    if SEED_SFT.exists():
        return SEED_SFT
    path = tmp_path_factory.mktemp("seed") / "sft.json"  # not in the test's tmp_path: it checks nothing is written
    path.write_text(json.dumps(SEED_SFT_JSON))
    return path


def _plan(capsys) -> dict:
    out = capsys.readouterr().out
    return json.loads(out[out.index("{"):])


def _warnings(caplog, name: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and name in r.getMessage()]


# ------------------------------------------------------------------------------------ whole configs
def test_seed_sft_json_loads_and_dry_runs_without_training(seed_sft, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["sft", "--config", str(seed_sft), "--set", "modeling.parameters.model_name=tiny", "--dry_run"]) == 0
    plan = _plan(capsys)
    assert plan["optimizer"]["betas"] == [0.9, 0.95] and plan["optimizer"]["weight_decay"] == 0.1
    assert plan["clipping"] == {"max_grad_norm": None, "gradient_clip_value": 1.0}
    assert plan["schedule"]["warmup"] == "0.05 x total steps"
    assert plan["resume"] == {"source": "/path/to/your/checkpoint.pt", "exists": False, "model_weights_only": True}
    assert plan["batch"]["num_workers"] == 1 and plan["model"]["parameters"] > 0
    assert any("/path/to/your/vectorized_dataset" in p for p in plan["problems"])
    assert list(tmp_path.iterdir()) == []  # nothing written: no run directory, no checkpoint


def test_complete_reference_rlhf_config_dry_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("TTS_VLLM_HOST", raising=False)
    config = FIXTURES / "reference_rlhf.json"
    assert main(["rlhf", "--config", str(config), "--set", "modeling.parameters.model_name=tiny", "--dry_run"]) == 0
    plan = _plan(capsys)
    assert plan["optimizer"]["betas"] == [0.9, 0.99]
    assert plan["grpo"]["num_generations"] == 8 and plan["grpo"]["sampling"]["temperature"] == 1.1
    assert plan["rewards"] == {"funcs": ["WERRewardFunc", "SIMRewardFunc"], "weights": [1.0, 0.5],
                               "asr_backend": "pocketsphinx", "speaker_backend": "resemblyzer"}
    assert any("base_model_dir not found" in p for p in plan["problems"])
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------- every schema key
def _reference_fields() -> dict[str, set[str]]:
    source = subprocess.run(
        ["git", "-C", str(REFERENCE_MIRROR), "show", "HEAD:tts/utils/configuration.py"],
        capture_output=True, text=True, check=True,
    ).stdout
    fields: dict[str, set[str]] = {}
    for node in ast.parse(source).body:
        if isinstance(node, ast.ClassDef) and node.name in SECTIONS:
            fields[SECTIONS[node.name]] = {
                s.target.id for s in node.body if isinstance(s, ast.AnnAssign) and isinstance(s.target, ast.Name)
            }
    return fields


@pytest.mark.skipif(not REFERENCE_MIRROR.exists(), reason="reference source mirror not present")
def test_schema_fixture_lists_exactly_the_reference_fields():
    fields = _reference_fields()
    listed = {section: set(keys) for section, keys in SCHEMA.items() if section != "_comment"}
    listed["modeling"] = {"parameters"}
    assert listed == fields


SCHEMA_KEYS = [
    (section, key, value)
    for section, keys in SCHEMA.items() if section not in ("_comment", "modeling")
    for key, value in keys.items() if value is not None
]


@pytest.mark.parametrize(("section", "key", "value"), SCHEMA_KEYS, ids=[f"{s or 'top'}.{k}" for s, k, _ in SCHEMA_KEYS])
def test_each_reference_key_is_accepted(section, key, value):
    data = {key: value} if not section else {section: {key: value}}
    load_config(data=data)


def test_whole_reference_schema_loads_and_maps_to_our_keys():
    data = {s: v for s, v in SCHEMA.items() if s not in ("_comment", "")}
    data.update({k: v for k, v in SCHEMA[""].items() if v is not None})
    data["codec"] = {"audio_window_size": 48000, "sample_rate": 24000, "hop_length": 480,
                     "minimum_data_sample_rate": 24000, "upsample_factors": None, "kernel_sizes": None}
    c = load_config(data=data)
    t = c.training
    assert (t.adam_beta1, t.adam_beta2, t.warmup_ratio, t.gradient_clip_value, t.weight_decay, t.num_workers) == (
        0.9, 0.95, 0.05, 1.0, 0.1, 1)
    assert t.max_grad_norm == 0  # the reference clips values only
    assert c.checkpointing.only_load_model_weights and c.checkpointing.keep_only_last_n_checkpoints == 10
    assert c.dataset.min_dnsmos_score == 3.0 and c.dataset.min_duration == 1.0
    lora = c.modeling.lora
    assert (lora.enabled, lora.r, lora.alpha, lora.dropout, lora.target_modules, lora.adapter_path) == (
        True, 8, 16, 0.1, ["q_proj", "v_proj"], "/path/to/adapter")
    assert (c.codec.model.sample_rate, c.codec.model.hop_length, c.codec.model.upsample_factors) == (24000, 480, [])
    assert c.codec.train.segment_seconds == 2.0 and c.codec.train.min_sample_rate == 24000


UNHONOURED = [
    ("checkpointing", "directory", "/tmp/x"), ("checkpointing", "collect_health_stats", True),
    ("checkpointing", "save_intermediate_generations", True), ("checkpointing", "validation_type", "random_phrases"),
    ("dataset", "allowed_ift_annotations", ["emotion"]), ("dataset", "total_training_steps", 10),
    ("dataset", "steps_per_epoch", 10), ("dataset", "randomize_slider", 1), ("", "seed", 5), ("", "world_size", 8),
    ("", "model_size", 10), ("", "vocab_size", 10), ("", "wandb_url", "https://x"), ("lora", "bias", "all"),
]


@pytest.mark.parametrize(("section", "key", "value"), UNHONOURED, ids=[f"{s or 'top'}.{k}" for s, k, _ in UNHONOURED])
def test_unhonoured_key_warns_exactly_once_by_name(section, key, value, caplog):
    data = {key: value} if not section else {section: {key: value}}
    with caplog.at_level(logging.WARNING):
        load_config(data=data)
    name = f"{section}.{key}" if section else key
    assert len(_warnings(caplog, f"{name}")) == 1, caplog.text
    assert "not honoured" in _warnings(caplog, name)[0]


def test_unhonoured_keys_asking_for_nothing_do_not_warn(caplog):
    with caplog.at_level(logging.WARNING):
        load_config(data={"checkpointing": {"collect_health_stats": False, "directory": None}})
    assert not _warnings(caplog, "checkpointing.")


def test_stage_dependent_key_warns_once_through_the_cli(tmp_path, monkeypatch, capsys, caplog):
    monkeypatch.chdir(tmp_path)
    with caplog.at_level(logging.WARNING):
        assert main(["rlhf", "--config", str(FIXTURES / "reference_rlhf.json"), "--dry_run"]) == 0
    assert len(_warnings(caplog, "training.gradient_clip_value")) == 1


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"training": {"betas": [0.9, 0.95], "gradient_clip_valu": 1.0}}, "training.gradient_clip_valu: extra inputs"),
        ({"checkpointing": {"colect_health_stats": True}}, "checkpointing.colect_health_stats: extra inputs"),
        ({"dataset": {"min_dnsmos_scor": 3.0}}, "dataset.min_dnsmos_scor: extra inputs"),
        ({"lora": {"r": 8, "lora_alph": 16}}, "lora.lora_alph: not a key"),
        ({"codec": {"sample_rate": 16000, "audio_windw_size": 1}}, "codec.audio_windw_size: extra inputs"),
        ({"training": {"betas": [0.9]}}, "training.betas: expected two numbers"),
        ({"training": {"betas": [0.9, 0.95], "adam_beta1": 0.8}}, "disagree"),
        ({"training": {"warmup_ratio": 0.1, "warmup_steps": 5}}, "warmup_steps and warmup_ratio"),
    ],
)
def test_typos_and_bad_reference_values_still_fail_with_the_path(data, message):
    with pytest.raises(ConfigError, match=message):
        load_config(data=data)


def test_typo_fails_through_the_cli_with_exit_2(tmp_path, capsys):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({**SEED_SFT_JSON, "checkpointing": {"save_step": 5}}))
    assert main(["sft", "--config", str(path), "--dry_run"]) == 2
    assert "checkpointing.save_step: extra inputs are not permitted" in capsys.readouterr().err


# ------------------------------------------------------------------------------------- data filters
def test_allowed_languages_empty_or_null_keeps_every_line():
    for allowed in ([], None):
        config = DatasetConfig(allowed_languages=allowed)
        assert config.allowed_languages is None
        for language in ("en", "fr", "zh", "unknown"):
            record = {"transcript": "Hello there.", "language": language, "wav_path": "a.wav", "duration": 1.0,
                      "sample_rate": 16000}
            assert filters.check_record(record, config) is None


def _scored_data(root: Path) -> tuple[Path, set[int]]:
    """Vectorized data whose train records carry dnsmos_mos_ovr (every third one low) and 'fr' for a few."""
    data = write_vectorized(root)
    path = data / "train_samples.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines()]
    low = set(range(0, len(records), 3))
    for k, record in enumerate(records):
        record["dnsmos_mos_ovr"] = 2.0 if k in low else 3.5
        record["language"] = "fr" if k % 5 == 1 else "en"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return data, low


def test_min_dnsmos_score_filters_on_dnsmos_mos_ovr_at_sft_load(tmp_path, capsys):
    data, low = _scored_data(tmp_path / "vec")
    config = sft_config(data, tmp_path / "out")
    config["val_weighted_datasets"] = {}
    config["dataset"] = {"min_dnsmos_score": 3.0, "allowed_languages": []}
    path = tmp_path / "sft.json"
    path.write_text(json.dumps(config))
    assert main(["sft", "--config", str(path), "--dry_run"]) == 0
    plan = _plan(capsys)
    (train,) = plan["data"]["train"]
    assert train["samples"] == 48 and train["kept_by_filters"] == 48 - len(low)
    assert plan["problems"] == [] and np.isfinite(plan["first_batch_loss"])
    assert not (tmp_path / "out" / "t" / "checkpoints").exists()

    # What training iterates: never a rejected sample.
    _, tokenizer, vocab = build_speechlm("tiny", 64)
    packed = PackedData({str(data): 1.0}, "train", PromptFormat(tokenizer, vocab), max_seq_len=256, pack_length=256,
                        batch_size=2, dataset_filter=DatasetConfig(min_dnsmos_score=3.0))
    used = {k for row in packed.rows(0) for _, k in row}
    assert used and not used & low
    unfiltered = PackedData({str(data): 1.0}, "train", PromptFormat(tokenizer, vocab), max_seq_len=256,
                            pack_length=256, batch_size=2, dataset_filter=DatasetConfig())
    assert {k for row in unfiltered.rows(0) for _, k in row} & low


def test_dataset_filters_apply_to_rl_prompts(tmp_path):
    data, low = _scored_data(tmp_path / "vec")
    _, tokenizer, vocab = build_speechlm("tiny", 64)
    fmt = PromptFormat(tokenizer, vocab)
    everything = build_prompts({str(data): 1.0}, "train", fmt, 100_000, DatasetConfig(allowed_languages=[]), seed=0)
    assert len(everything) == 48
    kept = build_prompts({str(data): 1.0}, "train", fmt, 100_000,
                         DatasetConfig(min_dnsmos_score=3.0, allowed_languages=["en"]), seed=0)
    references = {int(p.reference_key.rsplit("#", 1)[1]) for p in kept}
    assert len(kept) == len(references) == sum(1 for k in range(48) if k not in low and k % 5 != 1)
    assert not references & low


# ----------------------------------------------------------------------- honoured training keys
def test_reference_training_keys_drive_optimizer_schedule_clipping_and_weights_only_resume(tmp_path, caplog):
    data = write_vectorized(tmp_path / "vec")
    config = sft_config(data, tmp_path / "a", max_steps=4, warmup_steps=0, logging_steps=1)
    config["training"].update(betas=[0.8, 0.9], weight_decay=0.2, warmup_ratio=0.5, gradient_clip_value=1e-7)
    config["checkpointing"] = {"save_steps": 2, "keep_only_last_n_checkpoints": None}
    config["val_weighted_datasets"] = {}
    (tmp_path / "a.json").write_text(json.dumps(config))
    assert main(["sft", "--config", str(tmp_path / "a.json")]) == 0
    run = tmp_path / "a" / "t"
    scalars = [r for r in read_scalars(str(run / "metrics.jsonl")) if "lr" in r]
    lr = {r["step"]: r["lr"] for r in scalars}
    assert lr[1] < lr[2] == pytest.approx(3e-3)  # warmup_ratio 0.5 of 4 steps: 2 warmup steps
    n_params = sum(p.numel() for p in build_speechlm("tiny", 64)[0].parameters())
    assert all(r["grad_norm"] <= 1e-7 * n_params**0.5 * 1.001 for r in scalars)  # element-wise clip to 1e-7
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_2", "step_4"]  # keep all (null)
    optimizer = torch.load(run / "checkpoints" / "step_4" / "resume" / "optimizer.pt", weights_only=False)
    groups = optimizer["param_groups"]
    assert {tuple(g["betas"]) for g in groups} == {(0.8, 0.9)} and {g["weight_decay"] for g in groups} == {0.2, 0.0}

    # only_load_model_weights: start from step_4's weights with a fresh schedule (steps 1.. again).
    config_b = sft_config(data, tmp_path / "b", max_steps=2, logging_steps=1)
    config_b["val_weighted_datasets"] = {}
    start = str(run / "checkpoints" / "step_4")
    config_b["checkpointing"] = {"save_steps": 100, "checkpoint_file_to_resume_from": start,
                                 "only_load_model_weights": True}
    (tmp_path / "b.json").write_text(json.dumps(config_b))
    with caplog.at_level(logging.INFO):
        assert main(["sft", "--config", str(tmp_path / "b.json")]) == 0
    steps_b = [r["step"] for r in read_scalars(str(tmp_path / "b" / "t" / "metrics.jsonl")) if "loss" in r]
    assert steps_b == [1, 2] and "started from the model weights of" in caplog.text


# ---------------------------------------------------------------------------------- CLI flags
def test_sft_reference_flags(tmp_path, capsys, monkeypatch):
    data = write_vectorized(tmp_path / "vec")
    config = sft_config(data, tmp_path / "ignored", max_steps=1)
    config["val_weighted_datasets"] = {}
    (tmp_path / "c.json").write_text(json.dumps(config))
    args = ["sft", "--config", str(tmp_path / "c.json"), "--experiment_dir", str(tmp_path / "exp"),
            "--run_name", "r1", "--seed", "5", "--project_name", "proj"]
    assert main([*args, "--dry_run"]) == 0
    plan = _plan(capsys)
    assert plan["run_dir"] == str(tmp_path / "exp" / "r1") and plan["seed"] == 5
    assert plan["logging"]["project_name"] == "proj"
    assert main(args) == 0  # a real run writes under <experiment_dir>/<run_name>
    assert (tmp_path / "exp" / "r1" / "final_model" / "config.json").exists()
    assert not (tmp_path / "ignored").exists()

    assert main([*args, "--pretraining_mode"]) == 2
    assert "--pretraining_mode is not supported" in capsys.readouterr().err


def test_rlhf_reference_flags(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("TTS_VLLM_HOST", raising=False)
    args = ["rlhf", "--config", str(FIXTURES / "reference_rlhf.json"), "--experiment_dir", str(tmp_path / "exp"),
            "--run_name", "g", "--project_name", "proj", "--use_wandb", "--vllm_server_host", "10.1.2.3",
            "--vllm_server_timeout", "1800", "--dry_run"]
    assert main(args) == 0
    plan = _plan(capsys)
    assert plan["run_dir"] == str(tmp_path / "exp" / "g")
    assert plan["logging"]["wandb"] is True and plan["logging"]["project_name"] == "proj"
    assert plan["grpo"]["vllm_server"]["url"].startswith("http://10.1.2.3:")
    assert plan["grpo"]["vllm_server"]["timeout_s"] == 1800


CODEC_MANIFEST = REPO / "example" / "configs" / "samples.jsonl"
TINY_CODEC = [
    "codec.model.fsq_levels=[4,4,4,4]", "codec.model.encoder_channels=4", "codec.model.encoder_dim=64",
    "codec.model.encoder_antialias=false", "codec.model.quantizer_dim=64", "codec.model.decoder_dim=64",
    "codec.model.decoder_layers=2", "codec.model.decoder_heads=4", "metrics.port=0",
    "codec.train.batch_size=2", "codec.train.segment_seconds=0.4", "codec.train.precision=fp32",
    "codec.train.mpd_periods=[2]", "codec.train.stft_disc_fft_sizes=[206]", "codec.train.disc_channels=8",
]


@pytest.mark.skipif(not CODEC_MANIFEST.exists(), reason="example dataset not generated")
def test_codec_train_reference_flags(tmp_path, capsys, caplog):
    sets = [arg for s in [*TINY_CODEC, f"codec.train.dataset_path={CODEC_MANIFEST}"] for arg in ("--set", s)]
    args = ["codec-train", *sets, "--experiment_dir", str(tmp_path / "exp"), "--run_name", "c1", "--seed", "3"]
    with caplog.at_level(logging.WARNING):
        assert main([*args, "--dry_run", "--use_wandb", "--project_name", "p"]) == 0
    out = capsys.readouterr().out
    report = json.loads(out[out.index("{"):])
    assert report["output_dir"] == str(tmp_path / "exp" / "c1") and np.isfinite(report["mel_loss"])
    assert not (tmp_path / "exp").exists()  # the dry run writes nothing
    assert len(_warnings(caplog, "--use_wandb")) == 1 and len(_warnings(caplog, "--project_name")) == 1

    # min_sample_rate (the reference's codec.minimum_data_sample_rate): every example clip is 16 kHz.
    assert main([*args, "--dry_run", "--set", "codec.train.min_sample_rate=24000"]) == 1
    assert "lists no audio at >= 24000 Hz" in capsys.readouterr().err
