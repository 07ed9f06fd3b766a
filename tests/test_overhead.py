"""Host cost per call: the launch shortcuts are exact, and no per-call cost regresses.

- `triton_kernels.common.launch` (the binder's work once per key) hands the C launcher exactly
  the arguments Triton's own JITFunction.run hands it, and goes back through Triton when the
  specialisation changes (a misaligned view, a unit stride, another dtype);
- the autotuned kernels' steady-state call runs no Autotuner.run;
- bench/results/overhead_cpu.json (committed, `dlh bench overhead --out bench/results/` on CPU):
  today's ratio to the plain torch call of a sample of rows may not exceed twice the committed
  one (a ratio measured in one run, not an absolute time).

Everything runs on the stand-in GPU path (bench/overhead.py: sm_90 compiles, no launches), so it
needs Triton's NVIDIA backend (ptxas ships in its wheel) and no interpreter.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent

def _fake_cuda(monkeypatch):
    from dlh_kernels import _backend, _cache
    for b in ("triton", "cuda"):
        monkeypatch.setitem(_backend._REASONS, (b, "cuda"), None)
    monkeypatch.setattr(_cache, "_auto_orders", {})  # nothing saved by dlh bench --save-auto
    return _backend


def test_auto_puts_the_cheapest_launch_first_for_host_bound_calls(monkeypatch):
    _backend = _fake_cuda(monkeypatch)
    small, big = _backend.HOST_BOUND_BYTES - 1, _backend.HOST_BOUND_BYTES
    can = lambda b: None  # noqa: E731
    assert _backend.choose("layer_norm", None, "cuda", can, nbytes=small) == "cuda"
    assert _backend.choose("layer_norm", None, "cuda", can, nbytes=big) == "triton"
    assert _backend.choose("layer_norm", None, "cuda", can) == "triton"  # size unknown: the order
    no_cuda = lambda b: "no" if b == "cuda" else None  # noqa: E731
    assert _backend.choose("layer_norm", None, "cuda", no_cuda, nbytes=small) == "triton"
    assert _backend.explain_choice("cuda", can, nbytes=small)["auto"] == "picks cuda"
    # an order measured on this device wins over the rule
    monkeypatch.setattr(_backend._cache, "_auto_orders", {"layer_norm": ["triton"]})
    assert _backend.choose("layer_norm", None, "cuda", can, nbytes=small) == "triton"


@pytest.mark.parametrize("tf32", [False, True])
def test_auto_runs_fp32_matmuls_on_torch_without_tf32(monkeypatch, tf32):
    _backend = _fake_cuda(monkeypatch)
    old = torch.backends.cuda.matmul.allow_tf32  # a property of torch's module object: set, then restore
    torch.backends.cuda.matmul.allow_tf32 = tf32
    try:
        order = _backend.matmul_auto_order(torch.float32)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old
    assert _backend.choose("linear_gelu", None, "cuda", lambda b: None, order) == ("triton" if tf32 else "torch")
    assert _backend.matmul_auto_order(torch.bfloat16) == _backend.AUTO_ORDER_CUDA
    # a backend named explicitly still runs the kernel
    assert _backend.choose("linear_gelu", "triton", "cuda", lambda b: None, order) == "triton"


def test_auto_runs_16bit_nchw_conv2d_on_cudnn(monkeypatch):
    from dlh_kernels.ops import conv2d as C
    _backend = _fake_cuda(monkeypatch)
    can = lambda b: None  # noqa: E731
    x = torch.randn(2, 8, 9, 9, dtype=torch.bfloat16)
    assert C._auto_order(x) == ("torch",)
    assert C._auto_order(x.to(memory_format=torch.channels_last)) == _backend.AUTO_ORDER_CUDA
    assert C._auto_order(x.float()) == _backend.AUTO_ORDER_CUDA  # fp32 NCHW pipelines (4-byte copies)
    assert _backend.choose("conv2d", None, "cuda", can, C._auto_order(x)) == "torch"


def test_autograd_fast_path_binds_no_signature(monkeypatch):
    """A call needing a gradient goes through the C apply of the op's autograd.Function, not
    `Function.apply` (which runs inspect.signature on every call), with the same gradients;
    under torch.func transforms it still takes torch's full apply."""
    import inspect

    from dlh_kernels.ops import layer_norm as L
    x = torch.randn(3, 5, 32, dtype=torch.float64, requires_grad=True)
    w = torch.randn(32, dtype=torch.float64, requires_grad=True)
    b = torch.randn(32, dtype=torch.float64, requires_grad=True)
    g = torch.randn(3, 5, 32, dtype=torch.float64)
    real, calls = inspect.signature, []
    monkeypatch.setattr(inspect, "signature", lambda *a, **k: calls.append(a) or real(*a, **k))
    y = L.layer_norm_op(x, w, b, 32, 1e-5, "torch")[0]
    got = torch.autograd.grad(y, (x, w, b), g)
    monkeypatch.setattr(inspect, "signature", real)
    # Function.apply would bind to the Function's forward, the op's _run
    assert not [c for c in calls if c and c[0] == L.layer_norm_op._run], calls
    full = L.layer_norm_op._function.apply(x, w, b, 32, 1e-5, "torch")[0]
    for a, e in zip(got, torch.autograd.grad(full, (x, w, b), g)):
        assert torch.equal(a, e)
    ref = torch.nn.functional.layer_norm(x, (32,), w, b)  # the torch backend computes in fp32
    for a, e in zip(got, torch.autograd.grad(ref, (x, w, b), g)):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)
    loss = lambda w: L.layer_norm_op(x.detach(), w, None, 32, 1e-5, "torch")[0].pow(2).sum()  # noqa: E731
    ref = lambda w: torch.nn.functional.layer_norm(x.detach(), (32,), w).pow(2).sum()  # noqa: E731
    torch.testing.assert_close(torch.func.grad(loss)(w.detach()), torch.func.grad(ref)(w.detach()),
                               rtol=1e-5, atol=1e-5)


class _Inner(torch.nn.Module):
    def forward(self, x):
        return torch.nn.functional.gelu(torch.nn.functional.layer_norm(x, (16,)))


class _Outer(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = _Inner()

    def forward(self, x):
        return torch.nn.functional.silu(self.inner(x))


def test_nested_routers_keep_out_of_the_glue():
    """A routed module inside another (two routers on the mode stack): the inner one's routed
    call runs DF's glue with both routers off, so the outer router sees only the calls of the
    module code itself (review 2026-12 T12: each glue tensor call took a hop through it)."""
    import dlh_kernels as dlh
    import importlib
    P = importlib.import_module("dlh_kernels.patch")  # dlh_kernels.patch is also the function
    model = _Outer()
    x = torch.randn(2, 3, 16)
    want = model(x)
    dlh.patch(model, backend="torch")
    seen = []
    real = P._Router.__torch_function__

    def counting(self, func, types, args=(), kwargs=None):
        seen.append((id(self), getattr(func, "__name__", str(func))))
        return real(self, func, types, args, kwargs)

    P._Router.__torch_function__ = counting
    try:
        got = model(x)
    finally:
        P._Router.__torch_function__ = real
    torch.testing.assert_close(got, want)
    names = sorted(name for _, name in seen)
    # layer_norm and gelu reach the inner router, silu the outer; nothing of the glue
    assert names == ["gelu", "layer_norm", "silu"], names
    assert len({i for i, _ in seen}) == 2


if os.environ.get("TRITON_INTERPRET", "0") == "1":
    # the suite runs Triton through its interpreter on CPU; the stand-in path needs the compiled
    # one, chosen before triton is imported: these tests run again in a child process
    @pytest.mark.slow
    def test_in_a_process_without_the_interpreter():
        env = dict(os.environ, TRITON_INTERPRET="0")
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                               str(Path(__file__))], cwd=ROOT, env=env, capture_output=True,
                              text=True, timeout=1500)
        assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
        assert " passed" in proc.stdout and "failed" not in proc.stdout, proc.stdout[-3000:]
    pytest.skip("the rest runs in the child process", allow_module_level=True)

triton = pytest.importorskip("triton")

from dlh_kernels.bench import overhead  # noqa: E402

TABLE = ROOT / "bench" / "results" / "overhead_cpu.json"

pytestmark = pytest.mark.skipif(overhead._standin_available() is not None,
                                reason=str(overhead._standin_available()))


@pytest.fixture
def recorded(monkeypatch):
    sink: list = []
    monkeypatch.setattr(overhead, "RECORD", sink)
    with overhead.standin_gpu():
        yield sink


def _same(a, b) -> bool:
    """The launch arguments agree: scalars equal, tensors the very same tensor."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return a is b
    return type(a) is type(b) and a == b


def _launch_twice(fn, grid, args, meta, sink):
    from dlh_kernels.triton_kernels import common
    from triton.runtime.jit import JITFunction
    calls = {"n": 0}
    real = JITFunction.run

    def counted(self, *a, **k):
        calls["n"] += 1
        return real(self, *a, **k)

    JITFunction.run = counted
    try:
        common.launch(fn, grid, args, meta)   # through Triton: binder, compile, launch
        first = calls["n"]
        common.launch(fn, grid, args, meta)   # the shortcut
        second = calls["n"] - first
    finally:
        JITFunction.run = real
    assert len(sink) == 2, "each call launches once"
    return first, second


def test_launch_hands_the_launcher_what_triton_does(recorded):
    from dlh_kernels.triton_kernels import activation as K
    x = torch.randn(33, 70)
    y = torch.empty_like(x)
    args = (x, y, 33, 70, x.stride(0), y.stride(0), 0.0)
    meta = dict(ACT=0, BLOCK_M=4, BLOCK_N=128, num_warps=4)
    first, second = _launch_twice(K.activation_fwd_kernel, (9,), args, meta, recorded)
    assert first == 1 and second == 0  # the second call skipped JITFunction.run
    (name_a, via_triton), (name_b, via_shortcut) = recorded
    assert name_a == name_b and len(via_triton) == len(via_shortcut)
    # grid (3), stream, function, packed metadata, then every parameter in order: the same
    head, tail = list(range(6)), list(range(9, len(via_triton)))
    assert all(_same(via_triton[i], via_shortcut[i]) for i in head + tail), (via_triton, via_shortcut)
    assert len(via_triton) == 9 + len(args) + 3  # the parameters: positional ones, then ACT, BLOCK_M, BLOCK_N
    # launch metadata and the enter/exit hooks: Triton passes its (empty) hook chains, the
    # shortcut None (the C launcher then calls nothing)
    assert via_shortcut[6:9] == (None, None, None)
    assert all(getattr(h, "calls", None) == [] for h in via_triton[7:9])


@pytest.mark.parametrize("change", ["misaligned", "unit_stride", "dtype", "constexpr"])
def test_launch_goes_back_to_triton_when_the_specialisation_changes(recorded, change):
    from dlh_kernels.triton_kernels import activation as K
    from dlh_kernels.triton_kernels import common
    base = torch.randn(40, 80)
    x, y = base[:33, :70], torch.empty(33, 70)
    meta = dict(ACT=0, BLOCK_M=4, BLOCK_N=128, num_warps=4)
    common.launch(K.activation_fwd_kernel, (9,), (x, y, 33, 70, x.stride(0), y.stride(0), 0.0), meta)
    if change == "misaligned":
        x = base[:33, 1:71]  # 4 bytes off a 16-byte boundary
    elif change == "unit_stride":
        x = base[:1, :70]
    elif change == "dtype":
        x, y = x.to(torch.bfloat16), y.to(torch.bfloat16)
    else:
        meta = dict(meta, ACT=1)
    from triton.runtime.jit import JITFunction
    seen = []
    real = JITFunction.run
    JITFunction.run = lambda self, *a, **k: (seen.append(1), real(self, *a, **k))[1]
    try:
        common.launch(K.activation_fwd_kernel, (9,), (x, y, x.shape[0], 70, x.stride(0), y.stride(0), 0.0), meta)
    finally:
        JITFunction.run = real
    assert seen == [1], f"a {change} call must be specialised by Triton again"


def test_ops_take_the_shortcut_in_steady_state(recorded):
    """Every public op's second call of a shape launches without Triton's JITFunction.run, and
    the autotuned ones without Autotuner.run."""
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction
    counts = {"jit": 0, "tune": 0}
    real_jit, real_tune = JITFunction.run, Autotuner.run

    def jit(self, *a, **k):
        counts["jit"] += 1
        return real_jit(self, *a, **k)

    def tune(self, *a, **k):
        counts["tune"] += 1
        return real_tune(self, *a, **k)

    slow = []
    for case in overhead.cases():
        call = overhead._loop(case, lambda *a, c=case, **k: c.dlh(*a, be="triton", **k), "fwd",
                              torch.float32, "cpu")
        call()  # compiles (an autotuned kernel: tunes, and launches through Triton)
        call()  # an autotuned kernel's first launch with the chosen config, through Triton
        JITFunction.run, Autotuner.run = jit, tune
        try:
            counts.update(jit=0, tune=0)
            call()
            if counts["jit"] or counts["tune"]:
                slow.append((case.op, dict(counts)))
        finally:
            JITFunction.run, Autotuner.run = real_jit, real_tune
    assert not slow, slow


ROWS = [("layer_norm", "fwd", "torch"), ("gelu", "fwd", "torch"), ("silu", "fwd", "triton"),
        ("silu", "fwd", "cuda"), ("linear", "fwd", "triton"), ("diffusion_step", "fwd", "triton"),
        ("diffusion_step", "fwd", "cuda"), ("rotary_embedding", "fwd", "triton")]


@pytest.mark.skipif(not TABLE.exists(), reason="no committed table")
def test_no_per_call_cost_regresses_past_2x():
    committed = {(r["op"], r["mode"], r["backend"]): r for r in json.loads(TABLE.read_text())["rows"]}
    wanted = [row for row in ROWS if row in committed]
    assert wanted, "the committed table lost the sampled rows"
    ops = sorted({op for op, _, _ in wanted})
    rows = overhead.measure(ops=ops, dtype=torch.bfloat16, backends=sorted({b for _, _, b in wanted}),
                            repeats=9, log=lambda msg: None)
    now = {(r["op"], r["mode"], r["backend"]): r for r in rows}
    worse = []
    for key in wanted:
        if key in now and now[key]["ratio"] > 2 * committed[key]["ratio"]:
            worse.append((key, committed[key]["ratio"], now[key]["ratio"]))
    assert not worse, f"per-call cost vs F.* more than doubled: {worse}"
