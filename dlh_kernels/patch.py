"""`dlh.patch(model)`: run a model's hot spots on dlh_kernels without rewriting it.

What it does, in place:

- swaps modules of these exact types for their `dlh.nn` subclasses: LayerNorm, RMSNorm,
  GroupNorm, GELU, MultiheadAttention, Conv2d;
- fuses pairs adjacent in an ``nn.Sequential``: Conv2d + ReLU/SiLU/GELU/LeakyReLU (the
  activation in the conv's epilogue), GroupNorm + SiLU (`DF.group_norm(activation="silu")`) and
  Linear + GELU (`dlh.nn.LinearGELU`, `DF.linear_gelu`); the activation's slot holds an
  ``nn.Identity`` until `unpatch`, so the Sequential keeps its indices and the state_dict its keys;
- routes the calls of ``torch.nn.functional.scaled_dot_product_attention`` made inside a
  module's own code (a GPT block's ``F.scaled_dot_product_attention(q, k, v, is_causal=True)``)
  to `DF.scaled_dot_product_attention`: see `_SDPARouter`.

Opt-in and reversible (`dlh.unpatch`). A replacement is a new module of the dlh subclass whose
``__dict__`` is a copy of the old one's, so it holds the very same Parameter and buffer objects
(and the same dicts of them, and of hooks): the state_dict is identical, tensor for tensor, and an
optimizer built before the patch keeps updating the parameters the model uses.
No global monkey-patching: nothing in torch is changed, for this model or any other code.

Patching twice is idempotent: a second `patch` leaves what the first one patched (reported as
"already patched"); to change the backend, `unpatch` first.
"""
from __future__ import annotations

import inspect
import types
from dataclasses import dataclass, field
from typing import Iterable, NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from . import _backend
from . import functional as DF
from . import nn as dnn

# Exact torch module class -> (op family, dlh replacement class). Exact types only: a user's
# subclass of nn.LayerNorm may override forward, so it is left alone (and reported).
_SWAPS = {
    torch.nn.LayerNorm: ("layer_norm", dnn.LayerNorm),
    torch.nn.RMSNorm: ("rms_norm", dnn.RMSNorm),
    torch.nn.GELU: ("gelu", dnn.GELU),
    torch.nn.GroupNorm: ("group_norm", dnn.GroupNorm),
    # need_weights=True (torch's default) falls back to torch inside; nn.TransformerEncoderLayer
    # and most models call it with need_weights=False, which runs our kernel
    torch.nn.MultiheadAttention: ("scaled_dot_product_attention", dnn.MultiheadAttention),
    torch.nn.Conv2d: ("conv2d", dnn.Conv2d),
}
# Modules swapped only together with the activation that follows them in a Sequential.
_FUSE_ONLY = {torch.nn.Linear: ("linear_gelu", dnn.LinearGELU)}
_SDPA = "scaled_dot_product_attention"
OPS = frozenset(fam for fam, _ in (*_SWAPS.values(), *_FUSE_ONLY.values()))

_ORIGINAL = "_dlh_original"          # on a replacement (or placeholder): the module it replaced
_ROUTER = "_dlh_sdpa_router"          # on a module whose SDPA calls are routed: (router, hook ids)


# ---------------------------------------------------------------------------------------------
# The report.

class Replaced(NamedTuple):
    path: str        # qualified module name ("blocks.0.ln_1"; "" is the model itself)
    from_type: str   # the torch class it was
    to_type: str     # what runs now
    op: str          # the dlh op family doing the work


class Left(NamedTuple):
    path: str
    type: str
    reason: str


class Routed(NamedTuple):
    path: str
    type: str
    op: str = _SDPA


@dataclass
class PatchReport:
    """What `dlh.patch` did. ``replaced``: modules swapped (and activations fused away);
    ``routed``: modules whose own F.scaled_dot_product_attention calls now run on dlh;
    ``left``: supported-looking modules it did not touch, each with the reason."""
    replaced: list = field(default_factory=list)
    left: list = field(default_factory=list)
    routed: list = field(default_factory=list)
    backend: Optional[str] = None

    def __str__(self) -> str:
        def table(header, rows):
            rows = [tuple("<model>" if i == 0 and not c else str(c) for i, c in enumerate(r)) for r in rows]
            widths = [max(len(x) for x in col) for col in zip(header, *rows)]
            fmt = "  " + "  ".join(f"{{:<{w}}}" for w in widths)
            return [fmt.format(*header).rstrip(), fmt.format(*("-" * w for w in widths))] + \
                   [fmt.format(*r).rstrip() for r in rows]

        lines = [f"dlh.patch (backend={self.backend or 'default'}): replaced {len(self.replaced)} "
                 f"module(s), {len(self.routed)} module(s) route F.scaled_dot_product_attention "
                 f"to dlh, left {len(self.left)}"]
        if self.replaced:
            lines += table(("module", "was", "now", "op"), self.replaced)
        if self.routed:
            lines += table(("module", "type", "routes to"),
                           [(p, t, f"DF.{op}") for p, t, op in self.routed])
        if self.left:
            lines += table(("left", "type", "why"), self.left)
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Attention written as F.scaled_dot_product_attention calls.

class _SDPARouter(TorchFunctionMode):
    """While active, ``F.scaled_dot_product_attention(...)`` runs
    ``DF.scaled_dot_product_attention(..., backend=backend)``; every other torch call passes
    through unchanged.

    Active only between a routed module's forward pre-hook and its forward hook (registered with
    ``always_call=True``, so an exception in forward still pops it): other code, and the same
    function called outside the model, is untouched. torch.compile traces through the mode (the
    DF call lands in the graph; fullgraph works). Costs in eager mode: every torch call inside a
    routed forward takes one Python hop through `__torch_function__` (a few microseconds).
    Known limit: torch <= 2.13's dynamo cannot trace ``Tensor.unflatten`` under any
    TorchFunctionMode (pytorch#179853): with fullgraph=True such a forward fails to compile;
    without it, it graph-breaks there and still runs correctly.
    """

    def __init__(self, backend: Optional[str]):
        super().__init__()
        self.backend = backend

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            # the mode is off in here, so DF's own torch calls (its torch backend calls
            # F.scaled_dot_product_attention) are not routed back to us
            return DF.scaled_dot_product_attention(*args, **kwargs, backend=self.backend)
        return func(*args, **kwargs)


def _functions_of(cls) -> Iterable[types.CodeType]:
    """The code of every function defined by `cls` and its bases below nn.Module (forward and
    the helpers it may call), nested functions and lambdas included."""
    for klass in cls.__mro__:
        if klass is torch.nn.Module or klass is object:
            break
        for attr in vars(klass).values():
            fn = inspect.unwrap(getattr(attr, "__func__", attr))
            code = getattr(fn, "__code__", None)
            stack = [code] if isinstance(code, types.CodeType) else []
            while stack:
                code = stack.pop()
                yield code
                stack += [c for c in code.co_consts if isinstance(c, types.CodeType)]


def _calls_sdpa(module: torch.nn.Module) -> bool:
    """Does the module's class name F.scaled_dot_product_attention in its own code? A static
    look (names in the bytecode, e.g. ``F.scaled_dot_product_attention`` or the bare imported
    name): it never runs the model. dlh's own modules call DF, never F, and are skipped."""
    cls = type(module)
    if cls.__module__ == dnn.__name__:
        return False
    return any(_SDPA in code.co_names for code in _functions_of(cls))


def _route_sdpa(module: torch.nn.Module, backend: Optional[str]) -> None:
    router = _SDPARouter(backend)

    def enter(mod, args):
        router.__enter__()  # returns the mode: the hook itself must return None (else: new args)

    def leave(mod, args, output):
        router.__exit__(None, None, None)

    pre = module.register_forward_pre_hook(enter)
    post = module.register_forward_hook(leave, always_call=True)
    # hook ids, not the handles: a handle points at the dicts of the module it was made on, so
    # unpatching a deepcopy of a patched model would remove the original's hooks
    module.__dict__[_ROUTER] = (router, (pre.id, post.id))


def _unroute(module: torch.nn.Module) -> bool:
    entry = module.__dict__.pop(_ROUTER, None)
    if entry is None:
        return False
    pre, post = entry[1]
    module._forward_pre_hooks.pop(pre, None)
    module._forward_hooks.pop(post, None)
    module._forward_hooks_always_called.pop(post, None)
    return True


# ---------------------------------------------------------------------------------------------
# Swapping and fusing modules.

def _fusable_activation(family: str, module) -> Optional[dict]:
    """The keyword arguments that fuse `module` (the activation after a `family` module in a
    Sequential) into the replacement, or None if it cannot be fused there."""
    t = type(module)
    if family == "conv2d":
        if t is torch.nn.ReLU:
            return {"activation": "relu"}
        if t is torch.nn.SiLU:
            return {"activation": "silu"}
        if t is torch.nn.GELU:
            return {"activation": "gelu_tanh" if module.approximate == "tanh" else "gelu"}
        if t is torch.nn.LeakyReLU:
            return {"activation": "leaky_relu", "negative_slope": float(module.negative_slope)}
    elif family == "group_norm" and t is torch.nn.SiLU:
        return {"activation": "silu"}
    elif family == "linear_gelu" and t is torch.nn.GELU:
        return {"approximate": module.approximate}
    return None


def _swap(parent: torch.nn.Module, name: str, new_cls, attrs: dict) -> torch.nn.Module:
    """Put a `new_cls` sharing the module's state (same __dict__ contents) in its slot."""
    old = parent._modules[name]
    new = new_cls.__new__(new_cls)
    new.__dict__ = dict(old.__dict__)
    new.__dict__[_ORIGINAL] = old  # in __dict__, not _modules: not a submodule, not in the state_dict
    for key, value in attrs.items():
        new.__dict__[key] = value
    parent._modules[name] = new
    return new


def _placeholder(parent: torch.nn.Module, name: str) -> None:
    """The slot of a fused activation: an nn.Identity remembering it (no parameters, so the
    state_dict keeps its keys)."""
    old = parent._modules[name]
    identity = torch.nn.Identity()
    identity.train(old.training)
    identity.__dict__[_ORIGINAL] = old
    parent._modules[name] = identity


def _describe(new_cls, attrs: dict) -> str:
    shown = {k: v for k, v in attrs.items() if k != "backend" and not (k == "negative_slope" and
                                                                      attrs.get("activation") != "leaky_relu")}
    return f"dlh.nn.{new_cls.__name__}" + (
        "(" + ", ".join(f"{k}={v!r}" for k, v in shown.items()) + ")" if shown else "")


def _probe(family: str, module, attrs: dict, parent: torch.nn.Module):
    """(op, args, kwargs) of a tiny call with this module's configuration, for `dlh.explain`.
    The dtype and device: the module's parameters', else its parent's (a GELU has none)."""
    param = next((p for p in (*module.parameters(), *parent.parameters()) if p.is_floating_point()), None)
    dtype = param.dtype if param is not None else torch.float32
    device = param.device if param is not None else torch.device("cpu")

    def x(*shape):
        return torch.zeros(shape, dtype=dtype, device=device)

    m = module
    if family == "layer_norm":
        return family, (x(1, *m.normalized_shape), m.normalized_shape, m.weight, m.bias, m.eps), {}
    if family == "rms_norm":
        return family, (x(1, *m.normalized_shape), m.normalized_shape, m.weight, m.eps), {}
    if family == "gelu":
        return family, (x(1), m.approximate), {}
    if family == "group_norm":
        return family, (x(1, m.num_channels, 1), m.num_groups, m.weight, m.bias, m.eps), \
            {"activation": attrs.get("activation")}
    if family == "linear_gelu":
        return family, (x(1, m.in_features), m.weight, m.bias, attrs["approximate"]), {}
    if family == "conv2d":
        spatial = [d * (k - 1) + 1 for d, k in zip(m.dilation, m.kernel_size)]
        return family, (x(1, m.in_channels, *spatial), m.weight, m.bias, m.stride, m.padding,
                        m.dilation, m.groups), {k: v for k, v in attrs.items()}
    # MultiheadAttention: the attention of one token per head
    q = x(1, m.num_heads, 1, m.embed_dim // m.num_heads)
    return _SDPA, (q, q, q), {}


def _cannot(family: str, module, attrs: dict, backend: Optional[str],
            parent: torch.nn.Module) -> Optional[str]:
    """Why the replacement would not run our kernel for this module, or None."""
    if family == "scaled_dot_product_attention" and (module.bias_k is not None or module.add_zero_attn):
        return ("add_bias_kv / add_zero_attn: dlh.nn.MultiheadAttention would run torch's "
                "implementation, so it is left as it is")
    if family == "conv2d" and module.padding_mode != "zeros":
        return (f"padding_mode={module.padding_mode!r}: the dlh kernel pads with zeros only "
                "(dlh.nn.Conv2d would run torch), so it is left as it is")
    if backend not in ("triton", "cuda"):
        return None  # torch runs every configuration; auto picks one that can
    from . import explain
    op, args, kwargs = _probe(family, module, attrs, parent)
    try:
        verdict = explain(op, *args, **kwargs)[backend]
    except (ValueError, TypeError, RuntimeError) as exc:
        return f"dlh.{op} does not take this configuration: {exc}"
    # a backend missing on this device is not the module's fault: the model may move to a GPU
    if verdict in ("ok", _backend.unavailable_reason(backend, args[0].device.type)):
        return None
    return f"backend {backend!r} cannot run this configuration: {verdict}"


# ---------------------------------------------------------------------------------------------
# patch / unpatch.

def patch(model: torch.nn.Module, *, ops: Optional[Iterable[str]] = None,
          backend: Optional[str] = None) -> PatchReport:
    """Run the supported parts of `model` on dlh kernels (in place); return what was done.

    ops: op families to patch, among ``dlh.patch.OPS`` ("layer_norm", "rms_norm", "gelu",
    "group_norm" (GroupNorm, and GroupNorm + SiLU), "linear_gelu" (Linear + GELU), "conv2d"
    (and its fused activations), "scaled_dot_product_attention" (MultiheadAttention, and
    F.scaled_dot_product_attention calls)); None for all. backend: the backend the replacements
    use (None: the default current at each call). Idempotent: what an earlier call patched is
    left as it is (and reported); `unpatch` first to patch with another backend.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"dlh.patch: model must be a torch.nn.Module, got {type(model).__name__}")
    if backend is not None:
        _backend._check_name(backend)
    wanted = OPS if ops is None else {ops} if isinstance(ops, str) else set(ops)
    unknown = wanted - OPS
    if unknown:
        raise ValueError(f"dlh.patch: ops must be among {sorted(OPS)}, got {sorted(unknown)}")
    report = PatchReport(backend=backend)
    supported = (*_SWAPS, *_FUSE_ONLY)

    def route(module: torch.nn.Module, qual: str) -> None:
        if not _calls_sdpa(module):
            return
        kind = type(module).__name__
        if _ROUTER in module.__dict__:
            report.left.append(Left(qual, kind, "already patched (dlh.unpatch first to patch again)"))
        elif _SDPA not in wanted:
            report.left.append(Left(qual, kind, "calls F.scaled_dot_product_attention: excluded by ops="))
        else:
            _route_sdpa(module, backend)
            report.routed.append(Routed(qual, kind))

    def walk(module: torch.nn.Module, prefix: str) -> None:
        items = list(module._modules.items())
        in_sequential = isinstance(module, torch.nn.Sequential)
        fused = set()
        for i, (name, child) in enumerate(items):
            if child is None or name in fused:
                continue
            qual, kind = f"{prefix}{name}", type(child).__name__
            if _ORIGINAL in child.__dict__:
                report.left.append(Left(qual, kind, "already patched (dlh.unpatch first to patch again)"))
                continue
            entry = _SWAPS.get(type(child)) or _FUSE_ONLY.get(type(child))
            if entry is None:
                if isinstance(child, supported):
                    base = next(c for c in supported if isinstance(child, c))
                    why = ("already a dlh module" if type(child).__module__ == dnn.__name__ else
                           f"subclass of nn.{base.__name__}: left alone (patch swaps exact types only)")
                    report.left.append(Left(qual, kind, why))
                route(child, qual)
                walk(child, qual + ".")
                continue
            family, new_cls = entry
            # the activation right after it in a Sequential, if it can go into its epilogue
            act_name, act, fuse = None, None, None
            if in_sequential and i + 1 < len(items) and items[i + 1][1] is not None:
                act_name, act = items[i + 1]
                fuse = _fusable_activation(family, act)
            if family == "linear_gelu" and fuse is None:
                report.left.append(Left(qual, kind, "Linear not followed by GELU: no dlh op for a plain Linear"))
                continue
            if family not in wanted:
                report.left.append(Left(qual, kind, "excluded by ops="))
                continue
            attrs = dict(fuse or {})
            reason = _cannot(family, child, attrs, backend, module)
            if reason is not None:
                report.left.append(Left(qual, kind, reason))
                continue
            _swap(module, name, new_cls, {**attrs, "backend": backend})
            report.replaced.append(Replaced(qual, kind, _describe(new_cls, attrs), family))
            if fuse is not None:
                _placeholder(module, act_name)
                fused.add(act_name)
                report.replaced.append(Replaced(f"{prefix}{act_name}", type(act).__name__,
                                                f"nn.Identity (fused into {qual})", family))

    if isinstance(model, supported) and _ORIGINAL not in model.__dict__:
        report.left.append(Left("", type(model).__name__, "the model itself: patch swaps submodules "
                                "only (wrap it, e.g. in nn.Sequential)"))
    route(model, "")
    walk(model, "")
    return report


patch.OPS = OPS  # `dlh.patch` is this function (it shadows the module): the ops= names, from it


def unpatch(model: torch.nn.Module) -> int:
    """Undo `patch`: put every replaced module (and fused activation) back and stop routing
    F.scaled_dot_product_attention; return how many modules it restored or stopped routing.

    Changes made while patched carry over: the parameters and buffers are the same objects, and
    the module attributes the original had (``training`` after ``.eval()``, ``eps``, ...) are
    copied back.
    """
    count = 0

    def walk(module: torch.nn.Module) -> None:
        nonlocal count
        for name, child in list(module._modules.items()):
            if child is None:
                continue
            original = child.__dict__.get(_ORIGINAL)
            if original is None:
                count += _unroute(child)
                walk(child)
                continue
            if isinstance(child, torch.nn.Identity) and not isinstance(original, torch.nn.Identity):
                original.train(child.training)  # a placeholder: only the mode can have changed
            else:
                for key in original.__dict__:
                    if key in child.__dict__:
                        original.__dict__[key] = child.__dict__[key]
            module._modules[name] = original
            count += 1

    count += _unroute(model)
    walk(model)
    return count
