"""Bringing images to the backbone's geometry, and training-time augmentation."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image


def fit_digit_box(images: np.ndarray, size: int = 28, box: int = 20) -> np.ndarray:
    """Scale each image into a ``box``x``box`` square and centre it by mass in ``size``x``size``.

    This is how MNIST itself was made (NIST digits normalised into 20x20, then placed in
    28x28 by centre of mass), so other digit scans such as scikit-learn's 8x8 set land in the
    geometry a backbone pretrained on MNIST expects.

    Args:
        images: uint8 ``(N, C, H, W)``, dark background, bright strokes.
        size: output side.
        box: side of the square the image is scaled into (keeps aspect ratio).
    Returns:
        uint8 ``(N, C, size, size)``.
    """
    n, c, h, w = images.shape
    scale = box / max(h, w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    out = np.zeros((n, c, size, size), dtype=np.uint8)
    for i in range(n):
        chans = [
            np.asarray(Image.fromarray(images[i, k]).resize((nw, nh), Image.Resampling.BILINEAR))
            for k in range(c)
        ]
        patch = np.stack(chans).astype(np.float64)
        mass = patch.sum(axis=0)
        total = mass.sum()
        if total > 0:
            cy = (mass.sum(axis=1) * np.arange(nh)).sum() / total
            cx = (mass.sum(axis=0) * np.arange(nw)).sum() / total
        else:
            cy, cx = (nh - 1) / 2, (nw - 1) / 2
        top = int(round((size - 1) / 2 - cy))
        left = int(round((size - 1) / 2 - cx))
        top = min(max(top, 0), size - nh)
        left = min(max(left, 0), size - nw)
        out[i, :, top : top + nh, left : left + nw] = patch.round().clip(0, 255).astype(np.uint8)
    return out


def to_geometry(img: Image.Image, size: int, channels: int) -> np.ndarray:
    """Convert one PIL image of any size and mode to uint8 ``(channels, size, size)``."""
    if img.mode in ("RGBA", "LA", "P"):
        # Flatten transparency onto black, the background of the digit sets.
        img = img.convert("RGBA")
        bg = Image.new("RGBA", img.size, (0, 0, 0, 255))
        img = Image.alpha_composite(bg, img)
    img = img.convert("L" if channels == 1 else "RGB")
    if img.size != (size, size):
        img = img.resize((size, size), Image.Resampling.BILINEAR)
    arr = np.asarray(img, dtype=np.uint8)
    return arr[None] if channels == 1 else arr.transpose(2, 0, 1).copy()


def augment_batch(
    x: torch.Tensor,
    generator: torch.Generator,
    shift: float = 0.0,
    rotate: float = 0.0,
    scale: float = 0.0,
    lowres_prob: float = 0.0,
    lowres_min: int = 8,
) -> torch.Tensor:
    """Random shifts, rotations, zooms and resolution loss of a float batch, seeded.

    ``lowres_prob``: the share of images scanned down to a random side in
    ``[lowres_min, H/2]`` and scaled back up. It teaches a backbone that the same digit may
    come from a coarser instrument (such as scikit-learn's 8x8 scans).
    """
    b = x.shape[0]
    if lowres_prob > 0:
        x = _lowres(x, generator, lowres_prob, lowres_min)
    if shift == 0 and rotate == 0 and scale == 0:
        return x

    def uniform(limit: float) -> torch.Tensor:
        return (torch.rand(b, generator=generator) * 2 - 1) * limit

    angle = uniform(math.radians(rotate))
    zoom = 1 + uniform(scale)
    tx, ty = uniform(2 * shift), uniform(2 * shift)  # grid coordinates span [-1, 1]
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    theta = torch.stack(
        [torch.stack([cos, -sin, tx], 1), torch.stack([sin, cos, ty], 1)], 1
    ).to(x.dtype)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, padding_mode="zeros", align_corners=False)


def _lowres(x: torch.Tensor, generator: torch.Generator, prob: float, min_side: int) -> torch.Tensor:
    b, _, h, w = x.shape
    pick = torch.rand(b, generator=generator) < prob
    side = int(torch.randint(min_side, max(min_side + 1, h // 2 + 1), (1,), generator=generator))
    if not pick.any():
        return x
    small = F.interpolate(x[pick], size=(side, side * w // h), mode="area")
    x = x.clone()
    x[pick] = F.interpolate(small, size=(h, w), mode="bilinear", align_corners=False).clamp_(0, 1)
    return x
