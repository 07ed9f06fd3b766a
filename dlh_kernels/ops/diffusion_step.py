"""The diffusion sampling step: reference, torch op, public function; and its noise stream.

``DF.diffusion_step`` is one reverse step of diffusers' ``DDPMScheduler.step`` (fixed_small
variance) or ``DDIMScheduler.step`` (any eta), with the predicted x0 optionally clipped,
classifier-free guidance optionally fused in, and the noise either given or drawn inside the
kernel from ``seed``. The kernels live in ``triton_kernels/diffusion_step.py`` and
``csrc/diffusion_step.cu``; the math is written out in the Triton file's header.

Contract details beyond DESIGN.md:
- No backward: sampling is inference. The output never requires grad (inputs are detached).
- ``timestep`` / ``prev_timestep``: a Python int, or an integer tensor on the sample's device
  with one element or one per batch element (``sample.shape[0]``). A tensor is read by the
  kernel: no ``.item()``, no host sync, so the call can be captured in a CUDA graph. An int is
  checked on the host; a tensor value outside the table makes the kernel write NaN for the
  batch elements concerned (checking it on the host would need a sync). ``prev_timestep < 0``
  is the final step (alpha_cumprod_prev = 1).
- DDPM adds noise where ``timestep > 0`` (as diffusers does); DDIM where ``eta > 0``.
- ``clip_sample``: None/False (no clipping), True (clip x0 to [-1, 1], diffusers' default
  range) or a positive number r (clip to [-r, r]).
- ``noise``: used as is (same shape, dtype and device as ``sample``). Otherwise, when the step
  needs noise, it is drawn in the kernel from ``seed``: a Python int in [0, 2^63) or a
  one-element integer tensor on the device (read by the kernel, so a captured graph can be
  replayed with a new seed by writing into that tensor). ``seed=None`` then takes a seed from
  torch's default CPU generator (so ``torch.manual_seed`` makes runs repeatable, no device
  sync). Passing both ``noise`` and ``seed`` is an error.
- The noise stream: element i (the logical, row-major index into ``sample``) gets
  ``tl.randn(seed, i)``: Philox4x32-10 keyed by the 64-bit seed with counter (i_lo, i_hi, 0, 0),
  then Box-Muller of the first two words. All three backends implement that stream
  (`philox_randn` below is the torch one), so the same seed gives the same noise on every
  backend up to the rounding of log/cos/sqrt (~1e-6), and bitwise the same on one backend.
- The ``torch`` backend is the float64 reference: it computes in float64 and rounds once.
"""
from __future__ import annotations

import math
from typing import Optional, Union

import torch

from .. import _alloc, _backend, _ext
from .._op import KernelOp

_TABLE_DTYPES = (torch.float32, torch.float64)
METHODS = {"ddpm": 0, "ddim": 1}
_INTERP = 2  # the sampler's linear-interpolation scheme (dlh_kernels.diffusion), not public
PREDICTIONS = {"epsilon": 0, "v_prediction": 1, "sample": 2}
_SEED_LIMIT = 1 << 63
# `auto` on CUDA tensors: the step is launch-bound, and the C++ launch costs the host less
# than the Triton launcher (a reasoned order until the GPU benchmark says otherwise).
AUTO_ORDER = ("cuda", "triton", "torch")

Timestep = Union[int, torch.Tensor]


# ---------------------------------------------------------------------------------------------
# The noise stream in plain PyTorch (exactly `tl.randn(seed, i)`, integer ops on int64 tensors).

_M32 = 0xFFFFFFFF
_PHILOX_KEY_A, _PHILOX_KEY_B = 0x9E3779B9, 0xBB67AE85
_PHILOX_ROUND_A, _PHILOX_ROUND_B = 0xD2511F53, 0xCD9E8D57


def _mul_hi_lo(a: int, b: torch.Tensor):
    """(a * b) >> 32 and (a * b) mod 2^32 for a 32-bit constant a and 32-bit values b, without
    overflowing int64: b is split in 16-bit halves."""
    p_lo = a * (b & 0xFFFF)
    mid = a * (b >> 16) + (p_lo >> 16)
    return mid >> 16, ((mid & 0xFFFF) << 16) | (p_lo & 0xFFFF)


def _uniform(x: torch.Tensor) -> torch.Tensor:
    """Triton's uint_to_uniform_float of 32-bit words held in int64: [0, 1) in float32."""
    s = torch.where(x >= (1 << 31), x - (1 << 32), x)  # as int32
    s = torch.where(s < 0, -s - 1, s)                  # ~s
    return s.to(torch.float32) * torch.tensor(4.6566127342e-10, dtype=torch.float32)


def philox_randn(shape, seed: Union[int, torch.Tensor], device=None, start: int = 0) -> torch.Tensor:
    """float32 normals of the step's noise stream: element i (row-major) is tl.randn(seed, i);
    `start` offsets the indices (the stream's tail of a huge tensor without the rest)."""
    if isinstance(seed, torch.Tensor):
        device = seed.device if device is None else device
        s = seed.reshape(()).to(torch.int64)
        k0, k1 = s & _M32, (s >> 32) & _M32
    else:
        k0, k1 = seed & _M32, (seed >> 32) & _M32
    idx = torch.arange(start, start + math.prod(shape), device=device, dtype=torch.int64)
    c0, c1 = idx & _M32, idx >> 32
    c2 = c3 = torch.zeros_like(idx)
    for _ in range(10):
        hi_b, lo_b = _mul_hi_lo(_PHILOX_ROUND_B, c2)
        hi_a, lo_a = _mul_hi_lo(_PHILOX_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + _PHILOX_KEY_A) & _M32, (k1 + _PHILOX_KEY_B) & _M32
    u1 = torch.clamp_min(_uniform(c0), 1e-7)
    u2 = _uniform(c1)
    theta = torch.tensor(6.283185307179586, dtype=torch.float32) * u2
    return (torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(theta)).reshape(shape)


# ---------------------------------------------------------------------------------------------
# Reference: the formulas as diffusers writes them, in the dtype of the inputs (float64 in the
# tests and in the torch backend).

def _gather(table: torch.Tensor, t: Timestep, ndim: int, final=None):
    """(table value at t broadcastable against a sample of ndim dims, t as such a tensor or int,
    valid mask or bool). With `final`, t < 0 gives `final` (the step after the last)."""
    n = table.shape[0]
    if isinstance(t, int):  # no tensor made from a host value: that would copy to the device
        if t < 0 and final is not None:
            return float(final), t, t < n
        return table[min(max(t, 0), n - 1)], t, 0 <= t < n
    tt = t.reshape(-1).to(torch.int64)
    tt = tt.reshape((-1,) + (1,) * (ndim - 1)) if tt.numel() > 1 else tt.reshape(())
    value = table[tt.clamp(0, n - 1)]
    if final is not None:
        value = torch.where(tt < 0, torch.ones_like(value) * final, value)
        return value, tt, tt < n
    return value, tt, (tt >= 0) & (tt < n)


def _where(cond, a, b):
    """torch.where for a bool tensor, or a plain choice for a host bool (no device copy)."""
    if isinstance(cond, bool):
        return a if cond else (b if isinstance(b, torch.Tensor) else torch.full_like(a, b))
    return torch.where(cond, a, b)


def diffusion_step_reference(sample, model_output, timestep: Timestep, prev_timestep: Timestep,
                             alphas_cumprod, *, method="ddpm", eta=0.0, prediction_type="epsilon",
                             clip_sample=None, guidance_scale=None, uncond_output=None, noise=None):
    """One reverse step written out as diffusers does; computes in sample's dtype.

    method "interp" (the sampler's scheme): alphas_cumprod holds the interpolation times s_k,
    x = (1 - s) x0 + s noise, and x_prev = (s_p / s) x + (1 - s_p / s) x0 (deterministic).
    noise must be given when the step adds noise.
    """
    x = sample
    table = alphas_cumprod.to(x.dtype)
    m = model_output
    if guidance_scale is not None:
        m = uncond_output + guidance_scale * (model_output - uncond_output)
    clip = 1.0 if clip_sample is True else (clip_sample or None)
    ndim = x.dim()
    if method == "interp":
        s_t, tt, valid_t = _gather(table, timestep, ndim)
        s_p, _, valid_p = _gather(table, prev_timestep, ndim, final=0.0)
        if prediction_type == "epsilon":
            x0 = (x - s_t * m) / (1 - s_t)
        elif prediction_type == "v_prediction":
            x0 = x - s_t * m
        else:
            x0 = m
        if clip is not None:
            x0 = x0.clamp(-clip, clip)
        out = (s_p / s_t) * x + (1 - s_p / s_t) * x0
        return _where(valid_t & valid_p, out, math.nan)

    a_t, tt, valid_t = _gather(table, timestep, ndim)
    a_p, _, valid_p = _gather(table, prev_timestep, ndim, final=1.0)
    b_t, b_p = 1 - a_t, 1 - a_p
    if prediction_type == "epsilon":
        x0 = (x - b_t ** 0.5 * m) / a_t ** 0.5
        eps = m
    elif prediction_type == "v_prediction":
        x0 = a_t ** 0.5 * x - b_t ** 0.5 * m
        eps = a_t ** 0.5 * m + b_t ** 0.5 * x
    else:
        x0 = m
        eps = (x - a_t ** 0.5 * x0) / b_t ** 0.5
    if clip is not None:
        x0 = x0.clamp(-clip, clip)
    variance = b_p / b_t * (1 - a_t / a_p)
    if method == "ddpm":
        alpha_t = a_t / a_p
        out = (a_p ** 0.5 * (1 - alpha_t) / b_t) * x0 + (alpha_t ** 0.5 * b_p / b_t) * x
        std = torch.clamp(variance, min=1e-20) ** 0.5
        if noise is not None:
            out = out + _where(tt > 0, std * noise, 0.0)
    else:
        std = eta * variance ** 0.5
        out = a_p ** 0.5 * x0 + (1 - a_p - std ** 2).clamp_min(0) ** 0.5 * eps
        if eta > 0 and noise is not None:
            out = out + std * noise
    return _where(valid_t & valid_p, out, math.nan)


# ---------------------------------------------------------------------------------------------
# Layout: every tensor's strides over the shape collapsed to at most 4 dims.

def _collapse(shape, tensors):
    """(dims (4,), strides per tensor (4 each; zeros for None), contiguous) or None when more
    than 4 dims remain. Dims of size 1 are dropped; a dim merges into the one before it when
    every tensor steps over both as one. (Host code on every step: kept lean.)"""
    present = [t.stride() for t in tensors if t is not None]
    if all(t.is_contiguous() for t in tensors if t is not None):
        n = math.prod(shape)
        flat = (1, 1, 1, n), [(0, 0, 0, 1) if t is not None else (0, 0, 0, 0) for t in tensors], True
        return flat
    sizes, merged = [], []  # merged[j]: the strides of dim j, one per present tensor
    for d, size in enumerate(shape):
        if size == 1:
            continue
        strides = [st[d] for st in present]
        if sizes and all(prev == s * size for prev, s in zip(merged[-1], strides)):
            sizes[-1] *= size
            merged[-1] = strides
        else:
            sizes.append(size)
            merged.append(strides)
    if len(sizes) > 4:
        return None
    pad = 4 - len(sizes)
    dims = (1,) * pad + tuple(sizes)
    columns = iter(range(len(present)))
    strides = []
    for t in tensors:
        if t is None:
            strides.append((0, 0, 0, 0))
        else:
            j = next(columns)
            strides.append((0,) * pad + tuple(st[j] for st in merged))
    return dims, strides, False


# ---------------------------------------------------------------------------------------------
# Backend implementations. Each writes `out` and takes the already-resolved arguments:
# t, pt: int or int tensor; seed: None, int or int64 tensor (drawn noise); noise: tensor or None.

def _torch_step(x, m, u, z, out, table, t, pt, seed, method, pred, eta, clip, guidance):
    if z is None and seed is not None:
        z = philox_randn(tuple(x.shape), seed, x.device)
    d = torch.float64
    name = {0: "ddpm", 1: "ddim", 2: "interp"}[method]
    ref = diffusion_step_reference(
        x.to(d), m.to(d), t, pt, table.to(d), method=name, eta=eta,
        prediction_type=("epsilon", "v_prediction", "sample")[pred], clip_sample=clip,
        guidance_scale=guidance, uncond_output=None if u is None else u.to(d),
        noise=None if z is None else z.to(d))
    out.copy_(ref)


def _kernel_args(x, m, u, z, out):
    """(x, m, u, z, target), layout, per_batch. The kernels write `target`: `out` itself, or
    when more than 4 dims stay uncollapsed (rare: 5+ dims that no tensor lets merge) a
    contiguous stand-in, with contiguous copies of the inputs; the caller copies it back."""
    layout = _collapse(x.shape, [x, m, u, z, out])
    target = out
    if layout is None:
        x, m = x.contiguous(), m.contiguous()
        u = None if u is None else u.contiguous()
        z = None if z is None else z.contiguous()
        target = _alloc.empty(x.shape, x.dtype, x.device)
        layout = _collapse(x.shape, [x, m, u, z, target])
    per_batch = max(1, x.numel() // x.shape[0]) if x.dim() else 1
    return (x, m, u, z, target), layout, per_batch


def _triton_step(x, m, u, z, out, table, t, pt, seed, method, pred, eta, clip, guidance):
    kernels = _backend.triton_module("diffusion_step")
    (x, m, u, z, target), layout, per_batch = _kernel_args(x, m, u, z, out)
    kernels.diffusion_step(x, m, u, z, target, table, t, pt, seed, layout, per_batch,
                           method=method, pred=pred, eta=eta, clip=clip, guidance=guidance)
    if target is not out:
        out.copy_(target)


def _cuda_step(x, m, u, z, out, table, t, pt, seed, method, pred, eta, clip, guidance):
    C = _ext.ext()
    (x, m, u, z, target), layout, per_batch = _kernel_args(x, m, u, z, out)
    dims, strides, contig = layout

    def value(v):  # (pointer, int value, stride) of an int-or-tensor argument
        if v is None:
            return 0, 0, 0
        if isinstance(v, int):
            return 0, v, 0
        return v.data_ptr(), 0, (v.stride(0) if v.numel() > 1 else 0)

    t_ptr, t_val, t_stride = value(t)
    pt_ptr, pt_val, pt_stride = value(pt)
    seed_ptr, seed_val, _ = value(seed)
    noise_mode = 1 if z is not None else (2 if seed is not None else 0)
    C.diffusion_step(
        x.data_ptr(), m.data_ptr(), _ext.ptr(u), _ext.ptr(z), target.data_ptr(), table.data_ptr(),
        t_ptr, pt_ptr, seed_ptr, t_val, pt_val, seed_val, t_stride, pt_stride,
        target.numel(), per_batch, table.numel(), dims, [s for st in strides for s in st],
        float(eta), float(clip or 0.0), float(guidance or 0.0), method, pred, noise_mode,
        clip is not None, guidance is not None, contig, _ext.DTYPE_CODE[x.dtype],
        table.dtype == torch.float64, _ext.stream_handle(x.device))
    if target is not out:
        out.copy_(target)


_STEP = {"torch": _torch_step, "triton": _triton_step, "cuda": _cuda_step}


def _torch_randn(out, seed):
    out.copy_(philox_randn(tuple(out.shape), seed, out.device))


def _triton_randn(out, seed):
    kernels = _backend.triton_module("diffusion_step")
    kernels.seeded_randn(out, seed)


def _cuda_randn(out, seed):
    tensor = isinstance(seed, torch.Tensor)
    _ext.ext().seeded_randn(out.data_ptr(), seed.data_ptr() if tensor else 0, 0 if tensor else seed,
                            out.numel(), _ext.DTYPE_CODE[out.dtype], _ext.stream_handle(out.device))


_RANDN = {"torch": _torch_randn, "triton": _triton_randn, "cuda": _cuda_randn}


# ---------------------------------------------------------------------------------------------
# The ops. Ints that may be tensors travel as (Tensor?, int) pairs.

def _step_impl(backend):
    def run(sample, model_output, uncond_output, noise, alphas_cumprod, timestep, timestep_value,
            prev_timestep, prev_timestep_value, seed, seed_value, method, prediction, eta,
            clip_range, guidance_scale):
        out = _alloc.empty_like(sample)
        if out.numel() == 0:
            return out
        t = timestep if timestep is not None else timestep_value
        pt = prev_timestep if prev_timestep is not None else prev_timestep_value
        s = seed if seed is not None else seed_value
        _STEP[backend](sample, model_output, uncond_output, noise, out, alphas_cumprod, t, pt, s,
                       method, prediction, eta, clip_range, guidance_scale)
        return out
    return run


diffusion_step_op = KernelOp(
    "diffusion_step",
    "(Tensor sample, Tensor model_output, Tensor? uncond_output, Tensor? noise, "
    "Tensor alphas_cumprod, Tensor? timestep, int timestep_value, Tensor? prev_timestep, "
    "int prev_timestep_value, Tensor? seed, int? seed_value, int method, int prediction, "
    "float eta, float? clip_range, float? guidance_scale, str backend) -> Tensor",
    {b: _step_impl(b) for b in _STEP},
    lambda sample, *rest: torch.empty_like(sample),
)


def _randn_impl(backend):
    def run(like, seed, seed_value):
        out = _alloc.empty(like.shape, like.dtype, like.device)
        if out.numel():
            _RANDN[backend](out, seed if seed is not None else seed_value)
        return out
    return run


seeded_randn_op = KernelOp(
    "seeded_randn", "(Tensor like, Tensor? seed, int seed_value, str backend) -> Tensor",
    {b: _randn_impl(b) for b in _RANDN},
    lambda like, seed, seed_value, backend: like.new_empty(like.shape),
)


# ---------------------------------------------------------------------------------------------
# Argument checks (before any launch) and backend capabilities.

def _check_tensor(name: str, t, sample: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"dlh.diffusion_step: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.shape != sample.shape:
        raise ValueError(f"dlh.diffusion_step: {name} must have the shape of sample "
                         f"{list(sample.shape)}, got {list(t.shape)}")
    if t.device != sample.device:
        raise ValueError(f"dlh.diffusion_step: {name} is on {t.device} but sample is on {sample.device}")
    if t.dtype != sample.dtype:
        raise TypeError(f"dlh.diffusion_step: {name} dtype {t.dtype} must equal sample dtype {sample.dtype}")


def _check_timestep(name: str, t, sample: torch.Tensor, n_table: int, prev: bool):
    """An int (checked here) or an integer tensor on the device with 1 or batch elements."""
    if isinstance(t, bool) or not isinstance(t, (int, torch.Tensor)):
        raise TypeError(f"dlh.diffusion_step: {name} must be an int or an integer tensor, "
                        f"got {type(t).__name__}")
    if isinstance(t, int):
        low = -(1 << 62) if prev else 0
        if not low <= t < n_table:
            what = "< len(alphas_cumprod)" if prev else "in [0, len(alphas_cumprod))"
            raise ValueError(f"dlh.diffusion_step: {name} must be {what} = {n_table}, got {t}")
        return t
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise TypeError(f"dlh.diffusion_step: {name} must be an integer tensor, got {t.dtype}")
    if t.device != sample.device:
        raise ValueError(f"dlh.diffusion_step: {name} is on {t.device} but sample is on {sample.device}")
    batch = sample.shape[0] if sample.dim() else 1
    if t.dim() > 1 or t.numel() not in (1, batch):
        raise ValueError(f"dlh.diffusion_step: {name} must have 1 element or one per batch element "
                         f"({batch}), got shape {list(t.shape)}")
    return t


def _check_seed(seed, sample: torch.Tensor):
    if seed is None:
        return None
    if isinstance(seed, bool) or not isinstance(seed, (int, torch.Tensor)):
        raise TypeError(f"dlh.diffusion_step: seed must be an int or an integer tensor, got {type(seed).__name__}")
    if isinstance(seed, int):
        if not 0 <= seed < _SEED_LIMIT:
            raise ValueError(f"dlh.diffusion_step: seed must be in [0, 2^63), got {seed}")
        return seed
    if seed.is_floating_point() or seed.is_complex() or seed.dtype == torch.bool or seed.numel() != 1:
        raise ValueError(f"dlh.diffusion_step: a seed tensor must hold one integer, got {seed.dtype} "
                         f"of shape {list(seed.shape)}")
    if seed.device != sample.device:
        raise ValueError(f"dlh.diffusion_step: seed is on {seed.device} but sample is on {sample.device}")
    return seed


def _check_step(sample, model_output, timestep, prev_timestep, alphas_cumprod, method, eta,
                prediction_type, clip_sample, guidance_scale, uncond_output, noise, seed):
    """Everything checked on the host; returns the op's resolved arguments."""
    if not isinstance(sample, torch.Tensor):
        raise TypeError(f"dlh.diffusion_step: sample must be a torch.Tensor, got {type(sample).__name__}")
    if not sample.is_floating_point():
        raise TypeError(f"dlh.diffusion_step: sample must be a floating-point tensor, got {sample.dtype}")
    _check_tensor("model_output", model_output, sample)
    if not isinstance(alphas_cumprod, torch.Tensor) or alphas_cumprod.dim() != 1 or alphas_cumprod.numel() == 0:
        raise ValueError("dlh.diffusion_step: alphas_cumprod must be a non-empty 1-D tensor, got "
                         f"{getattr(alphas_cumprod, 'shape', type(alphas_cumprod).__name__)}")
    if not alphas_cumprod.is_floating_point():
        raise TypeError(f"dlh.diffusion_step: alphas_cumprod must be floating point, got {alphas_cumprod.dtype}")
    if alphas_cumprod.device != sample.device:
        raise ValueError(f"dlh.diffusion_step: alphas_cumprod is on {alphas_cumprod.device} but sample is "
                         f"on {sample.device} (keep the table on the device: no copy per step)")
    if method not in METHODS:
        raise ValueError(f"dlh.diffusion_step: method must be one of {list(METHODS)}, got {method!r}")
    if prediction_type not in PREDICTIONS:
        raise ValueError(f"dlh.diffusion_step: prediction_type must be one of {list(PREDICTIONS)}, "
                         f"got {prediction_type!r}")
    if not isinstance(eta, (int, float)) or isinstance(eta, bool) or not eta >= 0 or math.isinf(eta):
        raise ValueError(f"dlh.diffusion_step: eta must be a finite number >= 0, got {eta!r}")
    if method == "ddpm" and eta != 0:
        raise ValueError("dlh.diffusion_step: eta applies to method='ddim' only (DDPM's variance is fixed)")
    if clip_sample is None or clip_sample is False:
        clip = None
    elif clip_sample is True:
        clip = 1.0
    elif isinstance(clip_sample, (int, float)) and clip_sample > 0:
        clip = float(clip_sample)
    else:
        raise ValueError(f"dlh.diffusion_step: clip_sample must be None, a bool or a positive range, "
                         f"got {clip_sample!r}")
    if guidance_scale is not None:
        if not isinstance(guidance_scale, (int, float)) or isinstance(guidance_scale, bool):
            raise TypeError(f"dlh.diffusion_step: guidance_scale must be a number or None, got {guidance_scale!r}")
        if uncond_output is None:
            raise ValueError("dlh.diffusion_step: guidance_scale needs uncond_output (the unconditional prediction)")
        _check_tensor("uncond_output", uncond_output, sample)
        guidance_scale = float(guidance_scale)
    elif uncond_output is not None:
        raise ValueError("dlh.diffusion_step: uncond_output is given but guidance_scale is None")
    n = alphas_cumprod.shape[0]
    t = _check_timestep("timestep", timestep, sample, n, prev=False)
    pt = _check_timestep("prev_timestep", prev_timestep, sample, n, prev=True)
    seed = _check_seed(seed, sample)
    if noise is not None:
        if seed is not None:
            raise ValueError("dlh.diffusion_step: pass noise or seed, not both")
        _check_tensor("noise", noise, sample)
    # Does this step add noise at all? DDPM where t > 0, DDIM where eta > 0.
    needs_noise = eta > 0 if method == "ddim" else not (isinstance(t, int) and t == 0)
    if not needs_noise:
        noise = seed = None
    elif noise is None and seed is None:
        seed = int(torch.randint(0, 1 << 62, (), dtype=torch.int64))  # CPU generator: no sync
    return t, pt, seed, noise, clip, guidance_scale


def _supports(sample, alphas_cumprod=None):
    def can(backend: str):
        why = _backend.dtype_reason(backend, sample.dtype, "tensors")
        if why or backend == "torch":
            return why
        if alphas_cumprod is not None and alphas_cumprod.dtype not in _TABLE_DTYPES:
            return f"the {backend} kernel takes a float32/float64 alphas_cumprod, not {alphas_cumprod.dtype}"
        if backend == "cuda" and _ext.load_error() is None and not hasattr(_ext.ext(), "diffusion_step"):
            return "the built extension predates diffusion_step: reinstall to rebuild it"
        return None
    return can


# ---------------------------------------------------------------------------------------------
# Public function (exported by dlh_kernels.functional) and the sampler's entry.

def _detached(t):
    return t.detach() if isinstance(t, torch.Tensor) and t.requires_grad else t


def _as_int64(t):
    """Timestep and seed tensors go to the kernels as int64 (a device-side cast, no sync)."""
    if isinstance(t, torch.Tensor) and t.dtype != torch.int64:
        return t.to(torch.int64)
    return t


def _run_step(be, sample, model_output, uncond_output, noise, alphas_cumprod, t, pt, seed,
              method: int, prediction: int, eta, clip, guidance):
    tt, pp, ss = _as_int64(t), _as_int64(pt), _as_int64(seed)
    return diffusion_step_op(
        _detached(sample), _detached(model_output), _detached(uncond_output), _detached(noise),
        alphas_cumprod.detach(),
        tt if isinstance(tt, torch.Tensor) else None, tt if isinstance(tt, int) else 0,
        pp if isinstance(pp, torch.Tensor) else None, pp if isinstance(pp, int) else 0,
        ss if isinstance(ss, torch.Tensor) else None, ss if isinstance(ss, int) else None,
        method, prediction, float(eta), clip, guidance, be)


def diffusion_step(sample: torch.Tensor, model_output: torch.Tensor, timestep: Timestep,
                   prev_timestep: Timestep, alphas_cumprod: torch.Tensor, *, method: str = "ddpm",
                   eta: float = 0.0, prediction_type: str = "epsilon", clip_sample=None,
                   guidance_scale: Optional[float] = None, uncond_output: Optional[torch.Tensor] = None,
                   noise: Optional[torch.Tensor] = None, seed: Union[int, torch.Tensor, None] = None,
                   backend: Optional[str] = None) -> torch.Tensor:
    """One reverse diffusion step: diffusers' ``DDPMScheduler.step`` (fixed_small variance) or
    ``DDIMScheduler.step``, returning x_prev in sample's dtype (see this module's docstring)."""
    t, pt, seed, noise, clip, guidance = _check_step(
        sample, model_output, timestep, prev_timestep, alphas_cumprod, method, eta,
        prediction_type, clip_sample, guidance_scale, uncond_output, noise, seed)
    be = _backend.choose("diffusion_step", backend, sample.device.type,
                         _supports(sample, alphas_cumprod), AUTO_ORDER)
    return _run_step(be, sample, model_output, uncond_output if guidance is not None else None,
                     noise, alphas_cumprod, t, pt, seed, METHODS[method],
                     PREDICTIONS[prediction_type], eta, clip, guidance)


def interp_step(sample, model_output, step: int, prev_step: int, times: torch.Tensor, *,
                prediction_type: str = "sample", clip_sample=None, guidance_scale=None,
                uncond_output=None, backend: Optional[str] = None) -> torch.Tensor:
    """The sampler's linear-interpolation step (not public API): ``times`` is the table of
    interpolation times s_k on the device; x_prev = (s_p/s) x + (1 - s_p/s) x0, s_p = 0 when
    prev_step < 0. Checked like diffusion_step, run by the same kernels."""
    t, pt, _, _, clip, guidance = _check_step(
        sample, model_output, step, prev_step, times, "ddim", 0.0, prediction_type, clip_sample,
        guidance_scale, uncond_output, None, None)
    be = _backend.choose("diffusion_step", backend, sample.device.type, _supports(sample, times), AUTO_ORDER)
    return _run_step(be, sample, model_output, uncond_output if guidance is not None else None,
                     None, times, t, pt, None, _INTERP, PREDICTIONS[prediction_type], 0.0, clip, guidance)


def seeded_randn(like: torch.Tensor, seed: Union[int, torch.Tensor], *,
                 backend: Optional[str] = None) -> torch.Tensor:
    """A tensor like ``like`` (shape, dtype, device) of the step's noise stream for ``seed``:
    element i (row-major) is tl.randn(seed, i), as the step draws it. In-graph when ``seed``
    is a device tensor."""
    seed = _check_seed(seed, like)
    if seed is None:
        raise ValueError("dlh.seeded_randn: seed is required")
    be = _backend.choose("seeded_randn", backend, like.device.type, _supports(like), AUTO_ORDER)
    s = _as_int64(seed)
    return seeded_randn_op(like.detach(), s if isinstance(s, torch.Tensor) else None,
                           s if isinstance(s, int) else 0, be)


def explain(op: str, args: dict) -> dict:
    """Per backend, "ok" or why it would not run this call; and what `auto` picks."""
    sample, table = args["sample"], args["alphas_cumprod"]
    _check_step(sample, args["model_output"], args["timestep"], args["prev_timestep"], table,
                args["method"], args["eta"], args["prediction_type"], args["clip_sample"],
                args["guidance_scale"], args["uncond_output"], args["noise"], args["seed"])
    return _backend.explain_choice(sample.device.type, _supports(sample, table), AUTO_ORDER)
