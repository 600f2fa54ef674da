"""Real-token fraction of three row layouts on two length distributions.

    python bench/packing.py

Layouts: sequence packing (ours, rows of --pack_length), per-batch padding (the seed: each batch of
--batch_size samples padded to its longest) and pad-to-max (Llasa: every sample padded to 2048).
Distributions: LibriTTS-like (lognormal, median 5 s, sigma 0.6, clipped to 1-20 s; 50 codes/s + ~20
text tokens) and the example manifest's durations.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from trainer.data.packing import pack_rows, packing_stats

REPO = Path(__file__).resolve().parents[1]


def libritts_like(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    seconds = np.clip(rng.lognormal(np.log(5.0), 0.6, n), 1.0, 20.0)
    return (seconds * 50).astype(np.int64) + rng.integers(10, 31, n)


def example_lengths() -> np.ndarray:
    records = [json.loads(line) for line in (REPO / "example/configs/samples.jsonl").read_text().splitlines() if line]
    return np.array([int(r["duration"] * 50) + 20 for r in records], dtype=np.int64)


def per_batch_padding(lengths: np.ndarray, batch: int, seed: int) -> float:
    order = np.random.default_rng(seed).permutation(len(lengths))
    real = slots = 0
    for start in range(0, len(order), batch):
        chunk = lengths[order[start : start + batch]]
        real += chunk.sum()
        slots += chunk.max() * len(chunk)
    return real / slots


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--pack_length", type=int, default=4096)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--pad_to", type=int, default=2048)
    parser.add_argument("--samples", type=int, default=20000)
    args = parser.parse_args()
    print(f"{'distribution':<14} {'samples':>8} {'packing':>9} {'per-batch pad':>14} {'pad-to-max':>11} "
          f"{'pack/batch':>11} {'pack/max':>9}")
    for name, lengths in (("libritts-like", libritts_like(args.samples, 0)), ("example", example_lengths())):
        lengths = lengths[lengths <= min(args.pack_length, args.pad_to)]
        packed = packing_stats(lengths, pack_rows(lengths, args.pack_length), args.pack_length).efficiency
        batch = per_batch_padding(lengths, args.batch_size, 0)
        pad_max = lengths.sum() / (len(lengths) * args.pad_to)
        print(f"{name:<14} {len(lengths):>8} {100 * packed:>8.2f}% {100 * batch:>13.2f}% {100 * pad_max:>10.2f}% "
              f"{packed / batch:>10.2f}x {packed / pad_max:>8.2f}x")


if __name__ == "__main__":
    main()
