"""dlh.patch / dlh.unpatch: module swaps, Sequential fusions (Conv2d/GroupNorm/Linear + activation),
F.scaled_dot_product_attention routing, the report, and what must never change (parameters,
state_dict, optimizers, the model after unpatch).

Toy models at tiny sizes: the triton backend runs under the interpreter on CPU. Each patched
forward and backward is held to the same model run in float64 eager PyTorch."""
import copy
import functools

import pytest
import torch
import torch.nn.functional as F

import dlh_kernels as dlh
import dlh_kernels.functional as DF

from conftest import DEVICE, backend_param

BACKENDS = [backend_param("torch"), backend_param("triton")]
# float32 patched vs float64 eager, at these sizes (sums of at most a few dozen terms); on the GPU
# the Triton matmuls (attention, linear_gelu, conv2d) take float32 as TF32 (10-bit mantissa)
TOL = dict(rtol=1e-4, atol=1e-4) if DEVICE.type == "cpu" else dict(rtol=5e-3, atol=5e-3)


# ---------------------------------------------------------------------------------------------
# Toy models, one per thing patch does.

def _mlp():
    """A Sequential MLP: LayerNorm, then Linear + GELU twice (both approximations), then Linear."""
    return torch.nn.Sequential(
        torch.nn.LayerNorm(8), torch.nn.Linear(8, 16), torch.nn.GELU(),
        torch.nn.Linear(16, 12, bias=False), torch.nn.GELU(approximate="tanh"), torch.nn.Linear(12, 8))


def _conv_block():
    """A U-Net style block: Conv2d, GroupNorm + SiLU, Conv2d + ReLU, GroupNorm without SiLU."""
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.GroupNorm(4, 8), torch.nn.SiLU(),
        torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.GroupNorm(2, 8))


class _CausalSelfAttention(torch.nn.Module):
    """nanoGPT's attention: the heads by view/split, then F.scaled_dot_product_attention."""

    def __init__(self, d, n_head):
        super().__init__()
        self.n_head = n_head
        self.c_attn = torch.nn.Linear(d, 3 * d)
        self.c_proj = torch.nn.Linear(d, d)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, C))


class _GPTBlock(torch.nn.Module):
    def __init__(self, d=8, n_head=2):
        super().__init__()
        self.ln_1 = torch.nn.LayerNorm(d)
        self.attn = _CausalSelfAttention(d, n_head)
        self.ln_2 = torch.nn.LayerNorm(d)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(d, 4 * d), torch.nn.GELU(approximate="tanh"),
                                       torch.nn.Linear(4 * d, d))

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class _ViTBlock(torch.nn.Module):
    def __init__(self, d=8, n_head=2):
        super().__init__()
        self.norm1 = torch.nn.LayerNorm(d)
        self.attn = torch.nn.MultiheadAttention(d, n_head, batch_first=True)
        self.norm2 = torch.nn.LayerNorm(d)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(d, 2 * d), torch.nn.GELU(), torch.nn.Linear(2 * d, d))

    def forward(self, x):
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


# model factory, input shape, what patch must report (path -> op) and route
MODELS = {
    "mlp": (_mlp, (3, 8), {"0": "layer_norm", "1": "linear_gelu", "2": "linear_gelu",
                           "3": "linear_gelu", "4": "linear_gelu"}, []),
    "conv": (_conv_block, (1, 3, 5, 5), {"0": "conv2d", "1": "group_norm", "2": "group_norm",
                                         "3": "conv2d", "4": "conv2d", "5": "group_norm"}, []),
    "gpt": (_GPTBlock, (2, 5, 8), {"ln_1": "layer_norm", "ln_2": "layer_norm", "mlp.0": "linear_gelu",
                                   "mlp.1": "linear_gelu"}, ["attn"]),
    "vit": (_ViTBlock, (2, 5, 8), {"norm1": "layer_norm", "attn": "scaled_dot_product_attention",
                                   "norm2": "layer_norm", "mlp.0": "linear_gelu", "mlp.1": "linear_gelu"}, []),
}
# which DF function does the work of each family
DF_OF = {"layer_norm": "layer_norm", "linear_gelu": "linear_gelu", "group_norm": "group_norm",
         "conv2d": "conv2d", "scaled_dot_product_attention": "scaled_dot_product_attention"}


@pytest.fixture
def df_calls(monkeypatch):
    """Every DF call made by dlh modules and by the SDPA router: (name, backend=)."""
    calls = []
    for name in DF.__all__:
        fn = getattr(DF, name)

        @functools.wraps(fn)  # dlh.explain finds the op's module and signature through it
        def spy(*args, _fn=fn, _name=name, **kwargs):
            calls.append((_name, kwargs.get("backend")))
            return _fn(*args, **kwargs)
        monkeypatch.setattr(DF, name, spy)
    return calls


def _types(model):
    return [(name, type(m)) for name, m in model.named_modules()]


def _run(model, x, grad_out, call=None):
    """Forward and backward; the output and the gradients of the input and of every parameter.
    call: what runs the model (default: the model itself; e.g. its torch.compile'd wrapper)."""
    x = x.detach().requires_grad_()
    out = (model if call is None else call)(x)
    out.backward(grad_out)
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return out.detach(), x.grad, grads


def _assert_matches_float64(model, reference64, x, call=None, tol=TOL):
    with torch.no_grad():
        grad_out = torch.randn_like(reference64(x.double())).float()
    out, gx, grads = _run(model, x, grad_out, call)
    ref, rgx, rgrads = _run(reference64, x.double(), grad_out.double())
    torch.testing.assert_close(out, ref.float(), **tol)
    torch.testing.assert_close(gx, rgx.float(), **tol)
    assert grads.keys() == rgrads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], rgrads[name].float(), **tol, msg=name)


# ---------------------------------------------------------------------------------------------
# The toy models: patched vs float64 eager, the state_dict and the types before and after.

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", list(MODELS))
def test_patched_model_matches_float64_and_unpatches(kind, backend, df_calls):
    factory, shape, expected, routed = MODELS[kind]
    torch.manual_seed(list(MODELS).index(kind) * 10 + len(backend))
    model = factory().to(DEVICE)
    reference64 = copy.deepcopy(model).double()
    types_before = _types(model)
    state = model.state_dict()
    x = torch.randn(shape, device=DEVICE)

    report = dlh.patch(model, backend=backend)
    assert {r.path: r.op for r in report.replaced} == expected, str(report)
    assert [r.path for r in report.routed] == routed
    # the same keys, and the very same tensors (storage), not copies
    patched_state = model.state_dict()
    assert list(patched_state) == list(state)
    assert all(patched_state[k].data_ptr() == v.data_ptr() and torch.equal(patched_state[k], v)
               for k, v in state.items())

    _assert_matches_float64(model, reference64, x)
    # every family reported ran through DF, on the backend asked for
    assert {DF_OF[op] for op in expected.values()} | ({"scaled_dot_product_attention"} if routed else set()) \
        == {name for name, _ in df_calls}
    assert {be for _, be in df_calls} == {backend}

    assert dlh.unpatch(model) == len(expected) + len(routed)
    assert _types(model) == types_before
    assert list(model.state_dict()) == list(state)
    assert all(model.state_dict()[k].data_ptr() == v.data_ptr() for k, v in state.items())
    df_calls.clear()
    _assert_matches_float64(model, reference64, torch.randn(shape, device=DEVICE))
    assert df_calls == []  # eager torch again: nothing routed, no hook left
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_optimizer_built_before_patching_updates_the_model():
    torch.manual_seed(1)
    model = _GPTBlock().to(DEVICE)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    dlh.patch(model, backend="triton")
    model(torch.randn(2, 4, 8, device=DEVICE)).square().sum().backward()
    opt.step()
    params = dict(model.named_parameters())
    assert [id(p) for p in opt.param_groups[0]["params"]] == [id(p) for p in params.values()]
    for n, p in params.items():
        # SGD moved exactly the tensors the patched model computed with
        torch.testing.assert_close(p.detach(), before[n] - 0.5 * p.grad, msg=n)
        assert not torch.equal(p.detach(), before[n]), n
    dlh.unpatch(model)
    assert all(p is params[n] for n, p in model.named_parameters())


def test_deepcopy_of_a_patched_model_unpatches_on_its_own(df_calls):
    model = _GPTBlock()
    dlh.patch(model, backend="torch")
    twin = copy.deepcopy(model)
    x = torch.randn(1, 3, 8)
    torch.testing.assert_close(twin(x), model(x))
    assert dlh.unpatch(twin) == dlh.unpatch(model) == 5
    assert _types(twin) == _types(_GPTBlock())
    assert twin.mlp[0].weight is not model.mlp[0].weight
    df_calls.clear()
    twin(x), model(x)
    assert df_calls == []


def test_unpatch_keeps_changes_made_while_patched():
    model = _conv_block()
    dlh.patch(model)
    model.eval()
    model[1].eps = 1e-3
    dlh.unpatch(model)
    assert not any(m.training for m in model.modules())
    assert type(model[1]) is torch.nn.GroupNorm and model[1].eps == 1e-3
    assert not hasattr(model[3], "activation")  # dlh-only attributes stay on the dlh module


# ---------------------------------------------------------------------------------------------
# F.scaled_dot_product_attention routing: scope, compile, autograd.

def test_sdpa_routing_is_scoped_to_the_patched_modules(df_calls):
    model = _GPTBlock()
    report = dlh.patch(model, ops={"scaled_dot_product_attention"}, backend="torch")
    assert report.replaced == [] and [r[:3] for r in report.routed] == [
        ("attn", "_CausalSelfAttention", "scaled_dot_product_attention")]
    assert "1 module(s) route calls to dlh" in str(report)
    model(torch.randn(1, 3, 8))
    assert df_calls == [("scaled_dot_product_attention", "torch")]
    # the same function outside the model, even while it is patched: untouched
    q = torch.randn(1, 2, 3, 4)
    F.scaled_dot_product_attention(q, q, q)
    assert len(df_calls) == 1
    # an exception inside forward still takes the router off the stack
    with pytest.raises(RuntimeError):
        model(torch.randn(1, 3, 6))
    assert torch.overrides._get_current_function_mode_stack() == []
    # the model itself calls SDPA: routed at the root, path ""
    attn = _CausalSelfAttention(8, 2)
    assert [r.path for r in dlh.patch(attn).routed] == [""]
    assert dlh.unpatch(attn) == 1 and not attn._forward_pre_hooks


@pytest.mark.parametrize("compile_backend", ["eager", "aot_eager"])
def test_sdpa_routing_under_torch_compile(compile_backend, df_calls):
    torch.manual_seed(2)
    model = _GPTBlock()
    reference64 = copy.deepcopy(model).double()
    dlh.patch(model, backend="torch")
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=compile_backend, fullgraph=True)
    _assert_matches_float64(model, reference64, torch.randn(2, 5, 8), call=compiled)
    assert ("scaled_dot_product_attention", "torch") in df_calls  # traced through the router
    torch._dynamo.reset()


# ---------------------------------------------------------------------------------------------
# The report, the ops filter, what is left and why.

class _MyNorm(torch.nn.LayerNorm):
    """A user's subclass of a supported module that keeps its forward: swapped like the parent."""


class _MyOwnNorm(torch.nn.LayerNorm):
    """A subclass with its own forward that is not a LayerNorm: recognition rejects it."""

    def forward(self, x):
        return super().forward(x) * 2


class _MyLinear(torch.nn.Linear):
    pass


class _Block(torch.nn.Module):
    def __init__(self, d=16):
        super().__init__()
        self.ln = torch.nn.LayerNorm(d)
        self.proj = torch.nn.Linear(d, d)
        self.inner = torch.nn.Sequential(torch.nn.RMSNorm(d), torch.nn.GELU())
        self.custom = _MyNorm(d)  # a subclass keeping the forward: swapped (unused here)
        self.own = _MyOwnNorm(d)  # a subclass whose forward is no norm: left, and why

    def forward(self, x):
        return self.inner(self.proj(self.ln(x)))


def test_patch_swaps_reports_and_unpatches():
    torch.manual_seed(0)
    model = _Block().to(DEVICE)
    x = torch.randn(5, 16, device=DEVICE)
    before = model(x)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    opt_params = list(model.parameters())

    report = dlh.patch(model, backend="triton")
    assert type(model.ln) is dlh.nn.LayerNorm and type(model.inner[0]) is dlh.nn.RMSNorm
    assert type(model.inner[1]) is dlh.nn.GELU
    assert isinstance(model.custom, _MyNorm) and isinstance(model.custom, dlh.nn.LayerNorm)
    assert [r[0] for r in report.replaced] == ["ln", "inner.0", "inner.1", "custom"]
    assert report.left == [
        ("own", "_MyOwnNorm", "a norm-like module whose forward matched no LayerNorm/RMSNorm variant on the probe")]
    assert "replaced 4 module(s)" in str(report)
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    assert list(model.parameters()) == opt_params  # same tensors: an optimizer keeps working
    torch.testing.assert_close(model(x), before)

    assert dlh.unpatch(model) == 4
    assert type(model.ln) is torch.nn.LayerNorm and type(model.inner[0]) is torch.nn.RMSNorm
    assert type(model.custom) is _MyNorm
    assert type(model.inner[1]) is torch.nn.GELU
    torch.testing.assert_close(model(x), before)


def test_report_table():
    model = torch.nn.Sequential(_GPTBlock(), _MyOwnNorm(8))
    text = str(dlh.patch(model, backend="torch"))
    lines = text.splitlines()
    assert lines[0] == "dlh.patch (backend=torch): replaced 4 module(s), 1 module(s) route calls to dlh, left 1"
    assert lines[1].split() == ["module", "was", "now", "op"]
    row = next(line for line in lines if line.strip().startswith("0.mlp.0 "))
    assert row.split() == ["0.mlp.0", "Linear", "dlh.nn.LinearGELU(approximate='tanh')", "linear_gelu"]
    assert any(line.split()[:3] == ["0.mlp.1", "GELU", "nn.Identity"] for line in lines)
    assert any(line.split() == ["0.attn", "_CausalSelfAttention", "F.scaled_dot_product_attention",
                                "DF.scaled_dot_product_attention"] for line in lines)
    assert any(line.split()[:2] == ["1", "_MyOwnNorm"] and "matched no LayerNorm/RMSNorm" in line for line in lines)
    # plain Linears (c_attn, c_proj, mlp.2) are no hot spot: not reported
    assert "c_attn" not in text and "0.mlp.2" not in text


@pytest.mark.parametrize("ops, replaced, left", [
    ({"linear_gelu"}, ["mlp.0", "mlp.1"], {"ln_1": "excluded by ops=", "attn": "calls F.scaled_dot_product_attention: excluded by ops="}),
    # the GELU alone; the Linear before it is a linear_gelu candidate, excluded
    ({"gelu"}, ["mlp.1"], {"mlp.0": "excluded by ops="}),
    ("layer_norm", ["ln_1", "ln_2"], {"mlp.1": "excluded by ops="}),
])
def test_ops_filter(ops, replaced, left):
    model = _GPTBlock()
    report = dlh.patch(model, ops=ops)
    assert [r.path for r in report.replaced] == replaced
    assert report.routed == [] or "scaled_dot_product_attention" in ops
    reasons = {r.path: r.reason for r in report.left}
    assert all(reasons[p] == why for p, why in left.items()), reasons
    dlh.unpatch(model)


def test_ops_filter_group_norm_fuses_silu():
    model = _conv_block()
    report = dlh.patch(model, ops={"group_norm"})
    assert [(r.path, r.to_type) for r in report.replaced] == [
        ("1", "dlh.nn.GroupNorm(activation='silu')"), ("2", "nn.Identity (fused into 1)"),
        ("5", "dlh.nn.GroupNorm")]
    assert type(model[2]) is torch.nn.Identity and type(model[4]) is torch.nn.ReLU
    assert model[1].activation == "silu" and model[5].activation is None
    assert dlh.unpatch(model) == 3 and type(model[2]) is torch.nn.SiLU


def test_patch_ops_filter_and_bad_arguments():
    assert {"linear_gelu", "group_norm", "scaled_dot_product_attention"} <= dlh.patch.OPS
    model = _Block()
    report = dlh.patch(model, ops={"rms_norm"})
    assert [r[0] for r in report.replaced] == ["inner.0"]
    assert ("ln", "LayerNorm", "excluded by ops=") in report.left
    with pytest.raises(ValueError, match="ops must be among"):
        dlh.patch(model, ops={"conv3d"})
    with pytest.raises(ValueError, match="backend must be one of"):
        dlh.patch(model, backend="fastest")
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        dlh.patch([model])


def test_left_alone_and_why():
    model = torch.nn.Sequential(
        _MyLinear(4, 4), torch.nn.GELU(),                                 # a subclass: not fused
        torch.nn.MultiheadAttention(4, 2, add_bias_kv=True),              # would run torch's code
        torch.nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"),      # pads with zeros only
        torch.nn.Linear(4, 4), torch.nn.Dropout(0.0), torch.nn.GELU(),    # not adjacent
    )
    report = dlh.patch(model)
    reasons = {r.path: r.reason for r in report.left}
    assert "0" not in reasons and "4" not in reasons  # Linears not followed by an activation: no hot spot
    assert reasons["2"].startswith("add_bias_kv / add_zero_attn")
    assert reasons["3"].startswith("padding_mode='reflect'")
    assert [r.path for r in report.replaced] == ["1", "6"]  # the GELUs, on their own
    dlh.unpatch(model)


def test_left_when_the_backend_cannot_run_the_configuration():
    model = _mlp().to(DEVICE, torch.float64)  # the Triton kernels take float32/float16/bfloat16
    report = dlh.patch(model, backend="triton")
    assert report.replaced == []
    reasons = {r.path: r.reason for r in report.left}
    # the GELUs have no parameters: their dtype is their parent's
    assert list(reasons) == ["0", "1", "2", "3", "4"]
    assert all(why.startswith("backend 'triton' cannot run this configuration: ") and "float64" in why
               for why in reasons.values()), reasons
    assert all(type(m).__module__.startswith("torch.") for m in model.modules())


def test_patch_twice_is_idempotent():
    torch.manual_seed(3)
    model = _GPTBlock().to(DEVICE)
    x = torch.randn(1, 4, 8, device=DEVICE)
    first = dlh.patch(model, backend="triton")
    out = model(x)
    second = dlh.patch(model, backend="torch")
    assert second.replaced == [] and second.routed == []
    already = {r.path for r in second.left if r.reason.startswith("already patched")}
    assert already == {r.path for r in first.replaced} | {r.path for r in first.routed}
    assert model.ln_1.backend == "triton"  # the first patch stands
    assert len(model.attn._forward_pre_hooks) == 1
    torch.testing.assert_close(model(x), out, rtol=0, atol=0)
    assert dlh.unpatch(model) == len(first.replaced) + len(first.routed)
    assert dlh.unpatch(model) == 0


def test_model_itself_is_not_swapped():
    ln = torch.nn.LayerNorm(4)
    report = dlh.patch(ln)
    assert report.replaced == [] and report.left[0].path == "" and "the model itself" in report.left[0].reason
    assert "<model>" in str(report)


def test_transformer_layer_swaps_attention_and_norms():
    # nn.TransformerEncoderLayer calls its attention with need_weights=False: our kernel path.
    # Training mode (dropout 0) keeps torch off its fused fast path, which would bypass modules.
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True).to(DEVICE)
    x = torch.randn(2, 5, 32, device=DEVICE)
    before = layer(x)
    report = dlh.patch(layer, backend="triton")
    assert type(layer.self_attn) is dlh.nn.MultiheadAttention
    assert {r[0] for r in report.replaced} == {"self_attn", "norm1", "norm2"}
    after = layer(x)
    torch.testing.assert_close(after, before, **TOL)
    after.sum().backward()
    assert layer.self_attn.in_proj_weight.grad is not None
    dlh.unpatch(layer)
    assert type(layer.self_attn) is torch.nn.MultiheadAttention


def test_linear_gelu_module_is_drop_in():
    torch.manual_seed(4)
    ref = torch.nn.Linear(6, 5)
    fused = dlh.nn.LinearGELU(6, 5, approximate="tanh")
    fused.load_state_dict(ref.state_dict())
    assert isinstance(fused, torch.nn.Linear) and fused.state_dict().keys() == ref.state_dict().keys()
    x = torch.randn(3, 6)
    torch.testing.assert_close(fused(x), F.gelu(ref(x), approximate="tanh"))
    assert "approximate='tanh'" in repr(fused)
    with pytest.raises(ValueError, match="approximate"):
        dlh.nn.LinearGELU(2, 2, approximate="erf")
