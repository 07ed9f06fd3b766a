"""dlh.patch on the models people run: transformers (GPT-2, Llama, BERT, ViT, T5), diffusers
(UNet2DModel), nn.TransformerEncoderLayer and our 8 reference models, as tiny random-init
configs built in code (`dlh_kernels.coverage.TINY`; nothing is downloaded).

For each: outputs and parameter gradients equal eager on the torch backend and within tolerance
of float64 eager on the Triton interpreter, the state_dict the very same tensors, `unpatch`
restoring the exact original behaviour, and the coverage (`dlh.coverage`) at least 90% (100% on
the reference models) with every miss explained by the patch report. Then what recognition,
the attention hooks, the GroupNorm+SiLU handoff and functional routing must and must not do.
"""
import copy
import functools
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

import dlh_kernels as dlh
import dlh_kernels.functional as DF
from dlh_kernels import coverage as C
from dlh_kernels import models

from conftest import backend_param

transformers = pytest.importorskip("transformers")
diffusers = pytest.importorskip("diffusers")

THIRD_PARTY = ["gpt2", "llama", "bert", "vit_hf", "t5", "unet2d", "transformer_encoder_layer"]
# the floor of dlh.patch's coverage per model (the issue asks 90% of transformers/diffusers
# models, 100% of ours; all of these reach 100% today, so a regression anywhere fails)
MIN_COVERAGE = {}


def _output(out):
    """The tensor a model's output holds (HF ModelOutput, tuples of the reference models)."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)):
        return torch.cat([_output(o).flatten() for o in out])
    for key in ("logits", "last_hidden_state", "sample"):
        if getattr(out, key, None) is not None:
            return getattr(out, key)
    raise TypeError(type(out))


def _build(name):
    torch.manual_seed(0)
    model, run = C.build_tiny(name)
    for m in model.modules():  # dropout off, the rest in training mode (gradients)
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    return model, run


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _step(model, run):
    out = _output(run(model))
    out.double().square().mean().backward()
    return out.detach()


@pytest.mark.parametrize("name", THIRD_PARTY + list(models.NAMES))
def test_torch_backend_equals_eager_and_unpatches(name):
    model, run = _build(name)
    eager = copy.deepcopy(model)
    out_eager = _step(eager, run)
    types_before = [(n, type(m)) for n, m in model.named_modules()]
    state = model.state_dict()

    report = dlh.patch(model, backend="torch")
    patched_state = model.state_dict()
    assert list(patched_state) == list(state)
    assert all(patched_state[k].data_ptr() == v.data_ptr() for k, v in state.items())
    out = _step(model, run)
    torch.testing.assert_close(out, out_eager, rtol=1e-5, atol=1e-6)
    ge, gp = _grads(eager), _grads(model)
    assert ge.keys() == gp.keys()
    for k in ge:
        torch.testing.assert_close(gp[k], ge[k], rtol=1e-4, atol=1e-5, msg=k)

    cov = C.measure(model, run)
    assert cov.fraction >= MIN_COVERAGE.get(name, 1.0), str(cov)
    reasons = report.reasons()
    for path, _type, _kind, why in cov.misses():  # every miss has the patch report's reason
        assert path in reasons and why == reasons[path], (path, why)

    assert dlh.unpatch(model) > 0
    assert [(n, type(m)) for n, m in model.named_modules()] == types_before
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    assert C.measure(model, run).dlh == 0
    model.zero_grad()
    eager.zero_grad()
    assert torch.equal(_step(model, run), _step(eager, run))  # the exact original behaviour


@pytest.mark.parametrize("backend", [backend_param("triton")])
@pytest.mark.parametrize("name", THIRD_PARTY + ["ddpm_unet", "gpt"])
def test_triton_interpreter_within_tolerance_of_float64(name, backend):
    model, run = _build(name)
    reference = copy.deepcopy(model).double()

    ref = _step(reference, lambda m: run(m, torch.float64))
    dlh.patch(model, backend=backend)
    out = _step(model, run)
    assert C.measure(model, run).fraction >= MIN_COVERAGE.get(name, 1.0)
    torch.testing.assert_close(out.double(), ref, rtol=2e-4, atol=2e-4)
    g64, g = _grads(reference), _grads(model)
    for k in g64:
        scale = g64[k].abs().max().item() + 1e-3
        torch.testing.assert_close(g[k].double() / scale, g64[k] / scale, rtol=1e-3, atol=1e-3, msg=k)


# ---------------------------------------------------------------------------------------------
# What the report says, dry runs, per-model attention switches.

def test_dry_run_changes_nothing_and_says_the_same():
    for name in ("llama", "unet2d", "gpt"):
        model, run = _build(name)
        before = [(n, type(m), dict(m._forward_pre_hooks)) for n, m in model.named_modules()]
        procs = {n: m.processor for n, m in model.named_modules() if hasattr(m, "processor")}
        impl = getattr(getattr(model, "config", None), "_attn_implementation", None)
        dry = dlh.patch(model, dry_run=True)
        assert dry.dry_run and "dry run" in str(dry) and "would replace" in str(dry)
        assert [(n, type(m), dict(m._forward_pre_hooks)) for n, m in model.named_modules()] == before
        assert {n: m.processor for n, m in model.named_modules() if hasattr(m, "processor")} == procs
        assert getattr(getattr(model, "config", None), "_attn_implementation", None) == impl
        assert C.measure(model, run).dlh == 0
        real = dlh.patch(model)
        assert [r.path for r in dry.replaced] == [r.path for r in real.replaced]
        assert [r.path for r in dry.routed] == [r.path for r in real.routed]
        dlh.unpatch(model)


def test_transformers_attention_is_switched_per_model_and_restored():
    a, _ = _build("llama")
    b, _ = _build("llama")
    report = dlh.patch(a, backend="torch")
    assert a.config._attn_implementation == "dlh_torch" and b.config._attn_implementation == "sdpa"
    assert [r.how for r in report.routed] == ["AttentionInterface 'dlh_torch'"] * 2
    dlh.unpatch(a)
    assert a.config._attn_implementation == "sdpa"
    # a model that chose eager attention keeps it, and the report says why
    c, _ = _build("llama")
    c.set_attn_implementation("eager")
    reasons = dlh.patch(c).reasons()
    assert c.config._attn_implementation == "eager"
    assert "attn_implementation='eager'" in reasons["model.layers.0.self_attn"]


def test_transformers_attention_takes_padding_masks_and_gqa(df_calls):
    model, _ = _build("llama")  # 4 query heads over 2 key/value heads
    eager = copy.deepcopy(model)
    ids = torch.randint(0, 64, (2, 9))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, :3] = 0  # left padding
    dlh.patch(model, backend="torch")
    out = model(ids, attention_mask=mask).logits
    torch.testing.assert_close(out, eager(ids, attention_mask=mask).logits, rtol=1e-5, atol=1e-6)
    assert [c for c in df_calls if c[0] == "scaled_dot_product_attention"] == [
        ("scaled_dot_product_attention", "torch")] * 2


def test_diffusers_processors_are_restored():
    model, run = _build("unet2d")
    procs = {n: m.processor for n, m in model.named_modules() if hasattr(m, "processor")}
    dlh.patch(model)
    assert all(type(m.processor).__name__ == "DlhAttnProcessor"
               for m in model.modules() if hasattr(m, "processor"))
    dlh.unpatch(model)
    assert {n: m.processor for n, m in model.named_modules() if hasattr(m, "processor")} == procs


# ---------------------------------------------------------------------------------------------
# Recognition by structure: what it takes, what it refuses.

class _GemmaRMSNorm(torch.nn.Module):
    def __init__(self, d, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.zeros(d))  # (1 + w): zero-initialised

    def forward(self, x):
        out = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        return (out * (1.0 + self.weight.float())).type_as(x)


class _HardcodedEpsNorm(torch.nn.Module):
    def __init__(self, d):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(d))
        self.bias = torch.nn.Parameter(torch.randn(d))

    def forward(self, x):
        return F.layer_norm(x, x.shape[-1:], self.weight, self.bias, 1e-12)


class _ScaleNorm(torch.nn.Module):
    """Named like a norm, one 1-D weight, but a scaling: must not be taken."""

    def __init__(self, d):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(d))
        self.eps = 1e-5

    def forward(self, x):
        return x * self.weight


class _QuickGELU(torch.nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class _SwishActivation(torch.nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(x)


class _GatedMLP(torch.nn.Module):
    """Phi-3 style: one gate_up projection, chunked, gate first."""

    def __init__(self, d=8, h=12):
        super().__init__()
        self.gate_up_proj = torch.nn.Linear(d, 2 * h, bias=False)
        self.down_proj = torch.nn.Linear(h, d, bias=False)
        self.activation_fn = _SwishActivation()

    def forward(self, x):
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(up * self.activation_fn(gate))


class _DropoutAfterMLP(torch.nn.Module):
    def __init__(self, d=8):
        super().__init__()
        self.fc1, self.fc2 = torch.nn.Linear(d, 16), torch.nn.Linear(16, d)
        self.act, self.drop = torch.nn.GELU(approximate="tanh"), torch.nn.Dropout(0.5)

    def forward(self, x):
        return self.drop(self.fc2(self.act(self.fc1(x))))


def _holder(**children):
    m = torch.nn.Module()
    for k, v in children.items():
        m.add_module(k, v)
    return m


def test_recognises_norm_variants_and_refuses_lookalikes():
    model = _holder(gemma=_GemmaRMSNorm(8), hard=_HardcodedEpsNorm(8), scale=_ScaleNorm(8))
    with torch.no_grad():
        model.gemma.weight.normal_()
    x = torch.randn(3, 5, 8) * 3 + 1
    wanted = {k: m(x) for k, m in model.named_children()}
    report = dlh.patch(model, backend="torch")
    done = {r.path: r.to_type for r in report.replaced}
    assert "(1 + weight)" in done["gemma"] and "rms_norm" in done["gemma"]
    assert "layer_norm" in done["hard"] and "eps=1e-12" in done["hard"]
    assert "scale" not in done and "matched no LayerNorm/RMSNorm" in report.reasons()["scale"]
    assert isinstance(model.gemma, _GemmaRMSNorm) and type(model.gemma) is not _GemmaRMSNorm
    for k, m in model.named_children():
        # the same math in float32: equal to rounding (the fused op rounds once)
        torch.testing.assert_close(m(x), wanted[k], rtol=1e-5, atol=1e-5)
    # mixed dtypes (bf16 input, fp32 weight) run the module's own forward: its dtype rules
    xb = x.bfloat16()
    assert model.gemma(xb).dtype == _GemmaRMSNorm.forward(model.gemma, xb).dtype
    dlh.unpatch(model)
    assert type(model.gemma) is _GemmaRMSNorm


def test_recognises_activations_and_gated_mlps(df_calls):
    model = _holder(quick=_QuickGELU(), mlp=_GatedMLP(), after=_DropoutAfterMLP())
    x = torch.randn(2, 3, 8)
    model.eval()
    wanted = model.mlp(x), model.after(x)
    report = dlh.patch(model, backend="torch")
    done = {r.path: r for r in report.replaced}
    assert "quick" in report.reasons() and "matched none of" in report.reasons()["quick"]
    assert done["mlp"].op == "swiglu" and "chunk(2)" in done["mlp"].to_type
    assert done["after"].op == "linear"
    torch.testing.assert_close(model.mlp(x), wanted[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model.after(x), wanted[1], rtol=1e-5, atol=1e-6)
    assert {"swiglu", "linear"} <= {name for name, _ in df_calls}
    # in training the dropout sits where the module put it: after fc2 (mask applied last)
    model.train()
    torch.manual_seed(5)
    got = model.after(x)
    dlh.unpatch(model)
    torch.manual_seed(5)
    torch.testing.assert_close(got, model.after(x), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# GroupNorm + SiLU handed over inside a block's forward.

class _ResBlock(torch.nn.Module):
    """diffusers' ResnetBlock2D in small: norm1 -> nonlinearity, the same SiLU on temb."""

    def __init__(self, c=8, branch="default"):
        super().__init__()
        self.norm1 = torch.nn.GroupNorm(4, c)
        self.conv1 = torch.nn.Conv2d(c, c, 3, padding=1)
        self.norm2 = torch.nn.GroupNorm(4, c)
        self.nonlinearity = torch.nn.SiLU()
        self.temb_proj = torch.nn.Linear(c, c)
        self.branch = branch

    def forward(self, x, temb):
        h = self.norm1(x)
        h = self.nonlinearity(h)
        h = self.conv1(h)
        temb = self.nonlinearity(temb)
        h = h + self.temb_proj(temb)[:, :, None, None]
        if self.branch == "default":
            h = self.norm2(h)
        else:
            h = self.norm2(h)
            h = h * 2  # something between the norm and the activation: no handoff here
        h = self.nonlinearity(h)
        return x + h


class _NormUsedTwice(torch.nn.Module):
    def __init__(self, c=8):
        super().__init__()
        self.norm = torch.nn.GroupNorm(2, c)
        self.act = torch.nn.SiLU()

    def forward(self, x):
        h = self.norm(x)
        y = self.act(h)
        return y + h


@pytest.mark.parametrize("branch", ["default", "scale"])
def test_groupnorm_silu_handoff_only_where_the_source_proves_it(branch, df_calls):
    torch.manual_seed(0)
    block = _ResBlock(branch=branch)
    x, temb = torch.randn(2, 8, 5, 5), torch.randn(2, 8)
    wanted = block(x, temb)
    report = dlh.patch(block, backend="torch")
    handed = {r.path for r in report.replaced if "handed to" in r.to_type}
    assert handed == ({"norm1", "norm2"} if branch == "default" else {"norm1"})
    torch.testing.assert_close(block(x, temb), wanted, rtol=1e-5, atol=1e-6)
    # the SiLU on temb (and on norm2's scaled output in the other branch) still ran as a SiLU
    silus = sum(1 for name, _ in df_calls if name == "silu")
    assert silus == (1 if branch == "default" else 2)
    dlh.unpatch(block)
    assert type(block.norm1) is torch.nn.GroupNorm and block.norm1.__dict__.get("_dlh_handoff") is None

    twice = _NormUsedTwice()
    report = dlh.patch(twice, backend="torch")
    assert not any("handed to" in r.to_type for r in report.replaced)
    x = torch.randn(2, 8, 3, 3)
    torch.testing.assert_close(twice(x), F.silu(F.group_norm(x, 2, twice.norm.weight, twice.norm.bias)) +
                               F.group_norm(x, 2, twice.norm.weight, twice.norm.bias), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Functional calls in a module's call tree.

class _Functional(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(8))
        self.conv = torch.nn.Parameter(torch.randn(4, 4, 3, 3) * 0.2)
        self.helper = _Helper()

    def forward(self, x):
        h = F.layer_norm(x, (8,), self.w)
        h = F.gelu(h, approximate="tanh") + F.silu(h) + F.leaky_relu(h, 0.2)
        h = torch.nn.functional.relu(h, inplace=True)  # in place: left to torch
        img = h.view(2, 4, 2, 4)
        img = F.group_norm(F.conv2d(img, self.conv, padding=1), 2)
        return self.helper(img)


class _Helper(torch.nn.Module):
    def forward(self, x):
        return x * 2  # names nothing: no router of its own


@pytest.fixture
def df_calls(monkeypatch):
    calls = []
    for name in DF.__all__:
        fn = getattr(DF, name)

        @functools.wraps(fn)
        def spy(*args, _fn=fn, _name=name, **kwargs):
            calls.append((_name, kwargs.get("backend")))
            return _fn(*args, **kwargs)
        monkeypatch.setattr(DF, name, spy)
    return calls


def test_functional_calls_are_routed_in_the_call_tree(df_calls):
    torch.manual_seed(1)
    model = _Functional()
    x = torch.randn(2, 4, 8)
    wanted = model(x)
    report = dlh.patch(model, backend="torch")
    assert [r.path for r in report.routed] == [""]
    assert "F.gelu" in report.routed[0].how and "F.conv2d" in report.routed[0].how
    torch.testing.assert_close(model(x), wanted, rtol=1e-5, atol=1e-6)
    assert [n for n, _ in df_calls] == ["layer_norm", "gelu", "silu", "leaky_relu", "conv2d", "group_norm"]
    # the same functions outside the model stay torch's
    df_calls.clear()
    F.gelu(x)
    assert df_calls == []
    dlh.unpatch(model)
    assert not model._forward_pre_hooks


def test_transformer_encoder_layer_in_eval_runs_dlh_not_the_fast_path():
    layer, (x,) = C.TINY["transformer_encoder_layer"]()
    model = torch.nn.Sequential(layer).eval()
    with torch.no_grad():
        fast = model(x)  # torch's fused fast path: none of the swapped modules would run
    dlh.patch(model, backend="torch")
    assert type(model[0]) is dlh.nn.TransformerEncoderLayer
    assert type(model[0].self_attn) is dlh.nn.MultiheadAttention
    with torch.no_grad():
        torch.testing.assert_close(model(x), fast, rtol=1e-5, atol=1e-5)
    cov = C.coverage(model, x)
    assert cov.fraction == 1.0 and cov.total == 4, str(cov)
    dlh.unpatch(model)
    assert type(model[0]) is torch.nn.TransformerEncoderLayer
    assert type(model[0].self_attn) is torch.nn.MultiheadAttention


# ---------------------------------------------------------------------------------------------
# FSDP2 as DDP, two CPU processes over gloo.

_FSDP_SCRIPT = textwrap.dedent('''
    import json, os, sys, torch, torch.distributed as dist
    dist.init_process_group("gloo")
    import dlh_kernels as dlh
    from dlh_kernels import coverage as C
    torch.manual_seed(0)
    mode = sys.argv[1]
    model, _ = C.TINY["llama"]()
    report = dlh.patch(model, backend="torch")
    assert report.replaced and report.routed
    if mode == "fsdp":
        from torch.distributed.fsdp import fully_shard
        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
    else:
        model = torch.nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(dist.get_rank())
    losses = []
    for step in range(3):
        ids = torch.randint(0, 64, (2, 7), generator=g)
        loss = model(ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    if dist.get_rank() == 0:
        print("LOSSES", json.dumps(losses))
    dist.destroy_process_group()
    # Skip the interpreter's teardown: gloo's worker threads can still be joinable when the C++
    # statics are destroyed, and that aborts ("terminate called without an active exception")
    # after the work is done, at random (seen once in CI, torch 2.13). What this test checks has
    # been printed by then.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
''')


@pytest.mark.slow
def test_patched_llama_trains_under_fsdp2_as_under_ddp(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(_FSDP_SCRIPT)
    env = dict(os.environ, OMP_NUM_THREADS="1", TRITON_INTERPRET="0")
    losses = {}
    for mode in ("ddp", "fsdp"):
        proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                               "--nproc-per-node", "2", str(script), mode], capture_output=True,
                              text=True, timeout=240, env=env, cwd=tmp_path)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
        line = next(x for x in proc.stdout.splitlines() if x.startswith("LOSSES"))
        losses[mode] = [float(v) for v in line[7:].strip("[]").split(",")]
    assert len(losses["ddp"]) == 3 and losses["ddp"][0] != losses["ddp"][-1]
    assert losses["fsdp"] == pytest.approx(losses["ddp"], rel=1e-5)


def test_coverage_command(capsys):
    from dlh_kernels import cli
    assert cli.main(["coverage", "llama", "gan"]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line for line in out.splitlines()[2:] if line.strip()}
    assert "9 (100%)" in rows["llama"] and "5 (100%)" in rows["gan"], out
    assert "missed" not in out
    with pytest.raises(ValueError, match="model must be one of"):
        C.build_tiny("resnet9000")


def test_coverage_lists_misses_with_the_reports_reason():
    model, run = _build("llama")
    model.set_attn_implementation("eager")
    dlh.patch(model, ops={"rms_norm"})
    cov = C.measure(model, run)
    assert cov.counts()["norm"] == (5, 5) and cov.counts()["attention"] == (0, 2)
    misses = {p: why for p, _t, _k, why in cov.misses()}
    assert misses["model.layers.0.self_attn"] == "attention: excluded by ops="
    assert "excluded by ops=" in misses["model.layers.0.mlp"]
    assert "model.layers.0.mlp" in str(cov)


# ---------------------------------------------------------------------------------------------
# timm: it needs torchvision, which does not install beside the CPU torch here, so a replica of
# its ViT block's structure (timm.layers: LayerNorm subclass with its own forward, Mlp with
# drop1/norm/drop2, Attention calling F.scaled_dot_product_attention, LayerScale).

class _TimmLayerNorm(torch.nn.LayerNorm):
    def forward(self, x):
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)


class _TimmMlp(torch.nn.Module):
    def __init__(self, d, hidden):
        super().__init__()
        self.fc1 = torch.nn.Linear(d, hidden)
        self.act = torch.nn.GELU()
        self.drop1 = torch.nn.Dropout(0.0)
        self.norm = torch.nn.Identity()
        self.fc2 = torch.nn.Linear(hidden, d)
        self.drop2 = torch.nn.Dropout(0.0)

    def forward(self, x):
        x = self.drop1(self.act(self.fc1(x)))
        return self.drop2(self.fc2(self.norm(x)))


class _TimmAttention(torch.nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.num_heads, self.head_dim = heads, d // heads
        self.qkv = torch.nn.Linear(d, 3 * d)
        self.q_norm, self.k_norm = torch.nn.Identity(), torch.nn.Identity()
        self.proj = torch.nn.Linear(d, d)

    def forward(self, x):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        x = F.scaled_dot_product_attention(self.q_norm(q), self.k_norm(k), v)
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class _LayerScale(torch.nn.Module):
    def __init__(self, d):
        super().__init__()
        self.gamma = torch.nn.Parameter(torch.full((d,), 0.5))

    def forward(self, x):
        return x * self.gamma


class _TimmBlock(torch.nn.Module):
    def __init__(self, d=16, heads=2):
        super().__init__()
        self.norm1, self.attn, self.ls1 = _TimmLayerNorm(d), _TimmAttention(d, heads), _LayerScale(d)
        self.norm2, self.mlp, self.ls2 = _TimmLayerNorm(d), _TimmMlp(d, 4 * d), _LayerScale(d)

    def forward(self, x):
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


@pytest.mark.parametrize("backend", [backend_param("torch"), backend_param("triton")])
def test_timm_style_block(backend):
    torch.manual_seed(3)
    model = torch.nn.Sequential(_TimmBlock(), _TimmBlock())
    x = torch.randn(2, 5, 16)
    reference = copy.deepcopy(model).double()
    report = dlh.patch(model, backend=backend)
    done = {r.path: r.op for r in report.replaced}
    assert done["0.norm1"] == "layer_norm" and done["0.mlp"] == "linear", str(report)
    assert [r.path for r in report.routed] == ["0.attn", "1.attn"]
    out = model(x)
    torch.testing.assert_close(out.double(), reference(x.double()), rtol=2e-4, atol=2e-4)
    out.square().sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    assert C.coverage(model, x).fraction == 1.0


def test_patched_llama_under_torch_compile():
    model, run = _build("llama")
    model.eval()
    with torch.no_grad():
        wanted = run(model).logits
    dlh.patch(model, backend="torch")
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager")
    with torch.no_grad():
        torch.testing.assert_close(run(compiled).logits, wanted, rtol=1e-5, atol=1e-6)


def test_a_patched_model_pickles_and_copies():
    import io
    model, run = _build("llama")
    wanted = run(model).logits
    dlh.patch(model, backend="torch")
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert type(loaded.model.norm) is type(model.model.norm)  # the same Dlh class
    torch.testing.assert_close(run(loaded).logits, wanted, rtol=1e-5, atol=1e-6)
    assert C.measure(loaded, run).fraction == 1.0
    twin = copy.deepcopy(model)
    assert dlh.unpatch(loaded) == dlh.unpatch(twin) == dlh.unpatch(model)
    assert type(loaded.model.norm) is type(model.model.norm) is type(twin.model.norm)


def test_a_transformers_model_inside_a_users_model():
    backbone, _ = _build("bert")
    wrapper = torch.nn.Sequential()
    wrapper.add_module("backbone", backbone)
    report = dlh.patch(wrapper, backend="torch")
    assert backbone.config._attn_implementation == "dlh_torch"
    assert "backbone.encoder.layer.0.attention.self" in {r.path for r in report.routed}
    ids = torch.randint(0, 64, (2, 7))
    cov = C.coverage(wrapper, ids)
    assert cov.fraction == 1.0, str(cov)
    dlh.unpatch(wrapper)
    assert backbone.config._attn_implementation == "sdpa"


def _attend(q, k, v):
    """A module-level helper of the model's own file that calls SDPA."""
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


class _UsesHelper(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(8, 24)

    def forward(self, x):
        q, k, v = self.proj(x).view(2, 5, 3, 2, 4).permute(2, 0, 3, 1, 4)
        return _attend(q, k, v)


def test_sdpa_in_a_helper_function_of_the_models_file(df_calls):
    model = _UsesHelper()
    x = torch.randn(2, 5, 8)
    wanted = model(x)
    report = dlh.patch(model, backend="torch")
    assert [(r.path, r.how) for r in report.routed] == [("", "F.scaled_dot_product_attention")]
    torch.testing.assert_close(model(x), wanted, rtol=1e-5, atol=1e-6)
    assert ("scaled_dot_product_attention", "torch") in df_calls


class _LlamaLikeMLP(torch.nn.Module):
    def __init__(self, d=8, h=12):
        super().__init__()
        self.gate_proj, self.up_proj = torch.nn.Linear(d, h, bias=False), torch.nn.Linear(d, h, bias=False)
        self.down_proj = torch.nn.Linear(h, d, bias=False)
        self.act_fn = torch.nn.SiLU()

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


def test_recognition_does_not_trust_the_weights():
    # a zero-initialised out projection makes every template give 0 on the module's own weights;
    # the probe uses random weights, so gate and up are still told apart
    torch.manual_seed(0)
    model = _holder(mlp=_LlamaLikeMLP())
    torch.nn.init.zeros_(model.mlp.down_proj.weight)
    eager = copy.deepcopy(model)
    report = dlh.patch(model, backend="torch")
    assert "silu(gate_proj(x)) * up_proj(x)" in report.replaced[0].to_type
    with torch.no_grad():  # as training would move it
        for m in (model, eager):
            torch.manual_seed(1)
            m.mlp.down_proj.weight.normal_()
    x = torch.randn(3, 8)
    torch.testing.assert_close(model.mlp(x), eager.mlp(x), rtol=1e-5, atol=1e-6)
