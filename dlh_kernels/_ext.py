"""The compiled CUDA C++ extension, loaded on first use (importing dlh_kernels never needs it).

`dlh_kernels._C` takes raw device pointers, sizes, strides, dtype codes and a stream handle;
torch allocates everything in Python. Its functions raise RuntimeError naming the kernel on any
CUDA error.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch

# dtype codes shared with csrc/common.cuh
DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}

_module = None
_error: Optional[str] = None
_tried = False


def _load() -> None:
    global _module, _error, _tried
    _tried = True
    try:
        from . import _C  # type: ignore[attr-defined]
        _module = _C
    except ImportError as exc:
        _error = (f"the CUDA extension dlh_kernels._C is not built ({exc}); reinstall with nvcc "
                  "on PATH (setup.py prints why it skipped the build)")


def load_error() -> Optional[str]:
    if not _tried:
        _load()
    return _error


def ext():
    """The extension module; raises RuntimeError with the reason when it is missing."""
    if not _tried:
        _load()
    if _module is None:
        raise RuntimeError(_error)
    return _module


@functools.lru_cache(maxsize=None)
def sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


_raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None)


def stream_handle(device: torch.device) -> int:
    """The current CUDA stream of device, as the raw handle the extension launches on. Read
    without building a torch.cuda.Stream object (what Triton's launcher does too): this is on
    every launch's path."""
    index = device.index
    if _raw_stream is None or index is None:
        return torch.cuda.current_stream(device).cuda_stream
    return _raw_stream(index)


def ptr(t: Optional[torch.Tensor]) -> int:
    return 0 if t is None else t.data_ptr()
