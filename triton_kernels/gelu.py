"""GELU, bias-GELU and GeGLU in Triton, forward and backward; and the GELU in a matmul epilogue.

Math (all arithmetic in fp32, storage in the input dtype), z the pre-activation:

    exact:  gelu(z)  = z * Phi(z) = 0.5 * z * (1 + erf(z / sqrt(2)))
            gelu'(z) = Phi(z) + z * phi(z),   phi(z) = exp(-z^2 / 2) / sqrt(2 pi)
    tanh:   gelu(z)  = 0.5 * z * (1 + tanh(u)),  u = sqrt(2/pi) * (z + 0.044715 z^3)
                     = z * s,  s = sigmoid(2u)          (the same number; no tanh needed and
                                                         no overflow for large |u|)
            gelu'(z) = s + 2 z s (1 - s) * sqrt(2/pi) * (1 + 3 * 0.044715 z^2)

    bias-GELU: z = x + b[n] (b broadcast over the last dim); db = sum over rows of dz.
    GeGLU:     a, g = the two halves of a row of 2H; y = a * gelu(g);
               da = dy * gelu(g),  dg = dy * a * gelu'(g).
    linear_gelu: y = gelu(x @ W^T + b), the GELU applied to the fp32 accumulator tile before the
               one store; its backward recomputes z with the same matmul and stores
               dz = dy * gelu'(z) from the epilogue (torch's matmuls then give dx, dW; db = sum dz).

Bytes per element (s = element size): gelu forward reads x, writes y (2s); backward reads dy
and x, writes dx (3s). GeGLU forward reads 2 and writes 1 per output element (3s), backward
reads dy, a, g and writes da, dg (5s). The elementwise kernels do no other memory traffic
(bias and the db partials are O(N) per row group), so they are bound by bandwidth: the goal is
the copy ceiling. linear_gelu does 2*M*N*K FLOPs and moves (M*K + N*K + M*N)*s at least.

Layouts: the elementwise kernels see (M, N) views with a unit column stride and any row stride;
a dense tensor without bias is processed as one flat row (M = 1, N = numel) in storage order,
so channels_last and other permuted layouts need no copy. Offsets are 64-bit.

Versions:
- v1 (this one): 2-D tiles of ~4K elements per program; db from per-row-group fp32 partials
  summed by torch (deterministic); linear_gelu is the classic grouped-tile tl.dot matmul with
  an autotuned config list on GPU. Checked under the Triton interpreter on CPU against float64
  and compiled for sm_80/sm_90; not yet run or timed on a GPU.
- v1.1: linear_gelu_kernel's program moves to triton_kernels/linear.py (`linear_tile`, DF.linear's
  matmul with conv2d's activation epilogue), called here with the GELU: same loop, same epilogue
  math, same config list; the kernel's name, arguments and autotuner stay.
- v1.2: the bias-gradient backward's row loop (gelu_bwd_kernel, the one elementwise kernel with
  a loop) loads each tile's dy and x one tile ahead (PREFETCH), so they are in flight during the
  previous tile's math and store (Triton does not pipeline loads that feed no dot), on half
  tiles so that the carried copy costs no occupancy. Launch-exact compiles (sm_80/sm_90, Triton
  3.6/3.9), bias + bias gradient: 1024 columns fp32 64-80 -> 58-62 registers (3-4 -> 4
  CTAs/SM), bf16 80 -> 64-78 (3 -> 3-4); 8192 columns fp32 100-102 -> 62-64 (2 -> 4), bf16
  80-97 -> 57-63 (2-3 -> 4).
"""
from __future__ import annotations

import functools
import os
from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from dlh_kernels._alloc import empty
from dlh_kernels._cache import persistent_autotune
from dlh_kernels.triton_kernels.common import (cdiv, fits_shared_memory, gelu_fp32, gelu_grad_fp32, launch,
                                               next_power_of_2)
from dlh_kernels.triton_kernels.linear import (ACTIVATIONS, INTERPRETER_MATMUL_CONFIG, _bucket,  # noqa: F401
                                               _input_precision, _matmul_configs, linear_tile)

GELU = tl.constexpr(ACTIVATIONS["gelu"])
GELU_TANH = tl.constexpr(ACTIVATIONS["gelu_tanh"])

# Elements one program of an elementwise kernel handles: 8 KB of bf16 in, enough independent
# loads per thread (32 with 4 warps) to cover memory latency.
TILE = 4096


@triton.jit
def _tile(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Rows and columns (int64) of program pid's tile, tiles ordered along the rows first."""
    col_tiles = tl.cdiv(N, BLOCK_N)
    pid_m = (pid // col_tiles).to(tl.int64)
    pid_n = (pid % col_tiles).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    return rows, cols


@triton.jit
def gelu_fwd_kernel(
    X,  # pointer to the input, (M, N), row stride stride_x
    Bias,  # pointer to the bias, (N,), or None
    Y,  # pointer to the output, (M, N), row stride stride_y
    M, N, stride_x, stride_y,
    TANH: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    rows, cols = _tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N)
    mask = (rows < M)[:, None] & (cols < N)[None, :]
    z = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        z += tl.load(Bias + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    y = gelu_fp32(z, TANH)
    tl.store(Y + rows[:, None] * stride_y + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _gelu_bwd_tile_loads(DY, X, rows, col_ok, cols, M, stride_dy, stride_x):
    """dy and x of one (rows, cols) tile in their storage dtype (masked lanes 0)."""
    mask = (rows < M)[:, None] & col_ok[None, :]
    x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0)
    dy = tl.load(DY + rows[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0)
    return dy, x


@triton.jit
def gelu_bwd_kernel(
    DY,  # pointer to the output gradient, (M, N), row stride stride_dy
    X,  # pointer to the forward input, (M, N), row stride stride_x
    Bias,  # pointer to the bias, (N,), or None
    DX,  # pointer to the input gradient, (M, N), row stride stride_dx
    DB_PART,  # pointer to fp32 bias-gradient partials, (groups, N), or None
    M, N, stride_dy, stride_x, stride_dx,
    rows_per_group,  # rows each program walks (a multiple of BLOCK_M)
    TANH: tl.constexpr, HAS_BIAS: tl.constexpr, BIAS_GRAD: tl.constexpr,
    PREFETCH: tl.constexpr,  # the row loop loads one tile ahead (bias gradient only)
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # Program (group g, column tile): rows [g * rows_per_group, +rows_per_group) of its columns.
    # Without a bias gradient rows_per_group == BLOCK_M: one tile per program.
    col_tiles = tl.cdiv(N, BLOCK_N)
    pid = tl.program_id(0)
    group = (pid // col_tiles).to(tl.int64)
    cols = (pid % col_tiles).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    if HAS_BIAS:
        b = tl.load(Bias + cols, mask=col_ok, other=0.0).to(tl.float32)
    db = tl.zeros([BLOCK_N], dtype=tl.float32)
    row_start = group * rows_per_group
    # PREFETCH: software-pipelined by hand, one tile deep: tile i+1's dy and x (storage dtype)
    # are loaded before tile i's math and store, so they are in flight while it runs (Triton
    # does not pipeline loads that feed no dot). Past the group's last row the loads are masked.
    if PREFETCH:
        dy_next, x_next = _gelu_bwd_tile_loads(DY, X, row_start + tl.arange(0, BLOCK_M), col_ok,
                                               cols, M, stride_dy, stride_x)
    for r in range(0, rows_per_group, BLOCK_M):
        rows = row_start + r + tl.arange(0, BLOCK_M)
        mask = (rows < M)[:, None] & col_ok[None, :]
        if PREFETCH:
            dy, z = dy_next, x_next
            # rows past the group's end are another group's: masked by r + BLOCK_M < rows_per_group
            rows_n = tl.where(r + BLOCK_M < rows_per_group, rows + BLOCK_M, M)
            dy_next, x_next = _gelu_bwd_tile_loads(DY, X, rows_n, col_ok, cols, M, stride_dy,
                                                   stride_x)
        else:
            dy, z = _gelu_bwd_tile_loads(DY, X, rows, col_ok, cols, M, stride_dy, stride_x)
        z = z.to(tl.float32)
        if HAS_BIAS:
            z += b[None, :]
        dz = dy.to(tl.float32) * gelu_grad_fp32(z, TANH)
        tl.store(DX + rows[:, None] * stride_dx + cols[None, :], dz.to(DX.dtype.element_ty), mask=mask)
        if BIAS_GRAD:
            db += tl.sum(dz, axis=0)  # masked lanes hold dy = 0
    if BIAS_GRAD:
        tl.store(DB_PART + group * N + cols, db, mask=col_ok)


@triton.jit
def geglu_fwd_kernel(
    X,  # pointer to the input, (M, 2H): value half then gate half; row stride stride_x
    Y,  # pointer to the output, (M, H), row stride stride_y
    M, H, stride_x, stride_y,
    TANH: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    rows, cols = _tile(tl.program_id(0), M, H, BLOCK_M, BLOCK_N)
    mask = (rows < M)[:, None] & (cols < H)[None, :]
    x_offsets = rows[:, None] * stride_x + cols[None, :]
    a = tl.load(X + x_offsets, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(X + x_offsets + H, mask=mask, other=0.0).to(tl.float32)
    y = a * gelu_fp32(g, TANH)
    tl.store(Y + rows[:, None] * stride_y + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def geglu_bwd_kernel(
    DY,  # pointer to the output gradient, (M, H), row stride stride_dy
    X,  # pointer to the forward input, (M, 2H), row stride stride_x
    DX,  # pointer to the input gradient, (M, 2H), row stride stride_dx
    M, H, stride_dy, stride_x, stride_dx,
    TANH: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    rows, cols = _tile(tl.program_id(0), M, H, BLOCK_M, BLOCK_N)
    mask = (rows < M)[:, None] & (cols < H)[None, :]
    x_offsets = rows[:, None] * stride_x + cols[None, :]
    a = tl.load(X + x_offsets, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(X + x_offsets + H, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(DY + rows[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    dx_offsets = rows[:, None] * stride_dx + cols[None, :]
    tl.store(DX + dx_offsets, (dy * gelu_fp32(g, TANH)).to(DX.dtype.element_ty), mask=mask)
    tl.store(DX + dx_offsets + H, (dy * a * gelu_grad_fp32(g, TANH)).to(DX.dtype.element_ty), mask=mask)


@triton.jit
def linear_gelu_kernel(
    A,  # pointer to the input, (M, K), strides (stride_am, stride_ak)
    W,  # pointer to the weight, (N, K), strides (stride_wn, stride_wk)
    Bias,  # pointer to the bias, (N,), or None
    C,  # pointer to the output, (M, N), row stride stride_cm: gelu(z), or dz when GRAD
    DC,  # GRAD only: pointer to the output gradient dy, (M, N), row stride stride_dcm
    M, N, K,
    stride_am, stride_ak, stride_wn, stride_wk, stride_cm, stride_dcm,
    M_BUCKET,  # unused by the kernel: the autotuner's key (M rounded up to a power of two)
    TANH: tl.constexpr, HAS_BIAS: tl.constexpr, GRAD: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,  # "ieee" for fp32 unless torch allows tf32; ignored for 16-bit
    DOT_FP32: tl.constexpr,  # interpreter only: its bf16 tl.dot multiplies raw bits (Triton 3.9)
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # The program is triton_kernels/linear.py's (DF.linear), with the GELU as its activation.
    linear_tile(A, W, Bias, C, DC, M, N, K, stride_am, stride_ak, stride_wn, stride_wk, stride_cm,
                stride_dcm, 0.0, GELU_TANH if TANH else GELU, HAS_BIAS, GRAD, INPUT_PRECISION,
                DOT_FP32, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M)


# ---------------------------------------------------------------------------------------------
# Launch helpers. Row tensors are (M, N) with a unit column stride (the glue makes sure).

def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _autotuned() -> bool:
    """linear_gelu goes through its autotuner on the GPU; the interpreter runs one fixed config
    (tests/test_autotune.py patches this to drive the autotuner on CPU tensors)."""
    return not _interpreting()


class _Tiles(NamedTuple):
    block_m: int
    block_n: int
    num_warps: int


@functools.lru_cache(maxsize=4096)
def _tiles(M: int, N: int) -> _Tiles:
    block_n = min(next_power_of_2(N), TILE)
    block_m = max(1, min(next_power_of_2(M), TILE // block_n))
    return _Tiles(block_m, block_n, 8 if block_m * block_n >= 4096 else 4)


def gelu_fwd(x: torch.Tensor, bias: Optional[torch.Tensor], y: torch.Tensor, tanh: bool) -> None:
    M, N = x.shape
    if M == 0 or N == 0:
        return
    t = _tiles(M, N)
    grid = (cdiv(M, t.block_m) * cdiv(N, t.block_n),)
    launch(gelu_fwd_kernel, grid,
           (x, bias, y, M, N, x.stride(0), y.stride(0)),
           dict(TANH=tanh, HAS_BIAS=bias is not None, BLOCK_M=t.block_m, BLOCK_N=t.block_n,
                num_warps=t.num_warps))


def _programs_wanted(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # the interpreter
    from dlh_kernels._ext import sm_count
    return 4 * sm_count(device.index if device.index is not None else torch.cuda.current_device())


# The bias-gradient backward's row loop loads one tile ahead (gelu_bwd_kernel's PREFETCH);
# False: the v1 loop and tiles (a switch for side-by-side compiles).
PREFETCH_BWD = True


def gelu_bwd(dy: torch.Tensor, x: torch.Tensor, bias: Optional[torch.Tensor], dx: torch.Tensor,
             tanh: bool, bias_grad: bool) -> Optional[torch.Tensor]:
    """Fill dx; return the fp32 bias gradient (N,) when asked for, else None."""
    M, N = x.shape
    if M == 0 or N == 0:
        return torch.zeros(N, dtype=torch.float32, device=x.device) if bias_grad else None
    t = _tiles(M, N)
    col_tiles = cdiv(N, t.block_n)
    row_tiles = cdiv(M, t.block_m)
    groups = row_tiles
    if bias_grad:  # few enough row groups that the partials stay small, enough to fill the GPU
        groups = max(1, min(row_tiles, cdiv(_programs_wanted(x.device), col_tiles)))
    rows_per_group = cdiv(row_tiles, groups) * t.block_m
    groups = cdiv(M, rows_per_group)
    db_part = empty((groups, N), torch.float32, x.device) if bias_grad else None
    # a row loop that loads a tile ahead walks half tiles: the carried copy takes the registers
    # the halved tile frees, so as many CTAs fit per SM as without it (launch-exact compiles)
    prefetch = bias_grad and PREFETCH_BWD and rows_per_group > t.block_m
    block_m, block_n = t.block_m, t.block_n
    if prefetch:
        if block_m > 1:
            block_m //= 2
        else:
            block_n //= 2
            col_tiles = cdiv(N, block_n)
    launch(gelu_bwd_kernel, (groups * col_tiles,),
           (dy, x, bias, dx, db_part, M, N, dy.stride(0), x.stride(0), dx.stride(0), rows_per_group),
           dict(TANH=tanh, HAS_BIAS=bias is not None, BIAS_GRAD=bias_grad, PREFETCH=prefetch,
                BLOCK_M=block_m, BLOCK_N=block_n, num_warps=t.num_warps))
    return db_part.sum(0) if bias_grad else None


def geglu_fwd(x: torch.Tensor, y: torch.Tensor, tanh: bool) -> None:
    """x: (M, 2H) rows, y: (M, H) rows."""
    M, H = y.shape
    if M == 0 or H == 0:
        return
    t = _tiles(M, H)
    grid = (cdiv(M, t.block_m) * cdiv(H, t.block_n),)
    launch(geglu_fwd_kernel, grid,
           (x, y, M, H, x.stride(0), y.stride(0)),
           dict(TANH=tanh, BLOCK_M=t.block_m, BLOCK_N=t.block_n, num_warps=t.num_warps))


def geglu_bwd(dy: torch.Tensor, x: torch.Tensor, dx: torch.Tensor, tanh: bool) -> None:
    M, H = dy.shape
    if M == 0 or H == 0:
        return
    t = _tiles(M, H)
    grid = (cdiv(M, t.block_m) * cdiv(H, t.block_n),)
    launch(geglu_bwd_kernel, grid,
           (dy, x, dx, M, H, dy.stride(0), x.stride(0), dx.stride(0)),
           dict(TANH=tanh, BLOCK_M=t.block_m, BLOCK_N=t.block_n, num_warps=t.num_warps))


# linear_gelu tiles: the config list (and the interpreter's one config) of DF.linear's kernel,
# triton_kernels/linear.py, whose program linear_gelu_kernel runs.
def _prune_matmul(configs, named_args, **kwargs):
    """Drop, before compiling them, the configs whose pipelined (A, W) tiles (common.py's
    estimate: num_stages * (BLOCK_M + BLOCK_N) * BLOCK_K elements) exceed the device's shared
    memory: fp32 doubles every tile, and an A100 has 163 KB, not the H100's 227 KB."""
    kept = [c for c in configs if fits_shared_memory("linear_gelu_kernel", named_args, kwargs, c)]
    return kept or configs[-1:]


@functools.lru_cache(maxsize=None)
def _tuned_linear_gelu():
    # choices kept across runs in the dlh cache directory (dlh_kernels/_cache.py)
    return persistent_autotune(
        triton.autotune(configs=_matmul_configs(), key=["M_BUCKET", "N", "K", "GRAD"],
                        prune_configs_by={"early_config_prune": _prune_matmul})(linear_gelu_kernel))


def linear_gelu(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                out: torch.Tensor, tanh: bool, grad_out: Optional[torch.Tensor] = None) -> None:
    """out = gelu(x @ weight^T + bias); with grad_out: out = grad_out * gelu'(x @ weight^T + bias).

    x: (M, K) any strides; weight: (N, K) any strides; out, grad_out: (M, N) unit column stride.
    """
    M, K = x.shape
    N = weight.shape[0]
    if M == 0 or N == 0:
        return
    grad = grad_out is not None
    args = (x, weight, bias, out, grad_out, M, N, K, x.stride(0), x.stride(1),
            weight.stride(0), weight.stride(1), out.stride(0), grad_out.stride(0) if grad else 0,
            _bucket(M))
    flags = dict(TANH=tanh, HAS_BIAS=bias is not None, GRAD=grad,
                 INPUT_PRECISION=_input_precision(x.dtype), DOT_FP32=_interpreting())
    if not _autotuned():
        c = INTERPRETER_MATMUL_CONFIG
        grid = (cdiv(M, c["BLOCK_M"]) * cdiv(N, c["BLOCK_N"]),)
        launch(linear_gelu_kernel, grid, args, {**flags, **c})
        return
    def grid(meta):
        return (cdiv(M, meta["BLOCK_M"]) * cdiv(N, meta["BLOCK_N"]),)
    _tuned_linear_gelu()[grid](*args, **flags)
