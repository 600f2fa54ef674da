"""The SFT training data: vectorized datasets -> prompt-formatted samples -> packed micro-batches.

- `VectorizedSplit` opens one split of a merged or sharded vectorized dataset (the seed's layout or
  the one this trainer wrote before, see `shards`) from any fsspec URL (memory-mapped where local,
  downloaded to a local cache otherwise).
- `PackedData` mixes weighted datasets, formats samples with the prompt format, skips (and counts)
  samples longer than the row, packs whole samples into rows of `pack_length` (or one sample per row
  without packing), shards rows across ranks (disjoint) and yields micro-batches. Everything is a
  pure function of (seed, epoch), so a `SamplerState` (epoch, micro-batch) resumes exactly.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from trainer import io
from trainer.config import DatasetConfig
from trainer.data.filters import check_sample
from trainer.data.mixing import epoch_picks
from trainer.data.packing import PackingStats, pack_rows, packing_stats, single_rows
from trainer.data.shards import (
    DATASET_INFO,
    bounds_of,
    open_codes,
    read_index,
    read_jsonl,
    record_phones,
    shard_files,
    shard_ids,
)
from trainer.errors import ConfigError, StageError
from trainer.model.prompt import DEFAULT_LANGUAGE, IGNORE_INDEX, PromptFormat

log = logging.getLogger(__name__)
# Unpacked rows are padded to a multiple of this: few distinct shapes, little padding.
PAD_MULTIPLE = 16


class VectorizedSplit:
    """One split ("train" | "val") of a vectorized dataset, merged or sharded."""

    def __init__(
        self, url: str, split: str, cache_dir: Path | None = None, dataset_filter: DatasetConfig | None = None
    ):
        self.url = url.rstrip("/")
        self.split = split
        if not io.isdir(self.url):
            raise ConfigError(f"dataset {url!r} does not exist (or is not a directory)")
        cache = cache_dir or Path(tempfile.mkdtemp(prefix="vectorized-"))
        merged = shard_files(split)
        if io.exists(io.join(self.url, merged.codes)):
            parts = [merged]
        else:
            parts = [shard_files(split, i) for i in shard_ids(self.url, split)]
        if not parts:
            raise ConfigError(
                f"dataset {url!r} has no {split} split ({merged.codes} or {split}_codes_<i>.npy expected)"
            )
        self.codes: list[np.ndarray] = []
        self.bounds: list[np.ndarray] = []  # per part, N+1 sample boundaries
        texts: list[str] = []
        rejected: list[bool] = []
        reasons: dict[str, int] = {}
        languages: list[str] = []
        phones: list[list[tuple[str, int]] | None] = []
        for files in parts:
            codes = open_codes(io.join(self.url, files.codes), cache)
            records = read_jsonl(io.join(self.url, files.samples))
            index = read_index(io.join(self.url, files.index))
            self.codes.append(codes)
            self.bounds.append(bounds_of(index, len(records), len(codes), f"{self.url}/{files.index}"))
            texts.extend(str(r["transcript"]) for r in records)
            # Each transcript is normalised by its own sample's language (the seed's rule).
            languages.extend(str(r.get("language") or DEFAULT_LANGUAGE) for r in records)
            # [phone, frames] pairs, written by vectorize.phone_alignment (the phones prompt format).
            phones.extend(record_phones(r) for r in records)
            for record in records if dataset_filter is not None else ():
                rejection = check_sample(record, dataset_filter)
                rejected.append(rejection is not None)
                if rejection:
                    reasons[rejection.reason] = reasons.get(rejection.reason, 0) + 1
        self.texts = texts
        self.languages = languages
        self.phones = phones
        # Samples the `dataset` filters reject at load (never trained on).
        self.rejected = np.array(rejected, dtype=bool) if dataset_filter is not None else np.zeros(len(texts), bool)
        if reasons:
            log.info("%s (%s): dataset filters reject %d of %d samples: %s", self.url, split,
                     int(self.rejected.sum()), len(texts), reasons)
        self._part_start = np.cumsum([0] + [len(b) - 1 for b in self.bounds])
        self.num_codes = np.concatenate([np.diff(b) for b in self.bounds]) if self.bounds else np.zeros(0, int)
        info_url = io.join(self.url, DATASET_INFO)
        self.info: dict = io.read_json(info_url) if io.exists(info_url) else {}

    def __len__(self) -> int:
        return len(self.texts)

    def sample_codes(self, k: int) -> np.ndarray:
        part = int(np.searchsorted(self._part_start, k, side="right") - 1)
        local = k - self._part_start[part]
        return np.asarray(self.codes[part][self.bounds[part][local] : self.bounds[part][local + 1]])

    def check_codebook(self, codebook_size: int) -> None:
        """ConfigError when the data was made for another codebook (before any training)."""
        declared = self.info.get("codebook_size")
        if declared is not None and int(declared) != codebook_size:
            raise ConfigError(
                f"{self.url}: dataset_info.json codebook_size is {declared} but "
                f"modeling.parameters.codebook_size is {codebook_size}"
            )
        top = max((int(c.max()) for c in self.codes if len(c)), default=-1)
        if top >= codebook_size:
            raise ConfigError(
                f"{self.url}: {self.split} holds code {top}, outside modeling.parameters.codebook_size "
                f"{codebook_size}"
            )


@dataclass
class SamplerState:
    epoch: int = 0
    batch: int = 0  # micro-batches already consumed in `epoch` (the same on every rank)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Batch:
    input_ids: torch.Tensor  # [B, L]
    position_ids: torch.Tensor  # [B, L], restarting at 0 for every sample
    doc_ids: torch.Tensor  # [B, L], sample number within the row; padding is one more document
    targets: torch.Tensor  # [B, L], next-token labels (IGNORE_INDEX where none)
    real_tokens: int
    num_samples: int

    @property
    def labelled_tokens(self) -> int:
        return int((self.targets != IGNORE_INDEX).sum())

    def pin_memory(self) -> Batch:
        """Page-locked copy (the DataLoader calls this with `pin_memory=True`) so `to` can be asynchronous."""
        names = ("input_ids", "position_ids", "doc_ids", "targets")
        pinned = {k: getattr(self, k).pin_memory() for k in names}
        return Batch(**pinned, real_tokens=self.real_tokens, num_samples=self.num_samples)

    def to(self, device: torch.device) -> Batch:
        names = ("input_ids", "position_ids", "doc_ids", "targets")
        move = {k: getattr(self, k).to(device, non_blocking=True) for k in names}
        return Batch(**move, real_tokens=self.real_tokens, num_samples=self.num_samples)


class PackedData:
    def __init__(
        self,
        weighted: dict[str, float],
        split: str,
        prompt: PromptFormat,
        *,
        max_seq_len: int,
        pack_length: int,
        batch_size: int,
        packing: bool = True,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        codebook_size: int | None = None,
        dataset_filter: DatasetConfig | None = None,
    ):
        if not weighted:
            raise ConfigError(f"{split}_weighted_datasets is empty: name at least one vectorized dataset")
        self.prompt = prompt
        self.split = split
        self.pack_length = pack_length
        self.max_len = min(max_seq_len, pack_length) if packing else max_seq_len
        self.row_length = pack_length if packing else max_seq_len
        self.batch_size = batch_size
        self.packing = packing
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.datasets = [VectorizedSplit(url, split, dataset_filter=dataset_filter) for url in weighted]
        self.weights = list(weighted.values())
        if codebook_size is not None:
            for ds in self.datasets:
                ds.check_codebook(codebook_size)
        self.lengths = []
        self.keep = []
        for ds in self.datasets:
            if prompt.phone_aligned:
                if any(p is None for p in ds.phones):
                    raise ConfigError(
                        f"{ds.url} ({split}): samples without phones; the phones prompt format trains on data "
                        "vectorized with vectorize.phone_alignment: true"
                    )
                num_phones = np.array([len(p) for p in ds.phones], dtype=np.int64)
                lengths = prompt.example_length(0, ds.num_codes, num_phones)
            else:
                texts = [prompt.clean_text(t, lang) for t, lang in zip(ds.texts, ds.languages, strict=True)]
                tokenized = prompt.tokenizer(texts, add_special_tokens=False)["input_ids"]
                text_len = np.array([len(ids) for ids in tokenized])
                lengths = prompt.example_length(text_len.astype(np.int64), ds.num_codes)
            fits = (lengths <= self.max_len) & (ds.num_codes > 0)
            if (~fits).any():
                log.warning(
                    "%s (%s): skipping %d of %d samples longer than %d tokens or without codes",
                    ds.url, split, int((~fits).sum()), len(ds), self.max_len,
                )
            keep = fits & ~ds.rejected
            self.lengths.append(lengths)
            self.keep.append(keep)
        self._plan_epoch: int | None = None
        self._plan: list[list[tuple[int, int]]] = []
        self.stats: PackingStats | None = None

    @property
    def skipped(self) -> int:
        return int(sum((~k).sum() for k in self.keep))

    def rows(self, epoch: int) -> list[list[tuple[int, int]]]:
        """Every row of `epoch` (all ranks), each a list of (dataset, sample)."""
        if self._plan_epoch != epoch:
            picks = epoch_picks([len(d) for d in self.datasets], self.weights, self.seed, epoch)
            picks = picks[[bool(self.keep[d][k]) for d, k in picks]] if len(picks) else picks
            lengths = np.array([self.lengths[d][k] for d, k in picks], dtype=np.int64)
            groups = pack_rows(lengths, self.pack_length) if self.packing else single_rows(len(picks))
            self.stats = packing_stats(lengths, groups, self.pack_length)
            order = np.random.default_rng([self.seed, epoch, 1]).permutation(len(groups))
            self._plan = [[(int(picks[i][0]), int(picks[i][1])) for i in groups[g]] for g in order]
            self._plan_epoch = epoch
        return self._plan

    def batches_per_epoch(self, epoch: int = 0) -> int:
        return len(self.rows(epoch)) // (self.batch_size * self.world_size)

    def iterate(self, state: SamplerState) -> Iterator[tuple[Batch, SamplerState]]:
        """Training micro-batches from `state` on, forever (epoch after epoch)."""
        epoch, batch = state.epoch, state.batch
        while True:
            n = self.batches_per_epoch(epoch)
            if n == 0:
                raise StageError(
                    f"{self.split} data fills {len(self.rows(epoch))} rows: fewer than batch_size x world "
                    f"({self.batch_size} x {self.world_size}); use more data or a smaller batch/pack_length"
                )
            while batch < n:
                yield self.collate(self.micro_batch_rows(epoch, batch)), SamplerState(epoch, batch + 1)
                batch += 1
            epoch, batch = epoch + 1, 0

    def micro_batch_rows(self, epoch: int, batch: int) -> list[list[tuple[int, int]]]:
        """This rank's rows of micro-batch `batch` of `epoch` (ranks take consecutive rows)."""
        first = (batch * self.world_size + self.rank) * self.batch_size
        return self.rows(epoch)[first : first + self.batch_size]

    def eval_batches(self) -> Iterator[Batch]:
        """All rows of epoch 0 once, split across ranks; every rank yields the same number of batches
        (short ranks get empty rows) so sharded strategies stay in lock-step."""
        rows = self.rows(0)
        mine = rows[self.rank :: self.world_size]
        per_rank = -(-len(rows) // self.world_size)
        mine = mine + [[]] * (per_rank - len(mine))
        for start in range(0, per_rank, self.batch_size):
            yield self.collate(mine[start : start + self.batch_size])

    def collate(self, rows: list[list[tuple[int, int]]]) -> Batch:
        examples = [
            [
                self.prompt.training_example(
                    self.datasets[d].texts[k], self.datasets[d].sample_codes(k), self.datasets[d].languages[k],
                    self.datasets[d].phones[k],
                )
                for d, k in row
            ]
            for row in rows
        ]
        if self.packing:
            length = self.pack_length
        else:
            longest = max((sum(len(e.input_ids) for e in row) for row in examples), default=0)
            # At least one token: a rank's eval padding rows are empty, and a (rows, 0) batch cannot run.
            length = max(1, -(-longest // PAD_MULTIPLE)) * PAD_MULTIPLE
        shape = (len(rows), length)
        input_ids = torch.full(shape, self.prompt.vocab.pad_token_id, dtype=torch.long)
        position_ids = torch.zeros(shape, dtype=torch.long)
        doc_ids = torch.zeros(shape, dtype=torch.long)
        targets = torch.full(shape, IGNORE_INDEX, dtype=torch.long)
        real = 0
        for r, row in enumerate(examples):
            at = 0
            for doc, ex in enumerate(row):
                n = len(ex.input_ids)
                input_ids[r, at : at + n] = torch.from_numpy(ex.input_ids)
                position_ids[r, at : at + n] = torch.arange(n)
                doc_ids[r, at : at + n] = doc
                targets[r, at : at + n - 1] = torch.from_numpy(ex.labels[1:])
                at += n
            doc_ids[r, at:] = len(row)
            position_ids[r, at:] = torch.arange(length - at)
            real += at
        return Batch(input_ids, position_ids, doc_ids, targets, real, sum(len(r) for r in rows))
