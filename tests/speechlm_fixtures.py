"""Tiny vectorized datasets written directly with numpy (no codec, no vectorizer) for SFT tests."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def transcripts() -> list[str]:
    lines = (REPO / "example" / "configs" / "samples.jsonl").read_text().splitlines()
    return [json.loads(line)["transcript"] for line in lines if line.strip()]


def learnable_codes(rng: np.random.Generator, n: int, codebook_size: int) -> np.ndarray:
    """Codes with structure a model can learn (c[t+1] = 5 c[t] + 3 mod K from a random start)."""
    codes = np.empty(n, dtype=np.int32)
    codes[0] = rng.integers(codebook_size)
    for i in range(1, n):
        codes[i] = (5 * codes[i - 1] + 3) % codebook_size
    return codes


def write_vectorized(
    root: Path,
    n_train: int = 48,
    n_val: int = 8,
    codebook_size: int = 64,
    min_codes: int = 10,
    max_codes: int = 60,
    seed: int = 0,
    sharded: bool = False,
    info_codebook_size: int | None = None,
) -> Path:
    rng = np.random.default_rng(seed)
    texts = transcripts()
    root.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("val", n_val)):
        samples = [learnable_codes(rng, int(rng.integers(min_codes, max_codes + 1)), codebook_size) for _ in range(n)]
        records = [
            {"id": f"{split}_{k}", "transcript": texts[k % len(texts)], "language": "en", "num_codes": len(c)}
            for k, c in enumerate(samples)
        ]
        parts = [(samples[: n // 2], records[: n // 2]), (samples[n // 2 :], records[n // 2 :])] if sharded else [
            (samples, records)
        ]
        for i, (codes, recs) in enumerate(parts):
            suffix = f"_{i}" if sharded else ""
            index = np.zeros(len(codes) + 1, dtype=np.int64)
            np.cumsum([len(c) for c in codes], out=index[1:])
            np.save(root / f"{split}_codes{suffix}.npy", np.concatenate(codes).astype(np.int32))
            np.save(root / f"{split}_codes_index{suffix}.npy", index)
            (root / f"{split}_samples{suffix}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    info = {"codebook_size": info_codebook_size or codebook_size, "token_rate": 50, "codec_model_path": "none"}
    (root / "dataset_info.json").write_text(json.dumps(info))
    return root


def sft_config(data: Path, out: Path, **training) -> dict:
    """A tiny CPU SFT config dict in the seed's shape."""
    return {
        "training": {
            "seed": 7, "logging_steps": 5, "eval_steps": 10, "learning_rate": 3e-3, "batch_size": 2,
            "precision": "fp32", "strategy": "ddp", "max_steps": 20, "warmup_steps": 2, "pack_length": 256,
            "output_dir": str(out), "run_name": "t", **training,
        },
        "modeling": {"parameters": {"codebook_size": 64, "max_seq_len": 256, "model_name": "tiny"}},
        "checkpointing": {"save_steps": 10, "keep_only_last_n_checkpoints": 2},
        "train_weighted_datasets": {str(data): 1.0},
        "val_weighted_datasets": {str(data): 1.0},
        "metrics": {"port": 0},
    }
