"""The recipe of the shipped example models (`make example-models`): its spec plans every stage on the
local backend, its configs are the named presets, and each stage resumes."""

from __future__ import annotations

from pathlib import Path

from controller.plan import build_plan
from controller.spec import load_spec
from trainer.codec import small_codec_config
from trainer.model.build import preset

REPO = Path(__file__).resolve().parents[1]
SPEC = REPO / "example" / "models.yaml"


def test_the_spec_chains_codec_corpus_sft_grpo_and_eval() -> None:
    plan = {run.name: run for run in build_plan(load_spec(SPEC))}
    assert list(plan) == ["codec", "vectorize", "merge", "sft", "export-sft", "rlhf", "export-rlhf", "eval"]
    codec = plan["codec"].config.codec
    assert codec.model == small_codec_config()
    assert codec.train.dataset_path == "runs/example-models/corpus/train.jsonl"
    assert codec.train.eval_list == "runs/example-models/corpus/val.jsonl" and codec.train.resume
    assert plan["vectorize"].config.vectorize.codec_model_path == "runs/example-models/checkpoints/codec/final"
    sft = plan["sft"].config
    assert sft.modeling.parameters.model_name == "small"
    assert sft.modeling.parameters.codebook_size == small_codec_config().codebook_size
    assert sft.checkpointing.resume == "auto" and plan["rlhf"].config.checkpointing.resume == "auto"
    rl = plan["rlhf"].config.rlhf_training
    assert rl.reward_funcs == ["WERRewardFunc", "SimilarityRewardFunc"]
    assert rl.base_model_dir == "runs/example-models/export/sft"
    assert plan["eval"].config.eval.test_list == "runs/example-models/corpus/eval_list.jsonl"


def test_the_small_speechlm_fits_the_shipping_budget() -> None:
    config, _, vocab = preset("small", small_codec_config().codebook_size)
    rows = config.vocab_size * config.hidden_size  # tied: one matrix
    per_layer = 4 * config.hidden_size**2 * (1 + config.num_key_value_heads / config.num_attention_heads) / 2
    per_layer += 3 * config.hidden_size * config.intermediate_size
    parameters = rows + config.num_hidden_layers * per_layer
    assert vocab.codebook_size == 4096 and config.tie_word_embeddings
    # With the float16 codec (~17M parameters, 34 MB) the two ship within example/models' 80 MB.
    assert 4 * parameters + 2 * 17.1e6 < 80e6, parameters
