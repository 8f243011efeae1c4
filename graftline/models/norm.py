"""The input normalisation a backbone applies first, recorded in its model config."""

from __future__ import annotations

import torch
from torch import nn


class InputNorm(nn.Module):
    """``(x - mean) / std`` per channel for inputs in [0, 1] (``model.normalize``), or the
    identity. Part of the model, so that every path that runs it (training, evaluation,
    serving, exports) normalises alike, and augmentations keep working in pixel space. Its
    buffers are not saved: the model config they come from is, in every checkpoint."""

    def __init__(self, channels: int, normalize: dict[str, list[float]] | None = None) -> None:
        super().__init__()
        self.active = normalize is not None
        mean, std = (normalize or {}).get("mean", [0.0]), (normalize or {}).get("std", [1.0])
        if self.active and not len(mean) == len(std) == channels:
            raise ValueError(
                f"model.normalize: mean and std need one value per input channel ({channels}), "
                f"got {len(mean)} and {len(std)}"
            )
        shape = (1, len(mean), 1, 1)
        self.register_buffer("mean", torch.tensor(mean).view(shape), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(shape), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std if self.active else x
