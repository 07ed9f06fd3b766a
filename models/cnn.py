"""LeNet-style CNN for 28x28 digits:
Conv(1->16, 5x5, pad 2)-ReLU-MaxPool(2)-Conv(16->32, 5x5, pad 2)-ReLU-MaxPool(2)-Linear(32*7*7=1568 -> 10).

Each convolution is followed by its ReLU inside one nn.Sequential, so ``dlh.patch`` fuses the
ReLU into the convolution's epilogue.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class CNNConfig:
    in_channels: int = 1
    image_size: int = 28  # divisible by 4 (two 2x2 poolings)
    channels: tuple = (16, 32)
    kernel_size: int = 5
    classes: int = 10

    @classmethod
    def small(cls) -> "CNNConfig":
        return cls(channels=(4, 8), image_size=16)


class CNN(nn.Module):
    def __init__(self, config: CNNConfig):
        super().__init__()
        self.config = config
        c1, c2 = config.channels
        pad = config.kernel_size // 2
        self.features = nn.Sequential(
            nn.Conv2d(config.in_channels, c1, config.kernel_size, padding=pad), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, config.kernel_size, padding=pad), nn.ReLU(),
            nn.MaxPool2d(2),
        )
        side = config.image_size // 4
        self.classifier = nn.Linear(c2 * side * side, config.classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.features(x)                     # (B, c2, S/4, S/4)
        return self.classifier(h.flatten(1))     # (B, classes) logits
