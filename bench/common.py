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
import time
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence, Union

import torch

QUANTILES = (0.5, 0.2, 0.8)  # reported as p50, p20, p80
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}  # --dtype
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


def time_ms_resetting(fn: Callable, reset: Callable, sets: list, *, warmup: int, rep: int):
    """(p50, p20, p80) ms of ``fn(s)`` over the rotating sets, ``reset(s)`` before every call.

    For a provider that writes over its inputs: without the reset each set would go through
    hundreds of backward passes and the timing would end on zeros. As in do_bench, CUDA events
    bracket ``fn`` alone, and L2 is flushed between calls (after the reset, whose writes would
    otherwise leave the inputs in cache).
    """
    flush = torch.empty(max(256 << 20, 2 * l2_bytes()), dtype=torch.int8, device="cuda")
    cycle = itertools.cycle(sets)

    def one(events=None):
        s = next(cycle)
        reset(s)
        flush.zero_()
        if events:
            events[0].record()
        fn(s)
        if events:
            events[1].record()

    def timed(n):
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                  for _ in range(n)]
        for e in events:
            one(e)
        torch.cuda.synchronize()
        return torch.tensor([s.elapsed_time(e) for s, e in events])

    estimate = max(timed(5).median().item(), 1e-3)
    for _ in range(max(1, int(warmup / estimate))):
        one()
    times = timed(max(10, int(rep / estimate)))
    return tuple(torch.quantile(times, torch.tensor(QUANTILES)).tolist())


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


def _matmul_tflops(size: int = 8192, dtype: torch.dtype = torch.bfloat16) -> float:
    a, b = (torch.randn(size, size, device="cuda", dtype=dtype) for _ in range(2))
    c = torch.empty_like(a)
    # long warm-up: the SM clock ramps up under a sustained matmul load
    ms = time_ms(lambda: torch.matmul(a, b, out=c), warmup=300, rep=300)[0]
    return 2 * size**3 / (ms * 1e-3) / 1e12  # one multiply-add (2 FLOPs) per (i, j, k)


def matmul_ceiling(dtype: str, ceilings: dict) -> tuple[str, float]:
    """(name, TFLOP/s) of the large-matmul ceiling in the run's dtype (bf16: the common one)."""
    if dtype == "bf16":
        return "matmul_bf16_tflops", ceilings["matmul_bf16_tflops"]
    return f"matmul_{dtype}_tflops", _matmul_tflops(dtype=DTYPES[dtype])


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


def side_by_side(rows: Iterable[dict], keys: Sequence[str], cell: Callable[[dict], str]) -> list[dict]:
    """One table line per distinct ``keys`` of the rows (first seen first), holding those keys
    and, under each row's provider, ``cell(row)``: the providers side by side, shape by shape."""
    rows = list(rows)
    table = []
    for shape in dict.fromkeys(tuple(r[k] for k in keys) for r in rows):
        line = dict(zip(keys, shape))
        for r in rows:
            if tuple(r[k] for k in keys) == shape:
                line[r["provider"]] = cell(r)
        table.append(line)
    return table


def gbps_summary(rows: list[dict], copy_gbps: float, ops: Iterable[str], modes: Iterable[str],
                 providers: Sequence[str], label: Callable[[str], str] = str) -> str:
    """GB/s (% of copy) per shape, providers side by side, one block per (op, mode): the summary
    of a memory-bound sweep whose rows hold op, mode, provider, case, M, N, gbps and pct_copy.
    ``label(op)`` names the op in the blocks' headers."""
    blocks = []
    names = [p for p in providers if any(r["provider"] == p for r in rows)]
    for op in ops:
        for mode in modes:
            sub = [r for r in rows if r["op"] == op and r["mode"] == mode]
            if not sub:
                continue
            table = side_by_side(sub, ("case", "M", "N"), lambda r: f"{r['gbps']:.0f} ({r['pct_copy']:.0f}%)")
            header = f"{label(op)} {mode}: GB/s (% of the {copy_gbps:,.0f} GB/s copy)"
            blocks.append(header + "\n" + format_table(
                table, {"case": "case", "M": "M", "N": "N", **{p: p for p in names}}))
    return "\n\n".join(blocks)


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



def save_figure(fig, path: Path, title: Optional[str] = None) -> Path:
    """Lay out, write (creating the folder) and close a matplotlib figure; returns path."""
    import matplotlib.pyplot as plt
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path

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
    return save_figure(fig, path, title)


# ---------------------------------------------------------------------------------------------
# Providers: the parts every benchmark's list of them shares. A provider that cannot run on
# this machine is the reason why (a str), reported as a skip.

def short_error(exc: BaseException) -> str:
    """``Class: first line of the message``, at most 160 characters: a skip's reason."""
    msg = str(exc).strip().splitlines()
    return f"{exc.__class__.__name__}: {msg[0] if msg else ''}"[:160]


def not_importable(package: str, exc: BaseException) -> str:
    """The reason a peer (Liger, Apex, ...) is skipped when importing it raised ``exc``."""
    return f"{package} is not importable ({exc.__class__.__name__}: {exc})"


def dlh_functional(backend: str):
    """``dlh_kernels.functional`` when dlh's ``backend`` is available here, else the reason (a str)."""
    try:
        import dlh_kernels as dlh
        import dlh_kernels.functional as DF
    except Exception as exc:
        return f"dlh_kernels.functional is not importable ({short_error(exc)})"
    status = dlh.backends().get(backend, "unknown backend")
    if status != "available":
        return status
    return DF


# `dlh bench --smoke` (the first GPU command of a session): one shape per benchmark and no
# torch.compile provider, whose first compile of a shape takes longer than the whole row.
SMOKE = False
SMOKE_SKIP = "not run with --smoke (its compile time exceeds the row's budget)"


def smoke(shapes: list) -> list:
    """The shapes to bench: all of them, or with --smoke the first one only."""
    return list(shapes)[:1] if SMOKE else list(shapes)


def compiled(fn: Callable) -> Union[Callable, str]:
    """``torch.compile(fn, dynamic=False)``: one graph per shape (and per requires_grad, ...);
    with --smoke the reason it is skipped instead.

    Dynamo's recompile limit is raised so that it never falls back to eager halfway through the
    sweep (that would time eager under the torch.compile label).
    """
    if SMOKE:
        return SMOKE_SKIP
    cfg = torch._dynamo.config
    setattr(cfg, "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit", 256)
    return torch.compile(fn, dynamic=False)


def compiled_module(model: torch.nn.Module, mode: str = "default") -> torch.nn.Module:
    """``model`` with its ``forward`` compiled in place (same object, parameters and attributes),
    and so are its direct children's, for models whose train step or sampler calls them rather
    than the top-level forward (a GAN's generator and discriminator, a VAE's decoder); a child
    called from a compiled parent is traced into the parent's graph. ``mode``: torch.compile's
    mode ("reduce-overhead": CUDA graphs). (Not `nn.Module.compile`: with torch 2.13 on CPU its
    first call ran eagerly, no graph captured.)"""
    cfg = torch._dynamo.config
    setattr(cfg, "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit", 256)
    kwargs = {} if mode == "default" else {"mode": mode}
    for module in [c for c in model.children() if any(True for _ in c.parameters())] + [model]:
        module.forward = torch.compile(module.forward, dynamic=False, **kwargs)
    return model


def max_rel_err(y: torch.Tensor, ref: torch.Tensor, chunk: int = 1 << 24) -> float:
    """max |y - ref| / (1 + |ref|): about one bf16 ulp between correct kernels.

    In float32, a slice of rows at a time: at the largest shape whole-tensor temporaries would
    take tens of GiB."""
    y, ref = y.reshape(-1, y.shape[-1]), ref.reshape(-1, ref.shape[-1])
    rows = max(1, chunk // max(1, y.shape[-1]))
    err = 0.0
    for i in range(0, y.shape[0], rows):
        a, r = y[i:i + rows].float(), ref[i:i + rows].float()
        chunk_err = ((a - r).abs() / (1 + r.abs())).max().item()
        if chunk_err != chunk_err:  # NaN: Python's max() would drop it
            return chunk_err
        err = max(err, chunk_err)
    return err


def memory_shortfall(need: int) -> Optional[str]:
    """None if ``need`` bytes fit in the device's free memory, else why not (a skip's reason)."""
    free = torch.cuda.mem_get_info()[0]
    if need > free:
        return f"needs about {need / 2**30:.0f} GiB, {free / 2**30:.0f} GiB free"
    return None


# ---------------------------------------------------------------------------------------------
# The run: ceilings, then shapes x providers into a Sweep, then its files and summary

class Sweep:
    """The rows measured so far, the providers skipped and why, and the timing settings.

    A benchmark subclasses it with its ``name`` (the stem of its result files), a way to bench
    one shape, and its ``plot``; `run_sweep` drives it.
    """

    name = "sweep"

    def __init__(self, dtype: str, warmup_ms: int, rep_ms: int):
        self.dtype, self.torch_dtype = dtype, DTYPES[dtype]
        self.elem = torch.finfo(self.torch_dtype).bits // 8
        self.warmup_ms, self.rep_ms = warmup_ms, rep_ms
        self.rows: list[dict] = []
        self.skipped: dict[str, str] = {}

    def skip(self, what: str, why: str) -> None:
        self.skipped[what] = why
        print(f"skip {what}: {why}")

    def skip_unavailable(self, label: str, provs: dict[str, Union[object, str]]) -> dict:
        """Report each provider that is a reason (a str) as a skip of ``label name``; ``provs``."""
        for name, p in provs.items():
            if isinstance(p, str):
                self.skip(f"{label} {name}", p)
        return provs

    def time(self, fn: Callable[[], object]) -> tuple[float, float, float]:
        """(p50, p20, p80) ms of ``fn()`` with this sweep's warm-up and repetitions."""
        return time_ms(fn, warmup=self.warmup_ms, rep=self.rep_ms)

    def time_sets(self, call: Callable, sets: Sequence[tuple]) -> tuple[float, float, float]:
        """(p50, p20, p80) ms of ``call(*s)`` over the rotating input sets ``sets``, after an
        untimed call on each of the first two: compilation and autotuning stay out of the timing."""
        for s in sets[:2]:
            call(*s)
        return self.time(rotating(call, sets))

    def save(self, meta: dict, out: Path) -> None:
        """``<name>.csv``, ``.json`` (with the skips) and the plot under ``out``; nothing if no rows."""
        if not self.rows:
            return
        write_results(self.rows, meta, out, self.name, extra={"skipped": self.skipped})
        self.plot(meta, out)

    def plot(self, meta: dict, out: Path) -> None:
        """The run's plot, ``out / f"{name}.png"``: none unless a subclass draws one."""

    def title(self, meta: dict) -> str:
        """The plot's title: device, dtype, date and commit."""
        return f"{meta['device']} {self.dtype}, {meta['date_utc']}, git {meta['git_sha']}"


class CopySweep(Sweep):
    """The Sweep of a memory-bound benchmark: its rows' GB/s are held to ``copy_gbps``."""

    def __init__(self, dtype: str, copy_gbps: float, warmup_ms: int, rep_ms: int):
        super().__init__(dtype, warmup_ms, rep_ms)
        self.copy_gbps = copy_gbps

    def rate(self, times: tuple[float, float, float], nbytes: int) -> dict:
        """A row's timing columns: p50/p20/p80 ms of ``times``, the bytes moved ``nbytes``, GB/s
        at p50 and that as a % of the copy ceiling."""
        p50, p20, p80 = times
        gbps = nbytes / (p50 * 1e-3) / 1e9
        return {"p50_ms": p50, "p20_ms": p20, "p80_ms": p80, "bytes": nbytes, "gbps": gbps,
                "pct_copy": 100 * gbps / self.copy_gbps}


class MatmulSweep(Sweep):
    """The Sweep of a compute-bound benchmark: its rows' TFLOP/s are held to ``matmul_tflops``."""

    def __init__(self, dtype: str, matmul_tflops: float, warmup_ms: int, rep_ms: int):
        super().__init__(dtype, warmup_ms, rep_ms)
        self.matmul_tflops = matmul_tflops

    def rate(self, times: tuple[float, float, float], work: float) -> dict:
        """A row's timing columns: p50/p20/p80 ms of ``times``, the FLOPs ``work``, TFLOP/s at
        p50 and that as a % of the matmul ceiling."""
        p50, p20, p80 = times
        tflops = work / (p50 * 1e-3) / 1e12
        return {"p50_ms": p50, "p20_ms": p20, "p80_ms": p80, "flops": work, "tflops": tflops,
                "pct_matmul": 100 * tflops / self.matmul_tflops}

    def add_time_ratio(self, base_provider: str, key: Callable[[dict], tuple], column: str) -> None:
        """rows[column] = the row's p50 over the p50 of ``base_provider``'s row with the same
        ``key`` (None where that provider has no row): the "within x% of the baseline" view."""
        base = {key(r): r["p50_ms"] for r in self.rows if r["provider"] == base_provider}
        for r in self.rows:
            r[column] = r["p50_ms"] / base[key(r)] if key(r) in base else None

    def plot(self, meta: dict, out: Path) -> None:
        """One panel per mode: TFLOP/s against the call's useful FLOPs, a line per provider
        (attention draws its own, against sequence length)."""
        plot_lines(
            self.rows, out / f"{self.name}.png", panel=lambda r: f"{self.name} {r['mode']}",
            series="provider", x="flops", y="tflops", xlabel="useful FLOPs per call",
            ylabel="TFLOP/s", hline=self.matmul_tflops, hline_label="matmul ceiling (8192^3)",
            title=self.title(meta))


def copy_launches(nbytes: list[int], device: str = "cuda") -> tuple[Callable[[], object], list]:
    """Device copies moving ``nbytes[i]`` bytes in launch i (a copy reads n / 2 and writes n / 2),
    each from its own region of a rotating source, as an op's kernels read their own tensors:
    the per-shape ceiling of a memory-bound op. The call, and the buffers it holds (the sources,
    then the destination)."""
    halves = [n // 2 for n in nbytes]
    size = sum(halves)
    srcs = [torch.empty(size, dtype=torch.uint8, device=device).random_()  # never copy zeros
            for _ in range(rotation_count(size))]
    dst = torch.empty(max(halves), dtype=torch.uint8, device=device)

    def copies(src):
        start = 0
        for n in halves:
            dst[:n].copy_(src[start:start + n])
            start += n

    return rotating(copies, [(s,) for s in srcs]), srcs + [dst]


def runnable(provs: dict[str, Union[object, str]]) -> Iterable[tuple[str, object]]:
    """(name, provider) of each provider that can run here: not a reason why not (a str)."""
    return ((name, p) for name, p in provs.items() if not isinstance(p, str))


def run_ops(new_sweep: Callable[[str, float, int, int], CopySweep], ops: Iterable[str],
            providers: Callable[[str], dict], shapes: Callable[[bool], list],
            summary: Callable[[list, float], str], *, quick: bool, dtype: str,
            out: Optional[Path] = None) -> int:
    """`run_sweep` for a memory-bound benchmark of several ops: for each op its ``providers(op)``
    (those that cannot run reported as skips), ``sweep.bench_shape(op, case, M, N, provs)`` for
    every point of ``shapes(quick)``, then the rows so far saved; ``summary(rows, copy_gbps)``
    last. ``new_sweep(dtype, copy_gbps, warmup_ms, rep_ms)``: the benchmark's CopySweep."""
    def body(sweep: CopySweep, save: Callable[[], None]) -> None:
        for op in ops:
            provs = sweep.skip_unavailable(op, providers(op))
            for case, M, N in smoke(shapes(quick)):
                sweep.bench_shape(op, case, M, N, provs)
            save()

    return run_sweep(lambda ceilings, *timing: new_sweep(dtype, ceilings["copy_gbps"], *timing), body,
                     lambda sweep: summary(sweep.rows, sweep.copy_gbps), quick=quick, out=out)


def run_sweep(new_sweep: Callable[[dict, int, int], Sweep], body: Callable[[Sweep, Callable[[], None]], None],
              summary: Callable[[Sweep], str], *, quick: bool, out: Optional[Path] = None,
              matmul_dtype: str = "bf16") -> int:
    """One benchmark run; 0, or 130 when interrupted.

    Measures the ceilings (and the matmul ceiling in ``matmul_dtype``, as
    ``matmul_<dtype>_tflops``) and prints them; ``new_sweep(ceilings, warmup_ms, rep_ms)`` makes
    the Sweep (shorter timings with ``quick``); ``body(sweep, save)`` benches its shapes into
    it and calls ``save()`` whenever the rows so far should be on disk. A KeyboardInterrupt (the
    GPU session's time cap: `timeout -s INT`) saves the rows measured so far and returns 130.
    Either way the row count, where the files are and ``summary(sweep)`` are printed last.
    """
    print("measuring the ceilings (1 GiB device copy, bf16 8192^3 matmul) ...", flush=True)
    ceilings = measure_ceilings()
    key, tflops = matmul_ceiling(matmul_dtype, ceilings)
    ceilings[key] = tflops
    meta = run_metadata(ceilings)
    print(f"{meta['device']}: copy {ceilings['copy_gbps']:,.0f} GB/s (read + write), "
          f"{matmul_dtype} matmul {tflops:,.0f} TFLOP/s\n", flush=True)
    out = out or default_out_dir()
    sweep = new_sweep(ceilings, *((10, 40) if quick else (25, 100)))
    started = time.time()
    try:
        body(sweep, lambda: sweep.save(meta, out))
    except KeyboardInterrupt:  # `timeout -s INT` in the GPU session: keep what was measured
        print("\ninterrupted: writing the rows measured so far")
        sweep.save(meta, out)
        return 130
    finally:
        print(f"\n{len(sweep.rows)} rows in {time.time() - started:.0f} s"
              + (f"; results in {out}/{sweep.name}.*" if sweep.rows else ""))
        print(summary(sweep))
    return 0
