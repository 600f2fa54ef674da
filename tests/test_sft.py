"""`tts-train sft` on CPU: packed attention exactness, loss falls, DDP/FSDP parity, kill/resume,
SIGTERM, HF round trip, LoRA merge, bad configs."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from speechlm_fixtures import REPO, run_losses, sft_config, torchrun, write_config, write_vectorized
from transformers import AutoModelForCausalLM, AutoTokenizer

from trainer.cli import main
from trainer.config import LoraConfig
from trainer.data.dataset import PackedData
from trainer.distributed import STOPPED
from trainer.metrics import read_scalars
from trainer.model.attention import use_packed_attention
from trainer.model.build import build_speechlm
from trainer.model.lora import added_token_rows, apply_lora, merge_lora_state_dict
from trainer.model.prompt import PromptFormat
from trainer.train import checkpoint
from trainer.train.objective import SpeechLMObjective, corrupt_audio_inputs

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


@pytest.fixture(scope="module")
def reference_run(data_dir, tmp_path_factory):
    """One uninterrupted 20-step single-process run (global batch: 2 rows of 256 tokens)."""
    out = tmp_path_factory.mktemp("ref")
    cfg = write_config(out / "sft.json", sft_config(data_dir, out))
    assert main(["sft", "--config", str(cfg)]) == 0
    return out / "t"


@pytest.mark.parametrize("prompt_format", ["inworld", "llasa"])
def test_packed_row_loss_equals_per_samplerun_losses(data_dir, prompt_format):
    torch.manual_seed(0)
    lm, tokenizer, vocab = build_speechlm("tiny", 64, prompt_format, seed=0)
    use_packed_attention(lm)
    prompt = PromptFormat(tokenizer, vocab)
    args = dict(max_seq_len=256, pack_length=256, batch_size=1, codebook_size=64)
    packed = PackedData({str(data_dir): 1.0}, "train", prompt, **args)
    row = packed.rows(0)[0]
    assert len(row) >= 2
    objective = SpeechLMObjective(lm, vocab, "sdpa", loss_vocab="full", chunk_size=7)
    with torch.no_grad():
        packed_sum, packed_n = objective(packed.collate([row]))
        singles = [objective(packed.collate([[sample]])) for sample in row]
        # a leaky row (one causal document) must differ: the check can fail
        leaky = packed.collate([row])
        leaky.doc_ids.zero_()
        leaky_sum, _ = objective(leaky)
    single_sum = sum(float(s) for s, _ in singles)
    assert int(packed_n) == sum(int(n) for _, n in singles)
    assert float(packed_sum) == pytest.approx(single_sum, rel=1e-5)  # fp32: same math, different summation order
    assert abs(float(leaky_sum) - single_sum) > 10 * 1e-5 * single_sum


def _tiny_lm_and_one_row(data_dir):
    """A tiny packed-attention SpeechLM and the first packed training row of `data_dir` as a batch."""
    lm, tokenizer, vocab = build_speechlm("tiny", 64, seed=0)
    use_packed_attention(lm)
    data = PackedData({str(data_dir): 1.0}, "train", PromptFormat(tokenizer, vocab), max_seq_len=256,
                      pack_length=256, batch_size=1, codebook_size=64)
    return lm, vocab, data.collate(data.rows(0)[:1])


def test_audio_vocab_loss_is_softmax_over_the_audio_rows(data_dir):
    lm, vocab, batch = _tiny_lm_and_one_row(data_dir)
    with torch.no_grad():
        audio, n = SpeechLMObjective(lm, vocab, "sdpa", "audio")(batch)
        logits = lm(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False,
                    attention_mask=(batch.doc_ids[:, :, None] == batch.doc_ids[:, None, :]).tril()[:, None]).logits
    mask = batch.targets[0] != -100
    sub = logits[0][mask][:, vocab.speech_end_id : vocab.audio_end]
    expected = torch.nn.functional.cross_entropy(sub, batch.targets[0][mask] - vocab.speech_end_id, reduction="sum")
    assert float(audio) == pytest.approx(float(expected), rel=1e-5) and int(n) == int(mask.sum())


def test_audio_input_noise_corrupts_only_audio_inputs_and_only_in_training(data_dir):
    lm, vocab, batch = _tiny_lm_and_one_row(data_dir)
    ids = batch.input_ids
    torch.manual_seed(0)
    noisy = corrupt_audio_inputs(ids, vocab, 0.5)
    audio = vocab.is_audio(ids)
    changed = noisy != ids
    assert not changed[~audio].any()  # text, tags and padding untouched
    assert ((noisy[audio] >= vocab.audio_offset) & (noisy[audio] < vocab.audio_end)).all()
    # ~50% drawn, of which 1/64 land on the same code
    assert 0.4 < changed[audio].float().mean().item() < 0.6
    objective = SpeechLMObjective(lm, vocab, "sdpa", "audio", audio_input_noise=0.5)
    clean = SpeechLMObjective(lm, vocab, "sdpa", "audio")
    with torch.no_grad():
        objective.eval()
        assert float(objective(batch)[0]) == pytest.approx(float(clean(batch)[0]))  # eval sees clean inputs
        objective.train()
        assert float(objective(batch)[0]) != pytest.approx(float(clean(batch)[0]))
    assert torch.equal(batch.input_ids, ids)  # the batch itself is not modified


def test_loss_falls_and_outputs_load_with_from_pretrained(reference_run):
    records = read_scalars(str(reference_run / "metrics.jsonl"))
    losses = run_losses(reference_run)
    assert sorted(losses) == list(range(1, 21))
    assert losses[20] < 0.7 * losses[1]
    assert any("eval_loss" in r for r in records)
    assert all({"lr", "tokens_per_second"} <= r.keys() for r in records if "loss" in r)
    steps = [s for s, _ in checkpoint.complete_checkpoints(str(reference_run))]
    assert steps == [10, 20]
    final = reference_run / "final_model"
    assert checkpoint.io.is_complete(str(final))
    model = AutoModelForCausalLM.from_pretrained(final)
    tokenizer = AutoTokenizer.from_pretrained(final)
    prompt = tokenizer("Convert the text to speech:<|text_prompt_start|>Hi.<|text_prompt_end|>\n<|speech_start|>",
                       return_tensors="pt")
    out = model.generate(**prompt, max_new_tokens=4, do_sample=False)
    assert out.shape[1] > prompt["input_ids"].shape[1]


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_match_one_process(strategy, reference_run, data_dir, tmp_path):
    # 2 ranks x 1 row = the reference's global batch of 2 rows, in the same order.
    cfg = write_config(tmp_path / "sft.json", sft_config(data_dir, tmp_path, strategy=strategy, batch_size=1))
    proc = torchrun(cfg, 2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ref, got = run_losses(reference_run), run_losses(tmp_path / "t")
    assert sorted(got) == sorted(ref)
    for step in ref:  # fp32 gloo all-reduce vs local sum: summation order only
        assert got[step] == pytest.approx(ref[step], rel=1e-4), step
    assert (tmp_path / "t" / "final_model" / "model.safetensors").exists()


def _start(config: Path) -> subprocess.Popen:
    # Its own process group, as a job under a shell or a container runtime: signals can go to the group.
    return subprocess.Popen([sys.executable, "-m", "trainer", "sft", "--config", str(config)], env=ENV, cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)


def _wait_for_step(run_dir: Path, step: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"run ended early ({proc.returncode}): {proc.stderr.read()[-2000:]}")
        if max(run_losses(run_dir), default=0) >= step:
            return
        time.sleep(0.02)
    raise AssertionError(f"step {step} not reached")


@pytest.fixture(scope="module")
def long_data_dir(tmp_path_factory):
    return write_vectorized(tmp_path_factory.mktemp("vec_long"), n_train=120, min_codes=100, max_codes=400)


def _slow_config(data_dir: Path, out: Path, **training) -> dict:
    # Bigger rows so a step takes long enough (~0.1-0.3 s) to be interrupted between checkpoints.
    return sft_config(data_dir, out, batch_size=2, pack_length=2048, **training)


def test_sigkill_then_resume_gives_identicalrun_losses(long_data_dir, tmp_path):
    data_dir = long_data_dir
    straight = tmp_path / "straight"
    assert main(["sft", "--config", str(write_config(tmp_path / "a.json", _slow_config(data_dir, straight)))]) == 0
    killed = tmp_path / "killed"
    cfg = write_config(tmp_path / "b.json", _slow_config(data_dir, killed))
    proc = _start(cfg)
    _wait_for_step(killed / "t", 12, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "t" / "final_model").exists()
    assert [s for s, _ in checkpoint.complete_checkpoints(str(killed / "t"))] == [10]
    assert main(["sft", "--config", str(cfg)]) == 0  # resume: auto
    ref, got = run_losses(straight / "t"), run_losses(killed / "t")
    assert sorted(got) == list(range(1, 21))
    for step in range(11, 21):
        assert got[step] == pytest.approx(ref[step], rel=1e-6, abs=0), step


@pytest.mark.parametrize("to_group", [False, True], ids=["process", "process_group"])
def test_sigterm_saves_a_checkpoint_and_exits_stopped(long_data_dir, tmp_path, to_group):
    """Also when the whole process group gets it (Ctrl-C, `kill -- -PGID`, a runtime stopping every
    process): DataLoader workers ignore it and the trainer saves, instead of dying of a killed worker."""
    data_dir = long_data_dir
    config = _slow_config(data_dir, tmp_path, max_steps=200, num_workers=1 if to_group else 0)
    config["checkpointing"]["save_steps"] = 1000
    proc = _start(write_config(tmp_path / "c.json", config))
    _wait_for_step(tmp_path / "t", 2, proc)
    if to_group:
        os.killpg(proc.pid, signal.SIGTERM)
    else:
        proc.send_signal(signal.SIGTERM)
    # 143 (128 + SIGTERM), not 0: the run is not done, and a PyTorchJob must retry it rather than succeed.
    assert proc.wait(timeout=120) == STOPPED, proc.stderr.read()[-2000:]
    saved = checkpoint.complete_checkpoints(str(tmp_path / "t"))
    assert len(saved) == 1 and saved[0][0] == max(run_losses(tmp_path / "t"))
    state = json.loads((Path(saved[0][1]) / "resume" / "state.json").read_text())
    assert state["step"] == saved[0][0]


def test_lora_run_exports_merged_weights(data_dir, tmp_path):
    config = sft_config(data_dir, tmp_path, max_steps=4)
    config["modeling"]["lora"] = {"enabled": True, "r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}
    config["checkpointing"]["save_steps"] = 4
    assert main(["sft", "--config", str(write_config(tmp_path / "l.json", config))]) == 0
    base, _, vocab = build_speechlm("tiny", 64, seed=7)
    tuned = AutoModelForCausalLM.from_pretrained(tmp_path / "t" / "final_model")
    assert not torch.equal(tuned.model.layers[0].self_attn.q_proj.weight, base.model.layers[0].self_attn.q_proj.weight)
    assert torch.equal(tuned.model.layers[0].mlp.up_proj.weight, base.model.layers[0].mlp.up_proj.weight)
    # The rows the SpeechLM added (random init) trained, the text rows stayed frozen, in the final model
    # and through the serving export of a checkpoint (the tiny preset's head is tied to these rows).
    export = tmp_path / "serve"
    assert main(["export", "--checkpoint_path", str(tmp_path / "t" / "checkpoints" / "step_4"),
                 "--output_path", str(export)]) == 0
    added = torch.tensor(added_token_rows(vocab))
    text = torch.tensor(sorted(set(range(vocab.audio_offset)) - set(added.tolist())))
    for model in (tuned, AutoModelForCausalLM.from_pretrained(export)):
        for get in (lambda m: m.get_input_embeddings().weight, lambda m: m.get_output_embeddings().weight):
            new, old = get(model).detach(), get(base).detach()
            assert (new[added] != old[added]).any(dim=1).all()
            assert torch.equal(new[text], old[text])


def test_merge_lora_state_dict_matches_peft():
    lm, _, vocab = build_speechlm("tiny", 64, seed=1)
    lora = LoraConfig(enabled=True, r=4, alpha=16, target_modules="all-linear")
    peft_model = apply_lora(lm, lora, vocab)
    for name, p in peft_model.named_parameters():
        if "lora_B" in name or "trainable_tokens_delta" in name:
            torch.nn.init.normal_(p, std=0.1)
    merged = merge_lora_state_dict(peft_model.state_dict(), lora, added_token_rows(vocab))
    reference = peft_model.merge_and_unload().state_dict()
    assert merged.keys() == reference.keys()
    for key in reference:
        assert torch.allclose(merged[key], reference[key], atol=1e-6), key


def test_dry_run_computes_one_loss_without_training(data_dir, tmp_path, capsys):
    cfg = write_config(tmp_path / "d.json", sft_config(data_dir, tmp_path))
    assert main(["sft", "--config", str(cfg), "--dry_run"]) == 0
    out = capsys.readouterr().out
    plan = json.loads(out[out.index("{"):])
    assert plan["problems"] == [] and plan["first_batch_loss"] > 0 and plan["schedule"]["total_steps"] == 20
    assert not (tmp_path / "t" / "metrics.jsonl").exists()  # no step taken
    assert not (tmp_path / "t" / "checkpoints").exists() and not (tmp_path / "t" / "final_model").exists()


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda c, d: c["train_weighted_datasets"].update({"/nonexistent/data": 1.0}), "does not exist"),
        (lambda c, d: c["modeling"]["parameters"].update(codebook_size=32), "codebook_size is 64"),
        (lambda c, d: c["training"].update(strategy="horovod"), "training.strategy"),
        (lambda c, d: c["training"].update(precision="fp16"), "fp16"),
        (lambda c, d: c["training"].update(audio_input_noise=1.0), "training.audio_input_noise"),
        (lambda c, d: c["modeling"]["parameters"].update(model_name="meta-llama/Llama-3.2-1B"), "neither a preset"),
    ],
)
def test_bad_configs_fail_before_training(edit, message, data_dir, tmp_path, capsys):
    config = sft_config(data_dir, tmp_path)
    edit(config, data_dir)
    assert main(["sft", "--config", str(write_config(tmp_path / "bad.json", config))]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "t" / "metrics.jsonl").exists()


def test_codes_beyond_codebook_fail_before_training(tmp_path, capsys):
    data = write_vectorized(tmp_path / "vec", codebook_size=128, info_codebook_size=64)
    (data / "dataset_info.json").unlink()
    config = sft_config(data, tmp_path)
    assert main(["sft", "--config", str(write_config(tmp_path / "bad.json", config))]) == 2
    assert "outside modeling.parameters.codebook_size" in capsys.readouterr().err


def test_checkpoint_publish_to_object_store_and_ignore_incomplete():
    import fsspec

    fs = fsspec.filesystem("memory")
    run = "memory://runs/x"
    checkpoint.publish(checkpoint.checkpoint_url(run, 5), lambda d: (d / "a.txt").write_text("a"))
    fs.pipe_file("/runs/x/checkpoints/step_9/a.txt", b"partial")  # a save killed before its marker
    assert checkpoint.latest_checkpoint(run) == "memory://runs/x/checkpoints/step_5"
    assert fs.cat_file("/runs/x/checkpoints/step_5/a.txt") == b"a"


def test_save_best_keeps_the_lowest_val_loss_model_across_a_resume(tmp_path):
    # Train audio is one code repeated, val audio another: every step raises the val code's loss, on any
    # CPU, so the first evaluation is the best and the later ones (the last included) are worse.
    data = write_vectorized(tmp_path / "vec", n_train=6, n_val=8)
    for split, code in (("train", 0), ("val", 1)):
        codes = np.load(data / f"{split}_codes.npy")
        np.save(data / f"{split}_codes.npy", np.full_like(codes, code))
    cfg = sft_config(data, tmp_path, eval_steps=2, learning_rate=3e-2, lr_scheduler="constant")
    cfg["checkpointing"].update(save_steps=2, keep_only_last_n_checkpoints=None, save_best=True)
    assert main(["sft", "--config", str(write_config(tmp_path / "sft.json", cfg))]) == 0
    run = tmp_path / "t"
    evals = run_losses(run, "eval_loss")
    best_step = min(evals, key=evals.get)
    assert best_step < 20 and evals[20] > evals[best_step]  # the case where the last model is not the best
    best = run / checkpoint.BEST_MODEL
    assert checkpoint.io.is_complete(str(best))
    assert json.loads((best / checkpoint.BEST_RECORD).read_text()) == {"step": best_step,
                                                                       "eval_loss": evals[best_step]}
    same_step = load_file(run / "checkpoints" / f"step_{best_step}" / "model.safetensors")
    assert all(torch.equal(t, same_step[k]) for k, t in load_file(best / "model.safetensors").items())
    AutoModelForCausalLM.from_pretrained(best)

    # Resumed for 4 more steps whose val losses are all above the best: the best model stays.
    cfg["training"]["max_steps"] = 24
    assert main(["sft", "--config", str(write_config(tmp_path / "sft.json", cfg))]) == 0
    evals = run_losses(run, "eval_loss")
    assert min(evals[22], evals[24]) > evals[best_step]
    assert json.loads((best / checkpoint.BEST_RECORD).read_text())["step"] == best_step
