"""Diffusion sampling with the fused step kernel: no host sync per step, one CUDA graph if asked.

    import dlh_kernels.diffusion as diffusion
    x = diffusion.sample(model, (8, 3, 32, 32), steps=50, method="ddim", seed=0)
    sampler = diffusion.Sampler(model, (8, 3, 32, 32), 50, "ddim", cuda_graph=True)
    x1, x2 = sampler(seed=1), sampler(seed=2)     # the second call replays one graph
    pipe.scheduler = diffusion.DDIMScheduler.from_config(pipe.scheduler.config)  # diffusers

The diffusers drop-ins (DDPMScheduler, DDIMScheduler) are described in the last section below.

Methods:
- ``"ddpm"``, ``"ddim"``: diffusers' DDPMScheduler / DDIMScheduler loops ("leading" timestep
  spacing, steps_offset 0, final alpha_cumprod 1): the model is called as ``model(x, t)`` with
  ``t`` an int64 tensor of shape (batch,) on the device, and predicts ``prediction_type``.
- ``"interp"``: the seed project's own scheme, in our reading (DESIGN.md names it without
  details): a linear interpolation between image and noise, ``x_t = (1 - t) x0 + t noise``, on
  the times ``t_k = 1 - k / steps`` (k = 0..steps; 16 steps by default). The model is called as
  ``model(x_k, t)`` with ``t`` a float32 tensor (batch,) holding t_k, and predicts the clean
  image (``prediction_type="sample"``, the default); the next, less noisy image is
  ``x_{k+1} = (1 - t_{k+1}) x0_hat + t_{k+1} noise_hat`` with ``noise_hat = (x_k - (1 - t_k)
  x0_hat) / t_k``, i.e. ``(t_{k+1}/t_k) x_k + (1 - t_{k+1}/t_k) x0_hat``: one launch of the step
  kernel. ``prediction_type="next"`` is the literal reading instead: the model's output *is*
  x_{k+1} (no step kernel at all). "epsilon" (the model predicts the noise) and
  "v_prediction" (the velocity noise - x0) are accepted too.

Guidance: with ``guidance_scale``, ``model(x, t)`` returns ``(cond, uncond)`` and the step fuses
``uncond + w * (cond - uncond)``.

Noise: every random number comes from the step's Philox stream (see
dlh_kernels.ops.diffusion_step): the initial x_T from ``seeded_randn`` and each step's from the
kernel, keyed by per-step seeds that are derived on the host from ``seed`` (splitmix64) and
uploaded once per call into a device tensor the kernels read. So a call does one small
host-to-device copy before the loop and no host sync at all, and a captured graph replays with
a new seed.

Host cost per step: the arguments are checked and the backend chosen once, when the Sampler is
built (``backend``, or the default in force then); each step then calls the backend's kernel
launch directly, after checking only that the model's output has the sample's shape, dtype and
device (anything else goes through ``DF.diffusion_step``, which says what is wrong).

CUDA graphs (``cuda_graph=True``, CUDA tensors only): the first call warms up once on a side
stream (Triton compiles, cuBLAS/cuDNN pick their kernels), then captures the whole loop, model
and steps, in one graph; every call replays it. The model must be capturable (static shapes, no
host syncs, no CPU tensors created per call); a model that is not makes the capture fail with
PyTorch's error. The result is a copy of the graph's output buffer.
"""
from __future__ import annotations

import math
import operator
import warnings
from typing import Callable, Optional, Sequence

import torch

from . import _alloc, _backend, profiling
from .ops import diffusion_step as _ops

METHODS = ("ddpm", "ddim", "interp")
_MASK64 = (1 << 64) - 1


def linear_alphas_cumprod(num_train_timesteps: int = 1000, beta_start: float = 1e-4,
                          beta_end: float = 0.02, device=None) -> torch.Tensor:
    """alphas_cumprod of the DDPM paper's linear beta schedule, float32, as diffusers builds it."""
    betas = torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float32)
    return torch.cumprod(1.0 - betas, dim=0).to(device)


def interp_times(steps: int, device=None) -> torch.Tensor:
    """t_k = 1 - k/steps for k = 0..steps-1 (t_steps = 0 is the step after the last), float32."""
    return (1.0 - torch.arange(steps, dtype=torch.float64) / steps).to(torch.float32).to(device)


def schedule(method: str, steps: int, num_train_timesteps: int = 1000) -> list[tuple[int, int]]:
    """[(timestep, prev_timestep)] of the loop; prev < 0 marks the last step.

    ddpm/ddim: diffusers' "leading" spacing, t = (steps - 1 - i) * (T // steps), prev = t - T // steps.
    interp: the indices of interp_times, (k, k + 1).
    """
    if method == "interp":
        return [(k, k + 1 if k + 1 < steps else -1) for k in range(steps)]
    if not 1 <= steps <= num_train_timesteps:
        raise ValueError(f"dlh.diffusion: steps must be in [1, {num_train_timesteps}], got {steps}")
    ratio = num_train_timesteps // steps
    return [((steps - 1 - i) * ratio, (steps - 1 - i) * ratio - ratio) for i in range(steps)]


def step_seeds(seed: int, count: int) -> list[int]:
    """`count` seeds in [0, 2^63) from one: splitmix64, so that streams never overlap by a shift."""
    state, out = seed & _MASK64, []
    for _ in range(count):
        state = (state + 0x9E3779B97F4A7C15) & _MASK64
        z = state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
        out.append((z ^ (z >> 31)) >> 1)
    return out


class Sampler:
    """The reverse process for one model, shape and schedule; call it with a seed.

    model:           ``model(x, t)`` -> prediction, or (cond, uncond) with ``guidance_scale``
    shape:           the sample's shape, batch first
    steps, method:   see the module docstring ("ddpm", "ddim", "interp")
    alphas_cumprod:  ddpm/ddim table (default: the linear schedule of num_train_timesteps)
    eta:             DDIM's eta (0: deterministic)
    prediction_type: "epsilon" (ddpm/ddim default), "v_prediction", "sample" (interp default),
                     "next" (interp only: the model returns x_{k+1} itself)
    clip_sample:     None, True ([-1, 1]) or a range for the predicted x0
    backend:         the step's backend (None: the current default)
    cuda_graph:      capture the whole loop in one CUDA graph (CUDA only)
    """

    def __init__(self, model: Callable, shape: Sequence[int], steps: int = 50, method: str = "ddim", *,
                 alphas_cumprod: Optional[torch.Tensor] = None, num_train_timesteps: int = 1000,
                 eta: float = 0.0, prediction_type: Optional[str] = None, clip_sample=None,
                 guidance_scale: Optional[float] = None, device=None, dtype: torch.dtype = torch.float32,
                 backend: Optional[str] = None, cuda_graph: bool = False):
        if method not in METHODS:
            raise ValueError(f"dlh.diffusion: method must be one of {METHODS}, got {method!r}")
        if prediction_type is None:
            prediction_type = "sample" if method == "interp" else "epsilon"
        allowed = tuple(_ops.PREDICTIONS) + (("next",) if method == "interp" else ())
        if prediction_type not in allowed:
            raise ValueError(f"dlh.diffusion: prediction_type for {method!r} must be one of {allowed}, "
                             f"got {prediction_type!r}")
        if method != "ddim" and eta != 0:
            raise ValueError("dlh.diffusion: eta applies to method='ddim' only")
        if not isinstance(steps, int) or steps < 1:
            raise ValueError(f"dlh.diffusion: steps must be a positive int, got {steps!r}")
        self.device = torch.device(device) if device is not None else (
            alphas_cumprod.device if alphas_cumprod is not None else torch.device("cpu"))
        if cuda_graph and self.device.type != "cuda":
            raise ValueError(f"dlh.diffusion: cuda_graph=True needs a CUDA device, got {self.device}")
        self.model, self.shape, self.steps, self.method = model, tuple(shape), steps, method
        self.eta, self.prediction_type, self.clip_sample = float(eta), prediction_type, clip_sample
        self.guidance_scale, self.dtype, self.backend, self.cuda_graph = guidance_scale, dtype, backend, cuda_graph
        batch = self.shape[0]
        if method == "interp":
            times = interp_times(steps)  # on the host: the model's t needs no read-back
            self.table = times.to(self.device)
            self.schedule = schedule(method, steps)
            self._model_t = times.repeat_interleave(batch).view(steps, batch)
        else:
            if alphas_cumprod is None:
                alphas_cumprod = linear_alphas_cumprod(num_train_timesteps)
            self.table = alphas_cumprod.to(self.device)
            self.schedule = schedule(method, steps, self.table.shape[0])
            self._model_t = torch.tensor([t for t, _ in self.schedule], dtype=torch.int64
                                         ).repeat_interleave(batch).view(steps, batch)
        self._model_t = self._model_t.to(self.device)
        # Which steps draw noise: DDPM where t > 0, DDIM where eta > 0.
        self._noisy = [(method == "ddpm" and t > 0) or (method == "ddim" and self.eta > 0)
                       for t, _ in self.schedule]
        self._seeds = torch.zeros(steps + 1, dtype=torch.int64, device=self.device)
        self._x_like = torch.empty(self.shape, dtype=dtype, device=self.device)
        self._graphs: dict[bool, tuple] = {}  # noise given? -> (graph, input buffer, output)
        # views made once: indexing a tensor costs the host a microsecond or two per step
        self._step_seed = [self._seeds[k + 1] if noisy else None for k, noisy in enumerate(self._noisy)]
        self._step_t = list(self._model_t.unbind(0))
        self._resolve()

    def _resolve(self) -> None:
        """Check every step's arguments once and pick the backend: the per-step fast path."""
        like = self._x_like
        uncond = like if self.guidance_scale is not None else None
        method = "ddim" if self.method == "interp" else self.method
        for k, (t, prev) in enumerate(self.schedule):
            _, _, _, _, clip, guidance = _ops._check_step(
                like, like, t, prev, self.table, method, self.eta,
                "sample" if self.prediction_type == "next" else self.prediction_type,
                self.clip_sample, self.guidance_scale, uncond, None, self._step_seed[k])
        self._clip, self._guidance = clip, guidance
        self._method_code = _ops._INTERP if self.method == "interp" else _ops.METHODS[self.method]
        self._pred_code = _ops.PREDICTIONS.get(self.prediction_type, 0)
        self._backend_name = _backend.choose("diffusion_step", self.backend, like.device.type,
                                             _ops._supports(like, self.table), _ops.AUTO_ORDER)
        self._impl = _ops._STEP[self._backend_name]

    # ---- the loop ------------------------------------------------------------------------------
    def _step(self, k: int, x: torch.Tensor) -> torch.Tensor:
        t, prev = self.schedule[k]
        out = self.model(x, self._step_t[k])
        cond, uncond = out if self.guidance_scale is not None else (out, None)
        if self.prediction_type == "next":
            return cond.to(self.dtype)
        if self._fits(cond, x) and (uncond is None or self._fits(uncond, x)):
            out = _alloc.empty_like(x)
            args = (x, cond, uncond, None, out, self.table, t, prev, self._step_seed[k], self._method_code,
                    self._pred_code, self.eta, self._clip, self._guidance)
            if profiling._enabled:
                with profiling.op_range(f"dlh::diffusion_step[{self._backend_name}]"):
                    self._impl(*args)
            else:
                self._impl(*args)
            return out
        common = dict(prediction_type=self.prediction_type, clip_sample=self.clip_sample,
                      guidance_scale=self.guidance_scale, uncond_output=uncond,
                      backend=self._backend_name)
        if self.method == "interp":
            return _ops.interp_step(x, cond, t, prev, self.table, **common)
        return _ops.diffusion_step(x, cond, t, prev, self.table, method=self.method, eta=self.eta,
                                   seed=self._step_seed[k], **common)

    @staticmethod
    def _fits(t, x) -> bool:
        return (type(t) is torch.Tensor and t.shape == x.shape and t.dtype == x.dtype
                and t.device == x.device)

    def _loop(self, x_init: Optional[torch.Tensor]) -> torch.Tensor:
        """x_T (given, or drawn from the first seed), then every step. No host sync."""
        if x_init is None:
            x = _ops.seeded_randn(self._x_like, self._seeds[0], backend=self._backend_name)
        else:
            x = x_init
        for k in range(self.steps):
            x = self._step(k, x)
        return x

    def _upload_seeds(self, seed: int) -> None:
        seeds = torch.tensor(step_seeds(seed, self.steps + 1), dtype=torch.int64)
        if self.device.type == "cuda":  # pinned + non_blocking: a copy on the stream, no sync
            self._seeds.copy_(seeds.pin_memory(), non_blocking=True)
        else:
            self._seeds.copy_(seeds)

    def __call__(self, seed: int = 0, noise: Optional[torch.Tensor] = None) -> torch.Tensor:
        """One sample batch. seed: an int >= 0; noise: x_T itself (else drawn from seed)."""
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"dlh.diffusion: seed must be an int >= 0, got {seed!r}")
        if noise is not None and (tuple(noise.shape) != self.shape or noise.device != self.device):
            raise ValueError(f"dlh.diffusion: noise must have shape {list(self.shape)} on {self.device}, "
                             f"got {list(noise.shape)} on {noise.device}")
        self._upload_seeds(seed)
        with torch.no_grad():
            if not self.cuda_graph:
                return self._loop(None if noise is None else noise.to(self.dtype))
            return self._replay(noise)

    # ---- CUDA graph ----------------------------------------------------------------------------
    def _replay(self, noise: Optional[torch.Tensor]) -> torch.Tensor:
        given = noise is not None
        if given not in self._graphs:
            self._graphs[given] = self._capture(given)
        graph, x_in, x_out = self._graphs[given]
        if given:
            x_in.copy_(noise)
        graph.replay()
        return x_out.clone()

    def _capture(self, given: bool):
        x_in = torch.zeros(self.shape, dtype=self.dtype, device=self.device) if given else None
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):  # warm-up: compiles, library handles, autotuning
            self._loop(x_in)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            x_out = self._loop(x_in)
        return graph, x_in, x_out


def sample(model: Callable, shape: Sequence[int], steps: int = 50, method: str = "ddim", *,
           seed: int = 0, noise: Optional[torch.Tensor] = None, **kwargs) -> torch.Tensor:
    """``Sampler(model, shape, steps, method, **kwargs)(seed, noise)``: one batch of samples."""
    return Sampler(model, shape, steps, method, **kwargs)(seed=seed, noise=noise)


# ---------------------------------------------------------------------------------------------
# diffusers scheduler drop-ins: DDPMScheduler / DDIMScheduler whose `step` is the fused kernel.
#
#     pipe = diffusers.DDIMPipeline.from_pretrained(...)
#     pipe.scheduler = dlh_kernels.diffusion.DDIMScheduler.from_config(pipe.scheduler.config)
#
# (after the pipeline is built: DDIMPipeline's __init__ converts any scheduler it is given to
# diffusers' own DDIMScheduler).
#
# Subclasses of diffusers' own classes (same config, set_timesteps, add_noise, save/load; a
# saved config still names diffusers' class), built on first access through the module's
# __getattr__: importing this module never imports diffusers.
#
# `step` takes diffusers' arguments and returns diffusers' output (DDPMSchedulerOutput /
# DDIMSchedulerOutput, or a tuple with return_dict=False). It launches DF.diffusion_step twice:
# x_prev, and pred_original_sample as a DDIM step to prev < 0 with eta = 0, which is x0 itself
# (sqrt(1) x0 + 0 eps). `dlh_pred_original_sample = False` skips the second launch and returns
# pred_original_sample=None (the pipelines read prev_sample only). DDIM with
# use_clipped_model_output=True runs x0 first, then the step with x0 as a "sample" prediction:
# that re-derives eps from the clipped x0 exactly as diffusers does.
#
# Noise: drawn with diffusers' randn_tensor (same shape, generator, dtype and device, at the
# same point: DDPM where t > 0, DDIM where eta > 0; DDIM's variance_noise used as given) and
# handed to the kernel, so a pipeline given a generator produces diffusers' samples.
#
# Timesteps: an int, or a one-element integer tensor. On the host (an int, a CPU tensor, as
# the DDPM/DDIM pipelines pass from scheduler.timesteps) it is read as an int. On the device
# (pipelines that call set_timesteps(device=...)) it stays there: the kernel reads it, and the
# previous timestep is computed on the device (DDIM: t - T // steps; DDPM: a lookup table built
# by set_timesteps), so no step syncs. Then DDPM draws its noise at every step, t = 0 included
# (the kernel adds none there: the samples are diffusers', the generator ends one draw further).
# DDIM's final step (prev < 0) uses final_alpha_cumprod: 1 (set_alpha_to_one) is the kernel's
# own final step, alphas_cumprod[0] is prev = 0.
#
# Fallback: what the kernel does not implement runs diffusers' own step: DDPM variance_type
# other than "fixed_small" (learned variances with 2x channels included), thresholding=True,
# clip_sample_range <= 0, an unknown prediction_type, a model_output of another shape, dtype or
# device than sample, a timestep that is not one integer on the host or the sample's device,
# an int timestep outside the table or (DDPM) outside scheduler.timesteps, DDIM eta < 0 or not
# a number, a variance_noise not like sample, a final_alpha_cumprod edited to another value.
# `scheduler.dlh_fallback_reason` says why the last step fell back (None: it ran fused), and
# a FallbackWarning is issued once per scheduler and reason. An unavailable backend asked for
# by `dlh_backend` (None: the default backend) raises, as everywhere in dlh_kernels.
#
# The alphas_cumprod table is copied to the sample's device once and cached (refreshed if
# alphas_cumprod is replaced, as add_noise does when it moves it).

_SCHEDULER_NAMES = ("DDPMScheduler", "DDIMScheduler")


class FallbackWarning(UserWarning):
    """A dlh_kernels scheduler ran diffusers' own step (the reason is in the message)."""


def _on_host(timestep: torch.Tensor) -> bool:
    """Is this timestep tensor in host memory (read as an int at no cost)? Else the kernel
    reads it on the device. (The tests patch this to run the device path on CPU tensors.)"""
    return timestep.device.type == "cpu"


def _host_timestep(timestep) -> Optional[int]:
    """The timestep as an int when the host holds it (an int, a CPU tensor: no sync); None for
    a device tensor, which the kernel reads where it is."""
    if isinstance(timestep, torch.Tensor):
        return int(timestep) if _on_host(timestep) else None
    return operator.index(timestep)


def _timestep_problem(timestep, sample: torch.Tensor, n_table: int) -> Optional[str]:
    if isinstance(timestep, torch.Tensor):
        if timestep.numel() != 1 or timestep.is_floating_point() or timestep.is_complex() \
                or timestep.dtype == torch.bool:
            return (f"timestep must hold one integer, got {timestep.dtype} of shape "
                    f"{list(timestep.shape)}")
        if not _on_host(timestep):
            if timestep.device != sample.device:
                return f"timestep is on {timestep.device} but sample is on {sample.device}"
            return None
        value = int(timestep)
    else:
        try:
            value = operator.index(timestep)
        except TypeError:
            return f"timestep must be an integer, got {type(timestep).__name__}"
    if not 0 <= value < n_table:
        return f"timestep {value} is outside alphas_cumprod (length {n_table})"
    return None


class _FusedStep:
    """What both schedulers share: the cached table, the checks, the fallback record, x0."""

    dlh_backend: Optional[str] = None  # the kernel's backend; None: dlh_kernels' default
    dlh_pred_original_sample = True    # False: skip the x0 launch, pred_original_sample=None
    dlh_fallback_reason: Optional[str] = None  # why the last step ran diffusers' step

    def _dlh_table(self, device: torch.device) -> torch.Tensor:
        source = self.alphas_cumprod
        cache = self.__dict__.get("_dlh_tables")
        if cache is None or cache[0] is not source:
            cache = self._dlh_tables = (source, {})
        table = cache[1].get(device)
        if table is None:
            table = cache[1][device] = source.to(device)
        return table

    def _dlh_problem(self, model_output, timestep, sample) -> Optional[str]:
        config = self.config
        if config.thresholding:
            return "thresholding=True (dynamic thresholding of x0) is not in the fused kernel"
        if config.prediction_type not in _ops.PREDICTIONS:
            return f"prediction_type={config.prediction_type!r} is not one of {list(_ops.PREDICTIONS)}"
        if config.clip_sample and not config.clip_sample_range > 0:
            return f"clip_sample_range={config.clip_sample_range!r} is not > 0"
        if not isinstance(sample, torch.Tensor) or not sample.is_floating_point():
            return "sample is not a floating-point tensor"
        if not isinstance(model_output, torch.Tensor) or (model_output.shape, model_output.dtype,
                                                          model_output.device) != (
                sample.shape, sample.dtype, sample.device):
            what = (f"{list(model_output.shape)} {model_output.dtype} on {model_output.device}"
                    if isinstance(model_output, torch.Tensor) else type(model_output).__name__)
            return (f"model_output ({what}) is not like sample ({list(sample.shape)} "
                    f"{sample.dtype} on {sample.device})")
        return _timestep_problem(timestep, sample, self.alphas_cumprod.shape[0])

    def _dlh_fall_back(self, reason: str) -> None:
        self.dlh_fallback_reason = reason
        warned = self.__dict__.setdefault("_dlh_warned", set())
        if reason not in warned:
            warned.add(reason)
            warnings.warn(f"dlh_kernels.diffusion.{type(self).__name__}: {reason}; running "
                          f"diffusers' own step", FallbackWarning, stacklevel=3)

    def _dlh_clip(self):
        return self.config.clip_sample_range if self.config.clip_sample else None

    def _dlh_x0(self, sample, model_output, t, table) -> torch.Tensor:
        """The (clipped) predicted x0: a DDIM step to "before x_0" (alpha_cumprod_prev = 1) with
        eta = 0 is sqrt(1) x0 + 0 eps."""
        return _ops.diffusion_step(sample, model_output, t, -1, table, method="ddim",
                                   prediction_type=self.config.prediction_type,
                                   clip_sample=self._dlh_clip(), backend=self.dlh_backend)

    def _dlh_output(self, prev_sample, x0, return_dict: bool):
        if not return_dict:
            return prev_sample, x0
        return self._dlh_output_class(prev_sample=prev_sample, pred_original_sample=x0)


class _FusedDDPM(_FusedStep):
    def set_timesteps(self, num_inference_steps=None, device=None, timesteps=None):
        # Timesteps made on the host (as diffusers does, before its .to(device)), so the map
        # t -> previous t is built without reading anything back from the device.
        super().set_timesteps(num_inference_steps, None, timesteps)
        host = self.timesteps
        if device is not None:
            self.timesteps = host.to(device)
        self._dlh_prev = (self.timesteps, _previous_map(host.tolist()), {})

    def _dlh_prev_lookup(self):
        """(t -> previous t, {device: table}) for the current self.timesteps."""
        cache = self.__dict__.get("_dlh_prev")
        if cache is None or cache[0] is not self.timesteps:  # timesteps set from outside
            cache = self._dlh_prev = (self.timesteps, _previous_map(self.timesteps.tolist()), {})
        return cache[1], cache[2]

    def _dlh_uses_timesteps(self) -> bool:
        return bool(self.custom_timesteps or self.num_inference_steps)  # diffusers' rule

    def _dlh_prev_on_device(self, t: torch.Tensor) -> torch.Tensor:
        t = t.reshape(1).to(torch.int64)
        if not self._dlh_uses_timesteps():
            return t - 1
        previous, tables = self._dlh_prev_lookup()
        table = tables.get(t.device)
        if table is None:
            n = self.alphas_cumprod.shape[0]
            host = torch.full((n,), n, dtype=torch.int64)  # n: not a timestep -> the kernel writes NaN
            for cur, prev in previous.items():
                if 0 <= cur < n:
                    host[cur] = prev
            table = tables[t.device] = host.to(t.device)
        return table.index_select(0, t)  # not table[t]: a 0-dim index would be read on the host

    def step(self, model_output, timestep, sample, generator=None, return_dict=True):
        problem = None
        if (self.variance_type, self.config.variance_type) != ("fixed_small",) * 2:
            problem = f"variance_type={self.config.variance_type!r} (the kernel has fixed_small only)"
        problem = problem or self._dlh_problem(model_output, timestep, sample)
        t = prev = None
        if problem is None:
            t = _host_timestep(timestep)
            if t is not None:
                if not self._dlh_uses_timesteps():
                    prev = t - 1
                else:
                    prev = self._dlh_prev_lookup()[0].get(t)
                    if prev is None:
                        problem = f"timestep {t} is not in scheduler.timesteps"
        if problem is not None:
            self._dlh_fall_back(problem)
            return super().step(model_output, timestep, sample, generator=generator,
                                return_dict=return_dict)
        self.dlh_fallback_reason = None
        table = self._dlh_table(sample.device)
        if t is None:  # on the device: no host decision on t > 0, the kernel masks t == 0
            t, prev, draws = timestep, self._dlh_prev_on_device(timestep), True
        else:
            draws = t > 0
        noise = None
        if draws:  # diffusers' draw, the same call at the same point
            noise = self._dlh_randn(model_output.shape, generator=generator,
                                    device=model_output.device, dtype=model_output.dtype)
        prev_sample = _ops.diffusion_step(sample, model_output, t, prev, table, method="ddpm",
                                          prediction_type=self.config.prediction_type,
                                          clip_sample=self._dlh_clip(), noise=noise,
                                          backend=self.dlh_backend)
        x0 = self._dlh_x0(sample, model_output, t, table) if self.dlh_pred_original_sample else None
        return self._dlh_output(prev_sample, x0, return_dict)


def _previous_map(timesteps: list) -> dict:
    """diffusers' DDPMScheduler.previous_timestep as a dict: the entry after t's first
    occurrence, -1 after the last."""
    previous = {}
    for i, t in enumerate(timesteps):
        previous.setdefault(t, timesteps[i + 1] if i + 1 < len(timesteps) else -1)
    return previous


class _FusedDDIM(_FusedStep):
    def _dlh_final_prev(self) -> Optional[int]:
        """The prev_timestep that gives the kernel final_alpha_cumprod: -1 for 1.0, 0 for
        alphas_cumprod[0]; None for another value. Read once per (final, table) pair."""
        final, table = self.final_alpha_cumprod, self.alphas_cumprod
        cache = self.__dict__.get("_dlh_final")
        if cache is None or cache[0] is not final or cache[1] is not table:
            value = float(final)
            prev = -1 if value == 1.0 else (0 if value == float(table[0]) else None)
            cache = self._dlh_final = (final, table, prev)
        return cache[2]

    def step(self, model_output, timestep, sample, eta=0.0, use_clipped_model_output=False,
             generator=None, variance_noise=None, return_dict=True):
        if self.num_inference_steps is None:
            raise ValueError("Number of inference steps is 'None', you need to run 'set_timesteps' "
                             "after creating the scheduler")
        problem = self._dlh_problem(model_output, timestep, sample)
        final = self._dlh_final_prev() if problem is None else None
        if problem is not None:
            pass
        elif final is None:
            problem = "final_alpha_cumprod is neither 1 nor alphas_cumprod[0]"
        elif isinstance(eta, bool) or not isinstance(eta, (int, float)) or not 0 <= eta < math.inf:
            problem = f"eta={eta!r} is not a finite number >= 0"
        elif eta > 0 and variance_noise is not None and generator is None and (
                not isinstance(variance_noise, torch.Tensor) or (variance_noise.shape, variance_noise.dtype,
                                                                  variance_noise.device)
                != (sample.shape, sample.dtype, sample.device)):
            problem = "variance_noise is not like sample"
        if problem is not None:
            self._dlh_fall_back(problem)
            return super().step(model_output, timestep, sample, eta=eta,
                                use_clipped_model_output=use_clipped_model_output,
                                generator=generator, variance_noise=variance_noise,
                                return_dict=return_dict)
        self.dlh_fallback_reason = None
        table = self._dlh_table(sample.device)
        ratio = self.config.num_train_timesteps // self.num_inference_steps
        t = _host_timestep(timestep)
        if t is not None:
            prev = t - ratio if t - ratio >= 0 else final
        else:  # on the device
            t = timestep
            prev = t.reshape(1).to(torch.int64) - ratio
            if final == 0:
                prev = prev.clamp_min(0)
        noise = None
        if eta > 0:
            if variance_noise is not None and generator is not None:
                raise ValueError("Cannot pass both generator and variance_noise. Please make sure that "
                                 "either `generator` or `variance_noise` stays `None`.")
            noise = variance_noise if variance_noise is not None else self._dlh_randn(
                model_output.shape, generator=generator, device=model_output.device,
                dtype=model_output.dtype)
        common = dict(method="ddim", eta=float(eta), noise=noise, backend=self.dlh_backend)
        if use_clipped_model_output:  # eps from the clipped x0: x0 as a "sample" prediction
            x0 = self._dlh_x0(sample, model_output, t, table)
            prev_sample = _ops.diffusion_step(sample, x0, t, prev, table, prediction_type="sample", **common)
        else:
            prev_sample = _ops.diffusion_step(sample, model_output, t, prev, table,
                                              prediction_type=self.config.prediction_type,
                                              clip_sample=self._dlh_clip(), **common)
            x0 = self._dlh_x0(sample, model_output, t, table) if self.dlh_pred_original_sample else None
        return self._dlh_output(prev_sample, x0, return_dict)


def _scheduler_classes() -> dict:
    """Build the drop-ins (imports diffusers); called once, on first access."""
    try:
        import diffusers
        from diffusers.schedulers.scheduling_ddim import DDIMSchedulerOutput
        from diffusers.schedulers.scheduling_ddpm import DDPMSchedulerOutput
        from diffusers.utils.torch_utils import randn_tensor
    except ImportError as error:
        raise ImportError("dlh_kernels.diffusion.DDPMScheduler / DDIMScheduler subclass diffusers' "
                          "schedulers: pip install diffusers") from error

    class DDPMScheduler(_FusedDDPM, diffusers.DDPMScheduler):
        """diffusers' DDPMScheduler whose step is dlh's fused kernel (see dlh_kernels.diffusion)."""
        _dlh_output_class = DDPMSchedulerOutput
        _dlh_randn = staticmethod(randn_tensor)

    class DDIMScheduler(_FusedDDIM, diffusers.DDIMScheduler):
        """diffusers' DDIMScheduler whose step is dlh's fused kernel (see dlh_kernels.diffusion)."""
        _dlh_output_class = DDIMSchedulerOutput
        _dlh_randn = staticmethod(randn_tensor)

    classes = {"DDPMScheduler": DDPMScheduler, "DDIMScheduler": DDIMScheduler}
    for name, cls in classes.items():  # picklable as dlh_kernels.diffusion.<name>
        cls.__module__, cls.__qualname__ = __name__, name
    return classes


def __getattr__(name: str):
    if name in _SCHEDULER_NAMES:
        classes = _scheduler_classes()
        globals().update(classes)
        return classes[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
