"""Per-call host overhead of the public ops, next to the plain torch.nn.functional call.

On a tiny tensor the kernels take next to nothing, so a tight loop of calls measures what the
host spends per call: argument checks, backend choice, the op's dispatch and autograd, the
launches. Small models and the diffusion sampler are bound by exactly this. One number per
(op, mode, backend): microseconds per call, and the difference to the F.* call it replaces
(for add_*: ``s = x + r`` then the F.* norm, two calls, as a user would write it).

On a GPU every backend is timed, with one synchronisation at the end of each loop. Without a
GPU only the ``torch`` backend is timed: those numbers are host-side CPU costs, not GPU results,
and the Triton interpreter's CPU timings mean nothing, so they are not taken.
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from . import common

SHAPE = (2, 17, 64)  # tiny and odd: the kernel time vanishes next to the host's
OPS = ("layer_norm", "rms_norm", "add_layer_norm", "add_rms_norm")
EPS = 1e-5


def _calls(op: str, backend: Optional[str]) -> Callable:
    """fn(x, r, w, b) for the dlh op on ``backend`` (``"F"``: plain torch.nn.functional)."""
    n = (SHAPE[-1],)
    if backend == "F":
        calls = {
            "layer_norm": lambda x, r, w, b: F.layer_norm(x, n, w, b, EPS),
            "rms_norm": lambda x, r, w, b: F.rms_norm(x, n, w, EPS),
            "add_layer_norm": lambda x, r, w, b: F.layer_norm(x + r, n, w, b, EPS),
            "add_rms_norm": lambda x, r, w, b: F.rms_norm(x + r, n, w, EPS),
        }
        return calls[op]
    import dlh_kernels.functional as DF
    be = None if backend == "auto" else backend
    calls = {
        "layer_norm": lambda x, r, w, b: DF.layer_norm(x, n, w, b, EPS, backend=be),
        "rms_norm": lambda x, r, w, b: DF.rms_norm(x, n, w, EPS, backend=be),
        "add_layer_norm": lambda x, r, w, b: DF.add_layer_norm(x, r, n, w, b, EPS, backend=be)[0],
        "add_rms_norm": lambda x, r, w, b: DF.add_rms_norm(x, r, n, w, EPS, backend=be)[0],
    }
    return calls[op]


def _loop(op: str, fn: Callable, mode: str, device: str, dtype: torch.dtype) -> Callable[[], None]:
    grad = mode == "fwd+bwd"
    x, r, dy = (torch.randn(SHAPE, device=device, dtype=dtype) for _ in range(3))
    w = (1 + 0.1 * torch.randn(SHAPE[-1], device=device)).to(dtype)
    b = (0.1 * torch.randn(SHAPE[-1], device=device)).to(dtype)
    b = b if op.endswith("layer_norm") else None
    r = r if op.startswith("add_") else None
    leaves = [t.requires_grad_(grad) for t in (x, r, w, b) if t is not None]

    if not grad:
        return lambda: fn(x, r, w, b)
    return lambda: torch.autograd.grad(fn(x, r, w, b), leaves, dy)


def us_per_call(calls: dict[str, Callable[[], object]], device: str, target_s: float = 0.02,
                repeats: int = 7) -> dict[str, float]:
    """Microseconds per call of each loop, the best of ``repeats`` rounds of ~``target_s`` each.

    The loops take turns within each round, so that a busy machine slows them alike; the best
    round is the estimate because noise only ever adds time.
    """
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def loop(call, n):
        t0 = time.perf_counter()
        for _ in range(n):
            call()
        sync()
        return (time.perf_counter() - t0) / n

    counts = {}
    for name, call in calls.items():
        loop(call, 3)  # JIT compilation, caches, lazy imports
        counts[name] = int(min(20000, max(20, target_s / loop(call, 20))))
    best = {name: math.inf for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            best[name] = min(best[name], loop(call, counts[name]))
    return {name: t * 1e6 for name, t in best.items()}


def backends_to_time(device: str) -> tuple[list[str], dict[str, str]]:
    """(backends to time, {backend: why not}) on this device."""
    import dlh_kernels as dlh
    if device == "cpu":
        return ["torch"], {
            "triton": "the Triton interpreter's CPU timings mean nothing; not timed",
            "cuda": "needs a GPU",
        }
    status = dlh.backends()
    timed = [b for b, s in status.items() if s == "available"] + ["auto"]
    return timed, {b: s for b, s in status.items() if s != "available"}


def run(*, dtype: str = "bf16", out: Optional[Path] = None, device: Optional[str] = None) -> int:
    from .layer_norm import DTYPES
    device = device or ("cuda" if common.has_gpu() else "cpu")
    torch_dtype = DTYPES[dtype]
    label = "GPU, host time per call" if device == "cuda" else "host-side CPU cost, NOT a GPU result"
    print(f"\nper-call overhead on {common.gpu_name() if device == 'cuda' else 'CPU'} "
          f"({label}); shape {SHAPE}, {dtype}", flush=True)
    try:
        backends, skipped = backends_to_time(device)
    except Exception as exc:
        print(f"dlh_kernels is not importable: {exc.__class__.__name__}: {exc}")
        return 1
    for b, why in skipped.items():
        print(f"skip backend {b}: {why}")
    threads = torch.get_num_threads()
    if device == "cpu":
        # one intra-op thread: a thread pool's wake-up on a busy machine would swamp the host
        # costs this measures, and a (2, 17, 64) tensor gains nothing from more threads
        torch.set_num_threads(1)
    rows = []
    for op in OPS:
        for mode in ("fwd", "fwd+bwd"):
            calls = {"F": _loop(op, _calls(op, "F"), mode, device, torch_dtype)}
            for backend in backends:
                call = _loop(op, _calls(op, backend), mode, device, torch_dtype)
                try:
                    call()
                except Exception as exc:
                    msg = str(exc).strip().splitlines()
                    print(f"skip {op} {mode} {backend}: {exc.__class__.__name__}: {msg[0] if msg else ''}")
                    continue
                calls[backend] = call
            us = us_per_call(calls, device)
            for backend in calls:
                if backend != "F":
                    rows.append({"op": op, "mode": mode, "backend": backend, "timed_on": device,
                                 "dtype": dtype, "shape": "x".join(map(str, SHAPE)),
                                 "us_per_call": us[backend], "F_us_per_call": us["F"],
                                 "extra_us": us[backend] - us["F"]})
    torch.set_num_threads(threads)
    print(common.format_table(rows, {"op": "op", "mode": "mode", "backend": "backend",
                                     "us_per_call": "us/call", "F_us_per_call": "F.* us/call",
                                     "extra_us": "extra us vs F.*"}))
    if out is not None and rows:
        name = "overhead" if device == "cuda" else "overhead_cpu"
        paths = common.write_results(rows, common.run_metadata(), out, name, extra={"skipped": skipped})
        print(f"results in {paths[0].parent}/{name}.*")
    return 0 if rows else 1
