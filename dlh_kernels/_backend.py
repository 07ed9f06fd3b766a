"""Backend registry: which backends exist, which one a call runs on, and why not the others.

Backends: ``triton`` (Triton kernels; CPU tensors only under the Triton interpreter), ``cuda``
(the compiled CUDA C++ extension), ``torch`` (eager PyTorch references, also the CPU path) and
``auto`` (the fastest one that can do the call). Nothing here touches the GPU at import time.
"""
from __future__ import annotations

import contextlib
import contextvars
import os
from typing import Callable, Iterator, Optional

import torch

from . import _cache, profiling

BACKENDS = ("triton", "cuda", "torch")
_CHOICES = BACKENDS + ("auto",)

# The process default (set_backend) and the innermost use_backend() override.
_default_backend = os.environ.get("DLH_BACKEND", "auto")
_override: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar("dlh_backend", default=None)

# The float dtypes the triton and cuda kernels take; anything else (float64, ints) runs on torch.
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def dtype_reason(backend: str, dtype: torch.dtype, what: str = "input") -> Optional[str]:
    """Why ``backend``'s kernels cannot take a ``what`` of ``dtype``, or None when they can (the
    torch backend takes every dtype): the shared first check of the ops' capability functions."""
    if backend == "torch" or dtype in KERNEL_DTYPES:
        return None
    return f"the {backend} kernels take float32/float16/bfloat16 {what}, not {dtype}"


# `auto` tries these in order on CUDA tensors. Triton first until the benchmarks say otherwise
# per op; ops may pass their own order.
AUTO_ORDER_CUDA = ("triton", "cuda", "torch")


FP32_MATMUL_NOTE = ("fp32 without TF32 (torch.backends.cuda.matmul.allow_tf32 is False): the "
                    "kernels' exact fp32 dots run on CUDA cores, far slower than cuBLAS, so auto "
                    "runs torch; allow TF32 (or name the backend) to run the kernel")


def matmul_auto_order(dtype: torch.dtype) -> tuple[str, ...]:
    """``auto``'s order for the matmul-shaped ops (linear, linear_gelu): an fp32 call without TF32
    allowed goes to torch (cuBLAS), the kernels' fp32 GEMM being ieee dots on CUDA cores
    (review 2026-12 T4: kilobytes of stack, 5-25 s compiles, far below cuBLAS)."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return ("torch",)
    return AUTO_ORDER_CUDA


def _check_name(name: str, what: str = "backend") -> str:
    if name not in _CHOICES:
        raise ValueError(f"{what} must be one of {_CHOICES}, got {name!r}")
    return name


def set_backend(name: str) -> None:
    """Set the process-wide default backend (``auto`` unless ``DLH_BACKEND`` says otherwise)."""
    global _default_backend
    _default_backend = _check_name(name)


def get_backend() -> str:
    return _override.get() or _default_backend


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run the ops inside the ``with`` block on backend ``name`` (unless a call passes ``backend=``)."""
    token = _override.set(_check_name(name))
    try:
        yield
    finally:
        _override.reset(token)


# ---------------------------------------------------------------------------------------------
# Availability: cached per (backend, device type); each answer is None (available) or a reason.

def interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _triton_reason(device_type: str) -> Optional[str]:
    try:
        import triton  # noqa: F401
    except Exception as exc:  # ImportError, or a broken install
        return f"triton is not importable ({exc.__class__.__name__}: {exc})"
    if device_type == "cuda":
        return None if torch.cuda.is_available() else "no CUDA device"
    if device_type == "cpu":
        if interpreter_on():
            return None
        return ("Triton runs CPU tensors only under its interpreter "
                "(set TRITON_INTERPRET=1 before triton is imported)")
    return f"Triton does not run on {device_type} tensors"


def _cuda_reason(device_type: str) -> Optional[str]:
    from . import _ext
    if _ext.load_error() is not None:
        return _ext.load_error()
    if device_type != "cuda":
        return f"the cuda backend needs CUDA tensors, not {device_type}"
    return None if torch.cuda.is_available() else "no CUDA device"


_REASONS: dict[tuple[str, str], Optional[str]] = {}


def unavailable_reason(backend: str, device_type: str) -> Optional[str]:
    """None if ``backend`` can run tensors of ``device_type`` at all, else the reason."""
    key = (backend, device_type)
    if key not in _REASONS:
        if backend == "torch":
            _REASONS[key] = None
        elif backend == "triton":
            _REASONS[key] = _triton_reason(device_type)
        else:
            _REASONS[key] = _cuda_reason(device_type)
    return _REASONS[key]


def backends() -> dict[str, str]:
    """``{name: "available" | reason}`` for this machine's default device (CUDA if present)."""
    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    return {b: unavailable_reason(b, device_type) or "available" for b in BACKENDS}


# ---------------------------------------------------------------------------------------------
# Choosing the backend of one call.

Capability = Callable[[str], Optional[str]]  # backend -> None if it can do this call, else why


def plain_torch(requested: Optional[str], t: torch.Tensor) -> bool:
    """True when a call on ``t`` runs on the torch backend with nobody watching (no profiler
    ranges, no `dlh.coverage`): the public functions then call torch.nn.functional at once,
    because on small CPU tensors every microsecond of glue shows (bench/overhead.py). The same
    answer as choose(): ``torch`` named, or ``auto`` on a tensor that is not on a GPU."""
    name = requested if requested is not None else (_override.get() or _default_backend)
    return (name == "torch" or (name == "auto" and not t.is_cuda)) \
        and not profiling._enabled and profiling.observer is None


# Host cost per call (bench/overhead.py, the stand-in GPU path): Triton's launch path (its JIT
# binder, the glue) costs tens of microseconds more than the CUDA extension's. A call whose
# kernel moves fewer bytes than the H200 copies in that time (HOST_GAP_US at ~4.3 TB/s) is
# bound by the host, so `auto` puts the cuda backend first for it, unless `dlh bench
# --save-auto` measured an order for the op on this device.
HOST_GAP_US = 10.0
HOST_BOUND_BYTES = int(HOST_GAP_US * 1e-6 * 4.3e12)


def host_first(order: tuple[str, ...]) -> tuple[str, ...]:
    """``order`` with the backend of the cheapest launch (cuda) moved to the front."""
    return ("cuda",) + tuple(b for b in order if b != "cuda") if "cuda" in order else order


def choose(op: str, requested: Optional[str], device_type: str, supports: Capability,
           auto_order: tuple[str, ...] = AUTO_ORDER_CUDA, nbytes: Optional[int] = None) -> str:
    """Resolve ``requested`` (None: the current default) to the backend that runs this call.

    A backend named explicitly that cannot do the call raises; ``auto`` takes the first backend
    in ``auto_order`` that can (CPU tensors: always ``torch``, the interpreter is for tests).
    ``nbytes``: the bytes the call's kernel moves, when the op knows them cheaply; below
    HOST_BOUND_BYTES the cheapest launch comes first (see host_first).
    """
    name = requested if requested is not None else get_backend()
    if name == "auto":
        if device_type != "cuda":
            return "torch"
        # an order saved by `dlh bench --save-auto` for this op and device comes first
        order = _cache.auto_order(op, auto_order)
        if order is auto_order and nbytes is not None and nbytes < HOST_BOUND_BYTES:
            order = host_first(auto_order)
        for candidate in order:
            if unavailable_reason(candidate, device_type) is None and supports(candidate) is None:
                return candidate
        return "torch"
    if name not in BACKENDS:
        _check_name(name, "backend")
    reason = unavailable_reason(name, device_type) or supports(name)
    if reason is not None:
        raise RuntimeError(f"dlh.{op}: backend {name!r} cannot run this call: {reason}")
    return name


def explain_choice(device_type: str, supports: Capability,
                   auto_order: tuple[str, ...] = AUTO_ORDER_CUDA, nbytes: Optional[int] = None,
                   op: Optional[str] = None) -> dict[str, str]:
    """Every backend's verdict on one call: "ok", or the reason it would not run it."""
    verdict = {}
    for b in BACKENDS:
        reason = unavailable_reason(b, device_type) or supports(b)
        verdict[b] = "ok" if reason is None else reason
    if device_type == "cuda":
        order = _cache.auto_order(op, auto_order) if op is not None else auto_order
        if order is auto_order and nbytes is not None and nbytes < HOST_BOUND_BYTES:
            order = host_first(auto_order)
    else:
        order = ("torch",)
    verdict["auto"] = next((f"picks {b}" for b in order if verdict[b] == "ok"), "picks torch")
    return verdict


# ---------------------------------------------------------------------------------------------
# Deterministic kernels: ops whose fastest kernel sums in an order that varies between runs
# (atomics) switch to a fixed-order one when this is on, or when torch's own switch is.

_deterministic = False


class deterministic:
    """``dlh.deterministic(True)``: bitwise-repeatable backward kernels from now on (also
    ``torch.use_deterministic_algorithms(True)``). As a context manager, restores on exit:
    ``with dlh.deterministic(True): ...``."""

    def __init__(self, on: bool = True):
        global _deterministic
        self._previous = _deterministic
        _deterministic = bool(on)

    def __enter__(self) -> "deterministic":
        return self

    def __exit__(self, *exc) -> None:
        global _deterministic
        _deterministic = self._previous


def is_deterministic() -> bool:
    return _deterministic or torch.are_deterministic_algorithms_enabled()


# ---------------------------------------------------------------------------------------------
# The Triton kernel modules, imported on first use (importing dlh_kernels never imports triton)
# and then found with one dict lookup: a function-level `from ... import` costs ~1 us a call.

_triton_modules: dict = {}


def triton_module(name: str):
    """``dlh_kernels.triton_kernels.<name>``."""
    module = _triton_modules.get(name)
    if module is None:
        import importlib
        module = _triton_modules[name] = importlib.import_module(f"dlh_kernels.triton_kernels.{name}")
    return module
