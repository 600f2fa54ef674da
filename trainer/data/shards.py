"""The vectorized dataset format, byte for byte the seed's (its data_vectorizer, data_merger and
loader), read and written over fsspec.

A shard `i` of split `s` is three files:
    {s}_codes_{i}.npy        raw little-endian int32, every sample's codes concatenated. NOT an .npy
                             file despite its name: no header (the seed writes and reads it with
                             np.memmap(dtype=int32)).
    {s}_codes_index_{i}.npy  a real np.save int64 array of N start offsets: sample k is
                             codes[index[k]:index[k+1]], the last sample runs to the end of the file;
                             every file's offsets start at 0 (the seed rebases its val split).
    {s}_samples_{i}.jsonl    line k = sample k's record (ours add "num_codes", "line", ...).
The merged dataset drops the `_{i}` suffix. `dataset_info.json` at the root names the codec.

Reading also accepts what this trainer wrote before (codes as a real .npy with a header, N+1
boundary offsets), file by file:
- codes: a file that starts with the npy magic b"\\x93NUMPY" is an .npy. A raw codes file cannot:
  its first int32 would be 0x4D554E93 = 1297436307, far outside any codebook (at most 65536 codes),
  so a raw file starting that way is invalid data anyway.
- index: N entries (N = records in the samples file) are start offsets, N+1 are boundaries (first 0,
  last len(codes)); no other length is valid and the two cannot be confused.
In memory a `Shard` always holds N+1 `bounds`.

Limit of the seed's own code: its merger and loader cannot open an empty codes file (np.memmap
refuses one), so a shard or split without samples is read here but not there.
"""

from __future__ import annotations

import io as _stdio
import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from trainer import io
from trainer.errors import StageError

SPLITS = ("train", "val")
DATASET_INFO = "dataset_info.json"
CODES_DTYPE = np.dtype("<i4")
INDEX_DTYPE = np.dtype("<i8")
NPY_MAGIC = b"\x93NUMPY"


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


def record_phones(record: dict[str, Any]) -> list[tuple[str, int]] | None:
    """A sample record's (phone, codec frames) list (written by vectorize.phone_alignment), or None."""
    return [(str(p), int(n)) for p, n in record["phones"]] if record.get("phones") else None


# ------------------------------------------------------------------------------------------ writing
def npy_bytes(array: np.ndarray) -> bytes:
    buf = _stdio.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def codes_bytes(codes: np.ndarray) -> bytes:
    """A codes file's content: raw little-endian int32, no header."""
    return np.ascontiguousarray(codes, dtype=CODES_DTYPE).tobytes()


def index_bytes(starts: np.ndarray) -> bytes:
    """An index file's content: np.save of the N int64 start offsets."""
    return npy_bytes(np.asarray(starts, dtype=INDEX_DTYPE))


def jsonl_bytes(records: Sequence[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8")


def pack(codes: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Per-sample code arrays -> (concatenated int32 codes, N start offsets)."""
    starts = np.zeros(len(codes), dtype=INDEX_DTYPE)
    np.cumsum([len(c) for c in codes[:-1]], out=starts[1:])
    flat = np.concatenate(codes).astype(CODES_DTYPE) if codes else np.zeros(0, dtype=CODES_DTYPE)
    return flat, starts


def write_shard(
    dataset_url: str, split: str, shard: int, codes: Sequence[np.ndarray], records: Sequence[dict[str, Any]]
) -> None:
    """Write one shard; each file atomically. `records[k]` describes `codes[k]`."""
    if len(codes) != len(records):
        raise ValueError(f"{len(codes)} code arrays for {len(records)} records")
    files = shard_files(split, shard)
    flat, starts = pack(codes)
    io.write_bytes_atomic(io.join(dataset_url, files.codes), codes_bytes(flat))
    io.write_bytes_atomic(io.join(dataset_url, files.index), index_bytes(starts))
    io.write_bytes_atomic(io.join(dataset_url, files.samples), jsonl_bytes(records))


# ------------------------------------------------------------------------------------------ reading
def read_npy(url: str) -> np.ndarray:
    return np.load(_stdio.BytesIO(io.read_bytes(url)), allow_pickle=False)


def read_jsonl(url: str) -> list[dict[str, Any]]:
    records = []
    for line_no, line in enumerate(io.read_text(url).splitlines(), start=1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise StageError(f"{url}:{line_no}: not JSON ({err})") from None
    return records


def _npy_codes(source: Any, url: str, mmap_mode: str | None) -> np.ndarray:
    try:
        codes = np.load(source, mmap_mode=mmap_mode, allow_pickle=False)
    except ValueError as err:
        raise StageError(f"{url}: starts with the .npy magic but is not a valid .npy ({err})") from None
    if codes.ndim != 1 or codes.dtype.kind not in "iu":
        raise StageError(f"{url}: codes must be a 1-D integer array, got {codes.dtype} of shape {codes.shape}")
    return codes


def _raw_codes_length(size: int, url: str) -> int:
    if size % CODES_DTYPE.itemsize:
        raise StageError(f"{url}: {size} bytes is not a whole number of int32 codes")
    return size // CODES_DTYPE.itemsize


def open_codes(url: str, cache_dir: Path | None = None) -> np.ndarray:
    """A codes file of either layout (see the module docstring), memory-mapped when local. A remote
    file is downloaded into `cache_dir` (then mapped) or, without one, read into memory."""
    if not io.is_local(url):
        if cache_dir is None:
            data = io.read_bytes(url)
            if data.startswith(NPY_MAGIC):
                return _npy_codes(_stdio.BytesIO(data), url, None)
            _raw_codes_length(len(data), url)
            return np.frombuffer(data, dtype=CODES_DTYPE)
        local = cache_dir / Path(url).name
        if not local.exists():
            fs, path = io.filesystem(url)
            fs.get_file(path, str(local))
        return open_codes(str(local))
    path = io.local_path(url)
    with open(path, "rb") as f:
        head = f.read(len(NPY_MAGIC))
    if head == NPY_MAGIC:
        return _npy_codes(path, url, "r")
    if _raw_codes_length(os.path.getsize(path), url) == 0:
        return np.zeros(0, dtype=CODES_DTYPE)  # np.memmap cannot map an empty file
    return np.memmap(path, dtype=CODES_DTYPE, mode="r")


def read_index(url: str) -> np.ndarray:
    try:
        index = read_npy(url)
    except ValueError as err:
        raise StageError(f"{url}: not an np.save offset array ({err})") from None
    if index.ndim != 1 or (index.size and index.dtype.kind not in "iu"):
        raise StageError(f"{url}: not an offset table ({index.dtype} of shape {index.shape})")
    return index.astype(np.int64)


def bounds_of(index: np.ndarray, num_records: int, num_codes: int, name: str) -> np.ndarray:
    """The N+1 sample boundaries from an index of either layout; StageError unless it is a valid
    offset table over `num_codes` codes and `num_records` samples."""
    if len(index) == num_records:  # the seed's start offsets; the last sample runs to the end
        bounds = np.append(index, num_codes).astype(np.int64)
    elif len(index) == num_records + 1:  # boundaries, as this trainer wrote before
        bounds = index.astype(np.int64)
    else:
        raise StageError(
            f"{name}: index has {len(index)} offsets for {num_records} samples (want {num_records} start offsets)"
        )
    if bounds[0] != 0 or bounds[-1] != num_codes:
        raise StageError(f"{name}: offsets span [{bounds[0]}, {bounds[-1]}] but there are {num_codes} codes")
    if np.any(np.diff(bounds) < 0):
        raise StageError(f"{name}: index offsets decrease")
    return bounds


@dataclass(frozen=True)
class Shard:
    codes: np.ndarray
    bounds: np.ndarray  # N+1: sample k = codes[bounds[k]:bounds[k+1]]
    records: list[dict[str, Any]]

    def __len__(self) -> int:
        return len(self.records)

    def sample(self, k: int) -> np.ndarray:
        return self.codes[self.bounds[k] : self.bounds[k + 1]]


def read_shard(dataset_url: str, split: str, shard: int | None = None) -> Shard:
    """Read shard `shard` of `split` (the merged split when None), either layout."""
    files = shard_files(split, shard)
    codes = open_codes(io.join(dataset_url, files.codes))
    records = read_jsonl(io.join(dataset_url, files.samples))
    index = read_index(io.join(dataset_url, files.index))
    return Shard(codes, bounds_of(index, len(records), len(codes), files.index), records)


def validate_codes(codes: np.ndarray, codebook_size: int, name: str) -> None:
    if codes.size and (codes.min() < 0 or codes.max() >= codebook_size):
        raise StageError(
            f"{name}: codes outside [0, {codebook_size}): min {codes.min()}, max {codes.max()}"
        )


def validate_records(bounds: np.ndarray, records: Sequence[dict[str, Any]], name: str) -> None:
    """Each record's num_codes (when present) must match its slice of the index."""
    lengths = np.diff(bounds)
    for k, record in enumerate(records):
        if "num_codes" in record and record["num_codes"] != lengths[k]:
            raise StageError(
                f"{name}: sample {k} says num_codes={record['num_codes']} but the index gives {lengths[k]}"
            )


def validate_shard(shard: Shard, codebook_size: int, name: str) -> None:
    validate_codes(shard.codes, codebook_size, name)
    validate_records(shard.bounds, shard.records, name)
