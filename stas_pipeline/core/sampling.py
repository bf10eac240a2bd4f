"""The training sampler a bundle declares: plain shuffling, or balanced draws (the bundles' ``balanced_sampling``).

Balanced: each epoch draws as many entries as there are, with replacement, so that every stratum is drawn
equally often. An entry's stratum is, for a tile (a ``mask_fraction``, written by ``stas tile``), ``empty`` or
its mask-area bin (``area_bins`` bins of equal counts among the non-empty tiles); otherwise its numeric label
(a class or a grade). Under DDP each rank draws its share (MONAI's ``DistributedWeightedRandomSampler``).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Hashable, Sequence
from numbers import Number

import numpy as np
import torch
from monai.data import DistributedSampler, DistributedWeightedRandomSampler


def strata(entries: Sequence[dict], area_bins: int = 3) -> list[Hashable]:
    """Each entry's stratum (see the module doc); ``ValueError`` for an entry with neither."""
    areas = [e.get("mask_fraction") for e in entries]
    if all(a is not None for a in areas):
        positive = np.array([a for a in areas if a > 0])
        edges = np.quantile(positive, np.linspace(0, 1, area_bins + 1)[1:-1]) if len(positive) else []
        return ["empty" if a == 0 else f"area{int(np.searchsorted(edges, a, side='right'))}" for a in areas]
    for e in entries:
        if not isinstance(e.get("label"), Number):
            raise ValueError(f"balanced sampling needs a mask_fraction (stas tile writes it) or a numeric label on "
                             f"every entry; {e.get('image')} has neither")
    return [e["label"] for e in entries]


def balanced_weights(entries: Sequence[dict], area_bins: int = 3) -> torch.Tensor:
    """Per-entry weights that give every stratum the same total weight."""
    of = strata(entries, area_bins)
    counts = Counter(of)
    return torch.tensor([1.0 / (len(counts) * counts[s]) for s in of], dtype=torch.double)


def train_sampler(dataset: torch.utils.data.Dataset, entries: Sequence[dict], balanced: bool = False,
                  distributed: bool = False) -> torch.utils.data.Sampler | None:
    """The training sampler: balanced draws, DDP's shard of a shuffle, or None (the DataLoader shuffles)."""
    if balanced:
        weights = balanced_weights(entries)
        if distributed:
            return DistributedWeightedRandomSampler(dataset, weights, even_divisible=True)
        return torch.utils.data.WeightedRandomSampler(weights, num_samples=len(entries), replacement=True)
    return DistributedSampler(dataset, shuffle=True, even_divisible=True) if distributed else None
