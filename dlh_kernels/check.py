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


_CHECKS = {
    "layer_norm": (_run_norm, _NORM_CASES, [((4, 131072), (131072,))]),
    "rms_norm": (_run_norm, _NORM_CASES, [((4, 131072), (131072,))]),
    "add_layer_norm": (_run_norm, _NORM_CASES[:1], [((4, 131072), (131072,))]),
    "add_rms_norm": (_run_norm, _NORM_CASES[:1], [((4, 131072), (131072,))]),
    "gelu": (_run_gelu, [((17, 1000),)], [((4096, 3072),)]),
    "geglu": (_run_gelu, [((17, 1000),)], [((4096, 6144),)]),
    "linear_gelu": (_run_gelu, [((17, 96),)], [((4096, 1024),)]),
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
    lines = [f"{'op':16} {'backend':8} {'dtype':9} {'shape':16} {'max err':>10} {'eager err':>10}  result"]
    said = set()
    for r in rows:
        if r["ok"] is None:  # cannot run here: one line per reason
            if (r["backend"], r["note"]) not in said:
                said.add((r["backend"], r["note"]))
                what = r["op"] if r.get("op_only") else "*"
                lines.append(f"{what:16} {r['backend']:8} skipped: {r['note']}")
            continue
        err = "-" if r["max_abs_err"] is None else f"{r['max_abs_err']:.2e}"
        ref = "-" if r["ref_err"] is None else f"{r['ref_err']:.2e}"
        verdict = {True: "ok", False: "FAIL", None: "skipped"}[r["ok"]]
        note = f" ({r['note']})" if r.get("note") else ""
        lines.append(f"{r['op']:16} {r['backend']:8} {r['dtype']:9} {str(r['shape']):16} "
                     f"{err:>10} {ref:>10}  {verdict}{note}")
    return "\n".join(lines)


def interpreter_note() -> str:
    if torch.cuda.is_available():
        return "device: " + torch.cuda.get_device_name()
    if os.environ.get("TRITON_INTERPRET") == "1":
        return "no GPU: CPU tensors; the Triton kernels run under the Triton interpreter"
    return ("no GPU: CPU tensors; the Triton kernels are skipped (run with TRITON_INTERPRET=1 "
            "to check them through the interpreter)")
