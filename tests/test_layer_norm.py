"""LayerNorm, RMSNorm and their residual-add forms on every backend that runs here, against a
float64 reference computed from the same rounded inputs, forward and every gradient.

Without a GPU: `torch` and `triton` (interpreter) on CPU tensors. With one: all three backends
on CUDA tensors, plus the GPU-only tests at the bottom.
"""
import pytest
import torch
import torch.nn.functional as F

import dlh_kernels.functional as DF
from dlh_kernels.ops import layer_norm as norms
from dlh_kernels.triton_kernels import layer_norm as triton_norms

from conftest import DEVICE, DTYPES, HAS_GPU, assert_close, backend_param

OPS = ["layer_norm", "rms_norm", "add_layer_norm", "add_rms_norm"]


BACKENDS = [backend_param(b) for b in ("torch", "triton", "cuda")]
KERNEL_BACKENDS = [backend_param(b) for b in ("triton", "cuda")]


pytestmark = pytest.mark.usefixtures("poison_outputs")  # NaN-filled outputs: unwritten elements fail


# ---------------------------------------------------------------------------------------------
# One call of an op, its float64 reference and eager PyTorch, from the same inputs.

def _is_add(op):
    return op.startswith("add_")


def _is_rms(op):
    return "rms" in op


def make_inputs(op, lead, norm_shape, dtype, *, weight=True, bias=True, weight_dtype=None,
                layout="contiguous", seed=0):
    """Leaf tensors (x, residual, weight, bias) in `dtype`, random, never zeros."""
    g = torch.Generator().manual_seed(seed)
    shape = tuple(lead) + tuple(norm_shape)

    def rand(*s, scale=1.0, offset=0.0):
        return torch.randn(*s, generator=g) * scale + offset

    def laid_out(t):
        # the same values in the layouts users hand us
        if layout == "row_slice":       # rows with a stride larger than N: views, no copy
            wide = torch.cat([t, rand(*t.shape[:-1], 3)], -1)
            return wide[..., : t.shape[-1]]
        if layout == "transposed":      # leading dims that do not collapse into one stride
            return t.transpose(0, 1).contiguous().transpose(0, 1)
        if layout == "strided_cols":    # a column stride of 2: the glue must copy
            return torch.stack([t, rand(*t.shape)], -1)[..., 0]
        return t

    x = laid_out(rand(*shape, scale=2.0, offset=0.5)).to(dtype)
    r = laid_out(rand(*shape)).to(dtype) if _is_add(op) else None
    wd = weight_dtype or dtype
    w = (rand(*norm_shape, scale=0.5, offset=1.0)).to(wd) if weight else None
    b = rand(*norm_shape, scale=0.5).to(wd) if (bias and not _is_rms(op)) else None
    return [t if t is None else t.to(DEVICE).requires_grad_() for t in (x, r, w, b)]


def call(op, backend, x, r, w, b, norm_shape, eps):
    """The public function; returns a tuple of outputs."""
    fn = getattr(DF, op)
    args = (x,) + ((r,) if _is_add(op) else ()) + (norm_shape, w) + (() if _is_rms(op) else (b,))
    out = fn(*args, eps=eps, backend=backend)
    return out if isinstance(out, tuple) else (out,)


def reference(op, x, r, w, b, norm_shape, eps):
    h = x + r if _is_add(op) else x
    y = norms.layer_norm_reference(h, norm_shape, w, b, eps, rms=_is_rms(op))
    return (y, h) if _is_add(op) else (y,)


def _detached(ts, dtype=None):
    return [None if t is None else t.detach().to(dtype or t.dtype).requires_grad_() for t in ts]


def check_op(op, backend, lead, norm_shape, dtype, **kw):
    eps = 1e-5 if op.endswith("layer_norm") else 1e-6
    inputs = make_inputs(op, lead, norm_shape, dtype, **kw)
    ours = call(op, backend, *inputs, norm_shape, eps)
    grads_out = [torch.randn_like(o, dtype=torch.float32).to(o.dtype) for o in ours]

    ref_in = _detached(inputs, torch.float64)
    ref = reference(op, *ref_in, norm_shape, eps)
    eager_in = _detached(inputs)
    eager = call(op, "torch", *eager_in, norm_shape, eps)

    names = ["out", "input + residual"]
    for o, rf, e, name in zip(ours, ref, eager, names):
        assert o.dtype == dtype and o.shape == inputs[0].shape
        assert_close(o, rf, e, dtype, name)

    torch.autograd.backward(ours, grads_out)
    torch.autograd.backward(ref, [g.double() for g in grads_out])
    torch.autograd.backward(eager, grads_out)
    for name, t, rt, et in zip(["input", "residual", "weight", "bias"], inputs, ref_in, eager_in):
        if t is None:
            continue
        assert t.grad is not None and t.grad.dtype == t.dtype, f"no/wrong gradient for {name}"
        assert_close(t.grad, rt.grad, et.grad, dtype, f"grad {name}")


# ---------------------------------------------------------------------------------------------
# The sweep.

SHAPES = [
    ((1,), (1,)),              # a single element per row: var = 0, rstd = 1/sqrt(eps)
    ((3, 5), (7,)),            # prime row length under a 3-d input
    ((4,), (64,)),             # a power of two: exactly one tile
    ((2, 3), (100,)),          # not a power of two: masked tail
    ((17,), (48,)),            # 17 rows (the seed ViT's tokens): rows not a multiple of BLOCK_M
    ((3,), (4097,)),           # one past a power of two: the tile is almost half empty
    ((2,), (4, 6, 5)),         # normalized_shape over three trailing dims
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("lead,norm_shape", SHAPES, ids=str)
@pytest.mark.parametrize("op", OPS)
def test_sweep(op, lead, norm_shape, dtype, backend):
    check_op(op, backend, lead, norm_shape, dtype)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("op", OPS)
def test_huge_rows(op, dtype, backend):
    # the seed diffusion U-Net's LayerNorm([128, 32, 32]): 131,072-element rows, few of them;
    # beyond the fused limit, so the rows are split over programs
    check_op(op, backend, (3,), (128, 32, 32), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("n", [
    8193,    # one past the backward's fused limit: forward fused (a 16K tile), backward split
    16411,   # 16K + 27: the bf16 forward fused in a 32K tile; fp32 (fused up to 16K) split
    32768,   # the 16-bit forward's fused limit, one full tile; fp32 split
    32771,   # just past it: split everywhere
])
@pytest.mark.parametrize("op", OPS)
def test_wide_rows(op, n, dtype):
    if DEVICE.type == "cuda":
        pytest.skip("test_gpu_sizes covers wide rows at real batch sizes")
    check_op(op, "triton", (2,), (n,), dtype)


def test_wide_row_paths():
    # which path the rows above take (forward: 16-bit rows fused up to 32K, fp32 up to 16K;
    # backward: up to 8K)
    cpu = torch.device("cpu")
    expected = {  # n: (fwd split 16-bit, bwd split 16-bit, fwd split fp32, bwd split fp32)
        8192: (False, False, False, False), 8193: (False, True, False, True),
        16384: (False, True, False, True), 16411: (False, True, True, True),
        32768: (False, True, True, True), 32771: (True, True, True, True)}
    for n, splits in expected.items():
        got = tuple(triton_norms._plan(2, n, cpu, bwd, elem).split
                    for elem in (2, 4) for bwd in (False, True))
        assert got == splits, n
        fused = triton_norms._plan(2, n, cpu, False, 2)
        if not fused.split and n > 8192:  # wide fused rows: one row per program, 16 warps
            assert (fused.block_m, fused.num_warps) == (1, 16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("n", [1000, 5000])
@pytest.mark.parametrize("op", OPS)
def test_backward_row_loop(op, n, dtype):
    assert triton_norms._plan(40, 5000, torch.device("cpu"), True, 2).prefetch
    # 40 rows over the interpreter's 4 programs: 12 rows a group, the last group 4. 1000: tiles of
    # 4 x 1024, 3 per group; 5000: one row of 8192 per tile, 12 per group, the 16-bit backward
    # without a residual gradient loading each a tile ahead (PREFETCH)
    check_op(op, "triton", (5, 8), (n,), dtype)


def test_tiny_limits_reach_split(tiny_split_limits):
    cpu = torch.device("cpu")
    # forward: 64 elements of 16 bits, 32 of fp32; backward: 64 of either
    for elem, backward, fused_n in ((2, False, 64), (4, False, 32), (2, True, 64), (4, True, 64)):
        assert not triton_norms._plan(3, fused_n, cpu, backward, elem).split
        assert triton_norms._plan(3, fused_n + 1, cpu, backward, elem).split


@pytest.fixture
def tiny_split_limits():
    """Reach the split path with interpreter-sized rows: fuse up to 64, split tiles of 16."""
    triton_norms.set_limits(max_fused_n=64, split_tile=16)
    yield
    triton_norms.set_limits()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("lead,n", [
    ((1,), 65),     # one past the fused limit: 5 tiles, the last with a single element
    ((3,), 200),    # several chunks per row, partial last tile
    ((9,), 1000),   # more rows than programs wanted: one chunk per row, many tiles per chunk
])
@pytest.mark.parametrize("op", OPS)
def test_split_path(op, lead, n, dtype, tiny_split_limits):
    if DEVICE.type == "cuda":
        pytest.skip("the interpreter-sized split limits are for CPU runs; GPU tests use real sizes")
    check_op(op, "triton", lead, (n,), dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", ["row_slice", "transposed", "strided_cols"])
@pytest.mark.parametrize("op", OPS)
def test_layouts(op, layout, dtype, backend):
    check_op(op, backend, (4, 6), (33,), dtype, layout=layout)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("weight,bias,weight_dtype", [
    (False, False, None),               # no affine parameters
    (True, False, None),                # weight only
    (False, True, None),                # bias only (LayerNorm)
    (True, True, torch.float32),        # fp32 parameters with bf16 activations (mixed precision)
], ids=["none", "weight", "bias", "fp32_params"])
@pytest.mark.parametrize("op", OPS)
def test_affine_variants(op, weight, bias, weight_dtype, backend):
    if _is_rms(op) and bias and not weight:
        pytest.skip("RMSNorm has no bias")
    check_op(op, backend, (5,), (96,), torch.bfloat16, weight=weight, bias=bias,
             weight_dtype=weight_dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", OPS)
def test_empty(op, backend):
    x, r, w, b = make_inputs(op, (0, 3), (8,), torch.float32)
    outs = call(op, backend, x, r, w, b, (8,), 1e-5)
    assert all(o.shape == (0, 3, 8) for o in outs)
    sum(o.sum() for o in outs).backward()
    assert x.grad.shape == x.shape and (w.grad == 0).all()


def test_deterministic_and_repeatable():
    # no atomics anywhere: two runs give bitwise the same forward and gradients
    runs = []
    for _ in range(2):
        x, r, w, b = make_inputs("add_layer_norm", (6,), (40,), torch.float32, seed=3)
        y, h = call("add_layer_norm", "triton", x, r, w, b, (40,), 1e-5)
        (y.sum() + (h * h).sum()).backward()
        runs.append([y, x.grad, w.grad, b.grad])
    for a, b_ in zip(*runs):
        assert torch.equal(a, b_)


# ---------------------------------------------------------------------------------------------
# torch.library contract and compilation.

def _op_args(op, backend):
    x, r, w, b = make_inputs(op, (3, 4), (33,), torch.float32)
    rms = _is_rms(op)
    args = (x,) + ((r,) if _is_add(op) else ()) + (w,) + (() if rms else (b,))
    return args + (33, 1e-5, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", OPS)
def test_opcheck(op, backend):
    kernel_op = getattr(norms, f"{op}_op")
    torch.library.opcheck(kernel_op.custom_op, _op_args(op, backend))


@pytest.mark.parametrize("backend", BACKENDS)
def test_compile_fullgraph(backend):
    torch._dynamo.reset()
    x, r, w, b = make_inputs("add_layer_norm", (2, 9), (24,), torch.float32)

    def block(x, r, w, b):
        y = DF.layer_norm(x, (24,), w, b, backend=backend)
        z, h = DF.add_rms_norm(y, r, (24,), w, eps=1e-6, backend=backend)
        return (z * h).sum()

    eager = block(x, r, w, b)
    eager.backward()
    grads = [t.grad.clone() for t in (x, r, w, b)]
    for t in (x, r, w, b):
        t.grad = None
    compiled = torch.compile(block, fullgraph=True)(x, r, w, b)
    compiled.backward()
    torch.testing.assert_close(compiled, eager)
    for t, g in zip((x, r, w, b), grads):
        torch.testing.assert_close(t.grad, g)


# ---------------------------------------------------------------------------------------------
# Bad input: a clear error naming the argument, before any launch.

@pytest.mark.parametrize("call_, match", [
    (lambda: DF.layer_norm(torch.randn(2, 8), (7,)), "normalized_shape"),
    (lambda: DF.layer_norm(torch.randn(2, 8), (2, 2, 8)), "normalized_shape"),
    (lambda: DF.layer_norm(torch.randn(2, 8), (8,), torch.randn(7)), "weight"),
    (lambda: DF.layer_norm(torch.randn(2, 8), (8,), None, torch.randn(8, 1)), "bias"),
    (lambda: DF.layer_norm(torch.arange(16).view(2, 8), (8,)), "floating-point"),
    (lambda: DF.layer_norm([1.0, 2.0], (2,)), "input must be a torch.Tensor"),
    (lambda: DF.rms_norm(torch.randn(2, 8), (8,), torch.randn(8, device="meta")), "weight is on meta"),
    (lambda: DF.add_layer_norm(torch.randn(2, 8), torch.randn(2, 7), (8,)), "residual"),
    (lambda: DF.add_rms_norm(torch.randn(2, 8), torch.randn(2, 8).half(), (8,)), "residual dtype"),
    (lambda: DF.layer_norm(torch.randn(2, 8), (8,), backend="fast"), "backend must be one of"),
    (lambda: DF.layer_norm(torch.randn(2, 8), (8,), torch.randn(8).int()), "weight must be floating"),
])
def test_bad_input(call_, match):
    with pytest.raises((TypeError, ValueError, RuntimeError), match=match):
        call_()


def test_named_backend_that_cannot_run_raises():
    x = torch.randn(2, 8, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="triton.*float64"):
        DF.layer_norm(x, (8,), backend="triton")
    if not HAS_GPU:
        with pytest.raises(RuntimeError, match="cuda"):
            DF.layer_norm(x.float(), (8,), backend="cuda")
    # auto never fails for lack of a kernel: float64 goes to torch
    torch.testing.assert_close(DF.layer_norm(x, (8,)), F.layer_norm(x, (8,)))


def test_float64_torch_backend_matches_reference():
    x = torch.randn(3, 10, dtype=torch.float64)
    torch.testing.assert_close(DF.rms_norm(x, (10,), eps=1e-6),
                               norms.rms_norm_reference(x, (10,), eps=1e-6))


# ---------------------------------------------------------------------------------------------
# GPU only: real sizes, every backend, CUDA graphs, 64-bit offsets.

@pytest.mark.gpu
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("lead,n", [((4096,), 768), ((1024,), 4096), ((257,), 8192),
                                    ((64,), 16384), ((8,), 131072), ((2,), 262144), ((3,), 1048579)])
@pytest.mark.parametrize("op", OPS)
def test_gpu_sizes(op, lead, n, dtype, backend):
    check_op(op, backend, lead, (n,), dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_gpu_cuda_graph(backend):
    x, r, w, b = make_inputs("add_layer_norm", (64,), (1024,), torch.bfloat16)
    x, r = x.detach(), r.detach()
    static_out = DF.add_layer_norm(x, r, (1024,), w.detach(), b.detach(), backend=backend)[0]
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = DF.add_layer_norm(x, r, (1024,), w.detach(), b.detach(), backend=backend)[0]
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.cuda.synchronize()
    expected = F.layer_norm(x + r, (1024,), w.detach(), b.detach())
    torch.testing.assert_close(static_out, expected, atol=2e-2, rtol=2e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_gpu_64bit_offsets(backend):
    # 2^31 + N elements: row offsets past 2^31 must not wrap
    n = 131072
    m = 2**31 // n + 1
    x = torch.randn(m, n, device="cuda", dtype=torch.bfloat16)
    y = DF.rms_norm(x, (n,), eps=1e-6, backend=backend)
    tail = x[-2:].double()
    expected = tail * torch.rsqrt(tail.pow(2).mean(-1, keepdim=True) + 1e-6)
    assert (y[-2:].double() - expected).abs().max().item() < 3e-2
    del x, y
    torch.cuda.empty_cache()


def test_split_grids_fit_cuda_limits(monkeypatch, tiny_split_limits):
    # one row of 70,000 split tiles: the backward's column tiles must not land on grid axis y,
    # which CUDA caps at 65,535 (rows of 2^28+ elements at the real tile). Recorded, not run.
    from conftest import assert_grids_fit, record_grids
    names = ("norm_fwd_partial_kernel", "norm_fwd_apply_kernel", "norm_bwd_partial_kernel",
             "norm_bwd_kernel")
    grids = record_grids(monkeypatch, triton_norms, names)
    N = 16 * 70_000
    x = torch.zeros(1, N, device=DEVICE, requires_grad=True)
    w = torch.ones(N, device=DEVICE, requires_grad=True)
    DF.layer_norm(x, (N,), w, backend="triton").sum().backward()
    assert_grids_fit(grids, names)
