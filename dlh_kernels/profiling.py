"""NVTX ranges for Nsight: every op records ``dlh::<op>[<backend>]`` while profiling is on.

Off by default; when off, an op pays one boolean test. Turn on with ``DLH_NVTX=1``,
``dlh.profiling.enable()`` or ``with dlh.profiling.nvtx():``.
"""
from __future__ import annotations

import contextlib
import os
from typing import Iterator

_enabled = os.environ.get("DLH_NVTX", "0") == "1"


def enabled() -> bool:
    return _enabled


def enable(on: bool = True) -> None:
    global _enabled
    _enabled = on


@contextlib.contextmanager
def nvtx(on: bool = True) -> Iterator[None]:
    """Record NVTX ranges inside the block."""
    global _enabled
    before, _enabled = _enabled, on
    try:
        yield
    finally:
        _enabled = before


def _push_pop():
    # The `nvtx` package has domains and colours; torch's own binding is the fallback (the GPU
    # image has torch but not always the package).
    try:
        import nvtx as _nvtx
        domain = _nvtx.get_domain("dlh")
        return (lambda name: domain.push_range(message=name)), domain.pop_range
    except Exception:
        import torch.cuda.nvtx as _tnvtx
        return _tnvtx.range_push, _tnvtx.range_pop


_push = _pop = None


@contextlib.contextmanager
def op_range(name: str) -> Iterator[None]:
    """The range of one op call; callers test `enabled()` first so the off path costs nothing."""
    global _push, _pop
    if _push is None:
        _push, _pop = _push_pop()
    _push(name)
    try:
        yield
    finally:
        _pop()
