"""One line, not a traceback, when a bundle refuses its input (a stale cache, a bad datalist, missing weights).

MONAI's ``python -m monai.bundle run`` lets every exception end the process with a long traceback, our error
buried in it behind "Failed to instantiate ...". The bundles call :func:`one_line_errors` first thing in
``initialize``; from then on an uncaught exception whose chain holds one of :data:`INPUT_ERRORS` prints
``error: <its message>`` alone (exit status 1). Any other exception keeps its full traceback.
"""

from __future__ import annotations

import sys
from types import TracebackType

from stas_pipeline.core.bundles import BundleError
from stas_pipeline.core.datalist import DatalistError
from stas_pipeline.core.lmdb_cache import CacheError
from stas_pipeline.core.models import WeightsError
from stas_pipeline.core.run_recorder import CheckpointError

INPUT_ERRORS = (CacheError, DatalistError, WeightsError, CheckpointError, BundleError, FileExistsError)


def input_error(err: BaseException | None) -> BaseException | None:
    """The first of :data:`INPUT_ERRORS` in ``err``'s chain of causes, if any."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, INPUT_ERRORS):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


def _hook(kind: type[BaseException], err: BaseException, tb: TracebackType | None, fallback=sys.excepthook) -> None:
    found = input_error(err)
    if found is None:
        fallback(kind, err, tb)
    else:
        print(f"error: {found}", file=sys.stderr, flush=True)


def one_line_errors() -> bool:
    """Install the hook (idempotent); returns True so a bundle can list it in ``initialize``."""
    sys.excepthook = _hook
    return True
