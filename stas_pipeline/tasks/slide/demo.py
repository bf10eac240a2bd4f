"""``stas demo --task slide``: the whole-slide recipe end to end, each step the stage a user would run, on
embedded synthetic slides (:class:`stas_pipeline.tasks.slide.synthetic.SyntheticSlide`: pink tissue regions on
glass holding round glomerulus-like structures, written as pyramidal tiled TIFFs, masks as a Kaggle RLE CSV):

``stas tile`` (tissue, overlapping windows, folds by slide) -> ``stas build-lmdb`` (the tiles through the
bundle's chain) -> every fold of ``deeplab_lite0`` trained on the tiles with balanced draws through MONAI's
entry point -> ``stas predict`` of the training slides out of fold -> ``stas evaluate --slides`` (Dice at every
threshold; the best one chosen there) -> ``stas predict`` of the held-out slide with every fold at that
threshold (probability map, level-0 mask, overlay, RLE CSV) -> ``stas evaluate --slides`` of it against its own
mask, kept apart until then. Everything lands in ``OUT``::

    data/slides/*.tif, data/masks.csv, data/test_masks.csv     tiles/datalist.json, tiles/tissue/*.png
    cache_deeplab_lite0_<size>/                                 runs/deeplab_lite0/fold<k>/
    predictions/{oof,test}/ (<id>_prob.npy, <id>.tif, <id>_overlay.png, predictions.csv)
    evaluation/{oof,test}/ (metrics.json, threshold_dice.png)   summary.json
"""

from __future__ import annotations

import argparse
import json
import sys

from stas_pipeline.core.demo_runner import FoldTrainingDemo, three_decimals
from stas_pipeline.tasks.slide.synthetic import SyntheticSlide
from stas_pipeline.tasks.slide.task import DEMO_DEFAULTS, DEMO_TILE

BUNDLE = "deeplab_lite0"
STAGE_NAMES = ("data", "tile", "cache", "train", "predict_oof", "evaluate_oof", "predict_test", "evaluate_test")
SLIDE_SHAPE = (1536, 2048)  # height, width of each synthetic slide (level 0)


class SlideDemo(FoldTrainingDemo):
    """The slide demo: the shared stage runner and fold training, slides instead of images."""

    STAGE_NAMES = STAGE_NAMES
    BUNDLE = BUNDLE
    N_IMAGES = 6  # slides: all but one labelled, the last held out
    DEFAULTS = DEMO_DEFAULTS

    def __init__(self, args: argparse.Namespace):
        super().__init__(args)
        self.image_size = DEMO_DEFAULTS["image_size"]  # the tiles' cached size, whatever --image-size says
        self.tiles = self.out / "tiles"
        self.run_root = self.out / "runs" / BUNDLE
        self.evaluation = self.out / "evaluation"
        self.threshold = 0.5

    def stage_data(self) -> None:
        rows = []
        for k in range(self.n_images):
            slide = SyntheticSlide(*SLIDE_SHAPE, seed=self.args.seed + k, glomeruli=150, radius=(18, 40))
            slide.write(self.data / "slides" / f"slide{k}.tif", levels=3, compression="jpeg")
            rows.append(f"slide{k},{slide.rle()}")
        (self.data / "masks.csv").write_text("id,encoding\n" + "\n".join(rows[:-1]) + "\n")
        (self.data / "test_masks.csv").write_text("id,encoding\n" + rows[-1] + "\n")
        print(f"drew {self.n_images} synthetic {SLIDE_SHAPE[1]}x{SLIDE_SHAPE[0]} slides into {self.data / 'slides'} "
              f"(the last held out: its mask only in test_masks.csv)")

    def stage_tile(self) -> None:
        self.stage("tile", [str(self.data / "slides"), "--masks", str(self.data / "masks.csv"), "--out",
                            str(self.tiles), "--size", str(DEMO_TILE["size"]), "--stride", str(DEMO_TILE["stride"]),
                            "--scale", str(DEMO_TILE["scale"]), "--folds", str(self.folds), "--thumbnail", "512",
                            "--seed", str(self.args.seed)])

    def stage_cache(self) -> None:
        self.stage("build-lmdb", ["--datalist", str(self.tiles / "datalist.json"), "--out", str(self.cache),
                                  "--bundle", BUNDLE, "--image-size", str(self.image_size), "--no-progress"])

    def stage_train(self) -> None:
        self.train_folds(BUNDLE, self.tiles / "datalist.json", self.run_root, "tiles", balanced_sampling=True)

    def _checkpoints(self) -> list[str]:
        return [str(self.run_root / f"fold{k}" / "best.pt") for k in range(self.folds)]

    def stage_predict_oof(self) -> None:
        self.stage("predict", ["--checkpoint", *self._checkpoints(), "--datalist", str(self.tiles / "datalist.json"),
                               "--out-of-fold", "--tta", "hv", "--batch-size", "8",
                               "--out", str(self.predictions / "oof")])

    def _evaluate(self, split: str, masks: str) -> dict:
        out = self.evaluation / split
        self.stage("evaluate", ["--slides", str(self.predictions / split), "--masks", str(self.data / masks),
                                "--out", str(out)])
        metrics = json.loads((out / "metrics.json").read_text())
        self.scores[split] = metrics
        return metrics

    def stage_evaluate_oof(self) -> None:
        self.threshold = self._evaluate("oof", "masks.csv")["best_threshold"]
        print(f"threshold chosen on the out-of-fold slides: {self.threshold:.2f}")

    def stage_predict_test(self) -> None:
        self.stage("predict", ["--checkpoint", *self._checkpoints(), "--datalist", str(self.tiles / "datalist.json"),
                               "--tta", "hv", "--batch-size", "8", "--threshold", str(self.threshold),
                               "--out", str(self.predictions / "test")])

    def stage_evaluate_test(self) -> None:
        self._evaluate("test", "test_masks.csv")

    def summary(self) -> dict:
        oof, test = self.scores.get("oof", {}), self.scores.get("test", {})
        return {
            "task": "slide",
            "settings": {"bundle": BUNDLE, "tile": DEMO_TILE, "image_size": self.image_size, "epochs": self.epochs,
                         "batch_size": self.batch_size, "lr": self.lr, "folds": self.folds, "slides": self.n_images,
                         "encoder_weights": self.weights, "seed": self.args.seed},
            "oof_dice_at_0.5": oof.get("mean_dice_at_0.5"), "threshold": self.threshold,
            "oof_dice_at_threshold": oof.get("mean_dice_at_best"),
            "test_dice_at_threshold": test.get("curve", {}).get(str(round(self.threshold, 2))),
            "seconds": {k: round(v, 1) for k, v in self.seconds.items()},
            "outputs": {"tiles": str(self.tiles), "runs": str(self.run_root), "predictions": str(self.predictions),
                        "evaluation": str(self.evaluation)},
        }

    def print_summary(self, summary: dict) -> None:
        lines = ["", "=" * 78, f"stas demo --task slide: {BUNDLE} on {DEMO_TILE['size']}-px tiles at "
                 f"1/{DEMO_TILE['scale']}, "
                 f"{self.epochs} epochs, {self.folds} folds, {self.n_images} synthetic slides", "-" * 78,
                 f"out-of-fold slides: mean Dice {three_decimals(summary['oof_dice_at_0.5'])} at 0.5, "
                 f"{three_decimals(summary['oof_dice_at_threshold'])} at the chosen threshold "
                 f"{summary['threshold']:.2f}",
                 "held-out slide (every fold, that threshold): Dice "
                 f"{three_decimals(summary['test_dice_at_threshold'])}",
                 "-" * 78, "seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in summary["seconds"].items()),
                 f"predictions (masks, overlays, RLE): {self.predictions}", "=" * 78]
        print("\n".join(lines), file=sys.stdout, flush=True)
