"""Shared fixtures, made once per session: a synthetic STAS-like dataset with datalist and LMDB caches; graded
fundus-like images and a grading run of each head."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tiny_runs import prepare_fundus, train

from stas_pipeline.core.datalist import entries, write_datalist
from stas_pipeline.core.lmdb_cache import build_cache
from stas_pipeline.core.splits import Split
from stas_pipeline.core.synthetic import make_dataset
from stas_pipeline.tasks.segmentation.datalist import make_datalist

REPO = Path(__file__).resolve().parents[1]
CACHE_SIZES = (64, 96)
# The longest test files, longest first (their tests' summed time at one thread on a 2-core VM: docs/benchmarks.md,
# "The test suite"). `make test` gives each worker one file at a time in collection order (--dist loadfile
# --no-loadscope-reorder): these start first, so the workers end together rather than one of them running a long
# file alone at the end.
LONGEST_FIRST = ("test_export_model.py", "test_bundles.py", "test_demo.py", "test_sharding.py", "test_wheel.py",
                 "test_distributed.py", "test_exit_codes.py", "test_mlflow_tracking.py", "test_training_output.py",
                 "test_label_checks.py", "test_cache_integrity.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The files of :data:`LONGEST_FIRST` first, in that order; every other file after them, as collected."""
    rank = {name: k for k, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


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



@pytest.fixture(scope="session")
def graded(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """30 fundus-like images graded 0-4 (two images per patient share a grade): ``datalist.json`` (2 folds) and
    its ``cache`` at 32 px for grading_lite0."""
    root = tmp_path_factory.mktemp("grading")
    prepare_fundus(root, "grading_lite0")
    return root


@pytest.fixture(scope="session")
def grading_runs(graded: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Per head, a grading_lite0 run folder on ``graded`` (2 epochs; regression and expectation on fold 0,
    cumulative on fold 1). Read-only for the tests."""
    out = tmp_path_factory.mktemp("grading_runs")
    return {head: train(graded, "grading_lite0", head=head, fold=k % 2, epochs=2, batch_size=8,
                        output_dir=str(out / head))
            for k, head in enumerate(("regression", "cumulative", "expectation"))}
