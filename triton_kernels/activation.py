"""SiLU, ReLU, LeakyReLU and the gated activations (SwiGLU, gated GELU) in Triton, forward and backward.

Math (all arithmetic in fp32, storage in the input dtype):

    unary, y = f(x), dx = dy * f'(x)  (ACT):
      silu (0):        f(x) = x * s, s = sigmoid(x);       f'(x) = s * (1 + x * (1 - s))
      relu (1):        f(x) = x > 0 ? x : 0  (NaN stays NaN); f'(x) = x > 0 ? 1 : 0
      leaky_relu (2):  f(x) = x > 0 ? x : slope * x;        f'(x) = x > 0 ? 1 : slope
    gated, y = a(g) * u over gate g and up u of one shape (ACT):
      a = silu (0: SwiGLU), gelu erf (1), gelu tanh (2: T5's gated-gelu; gelu.py's sigmoid form)
      dg = dy * u * a'(g),  du = dy * a(g)

Bytes per element (s = element size): unary forward reads x, writes y (2s); backward reads dy
and x, writes dx (3s; f' is recomputed from x, nothing saved but the input). Gated forward
reads g and u, writes y (3s); backward reads dy, g, u, writes dg, du (5s). No other traffic:
bandwidth-bound, the goal is the copy ceiling.

Layouts: every tensor is an (M, N) view with a unit column stride and its own row stride, so
gate and up can be the two halves of one (M, 2N) matmul output without a copy; dense tensors
of one layout run as a single flat row (M = 1, N = numel). Offsets are 64-bit.

Versions:
- v1 (this one): gelu.py's 2-D tiles of ~4K elements per program (its helpers, copied), one
  kernel per shape of work with the activation as a constexpr. Checked under the Triton
  interpreter on CPU against float64; not yet run or timed on a GPU.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from dlh_kernels.triton_kernels.common import cdiv, gelu_fp32, gelu_grad_fp32, launch, next_power_of_2

# Activation codes (shared with dlh_kernels/ops/activation.py and csrc/activation.cu).
SILU, RELU, LEAKY_RELU = 0, 1, 2
GATED_SILU, GATED_GELU, GATED_GELU_TANH = 0, 1, 2

# Elements one program handles (gelu.py's tiling): 8 KB of bf16 in per tensor, enough
# independent loads per thread (32 with 4 warps) to cover memory latency.
TILE = 4096


@triton.jit
def _tile(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Rows and columns (int64) of program pid's tile, tiles ordered along the rows first."""
    col_tiles = tl.cdiv(N, BLOCK_N)
    rows = (pid // col_tiles).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = (pid % col_tiles).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    return rows, cols


@triton.jit
def _unary(z, slope, ACT: tl.constexpr):
    """(f(z), f'(z)) of an fp32 tile; the forward's unused f' is dead code to the compiler."""
    if ACT == 0:
        s = tl.sigmoid(z)
        return z * s, s * (1.0 + z * (1.0 - s))
    elif ACT == 1:
        return tl.where(z < 0.0, 0.0, z), tl.where(z > 0.0, 1.0, 0.0)
    else:
        return tl.where(z > 0.0, z, z * slope), tl.where(z > 0.0, 1.0, slope)


@triton.jit
def _gated(g, ACT: tl.constexpr):
    """(a(g), a'(g)) of an fp32 tile."""
    if ACT == 0:
        s = tl.sigmoid(g)
        return g * s, s * (1.0 + g * (1.0 - s))
    else:
        return gelu_fp32(g, ACT == 2), gelu_grad_fp32(g, ACT == 2)


@triton.jit
def activation_fwd_kernel(
    X,  # pointer to the input, (M, N), row stride stride_x
    Y,  # pointer to the output, (M, N), row stride stride_y
    M, N, stride_x, stride_y,
    slope,  # leaky_relu's negative_slope (unused otherwise)
    ACT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    rows, cols = _tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N)
    mask = (rows < M)[:, None] & (cols < N)[None, :]
    z = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    y, _ = _unary(z, slope, ACT)
    tl.store(Y + rows[:, None] * stride_y + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def activation_bwd_kernel(
    DY,  # pointer to the output gradient, (M, N), row stride stride_dy
    X,  # pointer to the forward input, (M, N), row stride stride_x
    DX,  # pointer to the input gradient, (M, N), row stride stride_dx
    M, N, stride_dy, stride_x, stride_dx,
    slope,
    ACT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    rows, cols = _tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N)
    mask = (rows < M)[:, None] & (cols < N)[None, :]
    z = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(DY + rows[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    _, grad = _unary(z, slope, ACT)
    tl.store(DX + rows[:, None] * stride_dx + cols[None, :], (dy * grad).to(DX.dtype.element_ty), mask=mask)


@triton.jit
def gated_fwd_kernel(
    G,  # pointer to the gate, (M, N), row stride stride_g
    U,  # pointer to the up projection, (M, N), row stride stride_u
    Y,  # pointer to the output, (M, N), row stride stride_y
    M, N, stride_g, stride_u, stride_y,
    ACT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    rows, cols = _tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N)
    mask = (rows < M)[:, None] & (cols < N)[None, :]
    g = tl.load(G + rows[:, None] * stride_g + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + rows[:, None] * stride_u + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    a, _ = _gated(g, ACT)
    tl.store(Y + rows[:, None] * stride_y + cols[None, :], (a * u).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def gated_bwd_kernel(
    DY,  # pointer to the output gradient, (M, N), row stride stride_dy
    G,  # pointer to the forward gate, (M, N), row stride stride_g
    U,  # pointer to the forward up, (M, N), row stride stride_u
    DG,  # pointer to the gate gradient, (M, N), row stride stride_dg
    DU,  # pointer to the up gradient, (M, N), row stride stride_du
    M, N, stride_dy, stride_g, stride_u, stride_dg, stride_du,
    ACT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    rows, cols = _tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N)
    mask = (rows < M)[:, None] & (cols < N)[None, :]
    g = tl.load(G + rows[:, None] * stride_g + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + rows[:, None] * stride_u + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(DY + rows[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    a, grad = _gated(g, ACT)
    tl.store(DG + rows[:, None] * stride_dg + cols[None, :], (dy * u * grad).to(DG.dtype.element_ty), mask=mask)
    tl.store(DU + rows[:, None] * stride_du + cols[None, :], (dy * a).to(DU.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------
# Launch helpers. Every tensor is an (M, N) row view with a unit column stride (the glue makes sure).

class _Tiles(NamedTuple):
    block_m: int
    block_n: int
    num_warps: int


@functools.lru_cache(maxsize=4096)
def _tiles(M: int, N: int) -> _Tiles:
    """A row's worth of columns up to TILE, then as many rows as fit in TILE."""
    block_n = min(next_power_of_2(N), TILE)
    block_m = max(1, min(next_power_of_2(M), TILE // block_n))
    return _Tiles(block_m, block_n, 8 if block_m * block_n >= 4096 else 4)


def _grid(M: int, N: int):
    t = _tiles(M, N)
    return (cdiv(M, t.block_m) * cdiv(N, t.block_n),), t


def activation_fwd(x: torch.Tensor, y: torch.Tensor, act: int, slope: float) -> None:
    M, N = x.shape
    if M == 0 or N == 0:
        return
    grid, t = _grid(M, N)
    launch(activation_fwd_kernel, grid, (x, y, M, N, x.stride(0), y.stride(0), slope),
           dict(ACT=act, BLOCK_M=t.block_m, BLOCK_N=t.block_n, num_warps=t.num_warps))


def activation_bwd(dy: torch.Tensor, x: torch.Tensor, dx: torch.Tensor, act: int, slope: float) -> None:
    M, N = x.shape
    if M == 0 or N == 0:
        return
    grid, t = _grid(M, N)
    launch(activation_bwd_kernel, grid, (dy, x, dx, M, N, dy.stride(0), x.stride(0), dx.stride(0), slope),
           dict(ACT=act, BLOCK_M=t.block_m, BLOCK_N=t.block_n, num_warps=t.num_warps))


def gated_fwd(g: torch.Tensor, u: torch.Tensor, y: torch.Tensor, act: int) -> None:
    M, N = g.shape
    if M == 0 or N == 0:
        return
    grid, t = _grid(M, N)
    launch(gated_fwd_kernel, grid, (g, u, y, M, N, g.stride(0), u.stride(0), y.stride(0)),
           dict(ACT=act, BLOCK_M=t.block_m, BLOCK_N=t.block_n, num_warps=t.num_warps))


def gated_bwd(dy: torch.Tensor, g: torch.Tensor, u: torch.Tensor, dg: torch.Tensor, du: torch.Tensor,
              act: int) -> None:
    M, N = g.shape
    if M == 0 or N == 0:
        return
    grid, t = _grid(M, N)
    launch(gated_bwd_kernel, grid, (dy, g, u, dg, du, M, N, dy.stride(0), g.stride(0), u.stride(0),
                                    dg.stride(0), du.stride(0)),
           dict(ACT=act, BLOCK_M=t.block_m, BLOCK_N=t.block_n, num_warps=t.num_warps))
