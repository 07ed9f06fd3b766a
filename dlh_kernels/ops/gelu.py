"""GELU, bias-GELU, GeGLU and linear+GELU: references, torch ops, public functions.

The kernels live in ``triton_kernels/gelu.py`` and ``csrc/gelu.cu``; this module declares the
ops (``torch.ops.dlh.gelu``, ``geglu``, ``linear_gelu`` and their backward ops) and the
functions of the public API. ``linear_gelu`` has a Triton kernel only (the matmul with the GELU
in its epilogue); its ``cuda`` backend reports itself unavailable.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from .. import _alloc, _backend, _ext, profiling
from .._op import KernelOp
from .layer_norm import _rows

_APPROXIMATE = ("none", "tanh")


# ---------------------------------------------------------------------------------------------
# References: plain PyTorch, any dtype (the tests run them in float64).

def gelu_reference(z: torch.Tensor, tanh: bool = False) -> torch.Tensor:
    if tanh:
        return 0.5 * z * (1 + torch.tanh(math.sqrt(2 / math.pi) * (z + 0.044715 * z.pow(3))))
    return 0.5 * z * (1 + torch.erf(z / math.sqrt(2)))


def gelu_grad_reference(z: torch.Tensor, tanh: bool = False) -> torch.Tensor:
    """d gelu / dz."""
    if tanh:
        k = math.sqrt(2 / math.pi)
        t = torch.tanh(k * (z + 0.044715 * z.pow(3)))
        return 0.5 * (1 + t) + 0.5 * z * (1 - t * t) * k * (1 + 3 * 0.044715 * z * z)
    return 0.5 * (1 + torch.erf(z / math.sqrt(2))) + z * torch.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)


def geglu_reference(x: torch.Tensor, tanh: bool = False) -> torch.Tensor:
    a, gate = x.chunk(2, -1)
    return a * gelu_reference(gate, tanh)


def linear_gelu_reference(x, weight, bias=None, tanh: bool = False):
    return gelu_reference(F.linear(x, weight, bias), tanh)


# ---------------------------------------------------------------------------------------------
# Layout. The kernels see (M, N) row views with a unit column stride. Without a bias, a dense
# tensor (any permutation of a contiguous one: channels_last, transposes) is one flat row in
# storage order, and the output takes the input's strides, as eager's output does.

def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.as_strided((1, t.numel()), (t.numel(), 1))


def _same_dense_layout(*ts: torch.Tensor) -> bool:
    """True when all tensors have the strides of the last, a fresh torch.empty_like of one of
    them: empty_like keeps strides only for dense tensors, so then all are dense and share one
    storage order."""
    strides = ts[-1].stride()
    return all(t.stride() == strides for t in ts)


def _out_rows(out: torch.Tensor, n: int):
    """(M, n) view of a freshly allocated output, or a contiguous stand-in to copy back from."""
    rows = out.view(-1, n) if out.is_contiguous() else None
    return (rows, None) if rows is not None else (None, _alloc.empty((out.numel() // n, n), out.dtype, out.device))


def _elementwise(run, out: torch.Tensor, ins: list, flat: bool):
    """Call run(*in_rows, out_rows) on (M, N) views; copy back when out has no row view."""
    if out.numel() == 0:
        return out
    if flat:
        run(*[_flat(t) for t in ins], _flat(out))
        return out
    n = out.shape[-1]
    rows, stand_in = _out_rows(out, n)
    run(*[_rows(t, n) for t in ins], rows if stand_in is None else stand_in)
    if stand_in is not None:
        out.copy_(stand_in.view(out.shape))
    return out


# ---------------------------------------------------------------------------------------------
# Backend implementations on row views.

def _torch_gelu_fwd(x, bias, y, tanh):
    z = x.float() if bias is None else x.float() + bias.float()
    y.copy_(F.gelu(z, approximate="tanh" if tanh else "none"))


def _torch_gelu_bwd(dy, x, bias, dx, tanh, bias_grad):
    z = x.float() if bias is None else x.float() + bias.float()
    dz = dy.float() * gelu_grad_reference(z, tanh)
    dx.copy_(dz)
    return dz.sum(0) if bias_grad else None


def _triton_gelu_fwd(x, bias, y, tanh):
    kernels = _backend.triton_module("gelu")
    kernels.gelu_fwd(x, bias, y, tanh)


def _triton_gelu_bwd(dy, x, bias, dx, tanh, bias_grad):
    kernels = _backend.triton_module("gelu")
    return kernels.gelu_bwd(dy, x, bias, dx, tanh, bias_grad)


def _bias_code(x, bias):
    return _ext.DTYPE_CODE[bias.dtype if bias is not None else x.dtype]


def _cuda_gelu_fwd(x, bias, y, tanh):
    M, N = x.shape
    _ext.ext().gelu_fwd(x.data_ptr(), _ext.ptr(bias), y.data_ptr(), M, N, x.stride(0), y.stride(0),
                        tanh, _ext.DTYPE_CODE[x.dtype], _bias_code(x, bias), _ext.stream_handle(x.device))


def _cuda_gelu_bwd(dy, x, bias, dx, tanh, bias_grad):
    C = _ext.ext()
    M, N = x.shape
    sms = _ext.sm_count(x.device.index)
    db = _alloc.empty(N, torch.float32, x.device) if bias_grad else None
    ws = _alloc.empty(C.gelu_bwd_workspace(M, N, sms) // 4 + 1, torch.float32, x.device)
    C.gelu_bwd(dy.data_ptr(), x.data_ptr(), _ext.ptr(bias), dx.data_ptr(), _ext.ptr(db),
               ws.data_ptr(), M, N, dy.stride(0), x.stride(0), dx.stride(0), tanh,
               _ext.DTYPE_CODE[x.dtype], _bias_code(x, bias), sms, _ext.stream_handle(x.device))
    return db


def _torch_geglu_fwd(x, y, tanh):
    a, gate = x.float().chunk(2, -1)
    y.copy_(a * F.gelu(gate, approximate="tanh" if tanh else "none"))


def _torch_geglu_bwd(dy, x, dx, tanh):
    a, gate = x.float().chunk(2, -1)
    dyf = dy.float()
    dx.copy_(torch.cat([dyf * F.gelu(gate, approximate="tanh" if tanh else "none"),
                        dyf * a * gelu_grad_reference(gate, tanh)], -1))


def _triton_geglu_fwd(x, y, tanh):
    kernels = _backend.triton_module("gelu")
    kernels.geglu_fwd(x, y, tanh)


def _triton_geglu_bwd(dy, x, dx, tanh):
    kernels = _backend.triton_module("gelu")
    kernels.geglu_bwd(dy, x, dx, tanh)


def _cuda_geglu_fwd(x, y, tanh):
    M, H = y.shape
    _ext.ext().geglu_fwd(x.data_ptr(), y.data_ptr(), M, H, x.stride(0), y.stride(0), tanh,
                         _ext.DTYPE_CODE[x.dtype], _ext.stream_handle(x.device))


def _cuda_geglu_bwd(dy, x, dx, tanh):
    M, H = dy.shape
    _ext.ext().geglu_bwd(dy.data_ptr(), x.data_ptr(), dx.data_ptr(), M, H, dy.stride(0),
                         x.stride(0), dx.stride(0), tanh, _ext.DTYPE_CODE[x.dtype],
                         _ext.stream_handle(x.device))


_GELU_FWD = {"torch": _torch_gelu_fwd, "triton": _triton_gelu_fwd, "cuda": _cuda_gelu_fwd}
_GELU_BWD = {"torch": _torch_gelu_bwd, "triton": _triton_gelu_bwd, "cuda": _cuda_gelu_bwd}
_GEGLU_FWD = {"torch": _torch_geglu_fwd, "triton": _triton_geglu_fwd, "cuda": _cuda_geglu_fwd}
_GEGLU_BWD = {"torch": _torch_geglu_bwd, "triton": _triton_geglu_bwd, "cuda": _cuda_geglu_bwd}


# ---------------------------------------------------------------------------------------------
# The ops.

def _gelu_impl(backend):
    def run(input, bias, tanh):
        y = _alloc.empty_like(input)
        flat = bias is None and _same_dense_layout(input, y)
        return _elementwise(lambda x, out: _GELU_FWD[backend](x, bias, out, tanh), y, [input], flat)
    return run


def _gelu_backward_impl(backend):
    def run(grad, input, bias, tanh, bias_grad):
        dx = _alloc.empty_like(input)
        flat = bias is None and _same_dense_layout(grad, input, dx)
        db = []

        def launch(dy, x, out):
            db.append(_GELU_BWD[backend](dy, x, bias, out, tanh, bias_grad))
        _elementwise(launch, dx, [grad, input], flat)
        if not bias_grad:
            return dx, input.new_empty(0, dtype=torch.float32)
        return dx, (db[0] if db else input.new_zeros(input.shape[-1], dtype=torch.float32))
    return run


def _gelu_setup(ctx, inputs, output):
    input, bias, tanh, backend = inputs
    ctx.save_for_backward(input, bias)
    ctx.tanh, ctx.backend = tanh, backend


def _gelu_backward(ctx, grad):
    input, bias = ctx.saved_tensors
    bias_grad = bias is not None and ctx.needs_input_grad[1]
    dx, db = gelu_backward_op(grad, input, bias, ctx.tanh, bias_grad, ctx.backend)
    return dx, (db.to(bias.dtype) if bias_grad else None), None, None


gelu_backward_op = KernelOp(
    "gelu_backward",
    "(Tensor grad, Tensor input, Tensor? bias, bool tanh, bool bias_grad, str backend) -> (Tensor, Tensor)",
    {b: _gelu_backward_impl(b) for b in _GELU_BWD},
    lambda grad, input, bias, tanh, bias_grad, backend: (
        torch.empty_like(input),
        input.new_empty((input.shape[-1],) if bias_grad else (0,), dtype=torch.float32)),
)

gelu_op = KernelOp(
    "gelu", "(Tensor input, Tensor? bias, bool tanh, str backend) -> Tensor",
    {b: _gelu_impl(b) for b in _GELU_FWD},
    lambda input, bias, tanh, backend: torch.empty_like(input),
    setup_context=_gelu_setup, backward=_gelu_backward,
)


def _geglu_impl(backend):
    def run(input, tanh):
        h = input.shape[-1] // 2
        y = _alloc.empty(input.shape[:-1] + (h,), input.dtype, input.device)
        if y.numel() == 0:
            return y
        _GEGLU_FWD[backend](_rows(input, 2 * h), y.view(-1, h), tanh)
        return y
    return run


def _geglu_backward_impl(backend):
    def run(grad, input, tanh):
        h = input.shape[-1] // 2
        dx = _alloc.empty(input.shape, input.dtype, input.device)
        if dx.numel() == 0:
            return dx
        _GEGLU_BWD[backend](_rows(grad, h), _rows(input, 2 * h), dx.view(-1, 2 * h), tanh)
        return dx
    return run


def _geglu_setup(ctx, inputs, output):
    input, tanh, backend = inputs
    ctx.save_for_backward(input)
    ctx.tanh, ctx.backend = tanh, backend


def _geglu_backward(ctx, grad):
    (input,) = ctx.saved_tensors
    return geglu_backward_op(grad, input, ctx.tanh, ctx.backend), None, None


geglu_backward_op = KernelOp(
    "geglu_backward", "(Tensor grad, Tensor input, bool tanh, str backend) -> Tensor",
    {b: _geglu_backward_impl(b) for b in _GEGLU_BWD},
    lambda grad, input, tanh, backend: input.new_empty(input.shape),
)

geglu_op = KernelOp(
    "geglu", "(Tensor input, bool tanh, str backend) -> Tensor",
    {b: _geglu_impl(b) for b in _GEGLU_FWD},
    lambda input, tanh, backend: input.new_empty(input.shape[:-1] + (input.shape[-1] // 2,)),
    setup_context=_geglu_setup, backward=_geglu_backward,
)


# linear_gelu: the forward saves only what autograd of F.linear saves anyway (input, weight);
# the backward recomputes z = input @ weight^T + bias in the matmul that produces dz, instead of
# keeping the (M, N) pre-activation alive from forward to backward.

def _torch_linear_gelu(x2, weight, bias, tanh, grad=None):
    z = F.linear(x2, weight, bias).float()
    if grad is None:
        return F.gelu(z, approximate="tanh" if tanh else "none").to(x2.dtype)
    return (grad.float() * gelu_grad_reference(z, tanh)).to(x2.dtype)


def _triton_linear_gelu(x2, weight, bias, tanh, grad=None):
    kernels = _backend.triton_module("gelu")
    out = _alloc.empty((x2.shape[0], weight.shape[0]), x2.dtype, x2.device)
    kernels.linear_gelu(x2, weight, bias, out, tanh, grad)
    return out


_LINEAR_GELU = {"torch": _torch_linear_gelu, "triton": _triton_linear_gelu}


def _matrix(input: torch.Tensor) -> torch.Tensor:
    """(M, K) view of input (..., K), any strides (the kernel takes both); a copy if none."""
    return input.reshape(math.prod(input.shape[:-1]), input.shape[-1])


def _linear_gelu_impl(backend):
    def run(input, weight, bias, tanh):
        x2 = _matrix(input)
        return _LINEAR_GELU[backend](x2, weight, bias, tanh).view(*input.shape[:-1], weight.shape[0])
    return run


def _linear_gelu_grad_impl(backend):
    def run(grad, input, weight, bias, tanh):
        x2 = _matrix(input)
        return _LINEAR_GELU[backend](x2, weight, bias, tanh, _rows(grad, weight.shape[0])).view(grad.shape)
    return run


def _linear_gelu_setup(ctx, inputs, output):
    input, weight, bias, tanh, backend = inputs
    ctx.save_for_backward(input, weight, bias)
    ctx.tanh, ctx.backend = tanh, backend


def _linear_gelu_backward(ctx, grad):
    input, weight, bias = ctx.saved_tensors
    dz = linear_gelu_grad_op(grad, input, weight, bias, ctx.tanh, ctx.backend)
    dz2 = _matrix(dz)
    dx = dw = db = None
    if ctx.needs_input_grad[0]:
        dx = (dz2 @ weight).view(input.shape)
    if ctx.needs_input_grad[1]:
        dw = dz2.t() @ _matrix(input)
    if bias is not None and ctx.needs_input_grad[2]:
        db = dz2.sum(0, dtype=torch.float32).to(bias.dtype)
    return dx, dw, db, None, None


linear_gelu_grad_op = KernelOp(
    "linear_gelu_grad",
    "(Tensor grad, Tensor input, Tensor weight, Tensor? bias, bool tanh, str backend) -> Tensor",
    {b: _linear_gelu_grad_impl(b) for b in _LINEAR_GELU},
    lambda grad, input, weight, bias, tanh, backend: grad.new_empty(grad.shape),
)

linear_gelu_op = KernelOp(
    "linear_gelu", "(Tensor input, Tensor weight, Tensor? bias, bool tanh, str backend) -> Tensor",
    {b: _linear_gelu_impl(b) for b in _LINEAR_GELU},
    lambda input, weight, bias, tanh, backend: input.new_empty(input.shape[:-1] + (weight.shape[0],)),
    setup_context=_linear_gelu_setup, backward=_linear_gelu_backward,
)


# ---------------------------------------------------------------------------------------------
# Argument checks (before any launch) and backend capabilities.

def _check_input(op: str, input) -> None:
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"dlh.{op}: input must be a torch.Tensor, got {type(input).__name__}")
    if not input.is_floating_point():
        raise TypeError(f"dlh.{op}: input must be a floating-point tensor, got {input.dtype}")


def _check_approximate(op: str, approximate) -> bool:
    if approximate not in _APPROXIMATE:
        raise ValueError(f"dlh.{op}: approximate must be 'none' or 'tanh', got {approximate!r}")
    return approximate == "tanh"


def _check_param(op: str, name: str, t, shape: tuple, input: torch.Tensor, same_dtype: bool) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"dlh.{op}: {name} must be a torch.Tensor or None, got {type(t).__name__}")
    if tuple(t.shape) != shape:
        raise ValueError(f"dlh.{op}: {name} must have shape {list(shape)}, got {list(t.shape)}")
    if t.device != input.device:
        raise ValueError(f"dlh.{op}: {name} is on {t.device} but input is on {input.device}")
    if not t.is_floating_point():
        raise TypeError(f"dlh.{op}: {name} must be floating point, got {t.dtype}")
    if same_dtype and t.dtype != input.dtype:
        raise TypeError(f"dlh.{op}: {name} dtype {t.dtype} must equal input dtype {input.dtype}")


def _check_gelu(input, approximate, bias) -> bool:
    _check_input("gelu", input)
    tanh = _check_approximate("gelu", approximate)
    if bias is not None:
        if input.dim() == 0:
            raise ValueError("dlh.gelu: a bias needs an input with at least one dim (its last dim)")
        _check_param("gelu", "bias", bias, (input.shape[-1],), input, same_dtype=False)
    return tanh


def _check_geglu(input, approximate) -> bool:
    _check_input("geglu", input)
    tanh = _check_approximate("geglu", approximate)
    if input.dim() == 0 or input.shape[-1] % 2:
        raise ValueError(f"dlh.geglu: the last dim of input must be even (value and gate halves), "
                         f"got shape {list(input.shape)}")
    return tanh


def _check_linear_gelu(input, weight, bias, approximate) -> bool:
    _check_input("linear_gelu", input)
    tanh = _check_approximate("linear_gelu", approximate)
    if input.dim() == 0:
        raise ValueError("dlh.linear_gelu: input must have at least one dim (features last)")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError(f"dlh.linear_gelu: weight must be a 2-D tensor (out_features, in_features), "
                         f"got {getattr(weight, 'shape', type(weight).__name__)}")
    _check_param("linear_gelu", "weight", weight, (weight.shape[0], input.shape[-1]), input, same_dtype=True)
    if bias is not None:
        _check_param("linear_gelu", "bias", bias, (weight.shape[0],), input, same_dtype=True)
    return tanh


def _supports_elementwise(input, bias=None):
    def can(backend: str):
        why = _backend.dtype_reason(backend, input.dtype)
        if why or backend == "torch":
            return why
        if bias is not None and bias.dtype not in (input.dtype, torch.float32):
            return f"the {backend} kernels take a bias in the input dtype or float32, not {bias.dtype}"
        return None
    return can


def _supports_linear_gelu(input):
    def can(backend: str):
        if backend == "cuda":
            return "no CUDA C++ kernel for linear_gelu yet (the triton backend has one)"
        return _supports_elementwise(input)(backend)
    return can


# ---------------------------------------------------------------------------------------------
# Public functions (exported by dlh_kernels.functional).

def gelu(input: torch.Tensor, approximate: str = "none", *, bias: Optional[torch.Tensor] = None,
         backend: Optional[str] = None) -> torch.Tensor:
    """`torch.nn.functional.gelu(input + bias)`; `bias` (last dim) is added before the activation."""
    tanh = _check_gelu(input, approximate, bias)
    if bias is None and _backend.plain_torch(backend, input):  # torch backend, nobody watching
        return F.gelu(input, approximate=approximate)
    be = _backend.choose("gelu", backend, input.device.type, _supports_elementwise(input, bias))
    if be == "torch":
        with profiling.torch_range("gelu"):
            if bias is None:
                return F.gelu(input, approximate=approximate)
            return F.gelu(input + bias, approximate=approximate).to(input.dtype)
    return gelu_op(input, bias, tanh, be)


def geglu(input: torch.Tensor, approximate: str = "none", *, backend: Optional[str] = None) -> torch.Tensor:
    """``a, gate = input.chunk(2, -1); a * gelu(gate)``."""
    tanh = _check_geglu(input, approximate)
    if _backend.plain_torch(backend, input):
        a, gate = input.chunk(2, -1)
        return a * F.gelu(gate, approximate=approximate)
    be = _backend.choose("geglu", backend, input.device.type, _supports_elementwise(input))
    if be == "torch":
        with profiling.torch_range("geglu"):
            a, gate = input.chunk(2, -1)
            return a * F.gelu(gate, approximate=approximate)
    return geglu_op(input, tanh, be)


def linear_gelu(input: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                approximate: str = "none", *, backend: Optional[str] = None) -> torch.Tensor:
    """``gelu(F.linear(input, weight, bias))`` with the bias and GELU in the matmul's epilogue."""
    tanh = _check_linear_gelu(input, weight, bias, approximate)
    if _backend.plain_torch(backend, input):
        return F.gelu(F.linear(input, weight, bias), approximate=approximate)
    be = _backend.choose("linear_gelu", backend, input.device.type, _supports_linear_gelu(input),
                         _backend.matmul_auto_order(input.dtype))
    if be == "torch":
        with profiling.torch_range("linear_gelu"):
            return F.gelu(F.linear(input, weight, bias), approximate=approximate)
    return linear_gelu_op(input, weight, bias, tanh, be)


def explain(op: str, args: dict) -> dict:
    """Per backend, "ok" or why it would not run this call; and what `auto` picks."""
    x = args["input"]
    if op == "gelu":
        _check_gelu(x, args["approximate"], args["bias"])
        can = _supports_elementwise(x, args["bias"])
    elif op == "geglu":
        _check_geglu(x, args["approximate"])
        can = _supports_elementwise(x)
    else:
        _check_linear_gelu(x, args["weight"], args["bias"], args["approximate"])
        order = _backend.matmul_auto_order(x.dtype)
        verdict = _backend.explain_choice(x.device.type, _supports_linear_gelu(x), order)
        if order == ("torch",) and x.is_cuda:
            verdict["auto"] += f" ({_backend.FP32_MATMUL_NOTE})"
        return verdict
    return _backend.explain_choice(x.device.type, can)
