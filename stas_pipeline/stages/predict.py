"""Inference: one or more checkpoints over a folder of images (or a datalist's test list), image by image.

``stas predict --checkpoint runs/deeplab_lite0/fold*/best.pt --images DIR --out DIR`` writes, for every image,
``DIR/<image stem>.png`` (the binary mask, 0/255, at the image's original size) and with ``--save-probs PDIR``
the probability map ``PDIR/<image stem>.png`` (uint8, p * 255) or ``.npy`` (float32); with ``--geojson`` also
``DIR/<image stem>.geojson``, the mask's objects as QuPath GeoJSON (``core/geojson.py``). Several checkpoints
(models x folds) are averaged in probability space, as is flip TTA. Each checkpoint's model is rebuilt from the
``best.json``/``metrics.json`` written beside it by training (network, image size), and each image goes through
the run's declared chain as validation saw it: the bundle's ``task#preprocessing`` (with the run's recorded
knobs), rounded to uint8 as the cache stores it, then ``task#val_transforms``. Each image is decoded once.

Modes: ``resize`` (the reference recipe: the whole chain, which resizes to the training size, predict, resize
the probabilities back, bilinear) and ``sliding_window`` (the chain without its resizing, then MONAI's
SlidingWindowInferer at the original resolution, Gaussian-weighted overlapping windows of the training size, for
images larger than it). Runs trained on crops (a bundle's ``crop_size``) are predicted in either mode by
Gaussian-weighted windows of their crop size over their whole chain's output (the training scale), the
probabilities resized back. ``--datalist D --out-of-fold``: each training image by the runs of its fold only.
Memory does not grow with the number of images.

Image-level runs (a classification bundle; the task is read from ``best.json``) write ``--out`` as a CSV
``image,prob,<run>...`` instead (fold mean in ``prob``), each image through the run's own declared chain; with
``--datalist D --out-of-fold`` each training image is predicted by the run of its fold only (out-of-fold
predictions, for the CV AUC); ``--tta`` also takes ``two-crop`` and ``ten-crop`` for them. See
stas_pipeline/tasks/classification/inference.py.

Whole slides (``--slides``, or ``--datalist`` of a tile datalist written by ``stas tile``, whose tissue settings
become the defaults; with ``--out-of-fold`` each training slide by the runs of its fold): windows over tissue at
each run's training tiling (the ``tiles`` recorded in its ``best.json``, else those of the datalist its record
names, else the tile datalist's, else scale 4), stitched into ``--out/<id>_prob.npy``, ``<id>.tif`` (level-0
mask), ``<id>_overlay.png``, ``predictions.csv`` (RLE) and with ``--geojson`` ``<id>.geojson``. A tiling by
``--mpp`` predicts every slide at that physical resolution, each at its own level and scale from the pixel size
in its metadata, as ``stas tile`` chose them. Runs trained at different tilings (a multi-scale ensemble, e.g.
352-px tiles at 4x with 512-px tiles at 2x) are predicted each at its own, and the maps merged on the finest
grid, every run weighted equally; ``--scale``/``--mpp``/``--tile-size``/``--stride`` set one tiling for every
run and are refused for such a mix. See stas_pipeline/tasks/slide/inference.py.

``--estimate [N]`` (any task) writes nothing: it loads the checkpoints, predicts a warm-up batch, then times the
first N images (8; at least one batch) with the full settings (every checkpoint, TTA, mode, batch size,
workers, device; segmentation outputs go to a temporary folder, removed) and prints the projected wall time
for the whole image list, checkpoint loading included. Check it against an inference time limit before the
run.

In parts (any task; see stas_pipeline/core/sharding.py). Under ``torchrun --nproc_per_node N [--nnodes M]`` each
process predicts every N-th image (slide) of the list into the same ``--out`` (each on its own GPU with
``--device cuda``), and rank 0 writes the merged CSV (image-level ``--out``; slides' ``predictions.csv``) once
all are done: the same bytes as one process. Without torchrun (a Slurm array, any scheduler): ``--num-parts K
--part-id I`` on each job, then the same command with ``--merge`` instead of ``--part-id`` (it refuses in one
line while a part is missing or unfinished). Each part records what it finished in ``<out>.parts/`` beside
``--out`` (removed by the merge); ``--continue`` re-runs a killed part (or a killed single run started with
``--continue``) without predicting again what it finished: one ``skipped, complete before: <input>`` line each.
An item counts as finished only once all its files are written. Without ``--continue`` an existing output (or a
part's own record) is refused as ever, unless ``--overwrite``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from stas_pipeline.cli import command
from stas_pipeline.core.cli_types import non_negative_int, positive_float, positive_int
from stas_pipeline.core.datalist import read_datalist
from stas_pipeline.core.geojson import add_geojson_options
from stas_pipeline.core.options import BACKENDS, STAIN_SHIFTS, TTA_VIEWS, parse_stain_shift
from stas_pipeline.tasks import choose
from stas_pipeline.tasks.base import Predictor, claimed_by_options
from stas_pipeline.tasks.classification.task import TTA_MODES
from stas_pipeline.tasks.segmentation.task import MODES
from stas_pipeline.tasks.slide.task import STITCH_MODES, TISSUE_METHODS


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", nargs="+", required=True, metavar="PT",
                        help="best.pt/last.pt of one or more training runs (their probabilities are averaged)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--images", help="folder of images to predict (.jpg .jpeg .png .tif .tiff)")
    source.add_argument("--datalist", help="datalist.json whose 'test' list is predicted (a datalist of tiles "
                                           "written by stas tile: its test slides, whole)")
    source.add_argument("--slides", nargs="+", type=Path, metavar="SLIDE",
                        help="whole slides (files or folders of TIFF/SVS; with OpenSlide also NDPI, MRXS, "
                             "SCN, BIF, ...) predicted window by window")
    parser.add_argument("--out-of-fold", action="store_true",
                        help="with --datalist: predict each training image (slide) with the runs of its own fold "
                             "only (those that did not train on it): out-of-fold predictions, e.g. to choose "
                             "post-processing or cut points on")
    parser.add_argument("--out", required=True,
                        help="segmentation: output folder for the binary masks <image stem>.png (0/255); "
                             "image-level tasks: the predictions CSV (image,prob,<run>...)")
    parser.add_argument("--save-probs", metavar="DIR", help="segmentation: also keep the probability maps here")
    parser.add_argument("--probs-format", choices=("png", "npy"), default="png",
                        help="probability maps as uint8 PNG of p*255 (default) or float32 .npy")
    parser.add_argument("--threshold", type=float, default=0.5, help="foreground where probability > this (0.5)")
    parser.add_argument("--mode", choices=MODES, default="resize",
                        help="segmentation: resize: to the training size and back (the recipe's); sliding_window: "
                             "overlapping windows of the training size at the original resolution (default resize); "
                             "runs trained on crops: Gaussian windows of their crop size at their training scale "
                             "in either mode")
    parser.add_argument("--overlap", type=float, default=0.25, help="sliding-window overlap (default 0.25)")
    parser.add_argument("--tta", choices=list(TTA_MODES), default="none",
                        help="test-time augmentation: none, h(orizontal), v(ertical), hv (all four flips), d4 "
                             "(the four flips, each also transposed: every rotation by 90 degrees and reflection, "
                             "8 passes); "
                             "image-level runs also two-crop (the image and its centre crop) and ten-crop "
                             "(torchvision's TenCrop), crops of 0.875 of each side resized back")
    parser.add_argument("--batch-size", type=int, default=1,
                        help="images per forward pass in resize mode and for image-level tasks, windows per pass "
                             "in sliding_window mode (1)")
    parser.add_argument("--workers", type=int, default=2, help="processes decoding images (default 2)")
    parser.add_argument("--device", help="torch device (default: cuda when available, else cpu)")
    parser.add_argument("--amp", action="store_true", help="mixed precision on CUDA")
    parser.add_argument("--backend", choices=BACKENDS, default="torch",
                        help="what runs the networks: torch (default), or onnxruntime on the CPU: each run's "
                             "model.onnx, exported beside its checkpoint on first use (pip install "
                             "'stas_pipeline[export]'); the same chain, windows, TTA and averaging")
    parser.add_argument("--stain-shift", type=stain_shift_arg, metavar="SHIFT",
                        help="shift the stain of every image before the runs' chain, as another scanner or lab "
                             "would: a name (" + ", ".join(STAIN_SHIFTS) + ") or factors on the haematoxylin, "
                             "eosin and DAB concentrations, e.g. h=1.2,e=0.9 (the shift check: "
                             "benchmarks/shift_check.py)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    add_geojson_options(parser, "each mask (<out>/<image stem>.geojson; slides: <out>/<id>.geojson, from the "
                                "probability map, band by band)")
    slides = parser.add_argument_group("whole slides (--slides, or a datalist of tiles: its settings are the "
                                       "defaults)")
    resolution = slides.add_mutually_exclusive_group()
    resolution.add_argument("--scale", type=positive_int,
                            help="windows are read this many times smaller, for every run (default: each run's "
                                 "training tiling, else the tile datalist's, else 4; refused for runs trained at "
                                 "different tilings, which are each predicted at their own and merged)")
    resolution.add_argument("--mpp", type=positive_float,
                            help="windows at this many microns per pixel, each slide resampled from its own pixel "
                                 "size (default: as --scale; --tile-size and --stride then in pixels at it)")
    slides.add_argument("--tile-size", type=positive_int,
                        help="window side in level-0 pixels, for every run as --scale (default: the run's image "
                             "size x its scale)")
    slides.add_argument("--stride", type=positive_int,
                        help="level-0 step between windows, for every run as --scale (default: the run's training "
                             "tiling's, else half a window)")
    slides.add_argument("--stitch", choices=STITCH_MODES, default="gaussian",
                        help="overlapping windows weighted by a Gaussian (default) or by their centre only")
    slides.add_argument("--tissue-method", choices=TISSUE_METHODS, help="tissue detection (saturation)")
    slides.add_argument("--tissue-threshold", type=float, help="saturation threshold of tissue (0.1)")
    slides.add_argument("--min-tissue", type=float, default=0.01,
                        help="least tissue share of a predicted window (0.01; windows without tissue stay 0)")
    slides.add_argument("--thumbnail", type=positive_int, help="longer side of the tissue thumbnail (2048)")
    slides.add_argument("--skip-empty", type=float, metavar="P",
                        help="runs with the auxiliary head: skip the decoder (and TTA) on windows whose 'has "
                             "foreground' probability is below P; they count as 0 (off by default)")
    parser.add_argument("--estimate", type=positive_int, nargs="?", const=8, metavar="N",
                        help="write nothing: time the first N images (default 8) after a warm-up batch and print "
                             "the projected wall time for all the images")
    parts = parser.add_argument_group("in parts (torchrun ranks are parts by themselves; see above)")
    parts.add_argument("--num-parts", type=positive_int, metavar="K",
                       help="split the images (slides) into K parts: every K-th from --part-id; with --merge: how "
                            "many parts to merge (default: as the finished parts say)")
    parts.add_argument("--part-id", type=non_negative_int, metavar="I",
                       help="the part this job predicts, 0..K-1 (e.g. $SLURM_ARRAY_TASK_ID)")
    parts.add_argument("--merge", action="store_true",
                       help="predict nothing: merge the finished parts recorded beside --out into --out")
    parts.add_argument("--continue", dest="resume", action="store_true",
                       help="resume: do not predict again the images (slides) this part finished before; give it "
                            "to the first run too, so that it records them")
    return parser


def stain_shift_arg(text: str) -> tuple[float, float, float]:
    """``--stain-shift``: :func:`parse_stain_shift`, its error as argparse's."""
    try:
        return parse_stain_shift(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.0f} s"
    hours, minutes = divmod(round(seconds / 60), 60)
    return f"{hours} h {minutes} min" if hours else f"{minutes} min"


def estimate(images: Sequence[Path], predict: Predictor, n: int, batch_size: int, loading_s: float) -> str:
    """Predict a warm-up batch, then time the first ``n`` images (at least one batch): the projected wall time
    for all ``images``, ``loading_s`` (the checkpoints' loading) included."""
    sample = list(images[:max(n, batch_size)])
    predict(sample[:batch_size], True)  # first-call costs: lazy initialisation, cuDNN autotuning, caches
    start = time.perf_counter()
    predict(sample, True)
    per_image = (time.perf_counter() - start) / max(len(sample), 1)
    return (f"projected {_duration(loading_s + per_image * len(images))} for {len(images):,} images: "
            f"{per_image:.3g} s/image timed on {len(sample)} after a warm-up batch, plus {loading_s:.0f} s loading "
            "the checkpoints")


@command
def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    args = build_parser(prog).parse_args(argv)
    start = time.perf_counter()
    import torch  # torch and MONAI (the runs, the shards): after the arguments, so that --help comes at once

    from stas_pipeline.core.sharding import ShardError, merge_parts, predict_in_parts, shard_of
    from stas_pipeline.core.trained_runs import PredictError, run_info_of

    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    infos = [run_info_of(ckpt) for ckpt in args.checkpoint]
    declared = read_datalist(args.datalist).task if args.datalist else None
    task = choose(*claimed_by_options(args, "predict_options"), declared,
                  *dict.fromkeys(info.get("task", "segmentation") for info in infos),
                  what="the checkpoints and the images")
    if args.out_of_fold and args.datalist is None:
        raise PredictError("--out-of-fold needs --datalist")
    if args.tta not in TTA_VIEWS and not task.image_level:
        raise PredictError(f"--tta {args.tta} is for image-level runs; segmentation takes {list(TTA_VIEWS)}")
    if args.geojson and task.image_level:
        raise PredictError(f"--geojson writes masks as polygons; {task.name} runs predict no masks")
    if args.merge:
        if args.part_id is not None or os.environ.get("WORLD_SIZE", "1") != "1":
            raise ShardError("--merge runs in one process, without --part-id")
        return merge_parts(args.out, task.merge_predictions, args.num_parts, args.overwrite).finish()
    shard = shard_of(args.num_parts, args.part_id)
    in_parts = (shard.count > 1 or args.resume) and not args.estimate
    if in_parts and not task.shards():
        raise PredictError(f"task {task.name!r} predicts in one process only: no --num-parts, --continue or torchrun")
    args.device = shard.device(args.device)
    images, predict = task.predictor(args, infos)
    if args.estimate:
        print(estimate(images, predict, args.estimate, args.batch_size, time.perf_counter() - start))
        return 0
    if not in_parts:
        return predict(images, False).finish()
    return predict_in_parts(images, lambda chosen, journal: predict(chosen, False, journal), args.out, shard,
                            task.merge_predictions, args.resume, args.overwrite, args.device).finish()


if __name__ == "__main__":
    sys.exit(main())
