"""Launch-exact Triton compiles for sm_90 and sm_80, without a GPU, and their resource report.

    python -m dlh_kernels.bench.triton_resources --out bench/results/          # the full sweep
    python -m dlh_kernels.bench.triton_resources --sweep ci --no-write         # the CI subset
    python -m dlh_kernels.bench.triton_resources --hash-only                   # the staleness hash

What a launch compiles is not what `triton.compile(ASTSource(...))` with plain i32 strides
compiles: the JIT binder specialises every integer argument equal to 1 (unit strides become
constants, which is what lets loads vectorise and go through cp.async) and marks pointers and
integers divisible by 16 (alignment hints). So this module drives every kernel through Triton's
own binder on real argument values:

1. capture: the ops' own glue runs on CPU tensors (the public functional API with
   backend="triton", forward and backward, over the classes of call it accepts: dtypes, head
   dims, masks, dropout, causal, layouts, GQA, dQ modes, the fused/split norm paths, conv
   layouts and groups, ...) with `JITFunction.run` and `Autotuner.run` intercepted, so nothing
   launches and each launch's kernel, arguments, constexprs and grid are recorded. The glue is
   told it is on a GPU (attention's `_on_gpu`, the SM count), so it picks the GPU's configs;
2. compile: a stand-in active driver reports the target (`GPUTarget("cuda", arch, 32)`, its
   max shared memory per block, device id = arch), and `kernel.warmup(*captured_args, ...)` runs
   the binder and the compiler exactly as the launch would, once per fixed config and once per
   config of the autotune list (each marked with whether the list's own early prune keeps it
   on this target);
3. measure: shared memory from the kernel's metadata; registers, stack frame and local memory
   from `cuobjdump -res-usage` (Triton's wheel ships it), spill instructions (STL/LDL) from the
   SASS when there is a stack; async copies (cp.async), TMA (cp.async.bulk.tensor), wgmma and
   mma.sync from the PTX; pipelined = the main loop's loads are asynchronous copies waited on
   (cp.async + wait_group in the PTX).

Output: `triton_resources_<major.minor>.json` (every variant) and `.md` (tables) under --out,
tagged with the Triton version, the targets, the date, the git sha of triton_kernels/ and the
`launch_hash`: a hash of what the glue launches (each kernel's Triton cache key, i.e. its source
and the jit functions it calls, the specialisation of its arguments, its constexprs and every
config it can run with, and which configs the prunes keep per target). tests/test_triton_compile.py
recomputes that hash from today's sources (capture only, seconds) and fails when the committed
report is stale; it regenerates with the first command above (both Triton versions: run it with
each one's python).
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

# the targets and their shared memory per block (the opt-in maximum, cudaDevAttrMaxSharedMemoryPerBlockOptin)
TARGETS = {90: 232_448, 80: 166_912}
REPO = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------------------------------------
# The stand-in driver: what the binder, the compiler and our prunes ask the active driver.

class _Utils:
    def __init__(self, max_shared: int):
        self.max_shared = max_shared

    def get_device_properties(self, device):
        return {"max_shared_mem": self.max_shared, "multiprocessor_count": 132,
                "max_num_regs": 65536, "warpSize": 32, "sm_clock_rate": 0, "mem_clock_rate": 0,
                "mem_bus_width": 0}


class StandInDriver:
    """An active driver for `arch` that compiles but never launches (device id = arch, so the
    JIT's per-device caches keep the two targets apart)."""

    def __init__(self, arch: int):
        from triton.backends.compiler import GPUTarget
        self.arch = arch
        self.target = GPUTarget("cuda", arch, 32)
        self.utils = _Utils(TARGETS[arch])

    def is_active(self):
        return True

    def get_current_device(self):
        return self.arch

    def set_current_device(self, device):
        pass

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return self.target

    def get_active_torch_device(self):
        import torch
        return torch.device("cpu")

    def get_benchmarker(self):
        raise RuntimeError("the stand-in driver cannot time kernels")


@contextlib.contextmanager
def target(arch: int):
    from triton.runtime import driver
    old = driver._active
    driver.set_active(StandInDriver(arch))
    try:
        yield
    finally:
        driver._active = old


# ---------------------------------------------------------------------------------------------
# Capture: run the glue with launches intercepted.

@dataclass
class Launch:
    kernel: Any                 # the JITFunction
    args: tuple
    kwargs: dict                # constexprs and options as the glue passed them
    grid: Any
    configs: Optional[list]     # the autotune list (triton.Config), or None for a fixed launch
    tuner: Any = None           # the Autotuner (for its early prune)
    cases: list = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.kernel.fn.__name__


def _spec(value) -> Any:
    """How the binder sees one argument (what a launch specialises on)."""
    import torch
    if isinstance(value, torch.Tensor):
        return ("tensor", str(value.dtype), value.data_ptr() % 16 == 0)
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, int):
        return ("int", value == 1, value % 16 == 0, -2**31 <= value < 2**31)
    if isinstance(value, float):
        return "float"
    return repr(value)


def _config_key(c) -> str:
    return json.dumps({**c.kwargs, "num_warps": c.num_warps, "num_stages": c.num_stages},
                      sort_keys=True)


def _launch_key(launch: Launch) -> str:
    meta = {k: (v if isinstance(v, (int, float, str, bool, type(None))) else repr(v))
            for k, v in sorted(launch.kwargs.items())}
    return json.dumps([launch.name, [_spec(a) for a in launch.args], meta,
                       None if launch.configs is None else [_config_key(c) for c in launch.configs]],
                      sort_keys=True, default=str)


@contextlib.contextmanager
def capturing(sink: list):
    """Every kernel launch inside is recorded into sink (a list of Launch) instead of run."""
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction
    orig_run, orig_tune = JITFunction.run, Autotuner.run

    def run(self, *args, grid, warmup, **kwargs):
        if warmup:
            return orig_run(self, *args, grid=grid, warmup=warmup, **kwargs)
        sink.append(Launch(self, args, dict(kwargs), grid, None))

    def tune(self, *args, **kwargs):
        grid = kwargs.pop("grid", None)
        kwargs.pop("warmup", None)
        fn = self.fn
        while not hasattr(fn, "arg_names") and hasattr(fn, "fn"):
            fn = fn.fn
        sink.append(Launch(fn, args, dict(kwargs), grid, list(self.configs), tuner=self))

    JITFunction.run, Autotuner.run = run, tune
    try:
        yield
    finally:
        JITFunction.run, Autotuner.run = orig_run, orig_tune


@contextlib.contextmanager
def glue_on_gpu():
    """Make the glue take its GPU paths on CPU tensors: the triton backend accepted for CPU
    tensors, attention's device test, the SM count, no persistent autotune cache."""
    import torch
    from dlh_kernels import _backend, _ext
    from dlh_kernels.triton_kernels import attention, gelu, group_norm, layer_norm
    saved = []

    def patch(obj, name, value):
        saved.append((obj, name, getattr(obj, name)))
        setattr(obj, name, value)

    _backend._REASONS[("triton", "cpu")] = None
    patch(attention, "_on_gpu", lambda t: True)
    patch(_ext, "sm_count", lambda index: 132)
    patch(torch.cuda, "current_device", lambda: 0)
    for module in (gelu, group_norm, layer_norm):
        patch(module, "_programs_wanted", lambda device: 4 * 132)
    old_cache = os.environ.get("DLH_CACHE_DIR")
    os.environ["DLH_CACHE_DIR"] = "off"
    try:
        yield
    finally:
        for obj, name, value in reversed(saved):
            setattr(obj, name, value)
        _backend._REASONS.pop(("triton", "cpu"), None)
        if old_cache is None:
            os.environ.pop("DLH_CACHE_DIR", None)
        else:
            os.environ["DLH_CACHE_DIR"] = old_cache


# ---------------------------------------------------------------------------------------------
# The classes of call, per op family: each case is (label, callable running forward + backward).

def _dtypes(names):
    import torch
    table = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    return [(n, table[n]) for n in names]


def _backward(*outs):
    import torch
    outs = [o for o in outs if o is not None and o.requires_grad]
    torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])


def attention_cases(sweep: str):
    import torch
    import dlh_kernels.functional as DF
    from dlh_kernels.triton_kernels import attention as A

    def case(dtype, hd, mask, dropout, causal, length, layout="bhld", gqa=False, dq_mode="separate",
             hdv=None):
        def run():
            B, H, L = 2, 4, length
            Hkv = 2 if gqa else H
            hv = hdv or hd

            def make(h, d):
                if layout == "bshd":  # (B, S, H, D) storage, seen as (B, H, S, D)
                    return torch.randn(B, L, h, d, dtype=dtype).transpose(1, 2).requires_grad_()
                return torch.randn(B, h, L, d, dtype=dtype, requires_grad=True)
            q, k, v = make(H, hd), make(Hkv, hd), make(Hkv, hv)
            m = None
            if mask == "bool":
                m = torch.ones(L, L, dtype=torch.bool)
            elif mask == "additive":
                m = torch.zeros(1, H, L, L, dtype=dtype, requires_grad=True)
            old = A.DQ_MODE
            A.DQ_MODE = dq_mode
            try:
                out = DF.scaled_dot_product_attention(q, k, v, attn_mask=m, dropout_p=dropout,
                                                      is_causal=causal, enable_gqa=gqa,
                                                      backend="triton")
                _backward(out)
            finally:
                A.DQ_MODE = old
        label = (f"sdpa {str(dtype)[6:]} hd{hd}{'/' + str(hdv) if hdv else ''} L{length} mask={mask} "
                 f"p={dropout} causal={causal} {layout}{' gqa' if gqa else ''} dq={dq_mode}")
        return label, run

    cases = []
    if sweep == "ci":
        # the largest config of each list per dtype: hd128 autotuned, with the mask/dropout extras
        for dt, dtype in _dtypes(["bf16", "fp32"]):
            cases.append(case(dtype, 128, "additive", 0.1, False, 256))
        # and the fixed path's tightest: head dim 256, fp32, additive mask + dropout
        cases.append(case(_dtypes(["fp32"])[0][1], 256, "additive", 0.1, False, 64))
        return cases
    if sweep == "full":
        for dt, dtype in _dtypes(["fp32", "fp16", "bf16"]):
            for hd in (32, 64, 96, 128, 256):
                for mask, p in ((None, 0.0), ("bool", 0.1), ("additive", 0.0), ("additive", 0.1)):
                    for length in (64, 256):  # the fixed small config, the autotune lists
                        cases.append(case(dtype, hd, mask, p, False, length))
    else:
        # the report (sized for a 2-core CPU): the fixed path at head dims 64/128/256 with the
        # worst extras (additive mask + dropout: the most shared memory and registers), the
        # autotune lists where their footprint is tight (hd 128 fp32 and bf16, hd 256 bf16, all
        # with the additive mask + dropout), atomic dQ, and the layouts of the glue (BSHD views,
        # GQA, Dv != D); fp16 has bf16's sizes
        bf16, fp16, fp32 = (d for _, d in _dtypes(["bf16", "fp16", "fp32"]))
        for dtype in (fp32, bf16):
            for hd in (64, 128, 256):
                cases.append(case(dtype, hd, "additive", 0.1, False, 64))
            cases.append(case(dtype, 128, "additive", 0.1, False, 256))
        cases += [case(bf16, 128, None, 0.0, False, 64), case(fp16, 128, None, 0.0, False, 64),
                  case(bf16, 256, "additive", 0.1, False, 256),
                  case(bf16, 128, "additive", 0.1, False, 256, dq_mode="atomic"),
                  case(bf16, 128, "bool", 0.0, False, 64, layout="bshd", gqa=True),
                  case(bf16, 128, None, 0.0, True, 64, hdv=64)]
        return cases
    for dt, dtype in _dtypes(["bf16", "fp32"]):
        cases += [case(dtype, 64, None, 0.0, True, 256), case(dtype, 128, None, 0.0, True, 64),
                  case(dtype, 64, None, 0.0, False, 256, layout="bshd"),
                  case(dtype, 128, "bool", 0.0, False, 64, layout="bshd", gqa=True),
                  case(dtype, 128, None, 0.0, False, 256, gqa=True, dq_mode="atomic"),
                  case(dtype, 64, "additive", 0.1, False, 64, dq_mode="atomic"),
                  case(dtype, 128, None, 0.0, False, 64, hdv=64)]
    return cases


def conv2d_cases(sweep: str):
    import torch
    import dlh_kernels.functional as DF

    def case(dtype, cin, cout, k, groups, layout, act, bias, stride=1, hw=16, batch=2):
        def run():
            x = torch.randn(batch, cin, hw, hw, dtype=dtype)
            w = torch.randn(cout, cin // groups, k, k, dtype=dtype)
            if layout == "nhwc":
                x = x.to(memory_format=torch.channels_last)
                w = w.to(memory_format=torch.channels_last)
            x.requires_grad_()
            w.requires_grad_()
            b = torch.randn(cout, dtype=dtype, requires_grad=True) if bias else None
            y = DF.conv2d(x, w, b, stride=stride, padding=k // 2, groups=groups, activation=act,
                          backend="triton")
            _backward(y)
        return (f"conv2d {dtype} {cin}->{cout} k{k} g{groups} {layout} act={act} bias={bias} "
                f"stride={stride}"), run

    cases = []
    if sweep == "ci":
        for _, dtype in _dtypes(["bf16", "fp32"]):
            cases.append(case(dtype, 128, 128, 3, 1, "nhwc", "silu", True))
        return cases
    for dt, dtype in _dtypes(["fp32", "fp16", "bf16"] if sweep == "full" else ["fp32", "bf16"]):
        for layout in ("nchw", "nhwc"):
            if sweep == "full" or layout == "nhwc" or dt == "bf16":
                cases.append(case(dtype, 128, 128, 3, 1, layout, "silu", True))   # K/C 128: every tile
        if sweep == "full":
            cases.append(case(dtype, 64, 256, 1, 1, "nhwc", None, False))
            cases.append(case(dtype, 32, 32, 3, 32, "nhwc", "relu", True))     # depthwise
            cases.append(case(dtype, 64, 64, 3, 4, "nchw", "gelu", False, stride=2))
            cases.append(case(dtype, 3, 64, 7, 1, "nchw", "gelu_tanh", True, stride=2))  # a stem
            cases.append(case(dtype, 32, 16, 3, 1, "nhwc", "leaky_relu", True))
    return cases


def gelu_cases(sweep: str):
    import torch
    import dlh_kernels.functional as DF

    def linear(dtype, approx, bias, tf32, shape=(256, 512, 256)):
        def run():
            M, N, K = shape
            old = torch.backends.cuda.matmul.allow_tf32
            torch.backends.cuda.matmul.allow_tf32 = tf32
            try:
                x = torch.randn(M, K, dtype=dtype, requires_grad=True)
                w = torch.randn(N, K, dtype=dtype, requires_grad=True)
                b = torch.randn(N, dtype=dtype, requires_grad=True) if bias else None
                _backward(DF.linear_gelu(x, w, b, approximate=approx, backend="triton"))
            finally:
                torch.backends.cuda.matmul.allow_tf32 = old
        return f"linear_gelu {dtype} {approx} bias={bias} tf32={tf32}", run

    def elementwise(dtype, approx, what, rows=64):
        def run():
            x = torch.randn(rows, 1024, dtype=dtype, requires_grad=True)
            if what == "geglu":
                y = DF.geglu(x, approximate=approx, backend="triton")
            elif what == "bias":
                b = torch.randn(1024, dtype=dtype, requires_grad=True)
                y = DF.gelu(x, approximate=approx, bias=b, backend="triton")
            elif what == "strided":
                y = DF.gelu(x[:, :1000], approximate=approx, backend="triton")
            else:
                y = DF.gelu(x, approximate=approx, backend="triton")
            _backward(y)
        return f"gelu {dtype} {approx} {what}" + (f" M={rows}" if rows != 64 else ""), run

    cases = []
    if sweep == "ci":
        for _, dtype in _dtypes(["bf16"]):
            cases.append(linear(dtype, "none", True, False))
        return cases
    for dt, dtype in _dtypes(["fp32", "fp16", "bf16"]):
        for approx, bias in (("none", True), ("tanh", False)):
            if sweep == "full" or (dt == "bf16" and approx == "none"):
                cases.append(linear(dtype, approx, bias, False))
        for what in ("plain", "bias", "geglu", "strided"):
            if sweep == "full" or dtype == torch.bfloat16:
                cases.append(elementwise(dtype, "none" if what != "geglu" else "tanh", what))
    # the bias gradient's row loop over several tiles (its prefetching path)
    cases.append(elementwise(torch.bfloat16, "none", "bias", rows=4096))
    if sweep == "full":
        cases.append(linear(torch.float32, "none", True, True))
    return cases


def norm_cases(sweep: str):
    import torch
    import dlh_kernels.functional as DF
    from dlh_kernels.triton_kernels import group_norm, layer_norm

    def ln(dtype, kind, n, affine, rows=64):
        def run():
            x = torch.randn(rows, n, dtype=dtype, requires_grad=True)
            w = torch.randn(n, dtype=dtype, requires_grad=True) if affine else None
            b = torch.randn(n, dtype=dtype, requires_grad=True) if affine else None
            if kind == "layer_norm":
                outs = [DF.layer_norm(x, (n,), w, b, backend="triton")]
            elif kind == "rms_norm":
                outs = [DF.rms_norm(x, (n,), w, backend="triton")]
            else:
                r = torch.randn(rows, n, dtype=dtype, requires_grad=True)
                fn = DF.add_layer_norm if kind == "add_layer_norm" else DF.add_rms_norm
                extra = (w, b) if kind == "add_layer_norm" else (w,)
                outs = list(fn(x, r, (n,), *extra, backend="triton"))
            _backward(*outs)
        return f"{kind} {dtype} N={n} affine={affine}" + (f" M={rows}" if rows != 64 else ""), run

    def gn(dtype, c, hw, groups, layout, affine, act, w_dtype=None):
        def run():
            x = torch.randn(2, c, hw, hw, dtype=dtype)
            if layout == "nhwc":
                x = x.to(memory_format=torch.channels_last)
            x.requires_grad_()
            wd = w_dtype or dtype
            w = torch.randn(c, dtype=wd, requires_grad=True) if affine else None
            b = torch.randn(c, dtype=wd, requires_grad=True) if affine else None
            _backward(DF.group_norm(x, groups, w, b, activation=act, backend="triton"))
        return f"group_norm {dtype} C={c} HW={hw}^2 G={groups} {layout} affine={affine} act={act}", run

    cases = []
    if sweep == "ci":
        return cases
    # fused (N <= the fused limit) and split (wider) paths of every layer norm flavour
    wide = 2 * layer_norm.MAX_FUSED_N
    for _, dtype in _dtypes(["fp32", "fp16", "bf16"] if sweep == "full" else ["bf16"]):
        for kind in ("layer_norm", "rms_norm", "add_layer_norm", "add_rms_norm"):
            cases.append(ln(dtype, kind, 1024, True))
            cases.append(ln(dtype, kind, wide, kind != "rms_norm"))
        cases.append(ln(dtype, "layer_norm", 4096, False))
        cases.append(gn(dtype, 64, 16, 32, "nchw", True, "silu"))        # fused
        cases.append(gn(dtype, 512, 64, 32, "nchw", True, None))         # split (big groups)
        cases.append(gn(dtype, 64, 16, 8, "nhwc", False, "silu"))
    cases.append(gn(_dtypes(["fp16"])[0][1], 128, 32, 32, "nchw", True, "silu", w_dtype=torch.float32))
    # the single-pass wide rows (16-bit to 32K, fp32 to 16K) and the backward's prefetching row
    # loop (16-bit fused rows of 4K-8K, enough rows for the loop to run several tiles)
    cases.append(ln(torch.bfloat16, "layer_norm", 32768, True))
    cases.append(ln(torch.float32, "layer_norm", 16384, True))
    cases.append(ln(torch.bfloat16, "layer_norm", 8192, True, rows=2048))
    # the SD U-Net's GroupNorm(32, 320) + SiLU at 64x64, batch 2 (Cg = 10): the split over 640
    # (NCHW) and 512 (channels_last) programs; NHWC's 16-wide tiles of 10 channels load scalars
    for layout in ("nchw", "nhwc"):
        cases.append(gn(torch.bfloat16, 320, 64, 32, layout, True, "silu"))
    del group_norm
    return cases


def diffusion_cases(sweep: str):
    import torch
    import dlh_kernels.functional as DF

    def case(dtype, method, pred, noise, tensors, guidance, contiguous=True):
        def run():
            x = torch.randn(2, 4, 16, 16, dtype=dtype)
            if not contiguous:
                x = x.to(memory_format=torch.channels_last)
            mo = torch.randn_like(x)
            ac = torch.linspace(0.999, 0.01, 1000, dtype=torch.float32)
            t = torch.tensor([500, 400]) if tensors else 500
            kw = dict(method=method, prediction_type=pred, backend="triton")
            if guidance:
                kw.update(guidance_scale=7.5, uncond_output=torch.randn_like(x))
            if noise == "given":
                kw["noise"] = torch.randn_like(x)
            elif noise == "seed":
                kw["seed"] = torch.tensor(7) if tensors else 7
            if method == "ddim":
                kw["eta"] = 0.5 if noise != "none" else 0.0
            DF.diffusion_step(x, mo, t, 480 if not tensors else torch.tensor([480, 380]), ac, **kw)
        return f"diffusion {dtype} {method} {pred} noise={noise} tensors={tensors} cfg={guidance}", run

    if sweep == "ci":
        return []
    cases = []
    for _, dtype in _dtypes(["fp32", "fp16", "bf16"] if sweep == "full" else ["bf16"]):
        cases += [case(dtype, "ddpm", "epsilon", "given", False, False),
                  case(dtype, "ddim", "v_prediction", "seed", True, True, contiguous=False),
                  case(dtype, "ddim", "sample", "none", False, True)]
    return cases


def linear_cases(sweep: str):
    """DF.linear: forward and the GRAD epilogue (an activation's backward), both weight layouts
    (nn.Linear's (out, in) and GPT-2 Conv1D's (in, out) buffer handed in as .t())."""
    import torch
    import dlh_kernels.functional as DF

    def case(dtype, act, w_layout, bias, tf32=False, shape=(256, 512, 256)):
        def run():
            M, N, K = shape
            old = torch.backends.cuda.matmul.allow_tf32
            torch.backends.cuda.matmul.allow_tf32 = tf32
            try:
                x = torch.randn(M, K, dtype=dtype, requires_grad=True)
                if w_layout == "conv1d":
                    w = torch.randn(K, N, dtype=dtype, requires_grad=True).t()
                else:
                    w = torch.randn(N, K, dtype=dtype, requires_grad=True)
                b = torch.randn(N, dtype=dtype, requires_grad=True) if bias else None
                _backward(DF.linear(x, w, b, activation=act, backend="triton"))
            finally:
                torch.backends.cuda.matmul.allow_tf32 = old
        return f"linear {dtype} act={act} weight={w_layout} bias={bias} tf32={tf32}", run

    cases = []
    for _, dtype in _dtypes(["bf16"] if sweep == "ci" else ["fp32", "fp16", "bf16"]):
        if sweep == "full" or dtype == torch.bfloat16:
            cases.append(case(dtype, "gelu_tanh", "conv1d", True))
        if sweep == "full" or (sweep != "ci" and dtype == torch.bfloat16):
            cases.append(case(dtype, "relu", "linear", False))
    if sweep == "full":
        cases.append(case(torch.float32, "silu", "linear", True, tf32=True))
    return cases


def activation_cases(sweep: str):
    """DF.silu/relu/leaky_relu (the unary kernels) and DF.swiglu/gated_gelu (the gated kernels),
    forward and backward: dense tensors (one flat row of 4K-element tiles), a strided row view
    (2-D tiles), the gated halves of one fused (M, 2N) projection (up=None) and separate gate/up."""
    import torch
    import dlh_kernels.functional as DF

    def unary(dtype, op, layout="dense"):
        def run():
            x = torch.randn(64, 1024, dtype=dtype, requires_grad=True)
            v = x[:, :1000] if layout == "strided" else x
            if op == "leaky_relu":
                y = DF.leaky_relu(v, 0.2, backend="triton")
            else:
                y = getattr(DF, op)(v, backend="triton")
            _backward(y)
        return f"{op} {dtype} {layout}", run

    def gated(dtype, op, fused, approx="none"):
        def run():
            if fused:  # the two halves of one (M, 2N) matmul output
                g, u = torch.randn(64, 2048, dtype=dtype, requires_grad=True), None
            else:
                g = torch.randn(64, 1024, dtype=dtype, requires_grad=True)
                u = torch.randn(64, 1024, dtype=dtype, requires_grad=True)
            if op == "swiglu":
                y = DF.swiglu(g, u, backend="triton")
            else:
                y = DF.gated_gelu(g, u, approximate=approx, backend="triton")
            _backward(y)
        return f"{op} {dtype} {'fused halves' if fused else 'gate, up'} approximate={approx}", run

    if sweep == "ci":
        return []
    cases = []
    for dt, dtype in _dtypes(["fp32", "fp16", "bf16"] if sweep == "full" else ["fp32", "bf16"]):
        for op in ("silu", "relu", "leaky_relu"):
            cases.append(unary(dtype, op))
            if sweep == "full" or (dt == "bf16" and op == "silu"):
                cases.append(unary(dtype, op, "strided"))
        cases.append(gated(dtype, "swiglu", True))
        cases.append(gated(dtype, "gated_gelu", False, "tanh"))
        if sweep == "full" or dt == "bf16":
            cases.append(gated(dtype, "swiglu", False))
            cases.append(gated(dtype, "gated_gelu", True, "none"))
    return cases


def rotary_cases(sweep: str):
    """DF.rotary_embedding, forward and backward (the same kernel, BACKWARD): rotate-half and
    interleaved (GPT-J) pairs, full and partial rotary (GPT-NeoX/Phi: a pass-through tail), q + k
    of another head count (GQA), q alone, the (B, H, S, D) and (B, S, H, D) layouts."""
    import torch
    import dlh_kernels.functional as DF

    def case(dtype, hd, rotary_dim, interleaved, with_k=True, unsqueeze_dim=1, heads=(8, 2)):
        def run():
            B, S = 2, 64
            hq, hk = heads
            shape = (lambda h: (B, h, S, hd)) if unsqueeze_dim == 1 else (lambda h: (B, S, h, hd))
            q = torch.randn(*shape(hq), dtype=dtype, requires_grad=True)
            k = torch.randn(*shape(hk), dtype=dtype, requires_grad=True) if with_k else None
            cos = torch.randn(1, S, rotary_dim, dtype=dtype)
            sin = torch.randn(1, S, rotary_dim, dtype=dtype)
            qo, ko = DF.rotary_embedding(q, k, cos, sin, interleaved=interleaved,
                                         unsqueeze_dim=unsqueeze_dim, backend="triton")
            _backward(qo, ko)
        return (f"rotary {dtype} hd{hd} R{rotary_dim} interleaved={interleaved} k={with_k} "
                f"heads={heads} unsqueeze_dim={unsqueeze_dim}"), run

    if sweep == "ci":
        return []
    cases = []
    for dt, dtype in _dtypes(["fp32", "fp16", "bf16"] if sweep == "full" else ["fp32", "bf16"]):
        cases.append(case(dtype, 128, 128, False))                     # LLaMA: rotate-half, GQA
        if sweep == "full" or dt == "bf16":
            cases.append(case(dtype, 64, 64, True, heads=(16, 16)))    # GPT-J pairs
            cases.append(case(dtype, 80, 32, False, unsqueeze_dim=2))  # partial (Phi/NeoX), BSHD
            cases.append(case(dtype, 256, 64, True, with_k=False))     # GPT-J partial, q alone
        if sweep == "full":
            cases.append(case(dtype, 64, 64, False, heads=(32, 8)))
    return cases


FAMILIES = {"attention": attention_cases, "conv2d": conv2d_cases, "gelu": gelu_cases,
            "linear": linear_cases, "activation": activation_cases, "rotary": rotary_cases,
            "norms": norm_cases, "diffusion_step": diffusion_cases}


def capture(sweep: str, families=None) -> tuple[list, list]:
    """(launches deduplicated by what the binder sees, [(case label, error)] for cases that failed)."""
    import torch
    torch.manual_seed(0)
    unique: dict[str, Launch] = {}
    failures = []
    with glue_on_gpu():
        for family in families or FAMILIES:
            for label, run in FAMILIES[family](sweep):
                sink: list = []
                try:
                    with capturing(sink):
                        run()
                except Exception as exc:  # a case the glue refuses is a finding, not a crash
                    failures.append((label, f"{type(exc).__name__}: {exc}"[:300]))
                for launch in sink:
                    launch.cases.append(label)
                    key = _launch_key(launch)
                    if key in unique:
                        unique[key].cases.append(label)
                    else:
                        unique[key] = launch
    return list(unique.values()), failures


# ---------------------------------------------------------------------------------------------
# Compile and measure.

def _tool(name: str) -> str:
    import triton
    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)


def measure(compiled) -> dict:
    ptx = compiled.asm.get("ptx", "")
    cubin = compiled.asm.get("cubin")
    row = {"shared": int(compiled.metadata.shared)}
    row["cp_async"] = len(re.findall(r"cp\.async\.c[ag]\.", ptx))
    row["async_waits"] = len(re.findall(r"cp\.async\.wait_group", ptx))
    row["tma"] = len(re.findall(r"cp\.async\.bulk\.tensor", ptx))
    row["wgmma"] = len(re.findall(r"wgmma\.mma_async", ptx))
    row["mma"] = len(re.findall(r"\bmma\.sync", ptx))
    row["dot"] = row["wgmma"] + row["mma"] > 0
    row["pipelined"] = (row["cp_async"] > 0 and row["async_waits"] > 0) or row["tma"] > 0
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        res = subprocess.run([_tool("cuobjdump"), "-res-usage", f.name], capture_output=True,
                             text=True).stdout
        m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", res)
        row["regs"], row["stack"], row["static_shared"], row["local"] = (
            (int(g) for g in m.groups()) if m else (-1, -1, -1, -1))
        row["spill_stores"] = row["spill_loads"] = 0
        if row["stack"] or row["local"]:
            sass = subprocess.run([_tool("cuobjdump"), "-sass", f.name], capture_output=True,
                                  text=True).stdout
            row["spill_stores"] = len(re.findall(r"\bSTL(\.\w+)*\s", sass))
            row["spill_loads"] = len(re.findall(r"\bLDL(\.\w+)*\s", sass))
    return row


def _meta_of(launch: Launch) -> dict:
    """The constexprs and options a row reports (JSON-able)."""
    out = {}
    for k, v in launch.kwargs.items():
        if isinstance(v, (bool, int, float, str)) or v is None:
            out[k] = v
    return out


def _dtype_of(launch: Launch) -> str:
    import torch
    for a in launch.args:
        if isinstance(a, torch.Tensor) and a.is_floating_point() and a.dtype != torch.float32:
            return {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(a.dtype, str(a.dtype))
    return "fp32"


def _variants(launch: Launch, arch: int):
    """(config dict, source, kept) per variant this launch can compile on this target."""
    if launch.configs is None:
        meta = _meta_of(launch)
        cfg = {k: meta[k] for k in meta if k.startswith("BLOCK") or k in ("GROUP_M", "num_warps", "num_stages")}
        cfg.setdefault("num_warps", 4)
        cfg.setdefault("num_stages", 3)
        yield {}, cfg, "fixed", True
        return
    tuner = launch.tuner
    nargs = dict(zip(tuner.arg_names, launch.args))
    with target(arch):
        prune = getattr(tuner, "early_config_prune", None)
        kept = prune(launch.configs, nargs, **launch.kwargs) if prune else launch.configs
    kept_keys = {_config_key(c) for c in kept}
    for c in launch.configs:
        extra = c.all_kwargs()
        cfg = {**c.kwargs, "num_warps": c.num_warps, "num_stages": c.num_stages}
        yield extra, cfg, "autotune", _config_key(c) in kept_keys


class _Elem:
    """A tensor argument as the footprint estimate sees it: its element size."""

    def __init__(self, size: int):
        self.size = size

    def element_size(self) -> int:
        return self.size


def arg_elems(launch: Launch) -> dict:
    import torch
    return {name: a.element_size() for name, a in zip(launch.kernel.arg_names, launch.args)
            if isinstance(a, torch.Tensor)}


def row_estimate(row: dict) -> Optional[int]:
    """Today's footprint estimate (triton_kernels/common.py) of a report row."""
    from dlh_kernels.triton_kernels import common
    nargs = {name: _Elem(size) for name, size in row.get("arg_elems", {}).items()}
    return common.shared_memory_estimate(row["kernel"], nargs, {**row["meta"], **row["config"]},
                                         capability=row["arch"])


def _largest_kept(launch: Launch, arch: int) -> list:
    """The CI subset of a launch's variants: its fixed config, or the kept autotune config with
    the largest estimated footprint (the one closest to the limit)."""
    variants = list(_variants(launch, arch))
    if launch.configs is None:
        return variants
    kept = [v for v in variants if v[3]]
    probe = {"kernel": launch.name, "arg_elems": arg_elems(launch), "meta": _meta_of(launch), "arch": arch}
    return [max(kept, key=lambda v: (row_estimate({**probe, "config": v[1]}) or 0,
                                     v[1].get("num_stages", 0)))]


def compile_all(launches: list, arch: int, log=print, largest_only: bool = False) -> list:
    rows = []
    seen: dict[int, dict] = {}
    for launch in launches:
        variants = _largest_kept(launch, arch) if largest_only else _variants(launch, arch)
        for extra, cfg, source, kept in variants:
            t0 = time.perf_counter()
            row = {"kernel": launch.name, "arch": arch, "dtype": _dtype_of(launch), "source": source,
                   "kept": kept, "config": cfg, "meta": {k: v for k, v in _meta_of(launch).items()
                                                         if k not in cfg},
                   "cases": len(launch.cases), "case": launch.cases[0], "arg_elems": arg_elems(launch)}
            try:
                with target(arch):
                    compiled = launch.kernel.warmup(*launch.args, grid=(1,), **{**launch.kwargs, **extra})
                if hasattr(compiled, "result"):
                    compiled = compiled.result()
                if id(compiled) in seen:  # the same binary as another launch's (same key)
                    first = seen[id(compiled)]
                    first["kept"] = first["kept"] or kept  # runnable if any launch can pick it
                    if source == "fixed":
                        first["source"] = "fixed"
                    continue
                row.update(measure(compiled))
                seen[id(compiled)] = row
            except Exception as exc:
                row["error"] = f"{type(exc).__name__}: {str(exc)[:400]}"
            row["estimate"] = row_estimate(row)
            row["fits"] = "error" not in row and row["shared"] <= TARGETS[arch]
            row["compile_s"] = round(time.perf_counter() - t0, 2)
            rows.append(row)
            log(f"sm_{arch} {row['kernel']} {row['dtype']} {cfg} {source}{'' if kept else ' (pruned)'}: "
                + (row.get("error") or f"{row['shared']} B shared, {row['regs']} regs, "
                   f"stack {row['stack']}, cp.async {row['cp_async']}, wgmma {row['wgmma']}")
                + f" [{row['compile_s']} s]")
    return rows


# ---------------------------------------------------------------------------------------------
# The staleness hash and the report.

def launch_hash(launches: list, archs=tuple(TARGETS)) -> str:
    """What the glue launches, as the binder and the prunes see it, hashed (see the docstring)."""
    parts = []
    for launch in sorted(launches, key=_launch_key):
        parts.append(_launch_key(launch))
        parts.append(str(getattr(launch.kernel, "cache_key", "")))
        if launch.configs is not None:
            for arch in archs:
                parts.append(json.dumps([c for c, _, _, kept in
                                         ((cfg, s, e, k) for e, cfg, s, k in _variants(launch, arch))
                                         if kept], sort_keys=True))
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:20]


def _git_sha() -> str:
    try:
        return subprocess.run(["git", "-C", str(REPO), "log", "-1", "--format=%h", "--", "triton_kernels"],
                              capture_output=True, text=True).stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def _cfg_str(cfg: dict) -> str:
    blocks = "x".join(str(cfg[k]) for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "BLOCK_C", "BLOCK_S", "BLOCK")
                      if k in cfg)
    return f"{blocks} w{cfg.get('num_warps')} s{cfg.get('num_stages')}"


def _meta_str(meta: dict) -> str:
    skip = {"debug", "INPUT_PRECISION", "DOT_FP32"}
    return " ".join(f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in meta.items()
                    if k not in skip and v not in (None, False, 0) and not k.startswith("BLOCK_D"))


def write_report(out: Path, rows: list, header: dict) -> tuple[Path, Path]:
    import triton
    version = ".".join(triton.__version__.split(".")[:2])
    out.mkdir(parents=True, exist_ok=True)
    jpath, mpath = out / f"triton_resources_{version}.json", out / f"triton_resources_{version}.md"
    with open(jpath, "w") as f:
        json.dump({**header, "rows": rows}, f, indent=0, sort_keys=True)
        f.write("\n")
    lines = [f"# Launch-exact Triton compiles: Triton {triton.__version__}", "",
             f"Generated {header['date']} by `{header['command']}` from triton_kernels/ at "
             f"{header['git_sha']} (launch hash `{header['launch_hash']}`).",
             "Targets: " + ", ".join(f"sm_{a} ({s:,} B shared per block)" for a, s in TARGETS.items()) + ".",
             "Each row is one binary as a launch compiles it (the glue's own arguments through Triton's "
             "binder); `fixed`: a config the glue picks itself; `tuned`: a config of the autotune list "
             "that its early prune keeps on this target, `pruned`: one it drops before compiling. "
             "regs/stack/spills from cuobjdump (spills = STL/LDL instructions); cp.async/wgmma counted "
             "in the PTX; `pipe` = the loop's loads are cp.async copies waited on. "
             "`est`: our footprint estimate (triton_kernels/common.py).", ""]
    for label, items in header.get("notes", {}).items():
        lines.append(f"**{label}**")
        lines += [f"- {x}" for x in items]
        lines.append("")
    if header.get("failures"):
        lines.append("**Cases the glue refused** (not compiled):")
        lines += [f"- {label}: {err}" for label, err in header["failures"]]
        lines.append("")
    for arch in TARGETS:
        lines += [f"## sm_{arch}", "",
                  "| kernel | dtype | config | meta | kind | shared B | est B | regs | stack | spills st/ld "
                  "| cp.async | wgmma | mma | pipe | fits | case |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in sorted((r for r in rows if r["arch"] == arch),
                        key=lambda r: (r["kernel"], r["dtype"], _meta_str(r["meta"]), -r.get("shared", 0))):
            kind = "fixed" if r["source"] == "fixed" else ("tuned" if r["kept"] else "pruned")
            if "error" in r:
                lines.append(f"| {r['kernel']} | {r['dtype']} | {_cfg_str(r['config'])} | {_meta_str(r['meta'])} "
                             f"| {kind} | error: {r['error'][:120]} | | | | | | | | | | {r['case']} |")
                continue
            lines.append(
                f"| {r['kernel']} | {r['dtype']} | {_cfg_str(r['config'])} | {_meta_str(r['meta'])} | {kind} "
                f"| {r['shared']:,} | {'' if r.get('estimate') is None else format(r['estimate'], ',')} "
                f"| {r['regs']} | {r['stack']} | {r['spill_stores']}/{r['spill_loads']} | {r['cp_async']} "
                f"| {r['wgmma']} | {r['mma']} | {'yes' if r['pipelined'] else ('no' if r['dot'] else '-')} "
                f"| {'yes' if r['fits'] else '**NO**'} | {r['case']} |")
        lines.append("")
    mpath.write_text("\n".join(lines))
    return jpath, mpath


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    p.add_argument("--sweep", choices=("report", "full", "ci"), default="report",
                   help="report: the committed report's classes of call (default); full: every "
                        "dtype x head dim x mask x length (hours); ci: the live CI subset")
    p.add_argument("--arch", type=int, action="append", choices=sorted(TARGETS),
                   help="target (repeatable; default: 90 and 80)")
    p.add_argument("--family", action="append", choices=sorted(FAMILIES), help="op families (default all)")
    p.add_argument("--hash-only", action="store_true", help="print the launch hash and exit (no compiles)")
    p.add_argument("--no-write", action="store_true", help="print the rows as JSON instead of writing the report")
    p.add_argument("--render", action="store_true",
                   help="rewrite the markdown (and the estimates) from the JSON under --out; no compiles")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    if args.render:
        import triton
        version = ".".join(triton.__version__.split(".")[:2])
        with open(args.out / f"triton_resources_{version}.json") as f:
            data = json.load(f)
        rows = data.pop("rows")
        for row in rows:
            row["estimate"] = row_estimate(row)
        data["notes"] = NOTES
        for path in write_report(args.out, rows, data):
            print(f"wrote {path}")
        return 0
    if os.environ.get("TRITON_INTERPRET") == "1":  # compiling needs the real JIT: rerun without it
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        return subprocess.run([sys.executable, "-m", "dlh_kernels.bench.triton_resources",
                               *(argv if argv is not None else sys.argv[1:])], env=env).returncode
    import triton
    archs = args.arch or list(TARGETS)
    t0 = time.perf_counter()
    launches, failures = capture(args.sweep, args.family)
    digest = launch_hash(launches)
    if args.hash_only:
        print(json.dumps({"launch_hash": digest, "launches": len(launches), "failures": failures,
                          "triton": triton.__version__}))
        return 0
    log = (lambda *a: None) if args.quiet else (lambda *a: print(*a, flush=True))
    log(f"{len(launches)} distinct launches captured in {time.perf_counter() - t0:.1f} s")
    rows = []
    for arch in archs:
        rows += compile_all(launches, arch, log, largest_only=args.sweep == "ci")
    header = {"triton": triton.__version__, "date": datetime.datetime.now(datetime.timezone.utc)
              .strftime("%Y-%m-%d %H:%M UTC"), "git_sha": _git_sha(), "launch_hash": digest,
              "targets": {str(a): TARGETS[a] for a in archs}, "sweep": args.sweep,
              "command": "python -m dlh_kernels.bench.triton_resources --out bench/results/",
              "failures": failures, "seconds": round(time.perf_counter() - t0, 1)}
    if args.no_write:
        print("ROWS " + json.dumps({**header, "rows": rows}))
        return 0
    header["notes"] = NOTES
    for path in write_report(args.out, rows, header):
        log(f"wrote {path}")
    return 0


# What the report says about the findings it shows (kept here so a regenerated report keeps them).
NOTES: dict = {
    "Coverage": [
        "`--sweep report` (this file): attention fixed path at head dims 64/128/256 (fp32, bf16; "
        "fp16 at 128) with the additive mask + dropout (the largest footprint), the autotune lists "
        "at hd 128 (fp32, bf16) and 256 (bf16) with the same extras, atomic dQ, a BSHD + GQA + bool "
        "mask call and a causal Dv != D call; conv2d NHWC (fp32, bf16) and NCHW (bf16) with bias + "
        "SiLU, forward, GRAD epilogue and both backward kernels; linear_gelu bf16 (forward and GRAD); the "
        "elementwise GELU/GeGLU (and the bias gradient's row loop at 4096 rows), the four norm "
        "flavours fused and split (single-pass wide rows: bf16 32K, fp32 16K; the backward's "
        "prefetching loop at 2048 x 8192), GroupNorm fused and split (and the SD U-Net's 320 "
        "channels in 32 groups at 64x64, NCHW and channels_last), "
        "the diffusion step (bf16); linear (bf16: GELU-tanh with a Conv1D weight, ReLU), the unary "
        "activations (SiLU/ReLU/LeakyReLU, fp32 and bf16, dense and a strided view) and the gated "
        "ones (SwiGLU, gated GELU: fused halves and separate gate/up), forward and backward; rotary "
        "embedding forward and backward (fp32, bf16: rotate-half with GQA, interleaved, partial "
        "rotary in BSHD, q alone). `--sweep full` compiles every dtype x head dim 32-256 x mask x "
        "dropout x length and every conv layout (~1,900 variants per target, hours on 2 cores).",
    ],
    "Findings": [
        "fp32 attention (TF32 dots) at hd 128: most autotune configs exceed sm_90's shared memory "
        "with the additive mask; the early prune drops them before compiling; the survivors spill "
        "(4-warp tiles of 4-byte elements at 255 registers). The fixed config for fp32 at hd 65-128 "
        "is 32x32 (64x32 spilled 48-160 B in the forward and dQ).",
        "fp32 dK/dV at hd 256 spills at any tile it can use (K, V, dK, dV of BLOCK_N x 256 fp32 "
        "per program): a kernel-level fix (split the head dim) is issue 19's; it is a documented "
        "exception of tests/test_triton_compile.py.",
        "num_stages = 1 configs (hd 256's fixed 16x32, the lists' smallest) are single-buffered by "
        "construction: no cp.async ring; documented exceptions of the pipelining test.",
        "dK/dV with BLOCK_N = 32 and dQ/forward with BLOCK_M < 64 use mma.sync, not wgmma (wgmma "
        "needs 64 rows per warpgroup); the fixed small configs trade that for no spills.",
        "fp32 linear_gelu with ieee dots (review T4) is in `--sweep full` only: its large configs "
        "take 5-25 s each to compile and put kilobytes per thread on the stack (the review's "
        "numbers); the early prune keeps only configs that fit.",
        "conv2d NCHW (review T5): the weight is handed over with unit channel stride, so its tile "
        "is cp.async and the flat (tap, channel block) loop pipelines; the 16-bit input tile stays "
        "scalar loads (each tap shifts the contiguous w run by 2 bytes), which is why `auto` runs "
        "16-bit NCHW on cuDNN. NHWC pipelines both tiles.",
        "attention dropout (review T6): one Philox call per 4 keys; the keep tile's interleave "
        "costs BLOCK_M x BLOCK_N bytes of shared memory (in the estimate).",
    ],
}


if __name__ == "__main__":
    sys.exit(main())
