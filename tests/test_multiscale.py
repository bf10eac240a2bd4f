"""Multi-scale ensembles of whole slides: two tiny runs trained on tiles of one set of synthetic slides cut at
scales 2 and 4 record their tiling; ``stas predict --slides`` of both predicts each at its own scale and writes the
mean of their maps on the finer grid (each coarse pixel over 2 x 2 fine ones), the mask and RLE from that mean;
an older run without the record falls back to the datalist it names; one --scale for both is refused."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from tiny_runs import train

from stas_pipeline import cli
from stas_pipeline.tasks.slide.evaluation import open_prediction
from stas_pipeline.tasks.slide.inference import merge_maps, scale_ratio
from stas_pipeline.tasks.slide.reader import Slide
from stas_pipeline.tasks.slide.rle import encode
from stas_pipeline.tasks.slide.synthetic import SyntheticSlide

HEIGHT, WIDTH, OUT = 390, 500, 32  # level-0 slide; tiles cached at 32 px whatever their scale


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[int, Path]]:
    """Three slides (two with masks, one to predict) and a run of deeplab_lite0 trained for an epoch on their
    tiles at each of scales 2 and 4: (slide folder, scale -> run folder)."""
    root = tmp_path_factory.mktemp("multiscale")
    made = {f"s{k}": SyntheticSlide(HEIGHT, WIDTH, seed=k, glomeruli=400, radius=(10, 20)) for k in range(3)}
    for name, slide in made.items():
        slide.write(root / "slides" / f"{name}.tif", levels=2, tile=128, compression="zlib")
    (root / "masks.csv").write_text("id,encoding\n" + "".join(f"{n},{made[n].rle()}\n" for n in ("s0", "s1")))
    trained = {}
    for scale in (2, 4):
        out = root / f"tiles_{scale}"
        assert cli.main(["tile", str(root / "slides"), "--masks", str(root / "masks.csv"), "--out", str(out),
                         "--size", str(OUT * scale), "--stride", str(OUT * scale), "--scale", str(scale),
                         "--folds", "2", "--thumbnail", "256"]) == 0
        assert cli.main(["build-lmdb", "--datalist", str(out / "datalist.json"), "--out", str(out / "cache"),
                         "--bundle", "deeplab_lite0", "--image-size", str(OUT), "--no-progress"]) == 0
        trained[scale] = train(out, image_size=OUT, batch_size=8)
    return root / "slides", trained


def predict(slides: Path, out: Path, *checkpoints: Path, extra: tuple[str, ...] = ()) -> int:
    return cli.main(["predict", "--checkpoint", *map(str, checkpoints), "--slides", str(slides / "s2.tif"),
                     "--out", str(out), "--batch-size", "8", *extra])


def test_runs_record_their_tiling_and_their_maps_merge_on_the_finer_grid(runs, tmp_path):
    slides, trained = runs
    for scale, run_dir in trained.items():
        tiles = json.loads((run_dir / "best.json").read_text())["tiles"]
        assert (tiles["scale"], tiles["size"], tiles["stride"]) == (scale, OUT * scale, OUT * scale)
    fine, coarse = (run_dir / "best.pt" for run_dir in trained.values())
    maps = {}
    for name, checkpoints in (("fine", [fine]), ("coarse", [coarse]), ("both", [coarse, fine])):
        assert predict(slides, tmp_path / name, *checkpoints) == 0
        maps[name] = np.load(tmp_path / name / "s2_prob.npy")
    assert maps["fine"].shape == maps["both"].shape == (195, 250) and maps["coarse"].shape == (98, 125)
    brought = np.repeat(np.repeat(maps["coarse"], 2, 0), 2, 1)[:195, :250]  # each coarse pixel over 2 x 2
    mean = (maps["fine"].astype(np.float64) + brought) / 2
    assert np.abs(maps["both"].astype(int) - np.rint(mean)).max() <= 1
    assert not np.array_equal(maps["both"], maps["fine"]) and maps["both"].any()
    with Slide(tmp_path / "both" / "s2.tif") as mask:
        level0 = mask.read(0, 0, HEIGHT, WIDTH)[..., 0]
    assert np.array_equal(level0 > 0, np.repeat(np.repeat(maps["both"] > 127, 2, 0), 2, 1)[:HEIGHT, :WIDTH])
    assert (tmp_path / "both" / "predictions.csv").read_text().splitlines()[1] == f"s2,{encode(level0)}"
    assert open_prediction(tmp_path / "both" / "s2_prob.npy")[1:] == ((HEIGHT, WIDTH), 2)  # the scale recorded
    assert sorted(p.name for p in (tmp_path / "both").iterdir()) == \
        ["predictions.csv", "s2.tif", "s2_overlay.png", "s2_prob.npy"]  # the coarse map only until merged


def test_an_older_run_takes_the_tiling_of_the_datalist_it_names(runs, tmp_path):
    slides, trained = runs
    older = tmp_path / "older"
    shutil.copytree(trained[4], older)
    record = json.loads((older / "best.json").read_text())
    del record["tiles"]
    (older / "best.json").write_text(json.dumps(record))
    assert predict(slides, tmp_path / "old", older / "best.pt") == 0
    assert predict(slides, tmp_path / "new", trained[4] / "best.pt") == 0
    assert np.array_equal(np.load(tmp_path / "old" / "s2_prob.npy"), np.load(tmp_path / "new" / "s2_prob.npy"))


def test_one_scale_for_runs_of_two_is_refused_in_one_line(runs, tmp_path, capsys):
    slides, trained = runs
    assert predict(slides, tmp_path / "refused", trained[2] / "best.pt", trained[4] / "best.pt",
                   extra=("--scale", "4")) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("ERROR --scale/--mpp/--tile-size/--stride set one tiling")
    assert "scale 2, windows of 64; scale 4, windows of 128" in err and not (tmp_path / "refused").exists()


def test_maps_of_a_non_integer_ratio_merge_by_pixel_centres():
    """Scales 2 and 3: fine pixel i covers level-0 [2i, 2i + 2), its centre 2i + 1 falls in coarse pixel
    (2i + 1) // 3; two fine runs and one coarse weigh 2 : 1."""
    rng = np.random.default_rng(0)
    fine, coarse = rng.integers(0, 256, (6, 7), dtype=np.uint8), rng.integers(0, 256, (4, 5), dtype=np.uint8)
    assert scale_ratio(3, 2) == 1.5 and scale_ratio(4.0, 2) == 2 and isinstance(scale_ratio(4.0, 2), int)
    centre = (2 * np.arange(7) + 1) // 3
    expected = np.rint((2 * fine.astype(np.float64) + coarse[centre[:6, None], centre[None, :]]) / 3)
    merged = fine.copy()
    merge_maps(merged, 2, [(coarse, scale_ratio(3, 2), 1)])
    assert np.array_equal(merged, expected)


def test_the_shift_check_scores_slides_against_their_masks(runs, tmp_path, capsys):
    sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
    try:
        import shift_check
    finally:
        sys.path.pop(0)
    slides, trained = runs
    base = ["--checkpoint", str(trained[4] / "best.pt"), "--slides", str(slides / "s0.tif"), str(slides / "s1.tif")]
    with pytest.raises(SystemExit) as exit_:
        shift_check.main([*base, "--out", str(tmp_path / "x")])
    assert exit_.value.code == 2 and "--slides needs --masks" in capsys.readouterr().err
    assert shift_check.main([*base, "--masks", str(slides.parent / "masks.csv"), "--shifts", "darker",
                             "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "shift_check.json").read_text())
    assert result["task"] == "slide" and list(result["shifts"]) == ["none", "darker"]
    for name, row in result["shifts"].items():
        metrics = json.loads((tmp_path / name / "eval" / "metrics.json").read_text())
        assert metrics["mean_dice_at_0.5"] == row["score"] and sorted(metrics["dice_at_0.5"]) == ["s0", "s1"]
        assert sorted(p.name for p in (tmp_path / name / "pred").glob("*.tif")) == ["s0.tif", "s1.tif"]
