"""The diffusion sampling step alone, and whole sampling loops with a small U-Net, one run.

Part 1, the step (DDPM with noise, and DDIM eta = 1 with classifier-free guidance), providers:
  eager formula  the reference written in torch in the input dtype (diffusion_step_reference),
                 noise from torch.randn_like: what a user writes by hand
  diffusers      DDPMScheduler.step / DDIMScheduler.step (when diffusers is importable)
  dlh-triton     DF.diffusion_step(..., seed=<device tensor>, backend="triton")
  dlh-cuda       the same with backend="cuda"
  Per provider and shape: host-loop us/call (N calls back to back, one sync at the end: what a
  sampler without graphs pays per step), graph us/call (N calls captured in one CUDA graph and
  replayed: the GPU's own time, launch gaps included), kernel launches per call (profiler),
  host syncs per call (torch.cuda sync debug mode), and GB/s from the graph time over the bytes
  the step must move: read x, m (+u with guidance) and write x_prev; the noise is drawn in the
  kernel, so counted for the others only when they read a noise tensor (eager, diffusers).
  The step moves < 1 MB at latent sizes: the floor is the launch (~2-4 us), not bandwidth.

Part 2, the whole loop: a small DDPM-style U-Net (~2M parameters, 32x32, batch 16) under DDIM
(50 steps, eta 0 and eta 1), DDPM (50 steps) and the seed's 16-step interpolation scheme:
  model only     the model's calls alone, eager and captured in a graph: the model's own time
  diffusers      the model + diffusers' scheduler loop, eager (ddim/ddpm; when importable)
  eager formula  the model + the hand-written step, eager
  dlh            dlh_kernels.diffusion.Sampler, eager
  dlh+graph      the same with cuda_graph=True: the whole loop is one graph replay
  Reported: ms per loop, us per step, the overhead per step beyond the model (loop minus model
  only, same mode: eager vs eager, graph vs graph; target < 5 us), host syncs per loop.
"""
from __future__ import annotations

import math
import time
import warnings
from pathlib import Path
from typing import Callable, Optional

import torch

from . import common

STEP_SHAPES = [          # (case, shape)
    ("sd-latent", (1, 4, 64, 64)),       # Stable Diffusion 512 px, one image
    ("sd-latent-b8", (8, 4, 64, 64)),
    ("cifar-b16", (16, 3, 32, 32)),      # the seed U-Net's scale
    ("sdxl-latent-b4", (4, 4, 128, 128)),
    ("pixels-b16", (16, 3, 256, 256)),   # 3 M elements: where bandwidth starts to matter
]
QUICK_STEP_SHAPES = STEP_SHAPES[:1] + STEP_SHAPES[2:3]
STEP_METHODS = {"ddpm": dict(method="ddpm"), "ddim-cfg": dict(method="ddim", eta=1.0, guidance_scale=7.5)}
LOOP_SHAPE = (16, 3, 32, 32)
LOOPS = [("ddim", 50, 0.0), ("ddim", 50, 1.0), ("ddpm", 50, 0.0), ("interp", 16, 0.0)]
QUICK_LOOPS = [("ddim", 50, 0.0), ("interp", 16, 0.0)]
CALLS = 200  # calls per timed host loop / per captured graph


# ---------------------------------------------------------------------------------------------
# Measuring: wall clock of back-to-back calls, CUDA graphs, launches, host syncs.

def us_per_call(fn: Callable[[], object], calls: int = CALLS, repeats: int = 5) -> float:
    """Best of `repeats` rounds of `calls` back-to-back calls, one sync per round (host-bound)."""
    fn()
    torch.cuda.synchronize()
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
        best = min(best, (time.perf_counter() - t0) / calls)
    return best * 1e6


def graphed(fn: Callable[[], object], calls: int) -> Callable[[], None]:
    """`calls` calls of fn captured in one CUDA graph; returns its replay (raises if not capturable)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    return graph.replay


def graph_us_per_call(fn: Callable[[], object], calls: int = CALLS) -> Optional[float]:
    try:
        replay = graphed(fn, calls)
    except Exception as exc:  # not capturable (a host sync, a CPU tensor per call, ...)
        print(f"  (not capturable: {common.short_error(exc)})")
        torch.cuda.synchronize()
        return None
    return us_per_call(replay, calls=3) / calls


def count_syncs(fn: Callable[[], object]) -> int:
    """Synchronising CUDA calls made by one fn() (torch's sync debug mode, warnings counted)."""
    fn()
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message).lower() for w in caught)


def count_launches(fn: Callable[[], object]) -> int:
    """CUDA kernels (and memcpy/memset) one fn() puts on the GPU."""
    fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(e.device_type == torch.autograd.DeviceType.CUDA for e in prof.events())


# ---------------------------------------------------------------------------------------------
# Part 1: the step alone.

def _step_providers(kind: str, x, m, u, table, t: int, prev: int, seed):
    import dlh_kernels.functional as DF
    from dlh_kernels.ops.diffusion_step import diffusion_step_reference
    kw = STEP_METHODS[kind]
    method, eta, w = kw["method"], kw.get("eta", 0.0), kw.get("guidance_scale")
    provs: dict[str, object] = {}

    def eager():
        mm = m if w is None else u + w * (m - u)
        return diffusion_step_reference(x, mm, t, prev, table, method=method, eta=eta,
                                        noise=torch.randn_like(x))
    provs["eager formula"] = eager
    try:
        from diffusers import DDIMScheduler, DDPMScheduler
        cls = DDPMScheduler if method == "ddpm" else DDIMScheduler
        sched = cls(num_train_timesteps=table.shape[0], clip_sample=False)
        sched.set_timesteps(50)
        tt = sched.timesteps[[int(s) for s in sched.timesteps].index(t)]

        def diffusers_step():
            mm = m if w is None else u + w * (m - u)
            if method == "ddpm":
                return sched.step(mm, tt, x).prev_sample
            return sched.step(mm, tt, x, eta=eta).prev_sample
        provs["diffusers"] = diffusers_step
    except ImportError as exc:
        provs["diffusers"] = common.not_importable("diffusers", exc)
    import dlh_kernels as dlh
    for backend in ("triton", "cuda"):
        reason = dlh.backends()[backend]
        if reason != "available":
            provs[f"dlh-{backend}"] = reason
            continue
        provs[f"dlh-{backend}"] = (lambda b=backend: DF.diffusion_step(
            x, m, t, prev, table, method=method, eta=eta, guidance_scale=w,
            uncond_output=u if w is not None else None, seed=seed, backend=b))
    return provs


def bench_step(quick: bool, dtype: torch.dtype, copy_gbps: float) -> list[dict]:
    from dlh_kernels import diffusion
    table = diffusion.linear_alphas_cumprod(1000, device="cuda")
    t, prev = diffusion.schedule("ddim", 50)[10]
    seed = torch.tensor(7, device="cuda")
    rows = []
    for case, shape in common.smoke(QUICK_STEP_SHAPES if quick else STEP_SHAPES):
        x, m, u = (torch.randn(shape, device="cuda", dtype=dtype) for _ in range(3))
        n, elem = x.numel(), x.element_size()
        for kind in STEP_METHODS:
            guided = "guidance_scale" in STEP_METHODS[kind]
            for name, fn in _step_providers(kind, x, m, u, table, t, prev, seed).items():
                if isinstance(fn, str):
                    print(f"  {name}: skipped ({fn})")
                    continue
                print(f"  step {kind} {case} {name}", flush=True)
                try:
                    host = us_per_call(fn)
                    graph = graph_us_per_call(fn)
                    launches, syncs = count_launches(fn), count_syncs(fn)
                except Exception as exc:
                    print(f"  {name} {kind} {case}: failed ({common.short_error(exc)})")
                    continue
                # bytes: read x, m (+u), write x_prev; + the noise tensor where one is read
                reads_noise = not name.startswith("dlh")
                moved = (3 + guided + reads_noise) * n * elem
                gbps = moved / (graph * 1e-6) / 1e9 if graph else None
                rows.append(dict(part="step", method=kind, case=case, shape=str(list(shape)), elements=n,
                                 provider=name, dtype=str(dtype).replace("torch.", ""),
                                 host_us=host, graph_us=graph, launches=launches, host_syncs=syncs,
                                 bytes=moved, gbps=gbps,
                                 pct_copy=None if gbps is None else 100 * gbps / copy_gbps))
        del x, m, u
    return rows


# ---------------------------------------------------------------------------------------------
# Part 2: whole sampling loops with a small U-Net.

class TinyUNet(torch.nn.Module):
    """A small DDPM-style U-Net: two resolutions, GroupNorm + SiLU residual blocks, a sinusoidal
    time embedding (float or int timesteps), ~2M parameters at base=64."""

    def __init__(self, channels: int = 3, base: int = 64):
        super().__init__()
        self.base = base
        self.time = torch.nn.Sequential(torch.nn.Linear(base, 4 * base), torch.nn.SiLU(),
                                        torch.nn.Linear(4 * base, 4 * base))
        self.inp = torch.nn.Conv2d(channels, base, 3, padding=1)
        self.down1, self.down2 = self._block(base, base), self._block(base, 2 * base)
        self.pool = torch.nn.Conv2d(base, base, 3, stride=2, padding=1)
        self.mid = self._block(2 * base, 2 * base)
        self.up = torch.nn.ConvTranspose2d(2 * base, base, 2, stride=2)
        self.up1 = self._block(2 * base, base)
        self.out = torch.nn.Sequential(torch.nn.GroupNorm(8, base), torch.nn.SiLU(),
                                       torch.nn.Conv2d(base, channels, 3, padding=1))
        self.emb = torch.nn.ModuleList([torch.nn.Linear(4 * base, c) for c in (base, 2 * base, 2 * base, base)])

    @staticmethod
    def _block(cin: int, cout: int) -> torch.nn.Module:
        return torch.nn.ModuleDict(dict(
            norm1=torch.nn.GroupNorm(8, cin), conv1=torch.nn.Conv2d(cin, cout, 3, padding=1),
            norm2=torch.nn.GroupNorm(8, cout), conv2=torch.nn.Conv2d(cout, cout, 3, padding=1),
            skip=torch.nn.Conv2d(cin, cout, 1) if cin != cout else torch.nn.Identity()))

    @staticmethod
    def _run(block, h, e):
        y = block["conv1"](torch.nn.functional.silu(block["norm1"](h)))
        y = y + e[:, :, None, None]
        y = block["conv2"](torch.nn.functional.silu(block["norm2"](y)))
        return y + block["skip"](h)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        half = self.base // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, device=x.device) / half)
        tt = t.float() * (1000.0 if t.is_floating_point() else 1.0)  # interp times are in [0, 1]
        angles = tt[:, None] * freqs[None]
        temb = self.time(torch.cat([angles.sin(), angles.cos()], -1)).to(x.dtype)
        h = self.inp(x)
        h1 = self._run(self.down1, h, self.emb[0](temb))
        h2 = self._run(self.down2, self.pool(h1), self.emb[1](temb))
        h2 = self._run(self.mid, h2, self.emb[2](temb))
        h = self._run(self.up1, torch.cat([self.up(h2), h1], 1), self.emb[3](temb))
        return self.out(h)


def _loop_providers(model, method: str, steps: int, eta: float, dtype: torch.dtype):
    from dlh_kernels import diffusion
    from dlh_kernels.ops.diffusion_step import diffusion_step_reference
    shape = LOOP_SHAPE
    sampler = diffusion.Sampler(model, shape, steps, method, eta=eta, device="cuda", dtype=dtype)
    table = sampler.table
    x_init = torch.randn(shape, device="cuda", dtype=dtype)
    model_t = sampler._model_t
    provs: dict[str, object] = {}

    def model_only():
        x = x_init
        for k in range(steps):
            x = model(x, model_t[k])
        return x
    provs["model only"] = model_only

    def eager_formula():
        x = x_init
        for k, (t, prev) in enumerate(sampler.schedule):
            out = model(x, model_t[k])
            if method == "interp":
                x = diffusion_step_reference(x, out, t, prev, table, method="interp", prediction_type="sample")
            else:
                noisy = (method == "ddpm" and t > 0) or eta > 0
                x = diffusion_step_reference(x, out, t, prev, table, method=method, eta=eta,
                                             noise=torch.randn_like(x) if noisy else None)
        return x
    provs["eager formula"] = eager_formula
    if method != "interp":
        try:
            from diffusers import DDIMScheduler, DDPMScheduler
            sched = (DDPMScheduler if method == "ddpm" else DDIMScheduler)(num_train_timesteps=1000, clip_sample=False)
            sched.set_timesteps(steps)

            def diffusers_loop():
                x = x_init
                for k, t in enumerate(sched.timesteps):
                    out = model(x, model_t[k])
                    x = sched.step(out, t, x, eta=eta).prev_sample if method == "ddim" else \
                        sched.step(out, t, x).prev_sample
                return x
            provs["diffusers"] = diffusers_loop
        except ImportError as exc:
            provs["diffusers"] = common.not_importable("diffusers", exc)
    provs["dlh"] = lambda: sampler(seed=1)
    graph_sampler = diffusion.Sampler(model, shape, steps, method, eta=eta, device="cuda", dtype=dtype,
                                      cuda_graph=True)
    provs["dlh+graph"] = lambda: graph_sampler(seed=1)
    return provs


def bench_loops(quick: bool, dtype: torch.dtype) -> list[dict]:
    model = TinyUNet().to("cuda", dtype).eval()
    params = sum(p.numel() for p in model.parameters())
    rows = []
    with torch.no_grad():
        for method, steps, eta in common.smoke(QUICK_LOOPS if quick else LOOPS):
            provs = _loop_providers(model, method, steps, eta, dtype)
            base = {"eager": None, "graph": None}
            for name, fn in provs.items():
                if isinstance(fn, str):
                    print(f"  {name}: skipped ({fn})")
                    continue
                print(f"  loop {method} eta={eta} {name}", flush=True)
                try:
                    ms = us_per_call(fn, calls=3) / 1e3
                    syncs = count_syncs(fn)
                    graph_ms = None
                    if name == "model only":
                        us = graph_us_per_call(fn, calls=1)
                        graph_ms = None if us is None else us / 1e3
                except Exception as exc:
                    print(f"  {name} {method}: failed ({common.short_error(exc)})")
                    continue
                if name == "model only":
                    base = {"eager": ms, "graph": graph_ms}
                mode = "graph" if name == "dlh+graph" else "eager"
                over = None if base[mode] is None or name == "model only" else (ms - base[mode]) * 1e3 / steps
                row = dict(part="loop", method=method, steps=steps, eta=eta, provider=name, shape=str(list(LOOP_SHAPE)),
                           dtype=str(dtype).replace("torch.", ""), model_params=params, loop_ms=ms,
                           us_per_step=ms * 1e3 / steps, overhead_us_per_step=over, host_syncs=syncs)
                rows.append(row)
                if graph_ms is not None:
                    rows.append(dict(row, provider="model only (graph)", loop_ms=graph_ms,
                                     us_per_step=graph_ms * 1e3 / steps, host_syncs=0))
    return rows


# ---------------------------------------------------------------------------------------------

def run(*, quick: bool = False, dtype: str = "bf16", out: Optional[Path] = None) -> int:
    torch_dtype = common.DTYPES[dtype]
    ceilings = {"copy_gbps": common._copy_gbps()}
    meta = common.run_metadata(ceilings)
    print(f"\ndiffusion: {meta['device']}, copy ceiling {ceilings['copy_gbps']:.0f} GB/s", flush=True)
    print("\nthe step alone (us per call; host loop = no graph; graph = the GPU's own time)")
    step_rows = bench_step(quick, torch_dtype, ceilings["copy_gbps"])
    print(common.format_table(step_rows, dict(method="method", case="case", provider="provider",
                                              host_us="host-loop us", graph_us="graph us",
                                              launches="launches", host_syncs="syncs", gbps="GB/s",
                                              pct_copy="% copy")))
    print(f"\nwhole sampling loops, TinyUNet on {list(LOOP_SHAPE)} (overhead = loop - model only, same mode)")
    loop_rows = bench_loops(quick, torch_dtype)
    print(common.format_table(loop_rows, dict(method="method", steps="steps", eta="eta", provider="provider",
                                              loop_ms="ms/loop", us_per_step="us/step",
                                              overhead_us_per_step="overhead us/step",
                                              host_syncs="host syncs")))
    graph_over = [r["overhead_us_per_step"] for r in loop_rows
                  if r["provider"] == "dlh+graph" and r["overhead_us_per_step"] is not None]
    if graph_over:
        print(f"\nsampler overhead per step beyond the model, in a CUDA graph: max {max(graph_over):.2f} us "
              f"(target < 5 us)")
    if out is not None:
        common.write_results(step_rows, meta, out, "diffusion_step")
        common.write_results(loop_rows, meta, out, "diffusion_sampler")
        common.plot_lines([r for r in step_rows if r["graph_us"]], out / "diffusion_step.png",
                          panel=lambda r: r["method"], series="provider", x="elements", y="graph_us",
                          xlabel="elements", ylabel="us per step (in a CUDA graph)",
                          title=f"diffusion step, {meta['device']}")
    return 0
