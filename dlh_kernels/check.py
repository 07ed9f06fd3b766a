"""`dlh check`: every op on every backend that runs here, against float64 eager PyTorch.

On a GPU: CUDA tensors, every available backend, compiled ("triton (GPU)", "cuda (GPU)").
Without one: CPU tensors; the `torch` backend, the Triton kernels under the Triton interpreter
("triton (interpreter)"; `dlh check` turns it on itself, see `ensure_interpreter`) and the CUDA C++
kernels through the strict CPU emulation of the repository's tests/cuda_emu ("cuda (emulated)"),
driven by each op's own cuda glue, where the checkout and a host C++ compiler are there.

A row passes when our max abs error against float64 is at most its tolerance,
``tol = FACTOR * eager's own error (same dtype) + _FLOOR[dtype]``; the table shows both.
"""
from __future__ import annotations

import contextlib
import ctypes
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

# Each op: (runner, cases, extra GPU cases, label). A runner takes (case, dtype, backend, device)
# and returns (our max abs error, eager's max abs error), both against float64; label(case) is
# the case's name in the report (shape and options). Cases are small enough for the interpreter
# and the CUDA emulation and awkward enough to matter (odd lengths; a split-path norm row on GPU);
# a case's first entry is its input shape. `--quick` runs the first case each backend takes.
_NORM_CASES = [((17, 768), (768,)), ((3, 1000), (1000,))]
FACTOR = 2.0
_FLOOR = {torch.float32: 1e-4, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def tolerance(dtype: torch.dtype, eager_err: float) -> float:
    """The most error a row may have: FACTOR x eager's own error in ``dtype`` + the dtype's floor."""
    return FACTOR * eager_err + _FLOOR[dtype]


def _generator():
    return torch.Generator().manual_seed(0)


def _errors(out, eager, ref):
    return (out.cpu().double() - ref).abs().max().item(), (eager.cpu().double() - ref).abs().max().item()


def _run_norm(op: str, case, dtype, backend: str, device):
    from . import functional as DF
    from .ops.layer_norm import layer_norm_reference
    shape, norm_shape = case
    g = _generator()
    x = (torch.randn(shape, generator=g) * 2 + 0.5).to(dtype)
    r = torch.randn(shape, generator=g).to(dtype)
    w = (torch.randn(norm_shape, generator=g) * 0.5 + 1).to(dtype)
    b = (torch.randn(norm_shape, generator=g) * 0.5).to(dtype)
    rms, add = "rms" in op, op.startswith("add_")
    args = [x] + ([r] if add else []) + [norm_shape, w] + ([] if rms else [b])
    fn = getattr(DF, op)
    out = fn(*[a.to(device) if isinstance(a, torch.Tensor) else a for a in args], backend=backend)
    out = out[0] if isinstance(out, tuple) else out
    h = (x.double() + r.double()) if add else x.double()
    eps = torch.finfo(dtype).eps if rms else 1e-5  # the defaults of DF.rms_norm / DF.layer_norm
    ref = layer_norm_reference(h, norm_shape, w.double(), None if rms else b.double(), eps, rms=rms)
    eager = fn(*args, backend="torch")
    eager = eager[0] if isinstance(eager, tuple) else eager
    return _errors(out, eager, ref)


def _run_gelu(op: str, case, dtype, backend: str, device):
    from . import functional as DF
    from .ops import gelu as gelus
    (shape,) = case
    g = _generator()
    x = (torch.randn(shape, generator=g) * 2 + 0.3).to(dtype)
    if op == "gelu":  # bias-GELU, tanh form
        b = (torch.randn(shape[-1:], generator=g) * 0.5).to(dtype)
        out = DF.gelu(x.to(device), "tanh", bias=b.to(device), backend=backend)
        eager = DF.gelu(x, "tanh", bias=b, backend="torch")
        return _errors(out, eager, gelus.gelu_reference(x.double() + b.double(), tanh=True))
    if op == "geglu":
        out = DF.geglu(x.to(device), backend=backend)
        return _errors(out, DF.geglu(x, backend="torch"), gelus.geglu_reference(x.double()))
    w = (torch.randn(shape[-1] + 1, shape[-1], generator=g) * shape[-1] ** -0.5).to(dtype)
    out = DF.linear_gelu(x.to(device), w.to(device), backend=backend)
    return _errors(out, DF.linear_gelu(x, w, backend="torch"), gelus.linear_gelu_reference(x.double(), w.double()))


def _run_activation(op: str, case, dtype, backend: str, device):
    from . import functional as DF
    from .ops import activation as acts
    shape, form = case
    g = _generator()
    x = (torch.randn(shape, generator=g) * 2 + 0.3).to(dtype)
    if op in ("silu", "relu", "leaky_relu"):
        act, slope = {"silu": (acts.SILU, 0.0), "relu": (acts.RELU, 0.0), "leaky_relu": (acts.LEAKY_RELU, 0.2)}[op]
        kw = dict(negative_slope=slope) if op == "leaky_relu" else {}
        fn = getattr(DF, op)
        out = fn(x.to(device), **kw, backend=backend)
        return _errors(out, fn(x, **kw, backend="torch"), acts.unary_reference(x.double(), act, slope))
    # gated: form "fused" is the one-tensor gate_up_proj call (up=None), "halves" its two views
    kw = dict(approximate="tanh") if op == "gated_gelu" else {}
    fn = getattr(DF, op)

    def call(t, be):
        return fn(t, **kw, backend=be) if form == "fused" else fn(*t.chunk(2, -1), **kw, backend=be)
    gate, up = x.double().chunk(2, -1)
    act = acts.GATED_SILU if op == "swiglu" else acts.GATED_GELU_TANH
    return _errors(call(x.to(device), backend), call(x, "torch"), acts.gate_reference(gate, act) * up)


def _run_attention(op: str, case, dtype, backend: str, device):
    from . import functional as DF
    from .ops.attention import attention_reference
    (B, H, L, D), S, causal = case
    g = _generator()
    q, k, v = (torch.randn(B, H, n, D, generator=g).to(dtype) for n in (L, S, S))
    out = DF.scaled_dot_product_attention(q.to(device), k.to(device), v.to(device),
                                          is_causal=causal, backend=backend)
    eager = DF.scaled_dot_product_attention(q, k, v, is_causal=causal, backend="torch")
    ref = attention_reference(q.double(), k.double(), v.double(), is_causal=causal)
    return _errors(out, eager, ref)


def _run_group_norm(op: str, case, dtype, backend: str, device):
    from . import functional as DF
    from .ops.group_norm import group_norm_reference
    shape, groups, channels_last = case
    g = _generator()
    x = (torch.randn(shape, generator=g) * 2 + 0.5).to(dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    w = (torch.randn(shape[1], generator=g) * 0.5 + 1).to(dtype)
    b = (torch.randn(shape[1], generator=g) * 0.5).to(dtype)
    out = DF.group_norm(x.to(device), groups, w.to(device), b.to(device), activation="silu", backend=backend)
    eager = DF.group_norm(x, groups, w, b, activation="silu", backend="torch")
    ref = group_norm_reference(x.double(), groups, w.double(), b.double(), 1e-5, "silu")
    return _errors(out, eager, ref)


def _run_diffusion_step(op: str, case, dtype, backend: str, device):
    from . import functional as DF
    from .diffusion import linear_alphas_cumprod, schedule
    from .ops.diffusion_step import diffusion_step_reference
    shape, kind = case
    g = _generator()
    x, m, u, z = (torch.randn(shape, generator=g).to(dtype) for _ in range(4))
    table = linear_alphas_cumprod(1000)
    t, prev = schedule("ddim", 50)[10]
    kw = dict(method="ddpm") if kind == "ddpm" else dict(method="ddim", eta=1.0, guidance_scale=7.5)
    w = kw.get("guidance_scale")

    def run(xx, mm, uu, zz, tab, be):
        return DF.diffusion_step(xx, mm, t, prev, tab, noise=zz, uncond_output=uu if w else None,
                                 backend=be, **kw)
    out = run(x.to(device), m.to(device), u.to(device), z.to(device), table.to(device), backend)
    d = torch.float64
    ref = diffusion_step_reference(x.to(d), m.to(d), t, prev, table.to(d), noise=z.to(d),
                                   uncond_output=u.to(d) if w else None, **kw)
    eager = diffusion_step_reference(x, m, t, prev, table, noise=z, uncond_output=u if w else None, **kw)
    return _errors(out, eager, ref)


def _run_conv2d(op: str, case, dtype, backend: str, device):
    from . import functional as DF
    from .ops.conv2d import conv2d_reference
    shape, (K, R, S), stride, padding, groups, channels_last = case
    g = _generator()
    x = torch.randn(shape, generator=g).to(dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    fan_in = shape[1] // groups * R * S
    w = (torch.randn(K, shape[1] // groups, R, S, generator=g) * fan_in ** -0.5).to(dtype)
    b = (torch.randn(K, generator=g) * 0.5).to(dtype)
    args = (stride, padding, 1, groups)
    out = DF.conv2d(x.to(device), w.to(device), b.to(device), *args, activation="relu", backend=backend)
    eager = DF.conv2d(x, w, b, *args, activation="relu", backend="torch")
    ref = conv2d_reference(x.double(), w.double(), b.double(), *args, activation="relu")
    return _errors(out, eager, ref)



def _run_linear(op: str, case, dtype, backend: str, device):
    from . import functional as DF
    from .ops.linear import linear_reference
    shape, n, activation, transposed = case
    g = _generator()
    x = (torch.randn(shape, generator=g) * 2 + 0.3).to(dtype)
    w = (torch.randn(n, shape[-1], generator=g) * shape[-1] ** -0.5).to(dtype)
    if transposed:  # GPT-2 Conv1D's (in, out) buffer, handed in as weight.t()
        w = w.t().contiguous().t()
    b = (torch.randn(n, generator=g) * 0.5).to(dtype)
    out = DF.linear(x.to(device), w.to(device), b.to(device), activation=activation, backend=backend)
    eager = DF.linear(x, w, b, activation=activation, backend="torch")
    return _errors(out, eager, linear_reference(x.double(), w.double(), b.double(), activation))

def _run_rotary(op: str, case, dtype, backend: str, device):
    from . import functional as DF
    from .ops.rotary import rotary_reference
    (B, Hq, S, D), Hk, R, interleaved = case
    g = _generator()
    q, k = torch.randn(B, Hq, S, D, generator=g).to(dtype), torch.randn(B, Hk, S, D, generator=g).to(dtype)
    inv_freq = 1.0 / 10000 ** (torch.arange(0, R, 2, dtype=torch.float64) / R)
    freqs = torch.arange(S, dtype=torch.float64)[:, None] * inv_freq
    emb = (freqs.repeat_interleave(2, -1) if interleaved else torch.cat([freqs, freqs], -1))[None]
    cos, sin = emb.cos().float(), emb.sin().float()  # fp32 tables, rounded to q's dtype by the op
    kw = dict(interleaved=interleaved)
    out = DF.rotary_embedding(q.to(device), k.to(device), cos.to(device), sin.to(device), backend=backend, **kw)
    eager = DF.rotary_embedding(q, k, cos, sin, backend="torch", **kw)
    c, s = cos.to(dtype).double(), sin.to(dtype).double()
    ref = [rotary_reference(x.double(), c, s, interleaved) for x in (q, k)]
    return _errors(torch.cat([o.flatten() for o in out]), torch.cat([e.flatten() for e in eager]),
                   torch.cat([r.flatten() for r in ref]))


def _dims(shape) -> str:
    return "x".join(str(s) for s in shape)


def _label_norm(case):
    return _dims(case[0])


def _label_elementwise(case):
    return _dims(case[0])


def _label_gelu(case):
    return _dims(case[0]) + " +bias, tanh"


def _label_linear_gelu(case):
    k = case[0][-1]
    return f"{_dims(case[0])} @ w {k + 1}x{k}"


def _label_gated(case):
    shape, form = case
    return f"{_dims(shape)} " + ("gate_up in one" if form == "fused" else "gate, up halves")


def _label_linear(case):
    shape, n, activation, transposed = case
    return f"{_dims(shape)} -> {n}, {activation}" + (", w.t() view" if transposed else "")


def _label_attention(case):
    (B, H, L, D), S, causal = case
    return f"B{B} H{H} L{L} S{S} D{D}" + (" causal" if causal else "")


def _label_group_norm(case):
    shape, groups, channels_last = case
    return f"{_dims(shape)} G{groups} +silu" + (" NHWC" if channels_last else "")


def _label_diffusion(case):
    shape, kind = case
    what = "ddpm" if kind == "ddpm" else "ddim+cfg (eta 1, w 7.5)"
    return f"{what} {_dims(shape)}"


def _label_conv2d(case):
    shape, (K, R, S), stride, padding, groups, channels_last = case
    return (f"{_dims(shape)} k{K}x{R}x{S} s{stride} p{padding}" + (f" g{groups}" if groups > 1 else "")
            + (" NHWC" if channels_last else "") + " +relu")


def _label_rotary(case):
    (B, Hq, S, D), Hk, R, interleaved = case
    return f"q {_dims((B, Hq, S, D))} Hk{Hk} R{R}" + (" interleaved" if interleaved else "")


_CHECKS = {
    "layer_norm": (_run_norm, _NORM_CASES, [((4, 131072), (131072,))], _label_norm),
    "rms_norm": (_run_norm, _NORM_CASES, [((4, 131072), (131072,))], _label_norm),
    "add_layer_norm": (_run_norm, _NORM_CASES[:1], [((4, 131072), (131072,))], _label_norm),
    "add_rms_norm": (_run_norm, _NORM_CASES[:1], [((4, 131072), (131072,))], _label_norm),
    "gelu": (_run_gelu, [((17, 1000),)], [((4096, 3072),)], _label_gelu),
    "geglu": (_run_gelu, [((17, 1000),)], [((4096, 6144),)], _label_elementwise),
    # (shape, form): odd widths; on GPU an LLaMA-7B MLP activation (11008) of 4096 tokens
    "silu": (_run_activation, [((17, 1000), None)], [((4096, 11008), None)], _label_elementwise),
    "relu": (_run_activation, [((17, 1000), None)], [((4096, 11008), None)], _label_elementwise),
    "leaky_relu": (_run_activation, [((17, 1000), None)], [((4096, 11008), None)], _label_elementwise),
    "swiglu": (_run_activation, [((17, 2002), "fused"), ((17, 2002), "halves")], [((4096, 22016), "fused")],
               _label_gated),
    "gated_gelu": (_run_activation, [((17, 2002), "fused"), ((17, 2002), "halves")],
                   [((4096, 22016), "halves")], _label_gated),
    "linear_gelu": (_run_gelu, [((17, 96),)], [((4096, 1024),)], _label_linear_gelu),
    # ((..., K), N, activation, transposed weight view): odd sizes; on GPU GPT-2's c_fc (Conv1D)
    "linear": (_run_linear, [((17, 96), 33, "silu", False), ((3, 5, 40), 24, "gelu_tanh", True)],
               [((4096, 768), 3072, "gelu_tanh", True), ((4096, 1024), 1024, "relu", False)], _label_linear),
    # ((B, H, L, D), S, is_causal): ragged lengths, head dims 40 and 80 (not powers of two) and
    # 64, one the CUDA C++ kernels take (fp16/bf16, head dims 32, 64, 96, 128, 256)
    "scaled_dot_product_attention": (_run_attention, [((2, 2, 37, 40), 45, False), ((1, 2, 33, 80), 21, True),
                                                      ((1, 2, 29, 64), 50, True)],
                                     [((4, 16, 1024, 64), 1024, True), ((2, 8, 2048, 128), 2048, False)],
                                     _label_attention),
    # ((N, C, H, W), groups, channels_last), GroupNorm + SiLU of a U-Net block: odd spatial sizes
    # on CPU; on GPU fused-path groups (Cg = 8 at 32x32) and split-path ones (Cg = 16 at 64x64)
    "group_norm": (_run_group_norm, [((2, 64, 9, 7), 32, False), ((2, 64, 5, 3), 16, True)],
                   [((8, 256, 32, 32), 32, False), ((4, 512, 64, 64), 32, False),
                    ((4, 512, 64, 64), 32, True)], _label_group_norm),
    # (shape, kind): DDPM with noise; DDIM eta = 1 with guidance 7.5; noise given (the same for all)
    "diffusion_step": (_run_diffusion_step, [((2, 4, 9, 7), "ddpm"), ((2, 4, 9, 7), "ddim+cfg")],
                       [((8, 4, 64, 64), "ddim+cfg")], _label_diffusion),
    # ((N, C, H, W), (K, R, S), stride, padding, groups, channels_last), conv + bias + ReLU: the
    # seed CNN's second layer, a strided grouped one; on GPU ResNet-50's 3x3 and its stem
    "conv2d": (_run_conv2d, [((1, 16, 14, 14), (32, 5, 5), 1, 2, 1, True), ((2, 6, 9, 7), (6, 3, 3), 2, 1, 3, False)],
               [((8, 64, 56, 56), (64, 3, 3), 1, 1, 1, True), ((8, 3, 224, 224), (64, 7, 7), 2, 3, 1, False)],
               _label_conv2d),
    # ((B, Hq, S, D), Hk, rotary_dim, interleaved): GQA LLaMA-style at a prime seq; Phi-2's partial
    # interleaved-free 80/32; on GPU LLaMA-2-7B's prefill (32 heads of 128) and a GQA 8:1 one
    "rotary_embedding": (_run_rotary, [((2, 4, 7, 64), 2, 64, False), ((1, 5, 9, 80), 1, 32, True)],
                         [((4, 32, 2048, 128), 32, 128, False), ((2, 64, 4096, 128), 8, 128, False)],
                         _label_rotary),
}
OPS = tuple(_CHECKS)
_QUICK = {"diffusion_step": 2}  # --quick: cases per backend and dtype (default 1): both samplers


def backend_choices() -> tuple:
    from ._backend import BACKENDS
    return BACKENDS


# ---------------------------------------------------------------------------------------------
# The Triton interpreter on machines without a GPU. It must be on before triton is imported
# (triton.jit reads it when a kernel is defined): `dlh check` sets TRITON_INTERPRET=1 itself
# when triton is not imported yet, and otherwise runs again in a fresh interpreter with it set.

def interpreter_needed() -> bool:
    from ._backend import interpreter_on
    return not torch.cuda.is_available() and not interpreter_on()


def ensure_interpreter(argv: Sequence[str]) -> Optional[int]:
    """Turns the Triton interpreter on for this CPU-only process; returns None to go on here, or
    the exit code of `python -m dlh_kernels check <argv>` run with TRITON_INTERPRET=1 when
    triton is already imported (and so cannot be switched any more)."""
    if not interpreter_needed():
        return None
    if "triton" not in sys.modules:
        os.environ["TRITON_INTERPRET"] = "1"
        from . import _backend
        _backend._REASONS.pop(("triton", "cpu"), None)  # a reason cached before the switch
        return None
    env = dict(os.environ, TRITON_INTERPRET="1")
    sys.stdout.flush()
    return subprocess.run([sys.executable, "-m", "dlh_kernels", "check", *argv], env=env).returncode


# ---------------------------------------------------------------------------------------------
# The CUDA C++ kernels on CPU: the strict emulation of the repository's tests/cuda_emu (not part
# of the installed package), a stand-in for dlh_kernels._C whose functions take the same
# positional arguments. It mirrors csrc/bindings.cpp: each binding's lambda parameters fill its
# dlh::*Args structure (csrc/common.cuh) as the binding does, through ctypes; plain functions
# (workspace sizes, attention_head_dim_supported) are exported as they are. Each .cu file is
# built (g++, cached per source hash) the first time one of its functions is called.

EMULATION_MISSING = "cuda: emulation not available (needs the repository checkout and g++)"
_EMU_SMS = 3  # tests/cuda_emu/runtime.cpp's emu_sm_count: the emulated GPU's SMs
_CTYPES = {"std::uintptr_t": ctypes.c_uint64, "ptr_t": ctypes.c_uint64, "int64_t": ctypes.c_int64,
           "int": ctypes.c_int, "bool": ctypes.c_bool, "float": ctypes.c_float, "double": ctypes.c_double}


def _repo_root() -> Path:
    return Path(__file__).resolve().parents[1]


def _split_top(text: str) -> list[str]:
    parts, depth, cur = [], 0, ""
    for ch in text:
        depth += ch in "(<[{"
        depth -= ch in ")>]}"
        if ch == "," and depth == 0:
            parts.append(cur.strip())
            cur = ""
        else:
            cur += ch
    if cur.strip():
        parts.append(cur.strip())
    return parts


def _balanced(text: str, start: int, open_: str = "(", close: str = ")") -> str:
    """The text inside the bracket pair opening at text[start]."""
    depth = 0
    for i in range(start, len(text)):
        depth += text[i] == open_
        depth -= text[i] == close
        if depth == 0:
            return text[start + 1:i]
    raise ValueError("unbalanced brackets")


def _structs(common: str) -> dict[str, list]:
    """{name: [(field, ctype), ...]} of csrc/common.cuh's `struct *Args`."""
    out = {}
    for m in re.finditer(r"struct\s+(\w+Args)\s*\{(.*?)\};", common, re.S):
        fields = []
        for stmt in re.sub(r"//[^\n]*", "", m[2]).split(";"):
            stmt = stmt.strip()
            if not stmt:
                continue
            tm = re.match(r"(std::uintptr_t|int64_t|int|bool|float)\s+(.*)", stmt, re.S)
            if tm is None:
                raise ValueError(f"{m[1]}: cannot read the field(s) {stmt!r}")
            for decl in tm[2].split(","):
                dm = re.fullmatch(r"\s*(\w+)\s*(?:\[(\d+)\])?\s*", decl)
                ctype = _CTYPES[tm[1]]
                fields.append((dm[1], ctype * int(dm[2]) if dm[2] else ctype))
        out[m[1]] = fields
    return out


def _bindings(text: str) -> tuple[dict, dict]:
    """From csrc/bindings.cpp: {name: (params, Args struct, init items, dlh function)} of the
    lambda bindings and {name: dlh function} of the plain ones (`m.def("x", &dlh::x, ...)`)."""
    lambdas, plain = {}, {}
    for m in re.finditer(r'm\.def\(\s*"(\w+)",\s*', text):
        name, pos = m[1], m.end()
        if text.startswith("&dlh::", pos):
            plain[name] = re.match(r"&dlh::(\w+)", text[pos:])[1]
            continue
        if not text.startswith("[](", pos):
            continue  # build_info and the like
        params = [p.split()[-1] for p in _split_top(_balanced(text, pos + 2))]
        body_start = text.index("{", pos + 2 + len(_balanced(text, pos + 2)) + 2)
        body = _balanced(text, body_start, "{", "}")
        am = re.search(r"dlh::(\w+Args)\s+args\s*\{", body)
        if am is None:
            continue
        items = _split_top(_balanced(body, am.end() - 1, "{", "}"))
        fn = re.search(r"dlh::(\w+)\(args\)", body)[1]
        lambdas[name] = (params, am[1], items, fn)
    return lambdas, plain


class EmulatedExt:
    """dlh_kernels._C's kernel functions over the CPU emulation (see above)."""

    def __init__(self, cuda_emu):
        self.emu = cuda_emu
        csrc = cuda_emu.CSRC
        common = (csrc / "common.cuh").read_text()
        self.structs = {n: type(n, (ctypes.Structure,), {"_fields_": f}) for n, f in _structs(common).items()}
        self.lambdas, self.plain = _bindings((csrc / "bindings.cpp").read_text())
        self.decls = {m[2]: (m[1], [p.split() for p in _split_top(m[3])])
                      for m in re.finditer(r"\b(int64_t|bool)\s+(\w+)\(([^;{)]*)\);", common)}
        self.sources = {p.name: p.read_text() for p in sorted(csrc.glob("*.cu"))}
        self.libs: dict[str, object] = {}
        self._calls: dict[str, Callable] = {}

    def _source_of(self, fn: str) -> str:
        for name, text in self.sources.items():
            if re.search(rf"\b{fn}\s*\([^;{{]*\)\s*\{{", text):
                return name
        raise AttributeError(f"no csrc/*.cu defines dlh::{fn}")

    def _library(self, cu_name: str):
        if cu_name not in self.libs:
            entries = sorted({(fn, struct) for _, struct, _, fn in self.lambdas.values()
                              if self._source_of(fn) == cu_name})
            exports = ""
            for fn in sorted(set(self.plain.values())):
                if fn in self.decls and self._source_of(fn) == cu_name:
                    ret, params = self.decls[fn]
                    sig = ", ".join(" ".join(p) for p in params)
                    args = ", ".join(p[-1] for p in params)
                    exports += (f"EMU_EXPORT int emu_fn_{fn}({sig}, {ret}* out, char* err, int n) {{\n"
                                f"  try {{ *out = dlh::{fn}({args}); }} catch (std::exception& e) {{ "
                                f'snprintf(err, n, "%s", e.what()); return 1; }}\n  return 0;\n}}\n')
            self.libs[cu_name] = self.emu.build(cu_name, entries, extra_exports=exports)
        return self.libs[cu_name]

    def _make(self, name: str) -> Callable:
        if name in self.lambdas:
            params, struct_name, items, fn = self.lambdas[name]
            struct = self.structs[struct_name]
            fields = [f for f, _ in struct._fields_]
            lib = self._library(self._source_of(fn))

            def call(*positional, **keywords):
                values = dict(zip(params, positional), **keywords)
                args = struct()
                for field, item in zip(fields, items):
                    if item == "{}":  # an array filled from the sequence argument of its name
                        array = getattr(args, field)
                        for i, v in enumerate(values[field]):
                            array[i] = int(v)
                    else:
                        setattr(args, field, values[re.fullmatch(r"(?:static_cast<\w+>\()?(\w+)\)?", item)[1]])
                lib.run(fn, args)
            return call
        fn = self.plain[name]
        ret, params = self.decls[fn]
        lib = self._library(self._source_of(fn))
        cfn = lib.function(f"emu_fn_{fn}", ctypes.c_int,
                           [_CTYPES[p[0]] for p in params] + [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int])

        def plain(*args):
            out, err = _CTYPES[ret](), ctypes.create_string_buffer(512)
            if cfn(*args, ctypes.byref(out), err, 512):
                raise RuntimeError(err.value.decode())
            return out.value
        return plain

    def __getattr__(self, name: str):  # only for what __init__ did not set: the _C functions
        known = self.__dict__.get("lambdas", {}).keys() | self.__dict__.get("plain", {}).keys()
        if name not in known:
            raise AttributeError(f"the emulated dlh_kernels._C has no {name}")
        calls = self.__dict__["_calls"]
        if name not in calls:
            calls[name] = self._make(name)
        return calls[name]


_emulation: Optional[tuple] = None  # (EmulatedExt or None, reason or None), once per process


def emulation() -> tuple:
    """(EmulatedExt, None) when the CUDA emulation can run here, else (None, why not)."""
    global _emulation
    if _emulation is None:
        _emulation = _load_emulation()
    return _emulation


def _load_emulation() -> tuple:
    init = _repo_root() / "tests" / "cuda_emu" / "__init__.py"
    if not init.is_file() or not (_repo_root() / "csrc" / "bindings.cpp").is_file():
        return None, f"{EMULATION_MISSING}: no tests/cuda_emu and csrc/ beside this dlh_kernels"
    try:
        module = sys.modules.get("cuda_emu")
        if module is None or Path(getattr(module, "__file__", "")).resolve() != init.resolve():
            spec = importlib.util.spec_from_file_location("cuda_emu", init,
                                                          submodule_search_locations=[str(init.parent)])
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            sys.modules.setdefault("cuda_emu", module)
        reason = module.unavailable()
        if reason:
            return None, f"{EMULATION_MISSING}: {reason}"
        return EmulatedExt(module), None
    except Exception as exc:  # a broken checkout, an unreadable csrc/
        return None, f"{EMULATION_MISSING}: {type(exc).__name__}: {exc}"


@contextlib.contextmanager
def emulated_cuda(ext: EmulatedExt):
    """The ops' cuda glue on CPU tensors, routed to the emulated kernels."""
    from . import _backend, _ext
    saved = {n: getattr(_ext, n) for n in ("ext", "stream_handle", "sm_count")}
    key = ("cuda", "cpu")
    reason = _backend._REASONS.pop(key, "unset")
    _ext.ext, _ext.stream_handle, _ext.sm_count = (lambda: ext), (lambda device: 0), (lambda index: _EMU_SMS)
    _backend._REASONS[key] = None
    try:
        yield
    finally:
        for n, v in saved.items():
            setattr(_ext, n, v)
        if reason == "unset":
            _backend._REASONS.pop(key, None)
        else:
            _backend._REASONS[key] = reason


# ---------------------------------------------------------------------------------------------

def path_name(backend: str, device_type: str) -> str:
    """Where a row's result came from."""
    if device_type == "cuda":
        return f"{backend} (GPU)"
    return {"triton": "triton (interpreter)", "cuda": "cuda (emulated)"}.get(backend, "torch (CPU)")


def _one_line(exc: BaseException, limit: int = 300) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:limit]}" + ("..." if len(text) > limit else "")


def run_check(ops: Optional[Sequence[str]] = None, backends: Optional[Sequence[str]] = None,
              dtypes: Sequence[torch.dtype] = (torch.float32, torch.bfloat16), quick: bool = False,
              emulate_cuda: bool = True, progress: Optional[Callable[[str], None]] = None) -> list[dict]:
    """Rows {op, case, backend, path, dtype, shape, max_abs_err, ref_err, tol, ok, note}; ref_err
    is eager's own error, tol the most max_abs_err may be. quick: per op, backend and dtype the
    first case that backend runs (_QUICK: more), of the CPU cases (on a GPU too).
    emulate_cuda: on CPU, the cuda backend through the emulation when it can run here.
    progress: called with each op's name before its rows run."""
    from ._backend import BACKENDS, unavailable_reason
    on_gpu = torch.cuda.is_available()
    device = torch.device("cuda" if on_gpu else "cpu")
    unknown = set(ops or ()) - set(_CHECKS)
    if unknown:
        raise ValueError(f"dlh check: unknown op(s) {sorted(unknown)}; choose from {list(_CHECKS)}")
    unknown = set(backends or ()) - set(BACKENDS)
    if unknown:
        raise ValueError(f"dlh check: unknown backend(s) {sorted(unknown)}; choose from {list(BACKENDS)}")
    rows = []
    for op in ops or _CHECKS:
        if progress is not None:
            progress(op)
        runner, cases, gpu_cases, label = _CHECKS[op]
        if not quick:
            cases = cases + (gpu_cases if on_gpu else [])
        for backend in backends or BACKENDS:
            reason, scope = unavailable_reason(backend, device.type), contextlib.nullcontext
            if backend == "cuda" and not on_gpu:
                ext, why = emulation() if emulate_cuda else (None, f"{EMULATION_MISSING}: turned off")
                if ext is not None:
                    reason, scope = None, (lambda ext=ext: emulated_cuda(ext))
                else:
                    reason = why
            for dtype in dtypes:
                ran = 0
                for case in cases:
                    if quick and ran >= _QUICK.get(op, 1):
                        break  # --quick: the first case(s) this backend runs in this dtype
                    row = dict(op=op, case=label(case), backend=backend, path=path_name(backend, device.type),
                               dtype=str(dtype).replace("torch.", ""), shape=list(case[0]), tol=None)
                    if reason is not None:
                        rows.append(dict(row, max_abs_err=None, ref_err=None, ok=None, note=reason))
                        continue
                    try:
                        with scope():
                            err, ref_err = runner(op, case, dtype, backend, device)
                        tol = tolerance(dtype, ref_err)
                        rows.append(dict(row, max_abs_err=err, ref_err=ref_err, tol=tol, ok=bool(err <= tol),
                                         note=""))
                        ran += 1
                    except RuntimeError as exc:
                        if "cannot run this call" in str(exc):
                            # the backend runs, but has no kernel for this op (or these arguments)
                            rows.append(dict(row, max_abs_err=None, ref_err=None, ok=None, note=str(exc),
                                             op_only=True))
                        else:
                            rows.append(dict(row, max_abs_err=None, ref_err=None, ok=False, note=_one_line(exc)))
                            ran += 1
                    except Exception as exc:  # report (an emulation violation too), keep checking
                        rows.append(dict(row, max_abs_err=None, ref_err=None, ok=False, note=_one_line(exc)))
                        ran += 1
    return rows


def format_rows(rows: list[dict]) -> str:
    case_w = max([len(r.get("case", "")) for r in rows if r["ok"] is not None] + [4])
    path_w = max([len(r.get("path", r["backend"])) for r in rows if r["ok"] is not None] + [7])
    lines = [f"{'op':28} {'case':{case_w}} {'backend':{path_w}} {'dtype':9} {'max err':>9} {'tol':>9} "
             f"{'eager err':>9}  result"]
    said = set()
    for r in rows:
        if r["ok"] is None:  # cannot run here: one line per reason
            if (r["backend"], r["note"]) not in said:
                said.add((r["backend"], r["note"]))
                what = r["op"] if r.get("op_only") else "*"
                lines.append(f"{what:28} {r['backend']:8} skipped: {r['note']}")
            continue

        def num(v):
            return "-" if v is None else f"{v:.2e}"
        verdict = "ok" if r["ok"] else "FAIL"
        note = f" ({r['note']})" if r.get("note") else ""
        lines.append(f"{r['op']:28} {r.get('case', str(r['shape'])):{case_w}} {r.get('path', r['backend']):{path_w}} "
                     f"{r['dtype']:9} {num(r['max_abs_err']):>9} {num(r.get('tol')):>9} {num(r['ref_err']):>9}  "
                     f"{verdict}{note}")
    return "\n".join(lines)


def summary(rows: list[dict]) -> str:
    """The closing lines: counts, the paths that ran, and how the tolerance is made."""
    failed = [r for r in rows if r["ok"] is False]
    paths: dict[str, int] = {}
    for r in rows:
        if r["ok"] is not None:
            paths[r["path"]] = paths.get(r["path"], 0) + 1
    floors = ", ".join(f"{str(d).replace('torch.', '')} {v:.0e}" for d, v in _FLOOR.items()
                      if str(d).replace("torch.", "") in {r["dtype"] for r in rows})
    return (f"tol = {FACTOR:g} x eager err + floor ({floors}); a row fails when max err > tol\n"
            f"ran: " + (", ".join(f"{p} {n}" for p, n in paths.items()) or "nothing") + "\n"
            f"{sum(r['ok'] is True for r in rows)} ok, {len(failed)} failed, "
            f"{sum(r['ok'] is None for r in rows)} skipped")


def interpreter_note() -> str:
    if torch.cuda.is_available():
        return "device: " + torch.cuda.get_device_name()
    from ._backend import interpreter_on
    triton = ("the Triton kernels run under the Triton interpreter" if interpreter_on() else
              "the Triton kernels are skipped (the Triton interpreter is off: set TRITON_INTERPRET=1 "
              "before triton is imported)")
    ext, why = emulation()
    cuda = why if ext is None else "the CUDA C++ kernels run through the CPU emulation of tests/cuda_emu"
    return f"no GPU: CPU tensors; {triton}; {cuda}"
