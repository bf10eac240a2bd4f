"""Tests of ``stas make-datalist`` and what it is made of (core/splits.py, core/images.py, core/datalist_tables.py,
tasks/segmentation/datalist.py, tasks/classification/label_sources.py): pairing, problem reporting, folds, output
layout and CLI."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from monai.data import load_decathlon_datalist
from PIL import Image

from stas_pipeline.core.datalist import read_datalist
from stas_pipeline.core.datalist_tables import fold_table
from stas_pipeline.core.images import pair_by_stem
from stas_pipeline.core.problems import Problems
from stas_pipeline.core.splits import Split, area_strata, assign_folds, split_weighted
from stas_pipeline.stages.make_datalist import build_parser, main
from stas_pipeline.tasks.classification.label_sources import Source, make_label_datalist
from stas_pipeline.tasks.segmentation.datalist import make_datalist

REPO = Path(__file__).resolve().parents[1]
W, H = 16, 10


def make_image(path: Path, size: tuple[int, int] = (W, H)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rgb = np.random.default_rng(len(path.name)).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(rgb).save(path)
    return path


def make_mask(path: Path, foreground: int, size: tuple[int, int] = (W, H)) -> Path:
    """A mode-L PNG whose first ``foreground`` pixels (row-major) are 255."""
    path.parent.mkdir(parents=True, exist_ok=True)
    mask = np.zeros(size[0] * size[1], dtype=np.uint8)
    mask[:foreground] = 255
    Image.fromarray(mask.reshape(size[1], size[0])).save(path)
    return path


def make_pairs(root: Path, foregrounds: dict[str, int]) -> tuple[Path, Path]:
    for stem, fg in foregrounds.items():
        make_image(root / "images" / f"{stem}.jpg")
        make_mask(root / "masks" / f"{stem}.png", fg)
    return root / "images", root / "masks"


def run(tmp_path: Path, *args: str | Path, out: Path | None = None) -> tuple[int, dict | None]:
    out = out or tmp_path / "datalist.json"
    rc = main(
        ["--images", str(tmp_path / "images"), "--masks", str(tmp_path / "masks"), "--out", str(out)]
        + [str(a) for a in args]
    )
    return rc, json.loads(out.read_text()) if out.exists() else None


def stems(entries: list[dict]) -> list[str]:
    return [Path(e["image"]).stem for e in entries]


def test_pairs_by_stem_and_paths_load_with_monai(tmp_path):
    make_pairs(tmp_path, {"a": 0, "b": 5, "c": 30})
    make_image(tmp_path / "images" / "d.PNG")
    make_mask(tmp_path / "masks" / "d.png", 10)
    (tmp_path / "images" / "notes.txt").write_text("ignored")
    make_image(tmp_path / "test" / "t2.jpg")
    make_image(tmp_path / "test" / "t1.tif")
    out = tmp_path / "lists" / "v1" / "datalist.json"

    rc, dl = run(tmp_path, "--folds", "2", "--test-images", tmp_path / "test", out=out)

    assert rc == 0
    assert stems(dl["training"]) == ["a", "b", "c", "d"]
    assert dl["folds"] == 2 and dl["seed"] == 0 and dl["description"]
    assert all(
        e["image"].startswith("../../images/") and e["label"].startswith("../../masks/")
        for e in dl["training"]
    )
    assert [e["foreground"] for e in dl["training"]] == [0.0, 5 / (W * H), 30 / (W * H), 10 / (W * H)]
    training = load_decathlon_datalist(out, is_segmentation=True, data_list_key="training")
    for entry in training:
        stem = Path(entry["image"]).stem
        assert os.path.samefile(entry["label"], tmp_path / "masks" / f"{stem}.png")
        assert os.path.samefile(os.path.dirname(entry["image"]), tmp_path / "images")
    test = load_decathlon_datalist(out, is_segmentation=True, data_list_key="test")
    assert [Path(e["image"]).name for e in test] == ["t1.tif", "t2.jpg"]
    assert all(os.path.isfile(e["image"]) for e in test)


def test_unpaired_files_are_listed_and_the_rest_written(tmp_path, capsys):
    make_pairs(tmp_path, {"a": 0, "b": 5, "c": 9})
    make_image(tmp_path / "images" / "lonely.jpg")
    make_mask(tmp_path / "masks" / "orphan.png", 3)

    rc, dl = run(tmp_path, "--folds", "2")

    err = capsys.readouterr().err
    assert rc == 1
    assert "lonely.jpg: no mask with stem 'lonely'" in err
    assert "orphan.png: no image with stem 'orphan'" in err
    assert stems(dl["training"]) == ["a", "b", "c"]


def test_pair_by_stem_library_call(tmp_path):
    images = [tmp_path / "x.jpg", tmp_path / "y.bmp"]
    masks = [tmp_path / "y.png", tmp_path / "z.png"]
    problems = Problems("test")
    assert pair_by_stem(images, masks, problems) == [(images[1], masks[0])]
    assert [Path(p).name for p, _ in problems.skipped] == ["x.jpg", "z.png"]


def test_no_pairs_is_refused(tmp_path, capsys):
    make_image(tmp_path / "images" / "a.jpg")
    make_mask(tmp_path / "masks" / "b.png", 1)

    rc, dl = run(tmp_path)

    assert rc == 2 and dl is None
    assert "no usable image/mask pairs" in capsys.readouterr().err


def test_duplicate_stems_are_an_error_naming_both_files(tmp_path, capsys):
    make_pairs(tmp_path, {"a": 1, "b": 2, "c": 3})
    make_image(tmp_path / "images" / "a.png")

    rc, dl = run(tmp_path, "--folds", "2")

    err = capsys.readouterr().err
    dup_lines = [line for line in err.splitlines() if "duplicate stem 'a'" in line]
    assert len(dup_lines) == 2 and all("a.jpg" in line and "a.png" in line for line in dup_lines)
    assert "masks/a.png: no unique image with stem 'a'" in err.replace(os.sep, "/")
    assert rc == 1
    assert stems(dl["training"]) == ["b", "c"]


def test_unreadable_or_wrong_size_mask_is_skipped(tmp_path, capsys):
    make_pairs(tmp_path, {"a": 1, "b": 2, "c": 3, "d": 4, "e": 0})
    (tmp_path / "masks" / "b.png").write_bytes(b"not a png")
    make_mask(tmp_path / "masks" / "c.png", 3, size=(W + 1, H))
    Image.new("RGB", (W, H)).save(tmp_path / "masks" / "d.png")

    rc, dl = run(tmp_path, "--folds", "2")

    err = capsys.readouterr().err
    assert rc == 1
    assert "b.png: cannot use mask" in err
    assert f"c.png: cannot use mask: mask is {W + 1}x{H}, image is {W}x{H}" in err
    assert "d.png: cannot use mask: not a single-channel mask (mode RGB)" in err
    assert stems(dl["training"]) == ["a", "e"]


def test_too_many_folds_for_groups_is_a_clear_error(tmp_path, capsys):
    make_pairs(tmp_path, {"a": 1, "b": 2, "c": 3})
    rc, dl = run(tmp_path, "--folds", "5")
    assert rc == 2 and dl is None
    assert "cannot make 5 folds from 3 groups" in capsys.readouterr().err


def test_folds_stratified_by_empty_and_area_bins(tmp_path):
    fg = {f"e{i:02d}": 0 for i in range(20)}
    fg |= {f"s{i:02d}": 2 + i % 3 for i in range(20)}
    fg |= {f"l{i:02d}": 100 + i for i in range(20)}
    make_pairs(tmp_path, fg)

    rc, dl = run(tmp_path, "--folds", "5", "--seed", "3")

    assert rc == 0
    per_fold = Counter((e["fold"], Path(e["image"]).stem[0]) for e in dl["training"])
    assert all(per_fold[(f, kind)] == 4 for f in range(5) for kind in "esl")


@pytest.mark.parametrize("seed", range(5))
def test_assign_folds_balances_sizes_and_strata(seed):
    rng = random.Random(seed)
    strata = [rng.choice(["neg", "pos", 3, (1, 2)]) for _ in range(rng.randint(23, 60))]
    folds = assign_folds(strata, k=5, seed=seed)
    sizes = Counter(folds)
    assert set(sizes) == set(range(5)) and max(sizes.values()) - min(sizes.values()) <= 1
    for s in set(strata):
        per_fold = Counter(f for f, t in zip(folds, strata, strict=True) if t == s)
        assert max(per_fold[f] for f in range(5)) - min(per_fold[f] for f in range(5)) <= 1


def test_area_strata_empty_bin_and_quantiles():
    assert area_strata([0, 0.1, 0.2, 0.3, 0.4, 0, 0.5, 0.6, 0.7, 0.8], n_bins=4) == [
        0,
        1,
        1,
        2,
        2,
        0,
        3,
        3,
        4,
        4,
    ]
    assert area_strata([0.0, 0.0], n_bins=4) == [0, 0]


def grouped_dataset(tmp_path: Path) -> dict[str, str]:
    """Files p<g>_<i>.jpg in 9 groups of 1..6 images; returns stem -> group."""
    rng = random.Random(0)
    groups = {}
    for g in range(9):
        for i in range(1 + g % 6):
            groups[f"p{g}_{i}"] = f"p{g}"
    make_pairs(tmp_path, {stem: rng.choice([0, 4, 40]) for stem in groups})
    return groups


def assert_groups_whole(dl: dict, k: int) -> None:
    fold_of_group: dict[str, set[int]] = {}
    for e in dl["training"]:
        fold_of_group.setdefault(e["group"], set()).add(e["fold"])
    assert all(len(f) == 1 for f in fold_of_group.values())
    assert {e["fold"] for e in dl["training"]} == set(range(k))


def test_group_regex_keeps_groups_together(tmp_path):
    groups = grouped_dataset(tmp_path)
    rc, dl = run(tmp_path, "--folds", "4", "--group-regex", r"^(p\d+)_")
    assert rc == 0
    assert {Path(e["image"]).stem: e["group"] for e in dl["training"]} == groups
    assert_groups_whole(dl, 4)


def test_group_csv_keeps_groups_together(tmp_path, capsys):
    groups = grouped_dataset(tmp_path)
    rows = [f"{stem}.jpg,{g}" if i % 2 else f"{stem},{g}" for i, (stem, g) in enumerate(groups.items())]
    (tmp_path / "groups.csv").write_text("image,group\n" + "\n".join(rows[1:]) + "\n")

    rc, dl = run(tmp_path, "--folds", "3", "--group-csv", tmp_path / "groups.csv")

    first = next(iter(groups))
    assert rc == 1
    assert f"{first}.jpg: no group: not in" in capsys.readouterr().err
    assert first not in stems(dl["training"]) and len(dl["training"]) == len(groups) - 1
    assert_groups_whole(dl, 3)


def test_same_seed_same_bytes_other_seed_other_folds(tmp_path):
    make_pairs(tmp_path, {f"i{i:02d}": (i * 7) % 40 for i in range(30)})
    outs = [tmp_path / name for name in ("s0.json", "s0_again.json", "s1.json")]
    for out, seed in zip(outs, (0, 0, 1), strict=True):
        assert (
            main(
                [
                    "--images",
                    str(tmp_path / "images"),
                    "--masks",
                    str(tmp_path / "masks"),
                    "--out",
                    str(out),
                    "--seed",
                    str(seed),
                ]
            )
            == 0
        )
    assert outs[0].read_bytes() == outs[1].read_bytes()
    folds = [[e["fold"] for e in json.loads(p.read_text())["training"]] for p in (outs[0], outs[2])]
    assert folds[0] != folds[1]


def test_existing_datalist_not_overwritten_without_flag(tmp_path, capsys):
    make_pairs(tmp_path, {"a": 1, "b": 2})
    out = tmp_path / "datalist.json"
    out.write_text("precious")

    assert (
        main(
            [
                "--images",
                str(tmp_path / "images"),
                "--masks",
                str(tmp_path / "masks"),
                "--out",
                str(out),
                "--folds",
                "2",
            ]
        )
        == 2
    )
    assert "exists; pass --overwrite" in capsys.readouterr().err
    assert out.read_text() == "precious"

    rc, dl = run(tmp_path, "--folds", "2", "--overwrite", out=out)
    assert rc == 0 and stems(dl["training"]) == ["a", "b"]


def test_make_datalist_library_call_groups_by_pattern(tmp_path):
    make_pairs(tmp_path, {"x1_a": 0, "x1_b": 3, "x2_a": 5, "x3_a": 0})
    dl = make_datalist(tmp_path / "images", tmp_path / "masks", tmp_path, Split(folds=3, group_regex=r"x\d"))
    assert dl["test"] == []
    assert [e["group"] for e in dl["training"]] == ["x1", "x1", "x2", "x3"]
    assert_groups_whole(dl, 3)


def test_module_help_runs():
    result = subprocess.run(
        [sys.executable, "-m", "stas_pipeline.stages.make_datalist", "--help"], cwd=REPO, capture_output=True, text=True
    )
    assert result.returncode == 0
    assert "--group-regex" in result.stdout and "--overwrite" in result.stdout


# --- image-level labels, inner test split, decoding ------------------------------------------------------


def truncated_jpeg(path: Path) -> Path:
    """A JPEG whose header is whole (PIL opens it and reads its size) but whose scan data stops half-way."""
    make_image(path)
    data = path.read_bytes()
    sos = data.index(b"\xff\xda")
    path.write_bytes(data[: sos + (len(data) - sos) // 2])
    with Image.open(path) as img:
        assert img.size == (W, H)  # the header alone looks fine: only a full decode finds the problem
    return path


def not_an_image(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"this is not a JPEG\n" * 4)
    return path


def write_csv(path: Path, header: str, rows: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join([header, *rows]) + "\n")
    return path


def labelled_set(root: Path, n: int = 40, per_group: int = 2, positive_every: int = 3) -> Path:
    """``root/images/img<i>.jpg`` and ``root/labels.csv`` (image,label,group): a group's images share a label."""
    rows = []
    for i in range(n):
        make_image(root / "images" / f"img{i:03d}.jpg")
        group = i // per_group
        rows.append(f"images/img{i:03d}.jpg,{int(group % positive_every == 0)},g{group:03d}")
    return write_csv(root / "labels.csv", "image,label,group", rows)


def run_labels(tmp_path: Path, *args: str | Path, out: Path | None = None) -> tuple[int, dict | None]:
    out = out or tmp_path / "datalist.json"
    rc = main(["--out", str(out)] + [str(a) for a in args])
    return rc, json.loads(out.read_text()) if out.exists() else None


def test_labels_csv_numbers_groups_folds_and_monai_load(tmp_path, capsys):
    csv_path = labelled_set(tmp_path / "data", n=40)
    out = tmp_path / "lists" / "datalist.json"

    rc, dl = run_labels(tmp_path, "--labels-csv", csv_path, "--folds", "4", out=out)

    assert rc == 0
    assert len(dl["training"]) == 40 and dl["test"] == [] and dl["folds"] == 4
    entry = dl["training"][0]
    assert entry == {"image": "../data/images/img000.jpg", "label": 1, "fold": entry["fold"], "group": "g000"}
    assert all("foreground" not in e and "source" not in e and "classes" not in dl for e in dl["training"])
    assert_groups_whole(dl, 4)
    positives = Counter(e["fold"] for e in dl["training"] if e["label"] == 1)
    assert max(positives.values()) - min(positives.values()) <= 2  # 7 positive groups of 2 in 4 folds
    loaded = load_decathlon_datalist(out, is_segmentation=True, data_list_key="training")
    assert [e["label"] for e in loaded] == [e["label"] for e in dl["training"]]
    assert all(type(e["label"]) is int and os.path.isfile(e["image"]) for e in loaded)
    table = capsys.readouterr().out
    assert table.splitlines()[0].split() == ["fold", "count", "0", "1"]
    assert any(line.split() == ["all", "40", "26", "14"] for line in table.splitlines())


def test_label_values_int_when_integral_else_float_and_float_strata(tmp_path):
    rows = []
    for i in range(24):
        make_image(tmp_path / f"r{i:02d}.png")
        rows.append(f"r{i:02d}.png,{['1.0', '2', '0.25', '3.5e0'][i % 4]}")
    csv_path = write_csv(tmp_path / "scores.csv", "image,label", rows)

    rc, dl = run_labels(tmp_path, "--labels-csv", csv_path, "--folds", "3")

    assert rc == 0
    labels = [e["label"] for e in dl["training"]]
    assert labels[:4] == [1, 2, 0.25, 3.5] and [type(v) for v in labels[:4]] == [int, int, float, float]
    assert "quantile bins" in dl["description"]
    per_fold = Counter((e["fold"], e["label"]) for e in dl["training"])
    assert all(per_fold[(f, v)] == 2 for f in range(3) for v in (1, 2, 0.25, 3.5))


def test_label_column_picks_one_of_several(tmp_path):
    for i in range(6):
        make_image(tmp_path / "tiles" / f"t{i}.jpg")
    rows = [f"tiles/t{i}.jpg,{i % 2},{i % 5},t{i // 2}" for i in range(6)]
    csv_path = write_csv(tmp_path / "labels.csv", "image,stas,grade,group", rows)

    rc, dl = run_labels(tmp_path, "--labels-csv", csv_path, "--label-column", "grade", "--folds", "3")

    assert rc == 0
    assert [e["label"] for e in dl["training"]] == [0, 1, 2, 3, 4, 0]


def test_aptos_layout_ids_without_extension_looked_up_by_stem(tmp_path):
    ids = [f"{i:04x}c0de" for i in range(8)]
    for i, stem in enumerate(ids):
        make_image(tmp_path / "train_images" / f"{stem}.{'png' if i % 2 else 'jpg'}")
    rows = [f"{stem},{i % 5}" for i, stem in enumerate(ids)]
    csv_path = write_csv(tmp_path / "meta" / "train.csv", "id_code,diagnosis", rows)

    rc, dl = run_labels(
        tmp_path, "--labels-csv", csv_path, "--image-column", "id_code", "--label-column", "diagnosis",
        "--images", tmp_path / "train_images", "--folds", "2",
    )

    assert rc == 0
    assert [Path(e["image"]).stem for e in dl["training"]] == ids
    assert dl["training"][1]["image"] == f"train_images/{ids[1]}.png"
    assert [e["label"] for e in dl["training"]] == [i % 5 for i in range(8)]


def test_missing_label_column_is_one_line_exit_2(tmp_path, capsys):
    csv_path = labelled_set(tmp_path, n=4)

    rc, dl = run_labels(tmp_path, "--labels-csv", csv_path, "--label-column", "stas", "--folds", "2")

    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and dl is None
    assert len(err) == 1 and err[0].startswith(f"ERROR {csv_path}: no column 'stas' (columns: image, label, group)")


def test_bad_rows_are_skipped_naming_file_and_line(tmp_path, capsys):
    csv_path = labelled_set(tmp_path, n=8)
    with csv_path.open("a") as f:
        f.write("images/missing.jpg,1,gx\nimages/img000.jpg,yes,g000\nimages/img001.jpg,,g000\n,1,gy\n")
        f.write("images/img002.jpg,nan,g001\n")

    rc, dl = run_labels(tmp_path, "--labels-csv", csv_path, "--folds", "2")

    err = capsys.readouterr().err
    assert rc == 1
    assert f"ERROR {csv_path}: line 10 (images/missing.jpg): image 'images/missing.jpg' not found in" in err
    assert f"ERROR {csv_path}: line 11 (images/img000.jpg): label 'yes' in column 'label' is not a number" in err
    assert "line 12 (images/img001.jpg): label '' in column 'label' is not a number" in err
    assert "line 13: empty 'image'" in err
    assert "line 14 (images/img002.jpg): label 'nan'" in err
    assert len(dl["training"]) == 8  # the good rows of img000..img002 are still there


@pytest.mark.parametrize("mode", ["masks", "labels-csv"])
def test_undecodable_images_are_reported_and_left_out(tmp_path, capsys, mode):
    from PIL import ImageFile

    make_pairs(tmp_path, {f"ok{i}": i for i in range(4)})
    truncated_jpeg(tmp_path / "images" / "cut.jpg")
    not_an_image(tmp_path / "images" / "text.jpg")
    for stem in ("cut", "text"):
        make_mask(tmp_path / "masks" / f"{stem}.png", 3)
    if mode == "masks":
        rc, dl = run(tmp_path, "--folds", "2")
    else:
        rows = [f"images/{stem}.jpg,{i % 2}" for i, stem in enumerate(["ok0", "ok1", "ok2", "ok3", "cut", "text"])]
        csv_path = write_csv(tmp_path / "l.csv", "image,label", rows)
        rc, dl = run_labels(tmp_path, "--labels-csv", csv_path, "--folds", "2")

    err = capsys.readouterr().err
    assert rc == 1
    assert f"ERROR {tmp_path / 'images' / 'cut.jpg'}: cannot decode image: image file is truncated" in err
    assert f"ERROR {tmp_path / 'images' / 'text.jpg'}: cannot decode image: cannot identify image file" in err
    assert stems(dl["training"]) == ["ok0", "ok1", "ok2", "ok3"]
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_undecodable_test_images_are_left_out(tmp_path, capsys):
    make_pairs(tmp_path, {"a": 1, "b": 2})
    make_image(tmp_path / "test" / "good.jpg")
    truncated_jpeg(tmp_path / "test" / "bad.jpg")

    rc, dl = run(tmp_path, "--folds", "2", "--test-images", tmp_path / "test")

    assert rc == 1 and "bad.jpg: cannot decode image" in capsys.readouterr().err
    assert dl["test"] == [{"image": "test/good.jpg"}]


def test_image_listed_twice_is_left_out(tmp_path, capsys):
    csv_path = labelled_set(tmp_path, n=6)
    with csv_path.open("a") as f:
        f.write("images/img004.jpg,1,g002\n")

    rc, dl = run_labels(tmp_path, "--labels-csv", csv_path, "--folds", "2")

    assert rc == 1
    assert "img004.jpg: listed 2 times (labels.csv line 6; labels.csv line 8); left out" in capsys.readouterr().err
    assert stems(dl["training"]) == ["img000", "img001", "img002", "img003", "img005"]


def test_class_folders_sorted_names_and_integer_names(tmp_path, capsys):
    for cls, n in (("normal", 4), ("glaucoma", 2)):
        for i in range(n):
            make_image(tmp_path / "fundus" / cls / f"{cls}{i}.jpg")
    for grade in (0, 1, 3):
        for i in range(2):
            make_image(tmp_path / "grades" / str(grade) / f"g{grade}_{i}.png")

    rc, dl = run_labels(tmp_path, "--class-folders", tmp_path / "fundus", "--folds", "2")
    assert rc == 0 and dl["classes"] == ["glaucoma", "normal"]
    assert {Path(e["image"]).stem: e["label"] for e in dl["training"]} == {
        "glaucoma0": 0, "glaucoma1": 0, "normal0": 1, "normal1": 1, "normal2": 1, "normal3": 1}
    assert "classes: 0=glaucoma, 1=normal" in capsys.readouterr().out

    rc, dl = run_labels(tmp_path, "--class-folders", tmp_path / "grades", "--folds", "2", "--overwrite")
    assert rc == 0 and dl["classes"] == ["0", "1", "3"]
    assert sorted({e["label"] for e in dl["training"]}) == [0, 1, 3]

    rc, dl = run_labels(
        tmp_path, "--class-folders", tmp_path / "fundus", "--classes", "normal", "glaucoma", "--folds", "2",
        "--overwrite",
    )
    assert rc == 0 and dl["classes"] == ["normal", "glaucoma"]
    assert {e["label"] for e in dl["training"] if "glaucoma" in e["image"]} == {1}


def test_merged_sources_named_and_subsampled(tmp_path, capsys):
    for cls, n in (("normal", 20), ("glaucoma", 6)):
        for i in range(n):
            make_image(tmp_path / "origa" / cls / f"o_{cls}{i:02d}.jpg")
    refuge = labelled_set(tmp_path / "refuge", n=12, per_group=1)
    args = ["--labels-csv", f"refuge={refuge}", "--class-folders", tmp_path / "origa", "--classes", "normal",
            "glaucoma", "--subsample", "origa:normal:0.5", "--folds", "3"]

    rc, dl = run_labels(tmp_path, *args, "--seed", "7")

    out = capsys.readouterr().out
    assert rc == 0
    by_source = Counter((e["source"], e["label"]) for e in dl["training"])
    assert by_source == {("origa", 0): 10, ("origa", 1): 6, ("refuge", 0): 8, ("refuge", 1): 4}
    assert "subsampled out of origa:0 10" in out
    assert [line.split() for line in out.splitlines() if line.split()[:1] in (["source"], ["origa"], ["refuge"])] == [
        ["source", "count", "0", "1"], ["origa", "16", "10", "6"], ["refuge", "12", "8", "4"]]
    again = run_labels(tmp_path, *args, "--seed", "7", out=tmp_path / "again.json")[1]
    other = run_labels(tmp_path, *args, "--seed", "8", out=tmp_path / "other.json")[1]
    assert again == dl
    assert {e["image"] for e in other["training"]} != {e["image"] for e in dl["training"]}


def test_subsample_naming_nothing_is_an_error(tmp_path, capsys):
    csv_path = labelled_set(tmp_path, n=6)
    rc, dl = run_labels(tmp_path, "--labels-csv", csv_path, "--subsample", "origa:0:0.5", "--folds", "2")
    assert rc == 2 and dl is None
    assert "--subsample origa:0:0.5: no source 'origa' (sources: labels)" in capsys.readouterr().err


def test_test_fraction_holds_out_a_stratified_grouped_split_with_labels(tmp_path, capsys):
    csv_path = labelled_set(tmp_path / "data", n=60, per_group=2)
    make_image(tmp_path / "unlabelled" / "u1.jpg")

    rc, dl = run_labels(
        tmp_path, "--labels-csv", csv_path, "--test-fraction", "0.2", "--folds", "4",
        "--test-images", tmp_path / "unlabelled",
    )

    assert rc == 0 and dl["test_fraction"] == 0.2
    labelled = [e for e in dl["test"] if "label" in e]
    assert [e for e in dl["test"] if "label" not in e] == [{"image": "unlabelled/u1.jpg"}]
    assert len(labelled) == 12 and Counter(e["label"] for e in labelled) == {0: 8, 1: 4}
    assert all("fold" not in e for e in dl["test"])
    test_groups = {e["group"] for e in labelled}
    assert not test_groups & {e["group"] for e in dl["training"]}
    assert len(dl["training"]) == 48
    assert_groups_whole(dl, 4)
    assert any(line.split() == ["test", "12", "8", "4"] for line in capsys.readouterr().out.splitlines())
    loaded = load_decathlon_datalist(tmp_path / "datalist.json", is_segmentation=True, data_list_key="test")
    assert sorted(e.get("label", -1) for e in loaded) == [-1] + [0] * 8 + [1] * 4


def test_test_fraction_with_masks_keeps_mask_labels(tmp_path, capsys):
    fg = {f"e{i:02d}": 0 for i in range(10)} | {f"f{i:02d}": 5 + i for i in range(30)}
    make_pairs(tmp_path, fg)

    rc, dl = run(tmp_path, "--folds", "3", "--test-fraction", "0.25")

    assert rc == 0
    assert len(dl["test"]) == 10 and len(dl["training"]) == 30
    assert sum(1 for e in dl["test"] if e["foreground"] == 0) in (2, 3)  # a quarter of the 10 empty masks
    assert all(e["label"].startswith("masks/") and "fold" not in e for e in dl["test"])
    assert "test" in capsys.readouterr().out


def test_test_fraction_too_small_for_the_groups_is_an_error(tmp_path, capsys):
    csv_path = labelled_set(tmp_path, n=20, per_group=5)
    rc, dl = run_labels(tmp_path, "--labels-csv", csv_path, "--test-fraction", "0.05", "--folds", "2")
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and dl is None and len(err) == 1
    assert "--test-fraction 0.05 leaves the inner test split empty" in err[0]


def test_split_weighted_hits_uneven_targets():
    strata = ["pos"] * 30 + ["neg"] * 70
    parts = split_weighted(strata, [0.7, 0.3], seed=0)
    assert Counter(zip(parts, strata, strict=True)) == {(0, "pos"): 21, (0, "neg"): 49, (1, "pos"): 9, (1, "neg"): 21}
    groups = [i // 4 for i in range(100)]
    parts = split_weighted(strata, [0.1, 0.9], seed=1, groups=groups)
    assert sum(1 for p in parts if p == 0) in (8, 12)  # 2 or 3 of the 25 groups of 4
    assert all(len({p for p, g in zip(parts, groups, strict=True) if g == gg}) == 1 for gg in set(groups))


def test_assign_folds_ungrouped_output_is_pinned():
    """The refined fold code gives, without groups, exactly the folds of the original greedy placement."""
    strata = [(i * 7) % 3 + (i % 5 == 0) for i in range(23)]
    assert assign_folds(strata, 4, seed=5) == [2, 0, 2, 0, 1, 2, 3, 1, 2, 0, 1, 1, 2, 0, 0, 3, 3, 3, 1, 0, 1, 3, 2]


def _max_rate_deviation(strata: list, folds: list[int], k: int) -> float:
    rate = sum(strata) / len(strata)
    return max(
        abs(sum(s for s, f in zip(strata, folds, strict=True) if f == fold) / folds.count(fold) - rate)
        for fold in range(k)
    )


def test_grouped_folds_at_least_as_balanced_as_sklearn():
    """What our fold code adds over scikit-learn's StratifiedGroupKFold (docs/folds.md has the full figures)."""
    sklearn_model_selection = pytest.importorskip("sklearn.model_selection")
    rng = random.Random(0)
    strata, groups = [], []
    for g in range(120):  # groups of 2..10 images, positive rate varying by group
        p = rng.random()
        for _ in range(rng.randint(2, 10)):
            strata.append(int(rng.random() < p))
            groups.append(g)
    ours, theirs, our_spread, their_spread = [], [], [], []
    for seed in range(5):
        folds = assign_folds(strata, 5, seed, groups)
        split = sklearn_model_selection.StratifiedGroupKFold(5, shuffle=True, random_state=seed)
        sk = [0] * len(strata)
        for f, (_, idx) in enumerate(split.split(strata, strata, groups)):
            for i in idx:
                sk[i] = f
        ours.append(_max_rate_deviation(strata, folds, 5))
        theirs.append(_max_rate_deviation(strata, sk, 5))
        our_spread.append(max(Counter(folds).values()) - min(Counter(folds).values()))
        their_spread.append(max(Counter(sk).values()) - min(Counter(sk).values()))
    assert np.mean(ours) <= np.mean(theirs) and np.mean(our_spread) <= np.mean(their_spread)


def test_same_bytes_across_processes(tmp_path):
    csv_path = labelled_set(tmp_path, n=24, per_group=3)
    outs = []
    for hash_seed in ("1", "2"):
        out = tmp_path / f"dl{hash_seed}.json"
        subprocess.run(
            [sys.executable, "-m", "stas_pipeline.stages.make_datalist", "--labels-csv", str(csv_path), "--out",
             str(out), "--folds", "3", "--test-fraction", "0.25"],
            cwd=REPO, check=True, capture_output=True, env={**os.environ, "PYTHONHASHSEED": hash_seed},
        )
        outs.append(out.read_bytes())
    assert outs[0] == outs[1]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--labels-csv", "a.csv", "--masks", "m"], "--masks is for segmentation"),
        (["--images", "i"], "give --images and --masks"),
        (["--images", "i", "--masks", "m", "--label-column", "stas"], "--label-column: only with --labels-csv"),
        (["--labels-csv", "a.csv", "--test-fraction", "1"], "must be between 0 and 1"),
        (["--labels-csv", "a.csv", "--subsample", "origa:0:2"], "fraction must be in (0, 1]"),
    ],
)
def test_usage_errors_exit_2(tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as exc:
        main(["--out", str(tmp_path / "dl.json"), *args])
    assert exc.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "dl.json").exists()


def test_help_explains_the_image_level_options():
    text = build_parser("stas make-datalist").format_help()
    for option in ("--labels-csv", "--class-folders", "--label-column", "--image-column", "--classes", "--subsample",
                   "--test-fraction", "--images", "--masks", "--test-images", "--group-csv", "--bins"):
        assert option in text


def test_library_call_with_sources(tmp_path):
    csv_path = labelled_set(tmp_path, n=10)
    problems = Problems("test")
    dl = make_label_datalist([Source(csv_path, name="mine")], tmp_path, split=Split(folds=2, test_fraction=0.2),
                             problems=problems)
    assert {e["source"] for e in dl["training"] + dl["test"]} == {"mine"}
    assert len(dl["test"]) == 2 and not problems.skipped
    assert "fold" in fold_table(dl, "number")


# --- grading (APTOS layout): image-size groups, label counts, bad grades ----------------------------------

APTOS_SIZES = {(40, 30): 12, (24, 24): 9, (32, 20): 6, (20, 14): 6, (18, 18): 3}  # pixel size -> images


def aptos_set(root: Path, sizes: dict[tuple[int, int], int] = APTOS_SIZES) -> tuple[Path, dict[str, tuple]]:
    """``root/train.csv`` (id_code,diagnosis) and ``root/train_images/<id_code>.png``, real PNGs of several
    sizes; a size's images have different grades. Returns the CSV and id_code -> (grade, size)."""
    truth, rows, i = {}, [], 0
    for size, n in sizes.items():
        for _ in range(n):
            code = f"{i * 7919:06x}{i:02d}"  # hex ids without extension, like APTOS's
            make_image(root / "train_images" / f"{code}.png", size)
            truth[code] = (i % 5, size)
            rows.append(f"{code},{i % 5}")
            i += 1
    return write_csv(root / "train.csv", "id_code,diagnosis", rows), truth


def aptos_args(root: Path, csv_path: Path, *more: str | Path) -> list[str | Path]:
    return ["--labels-csv", csv_path, "--label-column", "diagnosis", "--image-column", "id_code",
            "--images", root / "train_images", "--classes", "0", "1", "2", "3", "4", *more]


def test_aptos_layout_grouped_by_image_size_with_label_counts(tmp_path, capsys):
    csv_path, truth = aptos_set(tmp_path / "aptos")
    out = tmp_path / "lists" / "datalist.json"

    rc, dl = run_labels(tmp_path, *aptos_args(tmp_path / "aptos", csv_path, "--group-by", "image-size",
                                              "--folds", "3", "--test-fraction", "0.2"), out=out)

    assert rc == 0
    entries = dl["training"] + dl["test"]
    assert len(entries) == len(truth) == 36
    for e in entries:
        code = Path(e["image"]).stem
        grade, (w, h) = truth[code]
        assert e["image"] == f"../aptos/train_images/{code}.png"
        assert e["label"] == grade and e["group"] == f"{w}x{h}"
    assert "grouped by image size" in dl["description"] and dl["classes"] == ["0", "1", "2", "3", "4"]
    part_of_size: dict[str, set] = {}
    for e in entries:
        part_of_size.setdefault(e["group"], set()).add(e.get("fold", "test"))
    assert all(len(parts) == 1 for parts in part_of_size.values())  # a size is never split
    assert {e["fold"] for e in dl["training"]} == {0, 1, 2} and dl["test"]
    # the counts per part, stored beside the file's other keys
    assert list(dl) == ["task", "label_kind", "description", "folds", "seed", "classes", "test_fraction",
                        "label_counts", "training", "test"]
    expected = {f"fold{f}": Counter(str(e["label"]) for e in dl["training"] if e["fold"] == f) for f in range(3)}
    expected["test"] = Counter(str(e["label"]) for e in dl["test"])
    assert dl["label_counts"] == {part: {str(g): c[str(g)] for g in range(5)} for part, c in expected.items()}
    assert all(list(c) == ["0", "1", "2", "3", "4"] for c in dl["label_counts"].values())
    # the printed tables: per fold and test, then per size, largest first, with the fold each size is in
    lines = [line.split() for line in capsys.readouterr().out.splitlines()]
    assert lines[0] == ["fold", "count", "0", "1", "2", "3", "4"]
    test_row = next(line for line in lines if line[:1] == ["test"])
    assert test_row[1:] == [str(len(dl["test"]))] + [str(dl["label_counts"]["test"][str(g)]) for g in range(5)]
    start = lines.index(["group", "count", "fold", "0", "1", "2", "3", "4"])
    table = lines[start + 1: start + 6]
    assert [row[0] for row in table] == ["40x30", "24x24", "20x14", "32x20", "18x18"]  # ties by name
    for row in table:
        members = [e for e in entries if e["group"] == row[0]]
        assert row[1] == str(len(members)) and row[2] == str(members[0].get("fold", "test"))
        assert row[3:] == [str(sum(1 for e in members if e["label"] == g)) for g in range(5)]
    assert load_decathlon_datalist(out, is_segmentation=True, data_list_key="training")


def test_group_by_image_size_replaces_a_group_column(tmp_path, capsys):
    rows = []
    for i in range(8):
        make_image(tmp_path / f"i{i}.png", (20 + i % 4, 10))
        rows.append(f"i{i}.png,{i % 2},everyone")
    csv_path = write_csv(tmp_path / "labels.csv", "image,label,group", rows)

    rc, dl = run_labels(tmp_path, "--labels-csv", csv_path, "--group-by", "image-size", "--folds", "2")

    assert rc == 0
    assert [e["group"] for e in dl["training"]] == [f"{20 + i % 4}x10" for i in range(8)]
    assert_groups_whole(dl, 2)
    assert "group" in capsys.readouterr().out


def test_group_by_image_size_with_masks(tmp_path, capsys):
    for i in range(6):
        size = (W, H) if i < 3 else (W + 2, H)
        make_image(tmp_path / "images" / f"m{i}.jpg", size)
        make_mask(tmp_path / "masks" / f"m{i}.png", i, size)

    rc, dl = run(tmp_path, "--folds", "2", "--group-by", "image-size")

    assert rc == 0
    assert [e["group"] for e in dl["training"]] == [f"{W}x{H}"] * 3 + [f"{W + 2}x{H}"] * 3
    assert_groups_whole(dl, 2)
    assert "label_counts" not in dl  # masks are no numeric label
    lines = [line.split() for line in capsys.readouterr().out.splitlines()]
    assert ["group", "count", "fold", "empty", "mean", "fg"] in lines


def test_group_table_sums_the_groups_beyond_15_as_other():
    training = []
    for g in range(18):  # group "<g + 1>x9" has 20 - g images, in fold g % 3, all of label g % 2
        training += [{"image": f"s{g}_{i}.png", "label": g % 2, "fold": g % 3, "group": f"{g + 1}x9"}
                     for i in range(20 - g)]
    datalist = {"folds": 3, "training": training, "test": []}

    lines = [line.split() for line in fold_table(datalist, "number", by_group=True).splitlines()]

    start = lines.index(["group", "count", "fold", "0", "1"])
    rows = lines[start + 1:]
    assert len(rows) == 16
    assert rows[0] == ["1x9", "20", "0", "20", "0"] and rows[14] == ["15x9", "6", "2", "6", "0"]
    assert rows[15] == ["other", str(5 + 4 + 3), "-", "4", str(5 + 3)]  # 16x9 (label 1), 17x9 (0), 18x9 (1)
    assert not any(line[:1] == ["group"] for line in lines[:start])
    assert "group" not in fold_table(datalist, "number")  # the group table only when asked for


def test_label_counts_only_for_integer_labels(tmp_path):
    for i in range(6):
        make_image(tmp_path / f"r{i}.png")
    scores = write_csv(tmp_path / "scores.csv", "image,label", [f"r{i}.png,{i / 4}" for i in range(6)])
    dl = make_label_datalist([scores], tmp_path, split=Split(folds=2), problems=Problems("test"))
    assert "label_counts" not in dl
    grades = write_csv(tmp_path / "grades.csv", "image,label", [f"r{i}.png,{i % 3 * 2}" for i in range(6)])
    dl = make_label_datalist([grades], tmp_path, split=Split(folds=2), problems=Problems("test"))
    assert dl["label_counts"] == {"fold0": {"0": 1, "2": 1, "4": 1}, "fold1": {"0": 1, "2": 1, "4": 1}}


def test_aptos_bad_grades_ids_and_unnamed_images_are_each_reported(tmp_path, capsys):
    root = tmp_path / "aptos"
    csv_path, truth = aptos_set(root)
    for code in ("badgrade5", "negative", "halfway", "wordy"):
        make_image(root / "train_images" / f"{code}.png")
    make_image(root / "train_images" / "nobody.png")  # no row names it
    with csv_path.open("a") as f:
        f.write("badgrade5,5\nnegative,-1\nhalfway,2.5\nwordy,two\nmissing00,3\n")

    rc, dl = run_labels(tmp_path, *aptos_args(root, csv_path, "--folds", "3"))

    err = capsys.readouterr().err
    first = len(truth) + 2  # the first appended row's line
    assert rc == 1
    assert f"ERROR {csv_path}: line {first} (badgrade5): label '5' is not a class index 0..4" in err
    assert f"ERROR {csv_path}: line {first + 1} (negative): label '-1' is not a class index 0..4" in err
    assert f"ERROR {csv_path}: line {first + 2} (halfway): label '2.5' is not a class index 0..4" in err
    assert f"ERROR {csv_path}: line {first + 3} (wordy): label 'two' in column 'diagnosis' is not a number" in err
    assert f"ERROR {csv_path}: line {first + 4} (missing00): image 'missing00' not found in" in err
    unnamed = [line for line in err.splitlines() if "named by no row" in line]
    assert unnamed == [f"ERROR {root / 'train_images' / 'nobody.png'}: in --images but named by no row of "
                       "train.csv; left out"]  # the images of rejected rows are named by their rows
    assert len(err.strip().splitlines()) == 6
    assert sorted(Path(e["image"]).stem for e in dl["training"]) == sorted(truth)  # the rest goes on


def test_without_classes_any_integer_grade_is_kept(tmp_path, capsys):
    root = tmp_path / "aptos"
    csv_path, _ = aptos_set(root, {(20, 20): 6})
    with csv_path.open("a") as f:
        f.write("extra00,7\n")
    make_image(root / "train_images" / "extra00.png")
    rc, dl = run_labels(tmp_path, "--labels-csv", csv_path, "--label-column", "diagnosis", "--image-column",
                        "id_code", "--images", root / "train_images", "--folds", "2")
    assert rc == 0 and 7 in {e["label"] for e in dl["training"]}  # --classes is what bounds the grades


def test_group_by_goes_with_no_other_group_option(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--out", str(tmp_path / "dl.json"), "--labels-csv", "a.csv", "--group-by", "image-size",
              "--group-regex", "x"])
    assert exc.value.code == 2 and "not allowed with argument" in capsys.readouterr().err
    with pytest.raises(ValueError, match="one of group_regex, group_csv and group_by"):
        make_label_datalist(["a.csv"], tmp_path, split=Split(group_by="image-size", group_csv="g.csv"))
    with pytest.raises(ValueError, match="group_by must be one of image-size"):
        make_label_datalist(["a.csv"], tmp_path, split=Split(group_by="clinic"))
    assert "--group-by" in build_parser("stas make-datalist").format_help()


# --- the task: declared in the datalist, from --task or the label options -----------------------------------


def test_the_datalist_declares_the_task_of_its_label_options(tmp_path):
    make_pairs(tmp_path, {"a": 0, "b": 5, "c": 9})
    rc, _ = run(tmp_path, "--folds", "2")
    written = read_datalist(tmp_path / "datalist.json")
    assert rc == 0 and (written.task, written.label_kind) == ("segmentation", "mask")

    csv_path = labelled_set(tmp_path / "data", n=12)
    rc, _ = run_labels(tmp_path, "--labels-csv", csv_path, "--folds", "2", out=tmp_path / "labels.json")
    written = read_datalist(tmp_path / "labels.json")
    assert rc == 0 and (written.task, written.label_kind) == ("classification", "number")


def test_task_grading_takes_the_labels_of_classification(tmp_path):
    csv_path = labelled_set(tmp_path / "data", n=12)
    rc, dl = run_labels(tmp_path, "--labels-csv", csv_path, "--folds", "2", "--task", "grading")
    assert rc == 0 and (dl["task"], dl["label_kind"]) == ("grading", "number")
    assert len(dl["training"]) == 12


@pytest.mark.parametrize(
    "args, message",
    [
        (["--labels-csv", "a.csv", "--task", "segmentation"], "--task segmentation goes with --masks"),
        (["--images", "i", "--masks", "m", "--task", "classification"],
         "--task classification goes with --labels-csv/--class-folders"),
        (["--images", "i", "--masks", "m", "--task", "nonesuch"], "invalid choice: 'nonesuch'"),
    ],
)
def test_task_without_its_own_options_is_a_usage_error(tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as exc:
        main(["--out", str(tmp_path / "dl.json"), *args])
    assert exc.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "dl.json").exists()
