"""conv2d (+ bias + activation in the epilogue) on every backend that runs here, against a float64
reference computed from the same rounded inputs, forward and every gradient.

Without a GPU: `torch` and `triton` (interpreter) on CPU tensors, at sizes the interpreter runs
in seconds (the reference models' layers, scaled down where they would not). With one: every
backend on CUDA tensors, plus the GPU-only real sizes at the bottom.
"""
import random

import pytest
import torch
import torch.nn.functional as F

import dlh_kernels as dlh
import dlh_kernels.functional as DF
from dlh_kernels.ops import conv2d as convs

from conftest import DEVICE, DTYPES, assert_close, assert_grids_fit, backend_param, record_grids

BACKENDS = [backend_param(b) for b in ("torch", "triton", "cuda")]
KERNEL_BACKENDS = [backend_param(b) for b in ("triton", "cuda")]
ACTIVATIONS = [None, "relu", "silu", "gelu", "gelu_tanh", "leaky_relu", "tanh", "sigmoid"]

pytestmark = pytest.mark.usefixtures("poison_outputs")  # NaN-filled outputs: unwritten elements fail


def _rand(shape, g, scale=1.0, offset=0.1):
    return torch.randn(*shape, generator=g) * scale + offset


def _copies(ts, dtype=None):
    return [None if t is None else t.detach().to(dtype or t.dtype).requires_grad_() for t in ts]


def check_conv(backend, case, dtype=torch.float32, activation=None, layout="contiguous", seed=0,
               bias=True, negative_slope=0.1, grads=True, weight_layout="contiguous"):
    """case: (N, C, H, W, K, R, S, stride, padding, dilation, groups). weight_layout:
    "contiguous", "channels_last" or "transposed" (a view with no unit stride along (Cg, R, S))."""
    N, C, H, W, K, R, S, stride, padding, dilation, groups = case
    g = torch.Generator().manual_seed(seed)
    x = _rand((N, C, H, W), g)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "strided":  # a view with gaps: every second column of a wider image
        x = torch.cat([x, _rand((N, C, H, W), g)], -1)[..., ::2]
    fan_in = C // groups * R * S
    w = _rand((K, C // groups, R, S), g, 2 * fan_in ** -0.5, 0.0)
    if weight_layout == "channels_last":
        w = w.contiguous(memory_format=torch.channels_last)
    elif weight_layout == "transposed":  # (K, Cg, S, R) storage seen as (K, Cg, R, S)
        w = w.transpose(2, 3).contiguous().transpose(2, 3)
    b = _rand((K,), g, 0.5) if bias else None
    inputs = [t.to(device=DEVICE, dtype=dtype).requires_grad_() if t is not None else None
              for t in (x, w, b)]
    assert inputs[1].stride() == w.stride(), "the weight keeps its layout"
    if layout == "channels_last":
        inputs[0] = inputs[0].detach().contiguous(memory_format=torch.channels_last).requires_grad_()
    args = (stride, padding, dilation, groups)
    out = DF.conv2d(*inputs, *args, activation=activation, negative_slope=negative_slope, backend=backend)
    ref_in, eager_in = _copies(inputs, torch.float64), _copies(inputs)
    ref = convs.conv2d_reference(*ref_in, *args, activation, negative_slope)
    eager = convs.conv2d_reference(*eager_in, *args, activation, negative_slope)
    assert out.dtype == dtype and out.shape == ref.shape
    if layout == "channels_last" and C > 1 and H * W > 1:
        assert out.is_contiguous(memory_format=torch.channels_last), "channels_last in, channels_last out"
    elif layout != "channels_last" and not (backend == "torch" and weight_layout != "contiguous"):
        assert out.is_contiguous()  # (eager F.conv2d follows a channels_last weight's layout)
    assert_close(out, ref, eager, dtype, "out")
    if not grads:
        return
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(7)).to(device=DEVICE, dtype=dtype)
    out.backward(grad)
    ref.backward(grad.double())
    eager.backward(grad)
    for name, t, rt, et in zip(("input", "weight", "bias"), inputs, ref_in, eager_in):
        if t is None:
            continue
        assert t.grad is not None and t.grad.dtype == t.dtype and t.grad.shape == t.shape, name
        assert_close(t.grad, rt.grad, et.grad, dtype, f"grad {name}")


# (N, C, H, W, K, R, S, stride, padding, dilation, groups)
MODEL_CASES = {
    "seed_conv1": (1, 1, 28, 28, 16, 5, 5, 1, 2, 1, 1),       # the seed CNN
    "seed_conv2": (1, 16, 28, 28, 32, 5, 5, 1, 2, 1, 1),
    "unet_3x3": (2, 8, 8, 8, 16, 3, 3, 1, 1, 1, 1),           # U-Net-like blocks
    "unet_down": (1, 16, 8, 8, 16, 3, 3, 2, 1, 1, 1),
    "unet_4x4": (2, 16, 4, 4, 8, 3, 3, 1, "same", 1, 1),
    "pointwise": (2, 16, 4, 4, 24, 1, 1, 1, 0, 1, 1),          # 1x1
    "alexnet_11x11": (1, 3, 31, 31, 8, 11, 11, 4, 2, 1, 1),    # 11x11 stride 4 on a small image
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(MODEL_CASES))
def test_model_shapes(name, backend):
    check_conv(backend, MODEL_CASES[name], torch.float32, "relu")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_dtypes_and_layouts(layout, dtype, backend):
    check_conv(backend, (2, 6, 7, 6, 10, 3, 3, 1, 1, 1, 1), dtype, "silu", layout)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_activations(activation, backend):
    check_conv(backend, (2, 4, 6, 5, 6, 3, 2, 1, (1, 0), 1, 1), torch.float32, activation)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_gelu_strided_input(backend):
    check_conv(backend, (1, 4, 5, 6, 8, 3, 3, 1, 1, 1, 2), torch.bfloat16, "gelu", "strided")


def _sweep_cases(count=14, seed=1234):
    rnd = random.Random(seed)
    cases = []
    for i in range(count):
        groups = rnd.choice([1, 1, 2, 3, "depthwise"])
        cg = rnd.randint(1, 4)
        if groups == "depthwise":
            C = rnd.randint(2, 6)
            groups, K = C, C * rnd.choice([1, 2])
        else:
            C, K = cg * groups, groups * rnd.randint(1, 4)
        R, S = rnd.randint(1, 4), rnd.randint(1, 4)
        dil = (rnd.randint(1, 2), rnd.randint(1, 2))
        H, W = rnd.randint(dil[0] * (R - 1) + 1, 9), rnd.randint(dil[1] * (S - 1) + 1, 9)
        pad_kind = rnd.choice(["int", "tuple", "same", "valid"])
        stride = (rnd.randint(1, 3), rnd.randint(1, 2)) if pad_kind != "same" else 1
        padding = {"int": rnd.randint(0, 2), "tuple": (rnd.randint(0, 2), rnd.randint(0, 3)),
                   "same": "same", "valid": "valid"}[pad_kind]
        act = rnd.choice(ACTIVATIONS)
        layout = rnd.choice(["contiguous", "channels_last"])
        cases.append(pytest.param((rnd.randint(1, 2), C, H, W, K, R, S, stride, padding, dil, groups),
                                  act, layout, rnd.random() < 0.8, id=f"sweep{i}"))
    return cases


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case,activation,layout,bias", _sweep_cases())
def test_random_sweep(case, activation, layout, bias, backend):
    check_conv(backend, case, torch.float32, activation, layout, bias=bias)


@pytest.mark.parametrize("backend", BACKENDS)
def test_depthwise_fp16(backend):
    check_conv(backend, (2, 8, 6, 6, 8, 3, 3, 1, 1, 1, 8), torch.float16, "leaky_relu", "channels_last")


# The implicit GEMMs reduce over one flat loop of (tap, channel block) pairs: forward over
# R*S x ceil(Cg/BLOCK_K), dx over R*S x ceil(Kg/BLOCK_K) (BLOCK_K = 16 under the interpreter).
# Each case puts a block boundary inside a tap and a tap boundary inside the flat loop.
# (N, C, H, W, K, R, S, stride, padding, dilation, groups)
BLOCK_CASES = {
    "cg20_3x3": (1, 20, 6, 5, 8, 3, 3, 1, 1, 1, 1),            # Cg 20: blocks of 16 + 4 per tap
    "cg33_1x1_kg18": (2, 33, 4, 3, 18, 1, 1, 1, 0, 1, 1),      # 1x1: 3 channel blocks, no taps; dx 2 blocks
    "cg17_5x5_s2": (1, 17, 9, 8, 20, 5, 5, 2, 2, 1, 1),        # 25 taps x 2 blocks; dx stride phases
    "cg16_dil2": (1, 16, 7, 7, 16, 3, 3, 1, (2, 1), 2, 1),     # exactly one block; dilation, uneven padding
    "g2_cg18_kg17": (1, 36, 5, 6, 34, 3, 3, 2, 1, 1, 2),       # groups: each group's own blocks
    "g3_3x1_cg5": (2, 15, 6, 5, 18, 3, 1, 1, (1, 0), (2, 1), 3),  # fewer channels than one block
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("name", list(BLOCK_CASES))
def test_taps_by_channel_blocks(name, layout, dtype, backend):
    check_conv(backend, BLOCK_CASES[name], dtype, "gelu", layout)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("weight_layout", ["channels_last", "transposed"])
def test_weight_layouts(weight_layout, backend):
    # the glue hands the GEMMs a weight with unit channel stride, copying one that has none
    check_conv(backend, BLOCK_CASES["cg20_3x3"], torch.float32, "silu", "contiguous",
               weight_layout=weight_layout)


@pytest.mark.parametrize("weight_layout", ["contiguous", "channels_last", "transposed"])
def test_kernels_get_unit_channel_stride_weight(weight_layout, monkeypatch):
    # With an NCHW weight neither axis of the (channel x output channel) tile has unit stride:
    # 16-bit elements then load one by one and never through cp.async. The kernels must see
    # swc == 1 (the binder turns it into a constant), whatever the caller's weight layout.
    from dlh_kernels.triton_kernels import conv2d as kernels
    seen = []

    class Recorder:
        def __init__(self, kernel):
            self.names = kernel.arg_names

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                seen.append(dict(zip(self.names, args)))
            return launch
    for name in ("conv2d_fwd_kernel", "conv2d_bwd_input_kernel"):
        monkeypatch.setattr(kernels, name, Recorder(getattr(kernels, name)))
    monkeypatch.setattr(kernels, "_autotuned", lambda: False)  # the forward's fixed launch, on GPU too
    x = torch.randn(1, 8, 5, 5)
    w = torch.randn(6, 8, 3, 3)
    if weight_layout == "channels_last":
        w = w.contiguous(memory_format=torch.channels_last)
    elif weight_layout == "transposed":
        w = w.transpose(2, 3).contiguous().transpose(2, 3)
    y = torch.empty(1, 6, 3, 3)
    kernels.conv2d_fwd(x, w, None, y, (1, 1), (0, 0), (1, 1), 1, 0, 0.0)
    kernels.conv2d_bwd_input(y, w, torch.empty_like(x), (1, 1), (0, 0), (1, 1), 1)
    assert len(seen) == 2 and all(args["swc"] == 1 for args in seen)
    assert all(args["Wt"].shape == w.shape and torch.equal(args["Wt"], w) for args in seen)


def test_weight_grad_split_over_pixels(monkeypatch):
    # dw summed in pixel splits (fp32 partials: 3 asked, 2 of 512 pixels cover the 800), with 2
    # groups and 9 taps: the flat dw grid decodes (tile, split, tap, group) from one index
    from dlh_kernels.triton_kernels import conv2d as kernels
    monkeypatch.setattr(kernels, "INTERPRETER_DW_SPLITS", 3)
    check_conv("triton", (2, 4, 20, 20, 6, 3, 3, 1, 1, 1, 2), torch.float32, None, "contiguous")


@pytest.mark.parametrize("case", ["depthwise_70k", "taps_256x256"])
def test_grids_fit_cuda_limits(case, monkeypatch):
    # CUDA caps grid axes y and z at 65,535: groups (one per channel in a depthwise conv) and
    # R * S must not land there. The interpreter has no limit: record the grids, run nothing.
    from dlh_kernels.triton_kernels import conv2d as kernels
    names = ("conv2d_fwd_kernel", "conv2d_bwd_input_kernel", "conv2d_bwd_weight_kernel")
    grids = record_grids(monkeypatch, kernels, names)
    if case == "depthwise_70k":
        C, HW, groups, RS = 70_000, 2, 70_000, 1
    else:
        C, HW, groups, RS = 1, 256, 1, 256
    x = torch.zeros(1, C, HW, HW, device=DEVICE, requires_grad=True)
    w = torch.zeros(C, C // groups, RS, RS, device=DEVICE, requires_grad=True)
    DF.conv2d(x, w, groups=groups, activation="relu", backend="triton").sum().backward()
    assert_grids_fit(grids, names)


@pytest.mark.parametrize("backend", BACKENDS)
def test_unbatched_and_empty(backend):
    x = torch.randn(3, 6, 6, device=DEVICE)
    w = torch.randn(4, 3, 3, 3, device=DEVICE)
    torch.testing.assert_close(DF.conv2d(x, w, padding=1, backend=backend), F.conv2d(x, w, padding=1),
                               rtol=1e-4, atol=1e-4)
    e = torch.randn(0, 3, 6, 6, device=DEVICE, requires_grad=True)
    out = DF.conv2d(e, w, activation="relu", backend=backend)
    assert out.shape == (0, 4, 4, 4)


def test_only_input_or_weight_grad():
    g = torch.Generator().manual_seed(3)
    x = _rand((1, 4, 5, 5), g).requires_grad_()
    w = _rand((4, 4, 3, 3), g)
    DF.conv2d(x, w, activation="gelu", backend="triton").sum().backward()
    xr = x.detach().double().requires_grad_()
    convs.conv2d_reference(xr, w.double(), activation="gelu").sum().backward()
    torch.testing.assert_close(x.grad.double(), xr.grad, rtol=1e-4, atol=1e-4)
    w2 = w.clone().requires_grad_()
    DF.conv2d(x.detach(), w2, backend="triton").sum().backward()
    assert w2.grad is not None


# ---------------------------------------------------------------------------------------------
# Bad input: named errors before any launch.

def test_bad_inputs():
    x = torch.randn(1, 4, 6, 6)
    w = torch.randn(8, 4, 3, 3)
    with pytest.raises(ValueError, match="input channels"):
        DF.conv2d(x, torch.randn(8, 3, 3, 3), backend="triton")
    with pytest.raises(ValueError, match="groups=3 must divide"):
        DF.conv2d(x, torch.randn(6, 1, 3, 3), groups=3, backend="triton")
    with pytest.raises(ValueError, match="larger than the padded input"):
        DF.conv2d(x, torch.randn(8, 4, 7, 7), backend="triton")
    with pytest.raises(ValueError, match="padding must be"):
        DF.conv2d(x, w, padding="full", backend="triton")
    with pytest.raises(ValueError, match="padding='same' needs stride 1"):
        DF.conv2d(x, w, stride=2, padding="same", backend="triton")
    with pytest.raises(ValueError, match="activation must be one of"):
        DF.conv2d(x, w, activation="softplus", backend="triton")
    with pytest.raises(ValueError, match="bias must have shape"):
        DF.conv2d(x, w, torch.randn(4), backend="triton")
    with pytest.raises(TypeError, match="weight dtype"):
        DF.conv2d(x, w.half(), backend="triton")
    with pytest.raises(ValueError, match="stride must be >= 1"):
        DF.conv2d(x, w, stride=0, backend="triton")
    with pytest.raises(TypeError, match="padding must be an int or a pair"):
        DF.conv2d(x, w, padding=(1, 1, 1), backend="triton")
    with pytest.raises(ValueError, match="input must be 4-D"):
        DF.conv2d(x[0, 0], w, backend="triton")
    with pytest.raises(ValueError, match="activation must be one of"):
        dlh.nn.Conv2d(4, 8, 3, activation="softmax")


def test_cuda_backend_needs_conv2d_fwd(monkeypatch):
    x = torch.randn(1, 4, 6, 6)

    class NoConv:
        pass
    monkeypatch.setattr(convs._ext, "ext", lambda: NoConv())
    reason = convs._supports(x)("cuda")
    assert reason is not None and "conv2d_fwd" in reason


def test_explain():
    x, w = torch.randn(1, 4, 6, 6), torch.randn(8, 4, 3, 3)
    verdict = dlh.explain("conv2d", x, w, None, 1, "same", activation="relu")
    assert verdict["torch"] == "ok" and "auto" in verdict


# ---------------------------------------------------------------------------------------------
# torch.library contract and compilation.

@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    g = torch.Generator().manual_seed(2)
    x = _rand((1, 4, 5, 4), g).to(DEVICE).requires_grad_()
    w = _rand((6, 2, 2, 3), g, 0.3).to(DEVICE).requires_grad_()
    b = _rand((6,), g).to(DEVICE).requires_grad_()
    args = ([2, 1], [1, 0, 1, 2], [1, 1], 2)
    torch.library.opcheck(convs.conv2d_op.custom_op, (x, w, b, *args, 2, 0.01, backend))
    torch.library.opcheck(convs.conv2d_op.custom_op, (x, w, None, *args, 0, 0.01, backend))
    y = convs.conv2d_op(x.detach(), w.detach(), b.detach(), *args, 2, 0.01, backend)
    dy = torch.randn_like(y)
    torch.library.opcheck(convs.conv2d_grad_op.custom_op, (dy, x.detach(), w.detach(), b.detach(), *args,
                                                           5, 0.2, backend))
    torch.library.opcheck(convs.conv2d_backward_op.custom_op, (dy, x.detach(), w.detach(), *args,
                                                               True, True, backend))


@pytest.mark.parametrize("backend", BACKENDS)
def test_compile_fullgraph(backend):
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(4)
    x = _rand((2, 3, 6, 6), g).to(DEVICE).requires_grad_()
    w1 = _rand((4, 3, 3, 3), g, 0.3).to(DEVICE).requires_grad_()
    w2 = _rand((4, 1, 3, 3), g, 0.3).to(DEVICE).requires_grad_()
    b = _rand((4,), g).to(DEVICE).requires_grad_()

    def net(x, w1, w2, b):
        h = DF.conv2d(x, w1, b, padding=1, activation="silu", backend=backend)
        return DF.conv2d(h, w2, None, stride=2, padding="valid", groups=4, activation="relu",
                         backend=backend).pow(2).sum()

    eager = net(x, w1, w2, b)
    eager.backward()
    grads = [t.grad.clone() for t in (x, w1, w2, b)]
    for t in (x, w1, w2, b):
        t.grad = None
    compiled = torch.compile(net, fullgraph=True)(x, w1, w2, b)
    compiled.backward()
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-4)
    for t, gr in zip((x, w1, w2, b), grads):
        torch.testing.assert_close(t.grad, gr, rtol=1e-5, atol=1e-4)


# ---------------------------------------------------------------------------------------------
# Module and patch.

def test_module_is_drop_in():
    torch.manual_seed(0)
    ref = torch.nn.Conv2d(4, 6, 3, padding=1)
    conv = dlh.nn.Conv2d(4, 6, 3, padding=1)
    conv.load_state_dict(ref.state_dict())
    assert conv.state_dict().keys() == ref.state_dict().keys()
    conv.backend = "triton"
    x = torch.randn(1, 4, 5, 5)
    torch.testing.assert_close(conv(x), ref(x), rtol=1e-4, atol=1e-4)
    fused = dlh.nn.Conv2d(4, 6, 3, padding=1, activation="leaky_relu", negative_slope=0.2)
    fused.load_state_dict(ref.state_dict())
    fused.backend = "triton"
    torch.testing.assert_close(fused(x), F.leaky_relu(ref(x), 0.2), rtol=1e-4, atol=1e-4)
    assert "activation='leaky_relu'" in repr(fused)
    # padding modes other than zeros fall back to torch
    refl = dlh.nn.Conv2d(4, 6, 3, padding=1, padding_mode="reflect", activation="relu")
    ref2 = torch.nn.Conv2d(4, 6, 3, padding=1, padding_mode="reflect")
    refl.load_state_dict(ref2.state_dict())
    torch.testing.assert_close(refl(x), F.relu(ref2(x)))


def test_patch_fuses_conv_and_activation():
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(),
        torch.nn.Conv2d(8, 8, 3, padding=1, groups=8), torch.nn.GELU(approximate="tanh"),
        torch.nn.Sequential(torch.nn.Conv2d(8, 4, 1), torch.nn.LeakyReLU(0.2)),
        torch.nn.Conv2d(4, 4, 3), torch.nn.Tanh(),  # not fusable: stays
    )
    x = torch.randn(1, 3, 6, 6)
    before = model(x)
    report = dlh.patch(model, backend="triton")
    assert type(model[0]) is dlh.nn.Conv2d and model[0].activation == "relu"
    assert type(model[1]) is torch.nn.Identity
    assert model[2].activation == "gelu_tanh" and type(model[3]) is torch.nn.Identity
    assert model[4][0].activation == "leaky_relu" and model[4][0].negative_slope == 0.2
    assert model[5].activation is None and type(model[6]) is torch.nn.Tanh
    replaced = {r[0]: r[2] for r in report.replaced}
    assert replaced["0"] == "dlh.nn.Conv2d(activation='relu')"
    assert replaced["1"] == "nn.Identity (fused into 0)"
    assert replaced["4.1"] == "nn.Identity (fused into 4.0)"
    assert len(report.replaced) == 7  # 4 convs, 3 fused activations
    after = model(x)
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)
    after.sum().backward()
    assert model[0].weight.grad is not None
    assert dlh.unpatch(model) == 7
    assert type(model[0]) is torch.nn.Conv2d and type(model[1]) is torch.nn.ReLU
    assert type(model[3]) is torch.nn.GELU and type(model[4][1]) is torch.nn.LeakyReLU
    torch.testing.assert_close(model(x), before)


def test_patch_ops_filter_leaves_conv():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.GELU())
    report = dlh.patch(model, ops={"gelu"})
    assert type(model[0]) is torch.nn.Conv2d and type(model[1]) is dlh.nn.GELU
    assert ("0", "Conv2d", "excluded by ops=") in report.left
    dlh.unpatch(model)


# ---------------------------------------------------------------------------------------------
# GPU only: the real sizes (ResNet-50, the seed CNN at batch 64, AlexNet's first layer).

GPU_CASES = [
    (64, 1, 28, 28, 16, 5, 5, 1, 2, 1, 1),
    (64, 16, 14, 14, 32, 5, 5, 1, 2, 1, 1),
    (8, 3, 224, 224, 64, 7, 7, 2, 3, 1, 1),       # ResNet-50 stem
    (8, 64, 56, 56, 64, 3, 3, 1, 1, 1, 1),        # ResNet-50 layer1 3x3
    (8, 256, 56, 56, 64, 1, 1, 1, 0, 1, 1),       # ResNet-50 1x1 reduce
    (8, 256, 28, 28, 256, 3, 3, 1, 1, 1, 32),     # ResNeXt-style grouped
    (8, 3, 227, 227, 96, 11, 11, 4, 0, 1, 1),     # AlexNet conv1
    (8, 128, 28, 28, 128, 3, 3, 1, 1, 1, 128),    # depthwise
]


@pytest.mark.gpu
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("layout", ["channels_last", "contiguous"])
@pytest.mark.parametrize("case", GPU_CASES, ids=str)
def test_gpu_real_sizes(case, layout, dtype, backend):
    check_conv(backend, case, dtype, "relu", layout)
