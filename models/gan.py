"""The original fully connected GAN on 28x28 digits.

Generator: z (100) -> 256 -> 512 -> 1024 -> 784, LeakyReLU(0.2) between layers, tanh out
(images in [-1, 1]). Discriminator: 784 -> 1024 -> 512 -> 256 -> 1, LeakyReLU(0.2) and
Dropout(0.3) after each hidden layer; it returns a logit (the loss applies the sigmoid, in
BCE-with-logits, which is the numerically safe form of sigmoid + BCE).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class GANConfig:
    latent: int = 100
    g_hidden: tuple = (256, 512, 1024)
    d_hidden: tuple = (1024, 512, 256)
    channels: int = 1
    image_size: int = 28
    dropout: float = 0.3
    slope: float = 0.2

    @classmethod
    def small(cls) -> "GANConfig":
        return cls(latent=16, g_hidden=(32, 64), d_hidden=(64, 32), image_size=16)


class Generator(nn.Module):
    def __init__(self, config: GANConfig):
        super().__init__()
        self.shape = (config.channels, config.image_size, config.image_size)
        width = [config.latent, *config.g_hidden]
        layers = []
        for a, b in zip(width[:-1], width[1:]):
            layers += [nn.Linear(a, b), nn.LeakyReLU(config.slope)]
        layers += [nn.Linear(width[-1], config.channels * config.image_size ** 2), nn.Tanh()]
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z).view(z.shape[0], *self.shape)  # (B, C, H, W) in [-1, 1]


class Discriminator(nn.Module):
    def __init__(self, config: GANConfig):
        super().__init__()
        width = [config.channels * config.image_size ** 2, *config.d_hidden]
        layers = [nn.Flatten()]
        for a, b in zip(width[:-1], width[1:]):
            layers += [nn.Linear(a, b), nn.LeakyReLU(config.slope), nn.Dropout(config.dropout)]
        layers.append(nn.Linear(width[-1], 1))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).squeeze(-1)  # (B,) logits: real > 0


class GAN(nn.Module):
    """Holds the two networks; training alternates between them (see models.train_step)."""

    def __init__(self, config: GANConfig):
        super().__init__()
        self.config = config
        self.generator = Generator(config)
        self.discriminator = Discriminator(config)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.generator(z)
