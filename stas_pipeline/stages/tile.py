"""Whole slides -> a datalist of tiles over tissue, for the shared cache and the segmentation bundles.

``stas tile SLIDE_OR_FOLDER... --masks SOURCE --out DIR`` finds the tissue on a thumbnail of each slide, lays
overlapping windows over it (``--size`` level-0 pixels, ``--stride`` apart, optionally quarter-shifted), keeps
the windows with at least ``--min-tissue`` tissue (glass, black borders and pen-free background drop out), and
writes ``DIR/datalist.json``: slides with a mask go to ``training`` with a fold per slide (or per ``--groups``
patient), slides without one to ``test``; each entry carries its slide, window, tissue share and mask share (see
``tasks/slide/tiling.py``). ``DIR/tissue/<id>.png`` shows each thumbnail with its tissue and kept tiles.
Then ``stas build-lmdb --datalist DIR/datalist.json --bundle deeplab_lite0 --image-size SIZE/SCALE`` caches the
tiles (read window by window: memory stays bounded whatever the slide's size).

Masks (``--masks``): an RLE CSV (``id,encoding``, ids = slide file names without suffix), or a folder of
``<id>.tif``/``<id>.png`` mask images of the slide's size or ``<id>.json``/``<id>.geojson`` polygons (GeoJSON
features, LabelMe). A slide that cannot be read, or whose mask does not fit it, is reported and left out.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

from stas_pipeline.core.cli_types import int_at_least, open_fraction
from stas_pipeline.core.datalist import DatalistError
from stas_pipeline.core.fileio import OutputExistsError, atomic_folder, write_png
from stas_pipeline.core.problems import Problems
from stas_pipeline.stages.make_datalist import assign_folds, read_group_csv, write_datalist
from stas_pipeline.tasks.slide.reader import SLIDE_SUFFIXES, Slide, SlideError
from stas_pipeline.tasks.slide.rle import file_id, read_rle_csv
from stas_pipeline.tasks.slide.tiling import SlidePlan, TileSpec, TissueSettings, open_mask, plan_tiles
from stas_pipeline.tasks.slide.tissue import TISSUE_METHODS

STAGE = "tile"
MASK_SUFFIXES = (".tif", ".tiff", ".png", ".json", ".geojson")


def find_slides(paths: list[Path], problems: Problems) -> list[Path]:
    """Slide files given directly or found in folders (by suffix), sorted, each id once."""
    found = []
    for path in paths:
        if path.is_dir():
            found += sorted(p for p in path.iterdir() if p.name.lower().endswith(SLIDE_SUFFIXES))
        elif path.exists():
            found.append(path)
        else:
            problems.skip(path, "no such file or folder")
    seen: dict[str, Path] = {}
    for path in found:
        if file_id(path) in seen:
            problems.skip(path, f"same id {file_id(path)!r} as {seen[file_id(path)]}")
        else:
            seen[file_id(path)] = path
    return list(seen.values())


def mask_sources(masks: Path | None) -> dict[str, tuple[Path, str | None]]:
    """Slide id -> (mask file, RLE row id or None)."""
    if masks is None:
        return {}
    if masks.is_dir():
        return {file_id(p): (p, None) for p in sorted(masks.iterdir()) if p.name.lower().endswith(MASK_SUFFIXES)}
    return {ident: (masks, ident) for ident, _ in read_rle_csv(masks)}


def overlay(plan: SlidePlan) -> np.ndarray:
    """The thumbnail with its tissue tinted green and the kept tiles outlined in blue."""
    out = plan.thumbnail[..., :3].astype(np.float32)
    out[plan.tissue] = 0.6 * out[plan.tissue] + 0.4 * np.array([0, 200, 0])
    out = out.astype(np.uint8)
    rows, cols = out.shape[:2]
    for t in plan.tiles:
        y0, x0 = min(int(t["tile"]["y"] / plan.downsample), rows - 1), min(int(t["tile"]["x"] / plan.downsample),
                                                                            cols - 1)
        y1 = min(int((t["tile"]["y"] + t["tile"]["size"]) / plan.downsample), rows) - 1
        x1 = min(int((t["tile"]["x"] + t["tile"]["size"]) / plan.downsample), cols) - 1
        out[[y0, y1], x0:x1 + 1] = out[y0:y1 + 1, [x0, x1]] = (0, 0, 255)
    return out


def _plan(path: Path, source: tuple[Path, str | None] | None, spec: TileSpec, tissue: TissueSettings) -> SlidePlan:
    mask = None
    if source is not None:
        with Slide(path) as slide:
            mask = open_mask(source[0], source[1], slide.level_shape(0))
    return plan_tiles(path, spec, tissue, mask)


def tile_slides(slides: list[Path], out: Path, masks: Path | None, spec: TileSpec, tissue: TissueSettings,
                folds: int, groups: Path | None, seed: int, overwrite: bool = False) -> Problems:
    """Plan every slide's tiles and write ``out/datalist.json`` and ``out/tissue/`` (both only when done)."""
    problems = Problems(STAGE)
    datalist_path = out / "datalist.json"
    if datalist_path.exists() and not overwrite:
        raise OutputExistsError(datalist_path)
    sources = mask_sources(masks)
    table = read_group_csv(groups) if groups else {}
    out.mkdir(parents=True, exist_ok=True)
    base = out.resolve()
    training, test = [], []
    with atomic_folder(out / "tissue", overwrite=True) as overlays:
        for path in slides:
            ident, source = file_id(path), sources.get(file_id(path))
            try:
                plan = _plan(path, source, spec, tissue)
            except (SlideError, ValueError, OSError) as err:
                problems.skip(path, str(err).removeprefix(f"{path}: "))
                continue
            write_png(overlays / f"{ident}.png", overlay(plan))
            if not plan.tiles:
                problems.skip(path, f"no tile has {tissue.min_tissue:g} tissue (tissue on {plan.tissue.mean():.1%} "
                                    "of the thumbnail); lower --min-tissue or --tissue-threshold")
                continue
            common = {"image": os.path.relpath(path.resolve(), base), "group": table.get(ident, ident)}
            if source is not None:
                common["label"] = os.path.relpath(source[0].resolve(), base)
                common |= {"label_id": source[1]} if source[1] else {}
            (training if source is not None else test).extend({**common, **t} for t in plan.tiles)
            problems.count("slides")
            problems.count("tiles", len(plan.tiles))
        if not training and not test:
            raise DatalistError("no slide could be tiled; nothing written")
        slide_groups = sorted({e["group"] for e in training})
        if training and len(slide_groups) < folds:
            raise DatalistError(f"{folds} folds need {folds} slides (or --groups groups) with masks; "
                                f"{len(slide_groups)} could be tiled")
        if training:
            fold_of = dict(zip(slide_groups, assign_folds([0] * len(slide_groups), folds, seed), strict=True))
            for entry in training:
                entry["fold"] = fold_of[entry["group"]]
        settings = {"size": spec.size, "stride": spec.stride, "scale": spec.scale,
                    "quarter_shift": spec.quarter_shift, **vars(tissue)}
        write_datalist(datalist_path, {"tiles": settings, "training": training, "test": test}, overwrite=overwrite)
    return problems


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("slides", nargs="+", type=Path, help="slide files (TIFF, OME-TIFF, SVS) or folders of them")
    parser.add_argument("--out", type=Path, required=True, help="folder for datalist.json and tissue/ overlays")
    parser.add_argument("--masks", type=Path, help="RLE CSV (id,encoding) or folder of <id> mask images/polygons; "
                                                   "slides without a mask go to the test list")
    parser.add_argument("--size", type=int_at_least(16), default=1024, help="tile side in level-0 pixels (1024)")
    parser.add_argument("--stride", type=int_at_least(1), default=512, help="step between tiles (512)")
    parser.add_argument("--scale", type=int_at_least(1), default=4,
                        help="downscaling: tiles are cached SIZE/SCALE pixels across (4)")
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
    parser.add_argument("--overwrite", action="store_true", help="replace an existing datalist.json")
    return parser


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """Run the stage; 0 when every slide was tiled, 1 when any was skipped, 2 for unusable input."""
    args = build_parser(prog).parse_args(argv)
    problems = Problems(STAGE)
    slides = find_slides(args.slides, problems)
    try:
        spec = TileSpec(args.size, args.stride, args.scale, args.quarter_shift)
        tissue = TissueSettings(args.tissue_method, args.tissue_threshold, args.thumbnail, args.min_tissue)
        done = tile_slides(slides, args.out, args.masks, spec, tissue, args.folds, args.groups, args.seed,
                           args.overwrite)
    except (DatalistError, OutputExistsError, ValueError, OSError) as err:
        print(f"ERROR {err}", file=sys.stderr)
        return 2
    done.skipped = problems.skipped + done.skipped
    return done.finish()


if __name__ == "__main__":
    sys.exit(main())
