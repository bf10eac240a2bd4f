"""Sharded and resumable prediction: one list of inputs split over processes or jobs, each part recording what it
finished, and a merge into exactly the output one process writes.

Parts. Under ``torchrun`` (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` in the environment) each rank is a part; with
``--num-parts K --part-id I`` (a Slurm array, any scheduler) the process is part ``I`` of ``K``; both together:
part ``I * WORLD_SIZE + RANK`` of ``K * WORLD_SIZE``. Part ``i`` of ``K`` predicts ``items[i::K]`` of the task's
list (a folder's sorted images or slides, a datalist's order), so every part computes the same split.

Records, in ``<out>.parts/`` beside the output (``<out>`` a folder or a CSV):

- ``part-<i>-of-<K>.csv``: ``index,item,<the task's cells>``; a row is appended, flushed and synced once every
  output file of that item is written (each atomically), so it is the item's completion record: a killed part
  never counts a half-written item. Image-level tasks keep their CSV row in it, slides their RLE.
- ``part-<i>-of-<K>.json``: written (atomically) when the part has gone through all its items: the list's size
  and digest, and the inputs it skipped and why.
- ``tmp-*``: the files of an item being written (whole slides), moved into the output once complete.

Merge: once the ``.json`` of every part is there (all of one list), the rows in the list's order (the order of
one process) go to the task's merge (the image-level CSV; the slides' ``predictions.csv``; nothing for masks,
already in place), then the records folder is removed. Under torchrun alone rank 0 merges after a barrier
(gloo on CPU, NCCL on CUDA; the group, made only for this, lives until the process ends); with ``--num-parts``
``stas predict --merge`` does, refusing in one line while a part is missing; one process with ``--continue``
merges at its end. Every part writes into the same ``--out``: across nodes it must be on a shared file system.

Resume (``--continue``): a part's items with a row in its own record are not predicted again (one line each
names them); the others are, their stale files replaced. Without ``--continue`` an existing output is refused as
a plain run refuses it (``--overwrite`` replaces), and so is a part's own record. An output that exists with
no records folder beside it is complete (a plain run, or a merged one): ``--continue`` predicts nothing.
"""

from __future__ import annotations

import atexit
import csv
import hashlib
import io
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from stas_pipeline.core.errors import NothingWrittenError, StasError
from stas_pipeline.core.fileio import OutputExistsError, atomic_folder, atomic_path, csv_text
from stas_pipeline.core.problems import Problems

Merge = Callable[[Path, list[str], list[list[str]], bool], None]  # (out, the task's header, rows, overwrite)
COLUMNS = ["index", "item"]  # the record's columns before the task's
BARRIER_TIMEOUT = timedelta(days=2)  # how long torchrun's ranks wait for the slowest (torch's default: 10-30 min)


class ShardError(StasError, ValueError):
    """Parts that cannot be run or merged: a missing or unfinished part, parts of different lists, bad options."""


@dataclass(frozen=True)
class Shard:
    """This process's part: ``index`` of ``count``; ``rank``/``world``/``local_rank``: its torchrun process."""

    index: int = 0
    count: int = 1
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def name(self) -> str:
        return f"part-{self.index}-of-{self.count}"

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def take(self, items: Sequence) -> list:
        """This part's share of ``items``: every ``count``-th from ``index``."""
        return list(items[self.index::self.count])

    def device(self, device: str) -> str:
        """``device`` for this process: a plain ``cuda`` becomes the rank's own GPU under torchrun."""
        if not self.distributed or device != "cuda":
            return device
        if self.local_rank >= torch.cuda.device_count():
            raise ShardError(f"local rank {self.local_rank}: this node has {torch.cuda.device_count()} GPUs; start "
                             "at most one process per GPU (--nproc_per_node) with --device cuda")
        return f"cuda:{self.local_rank}"


def shard_of(num_parts: int | None = None, part_id: int | None = None,
             environ: os._Environ | dict | None = None) -> Shard:
    """The part of this process from ``--num-parts``/``--part-id`` and torchrun's environment."""
    environ = os.environ if environ is None else environ
    world = int(environ.get("WORLD_SIZE", 1))
    rank, local_rank = int(environ.get("RANK", 0)), int(environ.get("LOCAL_RANK", 0))
    if (num_parts is None) != (part_id is None):
        raise ShardError("--num-parts and --part-id go together (part I of K, I from 0)")
    parts, part = num_parts or 1, part_id or 0
    if not 0 <= part < parts:
        raise ShardError(f"--part-id {part}: not in 0..{parts - 1} (--num-parts {parts})")
    return Shard(part * world + rank, parts * world, rank, world, local_rank)


def records_folder(out: str | Path) -> Path:
    """The records folder of the output ``out``: ``<out>.parts`` beside it."""
    out = Path(out)
    return out.with_name(out.name + ".parts")


def _exists(out: Path) -> bool:
    """An output file, or a folder with something in it."""
    return out.is_file() or (out.is_dir() and any(out.iterdir()))


def _key(item: str | Path) -> str:
    return str(Path(item).resolve())


def _digest(keys: Sequence[str]) -> str:
    return hashlib.sha256("\n".join(keys).encode()).hexdigest()[:16]


def _read_rows(path: Path) -> tuple[list[str], list[list[str]]]:
    """The header and rows of a record; a last line cut short by a kill is left out."""
    text = path.read_text(encoding="utf-8") if path.is_file() else ""
    complete = text[:text.rfind("\n") + 1]
    lines = list(csv.reader(io.StringIO(complete)))
    return (lines[0], lines[1:]) if lines else ([], [])


class Journal:
    """One part's record of what it finished (see the module doc). The task calls :meth:`start` with its
    columns, then :meth:`record` for each item once all of its files are written; :meth:`staged` gives an item
    whose files are written in place (a slide's memory-mapped map) a folder that moves into the output whole."""

    def __init__(self, out: str | Path, shard: Shard, items: Sequence[str | Path], resume: bool, overwrite: bool):
        self.out, self.shard = Path(out), shard
        self.replace = resume or overwrite  # a not-finished item's stale files may be replaced
        self.folder = records_folder(out)
        self.rows_path = self.folder / f"{shard.name}.csv"
        self.marker = self.folder / f"{shard.name}.json"
        self.keys = [_key(p) for p in items]
        self.index = {k: i for i, k in enumerate(self.keys)}
        self.complete_before = not self.folder.exists() and _exists(self.out)  # a finished output
        self.header: list[str] = []
        self.rows: list[list[str]] = []  # this part's finished rows kept from an earlier run (--continue)
        if self.complete_before and not resume and not overwrite:
            raise OutputExistsError(self.out)
        if not resume and not overwrite and (self.rows_path.exists() or self.marker.exists()):
            raise ShardError(f"{self.rows_path}: exists (this part was run before); pass --continue to resume it "
                             "or --overwrite to predict it again")
        if resume:
            self.header, rows = _read_rows(self.rows_path)
            self.rows = [r for r in rows if len(r) == len(self.header) and r[0].isdigit()
                         and int(r[0]) < len(self.keys) and self.keys[int(r[0])] == r[1]]
        self._file: io.TextIOBase | None = None

    @property
    def finished(self) -> set[int]:
        """Indices of the items this part finished in an earlier run (``--continue``)."""
        return {int(r[0]) for r in self.rows}

    def start(self, header: Sequence[str]) -> None:
        """Open the record for appending, with the task's columns ``header``; the rows kept from an earlier run
        are written again (stale and cut-short lines dropped). Rows of other columns (other runs) are refused."""
        full = [*COLUMNS, *header]
        if self.rows and self.header != full:
            raise ShardError(f"{self.rows_path}: written with the columns {self.header[2:]}, these runs write "
                             f"{list(header)}; predict again without --continue")
        self.folder.mkdir(parents=True, exist_ok=True)
        self.marker.unlink(missing_ok=True)
        with atomic_path(self.rows_path, overwrite=True) as tmp:
            tmp.write_text(csv_text([full, *self.rows]), encoding="utf-8")
        self._file = self.rows_path.open("a", encoding="utf-8")

    def record(self, item: str | Path, cells: Sequence[str] = ()) -> None:
        """``item`` is finished: every file of it written; ``cells``: its row of the merged output."""
        if self._file is None:
            raise RuntimeError("Journal.record before Journal.start")
        self._file.write(csv_text([[str(self.index[_key(item)]), _key(item), *cells]]))
        self._file.flush()
        os.fsync(self._file.fileno())

    @contextmanager
    def staged(self, dest: Path) -> Iterator[Path]:
        """A new folder for one item's files; when the block ends normally its files move into ``dest`` (an
        existing one refused unless :attr:`replace`), else it is removed with what it holds."""
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix="tmp-", dir=self.folder))
        try:
            yield tmp
            files = sorted(tmp.iterdir())
            clash = next((dest / f.name for f in files if (dest / f.name).exists()), None)
            if clash is not None and not self.replace:
                raise OutputExistsError(clash)
            for f in files:
                os.replace(f, dest / f.name)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def finish(self, problems: Problems) -> None:
        """The part went through all its items: write its marker (the list, the inputs it skipped)."""
        if self._file is not None:
            self._file.close()
        self.folder.mkdir(parents=True, exist_ok=True)
        marker = {"part": self.shard.index, "parts": self.shard.count, "items": len(self.keys),
                  "digest": _digest(self.keys), "skipped": problems.skipped}
        with atomic_path(self.marker, overwrite=True) as tmp:
            tmp.write_text(json.dumps(marker, indent=1) + "\n")


def output_folder(path: str | Path, overwrite: bool, journal: Journal | None) -> AbstractContextManager[Path]:
    """Where a task writes its files: a plain run's :func:`atomic_folder` (the folder appears complete), or in a
    sharded or resumable run the folder itself, shared by the parts (each file written atomically)."""
    if journal is None:
        return atomic_folder(path, overwrite)
    Path(path).mkdir(parents=True, exist_ok=True)
    return nullcontext(Path(path))


def _agree(shard: Shard, error: Exception | None) -> None:
    """Raise ``error``, or under torchrun the first rank's error on every rank, so all stop or none."""
    if shard.distributed:
        errors: list[str | None] = [None] * shard.world
        dist.all_gather_object(errors, None if error is None else str(error))
        first = next((e for e in errors if e), None)
        if error is None and first is not None:
            raise ShardError(f"another rank: {first}")
    if error is not None:
        raise error


def _join_process_group(shard: Shard, device: str) -> None:
    """Under torchrun, the process group (NCCL for CUDA, else gloo) unless one exists. It lives until the process
    ends: made again after a ``destroy_process_group``, a rank could read the other's stale address from
    torchrun's store while that one is still merging."""
    if not shard.distributed or dist.is_initialized():
        return
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.set_device(torch.device(device))
    dist.init_process_group("nccl" if cuda else "gloo", timeout=BARRIER_TIMEOUT)
    atexit.register(dist.destroy_process_group)


def predict_in_parts(items: Sequence[Path], predict: Callable[[list[Path], Journal], Problems], out: str | Path,
                     shard: Shard, merge: Merge, resume: bool = False, overwrite: bool = False,
                     device: str = "cpu", stage: str = "predict") -> Problems:
    """Predict this part's share of ``items`` with ``predict(chosen, journal)`` (the task writing its files and
    rows), leaving out what the part finished before with ``resume``; then, when no other job has parts of this
    list (torchrun alone, or one process), merge (rank 0, after the others) with ``merge``."""
    _join_process_group(shard, device)
    journal, error = None, None
    try:
        journal = Journal(out, shard, items, resume, overwrite)
    except StasError as err:
        error = err
    _agree(shard, error)
    problems = Problems(stage)
    if journal.complete_before and not overwrite:
        print(f"{out}: complete (no unfinished parts in {journal.folder}); nothing predicted", flush=True)
        return problems
    finished = journal.finished
    chosen = []
    for i in shard.take(range(len(items))):
        if i in finished:
            print(f"skipped, complete before: {items[i]}", flush=True)
            problems.count("complete before")
        else:
            chosen.append(items[i])
    if chosen or not finished:
        done = predict(chosen, journal)
        done.counts.update(problems.counts)
        problems = done
    else:  # all finished before: the record rewritten without its stale lines
        journal.start(journal.header[len(COLUMNS):])
    journal.finish(problems)
    if shard.count != shard.world:  # parts of other jobs: stas predict --merge
        return problems
    if shard.distributed:
        dist.barrier()
    if shard.rank == 0:
        merge_parts(out, merge, shard.count, overwrite or resume, problems, echo=False)
    return problems


def _markers(folder: Path) -> dict[int, list[Path]]:
    """The parts' markers in ``folder`` by their number of parts."""
    found: dict[int, list[Path]] = {}
    for path in sorted(folder.glob("part-*-of-*.json")):
        found.setdefault(int(path.stem.rsplit("-", 1)[1]), []).append(path)
    return found


def merge_parts(out: str | Path, merge: Merge, count: int | None = None, overwrite: bool = False,
                problems: Problems | None = None, echo: bool = True, stage: str = "predict") -> Problems:
    """Merge the ``count`` parts recorded beside ``out`` (default: the one number of parts their markers name):
    their rows in the list's order to ``merge``, their skipped inputs into ``problems`` (printed with ``echo``);
    then remove the records. :class:`ShardError` in one line when a part is missing or unfinished."""
    folder = records_folder(out)
    problems = problems or Problems(stage)
    markers = _markers(folder) if folder.is_dir() else {}
    if count is None:
        if len(markers) != 1:
            found = ", ".join(f"{k} parts" for k in markers) or "no finished part"
            raise ShardError(f"{folder}: {found}; give --num-parts")
        count = next(iter(markers))
    names = [f"part-{i}-of-{count}" for i in range(count)]
    missing = [n for n in names if not (folder / f"{n}.json").is_file()]
    if missing:
        raise ShardError(f"{folder}: {len(missing)} of {count} parts missing or unfinished ({', '.join(missing)}); "
                         "run them (--part-id), or again with --continue, then merge")
    records = [json.loads((folder / f"{n}.json").read_text()) for n in names]
    if len({(r["items"], r["digest"]) for r in records}) > 1:
        raise ShardError(f"{folder}: the parts predicted different lists of inputs; run them with the same inputs")
    header, rows = None, {}
    for name in names:
        columns, part_rows = _read_rows(folder / f"{name}.csv")
        if part_rows and header is not None and columns != header:
            raise ShardError(f"{folder / name}.csv: other columns than the other parts ({columns[2:]})")
        header = columns if part_rows else header
        rows.update((int(r[0]), r[2:]) for r in part_rows if int(r[0]) < records[0]["items"])
    for path, reason in dict.fromkeys(tuple(s) for r in records for s in r["skipped"]):
        if (path, reason) in problems.skipped:
            continue
        if echo:
            problems.skip(path, reason)
        else:
            problems.skipped.append((path, reason))
    if records[0]["items"] and not rows:
        raise NothingWrittenError(f"{out}: every input was skipped; nothing written")
    merge(Path(out), (header or COLUMNS)[len(COLUMNS):], [rows[i] for i in sorted(rows)], overwrite)
    problems.count("merged", len(rows))
    shutil.rmtree(folder)
    return problems
