"""Early stopping and reduce-on-plateau (``early_stop_patience``, ``plateau_patience``) on top of a bundle's own
schedule: on real ignite engines fed a fixed sequence of validation scores, and in a bundle run through MONAI's
runner."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from ignite.engine import Engine, Events
from tiny_runs import prepare, train

from stas_pipeline.core.bundles import BundleError
from stas_pipeline.core.schedule import ValidationSchedule

REPO = Path(__file__).resolve().parents[1]
SCORES = [0.5, 0.6, 0.6, 0.55, 0.7, 0.7, 0.6, 0.6, 0.9, 0.9]


def engines(early_stop: int, plateau: int) -> tuple[Engine, torch.optim.Optimizer, list[float]]:
    """A trainer validating after every epoch; the validator's key metric is the next of SCORES; the learning rate
    of each epoch is recorded."""
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    trainer, validator, lrs = Engine(lambda e, b: None), Engine(lambda e, b: None), []

    @validator.on(Events.EPOCH_COMPLETED)
    def score(engine: Engine) -> None:
        engine.state.metrics["val_dice"] = SCORES[trainer.state.epoch - 1]

    @trainer.on(Events.EPOCH_COMPLETED)
    def validate(engine: Engine) -> None:
        lrs.append(optimizer.param_groups[0]["lr"])
        validator.run([0])

    ValidationSchedule(validator, optimizer, "val_dice", early_stop_patience=early_stop,
                       plateau_patience=plateau).attach(trainer)
    return trainer, optimizer, lrs


def test_plateau_halves_the_rate_and_early_stopping_ends_the_run():
    trainer, optimizer, lrs = engines(early_stop=3, plateau=1)
    trainer.run([0], max_epochs=len(SCORES))
    # scores 0.5 0.6 | 0.6 0.55 (no better: halved twice) | 0.7 | 0.7 0.6 0.6 (three without improvement: stop)
    assert trainer.state.epoch == 8
    assert lrs == [1.0, 1.0, 1.0, 0.5, 0.25, 0.25, 0.125, 0.0625]


def test_patience_two_waits_for_two_validations():
    trainer, optimizer, lrs = engines(early_stop=0, plateau=2)
    trainer.run([0], max_epochs=len(SCORES))
    assert trainer.state.epoch == len(SCORES)
    assert lrs == [1.0, 1.0, 1.0, 1.0, 0.5, 0.5, 0.5, 0.25, 0.25, 0.25]


def test_bad_patience_is_named():
    with pytest.raises(BundleError, match=r"--early_stop_patience -1: expected an integer >= 0"):
        ValidationSchedule(Engine(lambda e, b: None), torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0),
                           early_stop_patience=-1)


def test_a_bundle_run_stops_early(tmp_path):
    prepare(tmp_path)
    run = train(tmp_path, epochs=6, lr=0.0, early_stop_patience=1, plateau_patience=1)
    record = json.loads((run / "metrics.json").read_text())
    assert (record["early_stop_patience"], record["plateau_patience"]) == (1, 1)
    dice = [row["val_dice"] for row in record["history"]]
    stop = next(k for k in range(1, len(dice)) if dice[k] <= max(dice[:k]))  # the first validation no better
    assert len(dice) == stop + 1 < 6
