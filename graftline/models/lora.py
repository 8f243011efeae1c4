"""Low-rank adapters (LoRA, Hu et al., 2021) on a backbone's linear layers, through ``peft``,
and their merge.

An adapted layer computes ``W x + (alpha / r) * B A dropout(x)`` with ``A`` (r x in) and ``B``
(out x r); ``B`` starts at zero, so an adapted model first computes exactly what its base did.
Only ``A`` and ``B`` train (plus the head, and the norms if asked). :func:`merge_adapters`
calls ``peft``'s ``merge_and_unload``: ``(alpha / r) * B A`` is folded into ``W`` and plain
``nn.Linear`` layers come back, so the registered model has the base architecture, the base's
latency, and no adapter code (and exports to ONNX and Hugging Face as any other).

``peft``'s ``LoraModel`` takes any ``torch.nn`` module: the ViT and the ``transformers`` text
backbones alike. Each backbone names its layers for the targets ``qkv``, ``proj`` and ``mlp``
(``lora_targets``, regular expressions matched against the end of a layer's name); the
layers chosen are given to ``peft`` by their full names.
"""

from __future__ import annotations

import re
import sys
from typing import Any

from torch import nn

# Which linear layers of a ViT block each target names (graftline.models.vit). A backbone
# with other names brings its own as ``lora_targets`` (graftline.models.text).
TARGETS = {"qkv": (r"attn\.qkv",), "proj": (r"attn\.proj",), "mlp": (r"mlp\.0", r"mlp\.3")}


def _matches(name: str, targets: list[str], table: dict[str, tuple[str, ...]]) -> bool:
    return any(re.search(rf"(^|\.){pattern}$", name) for t in targets for pattern in table[t])


def target_names(module: nn.Module, targets: list[str]) -> list[str]:
    """The full names of ``module``'s linear layers that ``targets`` choose."""
    table = getattr(module, "lora_targets", TARGETS)
    return [
        name
        for name, m in module.named_modules()
        if isinstance(m, nn.Linear) and _matches(name, targets, table)
    ]


def add_adapters(
    module: nn.Module, targets: list[str], rank: int, alpha: float, dropout: float = 0.0
) -> nn.Module:
    """Adapters on the targeted linear layers of ``module`` (injected in place, everything
    else of it frozen); returns ``peft``'s ``LoraModel`` around it, which computes what
    ``module`` does and proxies its attributes. Put it where ``module`` was (a classifier's
    ``backbone``) for :func:`merge_adapters` to find.

    Raises:
        ValueError: no layer of ``module`` matches ``targets``.
    """
    chosen = target_names(module, targets)
    if not chosen:
        raise ValueError(
            f"no linear layer to adapt: LoRA targets {targets} name the attention and MLP "
            f"projections of a Transformer (arch vit, llama or bert), and "
            f"{type(module).__name__} has none"
        )
    from peft import LoraConfig
    from peft.tuners.lora import LoraModel

    config = LoraConfig(
        r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=chosen, bias="none"
    )
    return LoraModel(module, config, "default")


def adapter_layers(module: nn.Module) -> list[Any]:
    """``module``'s adapted layers (``peft``'s LoRA layers: ``lora_A``, ``lora_B``)."""
    if "peft" not in sys.modules:  # nothing was adapted (and peft takes seconds to import)
        return []
    from peft.tuners.lora import LoraLayer

    return [m for m in module.modules() if isinstance(m, LoraLayer)]


def merge_adapters(model: nn.Module) -> int:
    """Fold every adapter of ``model`` into its base layers (``merge_and_unload``): each
    ``LoraModel`` child is replaced, in place, by the plain module it wrapped. Returns how
    many layers were merged."""
    if "peft" not in sys.modules:
        return 0
    from peft.tuners.lora import LoraModel

    wrapped = [(n, m) for n, m in model.named_children() if isinstance(m, LoraModel)]
    merged = 0
    for name, lora in wrapped:
        merged += len(adapter_layers(lora))
        setattr(model, name, lora.merge_and_unload())
    for child in model.children():  # deeper ones (a backbone inside a backbone)
        merged += merge_adapters(child) if not isinstance(child, LoraModel) else 0
    return merged
