"""A Vision Transformer backbone on ``torch.nn`` (Dosovitskiy et al., 2021): patch embedding,
learnt position embeddings, pre-norm Transformer blocks on PyTorch's fused attention
(``scaled_dot_product_attention``), then a class token or the mean of the patch tokens.

The embedding (``embed``) and the Transformer (``encode``) are separate so that a masked
autoencoding objective can drop patches between them; ``out_features`` is the width a head
sits on.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from graftline.models.norm import InputNorm


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}")
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.dropout = dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.dropout if self.training else 0.0
        )
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Block(nn.Module):
    """Pre-norm: ``x + attn(norm(x))``, then ``x + mlp(norm(x))``."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, dropout: float) -> None:
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(
            nn.Linear(dim, hidden),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, dim),
            nn.Dropout(dropout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class Embedding(nn.Module):
    """Patches to tokens (a strided convolution) plus learnt position embeddings, and the
    class token; one module, so that layer-wise LR decay can treat it as layer 0."""

    def __init__(
        self,
        in_channels: int,
        dim: int,
        patch_size: int,
        num_patches: int,
        cls: bool,
        normalize: dict[str, list[float]] | None = None,
    ) -> None:
        super().__init__()
        self.input_norm = InputNorm(in_channels, normalize)
        self.patch = nn.Conv2d(in_channels, dim, patch_size, stride=patch_size)
        self.pos = nn.Parameter(torch.zeros(1, num_patches, dim))
        self.cls = nn.Parameter(torch.zeros(1, 1, dim)) if cls else None
        nn.init.trunc_normal_(self.pos, std=0.02)
        if self.cls is not None:
            nn.init.trunc_normal_(self.cls, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.patch(self.input_norm(x)).flatten(2).transpose(1, 2) + self.pos


class ViTBackbone(nn.Module):
    def __init__(
        self,
        in_channels: int = 1,
        image_size: int = 28,
        patch_size: int = 4,
        dim: int = 64,
        depth: int = 4,
        heads: int = 4,
        mlp_ratio: float = 2.0,
        dropout: float = 0.0,
        pool: str = "cls",
        normalize: dict[str, list[float]] | None = None,
    ) -> None:
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"image_size {image_size} is not a multiple of patch_size {patch_size}")
        if pool not in ("cls", "mean"):
            raise ValueError(f"pool must be 'cls' or 'mean', not {pool!r}")
        self.pool = pool
        self.patch_size = patch_size
        self.num_patches = (image_size // patch_size) ** 2
        self.embed = Embedding(
            in_channels, dim, patch_size, self.num_patches, pool == "cls", normalize
        )
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_ratio, dropout) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.out_features = dim
        self.apply(_init)

    def layers(self) -> list[nn.Module]:
        """Input to output: the embedding, each block, the final norm (layer-wise LR decay
        scales each by its depth)."""
        return [self.embed, *self.blocks, self.norm]

    def encode(self, tokens: torch.Tensor) -> torch.Tensor:
        """The Transformer over ``tokens`` (all patches, or the visible ones), class token
        first when there is one; returns the normalised sequence."""
        if self.embed.cls is not None:
            tokens = torch.cat([self.embed.cls.expand(tokens.shape[0], -1, -1), tokens], dim=1)
        for block in self.blocks:
            tokens = block(tokens)
        return self.norm(tokens)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        seq = self.encode(self.embed(x))
        return seq[:, 0] if self.embed.cls is not None else seq.mean(dim=1)

    def spatial(self, x: torch.Tensor) -> torch.Tensor:
        """The patch tokens after the last block and norm, ``(N, patches, dim)``: the
        per-position representation below the pooling (the class token left out)."""
        seq = self.encode(self.embed(x))
        return seq[:, 1:] if self.embed.cls is not None else seq


def _init(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
