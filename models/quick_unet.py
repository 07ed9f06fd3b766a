"""The "quick diffusion" U-Net: a small U-Net for 32x32 images, trained to predict the clean
image from a linear interpolation between image and noise, and sampled in 16 steps.

Block (at one resolution): Conv 3x3 -> multiply by a per-channel embedding of t (FiLM-style
scale) -> LayerNorm over [C, H, W] -> GELU -> Conv 3x3 -> LayerNorm over [C, H, W] -> GELU.
Each LayerNorm sits beside its GELU in one nn.Sequential (a pair ``dlh.patch`` can fuse). At
32x32 with 128 channels a LayerNorm row is 131,072 elements long: the shape that makes this
model a stress test for a norm kernel.

Network: 4 down blocks (each followed by a 2x2 max-pool), a 2-layer MLP bottleneck on the
flattened 2x2 map, 4 up blocks (nearest 2x upsampling, concatenation with the skip of the same
resolution), a 1x1 convolution out.

Schedule (``dlh_kernels.diffusion``'s ``"interp"`` method): ``x_t = (1 - t) x0 + t noise`` on
t_k = 1 - k/16, k = 0..15; the model gets (x_t, t) with t a float in (0, 1] and predicts x0
(prediction_type "sample"). Images live in [-1, 1].
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class QuickUNetConfig:
    in_channels: int = 1
    image_size: int = 32  # divisible by 16 (four poolings)
    channels: tuple = (128, 128, 256, 256)
    time_hidden: int = 64
    bottleneck: int = 1024
    steps: int = 16  # sampling steps of the interpolation schedule

    @classmethod
    def small(cls) -> "QuickUNetConfig":
        return cls(image_size=16, channels=(4, 8, 8, 16), time_hidden=8, bottleneck=32, steps=4)


class QuickBlock(nn.Module):
    def __init__(self, cin: int, cout: int, size: int, time_hidden: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.time = nn.Sequential(nn.Linear(1, time_hidden), nn.GELU(), nn.Linear(time_hidden, cout))
        self.norm1 = nn.Sequential(nn.LayerNorm([cout, size, size]), nn.GELU())
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.norm2 = nn.Sequential(nn.LayerNorm([cout, size, size]), nn.GELU())

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        h = self.conv1(x) * self.time(t)[:, :, None, None]  # (B, cout, S, S) scaled per channel
        h = self.norm1(h)
        return self.norm2(self.conv2(h))


class QuickUNet(nn.Module):
    def __init__(self, config: QuickUNetConfig):
        super().__init__()
        if config.image_size % 16:
            raise ValueError(f"image_size must be a multiple of 16, got {config.image_size}")
        self.config = config
        c, s, th = config.channels, config.image_size, config.time_hidden
        sizes = [s // 2 ** i for i in range(4)]           # 32, 16, 8, 4
        ins = [config.in_channels, *c[:-1]]
        self.down = nn.ModuleList(QuickBlock(ins[i], c[i], sizes[i], th) for i in range(4))
        self.pool = nn.MaxPool2d(2)
        flat = c[3] * (s // 16) ** 2
        self.bottleneck = nn.Sequential(nn.Flatten(), nn.Linear(flat, config.bottleneck), nn.ReLU(),
                                        nn.Linear(config.bottleneck, flat))
        outs = [c[0], c[0], c[1], c[2]]                   # up block i writes outs[i]
        self.up = nn.ModuleList(QuickBlock((c[3] if i == 3 else outs[i + 1]) + c[i], outs[i], sizes[i], th)
                                for i in range(4))
        self.out = nn.Conv2d(c[0], config.in_channels, 1)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t = t.to(x.dtype).reshape(-1, 1).expand(x.shape[0], 1)  # (B, 1)
        skips = []
        h = x
        for block in self.down:
            h = block(h, t)
            skips.append(h)
            h = self.pool(h)
        h = self.bottleneck(h).view_as(h)                  # (B, c3, S/16, S/16)
        for i in reversed(range(4)):
            h = F.interpolate(h, scale_factor=2, mode="nearest")
            h = self.up[i](torch.cat([h, skips[i]], 1), t)
        return self.out(h)                                 # the predicted clean image
