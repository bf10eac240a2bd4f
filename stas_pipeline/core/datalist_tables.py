"""The tables ``stas make-datalist`` prints: entries per fold (and per source, per group) of a datalist."""

from __future__ import annotations

from collections import Counter

import numpy as np

GROUP_ROWS = 15  # the group table shows this many groups, largest first, and sums the rest as "other"


def fold_table(datalist: dict, label_kind: str, by_group: bool = False) -> str:
    """Per-fold table of a datalist: for masks (``label_kind`` "mask"), count, empty-mask count and mean
    foreground fraction (the entries' ``foreground``); for numeric labels, the count per label (or the mean of
    non-integer labels). A labelled inner test split adds a ``test`` row; entries with a ``source`` add a table
    per source. ``by_group`` (for ``--group-by image-size``) adds the same table per group with the fold each
    group is in (``test``: the inner test split), largest groups first, the groups beyond the first
    ``GROUP_ROWS`` summed as ``other``. The folds are ``0..folds-1`` (a datalist without ``folds``: those its
    entries name)."""
    training = datalist["training"]
    labelled_test = [e for e in datalist.get("test", []) if "label" in e]
    folds = range(datalist["folds"]) if "folds" in datalist else sorted({e["fold"] for e in training if "fold" in e})
    rows = [(str(f), [e for e in training if e.get("fold") == f]) for f in folds]
    rows.append(("all", training))
    if labelled_test:
        rows.append(("test", labelled_test))
    everything = training + labelled_test
    masks = label_kind == "mask"
    lines = _mask_table("fold", rows) if masks else _label_table("fold", rows, everything)
    sources = sorted({e["source"] for e in everything if "source" in e})
    if sources and not masks:
        lines.append("")
        by_source = [(s, [e for e in everything if e.get("source") == s]) for s in sources]
        test_counts = {s: sum(1 for e in labelled_test if e.get("source") == s) for s in sources}
        lines += _label_table("source", by_source, everything, ("test", test_counts) if labelled_test else None)
    if by_group and any("group" in e for e in everything):
        group_rows, part = _group_rows(everything)
        lines.append("")
        lines += (
            _mask_table("group", group_rows, ("fold", part))
            if masks
            else _label_table("group", group_rows, everything, ("fold", part))
        )
    if datalist.get("classes"):
        lines.append("classes: " + ", ".join(f"{i}={c}" for i, c in enumerate(datalist["classes"])))
    return "\n".join(lines)


def _group_rows(entries: list[dict]) -> tuple[list[tuple[str, list[dict]]], dict[str, str]]:
    """Rows of the group table (largest first, then by name; beyond ``GROUP_ROWS`` one ``other`` row) and
    the part each row is in (a fold number or ``test``; ``-`` when its entries are in several)."""
    members: dict[str, list[dict]] = {}
    for e in entries:
        if "group" in e:
            members.setdefault(str(e["group"]), []).append(e)
    ordered = sorted(members.items(), key=lambda item: (-len(item[1]), item[0]))
    rows = ordered[:GROUP_ROWS]
    if len(ordered) > GROUP_ROWS:
        rows.append(("other", [e for _, group in ordered[GROUP_ROWS:] for e in group]))
    part = {}
    for name, group in rows:
        places = {str(e["fold"]) if "fold" in e else "test" for e in group}
        part[name] = places.pop() if len(places) == 1 else "-"
    return rows, part


def _mask_table(
    title: str, rows: list[tuple[str, list[dict]]], extra: tuple[str, dict[str, object]] | None = None
) -> list[str]:
    """Count, empty-mask count and mean foreground fraction per row; ``extra`` as in :func:`_label_table`."""
    width = max([len(title), 5] + [len(name) for name, _ in rows])
    lines = [f"{title:>{width}} {'count':>6}" + (f" {extra[0]:>6}" if extra else "") + f" {'empty':>6} {'mean fg':>8}"]
    for name, entries in rows:
        fg = [e["foreground"] for e in entries]
        empty = sum(1 for v in fg if v == 0)
        line = f"{name:>{width}} {len(fg):>6}" + (f" {extra[1][name]!s:>6}" if extra else "")
        lines.append(line + f" {empty:>6} {np.mean(fg) if fg else 0.0:>8.4f}")
    return lines


def _label_table(
    title: str,
    rows: list[tuple[str, list[dict]]],
    everything: list[dict],
    extra: tuple[str, dict[str, object]] | None = None,
) -> list[str]:
    """Count and per-label counts (or the mean label) per row; ``extra``: (heading, value per row name), a
    column after the count."""
    labels = [e["label"] for e in everything]
    discrete = all(isinstance(v, int) for v in labels) and len(set(labels)) <= 20
    values = sorted(set(labels)) if discrete else []
    width = max([len(title), 5] + [len(name) for name, _ in rows])
    head = f"{title:>{width}} {'count':>6}" + (f" {extra[0]:>6}" if extra else "")
    head += "".join(f" {v:>6}" for v in values) if discrete else f" {'mean':>8}"
    lines = [head]
    for name, entries in rows:
        line = f"{name:>{width}} {len(entries):>6}" + (f" {extra[1][name]!s:>6}" if extra else "")
        if discrete:
            counts = Counter(e["label"] for e in entries)
            line += "".join(f" {counts[v]:>6}" for v in values)
        else:
            line += f" {np.mean([e['label'] for e in entries]) if entries else 0.0:>8.4f}"
        lines.append(line)
    return lines

