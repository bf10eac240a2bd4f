"""Behaviour before and after a refactor: every task's ``stas demo`` run at one seed and thread count, reduced to a
fingerprint (the figures of ``summary.json`` to the 4th decimal, a SHA-256 of every prediction file and of each
submission member), and two fingerprints compared.

    python benchmarks/demo_compare.py run --out /tmp/before            # writes /tmp/before/fingerprint.json
    python benchmarks/demo_compare.py run --out /tmp/after
    python benchmarks/demo_compare.py diff /tmp/before/fingerprint.json /tmp/after/fingerprint.json
    python benchmarks/demo_compare.py refingerprint /tmp/before        # again, without running the demos

To fingerprint an older checkout with the same environment, put it first on the path:
``PYTHONPATH=/path/to/old/checkout python benchmarks/demo_compare.py run --out /tmp/before``. Timings and paths
are left out (they differ run to run); ``diff`` prints each difference and exits 1 when there is any.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

TASKS = ("segmentation", "classification", "grading", "slide")
LEFT_OUT = {"seconds", "total_seconds", "outputs", "data"}  # timings and paths: not behaviour


def _figures(value, key: str = ""):
    """``summary.json`` without timings and paths, floats to the 4th decimal."""
    if isinstance(value, dict):
        return {k: _figures(v, k) for k, v in sorted(value.items()) if k not in LEFT_OUT}
    if isinstance(value, list):
        return [_figures(v, key) for v in value]
    if isinstance(value, float):
        return round(value, 4)
    if isinstance(value, str) and os.sep in value:
        return Path(value).name
    return value


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def fingerprint(out: Path) -> dict:
    """Figures and prediction checksums of one demo's output folder (the folder's own path, which CSVs of
    image-level predictions hold, replaced by ``<OUT>`` first)."""
    files = {}
    for path in sorted((out / "predictions").rglob("*")):
        if path.is_file():
            files[str(path.relative_to(out))] = _digest(path.read_bytes().replace(str(out).encode(), b"<OUT>"))
    if (out / "submission.zip").is_file():
        with zipfile.ZipFile(out / "submission.zip") as archive:
            for name in sorted(archive.namelist()):
                files[f"submission.zip:{name}"] = _digest(archive.read(name))
    summary = json.loads((out / "summary.json").read_text())
    return {"figures": _figures(summary), "files": files}


def refingerprint(folder: Path) -> None:
    """Fingerprint again the demos already run into ``folder`` (after a change to :func:`fingerprint`)."""
    result = json.loads((folder / "fingerprint.json").read_text())
    for task in TASKS:
        if (folder / task / "summary.json").is_file():
            result[task] = fingerprint(folder / task)
    (folder / "fingerprint.json").write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")


def run(out: Path, tasks: list[str], threads: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    result = {"threads": threads}
    for task in tasks:
        folder = out / task
        cmd = [sys.executable, "-m", "stas_pipeline.cli", "demo", "--task", task, "--out", str(folder),
               "--overwrite", "--seed", "0"]
        print("$ " + " ".join(cmd), flush=True)
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        (out / f"{task}.log").write_text(proc.stdout + proc.stderr)
        if proc.returncode != 0:
            print(f"ERROR {out / (task + '.log')}: demo --task {task} exited {proc.returncode}", file=sys.stderr)
            result[task] = {"exit": proc.returncode}
            continue
        result[task] = fingerprint(folder)
        print(f"{task}: {len(result[task]['files'])} files, figures {json.dumps(result[task]['figures'])[:300]}",
              flush=True)
    return result


def diff(a: dict, b: dict, where: str = "") -> list[str]:
    """Every path at which two fingerprints differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        lines = []
        for key in sorted(a.keys() | b.keys()):
            if key not in a or key not in b:
                lines.append(f"{where}/{key}: only in {'after' if key not in a else 'before'}")
            else:
                lines += diff(a[key], b[key], f"{where}/{key}")
        return lines
    return [] if a == b else [f"{where}: {a!r} != {b!r}"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    run_p = sub.add_parser("run", help="run the demos and write OUT/fingerprint.json")
    run_p.add_argument("--out", type=Path, required=True, help="folder for the demos' outputs and the fingerprint")
    run_p.add_argument("--tasks", nargs="+", choices=TASKS, default=list(TASKS), help="tasks (default: all four)")
    run_p.add_argument("--threads", type=int, default=2, help="OMP/MKL threads of each demo (default: 2)")
    again = sub.add_parser("refingerprint", help="fingerprint the outputs of an earlier run again")
    again.add_argument("folder", type=Path)
    diff_p = sub.add_parser("diff", help="compare two fingerprints; exit 1 on any difference")
    diff_p.add_argument("before", type=Path)
    diff_p.add_argument("after", type=Path)
    args = parser.parse_args()
    if args.command == "run":
        args.out.mkdir(parents=True, exist_ok=True)
        result = run(args.out, args.tasks, args.threads)
        (args.out / "fingerprint.json").write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
        return 0 if all("exit" not in result[t] for t in args.tasks) else 1
    if args.command == "refingerprint":
        refingerprint(args.folder)
        return 0
    before, after = (json.loads(p.read_text()) for p in (args.before, args.after))
    lines = diff(before, after)
    for line in lines:
        print(line)
    n_files = sum(len(before.get(t, {}).get("files", {})) for t in TASKS)
    print(f"{len(lines)} difference(s) over {n_files} prediction files and the figures of {len(TASKS)} demos")
    return 1 if lines else 0


if __name__ == "__main__":
    sys.exit(main())
