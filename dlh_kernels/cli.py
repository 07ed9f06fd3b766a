"""The `dlh` console command: info, check, bench, profile."""
from __future__ import annotations

import argparse
import contextlib
import os
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
    """`dlh check`: every op on every backend that runs here against float64 (see
    dlh_kernels.check); on CPU the Triton interpreter and the CUDA emulation included."""
    from dlh_kernels import check
    choices = {"--ops": check.OPS, "--backends": check.backend_choices()}
    picked = {}
    for flag, valid in choices.items():
        names = [n for v in (getattr(args, flag[2:]) or []) for n in v.split(",") if n]
        unknown = [n for n in names if n not in valid]
        if unknown:
            print(f"dlh check: {flag}: unknown {', '.join(map(repr, unknown))}; choose from "
                  f"{', '.join(valid)}", file=sys.stderr)
            return 2
        picked[flag] = names or None
    argv = [*(["--ops", *picked["--ops"]] if picked["--ops"] else []),
            *(["--backends", *picked["--backends"]] if picked["--backends"] else []),
            *(["--quick"] if args.quick else [])]
    rc = check.ensure_interpreter(argv)  # CPU only: TRITON_INTERPRET=1 (or a fresh process with it)
    if rc is not None:
        return rc
    print(check.interpreter_note(), flush=True)
    progress = None
    if sys.stderr.isatty():
        def progress(op):
            print(f"\rchecking {op:40}", end="", file=sys.stderr, flush=True)
    rows = check.run_check(ops=picked["--ops"], backends=picked["--backends"], quick=args.quick,
                           progress=progress)
    if progress is not None:
        print("\r" + " " * 50 + "\r", end="", file=sys.stderr, flush=True)
    print(check.format_rows(rows))
    print(check.summary(rows))
    return 1 if any(r["ok"] is False for r in rows) else 0


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
    is_model = args.target in _model_names()
    if not is_model and args.target not in workloads.OPS:
        raise ValueError(f"unknown target {args.target!r}; ops: {', '.join(workloads.OPS)}; "
                         f"models: {', '.join(_model_names()) or '(dlh_kernels.models is not importable)'}")
    device = args.device or ("cuda" if torch.cuda.is_available() else None)
    recipe_argv = _recipe_argv(args.argv)
    command = "dlh profile " + " ".join(recipe_argv)
    if device is None:
        print("dlh profile: no CUDA GPU here; run it under Nsight on a GPU machine (or pass "
              "--device cpu for a dry run of the ranges), e.g.\n" + profiling.recipes(
                  args.target, command))
        return 2
    _check_device(device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    device_type = torch.device(device).type
    status = {b: dlh._backend.unavailable_reason(b, device_type) for b in dlh._backend.BACKENDS}
    backends = args.backend or [b for b, why in status.items() if why is None]
    for b in backends:
        if b not in ("eager", "auto") and status.get(b, "unknown backend") is not None:
            raise ValueError(f"--backend {b} cannot run on {device_type}: {status.get(b, 'unknown backend')}")
    cuda = device_type == "cuda"
    total = args.warmup + args.iters
    for be in backends:
        model = None
        if not cuda:
            print(f"{args.target} ({args.mode}) on {be}: building ...", flush=True)
        if is_model:
            step, model = _model_step(args, device, dtype, be)
        else:
            step = workloads.make(args.target, device, dtype, "auto" if be == "eager" else be,
                                  size=args.size, grad=args.mode in ("fwd+bwd", "train"))
        if not cuda:  # a dry run on the CPU can take a while: say where it is
            step = _with_progress(step, f"{args.target} on {be}", args.warmup, total)
        with _recorded_ranges(profiling) as names:
            profiling.profile_steps(step, warmup=args.warmup, iters=args.iters, model=model, cuda=cuda)
        what = f"{args.target} ({args.mode})"
        print(f"profiled {args.iters} steps of {what} on {be} ({device}, {args.dtype}) after "
              f"{args.warmup} warm-up steps" + ("; CUDA profiler range around them" if cuda else ""))
        if not cuda:
            print(_format_ranges(names, args.iters))
    if is_model:
        focus = type(model).__name__  # the root range of the model's layers
    else:
        focus = workloads.range_name(args.target, next((b for b in backends if b != "eager"), "torch"))
    note = ""
    if recipe_argv != list(args.argv):
        note = (f" (without --device {args.device}: under Nsight the run must put its kernels "
                f"on the GPU, the default device)")
    print(f"\nNVTX domain: {profiling.domain() or 'default (the nvtx package is not importable)'}; "
          f"recipes{note}:\n" + profiling.recipes(args.target, command, focus))
    return 0


def _check_device(device: str) -> None:
    """A plain ValueError naming --device when ``device`` cannot run here."""
    try:
        from dlh_kernels.models.train import check_device
    except ImportError:  # the models package is optional here
        return
    check_device(device)


def _recipe_argv(argv: list) -> list:
    """``dlh profile``'s arguments for the Nsight recipes: a non-CUDA ``--device`` dropped (a
    profiler of GPU kernels has nothing to record on the CPU; the default device is cuda)."""
    out, i = [], 0
    while i < len(argv):
        a = argv[i]
        if a == "--device" and i + 1 < len(argv) and not argv[i + 1].startswith("cuda"):
            i += 2
            continue
        if a.startswith("--device=") and not a.split("=", 1)[1].startswith("cuda"):
            i += 1
            continue
        out.append(a)
        i += 1
    return out


def _with_progress(step, label: str, warmup: int, total: int):
    """``step`` printing one line per call: which of the warm-up / measured steps, how long."""
    import time
    count = [0]

    def run():
        count[0] += 1
        i = count[0]
        start = time.perf_counter()
        out = step()
        phase = f"warm-up {i}/{warmup}" if i <= warmup else f"measured {i - warmup}/{total - warmup}"
        print(f"  {label}: {phase} ({time.perf_counter() - start:.2f} s)", flush=True)
        return out
    return run


@contextlib.contextmanager
def _recorded_ranges(profiling):
    """The names of the NVTX ranges pushed inside the block, in order (they still reach NVTX)."""
    profiling._resolve()
    push, names = profiling._push, []

    def record(name):
        names.append(name)
        push(name)
    profiling._push = record
    try:
        yield names
    finally:
        profiling._push = push


def _format_ranges(names: list, iters: int) -> str:
    """What a dry run recorded: the op ranges with their counts, the layer ranges summarised."""
    import collections
    counts = collections.Counter(names)
    steps = [n for n in counts if n.startswith("dlh::step ")]
    ops = [n for n in counts if n.startswith("dlh::") and n not in steps]
    layers = [n for n in counts if not n.startswith("dlh::")]
    lines = [f"NVTX ranges recorded in the {iters} measured steps ({len(names)} in all):"]
    if steps:
        lines.append(f"  {steps[0]} .. {steps[-1]}: one per step" if len(steps) > 1 else f"  {steps[0]}")
    for n in ops:
        lines.append(f"  {n}: {counts[n]} ({counts[n] / max(1, iters):g} per step)")
    if layers:
        shown = ", ".join(layers[:4]) + (", ..." if len(layers) > 4 else "")
        lines.append(f"  model layers: {len(layers)} module ranges ({shown}), "
                     f"{sum(counts[n] for n in layers)} calls")
    if not ops:
        lines.append("  (no dlh::<op> range: no call went through a dlh op)")
    return "\n".join(lines)


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


class _Parser(argparse.ArgumentParser):
    """argparse with a short usage error: ``dlh <command>: <message>`` and where the help is
    (exit 2), not the whole usage block."""

    def error(self, message):
        self.exit(2, f"{self.prog}: {message}\n(see {self.prog} --help)\n")


# Errors of the commands that mean "the arguments are wrong" (exit 2, like argparse's); any other
# exception exits 1. Either way one line names the command and the problem, a second says how
# to see the trace.
USAGE_ERRORS = (ValueError, TypeError, FileNotFoundError, NotADirectoryError, IsADirectoryError,
                argparse.ArgumentTypeError)


def _global_options(argv: list) -> tuple[list, bool]:
    """Strip the global options before the command (``--traceback``); (rest, traceback)."""
    traceback = os.environ.get("DLH_TRACEBACK", "0") not in ("", "0")
    while argv[:1] == ["--traceback"]:
        argv, traceback = argv[1:], True
    return argv, traceback


def _report(command: str, exc: BaseException) -> int:
    """Print the short form of ``exc`` to stderr; the exit code."""
    if isinstance(exc, KeyboardInterrupt):
        print(f"dlh {command}: interrupted", file=sys.stderr)
        return 130
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    message = lines[0] if lines else type(exc).__name__
    usage = isinstance(exc, USAGE_ERRORS)
    if not usage and not message.startswith(type(exc).__name__):
        message = f"{message} ({type(exc).__name__})"
    print(f"dlh {command}: {message}\n(the full trace: dlh --traceback {command} ... or "
          f"DLH_TRACEBACK=1)", file=sys.stderr)
    return 2 if usage else 1


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    argv, traceback = _global_options(argv)
    command = argv[0] if argv and not argv[0].startswith("-") else "dlh"
    try:
        return _main(argv)
    except SystemExit:
        raise
    except BrokenPipeError:  # `dlh ... | head`: the reader is gone, nothing left to say
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        sys.exit(1)
    except (Exception, KeyboardInterrupt) as exc:
        if traceback:
            raise
        sys.exit(_report(command, exc))


def _main(argv: list) -> int:
    if argv[:1] == ["bench"]:  # its own parser (dlh bench --help)
        from dlh_kernels.bench import main as bench_main
        return bench_main(argv[1:])
    parser = _Parser(prog="dlh", description="dlh-kernels: kernels, checks, benchmarks",
                     epilog="errors are one line; dlh --traceback <command> ... (or DLH_TRACEBACK=1) "
                            "shows the full Python trace")
    parser.add_argument("--traceback", action="store_true",
                        help="on an error, the full Python trace (also DLH_TRACEBACK=1); before the command")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    sub.add_parser("info", help="device, backends, build").set_defaults(fn=_info)
    p = sub.add_parser("check", help="every op on every available backend against float64 eager")
    p.add_argument("--ops", nargs="*", help="ops to check (default: all; see dlh_kernels.check.OPS)")
    p.add_argument("--backends", nargs="*", help="triton, cuda, torch (default: all)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true",
                      help="per op, backend and dtype only the first case that backend runs")
    mode.add_argument("--full", dest="quick", action="store_false",
                      help="every case (the default; on a GPU also the large GPU cases)")
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
