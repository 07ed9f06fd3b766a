"""The op framework: backend registry and choice, explain, import hygiene, NVTX ranges and
modules (patching: tests/test_patch.py)."""
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
# Modules (dlh.patch: tests/test_patch.py).

def test_modules_are_drop_in():
    ln, ref = dlh.nn.LayerNorm(12), torch.nn.LayerNorm(12)
    ref.load_state_dict(ln.state_dict())
    assert isinstance(ln, torch.nn.LayerNorm) and ln.state_dict().keys() == ref.state_dict().keys()
    x = torch.randn(3, 12)
    torch.testing.assert_close(ln(x), ref(x))
    rn = dlh.nn.RMSNorm(12)
    rn.backend = "triton"
    torch.testing.assert_close(rn(x), torch.nn.RMSNorm(12)(x))
