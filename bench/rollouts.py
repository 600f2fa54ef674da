"""GRPO rollout engines: a stock vLLM server (what `use_vllm` samples from) vs HF `generate` (local
rollouts), same model, same prompts, same run; and the seconds one `storage` weight sync takes.

    python bench/rollouts.py --vllm_python ~/.cache/tts-vllm/venv-0.32.0/bin/python   # CPU, shipped model

The model is the shipped example SpeechLM (phone format: vLLM runs the stop-at-end-of-phone rounds of
`vllm_server.speech_completions`, HF the `PhoneForcing` logits processor) unless --model names
another serving directory. Prompts: the demo's eval list (voice prompt + target text), repeated to
--batch. Both engines sample (t=0.8) up to --max_new_tokens. Reported: completions/s and generated
tokens/s per engine, their ratio (vLLM / HF), and the storage sync's seconds (save_for_reload +
reload_weights) with the model's size.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from transformers import LogitsProcessorList

from trainer.audio import read_audio
from trainer.codec import Codec
from trainer.model.build import load_speechlm
from trainer.model.phone_forcing import PhoneForcing
from trainer.model.prompt import PromptFormat
from trainer.model.vocab import AudioVocab
from trainer.rl.rollout import hf_generation_kwargs
from trainer.serve import layout
from trainer.serve.vllm_server import (
    VllmServer,
    complete_ids,
    free_port,
    reload_weights,
    save_for_reload,
    served_model,
    speech_completions,
)

REPO = Path(__file__).resolve().parents[1]


def prompts(model_dir: str, codec_dir: str | None, n: int
            ) -> tuple[list[list[int]], torch.nn.Module, AudioVocab, float]:
    model, tokenizer, vocab = load_speechlm(model_dir)
    codec = Codec.load(codec_dir or layout.codec_path(model_dir), components=("encoder",))
    fmt = PromptFormat(tokenizer, vocab, frame_rate=float(codec.token_rate))
    eval_list = REPO / "example" / "configs" / "eval_list.jsonl"
    items = [json.loads(line) for line in eval_list.read_text().splitlines()]
    out = []
    for item in (items * (n // len(items) + 1))[:n]:
        wave = read_audio(str(eval_list.parent / item["prompt_wav"]))
        codes = codec.encode([wave.samples], wave.sample_rate)[0]
        out.append(fmt.inference_prompt(item["target_text"], item["prompt_text"], codes).tolist())
    return out, model.float(), vocab, float(codec.token_rate)


def hf_rollouts(model, vocab: AudioVocab, prompts: list[list[int]], max_new: int, frame_rate: float
                ) -> list[list[int]]:
    # The local GRPO rollouts' constraints (what TRL's generate gets).
    constraints = hf_generation_kwargs(vocab, model.get_input_embeddings().weight.shape[0], 0)
    processors = LogitsProcessorList([PhoneForcing(vocab, frame_rate)] if vocab.end_of_phone else [])
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), vocab.pad_token_id)
    mask = torch.zeros_like(ids)
    for row, p in enumerate(prompts):
        ids[row, width - len(p):] = torch.tensor(p)
        mask[row, width - len(p):] = 1
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=mask, do_sample=True, temperature=0.8, max_new_tokens=max_new,
                             **constraints, eos_token_id=vocab.speech_end_id,
                             pad_token_id=vocab.pad_token_id, logits_processor=processors)
    return [[t for t in row[width:].tolist() if t != vocab.pad_token_id] for row in out]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(REPO / "example" / "models" / "speechlm-small"))
    parser.add_argument("--codec", default=str(REPO / "example" / "models" / "codec-small"),
                        help="codec of the prompts' voice codes (default: the shipped one)")
    parser.add_argument("--vllm_python", default=os.environ.get("TTS_VLLM_PYTHON"), required=False)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--max_new_tokens", type=int, default=300)
    parser.add_argument("--syncs", type=int, default=3)
    args = parser.parse_args()
    if not args.vllm_python:
        parser.error("--vllm_python (or TTS_VLLM_PYTHON): the interpreter of vLLM's environment")
    torch.manual_seed(0)
    batch, model, vocab, frame_rate = prompts(args.model, args.codec, args.batch)

    start = time.perf_counter()
    hf = hf_rollouts(model, vocab, batch, args.max_new_tokens, frame_rate)
    hf_s = time.perf_counter() - start

    with tempfile.TemporaryDirectory() as tmp:
        server = VllmServer(args.vllm_python, args.model, free_port(), max_model_len=4096,
                            log_path=Path(tmp) / "vllm.log")
        with server:
            name = served_model(server.base_url)
            sampling = {"temperature": 0.8}
            complete_ids(server.base_url, name, batch[:1], 8, **sampling)  # warm-up: the first request is slow
            start = time.perf_counter()
            served = speech_completions(server.base_url, name, vocab, batch, args.max_new_tokens, sampling,
                                        phone_frame_rate=frame_rate if vocab.end_of_phone else None)
            vllm_s = time.perf_counter() - start
            sync_s = []
            for _ in range(args.syncs):
                start = time.perf_counter()
                save_for_reload(model, str(Path(tmp) / "weights"))
                reload_weights(server.base_url, str(Path(tmp) / "weights"))
                sync_s.append(time.perf_counter() - start)

    params = sum(p.numel() for p in model.parameters())
    hf_tokens, vllm_tokens = sum(map(len, hf)), sum(map(len, served))
    print(f"model {args.model}: {params / 1e6:.1f}M parameters, float32; {args.batch} prompts, "
          f"<= {args.max_new_tokens} new tokens, t=0.8, {torch.get_num_threads()} threads")
    print(f"HF generate      : {args.batch / hf_s:6.2f} completions/s  {hf_tokens / hf_s:8.1f} tokens/s  "
          f"({hf_s:.1f} s)")
    print(f"vLLM server      : {args.batch / vllm_s:6.2f} completions/s  {vllm_tokens / vllm_s:8.1f} tokens/s  "
          f"({vllm_s:.1f} s)")
    print(f"ratio vLLM / HF  : {(vllm_tokens / vllm_s) / (hf_tokens / hf_s):.2f}x tokens/s")
    print(f"storage sync     : {np.median(sync_s):.3f} s median of {args.syncs} "
          f"({params * 4 / 2**20:.0f} MiB float32 written + reloaded)")


if __name__ == "__main__":
    main()
