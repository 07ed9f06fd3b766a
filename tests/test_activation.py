"""SiLU, ReLU, LeakyReLU, SwiGLU and gated GELU on every backend that runs here, against a float64
reference computed from the same rounded inputs, forward and every gradient.

Without a GPU: `torch` and `triton` (interpreter) on CPU tensors, and the CUDA C++ kernels
(csrc/activation.cu) through the strict CPU emulation of tests/cuda_emu, driven by the op's own
glue (dlh_kernels.ops.activation) with the emulated module standing in for dlh_kernels._C. With
a GPU: every backend on CUDA tensors, plus the GPU-only tests at the bottom.
"""
import ctypes
import re

import pytest
import torch
import torch.nn.functional as F

import cuda_emu
import dlh_kernels as dlh
import dlh_kernels.functional as DF
from dlh_kernels.ops import activation as A

from conftest import DEVICE, DTYPES, assert_close, backend_param

BACKENDS = [backend_param(b) for b in ("torch", "triton", "cuda")]
KERNEL_BACKENDS = [backend_param(b) for b in ("triton", "cuda")]

pytestmark = pytest.mark.usefixtures("poison_outputs")  # NaN-filled outputs: unwritten elements fail

# name -> (our call, eager call, act code, negative_slope); the reference is A.unary_reference
UNARY = {
    "silu": (lambda x, be: DF.silu(x, backend=be), F.silu, A.SILU, 0.0),
    "relu": (lambda x, be: DF.relu(x, backend=be), F.relu, A.RELU, 0.0),
    "leaky_relu": (lambda x, be: DF.leaky_relu(x, 0.2, backend=be), lambda x: F.leaky_relu(x, 0.2),
                   A.LEAKY_RELU, 0.2),
}
# name -> (our call (gate, up, backend), eager call (gate, up), act code)
GATED = {
    "swiglu": (lambda g, u, be: DF.swiglu(g, u, backend=be), lambda g, u: F.silu(g) * u, A.GATED_SILU),
    "gated_gelu": (lambda g, u, be: DF.gated_gelu(g, u, backend=be), lambda g, u: F.gelu(g) * u, A.GATED_GELU),
    "gated_gelu_tanh": (lambda g, u, be: DF.gated_gelu(g, u, "tanh", backend=be),
                        lambda g, u: F.gelu(g, approximate="tanh") * u, A.GATED_GELU_TANH),
}


def _rand(shape, g, scale=2.0, offset=0.3):
    # offset: no exact zeros (the kink of relu); scale 2: both tails of sigmoid / GELU show up
    return torch.randn(*shape, generator=g) * scale + offset


def _laid_out(t, layout, g):
    """The same values in the layouts users hand us."""
    if layout == "row_slice":        # rows with a stride larger than N: views, no copy
        return torch.cat([t, _rand(t.shape[:-1] + (3,), g).to(t)], -1)[..., : t.shape[-1]]
    if layout == "transposed":       # leading dims that do not collapse into one stride
        return t.transpose(0, 1).contiguous().transpose(0, 1)
    if layout == "strided_cols":     # a column stride of 2: the glue copies
        return torch.stack([t, _rand(t.shape, g).to(t)], -1)[..., 0]
    if layout == "channels_last":    # dense, permuted: the flat path, output keeps the layout
        return t.contiguous(memory_format=torch.channels_last)
    return t


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
        assert t.grad is not None and t.grad.dtype == t.dtype, f"no/wrong gradient for {name}"
        assert_close(t.grad, rt.grad, et.grad, dtype, f"grad {name}")


# ---------------------------------------------------------------------------------------------
# silu, relu, leaky_relu

def check_unary(name, backend, shape, dtype, layout="contiguous", seed=0, run=None):
    """run(x, backend) overrides the public call (the emulated cuda tests go through the op)."""
    ours, eager_fn, act, slope = UNARY[name]
    run = run or ours
    g = torch.Generator().manual_seed(seed)
    x = _laid_out(_rand(shape, g).to(device=DEVICE if run is ours else "cpu", dtype=dtype), layout, g)
    x.requires_grad_()
    out = run(x, backend)
    (ref_in,), (eager_in,) = _copies([x], torch.float64), _copies([x])
    ref = A.unary_reference(ref_in, act, slope)
    eager = eager_fn(eager_in)
    assert out.dtype == dtype and out.shape == torch.Size(shape)
    assert_close(out, ref, eager, dtype, f"{name} out")
    if layout == "channels_last":
        assert out.stride() == x.stride(), "the output should keep the input's dense layout"
    _check_grads(["input"], [x], [ref_in], [eager_in], (out, ref, eager), dtype)


UNARY_SHAPES = [
    (1,),              # a single element
    (7,),              # prime length, 1-d
    (3, 5, 7),         # 3-d with a prime last dim
    (17, 48),          # 17 rows (the seed ViT's tokens), a partial tile of rows
    (2, 4097),         # one past a power of two: a nearly empty last tile
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", list(UNARY))
@pytest.mark.parametrize("shape", UNARY_SHAPES, ids=str)
def test_unary_sweep(shape, name, dtype, backend):
    check_unary(name, backend, shape, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(UNARY))
@pytest.mark.parametrize("layout", ["row_slice", "transposed", "strided_cols", "channels_last"])
def test_unary_layouts(layout, name, backend):
    check_unary(name, backend, (2, 3, 5, 6), torch.float32, layout)


# ---------------------------------------------------------------------------------------------
# swiglu, gated_gelu

def _gated_inputs(shape, dtype, layout, g, device):
    """(gate, up, leaves): up None for "one_tensor" (gate holds both halves)."""
    if layout in ("halves", "one_tensor"):  # the two halves of one (..., 2H) matmul output
        x = _rand(shape[:-1] + (2 * shape[-1],), g).to(device=device, dtype=dtype).requires_grad_()
        if layout == "one_tensor":
            return x, None, [x]
        gate, up = x.chunk(2, -1)
        return gate, up, [x]
    gate = _rand(shape, g).to(device=device, dtype=dtype)
    up = _rand(shape, g, 1.0, 0.1).to(device=device, dtype=dtype)
    if layout == "mixed":            # a contiguous gate, an up whose rows are a slice of wider rows
        up = _laid_out(up, "row_slice", g)
    elif layout != "contiguous":
        gate, up = _laid_out(gate, layout, g), _laid_out(up, layout, g)
    gate, up = gate.requires_grad_(), up.requires_grad_()
    return gate, up, [gate, up]


def check_gated(name, backend, shape, dtype, layout="contiguous", seed=0, run=None):
    ours, eager_fn, act = GATED[name]
    run = run or ours
    g = torch.Generator().manual_seed(seed)
    gate, up, leaves = _gated_inputs(shape, dtype, layout, g, DEVICE if run is ours else "cpu")
    out = run(gate, up, backend)
    ref_leaves, eager_leaves = _copies(leaves, torch.float64), _copies(leaves)

    def halves(ls):
        return ls[0].chunk(2, -1) if len(ls) == 1 else ls
    ref = A.gate_reference(halves(ref_leaves)[0], act) * halves(ref_leaves)[1]
    eager = eager_fn(*halves(eager_leaves))
    assert out.dtype == dtype and out.shape == torch.Size(shape)
    assert_close(out, ref, eager, dtype, f"{name} out")
    _check_grads(["x"] if len(leaves) == 1 else ["gate", "up"], leaves, ref_leaves, eager_leaves,
                 (out, ref, eager), dtype)


GATED_SHAPES = [
    (1,),              # one gate, one up
    (5, 13),           # H = 13, prime
    (3, 4, 64),        # 3-d, a power of two
    (2, 4097),         # H = 4097: a nearly empty last tile
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", list(GATED))
@pytest.mark.parametrize("shape", GATED_SHAPES, ids=str)
def test_gated_sweep(shape, name, dtype, backend):
    check_gated(name, backend, shape, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(GATED))
@pytest.mark.parametrize("layout", ["one_tensor", "halves", "mixed", "transposed", "strided_cols",
                                    "channels_last"])
def test_gated_layouts(layout, name, backend):
    check_gated(name, backend, (2, 3, 5, 6), torch.float32, layout)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gated_one_tensor_dtypes(dtype, backend):
    # the fused gate_up_proj form (up=None) in every dtype, SiLU and both GELU forms
    for name in GATED:
        check_gated(name, backend, (3, 40), dtype, "one_tensor")


def test_halves_reach_the_kernel_without_a_copy(monkeypatch):
    """gate and up as views of one matmul output (either call form): the kernels get views of
    that storage (their own row strides), never .contiguous() copies; the one-tensor backward
    writes both halves of one (..., 2H) gradient."""
    seen = []

    def record(name):
        def run(*ts):
            seen.append((name, [(t.data_ptr(), t.stride()) for t in ts[:-1]]))
        return run
    monkeypatch.setitem(A._GATED_FWD, "torch", record("fwd"))
    monkeypatch.setitem(A._GATED_BWD, "torch", record("bwd"))
    x = torch.randn(4, 6, 16, device=DEVICE)
    H, base, esize = 8, x.data_ptr(), x.element_size()
    for up in (None, "view"):
        seen.clear()
        gate, u = (x, None) if up is None else x.chunk(2, -1)
        A.gated_op(gate, u, A.GATED_SILU, "torch")
        (_, [(pg, sg), (pu, su), _y]), = seen
        assert (pg, sg) == (base, (16, 1)) and (pu, su) == (base + H * esize, (16, 1)), seen
    seen.clear()
    A.gated_backward_op(torch.randn(4, 6, H, device=DEVICE), x, None, A.GATED_SILU, "torch")
    (_, ptrs), = seen
    dg, du = ptrs[3], ptrs[4]
    assert du[0] - dg[0] == H * esize and dg[1] == du[1] == (16, 1), ptrs


# ---------------------------------------------------------------------------------------------
# Edges.

@pytest.mark.parametrize("backend", BACKENDS)
def test_empty(backend):
    x = torch.randn(0, 6, device=DEVICE, requires_grad=True)
    for name in UNARY:
        y = UNARY[name][0](x, backend)
        y.sum().backward()
        assert y.shape == (0, 6) and x.grad.shape == (0, 6)
    assert DF.swiglu(torch.randn(3, 0, device=DEVICE), backend=backend).shape == (3, 0)
    assert DF.gated_gelu(torch.randn(4, 0, 2, device=DEVICE), torch.randn(4, 0, 2, device=DEVICE),
                         backend=backend).shape == (4, 0, 2)


def test_scalar_input():
    x = torch.tensor(-0.7, device=DEVICE)
    torch.testing.assert_close(DF.leaky_relu(x, 0.1, backend="triton"), F.leaky_relu(x, 0.1))
    torch.testing.assert_close(DF.swiglu(x, x, backend="triton"), F.silu(x) * x)


def test_special_values():
    # relu keeps NaN (like eager); silu's exp(-x) overflows to inf at x < -88: the limit, not NaN
    x = torch.tensor([float("nan"), -100.0, -0.0, 0.0, 100.0, float("inf")], device=DEVICE)
    for name, (ours, eager_fn, _, _) in UNARY.items():
        torch.testing.assert_close(ours(x, "triton"), eager_fn(x), equal_nan=True, msg=name)
    big = torch.tensor([-100.0, -20.0, 20.0, 100.0], device=DEVICE)
    for name, (ours, eager_fn, _) in GATED.items():
        torch.testing.assert_close(ours(big, big, "triton"), eager_fn(big, big), msg=name)


# ---------------------------------------------------------------------------------------------
# torch.library contract and compilation.

def _opcheck_cases(backend, device=DEVICE):
    g = torch.Generator().manual_seed(2)
    x = _rand((3, 4, 10), g).to(device)
    gate, up = _rand((3, 4, 10), g).to(device), _rand((3, 4, 10), g).to(device)
    return [(A.activation_op, (x, A.SILU, 0.0, backend)), (A.activation_op, (x, A.LEAKY_RELU, 0.2, backend)),
            (A.gated_op, (x, None, A.GATED_GELU_TANH, backend)), (A.gated_op, (gate, up, A.GATED_SILU, backend))]


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

    def mlp(x, w):
        h = x @ w.t()                                           # (2, 5, 32): a fused gate_up_proj
        h = DF.swiglu(h, backend=backend)                       # (2, 5, 16)
        gate, up = (h @ w[:, :16].t()).chunk(2, -1)             # (2, 5, 16) each, views
        h = DF.gated_gelu(gate, up, "tanh", backend=backend)
        return DF.leaky_relu(DF.silu(h, backend=backend), 0.1, backend=backend).pow(2).sum()

    eager = mlp(x, w)
    eager.backward()
    grads = [t.grad.clone() for t in (x, w)]
    for t in (x, w):
        t.grad = None
    compiled = torch.compile(mlp, fullgraph=True)(x, w)
    compiled.backward()
    # the torch backend's graph is fused by inductor, which reorders fp32 sums
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-4)
    for t, gr in zip((x, w), grads):
        torch.testing.assert_close(t.grad, gr, rtol=1e-5, atol=1e-4)


# ---------------------------------------------------------------------------------------------
# Bad input: clear errors naming the argument, before any launch.

@pytest.mark.parametrize("call_, match", [
    (lambda: DF.silu([1.0]), "silu: input must be a torch.Tensor"),
    (lambda: DF.relu(torch.arange(4)), "relu: input must be a floating-point"),
    (lambda: DF.leaky_relu(torch.randn(3), "0.1"), "negative_slope must be a real number"),
    (lambda: DF.leaky_relu(torch.randn(3), float("nan")), "negative_slope must be finite"),
    (lambda: DF.swiglu(torch.randn(2, 5)), "last dim of gate must be even"),
    (lambda: DF.swiglu(torch.tensor(1.0)), "last dim of gate must be even"),
    (lambda: DF.swiglu(torch.randn(2, 4), torch.randn(4)), r"up must have the shape of gate \[2, 4\]"),
    (lambda: DF.swiglu(torch.randn(2, 4), torch.randn(2, 4).half()), "up dtype"),
    (lambda: DF.swiglu(torch.randn(2, 4), torch.randn(2, 4, device="meta")), "up is on meta"),
    (lambda: DF.swiglu(torch.randn(2, 4), [1.0]), "up must be a torch.Tensor"),
    (lambda: DF.gated_gelu(torch.randn(2, 4), approximate="erf"), "approximate"),
    (lambda: DF.gated_gelu(torch.arange(4), torch.arange(4)), "gate must be a floating-point"),
    (lambda: DF.silu(torch.randn(2, 4), backend="fast"), "backend must be one of"),
])
def test_bad_input(call_, match):
    with pytest.raises((TypeError, ValueError), match=match):
        call_()


def test_named_backend_that_cannot_run_raises():
    with pytest.raises(RuntimeError, match="triton.*float64"):
        DF.swiglu(torch.randn(4, dtype=torch.float64, device=DEVICE), backend="triton")
    x = torch.randn(3, 4, dtype=torch.float64, device=DEVICE)  # auto: float64 goes to torch
    torch.testing.assert_close(DF.silu(x), F.silu(x))
    torch.testing.assert_close(DF.gated_gelu(x, x), F.gelu(x) * x)


def test_explain():
    x = torch.randn(2, 8, device=DEVICE)
    for op, args in [("silu", (x,)), ("leaky_relu", (x, 0.3)), ("swiglu", (x,)), ("gated_gelu", (x, x, "tanh"))]:
        verdict = dlh.explain(op, *args)
        assert verdict["torch"] == "ok" and verdict["auto"].startswith("picks"), (op, verdict)
    assert "float64" in A._supports(x.double())("triton")


# ---------------------------------------------------------------------------------------------
# csrc/activation.cu on the CPU: the strict CUDA emulation (tests/cuda_emu), through the op's glue.

EMU_ENTRIES = [("activation_fwd", "ActivationFwdArgs"), ("activation_bwd", "ActivationBwdArgs"),
               ("gated_fwd", "GatedFwdArgs"), ("gated_bwd", "GatedBwdArgs")]


class EmulatedActivationExt:
    """dlh_kernels._C's activation functions (same positional arguments) over the CPU-emulated
    kernels, through ctypes structures mirroring the dlh::*Args structs of csrc/common.cuh."""

    def __init__(self, lib):
        U, I, C = ctypes.c_uint64, ctypes.c_int64, ctypes.c_int  # noqa: E741

        def args(pointers, sizes, slope):
            fields = ([(n, U) for n in pointers.split()] + [(n, I) for n in sizes.split()] + [("act", C)]
                      + ([("negative_slope", ctypes.c_float)] if slope else []) + [("dtype", C), ("stream", U)])
            return type("Args", (ctypes.Structure,), {"_fields_": fields})

        self.args = {
            "activation_fwd": args("x y", "M N stride_x stride_y", True),
            "activation_bwd": args("dy x dx", "M N stride_dy stride_x stride_dx", True),
            "gated_fwd": args("gate up y", "M N stride_gate stride_up stride_y", False),
            "gated_bwd": args("dy gate up dgate dup", "M N stride_dy stride_gate stride_up stride_dgate stride_dup",
                              False),
        }
        self.lib = lib
        self.vector_accesses = {}  # entry point -> 16-byte accesses (misaligned ones are violations)
        for name in self.args:
            setattr(self, name, self._entry(name))

    def _entry(self, name):
        fields = [n for n, _ in self.args[name]._fields_]

        def call(*positional):
            before = self.lib.totals["vector_accesses"]
            try:
                self.lib.run(name, self.args[name](**dict(zip(fields, positional))))
            finally:
                count = self.lib.totals["vector_accesses"] - before
                self.vector_accesses[name] = self.vector_accesses.get(name, 0) + count
        return call


def build_emulated(source=None, defines=("-DDLH_TEST_VECTOR_ACCESS=emu_vector_access",)):
    reason = cuda_emu.unavailable()
    if reason:
        pytest.skip(reason)
    return EmulatedActivationExt(cuda_emu.build("activation.cu", EMU_ENTRIES, defines=list(defines),
                                                min_launches=2, source=source))


@pytest.fixture(scope="module")
def emulated_ext():
    return build_emulated()


@pytest.fixture
def emulated(emulated_ext, monkeypatch):
    """The ops' cuda glue routed to the emulated kernels (the 3-SM emulated GPU)."""
    from dlh_kernels import _ext
    monkeypatch.setattr(_ext, "ext", lambda: emulated_ext)
    monkeypatch.setattr(_ext, "stream_handle", lambda device: 0)
    emulated_ext.vector_accesses.clear()
    return emulated_ext


def _unary_via_op(name):
    _, _, act, slope = UNARY[name]
    return lambda x, backend: A.activation_op(x, act, slope, backend)


def _gated_via_op(name):
    return lambda gate, up, backend: A.gated_op(gate, up, GATED[name][2], backend)


# (shape, dtype, layout, vec): why this case; vec: whether every call must take the 16-byte path
EMULATED_UNARY_CASES = [
    ((9, 1001), torch.float16, "contiguous", True),    # odd rows, contiguous: one row of 9009 in vectors
    ((6, 300), torch.bfloat16, "row_slice", False),    # rows of stride 303 (606 B): not 16-byte, scalar
    ((3, 5, 36), torch.float32, "transposed", True),   # (3, 5, 36) with dims 0, 1 swapped: dense, so the
                                                       # forward is flat; the backward's grad is not:
                                                       # rows of 144 B (copies), vectors
    ((1,), torch.float32, "contiguous", False),        # a single element: the scalar tail only
    ((2, 3, 4, 8), torch.bfloat16, "channels_last", True),  # dense permuted: flat, layout kept
]
EMULATED_GATED_CASES = [
    ((7, 64), torch.bfloat16, "halves", True),         # halves of (7, 128): row stride 256 B, vectors
    ((5, 48), torch.float16, "one_tensor", True),      # up=None on (5, 96): the fused gate_up_proj
    ((4, 13), torch.float32, "one_tensor", False),     # H = 13: up starts 52 B in, scalar
    ((3, 40), torch.float32, "mixed", False),          # up rows of stride 43: scalar
    ((6, 24), torch.float16, "contiguous", True),      # two separate tensors: one flat row each
]


@pytest.mark.parametrize("name", list(UNARY))
@pytest.mark.parametrize("shape,dtype,layout,vec", EMULATED_UNARY_CASES, ids=str)
def test_unary_cuda_emulated(emulated, shape, dtype, layout, vec, name):
    check_unary(name, "cuda", shape, dtype, layout, run=_unary_via_op(name))
    for fn in ("activation_fwd", "activation_bwd"):
        assert (emulated.vector_accesses[fn] > 0) == vec, (fn, emulated.vector_accesses)


@pytest.mark.parametrize("name", list(GATED))
@pytest.mark.parametrize("shape,dtype,layout,vec", EMULATED_GATED_CASES, ids=str)
def test_gated_cuda_emulated(emulated, shape, dtype, layout, vec, name):
    check_gated(name, "cuda", shape, dtype, layout, run=_gated_via_op(name))
    for fn in ("gated_fwd", "gated_bwd"):
        assert (emulated.vector_accesses[fn] > 0) == vec, (fn, emulated.vector_accesses)


def test_opcheck_cuda_emulated(emulated):
    # the cuda backend's glue under torch.library's checks (fake kernels, autograd, schema)
    for op, args in _opcheck_cases("cuda", torch.device("cpu")):
        args = tuple(a.detach().requires_grad_() if isinstance(a, torch.Tensor) else a for a in args)
        torch.library.opcheck(op.custom_op, args)


def test_cuda_emulated_in_place_and_broadcast(emulated):
    """y = x in place (each element read before it is written), and an input broadcast over rows
    (row stride 0) through the raw interface."""
    x = (torch.randn(3001) * 3).to(torch.bfloat16)
    y = x.clone()
    emulated.activation_fwd(y.data_ptr(), y.data_ptr(), 1, 3001, 3001, 3001, A.SILU, 0.0, 2, 0)
    assert_close(y, F.silu(x.double()), F.silu(x), torch.bfloat16)
    row = torch.randn(40)
    out = torch.full((5, 40), float("nan"))
    emulated.gated_fwd(row.data_ptr(), row.data_ptr(), out.data_ptr(), 5, 40, 0, 0, 40, A.GATED_GELU, 0, 0)
    torch.testing.assert_close(out, (F.gelu(row) * row).expand(5, 40))


def test_cuda_emulated_bad_arguments(emulated):
    """Argument errors name the argument (ValueError on the real module); empty problems launch
    nothing and need no pointers."""
    fwd = (16, 32, 2, 8, 8, 8, 0, 0.0, 1, 0)            # x y M N stride_x stride_y act slope dtype stream
    gated = (16, 32, 48, 64, 80, 2, 8, 8, 16, 16, 8, 8, 1, 2, 0)
    bad = [
        (emulated.activation_fwd, fwd[:8] + (3,) + fwd[9:], "dlh::activation_fwd: dtype"),
        (emulated.activation_fwd, fwd[:6] + (5,) + fwd[7:], "dlh::activation_fwd: act must be 0 (silu)"),
        (emulated.activation_fwd, fwd[:1] + (0,) + fwd[2:], "dlh::activation_fwd: y is required"),
        (emulated.activation_fwd, fwd[:5] + (4,) + fwd[6:], "dlh::activation_fwd: stride_y must be >= 8"),
        (emulated.activation_fwd, fwd[:2] + (-1,) + fwd[3:], "dlh::activation_fwd: M must be >= 0"),
        (emulated.activation_bwd, (0, 32, 48, 2, 8, 8, 8, 8, 1, 0.1, 0, 0), "dlh::activation_bwd: dy is required"),
        (emulated.gated_bwd, gated[:12] + (3,) + gated[13:], "dlh::gated_bwd: act must be 0 (silu), 1 (gelu)"),
        (emulated.gated_bwd, gated[:4] + (0,) + gated[5:], "dlh::gated_bwd: dup is required"),
        (emulated.gated_bwd, gated[:11] + (4,) + gated[12:], "dlh::gated_bwd: stride_dup must be >= 8"),
        (emulated.gated_fwd, (16, 0, 48, 2, 8, 8, 8, 8, 0, 0, 0), "dlh::gated_fwd: up is required"),
    ]
    for fn, args, message in bad:
        with pytest.raises(RuntimeError, match=re.escape(message)):
            fn(*args)
    emulated.activation_fwd(0, 0, 0, 8, 8, 8, 0, 0.0, 1, 0)
    emulated.gated_bwd(0, 0, 0, 0, 0, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0)


# ---------------------------------------------------------------------------------------------
# GPU only: real sizes, 64-bit offsets.

@pytest.mark.gpu
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(4096, 3072), (8 * 17, 2048), (3, 1000003), (64, 256, 1536)], ids=str)
def test_gpu_sizes(shape, dtype, backend):
    for name in UNARY:
        check_unary(name, backend, shape, dtype)
    for name in GATED:
        check_gated(name, backend, shape, dtype, "halves")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_gpu_64bit_offsets(backend):
    # 2^31 + 2^20 elements: offsets past 2^31 must not wrap (flat path, and the halves' row path)
    n = 2**20
    m = 2**31 // n + 1
    x = torch.randn(m, n, device="cuda", dtype=torch.bfloat16)
    y = DF.silu(x, backend=backend)
    assert (y[-2:].double() - F.silu(x[-2:].double())).abs().max().item() < 3e-2
    del y
    g = DF.swiglu(x, backend=backend)  # (m, n / 2) from both halves
    tail = x[-2:].double()
    assert (g[-2:].double() - F.silu(tail[:, : n // 2]) * tail[:, n // 2:]).abs().max().item() < 6e-2
    del g
    torch.cuda.empty_cache()
