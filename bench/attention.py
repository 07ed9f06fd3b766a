"""Fused attention against SDPA's backends, torch.compile and eager math, one run.

Providers, side by side on the same inputs (B, H, L, D), self-attention (S = L):
  dlh-triton            DF.scaled_dot_product_attention(..., backend="triton")
  dlh-triton-atomic-dq  the same with the atomic-dQ backward (bwd only: the forward is the same)
  dlh-cuda              DF.scaled_dot_product_attention(..., backend="cuda"): csrc/attention.cu,
                        mma.sync m16n8k16 + cp.async (fp16/bf16, head dims 32..256, backward <= 128)
  sdpa-flash            F.scaled_dot_product_attention under sdpa_kernel(FLASH_ATTENTION)
  sdpa-efficient        ... EFFICIENT_ATTENTION (xFormers' memory-efficient kernel)
  sdpa-cudnn            ... CUDNN_ATTENTION
  sdpa-math             ... MATH (eager: the L x S matrix in memory)
  torch.compile         softmax(q k^T * scale (+ causal mask)) v written out, compiled
                        (dynamic=None: a second length makes it one dynamic graph)

Attention is compute-bound: every row reports TFLOP/s from the count below and that as a % of
the bf16 matmul rate measured at the start of the run. Modes: fwd (the forward) and bwd (the
backward alone: the forward runs outside the timed region, the graph is kept).
Sweep: head dims 64 and 128, causal or not, L = 512 .. 16K at 16K tokens per batch (B = 16K / L)
and H = 2048 / D heads (FlashAttention's benchmark shapes); the O(L^2)-memory providers
(sdpa-math, torch.compile) stop at 4K. Plus the seed models' attention: GPT (T = 256, 6 heads of
64, causal, batch 64) and ViT (17 tokens, 8 heads of 32, batch 8), where launch cost dominates.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, Optional, Union

import torch
import torch.nn.functional as F

from . import common

DTYPES = common.DTYPES
PROVIDERS = ("dlh-triton", "dlh-triton-atomic-dq", "dlh-cuda", "sdpa-flash", "sdpa-efficient", "sdpa-cudnn",
             "sdpa-math", "torch.compile")
BWD_ONLY = {"dlh-triton-atomic-dq"}
QUADRATIC = {"sdpa-math", "torch.compile"}   # hold the L x S scores in memory
QUADRATIC_MAX_L = 4096
MODES = ("fwd", "bwd")
TOKENS, MODEL_DIM = 16384, 2048

# (case, B, H, L, D, causal)
SWEEP = [("sweep", TOKENS // L, MODEL_DIM // D, L, D, causal)
         for D in (64, 128) for causal in (False, True) for L in (512, 1024, 2048, 4096, 8192, 16384)]
QUICK = [("sweep", TOKENS // L, MODEL_DIM // D, L, D, causal)
         for D in (64, 128) for causal in (False, True) for L in (1024, 4096)]
SEED = [("gpt-seed", 64, 6, 256, 64, True), ("vit-seed", 8, 8, 17, 32, False)]
DEVICE = "cuda"  # where the sweep allocates; a CPU dry run of this file can point it at "cpu"

# A provider is fn(q, k, v, causal) -> out, or the reason it cannot run.
Provider = Union[Callable, str]


def shapes(quick: bool) -> list[tuple]:
    return (QUICK if quick else SWEEP) + SEED


def flops(mode: str, B: int, H: int, L: int, S: int, D: int, causal: bool) -> float:
    """The count FlashAttention's benchmarks use: 4 * B * H * L * S * D for the forward (Q K^T and
    P V, 2 FLOPs per multiply-add), 2.5x that for the backward (five matmuls of the same size
    where the forward has two), halved for causal (half the scores are masked)."""
    fwd = 4 * B * H * L * S * D / (2 if causal else 1)
    return fwd if mode == "fwd" else 2.5 * fwd


# ---------------------------------------------------------------------------------------------
# Providers

def _dlh(atomic_dq: bool = False, backend: str = "triton") -> Provider:
    DF = common.dlh_functional(backend)
    if isinstance(DF, str):
        return DF

    def run(q, k, v, causal):
        return DF.scaled_dot_product_attention(q, k, v, is_causal=causal, backend=backend)
    return _AtomicDQ(run) if atomic_dq else run


class _AtomicDQ:
    """Runs the backward with DQ_MODE = "atomic" (the forward is the same as dlh-triton's)."""

    def __init__(self, fn):
        self.fn = fn

    def __call__(self, q, k, v, causal):
        return self.fn(q, k, v, causal)

    @staticmethod
    def grad(out, inputs, grad_out):
        from dlh_kernels.triton_kernels import attention as kernels
        old, kernels.DQ_MODE = kernels.DQ_MODE, "atomic"
        try:
            return torch.autograd.grad(out, inputs, grad_out, retain_graph=True)
        finally:
            kernels.DQ_MODE = old


def _sdpa(name: str) -> Provider:
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError as exc:
        return f"torch.nn.attention is not importable ({common.short_error(exc)})"
    backend = getattr(SDPBackend, name, None)
    if backend is None:
        return f"this torch has no SDPBackend.{name}"

    def run(q, k, v, causal):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    return run


def math_attention(q, k, v, causal):
    """Attention written out (what torch.compile gets)."""
    scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.shape[-1]))
    if causal:
        L, S = scores.shape[-2:]
        keep = torch.ones(L, S, dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~keep, float("-inf"))
    return torch.softmax(scores.float(), -1).to(q.dtype) @ v


def _compiled() -> Union[Provider, str]:
    if common.SMOKE:
        return common.SMOKE_SKIP
    cfg = torch._dynamo.config
    setattr(cfg, "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit", 256)
    # the bwd mode replays one backward graph (retain_graph=True): no buffer donation
    functorch_cfg = getattr(getattr(torch, "_functorch", None), "config", None)
    if functorch_cfg is not None and hasattr(functorch_cfg, "donated_buffer"):
        functorch_cfg.donated_buffer = False
    return torch.compile(math_attention)


def providers() -> dict[str, Provider]:
    return {
        "dlh-triton": _dlh(),
        "dlh-triton-atomic-dq": _dlh(atomic_dq=True),
        "dlh-cuda": _dlh(backend="cuda"),
        "sdpa-flash": _sdpa("FLASH_ATTENTION"),
        "sdpa-efficient": _sdpa("EFFICIENT_ATTENTION"),
        "sdpa-cudnn": _sdpa("CUDNN_ATTENTION"),
        "sdpa-math": _sdpa("MATH"),
        "torch.compile": _compiled(),
    }


# ---------------------------------------------------------------------------------------------
# Timed calls

def timed_call(name: str, fn: Callable, mode: str, q, k, v, causal: bool, grad_out) -> Callable:
    """The thing one timing repeats: the forward, or the backward of one kept forward graph."""
    if mode == "fwd":
        return lambda: fn(q, k, v, causal)
    qg, kg, vg = (t.detach().requires_grad_() for t in (q, k, v))
    out = fn(qg, kg, vg, causal)
    if isinstance(fn, _AtomicDQ):
        return lambda: fn.grad(out, (qg, kg, vg), grad_out)
    return lambda: torch.autograd.grad(out, (qg, kg, vg), grad_out, retain_graph=True)


max_rel_err = common.max_rel_err  # largest |y - ref| / (1 + |ref|): about one bf16 ulp


# ---------------------------------------------------------------------------------------------
# The run

def run(*, quick: bool = False, dtype: str = "bf16", out: Optional[Path] = None) -> int:
    def body(sweep: Sweep, save: Callable[[], None]) -> None:
        provs = providers()
        for name, p in provs.items():
            if isinstance(p, str):
                sweep.skip(name, p)
        for shape in common.smoke(shapes(quick)):
            sweep.bench_shape(*shape, provs)
        save()

    return common.run_sweep(lambda ceilings, *timing: Sweep(dtype, ceilings["matmul_bf16_tflops"], *timing),
                            body, lambda sweep: summary(sweep.rows, sweep.matmul_tflops), quick=quick, out=out)


class Sweep(common.MatmulSweep):
    """The rows measured so far, the providers skipped and why, and the timing settings."""

    name = "attention"

    def bench_shape(self, case: str, B: int, H: int, L: int, D: int, causal: bool,
                    provs: dict[str, Provider]) -> None:
        where = f"{case} B={B} H={H} L={L} D={D}{' causal' if causal else ''}"
        try:
            q, k, v, grad_out = (torch.randn(B, H, L, D, device=DEVICE, dtype=self.torch_dtype)
                                 for _ in range(4))
        except torch.cuda.OutOfMemoryError as exc:
            return self.skip(where, common.short_error(exc))
        ref = None
        for name, p in common.runnable(provs):
            if name in QUADRATIC and L > QUADRATIC_MAX_L:
                self.skipped[f"{name} {where}"] = f"O(L^2) memory: skipped beyond L = {QUADRATIC_MAX_L}"
                continue
            try:
                y = p(q, k, v, causal)
                if ref is None:
                    ref = y.detach()
                err = max_rel_err(y, ref)
                del y
            except Exception as exc:  # unsupported shape/dtype for that backend, OOM, ...
                self.skip(f"{name} {where}", common.short_error(exc))
                torch.cuda.empty_cache()
                continue
            if not err < 0.05:
                print(f"WARNING: {name} {where}: forward differs from the first provider by {err:.3g}")
            for mode in MODES:
                if mode == "fwd" and name in BWD_ONLY:
                    continue
                try:
                    call = timed_call(name, p, mode, q, k, v, causal, grad_out)
                    call()  # compile / autotune outside the timed region
                    times = self.time(call)
                    del call
                except Exception as exc:
                    self.skip(f"{name} {mode} {where}", common.short_error(exc))
                    torch.cuda.empty_cache()
                    continue
                row = {"provider": name, "case": case, "mode": mode, "B": B, "H": H, "L": L,
                       "D": D, "causal": causal, "dtype": self.dtype,
                       **self.rate(times, flops(mode, B, H, L, L, D, causal)), "fwd_err_vs_first": err}
                self.rows.append(row)
                print(f"{where:>34} {mode:>3} {name:>20}  p50 {row['p50_ms']:8.4f} ms  {row['tflops']:7.1f} TFLOP/s"
                      f"  {row['pct_matmul']:5.1f}%", flush=True)
        del q, k, v, grad_out, ref
        torch.cuda.empty_cache()

    def plot(self, meta: dict, out: Path) -> None:
        common.plot_lines(
            [r for r in self.rows if r["case"] == "sweep"], out / "attention.png",
            panel=lambda r: f"hd {r['D']} {'causal' if r['causal'] else 'full'} {r['mode']}",
            series="provider", x="L", y="tflops", xlabel="sequence length (B * L = 16K tokens)",
            ylabel="TFLOP/s", hline=self.matmul_tflops, hline_label="bf16 matmul ceiling",
            title=self.title(meta))


def summary(rows: list[dict], matmul_tflops: float) -> str:
    """TFLOP/s (% of the matmul ceiling) per shape, providers side by side, per (mode, D, causal)."""
    blocks = []
    names = [p for p in PROVIDERS if any(r["provider"] == p for r in rows)]
    keys = dict.fromkeys((r["mode"], r["D"], r["causal"]) for r in rows)
    for mode, D, causal in keys:
        sub = [r for r in rows if (r["mode"], r["D"], r["causal"]) == (mode, D, causal)]
        table = common.side_by_side(sub, ("case", "B", "H", "L"),
                                    lambda r: f"{r['tflops']:.0f} ({r['pct_matmul']:.0f}%)")
        header = (f"{mode} hd {D} {'causal' if causal else 'full'}: TFLOP/s "
                  f"(% of the {matmul_tflops:,.0f} TFLOP/s bf16 matmul)")
        blocks.append(header + "\n" + common.format_table(
            table, {"case": "case", "B": "B", "H": "H", "L": "L", **{p: p for p in names}}))
    return "\n\n".join(blocks)
