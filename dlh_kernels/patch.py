"""`dlh.patch(model)`: swap supported modules for their dlh_kernels counterparts, in place.

Opt-in and reversible: each replacement is a new module of the dlh subclass sharing the old
one's parameters, buffers and hooks, so the `state_dict` is identical and an optimizer built
before the patch still holds the right tensors. `dlh.unpatch(model)` puts the originals back.
No global monkey-patching.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Optional

import torch

from . import _backend
from . import nn as dnn

# torch module class -> (op family name, dlh replacement class). Order matters for subclasses:
# exact type match only, so a user's subclass of nn.LayerNorm is left alone (reported).
_SWAPS = {
    torch.nn.LayerNorm: ("layer_norm", dnn.LayerNorm),
    torch.nn.RMSNorm: ("rms_norm", dnn.RMSNorm),
    torch.nn.GELU: ("gelu", dnn.GELU),
    torch.nn.GroupNorm: ("group_norm", dnn.GroupNorm),
    # need_weights=True (torch's default) falls back to torch inside; nn.TransformerEncoderLayer
    # and most models call it with need_weights=False, which runs our kernel
    torch.nn.MultiheadAttention: ("scaled_dot_product_attention", dnn.MultiheadAttention),
    # padding_mode other than "zeros" falls back to torch inside dlh.nn.Conv2d
    torch.nn.Conv2d: ("conv2d", dnn.Conv2d),
}
# Modules later issues will cover: reported as left, with the reason.
_NOT_YET: tuple = ()


def _fusable_activation(module: torch.nn.Module):
    """(activation, negative_slope) of an activation module a dlh Conv2d can fuse, else None."""
    t = type(module)
    if t is torch.nn.ReLU:
        return "relu", 0.01
    if t is torch.nn.SiLU:
        return "silu", 0.01
    if t is torch.nn.GELU:
        return ("gelu_tanh" if module.approximate == "tanh" else "gelu"), 0.01
    if t is torch.nn.LeakyReLU:
        return "leaky_relu", float(module.negative_slope)
    return None


def _fuse_activation(parent: torch.nn.Module, name: str, conv: torch.nn.Module) -> Optional[str]:
    """Inside an nn.Sequential, put the activation module `name` into `conv`'s epilogue and put
    an nn.Identity in its place (unpatch restores it); return the fused activation or None."""
    act = _fusable_activation(parent._modules[name])
    if act is None:
        return None
    conv.activation, conv.negative_slope = act
    identity = torch.nn.Identity()
    identity.__dict__["_dlh_original"] = parent._modules[name]
    parent._modules[name] = identity
    return act[0]


@dataclass
class PatchReport:
    replaced: list = field(default_factory=list)  # (qualified name, torch class, dlh class)
    left: list = field(default_factory=list)      # (qualified name, class, reason)

    def __str__(self) -> str:
        lines = [f"replaced {len(self.replaced)} module(s)"]
        lines += [f"  {name}: {a} -> {b}" for name, a, b in self.replaced]
        if self.left:
            lines.append(f"left {len(self.left)} module(s)")
            lines += [f"  {name}: {cls} ({why})" for name, cls, why in self.left]
        return "\n".join(lines)


def _swap(parent: torch.nn.Module, name: str, new_cls) -> torch.nn.Module:
    old = parent._modules[name]
    new = new_cls.__new__(new_cls)
    new.__dict__ = dict(old.__dict__)
    new.__dict__["_dlh_original"] = old
    parent._modules[name] = new
    return new


def patch(model: torch.nn.Module, *, ops: Optional[Iterable[str]] = None,
          backend: Optional[str] = None) -> PatchReport:
    """Replace the supported modules of `model` (in place); return what was replaced and left.

    ops: op families to patch (e.g. {"layer_norm"}); None for all. backend: the replacements'
    backend (None: the current default at call time).
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"dlh.patch: model must be a torch.nn.Module, got {type(model).__name__}")
    if backend is not None:
        _backend._check_name(backend)
    families = {fam for fam, _ in _SWAPS.values()}
    wanted = families if ops is None else set(ops)
    unknown = wanted - families
    if unknown:
        raise ValueError(f"dlh.patch: ops must be among {sorted(families)}, got {sorted(unknown)}")
    report = PatchReport()

    def walk(module: torch.nn.Module, prefix: str) -> None:
        items = list(module._modules.items())
        fused = set()
        for i, (name, child) in enumerate(items):
            if child is None or name in fused:
                continue
            qual = f"{prefix}{name}"
            entry = _SWAPS.get(type(child))
            if entry is not None:
                family, new_cls = entry
                if family in wanted:
                    new = _swap(module, name, new_cls)
                    new.backend = backend
                    what = f"dlh.nn.{new_cls.__name__}"
                    # Sequential(..., Conv2d, ReLU, ...): the activation goes into the conv's epilogue
                    if (family == "conv2d" and isinstance(module, torch.nn.Sequential)
                            and i + 1 < len(items) and items[i + 1][1] is not None):
                        act_name, act_module = items[i + 1]
                        act = _fuse_activation(module, act_name, new)
                        if act is not None:
                            fused.add(act_name)
                            what = f"dlh.nn.Conv2d(activation={act!r})"
                            report.replaced.append((f"{prefix}{act_name}", type(act_module).__name__,
                                                    f"nn.Identity (fused into {qual})"))
                    report.replaced.append((qual, type(child).__name__, what))
                else:
                    report.left.append((qual, type(child).__name__, "excluded by ops="))
                continue
            if isinstance(child, _NOT_YET) and not hasattr(child, "_dlh_original"):
                report.left.append((qual, type(child).__name__, "no dlh kernel for it yet"))
            elif isinstance(child, tuple(_SWAPS)) and not hasattr(child, "_dlh_original"):
                report.left.append((qual, type(child).__name__, "subclass of a supported module"))
            walk(child, qual + ".")

    walk(model, "")
    return report


def unpatch(model: torch.nn.Module) -> int:
    """Put back every module `patch` replaced; return how many."""
    count = 0

    def walk(module: torch.nn.Module) -> None:
        nonlocal count
        for name, child in list(module._modules.items()):
            if child is None:
                continue
            original = child.__dict__.get("_dlh_original")
            if original is not None:
                module._modules[name] = original
                count += 1
            else:
                walk(child)

    walk(model)
    return count
