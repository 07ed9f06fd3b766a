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


def _coverage(args) -> int:
    """`dlh coverage [model ...]`: per model, the hot-spot calls of one forward that run through
    a dlh op before and after `dlh.patch`, and every miss with the report's reason."""
    import warnings

    import dlh_kernels as dlh
    from dlh_kernels import coverage
    names = args.models or list(coverage.TINY) + list(_model_names())
    rows, misses = [], []
    for name in names:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model, run = coverage.build_tiny(name)
        except ImportError as exc:  # transformers / diffusers not installed
            rows.append((name, "-", "-", "-", f"skipped: {exc}"))
            continue
        before = coverage.measure(model, run)
        dlh.patch(model, backend=args.backend)
        after = coverage.measure(model, run)
        kinds = ", ".join(f"{k} {d}/{t}" for k, (d, t) in after.counts().items())
        rows.append((name, str(after.total), f"{before.dlh}", f"{after.dlh} ({100 * after.fraction:.0f}%)", kinds))
        misses += [(name, *m) for m in after.misses()]
    header = ("model", "hot-spot calls", "dlh before", "dlh after patch", "per kind (dlh/total)")
    widths = [max(len(str(r[i])) for r in (header, *rows)) for i in range(len(header))]
    for r in (header, tuple("-" * w for w in widths), *rows):
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip())
    if misses:
        print("\nmissed (model, module, type, kind: why):")
        for name, path, cls, kind, why in misses:
            print(f"  {name}: {path or '<model>'} {cls} ({kind}): {why}")
    return 0


def _model_names() -> tuple:
    try:
        from dlh_kernels import models
        return tuple(models.NAMES)
    except Exception:  # the models package is optional here
        return ()


def _profile(args) -> int:
    """`dlh profile <op|model>`: warm up, then the measured steps between cudaProfilerStart/Stop
    with NVTX ranges per op call (dlh::<op>[<backend>]), per step and per model layer."""
    import torch

    import dlh_kernels as dlh
    from dlh_kernels import profiling
    from dlh_kernels.bench import workloads
    device = args.device or ("cuda" if torch.cuda.is_available() else None)
    if device is None:
        print("dlh profile: no CUDA GPU here; run it under Nsight on a GPU machine (or pass "
              "--device cpu for a dry run of the ranges), e.g.\n" + profiling.recipes(
                  args.target, f"dlh profile {args.target}"))
        return 2
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    is_model = args.target in _model_names()
    if not is_model and args.target not in workloads.OPS:
        print(f"dlh profile: unknown target {args.target!r}; ops: {', '.join(workloads.OPS)}; "
              f"models: {', '.join(_model_names()) or '(dlh_kernels.models is not importable)'}")
        return 2
    device_type = torch.device(device).type
    status = {b: dlh._backend.unavailable_reason(b, device_type) for b in dlh._backend.BACKENDS}
    backends = args.backend or [b for b, why in status.items() if why is None]
    for b in backends:
        if b not in ("eager", "auto") and status.get(b, "unknown backend") is not None:
            print(f"dlh profile: backend {b!r} cannot run here: {status.get(b, 'unknown backend')}")
            return 2
    cuda = device_type == "cuda"
    for be in backends:
        model = None
        if is_model:
            step, model = _model_step(args, device, dtype, be)
        else:
            step = workloads.make(args.target, device, dtype, "auto" if be == "eager" else be,
                                  size=args.size, grad=args.mode in ("fwd+bwd", "train"))
        profiling.profile_steps(step, warmup=args.warmup, iters=args.iters, model=model, cuda=cuda)
        what = f"{args.target} ({args.mode})"
        print(f"profiled {args.iters} steps of {what} on {be} ({device}, {args.dtype}) after "
              f"{args.warmup} warm-up steps" + ("; CUDA profiler range around them" if cuda else ""))
    command = "dlh profile " + " ".join(args.argv)
    if is_model:
        focus = type(model).__name__  # the root range of the model's layers
    else:
        focus = workloads.range_name(args.target, next((b for b in backends if b != "eager"), "torch"))
    print(f"\nNVTX domain: {profiling.domain() or 'default (the nvtx package is not importable)'}; "
          f"recipes:\n" + profiling.recipes(args.target, command, focus))
    return 0


def _model_step(args, device, dtype, backend):
    """(step, model) for `dlh profile <model>`: a train step or one sampling call, on the model
    patched with dlh's ``backend`` (``eager``: not patched)."""
    import torch

    import dlh_kernels as dlh
    from dlh_kernels import models
    model = models.build(args.target, small=args.size == "tiny").to(device)
    if backend != "eager":
        dlh.patch(model, backend=backend)
    if args.mode == "sample":
        model.eval()
        gen = torch.Generator(device=device).manual_seed(0)

        def step():
            with torch.no_grad():
                return models.sample(args.target, model, args.batch, device=device, steps=args.steps,
                                     generator=gen)
        return step, model
    batch = models.example_batch(args.target, args.batch, device=device, small=args.size == "tiny")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model.train()
    autocast = torch.autocast(device_type=torch.device(device).type, dtype=dtype,
                              enabled=dtype != torch.float32)

    def step():
        with autocast:
            return models.train_step(args.target, model, opt, batch)
    return step, model


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
    p = sub.add_parser("coverage", help="how much of a model's forward dlh.patch puts on dlh ops "
                                        "(tiny random-init transformers/diffusers models and ours)")
    p.add_argument("models", nargs="*", help="default: all (see dlh_kernels.coverage.TINY and the reference models)")
    p.add_argument("--backend", default=None, help="backend of the patched modules (default: auto)")
    p.set_defaults(fn=_coverage)
    p = sub.add_parser("profile", help="an Nsight-friendly run of one op or model: NVTX ranges, "
                                       "measured steps between cudaProfilerStart/Stop")
    p.add_argument("target", nargs="?", default="layer_norm",
                   help="an op (layer_norm, gelu, attention, ...) or a reference model (gpt, ...)")
    p.add_argument("--backend", nargs="*", help="backends to run in turn (default: every available "
                                                "one); models also take eager (not patched)")
    p.add_argument("--mode", default=None, choices=("fwd", "fwd+bwd", "train", "sample"),
                   help="ops: fwd or fwd+bwd (default); models: train (default) or sample")
    p.add_argument("--iters", type=int, default=10, help="measured steps (default 10)")
    p.add_argument("--warmup", type=int, default=3, help="warm-up steps, outside the profile")
    p.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "fp32"))
    p.add_argument("--device", default=None, help="default: cuda; cpu for a dry run of the ranges")
    p.add_argument("--size", default="default", choices=("default", "tiny"))
    p.add_argument("--batch", type=int, default=8, help="models: batch size (default 8)")
    p.add_argument("--steps", type=int, default=None, help="models, sample mode: sampling steps")
    p.set_defaults(fn=_profile)
    from dlh_kernels.models.cli import add_parsers as add_model_parsers
    add_model_parsers(sub)  # train, sample, compare (logic in models/)
    args = parser.parse_args(argv)
    if args.command == "profile":
        args.argv = argv[1:]
        if args.mode is None:
            args.mode = "train" if args.target in _model_names() else "fwd+bwd"
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
