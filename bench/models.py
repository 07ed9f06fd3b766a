"""The reference models end to end: a training step and sampling, eager against patched against
torch.compile, one run.

Variants, each on a fresh copy of the same weights:
  eager                    the model as built
  patched                  dlh.patch(model): its LayerNorm, GELU, attention, GroupNorm, Conv2d, ...
                           run dlh's kernels (backend auto)
  compile                  torch.compile(model)
  patched+compile          dlh.patch, then torch.compile (dlh's ops are custom ops: no graph break)
  patched+cudagraphs       dlh.patch, then torch.compile(mode="reduce-overhead"): the compiled
                           graph replayed as a CUDA graph, where the model lets it (full runs only)
Phases: "train" (one `models.train_step`: forward, backward, AdamW step; it returns the loss as
a float, so every variant pays the same one host sync per step) and "sample" (one
`models.sample` call, for the generative models: gan, vae, quick_unet, ddpm_unet).

Reported per (model, phase, variant): p50 (p20, p80) ms per step or per sampling call, items per
second, the speedup over eager, and the loss of the first measured step (every variant starts
from the same weights and batch, so they should agree to bf16 rounding). Targets (TARGETS.md):
patched >= 1.3x eager, and >= torch.compile.

Order of work: the eager and patched variants of every model first, the compiled ones after,
so that a time-capped run (`--budget-s`, or the GPU session's SIGINT) keeps the main comparison.
The models come from ``dlh_kernels.models`` (NAMES, build, example_batch, train_step, sample).
"""
from __future__ import annotations

import copy
import inspect
import math
import statistics
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from . import common

VARIANTS = {  # name: (patched, torch.compile mode or None)
    "eager": (False, None),
    "patched": (True, None),
    "compile": (False, "default"),
    "patched+compile": (True, "default"),
    "patched+cudagraphs": (True, "reduce-overhead"),
}
QUICK_VARIANTS = ("eager", "patched", "compile", "patched+compile")
SAMPLERS = ("gan", "vae", "quick_unet", "ddpm_unet")  # the models with a `sample`
BATCH = 32            # training batch (items per step)
SAMPLE_N = 16         # images per sampling call
SAMPLE_STEPS = {"ddpm_unet": 50}  # sampling steps where the model's default would be long


def registry():
    """``dlh_kernels.models``, or the reason it cannot be imported (a str)."""
    try:
        from dlh_kernels import models
    except Exception as exc:
        return common.not_importable("dlh_kernels.models", exc)
    return models


def _cast_batch(batch: dict, dtype: torch.dtype) -> dict:
    """Floating tensors of the batch in the run's dtype; labels and token ids stay as they are."""
    return {k: v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v
            for k, v in batch.items()}


def prepare(models, name: str, variant: str, base: torch.nn.Module, dtype: torch.dtype):
    """A fresh copy of ``base`` (same weights) in ``dtype``, patched and/or compiled as
    ``variant`` says; (module to call, the patch report or None)."""
    patched, mode = VARIANTS[variant]
    model = copy.deepcopy(base).to(dtype)
    report = None
    if patched:
        import dlh_kernels as dlh
        report = dlh.patch(model)
    if mode is not None:
        model = common.compiled_module(model, mode)
    return model, report


def time_steps(step: Callable[[], object], warmup: int, iters: int, sync: Callable[[], None]):
    """(p50, p20, p80) ms of ``step()`` timed one by one with the host clock after a sync, the
    result of the first timed step, and the warm-up's total seconds (compilation shows here)."""
    t0 = time.perf_counter()
    for _ in range(warmup):
        step()
    sync()
    warm_s = time.perf_counter() - t0
    times, first = [], None
    for i in range(iters):
        t = time.perf_counter()
        out = step()
        sync()
        times.append((time.perf_counter() - t) * 1e3)
        if i == 0:
            first = out
    q = statistics.quantiles(times, n=10) if len(times) > 1 else times * 9
    return (statistics.median(times), q[1], q[7]), first, warm_s


def bench_model(models, name: str, phase: str, variants: Sequence[str], *, device: str,
                dtype: torch.dtype, small: bool, warmup: int, iters: int, batch_size: int,
                deadline: float, skip: Callable[[str, str], None]) -> list[dict]:
    """The rows of one model and phase, a row per variant that ran."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    torch.manual_seed(0)
    base = models.build(name, small=small).to(device)
    gen = torch.Generator(device="cpu").manual_seed(0)
    batch = _cast_batch(models.example_batch(name, batch_size, device=device, small=small, generator=gen),
                        dtype) if phase == "train" else None
    params = sum(p.numel() for p in base.parameters())
    rows = []
    for variant in variants:
        where = f"{name} {phase} {variant}"
        if time.time() > deadline:
            skip(where, "the run's time budget was spent")
            continue
        try:
            model, report = prepare(models, name, variant, base, dtype)
            if phase == "train":
                model.train()
                opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
                step = lambda: models.train_step(name, model, opt, batch)  # noqa: E731
                items = batch_size
            else:
                model.eval()
                steps = SAMPLE_STEPS.get(name)
                # the sampler's own step (a diffusion update) on dlh's kernels only when patched
                kw = {}
                if "backend" in inspect.signature(models.sample).parameters:
                    kw["backend"] = None if VARIANTS[variant][0] else "torch"

                def step():
                    with torch.no_grad():
                        g = torch.Generator(device=device).manual_seed(1)
                        return models.sample(name, model, SAMPLE_N, device=device, steps=steps,
                                             generator=g, **kw)
                items = SAMPLE_N
            (p50, p20, p80), first, warm_s = time_steps(step, warmup, iters, sync)
        except Exception as exc:
            skip(where, common.short_error(exc))
            continue
        finally:
            if VARIANTS[variant][1] is not None:
                torch._dynamo.reset()  # drop the compiled graphs: memory, and the next variant
        loss = float(first) if phase == "train" else None
        rows.append({"model": name, "phase": phase, "variant": variant, "small": small,
                     "dtype": str(dtype).replace("torch.", ""), "params": params, "items": items,
                     "steps": SAMPLE_STEPS.get(name) if phase == "sample" else None,
                     "p50_ms": p50, "p20_ms": p20, "p80_ms": p80, "items_per_s": items / (p50 * 1e-3),
                     "warmup_s": warm_s, "first_loss": loss,
                     "patched_modules": len(report.replaced) if report is not None else 0})
        r = rows[-1]
        print(f"{name:>11} {phase:>6} {variant:>19}  p50 {p50:9.3f} ms  {r['items_per_s']:10.1f} items/s"
              f"  (warm-up {warm_s:5.1f} s)" + (f"  loss {loss:.4g}" if loss is not None else ""), flush=True)
        del model
    del base
    if device == "cuda":
        torch.cuda.empty_cache()
    return rows


def add_speedups(rows: list[dict]) -> None:
    """rows[speedup_vs_eager] and [speedup_vs_compile]: eager's (compile's) p50 over the row's,
    same model and phase; None where that variant has no row."""
    for base, column in (("eager", "speedup_vs_eager"), ("compile", "speedup_vs_compile")):
        ref = {(r["model"], r["phase"]): r["p50_ms"] for r in rows if r["variant"] == base}
        for r in rows:
            key = (r["model"], r["phase"])
            r[column] = ref[key] / r["p50_ms"] if key in ref else None


def summary(rows: list[dict], variants: Sequence[str]) -> str:
    """ms per step (speedup over eager) per model and phase, the variants side by side."""
    blocks = []
    for phase in ("train", "sample"):
        sub = [r for r in rows if r["phase"] == phase]
        if not sub:
            continue
        table = common.side_by_side(
            [dict(r, provider=r["variant"]) for r in sub], ("model",),
            lambda r: f"{r['p50_ms']:.3g} ({r['speedup_vs_eager']:.2f}x)" if r["speedup_vs_eager"] else
            f"{r['p50_ms']:.3g}")
        names = [v for v in variants if any(r["variant"] == v for r in sub)]
        unit = "ms per train step" if phase == "train" else "ms per sampling call"
        blocks.append(f"{phase}: {unit} (speedup over eager)\n"
                      + common.format_table(table, {"model": "model", **{v: v for v in names}}))
    return "\n\n".join(blocks)


def plot(rows: list[dict], path: Path, title: str) -> Optional[Path]:
    """Grouped bars: speedup over eager per model, a bar per variant, one panel per phase."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    phases = [p for p in ("train", "sample") if any(r["phase"] == p for r in rows)]
    if not phases:
        return None
    fig, axes = plt.subplots(1, len(phases), figsize=(7 * len(phases), 4), squeeze=False)
    for ax, phase in zip(axes.flat, phases):
        sub = [r for r in rows if r["phase"] == phase and r["speedup_vs_eager"]]
        names = list(dict.fromkeys(r["model"] for r in sub))
        variants = list(dict.fromkeys(r["variant"] for r in sub))
        width = 0.8 / max(1, len(variants))
        for j, v in enumerate(variants):
            ys = [next((r["speedup_vs_eager"] for r in sub if r["model"] == m and r["variant"] == v), 0)
                  for m in names]
            ax.bar([i + j * width for i in range(len(names))], ys, width, label=v)
        ax.axhline(1.0, color="gray", linewidth=0.8)
        ax.axhline(1.3, color="gray", linestyle="--", linewidth=0.8, label="target 1.3x")
        ax.set_xticks([i + width * (len(variants) - 1) / 2 for i in range(len(names))], names)
        ax.set(title=f"{phase}: speedup over eager", ylabel="x eager")
        ax.legend(fontsize=7)
    return common.save_figure(fig, path, title)


def run(*, quick: bool = False, dtype: str = "bf16", out: Optional[Path] = None,
        names: Optional[Sequence[str]] = None, variants: Optional[Sequence[str]] = None,
        device: Optional[str] = None, small: Optional[bool] = None, budget_s: Optional[float] = None,
        batch_size: int = BATCH, iters: Optional[int] = None, warmup: Optional[int] = None) -> int:
    """Every model and phase, eager and patched first, compiled variants after; 0, 1 when
    nothing ran, 130 when interrupted (the rows so far are written either way)."""
    models = registry()
    if isinstance(models, str):
        print(f"skip models: {models}")
        return 1
    device = device or ("cuda" if common.has_gpu() else "cpu")
    names = tuple(names or models.NAMES)
    variants = tuple(variants or (QUICK_VARIANTS if quick else tuple(VARIANTS)))
    small = (device != "cuda") if small is None else small
    iters = iters or (10 if quick else 30)
    warmup = warmup or (3 if quick else 5)
    torch_dtype = common.DTYPES[dtype]
    deadline = time.time() + (budget_s if budget_s else math.inf)
    meta = common.run_metadata()
    label = "" if device == "cuda" else " (CPU: a dry run, NOT a GPU result)"
    print(f"\nmodels on {meta['device']}{label}: {', '.join(names)}; variants {', '.join(variants)}; "
          f"{dtype}, batch {batch_size}, {iters} timed steps after {warmup} warm-up", flush=True)
    rows: list[dict] = []
    skipped: dict[str, str] = {}

    def skip(what: str, why: str) -> None:
        skipped[what] = why
        print(f"skip {what}: {why}", flush=True)

    plain = [v for v in variants if VARIANTS[v][1] is None]
    compiled = [v for v in variants if VARIANTS[v][1] is not None]
    rc = 0
    try:
        for group in (plain, compiled):
            for name in names:
                for phase in ("train", "sample"):
                    if phase == "sample" and name not in SAMPLERS:
                        continue
                    if group:
                        rows += bench_model(models, name, phase, group, device=device, dtype=torch_dtype,
                                            small=small, warmup=warmup, iters=iters, batch_size=batch_size,
                                            deadline=deadline, skip=skip)
    except KeyboardInterrupt:
        print("\ninterrupted: writing the rows measured so far")
        rc = 130
    order = {v: i for i, v in enumerate(VARIANTS)}
    rows.sort(key=lambda r: (names.index(r["model"]), r["phase"] != "train", order[r["variant"]]))
    add_speedups(rows)
    print("\n" + summary(rows, variants))
    if out is not None and rows:
        stem = "models" if device == "cuda" else "models_cpu"
        common.write_results(rows, meta, out, stem, extra={"skipped": skipped})
        plot(rows, out / f"{stem}.png", f"reference models, {meta['device']} {dtype}, {meta['date_utc']}")
        print(f"results in {out}/{stem}.*")
    return rc or (0 if rows else 1)
