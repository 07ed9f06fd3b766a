"""SiLU, ReLU, LeakyReLU, SwiGLU and gated GELU against their peers, one run.

Providers, side by side on the same inputs:
  dlh-triton     DF.silu(x, backend="triton"), ...; DF.swiglu(x) on the fused (M, 2N) gate_up output
  dlh-cuda       the same with backend="cuda"
  eager          F.silu(x), ...; swiglu: gate, up = x.chunk(2, -1); F.silu(gate) * up
  torch.compile  the eager function, compiled with dynamic=False (one graph per shape)
  liger          Liger-Kernel's SwiGLU (LigerSiLUMulFunction) and GeGLU (LigerGELUMulFunction,
                 tanh form), gated ops only, on the two halves as contiguous tensors
  copy           device copies moving the same bytes in as many launches: what this GPU can
                 do at this size, the per-shape ceiling beside the 1 GiB copy of the run

The ops are memory-bound: the time floor is the bytes they must move over the copy bandwidth
measured at the start of the run, so every row reports GB/s and % of that ceiling.
Ops (what real models use):
  silu        SiLU: the U-Net's and Mamba's activation
  relu        ReLU: ResNet, the seed CNN
  leaky_relu  LeakyReLU(0.2): GAN discriminators
  swiglu      silu(gate) * up: LLaMA, Mistral, Phi-3 (fused gate_up_proj)
  gated_gelu  gelu_tanh(gate) * up: T5 v1.1's gated-gelu MLP
Sweep: M tokens x N = 3072, 4096, 11008 (the activation's output width; the gated ops read a
2N-wide input), the seed models' small shapes, and outside --quick one shape past 2^31 elements.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, NamedTuple, Optional, Union

import torch
import torch.nn.functional as F

from . import common
from .common import max_rel_err, time_ms_resetting
from .gelu import LARGE, QUICK, SWEEP_M, SWEEP_N, SEED  # the same shapes as the GELU family

# op -> gated
OPS = {"silu": False, "relu": False, "leaky_relu": False, "swiglu": True, "gated_gelu": True}
PROVIDERS = ("dlh-triton", "dlh-cuda", "eager", "torch.compile", "liger", "copy")
MODES = ("fwd", "fwd+bwd")
DEVICE = "cuda"  # where the sweep allocates; a CPU dry run of this file can point it at "cpu"


def shapes(quick: bool) -> list[tuple[str, int, int]]:
    """(case, M, N) points of the sweep."""
    if quick:
        return list(QUICK)
    return [("mlp", m, n) for m in SWEEP_M for n in SWEEP_N] + list(SEED) + [LARGE]


def bytes_moved(op: str, mode: str, M: int, N: int, elem: int) -> int:
    """The fewest bytes the op must move through device memory: each tensor touched once."""
    act = M * N * elem               # one output-sized tensor (y, dy)
    inp = 2 * act if OPS[op] else act  # x, dx: the gated ops' input holds gate and up side by side
    fwd = inp + act                  # read x, write y
    if mode == "fwd":
        return fwd
    return fwd + act + inp + inp     # bwd: read dy, read x again (f' recomputed), write dx


def kernel_bytes(op: str, mode: str, M: int, N: int, elem: int) -> list[int]:
    """The bytes of each launch of the fewest-launch implementation: one fwd (and one bwd) kernel."""
    fwd = bytes_moved(op, "fwd", M, N, elem)
    return [fwd] if mode == "fwd" else [fwd, bytes_moved(op, "fwd+bwd", M, N, elem) - fwd]


# ---------------------------------------------------------------------------------------------
# Providers

class Provider(NamedTuple):
    fn: Callable              # fn(x) -> y; x (M, N), or (M, 2N) for the gated ops
    halves: bool = False      # fn(gate, up) on two separate contiguous (M, N) tensors instead
    clobbers: bool = False    # its backward writes the gradients over its inputs


MaybeProvider = Union[Provider, str]


def eager(op: str) -> Callable:
    if op == "swiglu":
        def swiglu(x):
            gate, up = x.chunk(2, -1)
            return F.silu(gate) * up
        return swiglu
    if op == "gated_gelu":
        def gated_gelu(x):
            gate, up = x.chunk(2, -1)
            return F.gelu(gate, approximate="tanh") * up
        return gated_gelu
    return {"silu": F.silu, "relu": F.relu, "leaky_relu": lambda x: F.leaky_relu(x, 0.2)}[op]


def _dlh(op: str, backend: str) -> MaybeProvider:
    DF = common.dlh_functional(backend)
    if isinstance(DF, str):
        return DF
    if not hasattr(DF, op):
        return f"dlh_kernels.functional has no {op} yet"
    if op == "gated_gelu":
        return Provider(lambda x: DF.gated_gelu(x, approximate="tanh", backend=backend))
    if op == "leaky_relu":
        return Provider(lambda x: DF.leaky_relu(x, 0.2, backend=backend))
    fn = getattr(DF, op)
    return Provider(lambda x: fn(x, backend=backend))


def _liger(op: str) -> MaybeProvider:
    if not OPS[op]:
        return "Liger-Kernel has no standalone pointwise activation"
    try:
        if op == "swiglu":
            from liger_kernel.ops.swiglu import LigerSiLUMulFunction as Function
        else:
            from liger_kernel.ops.geglu import LigerGELUMulFunction as Function
    except Exception as exc:  # ImportError, or a Liger that breaks on this torch/triton
        return common.not_importable("liger_kernel", exc)
    # Liger takes the two halves as separate contiguous tensors (made outside the timed region;
    # through views its ensure_contiguous would time two copies) and its backward writes the
    # gradients over them: the halves are restored before every timed fwd+bwd call.
    return Provider(lambda gate, up: Function.apply(gate, up), halves=True, clobbers=True)


def providers(op: str) -> dict[str, MaybeProvider]:
    return {
        "dlh-triton": _dlh(op, "triton"),
        "dlh-cuda": _dlh(op, "cuda"),
        "eager": Provider(eager(op)),
        "torch.compile": common.SMOKE_SKIP if common.SMOKE else Provider(common.compiled(eager(op))),
        "liger": _liger(op),
    }


# ---------------------------------------------------------------------------------------------
# Inputs and the timed calls

class Inputs(NamedTuple):
    x: torch.Tensor                  # (M, N), gated (M, 2N)
    dy: torch.Tensor                 # (M, N)
    halves: Optional[tuple] = None   # gated: (gate, up) as contiguous copies, for Liger


def make_inputs(op: str, M: int, N: int, dtype: torch.dtype, halves: bool) -> list[Inputs]:
    width = 2 * N if OPS[op] else N
    set_bytes = (width + N) * M * torch.finfo(dtype).bits // 8 * (2 if halves else 1)
    sets = []
    for _ in range(common.rotation_count(set_bytes)):
        # N(0, 2^2): the bend around 0 and both tails; never exact zeros
        x = 2 * torch.randn(M, width, device=DEVICE, dtype=dtype)
        h = (x[:, :N].contiguous(), x[:, N:].contiguous()) if halves else None
        sets.append(Inputs(x, torch.randn(M, N, device=DEVICE, dtype=dtype), h))
    return sets


def restore_halves(s: Inputs) -> None:
    """Undo Liger's in-place backward: the halves again hold (gate, up) of x."""
    N = s.dy.shape[-1]
    s.halves[0].copy_(s.x[:, :N])
    s.halves[1].copy_(s.x[:, N:])


def forward(p: Provider, s: Inputs):
    return p.fn(*s.halves) if p.halves else p.fn(s.x)


def timed_call(p: Provider, mode: str) -> Callable[[Inputs], object]:
    """fn(inputs) for one timed run: the forward, or forward + backward to every input."""
    if mode == "fwd":
        return lambda s: forward(p, s)

    def fwd_bwd(s: Inputs):
        leaves = [t.detach().requires_grad_() for t in (s.halves if p.halves else (s.x,))]
        return torch.autograd.grad(p.fn(*leaves), leaves, s.dy)

    return fwd_bwd


# ---------------------------------------------------------------------------------------------
# The run

def run(*, quick: bool = False, dtype: str = "bf16", out: Optional[Path] = None,
        ops: tuple[str, ...] = tuple(OPS)) -> int:
    return common.run_ops(Sweep, ops, providers, shapes, summary, quick=quick, dtype=dtype, out=out)


class Sweep(common.CopySweep):
    name = "activation"

    def fits(self, op: str, M: int, N: int) -> Optional[str]:
        # in (M, N) tensors: x, dy, y, dx, eager's output and temporaries; the gated ops' x and
        # dx count twice, and Liger's copies of the halves come on top
        return common.memory_shortfall((12 if OPS[op] else 8) * M * N * self.elem)

    def bench_shape(self, op: str, case: str, M: int, N: int, provs: dict[str, MaybeProvider]) -> None:
        what = f"{op} M={M} N={N}"
        if case == "large" and (why := self.fits(op, M, N)):
            return self.skip(what, why)
        need_halves = any(isinstance(p, Provider) and p.halves for p in provs.values())
        try:
            sets = make_inputs(op, M, N, self.torch_dtype, need_halves)
            ref = eager(op)(sets[0].x)
        except torch.cuda.OutOfMemoryError as exc:
            return self.skip(what, common.short_error(exc))
        for name, p in common.runnable(provs):
            try:
                err = max_rel_err(forward(p, sets[0]), ref)
            except Exception as exc:
                self.skip(f"{name} {what}", common.short_error(exc))
                continue
            if not err < 0.05:
                print(f"WARNING: {name} {what}: forward differs from eager by {err:.3g}")
            for mode in MODES:
                call = timed_call(p, mode)
                try:
                    if p.clobbers and mode != "fwd":
                        for s in sets[:2]:  # compile / autotune outside the timed region
                            call(s)
                        times = time_ms_resetting(call, restore_halves, sets, warmup=self.warmup_ms,
                                                  rep=self.rep_ms)
                        for s in sets:
                            restore_halves(s)
                    else:
                        times = self.time_sets(call, [(s,) for s in sets])
                except Exception as exc:
                    self.skip(f"{name} {mode} {what}", common.short_error(exc))
                    continue
                self.add_row(op, name, case, M, N, mode, times, err, len(sets))
        del sets, ref
        torch.cuda.empty_cache()
        for mode in MODES:
            try:
                call, buffers = common.copy_launches(kernel_bytes(op, mode, M, N, self.elem), DEVICE)
                call()
                times = self.time(call)
                n_sets = len(buffers) - 1
                del call, buffers
            except Exception as exc:  # out of memory, at the largest shape
                self.skip(f"copy {mode} {what}", common.short_error(exc))
                continue
            finally:
                torch.cuda.empty_cache()
            self.add_row(op, "copy", case, M, N, mode, times, None, n_sets)

    def add_row(self, op, name, case, M, N, mode, times, err, n_sets) -> None:
        row = {"op": op, "provider": name, "case": case, "M": M, "N": N, "elements": M * N,
               "dtype": self.dtype, "mode": mode, **self.rate(times, bytes_moved(op, mode, M, N, self.elem)),
               "fwd_err_vs_eager": err, "input_sets": n_sets}
        self.rows.append(row)
        print(f"{op:>10} {mode:>7} M={M:<6} N={N:<6} {name:>13}  p50 {row['p50_ms']:8.4f} ms"
              f"  {row['gbps']:7.0f} GB/s  {row['pct_copy']:5.1f}%", flush=True)

    def plot(self, meta: dict, out: Path) -> None:
        common.plot_lines(
            self.rows, out / "activation.png", panel=lambda r: f"{r['op']} {r['mode']}", series="provider",
            x="elements", y="gbps", xlabel="elements of the output (M * N)", ylabel="GB/s",
            hline=self.copy_gbps, hline_label="copy ceiling (1 GiB)", title=self.title(meta))


def summary(rows: list[dict], copy_gbps: float) -> str:
    """GB/s (% of copy) per shape, providers side by side, one block per (op, mode)."""
    return common.gbps_summary(rows, copy_gbps, OPS, MODES, PROVIDERS)
