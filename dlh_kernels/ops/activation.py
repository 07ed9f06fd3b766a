"""SiLU, ReLU, LeakyReLU, SwiGLU and gated GELU: references, torch ops, public functions.

The kernels live in ``triton_kernels/activation.py`` and ``csrc/activation.cu``; this module
declares the ops (``torch.ops.dlh.activation`` for the pointwise ones, ``gated_activation`` for
``a(gate) * up``, and their backward ops) and the functions of the public API.

The gated ops take gate and up as two (M, N) row views with their own row strides: the two
halves of one fused ``gate_up_proj`` output (``up=None``) or of any matmul output reach the
kernels without a copy, and with ``up=None`` the backward writes one (..., 2N) gradient.
"""
from __future__ import annotations

import math
from numbers import Real
from typing import Optional

import torch
import torch.nn.functional as F

from .. import _alloc, _backend, _ext, profiling
from .._op import KernelOp
from .gelu import (_check_approximate, _elementwise, _flat, _out_rows, _same_dense_layout, gelu_grad_reference,
                   gelu_reference)
from .layer_norm import _rows

# Activation codes, shared with triton_kernels/activation.py and csrc/activation.cu.
SILU, RELU, LEAKY_RELU = 0, 1, 2
GATED_SILU, GATED_GELU, GATED_GELU_TANH = 0, 1, 2


# ---------------------------------------------------------------------------------------------
# References: plain PyTorch, any dtype (the tests run them in float64).

def silu_reference(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(x)


def relu_reference(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x > 0, x, torch.zeros_like(x))


def leaky_relu_reference(x: torch.Tensor, negative_slope: float = 0.01) -> torch.Tensor:
    return torch.where(x > 0, x, x * negative_slope)


def unary_reference(x: torch.Tensor, act: int, negative_slope: float = 0.0) -> torch.Tensor:
    if act == SILU:
        return silu_reference(x)
    if act == RELU:
        return relu_reference(x)
    return leaky_relu_reference(x, negative_slope)


def unary_grad_reference(x: torch.Tensor, act: int, negative_slope: float = 0.0) -> torch.Tensor:
    """f'(x); at x = 0 the one torch uses (0 for relu, negative_slope for leaky_relu)."""
    if act == SILU:
        s = torch.sigmoid(x)
        return s * (1 + x * (1 - s))
    return torch.where(x > 0, torch.ones_like(x), torch.full_like(x, negative_slope if act == LEAKY_RELU else 0.0))


def gate_reference(g: torch.Tensor, act: int) -> torch.Tensor:
    return silu_reference(g) if act == GATED_SILU else gelu_reference(g, act == GATED_GELU_TANH)


def gate_grad_reference(g: torch.Tensor, act: int) -> torch.Tensor:
    if act == GATED_SILU:
        return unary_grad_reference(g, SILU)
    return gelu_grad_reference(g, act == GATED_GELU_TANH)


def _halves(gate: torch.Tensor, up: Optional[torch.Tensor]):
    return gate.chunk(2, -1) if up is None else (gate, up)


def swiglu_reference(gate: torch.Tensor, up: Optional[torch.Tensor] = None) -> torch.Tensor:
    g, u = _halves(gate, up)
    return silu_reference(g) * u


def gated_gelu_reference(gate: torch.Tensor, up: Optional[torch.Tensor] = None, approximate: str = "none"):
    g, u = _halves(gate, up)
    return gelu_reference(g, approximate == "tanh") * u


# ---------------------------------------------------------------------------------------------
# Backend implementations on (M, N) row views (unit column stride, any row stride).

def _torch_unary_fwd(x, y, act, slope):
    y.copy_(unary_reference(x.float(), act, slope))


def _torch_unary_bwd(dy, x, dx, act, slope):
    dx.copy_(dy.float() * unary_grad_reference(x.float(), act, slope))


def _triton_unary_fwd(x, y, act, slope):
    kernels = _backend.triton_module("activation")
    kernels.activation_fwd(x, y, act, slope)


def _triton_unary_bwd(dy, x, dx, act, slope):
    kernels = _backend.triton_module("activation")
    kernels.activation_bwd(dy, x, dx, act, slope)


def _cuda_unary_fwd(x, y, act, slope, rows=None):
    """rows: (M, N, row strides of x and y) of tensors passed whole (one flat row in storage
    order, no views made), else x and y are (M, N) row views."""
    M, N, sx, sy = rows or (*x.shape, x.stride(0), y.stride(0))
    _ext.ext().activation_fwd(x.data_ptr(), y.data_ptr(), M, N, sx, sy, act, slope,
                              _ext.DTYPE_CODE[x.dtype], _ext.stream_handle(x.device))


def _cuda_unary_bwd(dy, x, dx, act, slope, rows=None):
    M, N, sdy, sx, sdx = rows or (*x.shape, dy.stride(0), x.stride(0), dx.stride(0))
    _ext.ext().activation_bwd(dy.data_ptr(), x.data_ptr(), dx.data_ptr(), M, N, sdy, sx, sdx, act,
                              slope, _ext.DTYPE_CODE[x.dtype], _ext.stream_handle(x.device))


def _torch_gated_fwd(g, u, y, act):
    y.copy_(gate_reference(g.float(), act) * u.float())


def _torch_gated_bwd(dy, g, u, dg, du, act):
    gf, dyf = g.float(), dy.float()
    dg.copy_(dyf * u.float() * gate_grad_reference(gf, act))
    du.copy_(dyf * gate_reference(gf, act))


def _triton_gated_fwd(g, u, y, act):
    kernels = _backend.triton_module("activation")
    kernels.gated_fwd(g, u, y, act)


def _triton_gated_bwd(dy, g, u, dg, du, act):
    kernels = _backend.triton_module("activation")
    kernels.gated_bwd(dy, g, u, dg, du, act)


def _cuda_gated_fwd(g, u, y, act, rows=None):
    """rows: as in _cuda_unary_fwd (whole dense tensors: (1, numel) and its row strides)."""
    M, N, sg, su, sy = rows or (*g.shape, g.stride(0), u.stride(0), y.stride(0))
    _ext.ext().gated_fwd(g.data_ptr(), u.data_ptr(), y.data_ptr(), M, N, sg, su, sy,
                         act, _ext.DTYPE_CODE[g.dtype], _ext.stream_handle(g.device))


def _cuda_gated_bwd(dy, g, u, dg, du, act, rows=None):
    M, N, *strides = rows or (*g.shape, dy.stride(0), g.stride(0), u.stride(0), dg.stride(0), du.stride(0))
    _ext.ext().gated_bwd(dy.data_ptr(), g.data_ptr(), u.data_ptr(), dg.data_ptr(), du.data_ptr(), M, N,
                         *strides, act, _ext.DTYPE_CODE[g.dtype], _ext.stream_handle(g.device))


_UNARY_FWD = {"torch": _torch_unary_fwd, "triton": _triton_unary_fwd, "cuda": _cuda_unary_fwd}
_UNARY_BWD = {"torch": _torch_unary_bwd, "triton": _triton_unary_bwd, "cuda": _cuda_unary_bwd}
_GATED_FWD = {"torch": _torch_gated_fwd, "triton": _triton_gated_fwd, "cuda": _cuda_gated_fwd}
_GATED_BWD = {"torch": _torch_gated_bwd, "triton": _triton_gated_bwd, "cuda": _cuda_gated_bwd}


def _elementwise_pair(run, outs: list, ins: list, flat: bool) -> None:
    """_elementwise with two outputs: run(*in_rows, *out_rows); copies back where an output has
    no row view."""
    if outs[0].numel() == 0:
        return
    if flat:
        run(*[_flat(t) for t in ins], *[_flat(o) for o in outs])
        return
    n = outs[0].shape[-1]
    rows = [_out_rows(o, n) for o in outs]
    run(*[_rows(t, n) for t in ins], *[r if stand_in is None else stand_in for r, stand_in in rows])
    for o, (_, stand_in) in zip(outs, rows):
        if stand_in is not None:
            o.copy_(stand_in.view(o.shape))


# ---------------------------------------------------------------------------------------------
# The ops.

def _activation_impl(backend):
    def run(input, act, negative_slope):
        y = _alloc.empty_like(input)  # dense inputs: the output keeps their layout, like eager
        if backend == "cuda" and _same_dense_layout(input, y):  # pointers only: no flat views
            n = input.numel()
            if n:
                _cuda_unary_fwd(input, y, act, negative_slope, (1, n, n, n))
            return y
        return _elementwise(lambda x, out: _UNARY_FWD[backend](x, out, act, negative_slope), y, [input],
                            _same_dense_layout(input, y))
    return run


def _activation_backward_impl(backend):
    def run(grad, input, act, negative_slope):
        dx = _alloc.empty_like(input)
        if backend == "cuda" and _same_dense_layout(grad, input, dx):
            n = input.numel()
            if n:
                _cuda_unary_bwd(grad, input, dx, act, negative_slope, (1, n, n, n, n))
            return dx
        return _elementwise(lambda dy, x, out: _UNARY_BWD[backend](dy, x, out, act, negative_slope), dx,
                            [grad, input], _same_dense_layout(grad, input, dx))
    return run


def _activation_setup(ctx, inputs, output):
    input, act, negative_slope, backend = inputs
    ctx.save_for_backward(input)  # f' is recomputed from the input: nothing else is kept
    ctx.act, ctx.negative_slope, ctx.backend = act, negative_slope, backend


def _activation_backward(ctx, grad):
    (input,) = ctx.saved_tensors
    return activation_backward_op(grad, input, ctx.act, ctx.negative_slope, ctx.backend), None, None, None


activation_backward_op = KernelOp(
    "activation_backward",
    "(Tensor grad, Tensor input, int act, float negative_slope, str backend) -> Tensor",
    {b: _activation_backward_impl(b) for b in _UNARY_BWD},
    lambda grad, input, act, negative_slope, backend: torch.empty_like(input),
)

activation_op = KernelOp(
    "activation", "(Tensor input, int act, float negative_slope, str backend) -> Tensor",
    {b: _activation_impl(b) for b in _UNARY_FWD},
    lambda input, act, negative_slope, backend: torch.empty_like(input),
    setup_context=_activation_setup, backward=_activation_backward,
)


# gated_activation: up None means gate holds [gate | up] along its last dim (2H).

def _gated_impl(backend):
    def run(gate, up, act):
        if up is None:
            h = gate.shape[-1] // 2
            y = _alloc.empty(gate.shape[:-1] + (h,), gate.dtype, gate.device)
            if y.numel() > 0:
                x = _rows(gate, 2 * h)  # a view whenever the leading dims collapse
                _GATED_FWD[backend](x[:, :h], x[:, h:], y.view(-1, h), act)
            return y
        y = _alloc.empty_like(gate)
        if backend == "cuda" and _same_dense_layout(gate, up, y):  # pointers only: no flat views
            n = y.numel()
            if n:
                _cuda_gated_fwd(gate, up, y, act, (1, n, n, n, n))
            return y
        return _elementwise(lambda g, u, out: _GATED_FWD[backend](g, u, out, act), y, [gate, up],
                            _same_dense_layout(gate, up, y))
    return run


def _gated_backward_impl(backend):
    def run(grad, gate, up, act):
        if up is None:
            h = gate.shape[-1] // 2
            dx = _alloc.empty(gate.shape, gate.dtype, gate.device)  # one (..., 2H) gradient, no cat
            if dx.numel() > 0:
                x, dxr = _rows(gate, 2 * h), dx.view(-1, 2 * h)
                _GATED_BWD[backend](_rows(grad, h), x[:, :h], x[:, h:], dxr[:, :h], dxr[:, h:], act)
            return dx, gate.new_empty(0)
        dg, du = _alloc.empty_like(gate), _alloc.empty_like(up)
        if backend == "cuda" and _same_dense_layout(grad, gate, up, dg, du):
            n = dg.numel()
            if n:
                _cuda_gated_bwd(grad, gate, up, dg, du, act, (1, n, n, n, n, n, n))
            return dg, du
        _elementwise_pair(lambda dy, g, u, og, ou: _GATED_BWD[backend](dy, g, u, og, ou, act), [dg, du],
                          [grad, gate, up], _same_dense_layout(grad, gate, up, dg, du))
        return dg, du
    return run


def _gated_setup(ctx, inputs, output):
    gate, up, act, backend = inputs
    ctx.save_for_backward(gate, up)
    ctx.act, ctx.backend = act, backend


def _gated_backward(ctx, grad):
    gate, up = ctx.saved_tensors
    dg, du = gated_backward_op(grad, gate, up, ctx.act, ctx.backend)
    return dg, (du if up is not None else None), None, None


def _gated_backward_fake(grad, gate, up, act, backend):
    if up is None:
        return gate.new_empty(gate.shape), gate.new_empty(0)
    return torch.empty_like(gate), torch.empty_like(up)


def _gated_fake(gate, up, act, backend):
    if up is None:
        return gate.new_empty(gate.shape[:-1] + (gate.shape[-1] // 2,))
    return torch.empty_like(gate)


gated_backward_op = KernelOp(
    "gated_activation_backward",
    "(Tensor grad, Tensor gate, Tensor? up, int act, str backend) -> (Tensor, Tensor)",
    {b: _gated_backward_impl(b) for b in _GATED_BWD}, _gated_backward_fake,
)

gated_op = KernelOp(
    "gated_activation", "(Tensor gate, Tensor? up, int act, str backend) -> Tensor",
    {b: _gated_impl(b) for b in _GATED_FWD}, _gated_fake,
    setup_context=_gated_setup, backward=_gated_backward,
)


# ---------------------------------------------------------------------------------------------
# Argument checks (before any launch) and backend capabilities.

def _check_tensor(op: str, name: str, t) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"dlh.{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"dlh.{op}: {name} must be a floating-point tensor, got {t.dtype}")


def _check_slope(negative_slope) -> float:
    if type(negative_slope) is float and math.isfinite(negative_slope):
        return negative_slope  # the common case, without the ABC check of Real (~0.5 us)
    if isinstance(negative_slope, bool) or not isinstance(negative_slope, Real):
        raise TypeError(f"dlh.leaky_relu: negative_slope must be a real number, got "
                        f"{type(negative_slope).__name__}")
    if not math.isfinite(negative_slope):
        raise ValueError(f"dlh.leaky_relu: negative_slope must be finite, got {negative_slope}")
    return float(negative_slope)


def _check_gated(op: str, gate, up) -> None:
    _check_tensor(op, "gate", gate)
    if up is None:
        if gate.dim() == 0 or gate.shape[-1] % 2:
            raise ValueError(f"dlh.{op}: with up=None the last dim of gate must be even (gate and up "
                             f"halves), got shape {list(gate.shape)}")
        return
    _check_tensor(op, "up", up)
    if up.shape != gate.shape:
        raise ValueError(f"dlh.{op}: up must have the shape of gate {list(gate.shape)} (no broadcast), "
                         f"got {list(up.shape)}")
    if up.device != gate.device:
        raise ValueError(f"dlh.{op}: up is on {up.device} but gate is on {gate.device}")
    if up.dtype != gate.dtype:
        raise TypeError(f"dlh.{op}: up dtype {up.dtype} must equal gate dtype {gate.dtype}")


def _supports(x: torch.Tensor):
    def can(backend: str):
        why = _backend.dtype_reason(backend, x.dtype)
        if why or backend != "cuda":
            return why
        if _ext.load_error() is None and not hasattr(_ext.ext(), "activation_fwd"):
            return "the built dlh_kernels._C predates csrc/activation.cu: reinstall (pip install -e .)"
        return None
    return can


# ---------------------------------------------------------------------------------------------
# Public functions (exported by dlh_kernels.functional).

def _unary(op: str, input, act: int, negative_slope: float, backend: Optional[str], eager):
    be = _backend.choose(op, backend, input.device.type, _supports(input))
    if be == "torch":
        with profiling.torch_range(op):
            return eager()
    return activation_op(input, act, negative_slope, be)


def silu(input: torch.Tensor, *, backend: Optional[str] = None) -> torch.Tensor:
    """`torch.nn.functional.silu`: ``input * sigmoid(input)``."""
    _check_tensor("silu", "input", input)
    if _backend.plain_torch(backend, input):  # the torch backend, nobody watching: F.* at once
        return F.silu(input)
    return _unary("silu", input, SILU, 0.0, backend, lambda: F.silu(input))


def relu(input: torch.Tensor, *, backend: Optional[str] = None) -> torch.Tensor:
    """`torch.nn.functional.relu`."""
    _check_tensor("relu", "input", input)
    if _backend.plain_torch(backend, input):
        return F.relu(input)
    return _unary("relu", input, RELU, 0.0, backend, lambda: F.relu(input))


def leaky_relu(input: torch.Tensor, negative_slope: float = 0.01, *, backend: Optional[str] = None) -> torch.Tensor:
    """`torch.nn.functional.leaky_relu`: ``input`` where positive, ``negative_slope * input`` elsewhere."""
    _check_tensor("leaky_relu", "input", input)
    slope = _check_slope(negative_slope)
    if _backend.plain_torch(backend, input):
        return F.leaky_relu(input, slope)
    return _unary("leaky_relu", input, LEAKY_RELU, slope, backend, lambda: F.leaky_relu(input, slope))


def _gated(op: str, gate, up, act: int, backend: Optional[str], eager):
    _check_gated(op, gate, up)
    if _backend.plain_torch(backend, gate):  # the torch backend, nobody watching
        return eager(*_halves(gate, up))
    be = _backend.choose(op, backend, gate.device.type, _supports(gate))
    if be == "torch":
        with profiling.torch_range(op):
            return eager(*_halves(gate, up))
    return gated_op(gate, up, act, be)


def swiglu(gate: torch.Tensor, up: Optional[torch.Tensor] = None, *, backend: Optional[str] = None) -> torch.Tensor:
    """``silu(gate) * up`` (LLaMA's MLP). ``up=None``: ``gate, up = gate.chunk(2, -1)``, gate first,
    as in Phi-3's fused ``gate_up_proj``. gate and up: one shape, any strides (no copy of views)."""
    return _gated("swiglu", gate, up, GATED_SILU, backend, lambda g, u: F.silu(g) * u)


def gated_gelu(gate: torch.Tensor, up: Optional[torch.Tensor] = None, approximate: str = "none", *,
               backend: Optional[str] = None) -> torch.Tensor:
    """``gelu(gate, approximate) * up`` (T5's gated-gelu MLP: ``gelu(wi_0(x)) * wi_1(x)``); ``up=None``
    as in `swiglu`."""
    tanh = _check_approximate("gated_gelu", approximate)
    act = GATED_GELU_TANH if tanh else GATED_GELU
    return _gated("gated_gelu", gate, up, act, backend, lambda g, u: F.gelu(g, approximate=approximate) * u)


def explain(op: str, args: dict) -> dict:
    """Per backend, "ok" or why it would not run this call; and what `auto` picks."""
    if op in ("swiglu", "gated_gelu"):
        if op == "gated_gelu":
            _check_approximate(op, args["approximate"])
        _check_gated(op, args["gate"], args["up"])
        x = args["gate"]
    else:
        x = args["input"]
        _check_tensor(op, "input", x)
        if op == "leaky_relu":
            _check_slope(args["negative_slope"])
    return _backend.explain_choice(x.device.type, _supports(x))
