"""`tts-train merge`: shards -> one `{split}_codes.npy` / `_codes_index.npy` / `_samples.jsonl` per split.

Every shard is validated (offset table, code range, num_codes per record) before anything is
published; merged files are staged and published atomically, then `_merged.json` records which
shards they hold, and only after that are shards removed (`--remove_shards`). A run killed at any
point can simply be run again: it either re-merges from intact shards or finishes the removal.
Memory stays at one shard: codes stream into the merged file. Shards of either layout (the seed's or
the one this trainer wrote before, see `shards`) merge into the seed's layout.

`--only_glue_samples` (the seed's flag) does only what the seed's does: concatenates every
`samples_*.jsonl` of the directory into `samples.jsonl`, touching no codes.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from trainer import io
from trainer.config import TrainerConfig
from trainer.data import shards
from trainer.data.vectorize import MARKER_PATTERN, SUMMARY
from trainer.errors import ConfigError, StageError

log = logging.getLogger(__name__)

FLAGS = {
    "dataset_path": "merge.dataset_path",
    "remove_shards": "merge.remove_shards",
    "only_glue_samples": "merge.only_glue_samples",
}

MERGED = "_merged.json"
GLUED = "samples.jsonl"
GLUE_PATTERN = re.compile(r"^samples_(.*)\.jsonl$")


@contextmanager
def staged_file(dest_url: str) -> Iterator[Path]:
    """A local scratch file that replaces `dest_url` when the block succeeds (rename on a local
    filesystem, one upload otherwise) and vanishes when it fails."""
    if io.is_local(dest_url):
        dest = Path(io.local_path(dest_url))
        tmp = dest.with_name(f".{dest.name}.tmp-{uuid.uuid4().hex[:8]}")
        scratch = None
    else:
        scratch = Path(tempfile.mkdtemp(prefix="merge-"))
        tmp = scratch / "file"
    try:
        yield tmp
        if scratch is None:
            os.replace(tmp, dest)
        else:
            fs, path = io.filesystem(dest_url)
            fs.put_file(str(tmp), path)
    finally:
        tmp.unlink(missing_ok=True)
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)


def codebook_size_of(dataset_url: str, config: TrainerConfig) -> int:
    """From dataset_info.json (written by vectorize); shards made by the seed trainer have none, so
    the config's codebook size is the bound then."""
    info_url = io.join(dataset_url, shards.DATASET_INFO)
    if io.exists(info_url):
        return int(io.read_json(info_url)["codebook_size"])
    return config.modeling.parameters.codebook_size


def merge_split(
    dataset_url: str, split: str, ids: list[int], codebook_size: int, stack: ExitStack
) -> dict[str, Any]:
    """Validate the shards of `split` and stage the merged files (published when `stack` closes)."""
    merged = shards.shard_files(split)
    codes_path = stack.enter_context(staged_file(io.join(dataset_url, merged.codes)))
    index_path = stack.enter_context(staged_file(io.join(dataset_url, merged.index)))
    samples_path = stack.enter_context(staged_file(io.join(dataset_url, merged.samples)))
    starts: list[np.ndarray] = []
    code_pos = 0
    with codes_path.open("wb") as codes_out, samples_path.open("wb") as samples_out:
        for i in ids:
            files = shards.shard_files(split, i)
            shard = shards.read_shard(dataset_url, split, i)
            shards.validate_shard(shard, codebook_size, files.codes)
            codes_out.write(shards.codes_bytes(shard.codes))
            starts.append(shard.bounds[:-1] + code_pos)
            samples_out.write(shards.jsonl_bytes(shard.records))
            code_pos += len(shard.codes)
    index = np.concatenate(starts) if starts else np.zeros(0, dtype=shards.INDEX_DTYPE)
    index_path.write_bytes(shards.index_bytes(index))
    return {"shards": ids, "samples": len(index), "codes": code_pos}


def glue_samples(dataset_url: str) -> tuple[int, int]:
    """Concatenate `samples_*.jsonl` into `samples.jsonl`, numbered files in numeric order (the seed
    takes directory order, which is arbitrary); returns (files, records). A line that is not JSON
    stops it before anything is published."""
    found = [m for name in io.listdir(dataset_url) if (m := GLUE_PATTERN.match(name))]
    found.sort(key=lambda m: (0, int(m[1]), "") if m[1].isdigit() else (1, 0, m[1]))
    if not found:
        raise StageError(f"{dataset_url}: no samples_*.jsonl files to glue")
    count = 0
    with staged_file(io.join(dataset_url, GLUED)) as tmp, tmp.open("wb") as out:
        for m in found:
            records = shards.read_jsonl(io.join(dataset_url, m[0]))
            out.write(shards.jsonl_bytes(records))
            count += len(records)
    return len(found), count


def remove_shard_files(dataset_url: str, plan: dict[str, list[int]]) -> int:
    removed = 0
    for split, ids in plan.items():
        for i in ids:
            files = shards.shard_files(split, i)
            for name in (files.samples, files.index, files.codes):
                url = io.join(dataset_url, name)
                if io.exists(url):
                    io.remove(url)
                    removed += 1
    return removed


def check_vectorize_finished(dataset_url: str) -> None:
    markers = [n for n in io.listdir(dataset_url) if MARKER_PATTERN.match(n)]
    if markers and not io.exists(io.join(dataset_url, SUMMARY)):
        raise StageError(
            f"{dataset_url}: vectorize has not finished ({len(markers)} units done, no {SUMMARY}); "
            "run vectorize again to complete it before merging"
        )


def merge(dataset_url: str, remove: bool, codebook_size: int) -> dict[str, Any]:
    """Merge (or finish an interrupted merge) and return the `_merged.json` record."""
    check_vectorize_finished(dataset_url)
    plan = {split: shards.shard_ids(dataset_url, split) for split in shards.SPLITS}
    record_url = io.join(dataset_url, MERGED)
    previous = io.read_json(record_url) if io.exists(record_url) else None
    already_merged = previous is not None and all(
        set(plan[split]) <= set(previous["splits"].get(split, {}).get("shards", [])) for split in shards.SPLITS
    )
    if already_merged:
        log.info("%s: shards already merged", dataset_url)
        record = previous
    else:
        if previous is not None:
            missing = {
                split: sorted(set(previous["splits"].get(split, {}).get("shards", [])) - set(plan[split]))
                for split in shards.SPLITS
            }
            if any(missing.values()):
                raise StageError(
                    f"{dataset_url}: new shards appeared after a merge that already removed shards {missing}; "
                    "re-vectorize into a fresh directory"
                )
        if not any(plan.values()):
            raise StageError(f"{dataset_url}: no shards ({{split}}_codes_{{i}}.npy) to merge")
        record = {"splits": {}}
        with ExitStack() as stack:
            for split, ids in plan.items():
                if ids:
                    record["splits"][split] = merge_split(dataset_url, split, ids, codebook_size, stack)
        io.write_json_atomic(record_url, record)
        for split, stats in record["splits"].items():
            log.info("%s: %d samples from %d shards", split, stats["samples"], len(stats["shards"]))
    if remove:
        removed = remove_shard_files(dataset_url, {s: v["shards"] for s, v in record["splits"].items()})
        log.info("removed %d shard files", removed)
    return record


def run(config: TrainerConfig) -> int:
    dataset_url = config.merge.dataset_path
    if not dataset_url:
        raise ConfigError("merge.dataset_path is required (flag --dataset_path)")
    if not io.isdir(dataset_url):
        raise ConfigError(f"dataset directory not found: {dataset_url}")
    if config.merge.only_glue_samples:
        files, records = glue_samples(dataset_url)
        print(f"{GLUED}: {records} samples from {files} files")
        return 0
    record = merge(dataset_url, config.merge.remove_shards, codebook_size_of(dataset_url, config))
    for split, stats in record["splits"].items():
        print(f"{split}: {stats['samples']} samples, {stats['codes']} codes ({len(stats['shards'])} shards merged)")
    return 0
