"""Tests of stas ensemble of folders (tasks/segmentation/ensemble.py): vote and mean cores, member reading,
errors, the atomic output folder."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from stas_pipeline import cli
from stas_pipeline.core.fileio import OutputExistsError, atomic_folder
from stas_pipeline.core.images import InputFolderError
from stas_pipeline.stages.ensemble import main
from stas_pipeline.tasks.segmentation import ensemble
from stas_pipeline.tasks.segmentation.ensemble import ensemble_folders, mean_probability, vote

REPO = Path(__file__).resolve().parents[1]
STAS_PUBLIC = Path(__file__).resolve().parents[2] / "shared/data/stas_public"
H, W = 6, 8


def save_png(path: Path, array: np.ndarray, mode: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(np.asarray(array, dtype=np.uint8))
    (img.convert(mode) if mode else img).save(path)
    return path


def read_png(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        assert img.mode == "L"
        return np.array(img)


def members(tmp_path: Path, arrays: dict[str, list[np.ndarray]], suffix: str = ".png") -> list[Path]:
    """Member folders m0, m1, ... holding ``<stem><suffix>`` for each stem -> [one array per member]."""
    n = len(next(iter(arrays.values())))
    folders = [tmp_path / f"m{i}" for i in range(n)]
    for stem, per_member in arrays.items():
        for folder, array in zip(folders, per_member, strict=True):
            folder.mkdir(exist_ok=True)
            if array is None:
                continue
            if suffix == ".npy":
                np.save(folder / f"{stem}.npy", array)
            else:
                save_png(folder / f"{stem}.png", array)
    return folders


def args(folders: list[Path], out: Path, *extra: str) -> list[str]:
    return [*map(str, folders), "--out", str(out), *extra]


# --- cores --------------------------------------------------------------------------------------------------


def test_vote_strict_majority_of_three():
    a, b, c = (np.array(v, bool) for v in ([1, 1, 0, 0], [1, 0, 1, 0], [1, 0, 0, 0]))
    assert vote([a, b, c]).tolist() == [True, False, False, False]


@pytest.mark.parametrize("tie, expected", [("background", [1, 0, 0]), ("foreground", [1, 1, 0])])
def test_vote_tie_rule_with_two_members(tie, expected):
    a, b = np.array([1, 1, 0], bool), np.array([1, 0, 0], bool)
    assert vote([a, b], tie=tie).astype(int).tolist() == expected


def test_vote_weights_and_weighted_ties():
    a, b, c = np.array([1, 0, 0], bool), np.array([0, 1, 0], bool), np.array([0, 1, 1], bool)
    assert vote([a, b, c], weights=[3, 1, 1]).tolist() == [True, False, False]  # 3 of 5 beats 2
    # 0.3 vs 0.1 + 0.2 is a tie despite float rounding
    assert vote([a, b, c], weights=[0.3, 0.1, 0.2]).tolist() == [False, False, False]
    assert vote([a, b, c], weights=[0.3, 0.1, 0.2], tie="foreground").tolist() == [True, True, False]


def test_vote_any_shape_and_nonzero_is_foreground():
    probs = [np.full((2, 3, 4), v) for v in (0.0, 0.2, 0.9)]
    assert vote(probs).all() and vote(probs).shape == (2, 3, 4)


@pytest.mark.parametrize(
    "masks, kwargs, match",
    [
        ([np.zeros(2), np.zeros(3)], {}, "differ in shape"),
        ([np.zeros(2)] * 2, {"weights": [1]}, "1 weights for 2"),
        ([np.zeros(2)] * 2, {"weights": [1, -1]}, "non-negative"),
        ([np.zeros(2)] * 2, {"tie": "up"}, "tie must be"),
        ([], {}, "no members"),
    ],
)
def test_vote_rejects_bad_arguments(masks, kwargs, match):
    with pytest.raises(ValueError, match=match):
        vote(masks, **kwargs)


def test_mean_probability_weighted_any_shape():
    p = mean_probability([np.array([[0.0, 1.0]]), np.array([[1.0, 1.0]])], weights=[3, 1])
    assert p.dtype == np.float32 and p.shape == (1, 2)
    np.testing.assert_allclose(p, [[0.25, 1.0]])
    np.testing.assert_allclose(mean_probability([np.array([0.2, 0.4]), np.array([0.4, 0.6])]), [0.3, 0.5])


# --- folders ------------------------------------------------------------------------------------------------


def test_vote_folders_grey_levels_and_modes(tmp_path, capsys):
    grey = np.zeros((H, W), np.uint8)
    grey[0, :4] = [1, 7, 128, 255]  # any value > 0 is foreground
    other = np.zeros((H, W), np.uint8)
    other[0, :2] = 3
    folders = members(tmp_path, {"a": [grey, other, np.zeros((H, W))]})
    save_png(folders[2] / "a.png", np.zeros((H, W)), mode="P")
    assert main(args(folders, tmp_path / "out")) == 0
    expected = np.zeros((H, W), np.uint8)
    expected[0, :2] = 255
    np.testing.assert_array_equal(read_png(tmp_path / "out/a.png"), expected)
    assert "written 1, skipped 0" in capsys.readouterr().out


def test_rgb_member_converted_with_a_warning(tmp_path, capsys):
    mask = np.full((H, W), 255, np.uint8)
    folders = members(tmp_path, {"a": [mask, mask, mask]})
    save_png(folders[1] / "a.png", mask, mode="RGB")
    assert main(args(folders, tmp_path / "out")) == 0
    assert "WARNING" in capsys.readouterr().err and read_png(tmp_path / "out/a.png").min() == 255


def test_binarize_threshold(tmp_path):
    low = np.full((H, W), 100, np.uint8)
    folders = members(tmp_path, {"a": [low, low, low]})
    assert main(args(folders, tmp_path / "out", "--binarize-threshold", "0.5")) == 0
    assert read_png(tmp_path / "out/a.png").max() == 0


def test_weighted_vote_cli(tmp_path):
    fg, bg = np.full((H, W), 255, np.uint8), np.zeros((H, W), np.uint8)
    folders = members(tmp_path, {"a": [fg, bg, bg]})
    assert main(args(folders, tmp_path / "out", "--weights", "2", "1", "1", "--tie", "foreground")) == 0
    assert read_png(tmp_path / "out/a.png").min() == 255
    assert main(args(folders, tmp_path / "out2", "--weights", "2", "1", "1")) == 0
    assert read_png(tmp_path / "out2/a.png").max() == 0


def test_mean_of_npy_members_threshold_and_probs(tmp_path):
    p0 = np.zeros((H, W), np.float32)
    p0[0, 0], p0[0, 1] = 1.0, 0.6
    p1 = np.zeros((H, W), np.float32)
    p1[0, 0], p1[0, 1] = 0.8, 0.2
    folders = members(tmp_path, {"a": [p0, p1]}, suffix=".npy")
    probs = tmp_path / "probs"
    assert main(args(folders, tmp_path / "out", "--method", "mean", "--save-probs", str(probs))) == 0
    out = read_png(tmp_path / "out/a.png")
    assert out[0, 0] == 255 and out[0, 1] == 0 and out.sum() == 255  # mean 0.4 is not > 0.5
    assert read_png(probs / "a.png")[0, :2].tolist() == [230, 102]  # round(0.9 * 255), round(0.4 * 255)
    assert main(args(folders, tmp_path / "low", "--method", "mean", "--threshold", "0.3")) == 0
    assert read_png(tmp_path / "low/a.png")[0, :2].tolist() == [255, 255]


def test_mean_of_png_and_npy_members(tmp_path):
    png = np.full((H, W), 255, np.uint8)
    png[0, 0] = 51  # 0.2
    folders = members(tmp_path, {"a": [png, None]})
    npy = np.full((H, W), 0.1, np.float32)
    np.save(folders[1] / "a.npy", npy)
    assert main(args(folders, tmp_path / "out", "--method", "mean", "--weights", "1", "3")) == 0
    out = read_png(tmp_path / "out/a.png")
    assert out[0, 0] == 0 and out[0, 1] == 0  # (0.2 + 0.3) / 4 and (1 + 0.3) / 4 are below 0.5
    assert main(args(folders, tmp_path / "out2", "--method", "mean")) == 0
    assert read_png(tmp_path / "out2/a.png")[0, :2].tolist() == [0, 255]  # 0.15, 0.55


def test_mean_of_binary_masks_equals_vote_with_ties_to_background(tmp_path):
    rng = np.random.default_rng(0)
    arrays = [(rng.random((H, W)) > 0.5).astype(np.uint8) * 255 for _ in range(4)]
    folders = members(tmp_path, {"a": arrays})
    assert main(args(folders, tmp_path / "vote")) == 0
    assert main(args(folders, tmp_path / "mean", "--method", "mean")) == 0
    np.testing.assert_array_equal(read_png(tmp_path / "vote/a.png"), read_png(tmp_path / "mean/a.png"))


def test_missing_member_and_size_mismatch_are_named_and_skipped(tmp_path, capsys):
    ok = np.full((H, W), 255, np.uint8)
    folders = members(tmp_path, {"good": [ok, ok, ok], "gap": [ok, None, None], "big": [ok, ok, ok]})
    save_png(folders[1] / "big.png", np.zeros((H + 1, W)))
    assert main(args(folders, tmp_path / "out")) == 1
    err = capsys.readouterr().err
    gap = next(line for line in err.splitlines() if line.startswith("ERROR gap.png"))
    assert f"missing in 2 of 3 member folders: {folders[1]}, {folders[2]}" in gap
    big = next(line for line in err.splitlines() if line.startswith("ERROR big.png"))
    assert "differ in size" in big and f"{folders[0]} 8x6" in big and f"{folders[1]} 8x7" in big
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["good.png"]


@pytest.mark.parametrize(
    "content, reason",
    [(np.full((H, W), 1.5), "outside"), (np.zeros((2, H, W)), "2-D"), (np.full((H, W), "x"), "dtype")],
)
def test_bad_npy_member(tmp_path, capsys, content, reason):
    folders = members(tmp_path, {"a": [np.zeros((H, W)), np.zeros((H, W))], "b": [np.zeros((H, W))] * 2})
    (folders[1] / "a.png").unlink()
    np.save(folders[1] / "a.npy", content)
    assert main(args(folders, tmp_path / "out", "--method", "mean")) == 1
    assert reason in capsys.readouterr().err and (tmp_path / "out/b.png").exists()


def test_two_files_for_one_image_in_a_member(tmp_path, capsys):
    folders = members(tmp_path, {"a": [np.zeros((H, W))] * 2, "b": [np.zeros((H, W))] * 2})
    np.save(folders[0] / "a.npy", np.zeros((H, W)))
    assert main(args(folders, tmp_path / "out")) == 1
    assert "more than one file" in capsys.readouterr().err


def test_existing_out_refused_and_kept(tmp_path, capsys):
    folders = members(tmp_path, {"a": [np.full((H, W), 255)] * 3})
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(args(folders, out)) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"
    assert main(args(folders, out, "--overwrite")) == 0
    assert [p.name for p in out.iterdir()] == ["a.png"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no leftovers


def test_empty_existing_out_is_used(tmp_path):
    folders = members(tmp_path, {"a": [np.zeros((H, W))] * 3})
    (tmp_path / "out").mkdir()
    assert main(args(folders, tmp_path / "out")) == 0 and (tmp_path / "out/a.png").exists()


def test_failure_leaves_no_half_written_folder(tmp_path, monkeypatch):
    folders = members(tmp_path, {s: [np.zeros((H, W))] * 3 for s in "abc"})
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.png").write_bytes(b"old")
    written = []

    def failing_write(path, array, overwrite=False):
        if len(written) == 2:
            raise OSError("disk full")
        written.append(path)
        save_png(path, array)

    monkeypatch.setattr(ensemble, "write_png", failing_write)
    with pytest.raises(OSError, match="disk full"):
        ensemble_folders(folders, out, overwrite=True)
    assert [p.name for p in out.iterdir()] == ["old.png"]  # the old folder is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m0", "m1", "m2", "out"]  # no temporary folder left
    with pytest.raises(OSError):
        ensemble_folders(folders, tmp_path / "new")
    assert not (tmp_path / "new").exists()


def test_nothing_written_keeps_out(tmp_path, capsys):
    folders = members(tmp_path, {"a": [np.zeros((H, W)), None]})
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.png").write_bytes(b"old")
    assert main(args(folders, out, "--overwrite")) == 2  # nothing could be done
    assert "every image was skipped" in capsys.readouterr().err and [p.name for p in out.iterdir()] == [
        "old.png"
    ]


def test_atomic_folder_refuses_a_file(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(InputFolderError), atomic_folder(tmp_path / "f", overwrite=True):
        pass
    (tmp_path / "d").mkdir()
    (tmp_path / "d/x").write_text("x")
    with pytest.raises(OutputExistsError), atomic_folder(tmp_path / "d"):
        pass


@pytest.mark.parametrize(
    "extra, match",
    [
        (["--weights", "1"], "1 weights for 2"),
        (["--save-probs", "p"], "needs --method mean"),
    ],
)
def test_bad_options(tmp_path, capsys, extra, match):
    folders = members(tmp_path, {"a": [np.zeros((H, W))] * 2})
    assert main(args(folders, tmp_path / "out", *extra)) == 2
    assert match in capsys.readouterr().err


def test_unusable_member_folders(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main([str(tmp_path / "empty"), str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    assert "folder not found" in capsys.readouterr().err
    assert main([str(tmp_path / "empty"), str(tmp_path / "empty"), "--out", str(tmp_path / "o")]) == 2
    assert "given twice" in capsys.readouterr().err
    assert main([str(tmp_path / "empty"), "--out", str(tmp_path / "o")]) == 2
    assert "no .png or .npy files" in capsys.readouterr().err


def test_module_help():
    out = subprocess.run(
        [sys.executable, "-m", "stas_pipeline.stages.ensemble", "--help"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "--method" in out and "--tie" in out


def test_stas_ensemble_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["ensemble", "--help"])
    assert exit_info.value.code == 0 and "usage: stas ensemble" in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.skipif(not STAS_PUBLIC.is_dir(), reason="needs ../shared/data/stas_public")
def test_vote_reproduces_the_published_ensemble(tmp_path):
    models = sorted((STAS_PUBLIC / "model_masks").iterdir())
    assert len(models) == 3
    problems = ensemble_folders(models, tmp_path / "vote")
    assert problems.counts["written"] == 131 and not problems.skipped
    reference = sorted((STAS_PUBLIC / "reference_masks").glob("*.png"))
    assert len(reference) == 131
    equal = [np.array_equal(read_png(ref), read_png(tmp_path / "vote" / ref.name)) for ref in reference]
    assert sum(equal) == 131
