"""Bringing images to the backbone's geometry, and training-time augmentation."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image


# How an image of any size becomes the model's input. Recorded with the data (the processed
# store's manifest), then in the checkpoint and the registered model, so that serving and
# batch prediction apply exactly what training saw, and guess nothing it did not do.
FITS = ("digit_box", "resize", "center_crop")
POLARITIES = ("auto", "keep")
INK_THRESHOLD = 0.25  # a pixel is ink above this share of the image's brightest pixel


def geometry(fit: str, size: int, channels: int, polarity: str | None = None) -> dict[str, Any]:
    """The input transform.

    ``fit``: ``digit_box`` (crop to the ink, scale into a box, centre by mass: how MNIST was
    made), ``resize`` (the whole image scaled to ``size``, aspect ratio not kept) or
    ``center_crop`` (the shorter side scaled to ``size``, the centre square kept).
    ``polarity``: ``auto`` inverts an image whose border is light (dark ink on paper) to light
    on dark, as the digit sets are; ``keep`` leaves every image as it is (photos). Default:
    ``auto`` for ``digit_box``, whose ink must be the bright part, else ``keep``.
    """
    if fit not in FITS:
        raise ValueError(f"unknown fit {fit!r} (one of {FITS})")
    polarity = polarity or ("auto" if fit == "digit_box" else "keep")
    if polarity not in POLARITIES:
        raise ValueError(f"unknown polarity {polarity!r} (one of {POLARITIES})")
    spec: dict[str, Any] = {"fit": fit, "size": size, "channels": channels, "polarity": polarity}
    if fit == "digit_box":
        spec |= {"box": round(size * 20 / 28), "ink_threshold": INK_THRESHOLD}
    return spec


def legacy_geometry(input_shape: tuple[int, ...] | list[int]) -> dict[str, Any]:
    """What checkpoints written before transforms were recorded got: a plain resize."""
    return geometry("resize", int(input_shape[1]), int(input_shape[0]))


def polarity_of(spec: dict[str, Any]) -> str:
    """The spec's polarity rule; transforms recorded before it was (their training never
    inverted, but ``digit_box`` needs bright ink) get :func:`geometry`'s default."""
    return str(spec.get("polarity") or ("auto" if spec.get("fit") == "digit_box" else "keep"))


def light_on_dark(images: np.ndarray) -> np.ndarray:
    """uint8 ``(N, C, H, W)`` with every image whose border is light (mean above 127)
    inverted, so that all are light on dark; the others are left as they are."""
    border = np.concatenate(
        [
            images[:, :, 0, :].reshape(len(images), -1),
            images[:, :, -1, :].reshape(len(images), -1),
            images[:, :, :, 0].reshape(len(images), -1),
            images[:, :, :, -1].reshape(len(images), -1),
        ],
        axis=1,
    )
    light = border.mean(axis=1) > 127
    if not light.any():
        return images
    out = np.array(images, copy=True)
    out[light] = 255 - out[light]
    return out


def apply_transform(images: np.ndarray, spec: dict[str, Any]) -> np.ndarray:
    """uint8 ``(N, C, H, W)`` of any size to ``(N, channels, size, size)`` as ``spec``
    says: the channels, then the polarity rule, then the fit. Training's sources and serving
    both call this, so a file becomes the same input on either path."""
    size, channels = int(spec["size"]), int(spec["channels"])
    if images.shape[1] != channels:
        images = (
            np.repeat(images[:, :1], channels, axis=1)
            if channels == 3
            else images.mean(axis=1, keepdims=True).round().astype(np.uint8)
        )
    if polarity_of(spec) == "auto":
        images = light_on_dark(images)
    if spec["fit"] == "digit_box":
        return fit_digit_box(images, size, int(spec["box"]), float(spec["ink_threshold"]))
    if images.shape[2:] == (size, size):
        return np.ascontiguousarray(images)
    if spec["fit"] == "center_crop":
        return np.stack([_center_crop(im, size) for im in images])
    return np.stack([_resize(im, size, size) for im in images])


def describe_transform(spec: dict[str, Any]) -> str:
    """The transform in words, for the model card: what a file goes through to become the
    model's input."""
    size, channels = int(spec["size"]), int(spec["channels"])
    fit = {
        "digit_box": f"cropped to the ink, scaled into a {spec.get('box', '?')}-pixel box and "
        f"centred by mass in {size}x{size} (how MNIST was made)",
        "resize": f"scaled whole to {size}x{size} (aspect ratio not kept)",
        "center_crop": f"its shorter side scaled to {size}, the centre {size}x{size} square kept",
    }.get(str(spec.get("fit")), f"brought to {size}x{size}")
    polarity = (
        "an image with a light border (dark on light) is inverted to light on dark, then "
        if polarity_of(spec) == "auto"
        else "never inverted; "
    )
    colour = "greyscale" if channels == 1 else "RGB"
    return f"{colour}, {polarity}{fit}; pixels scaled to [0, 1]"


def _center_crop(image: np.ndarray, size: int) -> np.ndarray:
    """uint8 ``(C, H, W)``: the shorter side scaled to ``size``, the centre square kept."""
    h, w = image.shape[1:]
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    resized = _resize(image, nh, nw)
    top, left = (nh - size) // 2, (nw - size) // 2
    return np.ascontiguousarray(resized[:, top : top + size, left : left + size])


def _resize(image: np.ndarray, h: int, w: int) -> np.ndarray:
    """uint8 ``(C, H, W)`` to ``(C, h, w)``, bilinear, channel by channel."""
    return np.stack(
        [
            np.asarray(Image.fromarray(ch).resize((w, h), Image.Resampling.BILINEAR))
            for ch in image
        ]
    )


def fit_digit_box(
    images: np.ndarray, size: int = 28, box: int = 20, ink_threshold: float = INK_THRESHOLD
) -> np.ndarray:
    """Crop each image to its ink, scale it into a ``box``x``box`` square and centre it by mass
    in ``size``x``size``.

    This is how MNIST itself was made (NIST digits normalised into 20x20, then placed in
    28x28 by centre of mass), so other digit scans such as scikit-learn's 8x8 set, and a digit
    drawn small in a corner of a canvas, land in the geometry a backbone trained on MNIST
    expects.

    Args:
        images: uint8 ``(N, C, H, W)``, dark background, bright strokes.
        size: output side.
        box: side of the square the ink is scaled into (keeps aspect ratio).
        ink_threshold: share of the brightest pixel above which a pixel counts as ink when
            finding the crop; an image with no ink is scaled whole.
    Returns:
        uint8 ``(N, C, size, size)``.
    """
    n, c = images.shape[:2]
    out = np.zeros((n, c, size, size), dtype=np.uint8)
    for i in range(n):
        image = images[i]
        mass = image.max(axis=0)
        ink = mass > ink_threshold * mass.max() if mass.max() > 0 else np.zeros_like(mass, bool)
        if ink.any():
            rows, cols = np.flatnonzero(ink.any(axis=1)), np.flatnonzero(ink.any(axis=0))
            image = image[:, rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
        h, w = image.shape[1:]
        scale = box / max(h, w)
        nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
        patch = _resize(np.ascontiguousarray(image), nh, nw).astype(np.float64)
        total_mass = patch.sum(axis=0)
        total = total_mass.sum()
        if total > 0:
            cy = (total_mass.sum(axis=1) * np.arange(nh)).sum() / total
            cx = (total_mass.sum(axis=0) * np.arange(nw)).sum() / total
        else:
            cy, cx = (nh - 1) / 2, (nw - 1) / 2
        top = min(max(int(round((size - 1) / 2 - cy)), 0), size - nh)
        left = min(max(int(round((size - 1) / 2 - cx)), 0), size - nw)
        out[i, :, top : top + nh, left : left + nw] = patch.round().clip(0, 255).astype(np.uint8)
    return out


def image_array(img: Image.Image, channels: int) -> np.ndarray:
    """One PIL image of any mode to uint8 ``(channels, H, W)`` at its own size; transparency
    is flattened onto black, the background of the digit sets."""
    if img.mode in ("RGBA", "LA", "P", "PA"):
        img = img.convert("RGBA")
        bg = Image.new("RGBA", img.size, (0, 0, 0, 255))
        img = Image.alpha_composite(bg, img)
    img = img.convert("L" if channels == 1 else "RGB")
    arr = np.asarray(img, dtype=np.uint8)
    return arr[None].copy() if channels == 1 else arr.transpose(2, 0, 1).copy()


def augment_batch(
    x: torch.Tensor,
    generator: torch.Generator,
    shift: float = 0.0,
    rotate: float = 0.0,
    scale: float = 0.0,
    lowres_prob: float = 0.0,
    lowres_min: int = 8,
    elastic: float = 0.0,
) -> torch.Tensor:
    """Random shifts, rotations, zooms, resolution loss and elastic distortion of a float
    batch, seeded.

    ``lowres_prob``: the share of images scanned down to a random side in
    ``[lowres_min, H/2]`` and scaled back up. It teaches a backbone that the same digit may
    come from a coarser instrument (such as scikit-learn's 8x8 scans).
    ``elastic``: the strength (alpha, pixels) of an elastic distortion, a random displacement
    field smoothed by a Gaussian of 4 pixels (Simard et al., 2003: alpha 34 for MNIST), the
    deformation handwriting varies by.
    """
    b = x.shape[0]
    if lowres_prob > 0:
        x = _lowres(x, generator, lowres_prob, lowres_min)
    if elastic > 0:
        x = _elastic(x, generator, elastic)
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
    ).to(device=x.device, dtype=x.dtype)  # drawn on the CPU generator, applied where x is
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, padding_mode="zeros", align_corners=False)


def _elastic(
    x: torch.Tensor, generator: torch.Generator, alpha: float, sigma: float = 4.0
) -> torch.Tensor:
    b, _, h, w = x.shape
    r = int(2 * sigma)
    k = torch.exp(-(torch.arange(-r, r + 1, dtype=torch.float32) ** 2) / (2 * sigma**2))
    k = (k / k.sum()).to(x.device)
    d = (torch.rand(2 * b, 1, h, w, generator=generator) * 2 - 1).to(x.device)
    d = F.conv2d(d, k.view(1, 1, 1, -1), padding=(0, r))
    d = F.conv2d(d, k.view(1, 1, -1, 1), padding=(r, 0))
    d = d.view(b, 2, h, w).permute(0, 2, 3, 1) * (2 * alpha / torch.tensor([w, h], device=x.device))
    ys = torch.linspace(-1 + 1 / h, 1 - 1 / h, h, device=x.device)
    xs = torch.linspace(-1 + 1 / w, 1 - 1 / w, w, device=x.device)
    grid = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), -1).unsqueeze(0) + d
    return F.grid_sample(x, grid.to(x.dtype), padding_mode="zeros", align_corners=False)


def _lowres(x: torch.Tensor, generator: torch.Generator, prob: float, min_side: int) -> torch.Tensor:
    b, _, h, w = x.shape
    pick = (torch.rand(b, generator=generator) < prob).to(x.device)
    side = int(torch.randint(min_side, max(min_side + 1, h // 2 + 1), (1,), generator=generator))
    if not pick.any():
        return x
    small = F.interpolate(x[pick], size=(side, side * w // h), mode="area")
    x = x.clone()
    x[pick] = F.interpolate(small, size=(h, w), mode="bilinear", align_corners=False).clamp_(0, 1)
    return x
