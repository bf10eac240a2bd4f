"""One round of pseudo-labelling: confident predictions become training labels of the next round's datalist.

``stas pseudo-label --datalist D.json --predictions P --out D_next.json [--high 0.98] [--low 0.02] ...``: the
datalist's task does the round. Image-level tasks (classification, grading): ``P`` is a predictions CSV of
``stas predict``, confident images join training without a fold (tasks/classification/pseudo_labels.py, which
documents the round's record and the exit codes); whole slides (a tile datalist): ``P`` is a folder of
``stas predict`` on slides, confident test tiles join training with pixel-level pseudo masks
(tasks/slide/pseudo_labels.py).

Alternating rounds (``--group A|B [--labelled-by B|A]``, the HuBMAP kidney recipe): two groups of runs label the
test data for each other, never themselves; each group keeps its own chain of datalists, each round relabels
from scratch, and the round that would train a group on its own labels is refused (see
tasks/classification/pseudo_labels.py).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from stas_pipeline.cli import command
from stas_pipeline.core.datalist import read_datalist
from stas_pipeline.tasks import get_task
from stas_pipeline.tasks.classification.pseudo_labels import group_name


def unit_interval(text: str) -> float:
    """argparse type of a probability threshold: a float in [0, 1]."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {text}")
    return value


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Add confident image-level predictions (prob >= --high: label 1, <= --low: label 0) to a "
        "datalist's training list as pseudo labels without a fold (so in every fold's training part), as round "
        "r = 1 + the highest earlier round; the test list and the folds' entries are left alone. The datalist's "
        "'pseudo_rounds' records each round, with the CV and inner-test AUC of the run behind it (--runs); a CV "
        "AUC lower than the previous round's is a warning. Slides (a folder of stas predict --slides): confident "
        "test tiles join training with pixel-level pseudo masks. --group: alternating rounds of two groups of runs.",
    )
    parser.add_argument("--datalist", type=Path, required=True, help="datalist JSON of the previous round")
    parser.add_argument("--predictions", type=Path, required=True,
                        help="predictions CSV of stas predict (image,prob,...), e.g. of the datalist's test images; "
                             "or a folder of stas predict on slides: pixel-level pseudo labels for the test tiles "
                             "of a tile datalist (see --max-uncertain)")
    parser.add_argument("--max-uncertain", type=unit_interval, default=0.01,
                        help="slides: a test tile joins training when at most this share of its pixels lies "
                             "between --low and --high (0.01); its mask is the pixels at or above --high")
    parser.add_argument("--out", type=Path, required=True, help="datalist JSON to write for the next round")
    parser.add_argument("--high", type=unit_interval, default=0.98, help="prob >= this: pseudo label 1 (0.98)")
    parser.add_argument("--low", type=unit_interval, default=0.02, help="prob <= this: pseudo label 0 (0.02)")
    parser.add_argument("--runs", type=Path, metavar="RUN_DIR",
                        help="the training run (<output_dir>/<bundle_name>) that made the predictions, recorded with "
                        "the round; image-level: its CV and inner-test AUC too; with --group: the datalist its "
                        "folds trained on (their config.json) tells which group made the predictions")
    parser.add_argument("--replace-previous", action="store_true",
                        help="drop earlier rounds' pseudo entries (default: keep them, each with its round); "
                        "implied by --group")
    alternating = parser.add_argument_group(
        "alternating rounds", "two groups of runs (A, B) label the test data for each other: A's predictions "
        "label the datalist B trains on next and B's the one A trains on next; each group keeps its own chain "
        "(D -> D_A1 -> D_A2 ..., D -> D_B1 -> ...), each round relabels from scratch, and a round that would train "
        "a group on labels it made is refused")
    alternating.add_argument("--group", type=group_name,
                             help="the group of runs that trains on --out (--datalist: the base datalist or this "
                             "group's latest)")
    alternating.add_argument("--labelled-by", type=group_name, metavar="GROUP",
                             help="the group whose runs made --predictions (default: read from --runs, the group of "
                             "the datalist it trained on; needed when that is the base datalist, as in the first "
                             "round); must differ from --group")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    return parser


@command
def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """Run the stage; 0 when written, 1 when written with rows skipped, 2 when nothing could be written."""
    args = build_parser(prog).parse_args(argv)
    return get_task(read_datalist(args.datalist).task).pseudo_label(args).finish()


if __name__ == "__main__":
    sys.exit(main())
