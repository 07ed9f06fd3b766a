"""Reference models from the history of deep learning, written with plain torch modules so that
``dlh.patch(model)`` is what brings the dlh kernels in. Installed as ``dlh_kernels.models``.

    from dlh_kernels import models
    model = models.build("gpt", small=True)
    batch = models.example_batch("gpt", 8, small=True)
    loss = models.loss("gpt", model, batch)

Every function takes the model's name, one of ``NAMES``. A batch is a dict of tensors:

| model      | batch keys (shapes)                                          | loss |
| ---        | ---                                                          | ---  |
| mlp        | x (B, 2), y (B,) float 0/1                                   | BCE on the logit |
| cnn, vit   | x (B, C, S, S) in [0, 1], y (B,) int64                       | cross-entropy |
| gpt        | idx (B, T) int64, targets (B, T) int64                       | cross-entropy per character |
| gan        | x (B, C, S, S) in [-1, 1], z (B, latent)                     | D loss + G loss of one step |
| vae        | x (B, C, S, S) in [0, 1], eps (B, latent)                    | BCE (summed) + KL, per image |
| quick_unet | x in [-1, 1], t (B,) float in (0, 1], noise like x           | MSE of the predicted clean image |
| ddpm_unet  | x in [-1, 1], t (B,) int64 in [0, timesteps), noise like x   | MSE of the predicted noise |

The random parts (z, eps, t, noise) may be left out of a batch: ``loss`` then draws them from
torch's global generator (training does that); ``example_batch`` includes them so that two
calls on the same batch (eager vs patched) see the same numbers.

GAN: ``loss`` is the discriminator's BCE on (real, G(z) detached) plus the generator's
non-saturating BCE on D(G(z)) labelled real; ``train_step`` takes the two steps in turn (D,
then G) with one optimizer over all parameters, stepping only the network each loss is for.
"""
from __future__ import annotations

import copy
import dataclasses
from typing import Optional

import torch
import torch.nn.functional as F

from . import data
from .cnn import CNN, CNNConfig
from .ddpm_unet import DDPMUNet, DDPMUNetConfig
from .gan import GAN, GANConfig
from .gpt import GPT, GPTConfig
from .mlp import MLP, MLPConfig
from .quick_unet import QuickUNet, QuickUNetConfig
from .vae import VAE, VAEConfig
from .vit import ViT, ViTConfig

NAMES = ("mlp", "cnn", "gpt", "vit", "gan", "vae", "quick_unet", "ddpm_unet")
SAMPLERS = ("gan", "vae", "quick_unet", "ddpm_unet")  # image generators (`sample`)
CLASSIFIERS = ("mlp", "cnn", "vit")  # `predict`; and the GPT generates text (`generate_text`)
_MODELS = {
    "mlp": (MLP, MLPConfig), "cnn": (CNN, CNNConfig), "gpt": (GPT, GPTConfig), "vit": (ViT, ViTConfig),
    "gan": (GAN, GANConfig), "vae": (VAE, VAEConfig), "quick_unet": (QuickUNet, QuickUNetConfig),
    "ddpm_unet": (DDPMUNet, DDPMUNetConfig),
}
# default learning rates of `dlh train` (Adam)
LEARNING_RATES = {"mlp": 1e-2, "cnn": 1e-3, "gpt": 3e-4, "vit": 3e-4, "gan": 2e-4, "vae": 1e-3,
                  "quick_unet": 1e-3, "ddpm_unet": 2e-4}


def _check_name(name: str) -> None:
    if name not in _MODELS:
        raise ValueError(f"model must be one of {NAMES}, got {name!r}")


def config(name: str, *, small: bool = False, **overrides):
    """The model's config dataclass: the full-size default (or the small one), with overrides."""
    _check_name(name)
    cls = _MODELS[name][1]
    cfg = cls.small() if small else cls()
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = set(overrides) - fields
    if unknown:
        raise ValueError(f"{name}: unknown config field(s) {sorted(unknown)}; fields are {sorted(fields)}")
    overrides = {k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()}
    return dataclasses.replace(cfg, **overrides)


def build(name: str, *, small: bool = False, **overrides) -> torch.nn.Module:
    """A freshly initialised model (on the CPU, float32); ``model.config`` is its config."""
    cfg = config(name, small=small, **overrides)
    return _MODELS[name][0](cfg)


def config_dict(model: torch.nn.Module) -> dict:
    """The model's config as a plain dict (what a checkpoint stores)."""
    return dataclasses.asdict(unwrap(model).config)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside a DistributedDataParallel / torch.compile wrapper."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if inner is None:
            return model
        model = inner


# ---- batches -----------------------------------------------------------------------------------
def _image_shape(cfg):
    channels = getattr(cfg, "in_channels", None) or getattr(cfg, "channels", 1)
    return (channels, cfg.image_size, cfg.image_size)


def example_batch(name: str, batch_size: int, device="cpu", *, small: bool = False,
                  generator: Optional[torch.Generator] = None, model: Optional[torch.nn.Module] = None,
                  dtype: torch.dtype = torch.float32) -> dict:
    """A random batch with the shapes of the model's training batch (no data files needed).

    The shapes follow ``model.config`` when a model is given, else the default (or small)
    config. Images are uniform in the model's input range; every random part is included.
    """
    _check_name(name)
    cfg = unwrap(model).config if model is not None else config(name, small=small)
    B = batch_size
    kw = dict(generator=generator, device=generator.device if generator is not None else "cpu")

    def rand(*shape):
        return torch.rand(*shape, **kw)

    def randn(*shape):
        return torch.randn(*shape, **kw)

    if name == "mlp":
        batch = {"x": randn(B, cfg.in_features), "y": torch.randint(0, 2, (B,), **kw).float()}
    elif name in ("cnn", "vit"):
        batch = {"x": rand(B, *_image_shape(cfg)), "y": torch.randint(0, cfg.classes, (B,), **kw)}
    elif name == "gpt":
        ids = torch.randint(0, cfg.vocab_size, (B, cfg.block_size + 1), **kw)
        batch = {"idx": ids[:, :-1].contiguous(), "targets": ids[:, 1:].contiguous()}
    elif name == "gan":
        batch = {"x": rand(B, *_image_shape(cfg)) * 2 - 1, "z": randn(B, cfg.latent)}
    elif name == "vae":
        batch = {"x": rand(B, *_image_shape(cfg)), "eps": randn(B, cfg.latent)}
    elif name == "quick_unet":
        shape = _image_shape(cfg)
        k = torch.randint(0, cfg.steps, (B,), **kw)
        batch = {"x": rand(B, *shape) * 2 - 1, "t": 1.0 - k.float() / cfg.steps, "noise": randn(B, *shape)}
    else:  # ddpm_unet
        shape = _image_shape(cfg)
        batch = {"x": rand(B, *shape) * 2 - 1, "t": torch.randint(0, cfg.timesteps, (B,), **kw),
                 "noise": randn(B, *shape)}
    return {k: v.to(device=device, dtype=dtype if v.is_floating_point() else v.dtype) for k, v in batch.items()}


def batch_from_items(name: str, items) -> dict:
    """A DataLoader's output for ``load_data(name)``'s dataset -> a batch dict (no random parts)."""
    if name == "mlp":
        return {"x": items[0], "y": items[1]}
    if name in ("cnn", "vit"):
        return {"x": items[0], "y": items[1]}
    if name == "gpt":
        return {"idx": items[0], "targets": items[1]}
    return {"x": items[0]}


# ---- data --------------------------------------------------------------------------------------
def load_data(name: str, *, data_dir: Optional[str] = None, split: str = "train", small: bool = False,
              dataset: Optional[str] = None, image_size: Optional[int] = None,
              block_size: Optional[int] = None) -> torch.utils.data.Dataset:
    """The model's training (or test) data as a Dataset (see models/data.py for the sources and
    transforms): packaged data by default, the user's MNIST / CIFAR-10 / text when data_dir is
    given (``dataset`` picks one; None: whatever is found). Items: (x, y) for mlp/cnn/vit,
    (idx, targets) for gpt, (x, label) for the generative models (the label is unused).
    ``image_size`` / ``block_size``: the model's, when its config was overridden."""
    _check_name(name)
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    cfg = config(name, small=small)
    if name == "mlp":
        if data_dir is not None:
            raise ValueError("mlp trains on make_moons only; it takes no data_dir")
        return torch.utils.data.TensorDataset(*data.moons(split))
    if name == "gpt":
        return data.CharDataset(data.text_ids(split, data_dir), block_size or cfg.block_size)
    scale = "[-1,1]" if name in ("gan", "quick_unet", "ddpm_unet") else "[0,1]"
    images, labels = data.images(data_dir, split, image_size or cfg.image_size, scale, dataset)
    return torch.utils.data.TensorDataset(images, labels)


def data_config(name: str, dataset: torch.utils.data.Dataset) -> dict:
    """Config overrides that make a model fit the data (channels and size of the user's images)."""
    if name not in ("cnn", "vit", "gan", "vae", "quick_unet", "ddpm_unet"):
        return {}
    c, h, _ = dataset.tensors[0].shape[1:]
    key = "in_channels" if name in ("cnn", "vit", "quick_unet", "ddpm_unet") else "channels"
    out = {key: c, "image_size": h}
    if name == "vit":
        out["patch_size"] = h // 4
    return out


# ---- forward, loss, step -----------------------------------------------------------------------
def _fill(name: str, model: torch.nn.Module, batch: dict) -> dict:
    """The batch with its random parts drawn where missing."""
    cfg = unwrap(model).config
    x = batch.get("x")
    need = {"gan": ("z",), "vae": ("eps",), "quick_unet": ("t", "noise"), "ddpm_unet": ("t", "noise")}
    if all(k in batch for k in need.get(name, ())):
        return batch
    batch = dict(batch)
    B = x.shape[0]
    if name == "gan" and "z" not in batch:
        batch["z"] = torch.randn(B, cfg.latent, device=x.device, dtype=x.dtype)
    if name == "vae" and "eps" not in batch:
        batch["eps"] = torch.randn(B, cfg.latent, device=x.device, dtype=x.dtype)
    if name == "quick_unet" and "t" not in batch:
        batch["t"] = 1.0 - torch.randint(0, cfg.steps, (B,), device=x.device).to(x.dtype) / cfg.steps
    if name == "ddpm_unet" and "t" not in batch:
        batch["t"] = torch.randint(0, cfg.timesteps, (B,), device=x.device)
    if name in ("quick_unet", "ddpm_unet") and "noise" not in batch:
        batch["noise"] = torch.randn_like(x)
    return batch


def noised(name: str, model: torch.nn.Module, batch: dict) -> torch.Tensor:
    """The diffusion models' input x_t for the batch's x, t and noise."""
    x, t, noise = batch["x"], batch["t"], batch["noise"]
    if name == "quick_unet":
        t = t.to(x.dtype).view(-1, 1, 1, 1)
        return (1 - t) * x + t * noise
    acp = unwrap(model).alphas_cumprod(x.device)[t].view(-1, 1, 1, 1)
    return (acp.sqrt() * x.float() + (1 - acp).sqrt() * noise.float()).to(x.dtype)


def forward(name: str, model: torch.nn.Module, batch: dict):
    """The model's main output on a batch: logits, images, (reconstruction, mu, logvar) for the
    VAE, (G(z), D(x)) for the GAN. What the eager/patched comparisons compare."""
    _check_name(name)
    batch = _fill(name, model, batch)
    if name in ("mlp", "cnn", "vit"):
        return model(batch["x"])
    if name == "gpt":
        return model(batch["idx"])
    if name == "gan":
        inner = unwrap(model)
        return inner.generator(batch["z"]), inner.discriminator(batch["x"])
    if name == "vae":
        return model(batch["x"], batch["eps"])
    return model(noised(name, model, batch), batch["t"])


def _gan_losses(model, batch, part):
    inner = unwrap(model)
    G, D = inner.generator, inner.discriminator
    real, z = batch["x"], batch["z"]
    B = real.shape[0]
    ones = torch.ones(B, device=real.device, dtype=torch.float32)
    total = None
    if part in (None, "discriminator"):
        with torch.no_grad():
            fake = G(z)
        logits = D(torch.cat([real, fake])).float()  # one discriminator call: (2B,)
        total = F.binary_cross_entropy_with_logits(logits, torch.cat([ones, torch.zeros_like(ones)]))
    if part in (None, "generator"):
        g_loss = F.binary_cross_entropy_with_logits(D(G(z)).float(), ones)
        total = g_loss if total is None else total + g_loss
    return total


def loss(name: str, model: torch.nn.Module, batch: dict, *, part: Optional[str] = None) -> torch.Tensor:
    """The scalar training loss of one step (float32); see the module docstring per model.
    part (GAN only): "discriminator" or "generator" for one of the two losses."""
    _check_name(name)
    batch = _fill(name, model, batch)
    if name == "gan":
        if part not in (None, "discriminator", "generator"):
            raise ValueError(f"part must be None, 'discriminator' or 'generator', got {part!r}")
        return _gan_losses(model, batch, part)
    if part is not None:
        raise ValueError("part applies to the GAN only")
    return loss_of_output(name, forward(name, model, batch), batch)


def loss_of_output(name: str, out, batch: dict) -> torch.Tensor:
    """The loss from ``forward(name, model, batch)``'s output (every model but the GAN, whose
    loss needs more than one forward), for callers that also want the output itself."""
    if name == "gan":
        raise ValueError("the GAN's loss needs the model: use loss()")
    if name == "mlp":
        return F.binary_cross_entropy_with_logits(out.float(), batch["y"].float())
    if name in ("cnn", "vit"):
        return F.cross_entropy(out.float(), batch["y"])
    if name == "gpt":
        return F.cross_entropy(out.float().flatten(0, 1), batch["targets"].flatten())
    if name == "vae":
        recon, mu, logvar = (o.float() for o in out)
        B = recon.shape[0]
        target = batch["x"].float()
        # F.binary_cross_entropy written out (logs clamped at -100 as torch does): torch refuses
        # that op inside autocast regions, and callers may train under autocast
        bce = -(target * recon.log().clamp_min(-100) + (1 - target) * torch.log1p(-recon).clamp_min(-100)).sum()
        kl = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp())
        return (bce + kl) / B
    target = batch["x"] if name == "quick_unet" else batch["noise"]
    return F.mse_loss(out.float(), target.float())


class Objective(torch.nn.Module):
    """``loss(name, model, batch)`` as a module, the thing DistributedDataParallel wraps (a
    DDP module must run the whole forward whose backward it synchronises)."""

    def __init__(self, name: str, model: torch.nn.Module):
        super().__init__()
        _check_name(name)
        self.name, self.model = name, model

    def forward(self, batch: dict, part: Optional[str] = None) -> torch.Tensor:
        return loss(self.name, self.model, batch, part=part)


def _clear_grads(module: torch.nn.Module) -> None:
    for p in module.parameters():
        p.grad = None


def train_step(name: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer, batch: dict) -> float:
    """One optimisation step; returns the loss (for the GAN, D loss + G loss) as a float.

    ``model`` may be the model, or an ``Objective`` (possibly inside DistributedDataParallel)."""
    objective = unwrap_objective(model)
    if isinstance(objective, Objective):
        run, inner = model, unwrap(objective.model)
    else:
        run, inner = Objective(name, model), unwrap(model)
    if name != "gan":
        optimizer.zero_grad(set_to_none=True)
        value = run(batch)
        value.backward()
        optimizer.step()
        return value.item()
    batch = _fill(name, inner, batch)
    # Discriminator step: only D has gradients (G runs under no_grad).
    optimizer.zero_grad(set_to_none=True)
    d_loss = run(batch, "discriminator")
    d_loss.backward()
    _clear_grads(inner.generator)
    optimizer.step()
    # Generator step: the gradient flows through D into G; D's share is dropped before the step.
    optimizer.zero_grad(set_to_none=True)
    g_loss = run(batch, "generator")
    g_loss.backward()
    _clear_grads(inner.discriminator)
    optimizer.step()
    return d_loss.item() + g_loss.item()


def unwrap_objective(model: torch.nn.Module) -> torch.nn.Module:
    """The Objective inside a DDP wrapper, or the model itself."""
    inner = getattr(model, "module", None)
    return inner if isinstance(inner, Objective) else model


def make_optimizer(name: str, model: torch.nn.Module, lr: Optional[float] = None) -> torch.optim.Optimizer:
    """Adam with the model's default learning rate (betas (0.5, 0.999) for the GAN)."""
    _check_name(name)
    lr = LEARNING_RATES[name] if lr is None else lr
    betas = (0.5, 0.999) if name == "gan" else (0.9, 0.999)
    return torch.optim.Adam(model.parameters(), lr=lr, betas=betas)


# ---- sampling ----------------------------------------------------------------------------------
def _seed(generator: Optional[torch.Generator]) -> int:
    device = generator.device if generator is not None else "cpu"
    return int(torch.randint(0, 2 ** 62, (1,), generator=generator, device=device).item())


def _latent(n: int, size: int, generator: Optional[torch.Generator], device, dtype) -> torch.Tensor:
    where = generator.device if generator is not None else "cpu"
    return torch.randn(n, size, generator=generator, device=where).to(device=device, dtype=dtype)


@torch.no_grad()
def sample(name: str, model: torch.nn.Module, n: int, device="cpu", *, steps: Optional[int] = None,
           generator: Optional[torch.Generator] = None, method: Optional[str] = None,
           backend: Optional[str] = None) -> torch.Tensor:
    """n images in [0, 1], (n, C, H, W) float32, from a generative model (in eval mode).

    gan: G(z); vae: the decoder of z ~ N(0, I); quick_unet: the 16-step interpolation sampler
    (``steps`` overrides config.steps); ddpm_unet: ``dlh_kernels.diffusion.sample`` with
    ``method`` "ddpm" (default, ``steps`` defaulting to config.timesteps) or "ddim" (default
    50 steps). ``generator`` (on any device) fixes the latents / the sampler's seed;
    ``backend`` is the diffusion step's backend."""
    _check_name(name)
    if name not in SAMPLERS:
        raise ValueError(f"sample: {name!r} is not a generative model; sampling works for {SAMPLERS}")
    inner = unwrap(model)
    cfg = inner.config
    was_training = inner.training
    inner.eval()
    try:
        dtype = next(inner.parameters()).dtype
        if name == "gan":
            z = _latent(n, cfg.latent, generator, device, dtype)
            return ((model(z).float() + 1) / 2).clamp(0, 1)  # GAN.forward is the generator
        if name == "vae":
            z = _latent(n, cfg.latent, generator, device, dtype)
            return inner.decode(z).float().clamp(0, 1)
        from dlh_kernels import diffusion
        shape = (n, *_image_shape(cfg))
        if name == "quick_unet":
            x = diffusion.sample(model, shape, steps or cfg.steps, "interp", seed=_seed(generator),
                                 device=device, dtype=dtype, backend=backend)
        else:
            method = method or "ddpm"
            steps = steps or (cfg.timesteps if method == "ddpm" else min(50, cfg.timesteps))
            x = diffusion.sample(model, shape, steps, method, seed=_seed(generator), device=device,
                                 dtype=dtype, alphas_cumprod=inner.alphas_cumprod(device),
                                 clip_sample=True, backend=backend)
        return ((x.float() + 1) / 2).clamp(0, 1)
    finally:
        inner.train(was_training)


@torch.no_grad()
def generate_text(model: torch.nn.Module, prompt: str = "", max_new_tokens: int = 200, *,
                  temperature: float = 1.0, top_k: Optional[int] = None, n: int = 1,
                  generator: Optional[torch.Generator] = None) -> list:
    """n strings from the character-level GPT: ``prompt`` followed by ``max_new_tokens``
    sampled characters (see ``GPT.generate``; an empty prompt starts from a newline, which is
    not returned). Characters outside ``data.VOCAB`` in the prompt become ``?``."""
    inner = unwrap(model)
    if not isinstance(inner, GPT):
        raise ValueError(f"generate_text needs the GPT, got {type(inner).__name__}")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    device = next(inner.parameters()).device
    start = prompt or "\n"
    idx = data.encode(start).to(device).repeat(n, 1)
    was_training = inner.training
    inner.eval()
    try:
        out = inner.generate(idx, max_new_tokens, temperature, generator=generator, top_k=top_k)
    finally:
        inner.train(was_training)
    skip = 0 if prompt else 1
    return [data.decode(row[skip:].tolist()) for row in out]


@torch.no_grad()
def predict(name: str, model: torch.nn.Module, x: torch.Tensor) -> tuple:
    """(predicted class, its probability) per example of a classifier (mlp, cnn, vit)."""
    if name not in CLASSIFIERS:
        raise ValueError(f"predict: {name!r} is not a classifier; classifiers are {CLASSIFIERS}")
    inner = unwrap(model)
    was_training = inner.training
    inner.eval()
    try:
        dtype = next(inner.parameters()).dtype
        logits = model(x.to(dtype)).float()
    finally:
        inner.train(was_training)
    if name == "mlp":  # one logit: P(class 1)
        p1 = torch.sigmoid(logits.reshape(-1))
        pred = (p1 > 0.5).long()
        return pred, torch.where(pred == 1, p1, 1 - p1)
    probs = F.softmax(logits, dim=-1)
    conf, pred = probs.max(-1)
    return pred, conf


def clone(model: torch.nn.Module) -> torch.nn.Module:
    """A deep copy (for eager-vs-patched comparisons)."""
    return copy.deepcopy(model)


__all__ = ["NAMES", "SAMPLERS", "CLASSIFIERS", "build", "config", "example_batch", "forward", "load_data", "loss",
           "make_optimizer", "sample", "generate_text", "predict", "train_step", "Objective"]
