"""The autotuner's own path, on CPU: every `triton.autotune` list we ship (attention fwd, dkdv, dq,
dmask; conv2d forward; linear_gelu) driven through its op's glue and Triton's real tuning
machinery (key, early_config_prune, the benchmark loop with its pre_hook / reset_to_zero, the
reset after tuning, the final launch), with only the benchmarker replaced.

Why: without a GPU the glue never reaches the autotuner (the interpreter runs one fixed config),
so a hook that crashes inside a tuning run, or a buffer the candidates leave dirty, would first
show on the hardware (review 2026-12 item T1: `reset_to_zero=["DQ"]` with DQ=None killed every
attention backward with L or S >= 256 on Triton 3.6).

How: the glue's "on the GPU" test is patched to say yes (and attention's AUTOTUNE_MIN_LEN to 1);
under TRITON_INTERPRET=1 each candidate then runs in the interpreter on CPU tensors. The stub
benchmarker calls the kernel_call the autotuner hands it (that is where the hooks run) and
returns a fake time that makes the last candidate benched the winner, so the test knows which
config must run afterwards. Each call is compared with float64 (the winner really ran, and the
candidates before it left nothing behind: atomic dQ sums into a buffer they share), and the
choice goes through dlh's persistent cache (dlh_kernels/_cache.py): written to DLH_CACHE_DIR,
re-read by fresh autotuners, launched without tuning again.

Shapes are the smallest that keep at least two candidates after pruning (Triton >= 3.9 skips the
benchmark when one is left). Run it on both Triton versions we support:
    python -m pytest -q tests/test_autotune.py
    /work/venv36/bin/python -m pytest -q tests/test_autotune.py
"""
import json
import os

import pytest
import torch
import torch.nn.functional as F

import dlh_kernels.functional as DF
from dlh_kernels.triton_kernels import attention as attn_kernels
from dlh_kernels.triton_kernels import conv2d as conv_kernels
from dlh_kernels.triton_kernels import gelu as gelu_kernels

from conftest import DEVICE, HAS_GPU, assert_close
from test_attention import _mask, check_call, make_qkv

pytestmark = [
    pytest.mark.usefixtures("poison_outputs"),
    pytest.mark.skipif(HAS_GPU, reason="drives the autotuner on CPU tensors through the interpreter"),
]


def _config_of(kwargs: dict) -> tuple:
    """What identifies a candidate in a launch's keyword arguments."""
    names = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M", "num_warps", "num_stages")
    return tuple(kwargs.get(n) for n in names)


def _config_key(config) -> tuple:
    return _config_of(config.all_kwargs())


class Tuning:
    """The stub benchmarker and a record of every launch of the autotuned kernels.

    launches[kernel name]: [(phase, config)], phase "bench" inside a tuning run, "run" for the
    launch the autotuner makes with its choice."""

    def __init__(self):
        self.benched = 0
        self.in_bench = False
        self.launches: dict[str, list] = {}
        self.tuners: dict[str, object] = {}  # kernel name -> the autotuner last handed out

    def bench(self, kernel_call, quantiles=None, **_):
        self.in_bench = True
        try:
            kernel_call()  # runs config.pre_hook, the autotuner's reset_to_zero hook, the kernel
        finally:
            self.in_bench = False
        self.benched += 1
        fake = 1000.0 - self.benched  # each candidate "faster" than the one before: the last wins
        return [fake, fake, fake]

    def install(self, monkeypatch, tuner) -> None:
        """Put the stub in this autotuner and record the launches of its kernel."""
        fn = tuner.fn
        name = fn.fn.__name__ if hasattr(fn, "fn") else fn.__name__
        self.tuners[name] = tuner
        if getattr(tuner, "_test_stub", None) is self:
            return
        # do_bench is a cached_property (reading it would look for a GPU driver): set it directly
        monkeypatch.setitem(tuner.__dict__, "do_bench", self.bench)
        monkeypatch.setattr(tuner, "_test_stub", self, raising=False)
        if getattr(fn.run, "_test_recorder", None) is self:
            return
        inner = fn.run

        def run(*args, **kwargs):
            self.launches.setdefault(name, []).append(
                ("bench" if self.in_bench else "run", _config_of(kwargs)))
            return inner(*args, **kwargs)

        run._test_recorder = self
        monkeypatch.setattr(fn, "run", run, raising=False)

    def check_tuned(self, name: str, tunings: int = 1, allowed=None) -> list:
        """The kernel was tuned `tunings` times (once per new key), each time over >= 2
        candidates, all of them `allowed` (early_config_prune ran), and each tuning was followed
        by a launch of the last candidate benched (the stub's winner), which the autotuner's
        cache holds. Returns the winners."""
        seq = self.launches.get(name, [])
        tuner = self.tuners[name]
        sessions, benched = [], []
        for phase, config in seq:
            if phase == "bench":
                benched.append(config)
            else:
                sessions.append((benched, config))
                benched = []
        assert not benched, f"{name}: benched without a launch after it: {seq}"
        tuned = [(b, run) for b, run in sessions if b]
        assert len(tuned) == tunings, f"{name}: {len(tuned)} tunings, expected {tunings}: {seq}"
        cached = [_config_key(c) for c in tuner.cache.values()]
        for b, run in tuned:
            assert len(set(b)) >= 2, f"{name}: fewer than 2 candidates benched: {b}"
            assert allowed is None or all(allowed(c) for c in b), f"{name}: pruning let through {b}"
            assert run == b[-1], f"{name}: launched {run} after benching {b}"
            # the fields a config does not set (conv2d's BLOCK_K comes from the glue) match any
            assert any(all(a is None or a == r for a, r in zip(c, run)) for c in cached), \
                f"{name}: {run} is not in the autotuner's cache {cached}"
        return [run for _, run in tuned]

    def check_not_tuned(self, name: str, winners: list) -> None:
        runs = [c for phase, c in self.launches.get(name, []) if phase == "run"]
        assert len(runs) == len(self.launches.get(name, [])), f"{name}: benched again"
        assert runs == winners, f"{name}: expected launches of the saved {winners}, got {runs}"

    def reset(self) -> None:
        self.benched = 0
        self.launches.clear()


@pytest.fixture
def tuning(monkeypatch, tmp_path):
    monkeypatch.setenv("DLH_CACHE_DIR", str(tmp_path))
    t = Tuning()
    t.cache_dir = tmp_path
    yield t
    # the next test starts from fresh autotuners (monkeypatch has not restored the factories yet)
    for factory in (attn_kernels._tuned, conv_kernels._tuned_fwd, gelu_kernels._tuned_linear_gelu):
        getattr(factory, "original", factory).cache_clear()


def _hook_factory(monkeypatch, tuning, module, factory_name):
    """Replace module.<factory> (an lru_cached autotuner factory) by one that installs the stub
    in each autotuner it returns; the original's cache is cleared first (fresh autotuners)."""
    original = getattr(module, factory_name)
    original.cache_clear()

    def factory(*args):
        tuner = original(*args)
        tuning.install(monkeypatch, tuner)
        return tuner

    factory.original = original
    monkeypatch.setattr(module, factory_name, factory)
    return original


def _saved_choices(cache_dir, kernel_name: str) -> list:
    files = sorted((cache_dir / "autotune").glob(f"{kernel_name}-*.json"))
    assert files, f"no saved choices for {kernel_name} in {cache_dir}"
    return [c for f in files for c in json.loads(f.read_text())["choices"]]


# ---------------------------------------------------------------------------------------------
# Attention: fwd, dkdv, dq (separate mode) and dmask (an additive mask that requires grad).

ATTN_CASES = {
    # name: (dq mode, mask kind, dropout_p, causal); GQA (2 query heads per K/V head) in all
    "separate_causal": ("separate", None, 0.0, True),     # the default: dQ=None in dK/dV (T1)
    # reset_to_zero on the dQ accumulator; dmask, the bias shared by the heads (BCAST_H)
    "atomic_bias_dropout": ("atomic", "float", 0.25, False),
    "separate_bool_dropout": ("separate", "bool", 0.25, False),
}
# L = S = 64: the largest length at which fwd/dq keep 4 candidates, dkdv 3 and dmask 2 after
# _prune, at interpreter cost (one or two programs per head).
ATTN_SHAPE = (1, 2, 1, 64, 64, 16, 16)  # (B, Hq, Hkv, L, S, D, Dv)


@pytest.fixture
def attention_tuned(monkeypatch, tuning):
    monkeypatch.setattr(attn_kernels, "_on_gpu", lambda t: True)
    monkeypatch.setattr(attn_kernels, "AUTOTUNE_MIN_LEN", 1)
    original = _hook_factory(monkeypatch, tuning, attn_kernels, "_tuned")
    return original


def _attention_call(case):
    dq_mode, mask_kind, dropout_p, causal = ATTN_CASES[case]
    B, Hq, Hkv, L, S, D, Dv = ATTN_SHAPE
    q, k, v = make_qkv(B, Hq, Hkv, L, S, D, Dv, torch.float32, seed=11)
    mask_shape = (B, 1, L, S) if mask_kind == "float" else (B, Hq, L, S)
    mask = None if mask_kind is None else _mask(mask_shape, mask_kind, torch.float32)
    check_call("triton", q, k, v, mask, dropout_p=dropout_p, is_causal=causal, enable_gqa=True)
    return mask_kind == "float"


def _tune_then_reload(tuning, factory, call, expect: dict) -> None:
    """call() tunes every kernel of `expect` (name -> (tunings, allowed)); then fresh autotuners
    (as in a new process: factory's cache cleared) read the saved choices back and launch them
    without benching anything, and call() is still right."""
    call()
    winners = {}
    for name, (tunings, allowed) in expect.items():
        winners[name] = tuning.check_tuned(name, tunings, allowed)
        saved = _saved_choices(tuning.cache_dir, name)  # [[tuning key, str(config)], ...]
        assert len(saved) >= tunings, f"{name}: {len(saved)} choices saved, expected {tunings}"
    factory.cache_clear()
    tuning.reset()
    call()
    assert tuning.benched == 0, "tuned again although the choices were saved"
    for name in expect:
        tuning.check_not_tuned(name, winners[name])


def _fits(max_m, max_n):
    return lambda c: c[0] <= max_m and c[1] <= max_n


@pytest.mark.parametrize("case", list(ATTN_CASES))
def test_attention_autotuned_path(case, monkeypatch, tuning, attention_tuned):
    dq_mode, mask_kind, _, _ = ATTN_CASES[case]
    monkeypatch.setattr(attn_kernels, "DQ_MODE", dq_mode)
    L = ATTN_SHAPE[3]
    small = (1, _fits(L, L))  # _prune: no tile longer than the sequence
    expect = {"attn_fwd_kernel": small, "attn_bwd_dkdv_kernel": small}
    if dq_mode == "separate":
        expect["attn_bwd_dq_kernel"] = small
    if mask_kind == "float":
        expect["attn_bwd_dmask_kernel"] = small
    _tune_then_reload(tuning, attention_tuned, lambda: _attention_call(case), expect)


# ---------------------------------------------------------------------------------------------
# conv2d forward: the plain epilogue (forward) and the GRAD one (the backward's dz = dy * act'(z)),
# two keys of one autotuner.

@pytest.mark.parametrize("activation", ["silu", None])
def test_conv2d_autotuned_path(activation, monkeypatch, tuning):
    monkeypatch.setattr(conv_kernels, "_autotuned", lambda: True)
    factory = _hook_factory(monkeypatch, tuning, conv_kernels, "_tuned_fwd")
    # K = 64 output channels per group: _prune keeps the 5 configs with BLOCK_N <= 64 (of 7)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(1, 4, 5, 6, generator=g).to(DEVICE).requires_grad_()
    w = (torch.randn(64, 4, 3, 3, generator=g) * 0.3).to(DEVICE).requires_grad_()
    b = torch.randn(64, generator=g).to(DEVICE).requires_grad_()

    def act(z):
        return z if activation is None else F.silu(z)

    def call():
        _check_fwd_bwd(lambda *t: DF.conv2d(*t, padding=1, activation=activation, backend="triton"),
                       lambda *t: act(F.conv2d(*t, padding=1)), (x, w, b), seed=4)

    # the backward launches the forward kernel with GRAD=True only for an activation
    tunings = 1 if activation is None else 2
    _tune_then_reload(tuning, factory, call, {"conv2d_fwd_kernel": (tunings, _fits(1 << 30, 64))})


def _check_fwd_bwd(op, reference, inputs, seed):
    """op(*inputs) and its gradients for (input, weight, bias) against reference() in float64,
    with reference() in the input dtype as the eager error bound (test_attention's assert_close)."""
    for t in inputs:
        t.grad = None
    out = op(*inputs)
    leaves = [t.detach().double().requires_grad_() for t in inputs]
    eager_leaves = [t.detach().requires_grad_() for t in inputs]
    ref, eager = reference(*leaves), reference(*eager_leaves)
    assert_close(out, ref, eager, torch.float32, "out")
    dy = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(DEVICE)
    out.backward(dy)
    ref.backward(dy.double())
    eager.backward(dy)
    for name, t, r, e in zip(("input", "weight", "bias"), inputs, leaves, eager_leaves):
        assert_close(t.grad, r.grad, e.grad, torch.float32, f"grad {name}")


# ---------------------------------------------------------------------------------------------
# linear_gelu: forward and the GRAD epilogue of its backward, all 9 configs (no pruning).

@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_linear_gelu_autotuned_path(approximate, monkeypatch, tuning):
    monkeypatch.setattr(gelu_kernels, "_autotuned", lambda: True)
    factory = _hook_factory(monkeypatch, tuning, gelu_kernels, "_tuned_linear_gelu")
    g = torch.Generator().manual_seed(5)
    x = torch.randn(3, 7, 40, generator=g).to(DEVICE).requires_grad_()  # M = 21 rows, K = 40
    w = (torch.randn(48, 40, generator=g) * 0.2).to(DEVICE).requires_grad_()
    b = torch.randn(48, generator=g).to(DEVICE).requires_grad_()

    def call():
        _check_fwd_bwd(lambda *t: DF.linear_gelu(*t, approximate=approximate, backend="triton"),
                       lambda *t: F.gelu(F.linear(*t), approximate=approximate), (x, w, b), seed=6)

    _tune_then_reload(tuning, factory, call, {"linear_gelu_kernel": (2, None)})
