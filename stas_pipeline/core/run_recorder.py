"""Per-epoch bookkeeping of a training run, attached to the trainer as an ignite handler.

In ``run_dir`` it keeps:

- ``last.pt``: model, optimiser, scheduler, epoch, iteration, best metric and the metric history (and the weight
  average, when the run keeps one), written atomically every epoch, so a run killed at any moment resumes
  (``resume=True``) from its last epoch;
- ``best.pt`` (model ``state_dict`` only: the weight average's, when the run keeps one, as validation scored it)
  and ``best.json`` (the run's knobs, task and network definition, fold, epoch, key metric; trained on a tile
  datalist, its ``tiles`` settings: the tiling slide prediction reads the run at, :func:`with_tiling`), and with
  them ``config.json``: the bundle run's whole configuration, its macros expanded and the run's overrides applied,
  from which inference rebuilds the run's chain without the bundle file;
- ``metrics.json`` (per epoch: loss, key metric (``val_dice``, ``val_auc``), lr, seconds) and ``curves.png``.

All checkpoints load with ``torch.load(..., weights_only=True)``. Only rank 0 writes under DDP.

What the terminal shows of a run is set here too: one line per epoch from the recorder (loss, key metric, the
best so far, seconds) below the epoch's progress bar; the engines' own lines, MONAI's input summary and the
per-iteration losses only with ``STAS_DEBUG=1`` (:func:`terminal_logging`). A key metric that is not finite
(an AUC on a validation fold of one class) ends the run (:class:`FiniteKeyMetric`): it is never a best.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from ignite.engine import Engine, Events
from ignite.handlers import ProgressBar
from torch import nn

from stas_pipeline.core.bundles import RUN_CONFIG, running_parser
from stas_pipeline.core.datalist import read_datalist
from stas_pipeline.core.errors import StasError
from stas_pipeline.core.fileio import atomic_path, write_json
from stas_pipeline.core.optim import WeightAverage

LAST, BEST = "last.pt", "best.pt"
# the loggers a terminal sees only with STAS_DEBUG=1, and their level otherwise: the engines' start / epoch / new
# best lines (their one error line repeats the exception, which the one-line hook or the traceback reports) and
# MONAI's summary of the run's arguments
QUIET_LOGGERS = {"ignite.engine.engine": logging.CRITICAL, "monai.bundle.scripts": logging.WARNING}


class CheckpointError(StasError, RuntimeError):
    """A checkpoint that is missing, truncated, corrupt or does not fit the model."""


class KeyMetricError(StasError, RuntimeError):
    """A key metric that is not a finite number: no checkpoint can be judged by it."""


def terminal_logging(debug: bool) -> bool:
    """Quieten :data:`QUIET_LOGGERS` unless ``debug``; returns True (a bundle lists it in ``initialize``)."""
    for name, level in QUIET_LOGGERS.items():
        logging.getLogger(name).setLevel(logging.INFO if debug else level)
    return True


def refuse_earlier_run(run_dir: str | Path, resume: bool) -> bool:
    """FileExistsError when ``run_dir`` holds an earlier run and ``resume`` is off; True otherwise. A bundle
    calls it before anything of the run (the TensorBoard writer) touches the folder."""
    run_dir = Path(run_dir)
    if not resume and ((run_dir / LAST).exists() or (run_dir / "metrics.json").exists()):
        raise FileExistsError(f"{run_dir}: holds an earlier run; pass --resume true to continue it, "
                              "or another --output_dir / --fold")
    return True


class LossProgressBar(ProgressBar):
    """ignite's progress bar showing the batch loss (one bar per epoch; ``persist`` leaves each on its line)."""

    def attach(self, engine: Engine, **kwargs: Any) -> None:  # MONAI's engines attach handlers with no arguments
        super().attach(engine, output_transform=lambda output: {"loss": output["loss"].detach().item()}, **kwargs)


class FiniteKeyMetric:
    """The evaluator's key metric, checked as soon as it is computed (before the workflow compares it with the
    best): not a finite number ends the run with :class:`KeyMetricError` naming ``run_dir``."""

    def __init__(self, metric: Any, run_dir: str | Path):
        self.metric, self.run_dir = metric, Path(run_dir)

    def attach(self, engine: Engine, name: str) -> None:
        self.metric.attach(engine, name)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._check, name)

    def _check(self, engine: Engine, name: str) -> None:
        value = engine.state.metrics[name]
        if not torch.isfinite(torch.as_tensor(value, dtype=torch.float64)).all():
            raise KeyMetricError(f"{self.run_dir}: validation gave {name} {value} at epoch {engine.state.epoch}; "
                                 "no checkpoint is judged by it (a validation fold whose labels are all one class "
                                 "has no AUC: check the fold's labels)")


def load_checkpoint(path: str | Path) -> dict:
    """``torch.load(path, weights_only=True)`` with a clear error for a corrupt or truncated file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - every unreadable checkpoint gets the same clear report
        raise CheckpointError(f"{path}: corrupt or truncated checkpoint, not loaded ({type(err).__name__}: "
                              f"{str(err).splitlines()[0][:200]})") from err


def model_state(checkpoint: dict) -> dict:
    """The model's state dict from a ``best.pt`` (a state dict) or a ``last.pt`` (under ``"model"``)."""
    return checkpoint["model"] if isinstance(checkpoint.get("model"), dict) else checkpoint


def load_model_weights(network: nn.Module, path: str | Path) -> nn.Module:
    """Load ``best.pt``/``last.pt`` into ``network``; a mismatch is reported naming the file."""
    try:
        network.load_state_dict(model_state(load_checkpoint(path)))
    except RuntimeError as err:
        if isinstance(err, CheckpointError):
            raise
        raise CheckpointError(f"{path}: does not fit this model ({str(err).splitlines()[0][:300]})") from err
    return network


def with_tiling(run_info: dict) -> dict:
    """``run_info`` with the ``tiles`` settings (``stas tile``'s scale or mpp, size, stride, tissue) of the tile
    datalist it names, unless it records them already or its datalist is not a readable tile datalist."""
    datalist = run_info.get("datalist")
    if "tiles" in run_info or not isinstance(datalist, str) or not Path(datalist).is_file():
        return run_info
    tiles = read_datalist(datalist).get("tiles")
    return {**run_info, "tiles": tiles} if isinstance(tiles, dict) else run_info


def _is_writer() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


class RunRecorder:
    """Checkpoints, metrics, curves and resume for one run directory (see module doc)."""

    def __init__(
        self,
        run_dir: str | Path,
        network: nn.Module,
        optimizer: torch.optim.Optimizer,
        lr_scheduler: Any = None,
        validator: Engine | None = None,
        key_metric: str = "val_dice",
        resume: bool = False,
        run_info: dict | None = None,
        weight_average: WeightAverage | None = None,
    ):
        self.run_dir = Path(run_dir)
        self.network, self.optimizer, self.lr_scheduler = network, optimizer, lr_scheduler
        self.validator, self.key_metric = validator, key_metric
        self.averaged = weight_average.averaged if weight_average is not None else None
        self.run_info = with_tiling(dict(run_info or {}))
        self.history: list[dict] = []
        self.best_metric, self.best_epoch = -math.inf, 0
        self.resume_from: dict | None = None
        refuse_earlier_run(self.run_dir, resume)
        parser = running_parser()  # the bundle run instantiating this recorder
        self.config = json.loads(json.dumps(parser.get(), default=str)) if parser is not None else None
        if resume and (self.run_dir / LAST).exists():
            self.resume_from = load_checkpoint(self.run_dir / LAST)

    @property
    def _model(self) -> nn.Module:
        """The network without its DistributedDataParallel wrapper: checkpoints load on any number of GPUs."""
        net = self.network
        return net.module if isinstance(net, nn.parallel.DistributedDataParallel) else net

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self._started)
        engine.add_event_handler(Events.EPOCH_STARTED, self._epoch_started)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._iteration_completed)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._epoch_completed)

    def _started(self, engine: Engine) -> None:
        if self.resume_from is None:
            if self.validator is not None and self.validator.state.metrics:
                # validated before training (the bundle's val_at_start): the untrained model's baseline
                baseline = float(self.validator.state.metrics[self.key_metric])
                self.history.append({"epoch": 0, "loss": None, self.key_metric: baseline,
                                     "lr": self.optimizer.param_groups[0]["lr"], "seconds": None})
            return
        ckpt = self.resume_from
        model = self._model
        model.load_state_dict(ckpt["model"])
        if self.averaged is not None:
            if ckpt.get("averaged") is None:
                raise CheckpointError(f"{self.run_dir / LAST}: no weight average to resume (trained without ema_decay)")
            self.averaged.load_state_dict(ckpt["averaged"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        if self.lr_scheduler is not None and ckpt.get("lr_scheduler") is not None:
            self.lr_scheduler.load_state_dict(ckpt["lr_scheduler"])
        engine.state.epoch, engine.state.iteration = ckpt["epoch"], ckpt["iteration"]
        self.best_metric, self.best_epoch = ckpt["best_metric"], ckpt["best_epoch"]
        self.history = list(ckpt["history"])
        if self.validator is not None:
            self.validator.state.best_metric, self.validator.state.best_metric_epoch = self.best_metric, self.best_epoch
        if _is_writer():
            print(f"resumed {self.run_dir / LAST} at epoch {ckpt['epoch']} (best {self.best_metric:.4f})", flush=True)

    def _epoch_started(self, engine: Engine) -> None:
        self._t0, self._losses = time.perf_counter(), []
        self._lr = self.optimizer.param_groups[0]["lr"]

    def _iteration_completed(self, engine: Engine) -> None:
        self._losses.append(engine.state.output["loss"].detach().item())

    def _epoch_completed(self, engine: Engine) -> None:
        metric = None
        if self.validator is not None and self.validator.state.epoch == engine.state.epoch:
            metric = float(self.validator.state.metrics[self.key_metric])
        row = {"epoch": engine.state.epoch, "loss": sum(self._losses) / max(len(self._losses), 1),
               self.key_metric: metric, "lr": self._lr, "seconds": round(time.perf_counter() - self._t0, 3)}
        self.history.append(row)
        engine.state.metrics["epoch_loss"] = row["loss"]  # for the epoch-level handlers after this one (MLflow)
        improved = metric is not None and metric > self.best_metric
        if improved:
            self.best_metric, self.best_epoch = metric, engine.state.epoch
        if not _is_writer():
            return
        self._print(row, engine.state.max_epochs)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        model = self._model
        if improved:
            if self.config is not None:
                write_json(self.run_dir / RUN_CONFIG, self.config, overwrite=True)
            self._save((self.averaged.module if self.averaged is not None else model).state_dict(), BEST)
            write_json(self.run_dir / "best.json", {**self.run_info, "epoch": engine.state.epoch,
                                                     self.key_metric: metric}, overwrite=True)
        self._save({
            "model": model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "lr_scheduler": self.lr_scheduler.state_dict() if self.lr_scheduler is not None else None,
            "epoch": engine.state.epoch, "iteration": engine.state.iteration,
            "best_metric": self.best_metric, "best_epoch": self.best_epoch, "history": self.history,
            "averaged": self.averaged.state_dict() if self.averaged is not None else None,
        }, LAST)
        write_json(self.run_dir / "metrics.json", {**self.run_info, "best_epoch": self.best_epoch,
                                                   f"best_{self.key_metric}": self._finite(self.best_metric),
                                                   "history": self.history}, overwrite=True)
        self._plot()

    def _print(self, row: dict, epochs: int) -> None:
        """The epoch's line on the terminal: loss, key metric and the best so far, seconds."""
        line = f"epoch {row['epoch']}/{epochs}  loss {row['loss']:.4f}"
        if row[self.key_metric] is not None:
            line += (f"  {self.key_metric} {row[self.key_metric]:.4f}  best {self.best_metric:.4f} "
                     f"(epoch {self.best_epoch})")
        print(f"{line}  {row['seconds']:.1f} s", flush=True)

    @staticmethod
    def _finite(x: float) -> float | None:
        return x if math.isfinite(x) else None

    def _save(self, obj: Any, name: str) -> None:
        with atomic_path(self.run_dir / name, overwrite=True) as tmp:
            torch.save(obj, tmp)

    def _plot(self) -> None:
        import matplotlib  # here: pyplot takes a second to import and needs its backend chosen first

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        trained = [r for r in self.history if r["loss"] is not None]
        fig, (ax_loss, ax_dice) = plt.subplots(1, 2, figsize=(10, 4))
        ax_loss.plot([r["epoch"] for r in trained], [r["loss"] for r in trained], marker="o")
        ax_loss.set(xlabel="epoch", ylabel="training loss", title="loss")
        scored = [r for r in self.history if r[self.key_metric] is not None]
        ax_dice.plot([r["epoch"] for r in scored], [r[self.key_metric] for r in scored], marker="o", color="C1")
        ax_dice.set(xlabel="epoch", ylabel=self.key_metric, title=f"validation {self.key_metric}", ylim=(0, 1))
        fig.tight_layout()
        with atomic_path(self.run_dir / "curves.png", overwrite=True) as tmp:
            fig.savefig(tmp, format="png", dpi=80)
        plt.close(fig)
