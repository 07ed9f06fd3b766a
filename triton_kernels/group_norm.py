"""GroupNorm in Triton, forward and backward, with an optional SiLU fused after the affine.

Math, per group (sample n, group g) of L = Cg * S elements: the Cg = C/G channels
g*Cg .. g*Cg + Cg - 1 at all S spatial positions (all arithmetic in fp32, storage in the input
dtype):

    mean = sum(x)/L,  var = sum((x - mean)^2)/L,  rstd = 1/sqrt(var + eps)
    xhat = (x - mean) * rstd,   z = xhat * w[c] + b[c],   y = silu(z) = z * sigmoid(z)  (or y = z)

    backward, with z recomputed from x and the saved mean/rstd (z is never stored):
    dz = dy * silu'(z) = dy * s * (1 + z * (1 - s)),  s = sigmoid(z)   (dz = dy without SiLU)
    g  = dz * w[c]
    dx = rstd * (g - xhat * mean_L(g * xhat) - mean_L(g))
    dw[c] = sum over n, s of dz * xhat,   db[c] = sum over n, s of dz

Bytes per element (s = element size): the forward must read x and write y (2s), the backward
read dy and x and write dx (3s). Weights, statistics and the dw/db partials are O(N*C), noise.
FLOPs: ~10 per element, ~25 with the SiLU (one exp): memory-bound either way.

Layout: the kernels see x, y, dy, dx as (N, C, S) with three strides each (the spatial dims
collapsed into one stride), so contiguous NCHW (stride_s = 1) and channels_last (stride_c = 1)
both run in place, without a copy. A group is a (Cg, S) block, walked in (BLOCK_C, BLOCK_S)
tiles; Triton specialises the unit stride, so the tile's loads are vectorised along whichever
dim is contiguous. Channels_last with few channels per group (Cg = 4 in a U-Net's
GroupNorm(32, 128)) gives each program only Cg * s contiguous bytes per spatial position: the
sectors are shared with the neighbouring groups' programs, which run at the same time and find
them in L2, so DRAM traffic stays ~1x but L2 traffic grows (see bench/group_norm.py).

Two paths:
- fused (the group's tile fits MAX_FUSED elements, and the groups fill the GPU): one program per
  group, the whole group in registers: one read, one write. The backward writes each program's
  per-channel dw/db sums as one (N, 1, C) partial; torch sums over n in a fixed order.
- split (larger groups, the U-Net's 16K..130K-element groups; also groups past one split tile
  when N * G programs would leave SMs idle, fewer than one per SM, e.g. a batch of 1 or 2 with
  G = 32 on 132 SMs): a group is cut into chunks, (channel block, range of spatial positions),
  handled by different programs, so a few huge groups still fill the GPU: the plan aims for ~4
  programs per SM. Forward pass 1 writes per-chunk (count, mean, M2) into a small fp32 buffer;
  pass 2 combines the group's chunks in its prologue (Chan's parallel variance: exact, no
  E[x^2] - E[x]^2 cancellation) and normalises its chunk. Backward pass 1 writes per-chunk
  (sum g*xhat, sum g) and the chunk's per-channel dw/db sums into an (N, s_chunks, C) partial;
  pass 2 writes dx. Pass 2 re-reads what pass 1 read, so samples go in batches of at most
  BATCH_BYTES of re-read data: the re-read then comes from L2, not DRAM (A100 L2 40 MB, H100 50).

  Programs per pass for the SD U-Net's GroupNorm(32, 320) at 64x64, B = 2, on 132 SMs (eager's
  statistics kernel, one block per (sample, group), launches B * G = 64): NCHW 640 (10
  one-channel blocks of 4,096 positions per group), channels_last 512 (8 spatial chunks of 512
  positions x 16-wide channel tiles per group); two launches per direction, one launch pair per
  batch of samples (`launches` lists them). Cost of the split: the chunk programs re-read their
  chunk (from L2: +1 read forward, +2 backward) and each pass-2 program reads its group's
  n_chunks partials (12 or 8 bytes each; n_chunks <= ~4 * SMs / (batch * G) + channel blocks).

Versions:
- v1 (this one): fused + split paths, strided (N, C, S) tiles, heuristic launch parameters
  cached per shape. Checked under the Triton interpreter on CPU against float64 and compiled for
  sm_80/sm_90; not yet run or timed on a GPU.
- v1.1: the split passes on one flat grid axis (row x chunk): a group of 65,536+ channel blocks
  no longer puts more than CUDA's 65,535 programs on axis y.
- v1.2: the SM count the plan assumes can be forced (set_limits(sm_count=...)), so the GPU's
  plans are tested on CPU and a GPU can A/B the fused and split paths on one shape; `launches`
  lists a call's launches and programs. Kernels and plans unchanged (the static figures in
  bench/results/triton_resources_*.md stay as they were). Considered and not done: splitting
  fused-size groups below 2 per SM (see _plan).
"""
from __future__ import annotations

import functools
from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from dlh_kernels._alloc import empty
from dlh_kernels.triton_kernels.common import cdiv, launch, next_power_of_2

# A group whose padded tile has at most MAX_FUSED elements is normalised from registers in one
# pass; larger groups take the split path in tiles of SPLIT_TILE elements. BATCH_BYTES bounds the
# data a split pass 2 re-reads per launch pair. Tests lower all three (set_limits).
MAX_FUSED = 8192
SPLIT_TILE = 4096
BATCH_BYTES = 16 << 20


# The kernels below write their index math and activation out inline rather than through small
# @triton.jit helpers: compiled, both are the same code, but the interpreter (the CPU test path)
# pays ~5 ms per helper call per program. Shared patterns, written once here:
#   offsets in a sample: c_off[:, None] + s_off[None, :], c_off = channel * stride_c and
#     s_off = position * stride_s, 64-bit only when INT64 (a sample spans >= 2^31 elements);
#     the sample base n * stride_n is always 64-bit;
#   silu(z) = z / (1 + exp(-z)); silu'(z) = s * (1 + z * (1 - s)), s = 1 / (1 + exp(-z)).


@triton.jit
def group_norm_fwd_kernel(
    X,          # input, (N, C, S), strides (stride_xn, stride_xc, stride_xs)
    W,          # weight, (C,), or None
    B,          # bias, (C,), or None
    Y,          # output, (N, C, S), strides (stride_yn, stride_yc, stride_ys)
    Mean,       # (N * G,) fp32
    Rstd,       # (N * G,) fp32
    stride_xn, stride_xc, stride_xs, stride_yn, stride_yc, stride_ys,
    G, CG, S, eps,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, SILU: tl.constexpr, INT64: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """Fused path: one program per group, the whole (Cg, S) group in one tile."""
    row = tl.program_id(0)  # n * G + g
    n = row // G
    g = row - n * G
    c = tl.arange(0, BLOCK_C)
    s = tl.arange(0, BLOCK_S)
    c_ok = c < CG
    mask = c_ok[:, None] & (s < S)[None, :]
    ch = g * CG + c
    if INT64:
        ch_i, s_i = ch.to(tl.int64), s.to(tl.int64)
    else:
        ch_i, s_i = ch, s
    x_ptr = X + n.to(tl.int64) * stride_xn
    x = tl.load(x_ptr + (ch_i * stride_xc)[:, None] + (s_i * stride_xs)[None, :], mask=mask,
                other=0.0).to(tl.float32)
    count = (CG * 1.0) * S  # a float product: no int32 overflow
    mean = tl.sum(x) / count
    # two-pass variance from the registers: never E[x^2] - E[x]^2
    centred = tl.where(mask, x - mean, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(centred * centred) / count + eps)
    tl.store(Mean + row, mean)
    tl.store(Rstd + row, rstd)
    z = centred * rstd
    if HAS_W:
        z = z * tl.load(W + ch, mask=c_ok, other=0.0).to(tl.float32)[:, None]
    if HAS_B:
        z = z + tl.load(B + ch, mask=c_ok, other=0.0).to(tl.float32)[:, None]
    if SILU:
        z = z / (1.0 + tl.exp(-z))
    y_ptr = Y + n.to(tl.int64) * stride_yn
    tl.store(y_ptr + (ch_i * stride_yc)[:, None] + (s_i * stride_ys)[None, :],
             z.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _row_chunk(CG, s_chunks, BLOCK_C: tl.constexpr):
    """(row, chunk, n_chunks) of a split-path program. The grid is one flat axis over
    row * n_chunks + chunk: a group with many channel blocks has more than the 65,535 chunks that
    CUDA allows on axis y, and batch x groups can pass it too."""
    n_chunks = tl.cdiv(CG, BLOCK_C) * s_chunks
    pid = tl.program_id(0)
    row = pid // n_chunks
    return row, pid - row * n_chunks, n_chunks


@triton.jit
def group_norm_fwd_partial_kernel(
    X,          # input, (N, C, S), strides (stride_xn, stride_xc, stride_xs)
    Partial,    # (groups, n_chunks, 3) fp32 out: per chunk (count, mean, M2)
    stride_xn, stride_xc, stride_xs,
    G, CG, S, CHUNK_S, s_chunks,
    INT64: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """Split forward, pass 1: the statistics of one chunk of one group.

    Grid (groups * c_blocks * s_chunks,): chunk = (channel block, spatial range of CHUNK_S).
    """
    row, chunk, n_chunks = _row_chunk(CG, s_chunks, BLOCK_C)
    n = row // G
    g = row - n * G
    cb = chunk // s_chunks
    c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < CG
    ch = g * CG + c
    if INT64:
        ch = ch.to(tl.int64)
    c_off = (ch * stride_xc)[:, None]
    n_c = tl.minimum(CG - cb * BLOCK_C, BLOCK_C).to(tl.float32)  # valid channels of the tile
    s_begin = (chunk - cb * s_chunks) * CHUNK_S
    s_end = tl.minimum(s_begin + CHUNK_S, S)
    x_ptr = X + n.to(tl.int64) * stride_xn
    count = 0.0
    mean = 0.0
    m2 = 0.0
    for s0 in range(s_begin, s_end, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        mask = c_ok[:, None] & (s < s_end)[None, :]
        if INT64:
            s = s.to(tl.int64)
        x = tl.load(x_ptr + c_off + (s * stride_xs)[None, :], mask=mask, other=0.0).to(tl.float32)
        # exact two-pass statistics of the tile, merged into the running ones (Chan et al.)
        tile_count = n_c * tl.minimum(s_end - s0, BLOCK_S).to(tl.float32)
        tile_mean = tl.sum(x) / tile_count
        d = tl.where(mask, x - tile_mean, 0.0)
        tile_m2 = tl.sum(d * d)
        total = count + tile_count
        delta = tile_mean - mean
        mean += delta * (tile_count / total)
        m2 += tile_m2 + delta * delta * (count * tile_count / total)
        count = total
    out = Partial + (row.to(tl.int64) * n_chunks + chunk) * 3
    tl.store(out, count)
    tl.store(out + 1, mean)
    tl.store(out + 2, m2)


@triton.jit
def group_norm_fwd_apply_kernel(
    X, W, B, Y, Mean, Rstd,  # as in group_norm_fwd_kernel
    Partial,    # (groups, n_chunks, 3) fp32 from group_norm_fwd_partial_kernel
    stride_xn, stride_xc, stride_xs, stride_yn, stride_yc, stride_ys,
    G, CG, S, CHUNK_S, s_chunks, eps,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, SILU: tl.constexpr, INT64: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, CHUNKS_P2: tl.constexpr,
):
    """Split forward, pass 2: combine the group's chunk statistics, normalise one chunk."""
    row, chunk, n_chunks = _row_chunk(CG, s_chunks, BLOCK_C)
    n = row // G
    g = row - n * G
    idx = tl.arange(0, CHUNKS_P2)
    idx_ok = idx < n_chunks
    part = Partial + (row.to(tl.int64) * n_chunks + idx) * 3
    p_count = tl.load(part, mask=idx_ok, other=0.0)
    p_mean = tl.load(part + 1, mask=idx_ok, other=0.0)
    p_m2 = tl.load(part + 2, mask=idx_ok, other=0.0)
    count = tl.sum(p_count)
    mean = tl.sum(p_count * p_mean) / count
    # Chan: M2 = sum_k M2_k + n_k * (mean_k - mean)^2
    spread = tl.where(idx_ok, p_m2 + p_count * (p_mean - mean) * (p_mean - mean), 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(spread) / count + eps)
    if chunk == 0:
        tl.store(Mean + row, mean)
        tl.store(Rstd + row, rstd)

    cb = chunk // s_chunks
    c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < CG
    ch = g * CG + c
    # the affine folded into a per-channel scale: z = (x - mean) * (rstd * w) + b. Not
    # x * scale + shift: with |mean| >> std that would cancel two large terms.
    scale = tl.full([BLOCK_C], 1.0, tl.float32) * rstd
    if HAS_W:
        scale = scale * tl.load(W + ch, mask=c_ok, other=0.0).to(tl.float32)
    shift = tl.zeros([BLOCK_C], dtype=tl.float32)
    if HAS_B:
        shift = tl.load(B + ch, mask=c_ok, other=0.0).to(tl.float32)
    if INT64:
        ch = ch.to(tl.int64)
    xc_off = (ch * stride_xc)[:, None]
    yc_off = (ch * stride_yc)[:, None]
    s_begin = (chunk - cb * s_chunks) * CHUNK_S
    s_end = tl.minimum(s_begin + CHUNK_S, S)
    x_ptr = X + n.to(tl.int64) * stride_xn
    y_ptr = Y + n.to(tl.int64) * stride_yn
    for s0 in range(s_begin, s_end, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        mask = c_ok[:, None] & (s < s_end)[None, :]
        if INT64:
            s = s.to(tl.int64)
        x = tl.load(x_ptr + xc_off + (s * stride_xs)[None, :], mask=mask, other=0.0).to(tl.float32)
        z = (x - mean) * scale[:, None] + shift[:, None]
        if SILU:
            z = z / (1.0 + tl.exp(-z))
        tl.store(y_ptr + yc_off + (s * stride_ys)[None, :], z.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def group_norm_bwd_kernel(
    DY,         # output gradient, (N, C, S), strides (stride_dyn, stride_dyc, stride_dys)
    X,          # the forward's input, (N, C, S), strides (stride_xn, stride_xc, stride_xs)
    W, B,       # weight, bias, (C,), or None (the bias only matters under the SiLU)
    Mean, Rstd, # (N * G,) fp32 from the forward
    DX,         # input gradient out, (N, C, S), strides (stride_dxn, stride_dxc, stride_dxs)
    DWp, DBp,   # (N, 1, C) fp32 out: per-sample channel sums of dz * xhat and dz; or None
    stride_dyn, stride_dyc, stride_dys, stride_xn, stride_xc, stride_xs,
    stride_dxn, stride_dxc, stride_dxs,
    G, CG, S, C,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, SILU: tl.constexpr,
    COMPUTE_DW: tl.constexpr, COMPUTE_DB: tl.constexpr, INT64: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """Fused backward: one program per group, the whole group in registers."""
    row = tl.program_id(0)
    n = row // G
    g = row - n * G
    c = tl.arange(0, BLOCK_C)
    s = tl.arange(0, BLOCK_S)
    c_ok = c < CG
    mask = c_ok[:, None] & (s < S)[None, :]
    ch = g * CG + c
    if INT64:
        ch_i, s_i = ch.to(tl.int64), s.to(tl.int64)
    else:
        ch_i, s_i = ch, s
    n64 = n.to(tl.int64)
    dy = tl.load(DY + n64 * stride_dyn + (ch_i * stride_dyc)[:, None] + (s_i * stride_dys)[None, :],
                 mask=mask, other=0.0).to(tl.float32)
    x = tl.load(X + n64 * stride_xn + (ch_i * stride_xc)[:, None] + (s_i * stride_xs)[None, :],
                mask=mask, other=0.0).to(tl.float32)
    mean = tl.load(Mean + row)
    rstd = tl.load(Rstd + row)
    xhat = tl.where(mask, (x - mean) * rstd, 0.0)
    w = tl.full([BLOCK_C], 1.0, tl.float32)
    if HAS_W:
        w = tl.load(W + ch, mask=c_ok, other=0.0).to(tl.float32)
    dz = dy  # 0 off the mask
    if SILU:
        z = xhat * w[:, None]
        if HAS_B:
            z = z + tl.load(B + ch, mask=c_ok, other=0.0).to(tl.float32)[:, None]
        sig = 1.0 / (1.0 + tl.exp(-z))
        dz = dy * sig * (1.0 + z * (1.0 - sig))
    gw = dz * w[:, None]
    count = (CG * 1.0) * S
    mean_gx = tl.sum(gw * xhat) / count
    mean_g = tl.sum(gw) / count
    dx = (gw - xhat * mean_gx - mean_g) * rstd
    tl.store(DX + n64 * stride_dxn + (ch_i * stride_dxc)[:, None] + (s_i * stride_dxs)[None, :],
             dx.to(DX.dtype.element_ty), mask=mask)
    if COMPUTE_DW:
        tl.store(DWp + n64 * C + ch, tl.sum(dz * xhat, axis=1), mask=c_ok)
    if COMPUTE_DB:
        tl.store(DBp + n64 * C + ch, tl.sum(dz, axis=1), mask=c_ok)


@triton.jit
def group_norm_bwd_partial_kernel(
    DY, X, W, B, Mean, Rstd,  # as in group_norm_bwd_kernel
    Partial,    # (groups, n_chunks, 2) fp32 out: per chunk (sum g*xhat, sum g)
    DWp, DBp,   # (N, s_chunks, C) fp32 out: the chunk's channel sums of dz*xhat and dz; or None
    stride_dyn, stride_dyc, stride_dys, stride_xn, stride_xc, stride_xs,
    G, CG, S, C, CHUNK_S, s_chunks,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, SILU: tl.constexpr,
    COMPUTE_DW: tl.constexpr, COMPUTE_DB: tl.constexpr, INT64: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """Split backward, pass 1: the group sums dx needs, and the dw/db sums, per chunk."""
    row, chunk, n_chunks = _row_chunk(CG, s_chunks, BLOCK_C)
    n = row // G
    g = row - n * G
    cb = chunk // s_chunks
    sc = chunk - cb * s_chunks
    c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < CG
    ch = g * CG + c
    w = tl.full([BLOCK_C], 1.0, tl.float32)
    if HAS_W:
        w = tl.load(W + ch, mask=c_ok, other=0.0).to(tl.float32)
    bias = tl.zeros([BLOCK_C], dtype=tl.float32)
    if HAS_B:
        bias = tl.load(B + ch, mask=c_ok, other=0.0).to(tl.float32)
    ch_i = ch.to(tl.int64) if INT64 else ch
    dyc_off = (ch_i * stride_dyc)[:, None]
    xc_off = (ch_i * stride_xc)[:, None]
    s_begin = sc * CHUNK_S
    s_end = tl.minimum(s_begin + CHUNK_S, S)
    n64 = n.to(tl.int64)
    dy_ptr = DY + n64 * stride_dyn
    x_ptr = X + n64 * stride_xn
    mean = tl.load(Mean + row)
    rstd = tl.load(Rstd + row)
    sum_gx = 0.0
    sum_g = 0.0
    dw_acc = tl.zeros([BLOCK_C], dtype=tl.float32)
    db_acc = tl.zeros([BLOCK_C], dtype=tl.float32)
    for s0 in range(s_begin, s_end, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        mask = c_ok[:, None] & (s < s_end)[None, :]
        if INT64:
            s = s.to(tl.int64)
        dy = tl.load(dy_ptr + dyc_off + (s * stride_dys)[None, :], mask=mask, other=0.0).to(tl.float32)
        x = tl.load(x_ptr + xc_off + (s * stride_xs)[None, :], mask=mask, other=0.0).to(tl.float32)
        xhat = tl.where(mask, (x - mean) * rstd, 0.0)
        dz = dy
        if SILU:
            z = xhat * w[:, None] + bias[:, None]
            sig = 1.0 / (1.0 + tl.exp(-z))
            dz = dy * sig * (1.0 + z * (1.0 - sig))
        gw = dz * w[:, None]
        sum_gx += tl.sum(gw * xhat)
        sum_g += tl.sum(gw)
        if COMPUTE_DW:
            dw_acc += tl.sum(dz * xhat, axis=1)
        if COMPUTE_DB:
            db_acc += tl.sum(dz, axis=1)
    out = Partial + (row.to(tl.int64) * n_chunks + chunk) * 2
    tl.store(out, sum_gx)
    tl.store(out + 1, sum_g)
    if COMPUTE_DW:
        tl.store(DWp + (n64 * s_chunks + sc) * C + ch, dw_acc, mask=c_ok)
    if COMPUTE_DB:
        tl.store(DBp + (n64 * s_chunks + sc) * C + ch, db_acc, mask=c_ok)


@triton.jit
def group_norm_bwd_apply_kernel(
    DY, X, W, B, Mean, Rstd, DX,  # as in group_norm_bwd_kernel
    Partial,    # (groups, n_chunks, 2) fp32 from group_norm_bwd_partial_kernel
    stride_dyn, stride_dyc, stride_dys, stride_xn, stride_xc, stride_xs,
    stride_dxn, stride_dxc, stride_dxs,
    G, CG, S, CHUNK_S, s_chunks,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, SILU: tl.constexpr, INT64: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, CHUNKS_P2: tl.constexpr,
):
    """Split backward, pass 2: dx of one chunk, from the group sums of all its chunks."""
    row, chunk, n_chunks = _row_chunk(CG, s_chunks, BLOCK_C)
    n = row // G
    g = row - n * G
    idx = tl.arange(0, CHUNKS_P2)
    idx_ok = idx < n_chunks
    part = Partial + (row.to(tl.int64) * n_chunks + idx) * 2
    count = (CG * 1.0) * S
    mean_gx = tl.sum(tl.load(part, mask=idx_ok, other=0.0)) / count
    mean_g = tl.sum(tl.load(part + 1, mask=idx_ok, other=0.0)) / count
    mean = tl.load(Mean + row)
    rstd = tl.load(Rstd + row)

    cb = chunk // s_chunks
    c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < CG
    ch = g * CG + c
    w = tl.full([BLOCK_C], 1.0, tl.float32)
    if HAS_W:
        w = tl.load(W + ch, mask=c_ok, other=0.0).to(tl.float32)
    bias = tl.zeros([BLOCK_C], dtype=tl.float32)
    if HAS_B:
        bias = tl.load(B + ch, mask=c_ok, other=0.0).to(tl.float32)
    ch_i = ch.to(tl.int64) if INT64 else ch
    dyc_off = (ch_i * stride_dyc)[:, None]
    xc_off = (ch_i * stride_xc)[:, None]
    dxc_off = (ch_i * stride_dxc)[:, None]
    s_begin = (chunk - cb * s_chunks) * CHUNK_S
    s_end = tl.minimum(s_begin + CHUNK_S, S)
    n64 = n.to(tl.int64)
    dy_ptr = DY + n64 * stride_dyn
    x_ptr = X + n64 * stride_xn
    dx_ptr = DX + n64 * stride_dxn
    for s0 in range(s_begin, s_end, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        mask = c_ok[:, None] & (s < s_end)[None, :]
        if INT64:
            s = s.to(tl.int64)
        dy = tl.load(dy_ptr + dyc_off + (s * stride_dys)[None, :], mask=mask, other=0.0).to(tl.float32)
        x = tl.load(x_ptr + xc_off + (s * stride_xs)[None, :], mask=mask, other=0.0).to(tl.float32)
        xhat = tl.where(mask, (x - mean) * rstd, 0.0)
        dz = dy
        if SILU:
            z = xhat * w[:, None] + bias[:, None]
            sig = 1.0 / (1.0 + tl.exp(-z))
            dz = dy * sig * (1.0 + z * (1.0 - sig))
        dx = (dz * w[:, None] - xhat * mean_gx - mean_g) * rstd
        tl.store(dx_ptr + dxc_off + (s * stride_dxs)[None, :], dx.to(DX.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------
# Launch helpers. Launch parameters depend only on the problem's sizes, its layout class and the
# device, and are cached.

class _Plan(NamedTuple):
    split: bool
    block_c: int
    block_s: int
    num_warps: int
    c_blocks: int       # split: channel blocks per group
    s_chunks: int       # split: spatial chunks per channel block
    chunk_s: int        # split: spatial positions per chunk (a multiple of block_s)
    chunks_p2: int      # split: next power of two of c_blocks * s_chunks
    batch: int          # samples per launch (pair)


def set_limits(max_fused: int = 8192, split_tile: int = 4096, batch_bytes: int = 16 << 20,
               cpu_programs: int = 4, sm_count: Optional[int] = None) -> None:
    """Change the fused/split threshold, the split tile, the L2 batch and the programs a CPU
    (interpreter) launch aims for: tests use small values to reach every path. sm_count: plan
    as for a GPU with that many SMs on any device (tests of the GPU's plans on CPU); None: the
    device's own (CPU: cpu_programs)."""
    global MAX_FUSED, SPLIT_TILE, BATCH_BYTES, _CPU_PROGRAMS, _SM_COUNT
    MAX_FUSED, SPLIT_TILE, BATCH_BYTES, _CPU_PROGRAMS = max_fused, split_tile, batch_bytes, cpu_programs
    _SM_COUNT = sm_count
    _plan.cache_clear()


_CPU_PROGRAMS = 4   # the interpreter: few programs keep the tests quick
_SM_COUNT = None    # forced SM count (set_limits), or None
_PER_SM = 4         # programs per SM a split launch aims for
_FEW_PER_SM = 1     # fewer (sample, group)s per SM than this: fused-size groups split too


def _programs_wanted(device: torch.device) -> int:
    """Programs a launch should have to fill the device: _PER_SM per SM."""
    if _SM_COUNT is not None:
        return _PER_SM * _SM_COUNT
    if device.type != "cuda":
        return _CPU_PROGRAMS
    from dlh_kernels._ext import sm_count
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _PER_SM * sm_count(index)


def _pow2(n: int) -> int:
    return next_power_of_2(max(1, n))


@functools.lru_cache(maxsize=4096)
def _plan(N: int, C: int, G: int, S: int, channels_inner: bool, reread_bytes: int,
          device: torch.device) -> _Plan:
    """channels_inner: the channel stride is 1 (channels_last), so tiles grow along channels
    first. reread_bytes: bytes a split pass 2 re-reads per sample (x, and dy in the backward)."""
    CG = C // G
    want = _programs_wanted(device)
    block_c, block_s = _pow2(CG), _pow2(S)
    tile = block_c * block_s
    # few groups that are large: split them even when they would fit, to fill the GPU. Few:
    # fewer than _FEW_PER_SM groups per SM (want is _PER_SM per SM). Large: past one split tile.
    # Not 2 per SM: a fused program loads its whole group (<= MAX_FUSED elements, <= 32 KB) in
    # one go, so 1-2 of them per SM is a microsecond of traffic, while the split adds a launch
    # (host cost, issue 19) and a re-read. Unmeasured: set_limits(sm_count=) A/Bs it on a GPU.
    few = N * G * _PER_SM < want * _FEW_PER_SM and tile > SPLIT_TILE
    if tile <= MAX_FUSED and not few:
        num_warps = max(1, min(16, tile // 512))
        return _Plan(False, block_c, block_s, num_warps, 1, 1, S, 1, N)
    if channels_inner:
        block_c = min(block_c, SPLIT_TILE)
        block_s = max(1, min(block_s, SPLIT_TILE // block_c))
    else:
        block_s = min(block_s, SPLIT_TILE)
        block_c = max(1, min(block_c, SPLIT_TILE // block_s))
    batch = max(1, min(N, BATCH_BYTES // max(1, reread_bytes)))
    c_blocks = cdiv(CG, block_c)
    s_tiles = cdiv(S, block_s)
    chunks_wanted = cdiv(want, batch * G)
    s_chunks = max(1, min(s_tiles, cdiv(chunks_wanted, c_blocks)))
    chunk_s = cdiv(s_tiles, s_chunks) * block_s
    s_chunks = cdiv(S, chunk_s)
    num_warps = max(1, min(16, block_c * block_s // 512))
    return _Plan(True, block_c, block_s, num_warps, c_blocks, s_chunks, chunk_s,
                 _pow2(c_blocks * s_chunks), batch)


def launches(N: int, C: int, G: int, S: int, channels_inner: bool, element_size: int,
             device: torch.device, backward: bool = False) -> list[tuple[str, int]]:
    """(kernel, programs) of every launch one forward (or backward) call makes, in order: the
    plan's program counts, for tests and reports (nothing runs)."""
    reread = C * S * element_size * (2 if backward else 1)
    plan = _plan(N, C, G, S, channels_inner, reread, device)
    kind = "bwd" if backward else "fwd"
    if not plan.split:
        return [(f"group_norm_{kind}_kernel", N * G)]
    out = []
    for n0 in range(0, N, plan.batch):
        programs = (min(N, n0 + plan.batch) - n0) * G * plan.c_blocks * plan.s_chunks
        out += [(f"group_norm_{kind}_partial_kernel", programs),
                (f"group_norm_{kind}_apply_kernel", programs)]
    return out


def _needs_int64(*ts: torch.Tensor) -> bool:
    """True when an offset inside one sample may pass 2^31 (the sample base is always 64-bit)."""
    return any(sum((d - 1) * abs(st) for d, st in zip(t.shape[1:], t.stride()[1:])) >= 2**31 - 1
               for t in ts)


def _strides(t: torch.Tensor) -> tuple[int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2)


def group_norm_fwd(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                   y: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor, num_groups: int,
                   eps: float, silu: bool) -> None:
    """Fill y, mean and rstd. x, y: (N, C, S) views, any strides; mean, rstd: (N * G,) fp32."""
    N, C, S = x.shape
    G = num_groups
    if N == 0 or C == 0 or S == 0:
        return
    CG = C // G
    plan = _plan(N, C, G, S, x.stride(1) == 1 and S > 1, C * S * x.element_size(), x.device)
    int64 = _needs_int64(x, y)
    flags = dict(HAS_W=weight is not None, HAS_B=bias is not None, SILU=silu, INT64=int64,
                 BLOCK_C=plan.block_c, BLOCK_S=plan.block_s, num_warps=plan.num_warps)
    if not plan.split:
        launch(group_norm_fwd_kernel, (N * G,),
               (x, weight, bias, y, mean, rstd, *_strides(x), *_strides(y), G, CG, S, eps), flags)
        return
    n_chunks = plan.c_blocks * plan.s_chunks
    partial = empty((min(N, plan.batch) * G, n_chunks, 3), torch.float32, x.device)
    for n0 in range(0, N, plan.batch):
        n1 = min(N, n0 + plan.batch)
        xb, yb = x[n0:n1], y[n0:n1]
        grid = ((n1 - n0) * G * n_chunks,)
        launch(group_norm_fwd_partial_kernel, grid,
               (xb, partial, *_strides(xb), G, CG, S, plan.chunk_s, plan.s_chunks),
               dict(INT64=int64, BLOCK_C=plan.block_c, BLOCK_S=plan.block_s, num_warps=plan.num_warps))
        launch(group_norm_fwd_apply_kernel, grid,
               (xb, weight, bias, yb, mean[n0 * G:n1 * G], rstd[n0 * G:n1 * G], partial,
                *_strides(xb), *_strides(yb), G, CG, S, plan.chunk_s, plan.s_chunks, eps),
               dict(CHUNKS_P2=plan.chunks_p2, **flags))


def group_norm_bwd(dy: torch.Tensor, x: torch.Tensor, weight: Optional[torch.Tensor],
                   bias: Optional[torch.Tensor], mean: torch.Tensor, rstd: torch.Tensor,
                   dx: torch.Tensor, num_groups: int, silu: bool, compute_dw: bool,
                   compute_db: bool):
    """Fill dx; return the fp32 channel sums (dw, db) (None where not asked for).

    dy, x, dx: (N, C, S) views, any strides; mean, rstd: (N * G,) fp32 from the forward.
    """
    N, C, S = x.shape
    G = num_groups
    if N == 0 or C == 0 or S == 0:
        zeros = torch.zeros(C, dtype=torch.float32, device=x.device)
        return (zeros if compute_dw else None), (zeros.clone() if compute_db else None)
    CG = C // G
    plan = _plan(N, C, G, S, x.stride(1) == 1 and S > 1, C * S * (dy.element_size() + x.element_size()),
                 x.device)
    int64 = _needs_int64(dy, x, dx)
    dw_part = empty((N, plan.s_chunks, C), torch.float32, x.device) if compute_dw else None
    db_part = empty((N, plan.s_chunks, C), torch.float32, x.device) if compute_db else None
    flags = dict(HAS_W=weight is not None, HAS_B=bias is not None, SILU=silu, INT64=int64,
                 BLOCK_C=plan.block_c, BLOCK_S=plan.block_s, num_warps=plan.num_warps)
    if not plan.split:
        launch(group_norm_bwd_kernel, (N * G,),
               (dy, x, weight, bias, mean, rstd, dx, dw_part, db_part,
                *_strides(dy), *_strides(x), *_strides(dx), G, CG, S, C),
               dict(COMPUTE_DW=compute_dw, COMPUTE_DB=compute_db, **flags))
    else:
        n_chunks = plan.c_blocks * plan.s_chunks
        partial = empty((min(N, plan.batch) * G, n_chunks, 2), torch.float32, x.device)
        for n0 in range(0, N, plan.batch):
            n1 = min(N, n0 + plan.batch)
            dyb, xb, dxb = dy[n0:n1], x[n0:n1], dx[n0:n1]
            stats = (mean[n0 * G:n1 * G], rstd[n0 * G:n1 * G])
            grid = ((n1 - n0) * G * n_chunks,)
            launch(group_norm_bwd_partial_kernel, grid,
                   (dyb, xb, weight, bias, *stats, partial,
                    None if dw_part is None else dw_part[n0:n1], None if db_part is None else db_part[n0:n1],
                    *_strides(dyb), *_strides(xb), G, CG, S, C, plan.chunk_s, plan.s_chunks),
                   dict(COMPUTE_DW=compute_dw, COMPUTE_DB=compute_db, **flags))
            launch(group_norm_bwd_apply_kernel, grid,
                   (dyb, xb, weight, bias, *stats, dxb, partial,
                    *_strides(dyb), *_strides(xb), *_strides(dxb), G, CG, S, plan.chunk_s, plan.s_chunks),
                   dict(CHUNKS_P2=plan.chunks_p2, **flags))
    # fixed-order sums over samples (and chunks): deterministic, no atomics
    dw = dw_part.sum((0, 1)) if compute_dw else None
    db = db_part.sum((0, 1)) if compute_db else None
    return dw, db
