"""``stas``: one command with a sub-command per pipeline stage, and the one error path of every stage.

Each stage is a module with ``main(argv, prog) -> int`` wrapped by :func:`command`; ``stas <stage> --help`` shows
the stage's own options. Exit codes (core/errors.py): 0 done, 1 some inputs skipped (each named on its own line),
2 nothing could be done or bad usage, 3 an internal fault, whose traceback is printed with ``--debug`` (or
``STAS_DEBUG=1``) and otherwise saved to a log file that the one-line message names.
"""

from __future__ import annotations

import functools
import importlib
import os
import sys
import tempfile
import time
import traceback
from collections.abc import Callable

from stas_pipeline.core.errors import EXIT_INTERNAL, StasError, debugging

StageMain = Callable[..., int]

# stage name -> (module, one-line description); the order is the order of the pipeline.
STAGES: dict[str, tuple[str, str]] = {
    "labelme-to-masks": (
        "stas_pipeline.stages.labelme_to_masks", "LabelMe JSON annotations -> binary PNG masks"),
    "tile": (
        "stas_pipeline.stages.tile", "whole slides -> a datalist of tiles over tissue (windows, folds by slide)"),
    "make-datalist": (
        "stas_pipeline.stages.make_datalist", "images with masks or numeric labels -> k folds, test split"),
    "build-lmdb": (
        "stas_pipeline.stages.build_lmdb", "run the bundle's declared preprocessing chain once into an LMDB cache"),
    "predict": (
        "stas_pipeline.stages.predict",
        "checkpoints -> masks at the original size, a CSV of image scores, or whole slides stitched from windows"),
    "ensemble": (
        "stas_pipeline.stages.ensemble", "vote or mean of prediction folders, or of prediction CSVs"),
    "postprocess": (
        "stas_pipeline.stages.postprocess", "remove small components, fill holes in predicted masks"),
    "evaluate": (
        "stas_pipeline.stages.evaluate", "Dice/IoU against masks, or AUC/ROC/sensitivity of a predictions CSV"),
    "pseudo-label": (
        "stas_pipeline.stages.pseudo_label", "confident image-level predictions -> next round's datalist"),
    "rle": (
        "stas_pipeline.stages.rle", "mask images <-> Kaggle RLE CSV (id,encoding), slide-sized masks by window"),
    "export": (
        "stas_pipeline.stages.export", "checked submission zip: one 0/255 PNG per test image"),
    "export-model": (
        "stas_pipeline.stages.export_model",
        "trained runs -> a MONAI model-zoo bundle (TorchScript, ONNX; runs anywhere with monai.bundle run)"),
    "demo": (
        "stas_pipeline.stages.demo", "every stage end to end on a synthetic (or --data) set, with a summary"),
    "experiments": (
        "stas_pipeline.stages.experiments", "table of training runs: CV/test scores and the knobs that differ"),
    "bundle": (
        "stas_pipeline.stages.bundle", "a bundle as one self-contained file for MONAI's runner, from any folder"),
}


def _usage() -> str:
    width = max(map(len, STAGES))
    lines = [
        "usage: stas <stage> [options]    (stas <stage> --help for a stage's options)",
        "",
        "Challenge pipeline (STAS segmentation, image classification and grading, whole-slide tiles). Stages, in "
        "pipeline order:",
    ]
    lines += [f"  {name:<{width}}  {desc}" for name, (_, desc) in STAGES.items()]
    lines += [
        "",
        "Training and validation run as MONAI bundles, between build-lmdb and predict:",
        "  python -m monai.bundle run training --config_file bundles/deeplab_effb6.json --dataset_dir DATA",
        "  python -m monai.bundle run training --config_file bundles/fundus_b0.json --dataset_dir DATA",
        "",
        "Exit codes: 0 done, 1 some inputs skipped, 2 nothing could be done or bad usage, 3 an internal fault "
        "(stas --debug <stage> ... or STAS_DEBUG=1 prints its traceback).",
    ]
    return "\n".join(lines)


def _internal_fault(prog: str, debug: bool) -> str:
    """The one line for an internal fault; its traceback goes to a log file (or stderr when debugging)."""
    if debug:
        traceback.print_exc()
        return f"INTERNAL ERROR in {prog}: see the traceback above"
    fd, log = tempfile.mkstemp(prefix=f"stas-{time.strftime('%Y%m%d-%H%M%S')}-", suffix=".log")
    with os.fdopen(fd, "w") as handle:
        traceback.print_exc(file=handle)
    kind, err = sys.exc_info()[:2]
    return (f"INTERNAL ERROR in {prog}: {kind.__name__}: {err} (a bug, not your input: traceback in {log}; "
            "run again with --debug to print it)")


def command(stage_main: StageMain) -> StageMain:
    """A stage's ``main``: a :class:`StasError` becomes ``ERROR <file>: <reason>`` and its exit code, any other
    exception an internal fault (exit 3); ``--debug`` anywhere in ``argv`` prints the traceback instead."""

    @functools.wraps(stage_main)
    def main(argv: list[str] | None = None, prog: str | None = None) -> int:
        argv = list(sys.argv[1:] if argv is None else argv)
        debug = debugging() or "--debug" in argv
        argv = [a for a in argv if a != "--debug"]
        try:
            return stage_main(argv, prog)
        except StasError as err:
            if debug:
                traceback.print_exc()
            print(f"ERROR {err}", file=sys.stderr, flush=True)
            return err.exit_code
        except KeyboardInterrupt:
            print(f"{prog or stage_main.__module__}: interrupted", file=sys.stderr, flush=True)
            return 130
        except BrokenPipeError:  # the output piped into a reader that stopped (stas bundle --list | head)
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 0
        except Exception:  # noqa: BLE001 - every other failure is an internal fault, reported in one line
            print(_internal_fault(prog or stage_main.__module__, debug), file=sys.stderr, flush=True)
            return EXIT_INTERNAL

    return main


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--debug"]:  # stas --debug <stage> ...: the stage's own --debug
        argv = [*argv[1:2], "--debug", *argv[2:]]
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in STAGES:
        print(f"stas: unknown stage {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(STAGES[name][0])
    return module.main(rest, prog=f"stas {name}")


if __name__ == "__main__":
    sys.exit(main())
