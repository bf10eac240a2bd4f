"""Schedule options on top of a bundle's own learning-rate schedule, driven by the validation key metric.

Every bundle declares ``early_stop_patience`` and ``plateau_patience`` (0, off, by default); either one adds
:class:`ValidationSchedule` to the trainer's handlers. Patience counts validations (one every ``val_interval``
epochs) in which the key metric did not beat its best so far.
"""

from __future__ import annotations

import torch
from ignite.engine import Engine
from monai.handlers import EarlyStopHandler, LrScheduleHandler

from stas_pipeline.core.bundles import BundleError


class ValidationSchedule:
    """Trainer handler whose parts listen to ``validator`` (attached to it when the trainer attaches this):

    - ``plateau_patience`` > 0: the learning rate is multiplied by ``plateau_factor`` once the key metric has not
      improved for that many validations (``ReduceLROnPlateau(mode="max", patience=plateau_patience - 1)``, by
      MONAI's ``LrScheduleHandler``); the bundle's schedule (cosine) goes on from the reduced rate;
    - ``early_stop_patience`` > 0: training ends after that many validations without improvement (MONAI's
      ``EarlyStopHandler``); the run's records are written as for the last epoch.
    """

    def __init__(self, validator: Engine, optimizer: torch.optim.Optimizer, key_metric: str = "val_dice",
                 early_stop_patience: int = 0, plateau_patience: int = 0, plateau_factor: float = 0.5):
        for name, value in (("early_stop_patience", early_stop_patience), ("plateau_patience", plateau_patience)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise BundleError(f"--{name} {value}: expected an integer >= 0 (0 = off)")
        if not 0 < plateau_factor < 1:
            raise ValueError(f"plateau_factor must be in (0, 1), got {plateau_factor!r}")
        self.validator, self.optimizer, self.key_metric = validator, optimizer, key_metric
        self.early_stop_patience, self.plateau_patience = early_stop_patience, plateau_patience
        self.plateau_factor = plateau_factor

    def score(self, engine: Engine) -> float:
        return float(engine.state.metrics[self.key_metric])

    def attach(self, trainer: Engine) -> None:
        if self.plateau_patience:
            plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(
                self.optimizer, mode="max", factor=self.plateau_factor, patience=self.plateau_patience - 1)
            LrScheduleHandler(plateau, print_lr=False, step_transform=self.score).attach(self.validator)
        if self.early_stop_patience:
            EarlyStopHandler(self.early_stop_patience, self.score, trainer=trainer).attach(self.validator)
