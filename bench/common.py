"""The shared benchmark harness: ceilings, timing, run metadata, result files.

Every benchmark in bench/ follows one pattern (STYLE.md point 6): measure the device's ceilings
first, time the providers side by side, report p50 (p20, p80) next to the bytes or FLOPs the op
must move or do and that as a % of the measured ceiling, and write CSV + JSON rows tagged with
the run's metadata (GPU, driver, versions, git sha, date), plus a plot.

Nothing here imports Triton at module level: on a machine without a GPU the Triton interpreter
must be switched on before the first Triton kernel is defined (see `bench.main`).
"""
from __future__ import annotations

import csv
import datetime
import importlib.metadata
import itertools
import json
import math
import os
import platform
import re
import socket
import subprocess
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

import torch

QUANTILES = (0.5, 0.2, 0.8)  # reported as p50, p20, p80
REPO_ROOT = Path(__file__).resolve().parent.parent  # the checkout, for an editable install


def has_gpu() -> bool:
    return torch.cuda.is_available()


# ---------------------------------------------------------------------------------------------
# Timing

def time_ms(fn: Callable[[], object], *, warmup: int = 25, rep: int = 100) -> tuple[float, float, float]:
    """(p50, p20, p80) device time of one ``fn()`` in ms; ``warmup``/``rep`` are in ms.

    `triton.testing.do_bench` times each call with CUDA events and flushes L2 between calls;
    CUDA events alone when Triton is missing.
    """
    try:
        from triton.testing import do_bench
    except ImportError:
        return _time_ms_events(fn, warmup, rep)
    p50, p20, p80 = do_bench(fn, warmup=warmup, rep=rep, quantiles=list(QUANTILES))
    return p50, p20, p80


def _time_ms_events(fn, warmup: int, rep: int) -> tuple[float, float, float]:
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(5):
        fn()
    end.record()
    torch.cuda.synchronize()
    estimate = max(start.elapsed_time(end) / 5, 1e-3)
    for _ in range(max(1, int(warmup / estimate))):
        fn()
    n = max(5, int(rep / estimate))
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(n)]
    for s, e in events:
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize()
    times = torch.tensor([s.elapsed_time(e) for s, e in events])
    return tuple(torch.quantile(times, torch.tensor(QUANTILES)).tolist())


def l2_bytes() -> int:
    return getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 50 << 20)


def rotation_count(set_bytes: int, cap: int = 32) -> int:
    """How many input sets to cycle through so that, together, they exceed 2x L2.

    One set already past 2x L2 needs no rotation: each call then streams from DRAM anyway.
    """
    return max(1, min(cap, math.ceil(2 * l2_bytes() / max(set_bytes, 1))))


def rotating(fn: Callable, input_sets: Sequence[tuple]) -> Callable[[], object]:
    """``fn(*s)`` for the next input set ``s`` on each call, so repeated runs don't time the cache."""
    sets = itertools.cycle(input_sets)
    return lambda: fn(*next(sets))


# ---------------------------------------------------------------------------------------------
# Ceilings: what this device can do at best, measured at the start of every run

def measure_ceilings() -> dict[str, float]:
    """Device-to-device copy bandwidth (GB/s) and bf16 matmul rate (TFLOP/s) on this GPU."""
    ceilings = {"copy_gbps": _copy_gbps(), "matmul_bf16_tflops": _matmul_tflops()}
    torch.cuda.empty_cache()
    return ceilings


def _copy_gbps(nbytes: int = 1 << 30) -> float:
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda").random_()  # never time zeros
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), warmup=100, rep=300)[0]
    return 2 * nbytes / (ms * 1e-3) / 1e9  # a copy reads every byte once and writes it once


def _matmul_tflops(size: int = 8192) -> float:
    a, b = (torch.randn(size, size, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    c = torch.empty_like(a)
    # long warm-up: the SM clock ramps up under a sustained matmul load
    ms = time_ms(lambda: torch.matmul(a, b, out=c), warmup=300, rep=300)[0]
    return 2 * size**3 / (ms * 1e-3) / 1e12  # one multiply-add (2 FLOPs) per (i, j, k)


# ---------------------------------------------------------------------------------------------
# Run metadata: tagged onto every result row

def _run(cmd: Sequence[str]) -> Optional[str]:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=20, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def git_sha() -> str:
    """The checkout's commit (+dirty); DLH_GIT_SHA where the tree travelled without its .git."""
    if os.environ.get("DLH_GIT_SHA"):
        return os.environ["DLH_GIT_SHA"]
    sha = _run(["git", "-C", str(REPO_ROOT), "rev-parse", "--short=12", "HEAD"])
    if sha is None:
        return "unknown"
    dirty = _run(["git", "-C", str(REPO_ROOT), "status", "--porcelain", "--untracked-files=no"])
    return sha + ("+dirty" if dirty else "")


def gpu_name() -> str:
    return torch.cuda.get_device_name(0) if has_gpu() else "cpu"


def run_metadata(ceilings: Optional[dict] = None) -> dict:
    meta = {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "hostname": socket.gethostname(),
        "device": gpu_name(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "dlh_kernels": _version("dlh-kernels"),
        "git_sha": git_sha(),
    }
    if has_gpu():
        props = torch.cuda.get_device_properties(0)
        driver = _run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
        meta.update({
            "driver": driver.splitlines()[0] if driver else "unknown (no nvidia-smi)",
            "cuda_runtime": torch.version.cuda,
            "compute_capability": f"{props.major}.{props.minor}",
            "sm_count": props.multi_processor_count,
            "gpu_memory_gib": round(props.total_memory / 2**30, 1),
            "l2_mib": round(l2_bytes() / 2**20, 1),
        })
    meta.update({k: round(v, 1) for k, v in (ceilings or {}).items()})
    return meta


def default_out_dir() -> Path:
    """bench/results/<date>-<gpu>/ under the current directory (the repo root, usually)."""
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    slug = re.sub(r"[^a-z0-9]+", "-", gpu_name().lower()).strip("-")
    return Path("bench") / "results" / f"{date}-{slug}"


# ---------------------------------------------------------------------------------------------
# Output: a table on stdout, CSV + JSON + PNG on disk

def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def format_table(rows: Iterable[dict], columns: dict[str, str]) -> str:
    """Aligned text table; ``columns`` maps row key -> header."""
    body = [[_cell(row.get(key)) for key in columns] for row in rows]
    table = [list(columns.values())] + body
    widths = [max(len(line[i]) for line in table) for i in range(len(columns))]
    lines = ["  ".join(cell.rjust(w) for cell, w in zip(line, widths)) for line in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def write_results(rows: list[dict], meta: dict, out_dir: Path, name: str, extra: Optional[dict] = None) -> list[Path]:
    """``<name>.csv`` and ``<name>.json`` under ``out_dir``, every row tagged with ``meta``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tagged = [{**row, **meta} for row in rows]
    columns = list(dict.fromkeys(key for row in tagged for key in row))
    csv_path, json_path = out_dir / f"{name}.csv", out_dir / f"{name}.json"
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(tagged)
    with open(json_path, "w") as f:
        json.dump({"meta": meta, **(extra or {}), "rows": tagged}, f, indent=1)
    return [csv_path, json_path]


def plot_lines(rows: list[dict], path: Path, *, panel: Callable[[dict], str], series: str, x: str,
               y: str, xlabel: str, ylabel: str, title: str, hline: Optional[float] = None,
               hline_label: str = "") -> Optional[Path]:
    """One panel per ``panel(row)``, one line per ``row[series]``; None when matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"note: matplotlib is not importable, so no plot ({path.name}); the CSV/JSON hold the numbers")
        return None
    panels = list(dict.fromkeys(panel(r) for r in rows))
    if not panels:
        return None
    cols = min(2, len(panels))
    nrows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(6.5 * cols, 4 * nrows), squeeze=False)
    for ax, name in zip(axes.flat, panels):
        sub = [r for r in rows if panel(r) == name]
        for label in dict.fromkeys(r[series] for r in sub):
            pts = sorted((r[x], r[y]) for r in sub if r[series] == label)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
        if hline:
            ax.axhline(hline, color="gray", linestyle="--", label=hline_label)
        ax.set_xscale("log", base=2)
        ax.set(title=name, xlabel=xlabel, ylabel=ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
