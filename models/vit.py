"""Vision Transformer for 28x28 digits: 7x7 patches (16 tokens) + a CLS token, width 256,
6 pre-LN blocks of ``nn.MultiheadAttention(256, 8 heads, batch_first=True)`` and a GELU MLP of
768, a final LayerNorm, a linear head on the CLS token.

The patch embedding is a Conv2d with kernel = stride = patch size. Attention is called with
``need_weights=False``, the path on which ``dlh.nn.MultiheadAttention`` runs the fused kernel.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class ViTConfig:
    in_channels: int = 1
    image_size: int = 28
    patch_size: int = 7
    dim: int = 256
    heads: int = 8
    depth: int = 6
    mlp_dim: int = 768
    dropout: float = 0.0
    classes: int = 10

    @classmethod
    def small(cls) -> "ViTConfig":
        return cls(image_size=16, patch_size=4, dim=32, heads=4, depth=2, mlp_dim=64)


class ViTBlock(nn.Module):
    def __init__(self, config: ViTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.dim)
        self.attn = nn.MultiheadAttention(config.dim, config.heads, dropout=config.dropout, batch_first=True)
        self.ln_2 = nn.LayerNorm(config.dim)
        self.mlp = nn.Sequential(nn.Linear(config.dim, config.mlp_dim), nn.GELU(),
                                 nn.Linear(config.mlp_dim, config.dim), nn.Dropout(config.dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class ViT(nn.Module):
    def __init__(self, config: ViTConfig):
        super().__init__()
        if config.image_size % config.patch_size:
            raise ValueError(f"image_size {config.image_size} is not a multiple of patch_size {config.patch_size}")
        self.config = config
        tokens = (config.image_size // config.patch_size) ** 2
        self.patch_embed = nn.Conv2d(config.in_channels, config.dim, config.patch_size, stride=config.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.dim))
        self.pos_embed = nn.Parameter(torch.randn(1, tokens + 1, config.dim) * 0.02)
        self.blocks = nn.Sequential(*[ViTBlock(config) for _ in range(config.depth)])
        self.ln = nn.LayerNorm(config.dim)
        self.head = nn.Linear(config.dim, config.classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.patch_embed(x).flatten(2).transpose(1, 2)                # (B, N, dim)
        h = torch.cat([self.cls_token.expand(h.shape[0], -1, -1), h], 1)  # (B, N + 1, dim)
        h = self.ln(self.blocks(h + self.pos_embed))
        return self.head(h[:, 0])                                         # (B, classes) logits
