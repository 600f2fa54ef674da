"""Weighted multi-dataset mixing (the seed's `train_weighted_datasets: {path: weight}`).

A weight is how many times a dataset is seen per epoch: 2.0 = every sample twice, 0.5 = a random
half, 1.5 = once plus a random half. The epoch's order is one deterministic shuffle of all picks.
"""

from __future__ import annotations

import numpy as np


def epoch_picks(sizes: list[int], weights: list[float], seed: int, epoch: int) -> np.ndarray:
    """[n, 2] int64 array of (dataset, sample) for one epoch, shuffled by (seed, epoch)."""
    rng = np.random.default_rng([seed, epoch])
    picks = []
    for d, (size, weight) in enumerate(zip(sizes, weights, strict=True)):
        whole, frac = divmod(weight, 1.0)
        samples = [np.arange(size)] * int(whole)
        extra = round(frac * size)
        if extra:
            samples.append(np.sort(rng.choice(size, size=extra, replace=False)))
        if samples:
            idx = np.concatenate(samples)
            picks.append(np.stack([np.full_like(idx, d), idx], axis=1))
    if not picks:
        return np.zeros((0, 2), dtype=np.int64)
    all_picks = np.concatenate(picks).astype(np.int64)
    return all_picks[rng.permutation(len(all_picks))]
