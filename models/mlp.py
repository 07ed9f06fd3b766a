"""MLP on scikit-learn's two moons: 2 -> 16 -> 16 -> 1 with ReLU, one logit per point.

The smallest model of the set: two interleaved half circles are not linearly separable, two
hidden layers of 16 ReLUs are enough. Trained with binary cross-entropy on the logit.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class MLPConfig:
    in_features: int = 2
    hidden: int = 16
    layers: int = 2  # hidden layers

    @classmethod
    def small(cls) -> "MLPConfig":
        return cls()  # already tiny


class MLP(nn.Module):
    def __init__(self, config: MLPConfig):
        super().__init__()
        self.config = config
        width = [config.in_features] + [config.hidden] * config.layers
        blocks = []
        for a, b in zip(width[:-1], width[1:]):
            blocks += [nn.Linear(a, b), nn.ReLU()]
        self.net = nn.Sequential(*blocks, nn.Linear(width[-1], 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).squeeze(-1)  # (B, 2) -> (B,) logits
