"""Variational autoencoder on 28x28 digits: 784 -> 400 -> 400 -> (mu, log variance) of a
200-dimensional latent, LeakyReLU(0.2); the decoder mirrors it, 200 -> 400 -> 400 -> 784, with a
sigmoid out. Loss: binary cross-entropy of the reconstruction (summed over pixels) plus the KL
divergence of N(mu, sigma^2) from N(0, 1), both averaged over the batch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn


@dataclass
class VAEConfig:
    channels: int = 1
    image_size: int = 28
    hidden: int = 400
    latent: int = 200
    slope: float = 0.2

    @classmethod
    def small(cls) -> "VAEConfig":
        return cls(image_size=16, hidden=32, latent=8)


class VAE(nn.Module):
    def __init__(self, config: VAEConfig):
        super().__init__()
        self.config = config
        pixels = config.channels * config.image_size ** 2
        self.encoder = nn.Sequential(nn.Flatten(), nn.Linear(pixels, config.hidden), nn.LeakyReLU(config.slope),
                                     nn.Linear(config.hidden, config.hidden), nn.LeakyReLU(config.slope))
        self.mu = nn.Linear(config.hidden, config.latent)
        self.logvar = nn.Linear(config.hidden, config.latent)
        self.decoder = nn.Sequential(nn.Linear(config.latent, config.hidden), nn.LeakyReLU(config.slope),
                                     nn.Linear(config.hidden, config.hidden), nn.LeakyReLU(config.slope),
                                     nn.Linear(config.hidden, pixels), nn.Sigmoid())

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        c, s = self.config.channels, self.config.image_size
        return self.decoder(z).view(z.shape[0], c, s, s)  # (B, C, H, W) in [0, 1]

    def forward(self, x: torch.Tensor, eps: Optional[torch.Tensor] = None):
        """-> (reconstruction, mu, logvar). eps: the reparameterisation noise (B, latent);
        None draws it in training and uses the mean (eps = 0) in eval."""
        h = self.encoder(x)
        mu, logvar = self.mu(h), self.logvar(h)
        if eps is None:
            eps = torch.randn_like(mu) if self.training else torch.zeros_like(mu)
        z = mu + eps * torch.exp(0.5 * logvar)
        return self.decode(z), mu, logvar
