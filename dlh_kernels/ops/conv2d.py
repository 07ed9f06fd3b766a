"""2D convolution with bias and activation in the epilogue: reference, torch ops, public function.

The kernels live in ``triton_kernels/conv2d.py`` (forward and backward, implicit GEMMs) and
``csrc/conv2d.cu`` (forward only). The ``cuda`` backend's backward uses the Triton backward
kernels (it needs Triton on the GPU for gradients).

Output layout: channels_last when the input is channels_last (and not also plain contiguous,
as a 1-channel or 1x1 input is), else contiguous NCHW.

Backward: the forward saves only x, w, b (what F.conv2d's autograd saves). With an activation,
dz = dy * act'(z) comes from re-running the forward GEMM in its GRAD epilogue mode (one more
forward's FLOPs instead of keeping z alive); without one, dz = dy. Then dx (transposed implicit
GEMM), dw (implicit GEMM over the output pixels) and db = sum of dz.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .. import _alloc, _backend, _ext, profiling
from .._op import KernelOp
from .gelu import gelu_grad_reference

ACTIVATIONS = {None: 0, "relu": 1, "silu": 2, "gelu": 3, "gelu_tanh": 4, "leaky_relu": 5, "tanh": 6, "sigmoid": 7}
_ACT_NAMES = {v: k for k, v in ACTIVATIONS.items()}


# ---------------------------------------------------------------------------------------------
# Reference: plain PyTorch, any dtype (the tests run it in float64).

def activation_reference(z: torch.Tensor, activation: Optional[str], negative_slope: float = 0.01):
    if activation is None:
        return z
    if activation == "relu":
        return F.relu(z)
    if activation == "silu":
        return F.silu(z)
    if activation == "gelu":
        return F.gelu(z)
    if activation == "gelu_tanh":
        return F.gelu(z, approximate="tanh")
    if activation == "leaky_relu":
        return F.leaky_relu(z, negative_slope)
    if activation == "tanh":
        return torch.tanh(z)
    if activation == "sigmoid":
        return torch.sigmoid(z)
    raise ValueError(f"unknown activation {activation!r}")


def activation_grad_reference(z: torch.Tensor, activation: Optional[str], negative_slope: float = 0.01):
    """d act / dz."""
    if activation is None:
        return torch.ones_like(z)
    if activation == "relu":
        return (z > 0).to(z.dtype)
    if activation == "silu":
        s = torch.sigmoid(z)
        return s * (1 + z * (1 - s))
    if activation in ("gelu", "gelu_tanh"):
        return gelu_grad_reference(z, activation == "gelu_tanh")
    if activation == "leaky_relu":
        return torch.where(z > 0, torch.ones_like(z), torch.full_like(z, negative_slope))
    if activation == "tanh":
        return 1 - torch.tanh(z) ** 2
    if activation == "sigmoid":
        s = torch.sigmoid(z)
        return s * (1 - s)
    raise ValueError(f"unknown activation {activation!r}")


def conv2d_reference(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1,
                     activation=None, negative_slope=0.01):
    """F.conv2d + bias + activation, in the inputs' dtype (float64 works)."""
    return activation_reference(F.conv2d(input, weight, bias, stride, padding, dilation, groups),
                                activation, negative_slope)


# ---------------------------------------------------------------------------------------------
# Shapes. Inside the ops padding is explicit: [top, bottom, left, right] ("same" with an even
# kernel pads more after than before, as torch does).

def _out_size(size: int, k: int, s: int, p0: int, p1: int, d: int) -> int:
    return (size + p0 + p1 - d * (k - 1) - 1) // s + 1


def _out_shape(input, weight, stride, padding, dilation):
    N, _, H, W = input.shape
    K, _, R, S = weight.shape
    return (N, K, _out_size(H, R, stride[0], padding[0], padding[1], dilation[0]),
            _out_size(W, S, stride[1], padding[2], padding[3], dilation[1]))


def _channels_last(t: torch.Tensor) -> bool:
    return t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()


def _new_output(shape, like: torch.Tensor, channels_last: bool, dtype=None) -> torch.Tensor:
    dtype = dtype or like.dtype
    if channels_last:
        N, K, OH, OW = shape
        return _alloc.empty((N, OH, OW, K), dtype, like.device).permute(0, 3, 1, 2)
    return _alloc.empty(shape, dtype, like.device)


def _symmetric(padding) -> bool:
    return padding[0] == padding[1] and padding[2] == padding[3]


def _torch_z(input, weight, bias, stride, padding, dilation, groups):
    if not _symmetric(padding):
        input = F.pad(input, (padding[2], padding[3], padding[0], padding[1]))
        padding = [0, 0, 0, 0]
    return F.conv2d(input, weight, bias, stride, (padding[0], padding[2]), dilation, groups)


# ---------------------------------------------------------------------------------------------
# Backend implementations.

def _torch_fwd(input, weight, bias, stride, padding, dilation, groups, act, slope, grad=None):
    z = _torch_z(input, weight, bias, stride, padding, dilation, groups)
    if grad is None:
        out = activation_reference(z.float(), _ACT_NAMES[act], slope).to(input.dtype)
    else:
        out = (grad.float() * activation_grad_reference(z.float(), _ACT_NAMES[act], slope)).to(input.dtype)
    return out.contiguous(memory_format=torch.channels_last if _channels_last(input) else torch.contiguous_format)


def _triton_fwd(input, weight, bias, stride, padding, dilation, groups, act, slope, grad=None):
    kernels = _backend.triton_module("conv2d")
    y = _new_output(_out_shape(input, weight, stride, padding, dilation), input, _channels_last(input))
    kernels.conv2d_fwd(input, weight, bias, y, stride, (padding[0], padding[2]), dilation, groups,
                       act, slope, grad)
    return y


def _cuda_fwd(input, weight, bias, stride, padding, dilation, groups, act, slope, grad=None):
    if grad is not None:  # the GRAD recompute of the backward: Triton (see the module docstring)
        return _triton_fwd(input, weight, bias, stride, padding, dilation, groups, act, slope, grad)
    shape = _out_shape(input, weight, stride, padding, dilation)
    N, C, H, W = input.shape
    K, _, R, S = weight.shape
    OH, OW = shape[2], shape[3]
    y = _new_output(shape, input, True)                        # (N, OH, OW, K) in memory
    if y.numel() == 0:
        return y if _channels_last(input) else y.contiguous()
    x = input.permute(0, 2, 3, 1).contiguous()                 # NHWC
    w = weight.permute(0, 2, 3, 1).contiguous()                # (K, R, S, C/groups)
    b = bias.contiguous() if bias is not None else None
    _ext.ext().conv2d_fwd(x.data_ptr(), w.data_ptr(), _ext.ptr(b), y.data_ptr(), N, H, W, C, K, R, S,
                          OH, OW, stride[0], stride[1], padding[0], padding[2], dilation[0],
                          dilation[1], groups, act, float(slope), _ext.DTYPE_CODE[input.dtype],
                          _ext.stream_handle(input.device))
    return y if _channels_last(input) else y.contiguous()


_FWD = {"torch": _torch_fwd, "triton": _triton_fwd, "cuda": _cuda_fwd}


def _torch_bwd(dz, input, weight, stride, padding, dilation, groups, input_grad, weight_grad):
    x = input
    if not _symmetric(padding):
        x = F.pad(input, (padding[2], padding[3], padding[0], padding[1]))
        pad = [0, 0]
    else:
        pad = [padding[0], padding[2]]
    dx, dw, _ = torch.ops.aten.convolution_backward(
        dz, x, weight, None, list(stride), pad, list(dilation), False, [0, 0], groups,
        [input_grad, weight_grad, False])
    if input_grad and not _symmetric(padding):
        dx = dx[:, :, padding[0]:padding[0] + input.shape[2], padding[2]:padding[2] + input.shape[3]]
    return (dx.contiguous() if input_grad else None), (dw.contiguous() if weight_grad else None)


def _triton_bwd(dz, input, weight, stride, padding, dilation, groups, input_grad, weight_grad):
    kernels = _backend.triton_module("conv2d")
    pad = (padding[0], padding[2])
    dx = dw = None
    if input_grad:
        dx = _new_output(input.shape, input, _channels_last(input))
        kernels.conv2d_bwd_input(dz, weight, dx, stride, pad, dilation, groups)
    if weight_grad:
        dw = kernels.conv2d_bwd_weight(dz, input, tuple(weight.shape), stride, pad, dilation, groups,
                                       weight.dtype)
    return dx, dw


_BWD = {"torch": _torch_bwd, "triton": _triton_bwd, "cuda": _triton_bwd}


# ---------------------------------------------------------------------------------------------
# The ops.

_ARGS = "int[] stride, int[] padding, int[] dilation, int groups, int activation, float negative_slope"


def _fwd_impl(backend):
    def run(input, weight, bias, stride, padding, dilation, groups, act, slope):
        return _FWD[backend](input, weight, bias, stride, padding, dilation, groups, act, slope)
    return run


def _grad_impl(backend):
    def run(grad, input, weight, bias, stride, padding, dilation, groups, act, slope):
        return _FWD[backend](input, weight, bias, stride, padding, dilation, groups, act, slope, grad)
    return run


def _bwd_impl(backend):
    def run(dz, input, weight, stride, padding, dilation, groups, input_grad, weight_grad):
        dx, dw = _BWD[backend](dz, input, weight, stride, padding, dilation, groups, input_grad, weight_grad)
        return (dx if dx is not None else input.new_empty(0)), (dw if dw is not None else weight.new_empty(0))
    return run


def _fake_out(input, weight, stride, padding, dilation):
    shape = _out_shape(input, weight, stride, padding, dilation)
    out = input.new_empty(shape)
    return out.contiguous(memory_format=torch.channels_last) if _channels_last(input) else out


def _setup(ctx, inputs, output):
    input, weight, bias, stride, padding, dilation, groups, act, slope, backend = inputs
    ctx.save_for_backward(input, weight, bias)
    ctx.args = (stride, padding, dilation, groups)
    ctx.act, ctx.slope, ctx.backend = act, slope, backend


def _backward(ctx, grad):
    input, weight, bias = ctx.saved_tensors
    stride, padding, dilation, groups = ctx.args
    if ctx.act != 0:
        dz = conv2d_grad_op(grad, input, weight, bias, stride, padding, dilation, groups,
                            ctx.act, ctx.slope, ctx.backend)
    else:
        dz = grad
    need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    dx = dw = db = None
    if need_x or need_w:
        dx, dw = conv2d_backward_op(dz, input, weight, stride, padding, dilation, groups,
                                    need_x, need_w, ctx.backend)
        dx = dx if need_x else None
        dw = dw if need_w else None
    if bias is not None and ctx.needs_input_grad[2]:
        db = dz.sum((0, 2, 3), dtype=torch.float32).to(bias.dtype)
    return dx, dw, db, None, None, None, None, None, None, None


conv2d_backward_op = KernelOp(
    "conv2d_backward",
    "(Tensor grad, Tensor input, Tensor weight, int[] stride, int[] padding, int[] dilation, "
    "int groups, bool input_grad, bool weight_grad, str backend) -> (Tensor, Tensor)",
    {b: _bwd_impl(b) for b in _BWD},
    lambda dz, input, weight, stride, padding, dilation, groups, input_grad, weight_grad, backend: (
        (input.new_empty(input.shape).contiguous(
            memory_format=torch.channels_last if _channels_last(input) else torch.contiguous_format)
         if input_grad else input.new_empty(0)),
        weight.new_empty(weight.shape) if weight_grad else weight.new_empty(0)),
)

conv2d_grad_op = KernelOp(
    "conv2d_grad",
    f"(Tensor grad, Tensor input, Tensor weight, Tensor? bias, {_ARGS}, str backend) -> Tensor",
    {b: _grad_impl(b) for b in _FWD},
    lambda grad, input, weight, bias, stride, padding, dilation, groups, act, slope, backend:
        _fake_out(input, weight, stride, padding, dilation),
)

conv2d_op = KernelOp(
    "conv2d", f"(Tensor input, Tensor weight, Tensor? bias, {_ARGS}, str backend) -> Tensor",
    {b: _fwd_impl(b) for b in _FWD},
    lambda input, weight, bias, stride, padding, dilation, groups, act, slope, backend:
        _fake_out(input, weight, stride, padding, dilation),
    setup_context=_setup, backward=_backward,
)


# ---------------------------------------------------------------------------------------------
# Argument checks (before any launch) and backend capabilities.

def _pair(name, v, minimum):
    if type(v) is int:  # the common case, on every call's path
        if v < minimum:
            raise ValueError(f"dlh.conv2d: {name} must be >= {minimum}, got {(v, v)}")
        return [v, v]
    if isinstance(v, int) and not isinstance(v, bool):
        v = (v, v)
    if (not isinstance(v, (tuple, list)) or len(v) != 2
            or not all(isinstance(i, int) and not isinstance(i, bool) for i in v)):
        raise TypeError(f"dlh.conv2d: {name} must be an int or a pair of ints, got {v!r}")
    if any(i < minimum for i in v):
        raise ValueError(f"dlh.conv2d: {name} must be >= {minimum}, got {tuple(v)}")
    return [int(v[0]), int(v[1])]


def _check(input, weight, bias, stride, padding, dilation, groups, activation):
    """Validate; return (stride, explicit padding [t, b, l, r], dilation, activation code)."""
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"dlh.conv2d: input must be a torch.Tensor, got {type(input).__name__}")
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"dlh.conv2d: weight must be a torch.Tensor, got {type(weight).__name__}")
    if not input.is_floating_point():
        raise TypeError(f"dlh.conv2d: input must be a floating-point tensor, got {input.dtype}")
    if input.dim() != 4:
        raise ValueError(f"dlh.conv2d: input must be 4-D (N, C, H, W) or 3-D (C, H, W), got shape {list(input.shape)}")
    if weight.dim() != 4:
        raise ValueError(f"dlh.conv2d: weight must be 4-D (out_channels, in_channels/groups, kH, kW), "
                         f"got shape {list(weight.shape)}")
    if weight.dtype != input.dtype:
        raise TypeError(f"dlh.conv2d: weight dtype {weight.dtype} must equal input dtype {input.dtype}")
    if weight.device != input.device:
        raise ValueError(f"dlh.conv2d: weight is on {weight.device} but input is on {input.device}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"dlh.conv2d: activation must be one of {list(ACTIVATIONS)}, got {activation!r}")
    if not isinstance(groups, int) or isinstance(groups, bool) or groups < 1:
        raise ValueError(f"dlh.conv2d: groups must be a positive int, got {groups!r}")
    N, C, H, W = input.shape
    K, Cg, R, S = weight.shape
    if C % groups or K % groups:
        raise ValueError(f"dlh.conv2d: groups={groups} must divide in_channels ({C}) and "
                         f"out_channels ({K})")
    if Cg * groups != C:
        raise ValueError(f"dlh.conv2d: weight expects {Cg * groups} input channels "
                         f"(weight.shape[1]={Cg} x groups={groups}), input has {C}")
    if bias is not None:
        if not isinstance(bias, torch.Tensor):
            raise TypeError(f"dlh.conv2d: bias must be a torch.Tensor or None, got {type(bias).__name__}")
        if tuple(bias.shape) != (K,):
            raise ValueError(f"dlh.conv2d: bias must have shape [{K}], got {list(bias.shape)}")
        if bias.device != input.device:
            raise ValueError(f"dlh.conv2d: bias is on {bias.device} but input is on {input.device}")
        if bias.dtype != input.dtype:
            raise TypeError(f"dlh.conv2d: bias dtype {bias.dtype} must equal input dtype {input.dtype}")
    stride = _pair("stride", stride, 1)
    dilation = _pair("dilation", dilation, 1)
    if isinstance(padding, str):
        if padding == "valid":
            pad = [0, 0, 0, 0]
        elif padding == "same":
            if stride != [1, 1]:
                raise ValueError(f"dlh.conv2d: padding='same' needs stride 1, got stride {tuple(stride)}")
            th, tw = dilation[0] * (R - 1), dilation[1] * (S - 1)
            pad = [th // 2, th - th // 2, tw // 2, tw - tw // 2]
        else:
            raise ValueError(f"dlh.conv2d: padding must be an int, a pair, 'same' or 'valid', got {padding!r}")
    else:
        p = _pair("padding", padding, 0)
        pad = [p[0], p[0], p[1], p[1]]
    eff_h, eff_w = dilation[0] * (R - 1) + 1, dilation[1] * (S - 1) + 1
    if eff_h > H + pad[0] + pad[1] or eff_w > W + pad[2] + pad[3]:
        raise ValueError(f"dlh.conv2d: kernel size {R}x{S} (dilated {eff_h}x{eff_w}) is larger than the "
                         f"padded input {H + pad[0] + pad[1]}x{W + pad[2] + pad[3]}")
    return stride, pad, dilation, ACTIVATIONS[activation]


NCHW_NOTE = ("a 16-bit NCHW input: the Triton kernels' input tile cannot be loaded asynchronously "
             "(each tap shifts the contiguous w run by 2 bytes: scalar loads, no cp.async pipeline; "
             "triton_kernels/conv2d.py), so auto runs cuDNN (torch) until a GPU run says otherwise; "
             "channels_last inputs run the kernels")


def _auto_order(input) -> tuple:
    """``auto``'s order: a 16-bit NCHW input goes to cuDNN (see NCHW_NOTE); else the default."""
    if input.element_size() == 2 and input.dim() == 4 and not input.is_contiguous(memory_format=torch.channels_last):
        return ("torch",)
    return _backend.AUTO_ORDER_CUDA


def _supports(input):
    def can(backend: str):
        why = _backend.dtype_reason(backend, input.dtype)
        if why or backend == "torch":
            return why
        if backend == "cuda":
            try:
                C = _ext.ext()
            except RuntimeError as exc:
                return str(exc)
            if not hasattr(C, "conv2d_fwd"):
                return ("the compiled extension dlh_kernels._C has no conv2d_fwd (built before "
                        "csrc/conv2d.cu existed: rebuild with pip install -e .)")
        return None
    return can


# ---------------------------------------------------------------------------------------------
# Public functions.

def conv2d(input: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
           stride=1, padding=0, dilation=1, groups: int = 1, *, activation: Optional[str] = None,
           negative_slope: float = 0.01, backend: Optional[str] = None) -> torch.Tensor:
    """``act(F.conv2d(input, weight, bias, stride, padding, dilation, groups))``, the bias and
    activation in the GEMM's epilogue. activation: None, "relu", "silu", "gelu", "gelu_tanh",
    "leaky_relu" (with negative_slope), "tanh", "sigmoid". Output channels_last when the input is, else NCHW.
    The cuda backend's backward runs the Triton backward kernels."""
    unbatched = isinstance(input, torch.Tensor) and input.dim() == 3
    if unbatched:
        input = input.unsqueeze(0)
    stride, pad, dilation, act = _check(input, weight, bias, stride, padding, dilation, groups, activation)
    if activation is None and _backend.plain_torch(backend, input):  # torch backend, nobody watching
        out = _torch_z(input, weight, bias, stride, pad, dilation, groups)
        return out.squeeze(0) if unbatched else out
    be = _backend.choose("conv2d", backend, input.device.type, _supports(input), _auto_order(input))
    if be == "torch":
        with profiling.torch_range("conv2d"):
            out = activation_reference(_torch_z(input, weight, bias, stride, pad, dilation, groups),
                                       activation, negative_slope)
    else:
        out = conv2d_op(input, weight, bias, stride, pad, dilation, groups, act, float(negative_slope), be)
    return out.squeeze(0) if unbatched else out


def explain(op: str, args: dict) -> dict:
    """Per backend, "ok" or why it would not run this call; and what `auto` picks."""
    x = args["input"]
    if x.dim() == 3:
        x = x.unsqueeze(0)
    _check(x, args["weight"], args.get("bias"), args.get("stride", 1), args.get("padding", 0),
           args.get("dilation", 1), args.get("groups", 1), args.get("activation"))
    order = _auto_order(x)
    verdict = _backend.explain_choice(x.device.type, _supports(x), order)
    if order == ("torch",) and x.is_cuda:
        verdict["auto"] += f" ({NCHW_NOTE})"
    return verdict
