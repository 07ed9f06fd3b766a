"""dlh_kernels.diffusion.DDPMScheduler / DDIMScheduler: diffusers' schedulers whose step is the
fused kernel, held to diffusers' own step and pipelines.

Oracle: diffusers' step run in float64 (its tables in float64) on the same inputs and the same
noise; our step must be within twice diffusers' own error in the dtype of that oracle, plus the
dtype's floor (conftest.assert_close, as every op test). The generator must end in diffusers'
state (the same random draws, at the same points). Where no float64 run exists (whole
pipelines: a tiny UNet2DModel, 6 steps, diffusers' scheduler vs ours from its config, one
generator seed), a flat bound on the scaled error. Fallback cases must run diffusers' own step
(bitwise its result, no kernel launch) and say why; fused cases must launch the kernel and not
run diffusers' step. Backends: torch, and triton (the interpreter on CPU tensors here).
"""
import subprocess
import sys
import warnings

import pytest
import torch

import dlh_kernels.diffusion as diffusion
from dlh_kernels.ops import diffusion_step as D

from conftest import DEVICE, assert_close, backend_param, scaled_error

diffusers = pytest.importorskip("diffusers", reason="diffusers is not installed (pip install -e .[test])")

BACKENDS = [backend_param(b) for b in ("torch", "triton")]
PIPELINE_TOL = 1e-5  # images in [0, 1] after 6 steps of a float32 UNet: seen ~1e-6
STEPS = 10
SHAPE = (2, 3, 8, 8)
PREDICTIONS = ["epsilon", "v_prediction", "sample"]


def _pair(kind, **config):
    """(diffusers' scheduler, ours from its config), both set to STEPS steps."""
    ref = getattr(diffusers, kind)(num_train_timesteps=1000, **config)
    ours = getattr(diffusion, kind).from_config(ref.config)
    ref.set_timesteps(STEPS)
    ours.set_timesteps(STEPS)
    return ref, ours


def _inputs(seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(SHAPE, generator=g).to(DEVICE, dtype)
    m = torch.randn(SHAPE, generator=g).to(DEVICE, dtype)
    return x, m


def _close(ours, ref, what, tol=PIPELINE_TOL):
    """A flat bound on the scaled error, where there is no float64 oracle."""
    assert ours.shape == ref.shape and ours.dtype == ref.dtype and ours.device == ref.device, what
    err = scaled_error(ours, ref)
    assert err <= tol, f"{what}: scaled error {err:.3g} > {tol}"


def _float64_twin(sched):
    """The same diffusers scheduler computing in float64 (its tables in float64)."""
    kind = next(c for c in type(sched).__mro__ if c.__module__.startswith("diffusers."))
    twin = kind.from_config(sched.config)
    if sched.num_inference_steps is not None:
        twin.set_timesteps(timesteps=sched.timesteps.tolist()) if getattr(sched, "custom_timesteps", False) \
            else twin.set_timesteps(sched.num_inference_steps)
    twin.alphas_cumprod = twin.alphas_cumprod.double()
    for name in ("one", "final_alpha_cumprod"):
        if hasattr(twin, name):
            setattr(twin, name, getattr(twin, name).double())
    return twin


def _oracle(monkeypatch, ref, t, x, m, seed, kw):
    """diffusers' step in float64 on the same inputs and the same float32 noise the generator
    gives the float32 step (its randn_tensor calls answered with that noise)."""
    from diffusers.utils.torch_utils import randn_tensor
    noise = randn_tensor(x.shape, generator=torch.Generator(DEVICE).manual_seed(seed), device=x.device,
                         dtype=x.dtype)
    with monkeypatch.context() as patch:
        for module in (diffusers.schedulers.scheduling_ddpm, diffusers.schedulers.scheduling_ddim):
            patch.setattr(module, "randn_tensor", lambda *a, dtype=None, **k: noise.to(dtype))
        kw = dict(kw)
        if kw.get("variance_noise") is not None:
            kw["variance_noise"] = kw["variance_noise"].double()
        return _float64_twin(ref).step(m.double(), t, x.double(), **kw)


def _compare_step(monkeypatch, ref, ours, t, x, m, seed=7, **kw):
    """One step of each with generators seeded alike: ours within twice diffusers' float32
    error of diffusers in float64 (plus the float32 floor), the generators at one state."""
    g_ref, g_ours = torch.Generator(DEVICE).manual_seed(seed), torch.Generator(DEVICE).manual_seed(seed)
    a = ref.step(m, t, x, generator=g_ref, **kw)
    b = ours.step(m, t, x, generator=g_ours, **kw)
    assert ours.dlh_fallback_reason is None, ours.dlh_fallback_reason
    assert type(b) is type(a)
    exact = _oracle(monkeypatch, ref, t, x, m, seed, kw)
    for name in ("prev_sample", "pred_original_sample"):
        assert getattr(b, name).dtype == x.dtype
        assert_close(getattr(b, name), getattr(exact, name), getattr(a, name), x.dtype,
                     f"{name} at t={int(t)}")
    assert torch.equal(g_ref.get_state(), g_ours.get_state()), "a different number of random draws"


@pytest.fixture
def kernel_calls(monkeypatch):
    """Count DF.diffusion_step calls, and make diffusers' own steps raise: a fused step must not
    run them."""
    calls = []
    real = D.diffusion_step

    def counting(*args, **kwargs):
        calls.append(kwargs.get("method"))
        return real(*args, **kwargs)

    monkeypatch.setattr(D, "diffusion_step", counting)
    return calls


def _forbid_parent_step(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("diffusers' own step ran")
    for kind in ("DDPMScheduler", "DDIMScheduler"):
        monkeypatch.setattr(getattr(diffusers, kind), "step", refuse)


# ---- the step against diffusers' step ---------------------------------------------------------

# every timestep of the 10-step schedule (900 ... 0): the first, the middle ones, the final one
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("clip", [False, True])
@pytest.mark.parametrize("pred", PREDICTIONS)
def test_ddpm_step_matches_diffusers(pred, clip, backend, monkeypatch):
    ref, ours = _pair("DDPMScheduler", prediction_type=pred, clip_sample=clip)
    ours.dlh_backend = backend
    x, m = _inputs()
    for t in ref.timesteps:
        _compare_step(monkeypatch, ref, ours, t, x, m)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("alpha_to_one", [True, False])
@pytest.mark.parametrize("eta", [0.0, 0.8])
@pytest.mark.parametrize("clip", [False, True])
@pytest.mark.parametrize("pred", PREDICTIONS)
def test_ddim_step_matches_diffusers(pred, clip, eta, alpha_to_one, backend, monkeypatch):
    ref, ours = _pair("DDIMScheduler", prediction_type=pred, clip_sample=clip,
                      set_alpha_to_one=alpha_to_one)
    ours.dlh_backend = backend
    x, m = _inputs()
    for t in ref.timesteps[[0, STEPS // 2, -1]]:  # first, middle, final (prev < 0)
        _compare_step(monkeypatch, ref, ours, t, x, m, eta=eta)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("pred", PREDICTIONS)
def test_ddim_use_clipped_model_output(pred, backend, monkeypatch):
    # a range of 0.5 clips most of x0, so the re-derived eps differs from the model's
    ref, ours = _pair("DDIMScheduler", prediction_type=pred, clip_sample=True, clip_sample_range=0.5)
    ours.dlh_backend = backend
    x, m = _inputs(1)
    for t in ref.timesteps[[0, STEPS // 2, -1]]:
        _compare_step(monkeypatch, ref, ours, t, x, m, eta=0.5, use_clipped_model_output=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind,kw", [("DDPMScheduler", {}), ("DDIMScheduler", {"eta": 0.5})])
def test_low_precision_steps(kind, kw, dtype, backend, monkeypatch):
    # the kernel computes in float32 and rounds once: within twice diffusers' own error in dtype
    ref, ours = _pair(kind, prediction_type="v_prediction")
    ours.dlh_backend = backend
    x, m = _inputs(3, dtype)
    for t in ref.timesteps[[0, STEPS // 2, -1]]:
        _compare_step(monkeypatch, ref, ours, t, x, m, **kw)


@pytest.mark.parametrize("kind", ["DDPMScheduler", "DDIMScheduler"])
def test_return_dict_false_and_the_fused_path_is_taken(kind, kernel_calls, monkeypatch):
    ref, ours = _pair(kind)
    x, m = _inputs(2)
    t = ref.timesteps[3]
    a = ref.step(m, t, x, generator=torch.Generator(DEVICE).manual_seed(0), return_dict=False)
    _forbid_parent_step(monkeypatch)
    b = ours.step(m, t, x, generator=torch.Generator(DEVICE).manual_seed(0), return_dict=False)
    assert type(b) is tuple and len(b) == 2
    _close(b[0], a[0], "prev_sample")
    _close(b[1], a[1], "pred_original_sample")
    method = "ddpm" if kind == "DDPMScheduler" else "ddim"
    assert kernel_calls == [method, "ddim"]  # the step, then x0 (a DDIM step to prev < 0)


def test_skipping_pred_original_sample_is_one_launch(kernel_calls):
    ref, ours = _pair("DDIMScheduler")
    ours.dlh_pred_original_sample = False
    x, m = _inputs()
    out = ours.step(m, ref.timesteps[0], x)
    assert out.pred_original_sample is None and len(kernel_calls) == 1
    _close(out.prev_sample, ref.step(m, ref.timesteps[0], x).prev_sample, "prev_sample")


def test_ddpm_without_set_timesteps_steps_to_t_minus_1(monkeypatch):
    ref = diffusers.DDPMScheduler(num_train_timesteps=1000)
    ours = diffusion.DDPMScheduler.from_config(ref.config)
    x, m = _inputs()
    for t in (999, 500, 1, 0):
        _compare_step(monkeypatch, ref, ours, torch.tensor(t), x, m)


def test_custom_timesteps_and_trailing_spacing(monkeypatch):
    ref = diffusers.DDPMScheduler(num_train_timesteps=1000)
    ours = diffusion.DDPMScheduler.from_config(ref.config)
    custom = [980, 700, 420, 100, 3, 0]
    ref.set_timesteps(timesteps=custom)
    ours.set_timesteps(timesteps=custom)
    x, m = _inputs()
    for t in ref.timesteps:
        _compare_step(monkeypatch, ref, ours, t, x, m)
    ref, ours = _pair("DDIMScheduler", timestep_spacing="trailing", set_alpha_to_one=False)
    for t in ref.timesteps:
        _compare_step(monkeypatch, ref, ours, t, x, m, eta=0.3)


def test_generator_none_uses_the_global_generator_as_diffusers_does():
    for kind, kw in (("DDPMScheduler", {}), ("DDIMScheduler", {"eta": 1.0})):
        ref, ours = _pair(kind)
        x, m = _inputs()
        t = ref.timesteps[1]
        torch.manual_seed(3)
        a = ref.step(m, t, x, **kw).prev_sample
        torch.manual_seed(3)
        b = ours.step(m, t, x, **kw).prev_sample
        _close(b, a, kind)


def test_ddim_variance_noise_and_its_errors():
    ref, ours = _pair("DDIMScheduler")
    x, m = _inputs()
    z = torch.randn(SHAPE, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    t = ref.timesteps[2]
    _close(ours.step(m, t, x, eta=0.6, variance_noise=z).prev_sample,
           ref.step(m, t, x, eta=0.6, variance_noise=z).prev_sample, "prev_sample")
    with pytest.raises(ValueError, match="generator and variance_noise"):
        ours.step(m, t, x, eta=0.6, variance_noise=z, generator=torch.Generator(DEVICE))
    fresh = diffusion.DDIMScheduler.from_config(ref.config)
    with pytest.raises(ValueError, match="set_timesteps"):
        fresh.step(m, t, x)


def test_alphas_cumprod_moves_to_the_device_once(monkeypatch):
    ref, ours = _pair("DDIMScheduler")
    x, m = _inputs()
    moves = []
    real_to = torch.Tensor.to

    def spy(self, *args, **kwargs):
        if self is ours.alphas_cumprod:
            moves.append(args)
        return real_to(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "to", spy)
    for t in ref.timesteps:
        ours.step(m, t, x)
    assert len(moves) == 1
    # replaced (add_noise does, when it moves the table to the sample's device): the cache follows
    ours.alphas_cumprod = ours.alphas_cumprod * 1.0
    assert ours._dlh_table(x.device) is ours.alphas_cumprod.to(x.device)


# ---- no host sync ---------------------------------------------------------------------------

_CONVERSIONS = ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__index__", "__float__")


@pytest.mark.parametrize("kind,config", [("DDPMScheduler", {}),
                                         ("DDIMScheduler", {"set_alpha_to_one": True}),
                                         ("DDIMScheduler", {"set_alpha_to_one": False})])
def test_device_timestep_path_reads_nothing_back(kind, config, monkeypatch):
    """The path for a timestep on the device, run on CPU tensors (the device test of `_on_host`
    patched): no tensor is turned into a Python value, which on a GPU would be a sync. The
    torch backend (the interpreter itself reads tensors back into numpy)."""
    ref, ours = _pair(kind, **config)
    x, m = _inputs()
    kw = {"eta": 0.5} if kind == "DDIMScheduler" else {}
    ours.step(m, ref.timesteps[0], x, **kw)  # warm: the cached table, final_alpha_cumprod's index
    monkeypatch.setattr(diffusion, "_on_host", lambda t: False)
    ours.dlh_backend = "torch"
    for t in ref.timesteps[[0, STEPS // 2, -1]]:
        tt = t.clone()
        a = ref.step(m, t, x, generator=torch.Generator().manual_seed(1), **kw)
        exact = _oracle(monkeypatch, ref, t, x, m, 1, kw)
        g = torch.Generator().manual_seed(1)
        with monkeypatch.context() as strict:
            for name in _CONVERSIONS:
                strict.setattr(torch.Tensor, name, _raiser(name))
            b = ours.step(m, tt, x, generator=g, **kw)
        assert ours.dlh_fallback_reason is None
        for name in ("prev_sample", "pred_original_sample"):
            assert_close(getattr(b, name), getattr(exact, name), getattr(a, name), x.dtype,
                         f"{name} at t={int(t)}")


def _raiser(name):
    def conversion(*args, **kwargs):
        raise AssertionError(f"Tensor.{name} called: a host sync on a device tensor")
    return conversion


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["DDPMScheduler", "DDIMScheduler"])
def test_cuda_steps_do_not_sync(kind):
    """Timesteps on the GPU (set_timesteps(device=...)), CUDA's sync detector set to error."""
    ref, ours = _pair(kind)
    ours.set_timesteps(STEPS, device=DEVICE)
    x, m = _inputs()
    kw = {"eta": 0.5} if kind == "DDIMScheduler" else {}
    for be in ("triton", "cuda"):
        if diffusion._backend.unavailable_reason(be, "cuda"):
            continue
        ours.dlh_backend = be
        ours.step(m, ours.timesteps[0], x, generator=torch.Generator(DEVICE).manual_seed(0), **kw)  # warm
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            outs = [ours.step(m, t, x, generator=torch.Generator(DEVICE).manual_seed(0), **kw)
                    for t in ours.timesteps]
        finally:
            torch.cuda.set_sync_debug_mode(0)
        for t, b in zip(ref.timesteps, outs):
            a = ref.step(m, t, x, generator=torch.Generator(DEVICE).manual_seed(0), **kw)
            _close(b.prev_sample, a.prev_sample, f"{be} prev_sample at t={int(t)}")


# ---- fallbacks ------------------------------------------------------------------------------

FALLBACKS = [
    # (scheduler, config, step kwargs, model_output channels factor, dtype, words in the reason)
    ("DDPMScheduler", {"variance_type": "fixed_large"}, {}, 1, torch.float32, "variance_type"),
    ("DDPMScheduler", {"variance_type": "fixed_small_log"}, {}, 1, torch.float32, "variance_type"),
    ("DDPMScheduler", {"variance_type": "learned_range"}, {}, 2, torch.float32, "variance_type"),
    ("DDPMScheduler", {"thresholding": True}, {}, 1, torch.float32, "thresholding"),
    ("DDIMScheduler", {"thresholding": True}, {}, 1, torch.float32, "thresholding"),
    ("DDIMScheduler", {}, {"eta": -0.5}, 1, torch.float32, "eta"),
    ("DDPMScheduler", {}, {}, 1, torch.float64, "model_output"),  # dtype unlike sample's
]


@pytest.mark.parametrize("kind,config,kw,factor,out_dtype,words", FALLBACKS,
                         ids=[f"{k[:4]}-{w}-{list(c.values()) or list(kw.values()) or d}"
                              for k, c, kw, _, d, w in FALLBACKS])
def test_fallback_runs_diffusers_step(kind, config, kw, factor, out_dtype, words, monkeypatch):
    ref, ours = _pair(kind, **config)
    x, _ = _inputs()
    m = torch.randn((SHAPE[0], SHAPE[1] * factor) + SHAPE[2:], generator=torch.Generator().manual_seed(4),
                    dtype=out_dtype).to(DEVICE)
    t = ref.timesteps[2]
    a = ref.step(m, t, x, generator=torch.Generator(DEVICE).manual_seed(0), **kw)

    def no_kernel(*args, **kwargs):
        raise AssertionError("the kernel ran")

    monkeypatch.setattr(D, "diffusion_step", no_kernel)
    with pytest.warns(diffusion.FallbackWarning, match=words):
        b = ours.step(m, t, x, generator=torch.Generator(DEVICE).manual_seed(0), **kw)
    assert words in ours.dlh_fallback_reason
    assert torch.equal(b.prev_sample, a.prev_sample)
    assert torch.equal(b.pred_original_sample, a.pred_original_sample)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per scheduler and reason
        ours.step(m, t, x, generator=torch.Generator(DEVICE).manual_seed(0), **kw)


def test_fallback_errors_are_diffusers_errors():
    """What diffusers rejects, ours rejects the same way (through diffusers' step)."""
    ref, ours = _pair("DDPMScheduler")
    x, m = _inputs()
    with pytest.warns(diffusion.FallbackWarning, match="not in scheduler.timesteps"):
        with pytest.raises(IndexError):
            ours.step(m, 123, x)
    with pytest.raises(IndexError):
        ref.step(m, 123, x)


def test_final_alpha_cumprod_edited_falls_back():
    ref, ours = _pair("DDIMScheduler")
    x, m = _inputs()
    ref.final_alpha_cumprod = ours.final_alpha_cumprod = torch.tensor(0.99995)  # > alphas_cumprod[0]
    t = ref.timesteps[-1]
    with pytest.warns(diffusion.FallbackWarning, match="final_alpha_cumprod"):
        b = ours.step(m, t, x)
    assert torch.equal(b.prev_sample, ref.step(m, t, x).prev_sample)
    ours.step(m, ref.timesteps[0], x)  # not the final step, but the check is per scheduler state
    assert "final_alpha_cumprod" in ours.dlh_fallback_reason


def test_fused_after_fallback_clears_the_reason():
    ref, ours = _pair("DDIMScheduler")
    x, m = _inputs()
    with pytest.warns(diffusion.FallbackWarning):
        ours.step(m, ref.timesteps[0], x, eta=-1.0)
    assert ours.dlh_fallback_reason
    ours.step(m, ref.timesteps[0], x)
    assert ours.dlh_fallback_reason is None


# ---- whole pipelines ------------------------------------------------------------------------

def _unet():
    torch.manual_seed(0)
    return diffusers.UNet2DModel(
        sample_size=8, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(8, 16),
        norm_num_groups=4, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D")).to(DEVICE).eval()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind,config,call", [
    ("DDPMScheduler", {"prediction_type": "epsilon"}, {}),
    ("DDIMScheduler", {"prediction_type": "v_prediction", "set_alpha_to_one": False}, {"eta": 0.5}),
    ("DDIMScheduler", {"prediction_type": "epsilon"}, {"eta": 0.0, "use_clipped_model_output": True}),
], ids=["ddpm", "ddim-v-eta", "ddim-clipped-eps"])
def test_pipeline_matches_diffusers(kind, config, call, backend):
    unet = _unet()
    sched = getattr(diffusers, kind)(num_train_timesteps=1000, **config)
    Pipeline = diffusers.DDPMPipeline if kind == "DDPMScheduler" else diffusers.DDIMPipeline
    pipe = Pipeline(unet=unet, scheduler=sched)
    pipe.set_progress_bar_config(disable=True)
    steps = {"num_inference_steps": 6}

    def run():
        g = torch.Generator(DEVICE).manual_seed(11)
        image = pipe(batch_size=2, generator=g, output_type="np", **steps, **call).images
        return torch.from_numpy(image), g.get_state()

    theirs, state_theirs = run()
    # DDIMPipeline's __init__ converts its scheduler to diffusers' class: set ours after
    pipe.scheduler = getattr(diffusion, kind).from_config(pipe.scheduler.config)
    pipe.scheduler.dlh_backend = backend
    assert type(pipe.scheduler).__module__ == "dlh_kernels.diffusion"
    ours, state_ours = run()
    assert pipe.scheduler.dlh_fallback_reason is None
    _close(ours, theirs, "images")
    assert torch.equal(state_ours, state_theirs), "the generator saw a different sequence of draws"


# ---- packaging ------------------------------------------------------------------------------

def test_import_without_diffusers():
    code = (
        "import sys; sys.modules['diffusers'] = None\n"
        "import dlh_kernels, dlh_kernels.diffusion as d\n"
        "assert 'diffusers' not in [m for m in sys.modules if sys.modules[m] is not None]\n"
        "try:\n"
        "    d.DDIMScheduler\n"
        "except ImportError as e:\n"
        "    assert 'pip install diffusers' in str(e), e\n"
        "else:\n"
        "    raise SystemExit('no ImportError')\n"
        "try:\n"
        "    d.NotAThing\n"
        "except AttributeError:\n"
        "    pass\n"
        "print('ok')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
    # installed, it is still imported only when a scheduler class is first asked for
    code = ("import sys, dlh_kernels.diffusion as d\n"
            "assert 'diffusers' not in sys.modules\n"
            "d.DDPMScheduler\n"
            "assert 'diffusers' in sys.modules\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr


def test_classes_are_diffusers_subclasses_and_picklable():
    import pickle
    for kind in ("DDPMScheduler", "DDIMScheduler"):
        cls = getattr(diffusion, kind)
        assert issubclass(cls, getattr(diffusers, kind)) and cls.__name__ == kind
        ref, ours = _pair(kind, prediction_type="v_prediction")
        assert ours.config == ref.config
        copy = pickle.loads(pickle.dumps(ours))
        assert type(copy) is cls and copy.config == ours.config
