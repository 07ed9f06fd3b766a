"""Drop-in modules: subclasses of their torch counterparts with the same parameters and
`state_dict`, whose forward calls `dlh_kernels.functional`.

Each has a `backend` attribute (None: the current default, see `dlh.use_backend`); it is not
part of the state_dict.
"""
from __future__ import annotations

from typing import Optional

import torch

from . import functional as DF


class LayerNorm(torch.nn.LayerNorm):
    backend: Optional[str] = None

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return DF.layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps,
                             backend=self.backend)


class RMSNorm(torch.nn.RMSNorm):
    backend: Optional[str] = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return DF.rms_norm(x, self.normalized_shape, self.weight, self.eps, backend=self.backend)



class GELU(torch.nn.GELU):
    backend: Optional[str] = None

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return DF.gelu(input, self.approximate, backend=self.backend)


__all__ = ["LayerNorm", "RMSNorm", "GELU"]
