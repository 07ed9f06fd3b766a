"""GroupNorm (+ fused SiLU) against its peers on the DDPM U-Net's shapes, one run.

Providers, side by side on the same inputs:
  dlh-triton     DF.group_norm(x, 32, w, b, activation=..., backend="triton")
  dlh-cuda       the same with backend="cuda"
  eager          F.group_norm(x, 32, w, b), then F.silu (two kernels, the activation re-read)
  torch.compile  the eager function, compiled with dynamic=False (one graph per shape)
  copy           device copies moving the same bytes in as many launches (1 forward, 2 forward
                 + backward): the per-shape ceiling beside the 1 GiB copy of the run

The op is memory-bound: the time floor is the bytes it must move over the copy bandwidth
measured at the start of the run, so every row reports GB/s and % of that ceiling.
Ops: group_norm_silu (a ResBlock's norm + activation, the hot spot) and group_norm (the
attention block's norm, no activation).
Sweep: GroupNorm(32, C) on (B, C, H, W) with C = 128..512 and H = W = 32..64, the U-Net's
resolutions, at training batch sizes, in NCHW and channels_last; groups of Cg*H*W = 4K..64K
elements. "few" cases have fewer groups than the GPU has SMs (B*G = 32), where a kernel that
parallelises only over groups leaves most of the GPU idle.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional, Union

import torch
import torch.nn.functional as F

from . import common

OPS = {"group_norm_silu": "silu", "group_norm": None}
QUICK_OPS = ("group_norm_silu",)
PROVIDERS = ("dlh-triton", "dlh-cuda", "eager", "torch.compile", "copy")
MODES = ("fwd", "fwd+bwd")
LAYOUTS = ("nchw", "nhwc")
GROUPS = 32
EPS = 1e-5

# (case, B, C, H): square H x H maps
SWEEP = (
    ("unet", 64, 128, 32), ("unet", 32, 256, 32), ("unet", 16, 512, 32),
    ("unet", 32, 128, 64), ("unet", 16, 256, 64), ("unet", 8, 512, 64),
    ("few", 1, 512, 64), ("few", 1, 256, 128),
)
QUICK = (("unet", 32, 256, 32), ("unet", 16, 128, 64), ("few", 1, 512, 64))
DEVICE = "cuda"  # where the sweep allocates; a CPU dry run of this file can point it at "cpu"


def shapes(quick: bool) -> list[tuple[str, int, int, int, str]]:
    """(case, B, C, H, layout) points of the sweep."""
    return [(case, B, C, H, layout) for case, B, C, H in (QUICK if quick else SWEEP) for layout in LAYOUTS]


def bytes_moved(mode: str, B: int, C: int, H: int, elem: int) -> int:
    """The fewest bytes the op must move through device memory: each tensor touched once."""
    act = B * C * H * H * elem   # one activation-sized tensor (x, y, dy, dx)
    params = 2 * C * elem        # weight and bias
    stats = 2 * B * GROUPS * 4   # mean and rstd, fp32
    # fwd: read x, the weight and bias, write y and the statistics
    fwd = 2 * act + params + stats
    if mode == "fwd":
        return fwd
    # bwd: read dy and x again (the SiLU's input is recomputed from x and the statistics, never
    # stored), the weight, bias and statistics; write dx, dw and db
    bwd = 3 * act + params + stats + params
    return fwd + bwd


def launch_bytes(mode: str, B: int, C: int, H: int, elem: int) -> list[int]:
    """Bytes per launch of the fewest-launch implementation: one forward, one backward kernel."""
    fwd = bytes_moved("fwd", B, C, H, elem)
    return [fwd] if mode == "fwd" else [fwd, bytes_moved("fwd+bwd", B, C, H, elem) - fwd]


# ---------------------------------------------------------------------------------------------
# Providers: fn(x, w, b) -> y; or the reason one cannot run (a str).

Provider = Union[Callable, str]


def eager(op: str) -> Callable:
    if OPS[op] == "silu":
        return lambda x, w, b: F.silu(F.group_norm(x, GROUPS, w, b, EPS))
    return lambda x, w, b: F.group_norm(x, GROUPS, w, b, EPS)


def _dlh(op: str, backend: str) -> Provider:
    DF = common.dlh_functional(backend)
    if isinstance(DF, str):
        return DF
    if not hasattr(DF, "group_norm"):
        return "dlh_kernels.functional has no group_norm yet"
    act = OPS[op]
    return lambda x, w, b: DF.group_norm(x, GROUPS, w, b, EPS, activation=act, backend=backend)


def providers(op: str) -> dict[str, Provider]:
    return {
        "dlh-triton": _dlh(op, "triton"),
        "dlh-cuda": _dlh(op, "cuda"),
        "eager": eager(op),
        "torch.compile": common.compiled(eager(op)),
    }


# ---------------------------------------------------------------------------------------------
# Inputs and the timed calls

def make_inputs(B: int, C: int, H: int, layout: str, dtype: torch.dtype):
    """Parameters (shared) and rotating (x, dy) sets in the layout."""
    dev = DEVICE
    w = (1 + 0.1 * torch.randn(C, device=dev)).to(dtype)
    b = (0.1 * torch.randn(C, device=dev)).to(dtype)
    fmt = torch.channels_last if layout == "nhwc" else torch.contiguous_format
    set_bytes = 2 * B * C * H * H * torch.finfo(dtype).bits // 8
    sets = []
    for _ in range(common.rotation_count(set_bytes)):
        x = (2 * torch.randn(B, C, H, H, device=dev) + 0.5).to(dtype).contiguous(memory_format=fmt)
        dy = torch.randn(B, C, H, H, device=dev, dtype=dtype).contiguous(memory_format=fmt)
        sets.append((x, dy))
    return w, b, sets


def timed_call(fn: Callable, mode: str, w, b) -> Callable:
    """fn(x, dy) for one timed run: the forward, or forward + backward to x, w and b."""
    if mode == "fwd":
        return lambda x, dy: fn(x, w, b)
    wg, bg = w.detach().requires_grad_(), b.detach().requires_grad_()

    def fwd_bwd(x, dy):
        xg = x.detach().requires_grad_()
        return torch.autograd.grad(fn(xg, wg, bg), (xg, wg, bg), dy)

    return fwd_bwd


def copy_call(nbytes: list[int]) -> Callable[[], object]:
    """Device copies moving ``nbytes[i]`` bytes in launch i (a copy reads n/2 and writes n/2),
    each from its own region of a rotating source."""
    return common.copy_launches(nbytes, DEVICE)[0]


# ---------------------------------------------------------------------------------------------
# The run

def run(*, quick: bool = False, dtype: str = "bf16", out: Optional[Path] = None,
        ops: Optional[tuple[str, ...]] = None) -> int:
    ops = ops or (QUICK_OPS if quick else tuple(OPS))

    def body(sweep: "Sweep", save: Callable[[], None]) -> None:
        for op in ops:
            provs = sweep.skip_unavailable(op, providers(op))
            for case, B, C, H, layout in common.smoke(shapes(quick)):
                sweep.bench_shape(op, case, B, C, H, layout, provs)
            save()

    return common.run_sweep(lambda ceilings, *timing: Sweep(dtype, ceilings["copy_gbps"], *timing), body,
                            lambda sweep: summary(sweep.rows, sweep.copy_gbps), quick=quick, out=out)


class Sweep(common.CopySweep):
    """The rows measured so far, the providers skipped and why, and the timing settings."""

    name = "group_norm"

    def bench_shape(self, op: str, case: str, B: int, C: int, H: int, layout: str,
                    provs: dict[str, Provider]) -> None:
        what = f"{op} {layout} B={B} C={C} H=W={H}"
        try:
            w, b, sets = make_inputs(B, C, H, layout, self.torch_dtype)
            ref = eager(op)(sets[0][0], w, b)
        except torch.cuda.OutOfMemoryError as exc:
            return self.skip(what, common.short_error(exc))
        # No torch.no_grad() here: none of these inputs needs a gradient anyway, and a change of
        # grad mode would cost torch.compile one more graph per shape.
        for name, p in common.runnable(provs):
            try:
                y = p(sets[0][0], w, b)
                err = common.max_rel_err(y.contiguous(), ref.contiguous())
                same_layout = y.stride() == ref.stride()
                del y
            except Exception as exc:
                self.skip(f"{name} {what}", common.short_error(exc))
                continue
            if not err < 0.05:
                print(f"WARNING: {name} {what}: forward differs from eager by {err:.3g}")
            for mode in MODES:
                try:
                    times = self.time_sets(timed_call(p, mode, w, b), sets)
                except Exception as exc:
                    self.skip(f"{name} {mode} {what}", common.short_error(exc))
                    continue
                self.add_row(op, name, case, B, C, H, layout, mode, times, err, same_layout, len(sets))
        del sets, ref
        torch.cuda.empty_cache()
        for mode in MODES:
            try:
                call = copy_call(launch_bytes(mode, B, C, H, self.elem))
                times = self.time(call)
                del call
            except Exception as exc:
                self.skip(f"copy {mode} {what}", common.short_error(exc))
                continue
            finally:
                torch.cuda.empty_cache()
            self.add_row(op, "copy", case, B, C, H, layout, mode, times, None, None, 0)

    def add_row(self, op, name, case, B, C, H, layout, mode, times, err, same_layout, n_sets) -> None:
        row = {"op": op, "provider": name, "case": case, "layout": layout, "B": B, "C": C, "H": H,
               "W": H, "groups": GROUPS, "group_elems": C // GROUPS * H * H, "dtype": self.dtype,
               "mode": mode, **self.rate(times, bytes_moved(mode, B, C, H, self.elem)),
               "fwd_err_vs_eager": err, "output_layout_as_eager": same_layout, "input_sets": n_sets}
        self.rows.append(row)
        print(f"{op:>15} {mode:>7} {layout} B={B:<3} C={C:<3} H={H:<3} {name:>13}  p50 {row['p50_ms']:8.4f} ms"
              f"  {row['gbps']:7.0f} GB/s  {row['pct_copy']:5.1f}%", flush=True)

    def plot(self, meta: dict, out: Path) -> None:
        common.plot_lines(
            [dict(r, elements=r["B"] * r["C"] * r["H"] * r["W"]) for r in self.rows], out / "group_norm.png",
            panel=lambda r: f"{r['op']} {r['layout']} {r['mode']}", series="provider", x="elements",
            y="gbps", xlabel="elements of x (B * C * H * W)", ylabel="GB/s",
            hline=self.copy_gbps, hline_label="copy ceiling (1 GiB)", title=self.title(meta))


def summary(rows: list[dict], copy_gbps: float) -> str:
    """GB/s (% of copy) per shape, providers side by side, one block per (op, layout, mode)."""
    blocks = []
    names = [p for p in PROVIDERS if any(r["provider"] == p for r in rows)]
    for op in OPS:
        for layout in LAYOUTS:
            for mode in MODES:
                sub = [r for r in rows if (r["op"], r["layout"], r["mode"]) == (op, layout, mode)]
                if not sub:
                    continue
                table = common.side_by_side(sub, ("case", "B", "C", "H"),
                                            lambda r: f"{r['gbps']:.0f} ({r['pct_copy']:.0f}%)")
                header = f"{op} {layout} {mode}: GB/s (% of the {copy_gbps:,.0f} GB/s copy)"
                blocks.append(header + "\n" + common.format_table(
                    table, {"case": "case", "B": "B", "C": "C", "H": "H=W", **{p: p for p in names}}))
    return "\n\n".join(blocks)
