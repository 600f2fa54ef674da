"""A SpeechLM checkpoint written the way the Inworld trainer (the seed) writes one, `tts-train import`ed,
is served by a real vLLM as it is: its greedy completion equals Hugging Face `generate`'s."""

from __future__ import annotations

import pytest
import torch
from speech_fixtures import make_codec, spread_weights
from test_import import seed_tokenizer, write_seed_checkpoint
from transformers import LlamaConfig

from trainer.cli import main
from trainer.model.build import load_speechlm
from trainer.serve.vllm_server import VllmServer, complete_ids, free_port

pytestmark = pytest.mark.vllm
NEW_TOKENS = 24


def test_an_imported_reference_checkpoint_serves_hf_greedy(vllm_python, tmp_path):
    base = tmp_path / "Llama-base"
    # Head size 32: one vLLM's CPU attention takes (the seed's 8B base has 128).
    arch = LlamaConfig(vocab_size=997, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
                       tie_word_embeddings=False)
    arch.save_pretrained(base)
    run = tmp_path / "experiments" / "run"
    write_seed_checkpoint(run, arch, seed_tokenizer(), lambda model: spread_weights(model, 5))
    out = tmp_path / "imported"
    assert main(["import", "--checkpoint_path", str(run / "final_model.pt"), "--output_path", str(out),
                 "--base_model_path", str(base), "--codec_model_path", str(make_codec(tmp_path / "codec"))]) == 0

    ours, tokenizer, vocab = load_speechlm(str(out))
    prompts = [tokenizer("hello there", add_special_tokens=True)["input_ids"] + [vocab.speech_start_id],
               tokenizer("a longer sentence", add_special_tokens=True)["input_ids"] + [vocab.audio_offset + 7]]
    expected = []
    for prompt in prompts:
        row = torch.tensor([prompt])
        expected.append(ours.generate(row, attention_mask=torch.ones_like(row), do_sample=False,
                                      max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                                      pad_token_id=vocab.pad_token_id)[0, len(prompt):].tolist())
    with VllmServer(vllm_python, str(out), free_port(), max_model_len=512, log_path=tmp_path / "vllm.log") as server:
        served = complete_ids(server.base_url, str(out), prompts, NEW_TOKENS, temperature=0.0, ignore_eos=True)
    assert served == expected and len(set(expected[0])) > 1
