"""The one image policy (README "Images"): palette, grey, 16-bit, RGBA, LA and CMYK images read as 8-bit RGB by
every stage, floating-point images refused by name; masks read as stored; an RGB image read exactly as MONAI's
PILReader reads it. End to end: converted images among good ones through make-datalist, build-lmdb, a 1-epoch
deeplab_lite0 run (MONAI's runner) and ``stas predict``, with broken and refused images present."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.bundle import run
from monai.transforms import LoadImaged
from PIL import Image
from torch import nn

from stas_pipeline import cli
from stas_pipeline.core.bundles import parsed_content
from stas_pipeline.core.errors import EXIT_NOTHING, NothingWrittenError
from stas_pipeline.core.images import ImageModeError, decode_size, image_error, read_rgb
from stas_pipeline.core.lmdb_cache import LMDBCacheDataset, Preprocessing, read_meta
from stas_pipeline.core.synthetic import make_dataset
from stas_pipeline.core.trained_runs import TrainedRun
from stas_pipeline.core.transforms import LoadRGBImaged
from stas_pipeline.tasks.classification.inference import predict_scores

REPO = Path(__file__).resolve().parents[1]
H, W = 20, 30


def rgb_array(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (H, W, 3), dtype=np.uint8)


def load(path: Path, keys=("image",)) -> dict:
    """The bundles' loading step (``task#preprocessing``'s first transform) on one file per key."""
    return LoadRGBImaged(list(keys), reverse_indexing=False)({k: str(path) for k in keys})


def loaded_image(path: Path) -> np.ndarray:
    out = load(path)["image"]
    assert out.dtype == torch.float32  # as LoadImaged gives it: 0..255 floats
    return out.numpy().astype(np.uint8)


def test_rgb_is_read_exactly_as_monai_reads_it_and_masks_as_stored(tmp_path):
    rgb = rgb_array()
    Image.fromarray(rgb).save(tmp_path / "a.png")
    Image.fromarray(rgb).save(tmp_path / "a.jpg", quality=90)
    Image.fromarray(((rgb[..., 0] > 128) * 255).astype(np.uint8)).save(tmp_path / "mask_l.png")
    Image.fromarray((rgb[..., 1] > 128).astype(np.uint8)).convert("P").save(tmp_path / "mask_p.png")
    Image.fromarray(rgb[..., 2] > 128).save(tmp_path / "mask_1.png")
    before = LoadImaged(["image", "label"], reader="PILReader", reverse_indexing=False, image_only=True)
    after = LoadRGBImaged(["image", "label"], reverse_indexing=False)
    for image in ("a.png", "a.jpg"):
        for mask in ("mask_l.png", "mask_p.png", "mask_1.png"):
            item = {"image": str(tmp_path / image), "label": str(tmp_path / mask)}
            old, new = before(item), after(item)
            for key in item:
                assert new[key].dtype == old[key].dtype and new[key].shape == old[key].shape
                assert new[key].numpy().tobytes() == old[key].numpy().tobytes()
                assert {k: str(v) for k, v in new[key].meta.items()} == {k: str(v) for k, v in old[key].meta.items()}
            assert new["label"].ndim == 2  # a mask stays single-channel, its values as stored
    assert np.array_equal(read_rgb(tmp_path / "a.png"), rgb)
    assert np.array_equal(loaded_image(tmp_path / "a.jpg"), read_rgb(tmp_path / "a.jpg"))


def write_modes(folder: Path) -> dict[str, tuple[Path, np.ndarray]]:
    """One file per mode and the 8-bit RGB the policy must read from it."""
    rgb, alpha = rgb_array(1), np.tile(np.array([0, 128, 255], np.uint8), (H, W // 3))
    grey = rgb[..., 0]
    files = {}

    def expect(name: str, image: Image.Image, want: np.ndarray, **save) -> None:
        path = folder / name
        image.save(path, **save)
        files[image.mode] = (path, want)

    palette = Image.fromarray(rgb).quantize(16)
    on_white = np.where(np.asarray(palette) == 0, 255, np.asarray(palette.convert("RGB")).transpose(2, 0, 1))
    expect("palette.png", palette, on_white.transpose(1, 2, 0).astype(np.uint8), transparency=0)
    expect("grey.png", Image.fromarray(grey), np.repeat(grey[..., None], 3, -1))
    deep = grey.astype(np.uint16) * 256 + 100  # 16 bits: >> 8 gives back grey
    expect("grey16.png", Image.fromarray(deep), np.repeat(grey[..., None], 3, -1))
    a = alpha[..., None].astype(np.float64) / 255

    def composite(colour: np.ndarray) -> np.ndarray:  # on white, as PIL's alpha_composite rounds
        return np.asarray(Image.alpha_composite(Image.new("RGBA", (W, H), "white"), Image.fromarray(
            np.dstack([colour, alpha]))).convert("RGB"))

    expect("rgba.png", Image.fromarray(np.dstack([rgb, alpha])), composite(rgb))
    expect("la.png", Image.fromarray(np.dstack([grey, alpha])), composite(np.repeat(grey[..., None], 3, -1)))
    assert np.abs(composite(rgb) - (rgb * a + 255 * (1 - a))).max() <= 1  # composited on white
    cmyk = Image.fromarray(rgb).convert("CMYK")
    expect("cmyk.jpg", cmyk, None, quality=95)
    return files


def test_every_mode_becomes_8_bit_rgb_by_one_policy(tmp_path):
    files = write_modes(tmp_path)
    assert set(files) == {"P", "L", "I;16", "RGBA", "LA", "CMYK"}
    for mode, (path, want) in files.items():
        with Image.open(path) as img:
            assert img.mode == mode, path
        got = read_rgb(path)
        assert got.shape == (H, W, 3) and got.dtype == np.uint8, mode
        if want is not None:
            assert np.array_equal(got, want), mode
        assert np.array_equal(loaded_image(path), got), mode  # the bundles' loader: the same pixels
        assert image_error(path) is None and decode_size(path) == (W, H)  # datalist and cache checks accept it
    cmyk = read_rgb(files["CMYK"][0]).astype(int)
    assert np.abs(cmyk - rgb_array(1)).mean() < 8  # the JPEG's colours, not its inverted or raw channels


def test_a_float_image_is_refused_by_name_everywhere(tmp_path):
    path = tmp_path / "float.tif"
    Image.fromarray(rgb_array()[..., 0].astype(np.float32)).save(path)
    for read in (read_rgb, load):
        with pytest.raises(ImageModeError, match=f"^{path}: F image"):
            read(path)
    assert image_error(path).startswith("F image (32-bit floating point)")  # the datalist's and cache's reason
    err = pickle.loads(pickle.dumps(ImageModeError(path, "why")))  # crosses DataLoader workers
    assert (str(err), err.reason) == (f"{path}: why", "why")


def make_images(root: Path) -> tuple[Path, Path, dict[str, Path]]:
    """12 synthetic image/mask pairs; three images rewritten as RGBA PNG, CMYK JPEG and grey PNG, one as a float
    TIFF (refused)."""
    images, masks = make_dataset(root, n=12, height=64, width=80, seed=3)
    odd = {}
    for stem, kind in (("case_001", "rgba"), ("case_002", "cmyk"), ("case_003", "grey"), ("case_004", "float")):
        jpg = images / f"{stem}.jpg"
        rgb = np.asarray(Image.open(jpg))
        if kind == "rgba":
            alpha = np.full(rgb.shape[:2], 255, np.uint8)
            alpha[:, :8] = 0
            image, path = Image.fromarray(np.dstack([rgb, alpha])), images / f"{stem}.png"
        elif kind == "cmyk":
            image, path = Image.fromarray(rgb).convert("CMYK"), jpg
        elif kind == "grey":
            image, path = Image.fromarray(rgb).convert("L"), images / f"{stem}.png"
        else:
            image, path = Image.fromarray(rgb[..., 0].astype(np.float32)), images / f"{stem}.tif"
        jpg.unlink()
        image.save(path)
        odd[kind] = path
    return images, masks, odd


def stas(capsys, *argv: str) -> tuple[int, str]:
    code = cli.main(list(argv))
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err


def test_converted_images_train_and_predict_end_to_end(tmp_path, capsys):
    images, masks, odd = make_images(tmp_path / "data")
    datalist = tmp_path / "data" / "datalist.json"
    code, err = stas(capsys, "make-datalist", "--images", str(images), "--masks", str(masks), "--out", str(datalist),
                     "--folds", "3")
    assert code == 1 and f"ERROR {odd['float']}: cannot decode image: F image" in err
    listed = {Path(e["image"]).name for e in json.loads(datalist.read_text())["training"]}
    assert len(listed) == 11 and {odd[k].name for k in ("rgba", "cmyk", "grey")} <= listed

    cache = tmp_path / "data" / "cache_64"
    code, err = stas(capsys, "build-lmdb", "--datalist", str(datalist), "--out", str(cache), "--bundle",
                     "deeplab_lite0", "--image-size", "64", "--no-progress")
    assert code == 0 and "ERROR" not in err
    assert len(read_meta(cache)["keys"]) == 11 and not read_meta(cache)["skipped"]
    (chain,) = parsed_content("deeplab_lite0", ["task#preprocessing"], {"image_size": 64})
    entries = [{**e, "image": str(datalist.parent / e["image"]), "label": str(datalist.parent / e["label"])}
               for e in json.loads(datalist.read_text())["training"]]
    dataset = LMDBCacheDataset(entries, cache, Preprocessing(chain))
    cached = {Path(e["image"]).name: sample["image"] for e, sample in zip(entries, dataset, strict=True)}
    assert all(tuple(image.shape) == (3, 64, 64) for image in cached.values())
    grey = cached[odd["grey"].name]
    assert torch.equal(grey[0], grey[1]) and torch.equal(grey[1], grey[2])
    assert (cached[odd["rgba"].name][:, :, :4] == 255).all()  # the transparent band: white

    cwd = os.getcwd()
    os.chdir(REPO)  # the bundles reference bundles/common.json from the repository root
    try:
        run(run_id="training", config_file="bundles/deeplab_lite0.json", dataset_dir=str(datalist.parent),
            datalist=str(datalist), output_dir=str(tmp_path / "runs"), image_size=64, epochs=1, batch_size=4,
            encoder_weights="none", device="cpu", amp=False, num_workers=0)
    finally:
        os.chdir(cwd)
    checkpoint = tmp_path / "runs" / "deeplab_lite0" / "fold0" / "best.pt"
    assert checkpoint.is_file()

    folder = tmp_path / "predict"
    folder.mkdir()
    good = [images / "case_000.jpg", images / "case_005.jpg", odd["rgba"], odd["cmyk"], odd["grey"]]
    for path in good:
        (folder / path.name).symlink_to(path)
    palette = folder / "palette.png"
    Image.open(images / "case_006.jpg").quantize(32).save(palette)
    deep = folder / "deep.png"
    Image.fromarray(np.asarray(Image.open(images / "case_007.jpg").convert("L")).astype(np.uint16) * 257).save(deep)
    broken = folder / "broken.jpg"
    broken.write_bytes(b"\xff\xd8 not a JPEG")
    (folder / odd["float"].name).symlink_to(odd["float"])
    out = tmp_path / "predictions"
    predict = ["predict", "--checkpoint", str(checkpoint), "--images", str(folder), "--out", str(out), "--device",
               "cpu", "--workers", "0"]
    code, err = stas(capsys, *predict)
    assert code == 1
    assert f"ERROR {broken}: cannot read image" in err
    assert f"ERROR {folder / odd['float'].name}: cannot read image: F image" in err
    written = sorted(p.name for p in out.iterdir())
    assert written == sorted(f"{Path(p).stem}.png" for p in [*good, palette, deep])
    for path in [*good, palette, deep]:
        mask = Image.open(out / f"{path.stem}.png")
        assert mask.mode == "L" and mask.size == Image.open(path).size

    only_bad = tmp_path / "only_bad"
    only_bad.mkdir()
    broken.rename(only_bad / broken.name)
    (only_bad / odd["float"].name).symlink_to(odd["float"])
    code, err = stas(capsys, *predict[:4], str(only_bad), "--out", str(tmp_path / "nothing"), *predict[7:])
    assert code == EXIT_NOTHING
    assert f"ERROR {only_bad / broken.name}: cannot read image" in err and "F image" in err
    assert f"ERROR {tmp_path / 'nothing'}: every image was skipped; nothing written" in err
    assert not (tmp_path / "nothing").exists()


def test_image_level_predict_converts_and_skips_per_image(tmp_path, capsys):
    (chain,) = parsed_content("fundus_lite0", ["task#preprocessing"], {"image_size": 32})
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 2, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2, 1)).eval()
    trained = TrainedRun("m/fold0", model, Preprocessing(chain), lambda d: d)
    files = write_modes(tmp_path)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG not a PNG")
    problems, rows = predict_scores([trained], [*(p for p, _ in files.values()), broken])
    assert sorted(Path(r["image"]).name for r in rows) == sorted(p.name for p, _ in files.values())
    assert problems.skipped == [(str(broken.resolve()), problems.skipped[0][1])]
    assert "cannot read image" in capsys.readouterr().err
    with pytest.raises(NothingWrittenError, match="every image was skipped") as caught:
        predict_scores([trained], [broken], tmp_path / "scores.csv")
    assert caught.value.exit_code == EXIT_NOTHING and not (tmp_path / "scores.csv").exists()
