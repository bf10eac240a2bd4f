"""Masks as QuPath GeoJSON (``core/geojson.py``): traced on pixel edges, every geometry valid, read back by ``stas
tile``'s mask reader (``open_mask``) to the very same pixels (holes, objects on the border, diagonal touches);
bands traced alone and merged equal the whole mask; a scaled map equals its level-0 mask; QuPath's fields;
``stas predict --geojson`` on images and on whole slides, ``stas rle decode --geojson``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import shapely
from PIL import Image
from scipy import ndimage
from tiny_runs import prepare, train

from stas_pipeline import cli
from stas_pipeline.core.geojson import GeoJSONStyle, band_features, mask_features, rasterize, write_geojson
from stas_pipeline.tasks.slide.inference import upsampled
from stas_pipeline.tasks.slide.reader import Slide
from stas_pipeline.tasks.slide.rle import encode
from stas_pipeline.tasks.slide.synthetic import SyntheticSlide
from stas_pipeline.tasks.slide.tiling import open_mask

REPO = Path(__file__).resolve().parents[1]
PUBLIC_MASKS = REPO.parent / "shared" / "data" / "stas_public" / "reference_masks"


def shapes_mask() -> np.ndarray:
    """A 40 x 50 mask: a square with a hole holding an island, objects on the borders, two pixels touching
    diagonally, a ring of pixels closed only at a corner (its outline passes one vertex twice), a bar, a pixel."""
    m = np.zeros((40, 50), bool)
    m[2:14, 2:14] = True
    m[5:11, 5:11] = False  # the hole
    m[7:9, 7:9] = True  # an island in it: a feature of its own
    m[30:40, 0:6] = True  # on the left and bottom borders
    m[0:3, 45:50] = True  # on the top and right borders
    m[20, 20] = m[21, 21] = True  # a diagonal pair: one feature, two polygons
    m[20:25, 30:35] = True  # a ring of pixels without its top-right corner: what it encloses reaches the outside
    m[21:24, 31:34] = False  # only through the corner point between pixels (20, 33) and (21, 34)
    m[20, 34] = False
    m[30, 10:40] = True
    m[35, 45] = True
    return m


def features_of(path: Path) -> list[dict]:
    data = json.loads(path.read_text())
    assert data["type"] == "FeatureCollection"
    return data["features"]


def geometries(features: list[dict]) -> list[shapely.Geometry]:
    return [shapely.geometry.shape(f["geometry"]) for f in features]


def read_back(path: Path, shape: tuple[int, int]) -> np.ndarray:
    """The GeoJSON through ``stas tile``'s mask reader, as a slide's level-0 mask of ``shape``."""
    return open_mask(path, None, shape)(0, 0, *shape).astype(bool)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2 * (a & b).sum() / max(1, a.sum() + b.sum())


def test_a_mask_written_and_read_back_is_the_same_mask(tmp_path):
    mask = shapes_mask()
    prob = np.where(mask, 0.8, 0.1)
    assert write_geojson(tmp_path / "m.geojson", mask_features(mask, prob)) == ndimage.label(mask, np.ones((3, 3)))[1]
    features = features_of(tmp_path / "m.geojson")
    shapes = geometries(features)
    assert all(shapely.is_valid(g) for g in shapes)
    assert np.array_equal(read_back(tmp_path / "m.geojson", mask.shape), mask)  # identical, not merely close
    kinds = {f["geometry"]["type"] for f in features}
    assert kinds == {"Polygon", "MultiPolygon"}
    pair = next(g for g in shapes if g.bounds == (20.0, 20.0, 22.0, 22.0))
    assert isinstance(pair, shapely.MultiPolygon) and len(pair.geoms) == 2  # 8-connected: one object
    holed = next(g for g in shapes if g.bounds == (2.0, 2.0, 14.0, 14.0))
    assert len(holed.interiors) == 1 and holed.area == mask[2:14, 2:14].sum() - 4  # the island is its own
    closed = next(g for g in shapes if g.bounds == (30.0, 20.0, 35.0, 25.0))  # a hole meeting its exterior at a point
    assert len(closed.interiors) == 1
    assert closed.exterior.intersection(closed.interiors[0]).equals(shapely.Point(34, 21))
    for feature, shape in zip(features, shapes, strict=True):
        pixels = rasterize([shape], 0, 0, *mask.shape)
        assert feature["properties"]["measurements"]["area"] == pixels.sum() == shape.area
        assert feature["properties"]["measurements"]["mean_probability"] == pytest.approx(0.8)
    with pytest.raises(FileExistsError):
        write_geojson(tmp_path / "m.geojson", [])


def measured(features: list[dict]) -> np.ndarray:
    """(area, mean probability) of each feature, sorted."""
    return np.array(sorted((f["properties"]["measurements"]["area"], f["properties"]["measurements"]
                            ["mean_probability"]) for f in features))


@pytest.mark.parametrize("seed", range(4))
def test_bands_traced_alone_equal_the_whole_mask(seed):
    """Random masks (dense, so components cross many band borders): bands of 1, 3 and 8 rows give the same
    objects as the whole mask (one feature per 8-connected component, equal geometries), all valid."""
    rng = np.random.default_rng(seed)
    mask = ndimage.binary_opening(rng.random((48, 56)) < 0.55) if seed % 2 else rng.random((48, 56)) < 0.45
    prob = rng.random(mask.shape)
    whole = mask_features(mask, prob)
    labels, n = ndimage.label(mask, np.ones((3, 3)))
    assert len(whole) == n
    for rows in (1, 3, 8):
        banded = list(band_features(lambda y0, y1: (mask[y0:y1], prob[y0:y1]), mask.shape[0], band_rows=rows))
        shapes = geometries(banded)
        assert all(shapely.is_valid(g) for g in shapes)
        np.testing.assert_allclose(measured(banded), measured(whole), atol=1e-6)
        assert shapely.equals(shapely.union_all(shapes), shapely.union_all(geometries(whole)))
        assert np.array_equal(rasterize(shapes, 0, 0, *mask.shape).astype(bool), mask)
        for shape in shapes:  # each feature is one whole component
            inside = rasterize([shape], 0, 0, *mask.shape).astype(bool)
            assert len(np.unique(labels[inside])) == 1 and inside.sum() == (labels == labels[inside][0]).sum()


def test_a_scaled_map_traced_at_its_scale_is_the_level0_mask(tmp_path):
    """The slide's way: the map 4 times smaller, its level-0 mask each pixel repeated 4 x 4 and cut to a level-0
    size that is not a multiple of 4; vertices times 4, clipped, give exactly that mask."""
    rng = np.random.default_rng(5)
    prob = (ndimage.uniform_filter(rng.random((25, 31)), 3) * 255).astype(np.uint8)
    cut, scale, shape = 127, 4, (98, 122)
    mask = prob > cut
    level0 = upsampled(prob, scale, 0, 0, *shape) > cut
    features = band_features(lambda y0, y1: (mask[y0:y1], prob[y0:y1] / 255), mask.shape[0], band_rows=6,
                             scale=scale, shape=shape)
    write_geojson(tmp_path / "s.geojson", features)
    assert np.array_equal(read_back(tmp_path / "s.geojson", shape), level0)
    assert sum(f["properties"]["measurements"]["area"] for f in features_of(tmp_path / "s.geojson")) == level0.sum()


def test_qupath_fields_detection_and_simplify(tmp_path):
    mask = np.zeros((60, 60), bool)
    yy, xx = np.mgrid[:60, :60]
    mask[(yy - 30) ** 2 + (xx - 30) ** 2 < 400] = True
    style = GeoJSONStyle("detection", "Tumor", (0, 128, 255))
    write_geojson(tmp_path / "d.geojson", mask_features(mask, None, style))
    (feature,) = features_of(tmp_path / "d.geojson")
    assert feature["type"] == "Feature" and feature["geometry"]["type"] == "Polygon"
    assert feature["properties"] == {"objectType": "detection",
                                     "classification": {"name": "Tumor", "color": [0, 128, 255]},
                                     "measurements": {"area": float(mask.sum())}}
    exterior = feature["geometry"]["coordinates"][0]
    assert exterior[0] == exterior[-1] and all(isinstance(v, int) for point in exterior for v in point)
    assert shapely.LinearRing(exterior).is_ccw  # RFC 7946, in the numbers
    (simple,) = mask_features(mask, None, GeoJSONStyle(simplify=1.5))
    shape = shapely.geometry.shape(simple["geometry"])
    assert shapely.is_valid(shape) and len(simple["geometry"]["coordinates"][0]) < len(exterior) / 2
    assert simple["properties"]["measurements"]["area"] == mask.sum()  # the mask's area, not the simplified one
    assert dice(rasterize([shape], 0, 0, 60, 60).astype(bool), mask) > 0.98


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """deeplab_lite0 trained one epoch at 32 px on eight synthetic STAS-like images: (its best.pt, the images)."""
    root = tmp_path_factory.mktemp("geojson_run")
    prepare(root)
    return train(root) / "best.pt", root / "data" / "images"


def test_stas_predict_geojson_on_images(trained, tmp_path):
    """``<stem>.geojson`` beside each ``<stem>.png``, reading back to it. A run of one epoch is nearly constant:
    cut at the median of its probabilities (a first pass), its masks are fragmented, a hard case for tracing."""
    checkpoint, images = trained
    argv = ["predict", "--checkpoint", str(checkpoint), "--images", str(images), "--workers", "0"]
    assert cli.main([*argv, "--out", str(tmp_path / "first"), "--save-probs", str(tmp_path / "probs"),
                     "--probs-format", "npy"]) == 0
    probs = {p.stem: np.load(p) for p in (tmp_path / "probs").glob("*.npy")}
    cut = float(np.median(np.concatenate([p.ravel() for p in probs.values()])))
    out = tmp_path / "masks"
    assert cli.main([*argv, "--out", str(out), "--threshold", str(cut), "--geojson", "--geojson-class", "STAS"]) == 0
    assert sorted(p.stem for p in out.glob("*.png")) == sorted(p.stem for p in out.glob("*.geojson")) == sorted(probs)
    for stem, prob in probs.items():
        mask = np.asarray(Image.open(out / f"{stem}.png")) > 0
        back = read_back(out / f"{stem}.geojson", mask.shape)
        assert np.array_equal(back, mask) and dice(back, mask) >= 0.99
        features = features_of(out / f"{stem}.geojson")
        assert all(shapely.is_valid(g) for g in geometries(features))
        assert sum(f["properties"]["measurements"]["area"] for f in features) == mask.sum()
        labels, n = ndimage.label(mask, np.ones((3, 3)))
        assert len(features) == n
        means = sorted(f["properties"]["measurements"]["mean_probability"] for f in features)
        np.testing.assert_allclose(means, sorted(ndimage.mean(prob, labels, range(1, n + 1))), atol=1e-5)
        assert {f["properties"]["classification"]["name"] for f in features} <= {"STAS"}
    assert 0.2 < np.mean([(probs[stem] > cut).mean() for stem in probs]) < 0.8


def test_stas_predict_geojson_on_a_slide(trained, tmp_path):
    """A whole slide: ``<id>.geojson`` traced on the probability map by bands reads back to ``<id>.tif`` (cut,
    as above, at the median of a first pass's map over tissue)."""
    checkpoint, _ = trained
    slide = SyntheticSlide(300, 410, seed=3, glomeruli=600, radius=(10, 22))
    slide.write(tmp_path / "slides" / "g1.tif", levels=2, tile=128, compression="zlib")
    argv = ["predict", "--checkpoint", str(checkpoint), "--slides", str(tmp_path / "slides"), "--scale", "4",
            "--thumbnail", "200"]
    assert cli.main([*argv, "--out", str(tmp_path / "first")]) == 0
    prob = np.load(tmp_path / "first" / "g1_prob.npy")
    cut = (np.median(prob[prob > 0]) - 0.5) / 255  # floor(255 * cut) = median - 1: foreground where >= median
    out = tmp_path / "pred"
    assert cli.main([*argv, "--out", str(out), "--threshold", str(cut), "--geojson", "--geojson-type",
                     "detection"]) == 0
    with Slide(out / "g1.tif") as written:
        level0 = written.read(0, 0, 300, 410)[..., 0] > 0
    assert 0.01 < level0.mean() < 0.99
    back = read_back(out / "g1.geojson", (300, 410))
    assert np.array_equal(back, level0) and dice(back, level0) >= 0.99
    features = features_of(out / "g1.geojson")
    assert all(shapely.is_valid(g) for g in geometries(features))
    assert {f["properties"]["objectType"] for f in features} == {"detection"}
    assert sum(f["properties"]["measurements"]["area"] for f in features) == level0.sum()


def test_rle_decode_geojson(tmp_path):
    mask = shapes_mask()
    slide = SyntheticSlide(260, 300, seed=1, glomeruli=500, radius=(8, 20))
    (tmp_path / "m.csv").write_text(f"id,encoding\nshapes,{encode(mask)}\n")
    (tmp_path / "s.csv").write_text(f"id,encoding\nslide,{slide.rle()}\n")
    assert cli.main(["rle", "decode", str(tmp_path / "m.csv"), "--shape", "40", "50", "--out", str(tmp_path / "png"),
                     "--geojson"]) == 0
    assert np.array_equal(read_back(tmp_path / "png" / "shapes.geojson", mask.shape), mask)
    assert np.array_equal(np.asarray(Image.open(tmp_path / "png" / "shapes.png")) > 0, mask)
    assert all("mean_probability" not in f["properties"]["measurements"]
               for f in features_of(tmp_path / "png" / "shapes.geojson"))
    assert cli.main(["rle", "decode", str(tmp_path / "s.csv"), "--shape", "260", "300", "--format", "tif",
                     "--out", str(tmp_path / "tif"), "--geojson"]) == 0
    truth = slide.mask(0, 0, 260, 300).astype(bool)
    assert truth.any() and np.array_equal(read_back(tmp_path / "tif" / "slide.geojson", truth.shape), truth)


@pytest.mark.slow
@pytest.mark.skipif(not PUBLIC_MASKS.is_dir(), reason="the public STAS reference masks are not here")
def test_a_public_stas_reference_mask_round_trips(tmp_path):
    path = sorted(PUBLIC_MASKS.glob("*.png"))[0]
    mask = np.asarray(Image.open(path).convert("L")) > 0
    write_geojson(tmp_path / f"{path.stem}.geojson", mask_features(mask))
    assert all(shapely.is_valid(g) for g in geometries(features_of(tmp_path / f"{path.stem}.geojson")))
    back = read_back(tmp_path / f"{path.stem}.geojson", mask.shape)
    assert dice(back, mask) >= 0.99 and np.array_equal(back, mask)
