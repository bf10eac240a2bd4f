"""``stas tile``'s work: plan the tiles of every slide and write the datalist of tiles and the tissue overlays.

Slides with a mask go to ``training`` with a fold per slide (or per ``--groups`` group), slides without one to
``test``; each entry is a tile entry of ``tiling.py`` (its slide, window, tissue share and mask share). The
datalist declares the slide task (label kind ``mask``) and records the settings under ``tiles`` (``scale``, or
with ``TileSpec.mpp`` the target ``mpp``, each entry then carrying its slide's own scale), which ``stas predict``
takes as its defaults.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from stas_pipeline.core.datalist import DatalistError, write_datalist
from stas_pipeline.core.errors import StasError
from stas_pipeline.core.fileio import OutputExistsError, atomic_folder, write_png
from stas_pipeline.core.problems import Problems
from stas_pipeline.core.splits import assign_folds, read_group_csv
from stas_pipeline.tasks.slide.reader import Slide, SlideError
from stas_pipeline.tasks.slide.rle import file_id
from stas_pipeline.tasks.slide.tiling import (
    MaskError,
    SlidePlan,
    TileSpec,
    TissueSettings,
    mask_sources,
    open_mask,
    plan_tiles,
    polygon_repairs,
)

STAGE = "tile"


class TileError(StasError, ValueError):
    """Settings or input files that stop the whole tiling run (a bad tile size, an unreadable file)."""


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


def _plan(path: Path, source: tuple[Path, str | None] | None, spec: TileSpec,
          tissue: TissueSettings) -> tuple[SlidePlan, list[str]]:
    """The slide's plan, and the invalid polygons of its mask that were repaired."""
    mask = None
    if source is not None:
        with Slide(path) as slide:
            mask = open_mask(source[0], source[1], slide.level_shape(0))
    return plan_tiles(path, spec, tissue, mask), polygon_repairs(mask) if mask is not None else []


def tile_slides(slides: list[Path], out: Path, masks: Path | None, spec: TileSpec, tissue: TissueSettings,
                folds: int, groups: Path | None, seed: int, overwrite: bool = False,
                refuse_invalid: bool = False) -> Problems:
    """Plan every slide's tiles and write ``out/datalist.json`` and ``out/tissue/`` (both only when done). A mask
    source that cannot be used is reported under its own name; invalid polygons are repaired and counted, or with
    ``refuse_invalid`` leave their slide out."""
    problems = Problems(STAGE, done=("slides",))
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
                plan, repairs = _plan(path, source, spec, tissue)
            except MaskError as err:
                problems.skip(err.source, f"{err.reason}; slide {path.name} left out")
                continue
            except (SlideError, ValueError, OSError) as err:
                problems.skip(path, str(err).removeprefix(f"{path}: "))
                continue
            if repairs:
                what = f"{len(repairs)} invalid polygon(s), first {repairs[0]}"
                if refuse_invalid:
                    problems.skip(source[0], f"{what}; slide {path.name} left out (--refuse-invalid-polygons)")
                    continue
                problems.warn(source[0], f"{what}; repaired with shapely's make_valid")
                problems.count("polygons repaired", len(repairs))
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
        resolution = {"scale": spec.scale} if spec.mpp is None else {"mpp": spec.mpp}
        settings = {"size": spec.size, "stride": spec.stride, **resolution, "quarter_shift": spec.quarter_shift,
                    **vars(tissue)}
        write_datalist(datalist_path, {"tiles": settings, "training": training, "test": test}, "slide", "mask",
                       overwrite=overwrite)
    return problems
