"""Balanced training draws: strata of tiles (empty, mask-area bins) and of labels, equal weight per stratum, and
the sampler a bundle gets for each setting."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from monai.data import DistributedWeightedRandomSampler

from stas_pipeline.core.sampling import balanced_weights, strata, train_sampler


def test_tiles_are_balanced_between_empty_and_area_bins():
    areas = [0.0] * 90 + [0.01, 0.02, 0.03, 0.1, 0.2, 0.3, 0.5, 0.6, 0.7]
    entries = [{"image": f"t{k}", "mask_fraction": a} for k, a in enumerate(areas)]
    of = strata(entries)
    assert Counter(of) == {"empty": 90, "area0": 3, "area1": 3, "area2": 3}
    weights = balanced_weights(entries)
    for stratum in ("empty", "area0", "area2"):
        assert sum(w for w, s in zip(weights.tolist(), of, strict=True) if s == stratum) == pytest.approx(0.25)
    torch.manual_seed(0)
    drawn = Counter(of[i] for i in torch.multinomial(weights, 40000, replacement=True).tolist())
    assert all(abs(n / 40000 - 0.25) < 0.02 for n in drawn.values())


def test_labels_are_balanced_and_entries_without_either_are_named():
    entries = [{"image": "a", "label": 0}] * 8 + [{"image": "b", "label": 1}] * 2
    assert balanced_weights(entries).tolist() == [1 / 16] * 8 + [1 / 4] * 2
    with pytest.raises(ValueError, match="masks/c.png has neither"):
        strata([{"image": "masks/c.png", "label": "masks/c_mask.png"}])


def test_train_sampler_for_each_setting():
    entries = [{"image": str(k), "label": k % 2} for k in range(10)]
    dataset = list(range(10))
    assert train_sampler(dataset, entries) is None
    balanced = train_sampler(dataset, entries, balanced=True)
    assert isinstance(balanced, torch.utils.data.WeightedRandomSampler) and len(balanced) == 10
    if not torch.distributed.is_available():
        pytest.skip("torch without distributed")
    torch.distributed.init_process_group("gloo", init_method="tcp://127.0.0.1:29533", rank=0, world_size=1)
    try:
        assert isinstance(train_sampler(dataset, entries, True, True), DistributedWeightedRandomSampler)
    finally:
        torch.distributed.destroy_process_group()
