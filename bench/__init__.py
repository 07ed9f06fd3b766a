"""`dlh bench`: microbenchmarks of dlh-kernels beside eager PyTorch, torch.compile and peers.

    dlh bench [WHICH[,WHICH...]] [--quick | --smoke] [--dtype bf16] [--out DIR]
    python -m dlh_kernels.bench ...   (the same)

WHICH: an op family (layer_norm, gelu, linear_gelu, conv2d, attention, diffusion, group_norm),
overhead (host cost per call), models (the reference models end to end), coldstart (first call
in a fresh process, cold and warm caches), summary (the roofline table of a results folder), or
all (every op family, overhead and models, then the summary; default).

On a GPU: the device's ceilings first, then every provider side by side, results as CSV, JSON
and a plot under --out (default bench/results/<date>-<gpu>/). Without a GPU there is nothing
to time: it says so, checks every op on every available backend against float64 eager (the
Triton kernels through the interpreter) and prints the host-side CPU cost per call.
"""
from __future__ import annotations

import argparse
import os
import signal
from pathlib import Path
from typing import Optional, Sequence

NO_GPU = """\
No GPU: this machine has no CUDA device, so `dlh bench` takes no GPU timings and nothing
below is a GPU result. Instead: {instead}."""


def _no_gpu_banner(which: tuple[str, ...]) -> str:
    """NO_GPU naming what `_without_gpu` runs for ``which`` (and nothing it skips)."""
    parts = []
    if set(which) - {"overhead", "coldstart", "models"}:
        parts.append("the correctness check of every op on every available backend")
    if "coldstart" in which:
        parts.append("the first-call cost of the ops in fresh processes on the CPU")
    if set(which) - {"coldstart"}:
        parts.append("the host-side CPU cost per call of the torch backend")
    return NO_GPU.format(instead=", then ".join(parts) or "nothing")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dlh bench", description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("which", nargs="?", default="all", type=_which,
                   help=f"benchmarks to run, comma-separated: {', '.join(CHOICES)} (default: all)")
    p.add_argument("--quick", action="store_true", help="short sweep (2-4 sizes), for a time-boxed GPU session")
    p.add_argument("--smoke", action="store_true",
                   help="one size per op family and no torch.compile (implies --quick): the first GPU command")
    p.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "fp32"), help="input dtype (default bf16)")
    p.add_argument("--out", type=Path, help="results folder (default: bench/results/<date>-<gpu>/)")
    p.add_argument("--ops", help="layer_norm only: comma-separated subset of "
                                 "layer_norm,rms_norm,add_layer_norm,add_rms_norm; coldstart: ops to start")
    p.add_argument("--models", help="models only: comma-separated subset of dlh_kernels.models.NAMES")
    p.add_argument("--variants", help="models only: comma-separated subset of "
                                      "eager,patched,compile,patched+compile,patched+cudagraphs")
    p.add_argument("--budget-s", type=float, help="models only: start no new measurement after this many seconds")
    p.add_argument("--save-auto", action="store_true",
                   help="summary: record the faster of dlh's backends per op for `auto` (DLH_CACHE_DIR)")
    return p


FAMILIES = ("layer_norm", "gelu", "linear_gelu", "activation", "rotary", "conv2d", "attention", "diffusion",
            "group_norm")
CHOICES = FAMILIES + ("overhead", "models", "coldstart", "summary", "all")
ALL = FAMILIES + ("overhead", "models", "summary")


def _which(text: str) -> tuple[str, ...]:
    names = tuple(t.strip() for t in text.split(",") if t.strip())
    unknown = [n for n in names if n not in CHOICES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown benchmark {unknown or text!r}; choose from {', '.join(CHOICES)}")
    return ALL if "all" in names else names


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(argv)
    # A time cap (`timeout -s INT`, or TERM) must reach Python as KeyboardInterrupt, so that the
    # benchmarks write what they measured, even where the launcher left SIGINT ignored.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    import torch
    which = args.which if isinstance(args.which, tuple) else _which(args.which)
    if which == ("summary",):  # reads files: no GPU needed
        from . import summary
        return summary.run(args.out, save_auto=args.save_auto)
    if not torch.cuda.is_available():
        return _without_gpu(args, which)
    from . import attention, common, conv2d, diffusion, gelu, group_norm, layer_norm, linear_gelu, overhead
    out = args.out or common.default_out_dir()
    if args.smoke:
        common.SMOKE, args.quick = True, True
    rc = 0
    if "layer_norm" in which:
        ops = tuple(args.ops.split(",")) if args.ops else layer_norm.OPS
        unknown = set(ops) - set(layer_norm.OPS)
        if unknown:
            _parser().error(f"--ops: unknown {sorted(unknown)}; choose from {layer_norm.OPS}")
        rc |= layer_norm.run(quick=args.quick, dtype=args.dtype, out=out, ops=ops)
    if "gelu" in which:
        rc |= gelu.run(quick=args.quick, dtype=args.dtype, out=out)
    if "linear_gelu" in which:
        rc |= linear_gelu.run(quick=args.quick, dtype=args.dtype, out=out)
    if "activation" in which:
        from . import activation
        rc |= activation.run(quick=args.quick, dtype=args.dtype, out=out)
    if "rotary" in which:
        from . import rotary
        rc |= rotary.run(quick=args.quick, dtype=args.dtype, out=out)
    if "conv2d" in which:
        rc |= conv2d.run(quick=args.quick, dtype=args.dtype, out=out)
    if "attention" in which:
        rc |= attention.run(quick=args.quick, dtype=args.dtype, out=out)
    if "diffusion" in which:
        rc |= diffusion.run(quick=args.quick, dtype=args.dtype, out=out)
    if "group_norm" in which:
        rc |= group_norm.run(quick=args.quick, dtype=args.dtype, out=out)
    if "overhead" in which:
        rc |= overhead.run(dtype=args.dtype, out=out)
    if "models" in which:
        from . import models
        rc |= models.run(quick=args.quick, dtype=args.dtype, out=out, names=_split(args.models),
                         variants=_split(args.variants), budget_s=args.budget_s)
    if "coldstart" in which:
        from . import coldstart
        rc |= coldstart.run(ops=_split(args.ops) or coldstart.QUICK_OPS, dtype=args.dtype, out=out)
    if "summary" in which:
        from . import summary
        rc |= summary.run(out, save_auto=args.save_auto)
    return rc


def _split(text: Optional[str]) -> Optional[tuple[str, ...]]:
    return tuple(t.strip() for t in text.split(",") if t.strip()) if text else None


def _without_gpu(args, which: tuple[str, ...]) -> int:
    print(_no_gpu_banner(which), flush=True)
    rc = 0
    if set(which) - {"overhead", "coldstart", "models"}:
        rc |= _check(args.out)
    if "coldstart" in which:
        from . import coldstart
        os.environ.setdefault("TRITON_INTERPRET", "1")
        rc |= coldstart.run(ops=_split(args.ops) or ("layer_norm",), device="cpu", dtype="fp32",
                            size="tiny", out=args.out)
    if set(which) - {"coldstart"}:
        from . import overhead
        rc |= overhead.run(dtype=args.dtype, out=args.out, device="cpu")
    return rc


def _check(out: Optional[Path]) -> int:
    # The Triton kernels run on CPU tensors only under the interpreter, which must be on before
    # the first kernel is defined; nothing in bench/ has defined one yet.
    os.environ.setdefault("TRITON_INTERPRET", "1")
    try:
        from dlh_kernels.check import format_rows, interpreter_note, run_check
    except ImportError as exc:
        print(f"\ncheck: dlh_kernels.check is not importable ({exc}); skipping the correctness check")
        return 1
    print(f"\ncorrectness against float64 eager ({interpreter_note()})", flush=True)
    rows = run_check()
    print(format_rows(rows))
    failed = sum(r["ok"] is False for r in rows)
    print(f"{sum(r['ok'] is True for r in rows)} ok, {failed} failed, "
          f"{sum(r['ok'] is None for r in rows)} skipped")
    if out is not None and rows:
        from . import common
        common.write_results(rows, common.run_metadata(), out, "check_cpu")
    return 1 if failed else 0
