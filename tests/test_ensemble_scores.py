"""Tests of ``stas ensemble`` on image-level prediction CSVs: mean and vote joined on image, member columns,
missing images, refused mixes and outputs, and an ensemble evaluated by ``stas evaluate --predictions``."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from stas_pipeline import cli
from stas_pipeline.core.fileio import OutputExistsError
from stas_pipeline.core.images import InputFolderError
from stas_pipeline.tasks.classification.ensemble import csv_member_names, ensemble_csvs


def write_csv(path: Path, probs: dict[str, float | str], members: dict[str, list] | None = None) -> Path:
    """A predictions CSV ``image,prob[,<member>...]`` with the images under ``path``'s folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    members = members or {}
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "prob", *members])
        for i, (image, prob) in enumerate(probs.items()):
            writer.writerow([image, prob, *(values[i] for values in members.values())])
    return path


def read_rows(path: Path) -> tuple[list[str], dict[str, dict]]:
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames), {Path(r["image"]).name: r for r in reader}


def stas(*argv: object) -> int:
    return cli.main(["ensemble", *map(str, argv)])


@pytest.fixture
def three(tmp_path: Path) -> list[Path]:
    """Three member CSVs a, b, c over images x, y, z (absolute paths)."""
    img = {k: str(tmp_path / f"img/{k}.jpg") for k in "xyz"}
    return [
        write_csv(tmp_path / "a.csv", {img["x"]: 0.9, img["y"]: 0.2, img["z"]: 0.5},
                  {"fundus/fold0": [0.8, 0.1, ""]}),  # its own member columns are not carried on
        write_csv(tmp_path / "b.csv", {img["x"]: 0.6, img["y"]: 0.6, img["z"]: 0.4}),
        write_csv(tmp_path / "c.csv", {img["x"]: 0.3, img["y"]: 0.1, img["z"]: 0.5}),
    ]


def test_mean_is_the_default_for_csvs(tmp_path, three, capsys):
    out = tmp_path / "ens.csv"
    assert stas(*three, "--out", out) == 0
    assert "ensemble: written 3, skipped 0" in capsys.readouterr().out
    header, rows = read_rows(out)
    assert header == ["image", "prob", "a", "b", "c"]
    assert list(rows) == ["x.jpg", "y.jpg", "z.jpg"]
    assert rows["x.jpg"] == {"image": str((tmp_path / "img/x.jpg").resolve()), "prob": "0.600000", "a": "0.900000",
                             "b": "0.600000", "c": "0.300000"}
    assert float(rows["y.jpg"]["prob"]) == pytest.approx(0.3) and float(rows["z.jpg"]["prob"]) == pytest.approx(
        1.4 / 3, abs=1e-6)


def test_weighted_mean(tmp_path, three):
    out = tmp_path / "ens.csv"
    assert stas(*three, "--out", out, "--method", "mean", "--weights", "2", "1", "1") == 0
    _, rows = read_rows(out)
    assert float(rows["x.jpg"]["prob"]) == pytest.approx((1.8 + 0.6 + 0.3) / 4, abs=1e-6)


def test_vote_strict_majority_with_prob_at_threshold_positive(tmp_path, three):
    out = tmp_path / "vote.csv"
    assert stas(*three, "--out", out, "--method", "vote") == 0
    _, rows = read_rows(out)
    # x: 0.9, 0.6 vote yes -> 1; y: only 0.6 -> 0; z: 0.5 and 0.5 are >= 0.5 -> 1
    assert [rows[k]["prob"] for k in ("x.jpg", "y.jpg", "z.jpg")] == ["1.000000", "0.000000", "1.000000"]
    assert stas(*three, "--out", out, "--method", "vote", "--threshold", "0.55", "--overwrite") == 0
    assert read_rows(out)[1]["z.jpg"]["prob"] == "0.000000"


@pytest.mark.parametrize("tie, expected", [("background", "0.000000"), ("foreground", "1.000000")])
def test_vote_ties_follow_tie(tmp_path, three, tie, expected):
    out = tmp_path / "vote.csv"
    assert stas(*three[:2], "--out", out, "--method", "vote", "--tie", tie) == 0
    _, rows = read_rows(out)
    assert rows["y.jpg"]["prob"] == expected  # b says yes, a says no
    assert rows["x.jpg"]["prob"] == "1.000000"


def test_weighted_vote(tmp_path, three):
    out = tmp_path / "vote.csv"
    assert stas(*three, "--out", out, "--method", "vote", "--weights", "1", "3", "1") == 0
    assert read_rows(out)[1]["y.jpg"]["prob"] == "1.000000"  # b alone holds 3 of 5


def test_missing_image_named_and_left_out(tmp_path, three, capsys):
    lines = three[1].read_text().splitlines()
    three[1].write_text("\n".join(line for line in lines if "y.jpg" not in line) + "\n")
    out = tmp_path / "ens.csv"
    assert stas(*three, "--out", out) == 1
    captured = capsys.readouterr()
    assert f"ERROR {(tmp_path / 'img/y.jpg').resolve()}: missing from 1 of 3 member CSVs: {three[1]}" in captured.err
    assert "written 2, skipped 1" in captured.out
    assert list(read_rows(out)[1]) == ["x.jpg", "z.jpg"]


def test_bad_prob_row_is_reported_and_the_image_left_out(tmp_path, three, capsys):
    three[2].write_text(three[2].read_text().replace("0.3", "high"))
    assert stas(*three, "--out", tmp_path / "ens.csv") == 1
    err = capsys.readouterr().err
    assert "x.jpg: prob 'high' is not a number" in err and "x.jpg: missing from 1 of 3" in err


def test_relative_image_paths_are_taken_from_the_csv_folder(tmp_path):
    a = write_csv(tmp_path / "r0" / "test.csv", {"../img/x.jpg": 0.2, str(tmp_path / "img/y.jpg"): 0.4})
    b = write_csv(tmp_path / "r1" / "test.csv", {str(tmp_path / "img/x.jpg"): 0.4, "../img/y.jpg": 0.8})
    out = tmp_path / "ens.csv"
    assert stas(a, b, "--out", out) == 0
    header, rows = read_rows(out)
    assert header == ["image", "prob", "r0/test", "r1/test"]  # equal stems: the folder is added
    assert float(rows["x.jpg"]["prob"]) == pytest.approx(0.3) and float(rows["y.jpg"]["prob"]) == pytest.approx(0.6)


def test_member_names():
    assert csv_member_names(["p/a.csv", "q/b.csv"]) == ["a", "b"]
    assert csv_member_names(["x/r0/test.csv", "x/r1/test.csv"]) == ["r0/test", "r1/test"]


@pytest.mark.parametrize(
    "extra, match",
    [
        (["--save-probs", "p"], "--save-probs: for folder members only"),
        (["--binarize-threshold", "0.2"], "--binarize-threshold: for folder members only"),
        (["--weights", "1", "2"], "2 weights for 3 members"),
    ],
)
def test_options_of_folders_refused(tmp_path, three, capsys, extra, match):
    assert stas(*three, "--out", tmp_path / "ens.csv", *extra) == 2
    assert match in capsys.readouterr().err and not (tmp_path / "ens.csv").exists()


def test_mixing_csvs_and_folders_is_one_line_exit_2(tmp_path, three, capsys):
    (tmp_path / "folder").mkdir()
    assert stas(three[0], tmp_path / "folder", "--out", tmp_path / "ens.csv") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "predictions of different tasks" in err[0]
    assert "ensemble either prediction CSVs or folders" in err[0]


def test_unusable_csvs_and_outputs(tmp_path, three, capsys):
    assert stas(three[0], tmp_path / "nope.csv", "--out", tmp_path / "ens.csv") == 2
    assert "cannot read the predictions CSV" in capsys.readouterr().err
    assert stas(three[0], three[0], "--out", tmp_path / "ens.csv") == 2
    assert "given twice" in capsys.readouterr().err
    assert stas(*three, "--out", tmp_path / "ens") == 2
    assert "is a .csv file" in capsys.readouterr().err
    bad = write_csv(tmp_path / "bad.csv", {})
    bad.write_text("file,p\n")
    assert stas(three[0], bad, "--out", tmp_path / "ens.csv") == 2
    assert "no 'image' or 'prob' column" in capsys.readouterr().err


def test_existing_output_refused_and_kept(tmp_path, three, capsys):
    out = tmp_path / "ens.csv"
    out.write_text("mine")
    assert stas(*three, "--out", out) == 2
    assert "--overwrite" in capsys.readouterr().err and out.read_text() == "mine"
    assert stas(*three, "--out", out, "--overwrite") == 0
    assert out.read_text().startswith("image,prob,a,b,c\n")
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary file left


def test_nothing_in_common_writes_nothing(tmp_path, capsys):
    a = write_csv(tmp_path / "a.csv", {str(tmp_path / "x.jpg"): 0.1})
    b = write_csv(tmp_path / "b.csv", {str(tmp_path / "y.jpg"): 0.1})
    assert stas(a, b, "--out", tmp_path / "ens.csv") == 2  # nothing could be done
    assert "nothing written" in capsys.readouterr().err and not (tmp_path / "ens.csv").exists()


def test_library_errors(tmp_path, three):
    with pytest.raises(InputFolderError, match="unknown method"):
        ensemble_csvs(three, tmp_path / "e.csv", method="median")
    (tmp_path / "e.csv").write_text("x")
    with pytest.raises(OutputExistsError):
        ensemble_csvs(three, tmp_path / "e.csv")
    problems = ensemble_csvs(three, tmp_path / "e.csv", overwrite=True)
    assert problems.counts["written"] == 3 and problems.exit_code() == 0


def test_ensemble_then_evaluate(tmp_path, capsys):
    rng = np.random.default_rng(0)
    (tmp_path / "images").mkdir()
    labels = [0, 1] * 6
    entries = []
    for i, label in enumerate(labels):
        Image.new("RGB", (32, 32), (200 * label, 60, 90)).save(tmp_path / f"images/{i}.jpg")
        entries.append({"image": f"images/{i}.jpg", "label": label})
    (tmp_path / "datalist.json").write_text(json.dumps({"training": [], "test": entries}))
    members = []
    for fold in range(3):
        probs = np.clip(np.array(labels) * 0.4 + rng.random(len(labels)) * 0.6, 0, 1)
        members.append(write_csv(tmp_path / f"fold{fold}.csv",
                                 {str((tmp_path / f"images/{i}.jpg").resolve()): f"{p:.6f}" for i, p in
                                  enumerate(probs)}))
    assert stas(*members, "--out", tmp_path / "mean.csv") == 0
    assert cli.main(["evaluate", "--predictions", str(tmp_path / "mean.csv"), "--datalist",
                     str(tmp_path / "datalist.json"), "--out", str(tmp_path / "eval"), "--worst", "4"]) == 0
    metrics = json.loads((tmp_path / "eval/metrics.json").read_text())
    assert sorted(metrics["members"]) == ["fold0", "fold1", "fold2"] and metrics["n"] == 12
    assert "member AUC" in capsys.readouterr().out
