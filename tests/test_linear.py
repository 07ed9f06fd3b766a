"""DF.linear (F.linear + bias + activation in the matmul's epilogue) and dlh.nn.Linear on every
backend that runs here, against a float64 reference from the same rounded inputs, forward and
every gradient; and csrc/linear.cu through the strict CPU CUDA emulation (tests/cuda_emu).

Without a GPU: `torch` and `triton` (interpreter) on CPU tensors, the CUDA kernels emulated.
With one: every backend on CUDA tensors, plus the GPU-only tests at the bottom.
"""
import ctypes

import pytest
import torch
import torch.nn.functional as F

import dlh_kernels as dlh
import dlh_kernels.functional as DF
from dlh_kernels.ops import linear as linears
from dlh_kernels.triton_kernels import linear as linear_kernels

import cuda_emu
from conftest import DEVICE, DTYPES, HAS_GPU, assert_close, backend_param
from test_autotune import _check_fwd_bwd, _hook_factory, _tune_then_reload, tuning  # noqa: F401

BACKENDS = [backend_param(b) for b in ("torch", "triton", "cuda")]
KERNEL_BACKENDS = [backend_param(b) for b in ("triton", "cuda")]
ACTIVATIONS = [None, "relu", "leaky_relu", "silu", "gelu", "gelu_tanh", "tanh", "sigmoid"]
SLOPE = 0.2  # leaky_relu's, away from the 0.01 default so a dropped slope shows

pytestmark = pytest.mark.usefixtures("poison_outputs")  # NaN-filled outputs: unwritten elements fail


def _skip_without_kernel(backend):
    reason = linears._supports(torch.empty(0, device=DEVICE))(backend)
    if reason:
        pytest.skip(reason)


def _rand(shape, g, scale=1.0, offset=0.1):
    # offset: no exact zeros (relu's kink); unit scale: both signs, gelu's tails reached after W
    return torch.randn(*shape, generator=g) * scale + offset


def _weight(n, k, g, layout):
    """(n, k) weight values in the layouts callers hand us."""
    w = _rand((n, k), g, 2 * max(k, 1) ** -0.5, 0.0)
    if layout == "transposed":  # GPT-2 Conv1D: an (in, out) buffer passed as weight.t()
        return w.t().contiguous().t()
    if layout == "row_slice":   # rows of a wider buffer (a fused QKV weight's slice)
        return torch.cat([w, _rand((n, 3), g)], 1)[:, :k]
    return w


def check_linear(backend, lead, k, n, dtype, activation, bias=True, w_layout="contiguous",
                 x_layout="contiguous", seed=0):
    _skip_without_kernel(backend)
    g = torch.Generator().manual_seed(seed)
    x = _rand(lead + (k,), g)
    if x_layout == "row_slice":     # rows with a stride larger than K: a view, no copy
        x = torch.cat([x, _rand(lead + (5,), g)], -1)[..., :k]
    elif x_layout == "transposed":  # leading dims that do not collapse into one stride
        x = x.transpose(0, 1).contiguous().transpose(0, 1)
    x = x.to(device=DEVICE, dtype=dtype).requires_grad_()
    w = _weight(n, k, g, w_layout).to(device=DEVICE, dtype=dtype).requires_grad_()
    b = _rand((n,), g, 0.5).to(device=DEVICE, dtype=dtype).requires_grad_() if bias else None
    inputs = [x, w, b]
    out = DF.linear(x, w, b, activation=activation, negative_slope=SLOPE, backend=backend)
    ref_in = [None if t is None else t.detach().double().requires_grad_() for t in inputs]
    eager_in = [None if t is None else t.detach().clone().requires_grad_() for t in inputs]
    ref = linears.linear_reference(*ref_in, activation, SLOPE)
    eager = linears.linear_reference(*eager_in, activation, SLOPE)
    assert out.dtype == dtype and out.shape == torch.Size(lead + (n,))
    assert_close(out, ref, eager, dtype, "out")
    dy = torch.randn(out.shape, generator=torch.Generator().manual_seed(7)).to(device=DEVICE, dtype=dtype)
    out.backward(dy)
    ref.backward(dy.double())
    eager.backward(dy)
    for name, t, r, e in zip(("input", "weight", "bias"), inputs, ref_in, eager_in):
        if t is not None:
            assert t.grad is not None and t.grad.shape == t.shape, f"grad {name}"
            assert_close(t.grad, r.grad, e.grad, dtype, f"grad {name}")


# ---------------------------------------------------------------------------------------------
# Every activation in every dtype, forward and all gradients.

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("activation", ACTIVATIONS, ids=str)
def test_activations(activation, dtype, backend):
    check_linear(backend, (9,), 40, 24, dtype, activation)


LINEAR_SHAPES = [
    ((1,), 1, 1, "gelu"),            # 1x1x1
    ((1,), 64, 48, "relu"),          # M = 1: one token (decoding)
    ((37,), 23, 29, "silu"),         # primes everywhere, K not a multiple of 16, N odd
    ((65,), 33, 130, "gelu_tanh"),   # one past a tile in M, several tiles in N, a K tail
    ((2, 17), 64, 96, "leaky_relu"), # the seed ViT's 17 tokens, 3-d input
    ((2, 3, 5), 8, 7, None),         # 4-d input, N odd
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("lead,k,n,activation", LINEAR_SHAPES, ids=str)
def test_awkward_shapes(lead, k, n, activation, dtype, backend):
    check_linear(backend, lead, k, n, dtype, activation)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("w_layout,x_layout,bias,activation", [
    ("transposed", "contiguous", True, "gelu_tanh"),   # GPT-2 Conv1D: addmm(b, x, W) as W.t()
    ("transposed", "row_slice", False, "relu"),
    ("row_slice", "transposed", True, "silu"),
    ("contiguous", "contiguous", False, None),
])
def test_layouts_and_bias(w_layout, x_layout, bias, activation, backend):
    check_linear(backend, (3, 7), 40, 50, torch.float32, activation, bias, w_layout, x_layout)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_transposed_weight_reaches_the_kernel_without_a_copy(dtype, monkeypatch):
    _skip_without_kernel("triton")
    seen = []
    real = linear_kernels.linear

    def spy(x, weight, *args):
        seen.append((weight.data_ptr(), weight.stride()))
        return real(x, weight, *args)

    monkeypatch.setattr(linear_kernels, "linear", spy)
    conv1d_weight = (torch.randn(16, 24, device=DEVICE) * 0.25).to(dtype).requires_grad_()  # (in, out)
    x = torch.randn(2, 5, 16, device=DEVICE, dtype=dtype, requires_grad=True)
    out = DF.linear(x, conv1d_weight.t(), activation="gelu_tanh", backend="triton")
    out.sum().backward()
    assert seen and all(s == (conv1d_weight.data_ptr(), (1, 24)) for s in seen), seen
    ref = F.gelu(torch.addmm(torch.zeros(24, device=DEVICE, dtype=torch.float64), x.detach().double().view(-1, 16),
                             conv1d_weight.detach().double()), approximate="tanh").view(2, 5, 24)
    eager = F.gelu(x.detach() @ conv1d_weight.detach(), approximate="tanh")
    assert_close(out, ref, eager, dtype)
    assert conv1d_weight.grad.shape == (16, 24)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_and_k0(backend):
    _skip_without_kernel(backend)
    w = torch.randn(5, 4, device=DEVICE, requires_grad=True)
    x = torch.randn(0, 4, device=DEVICE, requires_grad=True)
    out = DF.linear(x, w, activation="relu", backend=backend)
    out.sum().backward()
    assert out.shape == (0, 5) and torch.equal(w.grad, torch.zeros_like(w))
    # K = 0: the matmul is all zeros, the output is act(bias)
    b = torch.randn(5, device=DEVICE)
    out = DF.linear(torch.randn(3, 0, device=DEVICE), torch.randn(5, 0, device=DEVICE), b,
                    activation="silu", backend=backend)
    torch.testing.assert_close(out, F.silu(b).expand(3, 5))
    # 1-d input: (K,) -> (N,), as F.linear
    assert DF.linear(torch.randn(4, device=DEVICE), w.detach(), backend=backend).shape == (5,)


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_linear_gelu_is_linear_with_gelu(approximate):
    # linear_gelu's kernel runs linear's program: the same numbers, bit for bit
    _skip_without_kernel("triton")
    g = torch.Generator().manual_seed(3)
    x, w, b = _rand((11, 40), g).to(DEVICE), _rand((33, 40), g, 0.3).to(DEVICE), _rand((33,), g).to(DEVICE)
    act = "gelu_tanh" if approximate == "tanh" else "gelu"
    assert torch.equal(DF.linear(x, w, b, activation=act, backend="triton"),
                       DF.linear_gelu(x, w, b, approximate, backend="triton"))


# The autotuner's own path on CPU (tests/test_autotune.py's machinery): the forward and GRAD keys
# of one autotuner over the 9 configs, the early prune, the persistent cache, a reload.

@pytest.mark.skipif(HAS_GPU, reason="drives the autotuner on CPU tensors through the interpreter")
@pytest.mark.parametrize("activation", ["leaky_relu", None])
def test_autotuned_path(activation, monkeypatch, tuning):
    monkeypatch.setattr(linear_kernels, "_autotuned", lambda: True)
    factory = _hook_factory(monkeypatch, tuning, linear_kernels, "_tuned_linear")
    g = torch.Generator().manual_seed(5)
    x = _rand((3, 7, 40), g).requires_grad_()                      # M = 21 rows, K = 40
    w = _weight(48, 40, g, "transposed").requires_grad_()
    b = _rand((48,), g).requires_grad_()

    def call():
        _check_fwd_bwd(lambda *t: DF.linear(*t, activation=activation, negative_slope=SLOPE, backend="triton"),
                       lambda *t: linears.linear_reference(*t, activation, SLOPE), (x, w, b), seed=6)

    try:  # the backward launches the kernel in GRAD mode (a second key) only with an activation
        _tune_then_reload(tuning, factory, call, {"linear_kernel": (1 if activation is None else 2, None)})
    finally:
        factory.cache_clear()  # the next test starts from a fresh autotuner


# ---------------------------------------------------------------------------------------------
# torch.library contract, compilation, the module, bad input.

@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    _skip_without_kernel(backend)
    g = torch.Generator().manual_seed(2)
    x = _rand((3, 4, 10), g).to(DEVICE).requires_grad_()
    w = _weight(6, 10, g, "transposed").to(DEVICE).requires_grad_()
    b = _rand((6,), g).to(DEVICE).requires_grad_()
    dy = _rand((3, 4, 6), g).to(DEVICE)
    for act in (0, 5):
        torch.library.opcheck(linears.linear_op.custom_op, (x, w, b, act, SLOPE, backend))
    torch.library.opcheck(linears.linear_grad_op.custom_op, (dy, x.detach(), w.detach(), None, 3, SLOPE, backend))


def test_compile_fullgraph():
    _skip_without_kernel("triton")
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(4)
    x = _rand((2, 5, 16), g).to(DEVICE).requires_grad_()
    w1 = _rand((32, 16), g, 0.3).to(DEVICE).requires_grad_()
    w2 = _rand((32, 8), g, 0.3).to(DEVICE).requires_grad_()  # used as w2.t(): (8, 32)
    b = _rand((32,), g).to(DEVICE).requires_grad_()

    def mlp(x, w1, w2, b):
        h = DF.linear(x, w1, b, activation="gelu_tanh", backend="triton")                     # (2, 5, 32)
        h = DF.linear(h, w2.t(), activation="leaky_relu", negative_slope=SLOPE, backend="triton")  # (2, 5, 8)
        return h.pow(2).sum()

    leaves = (x, w1, w2, b)
    eager = mlp(*leaves)
    eager.backward()
    grads = [t.grad.clone() for t in leaves]
    for t in leaves:
        t.grad = None
    compiled = torch.compile(mlp, fullgraph=True)(*leaves)
    compiled.backward()
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-4)
    for t, gr in zip(leaves, grads):
        torch.testing.assert_close(t.grad, gr, rtol=1e-5, atol=1e-4)


def test_module_is_a_drop_in():
    theirs = torch.nn.Linear(6, 5)
    ours = dlh.nn.Linear(6, 5, activation="leaky_relu", negative_slope=SLOPE)
    assert isinstance(ours, torch.nn.Linear) and ours.state_dict().keys() == theirs.state_dict().keys()
    ours.load_state_dict(theirs.state_dict())
    assert "activation='leaky_relu'" in repr(ours)
    ours.backend = "triton" if DEVICE.type == "cpu" else None
    ours, theirs = ours.to(DEVICE), theirs.to(DEVICE)
    x = torch.randn(2, 3, 6, device=DEVICE)
    ref = F.leaky_relu(F.linear(x.double(), theirs.weight.double(), theirs.bias.double()), SLOPE)
    assert_close(ours(x), ref, F.leaky_relu(theirs(x), SLOPE), torch.float32)
    plain = dlh.nn.Linear(6, 5, bias=False, backend="torch").to(DEVICE)
    assert plain.activation is None and plain.bias is None
    torch.testing.assert_close(plain(x), F.linear(x, plain.weight))
    with pytest.raises(ValueError, match="activation"):
        dlh.nn.Linear(2, 2, activation="softplus")


@pytest.mark.parametrize("call_, match", [
    (lambda: DF.linear([1.0], torch.randn(3, 1)), "input must be a torch.Tensor"),
    (lambda: DF.linear(torch.arange(4), torch.randn(3, 4)), "floating-point"),
    (lambda: DF.linear(torch.tensor(1.0), torch.randn(3, 1)), "at least one dim"),
    (lambda: DF.linear(torch.randn(2, 4), "w"), "weight must be a torch.Tensor"),
    (lambda: DF.linear(torch.randn(2, 4), torch.randn(4)), "weight must be 2-D"),
    (lambda: DF.linear(torch.randn(2, 4), torch.randn(3, 5)), "weight must have shape"),
    (lambda: DF.linear(torch.randn(2, 4), torch.randn(3, 4).half()), "weight dtype"),
    (lambda: DF.linear(torch.randn(2, 4), torch.randn(3, 4, device="meta")), "weight is on meta"),
    (lambda: DF.linear(torch.randn(2, 4), torch.randn(3, 4), torch.randn(4)), "bias must have shape"),
    (lambda: DF.linear(torch.randn(2, 4), torch.randn(3, 4), [0.0] * 3), "bias must be a torch.Tensor"),
    (lambda: DF.linear(torch.randn(2, 4), torch.randn(3, 4), torch.randn(3).double()), "bias dtype"),
    (lambda: DF.linear(torch.randn(2, 4), torch.randn(3, 4), activation="softplus"), "activation must be one of"),
    (lambda: DF.linear(torch.randn(2, 4), torch.randn(3, 4), activation=["relu"]), "activation must be one of"),
    (lambda: DF.linear(torch.randn(2, 4), torch.randn(3, 4), negative_slope="0.1"), "negative_slope"),
    (lambda: DF.linear(torch.randn(2, 4), torch.randn(3, 4), backend="fast"), "backend must be one of"),
])
def test_bad_input(call_, match, monkeypatch):
    # raised before any launch: a launch would fail the test
    def no_launch(*args, **kwargs):
        raise AssertionError("a kernel was launched")
    monkeypatch.setattr(linear_kernels, "linear", no_launch)
    with pytest.raises((TypeError, ValueError, RuntimeError), match=match):
        call_()


def test_backend_choice_and_explain():
    with pytest.raises(RuntimeError, match="triton.*float64"):
        DF.linear(torch.randn(2, 3, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64), backend="triton")
    x = torch.randn(2, 3, dtype=torch.float64)  # auto: float64 goes to torch
    torch.testing.assert_close(DF.linear(x, torch.ones(4, 3, dtype=torch.float64), activation="relu"),
                               F.relu(x @ torch.ones(3, 4, dtype=torch.float64)))
    verdict = dlh.explain("linear", torch.randn(2, 8, device=DEVICE), torch.randn(3, 8, device=DEVICE),
                          activation="silu")
    assert verdict["torch"] == "ok"


def test_cuda_reports_a_stale_extension(monkeypatch):
    class Stale:  # an extension built before csrc/linear.cu
        pass
    monkeypatch.setattr(linears._ext, "ext", lambda: Stale())
    assert "no linear_fwd" in linears._supports(torch.empty(1))("cuda")


# ---------------------------------------------------------------------------------------------
# csrc/linear.cu under the strict CPU emulation: the raw interface against float64, y in a
# NaN-filled buffer (every element written exactly once, none past it). Paths: tensor cores
# (fp16/bf16; 16-byte cp.async when aligned and K (or N) % 8 == 0, element loads otherwise;
# k-contiguous and n-contiguous weights), the SIMT kernel (fp32; forced for every dtype with
# DLH_TEST_LINEAR_SIMT_ONLY), and several launches when the column tiles pass gridDim.y
# (lowered to 2). Forward and the GRAD epilogue (y = dy * act'(z)).

_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
_EMU_TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


class LinearArgs(ctypes.Structure):  # mirrors dlh::LinearArgs (csrc/common.cuh)
    _fields_ = ([(n, ctypes.c_uint64) for n in "x w bias dy y".split()]
                + [(n, ctypes.c_int64) for n in "M N K stride_x stride_w stride_dy stride_y".split()]
                + [("w_k_contiguous", ctypes.c_bool), ("activation", ctypes.c_int),
                   ("negative_slope", ctypes.c_float), ("dtype", ctypes.c_int), ("stream", ctypes.c_uint64)])


def _emulated(defines=()):
    reason = cuda_emu.unavailable()
    if reason:
        pytest.skip(reason)
    return cuda_emu.build("linear.cu", [("linear_fwd", "LinearArgs")], defines=list(defines), min_launches=2)


@pytest.fixture(scope="module")
def emu_mma():
    return _emulated()


@pytest.fixture(scope="module")
def emu_simt():
    return _emulated(["-DDLH_TEST_LINEAR_SIMT_ONLY", "-DDLH_TEST_LINEAR_MAX_GRID_Y=2"])


def check_emulated(lib, M, N, K, dtype, act, w_k_contiguous, bias=True, grad=False, x_pad=0, seed=0):
    g = torch.Generator().manual_seed(seed)
    x_buf = _rand((M, K + x_pad), g).to(dtype)
    x = x_buf[:, :K]                                   # row stride K + x_pad
    w = _rand((N, K), g, 2 * max(K, 1) ** -0.5, 0.0).to(dtype)
    w_mem = w.contiguous() if w_k_contiguous else w.t().contiguous()  # (N, K) or (K, N) in memory
    b = _rand((N,), g, 0.5).to(dtype) if bias else None
    dy = _rand((M, N), g).to(dtype) if grad else None
    z = F.linear(x.double(), w.double(), None if b is None else b.double())
    name = linears._ACT_NAMES[act]
    if grad:
        ref = dy.double() * linears.activation_grad_reference(z, name, SLOPE)
    else:
        ref = linears.activation_reference(z, name, SLOPE)
    before = dict(lib.totals)
    y_buf = torch.full((M * N + 37,), float("nan"), dtype=dtype)
    y = y_buf[: M * N].view(M, N)
    lib.run("linear_fwd", LinearArgs(
        x=x.data_ptr(), w=w_mem.data_ptr(), bias=0 if b is None else b.data_ptr(),
        dy=0 if dy is None else dy.data_ptr(), y=y.data_ptr(), M=M, N=N, K=K, stride_x=x.stride(0),
        stride_w=w_mem.stride(0), stride_dy=N, stride_y=N, w_k_contiguous=w_k_contiguous,
        activation=act, negative_slope=SLOPE, dtype=_CODE[dtype], stream=0))
    assert torch.isfinite(y).all() and torch.isnan(y_buf[M * N:]).all(), "y not written exactly"
    err = (y.double() - ref).abs().max().item() / max(1.0, ref.abs().max().item())
    assert err <= _EMU_TOL[dtype], f"linear_fwd: err {err:.2e}"
    return {k: v - before[k] for k, v in lib.totals.items()}  # what ran: launches, mma, cp_async...


# (M, N, K, dtype, activation code, k-contiguous w, bias, grad, x row padding): the path each reaches
EMU_MMA_CASES = [
    (130, 72, 64, torch.bfloat16, 4, True, True, False, 0),    # cp.async, 2 row tiles, 2 col tiles
    (37, 40, 48, torch.float16, 2, False, True, False, 0),     # cp.async, n-contiguous w (ldmatrix.trans)
    (37, 29, 23, torch.bfloat16, 5, True, False, True, 0),     # element loads (K, N odd), GRAD
    (20, 31, 40, torch.float16, 1, False, True, True, 0),      # element loads (N % 8 != 0), n-contiguous, GRAD
    (9, 64, 40, torch.float16, 3, True, True, True, 3),        # element loads (row stride 43), GRAD gelu
    (5, 16, 0, torch.bfloat16, 2, True, True, False, 0),       # K = 0: act(bias)
]


@pytest.mark.parametrize("M,N,K,dtype,act,wk,bias,grad,pad", EMU_MMA_CASES, ids=str)
def test_cuda_tensor_cores_emulated(emu_mma, M, N, K, dtype, act, wk, bias, grad, pad):
    ran = check_emulated(emu_mma, M, N, K, dtype, act, wk, bias, grad, pad)
    vec = K % 8 == 0 and pad % 8 == 0 and (K if wk else N) % 8 == 0
    assert (ran["mma"] > 0) == (K > 0) and (ran["cp_async"] > 0) == (vec and K > 0), ran


EMU_SIMT_CASES = [
    (67, 130, 20, torch.float32, 4, True, True, False, 0),     # 2 row tiles, 3 col tiles: 2 launches
    (33, 17, 37, torch.float32, 5, False, False, True, 1),     # n-contiguous w, GRAD, strided x
    (9, 24, 16, torch.bfloat16, 2, False, True, True, 0),      # 16-bit through the SIMT kernel
]


@pytest.mark.parametrize("M,N,K,dtype,act,wk,bias,grad,pad", EMU_SIMT_CASES, ids=str)
def test_cuda_simt_emulated(emu_simt, M, N, K, dtype, act, wk, bias, grad, pad):
    ran = check_emulated(emu_simt, M, N, K, dtype, act, wk, bias, grad, pad)
    assert ran["mma"] == 0 and ran["launches"] == -(-N // 128), ran  # 64-column tiles, 2 per launch


class _EmulatedExt:
    """dlh_kernels._C's linear_fwd over the emulated library: the op's own cuda glue on CPU."""

    def __init__(self, lib):
        self.lib = lib

    def linear_fwd(self, x, w, bias, dy, y, M, N, K, stride_x, stride_w, stride_dy, stride_y,
                   w_k_contiguous, activation, negative_slope, dtype, stream):
        self.lib.run("linear_fwd", LinearArgs(
            x=x, w=w, bias=bias, dy=dy, y=y, M=M, N=N, K=K, stride_x=stride_x, stride_w=stride_w,
            stride_dy=stride_dy, stride_y=stride_y, w_k_contiguous=w_k_contiguous,
            activation=activation, negative_slope=negative_slope, dtype=dtype, stream=stream))


@pytest.mark.parametrize("dtype,activation,w_layout,x_layout", [
    (torch.bfloat16, "gelu_tanh", "transposed", "contiguous"),   # GPT-2 Conv1D, tensor cores
    (torch.float16, "leaky_relu", "contiguous", "row_slice"),     # element loads (row stride 45)
    (torch.float32, "silu", "row_slice", "transposed"),           # SIMT; x needs the glue's copy
    (torch.float32, None, "transposed", "contiguous"),            # no activation: no GRAD launch
], ids=str)
def test_cuda_glue_emulated(emu_mma, dtype, activation, w_layout, x_layout, monkeypatch):
    """The cuda backend's glue (layouts, the GRAD recompute, the torch matmuls of the backward)
    driving the emulated csrc/linear.cu, forward and every gradient against float64."""
    monkeypatch.setattr(linears._ext, "ext", lambda: _EmulatedExt(emu_mma))
    monkeypatch.setattr(linears._ext, "stream_handle", lambda device: 0)
    g = torch.Generator().manual_seed(1)
    x = _rand((3, 5, 40), g)
    if x_layout == "row_slice":
        x = torch.cat([x, _rand((3, 5, 5), g)], -1)[..., :40]
    elif x_layout == "transposed":
        x = x.transpose(0, 1).contiguous().transpose(0, 1)
    x = x.to(dtype).requires_grad_()
    w = _weight(72, 40, g, w_layout).to(dtype).requires_grad_()
    b = _rand((72,), g, 0.5).to(dtype).requires_grad_()
    out = linears.linear_op(x, w, b, linears.ACTIVATIONS[activation], SLOPE, "cuda")
    leaves = [t.detach().double().requires_grad_() for t in (x, w, b)]
    eagers = [t.detach().clone().requires_grad_() for t in (x, w, b)]
    ref = linears.linear_reference(*leaves, activation, SLOPE)
    eager = linears.linear_reference(*eagers, activation, SLOPE)
    assert_close(out, ref, eager, dtype, "out")
    dy = torch.randn(out.shape, generator=torch.Generator().manual_seed(7)).to(dtype)
    out.backward(dy)
    ref.backward(dy.double())
    eager.backward(dy)
    for name, t, r, e in zip(("input", "weight", "bias"), (x, w, b), leaves, eagers):
        assert_close(t.grad, r.grad, e.grad, dtype, f"grad {name}")


def test_cuda_bad_arguments_emulated(emu_simt):
    base = dict(x=8, w=8, bias=0, dy=0, y=8, M=2, N=2, K=2, stride_x=2, stride_w=2, stride_dy=2,
                stride_y=2, w_k_contiguous=True, activation=0, negative_slope=0.0, dtype=0, stream=0)
    for change, match in [({"activation": 8}, "activation"), ({"dtype": 3}, "dtype"),
                          ({"y": 0}, "y is required"), ({"N": -1}, "N must be"), ({"stride_x": -2}, "strides")]:
        with pytest.raises(RuntimeError, match=match):
            emu_simt.run("linear_fwd", LinearArgs(**{**base, **change}))


# ---------------------------------------------------------------------------------------------
# GPU only: real sizes (GPT-2 small's MLP, with its Conv1D weights) on every kernel backend.

@pytest.mark.gpu
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("lead,k,n,activation,w_layout", [
    ((8, 1024), 768, 3072, "gelu_tanh", "transposed"),   # GPT-2 small c_fc
    ((8, 1024), 3072, 768, None, "transposed"),          # c_proj
    ((1000,), 1000, 1001, "silu", "contiguous"),         # nothing a multiple of a tile
], ids=str)
def test_gpu_sizes(lead, k, n, activation, w_layout, dtype, backend):
    check_linear(backend, lead, k, n, dtype, activation, True, w_layout)


@pytest.mark.gpu
def test_gpu_cuda_matches_triton():
    _skip_without_kernel("cuda")
    g = torch.Generator().manual_seed(9)
    x = _rand((300, 256), g).to(DEVICE, torch.bfloat16)
    w = _weight(384, 256, g, "transposed").to(DEVICE, torch.bfloat16)
    a = DF.linear(x, w, activation="gelu", backend="cuda")
    b = DF.linear(x, w, activation="gelu", backend="triton")
    torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2)
    assert HAS_GPU
