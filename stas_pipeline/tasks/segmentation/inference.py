"""Segmentation inference: trained runs over image files -> masks and probability maps at the original size.

Each image goes through every run's declared chain as validation saw it: the bundle's ``task#preprocessing``
(with the run's recorded knobs), rounded to uint8 as the cache stores it, then ``task#val_transforms``; each image
is decoded once. ``resize`` mode (the reference recipe): the whole chain, which resizes to the training size, the
model, the probabilities resized back (bilinear). ``sliding_window`` mode: the chain without its resizing, then
MONAI's Gaussian-weighted SlidingWindowInferer at the original resolution. A run trained on crops (its
``window``, the bundle's ``crop_size``) is always predicted by Gaussian-weighted windows of that size over the
output of its whole chain (the scale it was trained at), the probabilities resized back. Runs and flip TTA are
averaged in probability space; memory does not grow with the number of images. Masks are also written as QuPath
GeoJSON on request (``core/geojson.py``). ``stas predict`` is the command.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from monai.inferers import SlidingWindowInferer
from monai.transforms import Compose, EnsureTyped, Resized, ScaleIntensityd
from torch import nn
from tqdm import tqdm

from stas_pipeline.core.datalist import entries, test_images
from stas_pipeline.core.errors import NothingWrittenError
from stas_pipeline.core.fileio import atomic_path, write_png
from stas_pipeline.core.geojson import GeoJSONStyle, mask_features, style_of, write_geojson
from stas_pipeline.core.images import images_in_folder, read_failure
from stas_pipeline.core.lmdb_cache import Preprocessing, describe, image_size_pair, to_uint8
from stas_pipeline.core.models import build_model, build_network
from stas_pipeline.core.options import TTA_VIEWS
from stas_pipeline.core.problems import Problems
from stas_pipeline.core.run_recorder import load_model_weights
from stas_pipeline.core.sharding import Journal, output_folder
from stas_pipeline.core.trained_runs import (
    PredictError,
    inference_ready,
    load_trained_run,
    run_info_of,
    shifted,
    tta_unview,
    tta_view,
)
from stas_pipeline.tasks.base import Predictor
from stas_pipeline.tasks.segmentation.task import MODES

STAGE = "predict"
RESIZING = (Resized,)  # the chain's steps left out in sliding_window mode


@dataclass
class SegmentationRun:
    """A trained segmentation model, its training image size and the chain its images go through: the declared
    ``task#preprocessing`` (rounded to uint8, as the cache stores it), then ``task#val_transforms``; ``window``:
    the crop size of a run trained on crops (predicted by windows of it), else None."""

    model: nn.Module
    image_size: int | tuple[int, int]
    preprocessing: Preprocessing
    transform: Callable
    window: int | tuple[int, int] | None = None

    @classmethod
    def of(cls, spec: SegmentationRun | Sequence) -> SegmentationRun:
        """A run; ``(model, image_size)`` with the segmentation bundle's chain at that size; or
        ``[model, image_size, preprocessing, transform[, crop_size]]`` as a bundle declares them."""
        if isinstance(spec, SegmentationRun):
            return spec
        if len(spec) == 2:
            model, size = spec
            return cls(model, size, Preprocessing.resize(size), default_val_transform())
        model, size, preprocessing, transform, *window = spec
        return cls(model, size, Preprocessing.of(preprocessing), transform, (window or [None])[0] or None)


def default_val_transform() -> Compose:
    """The segmentation bundle's ``task#val_transforms`` on the image: min-max scaling to [0, 1], a tensor."""
    return Compose([ScaleIntensityd("image"), EnsureTyped("image", track_meta=False)])


def load_run_model(checkpoint: str | Path, device: str | torch.device = "cpu",
                   stain_shift: tuple[float, float, float] | None = None, backend: str = "torch") -> SegmentationRun:
    """The run of a training checkpoint, its model in eval mode, rebuilt from the ``best.json`` (or
    ``metrics.json``) beside it: with the chain of the recorded bundle and knobs, or for runs recorded without a
    bundle the segmentation bundle's chain at the recorded image size; after ``stain_shift`` (the shift check);
    ``backend`` as :func:`load_trained_run` takes it (runs recorded without a bundle: torch only)."""
    info = run_info_of(checkpoint)
    if "bundle" in info:
        run = load_trained_run(checkpoint, info, device, stain_shift, backend)  # any task's network and chain
        return SegmentationRun(run.model, info["image_size"], run.preprocessing, run.transform,
                               info.get("crop_size") or None)
    if "network" in info:
        model = build_network(**{**info["network"], "encoder_weights": None})
    else:  # runs recorded before the network definition was
        model = build_model(info["encoder"], encoder_weights=None, aux_head=info.get("aux_head", False))
    load_model_weights(model, checkpoint)
    run = SegmentationRun.of((inference_ready(model, device), int(info["image_size"])))
    run.transform = shifted(run.transform, stain_shift)
    return run


def view_tta(model: nn.Module, x: torch.Tensor, tta: str) -> torch.Tensor:
    """Mean sigmoid probability over the views of ``x`` (N, C, H, W) that ``tta`` names (:data:`TTA_VIEWS`),
    each brought back."""
    views = TTA_VIEWS[tta]
    total = None
    for view in views:
        p = tta_unview(torch.sigmoid(model(tta_view(x, view)).float()), view)
        total = p if total is None else total + p
    return total / len(views)


@dataclass
class _Prepared:
    """One image's original (H, W) and its model input through each distinct chain of the runs."""

    size: tuple[int, int]
    inputs: list[torch.Tensor]


class _Chains:
    """The runs' chains after loading (without the resizing in ``sliding_window`` mode, but for runs trained on
    crops), each distinct one once: ``index[k]`` is the chain of run ``k``. Every run must load images with the
    same ``LoadImaged``."""

    def __init__(self, runs: Sequence[SegmentationRun], mode: str):
        if len({json.dumps(r.preprocessing.spec[0], default=str) for r in runs}) > 1:
            raise PredictError("the runs' chains load images differently (LoadImaged); predict them separately")
        self.load = runs[0].preprocessing.load
        self.chains: list[tuple[list[Callable], Callable]] = []
        self.index: list[int] = []
        keys: list[str] = []
        for run in runs:
            steps = [t for t in run.preprocessing.transforms[1:]
                     if mode == "resize" or run.window or not isinstance(t, RESIZING)]
            key = json.dumps([describe(steps), describe(run.transform)], default=str)
            if key not in keys:
                keys.append(key)
                self.chains.append((steps, run.transform))
            self.index.append(keys.index(key))

    def __call__(self, path: str | Path) -> _Prepared:
        """Decode the image once, then every chain: the steps, uint8 rounding, the val transform."""
        loaded = self.load({"image": str(path)})
        if loaded["image"].ndim != 3 or loaded["image"].shape[-1] != 3:
            raise ValueError(f"expected an RGB image, the chain loaded shape {tuple(loaded['image'].shape)}")
        inputs = []
        for steps, transform in self.chains:
            data = dict(loaded)
            for step in steps:
                data = step(data)
            image = torch.from_numpy(to_uint8(data["image"]))
            inputs.append(torch.as_tensor(transform({"image": image})["image"]).float())
        return _Prepared(tuple(loaded["image"].shape[:2]), inputs)


@torch.no_grad()
def _probabilities(runs: Sequence[SegmentationRun], index: Sequence[int], images: Sequence[_Prepared], mode: str,
                   tta: str, overlap: float, sw_batch_size: int, amp: bool) -> list[torch.Tensor]:
    """Mean probability maps (1, H, W) of ``runs`` at each image's original size."""
    device = next(runs[0].model.parameters()).device
    totals = [torch.zeros((1, 1, *image.size), device=device) for image in images]

    def add(total: torch.Tensor, p: torch.Tensor) -> None:
        total += p if p.shape[-2:] == total.shape[-2:] else \
            F.interpolate(p, size=total.shape[-2:], mode="bilinear", align_corners=False)

    for run, k in zip(runs, index, strict=True):
        run.model.eval()
        with torch.autocast(device.type, enabled=amp and device.type == "cuda"):
            if mode == "resize" and not run.window:
                x = torch.stack([image.inputs[k] for image in images]).to(device)
                for total, p in zip(totals, view_tta(run.model, x, tta).float(), strict=True):
                    add(total, p[None])
            else:
                inferer = SlidingWindowInferer(roi_size=image_size_pair(run.window or run.image_size),
                                               sw_batch_size=sw_batch_size, overlap=overlap, mode="gaussian",
                                               padding_mode="reflect")
                for total, image in zip(totals, images, strict=True):
                    x = image.inputs[k][None].to(device)
                    add(total, inferer(x, lambda xi, m=run.model: view_tta(m, xi, tta)).float())
    return [(total / len(runs))[0] for total in totals]


def predict_probabilities(
    models: Sequence[SegmentationRun | Sequence],
    images: Sequence[str | Path],
    mode: str = "resize",
    tta: str = "none",
    overlap: float = 0.25,
    sw_batch_size: int = 4,
    amp: bool = False,
) -> list[torch.Tensor]:
    """Mean probability maps (1, H, W) of ``models`` (runs, see :meth:`SegmentationRun.of`) for image files.

    ``resize``: each run's whole chain, the model (all images as one batch), the probabilities resized back
    (bilinear) to the original size. ``sliding_window``: the chain without its resizing, then windows of the
    training size, ``sw_batch_size`` per forward pass."""
    runs = [SegmentationRun.of(m) for m in models]
    chains = _Chains(runs, mode)
    return _probabilities(runs, chains.index, [chains(p) for p in images], mode, tta, overlap, sw_batch_size, amp)


class _ImageFiles(torch.utils.data.Dataset):
    """Images through the runs' chains in DataLoader workers; an unreadable file yields its error instead."""

    def __init__(self, paths: Sequence[Path], chains: _Chains):
        self.paths, self.chains = list(paths), chains

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[Path, _Prepared | str]:
        try:
            return self.paths[i], self.chains(self.paths[i])
        except Exception as err:  # noqa: BLE001 - an unreadable image is reported, the rest go on
            return self.paths[i], read_failure(self.paths[i], err)


def predict_images(
    models: Sequence[SegmentationRun | Sequence],
    images: Sequence[str | Path],
    out: str | Path,
    save_probs: str | Path | None = None,
    probs_format: str = "png",
    threshold: float = 0.5,
    mode: str = "resize",
    tta: str = "none",
    overlap: float = 0.25,
    batch_size: int = 1,
    num_workers: int = 0,
    amp: bool = False,
    overwrite: bool = False,
    problems: Problems | None = None,
    assignments: dict[Path, list[int]] | None = None,
    geojson: GeoJSONStyle | None = None,
    journal: Journal | None = None,
) -> Problems:
    """Predict every image with ``models`` (runs, see :meth:`SegmentationRun.of`) into ``out`` (and
    ``save_probs``), ``batch_size`` images at a time, decoded and put through the runs' chains by ``num_workers``
    processes; each output folder appears only when complete. ``assignments`` (out-of-fold prediction): the
    indices of the runs that predict each image (by its path), instead of all of them. With ``geojson`` each mask
    is also written as ``<stem>.geojson`` (its objects' mean probabilities from the averaged map). An image that
    cannot be read is reported and skipped; :class:`NothingWrittenError` (nothing written) when every image is.
    With a ``journal`` (a part of a sharded run) the files go straight into the folders shared by the parts and
    each image is recorded once all of its files are written."""
    problems = problems or Problems(STAGE)
    if mode not in MODES or tta not in TTA_VIEWS:
        raise ValueError(f"mode must be one of {MODES} and tta one of {list(TTA_VIEWS)}")
    if journal is not None:
        journal.start([])
    replace = journal is not None and journal.replace  # a part's not-finished image: its stale files
    runs = [SegmentationRun.of(m) for m in models]
    chains = _Chains(runs, mode)
    loader = torch.utils.data.DataLoader(_ImageFiles([Path(p) for p in images], chains), batch_size=batch_size,
                                         num_workers=num_workers, collate_fn=list)
    written = 0
    with output_folder(out, overwrite, journal) as masks_dir, \
            (output_folder(save_probs, overwrite, journal) if save_probs else nullcontext()) as probs_dir:
        progress = tqdm(total=len(images), desc=STAGE, unit="img")
        for batch in loader:
            readable = [(path, image) for path, image in batch if not isinstance(image, str)]
            for path, error in batch:
                if isinstance(error, str):
                    problems.skip(path, f"cannot read image: {error}")
            groups: dict[tuple[int, ...], list[int]] = {}  # the images of the batch that the same runs predict
            for i, (path, _) in enumerate(readable):
                groups.setdefault(tuple(assignments[path]) if assignments else tuple(range(len(runs))), []).append(i)
            probs: list = [None] * len(readable)
            for ks, members in groups.items():
                maps = _probabilities([runs[k] for k in ks], [chains.index[k] for k in ks],
                                      [readable[i][1] for i in members], mode, tta, overlap, batch_size, amp)
                for i, prob in zip(members, maps, strict=True):
                    probs[i] = prob
            for (path, _), prob in zip(readable, probs, strict=True):
                prob = prob[0].cpu().numpy()
                write_png(masks_dir / f"{path.stem}.png", np.where(prob > threshold, 255, 0).astype(np.uint8),
                          replace)
                if geojson is not None:
                    write_geojson(masks_dir / f"{path.stem}.geojson", mask_features(prob > threshold, prob, geojson),
                                  replace)
                if probs_dir is not None and probs_format == "npy":
                    with atomic_path(probs_dir / f"{path.stem}.npy", replace) as tmp:
                        np.save(tmp, prob.astype(np.float32))
                elif probs_dir is not None:
                    write_png(probs_dir / f"{path.stem}.png", np.rint(prob * 255).astype(np.uint8), replace)
                if journal is not None:
                    journal.record(path)
                problems.count("written")
                written += 1
            progress.update(len(batch))
        progress.close()
        if images and not written and journal is None:
            raise NothingWrittenError(f"{out}: every image was skipped; nothing written")
    return problems


def out_of_fold(datalist: str | Path, infos: list[dict]) -> dict[Path, list[int]]:
    """Each training image (slide) of ``datalist`` that a run of its fold is given for: the indices of those
    runs (``infos``: the runs' records)."""
    fold_of = {Path(e["image"]): e.get("fold") for e in entries(datalist, "training")}
    assignments = {p: [k for k, info in enumerate(infos) if info.get("fold") == f] for p, f in fold_of.items()}
    assignments = {p: ks for p, ks in assignments.items() if ks}
    if not assignments:
        raise PredictError("--out-of-fold: no training image (slide) has a run of its fold among the checkpoints")
    return assignments


def predictor(args: argparse.Namespace, infos: list[dict]) -> tuple[list[Path], Predictor]:
    """``stas predict`` of segmentation runs: the images to predict (``--images``, the datalist's test list, or
    with ``--out-of-fold`` its training images) and their predictor."""
    assignments = out_of_fold(args.datalist, infos) if args.out_of_fold else None
    if assignments:
        images = list(assignments)
    else:
        images = images_in_folder(args.images) if args.images else test_images(args.datalist)
    models = [load_run_model(ckpt, args.device, args.stain_shift, args.backend) for ckpt in args.checkpoint]
    settings = (args.probs_format, args.threshold, args.mode, args.tta, args.overlap, args.batch_size, args.workers,
                args.amp)
    geojson = style_of(args)

    def predict(chosen: Sequence[Path], estimating: bool, journal: Journal | None = None) -> Problems:
        if not estimating:
            return predict_images(models, chosen, args.out, args.save_probs, *settings, args.overwrite,
                                  assignments=assignments, geojson=geojson, journal=journal)
        with tempfile.TemporaryDirectory() as tmp:  # written as the run would write them, then removed
            probs = Path(tmp, "probs") if args.save_probs else None
            return predict_images(models, chosen, Path(tmp, "masks"), probs, *settings, True, assignments=assignments,
                                  geojson=geojson)

    return images, predict
