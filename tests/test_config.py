"""Config loading: the example and seed configs load; bad keys/values fail with the key path."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from trainer.config import TrainerConfig, apply_overrides, load_config, parse_override
from trainer.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]

# The seed README's SFT and RLHF configs, verbatim in shape.
SEED_SFT = {
    "training": {"seed": 777, "logging_steps": 150, "eval_steps": 300, "learning_rate": 1e-04,
                 "batch_size": 4, "precision": "bf16", "strategy": "ddp"},
    "modeling": {"parameters": {"codebook_size": 65536, "max_seq_len": 2048,
                                "model_name": "meta-llama/Llama-3.2-1B-Instruct",
                                "enable_text_normalization": True}},
    "checkpointing": {"save_steps": 10000, "keep_only_last_n_checkpoints": 10},
    "train_weighted_datasets": {"/path/to/your/vectorized_dataset": 1.0},
    "val_weighted_datasets": {"/path/to/your/vectorized_dataset": 1.0},
    "dataset": {"enable_rlhf_training": False},
}
SEED_RLHF = {
    "training": {"seed": 777, "logging_steps": 50, "eval_steps": 100, "learning_rate": 5e-06,
                 "batch_size": 2, "precision": "bf16", "strategy": "ddp"},
    "rlhf_training": {"base_model_dir": "/path/to/your/serving/model", "top_p": 0.9, "top_k": 75,
                      "repetition_penalty": 1.1, "temperature": 1.1, "num_generations": 8,
                      "max_prompt_length": 1024, "max_completion_length": 1024,
                      "min_completion_length": 25, "use_vllm": True, "reward_funcs": ["WERRewardFunc"],
                      "reward_weights": [1.0], "save_completions_steps": 50,
                      "per_device_train_batch_size": 4, "num_iterations": 1, "scale_rewards": False,
                      "kl_beta": 0.04},
    "train_weighted_datasets": {"/path/to/your/vectorized_dataset": 1.0},
    "val_weighted_datasets": {"/path/to/your/vectorized_dataset": 1.0},
    "dataset": {"enable_rlhf_training": True,
                "allowed_languages": ["en", "es", "fr", "de", "it", "pt", "ru", "zh", "ko", "ja", "nl", "pl"]},
}


@pytest.mark.parametrize("seed", [SEED_SFT, SEED_RLHF], ids=["sft", "rlhf"])
def test_seed_configs_load_unchanged(tmp_path: Path, seed: dict) -> None:
    path = tmp_path / "seed.json"
    path.write_text(json.dumps(seed))
    config = load_config(path)
    assert config.training.learning_rate == seed["training"]["learning_rate"]
    assert config.train_weighted_datasets == seed["train_weighted_datasets"]


def test_example_configs_load() -> None:
    configs = sorted((REPO / "example" / "configs").glob("*.json")) + sorted(
        (REPO / "example" / "configs").glob("*.yaml")
    )
    assert any(p.name == "sft.json" for p in configs) and any(p.name == "rlhf.json" for p in configs)
    for path in configs:
        config = load_config(path)
        assert isinstance(config, TrainerConfig)
    sft = load_config(REPO / "example" / "configs" / "sft.json")
    assert sft.modeling.parameters.model_name == "tiny"


def test_yaml_and_json_give_the_same_config(tmp_path: Path) -> None:
    import yaml

    (tmp_path / "a.json").write_text(json.dumps(SEED_SFT))
    (tmp_path / "a.yaml").write_text(yaml.safe_dump(SEED_SFT))
    assert load_config(tmp_path / "a.json") == load_config(tmp_path / "a.yaml")


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"training": {"lerning_rate": 1e-4}}, "training.lerning_rate: extra inputs are not permitted"),
        ({"training": {"learning_rate": "fast"}}, "training.learning_rate: input should be a valid number"),
        ({"training": {"learning_rate": -1}}, "training.learning_rate: input should be greater than 0"),
        ({"training": {"precision": "fp8"}}, "training.precision: input should be 'bf16', 'fp32' or 'fp16'"),
        ({"training": {"strategy": "horovod"}}, "training.strategy: input should be 'ddp', 'fsdp'"),
        ({"modeling": {"parameters": {"codebook_size": 0}}}, "modeling.parameters.codebook_size"),
        ({"bogus_section": {}}, "bogus_section: extra inputs are not permitted"),
        ({"train_weighted_datasets": {"/d": -1.0}}, "train_weighted_datasets: weight of '/d' must be > 0"),
        ({"rlhf_training": {"reward_funcs": ["A", "B"], "reward_weights": [1.0]}},
         "rlhf_training: reward_weights has 1 entries but reward_funcs has 2"),
        ({"codec": {"model": {"sample_rate": 24000, "hop_length": 320}}},
         "codec.model: sample_rate / hop_length / prod(upsample_factors) must equal token_rate"),
    ],
)
def test_bad_key_or_value_names_the_path(data: dict, expected: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(data=data)
    assert expected in str(err.value)


def test_overrides_are_typed() -> None:
    assert parse_override("training.learning_rate=3e-4") == (["training", "learning_rate"], 3e-4)
    assert parse_override("training.compile_model=true") == (["training", "compile_model"], True)
    assert parse_override("training.run_name=exp1") == (["training", "run_name"], "exp1")
    assert parse_override('dataset.allowed_languages=["en","de"]')[1] == ["en", "de"]
    config = load_config(data=SEED_SFT, overrides=["training.batch_size=16", "training.strategy=fsdp"])
    assert config.training.batch_size == 16 and config.training.strategy == "fsdp"


def test_override_keys_with_dots_address_dataset_paths() -> None:
    override = "train_weighted_datasets./path/to/your/vectorized_dataset=2.5"
    raw = apply_overrides(json.loads(json.dumps(SEED_SFT)), [override])
    assert raw["train_weighted_datasets"] == {"/path/to/your/vectorized_dataset": 2.5}
    raw = apply_overrides({}, ["train_weighted_datasets.gs://bucket/data.v2=1.5"])
    assert raw == {"train_weighted_datasets": {"gs://bucket/data.v2": 1.5}}


def test_bad_override_syntax() -> None:
    with pytest.raises(ConfigError, match=r"expected key\.path=value"):
        load_config(data={}, overrides=["training.learning_rate"])
    with pytest.raises(ConfigError, match=r"training\.seed is not a section"):
        load_config(data={"training": {"seed": 1}}, overrides=["training.seed.x=2"])


def test_unreadable_config_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_config(tmp_path / "broken.json")
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(tmp_path / "list.yaml")


def test_cli_prints_key_path_and_exits_2(tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"training": {"lerning_rate": 1e-4}}))
    proc = subprocess.run(
        [sys.executable, "-m", "trainer", "merge", "--config", str(path)],
        capture_output=True, text=True, cwd=REPO,
    )
    assert proc.returncode == 2
    assert "training.lerning_rate: extra inputs are not permitted" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_cli_help_lists_stages() -> None:
    for cmd, names in (
        (["tts-train", "--help"], ["vectorize", "merge", "sft", "rlhf", "codec-train", "export", "infer", "eval"]),
        (["ttsctl", "--help"], ["validate", "render", "run", "submit", "status", "logs", "wait", "cancel", "list"]),
    ):
        exe = Path(sys.executable).parent / cmd[0]
        proc = subprocess.run([str(exe), *cmd[1:]], capture_output=True, text=True, cwd=REPO)
        assert proc.returncode == 0, proc.stderr
        for name in names:
            assert name in proc.stdout
