"""DF.diffusion_step and the sampler (dlh_kernels.diffusion) against diffusers, on every backend
that runs here.

The oracle chain: diffusers' DDPMScheduler.step / DDIMScheduler.step run in float64 equal our
float64 reference (`diffusion_step_reference`, the torch backend); every backend then matches
that reference within twice diffusers' own error in the dtype (diffusers run on the same
rounded inputs, the same noise and the same float32 alphas_cumprod), as every op test in this
suite does against eager. Where diffusers is not installed (`pip install -e .[test]` brings it),
the reference run in the input dtype stands in for it. The kernel-drawn noise is checked
statistically and against the same Philox stream computed in torch.

Without a GPU: `torch` and `triton` (interpreter) on CPU tensors, the CUDA C++ kernel through
tests/test_cuda_build.py's emulation. With one: every backend on CUDA tensors, plus the GPU-only
tests at the bottom (one launch per step, no host sync, CUDA graphs).
"""
import math

import pytest
import torch

import dlh_kernels as dlh
import dlh_kernels.functional as DF
from dlh_kernels import _alloc
from dlh_kernels import diffusion
from dlh_kernels.ops import diffusion_step as D

from conftest import DEVICE, DTYPES, assert_close, backend_param, scaled_error

T_TRAIN, STEPS = 1000, 50
NOISE_SEED = 1234

try:
    from diffusers import DDIMScheduler, DDPMScheduler
    from diffusers.utils.torch_utils import randn_tensor
    HAS_DIFFUSERS = True
except ImportError:  # the test extra brings it; without it the reference stands in
    HAS_DIFFUSERS = False

needs_diffusers = pytest.mark.skipif(not HAS_DIFFUSERS, reason="diffusers is not installed (pip install -e .[test])")


BACKENDS = [backend_param(b) for b in ("torch", "triton", "cuda")]
KERNEL_BACKENDS = [backend_param(b) for b in ("triton", "cuda")]


pytestmark = pytest.mark.usefixtures("poison_outputs")  # NaN-filled outputs: unwritten elements fail


def _table(dtype=torch.float32):
    return diffusion.linear_alphas_cumprod(T_TRAIN).to(device=DEVICE, dtype=dtype)


def _scheduler(method, prediction_type, clip):
    cls = DDPMScheduler if method == "ddpm" else DDIMScheduler
    kw = dict(num_train_timesteps=T_TRAIN, beta_schedule="linear", prediction_type=prediction_type,
              clip_sample=clip is not None, clip_sample_range=clip or 1.0)
    kw.update(variance_type="fixed_small") if method == "ddpm" else kw.update(set_alpha_to_one=True)
    sched = cls(**kw)
    sched.set_timesteps(STEPS)
    return sched


# the loop's (timestep, prev_timestep) pairs; diffusers' own are checked against these below
SCHEDULE = diffusion.schedule("ddim", STEPS, T_TRAIN)
POSITIONS = {"first": 0, "middle": STEPS // 2, "last": STEPS - 1}  # last: t = 0, prev < 0


def _noise_like(x):
    """The noise diffusers' DDPM step draws from a generator seeded with NOISE_SEED."""
    g = torch.Generator().manual_seed(NOISE_SEED)
    if HAS_DIFFUSERS:
        return randn_tensor(x.shape, generator=g, device=x.device, dtype=x.dtype)
    return torch.randn(x.shape, generator=g, dtype=x.dtype).to(x.device)


def _eager(method, eta, pred, clip, guidance, x, m, u, noise, t, prev, table):
    """diffusers' step in the inputs' dtype (guidance combined first, as a pipeline does); the
    reference in that dtype when diffusers is missing."""
    mm = m if guidance is None else u + guidance * (m - u)
    if not HAS_DIFFUSERS:
        return D.diffusion_step_reference(x, mm, t, prev, table.to(x.dtype), method=method, eta=eta,
                                          prediction_type=pred, clip_sample=clip, noise=noise)
    sched = _scheduler(method, pred, clip)
    tt = sched.timesteps[[s for s, _ in SCHEDULE].index(t)]
    if method == "ddpm":
        return sched.step(mm, tt, x, generator=torch.Generator().manual_seed(NOISE_SEED)).prev_sample
    return sched.step(mm, tt, x, eta=eta, variance_noise=noise if eta > 0 else None).prev_sample


def _inputs(shape, dtype, seed, guidance=None):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g).to(device=DEVICE, dtype=dtype)
    m = torch.randn(shape, generator=g).to(device=DEVICE, dtype=dtype)
    u = torch.randn(shape, generator=g).to(device=DEVICE, dtype=dtype) if guidance is not None else None
    return x, m, u


def check_step(backend, dtype, method, eta, pred, position, clip=None, guidance=None, shape=(2, 3, 8, 8)):
    t, prev = SCHEDULE[POSITIONS[position]]
    x, m, u = _inputs(shape, dtype, seed=sum(map(ord, f"{method}{eta}{pred}{position}")), guidance=guidance)
    noisy = (method == "ddpm" and t > 0) or (method == "ddim" and eta > 0)
    noise = _noise_like(x) if noisy else None
    table = _table()
    out = DF.diffusion_step(x, m, t, prev, table, method=method, eta=eta, prediction_type=pred,
                            clip_sample=clip, guidance_scale=guidance, uncond_output=u, noise=noise,
                            backend=backend)
    d = torch.float64
    ref = D.diffusion_step_reference(
        x.to(d), m.to(d), t, prev, table.to(d), method=method, eta=eta, prediction_type=pred,
        clip_sample=clip, guidance_scale=guidance, uncond_output=None if u is None else u.to(d),
        noise=None if noise is None else noise.to(d))
    eager = _eager(method, eta, pred, clip, guidance, x, m, u, noise, t, prev, table)
    assert out.dtype == dtype and out.shape == x.shape and out.device == x.device
    assert_close(out, ref, eager, dtype, f"{method} eta={eta} {pred} t={t}")
    if dtype == torch.float32:
        # tighter than diffusers, whose fp32 coefficients lose digits (1 - a_t/a_p): ours keep them
        assert scaled_error(out, ref) <= 2e-6, scaled_error(out, ref)
    return out


# ---------------------------------------------------------------------------------------------
# The oracle: diffusers in float64 == our float64 reference.

@needs_diffusers
def test_schedule_and_table_are_diffusers():
    for method in ("ddpm", "ddim"):
        sched = _scheduler(method, "epsilon", None)
        assert [int(t) for t in sched.timesteps] == [t for t, _ in SCHEDULE]
        assert torch.equal(sched.alphas_cumprod, diffusion.linear_alphas_cumprod(T_TRAIN))
    ddpm = _scheduler("ddpm", "epsilon", None)
    assert [int(ddpm.previous_timestep(t)) for t in ddpm.timesteps] == [p if p >= 0 else -1 for _, p in SCHEDULE]


@needs_diffusers
@pytest.mark.parametrize("method,eta", [("ddpm", 0.0), ("ddim", 0.0), ("ddim", 0.3), ("ddim", 1.0)])
@pytest.mark.parametrize("pred", ["epsilon", "v_prediction", "sample"])
def test_reference_is_diffusers_in_float64(method, eta, pred):
    g = torch.Generator().manual_seed(0)
    x, m = torch.randn(2, 3, 5, 5, generator=g, dtype=torch.float64), torch.randn(2, 3, 5, 5, generator=g, dtype=torch.float64)
    table = diffusion.linear_alphas_cumprod(T_TRAIN).double()
    for clip in (None, 1.0, 2.5):
        sched = _scheduler(method, pred, clip)
        sched.alphas_cumprod = table  # diffusers then computes in float64 too
        for i in (0, 1, STEPS // 2, STEPS - 2, STEPS - 1):
            t, prev = SCHEDULE[i]
            noise = randn_tensor(x.shape, generator=torch.Generator().manual_seed(i), dtype=x.dtype)
            if method == "ddpm":
                theirs = sched.step(m, sched.timesteps[i], x, generator=torch.Generator().manual_seed(i)).prev_sample
            else:
                theirs = sched.step(m, sched.timesteps[i], x, eta=eta, variance_noise=noise if eta > 0 else None).prev_sample
            ours = D.diffusion_step_reference(x, m, t, prev, table, method=method, eta=eta, prediction_type=pred,
                                              clip_sample=clip, noise=noise)
            torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-10, msg=f"clip {clip} step {i}")


@needs_diffusers
def test_reference_is_diffusers_on_the_full_chain():
    # no set_timesteps: DDPM's prev is t - 1 over all 1000 training timesteps
    sched = DDPMScheduler(num_train_timesteps=T_TRAIN, clip_sample=False)
    sched.alphas_cumprod = diffusion.linear_alphas_cumprod(T_TRAIN).double()
    x = torch.randn(3, 17, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    for t in (999, 500, 1, 0):
        noise = randn_tensor(x.shape, generator=torch.Generator().manual_seed(t), dtype=x.dtype)
        theirs = sched.step(x * 0.3, t, x, generator=torch.Generator().manual_seed(t)).prev_sample
        ours = D.diffusion_step_reference(x, x * 0.3, t, t - 1, sched.alphas_cumprod, noise=noise)
        torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-10)


# ---------------------------------------------------------------------------------------------
# Every backend against diffusers: methods, eta, predictions, first / middle / last steps, dtypes.

METHOD_ETAS = [("ddpm", 0.0), ("ddim", 0.0), ("ddim", 0.5), ("ddim", 1.0)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("method,eta", METHOD_ETAS)
@pytest.mark.parametrize("pred", ["epsilon", "v_prediction", "sample"])
def test_step_sweep(pred, method, eta, dtype, backend):
    for position, clip in (("first", None), ("middle", 1.0), ("last", None)):
        check_step(backend, dtype, method, eta, pred, position, clip)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method,eta,pred,position,clip,guidance,shape", [
    ("ddim", 0.0, "epsilon", "middle", None, 7.5, (2, 4, 8, 8)),      # guidance, SD-like scale
    ("ddpm", 0.0, "v_prediction", "first", 1.0, 3.0, (3, 5, 7)),      # guidance + clip, odd 3-d
    ("ddim", 1.0, "sample", "middle", 0.5, 1.0, (1, 1)),              # w = 1: uncond cancels
    ("ddim", 0.5, "epsilon", "first", 1.0, None, (1, 4, 64, 64)),     # a SD latent, one batch
    ("ddpm", 0.0, "epsilon", "middle", None, None, (2, 4099)),        # 2-d, rows past a block
    ("ddim", 0.0, "v_prediction", "last", None, 0.0, (2, 3, 4, 4)),   # w = 0: uncond only
])
def test_step_variants(method, eta, pred, position, clip, guidance, shape, backend):
    check_step(backend, torch.float32, method, eta, pred, position, clip, guidance, shape)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method,eta", [("ddpm", 0.0), ("ddim", 0.8)])
def test_timestep_per_batch_element(method, eta, backend):
    # three batch elements at the first, middle and last steps, timesteps read on the device
    x, m, _ = _inputs((3, 2, 6, 6), torch.float32, seed=5)
    noise = _noise_like(x)
    table = _table()
    pairs = [SCHEDULE[i] for i in POSITIONS.values()]
    t = torch.tensor([p[0] for p in pairs], device=DEVICE)
    prev = torch.tensor([p[1] for p in pairs], device=DEVICE, dtype=torch.int32)  # any int dtype
    t = torch.stack([t, t * 0], 1)[:, 0]  # a strided view: read with its own stride
    assert t.stride(0) == 2
    out = DF.diffusion_step(x, m, t, prev, table, method=method, eta=eta, noise=noise, backend=backend)
    for b, (tb, pb) in enumerate(pairs):
        ref = D.diffusion_step_reference(x[b:b + 1].double(), m[b:b + 1].double(), tb, pb, table.double(),
                                         method=method, eta=eta, noise=noise[b:b + 1].double())
        assert scaled_error(out[b:b + 1], ref) <= 2e-6, (b, tb)
    # one-element tensors broadcast over the batch
    one = DF.diffusion_step(x, m, t[1:2], prev[1], table, method=method, eta=eta, noise=noise, backend=backend)
    same = DF.diffusion_step(x, m, pairs[1][0], pairs[1][1], table, method=method, eta=eta, noise=noise, backend=backend)
    torch.testing.assert_close(one, same, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_float64_table(backend):
    # a float64 table is read as such: 1 - a and a_p - a_t are taken before rounding to fp32
    x, m, _ = _inputs((2, 3, 5), torch.float32, seed=6)
    table = _table(torch.float64)
    for i in POSITIONS.values():
        t, prev = SCHEDULE[i]
        out = DF.diffusion_step(x, m, t, prev, table, method="ddim", prediction_type="v_prediction", backend=backend)
        ref = D.diffusion_step_reference(x.double(), m.double(), t, prev, table, method="ddim",
                                         prediction_type="v_prediction")
        assert scaled_error(out, ref) <= 2e-6


# ---------------------------------------------------------------------------------------------
# Layouts: any strides, the output keeps a dense input's layout.

def _laid_out(t, layout):
    if layout == "channels_last":
        return t.contiguous(memory_format=torch.channels_last)
    if layout == "sliced":         # a view into a wider last dim
        return torch.cat([t, t[..., :2]], -1)[..., : t.shape[-1]]
    if layout == "transposed":
        return t.transpose(-1, -2).contiguous().transpose(-1, -2)
    if layout == "expanded":       # stride 0 over the batch
        return t[:1].expand(t.shape)
    return t


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("x_layout,m_layout", [
    ("channels_last", "channels_last"),   # a channels_last U-Net: dense, permuted; out keeps it
    ("contiguous", "channels_last"),      # mixed layouts
    ("sliced", "transposed"),
    ("contiguous", "expanded"),
])
def test_layouts(x_layout, m_layout, backend):
    x, m, _ = _inputs((3, 4, 5, 6), torch.float32, seed=7)
    noise = _noise_like(x)
    xl, ml = _laid_out(x, x_layout), _laid_out(m, m_layout)
    t, prev = SCHEDULE[10]
    out = DF.diffusion_step(xl, ml, t, prev, _table(), method="ddim", eta=0.7, noise=_laid_out(noise, "sliced"),
                            backend=backend)
    ref = D.diffusion_step_reference(xl.double(), ml.double(), t, prev, _table(torch.float64), method="ddim",
                                     eta=0.7, noise=noise.double())
    assert scaled_error(out, ref) <= 2e-6
    if x_layout == "channels_last":
        assert out.stride() == xl.stride()


@pytest.mark.parametrize("backend", BACKENDS)
def test_six_dims_that_do_not_collapse(backend):
    # more than 4 dims left after merging: contiguous copies, same result
    base = torch.randn(2, 3, 2, 3, 2, 3, generator=torch.Generator().manual_seed(8)).to(DEVICE)
    x = base.permute(5, 3, 1, 0, 2, 4)
    m = torch.randn(x.shape, generator=torch.Generator().manual_seed(9)).to(DEVICE)
    t, prev = SCHEDULE[20]
    out = DF.diffusion_step(x, m, t, prev, _table(), method="ddim", backend=backend)
    ref = D.diffusion_step_reference(x.double(), m.double(), t, prev, _table(torch.float64), method="ddim")
    assert scaled_error(out, ref) <= 2e-6


# ---------------------------------------------------------------------------------------------
# Noise drawn in the kernel: one stream (tl.randn's) on every backend, deterministic per seed.

@pytest.mark.parametrize("backend", BACKENDS)
def test_noise_statistics(backend):
    n = 1 << 20 if DEVICE.type == "cuda" else (1 << 18 if backend == "torch" else 1 << 14)
    like = torch.empty(n, device=DEVICE)
    a = D.seeded_randn(like, 2024, backend=backend).double().cpu()
    b = D.seeded_randn(like, 2025, backend=backend).double().cpu()
    k = 6 / math.sqrt(n)  # 6 sigma bounds: a false alarm about once in 10^9 runs
    for z in (a, b):
        assert abs(z.mean()) < k, "mean"
        assert abs(z.var() - 1) < k * math.sqrt(2), "variance"
        assert abs((z.abs() < 1).double().mean() - 0.682689) < k * 0.47, "mass within one sigma"
        assert abs(((z - z.mean()) ** 4).mean() / z.var() ** 2 - 3) < k * math.sqrt(96), "kurtosis"
        assert abs(torch.corrcoef(torch.stack([z[:-1], z[1:]]))[0, 1]) < k, "neighbours independent"
        assert abs(torch.corrcoef(torch.stack([z[: n // 2], z[n // 2:]]))[0, 1]) < k * math.sqrt(2)
    assert abs(torch.corrcoef(torch.stack([a, b]))[0, 1]) < k, "seeds independent"
    assert torch.isfinite(a).all() and a.abs().max() < 6.5  # Box-Muller's u1 >= 1e-7 caps |z|


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_noise_is_the_same_stream_everywhere(backend):
    like = torch.empty(5, 401, device=DEVICE)
    for seed in (0, 1, 2 ** 31 + 3, 2 ** 62 + 12345, torch.tensor(77, device=DEVICE)):
        ours = D.seeded_randn(like, seed, backend=backend)
        torch_stream = D.seeded_randn(like, seed, backend="torch")
        # the same Philox words; log/cos/sqrt may round differently by an ulp or so
        torch.testing.assert_close(ours, torch_stream, rtol=1e-5, atol=2e-6)
        assert torch.equal(ours, D.seeded_randn(like, seed, backend=backend)), "bitwise repeatable"
    # bf16 output: the normals rounded once
    torch.testing.assert_close(D.seeded_randn(like.bfloat16(), 5, backend=backend).float(),
                               D.philox_randn(like.shape, 5).to(DEVICE).bfloat16().float(), rtol=1e-2, atol=1e-2)


def test_philox_reference_known_words():
    # Philox4x32-10 known-answer vector (Random123's kat_vectors): counter 0, key 0
    from dlh_kernels.ops.diffusion_step import _mul_hi_lo, _M32
    c = [torch.zeros((), dtype=torch.int64) for _ in range(4)]
    k0 = k1 = 0
    for _ in range(10):
        hi_b, lo_b = _mul_hi_lo(0xCD9E8D57, c[2])
        hi_a, lo_a = _mul_hi_lo(0xD2511F53, c[0])
        c = [hi_b ^ c[1] ^ k0, lo_b, hi_a ^ c[3] ^ k1, lo_a]
        k0, k1 = (k0 + 0x9E3779B9) & _M32, (k1 + 0xBB67AE85) & _M32
    assert [int(v) for v in c] == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method,eta", [("ddpm", 0.0), ("ddim", 1.0)])
def test_step_draws_the_noise_in_the_kernel(method, eta, backend):
    x, m, _ = _inputs((2, 3, 16, 16), torch.float32, seed=10)
    table = _table()
    t, prev = SCHEDULE[5]
    drawn = DF.diffusion_step(x, m, t, prev, table, method=method, eta=eta, seed=42, backend=backend)
    given = DF.diffusion_step(x, m, t, prev, table, method=method, eta=eta, backend=backend,
                              noise=D.seeded_randn(x, 42, backend=backend))
    torch.testing.assert_close(drawn, given, rtol=1e-6, atol=1e-6)
    again = DF.diffusion_step(x, m, t, prev, table, method=method, eta=eta, seed=42, backend=backend)
    assert torch.equal(drawn, again), "same seed, same noise"
    as_tensor = DF.diffusion_step(x, m, t, prev, table, method=method, eta=eta, backend=backend,
                                  seed=torch.tensor([42], device=DEVICE, dtype=torch.int32))
    assert torch.equal(drawn, as_tensor), "a seed tensor is the same seed"
    other = DF.diffusion_step(x, m, t, prev, table, method=method, eta=eta, seed=43, backend=backend)
    assert not torch.allclose(drawn, other)
    # the noise actually added is sigma * z, with z ~ N(0, 1)
    mean = DF.diffusion_step(x, m, t, prev, table, method=method, eta=eta, noise=torch.zeros_like(x), backend=backend)
    a_t, a_p = table[t].double(), table[prev].double()
    sigma = eta * math.sqrt((1 - a_p) / (1 - a_t) * (1 - a_t / a_p)) if method == "ddim" else \
        math.sqrt((1 - a_p) / (1 - a_t) * (1 - a_t / a_p))
    z = ((drawn - mean).double() / sigma).flatten()
    assert abs(z.mean()) < 6 / math.sqrt(z.numel()) and abs(z.std() - 1) < 0.1


@pytest.mark.parametrize("backend", BACKENDS)
def test_seed_none_follows_torch_manual_seed(backend):
    x, m, _ = _inputs((2, 9), torch.float32, seed=11)
    t, prev = SCHEDULE[3]
    torch.manual_seed(0)
    a = DF.diffusion_step(x, m, t, prev, _table(), backend=backend)
    torch.manual_seed(0)
    b = DF.diffusion_step(x, m, t, prev, _table(), backend=backend)
    assert torch.equal(a, b)
    # no noise at all where the step adds none: DDPM's last step, DDIM with eta = 0
    last = SCHEDULE[-1]
    c = DF.diffusion_step(x, m, *last, _table(), backend=backend)
    torch.testing.assert_close(c, DF.diffusion_step(x, m, *last, _table(), seed=99, backend=backend))


# ---------------------------------------------------------------------------------------------
# Edges, bad input, the torch.library contract.

@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_and_scalar(backend):
    e = torch.empty(0, 3, device=DEVICE)
    assert DF.diffusion_step(e, e, 10, 5, _table(), seed=1, backend=backend).shape == (0, 3)
    x, m = torch.tensor(0.3, device=DEVICE), torch.tensor(-0.2, device=DEVICE)
    out = DF.diffusion_step(x, m, torch.tensor(500, device=DEVICE), 480, _table(), method="ddim", backend=backend)
    ref = D.diffusion_step_reference(x.double(), m.double(), 500, 480, _table(torch.float64), method="ddim")
    assert out.shape == () and scaled_error(out, ref) <= 2e-6


@pytest.mark.parametrize("backend", BACKENDS)
def test_timestep_outside_the_table_writes_nan(backend):
    # a device timestep cannot be checked on the host without a sync: the kernel writes NaN
    x = torch.randn(3, 10, device=DEVICE)
    out = DF.diffusion_step(x, x, torch.tensor([5, 1000, -1], device=DEVICE), torch.tensor([4, 3, 2], device=DEVICE),
                            _table(), method="ddim", backend=backend)
    assert torch.isfinite(out[0]).all() and out[1:].isnan().all()
    out = DF.diffusion_step(x, x, 5, torch.tensor([4, 1000, -1], device=DEVICE), _table(), method="ddim", backend=backend)
    assert torch.isfinite(out[0]).all() and out[1].isnan().all() and torch.isfinite(out[2]).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_backward(backend):
    x = torch.randn(2, 5, device=DEVICE, requires_grad=True)
    out = DF.diffusion_step(x, x * 2, 10, 5, _table(), method="ddim", backend=backend)
    assert not out.requires_grad, "sampling is inference: the step has no backward"


@pytest.mark.parametrize("call_, match", [
    (lambda x, a: DF.diffusion_step([1.0], x, 5, 4, a), "sample must be a torch.Tensor"),
    (lambda x, a: DF.diffusion_step(x.long(), x.long(), 5, 4, a), "floating-point"),
    (lambda x, a: DF.diffusion_step(x, x[:1], 5, 4, a), "model_output must have the shape"),
    (lambda x, a: DF.diffusion_step(x, x.half(), 5, 4, a), "model_output dtype"),
    (lambda x, a: DF.diffusion_step(x, x, 5, 4, a, method="euler"), "method must be one of"),
    (lambda x, a: DF.diffusion_step(x, x, 5, 4, a, prediction_type="x0"), "prediction_type"),
    (lambda x, a: DF.diffusion_step(x, x, 5, 4, a, method="ddim", eta=-1.0), "eta must be"),
    (lambda x, a: DF.diffusion_step(x, x, 5, 4, a, eta=0.5), "eta applies to method='ddim'"),
    (lambda x, a: DF.diffusion_step(x, x, 1000, 4, a), "timestep must be in"),
    (lambda x, a: DF.diffusion_step(x, x, -1, 4, a), "timestep must be in"),
    (lambda x, a: DF.diffusion_step(x, x, 5, 1000, a), "prev_timestep must be <"),
    (lambda x, a: DF.diffusion_step(x, x, 5.0, 4, a), "timestep must be an int"),
    (lambda x, a: DF.diffusion_step(x, x, torch.tensor(5.0), 4, a), "integer tensor"),
    (lambda x, a: DF.diffusion_step(x, x, torch.tensor([1, 2, 3]), 4, a), "one per batch element"),
    (lambda x, a: DF.diffusion_step(x, x, 5, 4, a[None]), "1-D tensor"),
    (lambda x, a: DF.diffusion_step(x, x, 5, 4, a.long()), "alphas_cumprod must be floating"),
    (lambda x, a: DF.diffusion_step(x, x, 5, 4, a.to("meta")), "alphas_cumprod is on meta"),
    (lambda x, a: DF.diffusion_step(x, x, 5, 4, a, guidance_scale=3.0), "needs uncond_output"),
    (lambda x, a: DF.diffusion_step(x, x, 5, 4, a, uncond_output=x), "guidance_scale is None"),
    (lambda x, a: DF.diffusion_step(x, x, 5, 4, a, noise=x, seed=3), "noise or seed, not both"),
    (lambda x, a: DF.diffusion_step(x, x, 5, 4, a, noise=x[0]), "noise must have the shape"),
    (lambda x, a: DF.diffusion_step(x, x, 5, 4, a, seed=-1), r"seed must be in \[0, 2\^63\)"),
    (lambda x, a: DF.diffusion_step(x, x, 5, 4, a, seed=torch.tensor([1, 2])), "hold one integer"),
    (lambda x, a: DF.diffusion_step(x, x, 5, 4, a, clip_sample=-1.0), "clip_sample"),
    (lambda x, a: DF.diffusion_step(x, x, 5, 4, a, backend="fast"), "backend must be one of"),
])
def test_bad_input(call_, match):
    x = torch.randn(2, 4)
    a = diffusion.linear_alphas_cumprod(T_TRAIN)
    with pytest.raises((TypeError, ValueError, RuntimeError), match=match):
        call_(x, a)


def test_named_backend_that_cannot_run_raises():
    x = torch.randn(3, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="triton.*float64"):
        DF.diffusion_step(x, x, 5, 4, diffusion.linear_alphas_cumprod(T_TRAIN), backend="triton")
    out = DF.diffusion_step(x, x, 5, 4, diffusion.linear_alphas_cumprod(T_TRAIN), method="ddim")  # auto: torch
    assert out.dtype == torch.float64


def test_explain():
    x = torch.randn(2, 8, device=DEVICE)
    verdict = dlh.explain("diffusion_step", x, x, 10, 5, _table(), method="ddim")
    assert verdict["torch"] == "ok" and "auto" in verdict
    assert "float32/float16/bfloat16" in D._supports(x.double())("triton")


def _opcheck_args(backend):
    x, m, u = _inputs((2, 3, 4), torch.float32, seed=12, guidance=2.0)
    t = torch.tensor([30, 450], device=DEVICE)
    return [
        (x, m, u, None, _table(), t, 0, None, 10, None, 7, 0, 0, 0.0, 1.0, 2.0, backend),
        (x, m, None, m, _table(), None, 500, t - 30, 0, None, None, 1, 1, 0.5, None, None, backend),
        (x, m, None, None, _table(), None, 500, None, -1, torch.tensor(5, device=DEVICE), None, 1, 2, 1.0, None, None, backend),
    ]


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    for args in _opcheck_args(backend):
        torch.library.opcheck(D.diffusion_step_op.custom_op, args)
    torch.library.opcheck(D.seeded_randn_op.custom_op, (torch.empty(3, 5, device=DEVICE), None, 9, backend))


@pytest.mark.parametrize("backend", BACKENDS)
def test_compile_fullgraph(backend):
    # a two-step loop with device timesteps and a device seed: one graph, no break
    torch._dynamo.reset()
    x, m, _ = _inputs((2, 3, 4, 4), torch.float32, seed=13)
    table = _table()
    ts = torch.tensor([[980, 960], [960, 940]], device=DEVICE)
    seed = torch.tensor(5, device=DEVICE)

    def loop(x, m, ts, seed):
        for k in range(2):
            x = DF.diffusion_step(x, m, ts[k, 0], ts[k, 1], table, method="ddim", eta=0.5,
                                  seed=seed, backend=backend)
        return x

    eager = loop(x, m, ts, seed)
    compiled = torch.compile(loop, fullgraph=True)(x, m, ts, seed)
    torch.testing.assert_close(compiled, eager, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# The sampler.

class TinyModel(torch.nn.Module):
    """A deterministic stand-in for a U-Net: depends on x and t, cheap."""

    def __init__(self, guided=False, float_t=False):
        super().__init__()
        self.guided, self.float_t = guided, float_t

    def forward(self, x, t):
        tt = t.to(x.dtype).view(-1, *([1] * (x.dim() - 1)))
        tt = tt * 1000 if self.float_t else tt
        out = 0.3 * torch.tanh(x) + 0.1 * torch.sin(tt / 150 + x)
        return (out, 0.5 * out - 0.05) if self.guided else out


@needs_diffusers
@pytest.mark.parametrize("backend", BACKENDS)
def test_sampler_ddim_matches_a_diffusers_loop(backend):
    shape, steps = (2, 3, 8, 8), 10
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(14)).to(DEVICE)
    model = TinyModel()
    ours = diffusion.sample(model, shape, steps, "ddim", noise=noise, device=DEVICE, backend=backend,
                            prediction_type="v_prediction")
    sched = DDIMScheduler(num_train_timesteps=T_TRAIN, clip_sample=False, prediction_type="v_prediction")
    sched.set_timesteps(steps)
    x = noise
    for t in sched.timesteps:
        x = sched.step(model(x, t.expand(shape[0]).to(DEVICE)), t, x).prev_sample
    torch.testing.assert_close(ours, x, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method,eta,guidance", [("ddpm", 0.0, None), ("ddim", 0.6, 4.0)])
def test_sampler_draws_its_noise_from_the_seed(method, eta, guidance, backend):
    shape, steps = (2, 2, 6, 6), 8
    model = TinyModel(guided=guidance is not None)
    ours = diffusion.sample(model, shape, steps, method, eta=eta, guidance_scale=guidance, seed=3,
                            device=DEVICE, backend=backend, clip_sample=True)
    # the same loop by hand: x_T and each step's noise from the documented per-step seeds
    seeds = diffusion.step_seeds(3, steps + 1)
    table = _table()
    x = D.seeded_randn(torch.empty(shape, device=DEVICE), seeds[0], backend="torch")
    for k, (t, prev) in enumerate(diffusion.schedule(method, steps)):
        out = model(x, torch.full((shape[0],), t, device=DEVICE))
        cond, uncond = out if guidance is not None else (out, None)
        noisy = t > 0 if method == "ddpm" else eta > 0
        x = D.diffusion_step_reference(
            x.double(), cond.double(), t, prev, table.double(), method=method, eta=eta, clip_sample=True,
            guidance_scale=guidance, uncond_output=None if uncond is None else uncond.double(),
            noise=D.philox_randn(shape, seeds[k + 1], DEVICE).double() if noisy else None).float()
    torch.testing.assert_close(ours, x, rtol=1e-4, atol=1e-4)
    again = diffusion.sample(model, shape, steps, method, eta=eta, guidance_scale=guidance, seed=3,
                             device=DEVICE, backend=backend, clip_sample=True)
    assert torch.equal(ours, again)
    other = diffusion.sample(model, shape, steps, method, eta=eta, guidance_scale=guidance, seed=4,
                             device=DEVICE, backend=backend, clip_sample=True)
    assert not torch.allclose(ours, other)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("pred", ["sample", "v_prediction"])  # epsilon: x0 = (x - eps)/0 at t = 1
def test_sampler_interp_scheme(pred, backend):
    # our reading of the seed's scheme, written out: x_{k+1} = (1 - t') x0 + t' (x - (1 - t) x0) / t
    shape, steps = (2, 3, 5, 5), 16
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(15)).to(DEVICE)
    model = TinyModel(float_t=True)
    ours = diffusion.sample(model, shape, steps, "interp", noise=noise, device=DEVICE, backend=backend,
                            prediction_type=pred)
    x = noise.double()
    for k in range(steps):
        t, t_next = 1 - k / steps, 1 - (k + 1) / steps
        out = model(x.float(), torch.full((shape[0],), t, device=DEVICE)).double()
        x0 = out if pred == "sample" else x - t * out
        eps = (x - (1 - t) * x0) / t
        x = (1 - t_next) * x0 + t_next * eps
    torch.testing.assert_close(ours, x.float(), rtol=1e-4, atol=1e-4)


def test_sampler_interp_next_is_the_literal_reading():
    shape = (2, 3)
    calls = []

    def model(x, t):
        calls.append(t.clone())
        return 0.5 * x + t.view(-1, 1)

    noise = torch.randn(shape, device=DEVICE)
    ours = diffusion.sample(model, shape, 16, "interp", noise=noise, prediction_type="next", device=DEVICE)
    x = noise
    for k in range(16):
        x = 0.5 * x + (1 - k / 16)
    torch.testing.assert_close(ours, x)
    assert [round(float(c[0]), 6) for c in calls] == [round(1 - k / 16, 6) for k in range(16)]


def test_sampler_bad_arguments():
    model = TinyModel()
    with pytest.raises(ValueError, match="method must be one of"):
        diffusion.Sampler(model, (1, 2), 4, "euler")
    with pytest.raises(ValueError, match="prediction_type"):
        diffusion.Sampler(model, (1, 2), 4, "ddim", prediction_type="next")
    with pytest.raises(ValueError, match="cuda_graph=True needs a CUDA device"):
        diffusion.Sampler(model, (1, 2), 4, "ddim", cuda_graph=True, device="cpu")
    with pytest.raises(ValueError, match="steps must be in"):
        diffusion.Sampler(model, (1, 2), 1001, "ddim")
    with pytest.raises(ValueError, match="seed must be an int"):
        diffusion.Sampler(model, (1, 2), 4, "ddim")(seed=-3)


# ---------------------------------------------------------------------------------------------
# GPU only: one launch per step, no host sync, the whole loop in one CUDA graph.

@pytest.mark.gpu
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_gpu_one_launch_per_step(backend):
    _alloc.set_poison(False)  # the suite's NaN fill of outputs would be a second launch
    x = torch.randn(4, 4, 64, 64, device="cuda")
    table, t = _table(), torch.tensor([500] * 4, device="cuda")
    seed = torch.tensor(1, device="cuda")
    DF.diffusion_step(x, x, t, 480, table, method="ddim", eta=1.0, seed=seed, backend=backend,
                      guidance_scale=7.5, uncond_output=x, clip_sample=True)  # compile outside
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        DF.diffusion_step(x, x, t, 480, table, method="ddim", eta=1.0, seed=seed, backend=backend,
                          guidance_scale=7.5, uncond_output=x, clip_sample=True)
        torch.cuda.synchronize()
    kernels = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    assert len(kernels) == 1 and "diffusion_step" in kernels[0], kernels


@pytest.mark.gpu
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("method", ["ddpm", "ddim", "interp"])
def test_gpu_sampler_no_host_sync_and_cuda_graph(method, backend):
    shape, steps = (2, 4, 16, 16), 12
    model = TinyModel(float_t=method == "interp")
    kw = dict(device="cuda", backend=backend, eta=1.0 if method == "ddim" else 0.0)
    eager = diffusion.Sampler(model, shape, steps, method, **kw)
    eager(seed=0)  # compile and warm up outside the sync check
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any synchronising call in the loop raises
    try:
        first = eager(seed=1)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    graphed = diffusion.Sampler(model, shape, steps, method, cuda_graph=True, **kw)
    torch.testing.assert_close(graphed(seed=1), first, rtol=1e-5, atol=1e-5)
    second = graphed(seed=2)  # a replay, with the new seed read from the device
    torch.testing.assert_close(second, eager(seed=2), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(first, second)  # x_T comes from the seed in every method


@pytest.mark.gpu
def test_gpu_large_offsets():
    # past 2^31 elements: 64-bit offsets and the counter's high word (bf16: 4.3 GB per tensor)
    n = (1 << 31) + 5
    if torch.cuda.get_device_properties(0).total_memory < 4 * n * 2 + (4 << 30):
        pytest.skip("not enough GPU memory")
    x = torch.zeros(n, device="cuda", dtype=torch.bfloat16)
    for backend in ("triton", "cuda"):
        if dlh.backends()[backend] != "available":
            continue
        out = DF.diffusion_step(x, x, 500, 480, _table(), method="ddim", eta=1.0, seed=3, backend=backend)
        tail = out[-5:].float()
        z = D.philox_randn((5,), 3, "cuda", start=n - 5)  # the stream at indices >= 2^31
        a_t, a_p = _table(torch.float64)[500], _table(torch.float64)[480]
        sigma = math.sqrt((1 - a_p) / (1 - a_t) * (1 - a_t / a_p))
        torch.testing.assert_close(tail, (sigma * z).bfloat16().float(), rtol=1e-2, atol=1e-2)
        del out
