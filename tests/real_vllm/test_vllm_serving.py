"""Our serving directories on a real vLLM server: it loads them as they are and its greedy completion
equals Hugging Face `generate`'s, token for token (float32, eager)."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch
from speech_fixtures import make_codec, spread_weights

from trainer.cli import main
from trainer.model.build import build_speechlm, load_speechlm, save_speechlm
from trainer.serve.vllm_server import VllmServer, complete_ids, reload_weights, save_for_reload

pytestmark = pytest.mark.vllm


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def hf_greedy(model_dir: Path, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    model, _, _ = load_speechlm(str(model_dir))
    outputs = []
    for prompt in prompts:
        ids = torch.tensor([prompt])
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens, do_sample=False,
                             min_new_tokens=max_tokens, pad_token_id=0)
        outputs.append(out[0, len(prompt):].tolist())
    return outputs


def varied_model(seed: int):
    """A tiny SpeechLM whose greedy output varies (a fresh init repeats one token): weights ~ N(0, 0.3)."""
    model, tokenizer, vocab = build_speechlm("tiny", codebook_size=256, seed=seed)
    spread_weights(model, seed)
    return model, tokenizer, vocab


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("vllm")
    codec = make_codec(root / "codec")
    save_speechlm(*varied_model(3), root / "sft" / "final_model")
    (root / "sft" / "final_model" / "codec.json").write_text(f'{{"codec_model_path": "{codec}"}}')
    out = root / "export" / "sft"
    assert main(["export", "--checkpoint_path", str(root / "sft" / "final_model"), "--output_path", str(out)]) == 0
    return out


def _prompts(model_dir: Path) -> list[list[int]]:
    _, tokenizer, vocab = load_speechlm(str(model_dir))
    return [tokenizer("hello there", add_special_tokens=True)["input_ids"] + [vocab.audio_offset + 5],
            tokenizer("a longer sentence to say", add_special_tokens=True)["input_ids"]]


def test_vllm_greedy_equals_hf_greedy_and_follows_a_weight_reload(exported, vllm_python, tmp_path):
    prompts = _prompts(exported)
    server = VllmServer(vllm_python, str(exported), free_port(), max_model_len=256, log_path=tmp_path / "vllm.log")
    policy, tokenizer, vocab = varied_model(11)  # same architecture, other weights
    save_speechlm(policy, tokenizer, vocab, tmp_path / "other")
    save_for_reload(policy, str(tmp_path / "published"))
    other = tmp_path / "other"
    with server:
        served = complete_ids(server.base_url, str(exported), prompts, max_tokens=24, temperature=0.0,
                              ignore_eos=True)
        reload_weights(server.base_url, str(tmp_path / "published"))
        reloaded = complete_ids(server.base_url, str(exported), prompts, max_tokens=24, temperature=0.0,
                                ignore_eos=True)
    assert served == hf_greedy(exported, prompts, 24)
    assert reloaded == hf_greedy(other, prompts, 24) != served
