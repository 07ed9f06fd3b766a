"""LayerNorm and RMSNorm in Triton, forward and backward, with the residual add fused.

Math, per row of N elements (all arithmetic in fp32, storage in the input dtype):

    h     = x + r                         (add_* variants; h is rounded to the dtype, stored, and
                                           is what gets normalised, as in eager PyTorch)
    LayerNorm: mean = sum(h)/N, var = sum((h - mean)^2)/N, rstd = 1/sqrt(var + eps)
               xhat = (h - mean) * rstd,  y = xhat * w + b
    RMSNorm:   rstd = 1/sqrt(sum(h^2)/N + eps),  xhat = h * rstd,  y = xhat * w

    backward, g = dy * w:
    LayerNorm: dx = rstd * (g - xhat * mean(g * xhat) - mean(g))
    RMSNorm:   dx = rstd * (g - xhat * mean(g * xhat))
               (+ dh, the gradient of the returned sum h, in the add_* variants)
    dw = sum over rows of dy * xhat,  db = sum over rows of dy

Bytes per element (s = element size): forward reads x and writes y (2s; add_* 4s: x, r in,
h, y out); backward reads dy and h and writes dx (3s; +s for dh). Weights, mean/rstd and the
dw/db partials are O(N + M), noise for N >= 1K rows of a large tensor.

Two paths:
- fused (forward: N <= 32K for 16-bit rows, 16K for fp32; backward: N <= 8K): a BLOCK_M x
  BLOCK_N tile holds whole rows in registers; one read, one write (backward: two reads, one
  write). Rows past 4K get one row per program (8-16 warps). The backward's programs each own
  a group of rows and keep their dw/db column sums in registers, writing one fp32 partial row
  per program; torch sums the G partials.
- split (large N): a row is cut into chunks handled by different programs, so a handful of
  huge rows (the diffusion U-Net's LayerNorm([128, 32, 32]) = 131,072 elements, batch 8) still
  fills the GPU. The forward's first kernel writes per-chunk (mean, M2) and the second combines
  them (Chan's parallel variance) and normalises its chunk: 2 reads + 1 write. The backward's
  first kernel writes per-chunk sums of g*xhat and g, the second computes dx and the dw/db
  partials for a (row group, column tile).

Versions:
- v1 (this one): fused + split paths, heuristic launch parameters cached per shape. Checked
  under the Triton interpreter on CPU against float64; not yet run or timed on a GPU.
- v1.1: the backward's grid is (column tiles, row groups): a row of 2^28+ elements no longer
  puts more than CUDA's 65,535 column tiles on axis y.
- v1.2: the fused forward reaches 32K-element rows (16-bit; fp32 16K), BLOCK_M 1 at 16 warps:
  rows of 8K-32K are read once instead of twice (2 memory passes instead of 3, add_*: 4 instead
  of 5). Launch-exact compiles (sm_80/sm_90, Triton 3.6/3.9): bf16 32K 111-127 registers, fp32
  16K 64-95, no stack. The backward stays fused to 8K: at 16K its 5 row vectors spill (bf16
  LayerNorm 1.4 KB of stack). The 16-bit backward of 4K-8K rows without dh loads a tile ahead
  (PREFETCH; elsewhere the carried tile would cost a CTA per SM or spill).
"""
from __future__ import annotations

import functools
from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from dlh_kernels._alloc import empty
from dlh_kernels.triton_kernels.common import cdiv, launch, next_power_of_2

# Rows of 16-bit elements up to MAX_FUSED_N (fp32: half that, the same 64 KB) are normalised
# from registers in one pass forward; backward, rows up to MAX_FUSED_BWD_N of any dtype, as the
# backward's program also keeps the row's dy, h, w and the dw/db column sums on chip (5 row
# vectors against the forward's 1-3). Beyond, rows are split over programs and read twice. The
# limits are what compiles for sm_80/sm_90 at 16 warps (128 registers a thread) with no stack:
# fp32 rows of 32K spill in the forward, 16-bit rows of 16K in the backward (bf16 LayerNorm:
# 1.4 KB of stack). SPLIT_TILE is the tile a split program walks its chunk with. Tests lower
# all three to reach the split path with interpreter-sized tensors (set_limits).
MAX_FUSED_N = 32768
MAX_FUSED_BWD_N = 8192
SPLIT_TILE = 4096


@triton.jit
def _row_stats(x, mask, N, eps, RMS: tl.constexpr):
    """(mean, rstd) of each row of the fp32 tile x; masked lanes must hold 0."""
    if RMS:
        mean = tl.zeros([x.shape[0]], dtype=tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / N + eps)
    else:
        mean = tl.sum(x, axis=1) / N
        centred = tl.where(mask, x - mean[:, None], 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, axis=1) / N + eps)
    return mean, rstd


@triton.jit
def _affine_store(Y, y_offsets, xhat, W, B, cols, col_ok, mask,
                  HAS_W: tl.constexpr, HAS_B: tl.constexpr):
    """y = xhat * w + b, stored in Y's dtype."""
    y = xhat
    if HAS_W:
        y = y * tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_B:
        y = y + tl.load(B + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(Y + y_offsets, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def norm_fwd_kernel(
    X,          # input rows, (M, N), row stride stride_x, unit column stride
    R,          # residual rows, (M, N), or None
    W,          # weight, (N,), or None
    B,          # bias, (N,), or None
    Y,          # output rows, (M, N)
    H,          # x + r rows, (M, N), written when HAS_RES
    Mean,       # (M,) fp32, LayerNorm only
    Rstd,       # (M,) fp32
    stride_x, stride_r, stride_y, stride_h,
    M, N, eps,
    RMS: tl.constexpr, HAS_RES: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Fused path: BLOCK_M whole rows per program (BLOCK_N >= N)."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    row_ok = rows < M
    col_ok = cols < N
    mask = row_ok[:, None] & col_ok[None, :]
    rows = rows.to(tl.int64)  # M * stride may pass 2^31

    x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_RES:
        r = tl.load(R + rows[:, None] * stride_r + cols[None, :], mask=mask, other=0.0)
        h = (x + r.to(tl.float32)).to(H.dtype.element_ty)
        tl.store(H + rows[:, None] * stride_h + cols[None, :], h, mask=mask)
        x = h.to(tl.float32)

    mean, rstd = _row_stats(x, mask, N, eps, RMS)
    if not RMS:
        tl.store(Mean + rows, mean, mask=row_ok)
    tl.store(Rstd + rows, rstd, mask=row_ok)
    xhat = (x - mean[:, None]) * rstd[:, None]
    _affine_store(Y, rows[:, None] * stride_y + cols[None, :], xhat, W, B, cols, col_ok, mask,
                  HAS_W, HAS_B)


@triton.jit
def norm_fwd_partial_kernel(
    X,          # input rows, (M, N)
    R,          # residual rows, (M, N), or None
    H,          # x + r rows, (M, N), written when HAS_RES
    Partial,    # (M, n_chunks, 2) fp32: per chunk (mean, M2); RMSNorm: (sum of squares, -)
    stride_x, stride_r, stride_h,
    N, CHUNK, n_chunks,
    RMS: tl.constexpr, HAS_RES: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Split path, pass 1: the statistics of one chunk of one row. Grid (M, n_chunks)."""
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    start = chunk * CHUNK
    count = 0.0
    mean = 0.0
    m2 = 0.0
    for t in range(0, CHUNK, BLOCK_N):
        cols = start + t + tl.arange(0, BLOCK_N)
        ok = cols < N
        x = tl.load(X + row * stride_x + cols, mask=ok, other=0.0).to(tl.float32)
        if HAS_RES:
            r = tl.load(R + row * stride_r + cols, mask=ok, other=0.0)
            h = (x + r.to(tl.float32)).to(H.dtype.element_ty)
            tl.store(H + row * stride_h + cols, h, mask=ok)
            x = h.to(tl.float32)
        if RMS:
            m2 += tl.sum(x * x, axis=0)
        else:
            # exact two-pass statistics of the tile, merged into the running ones (Chan et al.)
            tile_count = tl.sum(ok.to(tl.float32), axis=0)
            tile_mean = tl.sum(x, axis=0) / tl.maximum(tile_count, 1.0)
            d = tl.where(ok, x - tile_mean, 0.0)
            tile_m2 = tl.sum(d * d, axis=0)
            total = count + tile_count
            delta = tile_mean - mean
            mean += delta * tile_count / tl.maximum(total, 1.0)
            m2 += tile_m2 + delta * delta * count * tile_count / tl.maximum(total, 1.0)
            count = total
    out = Partial + (row * n_chunks + chunk) * 2
    tl.store(out, mean)
    tl.store(out + 1, m2)


@triton.jit
def norm_fwd_apply_kernel(
    Src,        # rows to normalise, (M, N): x, or h when there was a residual
    W, B,       # weight, bias, (N,), or None
    Y,          # output rows, (M, N)
    Mean,       # (M,) fp32, LayerNorm only
    Rstd,       # (M,) fp32
    Partial,    # (M, n_chunks, 2) fp32 from norm_fwd_partial_kernel
    stride_src, stride_y,
    N, CHUNK, n_chunks, eps,
    RMS: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
    BLOCK_N: tl.constexpr, CHUNKS_P2: tl.constexpr,
):
    """Split path, pass 2: combine the row's chunk statistics, normalise one chunk."""
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    idx = tl.arange(0, CHUNKS_P2)
    idx_ok = idx < n_chunks
    p_mean = tl.load(Partial + (row * n_chunks + idx) * 2, mask=idx_ok, other=0.0)
    p_m2 = tl.load(Partial + (row * n_chunks + idx) * 2 + 1, mask=idx_ok, other=0.0)
    if RMS:
        mean = 0.0
        rstd = 1.0 / tl.sqrt(tl.sum(p_m2, axis=0) / N + eps)
    else:
        counts = tl.where(idx_ok, tl.minimum(CHUNK, N - idx * CHUNK), 0).to(tl.float32)
        mean = tl.sum(counts * p_mean, axis=0) / N
        spread = tl.where(idx_ok, p_m2 + counts * (p_mean - mean) * (p_mean - mean), 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(spread, axis=0) / N + eps)
    if chunk == 0:
        if not RMS:
            tl.store(Mean + row, mean)
        tl.store(Rstd + row, rstd)

    start = chunk * CHUNK
    for t in range(0, CHUNK, BLOCK_N):
        cols = start + t + tl.arange(0, BLOCK_N)
        ok = cols < N
        x = tl.load(Src + row * stride_src + cols, mask=ok, other=0.0).to(tl.float32)
        xhat = ((x - mean) * rstd)[None, :]
        _affine_store(Y, row * stride_y + cols[None, :], xhat, W, B, cols, ok, ok[None, :],
                      HAS_W, HAS_B)


@triton.jit
def norm_bwd_partial_kernel(
    DY,         # output gradient rows, (M, N)
    Hin,        # normalised input rows (x, or h), (M, N)
    W,          # weight, (N,), or None
    Mean, Rstd, # (M,) fp32; Mean unused for RMSNorm
    Partial,    # (M, n_chunks, 2) fp32 out: per chunk (sum g*xhat, sum g)
    stride_dy, stride_h,
    N, CHUNK, n_chunks,
    RMS: tl.constexpr, HAS_W: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Split backward, pass 1: the row sums dx needs, per chunk. Grid (M, n_chunks)."""
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    rstd = tl.load(Rstd + row)
    mean = 0.0
    if not RMS:
        mean = tl.load(Mean + row)
    sum_gx = 0.0
    sum_g = 0.0
    start = chunk * CHUNK
    for t in range(0, CHUNK, BLOCK_N):
        cols = start + t + tl.arange(0, BLOCK_N)
        ok = cols < N
        dy = tl.load(DY + row * stride_dy + cols, mask=ok, other=0.0).to(tl.float32)
        h = tl.load(Hin + row * stride_h + cols, mask=ok, other=0.0).to(tl.float32)
        g = dy
        if HAS_W:
            g = dy * tl.load(W + cols, mask=ok, other=0.0).to(tl.float32)
        xhat = tl.where(ok, (h - mean) * rstd, 0.0)
        sum_gx += tl.sum(g * xhat, axis=0)
        sum_g += tl.sum(g, axis=0)
    out = Partial + (row * n_chunks + chunk) * 2
    tl.store(out, sum_gx)
    tl.store(out + 1, sum_g)


@triton.jit
def _bwd_tile_loads(DY, Hin, Mean, Rstd, m0, last, cols, col_ok, stride_dy, stride_h,
                    RMS: tl.constexpr, BLOCK_M: tl.constexpr):
    """dy and h of rows [m0, m0 + BLOCK_M) (< last) in their storage dtype, and their rstd, mean."""
    rows = m0 + tl.arange(0, BLOCK_M)
    row_ok = rows < last
    mask = row_ok[:, None] & col_ok[None, :]
    rows = rows.to(tl.int64)
    dy = tl.load(DY + rows[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0)
    h = tl.load(Hin + rows[:, None] * stride_h + cols[None, :], mask=mask, other=0.0)
    rstd = tl.load(Rstd + rows, mask=row_ok, other=0.0)
    mean = rstd  # unused (RMSNorm)
    if not RMS:
        mean = tl.load(Mean + rows, mask=row_ok, other=0.0)
    return dy, h, rstd, mean


@triton.jit
def norm_bwd_kernel(
    DY,         # output gradient rows, (M, N)
    Hin,        # normalised input rows (x, or h), (M, N)
    W,          # weight, (N,), or None
    Mean, Rstd, # (M,) fp32; Mean unused for RMSNorm
    DH,         # gradient of the returned sum h, (M, N), or None
    DX,         # input gradient rows out, (M, N)
    DWp, DBp,   # (G, N) fp32 partial column sums out: dy * xhat and dy; or None
    Partial,    # split path: (M, n_chunks, 2) from norm_bwd_partial_kernel; else None
    stride_dy, stride_h, stride_dh, stride_dx,
    M, N, rows_per_group, n_chunks,
    RMS: tl.constexpr, HAS_W: tl.constexpr, HAS_DH: tl.constexpr,
    COMPUTE_DW: tl.constexpr, COMPUTE_DB: tl.constexpr, SPLIT: tl.constexpr,
    PREFETCH: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CHUNKS_P2: tl.constexpr,
):
    """dx for a (row group, column tile), and that tile's dw/db partial sums.

    Grid (column tiles, G): G (at most a few programs per SM) on axis y; the column tiles of a
    wide row (N / 4096 of them) on x, as CUDA caps axis y at 65,535. Fused path: one column tile
    holding whole rows, the row sums computed here. Split path: the row sums come from Partial.
    """
    group = tl.program_id(1)
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    w = tl.full([BLOCK_N], 1.0, tl.float32)
    if HAS_W:
        w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
    dw_acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    db_acc = tl.zeros([BLOCK_N], dtype=tl.float32)

    # PREFETCH: software-pipelined by hand, one tile deep. The loads of tile i+1 (dy, h in their
    # storage dtype, rstd, mean) are issued before tile i's math and store, so they are in flight
    # while it runs (Triton does not pipeline loads that feed no dot). The carried tile costs
    # BLOCK_M * BLOCK_N / threads registers per tensor for 16-bit inputs (two values a register),
    # twice that for fp32; the tile after the last is fully masked and moves no bytes.
    first = group * rows_per_group
    last = tl.minimum(first + rows_per_group, M)
    if PREFETCH:
        dy_next, h_next, rstd_next, mean_next = _bwd_tile_loads(
            DY, Hin, Mean, Rstd, first, last, cols, col_ok, stride_dy, stride_h, RMS, BLOCK_M)
    for m0 in range(first, last, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        row_ok = rows < last
        mask = row_ok[:, None] & col_ok[None, :]
        rows = rows.to(tl.int64)
        if PREFETCH:
            dy, h, rstd, mean = dy_next, h_next, rstd_next, mean_next
            dy_next, h_next, rstd_next, mean_next = _bwd_tile_loads(
                DY, Hin, Mean, Rstd, m0 + BLOCK_M, last, cols, col_ok, stride_dy, stride_h, RMS,
                BLOCK_M)
        else:
            dy, h, rstd, mean = _bwd_tile_loads(DY, Hin, Mean, Rstd, m0, last, cols, col_ok,
                                                stride_dy, stride_h, RMS, BLOCK_M)
        dy = dy.to(tl.float32)
        h = h.to(tl.float32)
        if RMS:
            xhat = h * rstd[:, None]
        else:
            xhat = tl.where(mask, (h - mean[:, None]) * rstd[:, None], 0.0)
        g = dy * w[None, :]
        if SPLIT:
            idx = tl.arange(0, CHUNKS_P2)
            p_off = (rows[:, None] * n_chunks + idx[None, :]) * 2
            p_ok = row_ok[:, None] & (idx < n_chunks)[None, :]
            mean_gx = tl.sum(tl.load(Partial + p_off, mask=p_ok, other=0.0), axis=1) / N
            mean_g = tl.sum(tl.load(Partial + p_off + 1, mask=p_ok, other=0.0), axis=1) / N
        else:
            mean_gx = tl.sum(g * xhat, axis=1) / N
            mean_g = tl.sum(g, axis=1) / N
        if RMS:
            dx = (g - xhat * mean_gx[:, None]) * rstd[:, None]
        else:
            dx = (g - xhat * mean_gx[:, None] - mean_g[:, None]) * rstd[:, None]
        if HAS_DH:
            dx += tl.load(DH + rows[:, None] * stride_dh + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        tl.store(DX + rows[:, None] * stride_dx + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
        if COMPUTE_DW:
            dw_acc += tl.sum(dy * xhat, axis=0)
        if COMPUTE_DB:
            db_acc += tl.sum(dy, axis=0)
    if COMPUTE_DW:
        tl.store(DWp + group.to(tl.int64) * N + cols, dw_acc, mask=col_ok)
    if COMPUTE_DB:
        tl.store(DBp + group.to(tl.int64) * N + cols, db_acc, mask=col_ok)


# ---------------------------------------------------------------------------------------------
# Launch helpers. Launch parameters depend only on (M, N, device) and are cached.

class _Plan(NamedTuple):
    split: bool
    block_m: int
    block_n: int
    num_warps: int
    chunk: int          # split: elements per chunk (a multiple of block_n)
    n_chunks: int       # split: chunks per row
    chunks_p2: int
    groups: int         # backward: row groups (programs along rows)
    rows_per_group: int
    prefetch: bool      # backward: the row loop loads one tile ahead


def set_limits(max_fused_n: int = 32768, split_tile: int = 4096,
               max_fused_bwd_n: Optional[int] = None) -> None:
    """Change the fused/split thresholds and the split tile (tests use small values).
    max_fused_bwd_n None: the default's 8192, or max_fused_n where that is smaller."""
    global MAX_FUSED_N, MAX_FUSED_BWD_N, SPLIT_TILE
    MAX_FUSED_N, SPLIT_TILE = max_fused_n, split_tile
    MAX_FUSED_BWD_N = min(max_fused_n, 8192) if max_fused_bwd_n is None else max_fused_bwd_n
    _plan.cache_clear()


def _programs_wanted(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # the interpreter: few programs keep the tests quick
    from dlh_kernels._ext import sm_count
    return 4 * sm_count(device.index if device.index is not None else torch.cuda.current_device())


def _prefetch(split: bool, elem_size: int, num_warps: int) -> bool:
    """Whether the backward's row loop may load a tile ahead (norm_bwd_kernel's PREFETCH; the
    glue also asks for no residual gradient dh): only where the carried copy costs no CTA per SM
    and no stack in the launch-exact compiles (sm_80/sm_90, Triton 3.6/3.9): 16-bit rows of
    (4K, 8K], one row per tile at 16 warps, one CTA per SM with or without it (109-128
    registers). Elsewhere it did not fit: fp32 tiles take 50-70 more registers; 16-bit 4-row
    tiles and the split path's go from 2 CTAs/SM to 1 on sm_80 (add_layer_norm's split tile 100
    -> 177 registers); with dh, add_layer_norm's 8K row spilled 24 B on sm_80 (3.6)."""
    return PREFETCH_16BIT and not split and elem_size <= 2 and num_warps == 16


# False: every backward row loop loads its own tile (a switch for side-by-side compiles)
PREFETCH_16BIT = True


@functools.lru_cache(maxsize=4096)
def _plan(M: int, N: int, device: torch.device, backward: bool = False,
          elem_size: int = 2) -> _Plan:
    want = _programs_wanted(device)
    if N <= (MAX_FUSED_BWD_N if backward else MAX_FUSED_N // (1 if elem_size <= 2 else 2)):
        block_n = next_power_of_2(N)
        block_m = max(1, min(64, 4096 // block_n))
        # 16 values per thread up to 8K-element tiles (4-16 warps); wider rows (BLOCK_M = 1) stay
        # at 16 warps, the most that still gets 128 registers a thread: 32 values a thread at 16K,
        # 64 at 32K (a 32K row is 128 KB as fp32: half of an SM's register file)
        num_warps = max(1, min(16, block_m * block_n // 512))
        row_tiles = cdiv(M, block_m)
        groups = max(1, min(row_tiles, want))
        rows_per_group = cdiv(row_tiles, groups) * block_m
        groups = cdiv(M, rows_per_group)
        return _Plan(False, block_m, block_n, num_warps, N, 1, 1, groups, rows_per_group,
                     _prefetch(False, elem_size, num_warps))
    block_n = SPLIT_TILE
    tiles = cdiv(N, block_n)
    chunks_wanted = max(1, min(tiles, cdiv(want, M)))
    chunk = cdiv(tiles, chunks_wanted) * block_n
    n_chunks = cdiv(N, chunk)
    num_warps = max(1, min(16, block_n // 512))
    groups = max(1, min(M, cdiv(want, tiles)))
    rows_per_group = cdiv(M, groups)
    groups = cdiv(M, rows_per_group)
    return _Plan(True, 1, block_n, num_warps, chunk, n_chunks,
                 next_power_of_2(n_chunks), groups, rows_per_group,
                 _prefetch(True, elem_size, num_warps))


def norm_fwd(x: torch.Tensor, residual: Optional[torch.Tensor], weight: Optional[torch.Tensor],
             bias: Optional[torch.Tensor], y: torch.Tensor, h: Optional[torch.Tensor],
             mean: Optional[torch.Tensor], rstd: torch.Tensor, eps: float, rms: bool) -> None:
    """Fill y (and h, mean, rstd). All row tensors are (M, N) with unit column stride."""
    M, N = x.shape
    if M == 0 or N == 0:
        return
    plan = _plan(M, N, x.device, False, x.element_size())
    has_res = residual is not None
    if not plan.split:
        launch(norm_fwd_kernel, (cdiv(M, plan.block_m),),
               (x, residual, weight, bias, y, h, mean, rstd, x.stride(0),
                residual.stride(0) if has_res else 0, y.stride(0), h.stride(0) if has_res else 0, M, N,
                eps),
               dict(RMS=rms, HAS_RES=has_res, HAS_W=weight is not None, HAS_B=bias is not None,
                    BLOCK_M=plan.block_m, BLOCK_N=plan.block_n, num_warps=plan.num_warps))
        return
    partial = empty((M, plan.n_chunks, 2), torch.float32, x.device)
    grid = (M, plan.n_chunks)
    launch(norm_fwd_partial_kernel, grid,
           (x, residual, h, partial, x.stride(0), residual.stride(0) if has_res else 0,
            h.stride(0) if has_res else 0, N, plan.chunk, plan.n_chunks),
           dict(RMS=rms, HAS_RES=has_res, BLOCK_N=plan.block_n, num_warps=plan.num_warps))
    src = h if has_res else x
    launch(norm_fwd_apply_kernel, grid,
           (src, weight, bias, y, mean, rstd, partial, src.stride(0), y.stride(0), N, plan.chunk,
            plan.n_chunks, eps),
           dict(RMS=rms, HAS_W=weight is not None, HAS_B=bias is not None, BLOCK_N=plan.block_n,
                CHUNKS_P2=plan.chunks_p2, num_warps=plan.num_warps))


def norm_bwd(dy: torch.Tensor, h: torch.Tensor, weight: Optional[torch.Tensor],
             mean: Optional[torch.Tensor], rstd: torch.Tensor, dh: Optional[torch.Tensor],
             dx: torch.Tensor, compute_dw: bool, compute_db: bool):
    """Fill dx; return the fp32 column sums (dw, db) (None where not asked for)."""
    M, N = h.shape
    rms = mean is None
    dw_part = db_part = None
    if M == 0 or N == 0:
        zeros = torch.zeros(N, dtype=torch.float32, device=h.device)
        return (zeros if compute_dw else None), (zeros.clone() if compute_db else None)
    plan = _plan(M, N, h.device, True, h.element_size())
    if compute_dw:
        dw_part = empty((plan.groups, N), torch.float32, h.device)
    if compute_db:
        db_part = empty((plan.groups, N), torch.float32, h.device)
    partial = None
    if plan.split:
        partial = empty((M, plan.n_chunks, 2), torch.float32, h.device)
        launch(norm_bwd_partial_kernel, (M, plan.n_chunks),
               (dy, h, weight, mean, rstd, partial, dy.stride(0), h.stride(0), N, plan.chunk,
                plan.n_chunks),
               dict(RMS=rms, HAS_W=weight is not None, BLOCK_N=plan.block_n, num_warps=plan.num_warps))
    launch(norm_bwd_kernel, (-(-N // plan.block_n), plan.groups),
           (dy, h, weight, mean, rstd, dh, dx, dw_part, db_part, partial, dy.stride(0), h.stride(0),
            dh.stride(0) if dh is not None else 0, dx.stride(0), M, N, plan.rows_per_group,
            plan.n_chunks),
           dict(RMS=rms, HAS_W=weight is not None, HAS_DH=dh is not None, COMPUTE_DW=compute_dw,
                COMPUTE_DB=compute_db, SPLIT=plan.split, PREFETCH=plan.prefetch and dh is None,
                BLOCK_M=plan.block_m, BLOCK_N=plan.block_n, CHUNKS_P2=plan.chunks_p2,
                num_warps=plan.num_warps))
    dw = dw_part.sum(0) if compute_dw else None
    db = db_part.sum(0) if compute_db else None
    return dw, db
