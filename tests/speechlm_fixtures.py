"""Tiny vectorized datasets written directly with numpy (no codec, no vectorizer) for SFT tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
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


def write_config(path: Path, config: dict) -> Path:
    path.write_text(json.dumps(config))
    return path


def run_losses(run_dir: Path, key: str = "loss") -> dict[int, float]:
    """step -> `key` from a run's metrics.jsonl (the last record wins: a resumed run re-logs steps)."""
    from trainer.metrics import read_scalars

    return {r["step"]: r[key] for r in read_scalars(str(run_dir / "metrics.jsonl")) if key in r}


def torchrun(config: Path, nproc: int, timeout: float = 300) -> subprocess.CompletedProcess:
    """`tts-train sft` under torchrun on CPU (gloo), one thread per rank."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--standalone",
           "-m", "trainer", "sft", "--config", str(config)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO)
