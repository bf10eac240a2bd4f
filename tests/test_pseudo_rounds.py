"""Alternating pseudo-label rounds (stas pseudo-label --group/--labelled-by): two groups of runs label the test data
for each other. On whole slides, end to end with real stages: tiles of synthetic slides, runs trained by MONAI's
runner on the group's datalist, ``stas predict`` of the test slide, rounds recorded per group, the labelling group
read from the run, each group's datalist holding the other group's masks, refusals. On image-level datalists
with the predictions CSV and run folders written as those stages write them: records, replacement, refusals."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from test_pseudo_label import (
    TEST,
    data,  # noqa: F401 (a fixture)
    pseudo,
    write_predictions,
)
from tiny_runs import train

from stas_pipeline import cli
from stas_pipeline.tasks.slide.rle import encode
from stas_pipeline.tasks.slide.synthetic import SyntheticSlide

SIZE, SCALE, H, W = 128, 4, 384, 512  # tiles of 128 level-0 pixels, trained at 32


def cut(predictions: Path) -> int:
    """A one-epoch model is never sure: the uint8 level at or above which about a tenth of the test slide's
    predicted pixels lie (its pseudo mask, given as --high; --low 0 and --max-uncertain 1: every test tile joins)."""
    prob = np.load(predictions / "s2_prob.npy")
    return max(1, int(np.percentile(prob[prob > 0], 90)))


def pseudo_label(*args: str) -> int:
    high = (cut(Path(args[args.index("--predictions") + 1])) - 0.5) / 255
    return cli.main(["pseudo-label", "--high", str(high), "--low", "0", "--max-uncertain", "1", *args])


def refused(capsys: pytest.CaptureFixture, code: int, *names: object) -> str:
    """The one ERROR line of a refused round, checked to name ``names``."""
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("ERROR"), err
    assert all(str(name) in err for name in names), err
    return err


@pytest.fixture(scope="module")
def tiles(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``tiles/datalist.json`` (D) of three synthetic slides (s0, s1 with masks in 2 folds; s2 the test slide)
    and its cache."""
    root = tmp_path_factory.mktemp("rounds")
    made = {f"s{k}": SyntheticSlide(H, W, seed=k, glomeruli=400, radius=(10, 20)) for k in range(3)}
    for name, slide in made.items():
        slide.write(root / "slides" / f"{name}.tif", levels=1, tile=128, compression="zlib")
    (root / "masks.csv").write_text("id,encoding\n" + "".join(f"{n},{made[n].rle()}\n" for n in ("s0", "s1")))
    out = root / "tiles"
    assert cli.main(["tile", str(root / "slides"), "--masks", str(root / "masks.csv"), "--out", str(out),
                     "--size", str(SIZE), "--stride", str(SIZE // 2), "--scale", str(SCALE), "--folds", "2",
                     "--thumbnail", "256"]) == 0
    cache(out / "datalist.json")
    return out


def cache(datalist: Path) -> None:
    """The tiles' cache refreshed for ``datalist`` (its pseudo tiles added)."""
    assert cli.main(["build-lmdb", "--datalist", str(datalist), "--out", str(datalist.parent / "cache"), "--bundle",
                     "deeplab_lite0", "--image-size", str(SIZE // SCALE), "--no-progress"]) == 0


def train_and_predict(tiles: Path, datalist: Path, name: str, seed: int) -> tuple[Path, Path]:
    """A run trained on ``datalist`` (``tiles/runs_<name>/deeplab_lite0``) and its prediction of the test slide."""
    train(tiles, datalist=str(datalist), output_dir=str(tiles / f"runs_{name}"), batch_size=8, seed=seed)
    run = tiles / f"runs_{name}" / "deeplab_lite0"
    predictions = tiles / f"pred_{name}"
    assert cli.main(["predict", "--checkpoint", str(run / "fold0" / "best.pt"), "--datalist",
                     str(tiles / "datalist.json"), "--out", str(predictions)]) == 0
    return run, predictions


def pseudo_masks(datalist: Path) -> dict[str, str]:
    """slide id -> the RLE of the pseudo mask the datalist's pseudo tiles are labelled with."""
    return dict(row.split(",") for row in (datalist.parent / f"{datalist.stem}_pseudo_masks.csv").read_text()
                .splitlines()[1:])


def expected_mask(predictions: Path) -> str:
    """The RLE of the test slide's pseudo mask from a prediction: the level-0 pixels at or above its cut."""
    prob = np.load(predictions / "s2_prob.npy")
    return encode(np.repeat(np.repeat(prob >= cut(predictions), SCALE, 0), SCALE, 1))


def test_slides_alternate_between_two_groups(tiles, capsys):
    """HuBMAP's sequence: A trained on D labels D for B; B trained on D_B1 labels D for A; A trained on D_A1
    labels B's next round, replacing A's earlier labels; the final prediction would come from A."""
    d = tiles / "datalist.json"
    test_tiles = json.loads(d.read_text())["test"]
    run_a0, pred_a0 = train_and_predict(tiles, d, "A0", seed=0)
    capsys.readouterr()  # the training's and prediction's progress

    # A0 trained on D, a datalist of no group: which group made its predictions must be said
    code = pseudo_label("--datalist", str(d), "--predictions", str(pred_a0), "--runs", str(run_a0), "--group", "B",
                        "--out", str(tiles / "D_B1.json"))
    refused(capsys, code, pred_a0, run_a0, d, "give --labelled-by")
    # nor may a group label its own datalist
    code = pseudo_label("--datalist", str(d), "--predictions", str(pred_a0), "--group", "A", "--labelled-by", "A",
                        "--out", str(tiles / "D_A1.json"))
    refused(capsys, code, pred_a0, tiles / "D_A1.json", "never trains on labels it made")
    assert not (tiles / "D_B1.json").exists() and not (tiles / "D_A1.json").exists()

    d_b1 = tiles / "D_B1.json"
    assert pseudo_label("--datalist", str(d), "--predictions", str(pred_a0), "--runs", str(run_a0), "--group", "B",
                        "--labelled-by", "A", "--out", str(d_b1)) == 0
    assert "round 1 for group B, labelled by group A: " in capsys.readouterr().out
    b1 = json.loads(d_b1.read_text())
    (record,) = b1["pseudo_rounds"]
    assert {k: record[k] for k in ("round", "group", "labelled_by", "runs_datalist", "runs", "predictions")} == {
        "round": 1, "group": "B", "labelled_by": "A", "runs_datalist": "datalist.json", "runs": "runs_A0/deeplab_lite0",
        "predictions": "pred_A0"}
    assert len(pseudo(b1)) == record["tiles_added"] == len(test_tiles) and record["replaced_previous"] == 0
    assert pseudo_masks(d_b1) == {"s2": expected_mask(pred_a0)}

    cache(d_b1)
    run_b1, pred_b1 = train_and_predict(tiles, d_b1, "B1", seed=1)
    capsys.readouterr()
    assert not np.array_equal(np.load(pred_a0 / "s2_prob.npy"), np.load(pred_b1 / "s2_prob.npy"))
    # B1 trained on D_B1, so its predictions are group B's: never for group B's own datalist ...
    code = pseudo_label("--datalist", str(d_b1), "--predictions", str(pred_b1), "--runs", str(run_b1), "--group",
                        "B", "--out", str(tiles / "D_B2.json"))
    refused(capsys, code, pred_b1, run_b1, d_b1, tiles / "D_B2.json", "group B's predictions")
    # ... nor said to be another group's
    code = pseudo_label("--datalist", str(d), "--predictions", str(pred_b1), "--runs", str(run_b1), "--group", "C",
                        "--labelled-by", "A", "--out", str(tiles / "D_C1.json"))
    refused(capsys, code, pred_b1, run_b1, d_b1, "--labelled-by A, but", "group B's datalist")
    # group A's chain starts from D (or A's own datalist), never from B's
    code = pseudo_label("--datalist", str(d_b1), "--predictions", str(pred_b1), "--runs", str(run_b1), "--group",
                        "A", "--out", str(tiles / "D_A1.json"))
    refused(capsys, code, d_b1, "group B's datalist (labelled by group A), not group A's")
    # a group's datalist takes no plain round (whose labels would be of no known group)
    code = pseudo_label("--datalist", str(d_b1), "--predictions", str(pred_b1), "--out", str(tiles / "x.json"))
    refused(capsys, code, d_b1, "needs --group B")

    d_a1 = tiles / "D_A1.json"
    assert pseudo_label("--datalist", str(d), "--predictions", str(pred_b1), "--runs", str(run_b1), "--group", "A",
                        "--out", str(d_a1)) == 0  # the labelling group read from the run
    a1 = json.loads(d_a1.read_text())
    (record,) = a1["pseudo_rounds"]
    assert (record["round"], record["group"], record["labelled_by"], record["runs_datalist"]) == (1, "A", "B",
                                                                                                   "D_B1.json")
    assert pseudo_masks(d_a1) == {"s2": expected_mask(pred_b1)}  # group A's datalist holds group B's labels
    assert pseudo_masks(d_b1) == {"s2": expected_mask(pred_a0)}  # and B's still A's
    assert pseudo_masks(d_a1) != pseudo_masks(d_b1) and record["positive_tiles"] > 0

    cache(d_a1)
    run_a1, pred_a1 = train_and_predict(tiles, d_a1, "A1", seed=2)
    capsys.readouterr()
    d_b2 = tiles / "D_B2.json"
    assert pseudo_label("--datalist", str(d_b1), "--predictions", str(pred_a1), "--runs", str(run_a1), "--group",
                        "B", "--out", str(d_b2)) == 0
    b2 = json.loads(d_b2.read_text())
    assert [(r["round"], r["group"], r["labelled_by"]) for r in b2["pseudo_rounds"]] == [(1, "B", "A"), (2, "B", "A")]
    record = b2["pseudo_rounds"][-1]
    assert record["replaced_previous"] == len(test_tiles) and record["runs_datalist"] == "D_A1.json"
    assert all(e["pseudo_round"] == 2 and e["label"] == "D_B2_pseudo_masks.csv" for e in pseudo(b2))
    assert len(pseudo(b2)) == len(test_tiles) and pseudo_masks(d_b2) == {"s2": expected_mask(pred_a1)}
    assert [e for e in b2["training"] if "fold" in e] == [e for e in b1["training"] if "fold" in e]
    assert b2["test"] == b1["test"] == test_tiles


def write_group_run(run_dir: Path, datalist: str | Path, dataset_dir: Path | None = None) -> Path:
    """A classification run folder as training writes it: fold0's metrics.json and config.json (with the
    bundles' default ``datalist`` expression when ``dataset_dir`` is given)."""
    (run_dir / "fold0").mkdir(parents=True)
    (run_dir / "fold0" / "metrics.json").write_text(json.dumps(
        {"bundle": "fundus_lite0", "fold": 0, "best_epoch": 1, "best_val_auc": 0.9,
         "history": [{"epoch": 1, "loss": 0.5, "val_auc": 0.9, "lr": 3e-4, "seconds": 1.0}]}))
    config = {"imports": ["$import os"], "dataset_dir": str(dataset_dir), "datalist": str(datalist)}
    if dataset_dir is not None:
        config["datalist"] = f"$os.path.join(@dataset_dir, '{datalist}')"
    (run_dir / "fold0" / "config.json").write_text(json.dumps(config))
    return run_dir


def test_image_level_rounds_alternate_and_replace(data, tmp_path, capsys):  # noqa: F811
    d = data / "datalist.json"
    run_a0 = write_group_run(tmp_path / "runs" / "A0", d)
    p_a0 = write_predictions(tmp_path / "a0.csv", {TEST[0]: 0.99, TEST[1]: 0.01, TEST[2]: 0.5}, data)
    assert cli.main(["pseudo-label", "--datalist", str(d), "--predictions", str(p_a0), "--runs", str(run_a0),
                     "--group", "B", "--labelled-by", "A", "--out", str(data / "D_B1.json")]) == 0
    assert "round 1 for group B, labelled by group A: added 2" in capsys.readouterr().out
    b1 = json.loads((data / "D_B1.json").read_text())
    assert sorted((e["image"], e["label"]) for e in pseudo(b1)) == [(TEST[0], 1), (TEST[1], 0)]
    record = b1["pseudo_rounds"][0]
    assert (record["group"], record["labelled_by"], record["runs_datalist"], record["cv_auc"]) == (
        "B", "A", "datalist.json", 0.9)

    run_b1 = write_group_run(tmp_path / "runs" / "B1", "D_B1.json", dataset_dir=data)  # the bundles' expression
    p_b1 = write_predictions(tmp_path / "b1.csv", {TEST[2]: 0.995, TEST[3]: 0.002, TEST[0]: 0.3}, data)
    assert cli.main(["pseudo-label", "--datalist", str(d), "--predictions", str(p_b1), "--runs", str(run_b1),
                     "--group", "A", "--out", str(data / "D_A1.json")]) == 0
    a1 = json.loads((data / "D_A1.json").read_text())
    assert sorted((e["image"], e["label"]) for e in pseudo(a1)) == [(TEST[2], 1), (TEST[3], 0)]  # B's, not A's
    assert (a1["pseudo_rounds"][0]["labelled_by"], a1["pseudo_rounds"][0]["runs_datalist"]) == ("B", "D_B1.json")
    capsys.readouterr()
    code = cli.main(["pseudo-label", "--datalist", str(data / "D_B1.json"), "--predictions", str(p_b1), "--runs",
                     str(run_b1), "--group", "B", "--out", str(data / "D_B2.json")])
    refused(capsys, code, p_b1, run_b1, data / "D_B2.json", "never trains on labels it made")
    code = cli.main(["pseudo-label", "--datalist", str(d), "--predictions", str(p_b1), "--labelled-by", "B",
                     "--out", str(data / "x.json")])
    refused(capsys, code, "--labelled-by is for alternating rounds")

    # A's next labels for B replace A's earlier ones (B never keeps a stale label of A)
    run_a1 = write_group_run(tmp_path / "runs" / "A1", data / "D_A1.json")
    p_a1 = write_predictions(tmp_path / "a1.csv", {TEST[0]: 0.2, TEST[4]: 0.99}, data)
    assert cli.main(["pseudo-label", "--datalist", str(data / "D_B1.json"), "--predictions", str(p_a1), "--runs",
                     str(run_a1), "--group", "B", "--out", str(data / "D_B2.json")]) == 0
    b2 = json.loads((data / "D_B2.json").read_text())
    assert [(e["image"], e["label"], e["pseudo_round"]) for e in pseudo(b2)] == [(TEST[4], 1, 2)]
    record = b2["pseudo_rounds"][-1]
    assert (record["round"], record["replaced_previous"], record["labelled_by"], record["already_pseudo"]) == (
        2, 2, "A", 0)
    # a run whose datalist cannot be found from here: --labelled-by is taken, with a warning, and needed
    moved = write_group_run(tmp_path / "runs" / "moved", tmp_path / "gone" / "D_A1.json")
    args = ["pseudo-label", "--datalist", str(d), "--predictions", str(p_a1), "--runs", str(moved), "--group", "B"]
    refused(capsys, cli.main([*args, "--out", str(data / "x.json")]), p_a1, moved, "not found from here")
    assert cli.main([*args, "--labelled-by", "A", "--out", str(data / "D_B1_again.json")]) == 0
    assert "WARNING" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main([*args, "--labelled-by", "A or B", "--out", str(data / "x.json")])
    assert "a group is a name of letters" in capsys.readouterr().err and not (data / "x.json").exists()
    # plain rounds are as they were: the group fields null
    assert cli.main(["pseudo-label", "--datalist", str(d), "--predictions", str(p_a0), "--out",
                     str(data / "plain.json")]) == 0
    plain = json.loads((data / "plain.json").read_text())["pseudo_rounds"][0]
    assert (plain["group"], plain["labelled_by"], plain["runs_datalist"]) == (None, None, None)
