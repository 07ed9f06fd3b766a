"""GELU, bias-GELU, GeGLU and linear_gelu on every backend that runs here, against a float64
reference computed from the same rounded inputs, forward and every gradient.

Without a GPU: `torch` and `triton` (interpreter) on CPU tensors. With one: every backend on
CUDA tensors, plus the GPU-only tests at the bottom.
"""
import pytest
import torch
import torch.nn.functional as F

import dlh_kernels as dlh
import dlh_kernels.functional as DF
from dlh_kernels.ops import gelu as gelus

from conftest import DEVICE, DTYPES, assert_close, backend_param



BACKENDS = [backend_param(b) for b in ("torch", "triton", "cuda")]
KERNEL_BACKENDS = [backend_param(b) for b in ("triton", "cuda")]
LINEAR_BACKENDS = [backend_param("torch"), backend_param("triton"),
                   backend_param("cuda", no_kernel="linear_gelu has no CUDA C++ kernel yet")]


pytestmark = pytest.mark.usefixtures("poison_outputs")  # NaN-filled outputs: unwritten elements fail


def _rand(shape, g, scale=2.0, offset=0.3):
    # offset: no exact zeros; scale 2: both tails of the GELU (x < -3 and x > 3) show up
    return torch.randn(*shape, generator=g) * scale + offset


def _laid_out(t, layout, g):
    """The same values in the layouts users hand us."""
    if layout == "row_slice":        # rows with a stride larger than N: views, no copy
        return torch.cat([t, _rand(t.shape[:-1] + (3,), g).to(t)], -1)[..., : t.shape[-1]]
    if layout == "transposed":       # leading dims that do not collapse into one stride
        return t.transpose(0, 1).contiguous().transpose(0, 1)
    if layout == "strided_cols":     # a column stride of 2
        return torch.stack([t, _rand(t.shape, g).to(t)], -1)[..., 0]
    if layout == "channels_last":    # dense, permuted: the flat path, output keeps the layout
        return t.contiguous(memory_format=torch.channels_last)
    if layout == "expanded":         # stride 0 along a dim: every row reads the same memory
        return t[:1].expand(t.shape)
    return t


def _leaf(t, dtype):
    return t.to(device=DEVICE, dtype=dtype).detach().requires_grad_()


def _copies(ts, dtype=None):
    return [None if t is None else t.detach().to(dtype or t.dtype).requires_grad_() for t in ts]


def _check_grads(names, ours, refs, eagers, outs, dtype):
    """Backpropagate the same random gradient through all three and compare input gradients."""
    o, r, e = outs
    grad = torch.randn(o.shape, generator=torch.Generator().manual_seed(7)).to(device=o.device, dtype=o.dtype)
    o.backward(grad)
    r.backward(grad.double())
    e.backward(grad)
    for name, t, rt, et in zip(names, ours, refs, eagers):
        if t is None:
            continue
        assert t.grad is not None and t.grad.dtype == t.dtype, f"no/wrong gradient for {name}"
        assert_close(t.grad, rt.grad, et.grad, dtype, f"grad {name}")


# ---------------------------------------------------------------------------------------------
# gelu and bias-gelu

def check_gelu(backend, shape, dtype, approximate="none", bias=None, layout="contiguous", seed=0):
    """bias: None, "same" (input dtype) or "fp32"."""
    g = torch.Generator().manual_seed(seed)
    base = _rand(shape, g).to(device=DEVICE, dtype=dtype)
    # the expanded case differentiates the (1, ...) leaf the expansion reads from
    x = (base[:1] if layout == "expanded" else _laid_out(base, layout, g)).requires_grad_()
    b = None if bias is None else _leaf(_rand(shape[-1:], g, 0.5, 0.1), torch.float32 if bias == "fp32" else dtype)
    inputs = [x, b]

    def run(xx, bb, be):
        xx = xx.expand(shape) if layout == "expanded" else xx
        return DF.gelu(xx, approximate, bias=bb, backend=be)

    out = run(x, b, backend)
    ref_in, eager_in = _copies(inputs, torch.float64), _copies(inputs)
    ref = gelus.gelu_reference(ref_in[0].expand(shape) + (0 if b is None else ref_in[1]), approximate == "tanh")
    eager = run(*eager_in, "torch")
    assert out.dtype == dtype and out.shape == torch.Size(shape)
    assert_close(out, ref, eager, dtype, "out")
    if layout == "channels_last":
        assert out.stride() == x.stride(), "the output should keep the input's dense layout"
    _check_grads(["input", "bias"], inputs, ref_in, eager_in, (out, ref, eager), dtype)


GELU_SHAPES = [
    (1,),              # a single element
    (7,),              # prime length, 1-d
    (3, 5, 7),         # 3-d with a prime last dim
    (17, 48),          # 17 rows (the seed ViT's tokens), a partial tile of rows
    (300, 24),         # many short rows: several row groups for the bias gradient
    (2, 4097),         # one past a power of two: a nearly empty last tile
]
GELU_VARIANTS = [("none", None), ("tanh", None), ("none", "same"), ("tanh", "fp32")]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("approximate,bias", GELU_VARIANTS)
@pytest.mark.parametrize("shape", GELU_SHAPES, ids=str)
def test_gelu_sweep(shape, approximate, bias, dtype, backend):
    check_gelu(backend, shape, dtype, approximate, bias)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("bias", ["same", "fp32"])
@pytest.mark.parametrize("n", [1000, 5000])
def test_gelu_bias_grad_row_loop(n, bias, dtype):
    # 40 rows over the interpreter's 4 programs, the bias gradient's row loop loading each tile
    # a tile ahead on half tiles: n = 1000: 2 x 1024 tiles, 12 rows a group (the last 4 rows and 8
    # masked ones), a masked column tail; n = 5000: 1 x 2048 tiles (4096 halved), 20 rows a group
    check_gelu("triton", (40, n), dtype, "tanh", bias)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bias", [None, "same"])
@pytest.mark.parametrize("layout", ["row_slice", "transposed", "strided_cols", "channels_last", "expanded"])
def test_gelu_layouts(layout, bias, backend):
    check_gelu(backend, (2, 3, 5, 6), torch.float32, "tanh", bias, layout)


# ---------------------------------------------------------------------------------------------
# geglu

def check_geglu(backend, shape, dtype, approximate="none", layout="contiguous", seed=0):
    g = torch.Generator().manual_seed(seed)
    x = _laid_out(_rand(shape, g).to(device=DEVICE, dtype=dtype), layout, g).requires_grad_()
    out = DF.geglu(x, approximate, backend=backend)
    (ref_in,), (eager_in,) = _copies([x], torch.float64), _copies([x])
    ref = gelus.geglu_reference(ref_in, approximate == "tanh")
    eager = DF.geglu(eager_in, approximate, backend="torch")
    assert out.dtype == dtype and out.shape == torch.Size(shape[:-1] + (shape[-1] // 2,))
    assert_close(out, ref, eager, dtype, "out")
    _check_grads(["input"], [x], [ref_in], [eager_in], (out, ref, eager), dtype)


GEGLU_SHAPES = [
    (2,),              # one value, one gate
    (5, 26),           # H = 13, prime
    (3, 4, 128),       # H = 64, 3-d
    (2, 8194),         # H = 4097
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("shape", GEGLU_SHAPES, ids=str)
def test_geglu_sweep(shape, approximate, dtype, backend):
    check_geglu(backend, shape, dtype, approximate)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["row_slice", "transposed", "strided_cols"])
def test_geglu_layouts(layout, backend):
    check_geglu(backend, (3, 4, 10), torch.float32, "none", layout)


# ---------------------------------------------------------------------------------------------
# linear_gelu

def check_linear_gelu(backend, lead, k, n, dtype, approximate="none", bias=True,
                      weight_layout="contiguous", seed=0):
    g = torch.Generator().manual_seed(seed)
    x = _leaf(_rand(lead + (k,), g, 1.0, 0.1), dtype)
    w = _rand((n, k), g, k ** -0.5 * 2, 0.0)
    if weight_layout == "transposed":  # a (k, n) buffer seen as (n, k): column-major weight
        w = w.t().contiguous().t()
    w = w.to(device=DEVICE, dtype=dtype).requires_grad_()
    b = _leaf(_rand((n,), g, 0.5, 0.1), dtype) if bias else None
    inputs = [x, w, b]
    out = DF.linear_gelu(x, w, b, approximate, backend=backend)
    ref_in, eager_in = _copies(inputs, torch.float64), _copies(inputs)
    ref = gelus.linear_gelu_reference(*ref_in, tanh=approximate == "tanh")
    eager = F.gelu(F.linear(*eager_in), approximate=approximate)
    assert out.dtype == dtype and out.shape == torch.Size(lead + (n,))
    assert_close(out, ref, eager, dtype, "out")
    _check_grads(["input", "weight", "bias"], inputs, ref_in, eager_in, (out, ref, eager), dtype)


LINEAR_SHAPES = [
    ((1,), 1, 1),        # 1x1x1
    ((7,), 45, 33),      # nothing a multiple of a tile
    ((2, 17), 64, 96),   # the seed ViT's 17 tokens, 3-d input
    ((65,), 33, 130),    # one past a tile in M, several tiles in N, K tail
]


@pytest.mark.parametrize("backend", LINEAR_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("lead,k,n", LINEAR_SHAPES, ids=str)
def test_linear_gelu_sweep(lead, k, n, dtype, backend):
    check_linear_gelu(backend, lead, k, n, dtype, "none", bias=True)


@pytest.mark.parametrize("backend", LINEAR_BACKENDS)
@pytest.mark.parametrize("approximate,bias,weight_layout", [
    ("tanh", True, "contiguous"),
    ("none", False, "contiguous"),
    ("tanh", False, "transposed"),
])
def test_linear_gelu_variants(approximate, bias, weight_layout, backend):
    check_linear_gelu(backend, (3, 7), 40, 50, torch.float32, approximate, bias, weight_layout)


@pytest.mark.parametrize("backend", LINEAR_BACKENDS)
def test_linear_gelu_strided_input(backend):
    # an input whose rows are a slice of wider rows goes to the kernel as strides, not a copy
    g = torch.Generator().manual_seed(1)
    wide = _rand((9, 40), g, 1.0).to(DEVICE)
    x = wide[:, 5:35]
    w = _rand((20, 30), g, 0.3).to(DEVICE)
    out = DF.linear_gelu(x, w, None, backend=backend)
    ref = gelus.linear_gelu_reference(x.double(), w.double())
    assert_close(out, ref, F.gelu(F.linear(x, w)), torch.float32)


# ---------------------------------------------------------------------------------------------
# Edges shared by the three ops.

@pytest.mark.parametrize("backend", BACKENDS)
def test_empty(backend):
    x = torch.randn(0, 6, device=DEVICE, requires_grad=True)
    b = torch.randn(6, device=DEVICE, requires_grad=True)
    y = DF.gelu(x, bias=b, backend=backend)
    y.sum().backward()
    assert y.shape == (0, 6) and torch.equal(b.grad, torch.zeros(6, device=DEVICE))
    assert DF.geglu(torch.randn(3, 0, device=DEVICE), backend=backend).shape == (3, 0)
    assert DF.gelu(torch.randn(4, 0, 2, device=DEVICE), backend=backend).shape == (4, 0, 2)
    if backend != "cuda":
        w = torch.randn(5, 4, device=DEVICE, requires_grad=True)
        z = DF.linear_gelu(torch.randn(0, 4, device=DEVICE), w, backend=backend)
        assert z.shape == (0, 5)


@pytest.mark.parametrize("backend", LINEAR_BACKENDS)
def test_linear_gelu_empty_reduction(backend):
    # K = 0: the matmul is all zeros, the output is gelu(bias)
    b = torch.randn(5, device=DEVICE)
    out = DF.linear_gelu(torch.randn(3, 0, device=DEVICE), torch.randn(5, 0, device=DEVICE), b, backend=backend)
    torch.testing.assert_close(out, F.gelu(b).expand(3, 5))


def test_scalar_input():
    x = torch.tensor(0.7, device=DEVICE)
    torch.testing.assert_close(DF.gelu(x, backend="triton"), F.gelu(x))


def test_deterministic_bias_grad():
    # the bias gradient is summed from fixed per-group partials: bitwise equal across runs
    runs = []
    for _ in range(2):
        g = torch.Generator().manual_seed(5)
        x = _rand((300, 24), g).to(DEVICE).requires_grad_()
        b = _rand((24,), g).to(DEVICE).requires_grad_()
        DF.gelu(x, bias=b, backend="triton").pow(2).sum().backward()
        runs.append((x.grad, b.grad))
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])


# ---------------------------------------------------------------------------------------------
# torch.library contract and compilation.

def _opcheck_cases(backend):
    g = torch.Generator().manual_seed(2)
    x = _rand((3, 4, 10), g).requires_grad_()
    b = _rand((10,), g).requires_grad_()
    w = _rand((6, 10), g, 0.3).requires_grad_()
    cases = [(gelus.gelu_op, (x, b, False, backend)), (gelus.gelu_op, (x, None, True, backend)),
             (gelus.geglu_op, (x, True, backend))]
    if backend != "cuda":
        cases.append((gelus.linear_gelu_op, (x, w, b[:6], False, backend)))
    return [(op, tuple(a.to(DEVICE) if isinstance(a, torch.Tensor) else a for a in args)) for op, args in cases]


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    for op, args in _opcheck_cases(backend):
        args = tuple(a.detach().requires_grad_() if isinstance(a, torch.Tensor) else a for a in args)
        torch.library.opcheck(op.custom_op, args)


@pytest.mark.parametrize("backend", BACKENDS)
def test_compile_fullgraph(backend):
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(4)
    x = _rand((2, 5, 16), g).to(DEVICE).requires_grad_()
    w = _rand((32, 16), g, 0.3).to(DEVICE).requires_grad_()
    b = _rand((32,), g).to(DEVICE).requires_grad_()
    lin_backend = "triton" if backend == "cuda" else backend

    def mlp(x, w, b):
        h = DF.linear_gelu(x, w, b, "tanh", backend=lin_backend)        # (2, 5, 32)
        h = DF.geglu(h, backend=backend)                                  # (2, 5, 16)
        return DF.gelu(h, bias=b[:16], backend=backend).pow(2).sum()

    eager = mlp(x, w, b)
    eager.backward()
    grads = [t.grad.clone() for t in (x, w, b)]
    for t in (x, w, b):
        t.grad = None
    compiled = torch.compile(mlp, fullgraph=True)(x, w, b)
    compiled.backward()
    # the torch backend's graph is fused by inductor, which reorders fp32 sums
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-4)
    for t, gr in zip((x, w, b), grads):
        torch.testing.assert_close(t.grad, gr, rtol=1e-5, atol=1e-4)


# ---------------------------------------------------------------------------------------------
# Modules and bad input.

@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_module_is_a_drop_in(approximate):
    ours, theirs = dlh.nn.GELU(approximate), torch.nn.GELU(approximate)
    assert isinstance(ours, torch.nn.GELU) and ours.state_dict().keys() == theirs.state_dict().keys()
    ours.backend = "triton"
    x = torch.randn(4, 9, device=DEVICE)
    assert_close(ours(x), gelus.gelu_reference(x.double(), approximate == "tanh"), theirs(x), torch.float32)


@pytest.mark.parametrize("call_, match", [
    (lambda: DF.gelu([1.0]), "input must be a torch.Tensor"),
    (lambda: DF.gelu(torch.arange(4)), "floating-point"),
    (lambda: DF.gelu(torch.randn(4), "fast"), "approximate"),
    (lambda: DF.gelu(torch.randn(2, 4), bias=torch.randn(3)), "bias must have shape"),
    (lambda: DF.gelu(torch.randn(2, 4), bias=torch.randn(4, device="meta")), "bias is on meta"),
    (lambda: DF.gelu(torch.tensor(1.0), bias=torch.randn(1)), "bias needs an input"),
    (lambda: DF.geglu(torch.randn(2, 5)), "must be even"),
    (lambda: DF.geglu(torch.randn(2, 4), approximate="erf"), "approximate"),
    (lambda: DF.linear_gelu(torch.randn(2, 4), torch.randn(3, 5)), "weight must have shape"),
    (lambda: DF.linear_gelu(torch.randn(2, 4), torch.randn(4)), "weight must be a 2-D"),
    (lambda: DF.linear_gelu(torch.randn(2, 4), torch.randn(3, 4), torch.randn(4)), "bias must have shape"),
    (lambda: DF.linear_gelu(torch.randn(2, 4), torch.randn(3, 4).half()), "weight dtype"),
    (lambda: DF.gelu(torch.randn(2, 4), backend="fast"), "backend must be one of"),
])
def test_bad_input(call_, match):
    with pytest.raises((TypeError, ValueError, RuntimeError), match=match):
        call_()


def test_named_backend_that_cannot_run_raises():
    with pytest.raises(RuntimeError, match="triton.*float64"):
        DF.gelu(torch.randn(3, dtype=torch.float64), backend="triton")
    with pytest.raises(RuntimeError, match="backend 'cuda' cannot run"):
        DF.linear_gelu(torch.randn(2, 4, device=DEVICE), torch.randn(3, 4, device=DEVICE), backend="cuda")
    x = torch.randn(3, 4, dtype=torch.float64)  # auto: float64 goes to torch
    torch.testing.assert_close(DF.gelu(x), F.gelu(x))


def test_explain():
    x = torch.randn(2, 8, device=DEVICE)
    verdict = dlh.explain("linear_gelu", x, torch.randn(3, 8, device=DEVICE))
    assert verdict["torch"] == "ok" and verdict["cuda"] != "ok"
    # the op's own reason, whatever the device
    assert "no CUDA C++ kernel" in gelus._supports_linear_gelu(x)("cuda")


# ---------------------------------------------------------------------------------------------
# GPU only: real sizes, CUDA graphs, 64-bit offsets.

@pytest.mark.gpu
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(4096, 3072), (8 * 17, 2048), (3, 1000003), (64, 256, 1536)], ids=str)
def test_gpu_gelu_sizes(shape, dtype, backend):
    check_gelu(backend, shape, dtype, "tanh", "same")
    check_gelu(backend, shape, dtype, "none", None)
    check_geglu(backend, shape[:-1] + (2 * shape[-1],), dtype, "none")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("lead,k,n", [((4096,), 768, 3072), ((8, 17), 256, 512), ((1000,), 1000, 1001)], ids=str)
def test_gpu_linear_gelu_sizes(lead, k, n, dtype):
    check_linear_gelu("triton", lead, k, n, dtype, "tanh", bias=True)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_gpu_cuda_graph(backend):
    x = torch.randn(64, 1024, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(1024, device="cuda", dtype=torch.bfloat16)
    DF.gelu(x, bias=b, backend=backend)  # compile / warm up outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = DF.gelu(x, bias=b, backend=backend)
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(out, F.gelu(x + b), atol=2e-2, rtol=2e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_gpu_64bit_offsets(backend):
    # 2^31 + 2^20 elements, flat path and row path: offsets past 2^31 must not wrap
    n = 2**20
    m = 2**31 // n + 1
    x = torch.randn(m, n, device="cuda", dtype=torch.bfloat16)
    for bias in (None, torch.randn(n, device="cuda", dtype=torch.bfloat16)):
        y = DF.gelu(x, bias=bias, backend=backend)
        tail = x[-2:].double() + (0 if bias is None else bias.double())
        assert (y[-2:].double() - F.gelu(tail)).abs().max().item() < 3e-2
        del y
    torch.cuda.empty_cache()
