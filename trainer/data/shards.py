"""The vectorized dataset format (the seed's layout), read and written over fsspec.

A shard `i` of split `s` is three files:
    {s}_codes_{i}.npy        1-D int32, every sample's codes concatenated
    {s}_codes_index_{i}.npy  1-D int64 offsets, N+1 long: sample k = codes[index[k]:index[k+1]]
    {s}_samples_{i}.jsonl    line k = sample k's manifest record + "num_codes"
The merged dataset drops the `_{i}` suffix. `dataset_info.json` at the root names the codec.
"""

from __future__ import annotations

import io as _stdio
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from trainer import io
from trainer.errors import StageError

SPLITS = ("train", "val")
DATASET_INFO = "dataset_info.json"
CODES_DTYPE = np.int32
INDEX_DTYPE = np.int64


@dataclass(frozen=True)
class ShardFiles:
    codes: str
    index: str
    samples: str


def shard_files(split: str, shard: int | None = None) -> ShardFiles:
    """File names of shard `shard` of `split`, or of the merged split when `shard` is None."""
    suffix = "" if shard is None else f"_{shard}"
    return ShardFiles(
        f"{split}_codes{suffix}.npy", f"{split}_codes_index{suffix}.npy", f"{split}_samples{suffix}.jsonl"
    )


def shard_ids(dataset_url: str, split: str) -> list[int]:
    """Shard numbers of `split` present under `dataset_url`, ascending."""
    pattern = re.compile(rf"^{split}_codes_(\d+)\.npy$")
    return sorted(int(m.group(1)) for name in io.listdir(dataset_url) if (m := pattern.match(name)))


def npy_bytes(array: np.ndarray) -> bytes:
    buf = _stdio.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def read_npy(url: str) -> np.ndarray:
    return np.load(_stdio.BytesIO(io.read_bytes(url)), allow_pickle=False)


def jsonl_bytes(records: Sequence[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8")


def read_jsonl(url: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in io.read_text(url).splitlines() if line.strip()]


def pack(codes: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Per-sample code arrays -> (concatenated codes, offsets)."""
    index = np.zeros(len(codes) + 1, dtype=INDEX_DTYPE)
    np.cumsum([len(c) for c in codes], out=index[1:])
    flat = np.concatenate(codes).astype(CODES_DTYPE) if codes else np.zeros(0, dtype=CODES_DTYPE)
    return flat, index


def write_shard(
    dataset_url: str, split: str, shard: int, codes: Sequence[np.ndarray], records: Sequence[dict[str, Any]]
) -> None:
    """Write one shard; each file atomically. `records[k]` describes `codes[k]`."""
    if len(codes) != len(records):
        raise ValueError(f"{len(codes)} code arrays for {len(records)} records")
    files = shard_files(split, shard)
    flat, index = pack(codes)
    io.write_bytes_atomic(io.join(dataset_url, files.codes), npy_bytes(flat))
    io.write_bytes_atomic(io.join(dataset_url, files.index), npy_bytes(index))
    io.write_bytes_atomic(io.join(dataset_url, files.samples), jsonl_bytes(records))


@dataclass(frozen=True)
class Shard:
    codes: np.ndarray
    index: np.ndarray
    records: list[dict[str, Any]]

    def __len__(self) -> int:
        return len(self.records)

    def sample(self, k: int) -> np.ndarray:
        return self.codes[self.index[k] : self.index[k + 1]]


def read_shard(dataset_url: str, split: str, shard: int | None = None) -> Shard:
    """Read shard `shard` of `split` (the merged split when None)."""
    files = shard_files(split, shard)
    return Shard(
        read_npy(io.join(dataset_url, files.codes)),
        read_npy(io.join(dataset_url, files.index)),
        read_jsonl(io.join(dataset_url, files.samples)),
    )


def validate_index(codes_len: int, index: np.ndarray, num_records: int, name: str) -> None:
    """Raise StageError unless `index` is a valid offset table over `codes_len` codes and `num_records`."""
    if index.ndim != 1 or len(index) != num_records + 1:
        raise StageError(f"{name}: index has {len(index)} entries for {num_records} samples (want N+1)")
    if index[0] != 0 or index[-1] != codes_len:
        raise StageError(f"{name}: index spans [{index[0]}, {index[-1]}] but there are {codes_len} codes")
    if np.any(np.diff(index) < 0):
        raise StageError(f"{name}: index offsets decrease")


def validate_codes(codes: np.ndarray, codebook_size: int, name: str) -> None:
    if codes.ndim != 1:
        raise StageError(f"{name}: codes must be 1-D, got shape {codes.shape}")
    if codes.size and (codes.min() < 0 or codes.max() >= codebook_size):
        raise StageError(
            f"{name}: codes outside [0, {codebook_size}): min {codes.min()}, max {codes.max()}"
        )


def validate_records(index: np.ndarray, records: Sequence[dict[str, Any]], name: str) -> None:
    """Each record's num_codes (when present) must match its slice of the index."""
    lengths = np.diff(index)
    for k, record in enumerate(records):
        if "num_codes" in record and record["num_codes"] != lengths[k]:
            raise StageError(
                f"{name}: sample {k} says num_codes={record['num_codes']} but the index gives {lengths[k]}"
            )


def validate_shard(shard: Shard, codebook_size: int, name: str) -> None:
    validate_index(len(shard.codes), shard.index, len(shard.records), name)
    validate_codes(shard.codes, codebook_size, name)
    validate_records(shard.index, shard.records, name)
