"""Linear layer with the bias and an activation in the matmul's epilogue, in Triton.

Math (fp32 accumulation, storage in the input dtype), x (M, K), W (N, K), b (N,):

    z = x @ W^T + b                      (the fp32 accumulator tile, bias added in registers)
    y = act(z)                           act: none, relu, silu, gelu (erf), gelu_tanh, leaky_relu
    GRAD mode: dz = dy * act'(z)         the backward's epilogue: z recomputed by the same matmul
                                         (no (M, N) pre-activation kept from forward to backward)

act and act' are conv2d's epilogue (triton_kernels/conv2d.py `_epilogue`: relu' and leaky' from
z's sign, silu' = s (1 + z (1 - s)) with s = sigmoid(z), the GELU forms of common.py). The
glue then gets dx = dz @ W, dW = dz^T @ x from torch's matmuls and db = sum of dz's rows; with
no activation dz = dy and the GRAD launch is skipped.

FLOPs and bytes: 2*M*N*K FLOPs; at least (M*K + N*K + M*N) * s bytes (s = element size), plus
M*N*s for dy in GRAD mode. A BLOCK_M x BLOCK_N x BLOCK_K step reads (BLOCK_M + BLOCK_N) *
BLOCK_K * s bytes for 2 * BLOCK_M * BLOCK_N * BLOCK_K FLOPs: 128 FLOP/B at 128 x 256 in bf16.

Layouts: x and W are read through both their strides (no copy): a transposed weight view
(GPT-2's Conv1D stores W^T as (in, out) and is handed in as `weight.t()`, strides (1, N)) just
swaps which W stride is 1. out and dy are (M, N) rows with a unit column stride. Offsets are
64-bit.

`linear_tile` is the whole program (main loop + epilogue + store) as a @triton.jit function, so
that `linear_kernel` here and `linear_gelu_kernel` (triton_kernels/gelu.py, the public
DF.linear_gelu) share one body; Triton inlines it, so each kernel compiles as before.

Versions:
- v1 (this one): linear_gelu's grouped-tile tl.dot matmul (v1 of triton_kernels/gelu.py)
  generalised to conv2d's six activations through an ACT constexpr, with the same autotune list
  on GPU (pruned by common.py's shared-memory estimate) and one small
  config under the interpreter. Checked under the Triton interpreter on CPU against float64;
  not yet compiled by a real launch nor timed on a GPU.
"""
from __future__ import annotations

import functools
import os
from typing import Optional

import torch
import triton
import triton.language as tl

from dlh_kernels._cache import persistent_autotune
from dlh_kernels.triton_kernels.common import cdiv, fits_shared_memory, grouped_tile, launch, next_power_of_2
from dlh_kernels.triton_kernels.conv2d import ACTIVATIONS, _epilogue

__all__ = ["ACTIVATIONS", "linear", "linear_kernel", "linear_tile"]


@triton.jit
def linear_tile(
    A,  # pointer to the input, (M, K), strides (stride_am, stride_ak)
    W,  # pointer to the weight, (N, K), strides (stride_wn, stride_wk)
    Bias,  # pointer to the bias, (N,), or None
    C,  # pointer to the output, (M, N), row stride stride_cm: act(z), or dz when GRAD
    DC,  # GRAD only: pointer to the output gradient dy, (M, N), row stride stride_dcm
    M, N, K,
    stride_am, stride_ak, stride_wn, stride_wk, stride_cm, stride_dcm,
    negative_slope,  # leaky_relu's slope (ACT == 5), fp32
    ACT: tl.constexpr,  # 0 none, 1 relu, 2 silu, 3 gelu, 4 gelu_tanh, 5 leaky_relu
    HAS_BIAS: tl.constexpr, GRAD: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,  # "ieee" for fp32 unless torch allows tf32; ignored for 16-bit
    DOT_FP32: tl.constexpr,  # interpreter only: its bf16 tl.dot multiplies raw bits (Triton 3.9)
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # Grouped tile order: GROUP_M row tiles share each column tile of W while it is in L2.
    pid_m, pid_n = grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)

    rows = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    a_ptrs = A + rows[:, None] * stride_am + ks[None, :] * stride_ak
    w_ptrs = W + ks[:, None] * stride_wk + cols[None, :] * stride_wn   # the (BLOCK_K, BLOCK_N) tile of W^T
    row_ok = rows < M
    col_ok = cols < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k_ok = ks < K - k * BLOCK_K
        a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        if DOT_FP32:
            a = a.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(a, w, acc, input_precision=INPUT_PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        w_ptrs += BLOCK_K * stride_wk

    # Epilogue: bias and the activation (or dy times its derivative) on the fp32 accumulator,
    # one store.
    if HAS_BIAS:
        acc += tl.load(Bias + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    mask = row_ok[:, None] & col_ok[None, :]
    if GRAD:
        dy = tl.load(DC + rows[:, None] * stride_dcm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    else:
        dy = acc  # unused
    out = _epilogue(acc, dy, negative_slope, ACT, GRAD)
    tl.store(C + rows[:, None] * stride_cm + cols[None, :], out.to(C.dtype.element_ty), mask=mask)


@triton.jit
def linear_kernel(
    A,  # pointer to the input, (M, K), strides (stride_am, stride_ak)
    W,  # pointer to the weight, (N, K), strides (stride_wn, stride_wk): any layout
    Bias,  # pointer to the bias, (N,), or None
    C,  # pointer to the output, (M, N), row stride stride_cm: act(z), or dz when GRAD
    DC,  # GRAD only: pointer to the output gradient dy, (M, N), row stride stride_dcm
    M, N, K,
    stride_am, stride_ak, stride_wn, stride_wk, stride_cm, stride_dcm,
    negative_slope,
    M_BUCKET,  # unused by the kernel: the autotuner's key (M rounded up to a power of two)
    ACT: tl.constexpr, HAS_BIAS: tl.constexpr, GRAD: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, DOT_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    linear_tile(A, W, Bias, C, DC, M, N, K, stride_am, stride_ak, stride_wn, stride_wk, stride_cm,
                stride_dcm, negative_slope, ACT, HAS_BIAS, GRAD, INPUT_PRECISION, DOT_FP32,
                BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M)


# ---------------------------------------------------------------------------------------------
# Tiles and launch. On GPU the autotuner picks among these per (M, N, K) bucket; the list is the
# usual Hopper/Ampere set for bf16 (128x128 to 128x256 tiles, 3-4 stages). Under the
# interpreter (no driver, so no autotuner) one small config runs. linear_gelu uses the same list.

def _matmul_configs():
    def cfg(bm, bn, bk, group, warps, stages):
        return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": group},
                             num_warps=warps, num_stages=stages)
    return [
        cfg(128, 256, 64, 8, 8, 3),
        cfg(256, 128, 64, 8, 8, 3),
        cfg(128, 128, 64, 8, 8, 4),
        cfg(128, 128, 64, 8, 4, 4),
        cfg(128, 64, 64, 8, 4, 4),
        cfg(64, 128, 64, 8, 4, 4),
        cfg(128, 128, 32, 8, 4, 4),
        cfg(64, 64, 64, 8, 4, 4),
        cfg(64, 32, 32, 8, 4, 5),
    ]


INTERPRETER_MATMUL_CONFIG = {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 4}


def _prune_linear(configs, named_args, **kwargs):
    """Drop, before compiling them, the configs whose pipelined (A, W) ring (common.py's
    estimate: num_stages * (BLOCK_M + BLOCK_N) * BLOCK_K elements) exceeds the device's shared
    memory: fp32 doubles every tile, and an A100 has 163 KB, not the H100's 227 KB."""
    kept = [c for c in configs if fits_shared_memory("linear_kernel", named_args, kwargs, c)]
    return kept or configs[-1:]


def _bucket(n: int) -> int:
    """Autotune key: the next power of two, so every batch size does not re-tune."""
    return next_power_of_2(max(1, n))


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _autotuned() -> bool:
    """The autotuner on the GPU; one fixed config under the interpreter."""
    return not _interpreting()


@functools.lru_cache(maxsize=None)
def _tuned_linear():
    # choices kept across runs in the dlh cache directory (dlh_kernels/_cache.py)
    return persistent_autotune(
        triton.autotune(configs=_matmul_configs(), key=["M_BUCKET", "N", "K", "GRAD"],
                        prune_configs_by={"early_config_prune": _prune_linear})(linear_kernel))


def _input_precision(dtype: torch.dtype) -> str:
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"  # as F.linear: full fp32 unless the user allowed tf32
    return "tf32"


def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], out: torch.Tensor,
           act: int, negative_slope: float, grad_out: Optional[torch.Tensor] = None) -> None:
    """out = act(x @ weight^T + bias); with grad_out: out = grad_out * act'(x @ weight^T + bias).

    x: (M, K) any strides; weight: (N, K) any strides; out, grad_out: (M, N) unit column stride.
    act: an ACTIVATIONS code.
    """
    M, K = x.shape
    N = weight.shape[0]
    if M == 0 or N == 0:
        return
    grad = grad_out is not None
    args = (x, weight, bias, out, grad_out, M, N, K, x.stride(0), x.stride(1),
            weight.stride(0), weight.stride(1), out.stride(0), grad_out.stride(0) if grad else 0,
            float(negative_slope), _bucket(M))
    flags = dict(ACT=act, HAS_BIAS=bias is not None, GRAD=grad,
                 INPUT_PRECISION=_input_precision(x.dtype), DOT_FP32=_interpreting())
    if not _autotuned():
        c = INTERPRETER_MATMUL_CONFIG
        grid = (cdiv(M, c["BLOCK_M"]) * cdiv(N, c["BLOCK_N"]),)
        launch(linear_kernel, grid, args, {**flags, **c})
        return

    def grid(meta):
        return (cdiv(M, meta["BLOCK_M"]) * cdiv(N, meta["BLOCK_N"]),)
    _tuned_linear()[grid](*args, **flags)
