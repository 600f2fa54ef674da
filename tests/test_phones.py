"""The phone-aligned prompt format: flite's front end, the training layout, vectorize's phone timings,
SFT on them and phone-forced generation, through the public API and CLIs (real flite)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from speech_fixtures import example_records, example_wav, make_codec, make_model
from speechlm_fixtures import write_config

from trainer.audio import read_audio
from trainer.cli import main
from trainer.config import SamplingConfig
from trainer.data.dataset import VectorizedSplit
from trainer.model import phones
from trainer.model.build import build_speechlm, load_speechlm
from trainer.model.phone_forcing import MAX_PHONE_SECONDS, PhoneForcing, forced_completions
from trainer.model.prompt import IGNORE_INDEX, PromptFormat
from trainer.rl.prompts import build_prompts
from trainer.serve.synthesize import Synthesizer


@pytest.fixture(scope="module")
def phone_format():
    _, tokenizer, vocab = build_speechlm("tiny", codebook_size=256, prompt_format="phones")
    return PromptFormat(tokenizer, vocab)


def test_front_end_reads_any_english_text():
    got = phones.phonemize("Hello world, 42 boxes.")
    assert got[0] == got[-1] == "pau" and "pau" in got[1:-1]  # the comma is a phrase break
    assert got[1:5] == ["hh", "ax", "l", "ow"]
    assert set(got) <= set(phones.PHONES)
    times = phones.approximate_times("Hello world", 2.0)
    assert times[-1][1] == pytest.approx(2.0) and [p for p, _ in times] == phones.phonemize("Hello world")


def test_frames_go_to_the_phone_that_holds_their_centre():
    times = [("pau", 0.1), ("hh", 0.14), ("ax", 0.2)]
    # 50 Hz: frame centres 0.01, 0.03, ..., 0.23; the last two lie past the end and go to the last phone.
    assert phones.frames_per_phone(times, 12, 50.0) == [("pau", 5), ("hh", 2), ("ax", 5)]
    assert phones.frames_per_phone([("pau", 0.02)], 3, 50.0) == [("pau", 3)]


def test_vocabulary_puts_end_of_phone_in_the_audio_head(phone_format):
    vocab = phone_format.vocab
    assert vocab.audio_head_contiguous and vocab.head_start == vocab.audio_offset - 2
    assert vocab.head_specials == [vocab.end_of_phone_id, vocab.speech_end_id]
    assert vocab.end_of_phone_id in vocab.completion_ids()
    assert all(phones.phone_token(p) in vocab.special_tokens for p in phones.PHONES)


def test_training_example_labels_codes_and_ends_never_phones(phone_format):
    vocab = phone_format.vocab
    frames = [("pau", 2), ("hh", 0), ("ax", 3)]
    codes = np.array([5, 6, 7, 8, 9])
    ex = phone_format.training_example("ignored", codes, phones=frames)
    ph = dict(zip(phones.PHONES, phone_format.phone_ids(list(phones.PHONES)), strict=True))
    eop, sep, end = vocab.end_of_phone_id, vocab.speech_start_id, vocab.speech_end_id
    c = [int(i) for i in vocab.code_ids(codes)]
    prefix = [phone_format.tokenizer.bos_token_id, ph["pau"], ph["hh"], ph["ax"], sep]
    body = [ph["pau"], c[0], c[1], eop, ph["hh"], eop, ph["ax"], c[2], c[3], c[4], eop, end]
    assert ex.input_ids.tolist() == prefix + body
    labelled = [int(i) for i, lab in zip(ex.input_ids, ex.labels, strict=True) if lab != IGNORE_INDEX]
    assert labelled == [*c[:2], eop, eop, *c[2:], eop, end]
    assert len(ex.input_ids) == phone_format.example_length(0, len(codes), len(frames))
    with pytest.raises(ValueError, match="add up"):
        phone_format.training_example("x", codes, phones=[("pau", 4)])


def test_phone_prompt_prefills_the_reference_phone_by_phone(phone_format):
    vocab = phone_format.vocab
    ref_codes = np.arange(40) % 256
    ids = phone_format.inference_prompt("Yes.", "Hello world.", ref_codes).tolist()
    target = phone_format.phone_ids(phones.phonemize("Yes."))
    listed = phone_format.phone_ids(phones.phonemize("Hello world.") + phones.phonemize("Yes."))
    assert ids[1 : 1 + len(listed)] == listed and ids[1 + len(listed)] == vocab.speech_start_id
    assert ids[-1] == target[0]
    assert sum(vocab.is_audio(np.array(ids))) == 40  # every reference code, once
    assert ids.count(vocab.end_of_phone_id) == len(phones.phonemize("Hello world."))


def _phone_manifest(tmp_path, records):
    lines = []
    for i, r in enumerate(records):
        line = {**r, "wav_path": example_wav(r)}
        if i == 0:  # timings given (flite's for this text, stretched to the clip)
            line["phone_times"] = [list(t) for t in phones.approximate_times(r["transcript"], r["duration"])]
        if i == 1:
            line["phone_times"] = [["qq", 0.5]]  # not a phone: rejected with its reason
        lines.append(json.dumps(line))
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text("\n".join(lines) + "\n")
    return manifest


@pytest.fixture(scope="module")
def phone_data(tmp_path_factory):
    """5 rms clips vectorized with phone alignment (one bad line), by `tts-train vectorize`."""
    root = tmp_path_factory.mktemp("phone-data")
    codec = make_codec(root / "codec")
    records = example_records(max_duration=6.0, speakers=("rms",))[:5]
    manifest = _phone_manifest(root, records)
    out = root / "vectorized"
    settings = [f"vectorize.dataset_path={manifest}", f"vectorize.output_dir={out}",
                f"vectorize.codec_model_path={codec}", "vectorize.phone_alignment=true", "vectorize.val_fraction=0",
                "vectorize.num_workers=0", "metrics.port=0"]
    code = main(["vectorize", *(arg for s in settings for arg in ("--set", s))])
    return code, codec, out


def test_vectorize_records_phone_frames_and_sft_trains_on_them(phone_data, tmp_path):
    code, _, out = phone_data
    assert code == 0
    summary = json.loads((out / "vectorize_summary.json").read_text())
    assert summary["rejected"]["by_reason"] == {"bad_phone_times": 1}
    assert summary["notes"]["approximate_phone_times"] == 3
    split = VectorizedSplit(str(out), "train")
    assert len(split) == 4
    for k in range(len(split)):
        assert sum(n for _, n in split.phones[k]) == split.num_codes[k]
        assert [p for p, _ in split.phones[k]] == phones.phonemize(split.texts[k])

    sft = {
        "training": {"max_steps": 2, "batch_size": 2, "pack_length": 512, "output_dir": str(tmp_path / "ck"),
                     "run_name": "sft", "logging_steps": 1, "eval_steps": 100, "precision": "fp32"},
        "modeling": {"parameters": {"model_name": "tiny", "codebook_size": 256, "max_seq_len": 512,
                                    "prompt_format": "phones"}},
        "checkpointing": {"save_steps": 2},
        "train_weighted_datasets": {str(out): 1.0},
        "metrics": {"port": 0},
    }
    assert main(["sft", "--config", str(write_config(tmp_path / "sft.json", sft))]) == 0
    assert (tmp_path / "ck" / "sft" / "final_model" / "speechlm.json").exists()


def test_inworld_data_is_refused_by_the_phone_format(tmp_path, data_dir):
    sft = {
        "training": {"max_steps": 1, "output_dir": str(tmp_path / "ck"), "run_name": "sft"},
        "modeling": {"parameters": {"model_name": "tiny", "codebook_size": 256, "prompt_format": "phones"}},
        "train_weighted_datasets": {str(data_dir): 1.0},
        "metrics": {"port": 0},
    }
    assert main(["sft", "--config", str(write_config(tmp_path / "sft.json", sft))]) != 0


def test_phone_forced_generation_speaks_every_phone_in_order(tmp_path):
    codec = make_codec(tmp_path / "codec")
    model = make_model(tmp_path / "model", codec, prompt_format="phones")
    record = example_records(speakers=("rms",))[0]
    synth = Synthesizer.load(str(model))
    prompt = read_audio(example_wav(record))
    text = "Good morning. See you soon."
    vocab, phone_ids = synth.vocab, set(synth.prompt_format.phone_ids(list(phones.PHONES)))
    max_frames = round(MAX_PHONE_SECONDS * synth.decoder.token_rate)
    for sampling in (SamplingConfig(do_sample=False, max_new_tokens=4000), SamplingConfig(seed=3, max_new_tokens=4000)):
        result = synth.generate(text, prompt.samples, prompt.sample_rate, record["transcript"], sampling)
        assert result.truncated == [False]
        spoken = result.ids[0]
        # The phones forced are exactly the text's (the first ends the prompt), each ended once, then speech-end.
        assert [i for i in spoken if i in phone_ids] == synth.prompt_format.phone_ids(phones.phonemize(text))[1:]
        assert spoken.count(vocab.end_of_phone_id) == len(phones.phonemize(text))
        assert spoken[-1] == vocab.speech_end_id
        runs, run = [], 0
        for i in spoken:
            run = run + 1 if vocab.is_audio(np.array(i)) else run
            if i == vocab.end_of_phone_id:
                runs.append(run)
                run = 0
        assert max(runs) <= max_frames and sum(runs) == len(result.codes[0])
        assert result.wave.size == len(result.codes[0]) * synth.decoder.output_sample_rate // synth.decoder.token_rate


def _hf_completer(model, vocab, calls: list[int]):
    """A `Completer` as a server runs it: constrain to `allowed`, stop after a `stop` token (kept)."""
    rows = model.get_input_embeddings().weight.shape[0]

    def complete(prompts, max_tokens, allowed, stop):
        calls.append(len(prompts))
        outs = []
        for prompt in prompts:
            ids = torch.tensor([prompt])
            out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=max_tokens,
                                 suppress_tokens=[i for i in range(rows) if i not in set(allowed)],
                                 eos_token_id=stop, pad_token_id=vocab.pad_token_id)
            outs.append(out[0, len(prompt):].tolist())
        return outs

    return complete


def test_stop_and_continue_rounds_equal_the_forcing_processor(tmp_path):
    """What a stock vLLM server runs for the phone format (stop at end-of-phone, feed the next phone,
    continue) gives generate + PhoneForcing's tokens: phones fed, budgets, speech-end and truncation."""
    model_dir = make_model(tmp_path / "model", prompt_format="phones", seed=5, varied=True)
    model, tokenizer, vocab = load_speechlm(str(model_dir))
    fmt = PromptFormat(tokenizer, vocab, frame_rate=50.0)
    prompt_codes = np.arange(40) * 7 % 256
    prompts = [fmt.inference_prompt(text, "Thank you.", prompt_codes).tolist()
               for text in ("Good morning.", "See you soon, please.")]
    suppress = [i for i in range(model.get_input_embeddings().weight.shape[0]) if i not in set(vocab.completion_ids())]
    for max_new in (4000, 90):  # every phone spoken; cut mid-sentence
        expected = []
        for prompt in prompts:
            ids = torch.tensor([prompt])
            out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=max_new,
                                 suppress_tokens=suppress, eos_token_id=vocab.speech_end_id,
                                 pad_token_id=vocab.pad_token_id, logits_processor=[PhoneForcing(vocab, 50.0)])
            expected.append(out[0, len(prompt):].tolist())
        calls: list[int] = []
        got = forced_completions(prompts, vocab, 50.0, max_new, _hf_completer(model, vocab, calls))
        assert got == expected
        ended = [ids.count(vocab.end_of_phone_id) for ids in got]
        if max_new == 4000:
            assert [ids[-1] for ids in got] == [vocab.speech_end_id] * 2
            # One round per phone, both rows in one request while both speak.
            assert ended == [len(phones.phonemize(t)) for t in ("Good morning.", "See you soon, please.")]
            assert len(calls) == max(ended) and calls[0] == 2
        else:
            assert [len(ids) for ids in got] == [90, 90] and vocab.speech_end_id not in got[0] + got[1]


def test_grpo_rollouts_are_phone_forced_from_the_reference_timings(phone_data, tmp_path):
    _, codec, data = phone_data
    model = make_model(tmp_path / "model", codec, prompt_format="phones")
    _, tokenizer, vocab = load_speechlm(str(model))
    prompt_format = PromptFormat(tokenizer, vocab)
    prompts = build_prompts({str(data): 1.0}, "train", prompt_format, 100_000, None, seed=0)
    split = VectorizedSplit(str(data), "train")
    reference = split.texts.index(prompts[0].reference_text)
    ids = tokenizer(prompts[0].prompt, add_special_tokens=False)["input_ids"]
    # The reference is prefilled with its vectorized timings: its k-th phone's codes, then end-of-phone.
    body = ids[ids.index(vocab.speech_start_id) + 1:]
    eops = [i for i, t in enumerate(body) if t == vocab.end_of_phone_id]
    assert len(eops) == len(split.phones[reference])
    starts = [0] + [e + 1 for e in eops[:-1]]
    assert [e - s - 1 for s, e in zip(starts, eops, strict=True)] == [n for _, n in split.phones[reference]]

    settings = {
        "rlhf_training.base_model_dir": str(model), "train_weighted_datasets": {str(data): 1.0},
        "rlhf_training.num_generations": 2, "rlhf_training.per_device_train_batch_size": 2,
        "rlhf_training.max_completion_length": 40, "rlhf_training.min_completion_length": 0,
        "rlhf_training.reward_funcs": ["WERRewardFunc", "TruncationRewardFunc"],
        "rlhf_training.reward_weights": [1.0, 1.0],
        "rlhf_training.mask_truncated_completions": False, "rlhf_training.guard_rail_steps": 2,
        "rlhf_training.guard_rail_samples": 1, "training.max_steps": 2, "training.logging_steps": 1,
        "training.precision": "fp32", "training.output_dir": str(tmp_path / "out"), "training.run_name": "rl",
        "checkpointing.save_steps": 2, "metrics.port": 0,
    }
    args = [a for k, v in settings.items() for a in ("--set", f"{k}={json.dumps(v)}")]
    assert main(["rlhf", *args]) == 0
    assert (tmp_path / "out" / "rl" / "final_model" / "_COMPLETE").exists()
    # TRL's vllm-serve cannot phone-force; the stock vLLM server can (tests/real_vllm).
    assert main(["rlhf", *args, "--set", "rlhf_training.use_vllm=true", "--set", "rlhf_training.weight_sync=nccl",
                 "--set", "training.run_name=rl2"]) == 2
