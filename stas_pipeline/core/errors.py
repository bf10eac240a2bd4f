"""The one error family of the pipeline and its exit codes.

Every refusal a user can act on (a missing file, a bad option, a stale cache, ...) is a :class:`StasError`:
``stas`` prints it as one line ``ERROR <file>: <reason>`` and exits with its :attr:`~StasError.exit_code`
(:func:`stas_pipeline.cli.command`). Anything else is an internal fault (exit :data:`EXIT_INTERNAL`).

MONAI's ``python -m monai.bundle run`` lets every exception end the process with a long traceback, our error
buried in it behind "Failed to instantiate ...". The bundles call :func:`one_line_errors` first thing in
``initialize``; from then on an uncaught exception whose chain holds a :class:`StasError` (or a
``FileExistsError``) prints ``ERROR <its message>`` alone (exit status 1). Any other exception keeps its full
traceback.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from types import TracebackType

EXIT_DONE = 0  # every input done
EXIT_SKIPPED = 1  # some inputs skipped, each named on its own line
EXIT_NOTHING = 2  # nothing could be done, or bad usage
EXIT_INTERNAL = 3  # an internal fault (a bug): the traceback is shown with --debug or saved to a log file


def debugging() -> bool:
    """``STAS_DEBUG`` set (not empty, not 0): tracebacks and every log line reach the terminal."""
    return os.environ.get("STAS_DEBUG", "") not in ("", "0")


class StasError(Exception):
    """A refusal the user can act on; the message names the file at fault first, then the reason."""

    exit_code = EXIT_NOTHING


class NothingWrittenError(StasError, RuntimeError):
    """Every input was skipped (each already reported): nothing could be done, the output was left as it was."""


@contextmanager
def refused(kinds: tuple[type[BaseException], ...] = (OSError, ValueError),
            as_error: type[StasError] = StasError) -> Iterator[None]:
    """Within it, an exception of ``kinds`` (a file that cannot be read or written, a value the input gets wrong)
    becomes ``as_error`` with the same message: a refusal in one line (exit 2), not an internal fault. A
    StasError passes through as it is."""
    try:
        yield
    except StasError:
        raise
    except kinds as err:
        raise as_error(str(err)) from err


def input_error(err: BaseException | None) -> BaseException | None:
    """The first :class:`StasError` (or ``FileExistsError``) in ``err``'s chain of causes, if any."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, (StasError, FileExistsError)):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


def _hook(kind: type[BaseException], err: BaseException, tb: TracebackType | None, fallback=sys.excepthook) -> None:
    found = input_error(err)
    if found is None:
        fallback(kind, err, tb)
    else:
        print(f"ERROR {found}", file=sys.stderr, flush=True)


def one_line_errors() -> bool:
    """Install the hook (idempotent); returns True so a bundle can list it in ``initialize``."""
    sys.excepthook = _hook
    return True
