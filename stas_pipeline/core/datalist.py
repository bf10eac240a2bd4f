"""Reading the decathlon-style datalist that ``make-datalist`` writes."""

from __future__ import annotations

from pathlib import Path

from monai.data import load_decathlon_datalist


class DatalistError(ValueError):
    """A datalist that is missing or cannot give the requested fold."""


def load_fold(datalist: str | Path, fold: int, section: str = "training") -> tuple[list[dict], list[dict]]:
    """``(train, val)`` entries of ``section``: validation is ``fold``, training every other fold.

    ``fold = -1`` trains on every entry and validates on none. Entries without a fold (pseudo-labelled ones)
    are in the training part of every fold. Raises DatalistError naming the bad value.
    """
    if not Path(datalist).is_file():
        raise DatalistError(f"datalist {datalist!s}: no such file (make one with: stas make-datalist)")
    entries = load_decathlon_datalist(str(datalist), is_segmentation=True, data_list_key=section)
    folds = sorted({e.get("fold") for e in entries if e.get("fold") is not None})
    if not isinstance(fold, int) or (fold != -1 and fold not in folds):
        raise DatalistError(f"fold {fold!r} is out of range: {datalist} has folds {folds} (or -1 for all data)")
    if fold == -1:
        return entries, []
    return [e for e in entries if e.get("fold") != fold], [e for e in entries if e.get("fold") == fold]

