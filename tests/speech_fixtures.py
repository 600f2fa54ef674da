"""Tiny, real artefacts shared by the GRPO/export/infer tests: a random-init codec, a tiny SpeechLM
serving directory that references it, and a vectorized dataset of example speech encoded with it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from trainer.audio import read_audio
from trainer.codec import Codec, tiny_codec_config
from trainer.data.shards import write_shard
from trainer.model.build import build_speechlm, save_speechlm
from trainer.serve.layout import write_codec_reference

REPO = Path(__file__).resolve().parents[1]
EXAMPLE_MANIFEST = REPO / "example" / "configs" / "samples.jsonl"


def example_records(max_duration: float = 2.5, speakers: tuple[str, ...] = ("rms", "kal16", "awb", "slt")
                    ) -> list[dict]:
    records = [json.loads(line) for line in EXAMPLE_MANIFEST.read_text().splitlines() if line.strip()]
    return [r for r in records if r["speaker_id"] in speakers and r["duration"] <= max_duration]


def example_wav(record: dict) -> str:
    return str(EXAMPLE_MANIFEST.parent / record["wav_path"])


def make_codec(directory: Path, sample_rate: int = 16000) -> Path:
    Codec.from_config(tiny_codec_config(sample_rate)).save(str(directory))
    return directory


def make_model(directory: Path, codec_dir: Path | None = None, seed: int = 0, prompt_format: str = "inworld",
               varied: bool = False) -> Path:
    """A tiny SpeechLM; `varied`: its weights spread (`spread_weights`)."""
    model, tokenizer, vocab = build_speechlm("tiny", codebook_size=256, prompt_format=prompt_format, seed=seed)
    if varied:
        spread_weights(model, seed)
    save_speechlm(model, tokenizer, vocab, directory)
    if codec_dir is not None:
        write_codec_reference(str(directory), str(codec_dir))
    return directory


def spread_weights(model: torch.nn.Module, seed: int) -> None:
    """Weights ~ N(0, 0.3): greedy output varies (a fresh init repeats one token) and its logit margins are
    wide, so decoders on other numeric paths (vLLM) pick the same tokens."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.3)


def make_dataset(directory: Path, codec_dir: Path, per_split: int = 6) -> Path:
    codec = Codec.load(str(codec_dir), components=("encoder",))
    records = example_records()[: 2 * per_split]
    codes = codec.encode([read_audio(example_wav(r)).samples for r in records], 16000)
    for split, part in (("train", slice(0, per_split)), ("val", slice(per_split, 2 * per_split))):
        rows = [{**r, "num_codes": len(c)} for r, c in zip(records[part], codes[part], strict=True)]
        write_shard(str(directory), split, 0, [c.astype(np.int32) for c in codes[part]], rows)
    (directory / "dataset_info.json").write_text(
        json.dumps({"codebook_size": 256, "token_rate": 50, "codec_model_path": str(codec_dir)})
    )
    return directory
