"""The fundus classification task on the shared stages: make-datalist from a labels CSV, build-lmdb with the
bundle's declared chain, the shared MONAI workflow, stas predict (fold mean, out of fold), a pseudo-label round
trained again. Real timm model (Lite0, no weights), real cache, real PNGs."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_runs import prepare_fundus, train

from stas_pipeline import cli
from stas_pipeline.core.bundles import parsed_content
from stas_pipeline.core.datalist import load_fold
from stas_pipeline.core.lmdb_cache import CacheError, LMDBCacheDataset, Preprocessing
from stas_pipeline.core.trained_runs import load_trained_run, run_info_of

BUNDLE, SIZE = "fundus_lite0", 32


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """30 synthetic fundus-like images -> datalist (2 folds + inner test) -> cache -> folds 0 and 1 trained."""
    root = tmp_path_factory.mktemp("fundus")
    prepare_fundus(root, BUNDLE, image_size=SIZE, split=("--test-fraction", "0.2"), lists=("training", "test"))
    for fold in (0, 1):
        train(root, BUNDLE, image_size=SIZE, fold=fold, epochs=2, batch_size=8)
    return root


def read_csv(path: Path) -> list[dict]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def test_training_records_auc_per_epoch_and_the_task(trained):
    run_dir = trained / "runs" / BUNDLE / "fold0"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert [row["epoch"] for row in metrics["history"]] == [1, 2]
    assert all(0.0 <= row["val_auc"] <= 1.0 and row["loss"] > 0 for row in metrics["history"])
    assert metrics["best_val_auc"] == max(row["val_auc"] for row in metrics["history"])
    info = json.loads((run_dir / "best.json").read_text())
    assert info["task"] == "classification" and info["network"]["kind"] == "classification"
    assert info["label_smoothing"] == 0.1 and info["image_size"] == SIZE
    assert (run_dir / "best.pt").is_file() and list((run_dir / "tensorboard").glob("events.out.tfevents.*"))


def test_predict_writes_one_column_per_fold_and_their_mean(trained, tmp_path):
    checkpoints = [str(trained / "runs" / BUNDLE / f"fold{k}" / "best.pt") for k in (0, 1)]
    out = tmp_path / "test.csv"
    assert cli.main(["predict", "--checkpoint", *checkpoints, "--datalist", str(trained / "datalist.json"),
                     "--tta", "hv", "--workers", "0", "--batch-size", "4", "--out", str(out)]) == 0
    rows = read_csv(out)
    test = json.loads((trained / "datalist.json").read_text())["test"]
    assert list(rows[0]) == ["image", "prob", f"{BUNDLE}/fold0", f"{BUNDLE}/fold1"]
    assert len(rows) == len(test) > 0
    for row in rows:
        members = [float(row[f"{BUNDLE}/fold{k}"]) for k in (0, 1)]
        assert float(row["prob"]) == pytest.approx(np.mean(members), abs=1e-6)
        assert 0.0 < float(row["prob"]) < 1.0


def test_out_of_fold_predicts_each_training_image_with_its_own_folds_run(trained, tmp_path):
    checkpoints = [str(trained / "runs" / BUNDLE / f"fold{k}" / "best.pt") for k in (0, 1)]
    out = tmp_path / "oof.csv"
    assert cli.main(["predict", "--checkpoint", *checkpoints, "--datalist", str(trained / "datalist.json"),
                     "--out-of-fold", "--workers", "0", "--out", str(out)]) == 0
    fold_of = {str((trained / e["image"]).resolve()): e["fold"]
               for e in json.loads((trained / "datalist.json").read_text())["training"]}
    rows = read_csv(out)
    assert sorted(row["image"] for row in rows) == sorted(fold_of)
    for row in rows:
        filled = [k for k in (0, 1) if row[f"{BUNDLE}/fold{k}"] != ""]
        assert filled == [fold_of[row["image"]]]
        assert float(row["prob"]) == float(row[f"{BUNDLE}/fold{filled[0]}"])


def test_predict_sees_exactly_what_validation_saw(trained, tmp_path):
    """No train/inference skew: stas predict (the bundle's declared chain on the image file) gives the same
    probability as the model on the cached validation item through the bundle's validation transforms."""
    checkpoint = trained / "runs" / BUNDLE / "fold0" / "best.pt"
    out = tmp_path / "val.csv"
    assert cli.main(["predict", "--checkpoint", str(checkpoint), "--datalist", str(trained / "datalist.json"),
                     "--out-of-fold", "--workers", "0", "--out", str(out)]) == 0
    predicted = {row["image"]: float(row["prob"]) for row in read_csv(out)}
    info = run_info_of(checkpoint)
    run_ = load_trained_run(checkpoint, info)
    validation = load_fold(str(trained / "datalist.json"), 0)[1]
    dataset = LMDBCacheDataset(validation, trained / "cache", run_.preprocessing, run_.transform)
    with torch.no_grad():
        for entry, item in zip(validation, dataset, strict=True):
            prob = torch.sigmoid(run_.model(item["image"][None].float())).item()
            assert prob == pytest.approx(predicted[str((trained / entry["image"]).resolve())], abs=1e-5)


def test_cache_is_keyed_by_the_declared_chain(trained):
    """The cache records the bundle's chain: a run asking for another crop fraction is refused, naming it."""
    items = load_fold(str(trained / "datalist.json"), 0)[0]
    chain, = parsed_content(BUNDLE, ["task#preprocessing"], {"image_size": SIZE, "crop_fraction": 0.8})
    with pytest.raises(CacheError, match="roi_scale"):
        LMDBCacheDataset(items, trained / "cache", Preprocessing(chain))
    same, = parsed_content(BUNDLE, ["task#preprocessing"], {"image_size": SIZE})
    assert len(LMDBCacheDataset(items, trained / "cache", Preprocessing(same))) == len(items)


def test_a_pseudo_label_round_trains(trained, tmp_path):
    """Pseudo entries (extra fields, no fold) join every fold's training part and collate with the rest."""
    checkpoints = [str(trained / "runs" / BUNDLE / f"fold{k}" / "best.pt") for k in (0, 1)]
    predictions = tmp_path / "test.csv"
    assert cli.main(["predict", "--checkpoint", *checkpoints, "--datalist", str(trained / "datalist.json"),
                     "--workers", "0", "--out", str(predictions)]) == 0
    probs = sorted(float(r["prob"]) for r in read_csv(predictions))  # thresholds that take the two extremes
    round1 = tmp_path / "datalist_round1.json"
    assert cli.main(["pseudo-label", "--datalist", str(trained / "datalist.json"), "--predictions",
                     str(predictions), "--high", str(probs[-1]), "--low", str(probs[0]), "--out", str(round1)]) == 0
    pseudo = [e for e in json.loads(round1.read_text())["training"] if "pseudo_round" in e]
    assert len(pseudo) == 2 and all("fold" not in e for e in pseudo)
    run_dir = train(trained, BUNDLE, image_size=SIZE, datalist=str(round1), batch_size=8,
                    output_dir=str(tmp_path / "runs"))
    assert len(json.loads((run_dir / "metrics.json").read_text())["history"]) == 1


def test_an_unreadable_image_is_reported_and_the_rest_predicted(trained, tmp_path, capsys):
    folder = tmp_path / "images"
    folder.mkdir()
    good = sorted((trained / "data" / "images").glob("*.jpg"))[:3]
    for path in good:
        (folder / path.name).write_bytes(path.read_bytes())
    (folder / "broken.jpg").write_bytes(b"not a JPEG")
    out = tmp_path / "preds.csv"
    code = cli.main(["predict", "--checkpoint", str(trained / "runs" / BUNDLE / "fold0" / "best.pt"),
                     "--images", str(folder), "--workers", "0", "--out", str(out)])
    assert code == 1
    assert f"ERROR {(folder / 'broken.jpg').resolve()}: cannot read image" in capsys.readouterr().err
    assert sorted(Path(row["image"]).name for row in read_csv(out)) == sorted(p.name for p in good)
