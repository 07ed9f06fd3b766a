"""2D convolution in Triton as implicit GEMMs: forward with bias + activation in the epilogue,
and the two backward GEMMs (grad input, grad weight). No im2col buffer is ever formed.

Math (fp32 accumulation, storage in the input dtype). x (N, C, H, W), w (K, C/G, R, S), G groups,
Cg = C/G input and Kg = K/G output channels per group; g = group of output channel k:

    z[n, k, oh, ow] = b[k] + sum_{c < Cg, r < R, s < S}
                      w[k, c, r, s] * x[n, g*Cg + c, oh*sh - ph + r*dh, ow*sw - pw + s*dw]
    y = act(z),  act in {identity, relu, silu, gelu (erf), gelu_tanh, leaky_relu(slope)}

    forward:  a GEMM per group, M = N*OH*OW rows (output pixels), Kg columns, reduction over
              Cg*R*S in one flat loop over (tap (r, s), channel block) pairs, so in NHWC
              (channels_last) each A tile is a run of contiguous channels of one input pixel. Taps falling in the zero padding are
              masked loads (other=0): "same" with an even kernel (more padding after than before)
              needs only the top/left padding and the output size.
    dz:       dy without an activation; with one, dz = dy * act'(z) where z is recomputed by the
              forward kernel in its GRAD epilogue mode (as linear_gelu does), so the forward keeps
              only what F.conv2d's autograd keeps (x, w, b) and never the (N, K, OH, OW) z.
    dx:       transposed implicit GEMM, M = N*H*W input pixels, Cg columns, reduction over
              Kg*R*S: dx[n, c, ih, iw] = sum w[k, c, r, s] * dz[n, k, oh, ow] over the taps with
              ih + ph - r*dh = oh*sh (masked where not divisible or out of range).
    dw:       implicit GEMM over the N*OH*OW output pixels, one (r, s) tap per grid column:
              dw[k, c, r, s] = sum_p dz[p, k] * x[p shifted by (r, s), c]; on GPU the pixel range
              is split across programs into fp32 partials summed by torch.
    db:       sum of dz over (n, oh, ow) (torch, in fp32), done by the glue.

FLOPs: 2*N*OH*OW*K*Cg*R*S per GEMM (forward, dx, dw each; the GRAD recompute adds one more when
an activation is present). Bytes at least: x + w + y (forward); dz, w, dx and dz, x, dw (backward).

Precision: fp32 inputs use tl.dot with input_precision "ieee" unless
torch.backends.cudnn.allow_tf32 is on (it is by default: it is the switch F.conv2d obeys on GPU,
so we follow cuDNN's semantics, not torch.backends.cuda.matmul.allow_tf32); 16-bit inputs dot in
their own type with fp32 accumulation. Under the Triton 3.9 interpreter 16-bit dots are widened to
fp32 first (DOT_FP32), because its bf16 tl.dot multiplies raw bits.

Layout: any input/weight/output strides are indexed directly (64-bit offsets); NHWC
(channels_last) is the fast one for the forward and dx (contiguous channel runs).

Versions:
- v1: forward autotuned on GPU over tile shapes (BLOCK_K from Cg), fixed config under
  the interpreter; dx without the stride-phase decomposition (strided convs waste
  (1 - 1/(sh*sw)) of the dx taps on masks); dw split over pixels into fp32 partials. Checked under
  the interpreter and compiled for sm_80/sm_90; not yet run or timed on a GPU.
- v1.1: groups (and dw's taps) folded into grid axis x: depthwise convs with more than 65,535
  channels and R * S > 65,535 launch (CUDA caps axes y and z at 65,535). Autotuned path
  exercised on CPU by tests/test_autotune.py.
- v1.2 (review T5): the forward and dx reductions are one flat loop over (tap, channel block)
  pairs instead of taps outer / channels inner, so the software pipeliner overlaps loads across
  taps (before: a prologue and a drain per tap, no overlap at all when Cg <= BLOCK_K); a
  forward tap is one scalar offset on per-row base pointers, tap coordinates (and dx's divisions
  by the stride) are 32-bit. The glue hands
  both GEMMs a weight with unit channel stride (an NCHW weight is copied to channels_last):
  its tiles become 16-byte cp.async copies. Static figures, sm_90, 128->128 3x3 (Triton 3.9):
  NCHW bf16 forward 0 -> 6-32 cp.async per config (the weight tile; pipelined), fp32 NCHW
  forward stack 104-2672 B per config -> 0 (two GRAD configs keep 40-56 B); the dx/dw fixed
  configs spill-free under Triton 3.6 and 3.9 (dx: 8 warps, BLOCK_K 32 in fp32 or with an NCHW
  dz; dw: BLOCK_K 32 in fp32 NCHW, its pixel decode in 32 bits unless PIX64: the 16-bit stem's
  dw spilled 1240 B). dw's loop was already one flat loop (one tap per program). Still: on NCHW the input (and dx's dz) tile of 16-bit dtypes is
  scalar ld.global: its runs are along w, shifted by each tap's s*dil - pad, so only 2-byte
  alignment is ever known and cp.async needs 4 (fp32 NCHW copies 4 bytes per element
  asynchronously). NHWC is the fast layout; NCHW needs TMA (or a layout change) to pipeline
  its input.
"""
from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from dlh_kernels._alloc import empty
from dlh_kernels._cache import persistent_autotune
from dlh_kernels.triton_kernels.common import (cdiv, fits_shared_memory, gelu_fp32, gelu_grad_fp32, grouped_tile,
                                               launch, next_power_of_2)


# activation codes, shared with the glue and csrc/conv2d.cu
ACTIVATIONS = {None: 0, "relu": 1, "silu": 2, "gelu": 3, "gelu_tanh": 4, "leaky_relu": 5, "tanh": 6, "sigmoid": 7}


@triton.jit
def _epilogue(acc, dy, slope, ACT: tl.constexpr, GRAD: tl.constexpr):
    """act(acc), or dy * act'(acc) when GRAD; acc is the fp32 pre-activation tile."""
    if ACT == 1:
        if GRAD:
            out = tl.where(acc > 0, dy, 0.0)
        else:
            out = tl.maximum(acc, 0.0)
    elif ACT == 2:
        sg = tl.sigmoid(acc)
        if GRAD:
            out = dy * sg * (1.0 + acc * (1.0 - sg))
        else:
            out = acc * sg
    elif ACT == 3 or ACT == 4:  # gelu (erf), gelu (tanh)
        if GRAD:
            out = dy * gelu_grad_fp32(acc, ACT == 4)
        else:
            out = gelu_fp32(acc, ACT == 4)
    elif ACT == 5:
        if GRAD:
            out = tl.where(acc > 0, dy, dy * slope)
        else:
            out = tl.where(acc > 0, acc, acc * slope)
    elif ACT == 6:  # tanh(z) = 2 sigmoid(2z) - 1; tanh' = 1 - tanh^2
        t = 2.0 * tl.sigmoid(2.0 * acc) - 1.0
        if GRAD:
            out = dy * (1.0 - t * t)
        else:
            out = t
    elif ACT == 7:  # sigmoid; sigmoid' = s (1 - s)
        sg = tl.sigmoid(acc)
        if GRAD:
            out = dy * sg * (1.0 - sg)
        else:
            out = sg
    else:
        if GRAD:
            out = dy
        else:
            out = acc
    return out


@triton.jit
def conv2d_fwd_kernel(
    X,  # input (N, C, H, W), strides sxn, sxc, sxh, sxw
    Wt,  # weight (K, Cg, R, S), strides swk, swc, swr, sws
    Bias,  # (K,) or None
    Y,  # output (N, K, OH, OW): act(z), or dz when GRAD; strides syn, syc, syh, syw
    DY,  # GRAD only: output gradient (N, K, OH, OW), strides sdn, sdc, sdh, sdw
    N, H, W, OH, OW, CG, KG, R, S,
    sxn, sxc, sxh, sxw, swk, swc, swr, sws, syn, syc, syh, syw, sdn, sdc, sdh, sdw,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    negative_slope,
    M_BUCKET,  # unused: autotune key (N*OH*OW rounded up to a power of two)
    ACT: tl.constexpr, HAS_BIAS: tl.constexpr, GRAD: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, DOT_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # grid (tiles x groups,): groups along x, not y, which CUDA caps at 65,535 (depthwise convs
    # have one group per channel)
    M = N * OH * OW
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(KG, BLOCK_N)
    pid = tl.program_id(0)
    g = (pid // (tiles_m * tiles_n)).to(tl.int64)
    pid_m, pid_n = grouped_tile(pid % (tiles_m * tiles_n), tiles_m, tiles_n, GROUP_M)

    rows = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < M
    col_ok = cols < KG
    ow = rows % OW
    t = rows // OW
    oh = t % OH
    n = t // OH
    ih0 = oh * stride_h - pad_h
    iw0 = ow * stride_w - pad_w
    # each row's input pixel at tap (0, 0), channel 0 of its group; a tap adds one scalar offset.
    # Coordinates fit 32 bits (|ih| < H + padding), offsets take 64.
    x_row = X + n * sxn + (g * CG) * sxc + ih0 * sxh + iw0 * sxw
    ih0 = ih0.to(tl.int32)
    iw0 = iw0.to(tl.int32)
    kout = g * KG + cols
    w_col = Wt + kout * swk
    ks = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # One flat loop over (tap, channel block) pairs, kk = (r * S + s) * c_blocks + c_block: the
    # software pipeliner sees a single loop of R*S*c_blocks iterations and keeps its num_stages
    # loads in flight across tap boundaries (a taps-outer / channels-inner nest pipelines only the
    # inner loop, with a prologue and a drain per tap: no overlap at all when Cg <= BLOCK_K). The
    # tap's offsets and padding mask are recomputed per iteration from kk (scalar divisions and a
    # few [BLOCK_M] integer ops, next to a BLOCK_M x BLOCK_K x BLOCK_N dot).
    c_blocks = tl.cdiv(CG, BLOCK_K)
    for kk in range(0, R * S * c_blocks):
        rs = kk // c_blocks
        c = (kk - rs * c_blocks) * BLOCK_K + ks
        r = rs // S
        s = rs - r * S
        ih = ih0 + r * dil_h
        iw = iw0 + s * dil_w
        ok = row_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        c_ok = c < CG
        x_tap = x_row + ((r * dil_h).to(tl.int64) * sxh + (s * dil_w).to(tl.int64) * sxw)
        a = tl.load(x_tap[:, None] + c[None, :] * sxc,
                    mask=ok[:, None] & c_ok[None, :], other=0.0)
        b = tl.load((w_col + r * swr + s * sws)[None, :] + c[:, None] * swc,
                    mask=c_ok[:, None] & col_ok[None, :], other=0.0)
        if DOT_FP32:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)

    # Epilogue: bias, then the activation (or dz = dy * act'(z)) on the fp32 tile; one store.
    if HAS_BIAS:
        acc += tl.load(Bias + kout, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    mask = row_ok[:, None] & col_ok[None, :]
    if GRAD:
        dy = tl.load(DY + (n * sdn + oh * sdh + ow * sdw)[:, None] + (kout * sdc)[None, :],
                     mask=mask, other=0.0).to(tl.float32)
    else:
        dy = acc
    out = _epilogue(acc, dy, negative_slope, ACT, GRAD)
    tl.store(Y + (n * syn + oh * syh + ow * syw)[:, None] + (kout * syc)[None, :],
             out.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def conv2d_bwd_input_kernel(
    DZ,  # (N, K, OH, OW), strides szn, szc, szh, szw
    Wt,  # (K, Cg, R, S), strides swk, swc, swr, sws
    DX,  # (N, C, H, W), strides sxn, sxc, sxh, sxw
    N, H, W, OH, OW, CG, KG, R, S,
    szn, szc, szh, szw, swk, swc, swr, sws, sxn, sxc, sxh, sxw,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    INPUT_PRECISION: tl.constexpr, DOT_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # grid (tiles x groups,), groups slowest (axis y would cap them at 65,535)
    tiles_n = tl.cdiv(CG, BLOCK_N)
    M = N * H * W
    tiles = tl.cdiv(M, BLOCK_M) * tiles_n
    g = (tl.program_id(0) // tiles).to(tl.int64)
    pid = tl.program_id(0) % tiles
    rows = (pid // tiles_n).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = (pid % tiles_n).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < M
    col_ok = cols < CG
    iw = rows % W
    t = rows // W
    ih = t % H
    n = t // H
    dz_pix = DZ + n * szn + (g * KG) * szc
    ih32 = ih.to(tl.int32)  # the tap arithmetic below (divisions by the stride) in 32 bits
    iw32 = iw.to(tl.int32)
    w_col = Wt + cols * swc + (g * KG) * swk
    ks = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # one flat loop over (tap, output-channel block) pairs, as in the forward
    k_blocks = tl.cdiv(KG, BLOCK_K)
    for kk in range(0, R * S * k_blocks):
        rs = kk // k_blocks
        k = (kk - rs * k_blocks) * BLOCK_K + ks
        r = rs // S
        s = rs - r * S
        th = ih32 + pad_h - r * dil_h
        tw = iw32 + pad_w - s * dil_w
        th = tl.where(th >= 0, th, -1)  # keep the masked lanes' quotients harmless
        tw = tl.where(tw >= 0, tw, -1)
        oh = th // stride_h
        ow = tw // stride_w
        ok = row_ok & (th >= 0) & (tw >= 0) & (th - oh * stride_h == 0) & (tw - ow * stride_w == 0) \
            & (oh < OH) & (ow < OW)
        k_ok = k < KG
        a = tl.load((dz_pix + oh.to(tl.int64) * szh + ow.to(tl.int64) * szw)[:, None] + k[None, :] * szc,
                    mask=ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load((w_col + r * swr + s * sws)[None, :] + k[:, None] * swk,
                    mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        if DOT_FP32:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
    mask = row_ok[:, None] & col_ok[None, :]
    tl.store(DX + (n * sxn + ih * sxh + iw * sxw)[:, None] + ((g * CG + cols) * sxc)[None, :],
             acc.to(DX.dtype.element_ty), mask=mask)


@triton.jit
def conv2d_bwd_weight_kernel(
    DZ,  # (N, K, OH, OW), strides szn, szc, szh, szw
    X,  # (N, C, H, W), strides sxn, sxc, sxh, sxw
    DW,  # fp32 partials (splits, K, Cg, R, S) contiguous, or the weight gradient when splits == 1
    N, H, W, OH, OW, CG, KG, R, S,
    szn, szc, szh, szw, sxn, sxc, sxh, sxw, swk, swc, swr, sws,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    pix_per_split,  # output pixels each split sums (a multiple of BLOCK_K)
    split_stride,  # elements between two splits' partials in DW
    INPUT_PRECISION: tl.constexpr, DOT_FP32: tl.constexpr,
    PIX64: tl.constexpr,  # pixel indices reach 2^31: decode them in 64 bits
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # program (k tile, c tile, split, tap rs, group g), fastest first, all along grid axis x
    # (R * S and groups can each pass the 65,535 that CUDA allows on axes y and z):
    # dw[k, c, r, s] over its pixel range
    tiles_n = tl.cdiv(CG, BLOCK_N)
    tiles_m = tl.cdiv(KG, BLOCK_M)
    splits = tl.cdiv(N * OH * OW, pix_per_split)
    pid = tl.program_id(0)
    tile = pid % (tiles_m * tiles_n)
    pid = pid // (tiles_m * tiles_n)
    split = (pid % splits).to(tl.int64)
    pid = pid // splits
    rs = pid % (R * S)
    g = (pid // (R * S)).to(tl.int64)
    r = rs // S
    s = rs % S
    ks = (tile // tiles_n).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cs = (tile % tiles_n).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    k_ok = ks < KG
    c_ok = cs < CG
    P = N * OH * OW
    dz_col = DZ + (g * KG + ks) * szc
    x_col = X + (g * CG + cs) * sxc
    ps = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    p_start = split * pix_per_split
    for p0 in range(0, pix_per_split, BLOCK_K):
        p = p_start + p0 + ps
        if not PIX64:  # the four divisions of the pixel decode in 32 bits (64-bit ones cost
            p = p.to(tl.int32)  # registers: the fixed tiles spilled up to 1240 B on sm_90)
        p_ok = p < P
        ow = p % OW
        t = p // OW
        oh = t % OH
        n = t // OH
        ih = oh * stride_h - pad_h + r * dil_h
        iw = ow * stride_w - pad_w + s * dil_w
        x_ok = p_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        n = n.to(tl.int64)  # offsets in 64 bits
        a = tl.load(dz_col[:, None] + (n * szn + oh.to(tl.int64) * szh + ow.to(tl.int64) * szw)[None, :],
                    mask=k_ok[:, None] & p_ok[None, :], other=0.0)
        b = tl.load(x_col[None, :] + (n * sxn + ih.to(tl.int64) * sxh + iw.to(tl.int64) * sxw)[:, None],
                    mask=x_ok[:, None] & c_ok[None, :], other=0.0)
        if DOT_FP32:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
    mask = k_ok[:, None] & c_ok[None, :]
    tl.store(DW + split * split_stride + ((g * KG + ks) * swk)[:, None] + (cs * swc)[None, :]
             + r * swr + s * sws, acc.to(DW.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------
# Launch helpers.

def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _autotuned() -> bool:
    """The forward goes through its autotuner on the GPU; the interpreter runs one fixed config
    (tests/test_autotune.py patches this to drive the autotuner on CPU tensors)."""
    return not _interpreting()


def _input_precision(dtype: torch.dtype) -> str:
    # F.conv2d obeys cuDNN's switch (torch.backends.cudnn.allow_tf32, on by default), so we do too.
    if dtype == torch.float32 and (_interpreting() or not torch.backends.cudnn.allow_tf32):
        return "ieee"
    return "tf32"


def _block_k(n: int) -> int:
    """Reduction tile over channels: at least 16 (tl.dot's minimum), at most 64."""
    return max(16, min(64, next_power_of_2(max(1, n))))


def _block_n(n: int, cap: int = 128) -> int:
    return max(16, min(cap, next_power_of_2(max(1, n))))


def _channels_contiguous(w: torch.Tensor) -> torch.Tensor:
    """The weight (K, Cg, R, S) with unit stride along Cg (channels_last), copied if it has not.
    Both GEMMs that read it load (channel x output channel) tiles: with an NCHW weight neither
    axis has unit stride (R*S and Cg*R*S), so every element is its own load and 16-bit ones
    cannot go through cp.async (4 bytes minimum); one contiguous axis makes them 16-byte copies.
    The copy is K*Cg*R*S elements, small next to the activations it is multiplied with."""
    if w.stride(1) == 1 or w.shape[1] == 1:
        return w
    return w.contiguous(memory_format=torch.channels_last)


# Under the interpreter every tl op costs ~0.3 ms whatever its size: tall tiles, few iterations.
INTERPRETER_CONFIG = {"BLOCK_M": 512, "BLOCK_N": 32, "GROUP_M": 4}
# dw's pixel splits under the interpreter (the GPU picks enough to fill its SMs); tests raise it
# to reach the split partials on CPU.
INTERPRETER_DW_SPLITS = 1


def _fwd_configs():
    def cfg(bm, bn, warps, stages):
        return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "GROUP_M": 8}, num_warps=warps, num_stages=stages)
    return [cfg(128, 128, 8, 3), cfg(128, 64, 4, 4), cfg(64, 128, 4, 4), cfg(64, 64, 4, 4),
            cfg(128, 32, 4, 4), cfg(64, 32, 4, 3), cfg(256, 64, 8, 3)]


def _prune(configs, named_args, **kwargs):
    """Column tiles wider than the per-group output channels (rounded up) waste the tile; tiles
    whose pipelined shared memory (common.py's estimate) exceeds the device's are dropped before
    they are compiled."""
    kg = named_args["KG"]
    cap = _block_n(kg)
    kept = [c for c in configs if c.kwargs["BLOCK_N"] <= cap
            and fits_shared_memory("conv2d_fwd_kernel", named_args, kwargs, c)]
    return kept or [min(configs, key=lambda c: c.kwargs["BLOCK_N"] * c.kwargs["BLOCK_M"] * c.num_stages)]


@functools.lru_cache(maxsize=None)
def _tuned_fwd():
    # choices kept across runs in the dlh cache directory (dlh_kernels/_cache.py)
    return persistent_autotune(triton.autotune(
        configs=_fwd_configs(), key=["M_BUCKET", "KG", "CG", "R", "S", "GRAD", "ACT"],
        prune_configs_by={"early_config_prune": _prune})(conv2d_fwd_kernel))


def conv2d_fwd(x, w, bias, y, stride, pad, dilation, groups, act: int, negative_slope: float,
               grad_out=None) -> None:
    """y = act(conv2d(x, w) + bias); with grad_out: y = grad_out * act'(conv2d(x, w) + bias).
    x (N, C, H, W), w (K, Cg, R, S), y and grad_out (N, K, OH, OW): any strides.
    pad: the top/left padding (the bottom/right padding is implied by y's size)."""
    N, C, H, W = x.shape
    K, CG, R, S = w.shape
    OH, OW = y.shape[2], y.shape[3]
    KG = K // groups
    M = N * OH * OW
    if M == 0 or K == 0:
        return
    grad = grad_out is not None
    d = grad_out if grad else y
    w = _channels_contiguous(w)
    args = (x, w, bias, y, grad_out, N, H, W, OH, OW, CG, KG, R, S, *x.stride(), *w.stride(),
            *y.stride(), *d.stride(), stride[0], stride[1], pad[0], pad[1], dilation[0], dilation[1],
            float(negative_slope), next_power_of_2(M))
    flags = dict(ACT=act, HAS_BIAS=bias is not None, GRAD=grad,
                 INPUT_PRECISION=_input_precision(x.dtype), DOT_FP32=_interpreting(),
                 BLOCK_K=16 if _interpreting() else _block_k(CG))
    if not _autotuned():
        c = INTERPRETER_CONFIG
        grid = (-(-M // c["BLOCK_M"]) * -(-KG // c["BLOCK_N"]) * groups,)
        launch(conv2d_fwd_kernel, grid, args, {**flags, **c})
        return

    def grid(meta):
        return (-(-M // meta["BLOCK_M"]) * -(-KG // meta["BLOCK_N"]) * groups,)
    _tuned_fwd()[grid](*args, **flags)


def conv2d_bwd_input(dz, w, dx, stride, pad, dilation, groups) -> None:
    """dx (N, C, H, W) from dz (N, K, OH, OW) and w (K, Cg, R, S); any strides."""
    N, C, H, W = dx.shape
    K, CG, R, S = w.shape
    OH, OW = dz.shape[2], dz.shape[3]
    KG = K // groups
    M = N * H * W
    if M == 0 or C == 0:
        return
    if K == 0 or OH == 0 or OW == 0:
        dx.zero_()
        return
    w = _channels_contiguous(w)
    if _interpreting():
        bm, bn, bk, warps, stages = 512, 16, 16, 4, 1
    else:
        # 8 warps, and BLOCK_K 32 where the A tile costs the most registers (fp32, or dz
        # without unit channel stride: one 64-bit address per element): 128x64x64 at 4 warps
        # spilled 44-335 stores on sm_90 (fp32, bf16 NCHW); this tile spills none there
        # (Triton 3.6 and 3.9) and at most 3 on sm_80
        wide = dz.dtype != torch.float32 and dz.stride(1) == 1
        bm, bn, bk, warps, stages = 128, _block_n(CG, 64), min(_block_k(KG), 64 if wide else 32), 8, 3
    grid = (-(-M // bm) * -(-CG // bn) * groups,)
    launch(conv2d_bwd_input_kernel, grid, (
        dz, w, dx, N, H, W, OH, OW, CG, KG, R, S, *dz.stride(), *w.stride(), *dx.stride(),
        stride[0], stride[1], pad[0], pad[1], dilation[0], dilation[1]),
        dict(INPUT_PRECISION=_input_precision(dz.dtype), DOT_FP32=_interpreting(),
             BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, num_stages=stages))


def conv2d_bwd_weight(dz, x, w_shape, stride, pad, dilation, groups, dtype) -> torch.Tensor:
    """dw (K, Cg, R, S), contiguous, in `dtype`, from dz (N, K, OH, OW) and x (N, C, H, W)."""
    N, C, H, W = x.shape
    K, CG, R, S = w_shape
    OH, OW = dz.shape[2], dz.shape[3]
    KG = K // groups
    P = N * OH * OW
    if K == 0 or CG == 0:
        return empty(w_shape, dtype, x.device)
    if P == 0:
        return torch.zeros(w_shape, dtype=dtype, device=x.device)
    if _interpreting():
        bm, bn, bk, warps, stages = 16, 16, 512, 4, 1
    else:
        # 32 pixels a step for fp32 NCHW (every A and B element its own 64-bit address): 64
        # spills on sm_90 under Triton 3.6
        bk = 32 if x.dtype == torch.float32 and x.stride(1) != 1 else 64
        bm, bn, warps, stages = _block_n(KG, 64), _block_n(CG, 64), 4, 3
    tiles = cdiv(KG, bm) * cdiv(CG, bn) * R * S * groups
    chunks = cdiv(P, bk)
    if _interpreting():
        splits = INTERPRETER_DW_SPLITS
    else:  # enough programs to fill the GPU, each summing at least 8 pixel chunks
        from dlh_kernels._ext import sm_count
        want = 2 * sm_count(x.device.index if x.device.index is not None else torch.cuda.current_device())
        splits = max(1, min(cdiv(want, tiles), chunks // 8))
    per_split = cdiv(chunks, splits) * bk
    splits = cdiv(P, per_split)
    if splits == 1 and dtype == torch.float32:
        out = empty(w_shape, torch.float32, x.device)
        part = out
    else:
        part = empty((splits,) + tuple(w_shape), torch.float32, x.device)
        out = None
    grid = (-(-KG // bm) * -(-CG // bn) * splits * R * S * groups,)
    launch(conv2d_bwd_weight_kernel, grid, (
        dz, x, part, N, H, W, OH, OW, CG, KG, R, S, *dz.stride(), *x.stride(),
        CG * R * S, R * S, S, 1, stride[0], stride[1], pad[0], pad[1], dilation[0], dilation[1],
        per_split, K * CG * R * S),
        dict(INPUT_PRECISION=_input_precision(x.dtype), DOT_FP32=_interpreting(),
             PIX64=splits * per_split >= 2**31,
             BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, num_stages=stages))
    if out is not None:
        return out
    return part.sum(0).to(dtype)
