"""One small call of every kernel family, forward and backward, for compute-sanitizer.

    compute-sanitizer --tool memcheck --error-exitcode 1 python3 -m dlh_kernels.bench.sanitize
    compute-sanitizer --tool racecheck --error-exitcode 1 python3 -m dlh_kernels.bench.sanitize --backends cuda
    python3 -m dlh_kernels.bench.sanitize --list

Each case is the smallest shape that still reaches a kernel's awkward paths (rows off the tile,
a causal diagonal, a ragged last block, a broadcast mask, dropout), so that the sanitizers'
10-100x slowdown stays within the GPU session's cap. The sanitizer finds out-of-bounds and
misaligned accesses (memcheck), shared-memory hazards (racecheck) and barrier misuse
(synccheck); this script only makes sure every kernel runs once, checks that the outputs are
finite and prints one line per case, so that a report names the case that triggered it.

Run memcheck with PYTORCH_NO_CUDA_MEMORY_CACHING=1 (the GPU session does): with torch's caching
allocator a read past the end of a tensor usually lands in another block of the same segment,
which memcheck cannot tell from a legal access.
"""
from __future__ import annotations

import argparse
import sys
import time
import traceback
from typing import Callable, Optional, Sequence

import torch

BACKENDS = ("cuda", "triton")
BF16 = torch.bfloat16
_DEVICE = ["cuda"]  # run() sets it; a CPU test runs the cases through the interpreter


def _leaf(*shape, dtype=BF16, scale=1.0, offset=0.0):
    t = torch.randn(*shape, device=_DEVICE[0], dtype=torch.float32) * scale + offset
    return t.to(dtype).requires_grad_(True)


def _backward(*outputs) -> None:
    """Back-propagate random cotangents through every output that needs a gradient."""
    outs = [o for o in outputs if isinstance(o, torch.Tensor) and o.requires_grad]
    torch.autograd.backward(outs, [torch.randn_like(o) for o in outs])


def _norms(backend: str) -> list:
    import dlh_kernels.functional as DF
    x, r = _leaf(7, 1000, offset=0.5), _leaf(7, 1000)
    w, b = _leaf(1000, scale=0.2, offset=1.0), _leaf(1000, scale=0.2)
    y1 = DF.layer_norm(x, (1000,), w, b, backend=backend)
    y2 = DF.rms_norm(x, (1000,), w, backend=backend)
    y3, h3 = DF.add_layer_norm(x, r, (1000,), w, b, backend=backend)
    y4, h4 = DF.add_rms_norm(x, r, (1000,), w, backend=backend)
    wide = _leaf(2, 40_000)  # the split (chunked) path of a row too long for one program
    y5 = DF.layer_norm(wide, (40_000,), backend=backend)
    _backward(y1, y2, y3, h3, y4, h4, y5)
    return [y1, y2, y3, y4, y5, x.grad, w.grad, b.grad, wide.grad]


def _group_norm(backend: str) -> list:
    import dlh_kernels.functional as DF
    x = _leaf(2, 12, 9, 11)
    cl = _leaf(2, 12, 9, 11).detach().to(memory_format=torch.channels_last).requires_grad_(True)
    w, b = _leaf(12, scale=0.2, offset=1.0), _leaf(12, scale=0.2)
    y1 = DF.group_norm(x, 4, w, b, activation="silu", backend=backend)
    y2 = DF.group_norm(cl, 3, w, b, backend=backend)
    _backward(y1, y2)
    return [y1, y2, x.grad, cl.grad, w.grad]


def _gelu(backend: str) -> list:
    import dlh_kernels.functional as DF
    x, bias, g = _leaf(5, 777), _leaf(777, scale=0.3), _leaf(5, 2 * 389)
    y1 = DF.gelu(x, "tanh", bias=bias, backend=backend)
    y2 = DF.gelu(x, backend=backend)
    y3 = DF.geglu(g, backend=backend)
    _backward(y1, y2, y3)
    out = [y1, y2, y3, x.grad, bias.grad, g.grad]
    if backend == "triton":  # linear_gelu has no CUDA C++ kernel (cuBLAS does the GEMM there)
        a, wt = _leaf(37, 96, scale=0.3), _leaf(80, 96, scale=0.1)
        y4 = DF.linear_gelu(a, wt, approximate="tanh", backend=backend)
        _backward(y4)
        out += [y4, a.grad, wt.grad]
    return out


def _conv2d(backend: str) -> list:
    import dlh_kernels.functional as DF
    x = _leaf(2, 16, 13, 11).detach().to(memory_format=torch.channels_last).requires_grad_(True)
    w = _leaf(24, 16, 3, 3, scale=0.1).detach().to(memory_format=torch.channels_last).requires_grad_(True)
    b = _leaf(24, scale=0.1)
    y1 = DF.conv2d(x, w, b, padding=1, activation="silu", backend=backend)
    xg, wg = _leaf(1, 8, 9, 9), _leaf(8, 2, 3, 3, scale=0.2)  # grouped, NCHW, strided
    y2 = DF.conv2d(xg, wg, stride=2, padding=1, groups=4, activation="relu", backend=backend)
    _backward(y1, y2)
    return [y1, y2, x.grad, w.grad, b.grad, xg.grad, wg.grad]


def _attention(backend: str) -> list:
    import dlh_kernels.functional as DF
    q, k, v = _leaf(1, 4, 130, 64), _leaf(1, 2, 130, 64), _leaf(1, 2, 130, 64)  # GQA, off the tile
    y1 = DF.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True, backend=backend)
    q2, k2, v2 = _leaf(2, 2, 77, 128), _leaf(2, 2, 45, 128), _leaf(2, 2, 45, 128)
    mask = torch.rand(2, 1, 77, 45, device=_DEVICE[0]) > 0.3  # bool, broadcast over heads
    y2 = DF.scaled_dot_product_attention(q2, k2, v2, attn_mask=mask, backend=backend)
    y3 = DF.scaled_dot_product_attention(q2, k2, v2, dropout_p=0.2, backend=backend)
    _backward(y1, y2, y3)
    with torch.no_grad():  # head dim 256: forward only on the cuda backend
        q4, k4, v4 = (torch.randn(1, 2, 70, 256, device=_DEVICE[0], dtype=BF16) for _ in range(3))
        y4 = DF.scaled_dot_product_attention(q4, k4, v4, backend=backend)
    return [y1, y2, y3, y4, q.grad, k.grad, v.grad, q2.grad, k2.grad, v2.grad]


def _diffusion_step(backend: str) -> list:
    import dlh_kernels.functional as DF
    alphas = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, device=_DEVICE[0]), 0)
    sample = torch.randn(3, 4, 17, 17, device=_DEVICE[0], dtype=BF16)
    eps, uncond = torch.randn_like(sample), torch.randn_like(sample)
    t = torch.tensor([999, 500, 1], device=_DEVICE[0])
    y1 = DF.diffusion_step(sample, eps, t, t - 1, alphas, method="ddpm", seed=7, backend=backend)
    y2 = DF.diffusion_step(sample, eps, 500, 480, alphas, method="ddim", eta=0.5, guidance_scale=4.0,
                           uncond_output=uncond, seed=3, backend=backend)
    y3 = DF.diffusion_step(sample, eps, 20, -1, alphas, method="ddim", prediction_type="v_prediction",
                           noise=torch.randn_like(sample), backend=backend)
    return [y1, y2, y3]


CASES: dict[str, Callable[[str], list]] = {
    "layer_norm": _norms, "group_norm": _group_norm, "gelu": _gelu, "conv2d": _conv2d,
    "attention": _attention, "diffusion_step": _diffusion_step,
}


def run(backends: Sequence[str], names: Optional[Sequence[str]] = None, device: str = "cuda") -> int:
    """Every case on every backend; 0, or 1 if any case raised or left a non-finite output."""
    import dlh_kernels as dlh
    _DEVICE[0] = device
    available = dlh.backends() if device == "cuda" else {b: "available" for b in backends}
    failed = 0
    for backend in backends:
        if available.get(backend) != "available":
            print(f"{backend:7s} (all)            skipped: {available.get(backend)}", flush=True)
            continue
        for name in names or CASES:
            start = time.time()
            try:
                torch.manual_seed(0)
                outs = CASES[name](backend)
                if device == "cuda":
                    torch.cuda.synchronize()
                bad = [i for i, o in enumerate(outs) if o is None or not torch.isfinite(o.float()).all()]
                status = "ok" if not bad else f"FAILED: outputs {bad} missing or not finite"
            except Exception as exc:  # one family's failure must not hide the others'
                status = f"FAILED: {type(exc).__name__}: {exc}"
                traceback.print_exc()
            failed += status != "ok"
            print(f"{backend:7s} {name:16s} {time.time() - start:6.1f} s  {status}", flush=True)
    return 1 if failed else 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dlh_kernels.bench.sanitize", description=__doc__.splitlines()[0])
    p.add_argument("--backends", default=",".join(BACKENDS), help="comma-separated (default: cuda,triton)")
    p.add_argument("--cases", help=f"comma-separated subset of {','.join(CASES)}")
    p.add_argument("--list", action="store_true", help="print the case names and exit")
    args = p.parse_args(argv)
    if args.list:
        print("\n".join(CASES))
        return 0
    names = [n for n in (args.cases or "").split(",") if n] or None
    unknown = sorted(set(names or ()) - set(CASES))
    if unknown:
        p.error(f"--cases: unknown {unknown}; choose from {', '.join(CASES)}")
    if not torch.cuda.is_available():
        print("sanitize: needs a CUDA GPU (compute-sanitizer checks device code)", file=sys.stderr)
        return 2
    return run([b for b in args.backends.split(",") if b], names)


if __name__ == "__main__":
    sys.exit(main())
