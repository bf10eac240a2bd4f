"""Sharded, resumable ``stas predict`` (``core/sharding.py``): two torchrun processes (gloo, CPU) and two parts run
one after another, then ``--merge``, write the very bytes of one process for masks (segmentation), an image-level
CSV (classification) and whole slides; a part missing is refused in one line; ``kill -9`` in the middle of a list
of slides, then ``--continue``, predicts only what was not finished and ends with an uninterrupted run's outputs.
Real Lite0 runs trained one epoch by MONAI's runner, real images and pyramidal TIFFs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from tiny_runs import train

from stas_pipeline import cli
from stas_pipeline.core.sharding import Shard, ShardError, records_folder, shard_of
from stas_pipeline.core.synthetic import make_dataset, make_fundus_dataset
from stas_pipeline.tasks.slide.synthetic import SyntheticSlide

REPO = Path(__file__).resolve().parents[1]
SLIDE_OPTIONS = ["--scale", "4", "--thumbnail", "200", "--batch-size", "8"]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[str]]:
    """Per kind, the ``stas predict`` arguments but ``--out``: masks of 7 STAS-like images, a classification CSV
    of 12 fundus-like images, 4 whole slides."""
    root = tmp_path_factory.mktemp("sharding")
    seg, cls = root / "seg", root / "cls"
    images, masks = make_dataset(seg / "data", n=7, height=48, width=64)
    make_fundus_dataset(cls / "data", n=12, size=48, seed=3)
    for folder, source in ((seg, ["--images", str(images), "--masks", str(masks)]),
                           (cls, ["--labels-csv", str(cls / "data" / "labels.csv")])):
        assert cli.main(["make-datalist", *source, "--folds", "2", "--out", str(folder / "datalist.json")]) == 0
        bundle = "deeplab_lite0" if folder == seg else "fundus_lite0"
        assert cli.main(["build-lmdb", "--datalist", str(folder / "datalist.json"), "--out", str(folder / "cache"),
                         "--bundle", bundle, "--image-size", "32", "--no-progress"]) == 0
    seg_run, cls_run = train(seg, "deeplab_lite0") / "best.pt", train(cls, "fundus_lite0") / "best.pt"
    for k in range(4):
        SyntheticSlide(360, 480, seed=k, glomeruli=500, radius=(10, 22)).write(
            root / "slides" / f"s{k}.tif", levels=2, tile=128, compression="zlib")
    common = ["--workers", "0", "--device", "cpu", "--batch-size", "3"]
    return {"masks": ["--checkpoint", str(seg_run), "--images", str(images), *common, "--save-probs"],
            "csv": ["--checkpoint", str(cls_run), "--images", str(cls / "data" / "images"), *common],
            "slides": ["--checkpoint", str(seg_run), "--slides", str(root / "slides"), "--device", "cpu",
                       *SLIDE_OPTIONS]}


def outputs(out: Path, kind: str) -> list[str]:
    """``--out`` (and ``--save-probs``) for a kind: masks also keep their probability maps beside."""
    return [str(out), str(out.with_name(out.name + "_probs"))] if kind == "masks" else [str(out)]


def out_name(kind: str) -> str:
    return "scores.csv" if kind == "csv" else kind


def predict(kind: str, inputs: dict[str, list[str]], out: Path, *extra: str) -> int:
    """``stas predict`` of ``kind`` into ``out`` in this process."""
    args = inputs[kind]
    if kind == "masks":
        args = [*args, outputs(out, kind)[1]]
    return cli.main(["predict", *args, "--out", str(out), *extra])


def contents(out: Path, kind: str) -> dict[str, bytes]:
    """Every file written for ``out`` (its folder, its probability maps, or the CSV), by relative path."""
    found = {}
    for path in map(Path, outputs(out, kind)):
        files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
        found.update({str(p.relative_to(out.parent)): p.read_bytes() for p in files})
    return found


@pytest.fixture(scope="module")
def one_process(inputs, tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, bytes]]:
    """What a plain single-process run writes, per kind."""
    root = tmp_path_factory.mktemp("one_process")
    for kind in inputs:
        assert predict(kind, inputs, root / out_name(kind)) == 0
    return {kind: contents(root / out_name(kind), kind) for kind in inputs}


def test_the_split_and_the_parts_of_torchrun_and_of_a_scheduler():
    assert shard_of(environ={}) == Shard()
    assert shard_of(3, 2, {}).take(list(range(10))) == [2, 5, 8]
    both = shard_of(2, 1, {"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1"})
    assert (both.index, both.count, both.name, both.device("cpu")) == (3, 4, "part-3-of-4", "cpu")
    if torch.cuda.device_count() >= 2:
        assert both.device("cuda") == "cuda:1"  # each process its own GPU
    else:
        with pytest.raises(ShardError, match="one process per GPU"):
            both.device("cuda")
    with pytest.raises(ShardError, match="not in 0..1"):
        shard_of(2, 2, {})
    assert sorted(i for k in range(4) for i in Shard(k, 4).take(range(10))) == list(range(10))


@pytest.mark.parametrize("kind", ["masks", "csv", "slides"])
def test_two_parts_then_merge_write_the_bytes_of_one_process(kind, inputs, one_process, tmp_path, capsys):
    out = tmp_path / out_name(kind)
    assert predict(kind, inputs, out, "--num-parts", "2", "--part-id", "0") == 0
    assert predict(kind, inputs, out, "--num-parts", "2", "--merge") == 2  # refused, one line naming the part
    assert "1 of 2 parts missing or unfinished (part-1-of-2)" in capsys.readouterr().err
    assert predict(kind, inputs, out, "--num-parts", "2", "--part-id", "0") == 2  # ran before: --continue
    assert predict(kind, inputs, out, "--num-parts", "2", "--part-id", "1") == 0
    assert predict(kind, inputs, out, "--merge") == 0
    assert not records_folder(out).exists()
    assert contents(out, kind) == one_process[kind]
    assert predict(kind, inputs, out) == 2  # an existing output, as ever
    capsys.readouterr()
    assert predict(kind, inputs, out, "--continue") == 0  # complete: nothing predicted, nothing changed
    assert "complete (no unfinished parts" in capsys.readouterr().out
    assert contents(out, kind) == one_process[kind]


def test_two_torchrun_processes_write_the_bytes_of_one_process(inputs, one_process, tmp_path):
    """One torchrun launch (two processes) runs stas predict for every kind, one after another."""
    driver = tmp_path / "driver.py"
    driver.write_text("import json, sys\nfrom stas_pipeline import cli\n"
                      "sys.exit(max(cli.main(argv) for argv in json.loads(sys.argv[1])))\n")
    argvs = [["predict", *inputs[kind], *outputs(tmp_path / out_name(kind), kind)[1:],
              "--out", str(tmp_path / out_name(kind))] for kind in inputs]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(driver), json.dumps(argvs)], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    for kind in inputs:
        assert not records_folder(tmp_path / out_name(kind)).exists()
        assert contents(tmp_path / out_name(kind), kind) == one_process[kind], kind


def test_kill_9_then_continue_predicts_only_the_unfinished_slides(inputs, one_process, tmp_path, capsys):
    """A run started with --continue is killed once a slide is recorded; the re-run names the finished ones."""
    out = tmp_path / "slides"
    argv = ["predict", *inputs["slides"], "--out", str(out), "--continue"]
    command = [sys.executable, "-m", "stas_pipeline.cli", *argv]
    record = records_folder(out) / "part-0-of-1.csv"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            if record.is_file() and record.read_text().count("\n") >= 2:  # the header and one slide
                break
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    finished = [line.split(",")[1] for line in record.read_text().splitlines()[1:]]
    assert 1 <= len(finished) < 4 and not (out / "predictions.csv").exists()
    names = {Path(f).stem for f in finished}
    assert {p.name.split("_")[0].removesuffix(".tif") for p in out.iterdir()} == names  # no partial slide in out
    capsys.readouterr()
    assert cli.main(argv) == 0
    log = capsys.readouterr()
    skipped = [line.removeprefix("skipped, complete before: ") for line in log.out.splitlines()
               if line.startswith("skipped, complete before: ")]
    assert [Path(p).name for p in skipped] == [Path(p).name for p in finished]
    assert f"complete before {len(finished)}" in log.out
    predicted = {Path(p).name for p in finished} ^ {f"s{k}.tif" for k in range(4)}
    assert {name for name in predicted if f"windows {name}" in log.err} == predicted  # only these predicted
    assert not any(f"windows {Path(p).name}" in log.err for p in finished)
    assert contents(out, "slides") == one_process["slides"]
