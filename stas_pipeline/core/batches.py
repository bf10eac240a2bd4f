"""Moving a batch to the device in the engines, for masks and image-level labels alike."""

from __future__ import annotations

import torch


def prepare_batch(batchdata: dict, device: str | torch.device | None = None, non_blocking: bool = False,
                  **kwargs) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(image, label)`` on ``device``, as MONAI's ``default_prepare_batch`` returns them, but with the ``to()``
    keyword arguments (``memory_format=torch.channels_last``) applied only to 4-D tensors: an image-level
    label is 1-D and would refuse them."""

    def to(x: torch.Tensor) -> torch.Tensor:
        return x.to(device=device, non_blocking=non_blocking, **(kwargs if x.ndim == 4 else {}))

    label = batchdata.get("label")
    return to(batchdata["image"]), (to(torch.as_tensor(label)) if label is not None else None)
