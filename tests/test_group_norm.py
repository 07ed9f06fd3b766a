"""GroupNorm (+ fused SiLU) on every backend that runs here, against a float64 reference
computed from the same rounded inputs, forward and every gradient.

Without a GPU: `torch` and `triton` (interpreter) on CPU tensors. With one: all three backends
on CUDA tensors, plus the GPU-only tests at the bottom. The CUDA C++ kernels are also run on the
CPU through tests/test_cuda_build.py's emulation.
"""
import pytest
import torch
import torch.nn.functional as F

import dlh_kernels as dlh
import dlh_kernels.functional as DF
from dlh_kernels.ops import group_norm as gn
from dlh_kernels.triton_kernels import group_norm as triton_gn

from conftest import DEVICE, HAS_GPU, assert_close, backend_param

ACTIVATIONS = [None, "silu"]


BACKENDS = [backend_param(b) for b in ("torch", "triton", "cuda")]
KERNEL_BACKENDS = [backend_param(b) for b in ("triton", "cuda")]


pytestmark = pytest.mark.usefixtures("poison_outputs")  # NaN-filled outputs: unwritten elements fail


# ---------------------------------------------------------------------------------------------
# One call, its float64 reference and eager PyTorch, from the same inputs.

def laid_out(t, layout, g):
    """The same values in the layouts users hand us."""
    if layout == "channels_last":       # NHWC storage (4-d) or (N, S, C) storage (3-d)
        return t.movedim(1, -1).contiguous().movedim(-1, 1)
    if layout == "padded":              # a slice: strides larger than dense, spatial collapses
        wide = torch.cat([t, torch.randn(t.shape[:-2] + (2, t.shape[-1]), generator=g)], -2)
        return wide[..., : t.shape[-2], :]
    if layout == "strided_spatial":     # every other column: the spatial stride is 2
        return torch.stack([t, torch.randn(t.shape, generator=g)], -1)[..., 0]
    if layout == "interleaved":         # memory order N, H, C, W: H and W do not collapse
        return t.permute(0, 2, 1, 3).contiguous().permute(0, 2, 1, 3)
    return t


def make_inputs(shape, dtype, *, weight=True, bias=True, weight_dtype=None, layout="contiguous",
                seed=0, offset=3.0):
    """Leaf tensors (x, weight, bias) in `dtype`, random, never zeros; x ~ offset + 2 * N(0, 1)."""
    g = torch.Generator().manual_seed(seed)
    C = shape[1]
    # a mean far from 0 exposes E[x^2] - E[x]^2 variance formulas; a ramp over the spatial dims
    # gives every chunk of a split group its own mean, which the combination must account for
    ramp = torch.linspace(-2.0, 2.0, shape[-1]) if len(shape) > 2 else 0.0
    x = laid_out(torch.randn(*shape, generator=g) * 2.0 + offset + ramp, layout, g).to(dtype)
    wd = weight_dtype or dtype
    w = (torch.randn(C, generator=g) * 0.5 + 1.0).to(wd) if weight else None
    b = (torch.randn(C, generator=g) * 0.5).to(wd) if bias else None
    return [t if t is None else t.to(DEVICE).requires_grad_() for t in (x, w, b)]


def _detached(ts, dtype=None):
    return [None if t is None else t.detach().to(dtype or t.dtype).requires_grad_() for t in ts]


def check_op(shape, groups, dtype, activation, backend, eps=1e-5, **kw):
    inputs = make_inputs(shape, dtype, **kw)
    out = DF.group_norm(inputs[0], groups, inputs[1], inputs[2], eps, activation=activation,
                        backend=backend)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(dtype).to(DEVICE)

    ref_in = _detached(inputs, torch.float64)
    ref = gn.group_norm_reference(ref_in[0], groups, ref_in[1], ref_in[2], eps, activation)
    eager_in = _detached(inputs)
    eager = DF.group_norm(eager_in[0], groups, eager_in[1], eager_in[2], eps, activation=activation,
                          backend="torch")

    assert out.dtype == dtype and out.shape == inputs[0].shape
    assert_close(out, ref, eager, dtype, "out")
    out.backward(grad_out)
    ref.backward(grad_out.double())
    eager.backward(grad_out)
    for name, t, rt, et in zip(["input", "weight", "bias"], inputs, ref_in, eager_in):
        if t is None:
            continue
        assert t.grad is not None and t.grad.dtype == t.dtype, f"no/wrong gradient for {name}"
        assert_close(t.grad, rt.grad, et.grad, dtype, f"grad {name}")
    return out


# ---------------------------------------------------------------------------------------------
# The sweep.

SHAPES = [
    ((2, 6, 5, 3), 3),         # odd spatial size (5x3 = 15): masked tile tail
    ((1, 12, 7, 9), 4),        # Cg = 3 channels per group (not a power of two), 7x9 spatial
    ((2, 4, 7), 1),            # one group: a LayerNorm over (C, L)
    ((2, 6, 4, 4), 6),         # G = C: an InstanceNorm
    ((3, 8), 4),               # spatial-less (N, C): groups of 2 elements
    ((2, 4, 1), 4),            # one element per group: var = 0, y = act(b)
    ((2, 4, 3, 2, 2), 2),      # three spatial dims (a 3-d U-Net)
]
# every dtype with the SiLU; without it, the fp32 and bf16 ends
MODES = [("silu", torch.float32), ("silu", torch.float16), ("silu", torch.bfloat16),
         (None, torch.float32), (None, torch.bfloat16)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("activation,dtype", MODES, ids=str)
@pytest.mark.parametrize("shape,groups", SHAPES, ids=str)
def test_sweep(shape, groups, activation, dtype, backend):
    check_op(shape, groups, dtype, activation, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_unet_lowest_resolution(backend):
    # the U-Net's GroupNorm(32, 64) + SiLU at 4x4: 32 groups of Cg = 2 channels
    check_op((1, 64, 4, 4), 32, torch.bfloat16, "silu", backend)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("shape,groups,layout", [
    ((1, 128, 32, 32), 32, "contiguous"),     # U-Net GroupNorm(32, 128) at 32x32: 4K-element
                                              # groups, the fused path at its default limits
    ((1, 32, 64, 64), 8, "channels_last"),    # 16K-element groups at 64x64, past the fused
                                              # limit: the split path at its default tile
])
def test_unet_groups(shape, groups, layout, backend):
    # bf16 only, for time: the interpreter pays per element here; fp32 runs in the sweep
    check_op(shape, groups, torch.bfloat16, "silu", backend, layout=layout)


@pytest.fixture
def tiny_split_limits():
    """Reach the split path with interpreter-sized groups: fuse tiles up to 64 elements, split
    tiles of 16, 16 programs wanted (several chunks per group), batches of 1-2 samples."""
    triton_gn.set_limits(max_fused=64, split_tile=16, batch_bytes=1200, cpu_programs=16)
    yield
    triton_gn.set_limits()


@pytest.mark.parametrize("shape,groups,layout,activation,dtype,kw", [
    # one group of 4 x 35: 4 one-channel blocks x 3 spatial chunks, the last of 3 positions
    ((1, 4, 5, 7), 1, "contiguous", "silu", torch.float32, {}),
    # channels_last, Cg = 3 in a 4-wide tile, 5 chunks of 2 tiles; 1 sample per batch: 2 launch
    # pairs
    ((2, 6, 5, 7), 2, "channels_last", "silu", torch.float32, {}),
    ((2, 6, 5, 7), 2, "channels_last", "silu", torch.float16, {}),
    # one past a power of two along the only spatial dim; no activation
    ((1, 4, 33), 2, "contiguous", None, torch.float16, {}),
    # a slice whose spatial stride is 2
    ((2, 4, 6, 6), 2, "strided_spatial", "silu", torch.bfloat16, {}),
    # odd H*W = 35, Cg = 2: groups of 70 elements, not a multiple of the 16-position chunk; bf16
    ((2, 6, 5, 7), 3, "contiguous", "silu", torch.bfloat16, {}),
    # without the affine parameters, with and without the SiLU
    ((1, 4, 5, 7), 1, "contiguous", "silu", torch.float32, dict(weight=False, bias=False)),
    ((2, 6, 5, 7), 2, "channels_last", None, torch.bfloat16, dict(weight=False, bias=False)),
    # a mean of +100 (std 2): per-chunk (count, mean, M2) merged by Chan's formula stays exact
    # where sum(x^2)/L - mean^2 would cancel ~4 of fp32's 7 digits; every dtype, both layouts
    ((1, 4, 5, 7), 1, "contiguous", "silu", torch.float32, dict(offset=100.0)),
    ((2, 6, 5, 7), 2, "channels_last", "silu", torch.float16, dict(offset=100.0)),
    ((2, 6, 5, 7), 3, "contiguous", None, torch.bfloat16, dict(offset=100.0)),
], ids=str)
def test_split_path(shape, groups, layout, activation, dtype, kw, tiny_split_limits):
    if DEVICE.type == "cuda":
        pytest.skip("the interpreter-sized split limits are for CPU runs; GPU tests use real sizes")
    N, C = shape[:2]
    S = 1
    for d in shape[2:]:
        S *= d
    plan = triton_gn._plan(N, C, groups, S, layout == "channels_last", C * S * dtype.itemsize,
                           DEVICE)
    assert plan.split and plan.c_blocks * plan.s_chunks > 1, plan  # several chunks per group
    check_op(shape, groups, dtype, activation, "triton", layout=layout, **kw)


def _split_plan_ok(plan, CG, S):
    """The chunks of a split plan cover the group exactly once."""
    assert (plan.c_blocks - 1) * plan.block_c < CG <= plan.c_blocks * plan.block_c
    assert plan.chunk_s % plan.block_s == 0
    assert (plan.s_chunks - 1) * plan.chunk_s < S <= plan.s_chunks * plan.chunk_s
    assert plan.chunks_p2 >= plan.c_blocks * plan.s_chunks


# (N, C, G, H, W) of the SD / DDPM U-Nets at batch 2, and what a 132-SM GPU (H100 SXM, H200)
# must get: split when N * G = 64 programs would leave SMs idle and the groups are large
SD_UNET = [
    (2, 320, 32, 64, 64),    # SD's first resolution: 40,960-element groups, Cg = 10
    (2, 640, 32, 32, 32),    # 20,480-element groups, Cg = 20
    (2, 1280, 32, 16, 16),   # 10,240-element groups, Cg = 40
    (1, 256, 32, 128, 128),  # a batch of 1: 32 groups of 131K elements
    (2, 256, 32, 32, 32),    # 8,192-element groups: would fit one program, but 64 of them
]


@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "bwd"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("N,C,G,H,W", SD_UNET, ids=str)
def test_plan_spreads_few_large_groups_over_the_gpu(N, C, G, H, W, channels_last, backward):
    # the GPU's plan computed here (nothing runs): every pass of the split launches at least
    # 2 programs per SM, each over a chunk of its group, the chunks covering the group once
    triton_gn.set_limits(sm_count=132)
    try:
        S = H * W
        calls = triton_gn.launches(N, C, G, S, channels_last, 2, DEVICE, backward)
        reread = C * S * 2 * (2 if backward else 1)  # what the glue passes: x (and dy), bf16
        plan = triton_gn._plan(N, C, G, S, channels_last, reread, DEVICE)
    finally:
        triton_gn.set_limits()
    kind = "bwd" if backward else "fwd"
    assert [k for k, _ in calls] == [f"group_norm_{kind}_partial_kernel",
                                     f"group_norm_{kind}_apply_kernel"] * (len(calls) // 2)
    # at least 2 per SM, or one program per split tile when the tensor has fewer tiles than that
    # (under ~1M elements: all of it is in flight at once either way)
    tiles = N * G * plan.c_blocks * -(-S // plan.block_s)
    assert all(programs >= min(2 * 132, tiles) for _, programs in calls), (calls, plan)
    assert sum(p for _, p in calls[::2]) == N * G * plan.c_blocks * plan.s_chunks
    _split_plan_ok(plan, C // G, S)
    if (N, C, G, H, W) == (2, 320, 32, 64, 64):  # the figures the kernel header quotes
        assert calls == [(f"group_norm_{kind}_partial_kernel", 512 if channels_last else 640),
                         (f"group_norm_{kind}_apply_kernel", 512 if channels_last else 640)]


@pytest.mark.parametrize("N,C,G,H,W,sms,split", [
    (2, 256, 32, 32, 32, 132, True),     # 64 groups of 8K on 132 SMs: SMs idle, split
    (2, 256, 32, 32, 32, 16, False),     # the same on 16 SMs: 4 per SM, one program per group
    (6, 256, 32, 32, 32, 132, False),    # 192 groups, 1.45 per SM: fused (see _plan)
    (16, 256, 32, 32, 32, 132, False),   # 512 programs: 3.9 per SM, fused
    (64, 128, 32, 32, 32, 132, False),   # the DDPM U-Net's many 4K groups: fused
    (2, 1280, 32, 8, 8, 132, False),     # 64 groups of 2,560 elements: too small to split
], ids=str)
def test_plan_splits_when_groups_underfill(N, C, G, H, W, sms, split):
    triton_gn.set_limits(sm_count=sms)
    try:
        plan = triton_gn._plan(N, C, G, H * W, False, C * H * W * 2, DEVICE)
        calls = triton_gn.launches(N, C, G, H * W, False, 2, DEVICE)
    finally:
        triton_gn.set_limits()
    assert plan.split == split, plan
    assert len(calls) == (2 if split else 1)
    if split:
        _split_plan_ok(plan, C // G, H * W)


@pytest.mark.parametrize("shape,groups,layout", [
    ((2, 6, 5, 7), 2, "channels_last"),  # split, one sample per batch: two launch pairs
    ((1, 4, 5, 7), 1, "contiguous"),     # split, one launch pair
    ((3, 8, 2, 2), 4, "contiguous"),     # fused
], ids=str)
def test_launches_lists_what_the_glue_launches(shape, groups, layout, monkeypatch,
                                               tiny_split_limits):
    # the program counts the tests above and the kernel header quote are the glue's own grids
    from conftest import record_grids
    names = ("group_norm_fwd_kernel", "group_norm_bwd_kernel", "group_norm_fwd_partial_kernel",
             "group_norm_fwd_apply_kernel", "group_norm_bwd_partial_kernel",
             "group_norm_bwd_apply_kernel")
    grids = record_grids(monkeypatch, triton_gn, names)
    x, w, b = make_inputs(shape, torch.float32, layout=layout)
    DF.group_norm(x, groups, w, b, activation="silu", backend="triton").sum().backward()
    N, C = shape[:2]
    S = shape[2] * shape[3]
    expected = [call for bwd in (False, True)
                for call in triton_gn.launches(N, C, groups, S, layout == "channels_last", 4,
                                               DEVICE, bwd)]
    assert [(name, x_ * y_ * z_) for name, (x_, y_, z_) in grids] == expected


@pytest.mark.parametrize("activation,dtype", [("silu", torch.float32), (None, torch.bfloat16)],
                         ids=str)
def test_underfilled_groups_run_split(activation, dtype):
    # groups small enough for one program each (a 2 x 16 tile under a fused limit of 64), but
    # only N * G = 4 of them for a forced 16-SM device: the split path runs, and agrees
    if DEVICE.type == "cuda":
        pytest.skip("the interpreter-sized limits are for CPU runs")
    shape, groups = (2, 4, 3, 5), 2
    triton_gn.set_limits(max_fused=64, split_tile=16, sm_count=1)
    try:
        assert not triton_gn._plan(2, 4, 2, 15, False, 4 * 15 * 4, DEVICE).split  # 1 SM: fused
        triton_gn.set_limits(max_fused=64, split_tile=16, sm_count=16)
        assert triton_gn._plan(2, 4, 2, 15, False, 4 * 15 * 4, DEVICE).split
        check_op(shape, groups, dtype, activation, "triton", offset=100.0)
    finally:
        triton_gn.set_limits()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", ["channels_last", "padded", "strided_spatial", "interleaved"])
def test_layouts(layout, dtype, backend):
    out = check_op((2, 6, 5, 4), 3, dtype, "silu", backend, layout=layout)
    if layout == "channels_last" and backend != "torch":
        # no copy back to NCHW: the output keeps the input's layout, as eager's does
        assert out.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("weight,bias,weight_dtype", [
    (False, False, None),               # no affine parameters
    (True, False, None),                # weight only
    (False, True, None),                # bias only: the SiLU sees xhat + b
    (True, True, torch.float32),        # fp32 parameters with bf16 activations (mixed precision)
], ids=["none", "weight", "bias", "fp32_params"])
def test_affine_variants(weight, bias, weight_dtype, backend):
    check_op((2, 8, 3, 5), 4, torch.bfloat16, "silu", backend, weight=weight, bias=bias,
             weight_dtype=weight_dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(0, 4, 3), (2, 4, 0)], ids=str)
def test_empty(shape, backend):
    x, w, b = make_inputs(shape, torch.float32)
    y = DF.group_norm(x, 2, w, b, activation="silu", backend=backend)
    assert y.shape == shape
    y.sum().backward()
    assert x.grad.shape == x.shape
    if backend != "torch" or shape[0] == 0:  # eager's dw/db of an empty spatial dim are NaN
        assert (w.grad == 0).all() and (b.grad == 0).all()


def test_deterministic_and_repeatable():
    # no atomics anywhere: two runs give bitwise the same forward and gradients
    runs = []
    for _ in range(2):
        x, w, b = make_inputs((3, 8, 5, 5), torch.float32, seed=3)
        y = DF.group_norm(x, 4, w, b, activation="silu", backend="triton")
        (y * y).sum().backward()
        runs.append([y, x.grad, w.grad, b.grad])
    for a, b_ in zip(*runs):
        assert torch.equal(a, b_)


# ---------------------------------------------------------------------------------------------
# torch.library contract, compilation, modules and patch.

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout,activation", [("contiguous", "silu"), ("channels_last", "none")])
def test_opcheck(layout, activation, backend):
    if backend == "torch" and layout == "channels_last" and not HAS_GPU:
        pytest.skip("for time: the layout logic is the kernels' (the torch op shares it)")
    x, w, b = make_inputs((2, 6, 3, 5), torch.float32, layout=layout)
    torch.library.opcheck(gn.group_norm_op.custom_op, (x, w, b, 3, 1e-5, activation, backend))


@pytest.mark.parametrize("backend", BACKENDS)
def test_compile_fullgraph(backend):
    # Without a GPU, aot_eager: the same Dynamo trace (fullgraph: no graph break around the op)
    # and AOT autograd through the fake and backward registrations, without Inductor's C++
    # codegen of the surrounding ops (~20 s per test on CPU, and nothing of ours).
    compiler = "inductor" if HAS_GPU else "aot_eager"
    torch._dynamo.reset()
    x, w, b = make_inputs((2, 8, 4, 5), torch.float32)

    def block(x, w, b):
        h = DF.group_norm(x, 4, w, b, activation="silu", backend=backend)
        return (DF.group_norm(h * 2, 2, w, None, backend=backend) * h).sum()

    eager = block(x, w, b)
    eager.backward()
    grads = [t.grad.clone() for t in (x, w, b)]
    for t in (x, w, b):
        t.grad = None
    compiled = torch.compile(block, fullgraph=True, backend=compiler)(x, w, b)
    compiled.backward()
    torch.testing.assert_close(compiled, eager)
    for t, g in zip((x, w, b), grads):
        torch.testing.assert_close(t.grad, g)


class _ResBlockNorm(torch.nn.Module):
    """The normalisation half of a DDPM U-Net ResBlock: GroupNorm(32, C), SiLU."""

    def __init__(self, c=64):
        super().__init__()
        self.norm = torch.nn.GroupNorm(32, c)
        self.act = torch.nn.SiLU()

    def forward(self, x):
        return self.act(self.norm(x))


def test_module_is_drop_in_and_patch_swaps_it():
    torch.manual_seed(0)
    x = torch.randn(2, 64, 4, 4)
    fused = dlh.nn.GroupNorm(32, 64, activation="silu")
    fused.backend = "triton"
    ref = torch.nn.GroupNorm(32, 64)
    ref.load_state_dict(fused.state_dict())
    assert isinstance(fused, torch.nn.GroupNorm) and fused.state_dict().keys() == ref.state_dict().keys()
    torch.testing.assert_close(fused(x), F.silu(ref(x)))
    assert "activation='silu'" in repr(fused)
    with pytest.raises(ValueError, match="activation"):
        dlh.nn.GroupNorm(2, 4, activation="relu")

    model = _ResBlockNorm()
    before = model(x)
    report = dlh.patch(model, ops={"group_norm"}, backend="triton")
    assert type(model.norm) is dlh.nn.GroupNorm and [r[0] for r in report.replaced] == ["norm"]
    torch.testing.assert_close(model(x), before)
    assert dlh.unpatch(model) == 1 and type(model.norm) is torch.nn.GroupNorm


def test_explain():
    x = torch.randn(2, 8, 3, 3, dtype=torch.float64)
    verdict = dlh.explain("group_norm", x, 4, activation="silu")
    assert verdict["torch"] == "ok" and "float64" in verdict["triton"] and verdict["auto"] == "picks torch"


# ---------------------------------------------------------------------------------------------
# Bad input: a clear error naming the argument, before any launch.

@pytest.mark.parametrize("call_, match", [
    (lambda: DF.group_norm(torch.randn(2, 6, 4), 4), "num_groups must be a positive divisor"),
    (lambda: DF.group_norm(torch.randn(2, 6, 4), 0), "num_groups"),
    (lambda: DF.group_norm(torch.randn(2, 6, 4), 2.0), "num_groups must be an int"),
    (lambda: DF.group_norm(torch.randn(6), 2), r"input must have shape \(N, C, \*\)"),
    (lambda: DF.group_norm(torch.randn(2, 6, 4), 2, torch.randn(5)), r"weight must have shape \[6\]"),
    (lambda: DF.group_norm(torch.randn(2, 6, 4), 2, None, torch.randn(6, 1)), "bias must have shape"),
    (lambda: DF.group_norm(torch.randn(2, 6, 4), 2, torch.randn(6, device="meta")), "weight is on meta"),
    (lambda: DF.group_norm(torch.randn(2, 6, 4), 2, torch.randn(6).int()), "weight must be floating"),
    (lambda: DF.group_norm(torch.arange(12).view(2, 6), 2), "input must be a floating-point"),
    (lambda: DF.group_norm([1.0, 2.0], 1), "input must be a torch.Tensor"),
    (lambda: DF.group_norm(torch.randn(2, 6, 4), 2, activation="relu"), "activation must be one of"),
    (lambda: DF.group_norm(torch.randn(2, 6, 4).bfloat16(), 2, torch.randn(6).half()),
     r"weight dtype torch.float16 must be the input's \(torch.bfloat16\) or float32"),
    (lambda: DF.group_norm(torch.randn(2, 6, 4).double(), 2, None, torch.randn(6)), "bias dtype"),
    (lambda: DF.group_norm(torch.randn(2, 6, 4).half(), 2, torch.randn(6), torch.randn(6).half()),
     "weight and bias must share one dtype"),
    (lambda: DF.group_norm(torch.randn(2, 6, 4), 2, backend="fast"), "backend must be one of"),
])
def test_bad_input(call_, match):
    with pytest.raises((TypeError, ValueError, RuntimeError), match=match):
        call_()


def test_named_backend_that_cannot_run_raises():
    x = torch.randn(2, 8, 3, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="triton.*float64"):
        DF.group_norm(x, 4, backend="triton")
    if not HAS_GPU:
        with pytest.raises(RuntimeError, match="cuda"):
            DF.group_norm(x.float(), 4, backend="cuda")
    # auto never fails for lack of a kernel: float64 goes to torch
    torch.testing.assert_close(DF.group_norm(x, 4, activation="silu"), F.silu(F.group_norm(x, 4)))


# ---------------------------------------------------------------------------------------------
# GPU only: real U-Net sizes on every backend and layout, CUDA graphs, 64-bit offsets.

UNET_SHAPES = [
    (64, 128, 32, 32),   # many 4K-element groups: the fused path
    (16, 256, 32, 32),   # 8K-element groups: the fused limit
    (8, 128, 64, 64),    # 16K-element groups: split
    (2, 512, 64, 64),    # 64 groups of 64K elements: split, few groups
    (1, 256, 128, 128),  # 32 groups of 131K elements: split over the whole GPU
    (3, 96, 7, 7),       # Cg = 3, odd spatial: scalar fallbacks
]


@pytest.mark.gpu
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("shape", UNET_SHAPES, ids=str)
def test_gpu_unet_sizes(shape, layout, backend):
    check_op(shape, 32, torch.bfloat16, "silu", backend, layout=layout)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("shape", [UNET_SHAPES[1], UNET_SHAPES[3]], ids=str)
def test_gpu_unet_sizes_other_dtypes(shape, layout, dtype, backend):
    check_op(shape, 32, dtype, None if dtype == torch.float32 else "silu", backend, layout=layout)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_gpu_cuda_graph(backend):
    x, w, b = (t.detach() for t in make_inputs((8, 256, 32, 32), torch.bfloat16))
    DF.group_norm(x, 32, w, b, activation="silu", backend=backend)  # warm up outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = DF.group_norm(x, 32, w, b, activation="silu", backend=backend)
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.cuda.synchronize()
    expected = F.silu(F.group_norm(x.float(), 32, w.float(), b.float())).to(x.dtype)
    torch.testing.assert_close(static_out, expected, atol=3e-2, rtol=3e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_gpu_64bit_offsets(backend):
    # 2 samples of 2^30 + 2^15 elements: the second sample starts past 2^31, and offsets inside
    # one sample pass 2^31 in bf16 bytes; the last group is checked against float64
    x = torch.randn(2, 2, 2**29 + 2**14, device="cuda", dtype=torch.bfloat16)
    y = DF.group_norm(x, 2, activation="silu", backend=backend)
    tail = x[-1, -1].double()
    expected = F.silu((tail - tail.mean()) * torch.rsqrt(tail.var(unbiased=False) + 1e-5))
    assert (y[-1, -1].double() - expected).abs().max().item() < 3e-2
    del x, y
    torch.cuda.empty_cache()


def test_split_grids_fit_cuda_limits(monkeypatch, tiny_split_limits):
    # 70,000 one-channel blocks in one group: the split path's chunks (and batch x groups) must
    # not land on grid axis y, which CUDA caps at 65,535. Grids recorded, nothing run.
    from conftest import assert_grids_fit, record_grids
    names = ("group_norm_fwd_partial_kernel", "group_norm_fwd_apply_kernel",
             "group_norm_bwd_partial_kernel", "group_norm_bwd_apply_kernel")
    grids = record_grids(monkeypatch, triton_gn, names)
    x = torch.zeros(1, 70_000, 4, 4, device=DEVICE, requires_grad=True)
    w = torch.ones(70_000, device=DEVICE, requires_grad=True)
    DF.group_norm(x, 1, w, backend="triton").sum().backward()
    assert_grids_fit(grids, names)
