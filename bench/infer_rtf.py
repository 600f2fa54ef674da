"""Inference real-time factor: our `Synthesizer` (HF generate with a KV cache + codec decode) on
random weights of a model preset (its vocabulary sized to the codec's codebook), zero-shot with a
voice prompt from the example set.

    python bench/infer_rtf.py                                        # CPU, tiny shapes
    python bench/infer_rtf.py --preset llama-3.2-1b --codec_preset full --device cuda

Random weights never choose speech-end reliably, so every chunk generates about `--max_new_tokens`
codes: the figure is the cost per second of audio (RTF = wall time / audio seconds, < 1 is faster
than real time), not a quality measure. The first call is a warm-up (CUDA context, kernels).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from trainer.audio import read_audio
from trainer.codec import Codec
from trainer.codec.presets import PRESETS as CODEC_PRESETS
from trainer.config import SamplingConfig
from trainer.model.build import PRESETS, build_speechlm
from trainer.serve.synthesize import Synthesizer

TEXT = "The quick brown fox jumps over the lazy dog, and then it runs away into the woods."


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--codec_preset", choices=sorted(CODEC_PRESETS), default="tiny")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--max_new_tokens", type=int, default=250, help="codes per chunk (50 per second)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--prompt_wav", type=Path, default=Path("example/wavs/utt_000.flac"))
    args = parser.parse_args()

    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    config = CODEC_PRESETS[args.codec_preset]()
    codec = Codec.from_config(config).to(args.device).eval()
    lm, tokenizer, vocab = build_speechlm(args.preset, codec.codebook_size, seed=0, dtype=dtype)
    lm.to(args.device).eval()
    synth = Synthesizer(lm, tokenizer, vocab, codec, codec, model_dir="")
    prompt = read_audio(str(args.prompt_wav))
    sampling = SamplingConfig(max_new_tokens=args.max_new_tokens, max_chars_per_second=1e6)

    def once() -> tuple[float, float, int]:
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        result = synth.generate(TEXT, prompt.samples, prompt.sample_rate, "A voice prompt.", sampling, "en")
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - start, result.wave.size / result.sample_rate, sum(len(c) for c in result.codes)

    once()  # warm-up
    runs = [once() for _ in range(args.repeats)]
    wall = sum(r[0] for r in runs)
    audio = sum(r[1] for r in runs)
    codes = sum(r[2] for r in runs)
    print(f"model {args.preset} codec {args.codec_preset} device {args.device} {dtype}: {args.repeats} runs, "
          f"{audio:.1f} s of audio ({codes} codes) in {wall:.2f} s")
    print(f"RTF {wall / audio:.3f} (wall / audio seconds), {codes / wall:.1f} codes/s")


if __name__ == "__main__":
    main()
