"""GRPO (`tts-train rlhf`): prompt building, sampling constraints, vLLM server plumbing, and a real
3-step run of a tiny policy with real rewards that writes checkpoints, metrics and a final model."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from speech_fixtures import make_codec, make_dataset, make_model

from trainer.cli import main
from trainer.config import DatasetConfig, RlhfConfig, load_config
from trainer.data.shards import read_shard
from trainer.errors import ConfigError, StageError
from trainer.metrics import read_scalars
from trainer.model.build import load_speechlm
from trainer.model.lora import added_token_rows
from trainer.model.prompt import PromptFormat
from trainer.rl import grpo, rollout
from trainer.rl.prompts import build_prompts
from trainer.rl.trl_rewards import TrlRewards


@pytest.fixture(scope="module")
def artefacts(tmp_path_factory):
    root = tmp_path_factory.mktemp("grpo")
    codec = make_codec(root / "codec")
    model = make_model(root / "model", codec)
    data = make_dataset(root / "data", codec)
    return root, codec, model, data


def _settings(root, model, data, **extra) -> list[str]:
    values = {
        "rlhf_training.base_model_dir": str(model),
        "train_weighted_datasets": {str(data): 1.0},
        "val_weighted_datasets": {str(data): 1.0},
        "rlhf_training.num_generations": 4,
        "rlhf_training.per_device_train_batch_size": 4,
        "rlhf_training.max_completion_length": 15,
        "rlhf_training.min_completion_length": 3,
        "rlhf_training.reward_funcs": ["WERRewardFunc", "SimilarityRewardFunc", "DNSMOSRewardFunc",
                                       "TruncationRewardFunc"],
        "rlhf_training.guard_rail_steps": 3,
        "rlhf_training.guard_rail_samples": 2,
        # A random policy rarely says speech-end: keep truncated completions in the loss so it learns.
        "rlhf_training.mask_truncated_completions": False,
        "training.learning_rate": 1e-2,
        "training.logging_steps": 1,
        "training.precision": "fp32",
        "training.output_dir": str(root / "out"),
        "training.run_name": "rl",
        "checkpointing.save_steps": 3,
        "rlhf_training.save_completions_steps": 3,
        "metrics.port": 0,
        **extra,
    }
    return [f"{k}={json.dumps(v)}" for k, v in values.items()]


def _overrides(root, model, data, **extra) -> list[str]:
    return [arg for setting in _settings(root, model, data, **extra) for arg in ("--set", setting)]


def test_prompts_pair_reference_with_next_sample_of_the_shard(artefacts):
    _, _, model, data = artefacts
    _, tokenizer, vocab = load_speechlm(str(model))
    fmt = PromptFormat(tokenizer, vocab)
    shard = read_shard(str(data), "train", 0)
    prompts = build_prompts({str(data): 1.0}, "train", fmt, 100_000, None, seed=0)
    assert len(prompts) == len(shard)
    for p in prompts:
        k = int(p.reference_key.rsplit("#", 1)[1])
        assert p.reference_text == shard.records[k]["transcript"]
        assert p.target_text == shard.records[(k + 1) % len(shard)]["transcript"]
        assert p.prompt_codes == shard.sample(k).tolist()
        assert p.prompt.endswith("".join(f"<|s_{c}|>" for c in p.prompt_codes[-3:]))
    shortest = min(len(fmt.inference_prompt(p.target_text, p.reference_text, np.asarray(p.prompt_codes)))
                   for p in prompts)
    assert len(build_prompts({str(data): 1.0}, "train", fmt, shortest, None, seed=0)) < len(prompts)
    with pytest.raises(Exception, match="no usable GRPO prompts"):
        build_prompts({str(data): 1.0}, "train", fmt, 100_000, DatasetConfig(allowed_languages=["zh"]), seed=0)


def test_generation_is_restricted_to_audio_tokens_and_min_length(artefacts):
    _, _, model_dir, _ = artefacts
    model, tokenizer, vocab = load_speechlm(str(model_dir))
    kwargs = rollout.hf_generation_kwargs(vocab, model.get_input_embeddings().weight.shape[0], min_new_tokens=5)
    allowed = set(vocab.completion_ids())
    # Bias sampling hard towards speech-end and a text token: the constraints must still win.
    bias = {(vocab.speech_end_id,): 30.0, (5,): 60.0}
    torch.manual_seed(0)
    out = model.generate(torch.tensor([[tokenizer.bos_token_id, 7, 8]]), do_sample=True, max_new_tokens=12,
                         eos_token_id=vocab.speech_end_id, pad_token_id=vocab.pad_token_id, sequence_bias=bias,
                         **kwargs)
    generated = out[0, 3:].tolist()
    assert set(generated) <= allowed
    assert generated.index(vocab.speech_end_id) == 5  # suppressed until min length, then near-certain
    server = rollout.vllm_sampling_kwargs(vocab, 7)
    assert server["min_tokens"] == 7 and server["stop_token_ids"] == [vocab.speech_end_id]
    assert set(server["allowed_token_ids"]) == allowed


def test_vllm_server_settings_come_from_config_then_environment():
    config = RlhfConfig(vllm_server_host="rollout.tts.svc", vllm_server_port=8000, vllm_group_port=51216)
    assert rollout.vllm_server(config, {}).base_url == "http://rollout.tts.svc:8000"
    env = {"TTS_VLLM_HOST": "10.1.2.3", "TTS_VLLM_PORT": "9000", "TTS_VLLM_GROUP_PORT": "52000"}
    server = rollout.vllm_server(config, env)
    assert (server.host, server.port, server.group_port) == ("10.1.2.3", 9000, 52000)
    with pytest.raises(ConfigError, match="TTS_VLLM_PORT"):
        rollout.vllm_server(config, {"TTS_VLLM_PORT": "eighty"})
    with pytest.raises(ConfigError, match="both"):
        rollout.vllm_server(config, {"TTS_VLLM_GROUP_PORT": "8000"})


def test_grpo_args_server_mode_and_field_defaults(artefacts, monkeypatch):
    root, _, model, data = artefacts
    monkeypatch.setenv("TTS_VLLM_HOST", "rollout-0.rollout")
    monkeypatch.setenv("TTS_VLLM_GROUP_PORT", "52000")
    config = load_config(overrides=_settings(root, model, data, **{"rlhf_training.use_vllm": True,
                                                                  "rlhf_training.weight_sync": "nccl"}))
    _, _, vocab = load_speechlm(str(model))
    args = grpo.grpo_args(config, str(root / "hf"), vocab, 4096)
    assert args.use_vllm and args.vllm_mode == "server"
    assert args.vllm_server_base_url == "http://rollout-0.rollout:8000"
    assert args.generation_kwargs["stop_token_ids"] == [vocab.speech_end_id]
    assert args.generation_kwargs["min_tokens"] == 3
    if rollout.TRL_1:  # the resolved group port goes to trl 1.x's config, its logprob reweighting stays off
        assert args.vllm_group_port == 52000 and not args.vllm_importance_sampling_correction
    defaults = grpo.grpo_args(load_config(overrides=_settings(root, model, data, **{
        "rlhf_training.mask_truncated_completions": True})), str(root / "hf"), vocab, 4096)
    # trl 1.x spells scale_rewards False "none" and has no max_prompt_length (it never cuts a prompt).
    assert (defaults.beta, defaults.loss_type) == (0.0, "dr_grpo") and defaults.scale_rewards in (False, "none")
    assert defaults.mask_truncated_completions and not defaults.use_vllm
    assert defaults.generation_kwargs["min_new_tokens"] == 3 and getattr(defaults, "max_prompt_length", None) is None
    assert vocab.speech_end_id not in defaults.generation_kwargs["suppress_tokens"]
    # The storage weight sync samples through the policy's generate (our server client): TRL's vLLM is off.
    storage = grpo.grpo_args(load_config(overrides=_settings(root, model, data, **{"rlhf_training.use_vllm": True})),
                             str(root / "hf"), vocab, 4096)
    assert not storage.use_vllm and storage.generation_kwargs["min_new_tokens"] == 3



def test_config_errors_before_any_work(artefacts, capsys):
    root, _, model, data = artefacts
    assert main(["rlhf", *_overrides(root, model, data, **{"rlhf_training.num_generations": 3})]) == 2
    assert "divisible by num_generations" in capsys.readouterr().err
    assert main(["rlhf", *_overrides(root, model, data, **{"rlhf_training.base_model_dir": str(root / "x")})]) == 2
    assert main(["rlhf", *_overrides(root, model, data, **{"rlhf_training.reward_funcs": ["Nope"]})]) == 2
    if not torch.cuda.is_available():
        assert main(["rlhf", *_overrides(root, model, data, **{"rlhf_training.use_vllm": True,
                                                               "rlhf_training.weight_sync": "nccl"})]) == 2
        assert "use_vllm needs a CUDA trainer" in capsys.readouterr().err
    assert main(["rlhf", *_overrides(root, model, data, **{"rlhf_training.use_vllm": True,
                                                           "modeling.lora.enabled": True})]) == 2
    assert "weight_sync storage publishes whole weights" in capsys.readouterr().err


def test_reward_adapter_scores_each_batch_once():
    class FakeScorer:
        names = ("A", "B")
        calls = 0

        def score(self, codes, prompt_codes, targets, refs, languages, reference_keys, truncated):
            FakeScorer.calls += 1
            n = len(codes)
            from trainer.rl.rewards.scorer import ScoreResult

            return ScoreResult({"A": np.full(n, 0.25), "B": np.asarray(truncated, float)}, {}, np.zeros(n),
                               batch=None, seconds={"decode": 0.0})

    from trainer.model.vocab import AudioVocab

    vocab = AudioVocab(audio_offset=10, codebook_size=4, prompt_format="inworld",
                       special_tokens={"<|speech_end|>": 9}, speech_end="<|speech_end|>")
    funcs = TrlRewards(FakeScorer(), vocab).functions()
    batch = dict(prompts=["p"] * 2, completions=["", ""], completion_ids=[[10, 11, 9], [12, 13]],
                 prompt_codes=[[1], [1]], reference_key=["k", "k"], reference_text=["r", "r"],
                 target_text=["t", "t"], language=["en", "en"])
    assert [f.__name__ for f in funcs] == ["A", "B"]
    assert funcs[0](**batch) == [0.25, 0.25]
    assert funcs[1](**batch) == [0.0, 1.0]  # second completion never said speech-end
    assert FakeScorer.calls == 1


def test_three_grpo_steps_end_to_end(artefacts):
    root, _, model_dir, data = artefacts
    assert main(["rlhf", *_overrides(root, model_dir, data, **{"rlhf_training.max_steps": 3})]) == 0
    run = root / "out" / "rl"
    step = run / "checkpoints" / "step_3"
    assert (step / "_COMPLETE").exists() and (step / "model.safetensors").exists()
    assert (step / "speechlm.json").exists() and (step / "optimizer.pt").exists()
    final = run / "final_model"
    assert (final / "_COMPLETE").exists()
    # A step checkpoint carries the model's own tokenizer (as final_model and SFT's do), not the copy TRL
    # samples with (eos = speech-end, left padding): an export of either serves the same.
    # (transformers 5 no longer writes special_tokens_map.json: compare whichever files this version writes.)
    tok_files = {p.name for p in final.iterdir() if p.name.startswith(("tokenizer", "special_tokens"))}
    assert {"tokenizer_config.json", "tokenizer.json"} <= tok_files
    assert {p.name for p in step.iterdir() if p.name.startswith(("tokenizer", "special_tokens"))} == tok_files
    for name in sorted(tok_files):
        assert json.loads((step / name).read_text()) == json.loads((final / name).read_text()), name
    trained, _, vocab = load_speechlm(str(final))
    base, _, base_vocab = load_speechlm(str(model_dir))
    assert vocab == base_vocab
    changed = [k for k, v in base.state_dict().items() if not torch.equal(v, trained.state_dict()[k])]
    assert changed, "three optimiser steps left every weight unchanged"
    rows = read_scalars(str(run / "metrics.jsonl"))
    train_rows = [r for r in rows if "reward" in r]
    assert [r["step"] for r in train_rows] == [1, 2, 3]
    for row in train_rows:
        for name in ("WERRewardFunc", "SimilarityRewardFunc", "DNSMOSRewardFunc", "TruncationRewardFunc"):
            assert 0.0 <= row[f"rewards/{name}/mean"] <= 1.0
        assert 3 <= row["completions/mean_length"] <= 15
        assert row["timing/rollout_seconds"] > 0
    saved = [json.loads(line) for line in (run / "completions" / "step_3" / "completions.jsonl").open()]
    assert len(saved) == 4 and all(0 <= r["reward/WERRewardFunc"] <= 1 for r in saved)
    assert all((run / "completions" / "step_3" / f"{r['index']:03d}.wav").exists() for r in saved if r["seconds"])
    guard = [r for r in rows if "guard/wer" in r]
    assert guard and guard[-1]["step"] == 3
    assert 0 <= guard[-1]["guard/sim"] <= 1 and guard[-1]["guard/dnsmos"] >= 1

    # Resume: a longer run picks up the published step_3 and only does the missing step.
    assert main(["rlhf", *_overrides(root, model_dir, data, **{
        "rlhf_training.max_steps": 4, "rlhf_training.reward_funcs": ["TruncationRewardFunc"],
        "rlhf_training.guard_rail_steps": 100})]) == 0
    steps = [r["step"] for r in read_scalars(str(run / "metrics.jsonl")) if "reward" in r]
    assert steps == [1, 2, 3, 4]


def test_save_best_keeps_the_lowest_guard_wer_policy_across_a_resume(artefacts, tmp_path):
    """checkpointing.save_best in GRPO: <run>/best_model is the policy of the lowest guard/wer so far (the first
    of equals) with best.json (step, guard/wer), the same weights as that step's checkpoint; a resumed run
    competes with the best model it already published instead of starting afresh."""
    root, _, model_dir, data = artefacts
    settings = {"rlhf_training.reward_funcs": ["SimilarityRewardFunc"], "rlhf_training.guard_rail_steps": 1,
                "rlhf_training.guard_rail_decoding": "greedy", "checkpointing.save_best": True,
                "checkpointing.save_steps": 1, "checkpointing.keep_only_last_n_checkpoints": None,
                "training.output_dir": str(tmp_path)}
    run = tmp_path / "rl"

    def check(steps: list[int]) -> None:
        guard = [(r["step"], r["guard/wer"]) for r in read_scalars(str(run / "metrics.jsonl")) if "guard/wer" in r]
        assert [step for step, _ in guard] == steps
        best_step, best_wer = min(guard, key=lambda row: row[1])  # min() keeps the first of equals
        record = json.loads((run / "best_model" / "best.json").read_text())
        assert record == {"step": best_step, "guard/wer": pytest.approx(best_wer)}
        best = load_speechlm(str(run / "best_model"))[0].state_dict()
        at_step = load_speechlm(str(run / "checkpoints" / f"step_{best_step}"))[0].state_dict()
        assert all(torch.equal(best[k], at_step[k]) for k in at_step)

    assert main(["rlhf", *_overrides(root, model_dir, data, **settings, **{"rlhf_training.max_steps": 3})]) == 0
    assert (run / "best_model" / "_COMPLETE").exists()
    check([1, 2, 3])
    assert main(["rlhf", *_overrides(root, model_dir, data, **settings, **{"rlhf_training.max_steps": 5})]) == 0
    check([1, 2, 3, 4, 5])


def test_guard_rails_decode_as_the_rollouts_sample_or_greedily(artefacts):
    _, _, model_dir, _ = artefacts
    model, _, vocab = load_speechlm(str(model_dir))
    rows = model.get_input_embeddings().weight.shape[0]
    rl = RlhfConfig(sampling={"temperature": 0.5, "top_p": 0.9})
    sampled = grpo._guard_generation(rl, vocab, rows)
    greedy = grpo._guard_generation(rl.model_copy(update={"guard_rail_decoding": "greedy"}), vocab, rows)
    assert sampled["do_sample"] is True and (sampled["temperature"], sampled["top_p"]) == (0.5, 0.9)
    assert greedy["do_sample"] is False and not {"temperature", "top_p", "top_k"} & set(greedy)
    # Both under the rollouts' constraints (audio tokens only, speech-end at the end).
    assert {k: v for k, v in greedy.items() if k != "do_sample"} == {
        k: v for k, v in sampled.items() if k not in ("do_sample", "temperature", "top_p", "top_k")}


def test_lora_grpo_trains_the_added_rows_and_merges_into_the_final_model(artefacts, tmp_path):
    """GRPO under LoRA uses SFT's adapter: the audio rows (and the prompt tags) train with the LoRA
    matrices, the text rows and the untargeted layers stay as they were, and the final model is merged."""
    root, _, model_dir, data = artefacts
    # A continuous reward: equal rewards in a group give zero advantages and no gradient at all.
    settings = {"rlhf_training.max_steps": 2, "rlhf_training.reward_funcs": ["SimilarityRewardFunc"],
                "rlhf_training.guard_rail_steps": 100, "training.output_dir": str(tmp_path),
                "modeling.lora": {"enabled": True, "r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}}
    assert main(["rlhf", *_overrides(root, model_dir, data, **settings)]) == 0
    trained, _, vocab = load_speechlm(str(tmp_path / "rl" / "final_model"))
    base, _, _ = load_speechlm(str(model_dir))
    assert not any("lora" in k for k in trained.state_dict())
    added = torch.tensor(added_token_rows(vocab))
    text = torch.tensor(sorted(set(range(vocab.audio_offset)) - set(added.tolist())))
    rows, base_rows = trained.get_input_embeddings().weight, base.get_input_embeddings().weight
    assert not torch.equal(rows[added], base_rows[added])  # frozen before: GRPO could not move the codes
    assert torch.equal(rows[text], base_rows[text])
    layer, base_layer = trained.model.layers[0], base.model.layers[0]
    assert not torch.equal(layer.self_attn.q_proj.weight, base_layer.self_attn.q_proj.weight)
    assert torch.equal(layer.mlp.up_proj.weight, base_layer.mlp.up_proj.weight)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _bos_adding_copy(model_dir: Path, out: Path, template: str = "{bos} $A") -> Path:
    """The model with a tokenizer that prepends BOS when special tokens are added, as LLaMA-3's does
    (its tokenizer.json post-processor is TemplateProcessing "<|begin_of_text|> $A")."""
    from tokenizers import processors
    from transformers import AutoTokenizer

    shutil.copytree(model_dir, out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    bos, eos = tokenizer.bos_token, tokenizer.eos_token
    tokenizer._tokenizer.post_processor = processors.TemplateProcessing(
        single=template.format(bos=bos, eos=eos), pair=f"{bos} $A {bos} $B",
        special_tokens=[(bos, tokenizer.bos_token_id), (eos, tokenizer.eos_token_id)],
    )
    tokenizer.save_pretrained(out)
    reloaded = AutoTokenizer.from_pretrained(out)
    assert reloaded("hi", add_special_tokens=True)["input_ids"][0] == reloaded.bos_token_id
    return out


def _checksum(model) -> float:
    return float(sum(p.detach().double().sum() for p in model.parameters()))


def _cpu_vllm_client(monkeypatch) -> None:
    """What needs CUDA or vllm on the trainer side of TRL's server mode, replaced by its CPU equivalent."""
    if rollout.TRL_1:  # trl 1.x: trl.generation, vLLM's weight-transfer engine on a CUDA device
        import trl.generation.vllm_client as vllm_client
        import trl.generation.vllm_generation as vllm_generation
        from vllm_standin import broadcast_producer, trainer_endpoint

        monkeypatch.setattr(vllm_generation, "is_vllm_available", lambda *args, **kwargs: True)
        monkeypatch.setattr(vllm_client, "is_vllm_available", lambda *args, **kwargs: True)
        monkeypatch.setattr(vllm_client, "get_ip", lambda: "127.0.0.1", raising=False)
        monkeypatch.setattr(vllm_client, "_HAS_STATEFUL_TRAINER_ENGINE", True)
        monkeypatch.setattr(vllm_client, "open_trainer_endpoint", trainer_endpoint, raising=False)
        monkeypatch.setattr(vllm_client, "packed_nccl_broadcast_producer", broadcast_producer, raising=False)
        init = vllm_client.VLLMClient.init_communicator  # it refuses a device that is not CUDA
        monkeypatch.setattr(vllm_client.VLLMClient, "init_communicator", lambda self, device=0: init(self, "cuda"))
    else:  # trl 0.x: trl.extras, vLLM's StatelessProcessGroup and PyNcclCommunicator
        import trl.extras.vllm_client as vllm_client
        import trl.trainer.grpo_trainer as grpo_module
        from vllm_standin import GlooCommunicator, GlooProcessGroup

        monkeypatch.setattr(grpo_module, "is_vllm_available", lambda: True)
        monkeypatch.setattr(vllm_client, "is_vllm_available", lambda: True)
        monkeypatch.setattr(vllm_client, "StatelessProcessGroup", GlooProcessGroup, raising=False)
        monkeypatch.setattr(vllm_client, "PyNcclCommunicator", GlooCommunicator, raising=False)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(uuid="trainer-cpu"))


def test_vllm_server_rollouts_sample_from_the_policy_prompt_ids(artefacts, tmp_path, monkeypatch):
    """GRPO in server mode against a stand-in of TRL's rollout server (tests/vllm_standin.py: `trl
    vllm-serve` for trl 0.x, vLLM's server with its weight-transfer engine for trl 1.x): TRL's real
    VLLMClient and weight-sync path, the transport gloo instead of NCCL (the only CUDA-bound piece)."""
    root, _, model_dir, data = artefacts
    model = _bos_adding_copy(model_dir, tmp_path / "model")
    port, group_port = _free_port(), _free_port()
    log = tmp_path / "server.jsonl"
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo"}
    server = subprocess.Popen(
        [sys.executable, str(Path(__file__).with_name("vllm_standin.py")), "--model", str(model), "--port",
         str(port), "--log", str(log)], env=env,
    )
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")
    monkeypatch.setattr(rollout, "check_weight_sync", lambda: None)
    _cpu_vllm_client(monkeypatch)
    try:
        code = main(["rlhf", *_overrides(root, model, data, **{
            "rlhf_training.use_vllm": True, "rlhf_training.weight_sync": "nccl", "rlhf_training.vllm_server_port": port,
            "rlhf_training.vllm_group_port": group_port, "rlhf_training.vllm_server_timeout_s": 120,
            "rlhf_training.max_steps": 2, "checkpointing.save_steps": 1,
            "rlhf_training.reward_funcs": ["TruncationRewardFunc"], "rlhf_training.guard_rail_steps": 100,
            "training.output_dir": str(tmp_path / "out"),
        })])
    finally:
        server.terminate()
        server.wait(timeout=30)
    assert code == 0
    events = [json.loads(line) for line in log.read_text().splitlines()]
    assert not [e for e in events if e["event"] == "error"]

    _, tokenizer, vocab = load_speechlm(str(model))
    fmt = PromptFormat(tokenizer, vocab)
    expected = [fmt.inference_prompt(p.target_text, p.reference_text, np.asarray(p.prompt_codes)).tolist()
                for p in build_prompts({str(data): 1.0}, "train", fmt, 100_000, None, seed=0)]
    seen = [e["prompt_ids"] for e in events if e["event"] == "generate"]
    assert len(seen) == 2  # one prompt x num_generations per step
    for ids in seen:
        assert ids[:2] != [tokenizer.bos_token_id] * 2, "the server sampled after two BOS tokens"
        assert ids in expected

    # Every parameter reached the server by its HF name and shape, once per step, before that step's rollout.
    base = load_speechlm(str(model))[0]
    shapes = {name: list(p.shape) for name, p in base.named_parameters()}
    updates = [e for e in events if e["event"] == "update"]
    assert all(e["known"] for e in updates)
    assert len(updates) == 2 * len(shapes) and {e["name"]: e["shape"] for e in updates} == shapes
    synced = [e["checksum"] for e in events if e["event"] == "synced"]
    step_1 = load_speechlm(str(tmp_path / "out" / "rl" / "checkpoints" / "step_1"))[0]
    assert synced == pytest.approx([_checksum(base), _checksum(step_1)], rel=1e-9)
    assert _checksum(base) != pytest.approx(_checksum(step_1), rel=1e-9)


@pytest.mark.parametrize("storage", ["local", "remote"])
def test_two_rank_checkpoints_hold_every_rank_and_leave_no_scratch(artefacts, tmp_path, storage):
    """2 ranks over gloo, rank 1 slow to write its RNG state: the published step holds both ranks' files;
    a remote output (`objstore://`, see slow_rank_launch.py) leaves no scratch."""
    root, _, model, data = artefacts
    out = tmp_path / "out"
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    settings = _settings(root, model, data, **{
        "rlhf_training.max_steps": 1, "checkpointing.save_steps": 1,
        "rlhf_training.reward_funcs": ["TruncationRewardFunc"], "rlhf_training.guard_rail_steps": 100,
        "training.output_dir": str(out) if storage == "local" else f"objstore://{out}",
    })
    env = {**os.environ, "TMPDIR": str(scratch), "SLOW_RANK_SECONDS": "3", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
               "127.0.0.1", "--master_port", str(_free_port()), str(Path(__file__).with_name("slow_rank_launch.py")),
               "rlhf", *[arg for setting in settings for arg in ("--set", setting)]]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    checkpoints = out / "rl" / "checkpoints"
    step = checkpoints / "step_1"
    assert (step / "_COMPLETE").exists() and (step / "model.safetensors").exists()
    assert (step / "rng_state_0.pth").exists() and (step / "rng_state_1.pth").exists()
    assert sorted(p.name for p in checkpoints.iterdir() if p.is_dir()) == ["step_1"]  # no stray checkpoint-1
    assert (out / "rl" / "final_model" / "_COMPLETE").exists()
    left = [str(p.relative_to(scratch)) for p in scratch.rglob("*") if p.suffix in {".pth", ".pt", ".safetensors"}]
    assert not left, f"checkpoint files left in scratch space: {left}"


def test_round_trip_check_covers_the_server_tokenisation(artefacts, tmp_path):
    _, _, model_dir, data = artefacts
    llama3 = PromptFormat(*load_speechlm(str(_bos_adding_copy(model_dir, tmp_path / "bos")))[1:])
    assert build_prompts({str(data): 1.0}, "train", llama3, 100_000, None, seed=0, vllm_server=True)
    # A tokenizer that also appends EOS cannot give the server the policy's ids from text, nor trl 1.x (which
    # tokenises prompts with special tokens added) in any rollout mode.
    both = PromptFormat(*load_speechlm(str(_bos_adding_copy(model_dir, tmp_path / "eos", "{bos} $A {eos}")))[1:])
    if rollout.TRL_1:
        with pytest.raises(StageError, match="as TRL tokenises it"):
            build_prompts({str(data): 1.0}, "train", both, 100_000, None, seed=0)
    else:
        assert build_prompts({str(data): 1.0}, "train", both, 100_000, None, seed=0)
        with pytest.raises(StageError, match="vLLM server"):
            build_prompts({str(data): 1.0}, "train", both, 100_000, None, seed=0, vllm_server=True)


def test_a_batch_cut_by_a_server_restart_is_finished_on_the_policy(monkeypatch):
    """The server restarts between two requests of one batch (its pod replaced): the cut request is retried
    only after the policy has been re-published to the new server, never on its startup weights."""
    from transformers import GenerationConfig

    from trainer.rl import server_rollouts
    from trainer.serve.vllm_server import ServerUnreachable

    events: list[str] = []
    server = {"incarnation": 1.0, "up": True}
    monkeypatch.setattr(server_rollouts, "RETRY_S", 0.0)
    monkeypatch.setattr(server_rollouts.vllm_server, "incarnation", lambda url: server["incarnation"])
    monkeypatch.setattr(server_rollouts.vllm_server, "served_model", lambda url: "m")
    monkeypatch.setattr(server_rollouts.vllm_server, "save_for_reload", lambda model, d: events.append("publish"))
    monkeypatch.setattr(server_rollouts.vllm_server, "reload_weights",
                        lambda url, d: events.append(f"reload@{server['incarnation']}"))

    def completions(base_url, model, vocab, prompts, max_new_tokens, sampling, call, **kwargs):
        out = []
        for i, _ in enumerate(prompts):
            def request(i=i):
                if not server["up"]:
                    server.update(up=True, incarnation=2.0)  # back, a new process on its startup weights
                    raise ServerUnreachable("connection refused")
                if i == 1 and server["incarnation"] == 1.0:
                    server["up"] = False  # the pod goes away under this request
                    raise ServerUnreachable("connection reset")
                events.append(f"sample{i}@{server['incarnation']}")
                return [[7]]
            out += call(request)
        return out

    monkeypatch.setattr(server_rollouts.vllm_server, "speech_completions", completions)
    model = SimpleNamespace(generation_config=GenerationConfig(do_sample=False, max_new_tokens=4))
    vocab = SimpleNamespace(pad_token_id=0)
    rollouts = server_rollouts.ServerRollouts(model, vocab, "http://server", "/weights", sync_steps=1,
                                              timeout_s=60)
    rollouts.install(lambda: 5)
    out = rollouts.generate(torch.tensor([[1, 2], [1, 3]]))
    assert out.tolist() == [[1, 2, 7], [1, 3, 7]]
    assert events == ["publish", "reload@1.0", "sample0@1.0", "publish", "reload@2.0", "sample1@2.0"]
