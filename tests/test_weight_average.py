"""The weight average (``ema_decay``): the exponential moving average on real ignite engines against its closed
form, and in a bundle run through MONAI's runner: what validation scores is what ``best.pt`` holds, the
``evaluating`` run scores it again alike, and a resumed run carries the average on."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from ignite.engine import Engine
from tiny_runs import prepare, train

from stas_pipeline.core.bundles import BundleError
from stas_pipeline.core.optim import WeightAverage
from stas_pipeline.core.run_recorder import CheckpointError, load_checkpoint

REPO = Path(__file__).resolve().parents[1]
STEPS = [1.0, 3.0, -2.0, 5.0]  # the weight after each step


def test_the_average_follows_its_closed_form_buffers_included():
    net = torch.nn.Sequential(torch.nn.Linear(1, 1, bias=False), torch.nn.BatchNorm1d(1))
    average = WeightAverage(net, decay=0.5)

    def step(engine: Engine, batch: float) -> None:
        with torch.no_grad():
            net[0].weight.fill_(batch)
            net[1].running_mean.fill_(2 * batch)

    trainer = Engine(step)
    average.attach(trainer)
    trainer.run(STEPS, max_epochs=1)
    expected = STEPS[0]  # the first step is copied, then average = 0.5 * average + 0.5 * weight
    for w in STEPS[1:]:
        expected = 0.5 * expected + 0.5 * w
    assert average.network is not net
    assert average.network[0].weight.item() == pytest.approx(expected)  # 2.5
    assert average.network[1].running_mean.item() == pytest.approx(2 * expected)
    assert net[0].weight.item() == STEPS[-1]  # the trained network is left alone


def test_decay_zero_is_the_network_itself_and_no_handler():
    net = torch.nn.Linear(1, 1)
    average, trainer = WeightAverage(net, decay=0), Engine(lambda e, b: None)
    average.attach(trainer)
    assert average.network is net and average.averaged is None
    assert not trainer._event_handlers  # nothing attached


@pytest.mark.parametrize("decay", [1.0, -0.1, True, "0.9"])
def test_a_bad_decay_is_named(decay):
    with pytest.raises(BundleError, match=r"--ema_decay .*: expected a number in \[0, 1\)"):
        WeightAverage(torch.nn.Linear(1, 1), decay=decay)


def test_a_bad_decay_ends_a_bundle_run_in_one_line(tmp_path):
    """From MONAI's own command line: one ``ERROR`` line naming the knob, no traceback, nothing trained."""
    prepare(tmp_path)
    done = subprocess.run([sys.executable, "-m", "monai.bundle", "run", "training", "--config_file",
                           "bundles/deeplab_lite0.json", "--dataset_dir", str(tmp_path), "--cache_dir",
                           str(tmp_path / "cache"), "--image_size", "32", "--output_dir", str(tmp_path / "runs"),
                           "--device", "cpu", "--num_workers", "0", "--encoder_weights", "none", "--ema_decay", "1.5"],
                          cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 1
    assert "ERROR --ema_decay 1.5: expected a number in [0, 1) (0 = off)" in done.stderr
    assert "Traceback" not in done.stderr and not list(tmp_path.glob("runs/**/*.pt"))


def test_a_bundle_run_validates_and_keeps_the_average(tmp_path):
    prepare(tmp_path)
    run = train(tmp_path, epochs=1, batch_size=2, ema_decay=0.9, run_ids=("training", "evaluating"))
    best, last = torch.load(run / "best.pt", weights_only=True), load_checkpoint(run / "last.pt")
    record = json.loads((run / "metrics.json").read_text())
    assert record["ema_decay"] == 0.9 and record["best_epoch"] == 1
    averaged = {k.removeprefix("module."): v for k, v in last["averaged"].items() if k.startswith("module.")}
    assert best.keys() == last["model"].keys() == averaged.keys()
    assert all(torch.equal(best[k], averaged[k]) for k in best)  # best.pt: the average validation scored
    assert any(not torch.equal(last["model"][k], averaged[k]) for k in averaged if averaged[k].is_floating_point())
    evaluated = json.loads((run / "eval.json").read_text())  # best.pt scored again by the evaluating run
    assert evaluated["val_dice"] == pytest.approx(record["best_val_dice"], abs=1e-6)

    resumed = train(tmp_path, epochs=2, batch_size=2, ema_decay=0.9, resume=True)
    again = load_checkpoint(resumed / "last.pt")
    assert again["averaged"]["n_averaged"].item() > last["averaged"]["n_averaged"].item()
    with pytest.raises(RuntimeError) as raised:  # MONAI's runner wraps what the expression raised
        train(tmp_path, epochs=2, resume=True, ema_decay=0.9, output_dir=str(_without_average(run, tmp_path)))
    cause = raised.value
    while cause.__cause__ is not None:
        cause = cause.__cause__
    assert isinstance(cause, CheckpointError) and "no weight average to resume" in str(cause)


def _without_average(run, tmp_path):
    """A copy of ``run``'s folder whose ``last.pt`` has no weight average (a run trained without ``ema_decay``)."""
    out = tmp_path / "plain"
    (out / "deeplab_lite0" / "fold0").mkdir(parents=True)
    ckpt = load_checkpoint(run / "last.pt")
    torch.save({**ckpt, "averaged": None}, out / "deeplab_lite0" / "fold0" / "last.pt")
    return out
