"""Whole-slide inference: overlapping windows over tissue at the training scale, stitched in bands, written to
disk as the probability map, the mask, an overlay and the RLE, never holding a slide-sized array in memory.

For each slide: the tissue of a thumbnail (``tissue.py``) picks the windows of a grid (``TileSpec``: windows of
``size`` level-0 pixels, ``stride`` apart, read ``scale`` times smaller, as ``stas tile`` cut the training tiles;
by mpp, each slide at its own scale, :meth:`TileSpec.at`);
each window goes through every run's chain as the cache and validation gave it (the chain after loading,
uint8 rounding, the val transforms), each run with flip TTA; runs (models x folds) are averaged (optionally a
run's auxiliary "has foreground" head first skips the decoder on windows it calls empty). Windows are
stitched with Gaussian weights (MONAI's importance map) or centre weights (a window counts only in its central
``stride`` square, where a neighbour exists to cover its rim), one band of window rows at a time, into:

- ``<id>_prob.npy``: the probability map at the prediction scale, uint8 (p x 255), a memory-mapped ``.npy``;
- ``<id>.tif``: the binary mask at level 0 (p > threshold, each scaled pixel repeated), a tiled pyramidal TIFF;
- ``<id>_overlay.png``: a thumbnail with the mask's outline;
- a row ``id,encoding`` of ``predictions.csv`` (level-0 RLE, Kaggle's convention), written by column strips;
- with ``geojson``, ``<id>.geojson``: the mask's objects as QuPath GeoJSON, traced on the scaled map band by band
  with vertices times the scale (clipped to the slide), so the polygons are exactly the level-0 ``<id>.tif``.

Multi-scale ensembles: each run is predicted at the windows it was trained on (the ``tiles`` its record names,
:func:`run_specs`); runs of different windows form groups, each planned over tissue and stitched at its own
scale into its own map (the coarser ones as ``.npy`` memmaps beside the output until merged), and the maps are
merged on the finest group's grid (:func:`merge_maps`: each coarse pixel repeated over the ``scale_ratio`` fine
pixels it covers, a non-integer ratio by pixel centres; every run weighted equally, a group of k runs k times),
band by band; the files above come from the merged map at the finest scale.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from monai.data import MetaTensor
from monai.data.utils import compute_importance_map
from PIL import Image
from scipy import ndimage
from tqdm import tqdm

from stas_pipeline.core.datalist import read_datalist, test_images
from stas_pipeline.core.errors import NothingWrittenError
from stas_pipeline.core.fileio import write_png
from stas_pipeline.core.geojson import BandReader, GeoJSONStyle, band_features, style_of, write_geojson
from stas_pipeline.core.lmdb_cache import describe, image_size_pair, to_uint8
from stas_pipeline.core.problems import Problems
from stas_pipeline.core.run_recorder import with_tiling
from stas_pipeline.core.sharding import Journal, output_folder
from stas_pipeline.core.trained_runs import PredictError
from stas_pipeline.tasks.base import Predictor
from stas_pipeline.tasks.segmentation.inference import SegmentationRun, load_run_model, out_of_fold, view_tta
from stas_pipeline.tasks.slide.reader import Slide, SlideError, write_slide
from stas_pipeline.tasks.slide.rle import encode_strips, file_id, write_rle_csv
from stas_pipeline.tasks.slide.task import STITCH_MODES
from stas_pipeline.tasks.slide.tiling import (
    TileSpec,
    TissueSettings,
    find_slides,
    plan_tiles,
    read_tile_image,
    window_spec,
)
from stas_pipeline.tasks.slide.tissue import thumbnail

RLE_STRIP = 1024  # level-0 columns per RLE strip
MERGE_ROWS = 256  # rows of the finest map merged with the coarser maps at a time



@dataclass
class SlideSettings:
    """How slides are predicted: windows, tissue, stitching, TTA, threshold, batch."""

    spec: TileSpec
    tissue: TissueSettings
    stitch: str = "gaussian"
    tta: str = "hv"
    threshold: float = 0.5
    batch_size: int = 8
    skip_empty: float | None = None  # skip the decoder where the auxiliary head's presence is below this
    geojson: GeoJSONStyle | None = None  # also write the mask as QuPath GeoJSON in this style


def window_weights(out: int, stride: int, mode: str) -> np.ndarray:
    """(out, out) stitching weights of one window (``stride`` in window pixels)."""
    if mode == "gaussian":
        return compute_importance_map((out, out), mode="gaussian", sigma_scale=0.125).numpy()
    if mode != "centre":
        raise ValueError(f"unknown stitching {mode!r}; known: {', '.join(STITCH_MODES)}")
    w = np.full((out, out), 1e-3, np.float32)  # the rim still counts where no neighbour covers it
    m = max(0, (out - stride) // 2)
    w[m:out - m, m:out - m] = 1.0
    return w


class _WindowInputs:
    """A window (out, out, C) uint8 as each distinct chain of the runs makes it a model input (C, H, W)."""

    def __init__(self, runs: Sequence[SegmentationRun]):
        keys = [json.dumps([describe(r.preprocessing.transforms[1:]), describe(r.transform)], default=str)
                for r in runs]
        distinct = list(dict.fromkeys(keys))  # the folds of one bundle share their chain: made once per window
        self.chains = [runs[keys.index(k)] for k in distinct]
        self.index = [distinct.index(k) for k in keys]  # run -> its chain

    def __call__(self, window: np.ndarray) -> list[torch.Tensor]:
        inputs = []
        for run in self.chains:
            data = run.preprocessing.after_load({"image": MetaTensor(window, meta={"original_channel_dim": -1})})
            image = torch.from_numpy(to_uint8(data["image"]))
            inputs.append(torch.as_tensor(run.transform({"image": image})["image"]).float())
        return [inputs[k] for k in self.index]


@torch.no_grad()
def _window_probabilities(runs: Sequence[SegmentationRun], prepare: _WindowInputs, windows: list[np.ndarray],
                          tta: str, out: int, skip_empty: float | None = None) -> tuple[np.ndarray, int]:
    """Mean probabilities (n, out, out) of ``runs`` on ``windows``, and how many window passes skipped the decoder.
    With ``skip_empty``, a run's auxiliary head scores each window first (encoder only) and the windows it gives
    a presence below ``skip_empty`` get probability 0 from that run without the decoder and TTA."""
    device = next(runs[0].model.parameters()).device
    prepared = [prepare(w) for w in windows]
    total = torch.zeros((len(windows), 1, out, out), device=device)
    skipped = 0
    for k, run in enumerate(runs):
        x = torch.stack([p[k] for p in prepared]).to(device)
        keep = torch.ones(len(windows), dtype=torch.bool, device=device)
        if skip_empty is not None:
            keep = run.model.presence(x) >= skip_empty
            skipped += int((~keep).sum())
        if not keep.any():
            continue
        p = view_tta(run.model, x[keep], tta).float()
        total[keep] += p if p.shape[-1] == out else F.interpolate(p, size=(out, out), mode="bilinear",
                                                                  align_corners=False)
    return (total / len(runs))[:, 0].cpu().numpy(), skipped


def _rows_of_windows(tiles: list[dict]) -> Iterator[tuple[int, list[dict]]]:
    """The kept windows grouped by their top row (level 0), top to bottom."""
    by_row: dict[int, list[dict]] = {}
    for t in tiles:
        by_row.setdefault(t["tile"]["y"], []).append(t)
    yield from sorted(by_row.items())


def stitch_probabilities(slide: Slide, tiles: list[dict], runs: Sequence[SegmentationRun], settings: SlideSettings,
                         out: np.ndarray, progress: bool = True) -> tuple[int, int]:
    """Fill ``out`` (the scaled map, uint8, e.g. a memmap; zeros where no window reaches) from the windows
    ``tiles``, one band of window rows at a time; returns the windows predicted and the window passes (run x
    window) whose decoder ``settings.skip_empty`` skipped."""
    spec = settings.spec
    size, stride = spec.out, max(1, spec.scaled(spec.stride))
    weights = window_weights(size, stride, settings.stitch)
    rows, cols = out.shape
    band_rows = size + stride
    band_sum = np.zeros((band_rows, cols + size), np.float32)
    band_w = np.zeros_like(band_sum)
    band_top = 0  # the scaled row that band row 0 stands for
    prepare = _WindowInputs(runs)
    done = passes_skipped = 0

    def flush(until: int) -> None:  # scaled rows [band_top, until) are final: out, then the band moves down
        nonlocal band_top
        n = min(max(0, min(until, rows) - band_top), band_rows)
        if n:
            s, w = band_sum[:n, :cols], band_w[:n, :cols]
            out[band_top:band_top + n] = np.where(w > 0, np.rint(255 * s / np.maximum(w, 1e-12)), 0).astype(np.uint8)
        shift = min(max(0, until - band_top), band_rows)
        if shift:
            for band in (band_sum, band_w):
                band[:band_rows - shift] = band[shift:].copy()
                band[band_rows - shift:] = 0
        band_top = until

    for y, row in tqdm(list(_rows_of_windows(tiles)), desc=f"windows {slide.path.name}", unit="row",
                       disable=not progress):
        top = spec.scaled(y)
        flush(top)
        for start in range(0, len(row), settings.batch_size):
            batch = row[start:start + settings.batch_size]
            images = [read_tile_image(slide, t["tile"]["y"], t["tile"]["x"], spec) for t in batch]
            probs, skipped = _window_probabilities(runs, prepare, images, settings.tta, size, settings.skip_empty)
            passes_skipped += skipped
            for t, p in zip(batch, probs, strict=True):
                left, r = spec.scaled(t["tile"]["x"]), top - band_top
                band_sum[r:r + size, left:left + size] += p * weights
                band_w[r:r + size, left:left + size] += weights
            done += len(batch)
    flush(rows + size + stride)
    return done, passes_skipped


def upsampled(prob: np.ndarray, scale: int | float, y: int, x: int, h: int, w: int) -> np.ndarray:
    """The level-0 window (h, w) of the scaled map ``prob``, each scaled pixel repeated (a float scale: each
    level-0 pixel the map pixel its centre falls in, as the GeoJSON is drawn); 0 beyond the map."""
    if not isinstance(scale, int):
        rows = ((np.arange(y, y + h) + 0.5) / scale).astype(int)
        cols = ((np.arange(x, x + w) + 0.5) / scale).astype(int)
        full, inside_rows, inside_cols = np.zeros((h, w), prob.dtype), rows < prob.shape[0], cols < prob.shape[1]
        if inside_rows.any() and inside_cols.any():
            rows, cols = rows[inside_rows], cols[inside_cols]
            part = np.asarray(prob[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1])
            full[np.ix_(inside_rows, inside_cols)] = part[np.ix_(rows - rows[0], cols - cols[0])]
        return full
    y0, x0 = y // scale, x // scale
    part = prob[y0:(y + h - 1) // scale + 1, x0:(x + w - 1) // scale + 1]
    up = np.repeat(np.repeat(part, scale, axis=0), scale, axis=1)[y - y0 * scale:, x - x0 * scale:][:h, :w]
    if up.shape == (h, w):
        return up
    full = np.zeros((h, w), prob.dtype)
    full[:up.shape[0], :up.shape[1]] = up
    return full


def _mask_source(prob: np.ndarray, scale: int | float, cut: int) -> Callable[[int, int, int, int], np.ndarray]:
    """Level-0 windows (h, w, 1) of ``prob > cut`` as 0/255."""
    def window(y: int, x: int, h: int, w: int) -> np.ndarray:
        return ((upsampled(prob, scale, y, x, h, w) > cut) * np.uint8(255))[..., None]
    return window


def _mask_bands(prob: np.ndarray, cut: int) -> BandReader:
    """Rows y0:y1 of the scaled mask ``prob > cut`` and their probabilities (a band source of the GeoJSON)."""
    def read(y0: int, y1: int) -> tuple[np.ndarray, np.ndarray]:
        band = np.asarray(prob[y0:y1])
        return band > cut, band / 255.0
    return read


def slide_rle(prob: np.ndarray, shape: tuple[int, int], scale: int | float, cut: int) -> str:
    """The level-0 RLE of ``prob > cut`` (``shape`` = level-0 height, width), by column strips."""
    height, width = shape
    source = _mask_source(prob, scale, cut)
    strips = (source(0, x, height, min(RLE_STRIP, width - x))[..., 0] for x in range(0, width, RLE_STRIP))
    return encode_strips(strips, height)


def overlay_png(slide: Slide, prob: np.ndarray, cut: int, max_side: int = 1024) -> np.ndarray:
    """A thumbnail of the slide with the predicted mask's outline in green."""
    thumb, _ = thumbnail(slide, max_side)
    rgb = thumb[..., :3] if thumb.shape[-1] >= 3 else np.repeat(thumb, 3, axis=-1)
    small = np.asarray(Image.fromarray(((prob > cut) * 255).astype(np.uint8)).resize(
        (rgb.shape[1], rgb.shape[0]), Image.NEAREST)) > 0
    edge = small & ~ndimage.binary_erosion(small)
    out = rgb.copy()
    out[ndimage.binary_dilation(edge)] = (0, 255, 0)
    return out


def scale_ratio(coarse: int | float, fine: int | float) -> int | float:
    """How many pixels of a map at scale ``fine`` one pixel of a map at scale ``coarse`` covers along each side:
    an integer when it is one (the coarse pixel repeated), else a float (:func:`upsampled`: nearest by centre)."""
    ratio = coarse / fine
    return round(ratio) if abs(ratio - round(ratio)) < 1e-6 else ratio


def merge_maps(fine: np.ndarray, runs: int, coarser: Sequence[tuple[np.ndarray, int | float, int]]) -> None:
    """Average into ``fine`` (a uint8 map, the mean of ``runs`` runs; e.g. a memmap) the ``coarser`` maps, each
    ``(map, ratio, runs)`` brought to ``fine``'s grid by :func:`upsampled` at ``ratio`` (:func:`scale_ratio`),
    every run weighted equally; :data:`MERGE_ROWS` rows of ``fine`` at a time."""
    total = runs + sum(k for *_, k in coarser)
    rows, cols = fine.shape
    for y in range(0, rows, MERGE_ROWS):
        n = min(MERGE_ROWS, rows - y)
        band = runs * fine[y:y + n].astype(np.float32)
        for prob, ratio, k in coarser:
            band += k * upsampled(prob, ratio, y, 0, n, cols).astype(np.float32)
        fine[y:y + n] = np.rint(band / total).astype(np.uint8)


def _scale_groups(runs: Sequence[SegmentationRun], specs: Sequence[TileSpec]) -> dict[TileSpec, list]:
    """The runs grouped by their windows, in the order first given."""
    groups: dict[TileSpec, list] = {}
    for run, spec in zip(runs, specs, strict=True):
        groups.setdefault(spec, []).append(run)
    return groups


def predict_slide(path: str | Path, runs: Sequence[SegmentationRun], settings: SlideSettings, out_dir: Path,
                  ident: str, progress: bool = True, specs: Sequence[TileSpec] | None = None) -> tuple[str, int, int]:
    """Predict one slide into ``out_dir`` (see the module doc); returns its RLE string, the windows predicted and
    the window passes whose decoder was skipped. ``specs``: each run's windows (default ``settings.spec``); runs
    of different windows are grouped by them, each group planned and stitched at its own scale, and the maps
    merged on the finest group's grid (:func:`merge_maps`), which the written files then come from."""
    groups = _scale_groups(runs, specs or [settings.spec] * len(runs))
    plans = sorted(((plan_tiles(path, spec, settings.tissue), members) for spec, members in groups.items()),
                   key=lambda planned: planned[0].spec.scale)  # the slide's own scales (by mpp); finest first
    spec = plans[0][0].spec
    cut = int(np.floor(255 * settings.threshold))
    windows = skipped = 0
    scales = tempfile.TemporaryDirectory(dir=out_dir, prefix=f".{ident}_scales") if len(plans) > 1 else nullcontext()
    with Slide(path) as slide, scales as folder:  # the coarser groups' maps, until merged
        height, width = slide.level_shape(0)
        shape = spec.scaled_shape(height, width)
        prob = np.lib.format.open_memmap(out_dir / f"{ident}_prob.npy", mode="w+", dtype=np.uint8, shape=shape)
        coarser = []
        for k, (plan, members) in enumerate(plans):
            scaled_shape = plan.spec.scaled_shape(height, width)
            target = prob if k == 0 else np.lib.format.open_memmap(
                Path(folder, f"{k}.npy"), mode="w+", dtype=np.uint8, shape=scaled_shape)
            done, passes = stitch_probabilities(slide, plan.tiles, members, replace(settings, spec=plan.spec), target,
                                                progress)
            windows, skipped = windows + done, skipped + passes
            if k:
                coarser.append((target, scale_ratio(plan.spec.scale, spec.scale), len(members)))
        if coarser:
            merge_maps(prob, len(plans[0][1]), coarser)
        prob.flush()
        write_slide(out_dir / f"{ident}.tif", _mask_source(prob, spec.scale, cut), height, width, channels=1,
                    levels=3, metadata={"scale": spec.scale}, mpp=slide.mpp)  # the map's scale: evaluate reads it
        write_png(out_dir / f"{ident}_overlay.png", overlay_png(slide, prob, cut))
        if settings.geojson is not None:
            write_geojson(out_dir / f"{ident}.geojson", band_features(
                _mask_bands(prob, cut), shape[0], settings.geojson, width=shape[1], scale=spec.scale,
                shape=(height, width)))
        rle = slide_rle(prob, (height, width), spec.scale, cut)
        del prob
    return rle, windows, skipped


def predict_slides(runs: Sequence[SegmentationRun], slides: Sequence[Path], out: str | Path,
                   settings: SlideSettings, assignments: dict[Path, list[int]] | None = None,
                   overwrite: bool = False, progress: bool = True, journal: Journal | None = None,
                   specs: Sequence[TileSpec] | None = None) -> Problems:
    """Predict ``slides`` into the folder ``out`` (per slide the files of the module doc, and ``predictions.csv``
    with every slide's RLE), written only when complete; ``specs``: each run's windows (:func:`predict_slide`).
    With ``assignments`` a slide is predicted by the runs of those indices only (out-of-fold). A slide that
    cannot be read is reported and skipped. With a ``journal`` (a part of a sharded run) each slide's files move
    into ``out`` once all written, its RLE row goes to the journal, and no ``predictions.csv`` is written."""
    problems = Problems("predict")
    rows = []
    if journal is not None:
        journal.start(["id", "encoding"])
    with output_folder(out, overwrite, journal) as dest:
        for path in slides:
            chosen = assignments[path] if assignments is not None else range(len(runs))
            try:
                with journal.staged(dest) if journal is not None else nullcontext(dest) as folder:
                    rle, windows, skipped = predict_slide(path, [runs[k] for k in chosen], settings, folder,
                                                          file_id(path), progress,
                                                          [specs[k] for k in chosen] if specs else None)
            except (SlideError, ValueError, OSError) as err:
                problems.skip(path, str(err).removeprefix(f"{path}: "))
                continue
            rows.append((file_id(path), rle))
            if journal is not None:
                journal.record(path, rows[-1])
            problems.count("slides")
            problems.count("windows", windows)
            if settings.skip_empty is not None:
                problems.count("decoder passes skipped", skipped)
        if journal is not None:
            return problems
        if not rows:
            raise NothingWrittenError(f"{out}: every slide was skipped; nothing written")
        write_rle_csv(rows, dest / "predictions.csv")
    return problems


def _tiling(spec: TileSpec) -> str:
    resolution = f"{spec.mpp:g} um/px" if spec.mpp else f"scale {spec.scale}"
    return f"{resolution}, windows of {spec.size}"


def run_specs(args: argparse.Namespace, infos: list[dict], runs: Sequence[SegmentationRun],
              tiles: dict) -> list[TileSpec]:
    """Each run's windows (:func:`window_spec` at its image size): from the tiling its record names (``tiles``,
    recorded by training on a tile datalist, else that of the datalist it names: :func:`with_tiling`), else from
    ``tiles`` (the tile datalist predicted). The options ``--scale``, ``--mpp``, ``--tile-size``, ``--stride`` set
    one tiling for every run: PredictError for runs trained at different ones, as for a run of a non-square size."""
    own = []
    for ckpt, info, run in zip(args.checkpoint, infos, runs, strict=True):
        size = image_size_pair(run.image_size)
        if len(size) != 2 or size[0] != size[1]:
            raise PredictError(f"{ckpt}: whole-slide prediction needs runs of a square image size, got {size}")
        own.append((with_tiling(info).get("tiles") or tiles, size[0]))
    options = (args.scale, args.mpp, args.tile_size, args.stride)
    trained = dict.fromkeys(window_spec(t, size) for t, size in own)
    if any(options) and len(trained) > 1:
        raise PredictError(f"--scale/--mpp/--tile-size/--stride set one tiling for every run, but these runs were "
                           f"trained at {len(trained)} ({'; '.join(map(_tiling, trained))}): leave them out to "
                           "predict each run at its own and merge the maps")
    return [window_spec(t, size, *options) for t, size in own]


def predictor(args: argparse.Namespace, infos: list[dict]) -> tuple[list[Path], Predictor]:
    """``stas predict`` of whole slides (``--slides``, or a tile datalist's test slides, or with
    ``--out-of-fold`` its training slides) and their predictor: each run at its own windows (:func:`run_specs`);
    the datalist's ``tiles`` settings are the defaults of the tissue options."""
    tiles = (read_datalist(args.datalist).get("tiles") if args.datalist else None) or {}
    runs = [load_run_model(ckpt, args.device, args.stain_shift, args.backend) for ckpt in args.checkpoint]
    specs = run_specs(args, infos, runs, tiles)
    defaults = TissueSettings()
    tissue = TissueSettings(args.tissue_method or tiles.get("method", defaults.method),
                            args.tissue_threshold or tiles.get("threshold", defaults.threshold),
                            args.thumbnail or tiles.get("thumbnail", defaults.thumbnail), args.min_tissue)
    if args.skip_empty is not None and not all(hasattr(r.model, "presence") for r in runs):
        raise PredictError("--skip-empty needs runs trained with the auxiliary head (aux_head true)")
    settings = SlideSettings(specs[0], tissue, args.stitch, args.tta, args.threshold, args.batch_size,
                             args.skip_empty, style_of(args))
    problems = Problems("predict")
    assignments = None
    if args.slides:
        slides = find_slides(args.slides, problems)
    elif args.out_of_fold:
        assignments = out_of_fold(args.datalist, infos)
        slides = list(assignments)
    else:
        slides = test_images(args.datalist)

    def predict(chosen: Sequence[Path], estimating: bool, journal: Journal | None = None) -> Problems:
        if not estimating:
            done = predict_slides(runs, chosen, args.out, settings, assignments, args.overwrite, journal=journal,
                                  specs=specs)
        else:
            with tempfile.TemporaryDirectory() as tmp:
                done = predict_slides(runs, chosen, Path(tmp, "out"), settings, assignments, specs=specs)
        done.skipped = problems.skipped + done.skipped
        return done

    return slides, predict
