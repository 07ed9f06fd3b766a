"""conv2d + bias + activation (the epilogue-fused implicit GEMM) against cuDNN and torch.compile.

Providers, side by side on the same inputs (the same values in both layouts):
  dlh-triton        DF.conv2d(x, w, b, ..., activation=act, backend="triton"), x channels_last
  dlh-triton-nchw   the same with x in NCHW (the kernel indexes any strides; NHWC is its fast one)
  dlh-cuda          backend="cuda", x channels_last (forward: csrc/conv2d.cu; backward: Triton)
  eager-nchw        act(F.conv2d(x, w, b)): cuDNN, then a separate activation kernel, NCHW
  eager-nhwc        the same with channels_last x and w
  torch.compile     the eager function compiled (dynamic=False), channels_last
  F.conv2d          the bare cuDNN convolution with its bias, channels_last, no activation: the
                    reference of the time ratios

Convolutions at these shapes are compute-bound: every row reports TFLOP/s and % of the matmul
ceiling measured at the start of the run, and the summary gives each provider's time over the
bare cuDNN convolution's.
Sweep: the reference models' layers (the seed CNN, a U-Net's 3x3 convs, AlexNet's 11x11 stride 4)
and ResNet-50's (the 7x7 stem, the bottleneck 1x1 and 3x3 at each stage, the stride-2 3x3).
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional, Union

import torch
import torch.nn.functional as F

from . import common
from .common import max_rel_err

PROVIDERS = ("dlh-triton", "dlh-triton-nchw", "dlh-cuda", "eager-nchw", "eager-nhwc", "torch.compile", "F.conv2d")
BARE = "F.conv2d"
MODES = ("fwd", "fwd+bwd")
_NCHW = {"dlh-triton-nchw", "eager-nchw"}

# (case, N, C, H, W, K, R, S, stride, padding, groups, activation)
MODELS = [
    ("seed-conv1", 64, 1, 28, 28, 16, 5, 5, 1, 2, 1, "relu"),
    ("seed-conv2", 64, 16, 14, 14, 32, 5, 5, 1, 2, 1, "relu"),
    ("unet-64", 16, 128, 64, 64, 128, 3, 3, 1, 1, 1, "silu"),
    ("unet-32", 16, 256, 32, 32, 256, 3, 3, 1, 1, 1, "silu"),
    ("alexnet-conv1", 64, 3, 227, 227, 96, 11, 11, 4, 0, 1, "relu"),
]
RESNET50 = [
    ("r50-stem", 32, 3, 224, 224, 64, 7, 7, 2, 3, 1, "relu"),
    ("r50-l1-1x1", 32, 256, 56, 56, 64, 1, 1, 1, 0, 1, "relu"),
    ("r50-l1-3x3", 32, 64, 56, 56, 64, 3, 3, 1, 1, 1, "relu"),
    ("r50-l2-3x3s2", 32, 128, 56, 56, 128, 3, 3, 2, 1, 1, "relu"),
    ("r50-l2-3x3", 32, 128, 28, 28, 128, 3, 3, 1, 1, 1, "relu"),
    ("r50-l3-3x3", 32, 256, 14, 14, 256, 3, 3, 1, 1, 1, "relu"),
    ("r50-l3-1x1", 32, 1024, 14, 14, 256, 1, 1, 1, 0, 1, "relu"),
    ("r50-l4-3x3", 32, 512, 7, 7, 512, 3, 3, 1, 1, 1, "relu"),
]
QUICK = [MODELS[1], MODELS[2], RESNET50[2], RESNET50[6]]
DEVICE = "cuda"

Provider = Union[Callable, str]


def shapes(quick: bool) -> list[tuple]:
    return list(QUICK) if quick else MODELS + RESNET50


def out_size(H: int, R: int, stride: int, padding: int) -> int:
    return (H + 2 * padding - R) // stride + 1


def flops(mode: str, N, C, H, W, K, R, S, stride, padding, groups) -> int:
    """2 FLOPs per multiply-add of the convolution; the backward is two more GEMMs of the same
    size (dx and dw). dlh's recompute of z for the activation's gradient is not counted."""
    fwd = 2 * N * out_size(H, R, stride, padding) * out_size(W, S, stride, padding) * K * (C // groups) * R * S
    return fwd if mode == "fwd" else 3 * fwd


def _act(y, activation):
    return F.silu(y) if activation == "silu" else F.relu(y)


def eager(x, w, b, stride, padding, groups, activation):
    return _act(F.conv2d(x, w, b, stride, padding, 1, groups), activation)


def bare(x, w, b, stride, padding, groups, activation):
    return F.conv2d(x, w, b, stride, padding, 1, groups)


def _dlh(backend: str) -> Provider:
    DF = common.dlh_functional(backend)
    if isinstance(DF, str):
        return DF
    if not hasattr(DF, "conv2d"):
        return "dlh_kernels.functional has no conv2d yet"
    return lambda x, w, b, stride, padding, groups, activation: DF.conv2d(
        x, w, b, stride, padding, 1, groups, activation=activation, backend=backend)


def providers() -> dict[str, Provider]:
    return {
        "dlh-triton": _dlh("triton"),
        "dlh-triton-nchw": _dlh("triton"),
        "dlh-cuda": _dlh("cuda"),
        "eager-nchw": eager,
        "eager-nhwc": eager,
        "torch.compile": common.compiled(eager),
        BARE: bare,
    }


def make_inputs(case: tuple, dtype: torch.dtype) -> list[tuple]:
    """Rotating sets of (x NCHW, x NHWC, w, w NHWC, b, dy NCHW, dy NHWC)."""
    _, N, C, H, W, K, R, S, stride, padding, groups, _ = case
    OH, OW = out_size(H, R, stride, padding), out_size(W, S, stride, padding)
    set_bytes = (2 * N * C * H * W + 2 * K * C // groups * R * S + 2 * N * K * OH * OW) * torch.finfo(dtype).bits // 8
    sets = []
    for _ in range(common.rotation_count(set_bytes)):
        x = torch.randn(N, C, H, W, device=DEVICE, dtype=dtype)
        w = (torch.randn(K, C // groups, R, S, device=DEVICE) / (C // groups * R * S) ** 0.5).to(dtype)
        b = (0.1 * torch.randn(K, device=DEVICE)).to(dtype)
        dy = torch.randn(N, K, OH, OW, device=DEVICE, dtype=dtype)
        cl = torch.channels_last
        sets.append((x, x.contiguous(memory_format=cl), w, w.contiguous(memory_format=cl), b,
                     dy, dy.contiguous(memory_format=cl)))
    return sets


def timed_call(fn: Callable, name: str, mode: str, stride, padding, groups, activation) -> Callable:
    nchw = name in _NCHW

    def pick(s):
        x, xc, w, wc, b, dy, dyc = s
        # channels_last weights too: (K, R, S, C) in memory, what cuDNN's NHWC kernels, our
        # Triton kernel (contiguous channel runs) and the cuda backend (a free view) want
        return (x, w, b, dy) if nchw else (xc, wc, b, dyc)

    if mode == "fwd":
        def fwd(*s):
            x, w, b, _ = pick(s)
            return fn(x, w, b, stride, padding, groups, activation)
        return fwd

    def fwd_bwd(*s):
        x, w, b, dy = pick(s)
        leaves = [t.detach().requires_grad_() for t in (x, w, b)]
        return torch.autograd.grad(fn(*leaves, stride, padding, groups, activation), leaves, dy)
    return fwd_bwd


def run(*, quick: bool = False, dtype: str = "bf16", out: Optional[Path] = None) -> int:
    def body(sweep: "Sweep", save: Callable[[], None]) -> None:
        provs = sweep.skip_unavailable("conv2d", providers())
        for case in common.smoke(shapes(quick)):
            sweep.bench_shape(case, provs)
            save()

    return common.run_sweep(lambda ceilings, *timing: Sweep(dtype, ceilings[f"matmul_{dtype}_tflops"], *timing),
                            body, lambda sweep: summary(sweep.rows, sweep.matmul_tflops, dtype),
                            quick=quick, out=out, matmul_dtype=dtype)


class Sweep(common.MatmulSweep):
    name = "conv2d"

    def bench_shape(self, case: tuple, provs: dict[str, Provider]) -> None:
        name_, N, C, H, W, K, R, S, stride, padding, groups, activation = case
        what = f"{name_} N={N} C={C} {H}x{W} K={K} {R}x{S}/{stride}"
        try:
            sets = make_inputs(case, self.torch_dtype)
            x0, _, w0, _, b0, _, _ = sets[0]
            ref = eager(x0, w0, b0, stride, padding, groups, activation)
        except torch.cuda.OutOfMemoryError as exc:
            return self.skip(what, common.short_error(exc))
        for name, p in common.runnable(provs):
            try:
                call = timed_call(p, name, "fwd", stride, padding, groups, activation)
                y = call(*sets[0])
                err = None if name == BARE else max_rel_err(y, ref)
                del y
            except Exception as exc:  # dlh-cuda without conv2d_fwd lands here
                self.skip(f"conv2d {name} {what}", common.short_error(exc))
                continue
            if err is not None and not err < 0.05:
                print(f"WARNING: {name} {what}: forward differs from eager by {err:.3g}")
            for mode in MODES:
                call = timed_call(p, name, mode, stride, padding, groups, activation)
                try:
                    times = self.time_sets(call, sets)
                except Exception as exc:
                    self.skip(f"conv2d {name} {mode} {what}", common.short_error(exc))
                    continue
                row = {"op": "conv2d", "provider": name, "case": name_, "N": N, "C": C, "H": H, "W": W,
                       "K": K, "R": R, "S": S, "stride": stride, "padding": padding, "groups": groups,
                       "activation": activation, "dtype": self.dtype, "mode": mode,
                       **self.rate(times, flops(mode, N, C, H, W, K, R, S, stride, padding, groups)),
                       "fwd_err_vs_eager": err, "input_sets": len(sets)}
                self.rows.append(row)
                print(f"{mode:>7} {what:<44} {name:>15}  p50 {row['p50_ms']:8.4f} ms  "
                      f"{row['tflops']:6.1f} TFLOP/s  {row['pct_matmul']:5.1f}%", flush=True)
        del sets, ref, x0, w0, b0
        torch.cuda.empty_cache()

    def save(self, meta: dict, out: Path) -> None:
        self.add_time_ratio(BARE, _key, "time_vs_cudnn")
        super().save(meta, out)


def _key(r: dict) -> tuple:
    return r["case"], r["mode"]


def summary(rows: list[dict], matmul_tflops: float, dtype: str = "bf16") -> str:
    """TFLOP/s (% of the matmul ceiling) per layer, providers side by side, one block per mode,
    and dlh-triton's and eager-nhwc's time over the bare cuDNN convolution's."""
    blocks = []
    names = [p for p in PROVIDERS if any(r["provider"] == p for r in rows)]
    for mode in MODES:
        sub = [r for r in rows if r["mode"] == mode]
        if not sub:
            continue
        table = []
        for case in dict.fromkeys(r["case"] for r in sub):
            line = {"case": case}
            p50 = {}
            for r in sub:
                if r["case"] == case:
                    line[r["provider"]] = f"{r['tflops']:.0f} ({r['pct_matmul']:.0f}%)"
                    p50[r["provider"]] = r["p50_ms"]
            for name in ("dlh-triton", "eager-nhwc"):
                if name in p50 and BARE in p50:
                    line[f"{name}/bare"] = f"{p50[name] / p50[BARE]:.2f}x"
            table.append(line)
        columns = {"case": "case", **{p: p for p in names},
                   "dlh-triton/bare": "dlh-triton / cuDNN time", "eager-nhwc/bare": "eager / cuDNN time"}
        header = (f"conv2d {mode}: TFLOP/s (% of the {matmul_tflops:,.0f} TFLOP/s {dtype} matmul); "
                  f"times over the bare cuDNN F.conv2d's (channels_last)")
        blocks.append(header + "\n" + common.format_table(table, columns))
    return "\n\n".join(blocks)
