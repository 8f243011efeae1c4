"""Training-time augmentation (graftline.data.transforms.augment_batch)."""

import torch

from graftline.data.transforms import augment_batch
from tests.conftest import blob_digits


def digits() -> torch.Tensor:
    x, _ = blob_digits(12, classes=3, seed=0)
    return torch.from_numpy(x[:, None]).float() / 255


def test_elastic_off_changes_nothing_and_draws_nothing() -> None:
    x, g = digits(), torch.Generator().manual_seed(0)
    before = g.get_state()
    assert torch.equal(augment_batch(x, g, elastic=0.0), x)
    assert torch.equal(g.get_state(), before)  # pipelines without it reproduce bit for bit


def test_a_vanishing_distortion_is_the_identity() -> None:
    # The sampling grid is the image's own: no transposition, flip or half-pixel shift.
    x = digits()
    y = augment_batch(x, torch.Generator().manual_seed(0), elastic=1e-6)
    torch.testing.assert_close(y, x, atol=1e-4, rtol=0)


def test_elastic_bends_strokes_locally_and_is_seeded() -> None:
    x = digits()
    a = augment_batch(x, torch.Generator().manual_seed(1), elastic=34.0)
    b = augment_batch(x, torch.Generator().manual_seed(1), elastic=34.0)
    c = augment_batch(x, torch.Generator().manual_seed(2), elastic=34.0)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert (a - x).abs().mean() > 0.01
    # Local: a constant image stays constant away from the border (no tearing, no zoom).
    ones = torch.ones(4, 1, 28, 28)
    warped = augment_batch(ones, torch.Generator().manual_seed(1), elastic=34.0)
    torch.testing.assert_close(warped[..., 8:-8, 8:-8], ones[..., 8:-8, 8:-8])
    # Stronger distortion moves more ink.
    weak = augment_batch(x, torch.Generator().manual_seed(1), elastic=8.0)
    assert (weak - x).abs().mean() < (a - x).abs().mean()
