"""Sequence packing: whole samples into fixed-length rows, with per-sample boundaries.

Best-fit decreasing over windows of samples (the window keeps the shuffled order's randomness while
giving the packer enough choice to fill rows to ~99 %). A sample is never split across rows; samples
longer than the row are the caller's to skip.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

import numpy as np

PACK_WINDOW = 4096


def pack_rows(lengths: np.ndarray, pack_length: int, window: int = PACK_WINDOW) -> list[list[int]]:
    """Group sample positions (indices into `lengths`) into rows whose lengths sum to <= pack_length.

    Deterministic for a given input. Within each window samples are placed longest first into the row
    with the least room that still fits them (best fit); rows keep the order they were opened in.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    if lengths.size and lengths.max() > pack_length:
        raise ValueError(f"a sample of {lengths.max()} tokens does not fit a row of {pack_length}")
    rows: list[list[int]] = []
    for start in range(0, len(lengths), window):
        chunk = np.arange(start, min(start + window, len(lengths)))
        order = chunk[np.argsort(-lengths[chunk], kind="stable")]
        # Open rows of this window as a sorted list of (room, row number).
        rooms: list[tuple[int, int]] = []
        for i in order.tolist():
            need = int(lengths[i])
            at = bisect.bisect_left(rooms, (need, -1))
            if at < len(rooms):
                room, row = rooms.pop(at)
            else:
                room, row = pack_length, len(rows)
                rows.append([])
            rows[row].append(i)
            if room - need > 0:
                bisect.insort(rooms, (room - need, row))
    return rows


def single_rows(n: int) -> list[list[int]]:
    """No packing: one sample per row (the seed's layout; rows are padded per batch)."""
    return [[i] for i in range(n)]


@dataclass(frozen=True)
class PackingStats:
    samples: int
    rows: int
    real_tokens: int
    slot_tokens: int

    @property
    def efficiency(self) -> float:
        """Fraction of row slots holding real tokens."""
        return self.real_tokens / self.slot_tokens if self.slot_tokens else 1.0


def packing_stats(lengths: np.ndarray, rows: list[list[int]], pack_length: int) -> PackingStats:
    real = int(sum(int(lengths[i]) for row in rows for i in row))
    return PackingStats(sum(len(r) for r in rows), len(rows), real, len(rows) * pack_length)
