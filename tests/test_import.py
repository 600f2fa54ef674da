"""`tts-train import`: a SpeechLM checkpoint written the way the Inworld trainer (the seed) writes one
becomes a serving directory that gives the same logits, prompts token for token like the seed, and infers.

The seed checkpoint is built like tts/core/tokenization.py + tts/training/main.py build and save it: the
base tokenizer (LLaMA-3-like: <bos> added by its post-processor), pad = eos, the 8 tags + `<|s_N|>` added
in sorted string order, `<|extra_token_i|>` up to 193,856 rows; the tokenizer and training_config.json in
the checkpointing directory; final_model.pt written by Lightning Fabric's own `save` after a real step.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import lightning_fabric
import numpy as np
import peft
import pytest
import torch
from speech_fixtures import example_records, example_wav, make_codec
from tokenizers import processors
from transformers import LlamaConfig, LlamaForCausalLM

from trainer.cli import main
from trainer.model.build import load_speechlm
from trainer.model.preset_tokenizer import BOS, preset_tokenizer
from trainer.model.prompt import IGNORE_INDEX, PromptFormat

SEED_ROWS = 193_856  # tts/core/tokenization.py _EXPECTED_VOCAB_SIZE
CODEBOOK = 256  # the tiny codec's
SEED_TAGS = [
    "<|speech_start|>", "<|speech_end|>", "<|text_prompt_start|>", "<|text_prompt_end|>",
    "<|voice_description_start|>", "<|voice_description_end|>", "<|sound_effect_start|>", "<|sound_effect_end|>",
]
TEXT = "Hello  world, this is a test."
CODES = [5, 10, 2, 255, 100, 1]


def seed_tokenizer():
    tok = preset_tokenizer()
    # LLaMA-3's tokenizer.json prepends <|begin_of_text|> this way; the seed relies on it (add_special_tokens=True).
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, tok.bos_token_id)]
    )
    tok.pad_token = tok.eos_token
    tok.add_tokens(sorted(SEED_TAGS + [f"<|s_{i}|>" for i in range(CODEBOOK)]))
    tok.add_tokens([f"<|extra_token_{i}|>" for i in range(SEED_ROWS - len(tok))])
    assert len(tok) == SEED_ROWS
    return tok


def seed_training_prompt(text: str, codes: list[int]) -> str:
    """tts/core/prompting.py TrainingPromptCompiler."""
    speech = "".join(f"<|s_{c}|>" for c in codes)
    user = f"Convert the text to speech:<|text_prompt_start|>{text}<|text_prompt_end|>"
    return f"{user}\n<|speech_start|>{speech}<|speech_end|>"


def seed_labels(tok, input_ids: torch.Tensor) -> torch.Tensor:
    """tts/data/datasets/finetuning.py TtsFineTuningDataset.__getitem__."""
    separator = (input_ids == tok.convert_tokens_to_ids("<|speech_start|>")).nonzero(as_tuple=True)[0].item()
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    labels[separator:] = input_ids[separator:]
    labels[input_ids == tok.pad_token_id] = IGNORE_INDEX
    return labels


@pytest.fixture(scope="module")
def seed(tmp_path_factory):
    root = tmp_path_factory.mktemp("seed")
    base = root / "Llama-base"  # the base LLM directory: only its config.json is read
    arch = LlamaConfig(
        vocab_size=997, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False,
    )
    arch.save_pretrained(base)
    tok = seed_tokenizer()
    ckpt_dir = root / "experiments" / "run"
    write_seed_checkpoint(ckpt_dir, arch, tok)
    codec = make_codec(root / "codec")
    return {"root": root, "base": base, "dir": ckpt_dir, "tokenizer": tok, "codec": codec}


def write_seed_checkpoint(ckpt_dir: Path, arch: LlamaConfig, tok,
                          init: Callable[[LlamaForCausalLM], None] | None = None) -> None:
    """The seed's checkpointing directory: its tokenizer, training_config.json and final_model.pt saved by
    Lightning Fabric after one real step of a model of `arch` with the seed's vocabulary (`init` may set
    the weights before the step)."""
    tok.save_pretrained(ckpt_dir)
    config = {
        "training": {"precision": "fp32", "strategy": "ddp", "learning_rate": 1e-3},
        "modeling": {"parameters": {"codebook_size": CODEBOOK, "max_seq_len": 2048,
                                    "model_name": "meta-llama/Llama-3.1-8B-Instruct"}},
        "lora": None,
    }
    (ckpt_dir / "training_config.json").write_text(json.dumps(config, indent=4))
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**{**arch.to_dict(), "vocab_size": SEED_ROWS}))
    if init is not None:
        init(model)
    fabric = lightning_fabric.Fabric(accelerator="cpu", devices=1, precision="32-true")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model, optimizer = fabric.setup(model, optimizer)
    ids = tok(seed_training_prompt(TEXT, CODES), return_tensors="pt")["input_ids"]
    model(input_ids=ids, labels=seed_labels(tok, ids[0])[None]).loss.backward()
    optimizer.step()
    fabric.save(ckpt_dir / "final_model.pt", {
        "model": model, "loss_statistics": {"step": 1}, "optimizer": optimizer, "config": config,
    })


@pytest.fixture(scope="module")
def imported(seed):
    out = seed["dir"] / "imported"  # inside the seed's run directory: still ours to infer from
    code = main([
        "import", "--checkpoint_path", str(seed["dir"] / "final_model.pt"), "--output_path", str(out),
        "--base_model_path", str(seed["base"]), "--codec_model_path", str(seed["codec"]),
    ])
    assert code == 0
    return out


def _seed_model(seed) -> LlamaForCausalLM:
    config = LlamaConfig.from_pretrained(seed["base"])
    config.vocab_size = SEED_ROWS
    model = LlamaForCausalLM(config)
    state = torch.load(seed["dir"] / "final_model.pt", weights_only=True)["model"]
    model.load_state_dict(state)
    return model.eval()


def _same_logits(seed_model, seed_tok, imported_dir) -> None:
    """Our model on our ids == the seed model on its ids, our row r being the seed's row of r's token."""
    model, tok, vocab = load_speechlm(str(imported_dir))
    ex = PromptFormat(tok, vocab, normalize=False).training_example(TEXT, np.array(CODES))
    seed_ids = seed_tok(seed_training_prompt(TEXT, CODES), add_special_tokens=True, return_tensors="pt")["input_ids"]
    names = tok.convert_ids_to_tokens(list(range(len(tok))))
    extras = [f"<|extra_token_{i}|>" for i in range(SEED_ROWS - len(tok))]
    order = torch.tensor(seed_tok.convert_tokens_to_ids(names + extras))
    assert torch.equal(order.sort().values, torch.arange(SEED_ROWS))
    with torch.no_grad():
        seed_logits = seed_model(input_ids=seed_ids).logits[0]
        our_logits = model(input_ids=torch.from_numpy(ex.input_ids)[None]).logits[0]
    torch.testing.assert_close(our_logits, seed_logits[:, order], rtol=1e-5, atol=1e-5)
    assert our_logits.abs().max() > 0


def test_import_lays_audio_tokens_out_contiguously(seed, imported):
    _, tok, vocab = load_speechlm(str(imported))
    assert tok.convert_tokens_to_ids([f"<|s_{i}|>" for i in range(CODEBOOK)]) == list(
        range(vocab.audio_offset, vocab.audio_offset + CODEBOOK))
    assert vocab.audio_head_contiguous and vocab.prompt_format == "inworld"
    # Text ids are untouched; the seed's rows (193,856) are kept; pad = eos as in the seed.
    seed_tok = seed["tokenizer"]
    assert all(tok.convert_ids_to_tokens(i) == seed_tok.convert_ids_to_tokens(i) for i in range(997))
    assert vocab.vocab_size == SEED_ROWS and vocab.pad_token_id == seed_tok.eos_token_id
    assert {"<|voice_description_start|>", "<|sound_effect_end|>"} <= set(tok.get_vocab())
    assert not any(t.startswith("<|extra_token_") for t in tok.get_vocab())


def test_import_gives_the_seed_models_logits_and_prompts(seed, imported):
    seed_tok = seed["tokenizer"]
    _, tok, vocab = load_speechlm(str(imported))
    # The seed's defaults: no text normalisation, the full-vocabulary loss (speech-start is a target).
    fmt = PromptFormat(tok, vocab, normalize=False, label_speech_start=True)

    # Training example: token for token, and the same positions labelled (speech-start included).
    seed_ids = seed_tok(seed_training_prompt(TEXT, CODES), add_special_tokens=True, return_tensors="pt")["input_ids"][0]
    ex = fmt.training_example(TEXT, np.array(CODES))
    assert tok.convert_ids_to_tokens(ex.input_ids.tolist()) == seed_tok.convert_ids_to_tokens(seed_ids.tolist())
    labels = seed_labels(seed_tok, seed_ids).numpy()
    assert ((labels == IGNORE_INDEX) == (ex.labels == IGNORE_INDEX)).all()
    assert ex.labels[labels != IGNORE_INDEX][0] == vocab.speech_start_id

    # Zero-shot inference prompt (tts/core/prompting.py InferencePromptCompiler): token for token.
    seed_prompt = ("Convert the text to speech:<|text_prompt_start|>Ref words. Target words.<|text_prompt_end|>\n"
                   "<|speech_start|><|s_7|><|s_200|>")
    ours = fmt.inference_prompt("Target words.", ref_text="Ref words.", ref_codes=np.array([7, 200]))
    assert tok.convert_ids_to_tokens(ours.tolist()) == seed_tok.convert_ids_to_tokens(
        seed_tok(seed_prompt, add_special_tokens=True)["input_ids"])

    _same_logits(_seed_model(seed), seed_tok, imported)


def test_import_merges_a_seed_lora_checkpoint(seed, tmp_path):
    """tts/core/lora.py: peft LoRA over a tied model, saved whole by Fabric; import merges it with lora.r/alpha."""
    seed_tok = seed["tokenizer"]
    config = json.loads((seed["dir"] / "training_config.json").read_text())
    config["lora"] = {"task_type": "CAUSAL_LM", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"],
                      "lora_dropout": 0.0, "bias": "none", "adapter_path": None}
    lora = config["lora"]
    base = tmp_path / "Llama-tied"  # the LLaMA-3.2-1B case: tied embedding and head
    arch = LlamaConfig.from_pretrained(seed["base"]).to_dict()
    LlamaConfig(**{**arch, "tie_word_embeddings": True}).save_pretrained(base)
    torch.manual_seed(1)
    model = LlamaForCausalLM(LlamaConfig(**{**arch, "tie_word_embeddings": True, "vocab_size": SEED_ROWS}))
    assert model.lm_head.weight is model.model.embed_tokens.weight
    model = peft.get_peft_model(model, peft.LoraConfig(
        task_type=lora["task_type"], r=lora["r"], lora_alpha=lora["lora_alpha"],
        target_modules=lora["target_modules"], lora_dropout=lora["lora_dropout"], bias=lora["bias"]))
    fabric = lightning_fabric.Fabric(accelerator="cpu", devices=1, precision="32-true")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model, optimizer = fabric.setup(model, optimizer)
    ids = seed_tok(seed_training_prompt(TEXT, CODES), return_tensors="pt")["input_ids"]
    model(input_ids=ids, labels=seed_labels(seed_tok, ids[0])[None]).loss.backward()
    optimizer.step()  # lora_B leaves zero: the merge matters
    run = tmp_path / "run"
    run.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (run / name).symlink_to(seed["dir"] / name)
    fabric.save(run / "checkpoint_1.pt", {"model": model, "loss_statistics": {}, "optimizer": optimizer,
                                          "config": config})
    out = tmp_path / "imported"
    assert main(["import", "--checkpoint_path", str(run), "--output_path", str(out),
                 "--base_model_path", str(base)]) == 0
    _same_logits(model.eval(), seed_tok, out)


def test_known_base_names_need_no_base_directory():
    from trainer.serve.reference_import import architecture

    config, _ = architecture(None, {"modeling": {"parameters": {"model_name": "meta-llama/Llama-3.2-1B-Instruct"}}},
                             SEED_ROWS)
    assert (config.hidden_size, config.num_hidden_layers, config.vocab_size) == (2048, 16, SEED_ROWS)


def test_infer_accepts_the_imported_directory(imported, tmp_path):
    record = example_records()[0]
    out = tmp_path / "out.wav"
    assert main([
        "infer", "--model_checkpoint_path", str(imported), "--prompt_wav_path", example_wav(record),
        "--prompt_transcription", record["transcript"], "--text", "Hello there.", "--output_path", str(out),
        "--max_new_tokens", "10", "--seed", "1",
    ]) == 0
    assert out.stat().st_size > 44


def test_seed_checkpoints_elsewhere_point_to_import(seed, tmp_path, capsys):
    assert main(["infer", "--model_checkpoint_path", str(seed["dir"]), "--text", "Hi.",
                 "--output_path", str(tmp_path / "x.wav")]) == 2
    assert "tts-train import" in capsys.readouterr().err
    assert main(["export", "--checkpoint_path", str(seed["dir"] / "final_model.pt"),
                 "--output_path", str(tmp_path / "e")]) == 2
    assert "tts-train import" in capsys.readouterr().err


def test_import_rejects_wrong_inputs_clearly(seed, tmp_path, capsys):
    run = seed["dir"]

    def attempt(checkpoint, *extra) -> tuple[int, str]:
        code = main(["import", "--checkpoint_path", str(checkpoint), "--output_path", str(tmp_path / "o"), *extra])
        return code, capsys.readouterr().err

    code, err = attempt(run)  # the seed config names a hub model that is not here
    assert code == 2 and "--base_model_path" in err
    fake = tmp_path / "fake"  # wrong weight files
    fake.mkdir()
    (fake / "final_model.pt").write_bytes(b"not a checkpoint")
    code, err = attempt(fake / "final_model.pt", "--base_model_path", str(seed["base"]))
    assert code == 2 and "not a readable PyTorch checkpoint" in err
    torch.save({"model": {"encoder.conv.weight": torch.zeros(2, 2)}}, fake / "codec.pt")
    code, err = attempt(fake / "codec.pt")
    assert code == 2 and "not a SpeechLM checkpoint of the Inworld trainer" in err
    plain = tmp_path / "plain"  # a SpeechLM-shaped state beside a tokenizer without the seed's tokens
    preset_tokenizer().save_pretrained(plain)
    torch.save({"model": {"model.embed_tokens.weight": torch.zeros(997, 32)}}, plain / "final_model.pt")
    code, err = attempt(plain, "--base_model_path", str(seed["base"]))
    assert code == 2 and "not a seed SpeechLM tokenizer" in err
    assert "Traceback" not in err
    assert not (tmp_path / "o").exists()
