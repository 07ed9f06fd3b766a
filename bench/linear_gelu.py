"""Linear + GELU (the MLP up-projection) against its peers and the bare matmul, one run.

Providers, side by side on the same inputs:
  dlh-triton     DF.linear_gelu(x, w, b, approximate, backend="triton"): the GELU in the epilogue
                 of a Triton matmul
  dlh-cuda       the same with backend="cuda" (skipped, with dlh's reason, while it has none)
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

import time
from pathlib import Path
from typing import Callable, Optional, Union

import torch
import torch.nn.functional as F

from . import common
from .gelu import max_rel_err
from .layer_norm import DTYPES

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
    try:
        import dlh_kernels as dlh
        import dlh_kernels.functional as DF
    except Exception as exc:
        return f"dlh_kernels.functional is not importable ({_short(exc)})"
    status = dlh.backends().get(backend, "unknown backend")
    if status != "available":
        return status
    if not hasattr(DF, "linear_gelu"):
        return "dlh_kernels.functional has no linear_gelu yet"
    # A backend that exists but has no linear_gelu kernel (cuda, at first) raises on the first
    # call, with dlh's reason; bench_shape reports it as a skip.
    return lambda x, w, b, approximate: DF.linear_gelu(x, w, b, approximate, backend=backend)


def _compiled() -> Provider:
    # One graph per (shape, approximate, requires_grad): raise the recompile limit so that dynamo
    # never falls back to eager halfway through the sweep.
    cfg = torch._dynamo.config
    setattr(cfg, "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit", 256)
    return torch.compile(eager, dynamic=False)


def providers() -> dict[str, Provider]:
    return {
        "dlh-triton": _dlh("triton"),
        "dlh-cuda": _dlh("cuda"),
        "eager": eager,
        "torch.compile": _compiled(),
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


def matmul_ceiling(dtype: str, ceilings: dict) -> tuple[str, float]:
    """(name, TFLOP/s) of the large-matmul ceiling in the run's dtype (bf16: the common one)."""
    if dtype == "bf16":
        return "matmul_bf16_tflops", ceilings["matmul_bf16_tflops"]
    size = 8192
    a, b = (torch.randn(size, size, device="cuda", dtype=DTYPES[dtype]) for _ in range(2))
    c = torch.empty_like(a)
    ms = common.time_ms(lambda: torch.matmul(a, b, out=c), warmup=300, rep=300)[0]
    return f"matmul_{dtype}_tflops", 2 * size**3 / (ms * 1e-3) / 1e12


def _short(exc: BaseException) -> str:
    msg = str(exc).strip().splitlines()
    return f"{exc.__class__.__name__}: {msg[0] if msg else ''}"[:160]


# ---------------------------------------------------------------------------------------------
# The run

def run(*, quick: bool = False, dtype: str = "bf16", out: Optional[Path] = None) -> int:
    print("measuring the ceilings (1 GiB device copy, bf16 8192^3 matmul) ...", flush=True)
    ceilings = common.measure_ceilings()
    key, tflops = matmul_ceiling(dtype, ceilings)
    ceilings[key] = tflops
    meta = common.run_metadata(ceilings)
    print(f"{meta['device']}: copy {ceilings['copy_gbps']:,.0f} GB/s (read + write), "
          f"{dtype} matmul {tflops:,.0f} TFLOP/s\n", flush=True)
    out = out or common.default_out_dir()
    sweep = Sweep(dtype, tflops, *((10, 40) if quick else (25, 100)))
    started = time.time()
    try:
        provs = providers()
        for name, p in provs.items():
            if isinstance(p, str):
                sweep.skip(f"linear_gelu {name}", p)
        for case, M, K, N, approximate in shapes(quick):
            sweep.bench_shape(case, M, K, N, approximate, provs)
        sweep.save(meta, out)
    except KeyboardInterrupt:  # `timeout -s INT` in the GPU session: keep what was measured
        print("\ninterrupted: writing the rows measured so far")
        sweep.save(meta, out)
        return 130
    finally:
        print(f"\n{len(sweep.rows)} rows in {time.time() - started:.0f} s"
              + (f"; results in {out}/linear_gelu.*" if sweep.rows else ""))
        print(summary(sweep.rows, sweep.matmul_tflops, dtype))
    return 0


class Sweep:
    """The rows measured so far, the providers skipped and why, and the timing settings."""

    def __init__(self, dtype: str, matmul_tflops: float, warmup_ms: int, rep_ms: int):
        self.dtype, self.torch_dtype = dtype, DTYPES[dtype]
        self.matmul_tflops, self.warmup_ms, self.rep_ms = matmul_tflops, warmup_ms, rep_ms
        self.rows: list[dict] = []
        self.skipped: dict[str, str] = {}

    def skip(self, what: str, why: str) -> None:
        self.skipped[what] = why
        print(f"skip {what}: {why}")

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
            return self.skip(what, _short(exc))
        for name, p in provs.items():
            if isinstance(p, str):
                continue
            try:
                y = p(x0, w0, b0, approximate)
                err = None if name == BARE else max_rel_err(y, ref)
                del y
            except Exception as exc:  # dlh-cuda without a linear_gelu kernel lands here
                self.skip(f"linear_gelu {name} {what}", _short(exc))
                continue
            if err is not None and not err < 0.05:
                print(f"WARNING: {name} {what}: forward differs from eager by {err:.3g}")
            for mode in MODES:
                call = timed_call(p, mode, approximate)
                try:
                    for s in sets[:2]:  # compile / autotune outside the timed region
                        call(*s)
                    p50, p20, p80 = common.time_ms(common.rotating(call, sets),
                                                   warmup=self.warmup_ms, rep=self.rep_ms)
                except Exception as exc:
                    self.skip(f"linear_gelu {name} {mode} {what}", _short(exc))
                    continue
                n = flops(mode, M, K, N)
                tflops = n / (p50 * 1e-3) / 1e12
                row = {"op": "linear_gelu", "provider": name, "case": case, "M": M, "K": K, "N": N,
                       "approximate": approximate, "dtype": self.dtype, "mode": mode,
                       "p50_ms": p50, "p20_ms": p20, "p80_ms": p80, "flops": n, "tflops": tflops,
                       "pct_matmul": 100 * tflops / self.matmul_tflops, "fwd_err_vs_eager": err,
                       "input_sets": len(sets)}
                self.rows.append(row)
                print(f"{mode:>7} {what:<30} {name:>13}  p50 {p50:8.4f} ms  {tflops:6.1f} TFLOP/s"
                      f"  {row['pct_matmul']:5.1f}%", flush=True)
        del sets, ref, x0, w0, b0
        torch.cuda.empty_cache()

    def save(self, meta: dict, out: Path) -> None:
        if not self.rows:
            return
        # each row's time over the bare matmul's on the same shape: the "within 10%" target
        bare = {_key(r): r["p50_ms"] for r in self.rows if r["provider"] == BARE}
        for r in self.rows:
            r["time_vs_bare_linear"] = r["p50_ms"] / bare[_key(r)] if _key(r) in bare else None
        common.write_results(self.rows, meta, out, "linear_gelu", extra={"skipped": self.skipped})
        common.plot_lines(
            self.rows, out / "linear_gelu.png", panel=lambda r: f"linear_gelu {r['mode']}",
            series="provider", x="flops", y="tflops", xlabel="useful FLOPs per call",
            ylabel="TFLOP/s", hline=self.matmul_tflops, hline_label="matmul ceiling (8192^3)",
            title=f"{meta['device']} {self.dtype}, {meta['date_utc']}, git {meta['git_sha']}")


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
