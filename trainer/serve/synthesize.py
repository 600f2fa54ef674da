"""Zero-shot voice cloning: text + a voice prompt (audio and its transcript) -> waveform.

    synth = Synthesizer.load("runs/demo/export/sft")            # codec from the model's codec.json
    wave, sample_rate = synth.synthesize("Hello there.", prompt_wave, 16000, "What the prompt says.")

The prompt audio is encoded once; the text is split at sentence boundaries into chunks, and every chunk
is generated from the same voice prompt (all chunks in one batch, KV cache on; or on a vLLM server
started for the run, `use_vllm`). Each chunk's
codes are decoded together with the prompt codes so the decoder hears the voice it continues, and the
prompt part is trimmed (Codec.decode(codes, prompt_codes=...)). Generation may only emit audio tokens
and speech-end, so everything generated decodes.
"""

from __future__ import annotations

import logging
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import LogitsProcessorList

from trainer import io
from trainer.codec import Codec
from trainer.config import SamplingConfig
from trainer.errors import ConfigError
from trainer.model.build import load_speechlm
from trainer.model.phone_forcing import PhoneForcing
from trainer.model.prompt import DEFAULT_LANGUAGE, PromptFormat
from trainer.serve import layout
from trainer.serve.vllm_server import VllmServer, free_port, model_context, speech_completions, vllm_python

log = logging.getLogger(__name__)

_SENTENCE_END = re.compile(r"(?<=[.!?;。！？；])\s+|(?<=[。！？；])")
_CLAUSE_END = re.compile(r"(?<=[,:，、：])\s*")


def split_text(text: str, max_chars: int) -> list[str]:
    """Chunks of at most `max_chars` characters cut at sentence ends (then clause ends, then spaces);
    consecutive short sentences share a chunk."""

    def pieces(part: str, splitters: list[re.Pattern]) -> list[str]:
        if len(part) <= max_chars:
            return [part]
        if not splitters:
            words, out, current = part.split(" "), [], ""
            for word in words:
                while len(word) > max_chars:  # one unbroken run longer than a chunk
                    if current:
                        out.append(current)
                        current = ""
                    out.append(word[:max_chars])
                    word = word[max_chars:]
                candidate = f"{current} {word}".strip()
                if len(candidate) > max_chars:
                    out.append(current)
                    current = word
                else:
                    current = candidate
            return [*out, current] if current else out
        return [p for s in splitters[0].split(part) if s.strip() for p in pieces(s.strip(), splitters[1:])]

    chunks: list[str] = []
    for sentence in pieces(" ".join(text.split()), [_SENTENCE_END, _CLAUSE_END]):
        if chunks and len(chunks[-1]) + 1 + len(sentence) <= max_chars:
            chunks[-1] = f"{chunks[-1]} {sentence}"
        else:
            chunks.append(sentence)
    return chunks


def check_inputs(text: str, prompt_wave: np.ndarray | None, prompt_text: str | None, max_text_chars: int) -> None:
    """ConfigError for requests that cannot be synthesised (checked before any model work)."""
    if not text or not text.strip():
        raise ConfigError("the text to speak is empty (--text)")
    if len(text) > max_text_chars:
        raise ConfigError(f"the text has {len(text)} characters; the limit is {max_text_chars} (infer.max_text_chars)")
    if prompt_wave is not None and not (prompt_text and prompt_text.strip()):
        raise ConfigError("a voice prompt needs its transcription (--prompt_transcription)")
    if prompt_wave is None and prompt_text:
        raise ConfigError("a prompt transcription was given without the prompt audio (--prompt_wav_path)")
    if prompt_wave is not None and prompt_wave.size == 0:
        raise ConfigError("the voice prompt audio is empty")


@dataclass
class Synthesis:
    wave: np.ndarray  # float32 at `sample_rate`
    sample_rate: int
    chunks: list[str]
    codes: list[np.ndarray]  # generated codes per chunk
    ids: list[list[int]]  # generated token ids per chunk (codes, speech-end; fed phones and end-of-phone)
    truncated: list[bool]  # a chunk hit max_new_tokens without speech-end


class Synthesizer:
    def __init__(self, model, tokenizer, vocab, encoder, decoder, model_dir: str, use_vllm: bool = False,
                 vllm_python: str | None = None, normalize_text: bool = True, max_chunk_chars: int = 300,
                 max_text_chars: int = 5000):
        self.model = model
        self.vocab = vocab
        self.prompt_format = PromptFormat(tokenizer, vocab, normalize_text, frame_rate=float(decoder.token_rate))
        self.encoder = encoder
        self.decoder = decoder
        self._forcing = PhoneForcing(vocab, decoder.token_rate) if self.prompt_format.phone_aligned else None
        self.model_dir = model_dir
        self.max_chunk_chars = max_chunk_chars
        self.max_text_chars = max_text_chars
        vocab_rows = model.get_input_embeddings().weight.shape[0]
        allowed = set(vocab.completion_ids())
        self._suppress = [i for i in range(vocab_rows) if i not in allowed]
        self._vllm = self._start_vllm(vllm_python) if use_vllm else None

    def close(self) -> None:
        """Stop the vLLM server (--use_vllm); the HF path holds nothing to release."""
        if self._vllm is not None:
            self._vllm.stop()
            self._vllm = None

    def __enter__(self) -> Synthesizer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @classmethod
    def load(cls, model_dir: str, codec_path: str | None = None, encoder_path: str | None = None,
             decoder_path: str | None = None, device: str | None = None, use_vllm: bool = False,
             **kwargs) -> Synthesizer:
        """`codec_path` sets both codec halves; `encoder_path`/`decoder_path` set one each (the seed's
        flags); unset halves come from the serving directory's codec reference."""
        if not model_dir or not io.exists(model_dir):
            raise ConfigError(f"model directory not found: {model_dir}")
        default = codec_path or layout.codec_path(model_dir)
        encoder_url, decoder_url = encoder_path or default, decoder_path or default
        if not encoder_url or not decoder_url:
            raise ConfigError(
                f"{model_dir} names no codec (codec.json): pass the codec (--audio_encoder_path and "
                "--audio_decoder_path, or eval.codec_model_path)"
            )
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        if encoder_url == decoder_url:
            encoder = decoder = Codec.load(encoder_url, device=device)
        else:
            encoder = Codec.load(encoder_url, device=device, components=("encoder",))
            decoder = Codec.load(decoder_url, device=device, components=("decoder",))
        dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
        model, tokenizer, vocab = load_speechlm(model_dir, dtype=dtype, device=device)
        model.eval()
        return cls(model, tokenizer, vocab, encoder, decoder, model_dir, use_vllm=use_vllm, **kwargs)

    @property
    def sample_rate(self) -> int:
        return self.decoder.output_sample_rate

    # -------------------------------------------------------------------------------- synthesis
    def synthesize(self, text: str, prompt_wave: np.ndarray | None, prompt_sample_rate: int | None,
                   prompt_text: str | None, sampling: SamplingConfig | None = None,
                   language: str | None = DEFAULT_LANGUAGE) -> tuple[np.ndarray, int]:
        result = self.generate(text, prompt_wave, prompt_sample_rate, prompt_text, sampling, language)
        return result.wave, result.sample_rate

    def generate(self, text: str, prompt_wave: np.ndarray | None, prompt_sample_rate: int | None,
                 prompt_text: str | None, sampling: SamplingConfig | None = None,
                 language: str | None = DEFAULT_LANGUAGE) -> Synthesis:
        """`language` (of the text and the prompt transcription) picks the text normalisation."""
        sampling = sampling or SamplingConfig()
        check_inputs(text, prompt_wave, prompt_text, self.max_text_chars)
        prompt_codes = (
            self.encoder.encode([prompt_wave], int(prompt_sample_rate))[0] if prompt_wave is not None
            else np.zeros(0, dtype=np.int64)
        )
        chunks = split_text(text, self.max_chunk_chars)
        prompts = [self.prompt_format.inference_prompt(c, prompt_text, prompt_codes, language) for c in chunks]
        # One bound per batch: the shortest chunk's, so no chunk is forced past its own text. The phone
        # format needs none: its length follows the phones.
        min_tokens = 0 if self._forcing else min(self.min_new_tokens(c, sampling) for c in chunks)
        generated = (self._generate_vllm(prompts, sampling, min_tokens) if self._vllm
                     else self._generate_hf(prompts, sampling, min_tokens))
        codes = [self.vocab.codes_from_ids(ids) for ids in generated]
        truncated = [self.vocab.speech_end_id not in ids for ids in generated]
        for chunk, cut in zip(chunks, truncated, strict=True):
            if cut:
                log.warning("chunk %r hit max_new_tokens=%d before speech-end", chunk[:40], sampling.max_new_tokens)
        waves = self.decoder.decode(codes, prompt_codes=[prompt_codes] * len(codes) if prompt_codes.size else None)
        wave = np.concatenate(waves) if waves else np.zeros(0, dtype=np.float32)
        return Synthesis(wave.astype(np.float32), self.sample_rate, chunks, codes, generated, truncated)

    def min_new_tokens(self, text: str, sampling: SamplingConfig) -> int:
        seconds = len(text) / sampling.max_chars_per_second
        return min(sampling.max_new_tokens - 1, round(seconds * self.decoder.token_rate))

    @torch.inference_mode()
    def _generate_hf(self, prompts: list[np.ndarray], sampling: SamplingConfig, min_tokens: int) -> list[list[int]]:
        device = next(self.model.parameters()).device
        width = max(len(p) for p in prompts)
        pad = self.vocab.pad_token_id
        input_ids = torch.full((len(prompts), width), pad, dtype=torch.long)
        attention = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, ids in enumerate(prompts):  # left padding: every row continues at the same position
            input_ids[row, width - len(ids) :] = torch.from_numpy(ids)
            attention[row, width - len(ids) :] = 1
        torch.manual_seed(sampling.seed)
        out = self.model.generate(
            input_ids=input_ids.to(device), attention_mask=attention.to(device), do_sample=sampling.do_sample,
            **sampling.hf_kwargs(), max_new_tokens=sampling.max_new_tokens,
            min_new_tokens=min_tokens, suppress_tokens=self._suppress, eos_token_id=self.vocab.speech_end_id,
            pad_token_id=pad, logits_processor=LogitsProcessorList([self._forcing] if self._forcing else []),
            use_cache=True,
        )
        return [row[width:].tolist() for row in out.cpu()]

    def _start_vllm(self, python: str | None) -> VllmServer:
        """vLLM's OpenAI-compatible server for this model on 127.0.0.1, as the rollout Deployment runs it."""
        python = vllm_python(python)
        local = io.download_dir(self.model_dir, tempfile.mkdtemp(prefix="vllm-model-"))
        log_path = Path(tempfile.mkdtemp(prefix="vllm-log-")) / "vllm.log"
        log.info("starting vLLM's server for %s (log: %s)", self.model_dir, log_path)
        # float32 as the HF path on CPU, so greedy decoding gives the same tokens.
        dtype = "bfloat16" if next(self.model.parameters()).is_cuda else "float32"
        server = VllmServer(python, str(local), free_port(), max_model_len=model_context(str(local)), dtype=dtype,
                            log_path=log_path)
        return server.start()

    def _generate_vllm(self, prompts: list[np.ndarray], sampling: SamplingConfig, min_tokens: int
                       ) -> list[list[int]]:
        return speech_completions(
            self._vllm.base_url, self._vllm.model_dir, self.vocab, [p.tolist() for p in prompts],
            sampling.max_new_tokens, {**sampling.vllm_kwargs(), "seed": sampling.seed}, min_new_tokens=min_tokens,
            phone_frame_rate=self.decoder.token_rate if self._forcing else None,
        )
