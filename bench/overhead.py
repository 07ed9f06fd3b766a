"""Host cost per call of every public op, next to the plain torch call it replaces.

On a tiny tensor the kernels take next to nothing, so a tight loop of calls measures what the
host spends per call: argument checks, backend choice, the op's dispatch and autograd, the
launch glue. Small models (17-token ViT, T = 256 GPT) and the diffusion sampler are bound by it.

Rows: one per (op, mode, backend), microseconds per call, the plain torch call's time in the
same run ("F": ``torch.nn.functional`` or the few torch lines a user would write), their ratio
and difference. Modes: ``fwd`` and ``fwd+bwd`` (``torch.autograd.grad`` of the output).

Where each row ran (the ``path`` column):
- ``cuda device``: on a GPU, real launches, one synchronisation per timed loop;
- ``cpu tensors``: the torch backend on CPU tensors (F is timed on the same CPU tensors);
- ``stand-in``: on a machine without a GPU, the GPU code path with the device work taken out
  (`standin_gpu`): CPU tensors, but the glue takes its GPU branches (the triton and cuda
  backends accepted, GPU configs, the SM count of an H200), Triton kernels go through the
  autotuner, the JIT binder and the compiled kernel's launcher call, with a stand-in active
  driver whose launcher does nothing (the C launcher's argument packing and cuLaunchKernel are
  not counted), and the CUDA extension is a stand-in whose functions return at once (the
  pybind11 call into the extension is not counted). So a stand-in row is the Python a GPU call
  runs, and F beside it is the plain torch call on CPU tensors (which includes torch's own CPU
  math on the tiny tensor: a fair floor, not a GPU time).

`dlh bench overhead` prints the table and, with --out, writes overhead[_cpu].{json,md,csv}.
tests/test_overhead.py holds the committed table (bench/results/overhead_cpu.json) to a ratio:
a per-call cost that grows by more than 2x against F fails.
"""
from __future__ import annotations

import contextlib
import math
import os
import time
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch
import torch.nn.functional as F

from . import common

EPS = 1e-5


# ---------------------------------------------------------------------------------------------
# The calls: per op, fresh inputs, the plain torch call and the dlh call.

def _rand(*shape, dtype, device, scale=1.0, shift=0.0):
    return (shift + scale * torch.randn(shape, device=device)).to(dtype)


def _rotate_half(x):
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


class Case:
    """One op's tiny call: inputs(dtype, device) -> (tensors needing grad, other args), and the
    plain torch and dlh functions of them."""

    def __init__(self, op: str, inputs: Callable, plain: Callable, dlh: Callable, grad: bool = True):
        self.op, self.inputs, self.plain, self.dlh, self.grad = op, inputs, plain, dlh, grad


def cases() -> list[Case]:
    import dlh_kernels.functional as DF

    def norm_inputs(dtype, device, bias=True, residual=False):
        n = 64
        x = _rand(2, 17, n, dtype=dtype, device=device)
        w = _rand(n, dtype=dtype, device=device, scale=0.1, shift=1.0)
        b = _rand(n, dtype=dtype, device=device, scale=0.1) if bias else None
        r = _rand(2, 17, n, dtype=dtype, device=device) if residual else None
        leaves = [t for t in (x, r, w, b) if t is not None]
        return leaves, {}

    def unary(dtype, device, n=64):
        return [_rand(2, 17, n, dtype=dtype, device=device)], {}

    def gated(dtype, device):
        return [_rand(2, 17, 64, dtype=dtype, device=device), _rand(2, 17, 64, dtype=dtype, device=device)], {}

    def linear_inputs(dtype, device):
        return [_rand(2, 17, 64, dtype=dtype, device=device), _rand(96, 64, dtype=dtype, device=device, scale=0.1),
                _rand(96, dtype=dtype, device=device, scale=0.1)], {}

    def conv_inputs(dtype, device):
        return [_rand(2, 8, 9, 9, dtype=dtype, device=device), _rand(16, 8, 3, 3, dtype=dtype, device=device, scale=0.1),
                _rand(16, dtype=dtype, device=device, scale=0.1)], {}

    def gn_inputs(dtype, device):
        return [_rand(2, 32, 8, 8, dtype=dtype, device=device), _rand(32, dtype=dtype, device=device, scale=0.1, shift=1.0),
                _rand(32, dtype=dtype, device=device, scale=0.1)], {}

    def attn_inputs(dtype, device):
        return [_rand(1, 2, 17, 64, dtype=dtype, device=device) for _ in range(3)], {}

    def rotary_inputs(dtype, device):
        q, k = _rand(1, 2, 17, 64, dtype=dtype, device=device), _rand(1, 2, 17, 64, dtype=dtype, device=device)
        angle = torch.arange(17, device=device)[:, None] * torch.rand(32, device=device)
        emb = torch.cat((angle, angle), -1)[None]
        return [q, k], {"cos": emb.cos().to(dtype), "sin": emb.sin().to(dtype)}

    def step_inputs(dtype, device):
        table = torch.linspace(0.9999, 0.01, 1000, device=device, dtype=torch.float32)
        return [], {"sample": _rand(2, 4, 8, 8, dtype=dtype, device=device),
                    "model_output": _rand(2, 4, 8, 8, dtype=dtype, device=device),
                    "noise": _rand(2, 4, 8, 8, dtype=dtype, device=device), "table": table}

    n = (64,)

    def ddpm_plain(sample, model_output, noise, table, t=500, pt=499):
        # diffusers DDPMScheduler.step (epsilon, fixed_small, clip 1) in the torch ops it runs
        a_t, a_p = table[t], table[pt]
        beta_t = 1 - a_t / a_p
        x0 = ((sample - (1 - a_t).sqrt() * model_output) / a_t.sqrt()).clamp(-1, 1)
        mean = (a_p.sqrt() * beta_t / (1 - a_t)) * x0 + ((a_t / a_p).sqrt() * (1 - a_p) / (1 - a_t)) * sample
        var = (1 - a_p) / (1 - a_t) * beta_t
        return mean + var.sqrt() * noise

    return [
        Case("layer_norm", norm_inputs, lambda x, w, b, be=None: F.layer_norm(x, n, w, b, EPS),
             lambda x, w, b, be=None: DF.layer_norm(x, n, w, b, EPS, backend=be)),
        Case("rms_norm", lambda d, v: norm_inputs(d, v, bias=False),
             lambda x, w, be=None: F.rms_norm(x, n, w, EPS),
             lambda x, w, be=None: DF.rms_norm(x, n, w, EPS, backend=be)),
        Case("add_layer_norm", lambda d, v: norm_inputs(d, v, residual=True),
             lambda x, r, w, b, be=None: F.layer_norm(x + r, n, w, b, EPS),
             lambda x, r, w, b, be=None: DF.add_layer_norm(x, r, n, w, b, EPS, backend=be)[0]),
        Case("add_rms_norm", lambda d, v: norm_inputs(d, v, bias=False, residual=True),
             lambda x, r, w, be=None: F.rms_norm(x + r, n, w, EPS),
             lambda x, r, w, be=None: DF.add_rms_norm(x, r, n, w, EPS, backend=be)[0]),
        Case("group_norm", gn_inputs, lambda x, w, b, be=None: F.group_norm(x, 8, w, b, EPS),
             lambda x, w, b, be=None: DF.group_norm(x, 8, w, b, EPS, backend=be)),
        Case("group_norm+silu", gn_inputs, lambda x, w, b, be=None: F.silu(F.group_norm(x, 8, w, b, EPS)),
             lambda x, w, b, be=None: DF.group_norm(x, 8, w, b, EPS, activation="silu", backend=be)),
        Case("gelu", unary, lambda x, be=None: F.gelu(x), lambda x, be=None: DF.gelu(x, backend=be)),
        Case("geglu", lambda d, v: unary(d, v, 128),
             lambda x, be=None: (lambda a, g: a * F.gelu(g))(*x.chunk(2, -1)),
             lambda x, be=None: DF.geglu(x, backend=be)),
        Case("silu", unary, lambda x, be=None: F.silu(x), lambda x, be=None: DF.silu(x, backend=be)),
        Case("relu", unary, lambda x, be=None: F.relu(x), lambda x, be=None: DF.relu(x, backend=be)),
        Case("leaky_relu", unary, lambda x, be=None: F.leaky_relu(x, 0.2),
             lambda x, be=None: DF.leaky_relu(x, 0.2, backend=be)),
        Case("swiglu", gated, lambda g, u, be=None: F.silu(g) * u, lambda g, u, be=None: DF.swiglu(g, u, backend=be)),
        Case("gated_gelu", gated, lambda g, u, be=None: F.gelu(g) * u,
             lambda g, u, be=None: DF.gated_gelu(g, u, backend=be)),
        Case("linear", linear_inputs, lambda x, w, b, be=None: F.linear(x, w, b),
             lambda x, w, b, be=None: DF.linear(x, w, b, backend=be)),
        Case("linear_gelu", linear_inputs, lambda x, w, b, be=None: F.gelu(F.linear(x, w, b)),
             lambda x, w, b, be=None: DF.linear_gelu(x, w, b, backend=be)),
        Case("conv2d", conv_inputs, lambda x, w, b, be=None: F.conv2d(x, w, b, padding=1),
             lambda x, w, b, be=None: DF.conv2d(x, w, b, padding=1, backend=be)),
        Case("scaled_dot_product_attention", attn_inputs,
             lambda q, k, v, be=None: F.scaled_dot_product_attention(q, k, v),
             lambda q, k, v, be=None: DF.scaled_dot_product_attention(q, k, v, backend=be)),
        Case("rotary_embedding", rotary_inputs,
             lambda q, k, cos, sin, be=None: (q * cos + _rotate_half(q) * sin) + (k * cos + _rotate_half(k) * sin),
             lambda q, k, cos, sin, be=None: (lambda a, b: a + b)(*DF.rotary_embedding(q, k, cos, sin, backend=be))),
        Case("diffusion_step", step_inputs,
             lambda sample, model_output, noise, table, be=None: ddpm_plain(sample, model_output, noise, table),
             lambda sample, model_output, noise, table, be=None: DF.diffusion_step(
                 sample, model_output, 500, 499, table, noise=noise, backend=be),
             grad=False),
    ]


def _loop(case: Case, fn: Callable, mode: str, dtype: torch.dtype, device: str) -> Callable[[], object]:
    """A no-argument call of fn on fresh inputs (fwd, or fwd + torch.autograd.grad)."""
    leaves, kwargs = case.inputs(dtype, device)
    grad = mode == "fwd+bwd"
    for t in leaves:
        t.requires_grad_(grad)
    if not grad:
        return lambda: fn(*leaves, **kwargs)
    dy = torch.randn_like(fn(*leaves, **kwargs))
    return lambda: torch.autograd.grad(fn(*leaves, **kwargs), leaves, dy)


def us_per_call(calls: dict[str, Callable[[], object]], device: str, target_s: float = 0.004,
                repeats: int = 25, standin: frozenset = frozenset()) -> dict[str, float]:
    """Microseconds per call of each loop, the best of ``repeats`` rounds of ~``target_s`` each.

    The loops take turns within each round, so that a busy machine slows them alike; the best
    round is the estimate because noise only ever adds time, and short rounds are the likeliest
    to run undisturbed on a shared machine. Loops named in ``standin`` run inside
    `standin_gpu` (entered once per round: its own cost is not counted).
    """
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def loop(name, n):
        with standin_gpu() if name in standin else contextlib.nullcontext():
            call = calls[name]
            t0 = time.perf_counter()
            for _ in range(n):
                call()
            sync()
            return (time.perf_counter() - t0) / n

    counts = {}
    for name in calls:
        loop(name, 3)  # JIT compilation, caches, lazy imports
        counts[name] = int(min(20000, max(10, target_s / loop(name, 10))))
    best = {name: math.inf for name in calls}
    for _ in range(repeats):
        for name in calls:
            best[name] = min(best[name], loop(name, counts[name]))
    return {name: t * 1e6 for name, t in best.items()}


# ---------------------------------------------------------------------------------------------
# The GPU code path without a GPU.

RECORD: Optional[list] = None  # tests: every stand-in launch's arguments are appended here


class _NoLaunch:
    """The stand-in for a compiled kernel's C launcher: takes the launch's arguments, does nothing
    (records them when RECORD is a list)."""

    def __init__(self, src, metadata):
        self.name = getattr(src, "name", None) or getattr(getattr(src, "fn", None), "__name__", "?")

    def __call__(self, *args):
        if RECORD is not None:
            RECORD.append((self.name, args))
        return None


def _no_benchmarker(fn, quantiles=None, **kwargs):
    """Every config times the same (the first of the pruned list wins); nothing runs."""
    return [1.0, 1.0, 1.0] if quantiles else 1.0


class _NoExt:
    """The stand-in for dlh_kernels._C: every function returns at once (workspace sizes: 0)."""

    def __getattr__(self, name):
        fn = (lambda *args: 0) if name.endswith("_workspace") else (lambda *args: None)
        setattr(self, name, fn)
        return fn


def standin_driver(arch: int = 90):
    """An active Triton driver for sm_<arch> that compiles as a launch does, binds the launch's
    arguments, calls the compiled kernel's launcher (which does nothing), and times nothing."""
    from .triton_resources import StandInDriver

    class HostDriver(StandInDriver):
        launcher_cls = _NoLaunch

        def __init__(self):
            super().__init__(arch)
            utils = self.utils
            utils.load_binary = lambda name, kernel, shared, device: (0, 0, 0, 0, 1024)

        def get_benchmarker(self):
            return _no_benchmarker

    return HostDriver()


@contextlib.contextmanager
def standin_gpu() -> Iterator[None]:
    """Run the ops' GPU code path on CPU tensors with the device work taken out (module docstring)."""
    from triton.runtime import driver

    from dlh_kernels import _backend, _ext
    from .triton_resources import glue_on_gpu
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("standin_gpu times the compiled path: unset TRITON_INTERPRET")
    saved = [(_ext, name, getattr(_ext, name)) for name in ("ext", "load_error", "stream_handle")]
    stub = _NoExt()
    _ext.ext, _ext.load_error, _ext.stream_handle = (lambda: stub), (lambda: None), (lambda device: 0)
    old_driver = driver._active
    with glue_on_gpu():
        _backend._REASONS[("cuda", "cpu")] = None
        driver.set_active(standin_driver())
        try:
            yield
        finally:
            driver._active = old_driver
            _backend._REASONS.pop(("cuda", "cpu"), None)
            for obj, name, value in saved:
                setattr(obj, name, value)


def _standin_available() -> Optional[str]:
    """None when the stand-in path can run here, else why not."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        return "TRITON_INTERPRET=1: the compiled path cannot run under the interpreter"
    try:
        import triton  # noqa: F401
        from triton.backends.nvidia import driver as _nv  # noqa: F401
    except Exception as exc:
        return f"Triton's NVIDIA backend is not importable ({exc.__class__.__name__}: {exc})"
    return None


# ---------------------------------------------------------------------------------------------
# The table.

def measure(*, ops: Optional[list[str]] = None, dtype: torch.dtype = torch.bfloat16,
            device: str = "cpu", backends: Optional[list[str]] = None, repeats: int = 25,
            target_s: float = 0.004, log: Callable[[str], None] = print,
            budget_s: Optional[float] = None) -> list[dict]:
    """Rows of {op, mode, backend, path, us_per_call, F_us_per_call, ratio, extra_us}.

    device "cuda": every backend in ``backends`` with real launches. device "cpu": the torch
    backend on CPU tensors, and the triton and cuda backends on the stand-in GPU path.
    budget_s: stop starting new ops past this many seconds (a GPU session's step cap; first
    calls compile), saying which were left.
    """
    start = time.perf_counter()
    chosen = [c for c in cases() if ops is None or c.op in ops]
    if backends is None:
        backends = ["torch", "triton", "cuda"]
    rows = []
    threads = torch.get_num_threads()
    if device == "cpu":
        # one intra-op thread: a thread pool's wake-up on a busy machine would swamp the host
        # costs this measures, and these tensors gain nothing from more threads
        torch.set_num_threads(1)
    standin_why = _standin_available() if device == "cpu" else None
    try:
        for i, case in enumerate(chosen):
            if budget_s is not None and time.perf_counter() - start > budget_s:
                log(f"time budget of {budget_s:.0f} s spent: not timed: {', '.join(c.op for c in chosen[i:])}")
                break
            for mode in ("fwd", "fwd+bwd") if case.grad else ("fwd",):
                plain = _loop(case, case.plain, mode, dtype, device)
                calls, paths = {"F": plain}, {}
                for backend in backends:
                    path = "cuda device" if device == "cuda" else (
                        "cpu tensors" if backend == "torch" else "stand-in")
                    if path == "stand-in" and standin_why:
                        continue
                    ctx = standin_gpu() if path == "stand-in" else contextlib.nullcontext()
                    fn = (lambda be: (lambda *a, **k: case.dlh(*a, be=be, **k)))(backend)
                    try:
                        with ctx:
                            call = _loop(case, fn, mode, dtype, device)
                            call()
                    except Exception as exc:
                        msg = str(exc).strip().splitlines()
                        log(f"skip {case.op} {mode} {backend}: {exc.__class__.__name__}: {msg[0] if msg else ''}")
                        continue
                    calls[backend], paths[backend] = call, path
                if len(calls) == 1:
                    continue
                us = us_per_call(calls, device, target_s, repeats,
                                 frozenset(b for b, p in paths.items() if p == "stand-in"))
                for backend, path in paths.items():
                    rows.append({"op": case.op, "mode": mode, "backend": backend, "path": path,
                                 "dtype": str(dtype).replace("torch.", ""),
                                 "us_per_call": round(us[backend], 2), "F_us_per_call": round(us["F"], 2),
                                 "ratio": round(us[backend] / us["F"], 3),
                                 "extra_us": round(us[backend] - us["F"], 2)})
    finally:
        torch.set_num_threads(threads)
    return rows


def backends_to_time(device: str) -> tuple[list[str], dict[str, str]]:
    """(backends to time, {backend: why not}) on this device."""
    import dlh_kernels as dlh
    if device == "cpu":
        why = _standin_available()
        if why:
            return ["torch"], {"triton": why, "cuda": why}
        return ["torch", "triton", "cuda"], {}
    status = dlh.backends()
    timed = [b for b, s in status.items() if s == "available"]
    return timed, {b: s for b, s in status.items() if s != "available"}


COLUMNS = {"op": "op", "mode": "mode", "backend": "backend", "path": "path", "us_per_call": "us/call",
           "F_us_per_call": "F us/call", "ratio": "x F", "extra_us": "extra us"}


def run(*, dtype: str = "bf16", out: Optional[Path] = None, device: Optional[str] = None,
        ops: Optional[list[str]] = None) -> int:
    from .layer_norm import DTYPES
    device = device or ("cuda" if common.has_gpu() else "cpu")
    label = ("GPU, host time per call" if device == "cuda" else
             "host-side CPU cost, NOT a GPU result: torch backend on CPU tensors, triton/cuda on "
             "the stand-in GPU path (no device work)")
    print(f"\nper-call overhead on {common.gpu_name() if device == 'cuda' else 'CPU'} ({label}); {dtype}",
          flush=True)
    try:
        backends, skipped = backends_to_time(device)
    except Exception as exc:
        print(f"dlh_kernels is not importable: {exc.__class__.__name__}: {exc}")
        return 1
    for b, why in skipped.items():
        print(f"skip backend {b}: {why}")
    # a GPU session gives this step ~30 s, first calls compiling included: fewer, shorter rounds
    quick = dict(repeats=7, target_s=0.002, budget_s=float(os.environ.get("DLH_OVERHEAD_BUDGET_S", 22)))
    rows = measure(ops=ops, dtype=DTYPES[dtype], device=device, backends=backends,
                   **(quick if device == "cuda" else {}))
    print(common.format_table(rows, COLUMNS))
    if out is not None and rows:
        name = "overhead" if device == "cuda" else "overhead_cpu"
        paths = common.write_results(rows, common.run_metadata(), out, name, extra={"skipped": skipped})
        print(f"results in {paths[0].parent}/{name}.*")
    return 0 if rows else 1
