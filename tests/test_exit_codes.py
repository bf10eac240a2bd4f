"""Exit codes and one-line messages as the README states them (0 done, 1 some inputs skipped, 2 nothing could be
done or bad usage), through ``stas_pipeline.cli.main`` and once more each in a process of its own: ``rle decode``
with no row decodable and ``evaluate --pred`` with no matching file exit 2 and write nothing; a checkpoint that
does not exist, a truncated ``best.json`` and ``{}`` in ``best.json`` are one line naming the file (and the
missing key); labels CSVs with an exact duplicate row or an extra column, and predictions whose every prob is
NaN, are told so."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from stas_pipeline import cli
from stas_pipeline.core.models import build_network

NETWORK = {"kind": "segmentation", "encoder_name": "tf_efficientnet_lite0", "image_size": 32}


def png(path: Path, value: int = 255, size: tuple[int, int] = (16, 12)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    mask = np.zeros(size[::-1], np.uint8)
    mask[2:8, 3:9] = value
    Image.fromarray(mask).save(path)
    return path


def rle_nothing_decodable(tmp: Path) -> tuple[list[str], list[str], Path]:
    (tmp / "m.csv").write_text("id,encoding\na,0 3\nb,1 2 3\n")  # a run at pixel 0, an odd count
    return ["rle", "decode", str(tmp / "m.csv"), "--shape", "4", "4", "--out", str(tmp / "out")], \
        [f"{tmp / 'out'}: none of the 2 rows of {tmp / 'm.csv'} could be decoded; nothing written"], tmp / "out"


def evaluate_no_match(tmp: Path) -> tuple[list[str], list[str], Path]:
    png(tmp / "pred" / "a.png")
    png(tmp / "ref" / "b.png")
    return ["evaluate", "--pred", str(tmp / "pred"), "--ref", str(tmp / "ref"), "--csv", str(tmp / "scores.csv")], \
        [f"{tmp / 'pred'}: no prediction is named like a reference mask of {tmp / 'ref'} (e.g. a.png)"], \
        tmp / "scores.csv"


def run_folder(tmp: Path, record: str | None) -> Path:
    """A run folder with a real checkpoint of a tiny network and ``record`` as its best.json."""
    run = tmp / "run" / "fold0"
    run.mkdir(parents=True)
    torch.save(build_network(**NETWORK, encoder_weights=None).state_dict(), run / "best.pt")
    if record is not None:
        (run / "best.json").write_text(record)
    png(tmp / "images" / "x.png")
    return run


def predict(tmp: Path, checkpoint: Path) -> list[str]:
    return ["predict", "--checkpoint", str(checkpoint), "--images", str(tmp / "images"), "--out", str(tmp / "masks"),
            "--device", "cpu"]


def no_such_checkpoint(tmp: Path) -> tuple[list[str], list[str], Path]:
    run = run_folder(tmp, json.dumps({"network": NETWORK, "image_size": 32}))
    return predict(tmp, run / "missing.pt"), [f"{run / 'missing.pt'}: no such checkpoint"], tmp / "masks"


def truncated_record(tmp: Path) -> tuple[list[str], list[str], Path]:
    run = run_folder(tmp, json.dumps({"network": NETWORK, "image_size": 32})[:25])
    return predict(tmp, run / "best.pt"), [f"{run / 'best.json'}: not valid JSON"], tmp / "masks"


def empty_record(tmp: Path) -> tuple[list[str], list[str], Path]:
    run = run_folder(tmp, "{}")
    return predict(tmp, run / "best.pt"), [f"{run / 'best.json'}: no 'network' key"], tmp / "masks"


CASES = [rle_nothing_decodable, evaluate_no_match, no_such_checkpoint, truncated_record, empty_record]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.__name__)
def test_nothing_done_exits_2_in_one_line_naming_the_file(case, tmp_path, capsys):
    argv, expected, output = case(tmp_path)
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("ERROR") and "Traceback" not in err]
    assert any(all(text in line for text in expected) for line in lines), err
    assert not output.exists()


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.__name__)
def test_the_same_in_a_process_of_its_own(case, tmp_path):
    argv, expected, output = case(tmp_path)
    done = subprocess.run([sys.executable, "-m", "stas_pipeline.cli", *argv], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr and all(text in done.stderr for text in expected), done.stderr
    assert not output.exists()


def test_a_partial_evaluation_exits_1_and_a_whole_one_0(tmp_path, capsys):
    png(tmp_path / "pred" / "a.png")
    png(tmp_path / "ref" / "a.png")
    assert cli.main(["evaluate", "--pred", str(tmp_path / "pred"), "--ref", str(tmp_path / "ref")]) == 0
    png(tmp_path / "ref" / "b.png")
    assert cli.main(["evaluate", "--pred", str(tmp_path / "pred"), "--ref", str(tmp_path / "ref")]) == 1
    assert "ERROR b.png: no prediction b.png in" in capsys.readouterr().err
    (tmp_path / "pred" / "a.png").write_bytes(b"not a png")  # matched, but nothing can be scored
    assert cli.main(["evaluate", "--pred", str(tmp_path / "pred"), "--ref", str(tmp_path / "ref")]) == 2
    assert f"ERROR {tmp_path / 'pred'}: no prediction could be scored" in capsys.readouterr().err


def labelled_images(root: Path, n: int = 8) -> list[str]:
    """``n`` small RGB PNGs in ``root/images`` and their CSV rows (labels alternating 0/1)."""
    rows = []
    for i in range(n):
        path = root / "images" / f"img{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (20, 16), (30 * i, 100, 50 if i % 2 else 200)).save(path)
        rows.append(f"images/img{i}.png,{i % 2}")
    return rows


def test_a_duplicate_row_keeps_its_image_once_and_an_extra_column_is_named(tmp_path, capsys):
    rows = labelled_images(tmp_path)
    lines = ["image,label,comment", *[f"{r},seen" for r in rows], f"{rows[3]},seen"]
    (tmp_path / "labels.csv").write_text("\n".join(lines) + "\n")
    assert cli.main(["make-datalist", "--labels-csv", str(tmp_path / "labels.csv"), "--out",
                     str(tmp_path / "datalist.json"), "--folds", "2"]) == 0
    err = capsys.readouterr().err
    assert f"WARNING {tmp_path / 'labels.csv'}: line 10 (images/img3.png): repeats line 5 exactly" in err
    warned = [line for line in err.splitlines() if "'comment'" in line]
    assert len(warned) == 1 and warned[0].startswith(f"WARNING {tmp_path / 'labels.csv'}: column(s) 'comment'")
    training = json.loads((tmp_path / "datalist.json").read_text())["training"]
    assert sorted(e["image"] for e in training) == [f"images/img{i}.png" for i in range(8)]

    (tmp_path / "other.csv").write_text("image,label\n" + "\n".join([*rows, f"{rows[3][:-1]}{1 - int(rows[3][-1])}"]))
    assert cli.main(["make-datalist", "--labels-csv", str(tmp_path / "other.csv"), "--out",
                     str(tmp_path / "other.json"), "--folds", "2"]) == 1  # two labels for one image: left out
    assert "listed 2 times" in capsys.readouterr().err


def test_every_prob_nan_is_told_so(tmp_path, capsys):
    rows = labelled_images(tmp_path)
    test = [{"image": r.split(",")[0], "label": int(r.split(",")[1])} for r in rows]
    (tmp_path / "datalist.json").write_text(json.dumps({"training": [], "test": test}))
    (tmp_path / "preds.csv").write_text("image,prob\n" + "\n".join(
        f"{(tmp_path / e['image']).resolve()},nan" for e in test) + "\n")
    assert cli.main(["evaluate", "--predictions", str(tmp_path / "preds.csv"), "--datalist",
                     str(tmp_path / "datalist.json"), "--out", str(tmp_path / "eval")]) == 2
    err = capsys.readouterr().err
    assert f"ERROR {tmp_path / 'preds.csv'}: every prob is NaN (8 rows)" in err and "--section" not in err
    assert not (tmp_path / "eval").exists()
