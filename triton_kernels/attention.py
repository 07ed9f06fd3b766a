"""Fused scaled-dot-product attention in Triton: FlashAttention-2 style forward and backward.

Math, per (batch b, query head h), with kv head hk = h // GROUP (grouped-query attention:
GROUP query heads share one K/V head), Q (L, D), K (S, D), V (S, Dv), optional mask M
(boolean: True takes part; additive: added to the scores), dropout keep mask Z, keep rate
1 - p:

    S_ij  = scale * q_i . k_j + M_ij                (bool mask: S_ij = -inf where M_ij is False;
                                                     is_causal: -inf where j > i, top-left aligned
                                                     as torch's tril(ones(L, S)))
    P_ij  = exp(S_ij - lse_i),  lse_i = log sum_j exp(S_ij)
    O_i   = sum_j P_ij Z_ij / (1 - p) v_j           (a fully masked row: O_i = 0, lse_i = +inf)

The forward never holds S: a program owns BLOCK_M query rows and walks the keys BLOCK_N at a
time with the online softmax (running max m_i and sum l_i; rescale the accumulator by
exp(m_old - m_new) when the max grows), all in fp32, in base 2 (scale and the additive mask
are pre-multiplied by log2(e), so every exponential is one exp2). It saves lse (base 2) per
row for the backward, O(L) per head.

Backward (FlashAttention-2): recompute P tile by tile from Q, K and the saved lse, never
storing it. With dPd = dO V^T and dP = dPd * Z / (1 - p):

    delta_i = sum_j P_ij dP_ij = rowsum(dO_i * O_i)   (a preprocessing kernel, O(L) per head)
    dS_ij   = P_ij (dP_ij - delta_i)
    dV      = (P * Z / (1 - p))^T dO,   dK = scale * dS^T Q,   dQ = scale * dS K
    dM      = dS, summed over the dims the mask broadcasts along

Kernels:
- attn_fwd_kernel:           grid (query blocks, B * Hq).
- attn_bwd_preprocess_kernel: delta = rowsum(dO * O).
- attn_bwd_dkdv_kernel:      grid (key blocks, B * Hkv * SPLIT); a program keeps its K/V block
                             and its dK/dV accumulators in registers and walks every query block
                             of the query heads of its group (all of them when SPLIT = 1), so
                             grouped-query gradients are summed in registers, in a fixed order,
                             without atomics. GQA/MQA grids too small for the GPU (fewer than
                             DKDV_PROGRAMS_PER_SM programs per SM) split the group's heads over
                             SPLIT programs that write fp32 partials, summed by the glue in a
                             fixed order (dkdv_head_split).
                             Optionally (ATOMIC_DQ) it also adds dS K into an fp32 dQ with
                             atomics: fewer FLOPs, not deterministic.
- attn_bwd_dq_kernel:        grid (query blocks, B * Hq); dQ for a query block over every key
                             block (recomputes S and dPd: 3 of the 5 backward matmuls again),
                             deterministic. The default.
- attn_bwd_dmask_kernel:     the gradient of an additive mask that requires grad, in the mask's
                             own shape: a program owns one tile of the mask and loops over the
                             batches, heads, query and key blocks that the mask broadcasts
                             along, summing dS in registers (no atomics, no (B, H, L, S) buffer).
- attn_dropout_mask_kernel:  the keep mask the other kernels draw, for tests and debugging.

Dropout: Philox4x32-10 (tl.rand4x) keyed by a 64-bit seed the op draws from torch's generator (a
device tensor, so CUDA graphs and torch.compile see no host sync). One call decides 4 consecutive
keys of a row: keys 4j .. 4j + 3 of row i of head bh = b * Hq + h take the call of the 64-bit
counter (bh * L + i) * ceil(S / 4) + j, word w deciding key 4j + w (keep when its uniform >= p).
Every kernel regenerates exactly the same keep decision for an element from (seed, its group),
whatever its block sizes (key tiles start at multiples of 16); csrc/attention.cu draws the same
stream and ops.attention.dropout_keep_reference writes it out.

Layouts: Q, K, V, dO take any strides (the launch helpers see 4-D views); broadcast dims may
have stride 0. Head dims are constexprs (HEAD_D, HEAD_DV), padded to powers of two (BLOCK_D),
so a head dim that is a power of two costs no masked loads. fp32 inputs: the dots run in TF32
on the GPU (FP32_DOT_PRECISION; set it to "ieee" for full fp32 products).

FLOPs (the benchmark's count): forward 4 * L * S * D per head (two matmuls), backward 2.5x
that (five matmuls; this implementation does 7 with the separate dQ kernel, 5 with atomic dQ),
halved for causal. Bytes per head: forward reads Q, K, V (K/V once per query block, from L2
mostly) and writes O and lse: (L*D + 2*S*D + L*Dv) * s + 4L at best; backward reads Q, K, V,
O, dO, lse, delta and writes dQ, dK, dV. Attention is compute-bound from L = S ~ 256 on.

Versions:
- v1 (this one): forward with mask-free main loop (bounds/causal masks only in the last key
  blocks), separate-dQ backward, optional atomic dQ, GQA summed in the dK/dV program, mask
  gradient kernel, Philox dropout, autotuned block sizes on GPU for problems of 256+ rows.
  Checked under the Triton interpreter (3.9 and 3.6) on CPU against float64, compiled for
  sm_80/sm_90 with both; not yet run or timed on a GPU.
- v1.1: batch x heads over grid axes y and z (bh = y + z * ny; CUDA caps each at 65,535),
  dmask and keep-mask tiles on axis x; the atomic-dQ reset hook in a dK/dV autotuner of its
  own (the separate mode's DQ=None crashed Triton 3.6's hook in every tuned backward). The
  tuned path is exercised on CPU by tests/test_autotune.py (stub benchmarker).
- v1.2: dropout from one Philox call per 4 keys (was one per element, 1 of its 4 words used):
  launch-exact sm_90, bf16 hd64, Triton 3.6, SASS instructions / registers with dropout: forward
  (128,64,8,3) 5260 -> 3330 / 141 -> 177 (without dropout: 1407 / 109), dQ (128,64,8,3)
  2891 -> 1859 / 157 -> 204, dK/dV (64,128,8,2) 3202 -> 2220 / 255 -> 255, spill stores 3 -> 0
  (the 4 words reach the score tile's layout through shared memory: + BLOCK_M * BLOCK_N bytes;
  the fixed bf16 hd128 dK/dV with an additive mask spills 58 stores, was 27). The dK/dV grid
  splits a GQA/MQA group's heads when it would have fewer than 2 programs per SM (MQA, B = 1,
  S = 4096: 32 -> 256 programs on an H200). Not yet timed on a GPU.
"""
from __future__ import annotations

import functools
import os
from typing import Optional

import torch
import triton
import triton.language as tl

from dlh_kernels import _ext
from dlh_kernels._alloc import empty
from dlh_kernels._cache import persistent_autotune
from dlh_kernels.triton_kernels.common import fits_shared_memory, launch, next_power_of_2

LOG2E = 1.4426950408889634
MAX_HEAD_DIM = 256

# fp32 inputs: "tf32" runs the dots on the tensor cores with 10-bit mantissa inputs (fp32
# accumulation), as cuBLAS does with allow_tf32; "ieee" for full fp32 products (much slower).
FP32_DOT_PRECISION = "tf32"

# dQ strategy: "separate" (a second kernel, deterministic) or "atomic" (fp32 atomics from the
# dK/dV kernel; fewer FLOPs; order-dependent rounding). A deterministic backward, requested
# through dlh.deterministic(True) or torch.use_deterministic_algorithms, always uses "separate".
DQ_MODE = "separate"

# Problems with fewer rows than this use one fixed configuration on the GPU; larger ones are
# autotuned (per kernel, per power-of-two length bucket, head dims, features and dtype).
AUTOTUNE_MIN_LEN = 256

# The dK/dV grid is (key blocks, B * Hkv): with GQA/MQA and few key blocks it leaves SMs idle (MQA,
# B = 1, S = 4096, BLOCK_N = 128: 32 programs on an H200's 132 SMs). Below DKDV_PROGRAMS_PER_SM
# programs per SM, the group's query heads are split over more programs, each summing its part
# into an fp32 partial dK/dV that the glue adds up in a fixed order (dkdv_head_split). SM_COUNT:
# None takes the device's (on a GPU) and never splits under the interpreter; tests set it to
# force the split on CPU.
DKDV_PROGRAMS_PER_SM = 2
SM_COUNT: Optional[int] = None

# CUDA caps grid axes y and z at 65,535 each (x at 2^31 - 1). Batch x heads passes that in real
# models (video attention folds B * H * W into the batch), so it runs over axes y and z together
# (_bh_grid, _program_bh); query/key tiles go on axis x. Tests lower this to force the fold.
GRID_YZ_MAX = 65535


# The Triton interpreter (3.9) multiplies bf16 dot operands as their raw 16-bit patterns; under
# it, bf16 operands are widened to fp32 first, which is the tensor cores' math (exact products,
# fp32 sums). Compiled kernels never take that branch.
_WIDEN_BF16_DOTS = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") == "1")


# ---------------------------------------------------------------------------------------------
# Shared pieces

@triton.jit
def _dot(a, b, DOT_PRECISION: tl.constexpr):
    """a @ b with fp32 accumulation."""
    if _WIDEN_BF16_DOTS:
        if a.dtype == tl.bfloat16:
            a = a.to(tl.float32)
        if b.dtype == tl.bfloat16:
            b = b.to(tl.float32)
    return tl.dot(a, b, input_precision=DOT_PRECISION)

@triton.jit
def _keep(seed, bh, rows, start_n, L, S, dropout_p, BLOCK_N: tl.constexpr):
    """(BLOCK_M, BLOCK_N) dropout keep decisions of head bh for the query rows `rows` (1-D) and
    the keys start_n + [0, BLOCK_N) (start_n a multiple of 4).

    One Philox4x32-10 call decides 4 consecutive keys of a row: the call of key group
    j = key // 4 of row i has the 64-bit counter (bh * L + i) * ceil(S / 4) + j, and its word w
    (tl.rand4x's uniform u_w) keeps key 4j + w when u_w >= p. So the tile draws on a
    (BLOCK_M, BLOCK_N / 4) grid and interleaves the 4 outputs along the keys: join twice gives
    [m, j, a, b] = u_(2a + b) (join stacks on a new last axis, so the outer join holds b), which
    reshaped row-major to (BLOCK_M, BLOCK_N) is key 4j + 2a + b. csrc/attention.cu draws the
    same stream (philox4, keep_bits) and ops.attention.dropout_keep_reference writes it out.
    """
    groups = start_n // 4 + tl.arange(0, BLOCK_N // 4)
    index = (bh.to(tl.int64) * L + rows.to(tl.int64))[:, None] * ((S + 3) // 4) + groups[None, :]
    u0, u1, u2, u3 = tl.rand4x(seed, index)
    keep = tl.join(tl.join(u0 >= dropout_p, u2 >= dropout_p),
                   tl.join(u1 >= dropout_p, u3 >= dropout_p))
    return tl.reshape(keep, (rows.shape[0], BLOCK_N))


@triton.jit
def _program_bh():
    """This program's batch x head index (64-bit): grid axes y and z together, bh = y + z * ny,
    because CUDA caps each of them at 65,535 (see _bh_grid). Programs past the last head (the
    padding of the last z slice) must return at once."""
    return tl.program_id(1) + tl.program_id(2).to(tl.int64) * tl.num_programs(1)


@triton.jit
def _scores(q, kT, M_head, rows, keys, row_ok, key_ok, stride_mm, stride_mn, qk_scale,
            MASK_KIND: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """(BLOCK_M, BLOCK_N) base-2 scores: q k^T * scale * log2(e), plus the additive mask * log2(e).

    A boolean mask is applied by the caller (where it also knows what a masked element becomes).
    """
    s = _dot(q, kT, DOT_PRECISION) * qk_scale
    if MASK_KIND == 2:
        m_ptrs = M_head + rows.to(tl.int64)[:, None] * stride_mm + keys[None, :] * stride_mn
        bias = tl.load(m_ptrs, mask=row_ok[:, None] & key_ok[None, :], other=0.0)
        s += bias.to(tl.float32) * 1.4426950408889634
    return s


@triton.jit
def _bool_mask(M_head, rows, keys, row_ok, key_ok, stride_mm, stride_mn):
    m_ptrs = M_head + rows.to(tl.int64)[:, None] * stride_mm + keys[None, :] * stride_mn
    return tl.load(m_ptrs, mask=row_ok[:, None] & key_ok[None, :], other=0) != 0


# ---------------------------------------------------------------------------------------------
# Forward

@triton.jit
def _fwd_tile(acc, m_i, l_i, q, K_head, V_head, M_head, seed, bh, rows, row_ok, start_n,
              stride_kn, stride_kd, stride_vn, stride_vd, stride_mm, stride_mn,
              L, S, qk_scale, dropout_p,
              KEY_MASKS: tl.constexpr, IS_CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr,
              DROPOUT: tl.constexpr, HEAD_D: tl.constexpr, HEAD_DV: tl.constexpr,
              BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
              DOT_PRECISION: tl.constexpr):
    """One key block of the online softmax. KEY_MASKS: the block may hold keys past S or (causal)
    keys after some rows; the main loop's blocks need neither check."""
    keys = start_n + tl.arange(0, BLOCK_N)
    d = tl.arange(0, BLOCK_D)
    dv = tl.arange(0, BLOCK_DV)
    key_ok = keys < S
    k_ptrs = K_head + keys[None, :] * stride_kn + d[:, None] * stride_kd
    v_ptrs = V_head + keys[:, None] * stride_vn + dv[None, :] * stride_vd
    if KEY_MASKS:
        kT = tl.load(k_ptrs, mask=key_ok[None, :] & (d < HEAD_D)[:, None], other=0.0)
    elif HEAD_D == BLOCK_D:  # the main loop with a power-of-two head dim: no predicates at all
        kT = tl.load(k_ptrs)
    else:
        kT = tl.load(k_ptrs, mask=(d < HEAD_D)[:, None], other=0.0)
    s = _scores(q, kT, M_head, rows, keys, row_ok, key_ok, stride_mm, stride_mn, qk_scale,
                MASK_KIND, DOT_PRECISION)
    if KEY_MASKS:
        ok = key_ok[None, :]
        if IS_CAUSAL:
            ok = ok & (keys[None, :] <= rows[:, None])
        s = tl.where(ok, s, float("-inf"))
    if MASK_KIND == 1:
        s = tl.where(_bool_mask(M_head, rows, keys, row_ok, key_ok, stride_mm, stride_mn),
                     s, float("-inf"))

    # online softmax; a row with every score so far at -inf keeps m = -inf and l = 0, and its
    # exponentials are taken against 0 instead (exp2(-inf - 0) = 0, never -inf - -inf = NaN)
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_use)
    p = tl.exp2(s - m_use[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    if DROPOUT:
        p = tl.where(_keep(seed, bh, rows, start_n, L, S, dropout_p, BLOCK_N), p, 0.0)
    if KEY_MASKS:
        v = tl.load(v_ptrs, mask=key_ok[:, None] & (dv < HEAD_DV)[None, :], other=0.0)
    elif HEAD_DV == BLOCK_DV:
        v = tl.load(v_ptrs)
    else:
        v = tl.load(v_ptrs, mask=(dv < HEAD_DV)[None, :], other=0.0)
    acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, DOT_PRECISION)
    return acc, m_new, l_i


@triton.jit
def attn_fwd_kernel(
    Q,          # queries, (B, Hq, L, HEAD_D), any strides
    K,          # keys, (B, Hkv, S, HEAD_D)
    V,          # values, (B, Hkv, S, HEAD_DV)
    Mask,       # (mB, mH, mL, mS) bool or float, broadcast dims with stride 0; or None
    Seed,       # (1,) int64 dropout seed; or None
    Out,        # output, (B, Hq, L, HEAD_DV)
    Lse,        # (B * Hq, L) fp32: base-2 log of the softmax normaliser; +inf: fully masked row
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_ob, stride_oh, stride_om, stride_od,
    BH, Hq, L, S, GROUP,    # BH = B * Hq; GROUP = Hq // Hkv query heads per K/V head
    qk_scale,               # scale * log2(e)
    dropout_p,
    L_BUCKET, S_BUCKET,     # autotuning keys only
    HEAD_D: tl.constexpr, HEAD_DV: tl.constexpr,
    IS_CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr,  # 0 none, 1 boolean, 2 additive
    DROPOUT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    # causal: the last query blocks see the most keys; start them first
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    bh = _program_bh()
    if bh >= BH:
        return
    b = bh // Hq
    h = bh % Hq
    hk = h // GROUP
    m0 = pid_m * BLOCK_M
    rows = m0 + tl.arange(0, BLOCK_M)
    row_ok = rows < L
    d = tl.arange(0, BLOCK_D)
    dv = tl.arange(0, BLOCK_DV)

    q = tl.load(Q + b * stride_qb + h * stride_qh + rows[:, None] * stride_qm + d[None, :] * stride_qd,
                mask=row_ok[:, None] & (d < HEAD_D)[None, :], other=0.0)
    K_head = K + b * stride_kb + hk * stride_kh
    V_head = V + b * stride_vb + hk * stride_vh
    M_head = Mask
    if MASK_KIND != 0:
        M_head = Mask + b * stride_mb + h * stride_mh
    seed = 0
    if DROPOUT:
        seed = tl.load(Seed)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    # keys [0, full_hi): whole blocks, inside S and (causal) at or before every row of the block;
    # keys [full_hi, hi): the blocks that need the bounds / causal masks
    if IS_CAUSAL:
        hi = tl.minimum(S, m0 + BLOCK_M)
        full_hi = tl.minimum((m0 + 1) // BLOCK_N, S // BLOCK_N) * BLOCK_N
    else:
        hi = S
        full_hi = (S // BLOCK_N) * BLOCK_N
    for start_n in range(0, full_hi, BLOCK_N):
        acc, m_i, l_i = _fwd_tile(
            acc, m_i, l_i, q, K_head, V_head, M_head, seed, bh, rows, row_ok, start_n,
            stride_kn, stride_kd, stride_vn, stride_vd, stride_mm, stride_mn, L, S, qk_scale,
            dropout_p, False, IS_CAUSAL, MASK_KIND, DROPOUT, HEAD_D, HEAD_DV,
            BLOCK_N, BLOCK_D, BLOCK_DV, DOT_PRECISION)
    for start_n in range(full_hi, hi, BLOCK_N):
        acc, m_i, l_i = _fwd_tile(
            acc, m_i, l_i, q, K_head, V_head, M_head, seed, bh, rows, row_ok, start_n,
            stride_kn, stride_kd, stride_vn, stride_vd, stride_mm, stride_mn, L, S, qk_scale,
            dropout_p, True, IS_CAUSAL, MASK_KIND, DROPOUT, HEAD_D, HEAD_DV,
            BLOCK_N, BLOCK_D, BLOCK_DV, DOT_PRECISION)

    has_any = l_i > 0.0
    l_div = tl.where(has_any, l_i, 1.0)
    if DROPOUT:
        l_div = l_div * (1.0 - dropout_p)
    out = acc / l_div[:, None]
    lse = tl.where(has_any, m_i + tl.log2(tl.where(has_any, l_i, 1.0)), float("inf"))
    tl.store(Lse + bh.to(tl.int64) * L + rows, lse, mask=row_ok)
    tl.store(Out + b * stride_ob + h * stride_oh + rows[:, None] * stride_om + dv[None, :] * stride_od,
             out.to(Out.dtype.element_ty), mask=row_ok[:, None] & (dv < HEAD_DV)[None, :])


# ---------------------------------------------------------------------------------------------
# Backward

@triton.jit
def attn_bwd_preprocess_kernel(
    Out,        # forward output, (B, Hq, L, HEAD_DV)
    DO,         # output gradient, (B, Hq, L, HEAD_DV), any strides
    Delta,      # (B * Hq, L) fp32 out: rowsum(dO * O)
    stride_ob, stride_oh, stride_om, stride_od,
    stride_dob, stride_doh, stride_dom, stride_dod,
    BH, Hq, L,
    HEAD_DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    bh = _program_bh()
    if bh >= BH:
        return
    b = bh // Hq
    h = bh % Hq
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    dv = tl.arange(0, BLOCK_DV)
    mask = (rows < L)[:, None] & (dv < HEAD_DV)[None, :]
    o = tl.load(Out + b * stride_ob + h * stride_oh + rows[:, None] * stride_om + dv[None, :] * stride_od,
                mask=mask, other=0.0).to(tl.float32)
    do = tl.load(DO + b * stride_dob + h * stride_doh + rows[:, None] * stride_dom + dv[None, :] * stride_dod,
                 mask=mask, other=0.0).to(tl.float32)
    tl.store(Delta + bh.to(tl.int64) * L + rows, tl.sum(o * do, 1), mask=rows < L)


@triton.jit
def _dkdv_tile(dk, dv_acc, k, v, Q_head, DO_head, Lse_head, Delta_head, M_head, DQ_head, seed, bh,
               keys, key_ok, n0, start_m,
               stride_qm, stride_qd, stride_dom, stride_dod, stride_mm, stride_mn,
               stride_dqm, stride_dqd,
               L, S, qk_scale, sm_scale, dropout_p,
               CAUSAL_MASK: tl.constexpr, MASK_KIND: tl.constexpr, DROPOUT: tl.constexpr,
               ATOMIC_DQ: tl.constexpr, HEAD_D: tl.constexpr, HEAD_DV: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
               BLOCK_DV: tl.constexpr,
               DOT_PRECISION: tl.constexpr):
    """One query block's contribution to a key block's dK and dV, in transposed orientation
    (keys along the rows of every tile: (BLOCK_N, BLOCK_M)).

    Rows past L need no tile mask: they load q = dO = 0 and lse = +inf, so their P is 0.
    """
    rows = start_m + tl.arange(0, BLOCK_M)
    row_ok = rows < L
    d = tl.arange(0, BLOCK_D)
    dvi = tl.arange(0, BLOCK_DV)
    q = tl.load(Q_head + rows[:, None] * stride_qm + d[None, :] * stride_qd,
                mask=row_ok[:, None] & (d < HEAD_D)[None, :], other=0.0)
    do = tl.load(DO_head + rows[:, None] * stride_dom + dvi[None, :] * stride_dod,
                 mask=row_ok[:, None] & (dvi < HEAD_DV)[None, :], other=0.0)
    lse = tl.load(Lse_head + rows, mask=row_ok, other=float("inf"))
    delta = tl.load(Delta_head + rows, mask=row_ok, other=0.0)

    sT = _dot(k, tl.trans(q), DOT_PRECISION) * qk_scale   # (BLOCK_N, BLOCK_M)
    if MASK_KIND == 2:
        m_ptrs = M_head + rows.to(tl.int64)[None, :] * stride_mm + keys[:, None] * stride_mn
        sT += tl.load(m_ptrs, mask=row_ok[None, :] & key_ok[:, None], other=0.0).to(tl.float32) * 1.4426950408889634
    pT = tl.exp2(sT - lse[None, :])
    if CAUSAL_MASK:
        pT = tl.where(keys[:, None] <= rows[None, :], pT, 0.0)
    if MASK_KIND == 1:
        m_ptrs = M_head + rows.to(tl.int64)[None, :] * stride_mm + keys[:, None] * stride_mn
        pT = tl.where(tl.load(m_ptrs, mask=row_ok[None, :] & key_ok[:, None], other=0) != 0, pT, 0.0)
    # dropout: the keep tile is drawn before dP^T exists and dV is updated first, so the Philox
    # temporaries never share the registers with both P^T and dP^T
    if DROPOUT:
        inv_keep = 1.0 / (1.0 - dropout_p)
        keepT = tl.trans(_keep(seed, bh, rows, n0, L, S, dropout_p, BLOCK_N))
        pdT = tl.where(keepT, pT * inv_keep, 0.0)
    else:
        pdT = pT
    dv_acc += _dot(pdT.to(do.dtype), do, DOT_PRECISION)
    dpT = _dot(v, tl.trans(do), DOT_PRECISION)            # (dO V^T)^T
    if DROPOUT:
        dpT = tl.where(keepT, dpT * inv_keep, 0.0)
    dsT = pT * (dpT - delta[None, :])
    dk += _dot(dsT.to(q.dtype), q, DOT_PRECISION)
    if ATOMIC_DQ:
        dq = _dot(tl.trans(dsT).to(k.dtype), k, DOT_PRECISION) * sm_scale
        tl.atomic_add(DQ_head + rows[:, None] * stride_dqm + d[None, :] * stride_dqd, dq,
                      mask=row_ok[:, None] & (d < HEAD_D)[None, :])
    return dk, dv_acc


@triton.jit
def attn_bwd_dkdv_kernel(
    Q, K, V,    # as in the forward
    Mask,       # as in the forward, or None
    Seed,       # as in the forward, or None
    DO,         # output gradient, (B, Hq, L, HEAD_DV), any strides
    Lse,        # (B * Hq, L) fp32 from the forward
    Delta,      # (B * Hq, L) fp32 from the preprocess kernel
    DK,         # (B, Hkv * SPLIT, S, HEAD_D) out: dK, or (SPLIT > 1) fp32 partial sums, K/V head
                # hk's part j at head hk * SPLIT + j (the glue sums them)
    DV,         # (B, Hkv * SPLIT, S, HEAD_DV) out: likewise
    DQ,         # ATOMIC_DQ: (B, Hq, L, HEAD_D) fp32, zeroed, accumulated into; else None
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    stride_dqb, stride_dqh, stride_dqm, stride_dqd,
    BHkv, Hq, Hkv, L, S, GROUP,     # BHkv = B * Hkv
    SPLIT, GROUP_PART,              # the group's query heads in SPLIT parts of GROUP_PART heads
    qk_scale, sm_scale, dropout_p,
    L_BUCKET, S_BUCKET,
    HEAD_D: tl.constexpr, HEAD_DV: tl.constexpr,
    IS_CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, DROPOUT: tl.constexpr,
    ATOMIC_DQ: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    # grid (key blocks, B * Hkv * SPLIT): program (n, (b * Hkv + hk) * SPLIT + part) sums the query
    # heads [part * GROUP_PART, (part + 1) * GROUP_PART) of the group; SPLIT > 1 only when the
    # grid would otherwise leave SMs idle (GQA/MQA with few key blocks, see dkdv_head_split)
    pid_n = tl.program_id(0)
    pid_bh = _program_bh()
    if pid_bh >= BHkv * SPLIT:
        return
    bhk = pid_bh // SPLIT
    part = pid_bh % SPLIT
    b = bhk // Hkv
    hk = bhk % Hkv
    n0 = pid_n * BLOCK_N
    keys = n0 + tl.arange(0, BLOCK_N)
    key_ok = keys < S
    d = tl.arange(0, BLOCK_D)
    dvi = tl.arange(0, BLOCK_DV)
    k = tl.load(K + b * stride_kb + hk * stride_kh + keys[:, None] * stride_kn + d[None, :] * stride_kd,
                mask=key_ok[:, None] & (d < HEAD_D)[None, :], other=0.0)
    v = tl.load(V + b * stride_vb + hk * stride_vh + keys[:, None] * stride_vn + dvi[None, :] * stride_vd,
                mask=key_ok[:, None] & (dvi < HEAD_DV)[None, :], other=0.0)
    seed = 0
    if DROPOUT:
        seed = tl.load(Seed)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv_acc = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)

    # causal: query blocks before q_start see none of these keys; from q_full on they see all
    if IS_CAUSAL:
        q_start = (n0 // BLOCK_M) * BLOCK_M
        q_full = tl.minimum(((n0 + BLOCK_N - 1 + BLOCK_M - 1) // BLOCK_M) * BLOCK_M,
                            ((L + BLOCK_M - 1) // BLOCK_M) * BLOCK_M)
    else:
        q_start = 0
        q_full = 0
    g_lo = part * GROUP_PART
    g_hi = tl.minimum(g_lo + GROUP_PART, GROUP)
    for g in range(g_lo, g_hi):  # this part of the query heads that share this K/V head, in order
        h = hk * GROUP + g
        bh = b * Hq + h
        Q_head = Q + b * stride_qb + h * stride_qh
        DO_head = DO + b * stride_dob + h * stride_doh
        Lse_head = Lse + bh * L
        Delta_head = Delta + bh * L
        M_head = Mask
        if MASK_KIND != 0:
            M_head = Mask + b * stride_mb + h * stride_mh
        DQ_head = DQ
        if ATOMIC_DQ:
            DQ_head = DQ + b * stride_dqb + h * stride_dqh
        for start_m in range(q_start, q_full, BLOCK_M):
            dk, dv_acc = _dkdv_tile(
                dk, dv_acc, k, v, Q_head, DO_head, Lse_head, Delta_head, M_head, DQ_head, seed, bh,
                keys, key_ok, n0, start_m, stride_qm, stride_qd, stride_dom, stride_dod,
                stride_mm, stride_mn, stride_dqm, stride_dqd, L, S, qk_scale, sm_scale, dropout_p,
                True, MASK_KIND, DROPOUT, ATOMIC_DQ, HEAD_D, HEAD_DV, BLOCK_M, BLOCK_N, BLOCK_D,
                BLOCK_DV, DOT_PRECISION)
        for start_m in range(q_full, L, BLOCK_M):
            dk, dv_acc = _dkdv_tile(
                dk, dv_acc, k, v, Q_head, DO_head, Lse_head, Delta_head, M_head, DQ_head, seed, bh,
                keys, key_ok, n0, start_m, stride_qm, stride_qd, stride_dom, stride_dod,
                stride_mm, stride_mn, stride_dqm, stride_dqd, L, S, qk_scale, sm_scale, dropout_p,
                False, MASK_KIND, DROPOUT, ATOMIC_DQ, HEAD_D, HEAD_DV, BLOCK_M, BLOCK_N, BLOCK_D,
                BLOCK_DV, DOT_PRECISION)

    dk = dk * sm_scale
    hp = hk * SPLIT + part
    tl.store(DK + b * stride_dkb + hp * stride_dkh + keys[:, None] * stride_dkn + d[None, :] * stride_dkd,
             dk.to(DK.dtype.element_ty), mask=key_ok[:, None] & (d < HEAD_D)[None, :])
    tl.store(DV + b * stride_dvb + hp * stride_dvh + keys[:, None] * stride_dvn + dvi[None, :] * stride_dvd,
             dv_acc.to(DV.dtype.element_ty), mask=key_ok[:, None] & (dvi < HEAD_DV)[None, :])


@triton.jit
def _dq_tile(dq, q, do, lse, delta, K_head, V_head, M_head, seed, bh, rows, row_ok, start_n,
             stride_kn, stride_kd, stride_vn, stride_vd, stride_mm, stride_mn,
             L, S, qk_scale, dropout_p,
             CAUSAL_MASK: tl.constexpr, MASK_KIND: tl.constexpr, DROPOUT: tl.constexpr,
             HEAD_D: tl.constexpr, HEAD_DV: tl.constexpr, BLOCK_N: tl.constexpr,
             BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """One key block's contribution to a query block's dQ (unscaled).

    Keys past S need no tile mask here: they load k = v = 0, so dS K gets nothing from them.
    """
    keys = start_n + tl.arange(0, BLOCK_N)
    key_ok = keys < S
    d = tl.arange(0, BLOCK_D)
    dvi = tl.arange(0, BLOCK_DV)
    kT = tl.load(K_head + keys[None, :] * stride_kn + d[:, None] * stride_kd,
                 mask=key_ok[None, :] & (d < HEAD_D)[:, None], other=0.0)
    vT = tl.load(V_head + keys[None, :] * stride_vn + dvi[:, None] * stride_vd,
                 mask=key_ok[None, :] & (dvi < HEAD_DV)[:, None], other=0.0)
    s = _scores(q, kT, M_head, rows, keys, row_ok, key_ok, stride_mm, stride_mn, qk_scale,
                MASK_KIND, DOT_PRECISION)
    p = tl.exp2(s - lse[:, None])
    if CAUSAL_MASK:
        p = tl.where(keys[None, :] <= rows[:, None], p, 0.0)
    if MASK_KIND == 1:
        p = tl.where(_bool_mask(M_head, rows, keys, row_ok, key_ok, stride_mm, stride_mn), p, 0.0)
    dp = _dot(do, vT, DOT_PRECISION)
    if DROPOUT:
        keep = _keep(seed, bh, rows, start_n, L, S, dropout_p, BLOCK_N)
        dp = tl.where(keep, dp * (1.0 / (1.0 - dropout_p)), 0.0)
    ds = p * (dp - delta[:, None])
    dq += _dot(ds.to(kT.dtype), tl.trans(kT), DOT_PRECISION)
    return dq


@triton.jit
def attn_bwd_dq_kernel(
    Q, K, V, Mask, Seed, DO, Lse, Delta,   # as in attn_bwd_dkdv_kernel
    DQ,         # (B, Hq, L, HEAD_D) out
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_dqb, stride_dqh, stride_dqm, stride_dqd,
    BH, Hq, L, S, GROUP,
    qk_scale, sm_scale, dropout_p,
    L_BUCKET, S_BUCKET,
    HEAD_D: tl.constexpr, HEAD_DV: tl.constexpr,
    IS_CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, DROPOUT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    bh = _program_bh()
    if bh >= BH:
        return
    b = bh // Hq
    h = bh % Hq
    hk = h // GROUP
    m0 = pid_m * BLOCK_M
    rows = m0 + tl.arange(0, BLOCK_M)
    row_ok = rows < L
    d = tl.arange(0, BLOCK_D)
    dvi = tl.arange(0, BLOCK_DV)
    q = tl.load(Q + b * stride_qb + h * stride_qh + rows[:, None] * stride_qm + d[None, :] * stride_qd,
                mask=row_ok[:, None] & (d < HEAD_D)[None, :], other=0.0)
    do = tl.load(DO + b * stride_dob + h * stride_doh + rows[:, None] * stride_dom + dvi[None, :] * stride_dod,
                 mask=row_ok[:, None] & (dvi < HEAD_DV)[None, :], other=0.0)
    lse = tl.load(Lse + bh.to(tl.int64) * L + rows, mask=row_ok, other=float("inf"))
    delta = tl.load(Delta + bh.to(tl.int64) * L + rows, mask=row_ok, other=0.0)
    K_head = K + b * stride_kb + hk * stride_kh
    V_head = V + b * stride_vb + hk * stride_vh
    M_head = Mask
    if MASK_KIND != 0:
        M_head = Mask + b * stride_mb + h * stride_mh
    seed = 0
    if DROPOUT:
        seed = tl.load(Seed)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    if IS_CAUSAL:
        hi = tl.minimum(S, m0 + BLOCK_M)
        full_hi = tl.minimum(((m0 + 1) // BLOCK_N) * BLOCK_N, hi)
    else:
        hi = S
        full_hi = S
    for start_n in range(0, full_hi, BLOCK_N):
        dq = _dq_tile(dq, q, do, lse, delta, K_head, V_head, M_head, seed, bh, rows, row_ok, start_n,
                      stride_kn, stride_kd, stride_vn, stride_vd, stride_mm, stride_mn,
                      L, S, qk_scale, dropout_p, False, MASK_KIND, DROPOUT, HEAD_D, HEAD_DV,
                      BLOCK_N, BLOCK_D, BLOCK_DV, DOT_PRECISION)
    for start_n in range(full_hi, hi, BLOCK_N):
        dq = _dq_tile(dq, q, do, lse, delta, K_head, V_head, M_head, seed, bh, rows, row_ok, start_n,
                      stride_kn, stride_kd, stride_vn, stride_vd, stride_mm, stride_mn,
                      L, S, qk_scale, dropout_p, True, MASK_KIND, DROPOUT, HEAD_D, HEAD_DV,
                      BLOCK_N, BLOCK_D, BLOCK_DV, DOT_PRECISION)
    dq = dq * sm_scale
    tl.store(DQ + b * stride_dqb + h * stride_dqh + rows[:, None] * stride_dqm + d[None, :] * stride_dqd,
             dq.to(DQ.dtype.element_ty), mask=row_ok[:, None] & (d < HEAD_D)[None, :])


@triton.jit
def attn_bwd_dmask_kernel(
    Q, K, V,    # as in the forward
    Mask,       # additive mask, (mB, mH, mL, mS), broadcast dims with stride 0
    Seed, DO, Lse, Delta,
    DMask,      # (mB, mH, mL, mS) fp32 out, contiguous
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_dob, stride_doh, stride_dom, stride_dod,
    B, Hq, L, S, GROUP, mH, mL, mS,
    qk_scale, dropout_p,
    L_BUCKET, S_BUCKET,
    HEAD_D: tl.constexpr, HEAD_DV: tl.constexpr,
    BCAST_B: tl.constexpr, BCAST_H: tl.constexpr, BCAST_L: tl.constexpr, BCAST_S: tl.constexpr,
    DROPOUT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """dS summed over what the mask broadcasts along. Grid (query tiles x key tiles, mB * mH
    over axes y and z, see _program_bh); a broadcast L or S gets one tile along its axis, whose
    program loops over every block. Tiles along x, key tiles fastest: axis y would cap mL."""
    if BCAST_S:
        key_tiles = 1
    else:
        key_tiles = tl.cdiv(mS, BLOCK_N)
    pid_n = tl.program_id(0) % key_tiles
    pid_m = tl.program_id(0) // key_tiles
    pid_bh = _program_bh()
    if BCAST_B:
        if pid_bh >= mH:
            return
    else:
        if pid_bh >= B * mH:
            return
    mb = pid_bh // mH
    mh = pid_bh % mH
    if BCAST_B:
        b_lo = 0
        b_hi = B
    else:
        b_lo = mb
        b_hi = mb + 1
    if BCAST_H:
        h_lo = 0
        h_hi = Hq
    else:
        h_lo = mh
        h_hi = mh + 1
    if BCAST_L:
        m_lo = 0
        m_hi = L
    else:
        m_lo = pid_m * BLOCK_M
        m_hi = m_lo + 1
    if BCAST_S:
        n_lo = 0
        n_hi = S
    else:
        n_lo = pid_n * BLOCK_N
        n_hi = n_lo + 1
    d = tl.arange(0, BLOCK_D)
    dvi = tl.arange(0, BLOCK_DV)
    seed = 0
    if DROPOUT:
        seed = tl.load(Seed)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for b in range(b_lo, b_hi):
        b64 = tl.cast(b, tl.int64)
        for h in range(h_lo, h_hi):
            h64 = tl.cast(h, tl.int64)
            hk = h64 // GROUP
            bh = b64 * Hq + h64
            M_head = Mask + b64 * stride_mb + h64 * stride_mh
            for start_m in range(m_lo, m_hi, BLOCK_M):
                rows = start_m + tl.arange(0, BLOCK_M)
                row_ok = rows < L
                q = tl.load(Q + b64 * stride_qb + h64 * stride_qh + rows[:, None] * stride_qm + d[None, :] * stride_qd,
                            mask=row_ok[:, None] & (d < HEAD_D)[None, :], other=0.0)
                do = tl.load(DO + b64 * stride_dob + h64 * stride_doh + rows[:, None] * stride_dom + dvi[None, :] * stride_dod,
                             mask=row_ok[:, None] & (dvi < HEAD_DV)[None, :], other=0.0)
                lse = tl.load(Lse + bh * L + rows, mask=row_ok, other=float("inf"))
                delta = tl.load(Delta + bh * L + rows, mask=row_ok, other=0.0)
                for start_n in range(n_lo, n_hi, BLOCK_N):
                    keys = start_n + tl.arange(0, BLOCK_N)
                    key_ok = keys < S
                    kT = tl.load(K + b64 * stride_kb + hk * stride_kh + keys[None, :] * stride_kn + d[:, None] * stride_kd,
                                 mask=key_ok[None, :] & (d < HEAD_D)[:, None], other=0.0)
                    vT = tl.load(V + b64 * stride_vb + hk * stride_vh + keys[None, :] * stride_vn + dvi[:, None] * stride_vd,
                                 mask=key_ok[None, :] & (dvi < HEAD_DV)[:, None], other=0.0)
                    s = _scores(q, kT, M_head, rows, keys, row_ok, key_ok, stride_mm, stride_mn,
                                qk_scale, 2, DOT_PRECISION)
                    p = tl.exp2(s - lse[:, None])
                    dp = _dot(do, vT, DOT_PRECISION)
                    if DROPOUT:
                        keep = _keep(seed, bh, rows, start_n, L, S, dropout_p, BLOCK_N)
                        dp = tl.where(keep, dp * (1.0 / (1.0 - dropout_p)), 0.0)
                    # keys past S load k = 0, so their p is not 0: drop them before summing
                    acc += tl.where(key_ok[None, :], p * (dp - delta[:, None]), 0.0)

    out_rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    out_cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    DM_head = DMask + pid_bh.to(tl.int64) * mL * mS
    if BCAST_L:
        if BCAST_S:
            tl.store(DM_head, tl.sum(tl.sum(acc, 1), 0))
        else:
            tl.store(DM_head + out_cols, tl.sum(acc, 0), mask=out_cols < mS)
    else:
        if BCAST_S:
            tl.store(DM_head + out_rows, tl.sum(acc, 1), mask=out_rows < mL)
        else:
            tl.store(DM_head + out_rows.to(tl.int64)[:, None] * mS + out_cols[None, :], acc,
                     mask=(out_rows < mL)[:, None] & (out_cols < mS)[None, :])


@triton.jit
def attn_dropout_mask_kernel(
    Seed,       # (1,) int64
    Keep,       # (B * Hq, L, S) bool out
    BH, L, S, dropout_p,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """The keep mask the attention kernels draw for (seed, dropout_p): for tests and debugging.
    Grid (row tiles x column tiles, BH over axes y and z)."""
    bh = _program_bh()
    if bh >= BH:
        return
    col_tiles = tl.cdiv(S, BLOCK_N)
    rows = (tl.program_id(0) // col_tiles) * BLOCK_M + tl.arange(0, BLOCK_M)
    n0 = (tl.program_id(0) % col_tiles) * BLOCK_N
    cols = n0 + tl.arange(0, BLOCK_N)
    keep = _keep(tl.load(Seed), bh, rows, n0, L, S, dropout_p, BLOCK_N)
    index = (bh.to(tl.int64) * L + rows.to(tl.int64)[:, None]) * S + cols[None, :]
    tl.store(Keep + index, keep, mask=(rows < L)[:, None] & (cols < S)[None, :])


# ---------------------------------------------------------------------------------------------
# Launch configuration: one fixed configuration under the interpreter and for small problems,
# autotuning on the GPU for the rest.

# Under the interpreter: small blocks so that test-sized sequences span several blocks.
_INTERPRETER_BLOCKS = {"BLOCK_M": 16, "BLOCK_N": 16}


def set_interpreter_blocks(block_m: int = 16, block_n: int = 16) -> None:
    """Block sizes used under the interpreter (tests vary them to reach other tilings)."""
    _INTERPRETER_BLOCKS.update(BLOCK_M=block_m, BLOCK_N=block_n)


def _on_gpu(t: torch.Tensor) -> bool:
    return t.device.type == "cuda"


def _small_config(block_d: int, elem_size: int = 2) -> dict:
    """The fixed GPU configuration for problems too small to be worth tuning. One config serves
    the forward, dK/dV and dQ kernels, so the tile is the one none of them spills with
    (launch-exact compiles, bench/results/triton_resources_*.md): 64 x 64 spilled in dK/dV
    and dQ at head dim 64 (K, V and their fp32 gradients held per key row), 32 x 32 spilled
    up to 744 B in the fp32 dQ at head dim 256, 64 x 32 spilled 48-160 B in the fp32 (4-byte
    elem_size) forward and dQ at 128; the tiles below do not, but for the documented exceptions
    of tests/test_triton_compile.py (fp32 dK/dV at 256)."""
    if block_d > 128:
        return dict(BLOCK_M=16, BLOCK_N=32, num_warps=4, num_stages=1)
    if block_d > 64 and elem_size > 2:
        return dict(BLOCK_M=32, BLOCK_N=32, num_warps=4, num_stages=2)
    return dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=2)


def _configs(kernel: str) -> list:
    """Autotuning candidates (H100/A100): big query tiles for the forward and dQ (one Q tile
    reused across all of K), big key tiles for dK/dV; configurations that exceed shared memory
    for the head dim are skipped by the autotuner."""
    C = triton.Config
    if kernel in ("fwd", "dq"):
        shapes = [(128, 64, 8, 3), (128, 64, 4, 3), (128, 128, 8, 3), (128, 32, 4, 4),
                  (64, 64, 4, 3), (64, 32, 4, 4), (64, 64, 4, 2), (64, 32, 4, 1)]
    elif kernel == "dkdv":
        shapes = [(32, 128, 8, 2), (64, 128, 8, 2), (32, 64, 4, 3), (64, 64, 4, 2),
                  (16, 128, 8, 2), (32, 32, 4, 1)]
    else:  # dmask
        shapes = [(64, 64, 4, 2), (128, 64, 8, 2), (32, 32, 4, 1)]
    return [C({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in shapes]


def _kernel_of(named_args) -> str:
    """Which attention kernel an autotuner's arguments belong to (their names differ)."""
    if "Out" in named_args:
        return "attn_fwd_kernel"
    if "DMask" in named_args:
        return "attn_bwd_dmask_kernel"
    return "attn_bwd_dkdv_kernel" if "DK" in named_args else "attn_bwd_dq_kernel"


def _prune(configs, named_args, **kwargs):
    """Drop tiles that are all padding for short sequences, the big ones for head dim 256, and,
    before compiling them, those whose shared memory (triton_kernels/common.py's estimate, for
    this kernel, dtype, head dims and mask) exceeds the device's."""
    L = named_args.get("L_BUCKET", 1 << 30)
    S = named_args.get("S_BUCKET", 1 << 30)
    block_d = max(kwargs.get("BLOCK_D", 64), kwargs.get("BLOCK_DV", 64))
    kernel = _kernel_of(named_args)
    kept = []
    for c in configs:
        m, n = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]
        if m > max(L, 16) or n > max(S, 16):
            continue
        if block_d > 128 and (m * n > 64 * 64 or c.num_stages > 2):
            continue
        if "Q" in named_args and not fits_shared_memory(kernel, named_args, kwargs, c):
            continue
        kept.append(c)
    return kept or configs[-1:]


_TUNE_KEY = ["L_BUCKET", "S_BUCKET", "HEAD_D", "HEAD_DV", "IS_CAUSAL", "MASK_KIND", "DROPOUT"]


@functools.lru_cache(maxsize=None)
def _tuned(kernel: str):
    """The autotuner of one kernel: "fwd", "dkdv" (separate dQ), "dkdv_atomic", "dq", "dmask"."""
    fn = {"fwd": attn_fwd_kernel, "dkdv": attn_bwd_dkdv_kernel, "dkdv_atomic": attn_bwd_dkdv_kernel,
          "dq": attn_bwd_dq_kernel, "dmask": attn_bwd_dmask_kernel}[kernel]
    key = list(_TUNE_KEY)
    extra = {}
    if kernel.startswith("dkdv"):
        key.append("ATOMIC_DQ")
    if kernel == "dkdv_atomic":
        # Every candidate adds into the same fp32 dQ accumulator: zero it before each one (Triton
        # zeroes it once more after tuning, before the launch that counts). Only here: in the
        # separate mode DQ is None, and Triton 3.6's hook calls None.zero_() (review 2026-12, T1).
        extra["reset_to_zero"] = ["DQ"]
    if kernel == "dmask":
        key = ["L_BUCKET", "S_BUCKET", "HEAD_D", "HEAD_DV", "BCAST_B", "BCAST_H", "BCAST_L",
               "BCAST_S", "DROPOUT"]
    # choices kept across runs in the dlh cache directory (dlh_kernels/_cache.py); both dK/dV
    # autotuners share its file (same kernel and configs), their keys differ by ATOMIC_DQ
    return persistent_autotune(triton.autotune(_configs("dkdv" if kernel == "dkdv_atomic" else kernel),
                                               key=key, prune_configs_by={"early_config_prune": _prune},
                                               **extra)(fn))


def _bucket(n: int) -> int:
    return next_power_of_2(max(n, 1))


def _bh_grid(nx: int, bh: int) -> tuple:
    """Launch grid for nx programs along x times bh (batch x head) programs: bh = y + z * ny,
    neither axis past GRID_YZ_MAX; the last z slice is padded (those programs return at once)."""
    if bh <= GRID_YZ_MAX:
        return (nx, bh, 1)
    return (nx, GRID_YZ_MAX, -(-bh // GRID_YZ_MAX))


def _sm_count(ref: torch.Tensor) -> Optional[int]:
    if SM_COUNT is not None:
        return SM_COUNT
    if ref.device.type != "cuda":  # the interpreter (or a harness posing CPU tensors as GPU ones)
        return None
    return _ext.sm_count(ref.device.index)


def _dkdv_block_n(ref: torch.Tensor, L: int, S: int, block_d: int) -> int:
    """The BLOCK_N the dK/dV launch will use; for an autotuned launch the largest candidate's
    (the fewest programs: the split chosen for it holds for every candidate)."""
    if not _on_gpu(ref):
        return _INTERPRETER_BLOCKS["BLOCK_N"]
    if max(L, S) >= AUTOTUNE_MIN_LEN:
        return _largest_dkdv_block_n()
    return _small_config(block_d, ref.element_size())["BLOCK_N"]


@functools.lru_cache(maxsize=None)
def _largest_dkdv_block_n() -> int:  # once: building the configs costs microseconds per call
    return max(c.kwargs["BLOCK_N"] for c in _configs("dkdv"))


def dkdv_head_split(programs: int, group: int, sms: Optional[int]) -> tuple[int, int]:
    """(split, heads per part): the dK/dV launch of `programs` programs (key blocks x B * Hkv)
    runs split x as many, each over `heads per part` of the group's query heads (the last part
    may have fewer), so that there are DKDV_PROGRAMS_PER_SM programs per SM where the group
    allows. (1, group) when the grid is big enough, for MHA, or with no SM count."""
    if not sms or group <= 1 or programs == 0 or programs >= DKDV_PROGRAMS_PER_SM * sms:
        return 1, group
    split = min(group, -(-DKDV_PROGRAMS_PER_SM * sms // programs))
    per = group // split  # rounded down, so that the parts are at least `split`
    return -(-group // per), per  # the last part may be smaller: group 5 in 3 parts of 2, 2, 1


def _launch(kernel: str, fn, grid, args: tuple, meta: dict, ref: torch.Tensor, L: int, S: int,
            block_d: int) -> None:
    """fn[grid](*args, **meta) with the block sizes picked here; grid(BLOCK_M, BLOCK_N)."""
    if min(grid(16, 16)) == 0:  # nothing to do (an empty dim); any block size says the same
        return
    if not _on_gpu(ref):
        config = dict(_INTERPRETER_BLOCKS)
    elif max(L, S) >= AUTOTUNE_MIN_LEN:
        _tuned(kernel)[lambda m: grid(m["BLOCK_M"], m["BLOCK_N"])](*args, **meta)
        return
    else:
        config = _small_config(block_d, ref.element_size())
    launch(fn, grid(config["BLOCK_M"], config["BLOCK_N"]), args, {**meta, **config})


def _strides4(t: Optional[torch.Tensor]) -> tuple:
    """The 4 strides of a 4-D tensor, 0 along its size-1 dims (broadcast); zeros for None."""
    if t is None:
        return (0, 0, 0, 0)
    sz, st = t.shape, t.stride()  # written out: this runs 4-12 times per launch
    return (0 if sz[0] == 1 else st[0], 0 if sz[1] == 1 else st[1], 0 if sz[2] == 1 else st[2],
            0 if sz[3] == 1 else st[3])


def _dot_precision(dtype: torch.dtype) -> str:
    return FP32_DOT_PRECISION if dtype == torch.float32 else "ieee"


def _head_blocks(D: int, Dv: int) -> tuple[int, int]:
    return max(16, next_power_of_2(D)), max(16, next_power_of_2(Dv))


def _mask_kind(mask: Optional[torch.Tensor]) -> int:
    if mask is None:
        return 0
    return 1 if mask.dtype == torch.bool else 2


def fits_int32(t: torch.Tensor) -> bool:
    """True when one head's slice (the last two dims) spans fewer than 2^31 elements: in-head
    offsets are 32-bit, batch and head offsets 64-bit."""
    sz, st = t.shape, t.stride()
    return (sz[-2] - 1) * abs(st[-2]) + (sz[-1] - 1) * abs(st[-1]) < 2**31


# ---------------------------------------------------------------------------------------------
# Launch helpers

def attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor],
                  seed: Optional[torch.Tensor], dropout_p: float, is_causal: bool, scale: float,
                  out: torch.Tensor, lse: torch.Tensor) -> None:
    """Fill out (B, Hq, L, Dv) and lse (B, Hq, L) fp32.

    q (B, Hq, L, D), k (B, Hkv, S, D), v (B, Hkv, S, Dv) with Hq a multiple of Hkv; mask 4-D
    with each dim 1 or the full size (B, Hq, L, S); any strides.
    """
    B, Hq, L, D = q.shape
    Hkv, S, Dv = k.shape[1], k.shape[2], v.shape[3]
    if B * Hq * L == 0:
        return
    group = Hq // Hkv
    block_d, block_dv = _head_blocks(D, Dv)
    dropout = dropout_p > 0.0
    args = (q, k, v, mask, seed if dropout else None, out, lse,
            *_strides4(q), *_strides4(k), *_strides4(v), *_strides4(mask), *out.stride(),
            B * Hq, Hq, L, S, group, scale * LOG2E, dropout_p, _bucket(L), _bucket(S))
    meta = dict(HEAD_D=D, HEAD_DV=Dv, IS_CAUSAL=is_causal, MASK_KIND=_mask_kind(mask),
                DROPOUT=dropout, BLOCK_D=block_d, BLOCK_DV=block_dv,
                DOT_PRECISION=_dot_precision(q.dtype))
    _launch("fwd", attn_fwd_kernel, lambda bm, bn: _bh_grid(-(-L // bm), B * Hq), args, meta, q,
            L, S, max(block_d, block_dv))


def attention_bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  out: torch.Tensor, lse: torch.Tensor, mask: Optional[torch.Tensor],
                  seed: Optional[torch.Tensor], dropout_p: float, is_causal: bool, scale: float,
                  dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor,
                  dmask: Optional[torch.Tensor], deterministic: bool) -> None:
    """Fill dq (like q), dk, dv (like k, v) and, for an additive mask, dmask (the mask's 4-D
    shape, fp32, contiguous). Shapes as in attention_fwd; lse from it."""
    B, Hq, L, D = q.shape
    Hkv, S, Dv = k.shape[1], k.shape[2], v.shape[3]
    group = Hq // Hkv if Hkv else 1
    block_d, block_dv = _head_blocks(D, Dv)
    block_big = max(block_d, block_dv)
    dropout = dropout_p > 0.0
    seed = seed if dropout else None
    kind = _mask_kind(mask)
    precision = _dot_precision(q.dtype)
    qk_scale = scale * LOG2E
    buckets = (_bucket(L), _bucket(S))

    delta = empty((B * Hq, L), torch.float32, q.device)
    if B * Hq * L > 0:
        rows = 64 if _on_gpu(q) else _INTERPRETER_BLOCKS["BLOCK_M"]
        launch(attn_bwd_preprocess_kernel, _bh_grid(-(-L // rows), B * Hq),
               (out, do, delta, *out.stride(), *_strides4(do), B * Hq, Hq, L),
               dict(HEAD_DV=Dv, BLOCK_M=rows, BLOCK_DV=block_dv))

    atomic = DQ_MODE == "atomic" and not deterministic
    dq_acc = torch.zeros((B, Hq, L, D), dtype=torch.float32, device=q.device) if atomic else None
    common = dict(HEAD_D=D, HEAD_DV=Dv, IS_CAUSAL=is_causal, MASK_KIND=kind, DROPOUT=dropout,
                  BLOCK_D=block_d, BLOCK_DV=block_dv, DOT_PRECISION=precision)
    # GQA/MQA with few key blocks: the group's query heads over `split` programs per key block,
    # into fp32 partials (B, Hkv * split, S, D) summed below (fixed order: deterministic)
    split, part = dkdv_head_split(-(-S // _dkdv_block_n(q, L, S, block_big)) * B * Hkv, group,
                                  _sm_count(q))
    dk_out, dv_out = dk, dv
    if split > 1:
        dk_out = empty((B, Hkv * split, S, D), torch.float32, q.device)
        dv_out = empty((B, Hkv * split, S, Dv), torch.float32, q.device)
    _launch("dkdv_atomic" if atomic else "dkdv", attn_bwd_dkdv_kernel,
            lambda bm, bn: _bh_grid(-(-S // bn), B * Hkv * split),
            (q, k, v, mask, seed, do, lse, delta, dk_out, dv_out, dq_acc,
             *_strides4(q), *_strides4(k), *_strides4(v), *_strides4(mask), *_strides4(do),
             *dk_out.stride(), *dv_out.stride(), *(dq_acc.stride() if atomic else (0, 0, 0, 0)),
             B * Hkv, Hq, Hkv, L, S, group, split, part, qk_scale, scale, dropout_p, *buckets),
            dict(common, ATOMIC_DQ=atomic), q, L, S, block_big)
    if split > 1:
        dk.copy_(dk_out.view(B, Hkv, split, S, D).sum(2))
        dv.copy_(dv_out.view(B, Hkv, split, S, Dv).sum(2))
    if atomic:
        dq.copy_(dq_acc)
    else:
        _launch("dq", attn_bwd_dq_kernel, lambda bm, bn: _bh_grid(-(-L // bm), B * Hq),
                (q, k, v, mask, seed, do, lse, delta, dq,
                 *_strides4(q), *_strides4(k), *_strides4(v), *_strides4(mask), *_strides4(do),
                 *dq.stride(), B * Hq, Hq, L, S, group, qk_scale, scale, dropout_p, *buckets),
                common, q, L, S, block_big)

    if dmask is not None:
        mB, mH, mL, mS = mask.shape
        bcast = dict(BCAST_B=mB == 1 and B != 1, BCAST_H=mH == 1 and Hq != 1,
                     BCAST_L=mL == 1 and L != 1, BCAST_S=mS == 1 and S != 1)
        _launch("dmask", attn_bwd_dmask_kernel,
                lambda bm, bn: _bh_grid((1 if bcast["BCAST_S"] else -(-mS // bn))
                                        * (1 if bcast["BCAST_L"] else -(-mL // bm)), mB * mH),
                (q, k, v, mask, seed, do, lse, delta, dmask,
                 *_strides4(q), *_strides4(k), *_strides4(v), *_strides4(mask), *_strides4(do),
                 B, Hq, L, S, group, mH, mL, mS, qk_scale, dropout_p, *buckets),
                dict(HEAD_D=D, HEAD_DV=Dv, DROPOUT=dropout, BLOCK_D=block_d, BLOCK_DV=block_dv,
                     DOT_PRECISION=precision, **bcast), q, L, S, block_big)


def dropout_keep_mask(seed: torch.Tensor, B: int, H: int, L: int, S: int, dropout_p: float) -> torch.Tensor:
    """(B, H, L, S) bool: True where the attention kernels keep an element for this seed."""
    keep = torch.empty((B * H, L, S), dtype=torch.bool, device=seed.device)
    if keep.numel():
        blocks = 64
        launch(attn_dropout_mask_kernel, _bh_grid(-(-L // blocks) * -(-S // blocks), B * H),
               (seed, keep, B * H, L, S, dropout_p), dict(BLOCK_M=blocks, BLOCK_N=blocks))
    return keep.view(B, H, L, S)
