"""Our serving directories on a real vLLM server: it loads them as they are and its greedy completion
equals Hugging Face `generate`'s, token for token (float32, eager)."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch
from speech_fixtures import make_codec, make_model

from trainer.cli import main
from trainer.model.build import load_speechlm
from trainer.serve.vllm_server import VllmServer, complete_ids

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


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("vllm")
    codec = make_codec(root / "codec")
    make_model(root / "sft" / "final_model", codec, seed=3)
    out = root / "export" / "sft"
    assert main(["export", "--checkpoint_path", str(root / "sft" / "final_model"), "--output_path", str(out)]) == 0
    return out


def test_vllm_greedy_equals_hf_greedy_on_an_sft_export(exported, vllm_python, tmp_path):
    _, tokenizer, vocab = load_speechlm(str(exported))
    prompts = [tokenizer("hello there", add_special_tokens=True)["input_ids"] + [vocab.audio_offset + 5],
               tokenizer("a longer sentence to say", add_special_tokens=True)["input_ids"]]
    server = VllmServer(vllm_python, str(exported), free_port(), max_model_len=256, log_path=tmp_path / "vllm.log")
    with server:
        served = complete_ids(server.base_url, str(exported), prompts, max_tokens=24, temperature=0.0,
                              ignore_eos=True)
    assert served == hf_greedy(exported, prompts, 24)
