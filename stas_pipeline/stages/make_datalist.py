"""``stas make-datalist``: collect labelled images, hold out an inner test split, assign k folds, write a
decathlon-style datalist (``core/datalist.py``) that declares its task.

The task is ``--task``, else the one the label options given claim (its ``datalist_options``: ``--masks``
segmentation, ``--labels-csv``/``--class-folders`` classification); its ``make_datalist`` hook builds the
datalist: images paired with masks (``tasks/segmentation/datalist.py``) or numeric labels from labels CSVs and
class folders (``tasks/classification/label_sources.py``), split by ``core/splits.py``. Paths are relative to
the datalist's folder, entries sorted by image path; ``test`` holds the ``--test-fraction`` inner test split
(with labels) and the unlabelled ``--test-images``. Files and rows that cannot be used are reported and left out
(exit status 1); a problem with the whole run is one line and exit status 2, and nothing is written. Folders
are listed flat; hidden files and other extensions are ignored. The same inputs and seed give the same bytes.
"""

from __future__ import annotations

import argparse
import re
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

from stas_pipeline.cli import command
from stas_pipeline.core.cli_types import int_at_least, open_fraction
from stas_pipeline.core.datalist import DatalistError, write_datalist
from stas_pipeline.core.datalist_tables import fold_table
from stas_pipeline.core.fileio import OutputExistsError
from stas_pipeline.core.images import IMAGE_SUFFIXES
from stas_pipeline.core.problems import Problems
from stas_pipeline.core.splits import GROUP_BY
from stas_pipeline.tasks import Task, all_tasks, choose, get_task
from stas_pipeline.tasks.base import claimed_by_options
from stas_pipeline.tasks.classification.label_sources import Source, Subsample

STAGE = "make-datalist"


def _datalist_tasks() -> dict[str, Task]:
    """The registered tasks that make a datalist (have a ``make_datalist`` hook), by name."""
    return {name: t for name, t in all_tasks().items() if type(t).make_datalist is not Task.make_datalist}


def _options(task: Task) -> str:
    """The make-datalist options that claim ``task``, as the user types them."""
    return "/".join("--" + dest.replace("_", "-") for dest in task.datalist_options)


def _task(parser: argparse.ArgumentParser, args: argparse.Namespace) -> Task:
    """``--task``, else the task the label options claim; a usage error when --task misses its own options."""
    claimed = claimed_by_options(args, "datalist_options")
    if args.task is None:
        return choose(*claimed, what="the make-datalist options")
    task = get_task(args.task)
    if task.datalist_options and task.name not in claimed:
        parser.error(f"--task {task.name} goes with {_options(task)}")
    return task


def _regex(text: str) -> re.Pattern[str]:
    try:
        return re.compile(text)
    except re.error as exc:
        raise argparse.ArgumentTypeError(f"invalid regex {text!r}: {exc}") from exc


def _source(kind: str) -> Callable[[str], Source]:
    def parse(text: str) -> Source:
        return Source.parse(text, kind)

    return parse


def _subsample_spec(text: str) -> Subsample:
    try:
        return Subsample.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def _wrap(text: str, indent: str = "") -> str:
    """Wrap a paragraph for help output that keeps the epilog's line breaks (RawDescriptionHelpFormatter)."""
    return textwrap.fill(text, width=100, initial_indent=indent, subsequent_indent=indent)


class _AppendSource(argparse.Action):
    """Append to the option's own list and to the shared ``sources`` list (CSVs and class folders in their
    command-line order)."""

    def __call__(self, parser, namespace, values, option_string=None):
        for dest in (self.dest, "sources"):
            setattr(namespace, dest, [*(getattr(namespace, dest, None) or []), values])


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description=_wrap(
            "Collect labelled images - images paired with masks by file stem (segmentation), or numeric "
        "labels from labels CSVs and class folders (classification, grading) - optionally hold out a stratified "
        "inner test split, assign k folds stratified by the label (masks: by foreground area) and keeping "
        "groups together, and write a MONAI decathlon-style datalist.json. Every image is decoded in full; "
        "files and rows that cannot be used are reported (ERROR <file>: <reason>) and left out (exit status "
        "1); a problem with the whole run is one line and exit status 2."
        ),
        epilog="examples:\n"
        "  %(prog)s --images Train_Images --masks masks --out datalist.json --folds 5\n"
        "  %(prog)s --labels-csv tiles/labels.csv --label-column stas --test-fraction 0.2 --out datalist.json\n"
        "  %(prog)s --labels-csv train.csv --image-column id_code --label-column diagnosis "
        "--images train_images \\\n      --classes 0 1 2 3 4 --group-by image-size --out datalist.json\n"
        "  %(prog)s --class-folders refuge=REFUGE --class-folders origa=ORIGA --classes normal glaucoma \\\n"
        "      --subsample origa:normal:0.5 --test-fraction 0.3 --folds 4 --out datalist.json",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--out",
        required=True,
        type=Path,
        metavar="FILE",
        help="datalist JSON to write; its paths are relative to this file's folder",
    )
    tasks = _datalist_tasks()
    claims = "; ".join(f"{_options(t)}: {name}" for name, t in tasks.items() if t.datalist_options)
    parser.add_argument("--task", choices=tasks, metavar="NAME", help=f"the task the datalist is for, recorded in "
                        f"it: {', '.join(tasks)} (default: the task of the label options given: {claims})")
    parser.set_defaults(sources=None)
    seg = parser.add_argument_group("images and masks (segmentation: label = mask path)")
    seg.add_argument(
        "--images",
        type=Path,
        metavar="DIR",
        help=f"folder of training images ({' '.join(IMAGE_SUFFIXES)}, any case); with --labels-csv: a folder "
        "where the CSV's image cells are also looked up (after the CSV's own folder), by file name or, for a "
        "cell without an image extension (APTOS id_code), by stem; an image there that no CSV row names is "
        "reported (ERROR, exit status 1) and left out",
    )
    seg.add_argument(
        "--masks",
        type=Path,
        metavar="DIR",
        help="folder of single-channel PNG masks named like the images (background 0)",
    )
    num = parser.add_argument_group(
        "image-level labels (label = number)",
        _wrap(
            "Give any number of --labels-csv and --class-folders; their entries are merged. NAME= names the source "
        "(default: the file's or folder's stem); entries carry it as 'source' when sources are named, several "
        "are given, a CSV has a 'source' column (its cell wins), or --subsample is used.",
            indent="  ",
        ),
    )
    num.add_argument(
        "--labels-csv",
        action=_AppendSource,
        type=_source("csv"),
        metavar="[NAME=]FILE",
        help="CSV with an image column (a path relative to the CSV's folder, or a name looked up in --images) "
        "and a label column (a number: int when integral, else float; a row with anything else is skipped); "
        "optional columns 'group' (images of a group stay in one fold; an empty cell is a group of its own) and "
        "'source'. Repeatable",
    )
    num.add_argument(
        "--class-folders",
        action=_AppendSource,
        type=_source("folders"),
        metavar="[NAME=]DIR",
        help="DIR/<class name>/<image>: the label is the class's position in sorted class names (or in "
        "--classes), or the class name itself when every name is an integer; the names are written as "
        "'classes'. Repeatable (class names are merged over every DIR)",
    )
    num.add_argument(
        "--image-column",
        default="image",
        metavar="NAME",
        help="column of the labels CSVs holding the image (default: image)",
    )
    num.add_argument(
        "--label-column",
        default="label",
        metavar="NAME",
        help="column of the labels CSVs holding the label, e.g. stas or grade in a CSV with several "
        "(default: label); a CSV without it stops the run",
    )
    num.add_argument(
        "--classes",
        nargs="+",
        metavar="NAME",
        help="class names in label order (label = position): fixes the labels of --class-folders (a folder "
        "not named here stops the run) and requires the labels of --labels-csv to be indices 0..n-1 (a row "
        "with another label is reported and left out); for grading 0-4 give --classes 0 1 2 3 4",
    )
    num.add_argument(
        "--subsample",
        action="extend",
        nargs="+",
        type=_subsample_spec,
        default=[],
        metavar="SOURCE:LABEL:FRACTION",
        help="keep FRACTION (0 < FRACTION <= 1) of the entries of SOURCE whose label is LABEL (a number or a "
        "class name), chosen with --seed, e.g. origa:0:0.5 to halve one large source's normal class; "
        "repeatable",
    )
    common = parser.add_argument_group("splits")
    common.add_argument(
        "--test-images",
        type=Path,
        metavar="DIR",
        help="folder of unlabelled test images, listed under 'test' without a label",
    )
    common.add_argument(
        "--test-fraction",
        type=open_fraction,
        metavar="F",
        help="hold out about F (0 < F < 1) of the labelled images as an inner test split, stratified like the "
        "folds and keeping groups whole; listed under 'test' with their labels, the rest gets the folds",
    )
    common.add_argument("--folds", type=int_at_least(2), default=5, metavar="K", help="number of folds (default: 5)")
    common.add_argument(
        "--seed", type=int, default=0, metavar="N", help="seed of the test split, folds and --subsample (default: 0)"
    )
    group = common.add_mutually_exclusive_group()
    group.add_argument(
        "--group-regex",
        type=_regex,
        metavar="REGEX",
        help="regex searched in each image file name; its first capture group (or the whole "
        "match) is the group id, and a group never spans two folds (an image it does not match is left "
        "out); replaces a labels CSV's group column",
    )
    group.add_argument(
        "--group-csv",
        type=Path,
        metavar="FILE",
        help="CSV with columns image,group (image: file name or stem); a group never spans two folds (an "
        "image not in it is left out); replaces a labels CSV's group column",
    )
    group.add_argument(
        "--group-by",
        choices=GROUP_BY,
        help="image-size: the group of an image is its pixel size WIDTHxHEIGHT (e.g. 1050x1050; the grading "
        "recipe's stand-in for the clinic a photograph came from), so a size never spans two folds; also "
        "prints the label counts per size, largest first; replaces a labels CSV's group column",
    )
    common.add_argument(
        "--bins",
        type=int_at_least(1),
        default=4,
        metavar="N",
        help="quantile bins for the strata: of the foreground fraction of non-empty masks (empty masks are a "
        "bin of their own), or of non-integer labels (integer labels are strata as they are) (default: 4)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    return parser


def _check_mode(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Usage errors (exit status 2) for options that do not fit together."""
    if args.sources:
        if args.masks is not None:
            parser.error("--masks is for segmentation; it does not go with --labels-csv/--class-folders")
        if args.images is not None and not any(s.kind == "csv" for s in args.sources):
            parser.error("--images with --class-folders alone: the class folders hold the images")
        return
    if args.images is None or args.masks is None:
        parser.error("give --images and --masks (segmentation), or --labels-csv / --class-folders (image-level)")
    used = [
        opt
        for opt, value in (
            ("--classes", args.classes),
            ("--subsample", args.subsample),
            ("--image-column", args.image_column != "image"),
            ("--label-column", args.label_column != "label"),
        )
        if value
    ]
    if used:
        parser.error(f"{', '.join(used)}: only with --labels-csv / --class-folders")


@command
def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    _check_mode(parser, args)
    task = _task(parser, args)
    if args.out.is_dir():
        raise DatalistError(f"{args.out}: is a folder; --out names the datalist JSON file")
    if args.out.exists() and not args.overwrite:
        raise OutputExistsError(args.out)
    problems = Problems(STAGE)
    datalist = task.make_datalist(args, problems)
    write_datalist(args.out, datalist, task.name, task.label_kind, overwrite=args.overwrite)
    print(fold_table(datalist, task.label_kind, by_group=args.group_by is not None))
    print(f"wrote {args.out}")
    return problems.finish()


if __name__ == "__main__":
    sys.exit(main())
