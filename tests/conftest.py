"""Shared fixtures: a synthetic STAS-like dataset with datalist and LMDB caches, made once per session."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from stas_pipeline.core.datalist import entries, write_datalist
from stas_pipeline.core.lmdb_cache import build_cache
from stas_pipeline.core.splits import Split
from stas_pipeline.core.synthetic import make_dataset
from stas_pipeline.tasks.segmentation.datalist import make_datalist

REPO = Path(__file__).resolve().parents[1]
CACHE_SIZES = (64, 96)


@pytest.fixture(scope="session")
def synthetic_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """40 images of 96 x 80 in 5 folds: ``datalist.json``, ``tiny.json`` (2 training + 1 validation entries)
    and caches ``cache_64`` and ``cache_96`` (the bundles' default cache names for those sizes)."""
    root = tmp_path_factory.mktemp("synthetic")
    images, masks = make_dataset(root, n=40, height=80, width=96)
    datalist = make_datalist(images, masks, root, Split(folds=5, seed=0))
    write_datalist(root / "datalist.json", datalist, "segmentation", "mask")
    items = entries(root / "datalist.json", "training")
    for size in CACHE_SIZES:
        build_cache(items, root / f"cache_{size}", size, progress=False)
    full = json.loads((root / "datalist.json").read_text())
    val = next(e for e in full["training"] if e["fold"] == 0 and e["foreground"] > 0)
    train = [e for e in full["training"] if e["fold"] == 1 and e["foreground"] > 0][:2]
    (root / "tiny.json").write_text(json.dumps({"training": train + [val], "test": []}))
    return root
