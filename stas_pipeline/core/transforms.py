"""Transforms that MONAI has no ready-made equivalent for."""

from __future__ import annotations

from collections.abc import Hashable, Mapping

import torch
import torch.nn.functional as F
from monai.config import KeysCollection
from monai.transforms import MapTransform


class ResizeLiked(MapTransform):
    """Resize ``keys`` (C x H x W) of one decollated sample to the spatial size of ``data[like]``: a prediction
    made at the training size is brought back to the original resolution of the mask it is scored against."""

    def __init__(self, keys: KeysCollection, like: str = "label", mode: str = "bilinear"):
        super().__init__(keys)
        self.like, self.mode = like, mode

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        size = tuple(d[self.like].shape[-2:])
        align = False if self.mode in ("bilinear", "bicubic") else None
        for key in self.key_iterator(d):
            x = torch.as_tensor(d[key])
            d[key] = F.interpolate(x[None].float(), size=size, mode=self.mode, align_corners=align)[0]
        return d
