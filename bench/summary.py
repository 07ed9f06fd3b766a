"""The roofline-style summary across op families: each dlh kernel's % of the device's ceiling
(copy bandwidth for the memory-bound ops, the bf16 matmul rate for the matrix ones) and its
speed against the best peer, read back from a results folder.

    dlh bench summary --out bench/results/<run>/     (also the last step of `dlh bench all`)

One row per (family, op, mode, dlh provider): over the shapes that provider ran, the median and
best % of ceiling, the geometric mean of (best peer's time / ours) at the same shapes, and of
(eager's time / ours). Peers are the other providers except the references measured beside them
(a device copy moving the same bytes, the bare F.linear / F.conv2d), which are ceilings, not
competitors. Written as summary.csv / summary.json and a bar plot, summary.png.

``--save-auto`` records, per op, the order of dlh's backends by that geometric mean, in the cache
that `auto` reads (dlh_kernels/_cache.py).
"""
from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Optional

from . import common

# results file stem -> (ceiling, its % column, the columns that name one shape)
FAMILIES = {
    "layer_norm": ("copy", "pct_copy", ("case", "M", "N")),
    "gelu": ("copy", "pct_copy", ("case", "M", "N")),
    "group_norm": ("copy", "pct_copy", ("case", "layout", "B", "C", "H")),
    "diffusion_step": ("copy", "pct_copy", ("case", "shape")),
    "linear_gelu": ("matmul", "pct_matmul", ("case", "M", "K", "N")),
    "conv2d": ("matmul", "pct_matmul", ("case", "N", "C", "H", "W")),
    "attention": ("matmul", "pct_matmul", ("case", "B", "H", "L", "D", "causal")),
}
REFERENCES = {"copy", "F.linear", "F.conv2d", "model only", "model only (graph)"}
EAGER = ("eager", "eager-nhwc", "eager-nchw", "eager formula")
# the op name `auto` is chosen under (dlh_kernels/_backend.choose), per results row op
AUTO_OP = {"bias_gelu": "gelu", "group_norm_silu": "group_norm", "attention": "scaled_dot_product_attention"}


def _time(row: dict) -> Optional[float]:
    t = row.get("p50_ms")
    if t is None and row.get("graph_us") is not None:
        t = row["graph_us"] / 1e3
    return t if isinstance(t, (int, float)) and t > 0 else None


def _geomean(xs: list[float]) -> Optional[float]:
    return math.exp(sum(math.log(x) for x in xs) / len(xs)) if xs else None


def load_rows(folder: Path, stem: str) -> list[dict]:
    path = folder / f"{stem}.json"
    if not path.is_file():
        return []
    with open(path) as f:
        return json.load(f).get("rows", [])


def summarize(folder: Path) -> list[dict]:
    """The summary rows of every family with a results file in ``folder``."""
    out = []
    for family, (ceiling, pct_col, shape_cols) in FAMILIES.items():
        rows = [r for r in load_rows(folder, family) if _time(r) is not None]
        groups: dict[tuple, list[dict]] = {}
        for r in rows:
            op = r.get("op") or family
            mode = r.get("mode") or r.get("method") or "fwd"
            groups.setdefault((op, mode), []).append(r)
        for (op, mode), sub in groups.items():
            by_shape: dict[tuple, dict[str, dict]] = {}
            for r in sub:
                by_shape.setdefault(tuple(r.get(c) for c in shape_cols), {})[r["provider"]] = r
            providers = list(dict.fromkeys(r["provider"] for r in sub))
            for prov in (p for p in providers if p.startswith("dlh")):
                pcts, vs_peer, vs_eager, peers = [], [], [], []
                for shape, cells in by_shape.items():
                    ours = cells.get(prov)
                    if ours is None:
                        continue
                    if isinstance(ours.get(pct_col), (int, float)):
                        pcts.append(ours[pct_col])
                    others = {p: _time(r) for p, r in cells.items()
                              if not p.startswith("dlh") and p not in REFERENCES}
                    if others:
                        best = min(others, key=others.get)
                        peers.append(best)
                        vs_peer.append(others[best] / _time(ours))
                    eager = next((cells[e] for e in EAGER if e in cells), None)
                    if eager is not None:
                        vs_eager.append(_time(eager) / _time(ours))
                out.append({
                    "family": family, "op": op, "mode": mode, "provider": prov, "ceiling": ceiling,
                    "shapes": sum(1 for cells in by_shape.values() if prov in cells),
                    "median_pct_ceiling": statistics.median(pcts) if pcts else None,
                    "best_pct_ceiling": max(pcts) if pcts else None,
                    "best_peer": statistics.mode(peers) if peers else None,
                    "x_best_peer": _geomean(vs_peer), "x_eager": _geomean(vs_eager),
                })
    return out


def auto_orders(rows: list[dict]) -> dict[str, list[str]]:
    """{op: [backend, ...]}: dlh's backends of each op, fastest first by their geometric-mean
    speed over eager across the op's modes (a backend that never ran is left out)."""
    speeds: dict[str, dict[str, list[float]]] = {}
    for r in rows:
        if r["x_eager"] is None:
            continue
        backend = r["provider"][len("dlh-"):]
        if backend not in ("triton", "cuda"):  # dlh-triton-nchw etc. are variants, not backends
            continue
        op = AUTO_OP.get(r["op"], r["op"])
        speeds.setdefault(op, {}).setdefault(backend, []).append(r["x_eager"])
    return {op: sorted(by, key=lambda b: -_geomean(by[b])) + ["torch"]
            for op, by in speeds.items() if len(by) > 1}


def format_summary(rows: list[dict]) -> str:
    return ("roofline summary: each dlh kernel's % of the measured ceiling (median / best over its "
            "shapes) and speed against the best peer and eager (geometric means)\n" + common.format_table(
                rows, {"family": "family", "op": "op", "mode": "mode", "provider": "provider",
                       "ceiling": "ceiling", "shapes": "shapes", "median_pct_ceiling": "median %",
                       "best_pct_ceiling": "best %", "best_peer": "best peer",
                       "x_best_peer": "x best peer", "x_eager": "x eager"}))


def plot(rows: list[dict], path: Path, title: str) -> Optional[Path]:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = [r for r in rows if r["median_pct_ceiling"] is not None]
    if not rows:
        return None
    labels = [f"{r['op']} {r['mode']} {r['provider'][4:]}" for r in rows]
    fig, ax = plt.subplots(figsize=(8, 0.28 * len(rows) + 1.2))
    colors = ["tab:blue" if r["ceiling"] == "copy" else "tab:orange" for r in rows]
    ax.barh(range(len(rows)), [r["median_pct_ceiling"] for r in rows], color=colors)
    ax.set_yticks(range(len(rows)), labels, fontsize=7)
    ax.invert_yaxis()
    ax.axvline(90, color="gray", linestyle="--", linewidth=0.8)
    ax.set(xlabel="median % of ceiling (blue: copy bandwidth, orange: bf16 matmul rate)", title=title)
    return common.save_figure(fig, path)


def run(out: Optional[Path], *, save_auto: bool = False) -> int:
    """Summarise the results folder ``out``; 1 when it holds no benchmark results."""
    if out is None or not Path(out).is_dir():
        print(f"summary: no results folder {out}")
        return 1
    out = Path(out)
    rows = summarize(out)
    if not rows:
        print(f"summary: no benchmark results in {out}")
        return 1
    print("\n" + format_summary(rows))
    meta = {}
    for stem in FAMILIES:
        if (out / f"{stem}.json").is_file():
            with open(out / f"{stem}.json") as f:
                meta = json.load(f).get("meta", {})
            break
    common.write_results(rows, meta, out, "summary")
    plot(rows, out / "summary.png", f"% of ceiling, {meta.get('device', '?')}, {meta.get('date_utc', '')}")
    if save_auto:
        from dlh_kernels import _cache
        orders = auto_orders(rows)
        path = _cache.save_auto_orders(orders, device=meta.get("device")) if orders else None
        print(f"auto backend order saved to {path}: {orders}" if path else
              "auto backend order: nothing to save (needs both dlh-triton and dlh-cuda rows, and a cache)")
    return 0
