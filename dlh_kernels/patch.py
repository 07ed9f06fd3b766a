"""`dlh.patch(model)`: run a model's hot spots on dlh_kernels without rewriting it.

What it does, in place (each step reversible by `dlh.unpatch`, each reported):

- swaps modules of these exact types for their `dlh.nn` subclasses: LayerNorm, RMSNorm,
  GroupNorm, GELU, SiLU, ReLU, LeakyReLU, MultiheadAttention, Conv2d, TransformerEncoderLayer
  (which then never takes torch's fused fast path, so its swapped parts run);
- recognises by structure the norms, activations and MLPs of classes it has never seen (see
  `dlh_kernels._recognize`: LlamaRMSNorm, T5LayerNorm, NewGELUActivation, LlamaMLP, GPT2MLP,
  BertIntermediate...): the variant is read from the module and confirmed on probe inputs against
  its own forward; the module becomes an instance of a subclass of its own class (isinstance
  holds, same __dict__) whose forward calls the matching dlh op. Subclasses of the torch types
  above that keep the parent's forward are swapped like the parent; those that override it go
  through recognition (timm's LayerNorm);
- fuses pairs adjacent in an ``nn.Sequential``: Conv2d + ReLU/SiLU/GELU/LeakyReLU (the
  activation in the conv's epilogue), GroupNorm + SiLU, Linear + GELU (`dlh.nn.LinearGELU`) and
  Linear + ReLU/LeakyReLU/SiLU/Tanh/Sigmoid (`dlh.nn.Linear(activation=...)`); the activation's
  slot holds an ``nn.Identity`` until `unpatch`, so the Sequential keeps its indices;
- fuses GroupNorm + SiLU inside a block's own forward (diffusers' ResnetBlock2D:
  ``h = self.norm1(h); h = self.nonlinearity(h)``) where the forward's source proves the norm's
  output goes to the activation and nowhere else (`_handoff_pairs`); the shared activation
  module keeps running everywhere else (the time embedding);
- attention: in transformers models, a "dlh" function registered through transformers'
  ``AttentionInterface`` (and its mask function through ``AttentionMaskInterface``) and the model
  switched to it with ``set_attn_implementation`` when it ran "sdpa"; in diffusers, every
  ``Attention`` gets a processor that runs its own processor with SDPA on dlh; elsewhere the calls
  of ``F.scaled_dot_product_attention`` in a module's call tree are routed (`_Router`);
- routes the functional calls (``F.gelu``, ``F.silu``, ``F.relu``, ``F.leaky_relu``,
  ``F.layer_norm``, ``F.rms_norm``, ``F.group_norm``, ``F.conv2d``, SDPA) made in the call tree of a
  module whose code names them.

The state_dict is identical, tensor for tensor: a replacement holds the very same Parameter and
buffer objects (its ``__dict__`` is a copy of the old one's), and an optimizer built before the
patch keeps updating the parameters the model uses. No global monkey-patching: nothing in torch,
transformers or diffusers is changed for any other model (the registered "dlh" attention name is
new and used only by the models patched to it).

Patching twice is idempotent: a second `patch` leaves what the first one patched (reported as
"already patched"); to change the backend, `unpatch` first. ``dry_run=True`` reports what would
be done and changes nothing.
"""
from __future__ import annotations

import ast
import dis
import inspect
import textwrap
import types
import weakref
from dataclasses import dataclass, field
from typing import Iterable, NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from . import _backend, _recognize
from . import coverage as _coverage
from . import functional as DF
from . import nn as dnn

# Exact torch module class -> (op family, dlh replacement class).
_SWAPS = {
    torch.nn.LayerNorm: ("layer_norm", dnn.LayerNorm),
    torch.nn.RMSNorm: ("rms_norm", dnn.RMSNorm),
    torch.nn.GELU: ("gelu", dnn.GELU),
    torch.nn.SiLU: ("silu", dnn.SiLU),
    torch.nn.ReLU: ("relu", dnn.ReLU),
    torch.nn.LeakyReLU: ("leaky_relu", dnn.LeakyReLU),
    torch.nn.GroupNorm: ("group_norm", dnn.GroupNorm),
    # need_weights=True (torch's default) falls back to torch inside; nn.TransformerEncoderLayer
    # and most models call it with need_weights=False, which runs our kernel
    torch.nn.MultiheadAttention: ("scaled_dot_product_attention", dnn.MultiheadAttention),
    torch.nn.Conv2d: ("conv2d", dnn.Conv2d),
}
# Modules swapped only together with the activation that follows them in a Sequential.
_FUSE_ONLY = {torch.nn.Linear: ("linear", dnn.Linear)}
_SDPA = "scaled_dot_product_attention"
# the dlh op family that runs each recognised activation on its own, and in a Linear's epilogue
_ACT_FAMILY = {"gelu": "gelu", "gelu_tanh": "gelu", "silu": "silu", "relu": "relu", "leaky_relu": "leaky_relu"}
_LINEAR_ACTS = ("relu", "leaky_relu", "silu", "gelu", "gelu_tanh", "tanh", "sigmoid")
OPS = frozenset({"layer_norm", "rms_norm", "gelu", "silu", "relu", "leaky_relu", "group_norm",
                 "linear_gelu", "linear", "swiglu", "gated_gelu", "conv2d", _SDPA})

_ORIGINAL = "_dlh_original"          # on a replacement (or placeholder): the module it replaced
_ROUTER = "_dlh_router"               # on a module whose functional calls are routed: (router, hook ids)
_PROCESSOR = "_dlh_processor"         # on a diffusers Attention: the processor it had
_ATTN_IMPL = "_dlh_attn_implementation"  # on a transformers model: the implementation it had
_SPEC = "_dlh_spec"                   # on a recognised replacement: what it computes
_HANDOFF = "_dlh_handoff"             # on a norm that fuses the activation after it: that activation


# ---------------------------------------------------------------------------------------------
# The report.

class Replaced(NamedTuple):
    path: str        # qualified module name ("blocks.0.ln_1"; "" is the model itself)
    from_type: str   # the class it was
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
    how: str = "F.scaled_dot_product_attention"   # what is routed


@dataclass
class PatchReport:
    """What `dlh.patch` did. ``replaced``: modules swapped (and activations fused away);
    ``routed``: modules whose calls now run on dlh without a swap (functional calls in their call
    tree, a transformers attention function, a diffusers attention processor); ``left``: every
    hot spot (norm, activation, attention, conv, MLP) and supported-looking module it did not
    take, each with the reason. ``dry_run``: nothing was changed."""
    replaced: list = field(default_factory=list)
    left: list = field(default_factory=list)
    routed: list = field(default_factory=list)
    backend: Optional[str] = None
    dry_run: bool = False

    def reasons(self) -> dict:
        return {r.path: r.reason for r in self.left}

    def __str__(self) -> str:
        def table(header, rows):
            rows = [tuple("<model>" if i == 0 and not c else str(c) for i, c in enumerate(r)) for r in rows]
            widths = [max(len(x) for x in col) for col in zip(header, *rows)]
            fmt = "  " + "  ".join(f"{{:<{w}}}" for w in widths)
            return [fmt.format(*header).rstrip(), fmt.format(*("-" * w for w in widths))] + \
                   [fmt.format(*r).rstrip() for r in rows]

        verb = "would replace" if self.dry_run else "replaced"
        lines = [f"dlh.patch (backend={self.backend or 'default'}{', dry run' if self.dry_run else ''}): "
                 f"{verb} {len(self.replaced)} module(s), {len(self.routed)} module(s) route "
                 f"calls to dlh, left {len(self.left)}"]
        if self.replaced:
            lines += table(("module", "was", "now", "op"), self.replaced)
        if self.routed:
            lines += table(("module", "type", "routes", "to"),
                           [(p, t, how, f"DF.{op}") for p, t, op, how in self.routed])
        if self.left:
            lines += table(("left", "type", "why"), self.left)
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Functional calls routed to DF: F.<name>(...) -> DF.<op>(...), while a routed module runs.

def _route_gelu(input, approximate="none"):
    return DF.gelu, (input, approximate), {}, "gelu"


def _route_silu(input, inplace=False):
    return DF.silu, (input,), {}, "silu" if not inplace else None


def _route_relu(input, inplace=False):
    return DF.relu, (input,), {}, "relu" if not inplace else None


def _route_leaky_relu(input, negative_slope=0.01, inplace=False):
    return DF.leaky_relu, (input, negative_slope), {}, "leaky_relu" if not inplace else None


def _route_layer_norm(input, normalized_shape, weight=None, bias=None, eps=1e-5):
    return DF.layer_norm, (input, normalized_shape, weight, bias, eps), {}, "layer_norm"


def _route_rms_norm(input, normalized_shape, weight=None, eps=None):
    return DF.rms_norm, (input, normalized_shape, weight, eps), {}, "rms_norm"


def _route_group_norm(input, num_groups, weight=None, bias=None, eps=1e-5):
    return DF.group_norm, (input, num_groups, weight, bias, eps), {}, "group_norm"


def _route_conv2d(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    return DF.conv2d, (input, weight, bias, stride, padding, dilation, groups), {}, "conv2d"


def _route_sdpa(*args, **kwargs):
    return DF.scaled_dot_product_attention, args, kwargs, _SDPA


_ROUTES = {
    F.scaled_dot_product_attention: _route_sdpa, F.gelu: _route_gelu, F.silu: _route_silu,
    F.relu: _route_relu, F.leaky_relu: _route_leaky_relu, F.layer_norm: _route_layer_norm,
    F.rms_norm: _route_rms_norm, F.group_norm: _route_group_norm, F.conv2d: _route_conv2d,
}
_ROUTED_NAMES = {f.__name__: f for f in _ROUTES}


class _Router(TorchFunctionMode):
    """While active, the functional calls in ``_ROUTES`` of the wanted families run on DF (with
    ``backend``); every other torch call passes through unchanged. A call the chosen backend
    cannot run (explicit backend; the `dlh.<op>: backend ... cannot run this call` error) runs
    on torch instead, as the un-patched model would.

    Active only between a routed module's forward pre-hook and its forward hook (registered with
    ``always_call=True``, so an exception in forward still pops it): other code, and the same
    function called outside the model, is untouched. torch.compile traces through the mode.
    Costs in eager mode: every torch call inside a routed forward takes one Python hop through
    `__torch_function__` (a few microseconds); DF's own glue runs with every router off
    (`_unrouted`), nested ones included. Known limit: torch <= 2.13's dynamo cannot trace
    ``Tensor.unflatten`` under any TorchFunctionMode (pytorch#179853).
    """

    def __init__(self, backend: Optional[str], families: frozenset = frozenset(OPS)):
        super().__init__()
        self.backend = backend
        self.families = families

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        route = _ROUTES.get(func)
        if route is not None:
            try:
                fn, a, k, family = route(*args, **kwargs)
            except TypeError:
                family = None
            if family in self.families:
                # this mode is off in here, so DF's own torch calls are not routed back to us;
                # the routers of enclosing modules are taken off too (below)
                try:
                    return _unrouted(fn, a, k, self.backend)
                except RuntimeError as exc:
                    if "cannot run this call" not in str(exc):
                        raise
        return func(*args, **kwargs)


_is_compiling = torch.compiler.is_compiling
_stack_len = torch._C._len_torch_function_stack
_stack_at = torch._C._get_function_stack_at
_stack_pop = torch._C._pop_torch_function_stack
_stack_push = torch._C._push_on_torch_function_stack


def _unrouted(fn, args, kwargs, backend):
    """fn(*args, **kwargs, backend=backend) with the routers on top of the torch function mode
    stack popped for the call. A routed module inside another (a decoder layer's MLP) stacks
    two routers; torch pops only the innermost while its handler runs, so without this every
    tensor method of DF's glue would take a Python hop through the outer one's
    `__torch_function__` (~20 us per routed call, review 2026-12 T12). Modes a user pushed
    below them stay. Under torch.compile dynamo tracks the stack itself: left as it is."""
    n = _stack_len()
    if not n or _is_compiling() or not isinstance(_stack_at(n - 1), _Router):
        return fn(*args, **kwargs, backend=backend)
    popped = []
    while n and isinstance(_stack_at(n - 1), _Router):
        popped.append(_stack_pop())
        n -= 1
    try:
        return fn(*args, **kwargs, backend=backend)
    finally:
        for mode in reversed(popped):
            _stack_push(mode)


def _functions_of(cls) -> Iterable[types.CodeType]:
    """The code of every function defined by `cls` and its bases below nn.Module (forward and
    the helpers it may call), nested functions and lambdas included, and of the module-level
    functions of the class's own file that this code calls (``attention(q, k, v)`` defined
    next to the model), two levels deep."""
    seen = set()
    for klass in cls.__mro__:
        if klass is torch.nn.Module or klass is object:
            break
        for attr in vars(klass).values():
            fn = inspect.unwrap(getattr(attr, "__func__", attr))
            if isinstance(getattr(fn, "__code__", None), types.CodeType):
                yield from _code_tree(fn, klass.__module__, seen, depth=2)


def _code_tree(fn, home: str, seen: set, depth: int):
    stack = [fn.__code__]
    globals_ = getattr(fn, "__globals__", {})
    while stack:
        code = stack.pop()
        if code in seen:
            continue
        seen.add(code)
        yield code
        stack += [c for c in code.co_consts if isinstance(c, types.CodeType)]
        if depth > 0:
            for name in code.co_names:
                helper = globals_.get(name)
                if (isinstance(helper, types.FunctionType) and helper.__module__ == home
                        and helper.__code__ not in seen):
                    yield from _code_tree(helper, home, seen, depth - 1)


def _routed_calls(module: torch.nn.Module) -> set:
    """The families of the functional calls the module's class names in its own code (names in
    the bytecode, e.g. ``F.gelu`` or the bare imported name): a static look, it never runs the
    model. dlh's own modules call DF, never F, and are skipped."""
    cls = type(module)
    if _coverage.is_dlh_class(cls):
        return set()
    if cls not in _ROUTED_CACHE:
        names = set()
        for code in _functions_of(cls):
            if not any(n in _ROUTED_NAMES for n in code.co_names):
                continue
            previous = None
            for ins in dis.get_instructions(code):
                if ins.argval in _ROUTED_NAMES and (
                        ins.opname == "LOAD_GLOBAL"  # the bare imported name
                        or (ins.opname in ("LOAD_ATTR", "LOAD_METHOD") and previous in _FUNCTIONAL_MODULES)):
                    names.add(ins.argval)
                previous = ins.argval if ins.opname in ("LOAD_GLOBAL", "LOAD_ATTR", "LOAD_NAME") else None
        _ROUTED_CACHE[cls] = frozenset(_route_family(n) for n in names)
    return set(_ROUTED_CACHE[cls])


# the names a functional call is reached through: F.gelu, nn.functional.gelu, torch.nn.functional.gelu
_FUNCTIONAL_MODULES = ("F", "functional", "nnf", "fn")
_ROUTED_CACHE: dict = {}


def _route_family(name: str) -> str:
    return {"scaled_dot_product_attention": _SDPA}.get(name, name)


def _add_router(module: torch.nn.Module, router: _Router) -> None:
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
# transformers and diffusers attention.

_HF_NAME = "dlh"


def _hf_attention(backend):
    def attention(module, query, key, value, attention_mask, **kwargs):
        from transformers.integrations.sdpa_attention import sdpa_attention_forward
        # transformers' own SDPA integration (GQA, padding masks, position bias), its one
        # F.scaled_dot_product_attention call on dlh
        with _Router(backend, frozenset({_SDPA})):
            return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    return attention


def _hf_name(backend: Optional[str]) -> str:
    """The AttentionInterface key for a backend ("dlh", "dlh_triton", ...), registered once."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    name = _HF_NAME if backend is None else f"{_HF_NAME}_{backend}"
    if name not in AttentionInterface._global_mapping:
        AttentionInterface.register(name, _hf_attention(backend))
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    return name


def _is_hf_model(module) -> bool:
    cls = type(module)
    return any(k.__name__ == "PreTrainedModel" and k.__module__.startswith("transformers")
               for k in cls.__mro__) and hasattr(module, "set_attn_implementation")


def _is_diffusers_attention(module) -> bool:
    return (type(module).__module__.startswith("diffusers") and hasattr(module, "set_processor")
            and hasattr(module, "processor"))


class DlhAttnProcessor:
    """A diffusers attention processor that runs the module's own processor with its
    F.scaled_dot_product_attention call on dlh. `dlh.patch` sets one on every diffusers
    ``Attention``; `dlh.unpatch` puts the original back."""

    def __init__(self, processor, backend: Optional[str] = None):
        self.processor = processor
        self.backend = backend
        # diffusers reads the processor's __call__ signature to filter cross_attention_kwargs
        self.__call__ = types.MethodType(_processor_call(processor), self)

    def __call__(self, attn, *args, **kwargs):  # replaced per instance in __init__
        return self.__dict__["__call__"](attn, *args, **kwargs)


def _processor_call(processor):
    def call(self, *args, **kwargs):
        with _Router(self.backend, frozenset({_SDPA})):
            return self.processor(*args, **kwargs)
    try:
        sig = inspect.signature(processor.__call__)
        call.__signature__ = sig.replace(parameters=[inspect.Parameter("self", inspect.Parameter.POSITIONAL_ONLY),
                                                     *sig.parameters.values()])
    except (TypeError, ValueError):
        pass
    return call


# ---------------------------------------------------------------------------------------------
# Replacements for recognised modules: a subclass of the module's own class.

_SUBCLASSES: dict = {}


def _subclass(cls, mixin):
    """The class ``Dlh<cls>``: `mixin`'s forward over `cls` (made once per pair). Its instances
    pickle as (cls, mixin, state), so `torch.save(model)` of a patched model works and loads
    (patched) wherever both classes import."""
    key = (cls, mixin)
    if key not in _SUBCLASSES:
        _SUBCLASSES[key] = type(f"Dlh{cls.__name__}", (mixin, cls),
                                {"__module__": __name__, "__qualname__": f"Dlh{cls.__name__}",
                                 "_dlh_base": cls, "_dlh_mixin": mixin, "__reduce_ex__": _reduce_ex})
    return _SUBCLASSES[key]


def _reduce_ex(self, protocol):
    state = {k: v for k, v in self.__dict__.items() if k != "_dlh_pending"}  # a weakref, transient
    return _rebuild, (type(self)._dlh_base, type(self)._dlh_mixin), state


def _rebuild(cls, mixin):
    new_cls = _subclass(cls, mixin)
    return new_cls.__new__(new_cls)


def _run_activation(spec: "_recognize.ActSpec", x: torch.Tensor, backend) -> torch.Tensor:
    if spec.name in ("gelu", "gelu_tanh"):
        return DF.gelu(x, "tanh" if spec.name == "gelu_tanh" else "none", backend=backend)
    if spec.name == "silu":
        return DF.silu(x, backend=backend)
    if spec.name == "relu":
        return DF.relu(x, backend=backend)
    return DF.leaky_relu(x, spec.negative_slope, backend=backend)


class _NormForward:
    """The forward of a recognised norm (a LayerNorm / RMSNorm variant) on DF. Mixed dtypes
    (input and weight differ: the original's own casting rules decide the output dtype) and
    extra arguments run the original forward."""
    _dlh_kind = "norm"
    backend: Optional[str] = None

    def forward(self, x, *args, **kwargs):
        spec = self.__dict__[_SPEC]
        weight = self.weight
        if args or kwargs or not isinstance(x, torch.Tensor) or x.dtype != weight.dtype:
            return super().forward(x, *args, **kwargs)
        eps = getattr(self, spec.eps_attr) if spec.eps_attr else spec.eps
        w = weight + spec.offset if spec.offset else weight
        n = (weight.shape[0],)
        if spec.op == "rms_norm":
            return DF.rms_norm(x, n, w, eps, backend=self.backend)
        return DF.layer_norm(x, n, w, self._parameters.get("bias"), eps, backend=self.backend)


class _ActivationForward:
    _dlh_kind = "activation"
    backend: Optional[str] = None

    def forward(self, x, *args, **kwargs):
        spec = self.__dict__[_SPEC]
        if args or kwargs or not isinstance(x, torch.Tensor):
            return super().forward(x, *args, **kwargs)
        if dnn._handed_over(self, x):
            return x
        out = _run_activation(spec, x, self.backend)
        return x.copy_(out) if spec.inplace else out


class _MLPForward:
    """The forward of a recognised MLP: its template (see `_recognize.MLPSpec`) with the
    activation on dlh (in the first linear's epilogue, or the gated product as one op)."""
    _dlh_kind = "mlp"
    backend: Optional[str] = None

    def forward(self, x, *args, **kwargs):
        spec = self.__dict__[_SPEC]
        first = self._modules[spec.linears[0]]
        if args or kwargs or not isinstance(x, torch.Tensor) or x.dtype != first.weight.dtype:
            return super().forward(x, *args, **kwargs)
        backend = self.backend
        if spec.form in ("act_in", "out_act_in"):
            def linear_fn(m, h):
                if m is first:  # the activation is already in this linear's epilogue
                    w, b = _recognize.linear_args(m)
                    return DF.linear(h, w, b, activation=spec.act.name,
                                     negative_slope=spec.act.negative_slope, backend=backend)
                return m(h)
            return _recognize.mlp_reference(spec, self, x, lambda a, z: z, linear_fn)

        def gated(act, gate, up=None):
            if act.name == "silu":
                return DF.swiglu(gate, up, backend=backend)
            return DF.gated_gelu(gate, up, "tanh" if act.name == "gelu_tanh" else "none", backend=backend)

        sub = self._modules
        if spec.form == "gated":
            g, u, d = spec.linears
            h = gated(spec.act, sub[g](x), sub[u](x))
        else:
            gu, d = spec.linears
            h = gated(spec.act, sub[gu](x))
        if spec.drop_before_out:
            h = sub[spec.drop_before_out](h)
        h = sub[d](h)
        return sub[spec.drop_after](h) if spec.drop_after else h


class _PassThrough:
    """An activation of a class dlh has no op for on its own (Tanh, Sigmoid) that passes through
    the output of the linear it was fused into; anything else runs its own forward."""
    _dlh_kind = "activation"

    def forward(self, x, *args, **kwargs):
        if not args and not kwargs and dnn._handed_over(self, x):
            return x
        return super().forward(x, *args, **kwargs)


class _LinearHandoff(dnn.Linear):
    """Linear + activation as one DF.linear inside a block's own forward; the output is handed
    to the activation module (`_HANDOFF`), which passes it through."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        out = super().forward(input)
        self.__dict__[_HANDOFF].__dict__["_dlh_pending"] = weakref.ref(out)
        return out


class _GroupNormHandoff(dnn.GroupNorm):
    """GroupNorm + SiLU as one kernel inside a block's own forward: the output is handed to the
    activation module (`_HANDOFF`), which passes that one tensor through (see nn._handed_over)."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        out = super().forward(input)
        self.__dict__[_HANDOFF].__dict__["_dlh_pending"] = weakref.ref(out)
        return out


# ---------------------------------------------------------------------------------------------
# GroupNorm + SiLU inside a block's forward, proven from its source.

def _static_value(node, module):
    """The value of an ``if`` test built only of ``self.<attr>`` and constants (compared, not-ed,
    and-ed), evaluated on the module; None when it depends on anything else."""
    allowed = (ast.Compare, ast.BoolOp, ast.UnaryOp, ast.Attribute, ast.Name, ast.Constant, ast.Load,
               ast.Eq, ast.NotEq, ast.Is, ast.IsNot, ast.In, ast.NotIn, ast.Not, ast.And, ast.Or)
    for n in ast.walk(node):
        if not isinstance(n, allowed) or (isinstance(n, ast.Name) and n.id != "self"):
            return None
    try:
        value = eval(compile(ast.Expression(node), "<test>", "eval"), {}, {"self": module})  # noqa: S307
    except Exception:
        return None
    return bool(value)


def _flatten(stmts, module) -> list:
    out = []
    for s in stmts:
        if isinstance(s, ast.If):
            value = _static_value(s.test, module)
            if value is not None:
                out += _flatten(s.body if value else s.orelse, module)
                continue
        out.append(s)
    return out


def _self_call(stmt):
    """(target name, attribute, argument) of ``<name> = self.<attr>(<arg>)``, else None."""
    if not (isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Name)):
        return None
    call = stmt.value
    if not (isinstance(call, ast.Call) and len(call.args) == 1 and not call.keywords
            and isinstance(call.func, ast.Attribute) and isinstance(call.func.value, ast.Name)
            and call.func.value.id == "self"):
        return None
    return stmt.targets[0].id, call.func.attr, call.args[0]


def _handoff_pairs(module: torch.nn.Module) -> list:
    """(norm attribute, activation attribute) pairs of the module's forward where the source
    proves ``h = self.<norm>(...)`` is followed at once by ``h = self.<act>(h)`` (after the ifs
    on the module's own attributes are resolved) and the norm is called nowhere else."""
    try:
        src = textwrap.dedent(inspect.getsource(type(module).forward))
        fn = ast.parse(src).body[0]
    except (OSError, TypeError, SyntaxError, IndexError):
        return []
    flat = _flatten(fn.body, module)
    uses = {}
    for stmt in flat:
        for n in ast.walk(stmt):
            if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id == "self":
                uses[n.attr] = uses.get(n.attr, 0) + 1
    pairs = []
    for a, b in zip(flat, flat[1:]):
        first, second = _self_call(a), _self_call(b)
        if (first and second and isinstance(second[2], ast.Name) and second[2].id == first[0]
                and second[0] == first[0] and uses.get(first[1]) == 1):
            pairs.append((first[1], second[1]))
    return pairs


def _handoff_target(block, act_name: str, backend):
    """The activation module of a handoff, made able to pass the fused output through: dlh's
    activations and recognised ones already are; others (Tanh, Sigmoid) get `_PassThrough`."""
    act = block._modules[act_name]
    if _coverage.is_dlh_class(type(act)):
        return act
    return _swap(block, act_name, _subclass(type(act), _PassThrough), {"backend": backend})


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
    elif family == "linear":
        spec = _recognize.recognise_activation(module)
        if spec is None or spec.inplace:
            return None
        if spec.name in ("gelu", "gelu_tanh") and t is torch.nn.GELU:
            return {"approximate": module.approximate}  # dlh.nn.LinearGELU
        if spec.name in _LINEAR_ACTS and spec.name in _supported_linear_acts():
            return {"activation": spec.name, "negative_slope": spec.negative_slope}
    return None


def _supported_linear_acts() -> tuple:
    from .ops.linear import ACTIVATIONS
    return tuple(a for a in ACTIVATIONS if a is not None)


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
    if family in ("silu", "relu"):
        return family, (x(1),), {}
    if family == "leaky_relu":
        return family, (x(1), m.negative_slope), {}
    if family == "group_norm":
        return family, (x(1, m.num_channels, 1), m.num_groups, m.weight, m.bias, m.eps), \
            {"activation": attrs.get("activation")}
    if family == "linear_gelu":
        return family, (x(1, m.in_features), m.weight, m.bias, attrs["approximate"]), {}
    if family == "linear":
        return family, (x(1, m.in_features), m.weight, m.bias), \
            {"activation": attrs.get("activation"), "negative_slope": attrs.get("negative_slope", 0.01)}
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
    if family == _SDPA and (module.bias_k is not None or module.add_zero_attn):
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


def _dtype_reason(module, backend) -> Optional[str]:
    """For recognised modules: a parameter dtype the explicit backend cannot take."""
    if backend not in ("triton", "cuda"):
        return None
    p = next((p for p in module.parameters() if p.is_floating_point()), None)
    if p is not None:
        why = _backend.dtype_reason(backend, p.dtype, "parameters")
        if why:
            return f"backend {backend!r} cannot run this configuration: {why}"
    return None


# ---------------------------------------------------------------------------------------------
# patch / unpatch.

_STRUCTURAL = {"norm": ("layer_norm", "rms_norm"), "activation": ("gelu", "silu", "relu", "leaky_relu"),
               "mlp": ("linear", "swiglu", "gated_gelu")}


def _mlp_families(spec) -> set:
    if spec.form in ("act_in", "out_act_in"):
        return {"linear"}
    return {"swiglu" if spec.act.name == "silu" else "gated_gelu"}


def patch(model: torch.nn.Module, *, ops: Optional[Iterable[str]] = None,
          backend: Optional[str] = None, dry_run: bool = False) -> PatchReport:
    """Run the supported parts of `model` on dlh kernels (in place); return what was done.

    ops: op families to patch, among ``dlh.patch.OPS`` ("layer_norm", "rms_norm", "gelu",
    "silu", "relu", "leaky_relu", "group_norm" (and GroupNorm + SiLU), "linear_gelu" (Linear +
    GELU), "linear" (Linear + another activation, and MLPs whose activation goes into their first
    linear), "swiglu" / "gated_gelu" (gated MLPs), "conv2d" (and its fused activations),
    "scaled_dot_product_attention" (attention modules, functional SDPA calls)); None for all.
    backend: the backend the replacements use (None: the default current at each call).
    dry_run: report what would be done, change nothing. Idempotent: what an earlier call
    patched is left as it is (and reported); `unpatch` first to patch with another backend.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"dlh.patch: model must be a torch.nn.Module, got {type(model).__name__}")
    if backend is not None:
        _backend._check_name(backend)
    wanted = OPS if ops is None else {ops} if isinstance(ops, str) else set(ops)
    unknown = wanted - OPS
    if unknown:
        raise ValueError(f"dlh.patch: ops must be among {sorted(OPS)}, got {sorted(unknown)}")
    wanted = frozenset(wanted)
    report = PatchReport(backend=backend, dry_run=dry_run)
    accounted = set()   # paths whose hot spot the report already covers
    covered = []        # path prefixes whose whole subtree is done (a fused MLP, an HF attention)
    supported = (*_SWAPS, *_FUSE_ONLY)

    def replaced(qual, kind, to, op):
        report.replaced.append(Replaced(qual, kind, to, op))
        accounted.add(qual)

    def left(qual, kind, why):
        report.left.append(Left(qual, kind, why))
        accounted.add(qual)

    def route(module: torch.nn.Module, qual: str) -> None:
        families = _routed_calls(module)
        if not families:
            return
        kind = type(module).__name__
        how = ", ".join(sorted("F." + ("scaled_dot_product_attention" if f == _SDPA else f) for f in families))
        if _ROUTER in module.__dict__:
            left(qual, kind, "already patched (dlh.unpatch first to patch again)")
            return
        take = frozenset(families & wanted)
        if not take:
            if _coverage.kind_of(module) is not None:
                left(qual, kind, f"calls {how}: excluded by ops=")
            return
        if not dry_run:
            _add_router(module, _Router(backend, take))
        report.routed.append(Routed(qual, kind, _SDPA if _SDPA in take else sorted(take)[0], how))
        accounted.add(qual)

    def swap(parent, name, qual, child, new_cls, attrs, family, to=None):
        if not dry_run:
            _swap(parent, name, new_cls, {**attrs, "backend": backend})
        replaced(qual, type(child).__name__, to or _describe(new_cls, attrs), family)

    def recognised(parent, name, qual, child) -> bool:
        """Structural recognition of a module of a class we do not know; True if it was taken
        (or reported)."""
        kind = _coverage.kind_of(child)
        if kind not in _STRUCTURAL:
            return False
        cls = type(child)
        if kind == "norm":
            spec = _recognize.recognise_norm(child)
            families = {spec.op} if spec else set()
            mixin = _NormForward
        elif kind == "activation":
            spec = _recognize.recognise_activation(child)
            if spec is not None and spec.name not in _ACT_FAMILY:
                left(qual, cls.__name__, f"computes {spec.name}: no dlh op runs it on its own "
                     "(fused only after a Linear in a Sequential or an MLP)")
                return True
            families = {_ACT_FAMILY[spec.name]} if spec else set()
            mixin = _ActivationForward
        else:
            spec = _recognize.recognise_mlp(child)
            families = _mlp_families(spec) if spec else set()
            mixin = _MLPForward
            if spec is None:
                return False  # its parts are taken one by one
        if spec is None:
            left(qual, cls.__name__, _recognize.describe_failure(kind))
            return True
        if not families & wanted:
            left(qual, cls.__name__, f"recognised as {spec.describe()}: excluded by ops=")
            return True
        why = _dtype_reason(child, backend)
        if why:
            left(qual, cls.__name__, why)
            return True
        new_cls = _subclass(cls, mixin)
        swap(parent, name, qual, child, new_cls, {_SPEC: spec}, sorted(families)[0],
             to=f"{new_cls.__name__}: {spec.describe()}")
        if kind == "mlp":
            covered.append(qual + ".")
        return True

    def walk(module: torch.nn.Module, prefix: str) -> None:
        items = list(module._modules.items())
        in_sequential = isinstance(module, torch.nn.Sequential)
        fused = set()
        for i, (name, child) in enumerate(items):
            if child is None or name in fused:
                continue
            qual, kind = f"{prefix}{name}", type(child).__name__
            if _ORIGINAL in child.__dict__:
                left(qual, kind, "already patched (dlh.unpatch first to patch again)")
                continue
            if _coverage.is_dlh_class(type(child)):
                if _coverage.kind_of(child) or isinstance(child, supported):
                    left(qual, kind, "already a dlh module")
                walk(child, qual + ".")
                continue
            if _is_hf_model(child) and not any(qual.startswith(h) for h in hf_models):
                # a transformers model inside a model of the user's (a backbone, a wrapper)
                _hf_attention_switch(child, backend, wanted, dry_run, report, accounted, covered, qual + ".")
                hf_models.append(qual + ".")
            if _is_diffusers_attention(child):
                attend(child, qual)
            if type(child) is torch.nn.TransformerEncoderLayer:
                swap(module, name, qual, child, dnn.TransformerEncoderLayer, {}, "linear",
                     to="dlh.nn.TransformerEncoderLayer (no fast path; linear1 + activation fused)")
                walk(module._modules[name] if not dry_run else child, qual + ".")
                continue
            entry = _SWAPS.get(type(child)) or _FUSE_ONLY.get(type(child))
            if entry is None:
                base = next((c for c in supported if isinstance(child, c)), None)
                if base in _SWAPS and type(child).forward is base.forward:
                    # a subclass that keeps the parent's forward: swapped like the parent
                    entry = (_SWAPS[base][0], _subclass(type(child), _SWAPS[base][1]))
                elif recognised(module, name, qual, child):
                    continue  # taken (or its miss reported) by structure
                else:
                    if base in _SWAPS:
                        left(qual, kind, f"subclass of nn.{base.__name__} with its own forward, "
                             "which matched no dlh op on the probe")
                    route(child, qual)
                    walk(child, qual + ".")
                    handoffs(child, qual)
                    continue
            family, new_cls = entry
            # the activation right after it in a Sequential, if it can go into its epilogue
            act_name, act, fuse = None, None, None
            if in_sequential and i + 1 < len(items) and items[i + 1][1] is not None:
                act_name, act = items[i + 1]
                fuse = _fusable_activation(family, act)
            if family == "linear":
                if fuse is None:
                    continue  # a plain Linear is not a hot spot
                if "approximate" in fuse:
                    family, new_cls = "linear_gelu", dnn.LinearGELU
            if family not in wanted:
                left(qual, kind, "excluded by ops=")
                continue
            attrs = dict(fuse or {})
            reason = _cannot(family, child, attrs, backend, module)
            if reason is not None:
                left(qual, kind, reason)
                continue
            swap(module, name, qual, child, new_cls, attrs, family)
            if fuse is not None:
                if not dry_run:
                    _placeholder(module, act_name)
                fused.add(act_name)
                replaced(f"{prefix}{act_name}", type(act).__name__, f"nn.Identity (fused into {qual})", family)

    def handoffs(block: torch.nn.Module, qual: str) -> None:
        """GroupNorm + SiLU and Linear + activation fused inside the block's own forward (after
        its children are done), where its source proves the pair."""
        if not block._modules:
            return
        for first_name, act_name in _handoff_pairs(block):
            first, act = block._modules.get(first_name), block._modules.get(act_name)
            if first is None or act is None or sum(m is first for m in model.modules()) != 1:
                continue
            path = f"{qual}.{first_name}" if qual else first_name
            if type(first) in (torch.nn.GroupNorm, dnn.GroupNorm):
                if ("group_norm" not in wanted or getattr(first, "activation", None) is not None
                        or type(act) not in (torch.nn.SiLU, dnn.SiLU) or act.inplace
                        or (type(first) is torch.nn.GroupNorm and not dry_run)):
                    continue  # (an un-swapped norm was left: its reason is in the report)
                new_cls, attrs = _GroupNormHandoff, {"activation": "silu"}
                to = "dlh.nn.GroupNorm(activation='silu')"
                family = "group_norm"
            elif type(first) is torch.nn.Linear:
                spec = _recognize.recognise_activation(act)
                if (spec is None or spec.inplace or spec.name not in _supported_linear_acts()
                        or "linear" not in wanted or _coverage.kind_of(act) != "activation"):
                    continue
                new_cls, family = _LinearHandoff, "linear"
                attrs = {"activation": spec.name, "negative_slope": spec.negative_slope, "backend": backend}
                to = f"dlh.nn.Linear(activation={spec.name!r})"
            else:
                continue
            to += f", its output handed to {act_name} (proven from {type(block).__name__}.forward's source)"
            if not dry_run:
                if isinstance(first, torch.nn.GroupNorm):
                    first.__class__ = new_cls  # already a dlh.nn.GroupNorm: same state, one more step
                    first.__dict__.update(attrs)
                else:
                    first = _swap(block, first_name, new_cls, attrs)
                act = _handoff_target(block, act_name, backend)
                first.__dict__[_HANDOFF] = act
            report.replaced = [r for r in report.replaced if r.path != path]
            replaced(path, "GroupNorm" if family == "group_norm" else "Linear", to, family)

    def attend(module, qual: str) -> None:
        if _SDPA not in wanted:
            left(qual, type(module).__name__, "attention: excluded by ops=")
            return
        if _PROCESSOR in module.__dict__:
            left(qual, type(module).__name__, "already patched (dlh.unpatch first to patch again)")
            return
        if not dry_run:
            original = module.processor
            module.set_processor(DlhAttnProcessor(original, backend))
            module.__dict__[_PROCESSOR] = original
        report.routed.append(Routed(qual, type(module).__name__, _SDPA,
                                    f"processor {type(module.processor).__name__ if dry_run else 'DlhAttnProcessor'}"))
        covered.append(qual + ".")
        accounted.add(qual)

    if isinstance(model, supported) and _ORIGINAL not in model.__dict__:
        left("", type(model).__name__, "the model itself: patch swaps submodules "
             "only (wrap it, e.g. in nn.Sequential)")
    hf_models = []  # the transformers models switched (or reported), as path prefixes
    if _is_hf_model(model):
        _hf_attention_switch(model, backend, wanted, dry_run, report, accounted, covered)
        hf_models.append("")
    route(model, "")
    walk(model, "")
    handoffs(model, "")
    _report_misses(model, report, accounted, covered, wanted)
    if not dry_run:
        model.__dict__[_coverage.REPORT_ATTR] = report
    return report


def _hf_attention_switch(model, backend, wanted, dry_run, report, accounted, covered, prefix=""):
    """A transformers model (the patched model, or one inside it at `prefix`) onto the "dlh"
    attention function, when it runs "sdpa"; its attention modules reported either way."""
    impl = getattr(model.config, "_attn_implementation", None)
    outer = []  # the outermost attention modules
    for n, m in model.named_modules():
        if _coverage.kind_of(m) != "attention":
            continue
        n = prefix + n
        if not any(n.startswith(o + ".") for o, _ in outer):
            outer.append((n, m))
    if _SDPA not in wanted:
        reason, name = "attention: excluded by ops=", None
    elif _ATTN_IMPL in model.__dict__:
        reason, name = "already patched (dlh.unpatch first to patch again)", None
    elif impl != "sdpa":
        reason, name = (f"the model runs attn_implementation={impl!r}: left as chosen (load it with "
                        "attn_implementation='sdpa' to let dlh take it)"), None
    else:
        reason, name = None, _hf_name(backend)
    for n, m in outer:
        accounted.add(n)
        if reason:
            report.left.append(Left(n, type(m).__name__, reason))
        else:
            report.routed.append(Routed(n, type(m).__name__, _SDPA, f"AttentionInterface {name!r}"))
            covered.append(n + ".")
    if name and not dry_run:
        model.__dict__[_ATTN_IMPL] = impl
        model.set_attn_implementation(name)


def _report_misses(model, report, accounted, covered, wanted) -> None:
    """Every hot spot the walk did not take or explain gets a reason."""
    taken = {r.path for r in report.replaced} | {r.path for r in report.routed} | accounted
    outer = []
    for qual, m in model.named_modules():
        if not qual or any(qual.startswith(c) for c in covered):
            continue
        kind = _coverage.kind_of(m)
        if kind is None or any(qual.startswith(o + ".") for o in outer):
            continue
        outer.append(qual)
        if qual in taken or any(qual.startswith(t + ".") and t in {r.path for r in report.replaced} for t in taken):
            continue
        cls = type(m).__name__
        if kind == "conv":
            why = f"{cls}: dlh has a 2-D convolution only (torch.nn.Conv2d)"
        elif kind == "norm":
            why = f"{cls}: no dlh op for this norm" if isinstance(m, torch.nn.modules.batchnorm._NormBase) \
                else _recognize.describe_failure("norm")
        elif kind == "activation":
            spec = _recognize.recognise_activation(m)
            why = (f"computes {spec.name}: no dlh op runs it on its own (fused only after a Linear in a "
                   "Sequential or an MLP)") if spec and spec.name not in _ACT_FAMILY else \
                _recognize.describe_failure("activation") if spec is None else "excluded by ops="
        elif kind == "mlp":
            why = _recognize.describe_failure("mlp")
        else:
            why = "attention module whose code names no F.scaled_dot_product_attention call dlh could route"
        report.left.append(Left(qual, cls, why))


patch.OPS = OPS  # `dlh.patch` is this function (it shadows the module): the ops= names, from it


def unpatch(model: torch.nn.Module) -> int:
    """Undo `patch`: put every replaced module (and fused activation) back, stop routing,
    restore diffusers attention processors and a transformers model's attention
    implementation; return how many modules it restored or stopped routing.

    Changes made while patched carry over: the parameters and buffers are the same objects, and
    the module attributes the original had (``training`` after ``.eval()``, ``eps``, ...) are
    copied back.
    """
    count = 0

    def restore_attention(module) -> int:
        if _ATTN_IMPL not in module.__dict__:
            return 0
        module.set_attn_implementation(module.__dict__.pop(_ATTN_IMPL))
        return 1

    def restore_processor(module) -> int:
        original = module.__dict__.pop(_PROCESSOR, None)
        if original is None:
            return 0
        module.set_processor(original)
        return 1

    def walk(module: torch.nn.Module) -> None:
        nonlocal count
        for name, child in list(module._modules.items()):
            if child is None:
                continue
            if isinstance(child, _GroupNormHandoff):
                child.__class__ = dnn.GroupNorm
                child.__dict__.pop(_HANDOFF, None)
                child.__dict__["activation"] = None
            original = child.__dict__.get(_ORIGINAL)
            if original is None:
                count += _unroute(child) + restore_processor(child) + restore_attention(child)
                walk(child)
                continue
            if isinstance(child, torch.nn.Identity) and not isinstance(original, torch.nn.Identity):
                original.train(child.training)  # a placeholder: only the mode can have changed
            else:
                walk(child)  # a swapped container (TransformerEncoderLayer) has swapped parts
                for key in original.__dict__:
                    if key in child.__dict__:
                        original.__dict__[key] = child.__dict__[key]
            original.__dict__.pop("_dlh_pending", None)
            module._modules[name] = original
            count += 1

    count += _unroute(model) + restore_attention(model)
    walk(model)
    model.__dict__.pop(_coverage.REPORT_ATTR, None)
    return count
