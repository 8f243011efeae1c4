"""The seed document's CNN: conv 32 -> pool -> conv 64 -> pool -> dense 128 (widths configurable)."""

from __future__ import annotations

import torch
from torch import nn

from graftline.models.norm import InputNorm


class CNNBackbone(nn.Module):
    """Conv blocks (3x3 conv, 'valid' or 'same', ReLU, 2x2 max-pool), then flatten and one dense layer.

    Each block applies the max-pool before the ReLU: the two commute (ReLU is monotonic, so
    ``relu(max(a)) == max(relu(a))`` exactly, gradients included), and the ReLU then runs on a
    quarter of the values. ``out_features`` is the width of the feature vector a head sits on.
    """

    def __init__(
        self,
        in_channels: int = 1,
        image_size: int = 28,
        channels: list[int] | tuple[int, ...] = (32, 64),
        hidden: int = 128,
        dropout: float = 0.25,
        batch_norm: bool = False,
        padding: str = "valid",
        normalize: dict[str, list[float]] | None = None,
    ) -> None:
        super().__init__()
        self.input_norm = InputNorm(in_channels, normalize)
        layers: list[nn.Module] = []
        c, side = in_channels, image_size
        for width in channels:
            layers.append(nn.Conv2d(c, width, 3, padding=padding, bias=not batch_norm))
            if batch_norm:
                layers.append(nn.BatchNorm2d(width))
            layers += [nn.MaxPool2d(2), nn.ReLU(inplace=True)]
            c, side = width, (side - (2 if padding == "valid" else 0)) // 2
            if side < 1:
                raise ValueError(
                    f"image_size {image_size} is too small for {len(channels)} conv blocks"
                )
        self.features = nn.Sequential(*layers)
        self.dense = nn.Sequential(
            nn.Flatten(),
            nn.Dropout(dropout),
            nn.Linear(c * side * side, hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
        )
        self.out_features = hidden

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense(self.features(self.input_norm(x)))

    def spatial(self, x: torch.Tensor) -> torch.Tensor:
        """The last conv block's maps, ``(N, C, H, W)``: the per-position representation
        below the dense layer."""
        return self.features(self.input_norm(x))
