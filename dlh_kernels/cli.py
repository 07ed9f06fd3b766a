"""The `dlh` console command: info, check, bench, profile."""
from __future__ import annotations

import argparse
import platform
import sys


def _info(args) -> int:
    import torch

    import dlh_kernels as dlh
    from dlh_kernels import _ext
    print(f"dlh-kernels {dlh.__version__}  python {platform.python_version()}  torch {torch.__version__}")
    try:
        import triton
        print(f"triton {triton.__version__}")
    except Exception as exc:
        print(f"triton: not importable ({exc})")
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        print(f"device: {p.name}, {p.multi_processor_count} SMs, {p.total_memory / 2**30:.0f} GiB, "
              f"compute capability {p.major}.{p.minor}, CUDA {torch.version.cuda}")
    else:
        print("device: no CUDA GPU (CPU tensors run on the torch backend; the Triton kernels run "
              "on CPU only under TRITON_INTERPRET=1)")
    print("backends:")
    for name, state in dlh.backends().items():
        print(f"  {name:7} {state}")
    print(f"  default: {dlh.get_backend()}")
    if _ext.load_error() is None:
        print(f"extension: {_ext.ext().build_info()}")
    return 0


def _check(args) -> int:
    from dlh_kernels.check import format_rows, interpreter_note, run_check
    print(interpreter_note())
    rows = run_check(ops=args.ops or None, backends=args.backends or None)
    print(format_rows(rows))
    failed = [r for r in rows if r["ok"] is False]
    print(f"{sum(r['ok'] is True for r in rows)} ok, {len(failed)} failed, "
          f"{sum(r['ok'] is None for r in rows)} skipped")
    return 1 if failed else 0


def _profile(args) -> int:
    """A short Nsight-friendly run: NVTX ranges dlh::<op>[<backend>] inside a profiler range."""
    import torch

    import dlh_kernels as dlh
    import dlh_kernels.functional as DF
    if not torch.cuda.is_available():
        print("dlh profile: no CUDA GPU here; run it under Nsight on a GPU machine, e.g.\n"
              "  nsys profile --capture-range=cudaProfilerApi -t cuda,nvtx dlh profile")
        return 2
    x = torch.randn(args.rows, args.hidden, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    r = torch.randn_like(x)
    w = torch.ones(args.hidden, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    b = torch.zeros_like(w, requires_grad=True)
    backends = [n for n, s in dlh.backends().items() if s == "available"]
    for warm in (True, False):
        if not warm:
            torch.cuda.synchronize()
            torch.cuda.profiler.start()
        with dlh.profiling.nvtx(not warm):
            for be in backends:
                for _ in range(args.iters):
                    y = DF.layer_norm(x, (args.hidden,), w, b, backend=be)
                    y2, _h = DF.add_rms_norm(y, r, (args.hidden,), w, backend=be)
                    y2.float().sum().backward()
        torch.cuda.synchronize()
    torch.cuda.profiler.stop()
    print(f"profiled {args.iters} iterations of layer_norm + add_rms_norm (fwd+bwd) on {backends}")
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:  # its own parser (dlh bench --help)
        from dlh_kernels.bench import main as bench_main
        return bench_main(argv[1:])
    parser = argparse.ArgumentParser(prog="dlh", description="dlh-kernels: kernels, checks, benchmarks")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="device, backends, build").set_defaults(fn=_info)
    p = sub.add_parser("check", help="every op on every available backend against float64 eager")
    p.add_argument("--ops", nargs="*")
    p.add_argument("--backends", nargs="*")
    p.set_defaults(fn=_check)
    sub.add_parser("bench", help="microbenchmarks (dlh bench --help)")
    p = sub.add_parser("profile", help="a short run with NVTX ranges, for nsys/ncu")
    p.add_argument("--rows", type=int, default=4096)
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--iters", type=int, default=10)
    p.set_defaults(fn=_profile)
    args = parser.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
