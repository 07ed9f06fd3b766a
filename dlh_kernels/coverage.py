"""`dlh.coverage(model, *inputs)`: how many of a forward's hot-spot calls run through a dlh op.

A hot spot is a call of a norm, activation, attention, convolution or MLP module, or of one of
their functional forms (``F.gelu``, ``F.layer_norm``, ``F.scaled_dot_product_attention``, ...)
made outside such a module. Modules are classified by what they are (`kind_of`), not by what
`dlh.patch` did to them, so the same count works before and after patching. Each module hot spot
is counted once, at its outermost call (an MLP's activation is part of the MLP; BERT's
BertSelfAttention is part of BertAttention). A call "runs through dlh" when at least one dlh op
ran inside it, or when its work was fused into the op before it (an activation whose slot holds
the fused placeholder, a SiLU fused into the GroupNorm before it).

    report = dlh.coverage(model, input_ids)        # one forward under torch.no_grad()
    print(report)                                  # per kind, then every miss with its reason

A miss's reason comes from the last `dlh.patch` report of the model ("not patched" if none).
Command line: ``dlh coverage gpt2`` (tiny random-init configs of transformers / diffusers
models and of our reference models, built in code; see `TINY`).
"""
from __future__ import annotations

import contextlib
import re
import sys
import types
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from . import profiling

KINDS = ("norm", "activation", "attention", "conv", "mlp")
REPORT_ATTR = "_dlh_patch_report"      # on a patched model: its PatchReport
KIND_ATTR = "_dlh_kind"                 # on a replacement class: the kind it stands for
FUSED_ATTR = "_dlh_original"            # on a fused placeholder: the activation it replaced

_NORMS = (torch.nn.LayerNorm, torch.nn.GroupNorm, torch.nn.RMSNorm, torch.nn.modules.batchnorm._NormBase)
_ACTIVATIONS = (torch.nn.ReLU, torch.nn.LeakyReLU, torch.nn.GELU, torch.nn.SiLU, torch.nn.Tanh,
                torch.nn.Sigmoid, torch.nn.Mish, torch.nn.Hardswish, torch.nn.ELU, torch.nn.Softplus,
                torch.nn.ReLU6, torch.nn.PReLU, torch.nn.Hardtanh)
_CONVS = (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d, torch.nn.ConvTranspose1d,
          torch.nn.ConvTranspose2d, torch.nn.ConvTranspose3d)
_ACT_NAME = re.compile(r"(gelu|silu|swish|relu|mish|activation|tanh|sigmoid)", re.I)
_NORM_NAME = re.compile(r"norm", re.I)
_ATTN_NAME = re.compile(r"attention", re.I)

# the functional hot spots, by the function torch code calls
FUNCTIONS = {
    F.layer_norm: "norm", F.group_norm: "norm", F.rms_norm: "norm", F.batch_norm: "norm",
    F.gelu: "activation", F.silu: "activation", F.relu: "activation", F.leaky_relu: "activation",
    F.mish: "activation",
    F.scaled_dot_product_attention: "attention",
    F.conv1d: "conv", F.conv2d: "conv", F.conv3d: "conv", F.conv_transpose2d: "conv",
}


def is_linear_like(module: torch.nn.Module) -> bool:
    """nn.Linear, or a leaf module with a 2-D ``weight`` used as one (GPT-2's Conv1D)."""
    if isinstance(module, torch.nn.Linear):
        return True
    w = module.__dict__.get("_parameters", {}).get("weight")
    return (w is not None and w.dim() == 2 and not module._modules
            and type(module).__name__ in ("Conv1D", "Linear", "NonDynamicallyQuantizableLinear"))


def _is_leaf(module: torch.nn.Module) -> bool:
    return not any(True for _ in module.children())


def is_activation_like(module: torch.nn.Module) -> bool:
    if isinstance(module, _ACTIVATIONS):
        return True
    return (_is_leaf(module) and not any(True for _ in module.parameters(recurse=False))
            and bool(_ACT_NAME.search(type(module).__name__)))


def kind_of(module: torch.nn.Module) -> Optional[str]:
    """The hot-spot kind of a module, or None. By class and structure, never by running it."""
    kind = getattr(type(module), KIND_ATTR, None)
    if kind is not None:
        return kind
    if isinstance(module, torch.nn.Identity) and FUSED_ATTR in module.__dict__:
        return kind_of(module.__dict__[FUSED_ATTR])
    if isinstance(module, _NORMS):
        return "norm"
    if isinstance(module, _CONVS):
        return "conv"
    if isinstance(module, torch.nn.MultiheadAttention):
        return "attention"
    if is_activation_like(module):
        return "activation"
    name = type(module).__name__
    if _is_leaf(module):
        w = module._parameters.get("weight")
        if _NORM_NAME.search(name) and w is not None and w.dim() == 1:
            return "norm"
        return None
    if isinstance(module, (torch.nn.Sequential, torch.nn.ModuleList, torch.nn.ModuleDict)):
        return None
    children = list(module.children())
    if _ATTN_NAME.search(name) and any(is_linear_like(c) for c in children):
        return "attention"
    if is_mlp_like(module):
        return "mlp"
    return None


def is_mlp_like(module: torch.nn.Module) -> bool:
    """A module built of linear layers and one activation module, and dropout (or Identity
    placeholders, timm's ``norm``): an MLP / feed-forward block whatever its class is called."""
    children = list(module.children())
    if not children or isinstance(module, torch.nn.Sequential):
        return False
    linears = sum(is_linear_like(c) for c in children)
    acts = sum(is_activation_like(c) for c in children)
    others = [c for c in children if not (is_linear_like(c) or is_activation_like(c)
                                           or isinstance(c, (torch.nn.Dropout, torch.nn.Identity)))]
    return linears >= 1 and acts == 1 and not others


# ---------------------------------------------------------------------------------------------

@dataclass
class Call:
    path: str
    type: str
    kind: str
    dlh: bool = False
    ops: set = field(default_factory=set)


@dataclass
class CoverageReport:
    calls: list = field(default_factory=list)
    reasons: dict = field(default_factory=dict)   # path -> why patch left it

    def counts(self) -> dict:
        out = {k: [0, 0] for k in KINDS}
        for c in self.calls:
            out[c.kind][0] += c.dlh
            out[c.kind][1] += 1
        return {k: tuple(v) for k, v in out.items() if v[1]}

    @property
    def dlh(self) -> int:
        return sum(c.dlh for c in self.calls)

    @property
    def total(self) -> int:
        return len(self.calls)

    @property
    def fraction(self) -> float:
        return self.dlh / self.total if self.total else 1.0

    def misses(self) -> list:
        """(path, type, kind, reason) of each hot spot that ran on torch, once per module."""
        seen, out = set(), []
        for c in self.calls:
            if c.dlh or (c.path, c.type) in seen:
                continue
            seen.add((c.path, c.type))
            out.append((c.path, c.type, c.kind, self.reasons.get(c.path, self._default_reason(c))))
        return out

    def _default_reason(self, call: Call) -> str:
        if not self.reasons.get("__patched__"):
            return "not patched"
        if call.type.startswith("F."):
            return f"{call.type} called where dlh.patch routes no functional calls"
        return "not recognised by dlh.patch"

    def __str__(self) -> str:
        lines = [f"dlh coverage: {self.dlh}/{self.total} hot-spot calls ({100 * self.fraction:.0f}%) "
                 "ran through a dlh op"]
        lines += [f"  {k:10} {d}/{t}" for k, (d, t) in self.counts().items()]
        misses = self.misses()
        if misses:
            w = max(len(p or "<model>") for p, *_ in misses)
            lines.append("  missed:")
            lines += [f"    {(p or '<model>'):<{w}}  {t} ({k}): {r}" for p, t, k, r in misses]
        return "\n".join(lines)


class _FunctionalWatch(TorchFunctionMode):
    def __init__(self, state):
        super().__init__()
        self.state = state

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kind = FUNCTIONS.get(func)
        st = self.state
        if kind is not None and not st["hot"] and not st["in_op"]:
            st["calls"].append(Call(st["where"][-1], "F." + func.__name__, kind))
        return func(*args, **(kwargs or {}))


def coverage(model: torch.nn.Module, *args, **kwargs) -> CoverageReport:
    """Run ``model(*args, **kwargs)`` once (under no_grad) and count its hot-spot calls."""
    return measure(model, lambda m: m(*args, **kwargs))


def measure(model: torch.nn.Module, run: Callable) -> CoverageReport:
    """`coverage` of ``run(model)``: any code that runs one forward of the model."""
    names = {m: n for n, m in model.named_modules(remove_duplicate=False)}
    # stack: one entry per module call in progress, the Call of an outermost hot spot or None
    state = {"stack": [], "hot": [], "in_op": 0, "calls": [], "where": [""], "modules": [None]}

    def pre(module, _args):
        path = names.get(module, "?")
        state["where"].append(path)
        state["modules"].append(module)
        kind = None if (state["hot"] or state["in_op"]) else kind_of(module)
        call = None
        if kind is not None:
            call = Call(path, type(module).__name__, kind)
            if isinstance(module, torch.nn.Identity) and FUSED_ATTR in module.__dict__:
                call.dlh, call.ops = True, {"fused"}
            state["calls"].append(call)
            state["hot"].append(call)
        state["stack"].append(call)

    def post(module, _args, _out):
        state["where"].pop()
        state["modules"].pop()
        if state["stack"].pop() is not None:
            state["hot"].pop()

    @contextlib.contextmanager
    def observe(op_name):
        if state["in_op"] == 0:
            if state["hot"]:
                state["hot"][-1].dlh = True
                state["hot"][-1].ops.add(op_name)
            elif op_name != "fused" and _counts_ops(state["modules"][-1]):
                # a routed functional call (a dlh module's own ops belong to the module: a
                # Linear+GELU's activation is counted at its placeholder)
                state["calls"].append(Call(state["where"][-1], f"dlh.{op_name}", _op_kind(op_name),
                                           True, {op_name}))
        state["in_op"] += 1
        try:
            yield
        finally:
            state["in_op"] -= 1

    handles = []
    for m in names:
        handles.append(m.register_forward_pre_hook(pre))
        handles.append(m.register_forward_hook(post, always_call=True))
    previous = profiling.observer
    profiling.observer = observe
    try:
        with torch.no_grad(), _FunctionalWatch(state):
            run(model)
    finally:
        profiling.observer = previous
        for h in handles:
            h.remove()
    report = CoverageReport(calls=state["calls"])
    patched = model.__dict__.get(REPORT_ATTR)
    if patched is not None:
        report.reasons = {"__patched__": "yes", **patched.reasons()}
    return report


def is_dlh_class(cls) -> bool:
    """A class of dlh's modules or of dlh.patch's replacements (not the reference models, which
    are installed as dlh_kernels.models but are the user's kind of code)."""
    return cls.__module__ in ("dlh_kernels.nn", "dlh_kernels.patch")


def _counts_ops(module) -> bool:
    """Do the dlh ops this module runs count as hot spots of their own? Those of a routed
    functional call do (the module is the user's); a dlh module's own ops belong to the module
    (a Linear+GELU's activation is counted at its placeholder), unless it says otherwise."""
    if module is None or not is_dlh_class(type(module)):
        return True
    return getattr(type(module), "_dlh_counts_ops", False)


_OP_KINDS = {"layer_norm": "norm", "rms_norm": "norm", "add_layer_norm": "norm", "add_rms_norm": "norm",
             "group_norm": "norm", "scaled_dot_product_attention": "attention", "conv2d": "conv"}


def _op_kind(op_name: str) -> str:
    base = op_name.split("_backward")[0]
    return _OP_KINDS.get(base, "conv" if "conv" in base else "activation")


# ---------------------------------------------------------------------------------------------
# Tiny random-init models to measure, built in code (no downloads): name -> () -> (model, inputs)

def _tiny_transformers(name: str):
    import transformers as T
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(0))
    if name == "gpt2":
        cfg = T.GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=4,
                           bos_token_id=0, eos_token_id=0)
        return T.GPT2LMHeadModel(cfg), (ids,)
    if name == "llama":
        cfg = T.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
        return T.LlamaForCausalLM(cfg), (ids,)
    if name == "bert":
        cfg = T.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=48, max_position_embeddings=32)
        return T.BertModel(cfg), (ids,)
    if name == "vit_hf":
        cfg = T.ViTConfig(image_size=16, patch_size=4, num_channels=3, hidden_size=32, num_hidden_layers=2,
                          num_attention_heads=4, intermediate_size=48)
        return T.ViTModel(cfg), (torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)),)
    if name == "t5":
        cfg = T.T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4,
                         feed_forward_proj="gated-gelu", dropout_rate=0.0)
        return T.T5EncoderModel(cfg), (ids,)
    raise KeyError(name)


def _tiny_unet():
    import diffusers
    unet = diffusers.UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(16, 32),
                                 layers_per_block=1, norm_num_groups=8, attention_head_dim=8,
                                 down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                                 up_block_types=("AttnUpBlock2D", "UpBlock2D"))
    g = torch.Generator().manual_seed(0)
    return unet, (torch.randn(2, 3, 8, 8, generator=g), torch.tensor([10, 500]))


def _tiny_encoder_layer():
    layer = torch.nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
    return layer.eval(), (torch.randn(2, 7, 32, generator=torch.Generator().manual_seed(0)),)


def _reference(name: str):
    from . import models
    model = models.build(name, small=True)
    batch = models.example_batch(name, 2, small=True)
    return model, batch


TINY: dict[str, Callable] = {
    **{n: (lambda n=n: _tiny_transformers(n)) for n in ("gpt2", "llama", "bert", "vit_hf", "t5")},
    "unet2d": _tiny_unet,
    "transformer_encoder_layer": _tiny_encoder_layer,
}


def _cast(value, dtype):
    if dtype is not None and isinstance(value, torch.Tensor) and value.is_floating_point():
        return value.to(dtype)
    return value


def build_tiny(name: str):
    """(model, run) of one named tiny model: ``run(model)`` runs one forward on its example
    inputs (``run(model, dtype)``: with the floating-point inputs cast to dtype)."""
    if name in TINY:
        model, inputs = TINY[name]()
        return model, lambda m, dtype=None: m(*(_cast(x, dtype) for x in inputs))
    from . import models
    if name in models.NAMES:
        model, batch = _reference(name)
        return model, lambda m, dtype=None: models.forward(name, m, {k: _cast(v, dtype) for k, v in batch.items()})
    raise ValueError(f"dlh coverage: model must be one of {sorted(TINY) + list(models.NAMES)}, got {name!r}")


class _CallableModule(types.ModuleType):
    """``dlh.coverage(model, *inputs)`` calls `coverage`; ``dlh.coverage.TINY`` and the rest of
    this module stay reachable under the same name."""

    def __call__(self, model, *args, **kwargs):
        return coverage(model, *args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
