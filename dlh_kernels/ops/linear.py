"""Linear layer with the bias and an activation in the matmul's epilogue: reference, torch ops,
public function.

``DF.linear(input, weight, bias=None, *, activation=None, negative_slope=0.01, backend=None)``
is ``act(F.linear(input, weight, bias))``, act in conv2d's vocabulary (None, "relu",
"leaky_relu", "silu", "gelu", "gelu_tanh", "tanh", "sigmoid"). The kernels live in ``triton_kernels/linear.py``
and ``csrc/linear.cu``.

The weight is read through its strides on every kernel backend: nn.Linear's (out, in) weight and
a transposed view of an (in, out) buffer (GPT-2's Conv1D: ``weight=conv1d.weight.t()``) both go
in without a copy. The input too, when its leading dims collapse into one row stride.

Backward: the forward saves only input, weight, bias (what F.linear's autograd saves). With an
activation, dz = dy * act'(z) comes from re-running the forward matmul in its GRAD epilogue mode
(z = x W^T + b recomputed: one more forward's FLOPs instead of an (M, N) tensor kept alive);
without one, dz = dy. Then dx = dz @ W and dW = dz^T @ x are torch matmuls (cuBLAS on a GPU,
on every backend) and db = the fp32 sum of dz's rows.

``DF.linear_gelu`` (ops/gelu.py) keeps its own op and Triton kernel, whose program is this
op's (triton_kernels/linear.py ``linear_tile``) with the GELU as activation.
"""
from __future__ import annotations

import math
from numbers import Real
from typing import Optional

import torch
import torch.nn.functional as F

from .. import _alloc, _backend, _ext, profiling
from .._op import KernelOp
from .conv2d import ACTIVATIONS, activation_grad_reference, activation_reference
from .layer_norm import _rows

_ACT_NAMES = {v: k for k, v in ACTIVATIONS.items()}


# ---------------------------------------------------------------------------------------------
# Reference: plain PyTorch, any dtype (the tests run it in float64).

def linear_reference(input, weight, bias=None, activation: Optional[str] = None,
                     negative_slope: float = 0.01):
    return activation_reference(F.linear(input, weight, bias), activation, negative_slope)


# ---------------------------------------------------------------------------------------------
# Backend implementations on (M, K) matrices. Each returns (M, N) contiguous: act(z) or, with
# grad (M, N) rows, grad * act'(z).

def _torch_linear(x2, weight, bias, act, slope, grad=None):
    z = F.linear(x2, weight, bias).float()
    if grad is None:
        return activation_reference(z, _ACT_NAMES[act], slope).to(x2.dtype)
    return (grad.float() * activation_grad_reference(z, _ACT_NAMES[act], slope)).to(x2.dtype)


def _triton_linear(x2, weight, bias, act, slope, grad=None):
    kernels = _backend.triton_module("linear")
    out = _alloc.empty((x2.shape[0], weight.shape[0]), x2.dtype, x2.device)
    kernels.linear(x2, weight, bias, out, act, slope, grad)
    return out


def _cuda_linear(x2, weight, bias, act, slope, grad=None):
    M, K = x2.shape
    N = weight.shape[0]
    out = _alloc.empty((M, N), x2.dtype, x2.device)
    if M == 0 or N == 0:
        return out
    # The kernel reads x rows with a unit column stride and w with one unit stride (either one).
    x = x2 if (x2.stride(1) == 1 or K <= 1) else x2.contiguous()
    if weight.stride(1) == 1 or K <= 1:
        w, k_contiguous, ldw = weight, True, weight.stride(0)
    elif weight.stride(0) == 1 or N <= 1:
        w, k_contiguous, ldw = weight, False, weight.stride(1)
    else:  # neither dim contiguous (a strided slice of both): one copy
        w = weight.contiguous()
        k_contiguous, ldw = True, K
    b = bias.contiguous() if bias is not None else None
    _ext.ext().linear_fwd(x.data_ptr(), w.data_ptr(), _ext.ptr(b), _ext.ptr(grad), out.data_ptr(),
                          M, N, K, x.stride(0), ldw, grad.stride(0) if grad is not None else 0,
                          out.stride(0), k_contiguous, act, float(slope), _ext.DTYPE_CODE[x2.dtype],
                          _ext.stream_handle(x2.device))
    return out


_LINEAR = {"torch": _torch_linear, "triton": _triton_linear, "cuda": _cuda_linear}


# ---------------------------------------------------------------------------------------------
# The ops.

def _matrix(input: torch.Tensor) -> torch.Tensor:
    """(M, K) view of input (..., K), any strides (the kernels take both); a copy if none."""
    return input.reshape(math.prod(input.shape[:-1]), input.shape[-1])


def _linear_impl(backend):
    def run(input, weight, bias, act, slope):
        out = _LINEAR[backend](_matrix(input), weight, bias, act, slope)
        return out.view(*input.shape[:-1], weight.shape[0])
    return run


def _linear_grad_impl(backend):
    def run(grad, input, weight, bias, act, slope):
        dz = _LINEAR[backend](_matrix(input), weight, bias, act, slope, _rows(grad, weight.shape[0]))
        return dz.view(grad.shape)
    return run


def _linear_setup(ctx, inputs, output):
    input, weight, bias, act, slope, backend = inputs
    ctx.save_for_backward(input, weight, bias)
    ctx.act, ctx.slope, ctx.backend = act, slope, backend


def _linear_backward(ctx, grad):
    input, weight, bias = ctx.saved_tensors
    if ctx.act != ACTIVATIONS[None]:
        dz = linear_grad_op(grad, input, weight, bias, ctx.act, ctx.slope, ctx.backend)
    else:
        dz = grad
    dz2 = _matrix(dz)
    dx = dw = db = None
    if ctx.needs_input_grad[0]:
        dx = (dz2 @ weight).view(input.shape)
    if ctx.needs_input_grad[1]:
        dw = dz2.t() @ _matrix(input)
    if bias is not None and ctx.needs_input_grad[2]:
        db = dz2.sum(0, dtype=torch.float32).to(bias.dtype)
    return dx, dw, db, None, None, None


linear_grad_op = KernelOp(
    "linear_grad",
    "(Tensor grad, Tensor input, Tensor weight, Tensor? bias, int activation, float negative_slope, "
    "str backend) -> Tensor",
    {b: _linear_grad_impl(b) for b in _LINEAR},
    lambda grad, input, weight, bias, act, slope, backend: grad.new_empty(grad.shape),
)

linear_op = KernelOp(
    "linear",
    "(Tensor input, Tensor weight, Tensor? bias, int activation, float negative_slope, str backend) -> Tensor",
    {b: _linear_impl(b) for b in _LINEAR},
    lambda input, weight, bias, act, slope, backend: input.new_empty(input.shape[:-1] + (weight.shape[0],)),
    setup_context=_linear_setup, backward=_linear_backward,
)


# ---------------------------------------------------------------------------------------------
# Argument checks (before any launch) and backend capabilities.

def _check(input, weight, bias, activation, negative_slope) -> int:
    """Validate; return the activation code."""
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"dlh.linear: input must be a torch.Tensor, got {type(input).__name__}")
    if not input.is_floating_point():
        raise TypeError(f"dlh.linear: input must be a floating-point tensor, got {input.dtype}")
    if input.dim() == 0:
        raise ValueError("dlh.linear: input must have at least one dim (features last)")
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"dlh.linear: weight must be a torch.Tensor, got {type(weight).__name__}")
    if weight.dim() != 2:
        raise ValueError(f"dlh.linear: weight must be 2-D (out_features, in_features), got shape "
                         f"{list(weight.shape)}")
    if weight.shape[1] != input.shape[-1]:
        raise ValueError(f"dlh.linear: weight must have shape [out_features, {input.shape[-1]}] "
                         f"(in_features = input.shape[-1]), got {list(weight.shape)}")
    if weight.device != input.device:
        raise ValueError(f"dlh.linear: weight is on {weight.device} but input is on {input.device}")
    if weight.dtype != input.dtype:
        raise TypeError(f"dlh.linear: weight dtype {weight.dtype} must equal input dtype {input.dtype}")
    if bias is not None:
        if not isinstance(bias, torch.Tensor):
            raise TypeError(f"dlh.linear: bias must be a torch.Tensor or None, got {type(bias).__name__}")
        if tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(f"dlh.linear: bias must have shape [{weight.shape[0]}], got {list(bias.shape)}")
        if bias.device != input.device:
            raise ValueError(f"dlh.linear: bias is on {bias.device} but input is on {input.device}")
        if bias.dtype != input.dtype:
            raise TypeError(f"dlh.linear: bias dtype {bias.dtype} must equal input dtype {input.dtype}")
    if not isinstance(activation, (str, type(None))) or activation not in ACTIVATIONS:
        raise ValueError(f"dlh.linear: activation must be one of {list(ACTIVATIONS)}, got {activation!r}")
    if not isinstance(negative_slope, Real) or isinstance(negative_slope, bool):
        raise TypeError(f"dlh.linear: negative_slope must be a real number, got {negative_slope!r}")
    return ACTIVATIONS[activation]


def _supports(input):
    def can(backend: str):
        why = _backend.dtype_reason(backend, input.dtype)
        if why or backend != "cuda":
            return why
        try:
            C = _ext.ext()
        except RuntimeError as exc:
            return str(exc)
        if not hasattr(C, "linear_fwd"):
            return ("the compiled extension dlh_kernels._C has no linear_fwd (built before "
                    "csrc/linear.cu existed: rebuild with pip install -e .)")
        return None
    return can


# ---------------------------------------------------------------------------------------------
# Public function (exported by dlh_kernels.functional).

def linear(input: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, *,
           activation: Optional[str] = None, negative_slope: float = 0.01,
           backend: Optional[str] = None) -> torch.Tensor:
    """``act(F.linear(input, weight, bias))`` with the bias and activation in the matmul's
    epilogue. activation: None, "relu", "leaky_relu" (with negative_slope), "silu", "gelu",
    "gelu_tanh", "tanh", "sigmoid". weight may be any 2-D view (out, in), e.g. ``conv1d.weight.t()``: no copy."""
    act = _check(input, weight, bias, activation, negative_slope)
    if activation is None and _backend.plain_torch(backend, input):  # torch backend, nobody watching
        return F.linear(input, weight, bias)
    be = _backend.choose("linear", backend, input.device.type, _supports(input),
                         _backend.matmul_auto_order(input.dtype))
    if be == "torch":
        with profiling.torch_range("linear"):
            return linear_reference(input, weight, bias, activation, negative_slope)
    return linear_op(input, weight, bias, act, float(negative_slope), be)


def explain(op: str, args: dict) -> dict:
    """Per backend, "ok" or why it would not run this call; and what `auto` picks."""
    x = args["input"]
    _check(x, args["weight"], args.get("bias"), args.get("activation"), args.get("negative_slope", 0.01))
    order = _backend.matmul_auto_order(x.dtype)
    verdict = _backend.explain_choice(x.device.type, _supports(x), order)
    if order == ("torch",) and x.is_cuda:
        verdict["auto"] += f" ({_backend.FP32_MATMUL_NOTE})"
    return verdict
