"""Batched, length-bucketed codec encode vs a per-file loop on the same audio, in the same run.

    python bench/codec_encode.py [--preset tiny|full] [--manifest example/configs/samples.jsonl]

Prints audio-seconds per second for both and their ratio (goal >= 3x). The tiny preset (default)
runs on CPU in well under two minutes; `full` is the X-codec2 shape without its semantic branch
(random weights: speed only).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from trainer.audio import read_audio
from trainer.codec import Codec
from trainer.codec.presets import PRESETS


def load_clips(manifest: Path, limit: int) -> list[np.ndarray]:
    clips = []
    for line in manifest.read_text().splitlines()[:limit]:
        audio = read_audio(str(manifest.parent / json.loads(line)["wav_path"]))
        clips.append(audio.samples if audio.sample_rate == 16000 else None)
    return [c for c in clips if c is not None]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--manifest", type=Path, default=Path("example/configs/samples.jsonl"))
    parser.add_argument("--clips", type=int, default=24)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    torch.manual_seed(0)
    codec = Codec.from_config(PRESETS[args.preset](), components=("encoder",)).to(args.device)
    clips = load_clips(args.manifest, args.clips)
    seconds = sum(len(c) for c in clips) / 16000
    codec.encode(clips[:2], 16000)  # warm-up: first-call allocations out of both timings

    start = time.perf_counter()
    looped = [codec.encode([clip], 16000)[0] for clip in clips]
    loop_s = time.perf_counter() - start

    start = time.perf_counter()
    batched = codec.encode(clips, 16000, batch_size=args.batch_size)
    batch_s = time.perf_counter() - start

    same = all(np.array_equal(a, b) for a, b in zip(looped, batched, strict=False))
    print(f"preset={args.preset} device={args.device} clips={len(clips)} audio={seconds:.1f}s")
    print(f"per-file loop : {seconds / loop_s:8.1f} audio-s/s ({loop_s:.2f} s)")
    print(f"batched x{args.batch_size:<4}: {seconds / batch_s:8.1f} audio-s/s ({batch_s:.2f} s)")
    print(f"ratio batched/loop: {loop_s / batch_s:.2f}x (goal >= 3x); identical codes: {same}")


if __name__ == "__main__":
    main()
