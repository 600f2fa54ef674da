"""`tts-train infer` and the Synthesizer API: zero-shot cloning from a real prompt, clear input errors."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf
from speech_fixtures import example_records, example_wav, make_codec, make_model

from trainer.audio import read_audio
from trainer.cli import main
from trainer.config import SamplingConfig
from trainer.serve.synthesize import Synthesizer, split_text

MAX_NEW_TOKENS = 20


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("infer")
    codec = make_codec(root / "codec", sample_rate=24000)  # decoder rate differs from the prompt's 16 kHz
    return make_model(root / "model", codec), example_records()[0]


def test_split_text_at_sentence_boundaries():
    text = "First sentence here. Second one! A third, rather long sentence, with clauses; and more words here."
    chunks = split_text(text, 40)
    assert chunks[0] == "First sentence here. Second one!"
    assert all(len(c) <= 40 for c in chunks)
    assert " ".join(chunks).split() == text.split()
    assert split_text("short", 300) == ["short"]
    assert all(len(c) <= 10 for c in split_text("x" * 25 + " tail", 10))


def test_infer_cli_writes_wav_at_decoder_rate(served, tmp_path):
    model, record = served
    out = tmp_path / "out.wav"
    code = main([
        "infer", "--model_checkpoint_path", str(model), "--prompt_wav_path", example_wav(record),
        "--prompt_transcription", record["transcript"], "--text", "Hello there. How are you today?",
        "--output_path", str(out), "--max_new_tokens", str(MAX_NEW_TOKENS), "--seed", "3",
        "--set", "infer.max_chunk_chars=20",
    ])
    assert code == 0
    info = sf.info(str(out))
    assert info.samplerate == 24000 and info.channels == 1
    # Two chunks of at most MAX_NEW_TOKENS codes each at 50 codes/s; the prompt's audio is trimmed off.
    assert 0 < info.duration <= 2 * MAX_NEW_TOKENS / 50 + 1e-6


def test_synthesizer_api_decodes_only_generated_codes(served):
    model, record = served
    synth = Synthesizer.load(str(model), max_chunk_chars=20)
    prompt = read_audio(example_wav(record))
    result = synth.generate("Hello there. How are you today?", prompt.samples, prompt.sample_rate,
                            record["transcript"], SamplingConfig(max_new_tokens=MAX_NEW_TOKENS, seed=1))
    assert result.chunks == ["Hello there.", "How are you today?"]
    assert all(len(c) <= MAX_NEW_TOKENS and (c < 256).all() for c in result.codes)
    assert result.wave.size == sum(len(c) for c in result.codes) * 24000 // 50
    again, rate = synth.synthesize("Hello there. How are you today?", prompt.samples, prompt.sample_rate,
                                   record["transcript"], SamplingConfig(max_new_tokens=MAX_NEW_TOKENS, seed=1))
    assert rate == 24000 and np.array_equal(again, result.wave)  # same seed, same audio


def test_speech_end_is_held_back_until_the_text_can_have_been_spoken(served):
    model, record = served
    synth = Synthesizer.load(str(model))
    prompt = read_audio(example_wav(record))
    text = "A warm cup of tea is waiting on the table."  # 42 characters: >= 4.2 s at 10 chars/s

    def lengths(cps: float) -> list[int]:
        return [len(synth.generate(text, prompt.samples, prompt.sample_rate, record["transcript"],
                                   SamplingConfig(max_new_tokens=400, max_chars_per_second=cps, seed=seed)).codes[0])
                for seed in range(5)]

    assert min(lengths(1000.0)) < 210  # unconstrained, the random model stops early on some seed
    assert min(lengths(10.0)) >= 210


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--text", ""], "empty"),
        (["--text", "hi", "--prompt_wav_path", "{wav}"], "transcription"),
        (["--text", "hi", "--prompt_transcription", "words"], "without the prompt audio"),
        (["--text", "hi", "--prompt_wav_path", "{missing}", "--prompt_transcription", "w"], "missing_file"),
        (["--text", "x" * 51, "--set", "infer.max_text_chars=50"], "limit is 50"),
        (["--text", "hi", "--audio_decoder_path", "{missing}"], "audio_decoder_path"),
    ],
)
def test_bad_inputs_fail_with_exit_2(served, tmp_path, capsys, args, message):
    model, record = served
    out = tmp_path / "out.wav"
    args = [a.format(wav=example_wav(record), missing=str(tmp_path / "nope.wav")) for a in args]
    assert main(["infer", "--model_checkpoint_path", str(model), "--output_path", str(out), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not out.exists()


def test_missing_model_dir_fails_with_exit_2(tmp_path, capsys):
    assert main(["infer", "--model_checkpoint_path", str(tmp_path / "none"), "--text", "hi"]) == 2
    assert "not found" in capsys.readouterr().err


def test_use_vllm_without_vllm_is_a_clear_error(served, capsys, monkeypatch):
    """The dev environment has no vLLM (it lives in its own, as the rollout image): a clear error, no
    model loaded. tests/real_vllm runs --use_vllm on a real server."""
    model, _ = served
    monkeypatch.delenv("TTS_VLLM_PYTHON", raising=False)
    assert main(["infer", "--model_checkpoint_path", str(model), "--text", "hi", "--use_vllm"]) == 2
    assert "needs an environment with vLLM" in capsys.readouterr().err
