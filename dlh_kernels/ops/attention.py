"""Scaled-dot-product attention: reference, torch ops, public function.

The kernels live in ``triton_kernels/attention.py`` and ``csrc/attention.cu``. This
module declares ``torch.ops.dlh.attention`` (forward: output and the per-row log-sum-exp) and
``torch.ops.dlh.attention_backward`` (dQ, dK, dV and the additive mask's gradient), and
`scaled_dot_product_attention`, a drop-in for ``torch.nn.functional.scaled_dot_product_attention``.

The ops see canonical 4-D views: query (B, Hq, L, D), key (B, Hkv, S, D), value (B, Hkv, S, Dv)
with Hq a multiple of Hkv, and the mask as (mB, mH, mL, mS), each dim 1 or the full size. The
public function gets there with views (expand, reshape) whose autograd sums the gradients back
onto broadcast inputs; the kernels read broadcast dims through stride 0 and never copy them.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from .. import _alloc, _backend, _ext, profiling
from .._op import KernelOp

_LOG2E = 1.4426950408889634
MAX_HEAD_DIM = 256


# ---------------------------------------------------------------------------------------------
# Reference: plain PyTorch, any dtype (the tests run it in float64), O(L*S) memory.

def attention_reference(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False,
                        scale=None, enable_gqa=False, *, keep=None):
    """torch's SDPA written out. keep: the dropout keep mask (bool, broadcastable to the scores),
    required when dropout_p > 0. Fully masked rows give zeros (as torch's math backend)."""
    L, S = query.size(-2), key.size(-2)
    scale = 1.0 / math.sqrt(query.size(-1)) if scale is None else scale
    if enable_gqa and query.dim() >= 3:
        key = key.repeat_interleave(query.size(-3) // key.size(-3), -3)
        value = value.repeat_interleave(query.size(-3) // value.size(-3), -3)
    scores = query @ key.transpose(-2, -1) * scale
    if is_causal:
        allowed = torch.ones(L, S, dtype=torch.bool, device=query.device).tril()
        scores = scores.masked_fill(~allowed, float("-inf"))
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        else:
            scores = scores + attn_mask.to(scores.dtype)
    dead = (scores == float("-inf")).all(-1, keepdim=True)
    probs = torch.softmax(scores.masked_fill(dead, 0.0), -1).masked_fill(dead, 0.0)
    if dropout_p > 0.0:
        if keep is None:
            raise ValueError("attention_reference: dropout_p > 0 needs the keep mask")
        probs = probs * keep / (1.0 - dropout_p)
    return probs @ value


# ---------------------------------------------------------------------------------------------
# Dropout seeds: one int64 drawn from torch's generator of the query's device per call.

def draw_seed(device: torch.device) -> torch.Tensor:
    """The Philox seed of one attention call's dropout: (1,) int64 on ``device``, drawn from
    torch's default generator there (so ``torch.manual_seed`` reproduces it, CUDA graphs
    replay it, and no host sync happens)."""
    return torch.randint(0, 2**62, (1,), dtype=torch.int64, device=device)


def dropout_mask(query, key, dropout_p: float, seed: torch.Tensor) -> torch.Tensor:
    """The keep mask (B, Hq, L, S) the Triton kernels draw for ``seed`` (a debug helper).

    query, key: the call's 4-D query (B, Hq, L, D) and key (B, Hkv, S, D), or their shapes.
    Tests reproduce a call's mask with ``torch.manual_seed(s)`` before the call and before
    ``draw_seed(device)`` (the call draws its seed exactly like that).
    """
    kernels = _backend.triton_module("attention")
    B, Hq, L = tuple(getattr(query, "shape", query))[:3]
    S = tuple(getattr(key, "shape", key))[2]
    return kernels.dropout_keep_mask(seed, B, Hq, L, S, dropout_p)


def dropout_keep_reference(seed: int, B: int, H: int, L: int, S: int, dropout_p: float) -> torch.Tensor:
    """The kernels' keep stream written out (NumPy, CPU; for tests): (B, H, L, S) bool.

    One Philox4x32-10 call per 4 consecutive keys of a row: for head bh = b * H + h, row i and
    key group j (keys 4j .. 4j + 3), the counter is (c, c >> 32, 0, 0) with the 64-bit
    c = (bh * L + i) * ceil(S / 4) + j, the key (seed low word, seed high word); output word w
    becomes Triton's uniform u = (w as int32, bitwise-negated if negative) * 4.6566127342e-10
    in fp32 (tl.rand4x), and key 4j + w is kept when u >= dropout_p (fp32). The Triton kernels
    (attention._keep) and the CUDA kernels (attention.cu, keep_bits) draw exactly this."""
    import numpy as np
    M32 = np.uint64(0xFFFFFFFF)
    G = -(-S // 4)
    counter = np.arange(B * H * L * G, dtype=np.uint64)
    c0, c1 = counter & M32, counter >> np.uint64(32)
    c2 = c3 = np.zeros_like(counter)
    seed = int(seed) & (2**64 - 1)
    k0, k1 = np.uint64(seed & 0xFFFFFFFF), np.uint64(seed >> 32)
    for _ in range(10):
        prod_b = np.uint64(0xCD9E8D57) * c2   # exact: both factors < 2^32
        prod_a = np.uint64(0xD2511F53) * c0
        c0, c2 = (prod_b >> np.uint64(32)) ^ c1 ^ k0, (prod_a >> np.uint64(32)) ^ c3 ^ k1
        c1, c3 = prod_b & M32, prod_a & M32
        k0, k1 = (k0 + np.uint64(0x9E3779B9)) & M32, (k1 + np.uint64(0xBB67AE85)) & M32
    words = np.stack([c0, c1, c2, c3], -1).astype(np.uint32).view(np.int32)   # (B*H*L*G, 4)
    words = np.where(words < 0, ~words, words)
    uniform = words.astype(np.float32) * np.float32(4.6566127342e-10)
    keep = uniform.reshape(B, H, L, 4 * G)[..., :S] >= np.float32(dropout_p)
    return torch.from_numpy(np.ascontiguousarray(keep))


# ---------------------------------------------------------------------------------------------
# Backend implementations on the canonical 4-D views.

def _dense_scores(q, k, mask, is_causal, scale):
    """fp32 scores (B, Hq, L, S) in base 2, masks applied (the torch backend of the ops)."""
    group = q.shape[1] // k.shape[1]
    kf = k.float().repeat_interleave(group, 1)
    s = (q.float() @ kf.transpose(-2, -1)) * (scale * _LOG2E)
    L, S = s.shape[-2:]
    if is_causal:
        s = s.masked_fill(~torch.ones(L, S, dtype=torch.bool, device=s.device).tril(), float("-inf"))
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else s + mask.float() * _LOG2E
    return s


def _torch_keep(seed, shape, dropout_p, device):
    """The torch backend's own keep mask for a seed (self-consistent between its forward and
    backward; not the Triton kernels' Philox stream)."""
    g = torch.Generator(device=device).manual_seed(int(seed.item()) & (2**63 - 1))
    return torch.rand(shape, generator=g, device=device) >= dropout_p


def _torch_fwd(q, k, v, mask, seed, dropout_p, is_causal, scale):
    s = _dense_scores(q, k, mask, is_causal, scale)
    m = s.amax(-1, keepdim=True)
    dead = m == float("-inf")
    p = torch.exp2(s - torch.where(dead, 0.0, m))
    l = p.sum(-1, keepdim=True)
    lse = torch.where(dead | (l == 0), float("inf"), m + torch.log2(l)).squeeze(-1)
    p = p / torch.where(l == 0, 1.0, l)
    if dropout_p > 0.0:
        p = p * _torch_keep(seed, p.shape, dropout_p, q.device) / (1.0 - dropout_p)
    group = q.shape[1] // k.shape[1]
    out = p @ v.float().repeat_interleave(group, 1)
    return out.to(q.dtype), lse


def _triton_fwd(q, k, v, mask, seed, dropout_p, is_causal, scale):
    kernels = _backend.triton_module("attention")
    q, k, v = (t if kernels.fits_int32(t) else t.contiguous() for t in (q, k, v))
    B, Hq, L, _ = q.shape
    out = _alloc.empty((B, Hq, L, v.shape[3]), q.dtype, q.device)
    lse = _alloc.empty((B, Hq, L), torch.float32, q.device)
    kernels.attention_fwd(q, k, v, mask, seed, dropout_p, is_causal, scale, out, lse)
    return out, lse


# The CUDA C++ kernels (csrc/attention.cu): fp16/bf16 on tensor cores, sm_80+.
_CUDA_HEAD_DIMS_FWD = (32, 64, 96, 128, 256)
_CUDA_HEAD_DIMS_BWD = (32, 64, 96, 128)


def _cuda_operand(t: torch.Tensor) -> torch.Tensor:
    """t itself when cp.async can read its rows (unit stride along the head dim, a row stride of a
    multiple of 8 elements, 16-byte aligned), else a contiguous copy."""
    s = _strides(t)
    if t.stride(3) == 1 and t.data_ptr() % 16 == 0 and s[0] % 8 == 0 and s[1] % 8 == 0 \
            and s[2] % 8 == 0 and min(s) >= 0:
        return t
    return t.clone(memory_format=torch.contiguous_format)


def _strides(t: torch.Tensor, dims: int = 3) -> list:
    """The strides of the first dims dims ((batch, head, seq) by default), 0 for a dim of size 1
    (its stride is never used; a broadcast mask dim reads as stride 0)."""
    st, sz = t.stride(), t.shape  # one call each: this runs ~10 times per launch
    if dims == 3:
        return [st[0] if sz[0] > 1 else 0, st[1] if sz[1] > 1 else 0, st[2] if sz[2] > 1 else 0]
    return [st[d] if sz[d] > 1 else 0 for d in range(dims)]


def _cuda_mask(mask):
    """(mask in the kernels' form, mask_kind, its 4 strides): bytes for bool, fp32 additive."""
    if mask is None:
        return None, 0, [0, 0, 0, 0]
    if mask.dtype == torch.bool:
        m, kind = mask.view(torch.uint8), 1
    else:
        m, kind = mask.float(), 2
    return m, kind, _strides(m, 4)


def _cuda_fwd(q, k, v, mask, seed, dropout_p, is_causal, scale):
    q, k, v = (_cuda_operand(t) for t in (q, k, v))
    B, Hq, L, D = q.shape
    out = _alloc.empty((B, Hq, L, D), q.dtype, q.device)
    lse = _alloc.empty((B, Hq, L), torch.float32, q.device)
    if out.numel() == 0 or k.shape[2] == 0:  # nothing to launch (empty tensors may have no storage)
        return out.zero_(), lse.fill_(float("inf"))
    m, kind, mstrides = _cuda_mask(mask)
    strides = _strides(q) + _strides(k) + _strides(v) + _strides(out) + mstrides
    _ext.ext().attention_fwd(_ext.ptr(q), _ext.ptr(k), _ext.ptr(v), _ext.ptr(m), _ext.ptr(seed), _ext.ptr(out),
                             _ext.ptr(lse), B, Hq, k.shape[1], L, k.shape[2], D, strides, kind, scale,
                             dropout_p, is_causal, _ext.DTYPE_CODE[q.dtype], _ext.stream_handle(q.device))
    return out, lse


def _cuda_bwd(do, q, k, v, out, lse, mask, seed, dropout_p, is_causal, scale, mask_grad, deterministic):
    do, q, k, v = (_cuda_operand(t) for t in (do, q, k, v))
    out = out if out.stride(3) == 1 and out.stride(2) % 2 == 0 else out.contiguous()
    B, Hq, L, D = q.shape
    dq = _alloc.empty(q.shape, q.dtype, q.device)
    dk = _alloc.empty(k.shape, k.dtype, k.device)
    dv = _alloc.empty(v.shape, v.dtype, v.device)
    # the additive mask's gradient: dS over the full scores (zeros where no kernel writes), summed
    # over the mask's broadcast dims below
    dscores = torch.zeros((B, Hq, L, k.shape[2]), dtype=torch.float32, device=q.device) if mask_grad else None
    if q.numel() and k.numel():  # else nothing to launch (empty tensors may have no storage)
        _cuda_bwd_launch(do, q, k, v, out, lse, mask, seed, dropout_p, is_causal, scale, dq, dk, dv, dscores)
    else:
        for t in (dq, dk, dv):
            t.zero_()
    dmask = _reduce_to(dscores, mask.shape).contiguous() if mask_grad else q.new_empty(0, dtype=torch.float32)
    return dq, dk, dv, dmask


def _cuda_bwd_launch(do, q, k, v, out, lse, mask, seed, dropout_p, is_causal, scale, dq, dk, dv, dscores):
    B, Hq, L, D = q.shape
    delta = torch.empty((B, Hq, L), dtype=torch.float32, device=q.device)
    m, kind, mstrides = _cuda_mask(mask)
    strides = sum((_strides(t) for t in (do, q, k, v, out, dq, dk, dv)), []) + mstrides
    _ext.ext().attention_bwd(_ext.ptr(do), _ext.ptr(q), _ext.ptr(k), _ext.ptr(v), _ext.ptr(out),
                             _ext.ptr(lse.contiguous()), _ext.ptr(m), _ext.ptr(seed), _ext.ptr(dq),
                             _ext.ptr(dk), _ext.ptr(dv), _ext.ptr(delta), _ext.ptr(dscores), B, Hq, k.shape[1],
                             L, k.shape[2], D, strides, kind, scale, dropout_p, is_causal,
                             _ext.DTYPE_CODE[q.dtype], _ext.stream_handle(q.device))


def _reduce_to(t: torch.Tensor, shape) -> torch.Tensor:
    """Sum t (B, Hq, L, S) over the dims where shape has 1."""
    dims = [i for i, n in enumerate(shape) if n == 1 and t.shape[i] != 1]
    return t.sum(dims, keepdim=True) if dims else t


def _torch_bwd(do, q, k, v, out, lse, mask, seed, dropout_p, is_causal, scale, mask_grad, deterministic):
    B, Hq, L, D = q.shape
    Hkv = k.shape[1]
    group = Hq // Hkv
    s = _dense_scores(q, k, mask, is_causal, scale)
    p = torch.exp2(s - lse.unsqueeze(-1))  # fully masked rows: lse = +inf, p = 0
    dof = do.float()
    dp = dof @ v.float().repeat_interleave(group, 1).transpose(-2, -1)
    pd = p
    if dropout_p > 0.0:
        keep = _torch_keep(seed, p.shape, dropout_p, q.device) / (1.0 - dropout_p)
        pd, dp = p * keep, dp * keep
    delta = (dof * out.float()).sum(-1, keepdim=True)
    ds = p * (dp - delta)
    dq = (ds @ k.float().repeat_interleave(group, 1)) * scale
    dk = (ds.transpose(-2, -1) @ q.float()) * scale
    dv = pd.transpose(-2, -1) @ dof
    dk = dk.view(B, Hkv, group, *dk.shape[2:]).sum(2)
    dv = dv.view(B, Hkv, group, *dv.shape[2:]).sum(2)
    dmask = _reduce_to(ds, mask.shape).contiguous() if mask_grad else q.new_empty(0, dtype=torch.float32)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dmask


def _triton_bwd(do, q, k, v, out, lse, mask, seed, dropout_p, is_causal, scale, mask_grad, deterministic):
    kernels = _backend.triton_module("attention")
    q, k, v, do = (t if kernels.fits_int32(t) else t.contiguous() for t in (q, k, v, do))
    dq = _alloc.empty(q.shape, q.dtype, q.device)
    dk = _alloc.empty(k.shape, k.dtype, k.device)
    dv = _alloc.empty(v.shape, v.dtype, v.device)
    dmask = _alloc.empty(mask.shape, torch.float32, q.device) if mask_grad else None
    kernels.attention_bwd(do, q, k, v, out, lse, mask, seed, dropout_p, is_causal, scale,
                          dq, dk, dv, dmask, deterministic)
    return dq, dk, dv, (dmask if mask_grad else q.new_empty(0, dtype=torch.float32))


_FWD = {"torch": _torch_fwd, "triton": _triton_fwd, "cuda": _cuda_fwd}
_BWD = {"torch": _torch_bwd, "triton": _triton_bwd, "cuda": _cuda_bwd}


# ---------------------------------------------------------------------------------------------
# The ops.

def _backward_fake(do, q, k, v, out, lse, mask, seed, dropout_p, is_causal, scale, mask_grad,
                   deterministic, backend):
    def like(t):
        return t.new_empty(t.shape)
    dmask = mask.new_empty(mask.shape, dtype=torch.float32) if mask_grad else q.new_empty(0, dtype=torch.float32)
    return like(q), like(k), like(v), dmask


attention_backward_op = KernelOp(
    "attention_backward",
    "(Tensor grad_out, Tensor query, Tensor key, Tensor value, Tensor out, Tensor lse, "
    "Tensor? attn_mask, Tensor? seed, float dropout_p, bool is_causal, float scale, "
    "bool mask_grad, bool deterministic, str backend) -> (Tensor, Tensor, Tensor, Tensor)",
    # returns dQ, dK, dV and the fp32 gradient of the additive mask in its 4-D shape (empty
    # when not asked for)
    _BWD,
    _backward_fake,
)


def _fwd_fake(q, k, v, mask, seed, dropout_p, is_causal, scale, backend):
    B, Hq, L, _ = q.shape
    return q.new_empty((B, Hq, L, v.shape[3])), q.new_empty((B, Hq, L), dtype=torch.float32)


def _setup_context(ctx, inputs, output):
    q, k, v, mask, seed, dropout_p, is_causal, scale, backend = inputs
    out, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(q, k, v, out, lse, mask, seed)
    ctx.dropout_p, ctx.is_causal, ctx.scale, ctx.backend = dropout_p, is_causal, scale, backend


def _backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse, mask, seed = ctx.saved_tensors
    mask_grad = mask is not None and mask.is_floating_point() and ctx.needs_input_grad[3]
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    dq, dk, dv, dmask = attention_backward_op(
        grad_out, q, k, v, out, lse, mask, seed, ctx.dropout_p, ctx.is_causal, ctx.scale,
        mask_grad, _backend.is_deterministic(), ctx.backend)
    return dq, dk, dv, (dmask.to(mask.dtype) if mask_grad else None), None, None, None, None, None


attention_op = KernelOp(
    "attention",
    "(Tensor query, Tensor key, Tensor value, Tensor? attn_mask, Tensor? seed, float dropout_p, "
    "bool is_causal, float scale, str backend) -> (Tensor, Tensor)",
    # returns the output (B, Hq, L, Dv) and the fp32 base-2 log-sum-exp of each row (B, Hq, L)
    _FWD,
    _fwd_fake,
    setup_context=_setup_context,
    backward=_backward,
)


# ---------------------------------------------------------------------------------------------
# Argument checks (before any launch), canonical views, backend capabilities.

class _Call:
    """What _check learned about one call: the shapes the canonical views will have."""
    __slots__ = ("batch", "Hq", "Hkv", "L", "S", "D", "Dv", "squeeze", "repeat_heads", "mask_shape",
                 "needs_grad")


def _check(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa) -> _Call:
    op = "scaled_dot_product_attention"
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"dlh.{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"dlh.{op}: {name} must be a floating-point tensor, got {t.dtype}")
        if t.dim() < 2:
            raise ValueError(f"dlh.{op}: {name} must have at least 2 dims (..., seq, head_dim), "
                             f"got shape {list(t.shape)}")
    if key.dtype != query.dtype or value.dtype != query.dtype:
        raise TypeError(f"dlh.{op}: query, key and value must share one dtype, got "
                        f"{query.dtype}, {key.dtype}, {value.dtype}")
    if key.device != query.device or value.device != query.device:
        raise ValueError(f"dlh.{op}: key and value must be on query's device ({query.device}), "
                         f"got {key.device} and {value.device}")
    if key.shape[-1] != query.shape[-1]:
        raise ValueError(f"dlh.{op}: key's head dim ({key.shape[-1]}) must equal query's "
                         f"({query.shape[-1]})")
    if value.shape[-2] != key.shape[-2]:
        raise ValueError(f"dlh.{op}: value's sequence length ({value.shape[-2]}) must equal "
                         f"key's ({key.shape[-2]})")
    if not isinstance(dropout_p, (int, float)) or not 0.0 <= dropout_p <= 1.0:
        raise ValueError(f"dlh.{op}: dropout_p must be a number in [0, 1], got {dropout_p!r}")
    if not isinstance(is_causal, bool):
        raise TypeError(f"dlh.{op}: is_causal must be a bool, got {type(is_causal).__name__}")
    if scale is not None and not isinstance(scale, (int, float)):
        raise TypeError(f"dlh.{op}: scale must be a number or None, got {type(scale).__name__}")
    if is_causal and attn_mask is not None:
        raise ValueError(f"dlh.{op}: attn_mask must be None when is_causal=True (as in torch)")

    c = _Call()
    c.needs_grad = torch.is_grad_enabled() and (query.requires_grad or key.requires_grad
                                                or value.requires_grad)
    qs, ks, vs = query.shape, key.shape, value.shape
    c.squeeze = len(qs) == 2 and len(ks) == 2 and len(vs) == 2
    if len(qs) == 2 or len(ks) == 2 or len(vs) == 2:  # (seq, head_dim): one head
        qs, ks, vs = ((1,) + tuple(t) if len(t) == 2 else t for t in (qs, ks, vs))
    c.L, c.S, c.D, c.Dv = qs[-2], ks[-2], qs[-1], vs[-1]
    c.repeat_heads = False  # enable_gqa with different key and value head counts
    try:
        if enable_gqa:
            c.Hq, hk, hv = qs[-3], ks[-3], vs[-3]
            if not hk or not hv or c.Hq % hk or c.Hq % hv:
                raise ValueError(f"dlh.{op}: enable_gqa needs query's heads ({c.Hq}) to be a "
                                 f"multiple of key's ({hk}) and value's ({hv})")
            c.batch = tuple(torch.broadcast_shapes(qs[:-3], ks[:-3], vs[:-3]))
            c.Hkv = hk
            if hk != hv:  # torch allows it; the kernels share one K/V head count
                c.Hkv, c.repeat_heads = c.Hq, True
        else:
            lead = qs[:-2]
            if ks[:-2] != lead or vs[:-2] != lead:  # broadcast_shapes costs ~10 us of Python
                lead = tuple(torch.broadcast_shapes(qs[:-2], ks[:-2], vs[:-2]))
            c.batch, c.Hq = lead[:-1], lead[-1]
            # one K/V head for every query head (multi-query by broadcasting): group, don't copy
            c.Hkv = 1 if ks[-3] == 1 and vs[-3] == 1 else c.Hq
    except RuntimeError:  # torch.broadcast_shapes
        raise ValueError(f"dlh.{op}: the batch/head dims of query {list(query.shape)}, key "
                         f"{list(key.shape)} and value {list(value.shape)} do not broadcast") from None

    c.mask_shape = None
    if attn_mask is not None:
        if not isinstance(attn_mask, torch.Tensor):
            raise TypeError(f"dlh.{op}: attn_mask must be a torch.Tensor or None, got {type(attn_mask).__name__}")
        if attn_mask.dtype != torch.bool and attn_mask.dtype not in (torch.float32, query.dtype):
            raise TypeError(f"dlh.{op}: attn_mask must be bool, float32 or query's dtype "
                            f"({query.dtype}), got {attn_mask.dtype}")
        if attn_mask.device != query.device:
            raise ValueError(f"dlh.{op}: attn_mask is on {attn_mask.device} but query is on {query.device}")
        target = c.batch + (c.Hq, c.L, c.S)
        shape = tuple(attn_mask.shape)
        if len(shape) > len(target) or any(m not in (1, t) for m, t in zip(shape[::-1], target[::-1])):
            raise ValueError(f"dlh.{op}: attn_mask of shape {list(shape)} does not broadcast to the "
                             f"attention scores' shape {list(target)} (batch..., heads, L, S)")
        c.mask_shape = shape
    return c


def _canonical(c: _Call, query, key, value, attn_mask):
    """The 4-D views the ops take (broadcast dims as stride-0 views where possible)."""
    B = math.prod(c.batch)
    if (len(c.batch) == 1 and not c.repeat_heads and query.dim() == 4 and key.dim() == 4
            and value.dim() == 4 and query.shape[0] == B and key.shape[0] == B
            and value.shape[0] == B and key.shape[1] == c.Hkv and value.shape[1] == c.Hkv):
        q4, k4, v4 = query, key, value  # already (B, H, seq, D): no views (~1.5 us each)
    else:
        q, k, v = (t if t.dim() > 2 else t.unsqueeze(0) for t in (query, key, value))
        if c.repeat_heads:
            k = k.repeat_interleave(c.Hq // k.shape[-3], -3)
            v = v.repeat_interleave(c.Hq // v.shape[-3], -3)
        q4 = q.expand(c.batch + (c.Hq, c.L, c.D)).reshape(B, c.Hq, c.L, c.D)
        k4 = k.expand(c.batch + (c.Hkv, c.S, c.D)).reshape(B, c.Hkv, c.S, c.D)
        v4 = v.expand(c.batch + (c.Hkv, c.S, c.Dv)).reshape(B, c.Hkv, c.S, c.Dv)
    m4 = None
    if attn_mask is not None:
        full = len(c.batch) + 3
        m = attn_mask.reshape((1,) * (full - attn_mask.dim()) + tuple(attn_mask.shape))
        mbatch = tuple(m.shape[:-3])
        if all(n == 1 for n in mbatch):
            m4 = m.reshape((1,) + tuple(m.shape[-3:]))
        elif mbatch == c.batch:
            m4 = m.reshape((B,) + tuple(m.shape[-3:]))
        else:  # broadcast along some batch dims but not all: materialise the batch (rare)
            m4 = m.expand(c.batch + tuple(m.shape[-3:])).reshape((B,) + tuple(m.shape[-3:]))
    return q4, k4, v4, m4


def _supports(query, c: _Call, attn_mask, dropout_p):
    def can(backend: str):
        if backend == "torch":
            return None
        if backend == "cuda":
            return _cuda_cannot(query, c, attn_mask, dropout_p)
        why = _backend.dtype_reason(backend, query.dtype, "query")
        if why:
            return why
        if not 1 <= c.D <= MAX_HEAD_DIM or not 1 <= c.Dv <= MAX_HEAD_DIM:
            return (f"the {backend} kernels take head dims 1..{MAX_HEAD_DIM}, got query/key "
                    f"{c.D} and value {c.Dv}")
        if dropout_p >= 1.0:
            return f"the {backend} kernels take dropout_p < 1 (dropout_p=1 drops everything)"
        return None
    return can


def _cuda_cannot(query, c: _Call, attn_mask, dropout_p) -> Optional[str]:
    """Why the CUDA C++ kernels cannot run this call, or None."""
    if query.dtype not in (torch.float16, torch.bfloat16):
        return f"the cuda kernels run on fp16/bf16 tensor cores, not {query.dtype}"
    if c.D != c.Dv:
        return f"the cuda kernels need value's head dim ({c.Dv}) equal to query's ({c.D})"
    if c.D not in _CUDA_HEAD_DIMS_FWD:
        return f"the cuda kernels take head dims {_CUDA_HEAD_DIMS_FWD}, got {c.D}"
    if c.D not in _CUDA_HEAD_DIMS_BWD and c.needs_grad:
        return f"the cuda backward takes head dims {_CUDA_HEAD_DIMS_BWD}, got {c.D} (forward only: no grad)"
    if query.is_cuda and torch.cuda.get_device_capability(query.device)[0] < 8:
        return "the cuda kernels need compute capability 8.0 or newer (mma.sync m16n8k16)"
    return None


def _pick(backend, query, c, attn_mask, dropout_p):
    return _backend.choose("scaled_dot_product_attention", backend, query.device.type,
                           _supports(query, c, attn_mask, dropout_p))


# ---------------------------------------------------------------------------------------------
# Public function (exported by dlh_kernels.functional).

def scaled_dot_product_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                                 attn_mask: Optional[torch.Tensor] = None, dropout_p: float = 0.0,
                                 is_causal: bool = False, scale: Optional[float] = None,
                                 enable_gqa: bool = False, *,
                                 backend: Optional[str] = None) -> torch.Tensor:
    """`torch.nn.functional.scaled_dot_product_attention` on the chosen backend.

    query (..., Hq, L, D), key (..., Hkv, S, D), value (..., Hkv, S, Dv); batch dims broadcast;
    attn_mask bool (True takes part) or additive (float32 or query's dtype; its gradient is
    computed when it requires grad), broadcastable to (..., Hq, L, S); is_causal aligns the
    causal mask top-left (tril(ones(L, S))), as torch does; enable_gqa: Hq a multiple of Hkv.
    Dropout is applied whenever dropout_p > 0 (as torch's function; modules pass 0 in eval).

    The Triton kernels: head dims up to 256 (any, not only powers of two), fp32/fp16/bf16,
    fp32 computed with TF32 dot products on the GPU (FP32_DOT_PRECISION in
    ``triton_kernels/attention.py``); a fully masked row gives zeros and zero gradients;
    dropout draws from an in-kernel Philox stream seeded from torch's generator
    (`dropout_mask` reproduces it); the backward is deterministic when
    ``dlh.deterministic(True)`` or ``torch.use_deterministic_algorithms(True)`` is on (and
    with the default dQ strategy, always).
    """
    c = _check(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    if _backend.plain_torch(backend, query):  # the torch backend, nobody watching: F.* at once
        return F.scaled_dot_product_attention(query, key, value, attn_mask, dropout_p, is_causal,
                                              scale=scale, enable_gqa=enable_gqa)
    be = _pick(backend, query, c, attn_mask, dropout_p)
    if be == "torch":
        with profiling.torch_range("scaled_dot_product_attention"):
            return F.scaled_dot_product_attention(query, key, value, attn_mask, dropout_p, is_causal,
                                                  scale=scale, enable_gqa=enable_gqa)
    q4, k4, v4, m4 = _canonical(c, query, key, value, attn_mask)
    seed = draw_seed(query.device) if dropout_p > 0.0 else None
    scale = 1.0 / math.sqrt(c.D) if scale is None else float(scale)
    out, _ = attention_op(q4, k4, v4, m4, seed, float(dropout_p), is_causal, scale, be)
    if len(c.batch) == 1 and not c.squeeze:
        return out  # (B, Hq, L, Dv) already
    return out.view((c.L, c.Dv) if c.squeeze else c.batch + (c.Hq, c.L, c.Dv))


def explain(op: str, args: dict) -> dict:
    """Per backend, "ok" or why it would not run this call; and what `auto` picks."""
    q = args["query"]
    c = _check(q, args["key"], args["value"], args.get("attn_mask"), args.get("dropout_p", 0.0),
               args.get("is_causal", False), args.get("scale"), args.get("enable_gqa", False))
    return _backend.explain_choice(q.device.type, _supports(q, c, args.get("attn_mask"),
                                                            args.get("dropout_p", 0.0)))
