"""`dlh bench`: microbenchmarks of dlh-kernels beside eager PyTorch, torch.compile and peers.

    dlh bench [layer_norm|gelu|linear_gelu|conv2d|attention|diffusion|group_norm|overhead|all] [--quick] [--dtype bf16] [--out DIR]
    python -m dlh_kernels.bench ...   (the same)

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
below is a GPU result. Instead: the correctness check of every op on every available backend,
then the host-side CPU cost per call of the torch backend."""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dlh bench", description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("which", nargs="?", default="all",
                   choices=("layer_norm", "gelu", "linear_gelu", "conv2d", "attention", "diffusion", "group_norm", "overhead",
                            "all"),
                   help="benchmark to run (default: all)")
    p.add_argument("--quick", action="store_true", help="short sweep (2-4 sizes), for a time-boxed GPU session")
    p.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "fp32"), help="input dtype (default bf16)")
    p.add_argument("--out", type=Path, help="results folder (default: bench/results/<date>-<gpu>/)")
    p.add_argument("--ops", help="layer_norm only: comma-separated subset of "
                                 "layer_norm,rms_norm,add_layer_norm,add_rms_norm")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(argv)
    # A time cap (`timeout -s INT`, or TERM) must reach Python as KeyboardInterrupt, so that the
    # benchmarks write what they measured, even where the launcher left SIGINT ignored.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    import torch
    if not torch.cuda.is_available():
        return _without_gpu(args)
    from . import attention, common, conv2d, diffusion, gelu, group_norm, layer_norm, linear_gelu, overhead
    out = args.out or common.default_out_dir()
    rc = 0
    if args.which in ("layer_norm", "all"):
        ops = tuple(args.ops.split(",")) if args.ops else layer_norm.OPS
        unknown = set(ops) - set(layer_norm.OPS)
        if unknown:
            _parser().error(f"--ops: unknown {sorted(unknown)}; choose from {layer_norm.OPS}")
        rc |= layer_norm.run(quick=args.quick, dtype=args.dtype, out=out, ops=ops)
    if args.which in ("gelu", "all"):
        rc |= gelu.run(quick=args.quick, dtype=args.dtype, out=out)
    if args.which in ("linear_gelu", "all"):
        rc |= linear_gelu.run(quick=args.quick, dtype=args.dtype, out=out)
    if args.which in ("conv2d", "all"):
        rc |= conv2d.run(quick=args.quick, dtype=args.dtype, out=out)
    if args.which in ("attention", "all"):
        rc |= attention.run(quick=args.quick, dtype=args.dtype, out=out)
    if args.which in ("diffusion", "all"):
        rc |= diffusion.run(quick=args.quick, dtype=args.dtype, out=out)
    if args.which in ("group_norm", "all"):
        rc |= group_norm.run(quick=args.quick, dtype=args.dtype, out=out)
    if args.which in ("overhead", "all"):
        rc |= overhead.run(dtype=args.dtype, out=out)
    return rc


def _without_gpu(args) -> int:
    print(NO_GPU, flush=True)
    rc = 0
    if args.which != "overhead":
        rc |= _check(args.out)
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
