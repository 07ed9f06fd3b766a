"""Eager vs patched: the same model, once as written and once after ``dlh.patch``, on the same
random batch. Checks that outputs, loss and every gradient agree within the dtype's tolerance,
and times one training step (forward + backward of the loss) of each.

    dlh compare gpt --small
    dlh compare ddpm_unet --device cuda --dtype bfloat16

Dropout is off (eval mode) in both so the two runs are comparable; the timing is the median of
``--iters`` steps after ``--warmup``, with the device synchronised around each step.
"""
from __future__ import annotations

import statistics
import time
from typing import Optional

import torch

# Largest scaled difference (max |patched - eager| / max(max |eager|, 1e-6)) allowed per dtype.
# float32 on the GPU: our kernels and cuDNN/cuBLAS both may use TF32 for convolutions and matmuls.
TOLERANCE = {("cpu", torch.float32): 1e-4, ("cuda", torch.float32): 2e-2,
             ("cpu", torch.float16): 2e-2, ("cuda", torch.float16): 2e-2,
             ("cpu", torch.bfloat16): 8e-2, ("cuda", torch.bfloat16): 8e-2}


def tolerance(device, dtype: torch.dtype) -> float:
    return TOLERANCE[(torch.device(device).type, dtype)]


def scaled_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| relative to max |b| (a, b: patched, eager)."""
    a, b = a.detach().double(), b.detach().double()
    if b.numel() == 0:
        return 0.0
    return (a - b).abs().max().item() / max(b.abs().max().item(), 1e-6)


def _outputs(out) -> list:
    return list(out) if isinstance(out, (tuple, list)) else [out]


def differences(name: str, eager: torch.nn.Module, patched: torch.nn.Module, batch: dict) -> dict:
    """{"output", "loss", "grad"}: the largest scaled difference of each kind, and the worst
    parameter by name ("grad_param"). Leaves the gradients in both models."""
    from dlh_kernels import models as M
    for m in (eager, patched):
        m.zero_grad(set_to_none=True)
    batch = M._fill(name, eager, batch)
    raw_e, raw_p = M.forward(name, eager, batch), M.forward(name, patched, batch)
    out_e, out_p = _outputs(raw_e), _outputs(raw_p)
    output = max(scaled_diff(p, e) for p, e in zip(out_p, out_e))
    if name == "gan":  # its loss takes more than the forward's outputs
        loss_e, loss_p = M.loss(name, eager, batch), M.loss(name, patched, batch)
    else:
        loss_e, loss_p = M.loss_of_output(name, raw_e, batch), M.loss_of_output(name, raw_p, batch)
    loss_e.backward()
    loss_p.backward()
    grads_e = dict(eager.named_parameters())
    worst, worst_name = 0.0, None
    for pname, p in patched.named_parameters():
        ge = grads_e[pname].grad
        if p.grad is None and ge is None:
            continue
        if p.grad is None or ge is None:
            return {"output": output, "loss": scaled_diff(loss_p, loss_e), "grad": float("inf"),
                    "grad_param": pname, "loss_eager": loss_e.item(), "loss_patched": loss_p.item()}
        d = scaled_diff(p.grad, ge)
        if d > worst:
            worst, worst_name = d, pname
    return {"output": output, "loss": scaled_diff(loss_p, loss_e), "grad": worst, "grad_param": worst_name,
            "loss_eager": loss_e.item(), "loss_patched": loss_p.item()}


def time_step(name: str, model: torch.nn.Module, batch: dict, iters: int, warmup: int) -> list:
    """Seconds per forward + backward of the loss, one entry per timed iteration."""
    from dlh_kernels import models as M
    cuda = next(model.parameters()).device.type == "cuda"
    times = []
    for i in range(warmup + iters):
        model.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        M.loss(name, model, batch).backward()
        if cuda:
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return times


def compare(name: str, *, small: bool = False, batch_size: Optional[int] = None, device: str = "cpu",
            dtype: torch.dtype = torch.float32, backend: Optional[str] = None, iters: int = 10,
            warmup: int = 3, seed: int = 0, model: Optional[torch.nn.Module] = None) -> dict:
    """Build (or take) a model, patch a copy, compare and time both; returns a dict of results."""
    import dlh_kernels as dlh
    from dlh_kernels import models as M
    torch.manual_seed(seed)
    eager = (model if model is not None else M.build(name, small=small)).to(device=device, dtype=dtype).eval()
    patched = M.clone(eager)
    report = dlh.patch(patched, backend=backend)
    batch_size = batch_size or (4 if small else 32)
    batch = M.example_batch(name, batch_size, device, model=eager, dtype=dtype,
                            generator=torch.Generator().manual_seed(seed))
    diff = differences(name, eager, patched, batch)
    tol = tolerance(device, dtype)
    diff["ok"] = max(diff["output"], diff["loss"], diff["grad"]) <= tol
    diff["tolerance"] = tol
    timing = {}
    if iters > 0:
        for label, m in (("eager", eager), ("patched", patched)):
            timing[label] = statistics.median(time_step(name, m, batch, iters, warmup))
    return {"model": name, "small": small, "device": str(device), "dtype": str(dtype).replace("torch.", ""),
            "backend": backend or dlh.get_backend(), "batch_size": batch_size, "report": report,
            "replaced": len(report.replaced), **diff, "seconds": timing}


def format_result(r: dict) -> str:
    lines = [f"{r['model']}{' (small)' if r['small'] else ''}: {r['device']} {r['dtype']}, batch {r['batch_size']}, "
             f"backend {r['backend']}; dlh.patch replaced {r['replaced']} module(s)",
             f"{'variant':8} {'loss':>12} {'max out diff':>13} {'max grad diff':>14} {'ms/step':>9} {'speedup':>8}"]
    t = r["seconds"]
    for label in ("eager", "patched"):
        ms = f"{t[label] * 1e3:9.2f}" if label in t else f"{'-':>9}"
        speed = f"{t['eager'] / t[label]:7.2f}x" if label in t else f"{'-':>8}"
        out = f"{r['output']:13.2e}" if label == "patched" else f"{'-':>13}"
        grad = f"{r['grad']:14.2e}" if label == "patched" else f"{'-':>14}"
        lines.append(f"{label:8} {r['loss_' + label]:12.6f} {out} {grad} {ms} {speed}")
    verdict = "match" if r["ok"] else f"MISMATCH (worst gradient: {r['grad_param']})"
    lines.append(f"{verdict}: differences relative to eager's largest value, tolerance {r['tolerance']:.0e}")
    return "\n".join(lines)
