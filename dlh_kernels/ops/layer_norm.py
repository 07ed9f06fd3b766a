"""LayerNorm and RMSNorm (and their residual-add forms): references, torch ops, public functions.

The kernels live in ``triton_kernels/layer_norm.py`` and ``csrc/layer_norm.cu``; this module
declares the ops (``torch.ops.dlh.layer_norm``, ``rms_norm``, ``add_layer_norm``,
``add_rms_norm`` and their shared ``norm_backward``) and the functions of the public API.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F

from .. import _alloc, _backend, _ext, profiling
from .._op import KernelOp

ShapeLike = Union[int, Sequence[int], torch.Size]


# ---------------------------------------------------------------------------------------------
# References: plain PyTorch, any dtype (the tests run them in float64).

def layer_norm_reference(x, normalized_shape, weight=None, bias=None, eps=1e-5, *, rms=False):
    """LayerNorm (or RMSNorm with rms=True) written out; computes in x's dtype."""
    dims = tuple(range(-len(tuple(normalized_shape)), 0))
    if rms:
        y = x * torch.rsqrt(x.pow(2).mean(dims, keepdim=True) + eps)
    else:
        mean = x.mean(dims, keepdim=True)
        var = (x - mean).pow(2).mean(dims, keepdim=True)
        y = (x - mean) * torch.rsqrt(var + eps)
    if weight is not None:
        y = y * weight
    if bias is not None:
        y = y + bias
    return y


def rms_norm_reference(x, normalized_shape, weight=None, eps=1e-6):
    return layer_norm_reference(x, normalized_shape, weight, None, eps, rms=True)


# ---------------------------------------------------------------------------------------------
# Layout: the kernels see (M, N) row views with a unit column stride.

def _rows(t: torch.Tensor, n: int) -> torch.Tensor:
    """(M, n) view of t when its layout allows one (any row stride), else a contiguous copy."""
    if t.dim() == 2 and t.shape[1] == n and (n <= 1 or t.stride(1) == 1):
        return t  # already rows: on every call's path, so no view
    m = t.numel() // n if n else 0
    try:
        rows = t.view(m, n)
    except RuntimeError:  # leading dims that do not collapse into one stride
        return t.reshape(m, n).contiguous()
    if n > 1 and rows.stride(1) != 1:
        return rows.contiguous()
    return rows


def _flat(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    if t is None or (t.dim() == 1 and t.is_contiguous()):
        return t
    return t.reshape(-1).contiguous()


def _torch_fwd(x, residual, weight, bias, eps, rms):
    """The same contract as the kernels, in eager PyTorch with fp32 math (the op's torch backend)."""
    h = x if residual is None else x + residual
    hf = h.float()
    if rms:
        mean = None
        rstd = torch.rsqrt(hf.pow(2).mean(1) + eps)
        y = hf * rstd[:, None]
    else:
        mean = hf.mean(1)
        rstd = torch.rsqrt((hf - mean[:, None]).pow(2).mean(1) + eps)
        y = (hf - mean[:, None]) * rstd[:, None]
    if weight is not None:
        y = y * weight.float()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype), (h if residual is not None else None), mean, rstd


def _fwd_outputs(x, has_residual, rms):
    M, N = x.shape
    y = _alloc.empty((M, N), x.dtype, x.device)
    h = _alloc.empty((M, N), x.dtype, x.device) if has_residual else None
    mean = None if rms else _alloc.empty(M, torch.float32, x.device)
    return y, h, mean, _alloc.empty(M, torch.float32, x.device)


def _triton_fwd(x, residual, weight, bias, eps, rms):
    kernels = _backend.triton_module("layer_norm")
    y, h, mean, rstd = _fwd_outputs(x, residual is not None, rms)
    kernels.norm_fwd(x, residual, weight, bias, y, h, mean, rstd, eps, rms)
    return y, h, mean, rstd


def _cuda_fwd(x, residual, weight, bias, eps, rms):
    C = _ext.ext()
    M, N = x.shape
    y, h, mean, rstd = _fwd_outputs(x, residual is not None, rms)
    sms = _ext.sm_count(x.device.index)
    ws_bytes = C.norm_fwd_workspace(M, N, sms)
    ws = _alloc.empty(ws_bytes // 4 + 1, torch.float32, x.device) if ws_bytes else None
    w_dtype = weight.dtype if weight is not None else (bias.dtype if bias is not None else x.dtype)
    C.norm_fwd(x.data_ptr(), _ext.ptr(residual), _ext.ptr(weight), _ext.ptr(bias), y.data_ptr(),
               _ext.ptr(h), _ext.ptr(mean), rstd.data_ptr(), _ext.ptr(ws),
               M, N, x.stride(0), residual.stride(0) if residual is not None else 0, y.stride(0),
               h.stride(0) if h is not None else 0,
               eps, rms, _ext.DTYPE_CODE[x.dtype], _ext.DTYPE_CODE[w_dtype], sms,
               _ext.stream_handle(x.device))
    return y, h, mean, rstd


def _torch_bwd(dy, h, weight, mean, rstd, dh, weight_grad, bias_grad):
    hf, dyf = h.float(), dy.float()
    xhat = hf * rstd[:, None] if mean is None else (hf - mean[:, None]) * rstd[:, None]
    g = dyf * weight.float() if weight is not None else dyf
    dx = g - xhat * (g * xhat).mean(1, keepdim=True)
    if mean is not None:
        dx = dx - g.mean(1, keepdim=True)
    dx = dx * rstd[:, None]
    if dh is not None:
        dx = dx + dh.float()
    dw = (dyf * xhat).sum(0) if weight_grad else None
    db = dyf.sum(0) if bias_grad else None
    return dx.to(h.dtype), dw, db


def _triton_bwd(dy, h, weight, mean, rstd, dh, weight_grad, bias_grad):
    kernels = _backend.triton_module("layer_norm")
    dx = _alloc.empty(h.shape, h.dtype, h.device)
    dw, db = kernels.norm_bwd(dy, h, weight, mean, rstd, dh, dx, weight_grad, bias_grad)
    return dx, dw, db


def _cuda_bwd(dy, h, weight, mean, rstd, dh, weight_grad, bias_grad):
    C = _ext.ext()
    M, N = h.shape
    dx = _alloc.empty((M, N), h.dtype, h.device)
    dw = _alloc.empty(N, torch.float32, h.device) if weight_grad else None
    db = _alloc.empty(N, torch.float32, h.device) if bias_grad else None
    sms = _ext.sm_count(h.device.index)
    ws_bytes = C.norm_bwd_workspace(M, N, sms)
    ws = _alloc.empty(ws_bytes // 4 + 1, torch.float32, h.device) if ws_bytes else None
    w_dtype = weight.dtype if weight is not None else h.dtype
    C.norm_bwd(dy.data_ptr(), h.data_ptr(), _ext.ptr(weight), _ext.ptr(mean), rstd.data_ptr(),
               _ext.ptr(dh), dx.data_ptr(), _ext.ptr(dw), _ext.ptr(db), _ext.ptr(ws),
               M, N, dy.stride(0), h.stride(0), dh.stride(0) if dh is not None else 0, dx.stride(0),
               mean is None, _ext.DTYPE_CODE[h.dtype], _ext.DTYPE_CODE[w_dtype], sms,
               _ext.stream_handle(h.device))
    return dx, dw, db


_FWD = {"torch": _torch_fwd, "triton": _triton_fwd, "cuda": _cuda_fwd}
_BWD = {"torch": _torch_bwd, "triton": _triton_bwd, "cuda": _cuda_bwd}


# ---------------------------------------------------------------------------------------------
# The ops. Arguments are the user's tensors (any leading shape); n = prod(normalized_shape).

def _forward(backend, x, residual, weight, bias, n, eps, rms):
    shape = x.shape
    y, h, mean, rstd = _FWD[backend](_rows(x, n), None if residual is None else _rows(residual, n),
                                     _flat(weight), _flat(bias), eps, rms)
    if len(shape) != 2:  # sizes unpacked: a torch.Size argument costs view ~1 us more
        y = y.view(*shape)
        h = None if h is None else h.view(*shape)
    return y, h, mean, rstd


def _norm_backward_impl(backend):
    def run(grad_out, grad_h, h, weight, mean, rstd, n, weight_grad, bias_grad):
        dx, dw, db = _BWD[backend](_rows(grad_out, n), _rows(h, n), _flat(weight), mean, rstd,
                                   None if grad_h is None else _rows(grad_h, n),
                                   weight_grad, bias_grad)
        def empty():
            return h.new_empty(0, dtype=torch.float32)
        return dx.view(*h.shape), (empty() if dw is None else dw), (empty() if db is None else db)
    return run


def _norm_backward_fake(grad_out, grad_h, h, weight, mean, rstd, n, weight_grad, bias_grad, backend):
    column_sums = h.new_empty((n,), dtype=torch.float32)
    return (torch.empty_like(h, memory_format=torch.contiguous_format),
            column_sums if weight_grad else h.new_empty(0, dtype=torch.float32),
            column_sums.clone() if bias_grad else h.new_empty(0, dtype=torch.float32))


norm_backward = KernelOp(
    "norm_backward",
    "(Tensor grad_out, Tensor? grad_h, Tensor h, Tensor? weight, Tensor? mean, Tensor rstd, "
    "SymInt n, bool weight_grad, bool bias_grad, str backend) -> (Tensor, Tensor, Tensor)",
    # returns dx, and the fp32 column sums dw, db as (n,) (empty when not asked for)
    {b: _norm_backward_impl(b) for b in _BWD},
    _norm_backward_fake,
)


def _declare(name: str, residual: bool, rms: bool) -> KernelOp:
    """One public norm entry point as a torch op; the four share kernels and backward."""
    args = ["Tensor input"] + (["Tensor residual"] if residual else []) + ["Tensor? weight"]
    args += [] if rms else ["Tensor? bias"]
    args += ["SymInt n", "float eps", "str backend"]
    outs = ["Tensor"] + (["Tensor"] if residual else []) + ([] if rms else ["Tensor"]) + ["Tensor"]
    schema = f"({', '.join(args)}) -> ({', '.join(outs)})"

    wi = 2 if residual else 1  # the index of weight among the op's inputs; bias follows it

    def unpack(a):  # op arguments -> (x, residual, weight, bias, n, eps, backend)
        return (a[0], a[1] if residual else None, a[wi], None if rms else a[wi + 1], *a[-3:])

    def pack(y, h, mean, rstd):
        if residual:
            return (y, h, rstd) if rms else (y, h, mean, rstd)
        return (y, rstd) if rms else (y, mean, rstd)

    def impl_for(backend):
        def run(*a):  # the op's arguments without the backend
            x, r, w, b, n, eps, _ = unpack(a + (backend,))
            return pack(*_forward(backend, x, r, w, b, n, eps, rms))
        return run

    def fake(*a):
        x, r, w, b, n, eps, backend = unpack(a)
        m = x.numel() // n if n else 0
        y = torch.empty_like(x, memory_format=torch.contiguous_format)
        stat = x.new_empty((m,), dtype=torch.float32)
        return pack(y, torch.empty_like(y) if residual else None, stat, x.new_empty((m,), dtype=torch.float32))

    def setup_context(ctx, inputs, output):
        x, r, w, b, n, eps, backend = unpack(inputs)
        out = list(output)
        h = out[1] if residual else x
        mean = None if rms else out[-2]
        rstd = out[-1]
        ctx.mark_non_differentiable(*([] if rms else [mean]), rstd)
        ctx.save_for_backward(h, w, mean, rstd)
        ctx.n, ctx.backend = n, backend
        ctx.bias_meta = None if b is None else (b.shape, b.dtype)

    def backward(ctx, *grads):
        h, w, mean, rstd = ctx.saved_tensors
        grad_y = grads[0] if grads[0] is not None else torch.zeros_like(h)
        grad_h = grads[1] if residual else None
        weight_grad = w is not None and ctx.needs_input_grad[wi]
        bias_grad = ctx.bias_meta is not None and ctx.needs_input_grad[wi + 1]
        dx, dw, db = norm_backward(grad_y, grad_h, h, w, mean, rstd, ctx.n,
                                   weight_grad, bias_grad, ctx.backend)
        dw = dw.view(*w.shape).to(w.dtype) if weight_grad else None
        db = db.view(*ctx.bias_meta[0]).to(ctx.bias_meta[1]) if bias_grad else None
        grads_in = [dx] + ([dx] if residual else []) + [dw] + ([] if rms else [db])
        return tuple(grads_in) + (None, None, None)

    return KernelOp(name, schema, {b: impl_for(b) for b in _FWD}, fake,
                    setup_context=setup_context, backward=backward)


layer_norm_op = _declare("layer_norm", residual=False, rms=False)
rms_norm_op = _declare("rms_norm", residual=False, rms=True)
add_layer_norm_op = _declare("add_layer_norm", residual=True, rms=False)
add_rms_norm_op = _declare("add_rms_norm", residual=True, rms=True)


# ---------------------------------------------------------------------------------------------
# Argument checks (before any launch) and backend capabilities.

def _check(op, input, normalized_shape, weight, bias, residual=None):
    """Validate a call (names the bad argument); return (normalized_shape tuple, its numel).

    On every call's path, so it reads each attribute once: ~2 us for a LayerNorm with weight
    and bias on CPU.
    """
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"dlh.{op}: input must be a torch.Tensor, got {type(input).__name__}")
    if not input.is_floating_point():
        raise TypeError(f"dlh.{op}: input must be a floating-point tensor, got {input.dtype}")
    shape = (normalized_shape,) if type(normalized_shape) is int else tuple(normalized_shape)
    in_shape = input.shape
    k = len(shape)
    if k == 0 or k > len(in_shape) or in_shape[len(in_shape) - k:] != shape:
        raise ValueError(f"dlh.{op}: normalized_shape {list(shape)} must equal the last dims of "
                         f"input, whose shape is {list(in_shape)}")
    if weight is not None or bias is not None or residual is not None:
        device = input.device
        for name, t in (("residual", residual), ("weight", weight), ("bias", bias)):
            if t is None:
                continue
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"dlh.{op}: {name} must be a torch.Tensor or None, got {type(t).__name__}")
            if t.shape != (in_shape if name == "residual" else shape):
                want = in_shape if name == "residual" else shape
                raise ValueError(f"dlh.{op}: {name} must have shape {list(want)}, got {list(t.shape)}")
            if t.device != device:
                raise ValueError(f"dlh.{op}: {name} is on {t.device} but input is on {device}")
            if not t.is_floating_point():
                raise TypeError(f"dlh.{op}: {name} must be floating point, got {t.dtype}")
            # LayerNorm: what every backend computes (the kernels, and eager F.layer_norm on CPU
            # and CUDA): the parameters in the input's dtype, or float32 (mixed precision).
            # RMSNorm is not held to it: eager F.rms_norm promotes other mixes, and so does the
            # torch backend (which `auto` falls back to; the kernels refuse them, naming why).
            if name != "residual" and t.dtype != input.dtype and t.dtype != torch.float32 \
                    and not op.endswith("rms_norm"):
                raise TypeError(f"dlh.{op}: {name} dtype {t.dtype} must be the input's ({input.dtype})"
                                + ("" if input.dtype == torch.float32 else " or float32"))
        if residual is not None and residual.dtype != input.dtype:
            raise TypeError(f"dlh.{op}: residual dtype {residual.dtype} must equal input dtype {input.dtype}")
        if bias is not None and weight is not None and weight.dtype != bias.dtype:
            raise TypeError(f"dlh.{op}: weight and bias must share one dtype, got {weight.dtype} "
                            f"and {bias.dtype}")
    n = 1
    for d in shape:
        n *= d
    return shape, n


def _supports(input, weight, bias):
    def can(backend: str):
        why = _backend.dtype_reason(backend, input.dtype)
        if why or backend == "torch":
            return why
        for name, t in (("weight", weight), ("bias", bias)):
            if t is not None and t.dtype not in (input.dtype, torch.float32):
                return f"the {backend} kernels take a {name} in the input dtype or float32, not {t.dtype}"
        if bias is not None and weight is not None and weight.dtype != bias.dtype:
            return f"the {backend} kernels need weight and bias in one dtype"
        return None
    return can


def _nbytes(input) -> int:
    """What a norm kernel moves at least: the rows read and written."""
    return 2 * input.numel() * input.element_size()


def _pick(op, backend, input, weight, bias):
    return _backend.choose(op, backend, input.device.type, _supports(input, weight, bias),
                           nbytes=_nbytes(input))


# ---------------------------------------------------------------------------------------------
# Public functions (exported by dlh_kernels.functional).

def layer_norm(input: torch.Tensor, normalized_shape: ShapeLike, weight: Optional[torch.Tensor] = None,
               bias: Optional[torch.Tensor] = None, eps: float = 1e-5, *,
               backend: Optional[str] = None) -> torch.Tensor:
    """`torch.nn.functional.layer_norm` on the chosen backend."""
    shape, n = _check("layer_norm", input, normalized_shape, weight, bias)
    if _backend.plain_torch(backend, input):  # the torch backend, nobody watching: F.* at once
        return F.layer_norm(input, shape, weight, bias, eps)
    be = _pick("layer_norm", backend, input, weight, bias)
    if be == "torch":
        with profiling.torch_range("layer_norm"):
            return F.layer_norm(input, shape, weight, bias, eps)
    return layer_norm_op(input, weight, bias, n, eps, be)[0]


def rms_norm(input: torch.Tensor, normalized_shape: ShapeLike, weight: Optional[torch.Tensor] = None,
             eps: Optional[float] = None, *, backend: Optional[str] = None) -> torch.Tensor:
    """`torch.nn.functional.rms_norm` (eps=None: the input dtype's machine epsilon)."""
    shape, n = _check("rms_norm", input, normalized_shape, weight, None)
    if _backend.plain_torch(backend, input):
        return F.rms_norm(input, shape, weight, eps)
    be = _pick("rms_norm", backend, input, weight, None)
    if be == "torch":
        with profiling.torch_range("rms_norm"):
            return F.rms_norm(input, shape, weight, eps)
    eps = torch.finfo(input.dtype).eps if eps is None else eps
    return rms_norm_op(input, weight, n, eps, be)[0]


def add_layer_norm(input: torch.Tensor, residual: torch.Tensor, normalized_shape: ShapeLike,
                   weight: Optional[torch.Tensor] = None, bias: Optional[torch.Tensor] = None,
                   eps: float = 1e-5, *, backend: Optional[str] = None):
    """``(layer_norm(input + residual), input + residual)`` in one pass over the rows."""
    shape, n = _check("add_layer_norm", input, normalized_shape, weight, bias, residual)
    if _backend.plain_torch(backend, input):
        h = input + residual
        return F.layer_norm(h, shape, weight, bias, eps), h
    be = _pick("add_layer_norm", backend, input, weight, bias)
    if be == "torch":
        with profiling.torch_range("add_layer_norm"):
            h = input + residual
            return F.layer_norm(h, shape, weight, bias, eps), h
    y, h = add_layer_norm_op(input, residual, weight, bias, n, eps, be)[:2]
    return y, h


def add_rms_norm(input: torch.Tensor, residual: torch.Tensor, normalized_shape: ShapeLike,
                 weight: Optional[torch.Tensor] = None, eps: Optional[float] = None, *,
                 backend: Optional[str] = None):
    """``(rms_norm(input + residual), input + residual)`` in one pass over the rows."""
    shape, n = _check("add_rms_norm", input, normalized_shape, weight, None, residual)
    if _backend.plain_torch(backend, input):
        h = input + residual
        return F.rms_norm(h, shape, weight, eps), h
    be = _pick("add_rms_norm", backend, input, weight, None)
    if be == "torch":
        with profiling.torch_range("add_rms_norm"):
            h = input + residual
            return F.rms_norm(h, shape, weight, eps), h
    eps = torch.finfo(input.dtype).eps if eps is None else eps
    y, h = add_rms_norm_op(input, residual, weight, n, eps, be)[:2]
    return y, h


def explain(op: str, args: dict) -> dict:
    """Per backend, "ok" or why it would not run this call; and what `auto` picks."""
    x, w, b = args["input"], args.get("weight"), args.get("bias")
    _check(op, x, args["normalized_shape"], w, b, args.get("residual"))
    return _backend.explain_choice(x.device.type, _supports(x, w, b), nbytes=_nbytes(x), op=op)
