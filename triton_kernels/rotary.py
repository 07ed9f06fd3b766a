"""Rotary position embedding (RoPE) of queries and keys in Triton, forward and backward.

Math. x is one head's row of D elements at position (b, s); cos and sin are rows of R
(rotary_dim, even, <= D) elements at the same position, broadcast over heads. The first R
elements rotate in pairs (first, second), the last D - R pass through unchanged:

    rotate-half (LLaMA, GPT-NeoX):  pair i = (x[i], x[i + R/2]),  i < R/2
    interleaved (GPT-J):            pair i = (x[2i], x[2i + 1]),  i < R/2

    forward:   out[first]  = x[first]  * cos[first]  - x[second] * sin[first]
               out[second] = x[second] * cos[second] + x[first]  * sin[second]

which is transformers' ``x * cos + rotate_half(x) * sin`` (or ``rotate_every_two``) element by
element, so cos/sin need not hold duplicated halves. The map is linear in x, out = A x with
A = diag(cos) + diag(sin) P (P the signed pair swap, P^T = -P), so the backward is
dx = A^T dy = dy * cos - P (dy * sin):

    backward:  dx[first]  = dy[first]  * cos[first]  + dy[second] * sin[second]
               dx[second] = dy[second] * cos[second] - dy[first]  * sin[first]

the forward with sin taken from the partner element and negated (a rotation by -angle when the
halves of cos/sin are duplicated, as models build them). One kernel does both (BACKWARD).

Numerics: cos and sin are rounded to the dtype of x first (transformers' rotary modules hand
them over in the activation dtype), then everything is fp32 with one rounding at the store;
eager rounds each product and the sum, so in 16 bits we are ~2x closer to float64 than eager.
(The Triton 3.9 interpreter truncates fp32 -> bf16 casts instead of rounding to nearest, so the
CPU checks see up to twice the GPU's bf16 error; the suite's FLOOR covers it.)

Bytes per element of q and k (s = element size): read x, write out = 2s (forward and backward
alike). cos and sin are (B or 1, S, R): 2 * R * s_cs per position, shared by all Hq + Hk heads
of that position, loaded once per program.

Layout: every tensor is a logical (B, H, S, D) view with any batch/head/seq strides and a unit
stride on D (the glue copies only a tensor whose last dim is strided); cos/sin take batch and
seq strides, 0 for a broadcast dim. One program per position (b, s) rotates every head of q
and then of k: one launch for both, GQA head counts free. Offsets are 64-bit.

Versions:
- v1 (this one): program per position, (BLOCK_H, R/2) tiles of pair halves (interleaved: two
  stride-2 loads that hit the same lines), pass-through columns copied in the same program.
  Checked under the Triton interpreter against float64 and transformers; not yet timed on a GPU.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from dlh_kernels.triton_kernels.common import cdiv, launch, next_power_of_2

# Elements per (heads x half-pairs) tile: enough loads in flight per program without spilling.
TILE = 2048


@triton.jit
def _rotate_heads(
    X,  # pointer to this position's row of head 0 of the input (x or dy), heads stride_xh apart
    OUT,  # pointer to the same row of the output, heads stride_oh apart
    n_heads, stride_xh, stride_oh, D, R,
    c1, c2, t1, t2,  # fp32 (BLOCK_HALF,) cos/sin factors of the first and second pair elements
    INTERLEAVED: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_PASS: tl.constexpr,
):
    half = R // 2
    pairs = tl.arange(0, BLOCK_HALF)
    if INTERLEAVED:
        first, second = 2 * pairs, 2 * pairs + 1
    else:
        first, second = pairs, pairs + half
    pair_ok = pairs < half
    for h0 in range(0, n_heads, BLOCK_H):
        heads = (h0 + tl.arange(0, BLOCK_H)).to(tl.int64)
        mask = (heads < n_heads)[:, None] & pair_ok[None, :]
        x_rows = X + heads[:, None] * stride_xh
        o_rows = OUT + heads[:, None] * stride_oh
        x1 = tl.load(x_rows + first[None, :], mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(x_rows + second[None, :], mask=mask, other=0.0).to(tl.float32)
        o1 = x1 * c1[None, :] - x2 * t1[None, :]
        o2 = x2 * c2[None, :] + x1 * t2[None, :]
        tl.store(o_rows + first[None, :], o1.to(OUT.dtype.element_ty), mask=mask)
        tl.store(o_rows + second[None, :], o2.to(OUT.dtype.element_ty), mask=mask)
        # the pass-through columns [R, D): copied as they are
        for p0 in range(R, D, BLOCK_PASS):
            cols = p0 + tl.arange(0, BLOCK_PASS)
            pmask = (heads < n_heads)[:, None] & (cols < D)[None, :]
            v = tl.load(x_rows + cols[None, :], mask=pmask, other=0.0)
            tl.store(o_rows + cols[None, :], v.to(OUT.dtype.element_ty), mask=pmask)


@triton.jit
def rotary_kernel(
    Q,  # pointer to q (or dq_out), logical (B, Hq, S, D), strides (sqb, sqh, sqs, 1)
    K,  # pointer to k (or dk_out), logical (B, Hk, S, D), strides (skb, skh, sks, 1); None: no k
    QO,  # pointer to q_out (or dq), (B, Hq, S, D), strides (sob, soh, sos, 1)
    KO,  # pointer to k_out (or dk), (B, Hk, S, D), strides (sko_b, sko_h, sko_s, 1)
    COS,  # pointer to cos, (B or 1, S or 1, R), strides (scb, scs, 1); 0 for a broadcast dim
    SIN,  # pointer to sin, (B or 1, S or 1, R), strides (ssb, sss, 1)
    S, Hq, Hk, D, R,
    sqb, sqh, sqs, skb, skh, sks, sob, soh, sos, sko_b, sko_h, sko_s, scb, scs, ssb, sss,
    INTERLEAVED: tl.constexpr, BACKWARD: tl.constexpr, HAS_K: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_PASS: tl.constexpr,
):
    # one program per position (b, s): its cos/sin row is loaded once for all Hq + Hk heads
    pid = tl.program_id(0).to(tl.int64)
    b = pid // S
    s = pid % S
    half = R // 2
    pairs = tl.arange(0, BLOCK_HALF)
    if INTERLEAVED:
        first, second = 2 * pairs, 2 * pairs + 1
    else:
        first, second = pairs, pairs + half
    pair_ok = pairs < half
    cos_row = COS + b * scb + s * scs
    sin_row = SIN + b * ssb + s * sss
    # cos/sin rounded to the activation dtype first, as transformers hands them over
    dt = QO.dtype.element_ty
    c1 = tl.load(cos_row + first, mask=pair_ok, other=0.0).to(dt).to(tl.float32)
    c2 = tl.load(cos_row + second, mask=pair_ok, other=0.0).to(dt).to(tl.float32)
    s1 = tl.load(sin_row + first, mask=pair_ok, other=0.0).to(dt).to(tl.float32)
    s2 = tl.load(sin_row + second, mask=pair_ok, other=0.0).to(dt).to(tl.float32)
    if BACKWARD:  # A^T: the partner's sin, negated
        t1, t2 = -s2, -s1
    else:
        t1, t2 = s1, s2
    _rotate_heads(Q + b * sqb + s * sqs, QO + b * sob + s * sos, Hq, sqh, soh, D, R,
                  c1, c2, t1, t2, INTERLEAVED, BLOCK_H, BLOCK_HALF, BLOCK_PASS)
    if HAS_K:
        _rotate_heads(K + b * skb + s * sks, KO + b * sko_b + s * sko_s, Hk, skh, sko_h, D, R,
                      c1, c2, t1, t2, INTERLEAVED, BLOCK_H, BLOCK_HALF, BLOCK_PASS)


# ---------------------------------------------------------------------------------------------
# Launch helper. Tensors are logical (B, H, S, D) views with a unit last stride (the glue makes
# sure); cos/sin (Bc, Sc, R) with Bc in (1, B), Sc in (1, S), unit last stride.

def _broadcast_strides(t: torch.Tensor) -> tuple[int, int]:
    return (0 if t.shape[0] == 1 else t.stride(0)), (0 if t.shape[1] == 1 else t.stride(1))


def rotary(q: torch.Tensor, k: Optional[torch.Tensor], q_out: torch.Tensor, k_out: Optional[torch.Tensor],
           cos: torch.Tensor, sin: torch.Tensor, interleaved: bool, backward: bool) -> None:
    B, Hq, S, D = q.shape
    Hk = 0 if k is None else k.shape[1]
    R = cos.shape[-1]
    if B * S == 0 or (Hq == 0 and Hk == 0):
        return
    block_half = next_power_of_2(R // 2)
    block_h = max(1, min(next_power_of_2(max(Hq, Hk, 1)), TILE // block_half))
    block_pass = max(1, min(next_power_of_2(max(D - R, 1)), 128))
    kk, ko = (q, q_out) if k is None else (k, k_out)  # placeholders: HAS_K=False never reads them
    grid = (B * S,)
    launch(rotary_kernel, grid, (
        q, kk, q_out, ko, cos, sin, S, Hq, Hk, D, R,
        q.stride(0), q.stride(1), q.stride(2), kk.stride(0), kk.stride(1), kk.stride(2),
        q_out.stride(0), q_out.stride(1), q_out.stride(2), ko.stride(0), ko.stride(1), ko.stride(2),
        *_broadcast_strides(cos), *_broadcast_strides(sin)),
        dict(INTERLEAVED=interleaved, BACKWARD=backward, HAS_K=k is not None,
             BLOCK_H=block_h, BLOCK_HALF=block_half, BLOCK_PASS=block_pass,
             num_warps=4 if block_h * block_half >= 1024 else 2))
