"""Output allocation for the kernel glue.

With poisoning on (`DLH_POISON=1`, or `set_poison(True)`; the test suite turns it on), every
buffer a kernel is meant to fill starts as NaN, so an element the kernel forgot to write shows
up as NaN instead of as whatever the allocator left there.
"""
from __future__ import annotations

import os

import torch

_poison = os.environ.get("DLH_POISON", "0") == "1"


def set_poison(on: bool) -> None:
    global _poison
    _poison = on


def empty(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """torch.empty of shape (an int, tuple or torch.Size). The sizes go in unpacked: torch's
    argument parser takes ints ~0.4 us faster than a tuple and ~1 us faster than a torch.Size,
    and this is on every launch's path."""
    if type(shape) is int:
        t = torch.empty(shape, dtype=dtype, device=device)
    else:
        t = torch.empty(*shape, dtype=dtype, device=device) if shape else \
            torch.empty((), dtype=dtype, device=device)
    if _poison:
        t.fill_(float("nan"))
    return t


def empty_like(t: torch.Tensor) -> torch.Tensor:
    """Like torch.empty_like (same strides when t is dense, else contiguous), poisoned if on."""
    out = torch.empty_like(t)
    if _poison:
        out.fill_(float("nan"))
    return out
