"""Write the README's GPU results from the committed results files.

    python -m dlh_kernels.bench.report                  # rewrite README.md's results block
    python -m dlh_kernels.bench.report --check          # exit 1 if the block is out of date
    python -m dlh_kernels.bench.report --stdout         # print the block instead

Reads every run folder under bench/results/ (one folder per GPU session, as `dlh bench` and
bench/gpu_session.sh write them: <date>-<gpu>/ holding <family>.json files whose "meta" names
the device, driver, CUDA, torch and triton versions, date and commit), keeps the latest run of
each GPU, and writes, between the markers ``<!-- results:begin -->`` and ``<!-- results:end -->``
of README.md: per GPU its ceilings, the roofline summary (each dlh kernel's % of ceiling and
speed against the best peer), the reference models' speedups, the cold-start times, and links to
the plots. With no results it says so. Nothing in the block is written by hand.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Optional, Sequence

from . import summary as _summary

BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"
REPO_ROOT = Path(__file__).resolve().parent.parent
NO_RESULTS = ("No GPU results yet: no benchmark has run on a GPU, so there are no numbers here. "
              "A GPU session (`bench/gpu_session.sh`) writes them under `bench/results/`, and "
              "`python -m dlh_kernels.bench.report` puts them here.")


def _load(path: Path) -> Optional[dict]:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def runs(results: Path) -> list[dict]:
    """One entry per run folder holding results: {"dir", "meta", "files"} (files: stem -> data)."""
    found = []
    if not results.is_dir():
        return found
    for folder in sorted(p for p in results.iterdir() if p.is_dir()):
        files = {p.stem: d for p in sorted(folder.glob("*.json")) if (d := _load(p)) and "rows" in d}
        gpu = {k: v for k, v in files.items() if v.get("meta", {}).get("device", "cpu") != "cpu"}
        if not gpu:
            continue  # CPU dry runs (check_cpu, overhead_cpu, ...) are not GPU results
        meta = next(iter(gpu.values()))["meta"]
        found.append({"dir": folder, "meta": meta, "files": gpu})
    return found


def latest_per_device(all_runs: list[dict]) -> list[dict]:
    best: dict[str, dict] = {}
    for run in all_runs:
        device = run["meta"].get("device", "?")
        if device not in best or run["meta"].get("date_utc", "") > best[device]["meta"].get("date_utc", ""):
            best[device] = run
    return [best[d] for d in sorted(best)]


def _fmt(value, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def _table(rows: list[dict], columns: dict[str, str]) -> list[str]:
    lines = ["| " + " | ".join(columns.values()) + " |", "|" + " --- |" * len(columns)]
    lines += ["| " + " | ".join(_fmt(r.get(k)) for k in columns) + " |" for r in rows]
    return lines


def _ceilings(run: dict) -> str:
    parts = []
    for data in run["files"].values():
        meta = data["meta"]
        if "copy_gbps" in meta and not any("copy" in p for p in parts):
            parts.append(f"copy {meta['copy_gbps']:,.0f} GB/s (read + write)")
        if "matmul_bf16_tflops" in meta and not any("matmul" in p for p in parts):
            parts.append(f"bf16 matmul {meta['matmul_bf16_tflops']:,.0f} TFLOP/s (8192^3)")
    return ", ".join(parts) or "not measured in this run"


def device_section(run: dict, readme_dir: Path) -> list[str]:
    m = run["meta"]
    lines = [f"### {m.get('device', '?')}", "",
             f"Run of {m.get('date_utc', '?')}: driver {m.get('driver', '?')}, CUDA {m.get('cuda_runtime', '?')}, "
             f"torch {m.get('torch', '?')}, triton {m.get('triton', '?')}, git {m.get('git_sha', '?')}; "
             f"files in `{os.path.relpath(run['dir'], readme_dir)}/`.", "",
             f"Measured ceilings: {_ceilings(run)}.", ""]
    summary_rows = run["files"].get("summary", {}).get("rows") or _summary.summarize(run["dir"])
    if summary_rows:
        lines += ["Each dlh kernel against the ceiling and its peers (median and best % of ceiling over "
                  "the shapes run; speed as the geometric mean of the peer's time over ours):", ""]
        lines += _table(summary_rows, {"family": "family", "op": "op", "mode": "mode", "provider": "kernel",
                                       "ceiling": "ceiling", "median_pct_ceiling": "median %",
                                       "best_pct_ceiling": "best %", "best_peer": "best peer",
                                       "x_best_peer": "x best peer", "x_eager": "x eager"})
        lines.append("")
    model_rows = run["files"].get("models", {}).get("rows")
    if model_rows:
        lines += ["Reference models (p50 per train step or sampling call; speedup over eager):", ""]
        lines += _table(model_rows, {"model": "model", "phase": "phase", "variant": "variant",
                                     "p50_ms": "p50 ms", "items_per_s": "items/s",
                                     "speedup_vs_eager": "x eager", "speedup_vs_compile": "x compile"})
        lines.append("")
    cold_rows = run["files"].get("coldstart", {}).get("rows")
    if cold_rows:
        lines += ["Cold start (first call in a fresh process; cold: empty caches, warm: the caches "
                  "the cold run left):", ""]
        lines += _table(cold_rows, {"op": "op", "backend": "backend", "mode": "mode",
                                    "cold_first_s": "cold first call s", "warm_first_s": "warm first call s",
                                    "second_ms": "second call ms"})
        lines.append("")
    plots = sorted(run["dir"].glob("*.png"))
    if plots:
        lines.append("Plots: " + ", ".join(f"[{p.stem}]({os.path.relpath(p, readme_dir)})" for p in plots) + ".")
        lines.append("")
    return lines


def render(results: Path, readme_dir: Path) -> str:
    """The block between the markers (markers excluded)."""
    chosen = latest_per_device(runs(results))
    if not chosen:
        return "\n" + NO_RESULTS + "\n"
    lines = ["", "Generated by `python -m dlh_kernels.bench.report` from the files under "
             f"`{os.path.relpath(results, readme_dir)}/` (the latest run of each GPU).", ""]
    for run in chosen:
        lines += device_section(run, readme_dir)
    return "\n".join(lines)


def update(readme: Path, block: str) -> str:
    """README text with ``block`` between the markers (appended under '## Results' if absent)."""
    text = readme.read_text()
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        _, tail = rest.split(END, 1)
        return head + BEGIN + block + END + tail
    return text.rstrip("\n") + "\n\n" + BEGIN + block + END + "\n"


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dlh_kernels.bench.report", description=__doc__.splitlines()[0])
    p.add_argument("--results", type=Path, default=REPO_ROOT / "bench" / "results")
    p.add_argument("--readme", type=Path, default=REPO_ROOT / "README.md")
    p.add_argument("--check", action="store_true", help="exit 1 if the README's block is out of date")
    p.add_argument("--stdout", action="store_true", help="print the block, write nothing")
    a = p.parse_args(argv)
    block = render(a.results, a.readme.parent)
    if a.stdout:
        print(block)
        return 0
    new = update(a.readme, block)
    if a.check:
        same = new == a.readme.read_text()
        print("README results: up to date" if same else "README results: out of date; run "
              "python -m dlh_kernels.bench.report")
        return 0 if same else 1
    a.readme.write_text(new)
    print(f"wrote the results block of {a.readme} ({len(latest_per_device(runs(a.results)))} GPU(s))")
    return 0


if __name__ == "__main__":
    sys.exit(main())
