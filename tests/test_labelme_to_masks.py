"""Tests of stas labelme-to-masks (tasks/segmentation/labelme.py): every shape type, the CLI, bad input, clipping,
overwriting."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from stas_pipeline.stages.labelme_to_masks import main
from stas_pipeline.tasks.segmentation.labelme import ConversionError, convert_folder, rasterize_shapes

REPO = Path(__file__).resolve().parents[1]
STAS_PUBLIC = Path(__file__).resolve().parents[2] / "shared/data/stas_public"
H, W = 40, 60
SQUARE = [[10, 10], [30, 10], [30, 20], [10, 20]]


def shape(points: list, shape_type: str | None = "polygon", label: str = "STAS") -> dict:
    return {"label": label, "points": points, "group_id": None, "shape_type": shape_type, "flags": {}}


def labelme(shapes: list, height: int = H, width: int = W, image_path: str | None = "img.jpg") -> dict:
    data = {"version": "4.5.6", "flags": {}, "shapes": shapes, "imageHeight": height, "imageWidth": width}
    if image_path is not None:
        data["imagePath"] = image_path
    return data


def write_json(folder: Path, stem: str, data: dict | str, image: tuple[int, int] | None = None) -> Path:
    """Write ``folder/ann/<stem>.json``; with ``image=(width, height)`` a JPEG ``folder/img/<stem>.jpg``."""
    (folder / "ann").mkdir(exist_ok=True)
    path = folder / "ann" / f"{stem}.json"
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    if image is not None:
        (folder / "img").mkdir(exist_ok=True)
        Image.new("RGB", image, (200, 120, 180)).save(folder / "img" / f"{stem}.jpg", "JPEG")
    return path


def read_mask(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        assert im.mode == "L"
        return np.array(im)


def run(tmp_path: Path, *extra: str) -> int:
    return main([str(tmp_path / "ann"), "--out", str(tmp_path / "out"), *extra], prog="stas labelme-to-masks")


# --- rasterisation ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape_type", ["polygon", None, ""])
def test_polygon_and_missing_shape_type(shape_type):
    mask, clipped = rasterize_shapes([shape(SQUARE, shape_type)], H, W)
    assert mask.dtype == np.uint8 and mask.shape == (H, W) and clipped == 0
    assert mask[15, 20] == 255 and mask[10, 10] == 255 and mask[20, 30] == 255  # inside and on the outline
    assert mask[9, 20] == 0 and mask[21, 20] == 0 and mask[15, 31] == 0 and mask[5, 5] == 0
    assert int((mask == 255).sum()) == 21 * 11 and set(np.unique(mask)) == {0, 255}


def test_polygon_matches_labelme_shape_to_mask_at_float_coordinates():
    points = [[3.5, 2.25], [41.7, 8.5], [52.2, 33.9], [12.5, 37.5], [20.1, 18.8]]
    expected = Image.new("L", (W, H), 0)  # labelme.utils.shape_to_mask, polygon branch
    ImageDraw.Draw(expected).polygon(xy=[tuple(p) for p in points], outline=1, fill=1)
    mask, _ = rasterize_shapes([shape(points)], H, W)
    np.testing.assert_array_equal(mask > 0, np.array(expected) > 0)


def test_rectangle_from_either_corner():
    for corners in ([[10, 10], [30, 20]], [[30, 20], [10, 10]], [[10, 20], [30, 10]]):
        mask, _ = rasterize_shapes([shape(corners, "rectangle")], H, W)
        assert mask[15, 20] == 255 and mask[10, 10] == 255 and mask[20, 30] == 255
        assert mask[9, 20] == 0 and mask[15, 31] == 0
        assert int((mask == 255).sum()) == 21 * 11


def test_circle_radius_is_distance_from_centre_to_rim():
    mask, _ = rasterize_shapes([shape([[30, 20], [30, 28]], "circle")], H, W)  # radius 8
    assert mask[20, 30] == 255 and mask[20, 37] == 255 and mask[13, 30] == 255
    assert mask[20, 40] == 0 and mask[20, 20] == 0 and mask[13, 23] == 0  # (23, 13) is 9.9 px away


def test_line_and_linestrip_use_line_width():
    mask, _ = rasterize_shapes([shape([[5, 5], [50, 5]], "line")], H, W)
    assert mask[5, 25] == 255 and mask[8, 25] == 255 and mask[14, 25] == 0
    thin, _ = rasterize_shapes([shape([[5, 5], [50, 5]], "line")], H, W, line_width=1)
    assert thin[5, 25] == 255 and thin[6, 25] == 0
    strip, _ = rasterize_shapes([shape([[5, 5], [50, 5], [50, 35]], "linestrip")], H, W, line_width=3)
    assert strip[5, 25] == 255 and strip[30, 50] == 255 and strip[30, 20] == 0 and strip[30, 55] == 0


def test_point_uses_point_radius():
    mask, _ = rasterize_shapes([shape([[20, 20]], "point")], H, W)
    assert mask[20, 20] == 255 and mask[20, 24] == 255 and mask[20, 27] == 0
    small, _ = rasterize_shapes([shape([[20, 20]], "point")], H, W, point_radius=2)
    assert small[20, 22] == 255 and small[20, 24] == 0


def test_union_and_label_filter():
    shapes = [shape(SQUARE, label="STAS"), shape([[45, 30], [55, 36]], "rectangle", label="other")]
    both, _ = rasterize_shapes(shapes, H, W)
    assert both[15, 20] == 255 and both[33, 50] == 255
    stas, _ = rasterize_shapes(shapes, H, W, labels=["STAS"])
    assert stas[15, 20] == 255 and stas[33, 50] == 0


def test_points_outside_are_counted_and_clipped():
    mask, clipped = rasterize_shapes([shape([[40, 10], [80, 10], [80, 30], [40, 30]])], H, W)
    assert clipped == 2 and mask.shape == (H, W)
    assert mask[20, W - 1] == 255 and mask[20, 39] == 0


@pytest.mark.parametrize(
    ("shapes", "reason"),
    [
        ([shape(SQUARE), shape([[1, 1], [5, 5]])], "shape 1: polygon has 2 points, needs at least 3"),
        ([shape([[1, 1], [5, 5], [9, 1]], "circle")], "shape 0: circle has 3 points, needs exactly 2"),
        ([shape([[1, 1], [5, "x"], [9, 1]])], "shape 0: point 1 has a non-numeric coordinate 'x'"),
        ([shape([[1, 1], [5, float("nan")], [9, 1]])], "shape 0: point 1 has a non-finite coordinate nan"),
        ([shape(SQUARE, "blob")], "shape 0: unknown shape_type 'blob'"),
        ([{"label": "STAS"}], "shape 0: missing key 'points'"),
        ([shape(SQUARE), shape(SQUARE, label=None)], "shape 1: 'label' must be a string, got None"),
        (
            [shape([[1, 1], [1e12, 5], [9, 1]])],
            "shape 0: point 1 (1e+12, 5) lies far outside the 60x40 image",
        ),
    ],
)
def test_bad_shapes_raise_naming_the_shape(shapes, reason):
    with pytest.raises(ConversionError) as info:
        rasterize_shapes(shapes, H, W)
    assert reason in str(info.value)


# --- command line -------------------------------------------------------------------------------------------


def test_cli_writes_binary_masks_named_by_image_stem(tmp_path, capsys):
    write_json(tmp_path, "a", labelme([shape(SQUARE)], image_path="..\\images\\slide_1.jpg"), image=(W, H))
    write_json(tmp_path, "b", labelme([], image_path=None))
    write_json(tmp_path, "c", labelme([shape(SQUARE)], image_path=""))
    assert run(tmp_path) == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["b.png", "c.png", "slide_1.png"]
    mask = read_mask(tmp_path / "out" / "slide_1.png")
    assert mask.shape == (H, W) and set(np.unique(mask)) == {0, 255}
    np.testing.assert_array_equal(mask, rasterize_shapes([shape(SQUARE)], H, W)[0])
    empty = read_mask(tmp_path / "out" / "b.png")
    assert empty.shape == (H, W) and not empty.any()
    out = capsys.readouterr().out
    assert "written 3, empty masks 1, clipped points 0, skipped 0" in out


def test_cli_labels_line_width_point_radius_and_clipping(tmp_path, capsys):
    shapes = [
        shape([[5, 5], [50, 5]], "line", label="A"),
        shape([[20, 30]], "point", label="B"),
        shape([[-5, 25], [70, 25], [30, 45]], label="C"),  # three of its points lie outside
    ]
    write_json(tmp_path, "x", labelme(shapes))
    assert run(tmp_path, "--labels", "A", "B", "--line-width", "2", "--point-radius", "3") == 0
    mask = read_mask(tmp_path / "out" / "img.png")
    assert mask[5, 25] == 255 and mask[8, 25] == 0  # thin line
    assert mask[30, 23] == 255 and mask[30, 25] == 0  # small point
    assert mask[26, 30] == 0  # label C left out
    assert "clipped points 0" in capsys.readouterr().out
    assert run(tmp_path, "--overwrite") == 0
    assert read_mask(tmp_path / "out" / "img.png")[26, 30] == 255
    assert "written 1, empty masks 0, clipped points 3, skipped 0" in capsys.readouterr().out


GOOD = labelme([shape(SQUARE)], image_path="good.jpg")
BAD = {**GOOD, "imagePath": "bad.jpg"}
BAD_TEXT = json.dumps(BAD)


@pytest.mark.parametrize(
    ("bad", "image_size", "reason"),
    [
        ("{not json", (W, H), "malformed or truncated JSON"),
        (BAD_TEXT[: len(BAD_TEXT) // 2], (W, H), "malformed or truncated JSON"),
        ("[1, 2]", (W, H), "not a LabelMe file"),
        ({k: v for k, v in BAD.items() if k != "imageHeight"}, (W, H), "missing key 'imageHeight'"),
        (
            {**BAD, "shapes": [shape(SQUARE), shape([[1, 1], [5, 5]])]},
            (W, H),
            "shape 1: polygon has 2 points",
        ),
        (
            {**BAD, "shapes": [shape([[1, 1], [5, "abc"], [9, 1]])]},
            (W, H),
            "shape 0: point 1 has a non-numeric",
        ),
        (BAD_TEXT.replace("10,", "NaN,", 1), (W, H), "shape 0: point 0 has a non-finite coordinate nan"),
        ({**BAD, "shapes": [shape(SQUARE, "blob")]}, (W, H), "shape 0: unknown shape_type 'blob'"),
        (BAD, (W + 1, H), f"declared size {W}x{H} (imageWidth x imageHeight) disagrees with image"),
        ({**BAD, "imagePath": "missing.jpg"}, (W, H), "missing.jpg not found"),
    ],
    ids=[
        "malformed",
        "truncated",
        "not-object",
        "missing-key",
        "short-polygon",
        "non-numeric",
        "nan",
        "unknown-type",
        "size-mismatch",
        "missing-image",
    ],
)
def test_bad_file_is_reported_and_the_rest_converted(tmp_path, capsys, bad, image_size, reason):
    write_json(tmp_path, "good", GOOD, image=(W, H))
    bad_path = write_json(tmp_path, "bad", bad, image=image_size)
    assert run(tmp_path, "--images", str(tmp_path / "img")) == 1
    captured = capsys.readouterr()
    errors = [line for line in captured.err.splitlines() if line.startswith("ERROR")]
    assert len(errors) == 1
    assert errors[0].startswith(f"ERROR {bad_path}: ") and reason in errors[0]
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["good.png"]
    assert "written 1, empty masks 0, clipped points 0, skipped 1" in captured.out


def test_existing_output_is_kept_without_overwrite(tmp_path, capsys):
    write_json(tmp_path, "a", labelme([shape(SQUARE)], image_path="a.jpg"))
    write_json(tmp_path, "b", labelme([shape(SQUARE)], image_path="b.jpg"))
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "a.png").write_bytes(b"user's file")
    assert run(tmp_path) == 1
    captured = capsys.readouterr()
    assert f"ERROR {tmp_path / 'ann' / 'a.json'}: output {tmp_path / 'out' / 'a.png'} exists" in captured.err
    assert "--overwrite" in captured.err
    assert (tmp_path / "out" / "a.png").read_bytes() == b"user's file"
    assert read_mask(tmp_path / "out" / "b.png")[15, 20] == 255
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.png", "b.png"]  # no temp files left

    assert run(tmp_path, "--overwrite") == 0
    assert read_mask(tmp_path / "out" / "a.png")[15, 20] == 255


def test_two_files_for_one_image_are_not_written_twice(tmp_path, capsys):
    write_json(tmp_path, "a", labelme([shape(SQUARE)], image_path="same.jpg"))
    write_json(tmp_path, "b", labelme([], image_path="same.jpg"))
    assert run(tmp_path) == 1
    assert f"ERROR {tmp_path / 'ann' / 'b.json'}: same output same.png as a.json" in capsys.readouterr().err
    assert read_mask(tmp_path / "out" / "same.png").any()


def test_empty_or_missing_input_folder_exits_2(tmp_path, capsys):
    (tmp_path / "ann").mkdir()
    assert run(tmp_path) == 2
    assert f"ERROR {tmp_path / 'ann'}: no LabelMe *.json files" in capsys.readouterr().err
    assert main([str(tmp_path / "nowhere"), "--out", str(tmp_path / "out")]) == 2
    assert "annotation folder not found" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_module_help_runs():
    result = subprocess.run(
        [sys.executable, "-m", "stas_pipeline.stages.labelme_to_masks", "--help"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0
    for option in ("--out", "--images", "--labels", "--line-width", "--point-radius", "--overwrite"):
        assert option in result.stdout


# --- the real STAS sample -----------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.skipif(not STAS_PUBLIC.is_dir(), reason="needs ../shared/data/stas_public")
def test_stas_public_matches_labelme_and_reference_masks(tmp_path):
    problems = convert_folder(
        STAS_PUBLIC / "Train_Annotations", tmp_path, images=STAS_PUBLIC / "Train_Images", labels=["STAS"]
    )
    assert not problems.skipped and problems.counts["written"] == 131
    dices = []
    for path in sorted((STAS_PUBLIC / "Train_Annotations").glob("*.json")):
        data = json.loads(path.read_text())
        height, width = data["imageHeight"], data["imageWidth"]
        expected = np.zeros((height, width), bool)  # labelme.utils.shape_to_mask per polygon, then the union
        for s in data["shapes"]:
            canvas = Image.new("L", (width, height), 0)
            ImageDraw.Draw(canvas).polygon(xy=[tuple(p) for p in s["points"]], outline=1, fill=1)
            expected |= np.array(canvas, dtype=bool)
        mask = read_mask(tmp_path / f"{Path(data['imagePath']).stem}.png")
        assert set(np.unique(mask)) <= {0, 255}
        np.testing.assert_array_equal(mask > 0, expected, err_msg=path.name)
        reference = read_mask(STAS_PUBLIC / "reference_masks" / f"{path.stem}.png") > 0
        dices.append(2 * (expected & reference).sum() / (expected.sum() + reference.sum()))
    assert np.mean(dices) >= 0.98
