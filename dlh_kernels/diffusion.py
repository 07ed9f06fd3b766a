"""Diffusion sampling with the fused step kernel: no host sync per step, one CUDA graph if asked.

    import dlh_kernels.diffusion as diffusion
    x = diffusion.sample(model, (8, 3, 32, 32), steps=50, method="ddim", seed=0)
    sampler = diffusion.Sampler(model, (8, 3, 32, 32), 50, "ddim", cuda_graph=True)
    x1, x2 = sampler(seed=1), sampler(seed=2)     # the second call replays one graph

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
