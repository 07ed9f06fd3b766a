"""`dlh check`: every op on every backend that runs here, against float64 eager PyTorch.

On a GPU: CUDA tensors, every available backend. Without one: CPU tensors, the `torch` backend
and, when the Triton interpreter is on, the Triton kernels.
"""
from __future__ import annotations

import os
from typing import Optional, Sequence

import torch

# Each op: (runner, cases, extra GPU cases). A runner takes (case, dtype, backend, device) and
# returns (our max abs error, eager's max abs error), both against float64. Cases are small
# enough for the interpreter and awkward enough to matter (odd lengths; a split-path norm row
# on GPU); a case's first entry is the input shape shown in the report.
_NORM_CASES = [((17, 768), (768,)), ((3, 1000), (1000,))]
_FLOOR = {torch.float32: 1e-4, torch.float16: 4e-3, torch.bfloat16: 3e-2}


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


_CHECKS = {
    "layer_norm": (_run_norm, _NORM_CASES, [((4, 131072), (131072,))]),
    "rms_norm": (_run_norm, _NORM_CASES, [((4, 131072), (131072,))]),
    "add_layer_norm": (_run_norm, _NORM_CASES[:1], [((4, 131072), (131072,))]),
    "add_rms_norm": (_run_norm, _NORM_CASES[:1], [((4, 131072), (131072,))]),
    "gelu": (_run_gelu, [((17, 1000),)], [((4096, 3072),)]),
    "geglu": (_run_gelu, [((17, 1000),)], [((4096, 6144),)]),
    # (shape, form): odd widths; on GPU an LLaMA-7B MLP activation (11008) of 4096 tokens
    "silu": (_run_activation, [((17, 1000), None)], [((4096, 11008), None)]),
    "relu": (_run_activation, [((17, 1000), None)], [((4096, 11008), None)]),
    "leaky_relu": (_run_activation, [((17, 1000), None)], [((4096, 11008), None)]),
    "swiglu": (_run_activation, [((17, 2002), "fused"), ((17, 2002), "halves")], [((4096, 22016), "fused")]),
    "gated_gelu": (_run_activation, [((17, 2002), "fused"), ((17, 2002), "halves")], [((4096, 22016), "halves")]),
    "linear_gelu": (_run_gelu, [((17, 96),)], [((4096, 1024),)]),
    # ((..., K), N, activation, transposed weight view): odd sizes; on GPU GPT-2's c_fc (Conv1D)
    "linear": (_run_linear, [((17, 96), 33, "silu", False), ((3, 5, 40), 24, "gelu_tanh", True)],
               [((4096, 768), 3072, "gelu_tanh", True), ((4096, 1024), 1024, "relu", False)]),
    # ((B, H, L, D), S, is_causal): ragged lengths, head dims 40 and 80 (not powers of two)
    "scaled_dot_product_attention": (_run_attention, [((2, 2, 37, 40), 45, False), ((1, 2, 33, 80), 21, True)],
                                     [((4, 16, 1024, 64), 1024, True), ((2, 8, 2048, 128), 2048, False)]),
    # ((N, C, H, W), groups, channels_last), GroupNorm + SiLU of a U-Net block: odd spatial sizes
    # on CPU; on GPU fused-path groups (Cg = 8 at 32x32) and split-path ones (Cg = 16 at 64x64)
    "group_norm": (_run_group_norm, [((2, 64, 9, 7), 32, False), ((2, 64, 5, 3), 16, True)],
                   [((8, 256, 32, 32), 32, False), ((4, 512, 64, 64), 32, False),
                    ((4, 512, 64, 64), 32, True)]),
    # (shape, kind): DDPM with noise; DDIM eta = 1 with guidance 7.5; noise given (the same for all)
    "diffusion_step": (_run_diffusion_step, [((2, 4, 9, 7), "ddpm"), ((2, 4, 9, 7), "ddim-cfg")],
                       [((8, 4, 64, 64), "ddim-cfg")]),
    # ((N, C, H, W), (K, R, S), stride, padding, groups, channels_last), conv + bias + ReLU: the
    # seed CNN's second layer, a strided grouped one; on GPU ResNet-50's 3x3 and its stem
    "conv2d": (_run_conv2d, [((1, 16, 14, 14), (32, 5, 5), 1, 2, 1, True), ((2, 6, 9, 7), (6, 3, 3), 2, 1, 3, False)],
               [((8, 64, 56, 56), (64, 3, 3), 1, 1, 1, True), ((8, 3, 224, 224), (64, 7, 7), 2, 3, 1, False)]),
    # ((B, Hq, S, D), Hk, rotary_dim, interleaved): GQA LLaMA-style at a prime seq; Phi-2's partial
    # interleaved-free 80/32; on GPU LLaMA-2-7B's prefill (32 heads of 128) and a GQA 8:1 one
    "rotary_embedding": (_run_rotary, [((2, 4, 7, 64), 2, 64, False), ((1, 5, 9, 80), 1, 32, True)],
                         [((4, 32, 2048, 128), 32, 128, False), ((2, 64, 4096, 128), 8, 128, False)]),
}


def run_check(ops: Optional[Sequence[str]] = None, backends: Optional[Sequence[str]] = None,
              dtypes: Sequence[torch.dtype] = (torch.float32, torch.bfloat16)) -> list[dict]:
    """Rows {op, backend, dtype, shape, max_abs_err, ref_err, ok}; ref_err is eager's own error."""
    from ._backend import BACKENDS, unavailable_reason
    on_gpu = torch.cuda.is_available()
    device = torch.device("cuda" if on_gpu else "cpu")
    unknown = set(ops or ()) - set(_CHECKS)
    if unknown:
        raise ValueError(f"dlh check: unknown op(s) {sorted(unknown)}; choose from {list(_CHECKS)}")
    rows = []
    for op in ops or _CHECKS:
        runner, cases, gpu_cases = _CHECKS[op]
        for backend in backends or BACKENDS:
            reason = unavailable_reason(backend, device.type)
            for dtype in dtypes:
                for case in cases + (gpu_cases if on_gpu else []):
                    row = dict(op=op, backend=backend, dtype=str(dtype).replace("torch.", ""),
                               shape=list(case[0]))
                    if reason is not None:
                        rows.append(dict(row, max_abs_err=None, ref_err=None, ok=None, note=reason))
                        continue
                    try:
                        err, ref_err = runner(op, case, dtype, backend, device)
                        ok = err <= 2 * ref_err + _FLOOR[dtype]
                        rows.append(dict(row, max_abs_err=err, ref_err=ref_err, ok=ok, note=""))
                    except RuntimeError as exc:
                        if "cannot run this call" not in str(exc):
                            raise
                        # the backend runs, but has no kernel for this op (or these arguments)
                        rows.append(dict(row, max_abs_err=None, ref_err=None, ok=None, note=str(exc),
                                         op_only=True))
                    except Exception as exc:  # report, keep checking the rest
                        rows.append(dict(row, max_abs_err=None, ref_err=None, ok=False,
                                         note=f"{type(exc).__name__}: {exc}"))
    return rows


def format_rows(rows: list[dict]) -> str:
    lines = [f"{'op':28} {'backend':8} {'dtype':9} {'shape':16} {'max err':>10} {'eager err':>10}  result"]
    said = set()
    for r in rows:
        if r["ok"] is None:  # cannot run here: one line per reason
            if (r["backend"], r["note"]) not in said:
                said.add((r["backend"], r["note"]))
                what = r["op"] if r.get("op_only") else "*"
                lines.append(f"{what:28} {r['backend']:8} skipped: {r['note']}")
            continue
        err = "-" if r["max_abs_err"] is None else f"{r['max_abs_err']:.2e}"
        ref = "-" if r["ref_err"] is None else f"{r['ref_err']:.2e}"
        verdict = {True: "ok", False: "FAIL", None: "skipped"}[r["ok"]]
        note = f" ({r['note']})" if r.get("note") else ""
        lines.append(f"{r['op']:28} {r['backend']:8} {r['dtype']:9} {str(r['shape']):16} "
                     f"{err:>10} {ref:>10}  {verdict}{note}")
    return "\n".join(lines)


def interpreter_note() -> str:
    if torch.cuda.is_available():
        return "device: " + torch.cuda.get_device_name()
    if os.environ.get("TRITON_INTERPRET") == "1":
        return "no GPU: CPU tensors; the Triton kernels run under the Triton interpreter"
    return ("no GPU: CPU tensors; the Triton kernels are skipped (run with TRITON_INTERPRET=1 "
            "to check them through the interpreter)")
