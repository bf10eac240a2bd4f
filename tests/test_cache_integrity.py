"""A corrupt LMDB cache is named in one line and rebuilt by ``stas build-lmdb``; every cache hint is the complete
command that builds the cache the run asks for; a chain mismatch names its first difference."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from monai.bundle import ConfigParser, run
from PIL import Image

from stas_pipeline import cli
from stas_pipeline.core.bundles import parsed_content
from stas_pipeline.core.datalist import write_datalist
from stas_pipeline.core.lmdb_cache import (
    CacheError,
    CorruptCacheError,
    LMDBCacheDataset,
    Preprocessing,
    open_reader,
    read_meta,
    spec_difference,
)
from stas_pipeline.core.splits import Split
from stas_pipeline.core.synthetic import make_dataset
from stas_pipeline.stages import build_lmdb
from stas_pipeline.tasks.segmentation.datalist import make_datalist

REPO = Path(__file__).resolve().parents[1]
H, W, SIZE = 40, 56, 32
BUNDLE = {"run_id": "training", "config_file": "bundles/deeplab_lite0.json", "image_size": 64, "epochs": 1,
          "encoder_weights": "none", "device": "cpu", "amp": False, "num_workers": 0}


def overwrite_middle(data: Path) -> None:
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2: len(raw) // 2 + 512] = b"\xab" * 512
    data.write_bytes(bytes(raw))


def truncate(data: Path) -> None:
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])


CORRUPTIONS = {
    "overwritten": (overwrite_middle, "data.mdb was overwritten since it was built"),
    "truncated": (truncate, "data.mdb is 32768 bytes, 65536 when it was built: truncated"),
    "deleted": (Path.unlink, "data.mdb is missing"),
}


@pytest.fixture
def datalist(tmp_path: Path) -> Path:
    """Six real JPEG images with PNG masks in a segmentation datalist (paths relative to it)."""
    (tmp_path / "data").mkdir()
    training = []
    for i in range(6):
        rng = np.random.default_rng(i)
        Image.fromarray(rng.integers(0, 256, (H, W, 3), dtype=np.uint8)).save(tmp_path / "data" / f"img{i}.jpg")
        mask = np.zeros((H, W), np.uint8)
        mask[5:25, 10:30 + i] = 255
        Image.fromarray(mask).save(tmp_path / "data" / f"img{i}.png")
        training.append({"image": f"data/img{i}.jpg", "label": f"data/img{i}.png", "fold": i % 2})
    path = tmp_path / "datalist.json"
    write_datalist(path, {"training": training, "test": []}, "segmentation", "mask")
    return path


def build_argv(datalist: Path) -> list[str]:
    return ["--datalist", str(datalist), "--out", str(datalist.parent / "cache"), "--bundle", "deeplab_lite0",
            "--image-size", str(SIZE), "--no-progress"]


def open_for_training(datalist: Path) -> LMDBCacheDataset:
    """The dataset as the bundle opens it: the bundle's chain at SIZE."""
    (chain,) = parsed_content("deeplab_lite0", ["task#preprocessing"], {"image_size": SIZE})
    entries = json.loads(datalist.read_text())["training"]
    items = [{k: str(datalist.parent / v) if k in ("image", "label") else v for k, v in e.items()} for e in entries]
    return LMDBCacheDataset(items, datalist.parent / "cache", Preprocessing(chain))


@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
def test_a_corrupt_cache_is_named_and_build_lmdb_rebuilds_it(corruption, datalist, capsys):
    cache = datalist.parent / "cache"
    assert build_lmdb.main(build_argv(datalist)) == 0
    corrupt, reason = CORRUPTIONS[corruption]
    corrupt(cache / "data.mdb")
    capsys.readouterr()

    for opening in (lambda: open_for_training(datalist), lambda: read_meta(cache), lambda: open_reader(cache)):
        with pytest.raises(CorruptCacheError) as err:
            opening()
        message = str(err.value)
        assert message.startswith(f"{cache}: corrupt LMDB cache ({reason}") and "\n" not in message
        assert f"; rebuild it with: stas build-lmdb --datalist <datalist.json> --out {cache}" in message

    assert build_lmdb.main(build_argv(datalist)) == 0  # the same arguments
    out = capsys.readouterr()
    assert f"WARNING {cache}: corrupt LMDB cache ({reason}" in out.err and "rebuilding it from scratch" in out.err
    assert "rebuilt from scratch, the corrupt cache replaced" in out.out and "decoded 6, reused 0" in out.out
    dataset = open_for_training(datalist)
    assert [tuple(dataset[i]["image"].shape) for i in range(len(dataset))] == [(3, SIZE, SIZE)] * 6
    assert not list(datalist.parent.glob(".cache.building")) and not list(datalist.parent.glob(".cache.old"))


def test_a_record_that_does_not_decode_mid_training_is_one_line(datalist):
    """Bytes that change under a verified cache (after the check at opening) are named when a record is read."""
    cache = datalist.parent / "cache"
    assert build_lmdb.main(build_argv(datalist)) == 0
    dataset = open_for_training(datalist)
    key = str((datalist.parent / "data" / "img2.jpg").resolve()).encode()
    with open_reader(cache).begin() as txn:
        value = txn.get(key)
    start = (cache / "data.mdb").read_bytes().index(value)
    with open(cache / "data.mdb", "r+b") as f:  # the record's JSON header, in place (same inode, size)
        f.seek(start + 4)
        f.write(b"\x00" * 16)
    with pytest.raises(CorruptCacheError, match=f"^{cache}: corrupt LMDB cache \\(the record of .*img2.jpg does not "
                                                "decode: .*\\); rebuild it with: stas build-lmdb"):
        dataset[2]
    assert dataset[1]["image"].shape == (3, SIZE, SIZE)


def test_a_folder_that_is_not_a_cache_is_still_refused(datalist):
    folder = datalist.parent / "cache"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep me")
    assert build_lmdb.main(build_argv(datalist)) == 2
    assert (folder / "notes.txt").read_text() == "keep me" and read_meta(folder) is None


def test_a_chain_mismatch_names_the_first_difference(datalist):
    cache = datalist.parent / "cache"
    assert build_lmdb.main(build_argv(datalist)) == 0
    entries = open_for_training(datalist).data
    with pytest.raises(CacheError) as err:
        LMDBCacheDataset(entries, cache, Preprocessing(parsed_content("deeplab_lite0", ["task#preprocessing"],
                                                                      {"image_size": SIZE, "keep_aspect": True})[0]))
    message = str(err.value)
    assert 'built with another preprocessing chain ([2].resizer.size_mode: built "all", needs "longest")' in message
    assert len(message.split("chain (")[1].split("); rebuild")[0]) < 100  # the difference, not two whole chains


def test_spec_difference_shortens_around_the_difference():
    prefix = "x" * 100
    built = [{"a": 1, "b": prefix + "old" + "y" * 100}, {"c": 2}]
    wanted = [{"a": 1, "b": prefix + "new" + "y" * 100}, {"c": 2}, {"d": 3}]
    difference = spec_difference(built, wanted)
    assert difference.startswith(f'[0].b: built ...{"x" * 20}old') and f'needs ...{"x" * 20}new' in difference
    assert len(difference) < 200
    assert spec_difference([{"c": 2}], [{"c": 2}, {"d": 3}]) == '[1]: built (nothing), needs {"d": 3}'
    assert spec_difference({"a": 1}, {"a": 1, "e": [1]}) == "e: built (nothing), needs [1]"


@pytest.fixture
def seg_dataset(tmp_path: Path) -> Path:
    """A small real segmentation dataset (images, masks, datalist) with no cache yet."""
    images, masks = make_dataset(tmp_path, n=10, height=48, width=64)
    write_datalist(tmp_path / "datalist.json", make_datalist(images, masks, tmp_path, Split(folds=2, seed=0)),
                   "segmentation", "mask")
    return tmp_path


def run_bundle(**overrides) -> None:
    """``monai.bundle.run`` with the working directory at the repository root, as the bundles need."""
    cwd = os.getcwd()
    os.chdir(REPO)
    try:
        run(**{**BUNDLE, **overrides})
    finally:
        os.chdir(cwd)


def cache_error(err: BaseException) -> CacheError | None:
    while err is not None and not isinstance(err, CacheError):
        err = err.__cause__ or err.__context__
    return err


def run_as_printed(message: str) -> int:
    """The ``stas ...`` command at the end of a hint, run through ``stas``'s own entry point."""
    argv = shlex.split(message.split("build it with: ")[-1].split("rebuild it with: ")[-1])
    assert argv[:2] == ["stas", "build-lmdb"]
    cwd = os.getcwd()
    os.chdir(REPO)
    try:
        return cli.main([*argv[1:], "--no-progress"])
    finally:
        os.chdir(cwd)


def accepted_by_the_run(**overrides) -> int:
    """The run's training dataset, instantiated as the bundle declares it (cache checks included): its size."""
    parser = ConfigParser()
    parser.read_config(str(REPO / BUNDLE["config_file"]))
    parser.update({k: v for k, v in {**BUNDLE, **overrides}.items() if k not in ("run_id", "config_file")})
    cwd = os.getcwd()
    os.chdir(REPO)
    try:
        parser.parse()
        return len(parser.get_parsed_content("workflow#train#dataset"))
    finally:
        os.chdir(cwd)


def test_the_missing_cache_hint_run_as_printed_builds_the_cache_the_run_accepts(seg_dataset, tmp_path):
    knobs = {"dataset_dir": str(seg_dataset), "keep_aspect": True, "output_dir": str(tmp_path / "runs")}
    with pytest.raises(Exception) as err:
        run_bundle(**knobs)
    message = str(cache_error(err.value))
    cache = seg_dataset / "cache_64_aspect"
    assert message == (f"{cache}: no complete LMDB cache here; build it with: stas build-lmdb --datalist "
                       f"{seg_dataset / 'datalist.json'} --out {cache} --bundle deeplab_lite0 --image-size 64 "
                       "--set keep_aspect=true")
    assert run_as_printed(message) == 0
    assert accepted_by_the_run(**knobs) == 5


def test_a_stale_cache_hint_keeps_the_sections_the_cache_held(seg_dataset, tmp_path):
    datalist = seg_dataset / "datalist.json"
    Image.fromarray(np.full((48, 64, 3), 90, np.uint8)).save(seg_dataset / "unlabelled.jpg")
    raw = json.loads(datalist.read_text())
    datalist.write_text(json.dumps({**raw, "test": [{"image": "unlabelled.jpg"}]}))
    argv = ["--datalist", str(datalist), "--out", str(seg_dataset / "cache_64"), "--bundle", "deeplab_lite0",
            "--image-size", "64", "--lists", "training", "test", "--no-progress"]
    assert build_lmdb.main(argv) == 0
    changed = seg_dataset / raw["training"][0]["image"]
    os.utime(changed, ns=(1, 1))
    with pytest.raises(Exception) as err:
        run_bundle(dataset_dir=str(seg_dataset), output_dir=str(tmp_path / "runs"))
    message = str(cache_error(err.value))
    assert f"{changed} (changed since the cache was built)" in message
    assert message.endswith(f"rebuild it with: stas build-lmdb --datalist {datalist} --out {seg_dataset / 'cache_64'} "
                            "--bundle deeplab_lite0 --image-size 64 --lists training test")
    assert run_as_printed(message) == 0
    assert accepted_by_the_run(dataset_dir=str(seg_dataset)) == 5
    assert len(read_meta(seg_dataset / "cache_64")["keys"]) == 11  # the test image still cached


def test_a_corrupt_cache_ends_a_bundle_run_with_one_line_and_its_hint_rebuilds_it(seg_dataset, tmp_path):
    cache = seg_dataset / "cache_64"
    assert build_lmdb.main(["--datalist", str(seg_dataset / "datalist.json"), "--out", str(cache), "--bundle",
                            "deeplab_lite0", "--image-size", "64", "--no-progress"]) == 0
    overwrite_middle(cache / "data.mdb")
    with pytest.raises(Exception) as err:
        run_bundle(dataset_dir=str(seg_dataset), output_dir=str(tmp_path / "runs"))
    found = cache_error(err.value)
    assert isinstance(found, CorruptCacheError)
    assert str(found).endswith(f"rebuild it with: stas build-lmdb --datalist {seg_dataset / 'datalist.json'} "
                               f"--out {cache} --bundle deeplab_lite0 --image-size 64")

    out = subprocess.run([sys.executable, "-m", "monai.bundle", "run", "training", "--config_file",
                          "bundles/deeplab_lite0.json", "--dataset_dir", str(seg_dataset), "--image_size", "64",
                          "--epochs", "1", "--encoder_weights", "none", "--device", "cpu", "--amp", "false",
                          "--num_workers", "0", "--output_dir", str(tmp_path / "runs")],
                         cwd=REPO, capture_output=True, text=True)
    assert out.returncode != 0 and "Traceback" not in out.stderr
    errors = [line for line in out.stderr.splitlines() if line.startswith("ERROR")]
    assert errors == [f"ERROR {found}"]

    assert run_as_printed(str(found)) == 0
    assert accepted_by_the_run(dataset_dir=str(seg_dataset)) == 5
