"""The CNN backbone: same function as the seed document's block order, shapes per padding."""

import pytest
import torch
import torch.nn.functional as F

from graftline.models import build_classifier
from graftline.models.cnn import CNNBackbone


def test_pool_before_relu_is_the_seed_cnn_exactly() -> None:
    # The seed applies conv -> ReLU -> pool; the backbone pools first (a quarter of the ReLU
    # work). Same weights must give the same outputs and the same gradients.
    torch.manual_seed(0)
    net = CNNBackbone(channels=[4, 8], hidden=16, dropout=0.0)
    x = torch.randn(5, 1, 28, 28)
    conv1, conv2 = net.features[0], net.features[3]
    dense = net.dense[2]

    def seed_order(x: torch.Tensor) -> torch.Tensor:
        h = F.max_pool2d(F.relu(conv1(x)), 2)
        h = F.max_pool2d(F.relu(conv2(h)), 2)
        return F.relu(dense(h.flatten(1)))

    ours = net(x)
    theirs = seed_order(x)
    assert torch.equal(ours, theirs)
    (g_ours,) = torch.autograd.grad(ours.sum(), conv1.weight)
    (g_theirs,) = torch.autograd.grad(theirs.sum(), conv1.weight)
    assert torch.equal(g_ours, g_theirs)


@pytest.mark.parametrize(("padding", "features"), [("valid", 64 * 5 * 5), ("same", 64 * 7 * 7)])
def test_padding_sets_the_feature_map(padding: str, features: int) -> None:
    net = build_classifier(
        {"arch": "cnn", "channels": [32, 64], "hidden": 8, "dropout": 0.0, "padding": padding},
        1,
        28,
        3,
    )
    assert net.backbone.dense[2].in_features == features
    assert net(torch.zeros(2, 1, 28, 28)).shape == (2, 3)
