"""A performance model of every dlh kernel family on an H200, to check against the first GPU run.

    python -m dlh_kernels.bench.perf_model [--out DIR]             write perf_model.md / .json
    python -m dlh_kernels.bench.perf_model --compare RESULTS.json   measured / predicted per row
                                                                    (a file or a results folder)

For every shape the quick benchmarks time (`dlh bench --quick`: the QUICK lists of bench/*.py,
used here by import, so the two cannot drift apart) and for each mode they time, the call is
written out as the launches the Triton backend makes for it, each with

    bytes  what that launch must move through DRAM at least: each of its inputs read once, each
           of its outputs written once. Summed over the launches, this counts what the design
           re-reads on purpose (a backward re-reads x; FlashAttention-2's backward re-reads
           Q, K, V, dO in both its dK/dV and its dQ kernels; a split norm's second pass re-reads
           its chunk), but not what a kernel re-reads by accident (tiles re-fetched from L2).
           A re-read of a set the previous launch just touched counts as DRAM only when the set
           is larger than half the L2 (L2_BYTES); smaller ones come back from L2.
    flops  what that launch computes: 2 M N K per matmul (tensor cores, dense bf16), the
           recompute included (attention's backward does 14 B H L S D, not the 10 of the
           "2.5x the forward" count; linear/conv recompute z in their GRAD epilogue); elementwise
           work at a per-element count written next to each op (fp32 CUDA cores).

and the predicted time is, per launch, max(bytes / copy bandwidth, flops / peak rate), summed,
plus LAUNCH_US per launch. That is a floor, not a forecast: a kernel at 80-90% of it is good,
one at 30% has a bug or a bad tile. Next to each row: the static figures of the Triton kernels
that shape runs, from bench/results/triton_resources_3.6.json (sm_90): registers, stack and
spill stores, shared memory, CTAs per SM (from registers x threads against the 64K-register
file and shared memory against 228 KB per SM), software pipelining. Where the tile is
autotuned (it is known only after a GPU run), the range over the configs the early prune keeps.

`compare(path)` reads what bench/common.py `write_results` wrote (``{"meta", "rows"}``, one
file per benchmark) and prints measured p50 / predicted for every row it has a prediction for,
every provider (the `copy` rows check the bandwidth model itself).
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import sys
from pathlib import Path
from typing import Iterable, NamedTuple, Optional
from unittest import mock

HERE = Path(__file__).resolve().parent
RESOURCES = HERE / "results" / "triton_resources_3.6.json"
COMMAND = "python -m dlh_kernels.bench.perf_model --out bench/results/"

# ---------------------------------------------------------------------------------------------
# The device: NVIDIA H200 SXM (sm_90). Measured figures from /work/.library/device/KINDS.md
# (this workplace's H200s, 2026-10-28 and 2026-11-04), datasheet figures where nothing was
# measured.

DEVICE = "NVIDIA H200 (sm_90, 132 SMs)"
SMS = 132
COPY_GBPS = 4300.0        # measured: device-to-device copy, read + write (8.6 GB in 2.0 ms)
BF16_TFLOPS = 790.0       # measured: 8192^3 bf16 matmul on random data, 769-798 (788 on gVisor)
FP16_TFLOPS = 790.0       # the same tensor cores; not measured separately
TF32_TFLOPS = 395.0       # half the bf16 rate (datasheet ratio); not measured
FP32_TFLOPS = 60.0        # CUDA-core fp32; datasheet 67, not measured
LAUNCH_US = 3.0           # per launch, back to back (TARGETS.md: ~3-5 us, bench/diffusion.py: ~2-4)
L2_BYTES = 60 * 2**20     # PyTorch reported 60 MB of L2 on these machines
REGS_PER_SM = 65536
SHARED_PER_SM = 228 * 1024   # 233,472 B; each resident CTA also reserves 1 KB
SHARED_RESERVED = 1024
MAX_CTAS_PER_SM = 32
MAX_WARPS_PER_SM = 64

CEILINGS = {
    "copy_gbps": (COPY_GBPS, "measured (KINDS.md: 1 GiB-scale copy, read + write, 2026-10-28 and 11-04)"),
    "bf16_tflops": (BF16_TFLOPS, "measured (KINDS.md: 8192^3 bf16 matmul, random data, 769-798)"),
    "fp16_tflops": (FP16_TFLOPS, "assumed = bf16 (same tensor cores)"),
    "tf32_tflops": (TF32_TFLOPS, "assumed = bf16 / 2 (datasheet ratio)"),
    "fp32_tflops": (FP32_TFLOPS, "CUDA cores, elementwise math; datasheet 67, taken as ~60"),
    "launch_us": (LAUNCH_US, "assumed per launch (TARGETS.md ~3-5 us; not measured here)"),
    "l2_bytes": (L2_BYTES, "PyTorch's L2_cache_size on these machines (KINDS.md)"),
}

DTYPE = "bf16"
ELEM = 2      # bytes per bf16 element
F32 = 4


# ---------------------------------------------------------------------------------------------
# Launches and calls

class Launch(NamedTuple):
    """One kernel launch: the bytes it must move, what it computes, and the Triton kernel (with
    the filters that find its rows in the resource report; None for torch / cuBLAS launches)."""
    name: str
    bytes: float
    flops: float = 0.0
    rate: str = "fp32"                 # "bf16" (tensor cores) or "fp32" (CUDA cores)
    kernel: Optional[str] = None       # Triton kernel name in the resource report
    source: Optional[str] = None       # "fixed" or "autotune"
    filters: tuple = ()                # tried in order; see _matching_rows
    tile: str = ""                     # the tile the glue's plan picks, shown where it differs


def _rate(rate: str) -> float:
    return {"bf16": BF16_TFLOPS, "fp16": FP16_TFLOPS, "tf32": TF32_TFLOPS, "fp32": FP32_TFLOPS}[rate] * 1e12


def launch_us(launch: Launch) -> float:
    """max(bytes / bandwidth, flops / peak) for one launch, in us (no launch floor)."""
    return max(launch.bytes / (COPY_GBPS * 1e9), launch.flops / _rate(launch.rate)) * 1e6


def predict_us(launches: Iterable[Launch]) -> float:
    """The call's floor: each launch at its ceiling, one after the other, plus LAUNCH_US each."""
    launches = list(launches)
    return sum(launch_us(x) for x in launches) + LAUNCH_US * len(launches)


def bound(launches: list[Launch]) -> str:
    """What the prediction is made of: memory, compute or launch (the largest share)."""
    mem = sum(x.bytes / (COPY_GBPS * 1e9) * 1e6 for x in launches
              if x.bytes / (COPY_GBPS * 1e9) >= x.flops / _rate(x.rate))
    comp = sum(launch_us(x) for x in launches) - mem
    parts = {"memory": mem, "compute": comp, "launch": LAUNCH_US * len(launches)}
    return max(parts, key=parts.get)


def _reread(nbytes: float) -> float:
    """DRAM bytes of re-reading a set the previous launch just touched: none when it fits in
    half the L2 (it comes back from L2), all of it otherwise."""
    return 0.0 if nbytes <= L2_BYTES / 2 else nbytes


# ---------------------------------------------------------------------------------------------
# Per-element FLOP counts of the elementwise ops (fp32, on CUDA cores). Transcendentals count as
# the few FLOPs of their fast forms (exp2/tanh ~ 4, erf ~ 10 as a polynomial); all of these ops
# are memory-bound by one to two orders of magnitude, so these only need to be honest, not exact.

FLOPS_PER_ELEM = {
    "gelu_fwd": 16, "gelu_bwd": 24,          # exact: 0.5 x (1 + erf(x / sqrt 2)); bwd + the pdf
    "gelu_tanh_fwd": 14, "gelu_tanh_bwd": 22,
    "silu_fwd": 6, "silu_bwd": 9,            # x * sigmoid(x); s (1 + x (1 - s))
    "relu_fwd": 1, "relu_bwd": 1,
    "leaky_relu_fwd": 2, "leaky_relu_bwd": 2,
    "rotary": 3,                             # x1 cos - x2 sin: 2 mul + 1 add per rotated element
    "ln_fwd": 8, "ln_bwd": 13,               # mean, var, normalise, w, b; g, two sums, dx, dw, db
    "rms_fwd": 5, "rms_bwd": 10,
    "add": 1,
    "diffusion": 12, "philox_gauss": 25,     # the step's ~6 fused multiply-adds; in-kernel noise
}


# ---------------------------------------------------------------------------------------------
# Rows of the model

class Row(NamedTuple):
    family: str           # the benchmark (results file stem) the row's measurements come from
    op: str
    case: str
    shape: str
    mode: str
    key: dict             # the benchmark row's fields that identify it (see compare)
    counted: str          # what the bytes count, in words
    launches: list
    useful_flops: float   # the benchmark's own FLOP count where it has one (else = executed)

    def as_dict(self) -> dict:
        ls = self.launches
        return {
            "family": self.family, "op": self.op, "case": self.case, "shape": self.shape,
            "mode": self.mode, "dtype": DTYPE, "key": self.key, "counted": self.counted,
            "launches": len(ls), "bytes": sum(x.bytes for x in ls),
            "flops_executed": sum(x.flops for x in ls), "flops_useful": self.useful_flops,
            "bound": bound(ls), "predicted_us": round(predict_us(ls), 3),
            "per_launch": [{"name": x.name, "bytes": x.bytes, "flops": x.flops, "rate": x.rate,
                            "us": round(launch_us(x), 3), "kernel": x.kernel} for x in ls],
            "kernels": [k for k in (kernel_figures(x) for x in ls) if k],
        }


def _row(family, op, case, shape, mode, key, counted, launches, useful=None) -> Row:
    flops = sum(x.flops for x in launches)
    return Row(family, op, case, shape, mode, key, counted, list(launches),
               flops if useful is None else useful)


def _modes(fwd: list[Launch], bwd: list[Launch], names=("fwd", "fwd+bwd")) -> dict:
    """The launches of each benchmark mode: the forward, and forward + backward."""
    return {names[0]: fwd, names[1]: fwd + bwd}


# ---- LayerNorm / RMSNorm / add_* (bench/layer_norm.py) ------------------------------------------

def _norm_plan(M: int, N: int):
    from dlh_kernels.triton_kernels import layer_norm as kernels
    with mock.patch.object(kernels, "_programs_wanted", lambda device: 4 * SMS):
        return kernels._plan.__wrapped__(M, N, "cuda")


def norm_launches(op: str, M: int, N: int) -> dict:
    """fwd and fwd+bwd launches of one norm call, as triton_kernels/layer_norm.py makes them."""
    layer, add = op.endswith("layer_norm"), op.startswith("add_")
    act, vec, stat = M * N * ELEM, N * ELEM, M * F32
    n_stats = 2 if layer else 1                      # mean + rstd, or rstd
    n_par = 2 if layer else 1                        # weight (+ bias)
    fl = FLOPS_PER_ELEM["ln_fwd" if layer else "rms_fwd"] + (FLOPS_PER_ELEM["add"] if add else 0)
    flb = FLOPS_PER_ELEM["ln_bwd" if layer else "rms_bwd"]
    plan = _norm_plan(M, N)
    meta = {"meta.RMS": not layer, "meta.HAS_RES": add}
    bmeta = {"meta.RMS": not layer, "meta.HAS_DH": False}
    cfg = {"cfg.BLOCK_M": plan.block_m, "cfg.BLOCK_N": plan.block_n}
    tile = _tile_text(cfg, plan.num_warps)
    fwd: list[Launch] = []
    bwd: list[Launch] = []
    if not plan.split:
        # read x (+ r), w (+ b); write y (+ h), the row statistics
        fwd.append(Launch("norm_fwd", (2 if add else 1) * act + n_par * vec + (act if add else 0) + act
                          + n_stats * stat, fl * M * N, kernel="norm_fwd_kernel", source="fixed",
                          filters=({**meta, **cfg, "meta.HAS_W": True}, {**meta, **cfg}, meta), tile=tile))
        # read dy, h (x), w, the statistics; write dx and the fp32 dw (db) partials per row group
        part = plan.groups * N * F32
        bwd.append(Launch("norm_bwd", 3 * act + vec + n_stats * stat + n_par * part, flb * M * N,
                          kernel="norm_bwd_kernel", source="fixed",
                          filters=({**bmeta, **cfg, "meta.SPLIT": False, "meta.HAS_W": True},
                                   {**bmeta, "meta.SPLIT": False}, {"meta.RMS": not layer}), tile=tile))
    else:
        partial = M * plan.n_chunks * 2 * F32
        # pass 1: read x (+ r), write h (add_*) and per-chunk (mean, M2); pass 2 re-reads h (x)
        fwd.append(Launch("norm_fwd_partial", (2 if add else 1) * act + (act if add else 0) + partial,
                          (3 + (1 if add else 0)) * M * N, kernel="norm_fwd_partial_kernel", source="fixed",
                          filters=(meta, {"meta.RMS": not layer})))
        fwd.append(Launch("norm_fwd_apply", _reread(act) + partial + n_par * vec + act + n_stats * stat,
                          (fl - 3) * M * N, kernel="norm_fwd_apply_kernel", source="fixed",
                          filters=({"meta.RMS": not layer, "meta.HAS_W": True}, {"meta.RMS": not layer})))
        part = plan.groups * N * F32
        bwd.append(Launch("norm_bwd_partial", 2 * act + vec + n_stats * stat + partial, 5 * M * N,
                          kernel="norm_bwd_partial_kernel", source="fixed",
                          filters=({"meta.RMS": not layer, "meta.HAS_W": True}, {"meta.RMS": not layer})))
        bwd.append(Launch("norm_bwd", _reread(2 * act) + act + vec + n_stats * stat + partial + n_par * part,
                          (flb - 5) * M * N, kernel="norm_bwd_kernel", source="fixed",
                          filters=({**bmeta, "meta.SPLIT": True, "meta.HAS_W": True},
                                   {**bmeta, "meta.SPLIT": True}, {"meta.RMS": not layer})))
    for p in ("dw", "db")[:n_par]:  # torch: partials.sum(0) in fp32, then .to(weight dtype)
        bwd.append(Launch(f"{p} sum (torch)", plan.groups * N * F32 + N * F32, plan.groups * N))
        bwd.append(Launch(f"{p} cast (torch)", N * F32 + vec))
    return _modes(fwd, bwd)


def norm_rows() -> list[Row]:
    from . import layer_norm as bench
    rows = []
    for op in bench.OPS:
        layer, add = op.endswith("layer_norm"), op.startswith("add_")
        ins = "x, r" if add else "x"
        outs = "y, h" if add else "y"
        stats = "mean, rstd" if layer else "rstd"
        pars = "w, b" if layer else "w"
        counted = {"fwd": f"read {ins}, {pars}; write {outs}, {stats} (split N: + the chunk re-read)",
                   "fwd+bwd": f"fwd + read dy, {'h' if add else 'x'}, {pars[:1]}, {stats}; write dx, "
                              f"fp32 d{pars.replace(', ', '/d')} partials; torch sums + casts them"}
        rows += _row_grid("layer_norm", op, bench.shapes(quick=True), norm_launches, counted)
    return rows


def _row_grid(family: str, op: str, shapes, launches_of, counted: dict) -> list:
    """The rows of an (M, N)-shaped op over a benchmark's (case, M, N) shapes, one per mode."""
    return [_row(family, op, case, f"{M}x{N}", mode, {"op": op, "case": case, "M": M, "N": N, "mode": mode},
                 counted[mode], launches)
            for case, M, N in shapes for mode, launches in launches_of(op, M, N).items()]


# ---- GELU, bias-GELU, GeGLU (bench/gelu.py) ---------------------------------------------------

def _elementwise_tile(module: str, M: int, N: int) -> dict:
    """The (BLOCK_M, BLOCK_N) the glue of triton_kernels/<module>.py picks for an (M, N) call."""
    import importlib
    kernels = importlib.import_module(f"dlh_kernels.triton_kernels.{module}")
    t = kernels._tiles.__wrapped__(M, N)
    return {"cfg.BLOCK_M": t.block_m, "cfg.BLOCK_N": t.block_n}


def _tile_text(filters: dict, num_warps: Optional[int] = None) -> str:
    """'4x1024 w8' from a tile filter ({"cfg.BLOCK_M": 4, "cfg.BLOCK_N": 1024})."""
    dims = "x".join(str(v) for k, v in filters.items() if k.startswith("cfg."))
    return dims + (f" w{num_warps}" if num_warps else "")


def gelu_launches(op: str, M: int, N: int) -> dict:
    from . import gelu as bench
    approximate, has_bias, gated = bench.OPS[op]
    form = "gelu_tanh" if approximate == "tanh" else "gelu"
    act = M * N * ELEM
    inp = 2 * act if gated else act
    bias = N * ELEM if has_bias else 0
    ff, fb = FLOPS_PER_ELEM[f"{form}_fwd"] + gated, FLOPS_PER_ELEM[f"{form}_bwd"] + 2 * gated
    tile = _elementwise_tile("gelu", M, N)
    if gated:
        filt = ({**tile, "meta.TANH": approximate == "tanh"}, {"meta.TANH": approximate == "tanh"}, {})
        fwd = [Launch("geglu_fwd", inp + act, ff * M * N, kernel="geglu_fwd_kernel", source="fixed", filters=filt,
                      tile=_tile_text(tile))]
        bwd = [Launch("geglu_bwd", act + inp + inp, fb * M * N, kernel="geglu_bwd_kernel", source="fixed",
                      filters=filt, tile=_tile_text(tile))]
        return _modes(fwd, bwd)
    layout = "bias" if has_bias else "plain"
    ftf = ({**tile, "case~": layout, "meta.HAS_BIAS": has_bias, "meta.TANH": approximate == "tanh"},
           {"case~": layout, "meta.HAS_BIAS": has_bias}, {"meta.HAS_BIAS": has_bias})
    fwd = [Launch("gelu_fwd", inp + bias + act, (ff + has_bias) * M * N, kernel="gelu_fwd_kernel",
                  source="fixed", filters=ftf + ({},), tile=_tile_text(tile))]
    groups = 4 * SMS
    part = groups * N * F32 if has_bias else 0
    bwd = [Launch("gelu_bwd", act + inp + bias + inp + part, (fb + has_bias) * M * N, kernel="gelu_bwd_kernel",
                  source="fixed", filters=({**tile, "case~": layout, "meta.BIAS_GRAD": has_bias,
                                            "meta.TANH": approximate == "tanh"},
                                           {"case~": layout, "meta.BIAS_GRAD": has_bias}, {"meta.BIAS_GRAD": has_bias}),
                  tile=_tile_text(tile))]
    if has_bias:  # torch: db_part.sum(0), then .to(bias dtype)
        bwd += [Launch("db sum (torch)", part + N * F32, groups * N), Launch("db cast (torch)", N * F32 + bias)]
    return _modes(fwd, bwd)


def gelu_rows() -> list[Row]:
    from . import gelu as bench
    rows = []
    for op, (approximate, has_bias, gated) in bench.OPS.items():
        x = "x (2N wide)" if gated else "x"
        counted = {"fwd": f"read {x}{', bias' if has_bias else ''}; write y",
                   "fwd+bwd": f"fwd + read dy, {x} again (GELU' recomputed); write dx"
                              + ("; fp32 db partials, torch sum + cast" if has_bias else "")}
        rows += _row_grid("gelu", op, bench.shapes(quick=True), gelu_launches, counted)
    return rows


# ---- SiLU, ReLU, LeakyReLU, SwiGLU, gated GELU (bench/activation.py) ---------------------------

def activation_launches(op: str, M: int, N: int) -> dict:
    from . import activation as bench
    gated = bench.OPS[op]
    act = M * N * ELEM
    inp = 2 * act if gated else act
    tile = _elementwise_tile("activation", M, N)
    if gated:
        base = "silu" if op == "swiglu" else "gelu_tanh"   # the bench's gated_gelu is the tanh form
        ff, fb = FLOPS_PER_ELEM[f"{base}_fwd"] + 1, FLOPS_PER_ELEM[f"{base}_bwd"] + 2
        # the bench hands in one (M, 2N) tensor: the "fused halves" variant
        filt = ({**tile, "case~": "fused halves", "meta.ACT": 0 if op == "swiglu" else 2},
                {"case~": "fused halves", "meta.ACT": 0 if op == "swiglu" else 1}, {"case~": "fused halves"})
        fwd = [Launch("gated_fwd", inp + act, ff * M * N, kernel="gated_fwd_kernel", source="fixed", filters=filt,
                      tile=_tile_text(tile))]
        bwd = [Launch("gated_bwd", act + inp + inp, fb * M * N, kernel="gated_bwd_kernel", source="fixed",
                      filters=filt, tile=_tile_text(tile))]
        return _modes(fwd, bwd)
    code = {"silu": 0, "relu": 1, "leaky_relu": 2}[op]
    filt = ({**tile, "case~": "dense", "meta.ACT": code}, {"case~": "dense", "meta.ACT": code}, {"meta.ACT": code})
    fwd = [Launch("activation_fwd", inp + act, FLOPS_PER_ELEM[f"{op}_fwd"] * M * N, kernel="activation_fwd_kernel",
                  source="fixed", filters=filt, tile=_tile_text(tile))]
    bwd = [Launch("activation_bwd", act + inp + inp, FLOPS_PER_ELEM[f"{op}_bwd"] * M * N,
                  kernel="activation_bwd_kernel", source="fixed", filters=filt, tile=_tile_text(tile))]
    return _modes(fwd, bwd)


def activation_rows() -> list[Row]:
    from . import activation as bench
    rows = []
    for op, gated in bench.OPS.items():
        x = "x = [gate | up] (2N wide)" if gated else "x"
        counted = {"fwd": f"read {x}; write y", "fwd+bwd": f"fwd + read dy, {x} again; write dx"}
        rows += _row_grid("activation", op, bench.shapes(quick=True), activation_launches, counted)
    return rows


# ---- linear_gelu and linear (bench/linear_gelu.py, bench/workloads.py) ---------------------------

def matmul_epilogue_launches(kernel: str, M: int, K: int, N: int, filters_fwd: tuple, filters_grad: tuple,
                             has_bias: bool = True) -> dict:
    """A linear with its activation in the epilogue: forward one Triton matmul; backward the GRAD
    launch (z recomputed, dz = dy * act'(z) written), dx = dz W and dW = dz^T x on cuBLAS, and
    db = dz summed in fp32 then cast (triton_kernels/linear.py, dlh_kernels/ops/gelu.py)."""
    x, w, y = M * K * ELEM, N * K * ELEM, M * N * ELEM
    b = N * ELEM if has_bias else 0
    mm = 2 * M * N * K
    fwd = [Launch(kernel, x + w + b + y, mm, "bf16", kernel, "autotune", filters_fwd)]
    bwd = [Launch(f"{kernel} GRAD", x + w + b + y + y, mm, "bf16", kernel, "autotune", filters_grad),
           Launch("dx = dz W (cuBLAS)", y + w + x, mm, "bf16"),
           Launch("dW = dz^T x (cuBLAS)", y + x + w, mm, "bf16")]
    if has_bias:
        bwd += [Launch("db sum (torch)", y + N * F32, M * N), Launch("db cast (torch)", N * F32 + b)]
    return _modes(fwd, bwd)


def linear_gelu_rows() -> list[Row]:
    from . import linear_gelu as bench
    rows = []
    counted = {"fwd": "read x, W, b; write y (GELU in the epilogue)",
               "fwd+bwd": "fwd + GRAD: read x, W, b, dy, write dz (z recomputed); cuBLAS dx, dW "
                          "(read dz, W / dz, x); db = sum dz"}
    for case, M, K, N, approximate in bench.shapes(quick=True):
        tanh = approximate == "tanh"
        launches = matmul_epilogue_launches(
            "linear_gelu_kernel", M, K, N,
            ({"meta.GRAD": False, "meta.TANH": tanh}, {"meta.GRAD": False}),
            ({"meta.GRAD": True, "meta.TANH": tanh}, {"meta.GRAD": True}))
        for mode, ls in launches.items():
            rows.append(_row("linear_gelu", "linear_gelu", case, f"{M}x{K}->{N} {approximate}", mode,
                             {"case": case, "M": M, "K": K, "N": N, "mode": mode}, counted[mode], ls,
                             bench.flops(mode, M, K, N)))
    return rows


def linear_rows() -> list[Row]:
    """DF.linear has no benchmark of its own (bench/linear_gelu.py times its CUDA path): the
    shape of bench/workloads.py, GPT-2 small's c_fc (Conv1D weight, GELU-tanh)."""
    M, K, N = 8 * 1024, 768, 3072
    rows = []
    counted = {"fwd": "read x, W (a transposed view), b; write y (GELU-tanh in the epilogue)",
               "fwd+bwd": "fwd + GRAD (z recomputed, dz written); cuBLAS dx, dW; db = sum dz"}
    launches = matmul_epilogue_launches(
        "linear_kernel", M, K, N,
        ({"meta.GRAD": False, "meta.ACT": 4, "meta.HAS_BIAS": True}, {"meta.GRAD": False}),
        ({"meta.GRAD": True, "meta.ACT": 4, "meta.HAS_BIAS": True}, {"meta.GRAD": True}))
    for mode, ls in launches.items():
        rows.append(_row("workloads", "linear", "gpt2-c_fc", f"{M}x{K}->{N} gelu_tanh", mode,
                         {"op": "linear", "mode": mode}, counted[mode], ls,
                         2 * M * N * K * (1 if mode == "fwd" else 3)))
    return rows


# ---- conv2d (bench/conv2d.py) ----------------------------------------------------------------

def conv2d_launches(case: tuple) -> dict:
    """Forward: the implicit GEMM with bias + activation. Backward: the GRAD launch (z
    recomputed, dz written), dx and dW kernels (dW in fp32 split-K partials, summed and cast by
    torch), db = dz summed in fp32 and cast (dlh_kernels/ops/conv2d.py)."""
    from . import conv2d as bench
    _, N, C, H, W, K, R, S, stride, padding, groups, _act = case
    OH, OW = bench.out_size(H, R, stride, padding), bench.out_size(W, S, stride, padding)
    x, w, y = N * C * H * W * ELEM, K * (C // groups) * R * S * ELEM, N * K * OH * OW * ELEM
    b = K * ELEM
    mm = bench.flops("fwd", N, C, H, W, K, R, S, stride, padding, groups)
    grad = lambda g: ({"meta.GRAD": g, "meta.ACT": 2 if _act == "silu" else 1}, {"meta.GRAD": g})  # noqa: E731
    fwd = [Launch("conv2d_fwd", x + w + b + y, mm, "bf16", "conv2d_fwd_kernel", "autotune", grad(False))]
    bwd = [Launch("conv2d_fwd GRAD", x + w + b + y + y, mm, "bf16", "conv2d_fwd_kernel", "autotune", grad(True)),
           Launch("conv2d_bwd_input", y + w + x, mm, "bf16", "conv2d_bwd_input_kernel", "fixed", ({},)),
           Launch("conv2d_bwd_weight", y + x + w * F32 // ELEM, mm, "bf16", "conv2d_bwd_weight_kernel", "fixed", ({},)),
           Launch("dW sum/cast (torch)", w * F32 // ELEM + w),
           Launch("db sum (torch)", y + K * F32, N * K * OH * OW), Launch("db cast (torch)", K * F32 + b)]
    return _modes(fwd, bwd)


def conv2d_rows() -> list[Row]:
    from . import conv2d as bench
    rows = []
    counted = {"fwd": "read x (NHWC), w, b; write y",
               "fwd+bwd": "fwd + GRAD (read x, w, b, dy; write dz), dx (read dz, w), dW (read dz, x; "
                          "fp32 partials), db = sum dz"}
    for case in bench.shapes(quick=True):
        name, N, C, H, W, K, R, S, stride, padding, groups, act = case
        for mode, ls in conv2d_launches(case).items():
            rows.append(_row("conv2d", "conv2d", name, f"N{N} C{C} {H}x{W} K{K} {R}x{S}/{stride} {act}", mode,
                             {"case": name, "mode": mode}, counted[mode], ls,
                             bench.flops(mode, N, C, H, W, K, R, S, stride, padding, groups)))
    return rows


# ---- attention (bench/attention.py) ----------------------------------------------------------

def attention_launches(B: int, H: int, L: int, D: int, causal: bool) -> dict:
    """Forward: one kernel. Backward (separate dQ, the default): preprocess (delta = rowsum(O *
    dO)), dK/dV (recomputes P from Q, K and lse) and dQ (recomputes P again): 3 launches, and
    FlashAttention-2's re-reads: Q, K, V, dO are read by both dK/dV and dQ."""
    from dlh_kernels.triton_kernels import attention as kernels
    t, row = B * H * L * D * ELEM, B * H * L * F32
    half = 0.5 if causal else 1.0
    mm = 2 * B * H * L * L * D * half                 # one L x S x D matmul
    tuned = max(L, L) >= kernels.AUTOTUNE_MIN_LEN
    src = "autotune" if tuned else "fixed"

    def filt(extra=None):
        extra = extra or {}
        return ({"meta.HEAD_D": D, "meta.IS_CAUSAL": causal, "meta.MASK_KIND": 0, "meta.DROPOUT": False, **extra},
                {"meta.HEAD_D": D, **extra}, {"meta.HEAD_D": 128, **extra}, dict(extra))

    fwd = [Launch("attn_fwd", 3 * t + t + row, 2 * mm, "bf16", "attn_fwd_kernel", src, filt())]
    bwd = [Launch("attn_bwd_preprocess", 2 * t + row, 2 * B * H * L * D, "fp32", "attn_bwd_preprocess_kernel",
                  "fixed", ({"meta.HEAD_DV": D}, {})),
           Launch("attn_bwd_dkdv", 4 * t + 2 * row + 2 * t, 4 * mm, "bf16", "attn_bwd_dkdv_kernel", src,
                  filt({"meta.ATOMIC_DQ": False})),
           Launch("attn_bwd_dq", 4 * t + 2 * row + t, 3 * mm, "bf16", "attn_bwd_dq_kernel", src, filt())]
    return {"fwd": fwd, "bwd": bwd}


def attention_rows() -> list[Row]:
    from . import attention as bench
    rows = []
    counted = {"fwd": "read Q, K, V; write O, lse (fp32)",
               "bwd": "preprocess: read O, dO, write delta; dK/dV: read Q, K, V, dO, lse, delta, write dK, dV; "
                      "dQ: read Q, K, V, dO, lse, delta, write dQ"}
    for case, B, H, L, D, causal in bench.shapes(quick=True):
        for mode, ls in attention_launches(B, H, L, D, causal).items():
            rows.append(_row("attention", "attention", case,
                             f"B{B} H{H} L{L} D{D}{' causal' if causal else ''}", mode,
                             {"case": case, "B": B, "H": H, "L": L, "D": D, "causal": causal, "mode": mode},
                             counted[mode], ls, bench.flops(mode, B, H, L, L, D, causal)))
    return rows


# ---- GroupNorm (+ SiLU) (bench/group_norm.py) --------------------------------------------------

def _group_norm_plan(B: int, C: int, G: int, S: int, channels_inner: bool, reread: int):
    from dlh_kernels.triton_kernels import group_norm as kernels
    with mock.patch.object(kernels, "_programs_wanted", lambda device: 4 * SMS):
        return kernels._plan.__wrapped__(B, C, G, S, channels_inner, reread, "cuda")


def group_norm_launches(op: str, B: int, C: int, H: int, layout: str) -> dict:
    from . import group_norm as bench
    G, S = bench.GROUPS, H * H
    silu = bench.OPS[op] == "silu"
    act, par, stats = B * C * S * ELEM, C * ELEM, B * G * F32
    ff = FLOPS_PER_ELEM["ln_fwd"] + (FLOPS_PER_ELEM["silu_fwd"] if silu else 0)
    fb = FLOPS_PER_ELEM["ln_bwd"] + (FLOPS_PER_ELEM["silu_bwd"] if silu else 0)
    inner = layout == "nhwc"
    fplan = _group_norm_plan(B, C, G, S, inner, C * S * ELEM)
    bplan = _group_norm_plan(B, C, G, S, inner, C * S * 2 * ELEM)
    meta = {"meta.SILU": silu}
    ftile = {"cfg.BLOCK_C": fplan.block_c, "cfg.BLOCK_S": fplan.block_s}
    btile = {"cfg.BLOCK_C": bplan.block_c, "cfg.BLOCK_S": bplan.block_s}
    ft, bt = _tile_text(ftile, fplan.num_warps), _tile_text(btile, bplan.num_warps)
    fwd: list[Launch] = []
    bwd: list[Launch] = []
    if not fplan.split:
        fwd.append(Launch("group_norm_fwd", act + 2 * par + act + 2 * stats, ff * B * C * S,
                          kernel="group_norm_fwd_kernel", source="fixed",
                          filters=({**meta, **ftile, "meta.HAS_W": True}, {**meta, "meta.HAS_W": True}, meta, {}), tile=ft))
    else:
        n_chunks = fplan.c_blocks * fplan.s_chunks
        for n0 in range(0, B, fplan.batch):
            nb = min(B, n0 + fplan.batch) - n0
            a, part = act * nb // B, nb * G * n_chunks * 3 * F32
            fwd.append(Launch("group_norm_fwd_partial", a + part, 3 * nb * C * S,
                              kernel="group_norm_fwd_partial_kernel", source="fixed", filters=(ftile, {}), tile=ft))
            fwd.append(Launch("group_norm_fwd_apply", _reread(a) + part + 2 * par + a + 2 * stats * nb // B,
                              (ff - 3) * nb * C * S, kernel="group_norm_fwd_apply_kernel", source="fixed",
                              filters=({**meta, **ftile}, {**meta}, {}), tile=ft))
    dwp = B * bplan.s_chunks * C * F32
    if not bplan.split:
        bwd.append(Launch("group_norm_bwd", 2 * act + 2 * par + 2 * stats + act + 2 * dwp, fb * B * C * S,
                          kernel="group_norm_bwd_kernel", source="fixed",
                          filters=({**meta, **btile, "meta.HAS_W": True}, {**meta, "meta.HAS_W": True}, meta, {}), tile=bt))
    else:
        n_chunks = bplan.c_blocks * bplan.s_chunks
        for n0 in range(0, B, bplan.batch):
            nb = min(B, n0 + bplan.batch) - n0
            a, part = act * nb // B, nb * G * n_chunks * 2 * F32
            bwd.append(Launch("group_norm_bwd_partial", 2 * a + 2 * par + 2 * stats * nb // B + part + 2 * dwp * nb // B,
                              (fb // 2) * nb * C * S, kernel="group_norm_bwd_partial_kernel", source="fixed",
                              filters=(btile, {}), tile=bt))
            bwd.append(Launch("group_norm_bwd_apply", _reread(2 * a) + 2 * par + 2 * stats * nb // B + part + a,
                              (fb - fb // 2) * nb * C * S, kernel="group_norm_bwd_apply_kernel", source="fixed",
                              filters=({**meta, **btile}, {**meta}, {}), tile=bt))
    for p in ("dw", "db"):  # torch: partials summed over (n, chunk) in fp32, then .to(weight dtype)
        bwd.append(Launch(f"{p} sum (torch)", dwp + C * F32, B * bplan.s_chunks * C))
        bwd.append(Launch(f"{p} cast (torch)", C * F32 + par))
    return _modes(fwd, bwd)


def group_norm_rows() -> list[Row]:
    from . import group_norm as bench
    rows = []
    for op in bench.QUICK_OPS:
        act = " (SiLU fused)" if bench.OPS[op] else ""
        counted = {"fwd": f"read x, w, b; write y{act}, mean, rstd (split groups: + the L2 re-read)",
                   "fwd+bwd": "fwd + read dy, x again (SiLU input recomputed), w, b, stats; write dx, "
                              "fp32 dw/db partials; torch sums + casts"}
        for case, B, C, H, layout in bench.shapes(quick=True):
            for mode, ls in group_norm_launches(op, B, C, H, layout).items():
                rows.append(_row("group_norm", op, case, f"B{B} C{C} {H}x{H} {layout}", mode,
                                 {"op": op, "case": case, "layout": layout, "B": B, "C": C, "H": H, "mode": mode},
                                 counted[mode], ls))
    return rows


# ---- rotary (bench/rotary.py) ----------------------------------------------------------------

def rotary_launches(cfg, B: int, S: int) -> dict:
    """One launch each way for q and k together; fp32 cos/sin tables (1, S, R) read once."""
    tok = B * S
    qk = (cfg.Hq + cfg.Hk) * tok * cfg.D * ELEM
    tables = 2 * S * cfg.R * F32
    flops = FLOPS_PER_ELEM["rotary"] * (cfg.Hq + cfg.Hk) * tok * cfg.R
    case = f"hd{cfg.D} R{cfg.R} interleaved={cfg.interleaved}"

    def launch(backward):
        return Launch("rotary_bwd" if backward else "rotary_fwd", 2 * qk + tables, flops, kernel="rotary_kernel",
                      source="fixed", filters=({"case~": case, "meta.BACKWARD": backward},
                                               {"meta.INTERLEAVED": cfg.interleaved, "meta.BACKWARD": backward}))
    return _modes([launch(False)], [launch(True)])


def rotary_rows() -> list[Row]:
    from . import rotary as bench
    rows = []
    counted = {"fwd": "read q, k, fp32 cos/sin; write q_out, k_out (the pass-through part too)",
               "fwd+bwd": "fwd + read dq_out, dk_out, cos/sin; write dq, dk"}
    for op, cfg in bench.OPS.items():
        for case, _M, _N in bench.shapes(quick=True):
            B, S = bench.BATCH_SEQ[case]
            for mode, ls in rotary_launches(cfg, B, S).items():
                rows.append(_row("rotary", op, case, f"B{B} S{S} Hq{cfg.Hq} Hk{cfg.Hk} D{cfg.D} R{cfg.R}", mode,
                                 {"op": op, "case": case, "mode": mode}, counted[mode], ls))
    return rows


# ---- diffusion step (bench/diffusion.py part 1) ----------------------------------------------

def diffusion_rows() -> list[Row]:
    from . import diffusion as bench
    rows = []
    for case, shape in bench.QUICK_STEP_SHAPES:
        n = math.prod(shape)
        for method, kw in bench.STEP_METHODS.items():
            guided = "guidance_scale" in kw
            noise = method == "ddpm" or kw.get("eta", 0.0) > 0
            nbytes = (3 + guided) * n * ELEM
            flops = (FLOPS_PER_ELEM["diffusion"] + 3 * guided + FLOPS_PER_ELEM["philox_gauss"] * noise) * n
            # the bench: int timesteps, a device seed tensor (noise drawn in the kernel), epsilon
            method_code = {"meta.METHOD": 0 if kw["method"] == "ddpm" else 1, "meta.GUIDANCE": guided}
            filt = ({**method_code, "meta.NOISE": 2 if noise else 0, "meta.T_TENSOR": False, "meta.PRED": 0},
                    {**method_code, "meta.T_TENSOR": False}, method_code, {})
            ls = [Launch("diffusion_step", nbytes, flops, kernel="diffusion_step_kernel", source="fixed",
                         filters=filt)]
            rows.append(_row("diffusion_step", "diffusion_step", case, f"{list(shape)} {method}", "step",
                             {"method": method, "case": case}, "read x, model output"
                             + (", uncond output" if guided else "") + "; write x_prev; noise drawn in the kernel",
                             ls))
    return rows


FAMILIES = {
    "layer_norm": norm_rows, "gelu": gelu_rows, "activation": activation_rows,
    "linear_gelu": linear_gelu_rows, "linear": linear_rows, "conv2d": conv2d_rows,
    "attention": attention_rows, "group_norm": group_norm_rows, "rotary": rotary_rows,
    "diffusion_step": diffusion_rows,
}


def model_rows() -> list[Row]:
    return [row for make in FAMILIES.values() for row in make()]


# ---------------------------------------------------------------------------------------------
# Static figures of the kernels, from the launch-exact compiles (bench/results/triton_resources)

def _report_rows() -> list[dict]:
    if not hasattr(_report_rows, "cache"):
        data = json.loads(RESOURCES.read_text())
        _report_rows.cache = [r for r in data["rows"] if r.get("arch") == 90 and r.get("dtype") == DTYPE]
    return _report_rows.cache


def _get(r: dict, key: str):
    if key.startswith("meta."):
        return r.get("meta", {}).get(key[5:], _MISSING)
    if key.startswith("cfg."):
        return r.get("config", {}).get(key[4:], _MISSING)
    return r.get(key, _MISSING)


_MISSING = object()


def _matching_rows(launch: Launch) -> tuple[list[dict], int]:
    """The kept sm_90 rows of the launch's kernel (and source) matching its first filter that
    matches any; and that filter's index (0: the exact variant, more: the nearest compiled one)."""
    base = [r for r in _report_rows() if r["kernel"] == launch.kernel and r.get("kept")
            and (launch.source is None or r.get("source") == launch.source)]
    for i, f in enumerate(launch.filters or ({},)):
        got = [r for r in base if all((v in r.get("case", "")) if k == "case~" else _get(r, k) == v
                                      for k, v in f.items())]
        if got:
            return got, i
    return [], -1


def ctas_per_sm(regs: int, num_warps: int, shared: int) -> int:
    """Resident CTAs per SM: registers (allocated per warp in units of 256), shared memory (plus
    1 KB reserved per CTA), the 64-warp and 32-CTA limits."""
    per_warp = math.ceil(max(regs, 1) * 32 / 256) * 256
    by_regs = (REGS_PER_SM // per_warp) // num_warps
    by_smem = SHARED_PER_SM // (shared + SHARED_RESERVED) if shared else MAX_CTAS_PER_SM
    return max(0, min(by_regs, by_smem, MAX_CTAS_PER_SM, MAX_WARPS_PER_SM // num_warps))


def kernel_figures(launch: Launch) -> Optional[dict]:
    """regs, stack, spills, shared, CTAs/SM, pipelined: exact for fixed configs, the range over
    the kept autotune configs otherwise; None for a torch or cuBLAS launch."""
    if launch.kernel is None:
        return None
    rows, which = _matching_rows(launch)
    if not rows:
        return {"kernel": launch.kernel, "source": launch.source, "found": False}

    def span(values):
        values = list(values)
        return [min(values), max(values)]

    return {
        "kernel": launch.kernel, "source": launch.source, "found": True,
        "variant": "exact" if which == 0 else "nearest compiled",
        "configs": len(rows),
        "num_warps": sorted({r["config"]["num_warps"] for r in rows}),
        "regs": span(r["regs"] for r in rows), "stack": span(r["stack"] for r in rows),
        "spill_stores": span(r["spill_stores"] for r in rows), "shared": span(r["shared"] for r in rows),
        "ctas_per_sm": span(ctas_per_sm(r["regs"], r["config"]["num_warps"], r["shared"]) for r in rows),
        "pipelined": sorted({bool(r["pipelined"]) for r in rows}),
        "wgmma": span(r.get("wgmma", 0) for r in rows),
        "compiled_tiles": sorted({_config_text(r["config"]) for r in rows}),
        "planned_tile": launch.tile or None,
    }


def _config_text(config: dict) -> str:
    dims = "x".join(str(v) for k, v in config.items() if k.startswith("BLOCK_") and k not in ("BLOCK_D", "BLOCK_DV"))
    return f"{dims} w{config.get('num_warps')}"


def _span(v, fmt=str) -> str:
    return fmt(v[0]) if v[0] == v[1] else f"{fmt(v[0])}-{fmt(v[1])}"


def _kb(n: int) -> str:
    return f"{n / 1024:.0f}K" if n >= 1024 else str(n)


def figures_text(k: dict) -> str:
    short = k["kernel"].replace("_kernel", "")
    if not k["found"]:
        return f"{short}: not in the report"
    pipe = "/".join("yes" if p else "no" for p in k["pipelined"])
    tag = f" x{k['configs']} tuned" if k["source"] == "autotune" else ""
    near = "~" if k["variant"] != "exact" else ""
    if near and k.get("planned_tile") and k["planned_tile"] not in k["compiled_tiles"]:
        short += f" [runs {k['planned_tile']}, compiled {'/'.join(k['compiled_tiles'])}]"
    return (f"{near}{short}{tag}: w{'/'.join(map(str, k['num_warps']))} regs {_span(k['regs'])}, "
            f"stack {_span(k['stack'])}, spill {_span(k['spill_stores'])}, smem {_span(k['shared'], _kb)}, "
            f"CTA/SM {_span(k['ctas_per_sm'])}, pipe {pipe}")


# ---------------------------------------------------------------------------------------------
# Output

def _fmt_bytes(n: float) -> str:
    return f"{n / 1e6:,.1f}" if n >= 1e5 else f"{n / 1e6:.3f}"


def _fmt_flops(useful: float, executed: float) -> str:
    if executed < 1e9 and useful < 1e9:
        return f"{executed / 1e9:.3f}"
    if abs(useful - executed) < 1e-6 * max(executed, 1):
        return f"{executed / 1e9:,.1f}"
    return f"{useful / 1e9:,.1f} / {executed / 1e9:,.1f}"


TITLES = {
    "layer_norm": "LayerNorm, RMSNorm, add + norm (bench/layer_norm.py --quick)",
    "gelu": "GELU, bias-GELU, GeGLU (bench/gelu.py --quick)",
    "activation": "SiLU, ReLU, LeakyReLU, SwiGLU, gated GELU (bench/activation.py --quick)",
    "linear_gelu": "linear + GELU (bench/linear_gelu.py --quick)",
    "workloads": "linear (bench/workloads.py's default shape: no benchmark of its own)",
    "conv2d": "conv2d + bias + activation, channels_last (bench/conv2d.py --quick)",
    "attention": "attention, self (S = L) (bench/attention.py --quick)",
    "group_norm": "GroupNorm + SiLU (bench/group_norm.py --quick)",
    "rotary": "rotary embedding of q and k (bench/rotary.py --quick)",
    "diffusion_step": "diffusion step (bench/diffusion.py --quick, part 1; measured: graph_us)",
}


def render_markdown(rows: list[dict], meta: dict) -> str:
    """perf_model.md from the model's rows and the run's meta (a pure function of both)."""
    out = [
        "# Performance model: predicted floors on an H200",
        "",
        f"Generated {meta['date_utc']} by `{meta['command']}` at git {meta['git_sha']}. "
        f"Device modelled: {meta['device']}. dtype: {DTYPE}. Shapes: the quick benchmarks' "
        "(`dlh bench --quick`), imported from bench/*.py.",
        "",
        "**What this is for.** The first GPU run (`bench/gpu_session.sh`, results under "
        "bench/results/<date>-<gpu>/) measures these rows; "
        "`python -m dlh_kernels.bench.perf_model --compare bench/results/<date>-<gpu>/` prints "
        "measured p50 / predicted for every row and provider, so the kernel that is off, and by how "
        "much, shows at once. The predictions are floors: ~1.1-1.3x is good, 2x+ means a bug, a bad "
        "tile or a launch-bound shape (compare the `copy` rows of the memory-bound benchmarks, "
        "which check the bandwidth figure itself).",
        "",
        "**Model.** Per launch: bytes = each input read once + each output written once (so the "
        "re-reads a design makes on purpose, a backward re-reading x or FlashAttention-2's dK/dV and "
        "dQ kernels both reading Q, K, V, dO, are counted; a re-read of a set under half the L2 is "
        "not); FLOPs = what the launch computes, recompute included (attention bwd: 14 B H L S D "
        "executed against the 10 of the usual 2.5x count; linear/conv: z recomputed in the GRAD "
        "epilogue). Time = sum over launches of max(bytes / copy bandwidth, FLOPs / peak) + "
        f"{LAUNCH_US:g} us per launch. The GFLOP column shows useful / executed where they differ.",
        "",
        "**Ceilings used**",
        "",
        "| ceiling | value | source |",
        "|---|---|---|",
    ]
    for name, (value, source) in meta["ceilings"].items():
        out.append(f"| {name} | {value:,.0f} | {source} |" if value >= 1e6 else f"| {name} | {value:,g} | {source} |")
    out += [
        "",
        "**Kernel figures** (last column): from bench/results/triton_resources_3.6.json, sm_90, the "
        "variant the shape runs (`~`: the nearest variant the report compiled, e.g. the autotune "
        "lists were compiled at head dim 128 with an additive mask and dropout, the largest "
        "footprint; `xN tuned`: the range over the N configs the early prune keeps, the pick being "
        "known only after a GPU run). w = num_warps; CTA/SM from registers x threads (64K registers) "
        "and shared memory (228 KB) per SM. The elementwise and norm kernels were compiled at one shape "
        "per variant; `~` also marks where the tile the benchmark's shape gets (from the glue's own "
        "plan) differs from the compiled one.",
        "",
    ]
    families = list(dict.fromkeys(r["family"] for r in rows))
    for fam in families:
        sub = [r for r in rows if r["family"] == fam]
        out += [f"## {TITLES.get(fam, fam)}", ""]
        for counted in dict.fromkeys(f"{r['op']} {r['mode']}: {r['counted']}" for r in sub):
            out.append(f"- {counted}")
        out += ["",
                "| op | case | shape | mode | launches | MB | GFLOP | bound | predicted us | Triton kernels (sm_90) |",
                "|---|---|---|---|---|---|---|---|---|---|"]
        for r in sub:
            kernels = "; ".join(dict.fromkeys(figures_text(k) for k in r["kernels"])) or "-"
            out.append(f"| {r['op']} | {r['case']} | {r['shape']} | {r['mode']} | {r['launches']} | "
                       f"{_fmt_bytes(r['bytes'])} | {_fmt_flops(r['flops_useful'], r['flops_executed'])} | "
                       f"{r['bound']} | {r['predicted_us']:,.1f} | {kernels} |")
        out.append("")
    return "\n".join(out)


def build(meta: Optional[dict] = None) -> tuple[list[dict], dict]:
    """(rows as dicts, meta) of the model; meta's date and sha default to now and this checkout."""
    rows = [r.as_dict() for r in model_rows()]
    if meta is None:
        from .common import git_sha
        meta = {"date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
                "git_sha": git_sha()}
    meta = {**meta, "device": DEVICE, "command": COMMAND, "dtype": DTYPE,
            "ceilings": {k: list(v) for k, v in CEILINGS.items()}, "resources": RESOURCES.name}
    return rows, meta


def write(out_dir: Path, meta: Optional[dict] = None) -> list[Path]:
    rows, meta = build(meta)
    out_dir.mkdir(parents=True, exist_ok=True)
    md, js = out_dir / "perf_model.md", out_dir / "perf_model.json"
    md.write_text(render_markdown(rows, meta) + "\n")
    js.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    return [md, js]


# ---------------------------------------------------------------------------------------------
# Measured against predicted

def _measured_us(row: dict) -> Optional[float]:
    if row.get("p50_ms") is not None:
        return row["p50_ms"] * 1e3
    for key in ("graph_us", "host_us"):  # the diffusion step: graph replay, else the host loop
        if row.get(key) is not None:
            return row[key]
    return None


def _same_dtype(row: dict) -> bool:
    return str(row.get("dtype", DTYPE)).replace("bfloat16", "bf16") == DTYPE


def _family_of(path: Path, data: dict) -> str:
    return path.stem


def compare(path, rows: Optional[list[dict]] = None, file=None) -> list[dict]:
    """measured / predicted for every row of a results JSON (or every JSON of a results folder)
    that the model has a prediction for; printed as a table, and returned as dicts
    (family, provider, op, case, mode, measured_us, predicted_us, ratio)."""
    file = file or sys.stdout
    path = Path(path)
    if rows is None:
        rows, _ = build({"date_utc": "-", "git_sha": "-"})
    files = sorted(path.glob("*.json")) if path.is_dir() else [path]
    index = {}
    for r in rows:
        index.setdefault(r["family"], []).append(r)
    out = []
    unmatched = 0
    for f in files:
        try:
            data = json.loads(f.read_text())
        except (OSError, ValueError):
            continue
        if not isinstance(data, dict) or "rows" not in data:
            continue
        family = _family_of(f, data)
        preds = index.get(family, [])
        for m in data["rows"]:
            if not _same_dtype(m):
                continue
            measured = _measured_us(m)
            pred = next((p for p in preds if all(m.get(k) == v for k, v in p["key"].items())), None)
            if pred is None or measured is None:
                unmatched += pred is None and family in index
                continue
            out.append({"family": family, "provider": m.get("provider", "?"), "op": pred["op"],
                        "case": pred["case"], "shape": pred["shape"], "mode": pred["mode"],
                        "measured_us": measured, "predicted_us": pred["predicted_us"],
                        "ratio": measured / pred["predicted_us"], "bound": pred["bound"]})
    if not out:
        print(f"no rows of {path} match the model (dtype {DTYPE}, the quick shapes)", file=file)
        return out
    w = max(len(f"{r['op']} {r['case']} {r['shape']} {r['mode']}") for r in out)
    print(f"{'row':<{w}}  {'provider':>20}  {'measured us':>12}  {'predicted us':>12}  {'x pred':>7}  bound",
          file=file)
    for r in out:
        flag = "  <-- off" if r["ratio"] > 2 else ("  (below the floor?)" if r["ratio"] < 0.8 else "")
        print(f"{r['op'] + ' ' + r['case'] + ' ' + r['shape'] + ' ' + r['mode']:<{w}}  {r['provider']:>20}  "
              f"{r['measured_us']:>12,.1f}  {r['predicted_us']:>12,.1f}  {r['ratio']:>7.2f}  {r['bound']}{flag}",
              file=file)
    if unmatched:
        print(f"({unmatched} rows of the model's benchmarks have no prediction: shapes outside --quick)", file=file)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m dlh_kernels.bench.perf_model", description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, help="folder for perf_model.md / .json (default bench/results/)")
    p.add_argument("--compare", type=Path, help="a bench results JSON, or a results folder: measured / predicted")
    args = p.parse_args(argv)
    if args.compare:
        compare(args.compare)
        if not args.out:
            return 0
    for path in write(args.out or HERE / "results"):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
