"""Low-rank adapters (LoRA, Hu et al., 2021) on a backbone's linear layers, and their merge.

An adapted layer computes ``W x + (alpha / r) * B A dropout(x)`` with ``A`` (r x in) and ``B``
(out x r); ``B`` starts at zero, so an adapted model first computes exactly what its base did.
Only ``A`` and ``B`` train (plus the head, and the norms if asked). :func:`merge_adapters` folds
``(alpha / r) * B A`` into ``W`` and puts plain ``nn.Linear`` layers back: the exported model has
the base architecture, the base's latency, and no adapter code.

Written on ``torch.nn`` rather than taken from ``peft``: the whole technique is the fifty
lines below, and one implementation serves every backbone, the ViT and the Hugging Face text
models alike (a backbone names its layers in ``lora_targets``), with one merge, tested once.
"""

from __future__ import annotations

import math
import re

import torch
from torch import nn

# Which linear layers of a ViT block each target names (graftline.models.vit): regular
# expressions matched against the end of a layer's name. A backbone with other names brings
# its own as ``lora_targets`` (graftline.models.text).
TARGETS = {"qkv": (r"attn\.qkv",), "proj": (r"attn\.proj",), "mlp": (r"mlp\.0", r"mlp\.3")}


class Adapter(nn.Module):
    """The trainable pair ``A``, ``B`` of one adapted layer."""

    def __init__(self, in_features: int, out_features: int, rank: int) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.empty(rank, in_features))
        self.b = nn.Parameter(torch.zeros(out_features, rank))
        nn.init.kaiming_uniform_(self.a, a=math.sqrt(5))  # as nn.Linear initialises a weight

    def delta(self) -> torch.Tensor:
        return self.b @ self.a


class LoRALinear(nn.Module):
    """A frozen ``nn.Linear`` plus a low-rank update."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0) -> None:
        super().__init__()
        self.base = base
        self.adapter = Adapter(base.in_features, base.out_features, rank)
        self.scale = alpha / rank
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        update = self.dropout(x) @ self.adapter.a.T @ self.adapter.b.T
        return self.base(x) + self.scale * update

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        """A plain ``nn.Linear`` computing what this layer computes (in eval mode)."""
        out = nn.Linear(self.base.in_features, self.base.out_features, self.base.bias is not None)
        out.weight.copy_(self.base.weight + self.scale * self.adapter.delta())
        if self.base.bias is not None:
            out.bias.copy_(self.base.bias)
        return out


def _matches(name: str, targets: list[str], table: dict[str, tuple[str, ...]]) -> bool:
    return any(re.search(rf"(^|\.){pattern}$", name) for t in targets for pattern in table[t])


def add_adapters(
    module: nn.Module, targets: list[str], rank: int, alpha: float, dropout: float = 0.0
) -> list[LoRALinear]:
    """Replace the targeted ``nn.Linear`` layers of ``module`` by adapted ones, in place.

    Raises:
        ValueError: no layer of ``module`` matches ``targets``.
    """
    table = getattr(module, "lora_targets", TARGETS)
    chosen = [
        name
        for name, m in module.named_modules()
        if isinstance(m, nn.Linear) and _matches(name, targets, table)
    ]
    if not chosen:
        raise ValueError(
            f"no linear layer to adapt: LoRA targets {targets} name the attention and MLP "
            f"projections of a Transformer (arch vit, llama or bert), and "
            f"{type(module).__name__} has none"
        )
    adapted = []
    for name in chosen:
        parent_name, _, child = name.rpartition(".")
        parent = module.get_submodule(parent_name)
        layer = LoRALinear(getattr(parent, child), rank, alpha, dropout)
        setattr(parent, child, layer)
        adapted.append(layer)
    return adapted


def merge_adapters(module: nn.Module) -> int:
    """Fold every adapter of ``module`` into its base layer, in place; returns how many."""
    found = [(n, m) for n, m in module.named_modules() if isinstance(m, LoRALinear)]
    for name, layer in found:
        parent_name, _, child = name.rpartition(".")
        setattr(module.get_submodule(parent_name), child, layer.merged())
    return len(found)
