"""Segmentation's ensembles: vote or mean of prediction folders, image by image.

``stas ensemble MEMBER [MEMBER ...] --out DIR`` reads ``<stem>.png`` (any grey level, p * 255) or
``<stem>.npy`` (probabilities in [0, 1]) from every member folder and writes ``DIR/<stem>.png`` (mode L,
0/255):

- ``--method vote`` (default): each member pixel is foreground where its probability is above
  ``--binarize-threshold`` (default 0: any PNG value > 0, as the published STAS masks need); the output is the
  strict (optionally weighted) majority; an exact tie, possible only with an even number of members or with
  weights, goes to ``--tie`` (default background).
- ``--method mean``: the (weighted) mean probability, foreground where it is above ``--threshold`` (default
  0.5; strictly above, so that the mean of binary masks gives the same answer as the vote with ties to
  background).

Images are read one at a time. The outputs go into a temporary folder beside ``DIR`` that replaces ``DIR``
only when every image has been handled, so ``DIR`` is never half-written. The core functions :func:`vote` and
:func:`mean_probability` work on arrays of any shape (masks, probability maps, class-probability vectors) and
serve the image-level ensembles too (``tasks/classification/ensemble.py``).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from stas_pipeline.core.errors import NothingWrittenError
from stas_pipeline.core.fileio import atomic_folder, write_png
from stas_pipeline.core.images import InputFolderError, has_suffix
from stas_pipeline.core.mask_io import prediction_files, read_grey_png, size_text
from stas_pipeline.core.problems import Problems

STAGE = "ensemble"
METHODS = ("vote", "mean")
TIES = ("background", "foreground")
MEMBER_SUFFIXES = (".png", ".npy")


# --- core: arrays of any shape ----------------------------------------------------------------------------


def check_weights(weights: Sequence[float] | None, n: int) -> np.ndarray | None:
    """``weights`` as an array of ``n`` finite, non-negative numbers not all 0 (None stays None); ValueError."""
    if weights is None:
        return None
    w = np.asarray(weights, dtype=np.float64)
    if w.shape != (n,):
        raise ValueError(f"{len(w)} weights for {n} members")
    if not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
        raise ValueError(f"weights must be finite, non-negative and not all 0, got {list(weights)}")
    return w


def _check_shapes(arrays: Sequence[np.ndarray]) -> None:
    if not arrays:
        raise ValueError("no members to ensemble")
    shapes = {np.shape(a) for a in arrays}
    if len(shapes) > 1:
        raise ValueError(f"members differ in shape: {sorted(shapes)}")


def vote(
    masks: Sequence[np.ndarray], weights: Sequence[float] | None = None, tie: str = "background"
) -> np.ndarray:
    """Strict (weighted) majority of binary masks of any one shape; nonzero counts as foreground.

    A pixel is foreground where the members voting for it hold more than half of the total weight (one vote
    each without ``weights``); an exact tie is ``tie``: ``"background"`` or ``"foreground"``. Weighted ties
    are found within a relative 1e-9 of the total, so that weights like 0.1 + 0.2 vs 0.3 still tie.
    """
    if tie not in TIES:
        raise ValueError(f"tie must be one of {TIES}, got {tie!r}")
    _check_shapes(masks)
    w = check_weights(weights, len(masks))
    if w is None:  # integer arithmetic: exact
        votes = np.zeros(np.shape(masks[0]), dtype=np.int32)
        for mask in masks:
            votes += np.asarray(mask).astype(bool)
        margin, tolerance = 2 * votes - len(masks), 0.0
    else:
        votes = np.zeros(np.shape(masks[0]), dtype=np.float64)
        for mask, wi in zip(masks, w, strict=True):
            votes += wi * np.asarray(mask).astype(bool)
        margin, tolerance = 2 * votes - w.sum(), 1e-9 * w.sum()
    if tie == "foreground":
        return margin >= -tolerance
    return margin > tolerance


def mean_probability(probs: Sequence[np.ndarray], weights: Sequence[float] | None = None) -> np.ndarray:
    """(Weighted) mean of probability arrays of any one shape, as float32."""
    _check_shapes(probs)
    w = check_weights(weights, len(probs))
    w = np.ones(len(probs)) if w is None else w
    total = np.zeros(np.shape(probs[0]), dtype=np.float64)
    for p, wi in zip(probs, w, strict=True):
        total += wi * np.asarray(p, dtype=np.float64)
    return (total / w.sum()).astype(np.float32)


# --- folders of masks or probability maps -------------------------------------------------------------------


def _read_member(path: Path, problems: Problems) -> tuple[np.ndarray, float]:
    """A member's values and the value that stands for probability 1 (255 for PNG, 1 for .npy)."""
    if path.suffix.lower() == ".png":
        return read_grey_png(path, problems), 255.0
    array = np.load(path, allow_pickle=False)
    if array.ndim != 2:
        raise ValueError(f"expected a 2-D (height, width) probability array, got shape {array.shape}")
    if not (np.issubdtype(array.dtype, np.number) or array.dtype == bool) or np.iscomplexobj(array):
        raise ValueError(f"expected probabilities, got dtype {array.dtype}")
    if array.size and not (np.all(np.isfinite(array)) and array.min() >= 0 and array.max() <= 1):
        raise ValueError("expected probabilities in [0, 1]; found values outside (or NaN/inf)")
    return array, 1.0


def _members_of(stem: str, files: list[dict[str, list[Path]]], members: Sequence[Path]) -> list[Path]:
    """The file of ``stem`` in each member folder; raises ``ValueError`` naming the folders that lack it."""
    missing = [str(m) for m, f in zip(members, files, strict=True) if stem not in f]
    if missing:
        raise ValueError(f"missing in {len(missing)} of {len(members)} member folders: {', '.join(missing)}")
    ambiguous = [p for f in files for p in f[stem] if len(f[stem]) > 1]
    if ambiguous:
        raise ValueError(
            f"more than one file for this image in a member folder: {', '.join(map(str, ambiguous))}"
        )
    return [f[stem][0] for f in files]


def _ensemble_image(
    paths: list[Path],
    problems: Problems,
    method: str,
    weights: Sequence[float] | None,
    tie: str,
    binarize_threshold: float,
    threshold: float,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Read one image's members; return the binary mask and, for ``mean``, the mean probability."""
    values = []
    for path in paths:
        try:
            values.append(_read_member(path, problems))
        except (OSError, EOFError, ValueError, Image.DecompressionBombError) as e:
            raise ValueError(f"member {path}: cannot use it: {e}") from None
    shapes = [v.shape for v, _ in values]
    if len(set(shapes)) > 1:
        sizes = ", ".join(f"{p.parent} {size_text(s)}" for p, s in zip(paths, shapes, strict=True))
        raise ValueError(f"members differ in size (width x height): {sizes}")
    if method == "vote":
        return vote([v > binarize_threshold * scale for v, scale in values], weights, tie), None
    for path, (v, scale) in zip(paths, values, strict=True):
        if scale == 255 and v.max() == 1:
            problems.warn(path, "only values 0 and 1: read as p * 255 this is p < 0.004; save masks as 0/255")
    prob = mean_probability([v / np.float32(scale) for v, scale in values], weights)
    return prob > threshold, prob


def ensemble_folders(
    members: Sequence[str | Path],
    out: str | Path,
    method: str = "vote",
    weights: Sequence[float] | None = None,
    tie: str = "background",
    binarize_threshold: float = 0.0,
    threshold: float = 0.5,
    save_probs: str | Path | None = None,
    overwrite: bool = False,
) -> Problems:
    """Ensemble every image found in any member folder into ``out/<stem>.png`` (0/255), streaming.

    An image missing from some member folders, with members of different sizes or unreadable members is
    reported and skipped. ``save_probs`` (``mean`` only) receives the mean probability as uint8 PNG (p * 255).
    Both folders are written atomically (see :func:`atomic_folder`). Raises :class:`InputFolderError` for
    unusable folders or options, :class:`OutputExistsError` for an existing non-empty output without
    ``overwrite`` and :class:`NothingWrittenError` when every image was skipped.
    """
    members = [Path(m) for m in members]
    out = Path(out)
    save_probs = None if save_probs is None else Path(save_probs)
    if method not in METHODS:
        raise InputFolderError(f"unknown method {method!r} (known: {', '.join(METHODS)})")
    if save_probs is not None and method != "mean":
        raise InputFolderError("--save-probs needs --method mean")
    if save_probs is not None and save_probs.resolve() == out.resolve():
        raise InputFolderError(f"{out}: the probability folder must differ from the output folder")
    if len({m.resolve() for m in members}) < len(members):
        raise InputFolderError("a member folder is given twice; use --weights to count a member more")
    try:
        check_weights(weights, len(members))
    except ValueError as e:
        raise InputFolderError(str(e)) from None
    files = [prediction_files(m, MEMBER_SUFFIXES) for m in members]
    stems = sorted(set().union(*files))
    if not stems:
        raise InputFolderError(f"no {' or '.join(MEMBER_SUFFIXES)} files in the member folders")

    problems = Problems(STAGE)
    problems.count("written", 0)
    with ExitStack() as stack:
        tmp = stack.enter_context(atomic_folder(out, overwrite))
        probs_tmp = None if save_probs is None else stack.enter_context(atomic_folder(save_probs, overwrite))
        for stem in tqdm(stems, desc=STAGE, unit="image", file=sys.stderr):
            try:
                mask, prob = _ensemble_image(
                    _members_of(stem, files, members),
                    problems,
                    method,
                    weights,
                    tie,
                    binarize_threshold,
                    threshold,
                )
            except ValueError as e:
                with tqdm.external_write_mode(file=sys.stderr):
                    problems.skip(f"{stem}.png", str(e))
                continue
            if probs_tmp is not None:
                write_png(probs_tmp / f"{stem}.png", np.round(prob * 255).astype(np.uint8))
            write_png(tmp / f"{stem}.png", mask.astype(np.uint8) * 255)
            problems.count("written")
        if not problems.counts["written"]:
            raise NothingWrittenError(
                f"{out}: every image was skipped; nothing written, the folder left as it was"
            )
    return problems


def is_prediction_folder(path: Path) -> bool:
    """Whether segmentation reads ``path``: anything but a ``.csv`` (a folder of masks or probability maps; one
    that is missing is reported by :func:`ensemble_folders`)."""
    return not has_suffix(path, (".csv",))


def ensemble_command(args: argparse.Namespace) -> Problems:
    """``stas ensemble`` of folders: :func:`ensemble_folders` with the command's options and defaults."""
    return ensemble_folders(
        args.members,
        args.out,
        method=args.method or "vote",
        weights=args.weights,
        tie=args.tie,
        binarize_threshold=0.0 if args.binarize_threshold is None else args.binarize_threshold,
        threshold=0.5 if args.threshold is None else args.threshold,
        save_probs=args.save_probs,
        overwrite=args.overwrite,
    )
