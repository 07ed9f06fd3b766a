"""Recognition by structure for `dlh.patch`: which dlh op a module of a class we have never seen
computes, read from its parameters and attributes and confirmed by running its own forward on
probe inputs next to the candidate op (torch backend, float32, random parameters passed through
`torch.func.functional_call`, so the module itself is never changed).

- norms: a leaf module with one 1-D ``weight`` (and maybe a ``bias``): LayerNorm or RMSNorm, with
  ``(1 + weight)`` or not, eps from one of its float attributes (whatever it is called) or a
  common constant, each variant tried until one matches (LlamaRMSNorm, T5LayerNorm, Gemma's
  offset norm, timm's LayerNorm subclasses...);
- activations: a leaf module without parameters: GELU (exact, tanh), SiLU, ReLU, LeakyReLU (its
  ``negative_slope``), Tanh, Sigmoid (GELUActivation, NewGELUActivation, GELUTanh,
  SiLUActivation...);
- MLPs: a module made of linear layers (nn.Linear, or GPT-2's Conv1D with its (in, out) weight),
  one activation and dropout: ``out(act(in(x)))``, ``act(in(x))`` and the gated
  ``down(act(gate(x)) * up(x))``, with the dropout where the module puts it (found by probing
  with the dropout made a visible x2 for the probe).

A match is within float32 rounding (rtol 1e-5) on two probes: an ordinary one and one whose
variance is of the order of eps (so the eps is the module's own). Results are cached per class
and configuration, so a 32-layer model probes each kind of block once.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from .coverage import is_activation_like, is_linear_like

_RTOL, _ATOL = 1e-5, 1e-6
_COMMON_EPS = (1e-5, 1e-6, 1e-12, 1e-8, 1e-3)


def _close(a, b) -> bool:
    return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape
            and bool(torch.allclose(a.float(), b.float(), rtol=_RTOL, atol=_ATOL)))


def _generator():
    return torch.Generator().manual_seed(1234)


def _randn(*shape, device, scale=1.0, shift=0.0, g=None):
    return (torch.randn(*shape, generator=g) * scale + shift).to(device)


def _device_of(module):
    p = next(iter(module.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


def _call(module, params: dict, *args):
    with torch.no_grad():
        return torch.func.functional_call(module, params, args)


# ---------------------------------------------------------------------------------------------
# Norms

@dataclass(frozen=True)
class NormSpec:
    op: str                  # "layer_norm" or "rms_norm"
    eps_attr: Optional[str]  # the module attribute holding eps, or None (then `eps`)
    eps: float
    offset: float            # 1.0 for Gemma-style (1 + weight)

    def describe(self) -> str:
        w = "(1 + weight)" if self.offset else "weight"
        return f"{self.op}, {w}, eps={self.eps_attr or self.eps!r}"


def _eps_candidates(module):
    seen = []
    for key, value in vars(module).items():
        if not key.startswith("_") and isinstance(value, float) and 0.0 < value < 0.1:
            seen.append((key, value))
    return seen + [(None, e) for e in _COMMON_EPS if all(v != e for _, v in seen)]


def _cached(key_of):
    """Cache a recogniser's answer per class and configuration (`key_of(module)`, None: don't
    cache), so the 32 identical blocks of a model probe once. The probes use random parameters
    of the module's shapes, so the answer depends only on the class, its structure and its
    attributes, which the key holds."""
    def wrap(recognise):
        cache = {}

        def run(module):
            key = key_of(module)
            if key is None:
                return recognise(module)
            if key not in cache:
                cache[key] = recognise(module)
            return cache[key]
        run.cache = cache
        run.__doc__ = recognise.__doc__
        return run
    return wrap


def _norm_key(module):
    params = tuple((n, tuple(p.shape), p.dtype, p.device.type) for n, p in module.named_parameters(recurse=False))
    attrs = tuple(sorted((k, v) for k, v in vars(module).items()
                         if not k.startswith("_") and isinstance(v, (int, float, bool, str))))
    return type(module), params, attrs


def _mlp_key(module):
    children = []
    for name, c in module._modules.items():
        if c is None:
            return None
        children.append((name, type(c), tuple((n, tuple(p.shape), p.dtype, p.device.type)
                                            for n, p in c.named_parameters(recurse=False)),
                         tuple(sorted((k, v) for k, v in vars(c).items()
                                      if not k.startswith("_") and isinstance(v, (int, float, bool, str))))))
    return type(module), tuple(children)


@_cached(_norm_key)
def recognise_norm(module: torch.nn.Module) -> Optional[NormSpec]:
    params = dict(module.named_parameters(recurse=False))
    w = params.get("weight")
    if w is None or w.dim() != 1 or set(params) - {"weight", "bias"} or any(True for _ in module.children()):
        return None
    b = params.get("bias")
    if b is not None and b.shape != w.shape:
        return None
    n, device, g = w.shape[0], w.device, _generator()
    probe_params = {"weight": _randn(n, device=device, scale=0.5, shift=1.0, g=g)}
    if b is not None:
        probe_params["bias"] = _randn(n, device=device, scale=0.5, g=g)
    probes = [_randn(2, 3, n, device=device, scale=2.0, shift=0.5, g=g),
              _randn(2, 3, n, device=device, scale=1e-3, g=g)]
    try:
        wanted = [_call(module, probe_params, x) for x in probes]
    except Exception:
        return None
    ops = ("layer_norm",) if b is not None else ("rms_norm", "layer_norm")
    for op in ops:
        for offset in (0.0, 1.0):
            for eps_attr, eps in _eps_candidates(module):
                spec = NormSpec(op, eps_attr, eps, offset)
                if all(_close(norm_reference(spec, x, probe_params["weight"], probe_params.get("bias")), y)
                       for x, y in zip(probes, wanted)):
                    return spec
    return None


def norm_reference(spec: NormSpec, x, weight, bias):
    w = weight + spec.offset if spec.offset else weight
    if spec.op == "rms_norm":
        return F.rms_norm(x, (x.shape[-1],), w, spec.eps)
    return F.layer_norm(x, (x.shape[-1],), w, bias, spec.eps)


# ---------------------------------------------------------------------------------------------
# Activations: name -> (torch function of x, keyword arguments for the dlh op)

def _activation_candidates(module):
    slope = getattr(module, "negative_slope", 0.01)
    slope = float(slope) if isinstance(slope, (int, float)) else 0.01
    return {
        "gelu": lambda x: F.gelu(x),
        "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
        "silu": F.silu,
        "relu": F.relu,
        "leaky_relu": lambda x: F.leaky_relu(x, slope),
        "tanh": torch.tanh,
        "sigmoid": torch.sigmoid,
    }, slope


@dataclass(frozen=True)
class ActSpec:
    name: str               # gelu, gelu_tanh, silu, relu, leaky_relu, tanh, sigmoid
    negative_slope: float = 0.01
    inplace: bool = False

    def describe(self) -> str:
        return self.name + (f"(negative_slope={self.negative_slope})" if self.name == "leaky_relu" else "")


_EXACT_ACTS = {torch.nn.SiLU: "silu", torch.nn.ReLU: "relu", torch.nn.Tanh: "tanh", torch.nn.Sigmoid: "sigmoid"}


def recognise_activation(module) -> Optional[ActSpec]:
    """The activation a module (or a plain function such as F.relu) computes, or None."""
    t = type(module)
    inplace = bool(getattr(module, "inplace", False))
    if t in _EXACT_ACTS:
        return ActSpec(_EXACT_ACTS[t], inplace=inplace)
    if t is torch.nn.GELU:
        return ActSpec("gelu_tanh" if module.approximate == "tanh" else "gelu")
    if t is torch.nn.LeakyReLU:
        return ActSpec("leaky_relu", float(module.negative_slope), inplace)
    functions = {F.relu: "relu", F.gelu: "gelu", F.silu: "silu", torch.tanh: "tanh", torch.sigmoid: "sigmoid"}
    if module in functions:
        return ActSpec(functions[module])
    if not isinstance(module, torch.nn.Module) or not is_activation_like(module):
        return None
    candidates, slope = _activation_candidates(module)
    device = _device_of(module)
    x = torch.cat([torch.linspace(-8, 8, 801), torch.randn(200, generator=_generator()) * 3]).to(device)
    try:
        with torch.no_grad():
            y = module(x.clone())
    except Exception:
        return None
    for name, fn in candidates.items():
        if _close(fn(x), y):
            return ActSpec(name, slope, inplace)
    return None


def activation_reference(spec: ActSpec, x):
    candidates, _ = _activation_candidates(type("S", (), {"negative_slope": spec.negative_slope})())
    return candidates[spec.name](x)


# ---------------------------------------------------------------------------------------------
# Linear layers: (weight as F.linear takes it, bias) of nn.Linear and of GPT-2's Conv1D.

def linear_args(module):
    if isinstance(module, torch.nn.Linear):
        return module.weight, module.bias
    return module.weight.t(), module._parameters.get("bias")  # Conv1D: x @ W + b, W (in, out)


def _linear_dims(module):
    w, _ = linear_args(module)
    return w.shape[1], w.shape[0]  # (in, out)


def _confirm_linear(module) -> bool:
    """A linear-like module computes F.linear(x, *linear_args(module))."""
    if isinstance(module, torch.nn.Linear) and type(module).forward is torch.nn.Linear.forward:
        return True
    try:
        d_in, _ = _linear_dims(module)
        x = _randn(3, d_in, device=module.weight.device, g=_generator()).to(module.weight.dtype)
        with torch.no_grad():
            return _close(module(x), F.linear(x, *linear_args(module)))
    except Exception:
        return False


# ---------------------------------------------------------------------------------------------
# MLPs

@dataclass(frozen=True)
class MLPSpec:
    form: str                   # "act_in" act(in(x)); "out_act_in" out(act(in(x))); "gated"; "gated_fused"
    act_name: str               # the activation child's attribute name
    act: ActSpec
    linears: tuple              # attribute names: (in,) / (in, out) / (gate, up, down) / (gate_up, down)
    drop_before_out: Optional[str] = None   # dropout child applied just before the out/down linear
    drop_after: Optional[str] = None        # dropout child applied to the result

    def describe(self) -> str:
        a = self.act.describe()
        if self.form == "act_in":
            return f"{a}({self.linears[0]}(x)) -> DF.linear(activation={self.act.name!r})"
        if self.form == "out_act_in":
            return f"{self.linears[1]}({a}({self.linears[0]}(x))) -> DF.linear(activation={self.act.name!r}) + {self.linears[1]}"
        op = "swiglu" if self.act.name == "silu" else "gated_gelu"
        if self.form == "gated":
            g, u, d = self.linears
            return f"{d}({a}({g}(x)) * {u}(x)) -> DF.{op} + {d}"
        gu, d = self.linears
        return f"{d}({a}(gate) * up), gate, up = {gu}(x).chunk(2) -> DF.{op} + {d}"


_GATED_ACTS = ("silu", "gelu", "gelu_tanh")
_LINEAR_ACTS = ("relu", "leaky_relu", "silu", "gelu", "gelu_tanh", "tanh", "sigmoid")


def mlp_reference(spec: MLPSpec, module, x, act_fn, linear_fn):
    """The MLP computed the way `spec` says, with `act_fn(spec.act, z)` as the activation and
    `linear_fn(module, x)` as each linear: the template both the probe and the patched forward run."""
    sub = module._modules
    drop = (lambda name, h: sub[name](h) if name else h)
    if spec.form == "act_in":
        return drop(spec.drop_after, act_fn(spec.act, linear_fn(sub[spec.linears[0]], x)))
    if spec.form == "out_act_in":
        h = act_fn(spec.act, linear_fn(sub[spec.linears[0]], x))
        return drop(spec.drop_after, sub[spec.linears[1]](drop(spec.drop_before_out, h)))
    if spec.form == "gated":
        g, u, d = spec.linears
        h = act_fn(spec.act, sub[g](x)) * sub[u](x)
    else:
        gu, d = spec.linears
        gate, up = sub[gu](x).chunk(2, -1)
        h = act_fn(spec.act, gate) * up
    return drop(spec.drop_after, sub[d](drop(spec.drop_before_out, h)))


def _candidate_specs(module, act_name, act):
    children = module._modules
    linears = [n for n, c in children.items() if c is not None and is_linear_like(c)]
    drops = [n for n, c in children.items() if isinstance(c, torch.nn.Dropout)]
    if len(drops) > 2:
        return []
    # (dropout before the out linear, dropout on the result): timm's Mlp has one of each
    drop_places = [(None, None)] + [(d, None) for d in drops] + [(None, d) for d in drops]
    if len(drops) == 2:
        drop_places += [(drops[0], drops[1]), (drops[1], drops[0])]
    dims = {n: _linear_dims(children[n]) for n in linears}
    specs = []
    if len(linears) == 1 and act.name in _LINEAR_ACTS:
        specs += [MLPSpec("act_in", act_name, act, (linears[0],), None, after) for _, after in drop_places]
    if len(linears) == 2:
        for a, b in ((linears[0], linears[1]), (linears[1], linears[0])):
            if act.name in _LINEAR_ACTS and dims[a][1] == dims[b][0]:
                specs += [MLPSpec("out_act_in", act_name, act, (a, b), before, after) for before, after in drop_places]
            if act.name in _GATED_ACTS and dims[a][1] == 2 * dims[b][0]:
                specs += [MLPSpec("gated_fused", act_name, act, (a, b), before, after) for before, after in drop_places]
    if len(linears) == 3 and act.name in _GATED_ACTS:
        for d in linears:
            g_u = [n for n in linears if n != d]
            for g, u in (g_u, g_u[::-1]):
                if dims[g] == dims[u] and dims[g][1] == dims[d][0]:
                    specs += [MLPSpec("gated", act_name, act, (g, u, d), before, after)
                              for before, after in drop_places]
    return specs


@_cached(_mlp_key)
def recognise_mlp(module: torch.nn.Module) -> Optional[MLPSpec]:
    children = module._modules
    acts = [(n, c) for n, c in children.items() if c is not None and is_activation_like(c)]
    if len(acts) != 1:
        return None
    act_name, act_module = acts[0]
    act = recognise_activation(act_module)
    if act is None or act.inplace:
        return None
    if not all(_confirm_linear(c) for c in children.values() if c is not None and is_linear_like(c)):
        return None
    specs = _candidate_specs(module, act_name, act)
    if not specs:
        return None
    # random parameters of the module's shapes (float32), through functional_call: the module is
    # not touched, and weights that happen to be degenerate (a zero-initialised out projection)
    # cannot make two templates look alike
    g = _generator()
    params = {}
    for name, p in module.named_parameters():
        scale = 1.0 / max(p.shape) ** 0.5 if p.dim() >= 2 else 0.1
        params[name] = (torch.randn(p.shape, generator=g) * scale).to(p.device)
    device = next(iter(params.values())).device
    template = _Template(module)
    drops = [c for c in children.values() if isinstance(c, torch.nn.Dropout)]
    # dropout made a visible, deterministic x2 (x3 for a second one) for the probe, so its place
    # is part of the match
    handles = [d.register_forward_hook(lambda m, i, o, f=2.0 + k: i[0] * f) for k, d in enumerate(drops)]
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        with torch.no_grad():
            for d_in in sorted({_linear_dims(c)[0] for c in children.values() if c is not None and is_linear_like(c)}):
                x = _randn(2, 3, d_in, device=device, g=g)
                try:
                    wanted = torch.func.functional_call(module, params, (x,))
                except Exception:
                    continue
                for spec in specs:
                    template.spec = spec
                    try:
                        got = torch.func.functional_call(template, {"inner." + k: v for k, v in params.items()}, (x,))
                    except Exception:
                        continue
                    if _close(got, wanted):
                        return spec
                return None
    finally:
        for h in handles:
            h.remove()
        for m, mode in modes:
            m.training = mode
    return None


class _Template(torch.nn.Module):
    """An MLP's candidate template as a module over it, so functional_call swaps the same
    random parameters in for both."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.spec = None

    def forward(self, x):
        return mlp_reference(self.spec, self.inner, x, activation_reference,
                             lambda m, h: F.linear(h, *linear_args(m)))


def describe_failure(kind: str) -> str:
    return {"norm": "a norm-like module whose forward matched no LayerNorm/RMSNorm variant on the probe",
            "activation": "an activation whose forward matched none of gelu, gelu_tanh, silu, relu, "
                          "leaky_relu, tanh, sigmoid on the probe",
            "mlp": "an MLP-like module whose forward matched no linear/activation/gated template on the probe",
            }.get(kind, "unknown structure")


__all__ = ["ActSpec", "MLPSpec", "NormSpec", "activation_reference", "linear_args", "mlp_reference",
           "norm_reference", "recognise_activation", "recognise_mlp", "recognise_norm"]
