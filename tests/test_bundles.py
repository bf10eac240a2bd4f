"""MONAI bundles run by MONAI's own entry point: real smp/timm models, real cache, real checkpoints."""

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
from monai.bundle import run, verify_metadata

from stas_pipeline.core.bundles import parsed_content
from stas_pipeline.core.datalist import write_datalist
from stas_pipeline.core.splits import Split
from stas_pipeline.core.synthetic import make_dataset
from stas_pipeline.stages import build_lmdb
from stas_pipeline.tasks.segmentation.datalist import make_datalist

REPO = Path(__file__).resolve().parents[1]

CPU = {"device": "cpu", "amp": False, "num_workers": 0}


def run_bundle(bundle: str, run_id: str = "training", **overrides) -> None:
    """``python -m monai.bundle run <run_id> --config_file bundles/<bundle>.json --k v ...``, in this process."""
    cwd = os.getcwd()
    os.chdir(REPO)  # the bundles reference bundles/common.json from the repository root
    try:
        run(run_id=run_id, config_file=f"bundles/{bundle}.json", **{**CPU, **overrides})
    finally:
        os.chdir(cwd)


def cli(bundle: str, *args: str, run_id: str = "training") -> list[str]:
    return [sys.executable, "-m", "monai.bundle", "run", run_id, "--config_file", f"bundles/{bundle}.json",
            "--device", "cpu", "--amp", "false", "--num_workers", "0", *args]


def history(run_dir: Path) -> list[dict]:
    return json.loads((run_dir / "metrics.json").read_text())["history"]


def error_chain(err: BaseException) -> str:
    text = []
    while err is not None:
        text.append(str(err))
        err = err.__cause__ or err.__context__
    return "\n".join(text)


@pytest.mark.parametrize("bundle", ["deeplab_effb6", "deeplab_effv2m", "deeplab_nfnet_l2", "unet_effb3", "unet_lite0"])
def test_recipe_bundles_train_and_validate_one_iteration(bundle, synthetic_dataset, tmp_path):
    run_bundle(bundle, dataset_dir=str(synthetic_dataset), datalist=str(synthetic_dataset / "tiny.json"),
               image_size=64, epochs=1, batch_size=2, encoder_weights="none", output_dir=str(tmp_path))
    run_dir = tmp_path / bundle / "fold0"
    (row,) = history(run_dir)
    assert row["epoch"] == 1 and 0.0 <= row["val_dice"] <= 1.0 and row["loss"] > 0
    best = torch.load(run_dir / "best.pt", weights_only=True)
    last = torch.load(run_dir / "last.pt", weights_only=True)
    assert set(best) == set(last["model"]) and last["epoch"] == 1 and last["optimizer"]["state"]
    info = json.loads((run_dir / "best.json").read_text())
    assert info["encoder"] in bundle_encoder(bundle)
    assert info["network"]["arch"] == ("Unet" if bundle.startswith("unet") else "DeepLabV3Plus")
    assert (run_dir / "curves.png").stat().st_size > 0
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))


def bundle_encoder(bundle: str) -> str:
    return json.loads((REPO / "bundles" / f"{bundle}.json").read_text())["encoder_name"]


def test_lite0_bundle_learns_an_easy_task_from_the_cli(synthetic_dataset, tmp_path):
    """The user's command as written; validation Dice (at the original size) climbs from the untrained model's
    (validated before training) past 0.8."""
    args = ["--dataset_dir", str(synthetic_dataset), "--image_size", "96", "--epochs", "8", "--batch_size", "4",
            "--lr", "0.003", "--encoder_weights", "imagenet", "--output_dir", str(tmp_path)]
    subprocess.run(cli("deeplab_lite0", *args, "--val_at_start", "true"), cwd=REPO, check=True,
                   capture_output=True)
    rows = history(tmp_path / "deeplab_lite0" / "fold0")
    dice = [row["val_dice"] for row in rows]
    assert rows[0]["epoch"] == 0 and rows[0]["loss"] is None and len(rows) == 9
    assert dice[0] < 0.3 and max(dice) > 0.8, dice

    subprocess.run(cli("deeplab_lite0", *args, run_id="evaluating"), cwd=REPO, check=True, capture_output=True)
    evaluation = json.loads((tmp_path / "deeplab_lite0" / "fold0" / "eval.json").read_text())
    assert evaluation["val_dice"] == pytest.approx(max(dice), abs=1e-4) and evaluation["images"] == 8


def test_same_seed_same_metrics(synthetic_dataset, tmp_path):
    runs = []
    for name in ("a", "b"):
        run_bundle("deeplab_lite0", dataset_dir=str(synthetic_dataset), image_size=64, epochs=2, batch_size=4,
                   encoder_weights="none", seed=7, output_dir=str(tmp_path / name))
        runs.append([{k: v for k, v in row.items() if k != "seconds"}
                     for row in history(tmp_path / name / "deeplab_lite0" / "fold0")])
    assert runs[0] == runs[1]


def test_resume_after_kill_9_ends_with_all_epochs(synthetic_dataset, tmp_path):
    args = ["--dataset_dir", str(synthetic_dataset), "--image_size", "64", "--epochs", "4", "--batch_size", "4",
            "--encoder_weights", "none", "--output_dir", str(tmp_path)]
    run_dir = tmp_path / "deeplab_lite0" / "fold0"
    proc = subprocess.Popen(cli("deeplab_lite0", *args), cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not (run_dir / "last.pt").exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = torch.load(run_dir / "last.pt", weights_only=True)["epoch"]
    assert done < 4, "the run finished before it could be killed"

    with pytest.raises(subprocess.CalledProcessError) as refused:  # no silent restart over an earlier run
        subprocess.run(cli("deeplab_lite0", *args), cwd=REPO, check=True, capture_output=True, text=True)
    assert "holds an earlier run" in refused.value.stderr

    subprocess.run(cli("deeplab_lite0", *args, "--resume", "true"), cwd=REPO, check=True, capture_output=True)
    assert [row["epoch"] for row in history(run_dir)] == [1, 2, 3, 4]
    last = torch.load(run_dir / "last.pt", weights_only=True)
    assert last["epoch"] == 4 and last["best_epoch"] >= 1


def test_truncated_checkpoint_is_reported_not_loaded(synthetic_dataset, tmp_path):
    common = dict(dataset_dir=str(synthetic_dataset), datalist=str(synthetic_dataset / "tiny.json"), image_size=64,
                  epochs=1, batch_size=4, encoder_weights="none", output_dir=str(tmp_path))
    run_bundle("deeplab_lite0", **common)
    last = tmp_path / "deeplab_lite0" / "fold0" / "last.pt"
    last.write_bytes(last.read_bytes()[:1000])
    with pytest.raises(Exception) as err:
        run_bundle("deeplab_lite0", resume=True, **common)
    assert f"{last}: corrupt or truncated checkpoint, not loaded" in error_chain(err.value)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"encoder_name": "tf_efficientnet_b99"}, "unknown encoder 'tf_efficientnet_b99'"),
        ({"fold": 7}, "fold 7 is out of range"),
        ({"datalist": "/nonexistent/datalist.json"}, "datalist /nonexistent/datalist.json: no such file"),
        ({"image_size": 72, "cache_dir": "unused"}, "image_size 72 is not a multiple of 16"),
    ],
)
def test_bad_config_values_fail_before_training(override, message, synthetic_dataset, tmp_path):
    with pytest.raises(Exception) as err:
        run_bundle("deeplab_lite0", **{"dataset_dir": str(synthetic_dataset), "image_size": 64, "epochs": 1,
                                       "encoder_weights": "none", "output_dir": str(tmp_path), **override})
    assert message in error_chain(err.value)
    assert not list(tmp_path.rglob("*.pt")) and not list(tmp_path.rglob("metrics.json"))


def test_missing_cache_names_the_command_to_build_it(synthetic_dataset, tmp_path):
    with pytest.raises(Exception) as err:
        run_bundle("deeplab_lite0", dataset_dir=str(synthetic_dataset), image_size=128, epochs=1,
                   encoder_weights="none", output_dir=str(tmp_path))
    assert "no complete LMDB cache here; build it with: stas build-lmdb" in error_chain(err.value)


@pytest.mark.parametrize("meta", ["metadata.json", "metadata_classification.json", "metadata_grading.json",
                                  "metadata_slide.json"])
def test_metadata_passes_monai_schema(meta):
    """MONAI's ``verify_metadata`` (what ``python -m monai.bundle verify_metadata`` runs), in this process: it
    raises on any schema violation and returns only once the metadata is verified."""
    schema = REPO.parent / "shared" / "monai" / "meta_schema_20240725.json"
    if not schema.exists():
        pytest.skip("MONAI's metadata schema is not available offline here")
    verify_metadata(meta_file=str(REPO / "bundles" / meta), filepath=str(schema))


def test_an_image_left_out_of_the_cache_ends_the_bundle_with_one_line(tmp_path):
    images, masks = make_dataset(tmp_path, n=10, height=48, width=64)
    datalist = make_datalist(images, masks, tmp_path, Split(folds=2, seed=0))
    write_datalist(tmp_path / "datalist.json", datalist, "segmentation", "mask")
    broken = sorted(Path(images).iterdir())[3]
    broken.write_bytes(broken.read_bytes()[:200])  # truncated after make-datalist read it
    argv = ["--datalist", str(tmp_path / "datalist.json"), "--out", str(tmp_path / "cache_64"), "--image-size", "64",
            "--no-progress"]
    assert build_lmdb.main(argv) == 1
    out = subprocess.run(cli("deeplab_lite0", "--dataset_dir", str(tmp_path), "--image_size", "64", "--epochs", "1",
                             "--encoder_weights", "none", "--output_dir", str(tmp_path / "runs")),
                         cwd=REPO, capture_output=True, text=True)
    assert out.returncode != 0 and "Traceback" not in out.stderr
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("ERROR ") and broken.name in last and "left out when the cache was built" in last
    assert "cannot decode image: Truncated File Read" in last and "build it with" not in last


def test_a_refused_run_leaves_the_earlier_run_as_it_was(tmp_path):
    """Without --resume, a run over an earlier one is refused before the TensorBoard writer (or anything) adds a
    file to its folder."""
    images, masks = make_dataset(tmp_path, n=6, height=48, width=64)
    write_datalist(tmp_path / "datalist.json", make_datalist(images, masks, tmp_path, Split(folds=2, seed=0)),
                   "segmentation", "mask")
    assert build_lmdb.main(["--datalist", str(tmp_path / "datalist.json"), "--out", str(tmp_path / "cache_64"),
                            "--bundle", "deeplab_lite0", "--image-size", "64", "--no-progress"]) == 0
    common = dict(dataset_dir=str(tmp_path), image_size=64, epochs=1, batch_size=2, encoder_weights="none",
                  output_dir=str(tmp_path / "runs"))
    run_bundle("deeplab_lite0", **common)
    run_dir = tmp_path / "runs" / "deeplab_lite0" / "fold0"

    def files() -> dict[str, tuple[int, int]]:
        return {str(p.relative_to(run_dir)): (p.stat().st_size, p.stat().st_mtime_ns) for p in run_dir.rglob("*")}

    before = files()
    assert any(name.startswith("tensorboard/events.out.tfevents") for name in before)
    with pytest.raises(Exception) as err:
        run_bundle("deeplab_lite0", **common)
    assert f"{run_dir}: holds an earlier run" in error_chain(err.value)
    assert files() == before


def test_on_off_knobs_given_as_words_on_the_command_line(capsys):
    """MONAI's command line (fire) reads ``--aux_head false`` as the string "false", which Python takes as true:
    every on/off knob is read as a word, and a word that is neither is refused naming the knob."""
    from fire import parser as fire_parser

    assert fire_parser.DefaultParseValue("false") == "false"  # what `python -m monai.bundle run ...` hands over
    ids = ["task#network", "task#run_info", "workflow#to_kwargs"]
    for words, expected in ((("false", "off", "0"), False), (("true", "Yes", "1"), True)):
        for word in words:
            network, info, to_kwargs = parsed_content(
                "deeplab_lite0_slide", ids,
                {"image_size": 64, "aux_head": word, "deep_supervision": word, "hypercolumns": word,
                 "keep_aspect": word, "channels_last": word})
            assert (network["aux_head"], network["deep_supervision"], network["hypercolumns"]) == (expected,) * 3
            assert (info["aux_head"], info["keep_aspect"], bool(to_kwargs)) == (expected,) * 3
    with pytest.raises(Exception) as err:
        parsed_content("deeplab_lite0", ["task#network"], {"image_size": 64, "aux_head": "maybe"})
    assert "--aux_head maybe: expected true or false" in error_chain(err.value)


def test_dice_batch_follows_the_crops_unless_declared():
    """The Dice loss is over the whole batch when the bundle trains on crops, per image otherwise; ``dice_batch``
    declares it, as a word on the command line too; the slide recipe declares it per image, with BCE."""
    for bundle, overrides, expected in (("deeplab_lite0", {}, False), ("deeplab_lite0", {"crop_size": 32}, True),
                                        ("deeplab_lite0", {"crop_size": 32, "dice_batch": "false"}, False),
                                        ("deeplab_lite0", {"dice_batch": "true"}, True),
                                        ("deeplab_lite0_slide", {"crop_size": 32}, False),
                                        ("deeplab_lite0_slide", {"crop_size": 32, "dice_batch": "yes"}, True)):
        (loss,) = parsed_content(bundle, ["task#loss"], {"image_size": 64, **overrides})
        assert loss.dice.batch is expected, (bundle, overrides)
        assert loss.lovasz.per_image is not bool(overrides.get("crop_size")), (bundle, overrides)
    (loss,) = parsed_content("deeplab_lite0_slide", ["task#loss"], {"image_size": 64})
    assert loss.bce_weight == 1.0


def test_the_optimiser_target_names_the_class_on_every_python():
    """``adabelief_pytorch.AdaBelief`` is also a submodule: Python 3.12's ``pydoc.locate`` (MONAI's resolver)
    returned the module there. The bundles' target must name no module, and resolve to the optimiser class."""
    import importlib.util

    from monai.utils.module import locate

    target = json.loads((REPO / "bundles" / "common.json").read_text())["workflow"]["optimizer"]["_target_"]
    try:
        spec = importlib.util.find_spec(target)
    except ModuleNotFoundError:
        spec = None
    assert spec is None, f"{target} is a module"
    assert issubclass(locate(target), torch.optim.Optimizer)
