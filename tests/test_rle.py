"""Kaggle RLE (column-major, 1-indexed): against the plain reference encoder, streamed by column strips, decoded
into C- and Fortran-ordered arrays and memory maps, and bad strings named."""

from __future__ import annotations

import numpy as np
import pytest

from stas_pipeline.tasks.slide.rle import RLEError, decode, decode_into, encode, encode_strips, parse


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
