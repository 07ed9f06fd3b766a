"""Rotary position embedding (RoPE) of queries and keys: reference, torch ops, public function.

The kernels live in ``triton_kernels/rotary.py`` and ``csrc/rotary.cu``; this module declares
``torch.ops.dlh.rotary_embedding`` (and its backward op) and ``DF.rotary_embedding``.

Semantics: transformers' ``apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim)`` (LLaMA's, with
GPT-NeoX/Phi's partial rotary: ``rotary_dim = cos.shape[-1] < head_dim`` rotates the first
rotary_dim elements and passes the rest through). cos/sin are (batch or 1, seq, rotary_dim) in
the HF layout, broadcast over heads after ``unsqueeze(unsqueeze_dim)``:
  * ``interleaved=False`` (rotate-half): ``x * cos + rotate_half(x) * sin``; models build cos/sin
    as ``cat(freqs, freqs)``, pairs are (x[i], x[i + R/2]);
  * ``interleaved=True`` (GPT-J's ``rotate_every_two``): pairs are (x[2i], x[2i+1]), and cos/sin
    hold the ``repeat_interleave(…, 2)``'d values GPT-J's ``apply_rotary_pos_emb`` builds from its
    (…, R/2) tables: cos[..., 2i] == cos[..., 2i+1] == cos(pos * inv_freq[i]).
Both are computed element by element (``x * cos + rot(x) * sin``), so nothing assumes the
duplication; the backward is the exact transpose (``dy * cos - rot(dy * sin)``).

Numerics: cos/sin are rounded to the dtype of q first (as transformers' rotary modules return
them, ``cos.to(x.dtype)``), the rotation is fp32, the output rounded once; eager rounds the two
products and the sum in the low precision. The kernels' error against float64 (of the rounded
cos/sin) is therefore at most eager's, up to the final rounding (the suite's FLOOR).

Gradients: q and k through the kernels (the same kernel, rotating by the transpose); cos and sin,
when they require grad, in torch inside the backward (sum over heads and broadcast dims of
``dy * x`` and ``dy * rot(x)``, fp32): rare in practice (tables are buffers), so no kernel for it.

Layouts: q, k of (B, H, S, D) for unsqueeze_dim=1 or (B, S, H, D) for unsqueeze_dim=2, any batch,
head and seq strides (views out of a fused qkv projection, transposes): the kernels take them as
strides, no copy. Only a tensor whose last dim is not unit-stride is copied first. Outputs are
``torch.empty_like`` of q and k (dense layouts kept, as eager's are).
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import _alloc, _backend, _ext, profiling
from .._op import KernelOp

_OP = "rotary_embedding"


# ---------------------------------------------------------------------------------------------
# References: plain PyTorch, any dtype (the tests run them in float64).

def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """LLaMA's: (x1, x2) -> (-x2, x1) over the two halves of the last dim."""
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def rotate_every_two(x: torch.Tensor) -> torch.Tensor:
    """GPT-J's: (x[2i], x[2i+1]) -> (-x[2i+1], x[2i])."""
    return torch.stack((-x[..., 1::2], x[..., ::2]), dim=-1).flatten(-2)


def _rot(x: torch.Tensor, interleaved: bool) -> torch.Tensor:
    return rotate_every_two(x) if interleaved else rotate_half(x)


def rotary_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool = False,
                     unsqueeze_dim: int = 1) -> torch.Tensor:
    """transformers' rotation of one tensor, cos/sin cast to x's dtype, partial rotary allowed."""
    cos = cos.to(x.dtype).unsqueeze(unsqueeze_dim)
    sin = sin.to(x.dtype).unsqueeze(unsqueeze_dim)
    R = cos.shape[-1]
    if R == x.shape[-1]:  # full rotary: transformers' own two products, no slice and no cat
        return x * cos + _rot(x, interleaved) * sin
    x_rot, x_pass = x[..., :R], x[..., R:]
    return torch.cat([x_rot * cos + _rot(x_rot, interleaved) * sin, x_pass], dim=-1)


# ---------------------------------------------------------------------------------------------
# Layout: the kernels see logical (B, H, S, D) views with a unit last stride; cos/sin (Bc, Sc, R).

def _heads_view(t: torch.Tensor, unsqueeze_dim: int) -> torch.Tensor:
    return t if unsqueeze_dim == 1 else t.transpose(1, 2)


def _unit_last(t: torch.Tensor) -> torch.Tensor:
    """t itself when its last dim is unit-stride (or of size 1), else a contiguous copy."""
    return t if t.shape[-1] <= 1 or t.stride(-1) == 1 else t.contiguous()


# ---------------------------------------------------------------------------------------------
# Backend implementations on the (B, H, S, D) views; backward=True applies the transpose.

def _torch_rotary(q, k, q_out, k_out, cos, sin, interleaved, backward):
    R = cos.shape[-1]
    for x, out in ((q, q_out), (k, k_out)):
        if x is None:
            continue
        c = cos.to(x.dtype).float()[:, None]  # (Bc, 1, Sc, R): broadcast over heads
        s = sin.to(x.dtype).float()[:, None]
        xr = x[..., :R].float()
        rotated = xr * c - _rot(xr * s, interleaved) if backward else xr * c + _rot(xr, interleaved) * s
        out[..., :R] = rotated
        out[..., R:] = x[..., R:]


def _triton_rotary(q, k, q_out, k_out, cos, sin, interleaved, backward):
    kernels = _backend.triton_module("rotary")
    kernels.rotary(q, k, q_out, k_out, cos, sin, interleaved, backward)


def _bcast_strides(t: torch.Tensor) -> list[int]:
    return [0 if t.shape[0] == 1 else t.stride(0), 0 if t.shape[1] == 1 else t.stride(1)]


def _cuda_rotary(q, k, q_out, k_out, cos, sin, interleaved, backward):
    B, Hq, S, D = q.shape
    Hk = 0 if k is None else k.shape[1]
    none3 = [0, 0, 0]
    strides = (list(q.stride()[:3]) + (none3 if k is None else list(k.stride()[:3]))
               + list(q_out.stride()[:3]) + (none3 if k_out is None else list(k_out.stride()[:3]))
               + _bcast_strides(cos) + _bcast_strides(sin))
    _ext.ext().rotary(q.data_ptr(), _ext.ptr(k), q_out.data_ptr(), _ext.ptr(k_out), cos.data_ptr(),
                      sin.data_ptr(), B, Hq, Hk, S, D, cos.shape[-1], strides, interleaved, backward,
                      _ext.DTYPE_CODE[q.dtype], _ext.DTYPE_CODE[cos.dtype], _ext.stream_handle(q.device))


_ROTARY = {"torch": _torch_rotary, "triton": _triton_rotary, "cuda": _cuda_rotary}


# ---------------------------------------------------------------------------------------------
# The ops. The forward and the backward are one implementation (the backward rotates dy by the
# transpose), declared twice so that each has its own schema, fake and autograd.

def _output_for(x: torch.Tensor, unsqueeze_dim: int):
    """(out, its (B, H, S, D) view the kernel writes, or a unit-stride stand-in to copy back)."""
    out = _alloc.empty_like(x)
    view = _heads_view(out, unsqueeze_dim)
    if view.shape[-1] > 1 and view.stride(-1) != 1:  # a dense layout with D not innermost
        return out, _alloc.empty(view.shape, x.dtype, x.device), view
    return out, view, None


def _rotary_impl(backend, backward):
    def run(q, k, cos, sin, interleaved, unsqueeze_dim):
        q_out, qo, q_back = _output_for(q, unsqueeze_dim)
        k_out, ko, k_back = (q.new_empty(0), None, None) if k is None else _output_for(k, unsqueeze_dim)
        if q.numel() or (k is not None and k.numel()):
            qv = _unit_last(_heads_view(q, unsqueeze_dim))
            kv = None if k is None else _unit_last(_heads_view(k, unsqueeze_dim))
            _ROTARY[backend](qv, kv, qo, ko, _unit_last(cos), _unit_last(sin), interleaved, backward)
            for back, stand_in in ((q_back, qo), (k_back, ko)):
                if back is not None:
                    back.copy_(stand_in)
        return q_out, k_out
    return run


def _rotary_fake(q, k, cos, sin, interleaved, unsqueeze_dim, backend):
    return torch.empty_like(q), (q.new_empty(0) if k is None else torch.empty_like(k))


def _rotary_setup(ctx, inputs, output):
    q, k, cos, sin, interleaved, unsqueeze_dim, backend = inputs
    table_grad = cos.requires_grad or sin.requires_grad
    # q and k are kept only for the cos/sin gradients (the q/k gradients need only cos/sin)
    ctx.save_for_backward(cos, sin, q if table_grad else None, k if table_grad else None)
    ctx.has_k, ctx.interleaved, ctx.unsqueeze_dim, ctx.backend = k is not None, interleaved, unsqueeze_dim, backend


def _table_grads(ctx, grads, xs, cos, sin):
    """d cos and d sin (torch, fp32): sum of dy * x and dy * rot(x) over heads and broadcast dims."""
    R = cos.shape[-1]
    dcos = dsin = None
    for dy, x in zip(grads, xs):
        if x is None:
            continue
        dyr, xr = dy[..., :R].float(), x[..., :R].float()
        gc = (dyr * xr).sum(ctx.unsqueeze_dim)            # (B, S, R)
        gs = (dyr * _rot(xr, ctx.interleaved)).sum(ctx.unsqueeze_dim)
        dcos, dsin = (gc, gs) if dcos is None else (dcos + gc, dsin + gs)
    reduce = [d for d in (0, 1) if cos.shape[d] == 1 and dcos.shape[d] != 1]
    if reduce:
        dcos, dsin = dcos.sum(reduce, keepdim=True), dsin.sum(reduce, keepdim=True)
    return dcos.to(cos.dtype), dsin.to(sin.dtype)


def _rotary_backward(ctx, grad_q, grad_k):
    cos, sin, q, k = ctx.saved_tensors
    gk = grad_k if ctx.has_k else None
    dq, dk = rotary_embedding_backward_op(grad_q, gk, cos, sin, ctx.interleaved, ctx.unsqueeze_dim, ctx.backend)
    dcos = dsin = None
    if ctx.needs_input_grad[2] or ctx.needs_input_grad[3]:
        dcos, dsin = _table_grads(ctx, (grad_q, gk), (q, k), cos, sin)
    return (dq, dk if ctx.has_k else None,
            dcos if ctx.needs_input_grad[2] else None, dsin if ctx.needs_input_grad[3] else None,
            None, None, None)


_SCHEMA = ("(Tensor {x}, Tensor? {y}, Tensor cos, Tensor sin, bool interleaved, int unsqueeze_dim, "
           "str backend) -> (Tensor, Tensor)")

rotary_embedding_backward_op = KernelOp(
    "rotary_embedding_backward", _SCHEMA.format(x="grad_q", y="grad_k"),
    {b: _rotary_impl(b, backward=True) for b in _ROTARY}, _rotary_fake,
)

rotary_embedding_op = KernelOp(
    "rotary_embedding", _SCHEMA.format(x="q", y="k"),
    {b: _rotary_impl(b, backward=False) for b in _ROTARY}, _rotary_fake,
    setup_context=_rotary_setup, backward=_rotary_backward,
)


# ---------------------------------------------------------------------------------------------
# Argument checks (before any launch) and backend capabilities.

_LAYOUT = {1: "(batch, heads, seq, head_dim)", 2: "(batch, seq, heads, head_dim)"}


def _check_tensor(name: str, t, dim: int, what: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"dlh.{_OP}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"dlh.{_OP}: {name} must be a floating-point tensor, got {t.dtype}")
    if t.dim() != dim:
        raise ValueError(f"dlh.{_OP}: {name} must be {dim}-D {what}, got shape {list(t.shape)}")


def _check_rotary(q, k, cos, sin, unsqueeze_dim) -> int:
    """Validates the call; returns unsqueeze_dim normalised to 1 or 2."""
    if isinstance(unsqueeze_dim, bool) or unsqueeze_dim not in (1, 2, -3, -2):
        raise ValueError(f"dlh.{_OP}: unsqueeze_dim must be 1 (q, k as (batch, heads, seq, head_dim)) or 2 "
                         f"((batch, seq, heads, head_dim)), got {unsqueeze_dim!r}")
    dim = unsqueeze_dim % 4 if unsqueeze_dim > 0 else unsqueeze_dim + 4  # -3 -> 1, -2 -> 2
    layout = _LAYOUT[dim]
    _check_tensor("q", q, 4, f"{layout} for unsqueeze_dim={dim}")
    head_axis, seq_axis = (1, 2) if dim == 1 else (2, 1)
    B, S, D = q.shape[0], q.shape[seq_axis], q.shape[3]
    if k is not None:
        _check_tensor("k", k, 4, f"{layout} for unsqueeze_dim={dim}")
        if k.device != q.device:
            raise ValueError(f"dlh.{_OP}: k is on {k.device} but q is on {q.device}")
        if k.dtype != q.dtype:
            raise TypeError(f"dlh.{_OP}: k dtype {k.dtype} must equal q dtype {q.dtype}")
        if (k.shape[0], k.shape[seq_axis], k.shape[3]) != (B, S, D):
            raise ValueError(f"dlh.{_OP}: k {list(k.shape)} must match q {list(q.shape)} in batch, seq and "
                             f"head_dim (only the head count may differ) for layout {layout}")
    for name, t in (("cos", cos), ("sin", sin)):
        _check_tensor(name, t, 3, "(batch or 1, seq, rotary_dim)")
        if t.device != q.device:
            raise ValueError(f"dlh.{_OP}: {name} is on {t.device} but q is on {q.device}")
    if cos.shape != sin.shape:
        raise ValueError(f"dlh.{_OP}: cos {list(cos.shape)} and sin {list(sin.shape)} must have the same shape")
    R = cos.shape[-1]
    if R % 2 or R == 0 or R > D:
        raise ValueError(f"dlh.{_OP}: rotary_dim (cos.shape[-1]) must be even, positive and <= head_dim "
                         f"{D}, got {R}")
    if cos.shape[0] not in (1, B) or cos.shape[1] not in (1, S):
        raise ValueError(f"dlh.{_OP}: cos/sin {list(cos.shape)} must be (batch or 1, seq or 1, rotary_dim) "
                         f"with batch {B} and seq {S} of q {list(q.shape)} (layout {layout})")
    return dim


def _supports(q: torch.Tensor):
    def can(backend: str) -> Optional[str]:
        why = _backend.dtype_reason(backend, q.dtype, "q/k")
        if why or backend != "cuda":
            return why
        if _ext.load_error() is None and not hasattr(_ext.ext(), "rotary"):
            return "the installed CUDA extension predates csrc/rotary.cu: reinstall (pip install -e .)"
        return None
    return can


def _kernel_tables(q, cos, sin):
    """cos/sin as the kernels take them: both fp32, or both in q's dtype (a cast of the small
    tables otherwise: the kernels round them to q's dtype anyway, so the result is the same)."""
    if cos.dtype == sin.dtype and cos.dtype in (q.dtype, torch.float32):
        return cos, sin
    return cos.to(q.dtype), sin.to(q.dtype)


# ---------------------------------------------------------------------------------------------
# Public function (exported by dlh_kernels.functional).

def rotary_embedding(q: torch.Tensor, k: Optional[torch.Tensor], cos: torch.Tensor, sin: torch.Tensor, *,
                     interleaved: bool = False, unsqueeze_dim: int = 1,
                     backend: Optional[str] = None) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """transformers' ``apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim)``, partial rotary
    (``cos.shape[-1] < head_dim``), GPT-J's interleaved pairs (``interleaved=True``), k of another
    head count (GQA) or None. Returns ``(q_out, k_out)`` (``k_out`` None when k is None)."""
    dim = _check_rotary(q, k, cos, sin, unsqueeze_dim)
    if _backend.plain_torch(backend, q):  # the torch backend, nobody watching
        if cos.shape[-1] == q.shape[-1] and (k is None or k.dtype == q.dtype):
            # full rotary: transformers' own lines, cos/sin cast and unsqueezed once for q and k
            c, s = cos.to(q.dtype).unsqueeze(dim), sin.to(q.dtype).unsqueeze(dim)
            rot = rotate_every_two if interleaved else rotate_half
            return q * c + rot(q) * s, None if k is None else k * c + rot(k) * s
        return (rotary_reference(q, cos, sin, interleaved, dim),
                None if k is None else rotary_reference(k, cos, sin, interleaved, dim))
    be = _backend.choose(_OP, backend, q.device.type, _supports(q))
    if be == "torch":
        with profiling.torch_range(_OP):
            q_out = rotary_reference(q, cos, sin, interleaved, dim)
            return q_out, (None if k is None else rotary_reference(k, cos, sin, interleaved, dim))
    cos, sin = _kernel_tables(q, cos, sin)
    q_out, k_out = rotary_embedding_op(q, k, cos, sin, bool(interleaved), dim, be)
    return q_out, (None if k is None else k_out)


def explain(op: str, args: dict) -> dict:
    """Per backend, "ok" or why it would not run this call; and what `auto` picks."""
    q = args["q"]
    _check_rotary(q, args["k"], args["cos"], args["sin"], args["unsqueeze_dim"])
    return _backend.explain_choice(q.device.type, _supports(q))
