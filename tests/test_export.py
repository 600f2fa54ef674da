"""`tts-train export`: every checkpoint kind becomes a serving directory that plain HF loads."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file
from speech_fixtures import make_codec, make_model
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

from trainer.cli import main
from trainer.model.build import build_speechlm, load_speechlm, save_speechlm
from trainer.serve import layout


@pytest.fixture(scope="module")
def artefacts(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    codec = make_codec(root / "codec")
    # An SFT-style checkpoint: HF directory + resume state + codec reference.
    step = make_model(root / "run" / "checkpoints" / "step_7", codec, seed=3)
    (step / "resume").mkdir()
    (step / "resume" / "state.json").write_text("{}")
    return root, codec, step


def _weights(path) -> dict[str, torch.Tensor]:
    return AutoModelForCausalLM.from_pretrained(path).state_dict()


def _assert_serving_dir(out, codec_copied: bool = True):
    assert (out / "model.safetensors").exists() and (out / "speechlm.json").exists()
    assert not (out / "resume").exists()
    AutoTokenizer.from_pretrained(out)  # tokenizer loads with the Auto class
    codec = layout.codec_path(str(out))
    assert codec is not None
    if codec_copied:
        assert codec == str(out / "codec") and (out / "codec" / "model.safetensors").exists()


def test_export_full_checkpoint_reloads_identically(artefacts, tmp_path):
    _, _, step = artefacts
    out = tmp_path / "served"
    assert main(["export", "--checkpoint_path", str(step), "--output_path", str(out)]) == 0
    _assert_serving_dir(out)
    exported, original = _weights(out), _weights(step)
    assert exported.keys() == original.keys()
    assert all(torch.equal(exported[k], original[k]) for k in original)
    assert load_speechlm(str(out))[2] == load_speechlm(str(step))[2]  # same vocabulary layout


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_export_dtype_halves_the_weights_and_loads_back_as_float32(artefacts, tmp_path, dtype):
    _, _, step = artefacts
    out = tmp_path / "served"
    assert main(["export", "--checkpoint_path", str(step), "--output_path", str(out), "--set",
                 f"export.dtype={dtype}"]) == 0
    stored = load_file(out / "model.safetensors")
    assert {t.dtype for t in stored.values()} == {getattr(torch, dtype)}
    assert (out / "model.safetensors").stat().st_size < 0.55 * (step / "model.safetensors").stat().st_size
    original = _weights(step)
    model = load_speechlm(str(out))[0]  # the readers' default: float32
    for name, tensor in model.state_dict().items():
        assert tensor.dtype == torch.float32
        assert torch.equal(tensor, original[name].to(getattr(torch, dtype)).float()), name


def test_export_lora_adapter_is_merged(artefacts, tmp_path):
    _, _, step = artefacts
    model, _, _ = load_speechlm(str(step))
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():  # a trained adapter: B != 0, so merging changes the weights
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    adapter = tmp_path / "adapter"
    peft_model.save_pretrained(adapter)
    ids = torch.tensor([[1, 5, 9, 300, 301]])
    with torch.no_grad():
        expected = peft_model(ids).logits
    out = tmp_path / "served"
    code = main(["export", "--checkpoint_path", str(adapter), "--output_path", str(out),
                 "--base_model_path", str(step)])
    assert code == 0
    _assert_serving_dir(out)
    merged = AutoModelForCausalLM.from_pretrained(out)
    assert not any("lora" in k for k in merged.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, expected, atol=1e-4, rtol=1e-4)


def test_export_wrapped_state_file_and_fsdp_dcp(artefacts, tmp_path):
    import torch.distributed.checkpoint as dcp

    _, codec, step = artefacts
    trained, _, _ = load_speechlm(str(step))
    with torch.no_grad():
        trained.get_input_embeddings().weight.add_(1.0)
    wrapped = {f"module.lm.{k}": v.clone() for k, v in trained.state_dict().items()}
    state_file = tmp_path / "final_model.pt"
    torch.save({"model": wrapped}, state_file)
    out = tmp_path / "from_file"
    assert main(["export", "--checkpoint_path", str(state_file), "--output_path", str(out),
                 "--base_model_path", str(step), "--codec_model_path", str(codec)]) == 0
    assert torch.equal(_weights(out)["model.embed_tokens.weight"], trained.get_input_embeddings().weight)

    sharded = tmp_path / "resume" / "sharded"
    dcp.save({"model": {f"lm.{k}": v.clone() for k, v in trained.state_dict().items()}}, checkpoint_id=str(sharded))
    out = tmp_path / "from_dcp"
    assert main(["export", "--checkpoint_path", str(sharded), "--output_path", str(out),
                 "--base_model_path", str(step)]) == 0
    assert torch.equal(_weights(out)["model.embed_tokens.weight"], trained.get_input_embeddings().weight)
    _assert_serving_dir(out)


def test_export_bad_inputs_are_config_errors(tmp_path, capsys):
    assert main(["export", "--checkpoint_path", str(tmp_path / "nope"), "--output_path", str(tmp_path / "o")]) == 2
    weights_only = tmp_path / "w.pt"
    torch.save({"x": torch.zeros(1)}, weights_only)
    assert main(["export", "--checkpoint_path", str(weights_only), "--output_path", str(tmp_path / "o")]) == 2
    assert "base_model_path" in capsys.readouterr().err
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("hi")
    assert main(["export", "--checkpoint_path", str(tmp_path / "junk"), "--output_path", str(tmp_path / "o")]) == 2
    assert not (tmp_path / "o").exists()


def test_export_refuses_a_model_vllm_cannot_serve_and_says_why(tmp_path, capsys):
    model, tokenizer, vocab = build_speechlm("tiny", codebook_size=256, seed=0)
    config = model.config
    config.num_attention_heads, config.num_key_value_heads, config.head_dim = 4, 2, 16  # 4 heads of 16
    save_speechlm(LlamaForCausalLM(config), tokenizer, vocab, tmp_path / "narrow")
    out = tmp_path / "served"
    assert main(["export", "--checkpoint_path", str(tmp_path / "narrow"), "--output_path", str(out)]) == 2
    assert "vLLM cannot serve this model: its head_dim is 16" in capsys.readouterr().err
    assert not out.exists()
