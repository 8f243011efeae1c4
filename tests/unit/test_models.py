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


VIT = {
    "arch": "vit",
    "patch_size": 7,
    "dim": 16,
    "depth": 2,
    "heads": 2,
    "mlp_ratio": 2.0,
    "dropout": 0.0,
    "pool": "cls",
}


@pytest.mark.parametrize("pool", ["cls", "mean"])
def test_vit_classifies_patches_of_any_channel_count(pool: str) -> None:
    net = build_classifier({**VIT, "pool": pool}, 3, 28, 5)
    assert net.backbone.num_patches == 16 and net.backbone.out_features == 16
    out = net(torch.rand(4, 3, 28, 28))
    assert out.shape == (4, 5) and torch.isfinite(out).all()
    (grad,) = torch.autograd.grad(out.sum(), net.backbone.embed.pos)
    assert grad.abs().sum() > 0  # position embeddings are learnt


def test_vit_attention_is_pytorchs_fused_attention() -> None:
    """The block's attention equals the textbook softmax(QK^T/sqrt(d))V."""
    torch.manual_seed(0)
    net = build_classifier(VIT, 1, 28, 3).backbone
    attn = net.blocks[0].attn
    x = torch.randn(2, 17, 16)
    b, n, d = x.shape
    q, k, v = attn.qkv(x).view(b, n, 3, 2, d // 2).permute(2, 0, 3, 1, 4)
    weights = torch.softmax(q @ k.transpose(-1, -2) / (d // 2) ** 0.5, dim=-1)
    expected = attn.proj((weights @ v).transpose(1, 2).reshape(b, n, d))
    torch.testing.assert_close(attn(x), expected, rtol=1e-5, atol=1e-5)


def test_vit_rejects_a_patch_that_does_not_tile_the_image() -> None:
    with pytest.raises(ValueError, match="not a multiple of patch_size 5"):
        build_classifier({**VIT, "patch_size": 5}, 1, 28, 3)


@pytest.mark.parametrize(
    ("model_cfg", "shape"),
    [
        (
            {"arch": "cnn", "channels": [4, 8], "hidden": 16, "dropout": 0.1, "batch_norm": True},
            (8, 5, 5),
        ),
        ({**VIT, "pool": "mean"}, (16, 16)),
        ({**VIT, "pool": "cls"}, (16, 16)),  # the patch tokens, the class token left out
    ],
)
def test_spatial_is_the_representation_the_output_pools(model_cfg: dict, shape: tuple) -> None:
    from graftline.objectives import features

    torch.manual_seed(0)
    backbone = build_classifier(model_cfg, 1, 28, 3).backbone.eval()
    x = torch.rand(6, 1, 28, 28)
    with torch.no_grad():
        maps, out = backbone.spatial(x), backbone(x)
    assert maps.shape == (6, *shape)
    if model_cfg["arch"] == "cnn":
        torch.testing.assert_close(backbone.dense(maps), out)
    elif model_cfg["pool"] == "mean":
        torch.testing.assert_close(maps.mean(dim=1), out)
    flat = features(backbone, (x * 255).to(torch.uint8), spatial=True)
    assert flat.shape == (6, maps[0].numel())
    torch.testing.assert_close(flat.norm(dim=1), torch.ones(6))
