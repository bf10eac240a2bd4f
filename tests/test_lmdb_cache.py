"""LMDB cache: contents, invalidation, interrupted builds, concurrent readers, bad input, CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from stas_pipeline.core import lmdb_cache
from stas_pipeline.core.lmdb_cache import CacheError, LMDBCacheDataset, build_cache, read_meta
from stas_pipeline.core.problems import Problems
from stas_pipeline.stages import build_lmdb

REPO = Path(__file__).resolve().parents[1]
H, W, SIZE = 40, 56, 32


def make_sample(folder: Path, name: str, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
    mask = np.zeros((H, W), np.uint8)
    mask[5 + seed % 10: 25, 10: 30 + seed % 20] = 255
    Image.fromarray(image).save(folder / f"{name}.jpg", quality=95)
    Image.fromarray(mask).save(folder / f"{name}.png")
    return {"image": str(folder / f"{name}.jpg"), "label": str(folder / f"{name}.png"), "fold": seed % 2}


@pytest.fixture
def items(tmp_path: Path) -> list[dict]:
    (tmp_path / "data").mkdir()
    return [make_sample(tmp_path / "data", f"img{i}", i) for i in range(6)]


def test_records_hold_resized_sample_and_original_mask(items, tmp_path):
    stats = build_cache(items, tmp_path / "cache", SIZE, progress=False)
    assert (stats.written, stats.reused, stats.skipped) == (6, 0, 0)
    ds = LMDBCacheDataset(items, tmp_path / "cache", SIZE)
    at_original_size = LMDBCacheDataset(items, tmp_path / "cache", SIZE, original_label=True)
    for item, sample, orig in zip(items, ds, at_original_size, strict=True):
        assert sample["image"].shape == (3, SIZE, SIZE) and sample["image"].dtype == torch.uint8
        assert sample["label"].shape == (1, SIZE, SIZE) and set(sample["label"].unique().tolist()) <= {0, 1}
        original = np.asarray(Image.open(item["label"])) > 0
        assert np.array_equal(orig["label"][0].numpy(), original)
        assert torch.equal(orig["image"], sample["image"])
        assert sample["orig_size"] == (H, W) and set(sample) == {"image", "label", "orig_size"}  # no entry extras
        # the cached image is the MONAI area-resized JPEG, rounded to uint8
        decoded = torch.from_numpy(np.asarray(Image.open(item["image"]), np.float32)).permute(2, 0, 1)[None]
        expected = torch.nn.functional.interpolate(decoded, (SIZE, SIZE), mode="area")[0]
        assert (sample["image"].float() - expected).abs().max() <= 0.5 + 1e-3


def test_rebuild_reuses_unchanged_and_redecodes_changed(items, tmp_path):
    build_cache(items, tmp_path / "cache", SIZE, progress=False)
    inode = (tmp_path / "cache" / "data.mdb").stat().st_ino
    assert build_cache(items, tmp_path / "cache", SIZE, progress=False).reused == 6
    assert (tmp_path / "cache" / "data.mdb").stat().st_ino == inode  # up to date: not rewritten

    changed = Path(items[2]["label"])
    Image.fromarray(np.full((H, W), 255, np.uint8)).save(changed)
    os.utime(changed, ns=(1, 1))  # a different mtime even on coarse-clock filesystems
    with pytest.raises(CacheError, match=f"stale for 1 sample.*{changed.name}"):
        LMDBCacheDataset(items, tmp_path / "cache", SIZE)

    stats = build_cache(items, tmp_path / "cache", SIZE, progress=False)
    assert (stats.written, stats.reused) == (1, 5)
    assert LMDBCacheDataset(items, tmp_path / "cache", SIZE)[2]["label"].all()


def test_other_preprocessing_or_missing_sample_is_refused(items, tmp_path):
    build_cache(items[:4], tmp_path / "cache", SIZE, progress=False)
    with pytest.raises(CacheError, match="built with"):
        LMDBCacheDataset(items[:4], tmp_path / "cache", 64)
    with pytest.raises(CacheError, match="img5.jpg \\(not in the cache\\)"):
        LMDBCacheDataset(items, tmp_path / "cache", SIZE)
    with pytest.raises(CacheError, match="no complete LMDB cache"):
        LMDBCacheDataset(items, tmp_path / "nowhere", SIZE)


def test_interrupted_build_is_never_used(items, tmp_path, monkeypatch):
    real = lmdb_cache._load_sample
    calls = {"n": 0}

    def dies_on_third(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(lmdb_cache, "_load_sample", dies_on_third)
    monkeypatch.setattr(lmdb_cache, "_COMMIT_EVERY", 1)  # part of it really is on disk
    with pytest.raises(KeyboardInterrupt):
        build_cache(items, tmp_path / "fresh", SIZE, progress=False)
    assert read_meta(tmp_path / "fresh") is None
    with pytest.raises(CacheError, match="no complete LMDB cache"):
        LMDBCacheDataset(items, tmp_path / "fresh", SIZE)

    # an interrupted refresh leaves the previous complete cache in place
    monkeypatch.setattr(lmdb_cache, "_load_sample", real)
    build_cache(items[:3], tmp_path / "fresh", SIZE, progress=False)
    calls["n"] = 0
    monkeypatch.setattr(lmdb_cache, "_load_sample", dies_on_third)
    with pytest.raises(KeyboardInterrupt):
        build_cache(items, tmp_path / "fresh", SIZE, progress=False)
    assert len(read_meta(tmp_path / "fresh")["keys"]) == 3
    assert len(LMDBCacheDataset(items[:3], tmp_path / "fresh", SIZE)) == 3


def test_killed_build_process_leaves_no_cache(items, tmp_path):
    """kill -9 in the middle of a real build: the directory never appears as a cache."""
    (tmp_path / "items.json").write_text(json.dumps(items))
    code = (
        "import json,os,signal,sys\n"
        "from stas_pipeline.core import lmdb_cache\n"
        "real=lmdb_cache._load_sample;n=[0]\n"
        "def load(*a,**k):\n"
        "    n[0]+=1\n"
        "    if n[0]==4: os.kill(os.getpid(), signal.SIGKILL)\n"
        "    return real(*a,**k)\n"
        "lmdb_cache._load_sample=load;lmdb_cache._COMMIT_EVERY=1\n"
        f"lmdb_cache.build_cache(json.load(open({str(tmp_path / 'items.json')!r})),{str(tmp_path / 'c')!r},{SIZE},"
        "progress=False)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO)
    assert proc.returncode == -9
    assert read_meta(tmp_path / "c") is None
    assert build_cache(items, tmp_path / "c", SIZE, progress=False).written == 6  # the next build recovers
    assert len(LMDBCacheDataset(items, tmp_path / "c", SIZE)) == 6


def test_concurrent_readers_in_workers_see_the_same_samples(items, tmp_path):
    build_cache(items, tmp_path / "cache", SIZE, progress=False)
    ds = LMDBCacheDataset(items, tmp_path / "cache", SIZE)
    serial = [ds[i]["image"] for i in range(len(ds))]  # opens the env in the parent before the fork
    loader = DataLoader(ds, batch_size=2, num_workers=2)
    assert torch.equal(torch.cat([b["image"] for b in loader]), torch.stack(serial))


def test_bad_inputs_are_reported_and_the_rest_cached(items, tmp_path, capsys):
    Path(items[1]["image"]).write_bytes(b"not a jpeg at all")
    Image.fromarray(np.zeros((H + 1, W), np.uint8)).save(items[3]["label"])
    problems = Problems("build-lmdb")
    stats = build_cache(items, tmp_path / "cache", SIZE, problems, progress=False)
    err = capsys.readouterr().err
    assert (stats.written, stats.skipped) == (4, 2)
    assert f"ERROR {items[1]['image']}:" in err
    assert f"ERROR {items[3]['image']}:" in err and "mask is 56x41 (WxH), image is 56x40" in err
    assert problems.exit_code() == 1
    good = [it for i, it in enumerate(items) if i not in (1, 3)]
    assert len(LMDBCacheDataset(good, tmp_path / "cache", SIZE)) == 4


def test_refuses_to_replace_a_folder_that_is_not_a_cache(items, tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep me")
    with pytest.raises(CacheError, match="not an LMDB cache"):
        build_cache(items, folder, SIZE, progress=False)
    assert (folder / "notes.txt").read_text() == "keep me"


def test_unlabelled_and_numeric_targets(items, tmp_path):
    test_item = {"image": items[0]["image"]}
    graded = {"image": items[1]["image"], "label": 3}
    build_cache([test_item, graded], tmp_path / "cache", SIZE, progress=False)
    ds = LMDBCacheDataset([test_item, graded], tmp_path / "cache", SIZE)
    assert set(ds[0]) == {"image", "orig_size"}
    assert ds[1]["label"] == 3 and ds[1]["image"].shape == (3, SIZE, SIZE)


def test_cli_builds_from_a_datalist(items, tmp_path, capsys):
    datalist = tmp_path / "datalist.json"
    rel = [{k: os.path.relpath(v, tmp_path) if k != "fold" else v for k, v in it.items()} for it in items]
    datalist.write_text(json.dumps({"training": rel, "test": [{"image": rel[0]["image"]}]}))
    argv = ["--datalist", str(datalist), "--out", str(tmp_path / "cache"), "--image-size", str(SIZE),
            "--no-progress"]
    assert build_lmdb.main(argv) == 0
    assert "build-lmdb: decoded 6, reused 0, skipped 0" in capsys.readouterr().out
    assert build_lmdb.main(argv) == 0
    assert "decoded 0, reused 6" in capsys.readouterr().out
    assert build_lmdb.main([*argv[:-1], "--image-size", "0"]) == 2
    assert build_lmdb.main(["--datalist", str(tmp_path / "missing.json"), "--out", str(tmp_path / "c2")]) == 2


def test_module_help():
    out = subprocess.run([sys.executable, "-m", "stas_pipeline.stages.build_lmdb", "--help"], cwd=REPO,
                         capture_output=True, text=True, check=True).stdout
    assert "--image-size" in out and "--datalist" in out
