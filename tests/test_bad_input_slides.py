"""``stas tile`` given bad polygon masks among good ones, on real pyramidal TIFF slides (synthetic slides written
tile by tile): a LabelMe file drawn on another size, a GeoJSON that is not JSON, and a self-intersecting polygon.
Each bad file is named under its own name, no traceback reaches the user, the good slides are tiled, the invalid
polygon is repaired (shapely's ``make_valid``, checked with ``is_valid``) and counted, or with
``--refuse-invalid-polygons`` its slide is left out; an existing datalist is never replaced. A four-channel (RGBA)
slide is tiled by the image policy, like its RGB original."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import shapely

from stas_pipeline import cli
from stas_pipeline.tasks.slide.synthetic import SyntheticSlide
from stas_pipeline.tasks.slide.tiling import load_tile, open_mask, polygon_repairs

H, W, SIZE = 600, 800, 256
# a bowtie: its edges (100,100)-(300,300) and (300,100)-(100,300) cross at (200, 200)
BOWTIE = [[100.0, 100.0], [300.0, 300.0], [300.0, 100.0], [100.0, 300.0]]


def rings(slide: SyntheticSlide) -> list[list[list[float]]]:
    """Each glomerulus of ``slide`` as a 32-gon of (x, y) vertices (a valid polygon)."""
    angles = np.linspace(0, 2 * np.pi, 32, endpoint=False)
    return [[[float(cx + r * np.cos(a)), float(cy + r * np.sin(a))] for a in angles] for cy, cx, r in slide.discs]


def geojson(polygons: list[list[list[float]]]) -> str:
    return json.dumps({"type": "FeatureCollection", "features": [
        {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [ring + ring[:1]]}} for ring in polygons]})


def labelme(polygons: list[list[list[float]]], height: int, width: int) -> str:
    return json.dumps({"shapes": [{"label": "g", "points": ring, "shape_type": "polygon"} for ring in polygons],
                       "imageHeight": height, "imageWidth": width})


@pytest.fixture(scope="module")
def case(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Five slides; masks: s0 GeoJSON with a bowtie among its discs, s1 LabelMe declaring half the slide's size,
    s2 a broken GeoJSON, s3 a right LabelMe, s4 a right GeoJSON."""
    root = tmp_path_factory.mktemp("bad_slides")
    masks = root / "masks"
    masks.mkdir()
    made = {f"s{k}": SyntheticSlide(H, W, seed=k, glomeruli=120, radius=(12, 24)) for k in range(5)}
    for name, slide in made.items():
        slide.write(root / "slides" / f"{name}.tif", levels=2, tile=128, compression="zlib")
    (masks / "s0.geojson").write_text(geojson([*rings(made["s0"]), BOWTIE]))
    (masks / "s1.json").write_text(labelme(rings(made["s1"]), H // 2, W // 2))
    (masks / "s2.geojson").write_text(geojson(rings(made["s2"]))[:200])  # cut short: not JSON
    (masks / "s3.json").write_text(labelme(rings(made["s3"]), H, W))
    (masks / "s4.geojson").write_text(geojson(rings(made["s4"])))
    return root


def tile_argv(root: Path, out: Path, *extra: str) -> list[str]:
    return ["tile", str(root / "slides"), "--masks", str(root / "masks"), "--out", str(out), "--size", str(SIZE),
            "--stride", str(SIZE // 2), "--scale", "4", "--folds", "2", "--thumbnail", "200", *extra]


def test_bad_masks_are_named_and_the_good_slides_tiled(case, tmp_path, capsys):
    out, masks = tmp_path / "tiles", case / "masks"
    assert cli.main(tile_argv(case, out)) == 1
    captured = capsys.readouterr()
    err = captured.err
    assert "Traceback" not in err
    assert (f"ERROR {masks / 's1.json'}: LabelMe imageWidth x imageHeight 400x300, the slide 800x600 (level 0)"
            in err) and "slide s1.tif left out" in err
    assert f"ERROR {masks / 's2.geojson'}: not JSON (" in err and "slide s2.tif left out" in err
    assert len([line for line in err.splitlines() if line.startswith("ERROR")]) == 2
    assert f"WARNING {masks / 's0.geojson'}: 1 invalid polygon(s), first polygon " in err
    assert "Self-intersection" in err and "repaired with shapely's make_valid" in err
    assert "polygons repaired 1" in captured.out and "slides 3" in captured.out and "skipped 2" in captured.out
    datalist = json.loads((out / "datalist.json").read_text())
    assert {e["group"] for e in datalist["training"]} == {"s0", "s3", "s4"}
    assert sorted(p.name for p in (out / "tissue").iterdir()) == ["s0.png", "s3.png", "s4.png"]

    before = (out / "datalist.json").read_bytes()
    assert cli.main(tile_argv(case, out)) == 2  # exists: kept as it was
    assert (out / "datalist.json").read_bytes() == before


def test_the_repaired_polygons_are_valid_and_the_bowtie_drawn_as_two_triangles(case):
    mask = open_mask(case / "masks" / "s0.geojson", None, (H, W))
    repairs = polygon_repairs(mask)
    assert len(repairs) == 1 and "Self-intersection" in repairs[0]
    drawn = mask.__self__.polygons
    assert all(shapely.Polygon(ring).is_valid for ring in drawn)
    assert not shapely.Polygon(BOWTIE).is_valid  # what was repaired
    window = mask(0, 0, 400, 400)
    assert window[200, 130] == window[200, 270] == 1  # inside the left and the right triangle
    assert window[130, 200] == window[270, 200] == 0  # the gaps above and below the crossing
    assert polygon_repairs(open_mask(case / "masks" / "s4.geojson", None, (H, W))) == []


def test_refuse_invalid_polygons_leaves_their_slide_out(case, tmp_path, capsys):
    assert cli.main(tile_argv(case, tmp_path / "tiles", "--refuse-invalid-polygons")) == 1
    err = capsys.readouterr().err
    assert (f"ERROR {case / 'masks' / 's0.geojson'}: 1 invalid polygon(s)" in err
            and "slide s0.tif left out (--refuse-invalid-polygons)" in err)
    datalist = json.loads((tmp_path / "tiles" / "datalist.json").read_text())
    assert {e["group"] for e in datalist["training"]} == {"s3", "s4"}


def test_an_rgba_slide_is_tiled_like_its_rgb_original(case, tmp_path, capsys):
    """s4 stored with an opaque alpha channel and then half transparent: tiled through ``stas tile`` and read by
    the cache's loading step, its tiles equal the RGB slide's (opaque) or that slide composited on white."""
    import tifffile

    rgb = tifffile.imread(case / "slides" / "s4.tif")
    slides, masks = tmp_path / "slides", tmp_path / "masks"
    slides.mkdir(), masks.mkdir()
    tifffile.imwrite(tmp_path / "rgb.tif", rgb, tile=(128, 128), photometric="rgb")  # one level, as the others
    for name, alpha in (("opaque", 255), ("half", 128)):
        rgba = np.concatenate([rgb, np.full((*rgb.shape[:2], 1), alpha, np.uint8)], axis=-1)
        tifffile.imwrite(slides / f"{name}.tif", rgba, tile=(128, 128), photometric="rgb", extrasamples=[2])
        (masks / f"{name}.geojson").write_bytes((case / "masks" / "s4.geojson").read_bytes())
    assert cli.main(tile_argv(tmp_path, tmp_path / "tiles")) == 0
    assert "Traceback" not in capsys.readouterr().err
    entries = json.loads((tmp_path / "tiles" / "datalist.json").read_text())["training"]
    first = {Path(e["image"]).stem: e for e in reversed(entries)}
    assert sorted(first) == ["half", "opaque"]
    for entry in first.values():  # paths relative to the datalist
        entry = {**entry, "image": str(tmp_path / "tiles" / entry["image"]),
                 "label": str(tmp_path / "tiles" / entry["label"])}
        tile = load_tile(entry)
        original = load_tile({**entry, "image": str(tmp_path / "rgb.tif")})
        want = original["image"]
        if Path(entry["image"]).stem == "half":
            want = np.rint(want * (128 / 255) + 255 * (1 - 128 / 255)).astype(np.uint8)
        assert tile["image"].shape == want.shape and np.abs(tile["image"].astype(int) - want).max() <= 1
        assert entry["image"].endswith("opaque.tif") <= np.array_equal(tile["image"], want)
        assert np.array_equal(tile["label"], original["label"])


def test_one_process_run_names_the_files_without_a_traceback(case, tmp_path):
    done = subprocess.run([sys.executable, "-m", "stas_pipeline.cli", *tile_argv(case, tmp_path / "tiles")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr and "s1.json" in done.stderr and "s2.geojson" in done.stderr
    assert (tmp_path / "tiles" / "datalist.json").is_file()


def test_an_rle_csv_with_a_bom_gives_the_masks(case, tmp_path):
    """A UTF-8 BOM before the header of an RLE CSV (Excel's "CSV UTF-8") is read like the CSV without it."""
    made = {name: SyntheticSlide(H, W, seed=k, glomeruli=120, radius=(12, 24)) for k, name in ((3, "s3"), (4, "s4"))}
    text = "id,encoding\n" + "".join(f"{name},{slide.rle()}\n" for name, slide in made.items())
    (tmp_path / "masks.csv").write_bytes(b"\xef\xbb\xbf" + text.encode())
    argv = tile_argv(case, tmp_path / "tiles")
    argv[argv.index("--masks") + 1] = str(tmp_path / "masks.csv")
    assert cli.main(argv) == 0
    datalist = json.loads((tmp_path / "tiles" / "datalist.json").read_text())
    assert {e["label_id"] for e in datalist["training"]} == {"s3", "s4"}
    assert {e["group"] for e in datalist["test"]} == {"s0", "s1", "s2"}
