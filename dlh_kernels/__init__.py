"""dlh-kernels: handwritten Triton and CUDA C++ kernels as drop-in torch ops.

    import dlh_kernels as dlh
    import dlh_kernels.functional as DF

Importing never builds anything, never needs the CUDA extension and never initialises CUDA.
"""
from . import coverage, functional, nn, profiling
from ._backend import backends, deterministic, get_backend, is_deterministic, set_backend, use_backend
from .patch import patch, unpatch

__version__ = "0.1.0"


def explain(op: str, *args, **kwargs) -> dict:
    """Which backend would run ``DF.<op>(*args, **kwargs)`` and why each other one would not.

    Example: ``dlh.explain("layer_norm", x, (768,), w, b)``.
    """
    import inspect
    import sys
    fn = getattr(functional, op, None)
    if fn is None:
        raise ValueError(f"dlh.explain: op must be one of {functional.__all__}, got {op!r}")
    bound = inspect.signature(fn).bind(*args, **kwargs)
    bound.apply_defaults()
    return sys.modules[fn.__module__].explain(op, bound.arguments)


__all__ = ["backends", "coverage", "deterministic", "explain", "functional", "get_backend", "is_deterministic",
           "nn", "patch", "profiling", "set_backend", "unpatch", "use_backend"]
