"""GroupNorm, optionally fused with the SiLU that follows it: references, torch ops, the public
function.

The kernels live in ``triton_kernels/group_norm.py`` and ``csrc/group_norm.cu``; this module
declares the ops (``torch.ops.dlh.group_norm`` and its ``group_norm_backward``) and
``DF.group_norm``.

Layout: the kernels see x, y, dy and dx as (N, C, S) views, S the spatial dims collapsed into
one stride. Contiguous NCHW and channels_last (any input whose spatial dims collapse, including
none) run in place; the output takes the input's layout (a channels_last input gives a
channels_last output, as eager's does). Only inputs whose spatial dims do not collapse into one
stride (e.g. a permutation that interleaves H and C) are copied to contiguous first, and then
the output is contiguous. The CUDA kernels also need the dim they vectorise (spatial for NCHW,
channels for channels_last) to have unit stride in every tensor of a call: the rare tensor that
breaks this (a strided slice, a gradient in the other layout) is copied; the Triton kernels take
any strides.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .. import _alloc, _backend, _ext, profiling
from .._op import KernelOp

_ACTIVATIONS = (None, "silu")


# ---------------------------------------------------------------------------------------------
# Reference: plain PyTorch, any dtype (the tests run it in float64).

def group_norm_reference(x, num_groups, weight=None, bias=None, eps=1e-5, activation=None):
    """act(GroupNorm(x) * w + b) written out; computes in x's dtype."""
    N, C = x.shape[:2]
    xg = x.reshape(N, num_groups, -1)
    mean = xg.mean(-1, keepdim=True)
    var = (xg - mean).pow(2).mean(-1, keepdim=True)
    y = ((xg - mean) * torch.rsqrt(var + eps)).reshape(x.shape)
    per_channel = (1, C) + (1,) * (x.dim() - 2)
    if weight is not None:
        y = y * weight.reshape(per_channel)
    if bias is not None:
        y = y + bias.reshape(per_channel)
    if activation == "silu":
        y = y * torch.sigmoid(y)
    return y


# ---------------------------------------------------------------------------------------------
# Layout.

def _sizes(t: torch.Tensor) -> tuple[int, int, int]:
    S = 1
    for d in t.shape[2:]:
        S *= d
    return t.shape[0], t.shape[1], S


def _collapses(t: torch.Tensor) -> bool:
    """True when t's spatial dims collapse into one stride, so that (N, C, S) is a view."""
    try:
        t.view(_sizes(t))
        return True
    except RuntimeError:
        return False


def _ncs(t: torch.Tensor) -> torch.Tensor:
    """(N, C, S) view of t, or of a contiguous copy when its spatial dims do not collapse."""
    if t.dim() == 3:
        return t
    N, C, S = _sizes(t)
    try:
        return t.view(N, C, S)
    except RuntimeError:
        return t.contiguous().view(N, C, S)


def _new_like(x: torch.Tensor, real: bool = False) -> torch.Tensor:
    """An output for x: x's strides when x is dense and collapses (empty_like keeps them; a
    non-dense x gets contiguous ones), contiguous when x's spatial dims do not collapse. The fake
    kernels call this too, so compiled graphs see the strides the kernels produce. real: poisoned
    (when poisoning is on) kernel output."""
    if _collapses(x):
        return _alloc.empty_like(x) if real else torch.empty_like(x)
    return _alloc.empty(x.shape, x.dtype, x.device) if real else x.new_empty(x.shape)


def _ncs_and_output(t: torch.Tensor, N: int, C: int, S: int):
    """(_ncs(t), a poisoned _new_like(t, real=True)) with one view: t's strides when its spatial
    dims collapse, else a contiguous copy and a contiguous output."""
    try:
        return t.view(N, C, S), _alloc.empty_like(t)
    except RuntimeError:
        return t.contiguous().view(N, C, S), _alloc.empty(t.shape, t.dtype, t.device)


def _flat(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """A per-channel parameter ((C,), checked) with a unit stride."""
    return None if t is None else t.contiguous()


# ---------------------------------------------------------------------------------------------
# Backend implementations on (N, C, S) views. mean, rstd: contiguous fp32, (N, G) or (N * G,).

def _torch_fwd(x, weight, bias, y, mean, rstd, G, eps, silu):
    """The kernels' contract in eager PyTorch with fp32 math (the op's torch backend)."""
    N, C, S = x.shape
    xg = x.float().reshape(N, G, (C // G) * S)
    m = xg.mean(-1)
    r = torch.rsqrt((xg - m[..., None]).pow(2).mean(-1) + eps)
    z = ((xg - m[..., None]) * r[..., None]).reshape(N, C, S)
    if weight is not None:
        z = z * weight.float()[:, None]
    if bias is not None:
        z = z + bias.float()[:, None]
    y.copy_(F.silu(z) if silu else z)
    mean.copy_(m.reshape(mean.shape))
    rstd.copy_(r.reshape(rstd.shape))


def _torch_bwd(dy, x, weight, bias, mean, rstd, dx, G, silu, weight_grad, bias_grad):
    N, C, S = x.shape
    L = (C // G) * S
    m, r = mean.view(N, G, 1), rstd.view(N, G, 1)
    xhat = ((x.float().reshape(N, G, L) - m) * r).reshape(N, C, S)
    w = weight.float()[:, None] if weight is not None else None
    dz = dy.float()
    if silu:
        z = xhat * w if w is not None else xhat
        z = z + bias.float()[:, None] if bias is not None else z
        s = torch.sigmoid(z)
        dz = dz * s * (1 + z * (1 - s))
    g = (dz * w if w is not None else dz).reshape(N, G, L)
    xg = xhat.reshape(N, G, L)
    grad = (g - xg * (g * xg).mean(-1, keepdim=True) - g.mean(-1, keepdim=True)) * r
    dx.copy_(grad.reshape(N, C, S))
    dw = (dz * xhat).sum((0, 2)) if weight_grad else None
    db = dz.sum((0, 2)) if bias_grad else None
    return dw, db


def _triton_fwd(x, weight, bias, y, mean, rstd, G, eps, silu):
    kernels = _backend.triton_module("group_norm")
    kernels.group_norm_fwd(x, weight, bias, y, mean.view(-1), rstd.view(-1), G, eps, silu)


def _triton_bwd(dy, x, weight, bias, mean, rstd, dx, G, silu, weight_grad, bias_grad):
    kernels = _backend.triton_module("group_norm")
    return kernels.group_norm_bwd(dy, x, weight, bias, mean.view(-1), rstd.view(-1), dx, G, silu,
                                  weight_grad, bias_grad)


# The CUDA kernels load 16-byte vectors along one unit-stride dim, the same for every tensor of
# a call: spatial (NCHW) or channels (channels_last, and spatial-less (N, C) inputs). Tensors
# without that unit stride (rare: a gradient in another layout, a strided slice) are copied
# into it first.

def _channels_inner(x: torch.Tensor) -> bool:
    N, C, S = x.shape
    return S == 1 or (x.stride(2) != 1 and x.stride(1) == 1)


def _inner_of(x: torch.Tensor) -> bool:
    """The dim the kernels vectorise for x: channels when x's channel stride is 1 (or there is no
    spatial extent), else spatial; x with neither unit stride is copied to NCHW first."""
    inner = _channels_inner(x)
    return inner if _unit_inner(x, inner) else False


def _unit_inner(t: torch.Tensor, channels_inner: bool) -> bool:
    N, C, S = t.shape
    return (t.stride(1) == 1 or C == 1) if channels_inner else (t.stride(2) == 1 or S == 1)


def _to_inner(t: torch.Tensor, channels_inner: bool) -> torch.Tensor:
    if _unit_inner(t, channels_inner):
        return t
    return t.transpose(1, 2).contiguous().transpose(1, 2) if channels_inner else t.contiguous()


def _out_inner(t: torch.Tensor, channels_inner: bool) -> torch.Tensor:
    """t itself when the kernels can write it, else a stand-in (to copy back from) they can."""
    if _unit_inner(t, channels_inner):
        return t
    N, C, S = t.shape
    if channels_inner:
        return _alloc.empty((N, S, C), t.dtype, t.device).transpose(1, 2)
    return _alloc.empty((N, C, S), t.dtype, t.device)


def _strides(t: torch.Tensor) -> tuple[int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2)


def _w_code(x, weight, bias):
    p = weight if weight is not None else bias
    return _ext.DTYPE_CODE[p.dtype if p is not None else x.dtype]


def _cuda_fwd(x, weight, bias, y, mean, rstd, G, eps, silu):
    N, C, S = x.shape
    if N * C * S == 0:
        return
    C_ = _ext.ext()
    inner = _inner_of(x)
    xk = _to_inner(x, inner)
    yk = _out_inner(y, inner)
    sms = _ext.sm_count(x.device.index)
    code = _ext.DTYPE_CODE[x.dtype]
    ws = _alloc.empty(C_.group_norm_fwd_workspace(N, C, S, G, inner, code, sms) // 4 + 1,
                      torch.float32, x.device)
    C_.group_norm_fwd(xk.data_ptr(), _ext.ptr(weight), _ext.ptr(bias), yk.data_ptr(),
                      mean.data_ptr(), rstd.data_ptr(), ws.data_ptr(), N, C, S, G,
                      *_strides(xk), *_strides(yk), eps, silu, inner, code,
                      _w_code(x, weight, bias), sms, _ext.stream_handle(x.device))
    if yk is not y:
        y.copy_(yk)


def _cuda_bwd(dy, x, weight, bias, mean, rstd, dx, G, silu, weight_grad, bias_grad):
    N, C, S = x.shape
    dw = _alloc.empty(C, torch.float32, x.device) if weight_grad else None
    db = _alloc.empty(C, torch.float32, x.device) if bias_grad else None
    if N * C * S == 0:
        return (None if dw is None else dw.zero_()), (None if db is None else db.zero_())
    C_ = _ext.ext()
    inner = _inner_of(x)
    xk, dyk = _to_inner(x, inner), _to_inner(dy, inner)
    dxk = _out_inner(dx, inner)
    sms = _ext.sm_count(x.device.index)
    code = _ext.DTYPE_CODE[x.dtype]
    ws = _alloc.empty(C_.group_norm_bwd_workspace(N, C, S, G, inner, code, sms) // 4 + 1,
                      torch.float32, x.device)
    C_.group_norm_bwd(dyk.data_ptr(), xk.data_ptr(), _ext.ptr(weight), _ext.ptr(bias),
                      mean.data_ptr(), rstd.data_ptr(), dxk.data_ptr(), _ext.ptr(dw), _ext.ptr(db),
                      ws.data_ptr(), N, C, S, G, *_strides(dyk), *_strides(xk), *_strides(dxk),
                      silu, inner, code, _w_code(x, weight, bias), sms,
                      _ext.stream_handle(x.device))
    if dxk is not dx:
        dx.copy_(dxk)
    return dw, db


_FWD = {"torch": _torch_fwd, "triton": _triton_fwd, "cuda": _cuda_fwd}
_BWD = {"torch": _torch_bwd, "triton": _triton_bwd, "cuda": _cuda_bwd}


# ---------------------------------------------------------------------------------------------
# The ops. activation is a string in the schema: "none" or "silu".

def _group_norm_impl(backend):
    def run(input, weight, bias, num_groups, eps, activation):
        N, C, S = _sizes(input)
        x, y = _ncs_and_output(input, N, C, S)
        mean = _alloc.empty((N, num_groups), torch.float32, input.device)
        rstd = _alloc.empty((N, num_groups), torch.float32, input.device)
        # mean, rstd go in as the (N, G) outputs (the triton glue, which slices them per batch,
        # takes flat views; the cuda one takes their pointers)
        _FWD[backend](x, _flat(weight), _flat(bias), y.view(N, C, S), mean, rstd, num_groups,
                      eps, activation == "silu")
        return y, mean, rstd
    return run


def _group_norm_fake(input, weight, bias, num_groups, eps, activation, backend):
    stat = input.new_empty((input.shape[0], num_groups), dtype=torch.float32)
    return _new_like(input), stat, stat.clone()


def _group_norm_backward_impl(backend):
    def run(grad_out, input, weight, bias, mean, rstd, num_groups, activation, weight_grad, bias_grad):
        N, C, S = _sizes(input)
        x, dx = _ncs_and_output(input, N, C, S)
        dw, db = _BWD[backend](_ncs(grad_out), x, _flat(weight), _flat(bias),
                               mean.contiguous(), rstd.contiguous(), dx.view(N, C, S), num_groups,
                               activation == "silu", weight_grad, bias_grad)

        def empty():
            return input.new_empty(0, dtype=torch.float32)
        return dx, (empty() if dw is None else dw), (empty() if db is None else db)
    return run


def _group_norm_backward_fake(grad_out, input, weight, bias, mean, rstd, num_groups, activation,
                              weight_grad, bias_grad, backend):
    channel_sums = input.new_empty((input.shape[1],), dtype=torch.float32)
    return (_new_like(input),
            channel_sums if weight_grad else input.new_empty(0, dtype=torch.float32),
            channel_sums.clone() if bias_grad else input.new_empty(0, dtype=torch.float32))


group_norm_backward_op = KernelOp(
    "group_norm_backward",
    "(Tensor grad_out, Tensor input, Tensor? weight, Tensor? bias, Tensor mean, Tensor rstd, "
    "int num_groups, str activation, bool weight_grad, bool bias_grad, str backend) "
    "-> (Tensor, Tensor, Tensor)",
    # returns dx, and the fp32 channel sums dw, db as (C,) (empty when not asked for)
    {b: _group_norm_backward_impl(b) for b in _BWD},
    _group_norm_backward_fake,
)


def _setup_context(ctx, inputs, output):
    x, w, b, num_groups, eps, activation, backend = inputs
    _, mean, rstd = output
    ctx.mark_non_differentiable(mean, rstd)
    # the bias is needed by the backward only under the SiLU (z = xhat * w + b); z itself is
    # recomputed, never stored
    ctx.save_for_backward(x, w, b, mean, rstd)
    ctx.num_groups, ctx.activation, ctx.backend = num_groups, activation, backend


def _backward(ctx, grad_y, _grad_mean, _grad_rstd):
    x, w, b, mean, rstd = ctx.saved_tensors
    grad_y = grad_y if grad_y is not None else torch.zeros_like(x)
    weight_grad = w is not None and ctx.needs_input_grad[1]
    bias_grad = b is not None and ctx.needs_input_grad[2]
    dx, dw, db = group_norm_backward_op(grad_y, x, w, b, mean, rstd, ctx.num_groups,
                                        ctx.activation, weight_grad, bias_grad, ctx.backend)
    dw = dw.to(w.dtype) if weight_grad else None  # (C,) fp32 column sums; w, b are (C,)
    db = db.to(b.dtype) if bias_grad else None
    return dx, dw, db, None, None, None, None


group_norm_op = KernelOp(
    "group_norm",
    "(Tensor input, Tensor? weight, Tensor? bias, int num_groups, float eps, str activation, "
    "str backend) -> (Tensor, Tensor, Tensor)",
    # returns y, and the fp32 statistics mean, rstd as (N, num_groups)
    {b: _group_norm_impl(b) for b in _FWD},
    _group_norm_fake,
    setup_context=_setup_context,
    backward=_backward,
)


# ---------------------------------------------------------------------------------------------
# Argument checks (before any launch) and backend capabilities.

def _check(input, num_groups, weight, bias, activation) -> None:
    """Validate a call; every message names the bad argument."""
    op = "group_norm"
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"dlh.{op}: input must be a torch.Tensor, got {type(input).__name__}")
    if not input.is_floating_point():
        raise TypeError(f"dlh.{op}: input must be a floating-point tensor, got {input.dtype}")
    shape = input.shape
    if len(shape) < 2:
        raise ValueError(f"dlh.{op}: input must have shape (N, C, *), got {list(shape)}")
    if not isinstance(num_groups, int) or isinstance(num_groups, bool):
        raise TypeError(f"dlh.{op}: num_groups must be an int, got {type(num_groups).__name__}")
    C = shape[1]
    if num_groups <= 0 or C % num_groups != 0:
        raise ValueError(f"dlh.{op}: num_groups must be a positive divisor of the number of "
                         f"channels C = {C} (input shape {list(shape)}), got {num_groups}")
    if activation not in _ACTIVATIONS:
        raise ValueError(f"dlh.{op}: activation must be one of {_ACTIVATIONS}, got {activation!r}")
    if weight is not None or bias is not None:
        device = input.device
        for name, t in (("weight", weight), ("bias", bias)):
            if t is None:
                continue
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"dlh.{op}: {name} must be a torch.Tensor or None, got {type(t).__name__}")
            if t.shape != (C,):
                raise ValueError(f"dlh.{op}: {name} must have shape [{C}] (the channels of input), "
                                 f"got {list(t.shape)}")
            if t.device != device:
                raise ValueError(f"dlh.{op}: {name} is on {t.device} but input is on {device}")
            if not t.is_floating_point():
                raise TypeError(f"dlh.{op}: {name} must be floating point, got {t.dtype}")
            # eager's rule too: the input's dtype, or float32 under fp16/bf16 (mixed precision)
            if t.dtype != input.dtype and not (t.dtype == torch.float32 and input.element_size() == 2):
                raise TypeError(f"dlh.{op}: {name} dtype {t.dtype} must be the input's ({input.dtype})"
                                + (" or float32" if input.element_size() == 2 else ""))
        if weight is not None and bias is not None and weight.dtype != bias.dtype:
            raise TypeError(f"dlh.{op}: weight and bias must share one dtype, got {weight.dtype} "
                            f"and {bias.dtype}")


def _supports(input):
    def can(backend: str):  # the parameters' dtypes were checked with the arguments
        return _backend.dtype_reason(backend, input.dtype)
    return can


# ---------------------------------------------------------------------------------------------
# Public function (exported by dlh_kernels.functional).

def group_norm(input: torch.Tensor, num_groups: int, weight: Optional[torch.Tensor] = None,
               bias: Optional[torch.Tensor] = None, eps: float = 1e-5, *,
               activation: Optional[str] = None, backend: Optional[str] = None) -> torch.Tensor:
    """`torch.nn.functional.group_norm`, then ``activation`` (None or "silu") fused after it.

    input: (N, C, *) in any layout; contiguous and channels_last run without a copy, and the
    output keeps the input's layout.
    """
    _check(input, num_groups, weight, bias, activation)
    if (weight is not None or bias is None) and _backend.plain_torch(backend, input):
        y = F.group_norm(input, num_groups, weight, bias, eps)  # torch backend, nobody watching
        return F.silu(y) if activation == "silu" else y
    be = _backend.choose("group_norm", backend, input.device.type, _supports(input))
    if be == "torch":
        with profiling.torch_range("group_norm"):
            if weight is None and bias is not None:
                # eager's backward fails with a bias but no weight ("tensor does not have a device",
                # torch 2.13 CPU): a weight of ones is the same function, with the same rounding
                weight = torch.ones_like(bias)
            y = F.group_norm(input, num_groups, weight, bias, eps)
            return F.silu(y) if activation == "silu" else y
    return group_norm_op(input, weight, bias, num_groups, eps, activation or "none", be)[0]


def explain(op: str, args: dict) -> dict:
    """Per backend, "ok" or why it would not run this call; and what `auto` picks."""
    x, w, b = args["input"], args.get("weight"), args.get("bias")
    _check(x, args["num_groups"], w, b, args.get("activation"))
    return _backend.explain_choice(x.device.type, _supports(x))
