"""The op framework: backend registry and choice, explain, import hygiene, NVTX ranges, modules
and patching."""
import subprocess
import sys

import pytest
import torch

import dlh_kernels as dlh
import dlh_kernels.functional as DF
from dlh_kernels import _backend, profiling
from dlh_kernels.ops import layer_norm as norms

from conftest import HAS_GPU


def test_import_does_not_initialise_cuda_or_need_the_extension():
    code = ("import sys, torch, dlh_kernels, dlh_kernels.functional, dlh_kernels.nn\n"
            "assert not torch.cuda.is_initialized(), 'import initialised CUDA'\n"
            "assert 'dlh_kernels._C' not in sys.modules, 'import loaded the extension'\n")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_backends_report():
    states = dlh.backends()
    assert set(states) == {"triton", "cuda", "torch"}
    assert states["torch"] == "available"
    for name, state in states.items():
        assert state == "available" or len(state) > 10, f"{name}: a reason must say why"


def test_use_backend_nests_and_restores():
    assert dlh.get_backend() == "auto"
    with dlh.use_backend("torch"):
        assert dlh.get_backend() == "torch"
        with dlh.use_backend("triton"):
            assert dlh.get_backend() == "triton"
        assert dlh.get_backend() == "torch"
    assert dlh.get_backend() == "auto"
    with pytest.raises(ValueError, match="backend must be one of"):
        with dlh.use_backend("fastest"):
            pass


def test_set_backend_is_the_default_and_the_keyword_wins(monkeypatch):
    seen = []
    monkeypatch.setattr(norms.layer_norm_op, "impls",
                        {b: (lambda *a, b=b: seen.append(b) or (a[0].clone(),) * 3)
                         for b in ("triton", "cuda", "torch")})
    x = torch.randn(2, 8)
    try:
        dlh.set_backend("triton")
        DF.layer_norm(x, (8,))
        DF.layer_norm(x, (8,), backend="torch")  # torch: eager F.layer_norm, not the op
        with dlh.use_backend("auto"):
            DF.layer_norm(x, (8,))               # auto on CPU tensors: torch
    finally:
        dlh.set_backend("auto")
    assert seen == ["triton"]


def test_auto_on_cpu_is_torch_and_explain_says_why():
    x = torch.randn(3, 16, dtype=torch.float64)
    verdict = dlh.explain("layer_norm", x, (16,))
    assert verdict["torch"] == "ok"
    assert "float64" in verdict["triton"]
    assert verdict["auto"] == "picks torch"
    if not HAS_GPU:
        assert "cuda" in verdict["cuda"].lower()
    with pytest.raises(ValueError, match="op must be one of"):
        dlh.explain("softmax", x)


def test_auto_prefers_kernels_on_cuda(monkeypatch):
    # the choice logic itself, with availability faked: CUDA tensors go to the first kernel
    # backend that can do the call, in order
    monkeypatch.setattr(_backend, "_REASONS", {("triton", "cuda"): None, ("cuda", "cuda"): None,
                                               ("torch", "cuda"): None})
    assert _backend.choose("x", "auto", "cuda", lambda b: None) == "triton"
    assert _backend.choose("x", "auto", "cuda",
                           lambda b: "no" if b == "triton" else None) == "cuda"
    assert _backend.choose("x", "auto", "cuda", lambda b: None if b == "torch" else "no") == "torch"
    with pytest.raises(RuntimeError, match="backend 'cuda' cannot run this call: too big"):
        _backend.choose("x", "cuda", "cuda", lambda b: "too big" if b == "cuda" else None)


def test_nvtx_ranges_name_op_and_backend(monkeypatch):
    names = []
    monkeypatch.setattr(profiling, "_push", names.append)
    monkeypatch.setattr(profiling, "_pop", lambda: None)
    x = torch.randn(2, 8)
    DF.rms_norm(x, (8,), backend="triton")
    assert names == []  # off by default
    with profiling.nvtx():
        DF.rms_norm(x, (8,), backend="triton")
        DF.add_layer_norm(x, x.clone(), (8,), backend="triton")
    assert names == ["dlh::rms_norm[triton]", "dlh::add_layer_norm[triton]"]


def test_eager_fast_path_skips_the_dispatcher(monkeypatch):
    # plain tensors outside torch.compile must not go through torch.ops (tens of us per call)
    def refuse(*args):
        raise AssertionError("dispatcher path taken in eager mode")
    monkeypatch.setattr(norms.layer_norm_op, "custom_op", refuse)
    x = torch.randn(4, 8, requires_grad=True)
    DF.layer_norm(x, (8,), backend="triton").sum().backward()
    with torch.no_grad():
        DF.layer_norm(x, (8,), backend="triton")
    assert x.grad is not None


# ---------------------------------------------------------------------------------------------
# Modules and patch.

class _MyNorm(torch.nn.LayerNorm):
    """A user's subclass of a supported module: patch leaves it (and says so)."""


class _Block(torch.nn.Module):
    def __init__(self, d=16):
        super().__init__()
        self.ln = torch.nn.LayerNorm(d)
        self.proj = torch.nn.Linear(d, d)
        self.inner = torch.nn.Sequential(torch.nn.RMSNorm(d), torch.nn.GELU())
        self.custom = _MyNorm(d)  # a subclass: reported as left (unused here)

    def forward(self, x):
        return self.inner(self.proj(self.ln(x)))


def test_modules_are_drop_in():
    ln, ref = dlh.nn.LayerNorm(12), torch.nn.LayerNorm(12)
    ref.load_state_dict(ln.state_dict())
    assert isinstance(ln, torch.nn.LayerNorm) and ln.state_dict().keys() == ref.state_dict().keys()
    x = torch.randn(3, 12)
    torch.testing.assert_close(ln(x), ref(x))
    rn = dlh.nn.RMSNorm(12)
    rn.backend = "triton"
    torch.testing.assert_close(rn(x), torch.nn.RMSNorm(12)(x))


def test_patch_swaps_reports_and_unpatches():
    torch.manual_seed(0)
    model = _Block()
    x = torch.randn(5, 16)
    before = model(x)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    opt_params = list(model.parameters())

    report = dlh.patch(model, backend="triton")
    assert type(model.ln) is dlh.nn.LayerNorm and type(model.inner[0]) is dlh.nn.RMSNorm
    assert type(model.inner[1]) is dlh.nn.GELU
    assert [r[0] for r in report.replaced] == ["ln", "inner.0", "inner.1"]
    assert ("custom", "_MyNorm", "subclass of a supported module") in report.left
    assert "replaced 3 module(s)" in str(report)
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    assert list(model.parameters()) == opt_params  # same tensors: an optimizer keeps working
    torch.testing.assert_close(model(x), before)

    assert dlh.unpatch(model) == 3
    assert type(model.ln) is torch.nn.LayerNorm and type(model.inner[0]) is torch.nn.RMSNorm
    assert type(model.inner[1]) is torch.nn.GELU
    torch.testing.assert_close(model(x), before)


def test_patch_ops_filter_and_bad_arguments():
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


def test_patch_transformer_layer_swaps_attention_and_norms():
    # nn.TransformerEncoderLayer calls its attention with need_weights=False: our kernel path.
    # Training mode (dropout 0) keeps torch off its fused fast path, which would bypass modules.
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
    x = torch.randn(2, 5, 32)
    before = layer(x)
    report = dlh.patch(layer, backend="triton")
    assert type(layer.self_attn) is dlh.nn.MultiheadAttention
    assert {r[0] for r in report.replaced} == {"self_attn", "norm1", "norm2"}
    after = layer(x)
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)
    after.sum().backward()
    assert layer.self_attn.in_proj_weight.grad is not None
    dlh.unpatch(layer)
    assert type(layer.self_attn) is torch.nn.MultiheadAttention
