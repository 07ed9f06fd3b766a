"""Linear + GELU (the MLP up-projection) against its peers and the bare matmul, one run.

Providers, side by side on the same inputs:
  dlh-triton     DF.linear_gelu(x, w, b, approximate, backend="triton"): the GELU in the epilogue
                 of a Triton matmul
  dlh-cuda       DF.linear(x, w, b, activation="gelu" | "gelu_tanh", backend="cuda"): the same
                 epilogue in csrc/linear.cu's tensor-core GEMM (linear_gelu itself has no CUDA
                 kernel; DF.linear's Triton path is dlh-triton's program)
  eager          F.gelu(F.linear(x, w, b)): cuBLAS, then a separate GELU kernel
  torch.compile  the eager function, compiled with dynamic=False (default mode: a cuBLAS matmul
                 and one generated pointwise kernel)
  F.linear       the bare F.linear(x, w, b), no GELU: the cuBLAS matmul we must be within 10% of

The op is compute-bound at the transformer shapes: the time floor is its FLOPs over the matmul
rate measured at the start of the run, so every row reports TFLOP/s and % of that ceiling, and
the summary gives each provider's time over the bare matmul's.
Sweep: transformer MLP up-projections (M tokens x K -> N = 4K), GPT-2 small with its tanh GELU,
and the seed models' small MLPs, where the launch, not the math, is the cost.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional, Union

import torch
import torch.nn.functional as F

from . import common
from .common import max_rel_err

PROVIDERS = ("dlh-triton", "dlh-cuda", "eager", "torch.compile", "F.linear")
BARE = "F.linear"  # not the op's math: no error check, and the reference of the time ratios
MODES = ("fwd", "fwd+bwd")

# (case, M, K, N, approximate): M tokens, K input features, N output features (N = 4K in an MLP)
SWEEP = [("mlp", m, k, 4 * k, "none") for m in (4096, 8192, 16384) for k in (768, 1024, 4096)]
OTHER = [("gpt2-small", 8 * 256, 768, 3072, "tanh"),  # batch 8 x 256 tokens, GPT-2's gelu_new
         ("gpt-seed", 64 * 256, 384, 1536, "none"),   # nanoGPT's small config (nn.GELU, exact)
         ("vit-seed", 8 * 17, 512, 2048, "none")]     # batch 8 x 17 tokens (16 patches + cls)
QUICK = [("mlp", 8192, 4096, 16384, "none"), OTHER[0], OTHER[2]]
DEVICE = "cuda"  # where the sweep allocates; a CPU dry run of this file can point it at "cpu"

# A provider is fn(x, w, b, approximate) -> y, or the reason it cannot run.
Provider = Union[Callable, str]


def shapes(quick: bool) -> list[tuple[str, int, int, int, str]]:
    """(case, M, K, N, approximate) points of the sweep."""
    return list(QUICK) if quick else SWEEP + OTHER


def flops(mode: str, M: int, K: int, N: int) -> int:
    """The useful FLOPs: one multiply-add (2 FLOPs) per (row, output, input) and matmul.

    The GELU and the bias (O(M * N)) are left out: next to 2 * M * N * K they are noise.
    """
    fwd = 2 * M * N * K  # Z = X W^T + b
    if mode == "fwd":
        return fwd
    # bwd: dX = dZ W and dW = dZ^T X, one matmul of 2 * M * N * K each. dlh's backward also
    # recomputes Z (it saves X, not the M x N pre-activation): that third matmul is not counted,
    # so every provider is held to the same useful work and a recompute shows as a lower rate.
    return fwd + 2 * fwd


# ---------------------------------------------------------------------------------------------
# Providers

def eager(x, w, b, approximate):
    return F.gelu(F.linear(x, w, b), approximate=approximate)


def bare_linear(x, w, b, approximate):
    return F.linear(x, w, b)


def _dlh(backend: str) -> Provider:
    DF = common.dlh_functional(backend)
    if isinstance(DF, str):
        return DF
    if not hasattr(DF, "linear_gelu"):
        return "dlh_kernels.functional has no linear_gelu yet"
    # A backend that exists but has no linear_gelu kernel (cuda, at first) raises on the first
    # call, with dlh's reason; bench_shape reports it as a skip.
    return lambda x, w, b, approximate: DF.linear_gelu(x, w, b, approximate, backend=backend)


def _dlh_linear(backend: str) -> Provider:
    DF = common.dlh_functional(backend)
    if isinstance(DF, str):
        return DF
    if not hasattr(DF, "linear"):
        return "dlh_kernels.functional has no linear yet"
    return lambda x, w, b, approximate: DF.linear(
        x, w, b, activation="gelu_tanh" if approximate == "tanh" else "gelu", backend=backend)


def providers() -> dict[str, Provider]:
    return {
        "dlh-triton": _dlh("triton"),
        "dlh-cuda": _dlh_linear("cuda"),
        "eager": eager,
        "torch.compile": common.compiled(eager),  # one graph per (shape, approximate, requires_grad)
        BARE: bare_linear,
    }


# ---------------------------------------------------------------------------------------------
# Inputs, the timed calls and the ceiling

def make_inputs(M: int, K: int, N: int, dtype: torch.dtype) -> list[tuple]:
    """Rotating sets of (x, w, b, dy): weights rotate too, as each layer's are read from DRAM."""
    dev = DEVICE
    set_bytes = (M * K + N * K + N + M * N) * torch.finfo(dtype).bits // 8
    sets = []
    for _ in range(common.rotation_count(set_bytes)):
        x = torch.randn(M, K, device=dev, dtype=dtype)
        w = (torch.randn(N, K, device=dev) / K**0.5).to(dtype)  # Z ~ N(0, 1): both GELU tails
        b = (0.1 * torch.randn(N, device=dev)).to(dtype)
        sets.append((x, w, b, torch.randn(M, N, device=dev, dtype=dtype)))
    return sets


def timed_call(fn: Callable, mode: str, approximate: str) -> Callable:
    """fn(x, w, b, dy) for one timed run: the forward, or forward + backward to x, w and b."""
    if mode == "fwd":
        return lambda x, w, b, dy: fn(x, w, b, approximate)

    def fwd_bwd(x, w, b, dy):
        leaves = [t.detach().requires_grad_() for t in (x, w, b)]
        return torch.autograd.grad(fn(*leaves, approximate), leaves, dy)

    return fwd_bwd


matmul_ceiling = common.matmul_ceiling  # (name, TFLOP/s) in the run's dtype; run_sweep measures it


# ---------------------------------------------------------------------------------------------
# The run

def run(*, quick: bool = False, dtype: str = "bf16", out: Optional[Path] = None) -> int:
    def body(sweep: Sweep, save: Callable[[], None]) -> None:
        provs = sweep.skip_unavailable("linear_gelu", providers())
        for case, M, K, N, approximate in common.smoke(shapes(quick)):
            sweep.bench_shape(case, M, K, N, approximate, provs)
        save()

    return common.run_sweep(lambda ceilings, *timing: Sweep(dtype, ceilings[f"matmul_{dtype}_tflops"], *timing),
                            body, lambda sweep: summary(sweep.rows, sweep.matmul_tflops, dtype),
                            quick=quick, out=out, matmul_dtype=dtype)


class Sweep(common.MatmulSweep):
    """The rows measured so far, the providers skipped and why, and the timing settings."""

    name = "linear_gelu"

    def bench_shape(self, case: str, M: int, K: int, N: int, approximate: str,
                    provs: dict[str, Provider]) -> None:
        what = f"M={M} K={K} N={N} {approximate}"
        # No torch.no_grad() here: none of these inputs needs a gradient anyway, and a change of
        # grad mode would cost torch.compile one more graph per shape.
        try:
            sets = make_inputs(M, K, N, self.torch_dtype)
            x0, w0, b0, _ = sets[0]
            ref = eager(x0, w0, b0, approximate)
        except torch.cuda.OutOfMemoryError as exc:
            return self.skip(what, common.short_error(exc))
        for name, p in common.runnable(provs):
            try:
                y = p(x0, w0, b0, approximate)
                err = None if name == BARE else max_rel_err(y, ref)
                del y
            except Exception as exc:  # a backend that cannot run the call lands here, with its reason
                self.skip(f"linear_gelu {name} {what}", common.short_error(exc))
                continue
            if err is not None and not err < 0.05:
                print(f"WARNING: {name} {what}: forward differs from eager by {err:.3g}")
            for mode in MODES:
                call = timed_call(p, mode, approximate)
                try:
                    times = self.time_sets(call, sets)
                except Exception as exc:
                    self.skip(f"linear_gelu {name} {mode} {what}", common.short_error(exc))
                    continue
                row = {"op": "linear_gelu", "provider": name, "case": case, "M": M, "K": K, "N": N,
                       "approximate": approximate, "dtype": self.dtype, "mode": mode,
                       **self.rate(times, flops(mode, M, K, N)), "fwd_err_vs_eager": err,
                       "input_sets": len(sets)}
                self.rows.append(row)
                print(f"{mode:>7} {what:<30} {name:>13}  p50 {row['p50_ms']:8.4f} ms  {row['tflops']:6.1f} TFLOP/s"
                      f"  {row['pct_matmul']:5.1f}%", flush=True)
        del sets, ref, x0, w0, b0
        torch.cuda.empty_cache()

    def save(self, meta: dict, out: Path) -> None:
        # each row's time over the bare matmul's on the same shape: the "within 10%" target
        self.add_time_ratio(BARE, _key, "time_vs_bare_linear")
        super().save(meta, out)


def _key(r: dict) -> tuple:
    return r["case"], r["M"], r["K"], r["N"], r["approximate"], r["mode"]


def summary(rows: list[dict], matmul_tflops: float, dtype: str = "bf16") -> str:
    """TFLOP/s (% of the matmul ceiling) per shape, providers side by side, one block per mode,
    and the time of dlh-triton and eager over the bare matmul's (target: dlh-triton <= 1.10)."""
    blocks = []
    names = [p for p in PROVIDERS if any(r["provider"] == p for r in rows)]
    for mode in MODES:
        sub = [r for r in rows if r["mode"] == mode]
        if not sub:
            continue
        table = []
        for shape in dict.fromkeys(_key(r)[:5] for r in sub):
            case, M, K, N, approximate = shape
            line = {"case": case, "M": M, "K": K, "N": N, "approximate": approximate}
            p50 = {}
            for r in sub:
                if _key(r)[:5] == shape:
                    line[r["provider"]] = f"{r['tflops']:.0f} ({r['pct_matmul']:.0f}%)"
                    p50[r["provider"]] = r["p50_ms"]
            for name in ("dlh-triton", "eager"):
                if name in p50 and BARE in p50:
                    line[f"{name}/bare"] = f"{p50[name] / p50[BARE]:.2f}x"
            table.append(line)
        columns = {"case": "case", "M": "M", "K": "K", "N": "N", "approximate": "gelu",
                   **{p: p for p in names},
                   "dlh-triton/bare": "dlh-triton / F.linear time", "eager/bare": "eager / F.linear time"}
        header = (f"linear_gelu {mode}: TFLOP/s (% of the {matmul_tflops:,.0f} TFLOP/s {dtype} "
                  f"matmul); times over the bare F.linear's (target: dlh-triton <= 1.10x)")
        blocks.append(header + "\n" + common.format_table(table, columns))
    return "\n\n".join(blocks)
