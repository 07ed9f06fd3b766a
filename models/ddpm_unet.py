"""A DDPM U-Net (Ho et al. 2020, smaller): residual blocks of GroupNorm + SiLU + Conv 3x3 with
the time embedding added between the two convolutions, self-attention at low resolution, a
sinusoidal time embedding through a 2-layer MLP, stride-2 convolutions down, nearest-neighbour
+ convolution up, skips concatenated.

Each GroupNorm sits beside its SiLU in one nn.Sequential (``dlh.patch`` turns the pair into
one GroupNorm+SiLU kernel); attention is ``nn.MultiheadAttention(batch_first=True)`` over the
H*W tokens, called with ``need_weights=False``.

Training: epsilon prediction under the DDPM linear beta schedule (1e-4 .. 0.02 over 1000 steps,
both ends scaled by 1000 / timesteps for shorter schedules, as in Improved DDPM).
Sampling: ``dlh_kernels.diffusion.sample`` (every step one ``DF.diffusion_step``), "ddpm" or
"ddim". Images live in [-1, 1].
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from dlh_kernels.diffusion import linear_alphas_cumprod


@dataclass
class DDPMUNetConfig:
    in_channels: int = 1
    image_size: int = 32
    base: int = 64
    mults: tuple = (1, 2, 2, 2)
    res_blocks: int = 2
    attn_resolutions: tuple = (8,)
    groups: int = 32
    heads: int = 4
    dropout: float = 0.1
    timesteps: int = 1000

    @classmethod
    def small(cls) -> "DDPMUNetConfig":
        return cls(image_size=16, base=8, mults=(1, 2), res_blocks=1, attn_resolutions=(8,), groups=4,
                   heads=2, dropout=0.0, timesteps=100)


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding (B,) -> (B, dim): [sin(t w_i), cos(t w_i)], w_i = 10000^(-i / (dim/2))."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    angles = t.float()[:, None] * freqs[None]
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, time_dim: int, groups: int, dropout: float):
        super().__init__()
        self.norm1 = nn.Sequential(nn.GroupNorm(groups, cin), nn.SiLU())
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.time = nn.Sequential(nn.SiLU(), nn.Linear(time_dim, cout))
        self.out = nn.Sequential(nn.GroupNorm(groups, cout), nn.SiLU(), nn.Dropout(dropout),
                                 nn.Conv2d(cout, cout, 3, padding=1))
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(self.norm1(x)) + self.time(temb)[:, :, None, None]
        return self.skip(x) + self.out(h)


class AttnBlock(nn.Module):
    def __init__(self, channels: int, groups: int, heads: int):
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels)
        self.attn = nn.MultiheadAttention(channels, heads, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        h = self.norm(x).flatten(2).transpose(1, 2)        # (B, HW, C)
        h = self.attn(h, h, h, need_weights=False)[0]
        return x + h.transpose(1, 2).reshape(B, C, H, W)


class Level(nn.Module):
    """The blocks of one resolution: residual blocks, each followed by attention if asked."""

    def __init__(self, blocks, attns):
        super().__init__()
        self.blocks, self.attns = nn.ModuleList(blocks), nn.ModuleList(attns)


class DDPMUNet(nn.Module):
    def __init__(self, config: DDPMUNetConfig):
        super().__init__()
        self.config = config
        base, tdim, g = config.base, 4 * config.base, config.groups
        self.time_embed = nn.Sequential(nn.Linear(base, tdim), nn.SiLU(), nn.Linear(tdim, tdim))
        self.in_conv = nn.Conv2d(config.in_channels, base, 3, padding=1)

        def attn(ch, res):
            return AttnBlock(ch, g, config.heads) if res in config.attn_resolutions else nn.Identity()

        skip_ch, ch, res = [base], base, config.image_size
        self.down, self.downsample = nn.ModuleList(), nn.ModuleList()
        for i, mult in enumerate(config.mults):
            blocks, attns = [], []
            for _ in range(config.res_blocks):
                blocks.append(ResBlock(ch, base * mult, tdim, g, config.dropout))
                ch = base * mult
                attns.append(attn(ch, res))
                skip_ch.append(ch)
            self.down.append(Level(blocks, attns))
            last = i == len(config.mults) - 1
            self.downsample.append(nn.Identity() if last else nn.Conv2d(ch, ch, 3, stride=2, padding=1))
            if not last:
                skip_ch.append(ch)
                res //= 2
        self.mid1 = ResBlock(ch, ch, tdim, g, config.dropout)
        self.mid_attn = AttnBlock(ch, g, config.heads)
        self.mid2 = ResBlock(ch, ch, tdim, g, config.dropout)
        self.up, self.upsample = nn.ModuleList(), nn.ModuleList()
        for i, mult in reversed(list(enumerate(config.mults))):
            blocks, attns = [], []
            for _ in range(config.res_blocks + 1):
                blocks.append(ResBlock(ch + skip_ch.pop(), base * mult, tdim, g, config.dropout))
                ch = base * mult
                attns.append(attn(ch, res))
            self.up.append(Level(blocks, attns))
            self.upsample.append(nn.Conv2d(ch, ch, 3, padding=1) if i > 0 else nn.Identity())
            if i > 0:
                res *= 2
        self.out = nn.Sequential(nn.GroupNorm(g, ch), nn.SiLU(), nn.Conv2d(ch, config.in_channels, 3, padding=1))
        scale = 1000.0 / config.timesteps
        # float32 whatever the model's dtype, so not a buffer (model.to(bfloat16) would round it)
        self._alphas_cumprod = {torch.device("cpu"): linear_alphas_cumprod(config.timesteps, 1e-4 * scale,
                                                                           0.02 * scale)}

    def alphas_cumprod(self, device=None) -> torch.Tensor:
        """The schedule's alpha_bar_t, float32, (timesteps,), on `device` (cached per device)."""
        device = torch.device(device if device is not None else "cpu")
        if device not in self._alphas_cumprod:
            self._alphas_cumprod[device] = self._alphas_cumprod[torch.device("cpu")].to(device)
        return self._alphas_cumprod[device]

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t = t.reshape(-1).expand(x.shape[0])
        temb = self.time_embed(timestep_embedding(t, self.config.base).to(x.dtype))  # (B, 4 base)
        h = self.in_conv(x)
        skips = [h]
        for level, down in zip(self.down, self.downsample):
            for block, attn in zip(level.blocks, level.attns):
                h = attn(block(h, temb))
                skips.append(h)
            if not isinstance(down, nn.Identity):
                h = down(h)
                skips.append(h)
        h = self.mid2(self.mid_attn(self.mid1(h, temb)), temb)
        for level, up in zip(self.up, self.upsample):
            for block, attn in zip(level.blocks, level.attns):
                h = attn(block(torch.cat([h, skips.pop()], 1), temb))
            if not isinstance(up, nn.Identity):
                h = up(F.interpolate(h, scale_factor=2, mode="nearest"))
        return self.out(h)                                  # the predicted noise
