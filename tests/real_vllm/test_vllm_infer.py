"""`tts-train infer --use_vllm` on a real vLLM server (started by infer itself from vLLM's environment):
with greedy decoding it writes the same WAV as the Hugging Face path, for the reference's `inworld`
prompt format and for the phone format (phone-forced by stopping at end-of-phone and continuing)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from speech_fixtures import example_records, example_wav, make_codec, make_model

from trainer.cli import main

pytestmark = pytest.mark.vllm


@pytest.mark.parametrize("prompt_format", ["inworld", "phones"])
def test_infer_on_vllm_writes_the_hf_wav(prompt_format, vllm_python, tmp_path, caplog):
    codec = make_codec(tmp_path / "codec")
    model = make_model(tmp_path / "model", codec, seed=7, prompt_format=prompt_format, varied=True)
    record = example_records(speakers=("rms",))[0]
    args = ["infer", "--model_checkpoint_path", str(model), "--prompt_wav_path", example_wav(record),
            "--prompt_transcription", record["transcript"], "--text", "Hi there. Thank you.",
            "--max_new_tokens", "600", "--set", "infer.sampling.do_sample=false", "--set", "infer.max_chunk_chars=12"]
    caplog.set_level(logging.INFO, logger="trainer.serve.synthesize")
    wavs = {}
    for engine in ("hf", "vllm"):
        out = tmp_path / f"{engine}.wav"
        extra = ["--use_vllm", "--vllm_python", vllm_python] if engine == "vllm" else []
        assert main([*args, "--output_path", str(out), *extra]) == 0
        wavs[engine], _ = sf.read(str(out), dtype="int16")
    assert "starting vLLM's server" in caplog.text  # the vLLM run did not fall back to HF
    assert wavs["hf"].size > 0 and np.array_equal(wavs["vllm"], wavs["hf"])


def test_use_vllm_with_an_interpreter_without_vllm_is_a_clear_error(tmp_path, capsys):
    model = make_model(tmp_path / "model", make_codec(tmp_path / "codec"))
    code = main(["infer", "--model_checkpoint_path", str(model), "--text", "hi", "--use_vllm",
                 "--vllm_python", str(Path("/usr/bin/python3"))])
    assert code == 2 and "needs an environment with vLLM" in capsys.readouterr().err
