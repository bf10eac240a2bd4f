"""Tests of stas_pipeline.stages.make_datalist: pairing, problem reporting, folds, output layout and CLI."""

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

from stas_pipeline.core.problems import Problems
from stas_pipeline.stages.make_datalist import area_strata, assign_folds, main, make_datalist, pair_by_stem

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
    dl = make_datalist(tmp_path / "images", tmp_path / "masks", tmp_path, folds=3, group_regex=r"x\d")
    assert dl["test"] == []
    assert [e["group"] for e in dl["training"]] == ["x1", "x1", "x2", "x3"]
    assert_groups_whole(dl, 3)


def test_module_help_runs():
    result = subprocess.run(
        [sys.executable, "-m", "stas_pipeline.stages.make_datalist", "--help"], cwd=REPO, capture_output=True, text=True
    )
    assert result.returncode == 0
    assert "--group-regex" in result.stdout and "--overwrite" in result.stdout
