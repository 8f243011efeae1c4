"""LoRA (peft): adapters start as the identity update, only they (and the head) train, and the
merged export (merge_and_unload) is a plain model computing the same function."""

from pathlib import Path

import numpy as np
import pytest
import torch

from graftline.config import parse_params
from graftline.data.dataset import Dataset
from graftline.errors import ArtifactError
from graftline.models import build_classifier, save_checkpoint
from graftline.models.checkpoint import load_checkpoint
from graftline.models.lora import adapter_layers, merge_adapters
from graftline.train import fit
from tasks.finetune import graft, strategy_groups, trainable_share
from tests.conftest import blob_digits

VIT = {"arch": "vit", "patch_size": 4, "dim": 16, "depth": 2, "heads": 2, "mlp_ratio": 2.0}


def _params(**lora: object) -> object:
    return parse_params(
        {
            "finetune": {
                "strategy": "lora",
                "lora": {"rank": 2, "alpha": 4, **lora},
                "train": {"epochs": 2, "batch_size": 8, "lr": 0.01, "num_threads": 1},
            }
        }
    ).finetune


def _data(seed: int) -> Dataset:
    x, y = blob_digits(8, classes=3, size=16, seed=seed)
    return Dataset(x[:, None], y.astype(np.int64), ["0", "1", "2"], "blobs")


def _pretrained() -> torch.nn.Module:
    torch.manual_seed(0)
    base = build_classifier({**VIT, "dropout": 0.0, "pool": "cls"}, 1, 16, 5)
    for t in base.parameters():  # a backbone that is not at its initial values
        t.data.add_(0.05 * torch.randn_like(t))
    return base


def test_adapted_model_starts_equal_and_only_adapters_and_head_train(tmp_path: Path) -> None:
    p = _params()
    model = graft(_pretrained(), 3)
    x = torch.rand(6, 1, 16, 16)
    with torch.no_grad():
        before = model(x)
        backbone_before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    groups = strategy_groups(model, p)
    adapted = adapter_layers(model)
    assert len(adapted) == 2 * 4  # qkv, proj and the MLP's two layers in each of 2 blocks
    with torch.no_grad():
        assert torch.equal(model(x), before)  # B starts at zero
    share = trainable_share(model, groups)
    adapter_params = sum(
        t.numel() for m in adapted for t in (*m.lora_A.parameters(), *m.lora_B.parameters())
    )
    assert share["trainable_params"] == adapter_params + sum(
        t.numel() for t in model.head.parameters()
    )
    assert 0 < share["trainable_fraction"] < 0.5

    fit(model, _data(1), _data(2), p.train, seed=0, groups=groups)
    after = {  # the base weights under peft's names (model.<layer>.base_layer.weight)
        k.removeprefix("model.").replace(".base_layer", ""): v
        for k, v in model.backbone.state_dict().items()
        if "lora_" not in k
    }
    assert after.keys() == backbone_before.keys()
    changed = {k for k in after if not torch.equal(after[k], backbone_before[k])}
    assert changed == set(), "base weights must stay frozen"
    assert all(m.lora_B["default"].weight.abs().sum() > 0 for m in adapted), "every adapter trained"


def test_norms_train_when_asked() -> None:
    model = graft(_pretrained(), 3)
    groups = strategy_groups(model, _params(train_norms=True, targets=["qkv"]))
    trained = {id(t) for g in groups for t in g.module.parameters()}
    adapted = adapter_layers(model)
    assert len(adapted) == 2 and all(id(m.lora_B["default"].weight) in trained for m in adapted)
    norms = [m for m in model.backbone.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert norms and all(id(m.weight) in trained for m in norms)
    assert not any(id(m.get_base_layer().weight) in trained for m in adapted)


def test_merged_export_is_a_plain_model_with_the_same_outputs(tmp_path: Path) -> None:
    model = graft(_pretrained(), 3)
    p = _params(dropout=0.1)
    fit(model, _data(1), _data(2), p.train, seed=0, groups=strategy_groups(model, p))
    model.eval()
    x = torch.rand(6, 1, 16, 16)
    with torch.no_grad():
        adapted = model(x)
    assert merge_adapters(model) == 8
    assert not adapter_layers(model)
    assert type(model.backbone).__name__ == "ViTBackbone"
    save_checkpoint(
        tmp_path / "model.pt",
        model,
        model_config={**VIT, "dropout": 0.0, "pool": "cls"},
        classes=["0", "1", "2"],
        input_shape=(1, 16, 16),
    )
    plain, _ = load_checkpoint(tmp_path / "model.pt")  # weights_only=True, the base architecture
    with torch.no_grad():
        torch.testing.assert_close(plain(x), adapted, atol=1e-5, rtol=1e-4)
        assert not torch.allclose(plain(x), graft(_pretrained(), 3).eval()(x))


def test_lora_on_a_backbone_without_projections_is_a_clear_error() -> None:
    cnn = build_classifier({"arch": "cnn", "channels": [4], "hidden": 8, "dropout": 0.0}, 1, 16, 3)
    with pytest.raises(ArtifactError, match="finetune.strategy lora: no linear layer to adapt"):
        strategy_groups(cnn, _params())
