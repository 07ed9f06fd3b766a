"""@triton.jit helpers shared by several kernel families (as csrc/common.cuh is for CUDA C++).

- the GELU and its derivative on fp32 tiles (elementwise GELU, linear_gelu and conv2d
  epilogues): exact z * Phi(z), and PyTorch's tanh form written as z * sigmoid(2u), the same
  number without tanh and without overflow for large |u|;
- the grouped tile order of the matmul-shaped kernels (linear_gelu, conv2d): GROUP_M row tiles
  share each column tile while it is in L2.
"""
import triton
import triton.language as tl

SQRT_2_OVER_PI = tl.constexpr(0.7978845608028654)
INV_SQRT_2 = tl.constexpr(0.7071067811865476)
INV_SQRT_2PI = tl.constexpr(0.3989422804014327)
TANH_CUBIC = tl.constexpr(0.044715)


@triton.jit
def gelu_fp32(z, TANH: tl.constexpr):
    """gelu(z) of an fp32 tile: 0.5 z (1 + erf(z / sqrt 2)), or z * sigmoid(2u) with
    u = sqrt(2/pi) (z + 0.044715 z^3) (= 0.5 z (1 + tanh u))."""
    if TANH:
        u = SQRT_2_OVER_PI * (z + TANH_CUBIC * z * z * z)
        return z * tl.sigmoid(2.0 * u)
    else:
        return 0.5 * z * (1.0 + tl.erf(z * INV_SQRT_2))


@triton.jit
def gelu_grad_fp32(z, TANH: tl.constexpr):
    """gelu'(z) of an fp32 tile: Phi(z) + z phi(z), or s + 2 z s (1 - s) u'(z), s = sigmoid(2u)."""
    if TANH:
        u = SQRT_2_OVER_PI * (z + TANH_CUBIC * z * z * z)
        s = tl.sigmoid(2.0 * u)
        return s + 2.0 * z * s * (1.0 - s) * SQRT_2_OVER_PI * (1.0 + 3.0 * TANH_CUBIC * z * z)
    else:
        return 0.5 * (1.0 + tl.erf(z * INV_SQRT_2)) + z * tl.exp(-0.5 * z * z) * INV_SQRT_2PI


@triton.jit
def grouped_tile(pid, tiles_m, tiles_n, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of program pid when GROUP_M row tiles run down each column tile in turn."""
    per_group = GROUP_M * tiles_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = min(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows
    return pid_m, pid_n
