"""LayerNorm and RMSNorm (and the fused residual-add variants) against their peers, one run.

Providers, side by side on the same inputs:
  dlh-triton     DF.<op>(..., backend="triton")
  dlh-cuda       DF.<op>(..., backend="cuda")
  eager          torch.nn.functional.layer_norm / rms_norm (add variants: x + r first)
  torch.compile  the eager function, compiled with dynamic=False (one graph per shape)
  liger          Liger-Kernel's autograd Functions (no add + LayerNorm; rows up to 65,536 wide)
  apex           Apex's fused_layer_norm_affine / fused_rms_norm_affine, when installed

The ops are memory-bound: the time floor is the bytes they must move over the copy bandwidth
measured at the start of the run, so every row reports GB/s and % of that ceiling.
Sweep: rows of N = 1K .. 256K elements with M*N = 64M (far past L2, the steady state of a big
model), plus the seed U-Net's case: a handful of rows of 131,072 elements, where a kernel that
parallelises only over rows leaves most of the GPU idle.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional, Union

import torch
import torch.nn.functional as F

from . import common

OPS = ("layer_norm", "rms_norm", "add_layer_norm", "add_rms_norm")
PROVIDERS = ("dlh-triton", "dlh-cuda", "eager", "torch.compile", "liger", "apex")
DTYPES = common.DTYPES
MODES = ("fwd", "fwd+bwd")

ELEMENTS = 64 * 2**20  # M * N per sweep point: 128 MiB per bf16 tensor, several times any L2
SWEEP_N = (1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072, 262144)
QUICK_N = (1024, 4096, 65536)
UNET_N, UNET_M, QUICK_UNET_M = 131072, (8, 16, 32), (32,)
LN_EPS, RMS_EPS = 1e-5, 1e-6
DEVICE = "cuda"  # where the sweep allocates; a CPU dry run of this file can point it at "cpu"

# A provider is fn(x, residual, weight, bias) -> output, or (output, x + residual) for add_*;
# or the reason it cannot run.
Provider = Union[Callable, str]


def shapes(quick: bool) -> list[tuple[str, int, int]]:
    """(case, M, N) points of the sweep."""
    sweep = [("sweep", max(8, ELEMENTS // n), n) for n in (QUICK_N if quick else SWEEP_N)]
    unet = [("unet", m, UNET_N) for m in (QUICK_UNET_M if quick else UNET_M)]
    return sweep + unet


def bytes_moved(op: str, mode: str, M: int, N: int, elem: int) -> int:
    """The fewest bytes the op must move through device memory: each tensor touched once."""
    act = M * N * elem        # one activation-sized tensor (x, y, dy, dx, ...)
    param = N * elem          # one weight-sized vector (weight and bias share the input dtype)
    stat = M * 4              # one fp32 statistic per row (mean, rstd)
    layer = op.endswith("layer_norm")
    n_params = 2 if layer else 1        # weight (+ bias)
    n_stats = 2 if layer else 1         # rstd (+ mean)
    n_in = 2 if op.startswith("add_") else 1  # x (+ residual); add_* also writes x + residual
    # fwd: read x (and residual), write y (and the sum), read weight (and bias), write the stats
    fwd = 2 * n_in * act + n_params * param + n_stats * stat
    if mode == "fwd":
        return fwd
    # bwd: read dy, read x again (add_*: the saved sum), read weight and stats, write dx
    # (input and residual share one gradient tensor), write dw (and db)
    bwd = 3 * act + param + n_stats * stat + n_params * param
    return fwd + bwd


# ---------------------------------------------------------------------------------------------
# Providers

def eager(op: str) -> Callable:
    if op == "layer_norm":
        return lambda x, r, w, b: F.layer_norm(x, (x.shape[-1],), w, b, LN_EPS)
    if op == "rms_norm":
        return lambda x, r, w, b: F.rms_norm(x, (x.shape[-1],), w, RMS_EPS)
    norm = eager(op[len("add_"):])

    def add_norm(x, r, w, b):
        s = x + r
        return norm(s, None, w, b), s

    return add_norm


def _dlh(op: str, backend: str) -> Provider:
    DF = common.dlh_functional(backend)
    if isinstance(DF, str):
        return DF
    calls = {
        "layer_norm": lambda x, r, w, b: DF.layer_norm(x, (x.shape[-1],), w, b, LN_EPS, backend=backend),
        "rms_norm": lambda x, r, w, b: DF.rms_norm(x, (x.shape[-1],), w, RMS_EPS, backend=backend),
        "add_layer_norm": lambda x, r, w, b: DF.add_layer_norm(x, r, (x.shape[-1],), w, b, LN_EPS, backend=backend),
        "add_rms_norm": lambda x, r, w, b: DF.add_rms_norm(x, r, (x.shape[-1],), w, RMS_EPS, backend=backend),
    }
    return calls[op]


def _liger(op: str) -> Provider:
    try:
        from liger_kernel.ops import (LigerFusedAddRMSNormFunction, LigerLayerNormFunction,
                                      LigerRMSNormFunction)
    except Exception as exc:  # ImportError, or a Liger that breaks on this torch/triton
        return common.not_importable("liger_kernel", exc)
    # offset 0, casting mode "llama" (fp32 statistics), in_place=False: Liger would otherwise
    # write dx over dy, which neither eager nor dlh does
    if op == "layer_norm":
        return lambda x, r, w, b: LigerLayerNormFunction.apply(x, w, b, LN_EPS)
    if op == "rms_norm":
        return lambda x, r, w, b: LigerRMSNormFunction.apply(x, w, RMS_EPS, 0.0, "llama", False)
    if op == "add_rms_norm":
        return lambda x, r, w, b: LigerFusedAddRMSNormFunction.apply(x, r, w, RMS_EPS, 0.0, "llama", False)
    return "Liger-Kernel has no fused add + LayerNorm"


def _apex(op: str) -> Provider:
    try:
        from apex.normalization.fused_layer_norm import fused_layer_norm_affine, fused_rms_norm_affine
    except Exception as exc:
        return common.not_importable("apex", exc)
    if op == "layer_norm":
        return lambda x, r, w, b: fused_layer_norm_affine(x, w, b, (x.shape[-1],), LN_EPS)
    if op == "rms_norm":
        return lambda x, r, w, b: fused_rms_norm_affine(x, w, (x.shape[-1],), RMS_EPS)
    return "Apex has no fused add + norm in its public API"


def providers(op: str) -> dict[str, Provider]:
    return {
        "dlh-triton": _dlh(op, "triton"),
        "dlh-cuda": _dlh(op, "cuda"),
        "eager": eager(op),
        "torch.compile": common.compiled(eager(op)),
        "liger": _liger(op),
        "apex": _apex(op),
    }


# ---------------------------------------------------------------------------------------------
# Inputs and the timed calls

def _first(out):
    return out[0] if isinstance(out, tuple) else out


def make_inputs(op: str, M: int, N: int, dtype: torch.dtype):
    """Parameters (shared) and rotating activation sets, each as (x, residual, dy)."""
    dev = DEVICE
    w = (1 + 0.1 * torch.randn(N, device=dev)).to(dtype)
    b = (0.1 * torch.randn(N, device=dev)).to(dtype) if op.endswith("layer_norm") else None
    add = op.startswith("add_")
    set_bytes = (3 if add else 2) * M * N * torch.finfo(dtype).bits // 8
    sets = []
    for _ in range(common.rotation_count(set_bytes)):
        x = torch.randn(M, N, device=dev, dtype=dtype)
        r = torch.randn(M, N, device=dev, dtype=dtype) if add else None
        sets.append((x, r, torch.randn(M, N, device=dev, dtype=dtype)))
    return w, b, sets


def timed_call(fn: Callable, mode: str, w, b) -> Callable:
    """fn(x, r, dy) for one timed run: the forward, or forward + backward to every input."""
    if mode == "fwd":
        return lambda x, r, dy: fn(x, r, w, b)
    wg = w.detach().requires_grad_()
    bg = b.detach().requires_grad_() if b is not None else None

    def fwd_bwd(x, r, dy):
        xg = x.detach().requires_grad_()
        rg = r.detach().requires_grad_() if r is not None else None
        leaves = [t for t in (xg, rg, wg, bg) if t is not None]
        y = _first(fn(xg, rg, wg, bg))
        return torch.autograd.grad(y, leaves, dy)

    return fwd_bwd


# ---------------------------------------------------------------------------------------------
# The run

def run(*, quick: bool = False, dtype: str = "bf16", out: Optional[Path] = None,
        ops: tuple[str, ...] = OPS) -> int:
    return common.run_ops(Sweep, ops, providers, shapes, summary, quick=quick, dtype=dtype, out=out)


class Sweep(common.CopySweep):
    """The rows measured so far, the providers skipped and why, and the timing settings."""

    name = "layer_norm"

    def bench_shape(self, op: str, case: str, M: int, N: int, provs: dict[str, Provider]) -> None:
        try:
            w, b, sets = make_inputs(op, M, N, self.torch_dtype)
        except torch.cuda.OutOfMemoryError as exc:
            return self.skip(f"{op} M={M} N={N}", common.short_error(exc))
        # No torch.no_grad() here: none of these inputs needs a gradient anyway, and a change of
        # grad mode would cost torch.compile one more graph per shape.
        x0, r0, _ = sets[0]
        ref = _first(eager(op)(x0, r0, w, b)).float()
        for name, p in common.runnable(provs):
            try:
                y = _first(p(x0, r0, w, b)).float()
                # largest error relative to 1 + |eager|: about one bf16 ulp between correct kernels
                err = ((y - ref).abs() / (1 + ref.abs())).max().item()
                del y
            except Exception as exc:
                self.skip(f"{op} {name} M={M} N={N}", common.short_error(exc))
                continue
            if not err < 0.05:
                print(f"WARNING: {op} {name} M={M} N={N}: forward differs from eager by {err:.3g}")
            for mode in MODES:
                call = timed_call(p, mode, w, b)
                try:
                    times = self.time_sets(call, sets)
                except Exception as exc:
                    self.skip(f"{op} {name} {mode} M={M} N={N}", common.short_error(exc))
                    continue
                row = {"op": op, "provider": name, "case": case, "M": M, "N": N, "dtype": self.dtype,
                       "mode": mode, **self.rate(times, bytes_moved(op, mode, M, N, self.elem)),
                       "fwd_err_vs_eager": err, "input_sets": len(sets)}
                self.rows.append(row)
                print(f"{op:>14} {mode:>7} M={M:<6} N={N:<6} {name:>13}  p50 {row['p50_ms']:8.4f} ms"
                      f"  {row['gbps']:7.0f} GB/s  {row['pct_copy']:5.1f}%", flush=True)
        del sets, ref
        torch.cuda.empty_cache()

    def plot(self, meta: dict, out: Path) -> None:
        common.plot_lines(
            [r for r in self.rows if r["case"] == "sweep"], out / "layer_norm.png",
            panel=lambda r: f"{r['op']} {r['mode']}", series="provider", x="N", y="gbps",
            xlabel=f"N (row length; M*N = {ELEMENTS // 2**20}M)", ylabel="GB/s",
            hline=self.copy_gbps, hline_label="copy ceiling",
            title=self.title(meta))


def summary(rows: list[dict], copy_gbps: float) -> str:
    """GB/s (% of copy) per shape, providers side by side, one block per (op, mode)."""
    return common.gbps_summary(rows, copy_gbps, OPS, MODES, PROVIDERS)
