"""Run one pipeline command as its own process under ``/usr/bin/time``: its wall time and peak RSS, for the
benchmarks that time stage after stage (``slide_scale.py``, ``slide_mosaic.py``)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STAS = [sys.executable, "-m", "stas_pipeline.cli"]


def measured(name: str, argv: list[str], out: Path, results: dict) -> None:
    """Run ``argv`` from the repository root; record ``{"seconds", "peak_rss_mib"}`` as ``results[name]`` and
    keep its output in ``out/<name>.log``. A failing command ends the benchmark, naming the log."""
    report = out / f"{name}.time"
    start = time.perf_counter()
    proc = subprocess.run(["/usr/bin/time", "-f", "%M", "-o", str(report), *argv], cwd=REPO, text=True,
                          capture_output=True)
    seconds = time.perf_counter() - start
    (out / f"{name}.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed ({proc.returncode}); see {out / f'{name}.log'}")
    results[name] = {"seconds": round(seconds, 1), "peak_rss_mib": round(int(report.read_text().split()[-1]) / 1024)}
    print(name, results[name], flush=True)
