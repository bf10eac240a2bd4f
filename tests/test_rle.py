"""Kaggle RLE (column-major, 1-indexed): against the plain reference encoder, streamed by column strips, decoded
into C- and Fortran-ordered arrays and memory maps, windows cut from the runs, bad strings named; ``stas rle``
round trips of PNG and tiled-TIFF masks."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from stas_pipeline import cli
from stas_pipeline.tasks.slide.reader import Slide, write_slide
from stas_pipeline.tasks.slide.rle import RLEError, RLEMask, decode, decode_into, encode, encode_strips, parse


def reference_encode(mask: np.ndarray) -> str:
    """The encoder of the competitions' notebooks: column-major pixels, run edges, lengths from edge pairs."""
    pixels = np.concatenate([[0], mask.T.flatten() > 0, [0]]).astype(np.int8)
    runs = np.where(pixels[1:] != pixels[:-1])[0] + 1
    runs[1::2] -= runs[::2]
    return " ".join(str(x) for x in runs)


def masks() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    full, edges = np.ones((5, 7), np.uint8), np.zeros((6, 4), np.uint8)
    edges[0, 0] = edges[-1, -1] = 1  # runs touching the first and the last pixel
    column_crossing = np.zeros((4, 5), np.uint8)
    column_crossing[2:, 1] = column_crossing[:, 2] = column_crossing[:1, 3] = 255  # one run over three columns
    return [full, edges, column_crossing, np.zeros((3, 3), np.uint8), (rng.random((37, 53)) > 0.6).astype(np.uint8),
            rng.random((1, 40)) > 0.5, rng.random((40, 1)) > 0.5]


@pytest.mark.parametrize("mask", masks(), ids=lambda m: "x".join(map(str, m.shape)))
def test_encode_matches_the_reference_and_round_trips(mask):
    expected = reference_encode(mask)
    assert encode(mask) == expected
    assert np.array_equal(decode(expected, mask.shape), (mask > 0).astype(np.uint8))
    for width in (1, 2, 3, mask.shape[1]):  # streamed in strips of columns: runs crossing strips come out whole
        strips = [mask[:, x:x + width] for x in range(0, mask.shape[1], width)]
        assert encode_strips(strips, mask.shape[0]) == expected


def test_known_strings():
    mask = np.array([[1, 0, 1], [1, 0, 1]])
    assert encode(mask) == "1 2 5 2"
    assert encode(np.zeros((2, 2))) == "" and not decode("", (2, 2)).any()
    assert decode("4 1", (2, 2)).tolist() == [[0, 0], [0, 1]]


def test_decode_into_memory_maps_in_either_order(tmp_path):
    mask = masks()[4]
    rle = encode(mask)
    for order in ("C", "F"):
        out = np.lib.format.open_memmap(tmp_path / f"{order}.npy", mode="w+", dtype=np.uint8, shape=mask.shape,
                                        fortran_order=order == "F")
        decode_into(rle, out, value=255)
        out.flush()
        assert np.array_equal(np.load(tmp_path / f"{order}.npy"), mask * 255)


@pytest.mark.parametrize("rle, reason", [
    ("1 2 3", "3 numbers"),
    ("1 x", "not an integer"),
    ("0 2", r"run 1 \(0 2\) starts at 0"),
    ("3 0", r"run 1 \(3 0\) has length 0"),
    ("5 3 1 2", r"run 2 \(1 2\) is not after the end"),
    ("1 3 2 2", r"run 2 \(2 2\) is not after the end"),
    ("1 2 8 2", r"run 2 \(8 2\) runs past the last pixel \(8\)"),
])
def test_bad_strings_are_named(rle, reason):
    with pytest.raises(RLEError, match=reason):
        parse(rle, 8)
    with pytest.raises(RLEError):
        decode(rle, (2, 4))


def test_touching_runs_decode_as_one():
    assert decode("1 2 3 2", (2, 2)).all() and encode(decode("1 2 3 2", (2, 2))) == "1 4"


def test_windows_cut_from_the_runs_equal_the_decoded_mask():
    mask = masks()[4]
    runs = RLEMask(encode(mask), mask.shape)
    for y, x, h, w in [(0, 0, 37, 53), (5, 7, 10, 20), (-3, -4, 12, 9), (30, 45, 20, 20), (40, 0, 5, 5)]:
        padded = np.zeros((37 + 60, 53 + 60), np.uint8)
        padded[30:67, 30:83] = mask
        assert np.array_equal(runs.window(y, x, h, w), padded[y + 30:y + 30 + h, x + 30:x + 30 + w])


def test_stas_rle_round_trip_of_png_and_tiff_masks(tmp_path):
    """PNG and tiled-TIFF masks -> one CSV -> masks again, equal pixel for pixel; sizes from --like or --shape."""
    mask = masks()[4] * 255
    Image.fromarray(mask).save(tmp_path / "a.png")
    big = np.zeros((300, 2100), np.uint8)  # wider than one column strip: runs cross the strips
    big[100:200, 1000:1100] = big[299, 2099] = big[0, 0] = 255
    write_slide(tmp_path / "b.ome.tif", lambda y, x, h, w: np.pad(big, ((0, 512), (0, 512)))[y:y + h, x:x + w, None],
                300, 2100, channels=1, levels=2)
    assert cli.main(["rle", "encode", str(tmp_path / "a.png"), str(tmp_path / "b.ome.tif"),
                     "--out", str(tmp_path / "m.csv")]) == 0
    lines = (tmp_path / "m.csv").read_text().splitlines()
    assert lines[0] == "id,encoding" and lines[1] == f"a,{reference_encode(mask)}"
    assert lines[2] == f"b,{reference_encode(big)}"
    assert cli.main(["rle", "decode", str(tmp_path / "m.csv"), "--like", str(tmp_path / "a.png"),
                     str(tmp_path / "b.ome.tif"), "--out", str(tmp_path / "png")]) == 0
    assert np.array_equal(np.asarray(Image.open(tmp_path / "png" / "a.png")), mask)
    assert np.array_equal(np.asarray(Image.open(tmp_path / "png" / "b.png")), big)
    assert cli.main(["rle", "decode", str(tmp_path / "m.csv"), "--like", str(tmp_path / "b.ome.tif"),
                     str(tmp_path / "a.png"), "--format", "tif", "--out", str(tmp_path / "tif")]) == 0
    with Slide(tmp_path / "tif" / "b.tif") as slide:
        assert slide.level_count == 3 and np.array_equal(slide.read(0, 0, 300, 2100)[..., 0], big)


def test_stas_rle_reports_bad_rows_and_files_by_name(tmp_path, capsys):
    (tmp_path / "m.csv").write_text("id,encoding\nok,1 2\npast,10 8\nunsorted,5 1 1 1\nok,3 1\nempty,\n")
    assert cli.main(["rle", "decode", str(tmp_path / "m.csv"), "--shape", "4", "4", "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert "id past: run 1 (10 8) runs past the last pixel (16)" in err
    assert "id unsorted: run 2 (1 1) is not after the end" in err and "id ok: a repeated id" in err
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["empty.png", "ok.png"]
    (tmp_path / "broken.png").write_bytes(b"not a png")
    assert cli.main(["rle", "encode", str(tmp_path / "broken.png"), "--out", str(tmp_path / "x.csv")]) == 2
    assert "broken.png" in capsys.readouterr().err and not (tmp_path / "x.csv").exists()
    (tmp_path / "bad.csv").write_text("name,pixels\na,1 2\n")
    assert cli.main(["rle", "decode", str(tmp_path / "bad.csv"), "--shape", "2", "2", "--out",
                     str(tmp_path / "p")]) == 2
    assert "lacks an id column" in capsys.readouterr().err


def test_rle_csvs_hold_slide_sized_strings(tmp_path):
    """A slide's RLE runs to megabytes (past the csv module's 128 KiB default field limit)."""
    mask = np.zeros((400, 1000), np.uint8)
    mask[::2] = 1  # 200,000 runs
    (tmp_path / "m.csv").write_text(f"id,encoding\nbig,{encode(mask)}\n")
    assert len(encode(mask)) > 131072
    assert cli.main(["rle", "decode", str(tmp_path / "m.csv"), "--shape", "400", "1000", "--out",
                     str(tmp_path / "out")]) == 0
    assert np.array_equal(np.asarray(Image.open(tmp_path / "out" / "big.png")), mask * 255)


def test_a_bom_in_the_rle_csv_is_accepted(tmp_path):
    """A CSV saved by Excel ("UTF-8 with BOM") decodes as the same CSV without it."""
    (tmp_path / "m.csv").write_bytes(b"\xef\xbb\xbfid,encoding\na,1 2 7 3\n")
    assert cli.main(["rle", "decode", str(tmp_path / "m.csv"), "--shape", "3", "4", "--out", str(tmp_path / "o")]) == 0
    assert np.array_equal(np.asarray(Image.open(tmp_path / "o" / "a.png")) > 0, decode("1 2 7 3", (3, 4)) > 0)


def test_rgb_masks_warn_and_jpeg_masks_are_refused_by_name(tmp_path, capsys):
    """An RGB mask is read as grey with a warning naming it (nonzero stays foreground); a JPEG mask is refused by
    name (lossy: a 0/255 mask saved as JPEG comes back with other values around its edges); the rest is encoded."""
    mask = np.zeros((20, 30), np.uint8)
    mask[5:15, 8:20] = 255
    Image.fromarray(np.stack([mask, np.zeros_like(mask), np.zeros_like(mask)], axis=-1)).save(tmp_path / "red.png")
    Image.fromarray(mask).save(tmp_path / "lossy.jpg", quality=90)
    assert len(np.unique(np.asarray(Image.open(tmp_path / "lossy.jpg")))) > 2  # why it is refused
    assert cli.main(["rle", "encode", str(tmp_path / "red.png"), str(tmp_path / "lossy.jpg"),
                     "--out", str(tmp_path / "m.csv")]) == 1
    err = capsys.readouterr().err
    assert f"WARNING {tmp_path / 'red.png'}: mode RGB converted to grey" in err
    assert f"ERROR {tmp_path / 'lossy.jpg'}: a JPEG mask is lossy" in err and "Traceback" not in err
    assert (tmp_path / "m.csv").read_text().splitlines() == ["id,encoding", f"red,{reference_encode(mask)}"]
