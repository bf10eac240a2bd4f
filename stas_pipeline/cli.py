"""``stas``: one command with a sub-command per pipeline stage.

Each stage is a module with ``main(argv) -> int``; ``stas <stage> --help`` shows the stage's own options.
"""

from __future__ import annotations

import importlib
import sys

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
    "demo": (
        "stas_pipeline.stages.demo", "every stage end to end on a synthetic (or --data) set, with a summary"),
    "experiments": (
        "stas_pipeline.stages.experiments", "table of training runs: CV/test scores and the knobs that differ"),
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
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
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
