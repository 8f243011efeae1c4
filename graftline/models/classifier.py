"""A backbone with a classification head; architectures are chosen by name."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from graftline.models.cnn import CNNBackbone
from graftline.models.text import build_text_backbone
from graftline.models.vit import ViTBackbone

if TYPE_CHECKING:
    from graftline.nb_em import NaiveBayesEM

# name -> factory(model_config, in_channels, image_size). Every stage, the checkpoint, the
# MLflow model and serving build a backbone through here; nothing else names an architecture.
# A text backbone's config holds its vocabulary and length itself (models.text).
BACKBONES: dict[str, Callable[..., nn.Module]] = {
    "cnn": lambda cfg, in_channels, image_size: CNNBackbone(
        in_channels=in_channels,
        image_size=image_size,
        channels=cfg["channels"],
        hidden=cfg["hidden"],
        dropout=cfg["dropout"],
        batch_norm=cfg.get("batch_norm", False),
        padding=cfg.get("padding", "valid"),
        normalize=cfg.get("normalize"),
    ),
    "vit": lambda cfg, in_channels, image_size: ViTBackbone(
        in_channels=in_channels,
        image_size=image_size,
        patch_size=cfg["patch_size"],
        dim=cfg["dim"],
        depth=cfg["depth"],
        heads=cfg["heads"],
        mlp_ratio=cfg["mlp_ratio"],
        dropout=cfg["dropout"],
        pool=cfg["pool"],
        normalize=cfg.get("normalize"),
    ),
    "llama": lambda cfg, *_: build_text_backbone(cfg),
    "bert": lambda cfg, *_: build_text_backbone(cfg),
}


class Classifier(nn.Module):
    """``head(backbone(x))``; fine-tuning swaps the head and keeps the backbone. With no
    classes (a backbone pretrained on a corpus without labels) the head is the identity.

    A text classifier may carry a word model, ``words`` (naive Bayes + EM over the task's
    labels and the corpus, ``finetune.nb_em``): its class distribution multiplies the
    network's wherever the model predicts (``graftline.train.predict_proba``); the forward
    pass, what trains and what exports to ONNX, stays the network's logits."""

    def __init__(self, backbone: nn.Module, num_classes: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.words: NaiveBayesEM | None = None
        bias = getattr(backbone, "head_bias", True)
        self.head: nn.Module = (
            nn.Linear(backbone.out_features, num_classes, bias=bias) if num_classes else nn.Identity()
        )

    def forward(self, x: torch.Tensor | dict[str, torch.Tensor]) -> torch.Tensor:
        return self.head(self.backbone(x))


def input_dims(shape: tuple[int, ...] | list[int]) -> tuple[int, int]:
    """``(in_channels, image_size)`` of an input shape: ``(C, H, W)`` images, or ``(1,
    max_len)`` for token ids ``(max_len,)``, whose backbone reads its sizes from its config."""
    return (int(shape[0]), int(shape[1])) if len(shape) == 3 else (1, int(shape[0]))


def build_backbone(model_cfg: dict[str, Any], in_channels: int, image_size: int) -> nn.Module:
    arch = model_cfg.get("arch", "cnn")
    if arch not in BACKBONES:
        raise ValueError(f"unknown architecture {arch!r} (known: {sorted(BACKBONES)})")
    try:
        return BACKBONES[arch](model_cfg, in_channels, image_size)
    except KeyError as err:
        raise ValueError(f"the {arch!r} model config lacks {err}") from None


def build_classifier(
    model_cfg: dict[str, Any], in_channels: int, image_size: int, num_classes: int
) -> Classifier:
    return Classifier(build_backbone(model_cfg, in_channels, image_size), num_classes)
