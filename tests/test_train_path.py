"""SFT training-path defects (issue 14): resume across world sizes, eval without packing on several
ranks, compiled layers in steady state, learning-rate schedule and logging, MFU attention work,
DataLoader workers."""

import math
import os

import pytest
import torch
from safetensors.torch import load_file
from speechlm_fixtures import run_losses, sft_config, torchrun, write_config, write_vectorized
from transformers import AutoModelForCausalLM

from trainer.cli import main
from trainer.config import TrainerConfig
from trainer.data.dataset import PackedData, SamplerState
from trainer.model.attention import use_packed_attention
from trainer.model.build import build_speechlm
from trainer.model.lora import added_token_rows
from trainer.model.prompt import PromptFormat
from trainer.train import telemetry
from trainer.train.loop import SFTTrainer, compile_layers
from trainer.train.objective import SpeechLMObjective


# ------------------------------------------------------------------------------ resume, world size
@pytest.fixture(scope="module")
def one_rank_run(data_dir, tmp_path_factory):
    """1 process x 2 rows x 2 accumulation = 4 rows per step, 10 steps, checkpoints at 5 and 10."""
    out = tmp_path_factory.mktemp("one")
    config = sft_config(data_dir, out, max_steps=10, gradient_accumulation_steps=2)
    config["checkpointing"]["save_steps"] = 5
    assert main(["sft", "--config", str(write_config(out / "a.json", config))]) == 0
    return out / "t"


def test_resume_on_two_ranks_continues_at_the_same_rows(one_rank_run, data_dir, tmp_path):
    # 2 processes x 2 rows, no accumulation: the same 4 rows per step in the same order, but twice the
    # rows per micro-batch: the saved micro-batch position (10) must become 5, not be reused as is.
    config = sft_config(data_dir, tmp_path, max_steps=10)
    config["checkpointing"]["checkpoint_file_to_resume_from"] = str(one_rank_run / "checkpoints" / "step_5")
    proc = torchrun(write_config(tmp_path / "b.json", config), 2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ref, got = run_losses(one_rank_run), run_losses(tmp_path / "t")
    assert sorted(got) == list(range(6, 11))
    for step in got:
        assert got[step] == pytest.approx(ref[step], rel=1e-4), step


def test_resume_refuses_a_layout_that_cannot_continue_exactly(one_rank_run, data_dir, tmp_path, capsys):
    # 4 steps fill epoch 0 (8 of its 17 rows x 2); step 5 consumed 4 rows of epoch 1: 3 rows per
    # micro-batch cannot continue at row 4
    config = sft_config(data_dir, tmp_path, max_steps=10, batch_size=3)
    config["checkpointing"]["checkpoint_file_to_resume_from"] = str(one_rank_run / "checkpoints" / "step_5")
    assert main(["sft", "--config", str(write_config(tmp_path / "c.json", config))]) == 2
    err = capsys.readouterr().err
    assert "1 process(es) x batch_size 2 after 4 rows of epoch 1" in err and "skipped or repeated" in err
    assert not (tmp_path / "t" / "metrics.jsonl").exists()


# ------------------------------------------------------------------------------- LoRA under FSDP
def test_fsdp_lora_trains_added_rows_and_its_sharded_state_exports_them(data_dir, tmp_path):
    config = sft_config(data_dir, tmp_path, strategy="fsdp", batch_size=1, max_steps=4)
    config["checkpointing"]["save_steps"] = 4
    config["modeling"]["lora"] = {"enabled": True, "r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}
    proc = torchrun(write_config(tmp_path / "f.json", config), 2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    sharded = tmp_path / "t" / "checkpoints" / "step_4" / "resume" / "sharded"
    assert main(["export", "--checkpoint_path", str(sharded), "--output_path", str(tmp_path / "serve")]) == 0
    base, _, vocab = build_speechlm("tiny", 64, seed=7)
    added = torch.tensor(added_token_rows(vocab))
    text = torch.arange(min(added.tolist()))
    final = AutoModelForCausalLM.from_pretrained(tmp_path / "t" / "final_model")
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "serve")
    old = base.get_input_embeddings().weight.detach()
    for model in (final, exported):
        new = model.get_input_embeddings().weight.detach()
        assert (new[added] != old[added]).any(dim=1).all()
        assert torch.equal(new[text], old[text])
    for name, weight in final.state_dict().items():
        assert torch.allclose(weight, exported.state_dict()[name], atol=1e-6), name


# ----------------------------------------------------------------------------- eval, no packing
def test_eval_without_packing_on_two_ranks_matches_one_rank(tmp_path):
    # 7 val rows over 2 ranks x 1 row: rank 1's last eval batch is an empty padding row
    data = write_vectorized(tmp_path / "vec", n_train=24, n_val=7)
    losses = {}
    for nproc, batch_size in ((1, 2), (2, 1)):
        out = tmp_path / f"p{nproc}"
        config = sft_config(data, out, max_steps=2, eval_steps=2, packing=False, batch_size=batch_size)
        cfg = write_config(tmp_path / f"e{nproc}.json", config)
        if nproc == 1:
            assert main(["sft", "--config", str(cfg)]) == 0
        else:
            proc = torchrun(cfg, nproc)
            assert proc.returncode == 0, proc.stderr[-3000:]
        losses[nproc] = run_losses(out / "t", "eval_loss")
    assert list(losses[2]) == [2]
    assert losses[2][2] == pytest.approx(losses[1][2], rel=1e-4)


# --------------------------------------------------------------------------------------- compile
def test_compiled_layers_do_not_recompile_for_new_document_layouts(data_dir):
    # Dynamo's guards decide recompilation whatever the backend; "eager" keeps the test fast on CPU
    # (`training.compile_model` uses inductor).
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    lm, tokenizer, vocab = build_speechlm("tiny", 64, seed=0)
    use_packed_attention(lm)
    compile_layers(lm, backend="eager")
    objective = SpeechLMObjective(lm, vocab, "sdpa")
    data = PackedData({str(data_dir): 1.0}, "train", PromptFormat(tokenizer, vocab), max_seq_len=256,
                      pack_length=256, batch_size=2, codebook_size=64)
    batches = [data.collate(data.micro_batch_rows(0, b)) for b in range(data.batches_per_epoch(0))]
    layouts = {int(b.doc_ids.max(dim=1).values.sum()) for b in batches}
    assert len(layouts) >= 3  # the document count per batch changes
    compiled = []
    for batch in batches:
        loss, _ = objective(batch)
        loss.backward()
        compiled.append(counters["frames"]["total"])
    assert compiled[0] > 0  # the layers were compiled ...
    assert compiled[-1] == compiled[0], compiled  # ... once: no frame was compiled again after the first batch


# ---------------------------------------------------------------------------- learning rate
def test_first_warmup_update_moves_the_weights(data_dir, tmp_path):
    config = sft_config(data_dir, tmp_path, max_steps=1, warmup_steps=1)
    assert main(["sft", "--config", str(write_config(tmp_path / "w.json", config))]) == 0
    init, _, _ = build_speechlm("tiny", 64, seed=7)
    trained = load_file(str(tmp_path / "t" / "final_model" / "model.safetensors"))
    key = "model.layers.0.mlp.up_proj.weight"
    assert not torch.equal(trained[key], init.state_dict()[key])
    assert run_losses(tmp_path / "t", "lr") == {1: pytest.approx(3e-3)}


def test_logged_lr_is_the_rate_of_that_step(data_dir, tmp_path):
    # cosine from 3e-3 to 0.1 x over 4 updates, no warmup: updates run at factors cos-decayed from 1
    config = sft_config(data_dir, tmp_path, max_steps=4, warmup_steps=0)
    assert main(["sft", "--config", str(write_config(tmp_path / "l.json", config))]) == 0
    logged = run_losses(tmp_path / "t", "lr")
    expected = {k + 1: 3e-3 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * k / 4))) for k in range(4)}
    assert logged == pytest.approx(expected)


# ---------------------------------------------------------------------------------------- MFU
def test_attention_work_counts_every_sample_of_a_full_row(data_dir):
    _, tokenizer, vocab = build_speechlm("tiny", 64, seed=0)
    prompt = PromptFormat(tokenizer, vocab)
    probe = PackedData({str(data_dir): 1.0}, "train", prompt, max_seq_len=256, pack_length=256, batch_size=1)
    lengths = [len(prompt.training_example(probe.datasets[0].texts[k], probe.datasets[0].sample_codes(k)).input_ids)
               for k in (0, 1)]
    # a row exactly as long as its two samples (no padding), and one with padding after them
    for pack_length, expected in ((sum(lengths), lengths[0] ** 2 + lengths[1] ** 2),
                                  (sum(lengths) + 5, lengths[0] ** 2 + lengths[1] ** 2)):
        data = PackedData({str(data_dir): 1.0}, "train", prompt, max_seq_len=256, pack_length=pack_length,
                          batch_size=1)
        batch = data.collate([[(0, 0), (0, 1)]])
        assert batch.real_tokens == sum(lengths)
        assert telemetry.doc_lengths_sq(batch.doc_ids, batch.targets) == expected


# ------------------------------------------------------------------------------ DataLoader workers
def test_num_workers_collate_in_worker_processes_in_order(data_dir, tmp_path):
    config = TrainerConfig.model_validate(sft_config(data_dir, tmp_path, num_workers=2))
    trainer = SFTTrainer(config)
    pids = tmp_path / "pids"
    collate = trainer.train_data.collate

    def recording(rows):
        with pids.open("a") as f:
            f.write(f"{os.getpid()}\n")
        return collate(rows)

    trainer.train_data.collate = recording
    expected = trainer.train_data.iterate(SamplerState(0, 3))
    trainer.sampler = SamplerState(0, 3)
    n = trainer.train_data.batches_per_epoch(0) + 2  # across an epoch boundary
    for (got, got_state), (want, want_state) in zip(trainer.micro_batches(), expected, strict=False):
        assert got_state == want_state
        assert torch.equal(got.input_ids, want.input_ids) and torch.equal(got.doc_ids, want.doc_ids)
        n -= 1
        if n == 0:
            break
    workers = {int(p) for p in pids.read_text().split()} - {os.getpid()}
    assert len(workers) >= 2
