"""GELU, bias + GELU and GeGLU against their peers, one run.

Providers, side by side on the same inputs:
  dlh-triton     DF.gelu(x, approximate, bias=b, backend="triton") / DF.geglu(x, approximate, ...)
  dlh-cuda       the same with backend="cuda"
  eager          F.gelu(x + b, approximate=...); geglu: a, gate = x.chunk(2, -1); a * F.gelu(gate)
  torch.compile  the eager function, compiled with dynamic=False (one graph per shape)
  liger          Liger-Kernel's GeGLU (LigerGELUMulFunction), geglu only
  copy           device copies moving the same bytes in as many launches: what this GPU can
                 do at this size, the per-shape ceiling beside the 1 GiB copy of the run

The ops are memory-bound: the time floor is the bytes they must move over the copy bandwidth
measured at the start of the run, so every row reports GB/s and % of that ceiling.
Ops (the approximation real models use):
  gelu       exact (erf) GELU, no bias: BERT, ViT, the seed's ViT
  bias_gelu  tanh GELU of x + bias: GPT-2 and Megatron's fused bias-GELU
  geglu      tanh GELU as the gate: T5 v1.1 ("gelu_new"), and the math Liger computes
Sweep: the MLP activations of real models, M tokens x N = 3072, 4096, 11008 (the activation's
width: geglu reads a 2N-wide input), the seed models' small shapes, and outside --quick one
shape past 2^31 elements, where int32 offsets would overflow.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, NamedTuple, Optional, Union

import torch
import torch.nn.functional as F

from . import common
from .common import max_rel_err, time_ms_resetting  # in common now; the names stay here too

# op -> (approximate, has a bias, gated)
OPS = {
    "gelu": ("none", False, False),
    "bias_gelu": ("tanh", True, False),
    "geglu": ("tanh", False, True),
}
PROVIDERS = ("dlh-triton", "dlh-cuda", "eager", "torch.compile", "liger", "copy")
MODES = ("fwd", "fwd+bwd")

# (case, M, N): M rows (tokens); N the width of the activation's output (geglu's input is 2N wide)
SWEEP_M = (4096, 16384, 65536)
SWEEP_N = (3072, 4096, 11008)  # 4 x 768 (BERT-base, GPT-2 small), 4 x 1024 (BERT-large), LLaMA-7B's MLP
SEED = (("vit-seed", 8 * 17, 2048),     # batch 8 x 17 tokens (16 patches + cls), MLP 4 x 512
        ("gpt-seed", 64 * 256, 1536))   # nanoGPT's small config: batch 64 x 256 tokens, MLP 4 x 384
LARGE = ("large", 196608, 11008)        # 2.16e9 > 2^31 elements (geglu's input: 4.3e9)
QUICK = (("mlp", 16384, 11008),  # 360 MB: far past L2, and a width that is no power of two
         SEED[0])               # launch-bound
DEVICE = "cuda"  # where the sweep allocates; a CPU dry run of this file can point it at "cpu"


def shapes(quick: bool) -> list[tuple[str, int, int]]:
    """(case, M, N) points of the sweep."""
    if quick:
        return list(QUICK)
    return [("mlp", m, n) for m in SWEEP_M for n in SWEEP_N] + list(SEED) + [LARGE]


def bytes_moved(op: str, mode: str, M: int, N: int, elem: int) -> int:
    """The fewest bytes the op must move through device memory: each tensor touched once."""
    _, has_bias, gated = OPS[op]
    act = M * N * elem        # one output-sized tensor (y, dy)
    inp = 2 * act if gated else act  # x, dx: geglu's input holds a and gate side by side
    bias = N * elem if has_bias else 0
    # fwd: read x (and the bias), write y. geglu: 2 * numel(y) in + numel(y) out = 1.5 * numel(x)
    fwd = inp + bias + act
    if mode == "fwd":
        return fwd
    # bwd: read dy, read x again (GELU' is recomputed from x, not saved), write dx;
    # bias_gelu also reads the bias again and writes db = the column sums of dx
    bwd = act + inp + inp + 2 * bias
    return fwd + bwd


def kernel_bytes(op: str, mode: str, M: int, N: int, elem: int) -> list[int]:
    """The bytes of each launch of the fewest-launch implementation: one fwd (and one bwd) kernel."""
    fwd = bytes_moved(op, "fwd", M, N, elem)
    return [fwd] if mode == "fwd" else [fwd, bytes_moved(op, "fwd+bwd", M, N, elem) - fwd]


# ---------------------------------------------------------------------------------------------
# Providers

class Provider(NamedTuple):
    fn: Callable              # fn(x, bias) -> y; x (M, N), or (M, 2N) for geglu
    halves: bool = False      # fn(gate, a) on two separate contiguous (M, N) tensors instead
    clobbers: bool = False    # its backward writes the gradients over its inputs


# A provider, or the reason it cannot run.
MaybeProvider = Union[Provider, str]


def eager(op: str) -> Callable:
    approximate, has_bias, gated = OPS[op]
    if gated:
        def geglu(x, b):
            a, gate = x.chunk(2, -1)
            return a * F.gelu(gate, approximate=approximate)
        return geglu
    if has_bias:
        return lambda x, b: F.gelu(x + b, approximate=approximate)
    return lambda x, b: F.gelu(x, approximate=approximate)


def _dlh(op: str, backend: str) -> MaybeProvider:
    DF = common.dlh_functional(backend)
    if isinstance(DF, str):
        return DF
    approximate, _, gated = OPS[op]
    name = "geglu" if gated else "gelu"
    if not hasattr(DF, name):
        return f"dlh_kernels.functional has no {name} yet"
    if gated:
        return Provider(lambda x, b: DF.geglu(x, approximate, backend=backend))
    return Provider(lambda x, b: DF.gelu(x, approximate, bias=b, backend=backend))


def _liger(op: str) -> MaybeProvider:
    if not OPS[op][2]:
        return "Liger-Kernel has no standalone GELU"
    try:
        from liger_kernel.ops.geglu import LigerGELUMulFunction
    except Exception as exc:  # ImportError, or a Liger that breaks on this torch/triton
        return common.not_importable("liger_kernel", exc)
    # Liger computes c = gelu_tanh(a) * b on two separate tensors (in its models, the outputs of
    # two Linear layers), the GELU rounded to b's dtype before the product: our geglu with
    # approximate="tanh" when called as (gate, a), the same rounding as eager bf16. It is handed
    # the two halves of x as contiguous tensors made outside the timed region: through views,
    # its ensure_contiguous would time two extra copies. Its backward writes da, db over a, b
    # (in place, its memory saving), so those halves are restored before every timed call.
    return Provider(lambda gate, a: LigerGELUMulFunction.apply(gate, a), halves=True, clobbers=True)


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
    x: torch.Tensor                  # (M, N), geglu (M, 2N)
    dy: torch.Tensor                 # (M, N)
    halves: Optional[tuple] = None   # geglu: (gate, a) as contiguous copies, for Liger


def make_inputs(op: str, M: int, N: int, dtype: torch.dtype, halves: bool):
    """The bias (shared, or None) and rotating input sets."""
    _, has_bias, gated = OPS[op]
    dev = DEVICE
    b = (0.5 * torch.randn(N, device=dev)).to(dtype) if has_bias else None
    width = 2 * N if gated else N
    set_bytes = (width + N) * M * torch.finfo(dtype).bits // 8 * (2 if halves else 1)
    sets = []
    for _ in range(common.rotation_count(set_bytes)):
        # N(0, 2^2): the GELU's bend around 0 and both of its tails; never zeros
        x = 2 * torch.randn(M, width, device=dev, dtype=dtype)
        h = (x[:, N:].contiguous(), x[:, :N].contiguous()) if halves else None
        sets.append(Inputs(x, torch.randn(M, N, device=dev, dtype=dtype), h))
    return b, sets


def restore_halves(s: Inputs) -> None:
    """Undo Liger's in-place backward: the halves again hold (gate, a) of x."""
    N = s.dy.shape[-1]
    s.halves[0].copy_(s.x[:, N:])
    s.halves[1].copy_(s.x[:, :N])


def forward(p: Provider, s: Inputs, b):
    return p.fn(*s.halves) if p.halves else p.fn(s.x, b)


def timed_call(p: Provider, mode: str, b) -> Callable[[Inputs], object]:
    """fn(inputs) for one timed run: the forward, or forward + backward to every input."""
    if mode == "fwd":
        return lambda s: forward(p, s, b)
    bg = b.detach().requires_grad_() if b is not None else None

    def fwd_bwd(s: Inputs):
        if p.halves:
            leaves = [t.detach().requires_grad_() for t in s.halves]
            y = p.fn(*leaves)
        else:
            xg = s.x.detach().requires_grad_()
            leaves = [t for t in (xg, bg) if t is not None]
            y = p.fn(xg, bg)
        return torch.autograd.grad(y, leaves, s.dy)

    return fwd_bwd


def copy_call(nbytes: list[int]) -> tuple[Callable[[], object], list]:
    """Device copies moving ``nbytes[i]`` bytes in launch i (a copy reads n / 2 and writes n / 2),
    each from its own region of a rotating source, as the op's kernels read their own tensors."""
    return common.copy_launches(nbytes, DEVICE)


# ---------------------------------------------------------------------------------------------
# The run

def run(*, quick: bool = False, dtype: str = "bf16", out: Optional[Path] = None,
        ops: tuple[str, ...] = tuple(OPS)) -> int:
    return common.run_ops(Sweep, ops, providers, shapes, summary, quick=quick, dtype=dtype, out=out)


class Sweep(common.CopySweep):
    """The rows measured so far, the providers skipped and why, and the timing settings."""

    name = "gelu"

    def fits(self, op: str, M: int, N: int) -> Optional[str]:
        """None if the shape's tensors fit in free device memory with room to spare, else why not."""
        # in (M, N) tensors: x, dy, y, dx, eager's output and temporaries; geglu's x and dx count
        # twice, and Liger's copies of the halves come on top
        return common.memory_shortfall((12 if OPS[op][2] else 8) * M * N * self.elem)

    def bench_shape(self, op: str, case: str, M: int, N: int, provs: dict[str, MaybeProvider]) -> None:
        what = f"{op} M={M} N={N}"
        if case == "large" and (why := self.fits(op, M, N)):
            return self.skip(what, why)
        need_halves = any(isinstance(p, Provider) and p.halves for p in provs.values())
        # No torch.no_grad() here: none of these inputs needs a gradient anyway, and a change of
        # grad mode would cost torch.compile one more graph per shape.
        try:
            b, sets = make_inputs(op, M, N, self.torch_dtype, need_halves)
            ref = eager(op)(sets[0].x, b)
        except torch.cuda.OutOfMemoryError as exc:
            return self.skip(what, common.short_error(exc))
        for name, p in common.runnable(provs):
            try:
                err = max_rel_err(forward(p, sets[0], b), ref)
            except Exception as exc:
                self.skip(f"{name} {what}", common.short_error(exc))
                continue
            if not err < 0.05:
                print(f"WARNING: {name} {what}: forward differs from eager by {err:.3g}")
            for mode in MODES:
                call = timed_call(p, mode, b)
                try:
                    if p.clobbers and mode != "fwd":
                        for s in sets[:2]:  # compile / autotune outside the timed region
                            call(s)
                        p50, p20, p80 = time_ms_resetting(call, restore_halves, sets,
                                                          warmup=self.warmup_ms, rep=self.rep_ms)
                        for s in sets:
                            restore_halves(s)
                    else:
                        p50, p20, p80 = self.time_sets(call, [(s,) for s in sets])
                except Exception as exc:
                    self.skip(f"{name} {mode} {what}", common.short_error(exc))
                    continue
                self.add_row(op, name, case, M, N, mode, (p50, p20, p80), err, len(sets))
        del sets, ref, b
        torch.cuda.empty_cache()
        for mode in MODES:
            try:
                call, buffers = copy_call(kernel_bytes(op, mode, M, N, self.elem))
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
        row = {"op": op, "approximate": OPS[op][0], "provider": name, "case": case, "M": M, "N": N,
               "elements": M * N, "dtype": self.dtype, "mode": mode,
               **self.rate(times, bytes_moved(op, mode, M, N, self.elem)),
               "fwd_err_vs_eager": err, "input_sets": n_sets}
        self.rows.append(row)
        print(f"{op:>9} {mode:>7} M={M:<6} N={N:<6} {name:>13}  p50 {row['p50_ms']:8.4f} ms"
              f"  {row['gbps']:7.0f} GB/s  {row['pct_copy']:5.1f}%", flush=True)

    def plot(self, meta: dict, out: Path) -> None:
        common.plot_lines(
            self.rows, out / "gelu.png",
            panel=lambda r: f"{r['op']} ({r['approximate']}) {r['mode']}", series="provider",
            x="elements", y="gbps", xlabel="elements of the output (M * N)", ylabel="GB/s",
            hline=self.copy_gbps, hline_label="copy ceiling (1 GiB)",
            title=self.title(meta))


def summary(rows: list[dict], copy_gbps: float) -> str:
    """GB/s (% of copy) per shape, providers side by side, one block per (op, mode)."""
    return common.gbps_summary(rows, copy_gbps, OPS, MODES, PROVIDERS, label=lambda op: f"{op} ({OPS[op][0]})")
