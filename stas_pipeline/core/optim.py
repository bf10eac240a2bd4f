"""The recipe's optimiser and what rides on it.

- ``AdaBelief`` under a path that MONAI's ``_target_`` resolves on every Python: ``adabelief_pytorch.AdaBelief``
  names both the class and the submodule it lives in; from Python 3.12 on, ``pydoc.locate`` (MONAI's resolver)
  returns the submodule, and the bundles failed in the NGC container with "module is not an Optimizer".
- :class:`WeightAverage`: an exponential moving average of the weights (timm's ``--model-ema``), the bundles'
  ``ema_decay``.
"""

from __future__ import annotations

from adabelief_pytorch.AdaBelief import AdaBelief
from ignite.engine import Engine, Events
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from stas_pipeline.core.bundles import BundleError

__all__ = ["AdaBelief", "WeightAverage"]


class WeightAverage:
    """An exponential moving average of a network's weights, updated after every training step (``average =
    decay * average + (1 - decay) * weights``, the first step copied; BatchNorm statistics averaged alike), as
    timm's ``--model-ema`` keeps it. With ``decay`` > 0, :attr:`network` (what validation scores and ``best.pt``
    holds) is the average; ``decay`` 0 (the bundles' default ``ema_decay``) changes nothing: :attr:`network` is the
    network itself and :meth:`attach` adds no handler. A DistributedDataParallel network is averaged unwrapped, on
    every rank (the ranks' weights are equal after each step)."""

    def __init__(self, network: nn.Module, decay: float = 0.0):
        if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0.0 <= decay < 1.0:
            raise BundleError(f"--ema_decay {decay}: expected a number in [0, 1) (0 = off)")
        self.trained = network
        self.model = network.module if isinstance(network, nn.parallel.DistributedDataParallel) else network
        self.averaged = (AveragedModel(self.model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)
                         if decay else None)

    @property
    def network(self) -> nn.Module:
        """The network validated and checkpointed as best: the average, or the trained network when off."""
        return self.averaged.module if self.averaged is not None else self.trained

    def update(self, engine: Engine | None = None) -> None:
        """Fold the network's current weights into the average."""
        self.averaged.update_parameters(self.model)

    def attach(self, engine: Engine) -> None:
        if self.averaged is not None:
            engine.add_event_handler(Events.ITERATION_COMPLETED, self.update)
