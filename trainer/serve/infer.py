"""`tts-train infer`: zero-shot voice cloning to a WAV file, with the seed's inference flags.

    tts-train infer --model_checkpoint_path runs/demo/export/sft --prompt_wav_path prompt.wav \\
        --prompt_transcription "What the prompt says." --text "Hello there." --output_path out.wav

The codec comes from --audio_encoder_path / --audio_decoder_path, or from the serving directory's
codec reference. HF `generate` with a KV cache by default; `--use_vllm` generates on vLLM's server,
started on 127.0.0.1 for the run from `--vllm_python` (an environment with vLLM; default $TTS_VLLM_PYTHON).
"""

from __future__ import annotations

import logging
import time

from trainer import io
from trainer.audio import AudioError, read_audio, write_wav
from trainer.config import TrainerConfig, section_flags
from trainer.errors import ConfigError
from trainer.serve.synthesize import Synthesizer, check_inputs
from trainer.serve.weights import is_seed_checkpoint, seed_hint

log = logging.getLogger(__name__)

FLAGS = {
    **section_flags("infer", "model_checkpoint_path", "audio_encoder_path", "audio_decoder_path", "prompt_wav_path",
                    "prompt_transcription", "text", "language", "output_path", "use_vllm", "vllm_python"),
    **section_flags("infer.sampling", "seed", "temperature", "top_p", "top_k", "repetition_penalty",
                    "max_new_tokens"),
}


def run(config: TrainerConfig) -> int:
    cfg = config.infer
    if not cfg.model_checkpoint_path:
        raise ConfigError("--model_checkpoint_path (infer.model_checkpoint_path) is required")
    if not io.exists(cfg.model_checkpoint_path):
        raise ConfigError(f"model checkpoint not found: {cfg.model_checkpoint_path}")
    if is_seed_checkpoint(cfg.model_checkpoint_path):
        raise ConfigError(seed_hint(cfg.model_checkpoint_path))
    for flag in ("audio_encoder_path", "audio_decoder_path"):
        path = getattr(cfg, flag)
        if path and not io.exists(path):
            raise ConfigError(f"--{flag} not found: {path}")
    prompt = None
    if cfg.prompt_wav_path:
        try:
            prompt = read_audio(cfg.prompt_wav_path)
        except AudioError as err:
            raise ConfigError(f"--prompt_wav_path: {err}") from None

    text = cfg.text or ""
    check_inputs(text, None if prompt is None else prompt.samples, cfg.prompt_transcription, cfg.max_text_chars)
    synth = Synthesizer.load(
        cfg.model_checkpoint_path, encoder_path=cfg.audio_encoder_path, decoder_path=cfg.audio_decoder_path,
        use_vllm=cfg.use_vllm, vllm_python=cfg.vllm_python,
        normalize_text=config.modeling.parameters.enable_text_normalization,
        max_chunk_chars=cfg.max_chunk_chars, max_text_chars=cfg.max_text_chars,
    )
    with synth:  # stops the vLLM server (--use_vllm), also when generation fails
        start = time.perf_counter()
        result = synth.generate(
            text, None if prompt is None else prompt.samples, None if prompt is None else prompt.sample_rate,
            cfg.prompt_transcription, cfg.sampling, language=cfg.language,
        )
        elapsed = time.perf_counter() - start
    write_wav(cfg.output_path, result.wave, result.sample_rate)
    seconds = result.wave.size / result.sample_rate
    log.info(
        "wrote %s: %.2f s at %d Hz from %d chunk(s) in %.2f s (RTF %.2f)%s", cfg.output_path, seconds,
        result.sample_rate, len(result.chunks), elapsed, elapsed / seconds if seconds else float("nan"),
        "; some chunks hit max_new_tokens" if any(result.truncated) else "",
    )
    return 0

