"""Per-file problem reporting shared by every stage: one line per problem, a summary, an exit code."""

from __future__ import annotations

import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from stas_pipeline.core.errors import EXIT_DONE, EXIT_NOTHING, EXIT_SKIPPED


@dataclass
class Problems:
    """Collects skipped inputs and warnings of one stage run.

    Each problem is printed at once as ``ERROR <file>: <reason>`` (or ``WARNING``) on stderr, so
    that a long run shows them as they happen; :meth:`summary` and :meth:`exit_code` close the run. ``done`` names
    the counters of the stage's outputs (``written``, ``scored``...): skipped inputs and none of them counted
    means nothing could be done.
    """

    stage: str
    done: tuple[str, ...] = ()
    skipped: list[tuple[str, str]] = field(default_factory=list)
    warnings: list[tuple[str, str]] = field(default_factory=list)
    counts: Counter = field(default_factory=Counter)

    def skip(self, path: str | Path, reason: str) -> None:
        """Record that ``path`` was not processed, and why."""
        self.skipped.append((str(path), reason))
        print(f"ERROR {path}: {reason}", file=sys.stderr, flush=True)

    def warn(self, path: str | Path, reason: str) -> None:
        """Record a problem that did not stop ``path`` from being processed."""
        self.warnings.append((str(path), reason))
        print(f"WARNING {path}: {reason}", file=sys.stderr, flush=True)

    def count(self, what: str, n: int = 1) -> None:
        """Add ``n`` to a named counter shown in the summary (e.g. ``written``, ``clipped points``)."""
        self.counts[what] += n

    def summary(self) -> str:
        parts = [f"{k} {v}" for k, v in self.counts.items()]
        parts.append(f"skipped {len(self.skipped)}")
        if self.warnings:
            parts.append(f"warnings {len(self.warnings)}")
        return f"{self.stage}: " + ", ".join(parts)

    def exit_code(self) -> int:
        """0 when nothing was skipped; 2 when inputs were skipped and no ``done`` counter counted anything; else 1."""
        if not self.skipped:
            return EXIT_DONE
        return EXIT_NOTHING if self.done and not any(self.counts[name] for name in self.done) else EXIT_SKIPPED

    def finish(self) -> int:
        """Print the summary (stdout) and return the exit code."""
        print(self.summary(), flush=True)
        return self.exit_code()
