"""Whole slides -> a datalist of tiles over tissue, for the shared cache and the segmentation bundles.

``stas tile SLIDE_OR_FOLDER... --masks SOURCE --out DIR`` finds the tissue on a thumbnail of each slide, lays
overlapping windows over it (``--size`` level-0 pixels, ``--stride`` apart, optionally quarter-shifted), keeps
the windows with at least ``--min-tissue`` tissue (glass, black borders and pen-free background drop out), and
writes ``DIR/datalist.json``: slides with a mask go to ``training`` with a fold per slide (or per ``--groups``
patient), slides without one to ``test``; each entry carries its slide, window, tissue share and mask share (see
``tasks/slide/tiling.py``). ``DIR/tissue/<id>.png`` shows each thumbnail with its tissue and kept tiles.
Then ``stas build-lmdb --datalist DIR/datalist.json --bundle deeplab_lite0 --image-size SIZE/SCALE`` caches the
tiles (read window by window: memory stays bounded whatever the slide's size).

``--mpp M`` (instead of ``--scale``) cuts the tiles at M microns per pixel whatever each slide was scanned at:
``--size`` and ``--stride`` are then pixels at M (cache with ``--image-size SIZE``), and each slide's level and
resampling are chosen from the pixel size in its metadata (TIFF resolution, Aperio MPP, OME PhysicalSizeX,
OpenSlide mpp-x): the integer ``--scale`` averaging when M is within 1 % of a whole multiple of it, else a resize
by area from the coarsest level at least as fine as M. A slide without a pixel size, or scanned coarser than M,
is named and left out. Slides are TIFF, OME-TIFF and SVS (tifffile), or NDPI, MRXS, SCN, BIF and the other
formats OpenSlide reads, with ``pip install 'stas_pipeline[openslide]'``.

Masks (``--masks``): an RLE CSV (``id,encoding``, ids = slide file names without suffix), or a folder of
``<id>.tif``/``<id>.png`` mask images of the slide's size or ``<id>.json``/``<id>.geojson`` polygons (GeoJSON
features, LabelMe). A slide that cannot be read is reported and left out; so is one whose mask does not fit it
(a mask image of another size, a LabelMe file whose imageWidth/imageHeight are not the slide's level-0 size, a
polygon file that is not JSON, a bad RLE row), reported under the mask's own name. Invalid polygons (e.g.
self-intersecting) are repaired with shapely's ``make_valid`` and counted in the summary, with a warning naming
the file (``--refuse-invalid-polygons``: their slide is left out instead).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from stas_pipeline.cli import command
from stas_pipeline.core.cli_types import int_at_least, open_fraction, positive_float
from stas_pipeline.core.errors import refused
from stas_pipeline.core.problems import Problems
from stas_pipeline.tasks.slide.task import TISSUE_METHODS
from stas_pipeline.tasks.slide.tile_command import STAGE, TileError, tile_slides
from stas_pipeline.tasks.slide.tiling import TileSpec, TissueSettings, find_slides


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("slides", nargs="+", type=Path,
                        help="slide files (TIFF, OME-TIFF, SVS; with OpenSlide also NDPI, MRXS, SCN, BIF, ...) or "
                             "folders of them")
    parser.add_argument("--out", type=Path, required=True, help="folder for datalist.json and tissue/ overlays")
    parser.add_argument("--masks", type=Path, help="RLE CSV (id,encoding) or folder of <id> mask images/polygons; "
                                                   "slides without a mask go to the test list")
    parser.add_argument("--size", type=int_at_least(16), default=1024,
                        help="tile side in level-0 pixels (1024; with --mpp in pixels at that resolution)")
    parser.add_argument("--stride", type=int_at_least(1), default=512, help="step between tiles (512)")
    resolution = parser.add_mutually_exclusive_group()
    resolution.add_argument("--scale", type=int_at_least(1), default=4,
                            help="downscaling: tiles are cached SIZE/SCALE pixels across (4)")
    resolution.add_argument("--mpp", type=positive_float,
                            help="tiles at this many microns per pixel, each slide resampled from its own pixel "
                                 "size (e.g. 0.5); a slide without one is left out")
    parser.add_argument("--quarter-shift", action="store_true",
                        help="also the grid shifted by a quarter tile both ways (the recipe's extra tiles)")
    parser.add_argument("--tissue-method", choices=TISSUE_METHODS, default="saturation",
                        help="saturation threshold (default) or Otsu (MONAI's ForegroundMask)")
    parser.add_argument("--tissue-threshold", type=open_fraction, default=0.1,
                        help="saturation (0..1) above which a thumbnail pixel is tissue (0.1)")
    parser.add_argument("--min-tissue", type=float, default=0.05, help="least tissue share of a kept tile (0.05)")
    parser.add_argument("--thumbnail", type=int_at_least(64), default=2048,
                        help="longer side of the thumbnail tissue is found on (2048)")
    parser.add_argument("--folds", type=int_at_least(2), default=5, help="folds, grouped by slide (5)")
    parser.add_argument("--groups", type=Path, help="CSV with columns image (slide id) and group (e.g. patient): "
                                                   "slides of a group share a fold")
    parser.add_argument("--seed", type=int, default=0, help="seed of the fold assignment (0)")
    parser.add_argument("--refuse-invalid-polygons", action="store_true",
                        help="leave out a slide whose polygon mask has an invalid (e.g. self-intersecting) polygon, "
                             "instead of repairing it with shapely's make_valid")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing datalist.json")
    return parser


@command
def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """Run the stage; 0 when every slide was tiled, 1 when any was skipped, 2 for unusable input."""
    args = build_parser(prog).parse_args(argv)
    problems = Problems(STAGE)
    slides = find_slides(args.slides, problems)
    with refused(as_error=TileError):  # a bad setting or an unreadable file: the input's fault, exit 2
        spec = TileSpec(args.size, args.stride, 1 if args.mpp else args.scale, args.quarter_shift, args.mpp)
        tissue = TissueSettings(args.tissue_method, args.tissue_threshold, args.thumbnail, args.min_tissue)
        done = tile_slides(slides, args.out, args.masks, spec, tissue, args.folds, args.groups, args.seed,
                           args.overwrite, args.refuse_invalid_polygons)
    done.skipped = problems.skipped + done.skipped
    return done.finish()


if __name__ == "__main__":
    sys.exit(main())
