"""SpeechLM build/save/load: presets, vocabulary extension of a local HF model, HF round trip."""

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from trainer.errors import ConfigError
from trainer.model.build import build_speechlm, load_speechlm, preset, sample_like, save_speechlm
from trainer.model.preset_tokenizer import preset_tokenizer
from trainer.model.prompt import PromptFormat
from trainer.model.vocab import AudioVocab


def test_llama_3_2_1b_preset_shape():
    config, tokenizer, vocab = preset("llama-3.2-1b", 65536)
    assert vocab.audio_offset == 128_256 + 4  # text vocabulary + the 4 inworld tags
    assert config.vocab_size == vocab.vocab_size == 193_856
    assert (config.hidden_size, config.num_hidden_layers, config.intermediate_size) == (2048, 16, 8192)
    assert (config.num_attention_heads, config.num_key_value_heads) == (32, 8)
    assert config.tie_word_embeddings
    # RoPE as the model computes it (transformers 4.x keeps rope_theta/rope_scaling, 5.x rope_parameters): base
    # 500000, the high frequencies as they are, the lowest divided by the llama3 factor 32.
    inv_freq = LlamaRotaryEmbedding(config).inv_freq
    assert inv_freq[1].item() == pytest.approx(500000.0 ** (-2 / 64), rel=1e-6)
    assert inv_freq[-1].item() == pytest.approx(500000.0 ** (-62 / 64) / 32, rel=1e-6)
    assert tokenizer.convert_tokens_to_ids("<|s_65535|>") == vocab.audio_offset + 65535


def test_saved_dir_loads_with_auto_classes_and_generates(tmp_path):
    model, tokenizer, vocab = build_speechlm("tiny", 256, seed=1)
    save_speechlm(model, tokenizer, vocab, tmp_path / "m")
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "speechlm.json"):
        assert (tmp_path / "m" / name).exists(), name
    hf_model = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    hf_tok = AutoTokenizer.from_pretrained(tmp_path / "m")
    assert hf_tok.pad_token_id is not None
    assert hf_tok.convert_tokens_to_ids("<|s_17|>") == vocab.audio_offset + 17
    for a, b in zip(model.state_dict().values(), hf_model.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    prompt = PromptFormat(hf_tok, AudioVocab.load(tmp_path / "m")).inference_prompt("Hello there.")
    out = hf_model.generate(torch.from_numpy(prompt)[None], max_new_tokens=5, do_sample=True, top_k=5)
    assert out.shape[1] > len(prompt)
    assert hf_model.generation_config.eos_token_id == vocab.speech_end_id


def test_load_speechlm_from_memory_url(tmp_path):
    import fsspec

    model, tokenizer, vocab = build_speechlm("tiny", 64, "llasa")
    save_speechlm(model, tokenizer, vocab, tmp_path / "m")
    fs = fsspec.filesystem("memory")
    for f in (tmp_path / "m").iterdir():
        fs.pipe_file(f"/models/m/{f.name}", f.read_bytes())
    _, tok2, vocab2 = load_speechlm("memory://models/m")
    assert vocab2 == vocab and len(tok2) == len(tokenizer)


def _plain_text_llm(path):
    tokenizer = preset_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=False)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return len(tokenizer)


def test_local_text_llm_is_extended_with_mean_cov_rows(tmp_path):
    old_rows = _plain_text_llm(tmp_path / "base")
    model, tokenizer, vocab = build_speechlm(str(tmp_path / "base"), 512, seed=3)
    emb = model.get_input_embeddings().weight.detach()
    assert emb.shape[0] == vocab.vocab_size and vocab.audio_offset >= old_rows
    old, new = emb[:old_rows], emb[old_rows:]
    assert torch.allclose(new.mean(0), old.mean(0), atol=0.01)
    # the new rows follow the old covariance (correlations included), not a fresh isotropic init
    assert torch.allclose(torch.cov(new.T), torch.cov(old.T), atol=0.01)
    head = model.get_output_embeddings().weight.detach()
    assert not torch.equal(head[old_rows:], new)  # untied head: rows drawn from the head's own statistics
    save_speechlm(model, tokenizer, vocab, tmp_path / "ext")
    _again, _, vocab2 = build_speechlm(str(tmp_path / "ext"), 512)
    assert vocab2 == vocab  # an existing SpeechLM dir is loaded as is
    with pytest.raises(ConfigError, match="built for 512 codes"):
        build_speechlm(str(tmp_path / "ext"), 1024)


def test_sample_like_matches_correlated_statistics():
    gen = torch.Generator().manual_seed(0)
    mix = torch.tensor([[1.0, 0.9], [0.0, 0.4]])
    rows = torch.randn(20000, 2, generator=gen) @ mix + torch.tensor([3.0, -1.0])
    new = sample_like(rows, 20000, torch.Generator().manual_seed(1))
    assert torch.allclose(new.mean(0), rows.mean(0), atol=0.05)
    assert torch.allclose(torch.cov(new.T), torch.cov(rows.T), atol=0.05)


def test_unknown_model_name_is_a_config_error():
    with pytest.raises(ConfigError, match="neither a preset"):
        build_speechlm("meta-llama/Llama-3.2-1B", 256)


def test_codes_from_ids_roundtrip():
    _, _tokenizer, vocab = build_speechlm("tiny", 256)
    codes = np.array([1, 2, 250])
    ids = [*vocab.code_ids(codes).tolist(), vocab.speech_end_id, vocab.audio_offset]
    assert vocab.codes_from_ids(ids).tolist() == [1, 2, 250]
