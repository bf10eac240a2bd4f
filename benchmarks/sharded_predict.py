"""Sharded prediction against one process: ``stas predict`` on a folder of images (or slides) once as one
process, once under ``torchrun --nproc_per_node N`` (every process a part, rank 0 merging), both into a fresh
folder; prints the wall time of each, the speed-up, and whether the two outputs are byte for byte the same
(every file of ``--out``, and of ``--save-probs`` with ``--probs``).

    python benchmarks/sharded_predict.py --checkpoint runs/deeplab_lite0/fold*/best.pt \\
        --images /work/shared/data/stas_public/Train_Images --nproc 2 --probs -- --tta hv --batch-size 4

Arguments after ``--`` go to both ``stas predict`` runs as they are (not ``--out``, ``--save-probs``). With
``--csv`` (image-level runs) ``--out`` is a CSV.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def files_of(paths: list[Path]) -> dict[str, bytes]:
    """Every file under ``paths`` (folders or files), by path relative to their parent."""
    found = {}
    for path in paths:
        files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
        found.update({str(p.relative_to(path.parent)): p.read_bytes() for p in files})
    return found


def timed(command: list[str], env: dict[str, str]) -> float:
    """Run ``command`` (its output to this terminal's stderr); its wall time in seconds."""
    start = time.perf_counter()
    done = subprocess.run(command, env=env, stdout=sys.stderr)
    if done.returncode != 0:
        raise SystemExit(f"failed (exit {done.returncode}): {' '.join(command)}")
    return time.perf_counter() - start


def main() -> None:
    argv = sys.argv[1:]
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", nargs="+", required=True, help="best.pt of the runs to predict with")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--images", type=Path, help="folder of images")
    source.add_argument("--slides", type=Path, help="folder of whole slides")
    parser.add_argument("--nproc", type=int, default=2, help="torchrun processes (2)")
    parser.add_argument("--csv", action="store_true", help="image-level runs: --out is a CSV")
    parser.add_argument("--probs", action="store_true", help="segmentation: also compare --save-probs maps")
    parser.add_argument("--work", type=Path, help="folder for both outputs (default: a temporary one, removed)")
    args = parser.parse_args(argv[:argv.index("--")] if "--" in argv else argv)

    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        source = ["--images", str(args.images)] if args.images else ["--slides", str(args.slides)]
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        seconds, outputs = {}, {}
        for name, launcher in (("one_process", [sys.executable, "-m", "stas_pipeline.cli"]),
                               (f"torchrun_{args.nproc}", [sys.executable, "-m", "torch.distributed.run",
                                                           "--standalone", "--nproc_per_node", str(args.nproc),
                                                           "-m", "stas_pipeline.cli"])):
            out, probs = work / name / ("predictions.csv" if args.csv else "masks"), work / name / "probs"
            command = [*launcher, "predict", "--checkpoint", *args.checkpoint, *source, "--out", str(out),
                       *(["--save-probs", str(probs)] if args.probs else []), *extra]
            seconds[name] = timed(command, env)
            outputs[name] = files_of([out, *([probs] if args.probs else [])])
        one, many = outputs.values()
        report = {"inputs": str(args.images or args.slides), "files": len(one),
                  "seconds": {k: round(v, 2) for k, v in seconds.items()},
                  "speed_up": round(seconds["one_process"] / seconds[f"torchrun_{args.nproc}"], 2),
                  "byte_identical": one == many,
                  "differing": sorted(k for k in one.keys() | many.keys() if one.get(k) != many.get(k))[:10]}
        print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
