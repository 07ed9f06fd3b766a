"""Cold start: how long the first call of each op takes in a fresh process, with empty caches
and again with the caches the first process left.

What a first call pays, beyond the steady-state time: importing dlh_kernels (and Triton), the
Triton compile of every kernel it launches (or a read of Triton's cache of compiled kernels,
TRITON_CACHE_DIR), the autotuning of the autotuned kernels (linear_gelu, attention, conv2d:
every config compiled and timed, unless dlh's cache of autotuning choices, DLH_CACHE_DIR, has
this shape's choice), cuBLAS/cuDNN handle creation and the caching allocator's first blocks.

Per op and backend, two fresh processes in turn, sharing one pair of cache directories made
empty for the first:
  cold   empty DLH_CACHE_DIR and TRITON_CACHE_DIR: compile (and autotune) everything
  warm   the same directories, as the cold process left them: what a second run pays
Each process reports: import_s (import dlh_kernels), setup_s (inputs made, the device ready:
CUDA context, so that it stays out of the first call), first_s (the first call, synchronised),
second_ms (the second call). The CUDA context is a per-process cost of any CUDA program, so it
is reported apart (in setup_s), not in first_s.

On a CPU with the Triton interpreter (TRITON_INTERPRET=1, CPU tensors) the same runs work and
the interpreter's first call has nothing to compile: that mode exists so the machinery is
tested without a GPU, and its numbers are not GPU results.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional, Sequence

QUICK_OPS = ("layer_norm", "gelu", "linear_gelu", "attention", "group_norm", "conv2d", "diffusion_step")
MARK = "DLH_COLDSTART "  # the child's result line


# The child: a fresh interpreter timing `import dlh_kernels` (torch included) before anything
# else is imported, then `main` with the remaining arguments.
_CHILD = ("import sys, time; t0 = time.perf_counter(); import dlh_kernels; "
          "t = time.perf_counter() - t0; from dlh_kernels.bench.coldstart import main; "
          "sys.exit(main(sys.argv[1:], import_s=t))")


def _child(op: str, device: str, dtype: str, backend: str, size: str, grad: bool, import_s: float) -> dict:
    """In the fresh process, after the import: set up, time the first and the second call."""
    import torch

    from dlh_kernels.bench import common, workloads
    cuda = device == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    t0 = time.perf_counter()
    if cuda:
        torch.zeros(1, device="cuda")  # the CUDA context
    call = workloads.make(op, device, common.DTYPES[dtype], backend, size, grad)
    sync()
    setup_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    call()
    sync()
    first_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    call()
    sync()
    second_ms = (time.perf_counter() - t0) * 1e3
    return {"import_s": import_s, "setup_s": setup_s, "first_s": first_s, "second_ms": second_ms}


def one_process(op: str, *, device: str, dtype: str, backend: str, size: str, grad: bool,
                cache: Path, timeout: float = 300) -> dict:
    """Run `_child` in a fresh Python with DLH_CACHE_DIR / TRITON_CACHE_DIR under ``cache``;
    its result dict, or {"error": why}."""
    env = dict(os.environ, DLH_CACHE_DIR=str(cache / "dlh"), TRITON_CACHE_DIR=str(cache / "triton"),
               PYTHONUNBUFFERED="1")
    if device == "cpu" and backend == "triton":
        env["TRITON_INTERPRET"] = "1"
    cmd = [sys.executable, "-c", _CHILD, "--child", op, "--device", device,
           "--dtype", dtype, "--backend", backend, "--size", size] + (["--grad"] if grad else [])
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    wall = time.perf_counter() - t0
    for line in proc.stdout.splitlines():
        if line.startswith(MARK):
            return dict(json.loads(line[len(MARK):]), process_s=wall)
    tail = (proc.stderr or proc.stdout).strip().splitlines()
    return {"error": f"exit {proc.returncode}: {tail[-1] if tail else 'no output'}"[:200]}


def run(*, ops: Sequence[str] = QUICK_OPS, device: Optional[str] = None, dtype: str = "bf16",
        backends: Optional[Sequence[str]] = None, size: str = "default", grad: bool = True,
        out: Optional[Path] = None, timeout: float = 300) -> int:
    """Cold and warm first calls of ``ops`` on each backend; rows printed and written as
    ``coldstart.csv/json`` under ``out``. 0, or 1 when any process failed."""
    import torch

    from . import common
    device = device or ("cuda" if common.has_gpu() else "cpu")
    if backends is None:
        import dlh_kernels as dlh
        backends = [b for b, s in dlh.backends().items() if s == "available" and b != "torch"] \
            if device == "cuda" else ["triton"]
    label = "" if device == "cuda" else " (CPU, Triton interpreter: NOT a GPU result)"
    print(f"\ncold start{label}: first call in a fresh process, empty caches then warm; "
          f"{', '.join(ops)} on {', '.join(backends)}, {dtype}, {'fwd+bwd' if grad else 'fwd'}", flush=True)
    rows, failed = [], 0
    try:
        for backend in backends:
            for op in ops:
                with tempfile.TemporaryDirectory(prefix="dlh_coldstart_") as tmp:
                    res = {}
                    for phase in ("cold", "warm"):
                        res[phase] = one_process(op, device=device, dtype=dtype, backend=backend, size=size,
                                                 grad=grad and op != "diffusion_step", cache=Path(tmp),
                                                 timeout=timeout)
                    cached = sum(1 for _ in (Path(tmp) / "dlh" / "autotune").glob("*.json")) \
                        if (Path(tmp) / "dlh" / "autotune").is_dir() else 0
                cold, warm = res["cold"], res["warm"]
                if "error" in cold or "error" in warm:
                    failed += 1
                    print(f"  {op} {backend}: {cold.get('error') or warm.get('error')}")
                    continue
                row = {"op": op, "backend": backend, "device": device, "dtype": dtype, "size": size,
                       "mode": "fwd+bwd" if grad and op != "diffusion_step" else "fwd",
                       "import_s": cold["import_s"], "setup_s": cold["setup_s"],
                       "cold_first_s": cold["first_s"], "warm_first_s": warm["first_s"],
                       "second_ms": warm["second_ms"], "cold_process_s": cold["process_s"],
                       "warm_process_s": warm["process_s"], "autotune_files": cached}
                rows.append(row)
                print(f"  {op:>15} {backend:>6}  cold first call {row['cold_first_s']:7.2f} s  warm "
                      f"{row['warm_first_s']:7.2f} s  then {row['second_ms']:8.3f} ms", flush=True)
    except KeyboardInterrupt:
        print("\ninterrupted: writing the rows measured so far")
        failed += 1
    print(common.format_table(rows, {"op": "op", "backend": "backend", "import_s": "import s",
                                     "setup_s": "setup s", "cold_first_s": "cold first s",
                                     "warm_first_s": "warm first s", "second_ms": "2nd call ms",
                                     "autotune_files": "autotune files"}))
    if out is not None and rows:
        name = "coldstart" if device == "cuda" else "coldstart_cpu"
        common.write_results(rows, common.run_metadata(), out, name)
        print(f"results in {out}/{name}.*")
    del torch
    return 1 if failed or not rows else 0


def main(argv: Optional[Sequence[str]] = None, import_s: float = float("nan")) -> int:
    p = argparse.ArgumentParser(description="one cold-start measurement (the child process)")
    p.add_argument("--child", required=True)
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bf16")
    p.add_argument("--backend", default="triton")
    p.add_argument("--size", default="default")
    p.add_argument("--grad", action="store_true")
    a = p.parse_args(argv)
    res = _child(a.child, a.device, a.dtype, a.backend, a.size, a.grad, import_s)
    print(MARK + json.dumps(res), flush=True)
    return 0

