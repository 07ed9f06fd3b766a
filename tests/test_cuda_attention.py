"""csrc/attention.cu, the CUDA C++ tensor-core attention (backend "cuda"), three ways:

  (a) on a GPU (marked `gpu`): DF.scaled_dot_product_attention(..., backend="cuda"), forward and
      gradients, against the float64 reference with test_attention.py's tolerance (FACTOR x the
      error of eager attention in the dtype + FLOOR), on its sweep of head dims, lengths off the
      tile, causal both ways, GQA, masks, layouts; and `auto` never sending it what it cannot do;
  (b) on the CPU, without a GPU: the kernels compiled by the host compiler against the strict
      CUDA emulation of tests/cuda_emu (mma.sync m16n8k16, ldmatrix plain and transposed, and an
      asynchronous cp.async, emulated lane by lane from the PTX ISA's fragment layouts; shared
      memory bounded by the launch's size, alignment, races between barriers and shuffle masks
      checked), so the kernels' fragment bookkeeping, online softmax, masking, tiling and both
      backward kernels run for real, driven by the op's own glue
      (dlh_kernels.ops.attention._cuda_fwd/_cuda_bwd), and any violation fails the call;
  (c) the backend's capability answers (what `cuda` refuses and why), on any machine.
"""
import math

import pytest
import torch

from conftest import DEVICE, HAS_GPU
from test_attention import assert_close, check_call, make_qkv
from test_cuda_build import _build_emulated, needs_nvcc

import dlh_kernels as dlh
import dlh_kernels.functional as DF
from dlh_kernels.ops import attention as attn

pytestmark = pytest.mark.usefixtures("poison_outputs")  # NaN-filled outputs: unwritten elements fail

F16, BF16 = torch.float16, torch.bfloat16

# ---------------------------------------------------------------------------------------------
# (a) on a GPU

GPU_SHAPES = {  # (B, Hq, Hkv, L, S, D)
    "one_token": (1, 1, 1, 1, 1, 64),
    "hd32_ragged": (2, 3, 3, 37, 29, 32),
    "hd64_L<S": (1, 2, 2, 19, 145, 64),
    "hd96_L>S": (1, 2, 2, 145, 19, 96),
    "hd128_gqa": (2, 8, 2, 200, 200, 128),
    "hd64_mqa": (1, 4, 1, 129, 130, 64),
    "hd128_gpt": (2, 6, 6, 256, 256, 128),
    "hd64_long": (1, 2, 2, 1031, 1031, 64),
}


@pytest.mark.gpu
@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype", [F16, BF16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("shape", list(GPU_SHAPES))
def test_gpu_sweep(shape, dtype, is_causal):
    B, Hq, Hkv, L, S, D = GPU_SHAPES[shape]
    check_call("cuda", *make_qkv(B, Hq, Hkv, L, S, D, D, dtype), is_causal=is_causal, enable_gqa=Hq != Hkv)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [F16, BF16], ids=["fp16", "bf16"])
def test_gpu_head_dim_256_forward(dtype):
    q, k, v = (t.detach() for t in make_qkv(2, 2, 2, 77, 90, 256, 256, dtype))
    with torch.no_grad():
        check_call("cuda", q, k, v, grads=False)
        check_call("cuda", q, k, v, is_causal=True, grads=False)


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["bool", "additive_fp32", "additive_half", "dead_rows"])
def test_gpu_masks(kind):
    q, k, v = make_qkv(2, 2, 2, 70, 90, 64, 64, F16)
    g = torch.Generator().manual_seed(3)
    if kind == "bool":
        mask = (torch.rand(2, 1, 70, 90, generator=g) > 0.3).to(DEVICE)
    elif kind == "dead_rows":
        mask = (torch.rand(70, 90, generator=g) > 0.3)
        mask[5] = False
        mask = mask.to(DEVICE)
    else:
        mask = torch.randn(1, 2, 70, 90, generator=g)
        mask = mask.to(torch.float32 if kind == "additive_fp32" else F16).to(DEVICE)
    check_call("cuda", q, k, v, mask)


@pytest.mark.gpu
@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
def test_gpu_dropout_matches_the_triton_keep_mask(is_causal):
    q, k, v = make_qkv(2, 4, 2, 150, 170, 64, 64, BF16)
    torch.manual_seed(99)
    ours = DF.scaled_dot_product_attention(q, k, v, dropout_p=0.25, is_causal=is_causal, enable_gqa=True,
                                           backend="cuda")
    torch.manual_seed(99)
    seed = attn.draw_seed(q.device)
    keep = attn.dropout_mask(q, k, 0.25, seed)
    ref_in = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = attn.attention_reference(*ref_in, None, 0.25, is_causal, None, True, keep=keep)
    eager_in = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    eager = attn.attention_reference(*eager_in, None, 0.25, is_causal, None, True, keep=keep)
    assert_close(ours, ref, eager, BF16, "out")
    g = torch.randn_like(ours)
    ours.backward(g)
    ref.backward(g.double())
    eager.backward(g)
    for name, t, rt, et in zip("qkv", (q, k, v), ref_in, eager_in):
        assert_close(t.grad, rt.grad, et.grad, BF16, f"grad {name}")


@pytest.mark.gpu
def test_gpu_layouts_and_empty():
    check_call("cuda", *make_qkv(2, 4, 4, 100, 100, 64, 64, BF16, layout="bshd"), is_causal=True)
    q, k, v = make_qkv(0, 2, 2, 8, 8, 64, 64, F16)
    out = DF.scaled_dot_product_attention(q, k, v, backend="cuda")
    assert out.shape == (0, 2, 8, 64)


@pytest.mark.gpu
def test_gpu_backward_is_deterministic():
    q, k, v = make_qkv(2, 4, 2, 300, 300, 64, 64, BF16)
    grads = []
    for _ in range(2):
        for t in (q, k, v):
            t.grad = None
        DF.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True, backend="cuda").sum().backward()
        grads.append([t.grad.clone() for t in (q, k, v)])
    assert all(torch.equal(a, b) for a, b in zip(*grads))


@pytest.mark.gpu
def test_gpu_auto_routes_around_what_cuda_cannot_do():
    q, k, v = make_qkv(1, 2, 2, 33, 33, 80, 80, F16)  # head dim 80: not a cuda instantiation
    verdict = attn.explain("scaled_dot_product_attention", {"query": q, "key": k, "value": v})
    assert "head dims" in verdict["cuda"] and verdict["auto"] != "picks cuda"
    with pytest.raises(RuntimeError, match="backend 'cuda' cannot run this call"):
        DF.scaled_dot_product_attention(q, k, v, backend="cuda")


# ---------------------------------------------------------------------------------------------
# (b) the CPU emulation

EMU_ATTN_ENTRIES = [("attention_fwd", "AttentionFwdArgs"), ("attention_bwd", "AttentionBwdArgs")]
EMU_ATTN_EXPORTS = r"""
EMU_EXPORT int emu_head_dim_supported(long long D, int backward) {
  return dlh::attention_head_dim_supported(D, backward != 0);
}
"""


class _EmulatedAttentionExt:
    """dlh_kernels._C's attention functions (same positional arguments) over the CPU-emulated
    kernels, through ctypes structures mirroring dlh::AttentionFwdArgs / AttentionBwdArgs."""

    def __init__(self, lib):
        import ctypes

        U, I = ctypes.c_uint64, ctypes.c_int64  # noqa: E741
        sizes = [(n, I) for n in "B Hq Hkv L S D".split()]
        tail = [("mask_kind", ctypes.c_int), ("scale", ctypes.c_float), ("dropout_p", ctypes.c_float),
                ("causal", ctypes.c_bool), ("dtype", ctypes.c_int), ("stream", U)]

        class Fwd(ctypes.Structure):
            _fields_ = [(n, U) for n in "q k v mask seed out lse".split()] + sizes + [("strides", I * 16)] + tail

        class Bwd(ctypes.Structure):
            _fields_ = ([(n, U) for n in "dout q k v out lse mask seed dq dk dv delta dscores".split()] + sizes
                        + [("strides", I * 28)] + tail)

        self.head_dim_supported = lib.function("emu_head_dim_supported", ctypes.c_int,
                                               [ctypes.c_longlong, ctypes.c_int])
        self.lib, self.Fwd, self.Bwd, self.I = lib, Fwd, Bwd, I
        self.calls = []

    def _call(self, entry, struct, n_strides, args):
        names = [n for n, _ in struct._fields_]
        kw = dict(zip(names, args))
        kw["strides"] = (self.I * n_strides)(*kw["strides"])
        try:
            self.lib.run(entry, struct(**kw))
        except RuntimeError as exc:  # the C++ invalid_argument messages say "must"
            message = str(exc)
            raise (ValueError if "must" in message else RuntimeError)(message) from None

    def attention_fwd(self, *args):
        self.calls.append("fwd")
        self._call("attention_fwd", self.Fwd, 16, args)

    def attention_bwd(self, *args):
        self.calls.append("bwd")
        self._call("attention_bwd", self.Bwd, 28, args)

    def attention_head_dim_supported(self, D, backward):
        return bool(self.head_dim_supported(D, int(backward)))


@pytest.fixture(scope="module")
def emulated_attention():
    return _EmulatedAttentionExt(_build_emulated("attention.cu", EMU_ATTN_ENTRIES, EMU_ATTN_EXPORTS, min_launches=4))


@pytest.fixture
def cuda_glue(emulated_attention, monkeypatch):
    """dlh_kernels.ops.attention with its cuda glue routed to the emulated kernels."""
    from dlh_kernels import _ext
    monkeypatch.setattr(_ext, "ext", lambda: emulated_attention)
    monkeypatch.setattr(_ext, "stream_handle", lambda device: 0)
    emulated_attention.calls.clear()
    return attn


def _mask(kind, B, H, L, S, g):
    if kind is None:
        return None
    if kind == "bool":  # (L, S) broadcast over batch and heads, one row fully masked
        m = torch.rand(L, S, generator=g) > 0.3
        m[min(3, L - 1)] = False
        return m.view(1, 1, L, S)
    m = torch.randn(B, 1, L, S, generator=g)  # additive fp32 per batch, some -inf
    m[torch.rand(B, 1, L, S, generator=g) < 0.2] = float("-inf")
    return m


def _check_emulated(A, B, Hq, Hkv, L, S, D, dtype, causal, mask_kind=None, layout="contiguous", grads=True,
                    dropout_p=0.0):
    torch.manual_seed(L * 1000 + S)
    q, k, v = make_qkv(B, Hq, Hkv, L, S, D, D, dtype, seed=L + S + D, layout=layout)
    mask = _mask(mask_kind, B, Hq, L, S, torch.Generator().manual_seed(11))
    scale = 1.0 / math.sqrt(D)
    gqa = Hq != Hkv
    seed = keep = None
    if dropout_p > 0:  # the reference drops what the documented stream drops for this seed,
        seed_value = (L * 7919 + S) * 104729 + 2**40  # which is the Triton kernels' keep mask
        seed = torch.tensor([seed_value], dtype=torch.int64)
        keep = attn.dropout_keep_reference(seed_value, B, Hq, L, S, dropout_p)
        assert torch.equal(keep, attn.dropout_mask((B, Hq, L), (B, Hkv, S), dropout_p, seed))
    out, lse = A._cuda_fwd(q.detach(), k.detach(), v.detach(), mask, seed, dropout_p, causal, scale)

    additive = mask is not None and mask.dtype != torch.bool  # its gradient is checked too
    ref_in = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref_in.append(mask.double().requires_grad_() if additive else mask)
    ref = attn.attention_reference(*ref_in, dropout_p, causal, scale, gqa, keep=keep)
    eager_in = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    eager_in.append(mask.to(dtype).requires_grad_() if additive else mask)
    eager = attn.attention_reference(*eager_in, dropout_p, causal, scale, gqa, keep=keep)
    assert out.dtype == dtype and out.shape == ref.shape
    assert_close(out, ref, eager, dtype, "out")

    # lse: base 2, +inf exactly where a row sees no key
    s = ref_in[0].detach() @ ref_in[1].detach().repeat_interleave(Hq // Hkv, 1).transpose(-2, -1) * scale
    if causal:
        s = s.masked_fill(~torch.ones(L, S, dtype=torch.bool).tril(), float("-inf"))
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else s + mask.double()
    lse_ref = torch.logsumexp(s, -1) / math.log(2)
    dead = torch.isneginf(lse_ref)
    assert torch.equal(torch.isinf(lse), dead) and (lse[dead] > 0).all(), "lse: +inf exactly on dead rows"
    assert (lse[~dead] - lse_ref[~dead]).abs().max().item() < 2e-2, "lse"
    if not grads:
        return
    do = torch.randn(out.shape, generator=torch.Generator().manual_seed(5)).to(dtype)
    dq, dk, dv, dmask = A._cuda_bwd(do, q.detach(), k.detach(), v.detach(), out, lse, mask, seed, dropout_p,
                                    causal, scale, additive, True)
    ref.backward(do.double())
    eager.backward(do)
    for name, ours, rt, et in zip(("query", "key", "value"), (dq, dk, dv), ref_in, eager_in):
        assert ours.dtype == dtype and ours.shape == rt.shape, name
        assert_close(ours, rt.grad, et.grad, dtype, f"grad {name}")
    if additive:  # fp32, summed over the mask's broadcast dims (here: heads)
        assert dmask.dtype == torch.float32 and dmask.shape == mask.shape
        assert_close(dmask, ref_in[3].grad, eager_in[3].grad.float(), dtype, "grad attn_mask")


# (B, Hq, Hkv, L, S, D, dtype, causal, mask, layout): each reaches a different part of the kernels
EMULATED_CASES = [
    (1, 2, 2, 40, 72, 64, F16, False, None, "contiguous"),        # 2 key tiles, the second ragged
    (1, 1, 1, 70, 70, 32, BF16, True, None, "contiguous"),        # 2 query blocks, causal diagonal
    (1, 2, 2, 33, 50, 96, F16, False, "bool", "bshd"),            # hd 96, bool mask, a dead row, BSHD
    (1, 4, 2, 48, 40, 128, BF16, True, None, "contiguous"),       # GQA, hd 128 (BN/BM 32 backward)
    (2, 2, 2, 20, 66, 64, BF16, False, "additive", "contiguous"), # fp32 additive mask with -inf, its grad
    (1, 1, 1, 90, 30, 32, F16, True, None, "contiguous"),         # causal L > S: rows past S see all
    (1, 2, 1, 17, 100, 32, F16, True, None, "bshd"),              # causal L < S (MQA): keys past L unseen
]


@needs_nvcc
@pytest.mark.parametrize("B,Hq,Hkv,L,S,D,dtype,causal,mask,layout", EMULATED_CASES)
def test_attention_emulated_on_cpu(cuda_glue, emulated_attention, B, Hq, Hkv, L, S, D, dtype, causal, mask,
                                   layout):
    _check_emulated(cuda_glue, B, Hq, Hkv, L, S, D, dtype, causal, mask, layout)
    assert emulated_attention.calls == ["fwd", "bwd"]


@needs_nvcc
@pytest.mark.parametrize("B,Hq,Hkv,L,S,D,dtype,causal,mask,p", [
    (1, 2, 1, 40, 70, 64, BF16, False, None, 0.3),    # 2 key tiles, MQA: the keep index uses the query head
    (2, 1, 1, 70, 45, 32, F16, True, "bool", 0.5),    # 2 query blocks, causal, bool mask, batch 2
    (1, 3, 1, 21, 37, 32, F16, True, None, 0.2),      # S odd (partial key groups), L odd, group 3
])
def test_attention_dropout_emulated_on_cpu(cuda_glue, B, Hq, Hkv, L, S, D, dtype, causal, mask, p):
    """The CUDA kernels drop exactly the Triton kernels' keep mask for a seed (dropout_mask), which is
    the documented stream (dropout_keep_reference): one Philox call per 4 keys of a row."""
    _check_emulated(cuda_glue, B, Hq, Hkv, L, S, D, dtype, causal, mask, dropout_p=p)


@needs_nvcc
def test_attention_head_dim_256_forward_emulated(cuda_glue):
    _check_emulated(cuda_glue, 1, 1, 1, 20, 40, 256, BF16, True, grads=False)


@needs_nvcc
@pytest.mark.parametrize("L,S", [(0, 5), (5, 0), (0, 0)])
def test_attention_empty_lengths_emulated(cuda_glue, L, S):
    q, k = torch.randn(2, 2, L, 64, dtype=F16), torch.randn(2, 2, S, 64, dtype=F16)
    out, lse = cuda_glue._cuda_fwd(q, k, k, None, None, 0.0, False, 0.125)
    assert out.shape == (2, 2, L, 64) and (out == 0).all() and torch.isposinf(lse).all()
    dq, dk, dv, _ = cuda_glue._cuda_bwd(out, q, k, k, out, lse, None, None, 0.0, False, 0.125, False, True)
    assert (dq == 0).all() and (dk == 0).all() and (dv == 0).all()


@needs_nvcc
def test_attention_emulated_rejects_bad_arguments(cuda_glue, emulated_attention):
    q = torch.randn(1, 1, 8, 80, dtype=F16)
    with pytest.raises(ValueError, match="head dim must be one of"):
        cuda_glue._cuda_fwd(q, q, q, None, None, 0.0, False, 0.1)
    q = torch.randn(1, 1, 8, 64)
    with pytest.raises(ValueError, match="dtype must be"):
        cuda_glue._cuda_fwd(q, q, q, None, None, 0.0, False, 0.1)
    q = torch.randn(1, 1, 8, 256, dtype=F16)
    out, lse = cuda_glue._cuda_fwd(q, q, q, None, None, 0.0, False, 0.1)
    with pytest.raises(ValueError, match="head dim must be one of 32, 64, 96, 128, got 256"):
        cuda_glue._cuda_bwd(out, q, q, q, out, lse, None, None, 0.0, False, 0.1, False, True)
    assert emulated_attention.attention_head_dim_supported(256, False)
    assert not emulated_attention.attention_head_dim_supported(256, True)


# ---------------------------------------------------------------------------------------------
# (c) what the cuda backend refuses (before any launch), on any machine

def _verdict(q, k, v, **kw):
    c = attn._check(q, k, v, kw.get("attn_mask"), kw.get("dropout_p", 0.0), kw.get("is_causal", False), None,
                    kw.get("enable_gqa", False))
    return attn._cuda_cannot(q, c, kw.get("attn_mask"), kw.get("dropout_p", 0.0))


@pytest.mark.parametrize("case,match", [
    ("fp32", "fp16/bf16"), ("hd80", "head dims"), ("dv", "value's head dim"), ("dropout", None),
    ("hd256_grad", "backward takes head dims"), ("mask_grad", None), ("ok", None), ("hd256_nograd", None),
])
def test_cuda_capabilities(case, match):
    dtype = torch.float32 if case == "fp32" else F16
    D = {"hd80": 80, "hd256_grad": 256, "hd256_nograd": 256}.get(case, 64)
    q = torch.randn(1, 2, 8, D, dtype=dtype, requires_grad=case != "hd256_nograd")
    v = torch.randn(1, 2, 8, 32 if case == "dv" else D, dtype=dtype)
    kw = {}
    if case == "dropout":
        kw["dropout_p"] = 0.1
    if case == "mask_grad":
        kw["attn_mask"] = torch.randn(8, 8, dtype=dtype, requires_grad=True)
    reason = _verdict(q, q.detach(), v, **kw)
    if match is None:
        assert reason is None
    else:
        assert reason is not None and match in reason, reason


def test_cuda_backend_is_named_in_explain():
    q = torch.randn(1, 1, 4, 64, dtype=F16, device=DEVICE)
    verdict = dlh.explain("scaled_dot_product_attention", query=q, key=q, value=q)
    assert "cuda" in verdict
    if not HAS_GPU:
        assert verdict["cuda"] != "ok"
