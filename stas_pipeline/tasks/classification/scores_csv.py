"""The predictions CSV of image-level tasks, ``image,prob,<member>...``: written by ``stas predict`` and
``stas ensemble``, read by ``stas evaluate``, ``stas ensemble`` and ``stas pseudo-label``. Light on imports, so
the stages that only read or write it start fast.

``image`` is an absolute path (a relative one is taken relative to the CSV's folder), ``prob`` the final
probability of the positive class, and one column per member model (e.g. ``fundus_lite0/fold0``), whose cells
may be empty where that member did not predict the image (out-of-fold CSVs).
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from stas_pipeline.core.errors import StasError
from stas_pipeline.core.fileio import csv_text, write_bytes
from stas_pipeline.core.images import has_suffix
from stas_pipeline.core.problems import Problems


class PredictionsError(StasError, ValueError):
    """A predictions CSV or datalist that cannot be used at all, or nothing left that can be scored."""


@dataclass
class Prediction:
    """One row of a predictions CSV."""

    image: str  # the resolved absolute path: the key predictions and datalists are joined on
    prob: float  # the row's value: the probability (classification) or the grade score (grading, column "score")
    members: dict[str, float] = field(default_factory=dict)  # member column -> value, non-empty cells only
    line: int = 0


def csv_header(path: str | Path) -> list[str] | None:
    """The first row of a ``.csv`` file; None for another suffix or a file that cannot be read."""
    if not has_suffix(path, (".csv",)):
        return None
    try:
        with Path(path).open(newline="", encoding="utf-8-sig") as f:
            return next(csv.reader(f), [])
    except (OSError, UnicodeDecodeError, csv.Error):
        return None


def is_probability_csv(path: str | Path) -> bool:
    """Whether classification reads ``path``: a ``.csv`` whose header has ``prob``, or one that is no predictions
    CSV of any task (unreadable, or without an ``image`` column), so that :func:`read_predictions_csv` says why."""
    if not has_suffix(path, (".csv",)):
        return False
    header = csv_header(path)
    return header is None or "prob" in header or "image" not in header


def image_key(text: str | Path, base: str | Path) -> str:
    """The join key of an image path: resolved, a relative path taken relative to ``base``."""
    path = Path(text)
    return str((path if path.is_absolute() else Path(base) / path).resolve())


DERIVED = ("grade",)  # columns computed from the value, not members


def _number(text: str | None, column: str) -> float:
    """A cell of ``column``: a finite number, in [0, 1] for a probability (``prob``)."""
    try:
        value = float(text)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ValueError(f"{text!r} is not a number") from None
    if not math.isfinite(value) or (column == "prob" and not 0 <= value <= 1):
        raise ValueError(f"{text} is outside [0, 1]" if column == "prob" else f"{text} is not finite")
    return value


def read_predictions_csv(path: str | Path, problems: Problems,
                         column: str = "prob") -> tuple[list[str], dict[str, Prediction]]:
    """The member column names and the usable rows (image key -> :class:`Prediction`, file order) of ``path``;
    ``column`` is the value column (``prob``, or ``score`` for grading CSVs, whose ``grade`` column is skipped).

    A row with an empty image, a value that is not a number (a ``prob`` not in [0, 1]) or an image seen before is
    reported to ``problems`` and left out; a bad member cell is a warning and counts as empty. Raises
    :class:`PredictionsError` for a file that cannot be read or lacks the ``image``/value columns.
    """
    path = Path(path)
    rows: dict[str, Prediction] = {}
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            header = reader.fieldnames or []
            missing = [c for c in ("image", column) if c not in header]
            if missing:
                raise PredictionsError(
                    f"{path}: no {' or '.join(repr(c) for c in missing)} column (header: {', '.join(header) or 'none'}"
                    f"); a predictions CSV of stas predict starts image,{column},...")
            members = [c for c in header if c and c not in ("image", column, *DERIVED)]
            for row in reader:
                line = reader.line_num
                text = (row.get("image") or "").strip()
                if not text:
                    problems.skip(f"{path}:{line}", "empty image")
                    continue
                key = image_key(text, path.parent)
                try:
                    prob = _number(row.get(column), column)
                except ValueError as e:
                    problems.skip(key, f"{column} {e} ({path} line {line})")
                    continue
                if key in rows:
                    problems.skip(key, f"listed again on line {line} of {path}; the row of line {rows[key].line} "
                                       "is used")
                    continue
                values = {}
                for name in members:
                    cell = (row.get(name) or "").strip()
                    if cell:
                        try:
                            values[name] = _number(cell, column)
                        except ValueError as e:
                            problems.warn(key, f"member {name}: {e} ({path} line {line}); taken as empty")
                rows[key] = Prediction(key, prob, values, line)
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise PredictionsError(f"{path}: cannot read the predictions CSV: {e}") from None
    return members, rows


def scores_header(members: Sequence[str], columns: Sequence[str] = ("prob",)) -> list[str]:
    """The predictions CSV's header: ``image,<columns>,<members>``."""
    return ["image", *columns, *dict.fromkeys(members)]


def scores_cells(row: dict, header: Sequence[str]) -> list[str]:
    """A row's cells as the CSV holds them (numbers with 6 decimals, empty where a member did not predict)."""
    values = (row.get(c) for c in header)
    return [f"{v:.6f}" if isinstance(v, float) else "" if v is None else str(v) for v in values]


def write_scores_csv(path: str | Path, rows: Sequence[dict], members: Sequence[str], overwrite: bool = False,
                     columns: Sequence[str] = ("prob",)) -> None:
    """The predictions CSV (``image,<columns>,<members>``; columns ``prob`` for classification, ``score,grade``
    for grading), written atomically; numbers with 6 decimals."""
    header = scores_header(members, columns)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    write_bytes(path, csv_text([header, *(scores_cells(row, header) for row in rows)]).encode(), overwrite=overwrite)
