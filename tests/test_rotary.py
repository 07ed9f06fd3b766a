"""Rotary position embedding on every backend that runs here, against transformers' own
apply_rotary_pos_emb (LLaMA's, GPT-NeoX's partial rotary, GPT-J's interleaved pairs) and a float64
reference computed from the same rounded inputs, forward and every gradient.

Without a GPU: `torch` and `triton` (interpreter) on CPU tensors, and csrc/rotary.cu through the
CPU CUDA emulation (tests/cuda_emu) driven by the op's own cuda glue. With one: every backend on
CUDA tensors.
"""
import ctypes

import pytest
import torch
from transformers.models.gpt_neox.modeling_gpt_neox import apply_rotary_pos_emb as neox_apply
from transformers.models.gptj.modeling_gptj import apply_rotary_pos_emb as gptj_apply
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb as llama_apply

import dlh_kernels as dlh
import dlh_kernels.functional as DF
from dlh_kernels.ops import rotary as R_

from conftest import DEVICE, DTYPES, assert_close, backend_param

BACKENDS = [backend_param(b) for b in ("torch", "triton", "cuda")]

pytestmark = pytest.mark.usefixtures("poison_outputs")  # NaN-filled outputs: unwritten elements fail


# ---------------------------------------------------------------------------------------------
# Inputs: cos/sin built the way the models build them.

def _tables(B, S, R, interleaved, cos_batch, g, dtype=torch.float32, base=10000.0):
    """(cos, sin) of (cos_batch, S, R) in the HF layout, plus GPT-J's (…, R/2) halves.
    cos_batch == B: every batch row at its own positions (left padding, packed sequences);
    1: shared positions, broadcast over the batch."""
    inv_freq = 1.0 / base ** (torch.arange(0, R, 2, dtype=torch.float64) / R)
    start = torch.randint(0, 50, (cos_batch, 1), generator=g)
    pos = (start + torch.arange(S)).double()                       # (cos_batch, S)
    freqs = pos[..., None] * inv_freq                               # (cos_batch, S, R/2)
    emb = freqs.repeat_interleave(2, -1) if interleaved else torch.cat([freqs, freqs], -1)
    halves = (freqs.cos(), freqs.sin())
    return emb.cos().to(dtype), emb.sin().to(dtype), halves


def _heads(B, H, S, D, dim, g, dtype):
    shape = (B, H, S, D) if dim == 1 else (B, S, H, D)
    return (torch.randn(shape, generator=g) * 2).to(device=DEVICE, dtype=dtype)


def _fused_qkv(B, Hq, Hk, S, D, dim, g, dtype):
    """q and k as views of one (B, S, (Hq + 2 Hk) * D) projection, as attention layers make them:
    non-contiguous, seq stride (Hq + 2 Hk) * D, for dim 1 also transposed. No copy may happen."""
    qkv = (torch.randn(B, S, (Hq + 2 * Hk) * D, generator=g) * 2).to(device=DEVICE, dtype=dtype)
    q = qkv[..., : Hq * D].view(B, S, Hq, D)
    k = qkv[..., Hq * D: (Hq + Hk) * D].view(B, S, Hk, D)
    return (q.transpose(1, 2), k.transpose(1, 2)) if dim == 1 else (q, k)


def _hf_eager(q, k, cos, sin, interleaved, dim, halves):
    """transformers' own functions, in q's dtype (cos/sin cast first, as its rotary modules do)."""
    R = cos.shape[-1]
    c, s = cos.to(device=q.device, dtype=q.dtype), sin.to(device=q.device, dtype=q.dtype)
    if not interleaved:
        if R == q.shape[-1] and k is not None:
            return llama_apply(q, k, c, s, unsqueeze_dim=dim)
        kk = q if k is None else k
        qo, ko = neox_apply(q, kk, c, s, unsqueeze_dim=dim)
        return qo, (None if k is None else ko)
    # GPT-J: (B, S, H, D) tensors, sin/cos tables of R/2 repeat_interleave'd inside; partial rotary
    # by slicing, as GPTJAttention does
    hc, hs = (h.expand(q.shape[0], -1, -1).to(device=q.device, dtype=q.dtype) for h in halves)

    def one(x):
        if x is None:
            return None
        xs = x if dim == 2 else x.transpose(1, 2)
        out = torch.cat([gptj_apply(xs[..., :R], hs, hc), xs[..., R:]], -1)
        return out if dim == 2 else out.transpose(1, 2)
    return one(q), one(k)


def _grad_like(t, seed):
    if t is None:
        return None
    return torch.randn(t.shape, generator=torch.Generator().manual_seed(seed)).to(device=t.device, dtype=t.dtype)


def check_rotary(backend, B, Hq, Hk, S, D, R, dtype, interleaved, dim, *, layout="contiguous", cos_batch=None,
                 cos_dtype=None, table_grad=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    cos_batch = B if cos_batch is None else cos_batch
    cos, sin, halves = _tables(B, S, R, interleaved, cos_batch, g, cos_dtype or dtype)
    if interleaved and cos_batch == 1:
        halves = tuple(h.expand(B, -1, -1) for h in halves)
    if layout == "qkv" and Hk:
        q, k = _fused_qkv(B, Hq, Hk, S, D, dim, g, dtype)
    else:
        q = _heads(B, Hq, S, D, dim, g, dtype)
        k = _heads(B, Hk, S, D, dim, g, dtype) if Hk else None
    if layout == "strided_last":  # a head dim of stride 2: the one layout the glue copies
        q = torch.stack([q, torch.zeros_like(q)], -1)[..., 0]
    cos, sin = cos.to(DEVICE), sin.to(DEVICE)
    leaves = [q.requires_grad_(), None if k is None else k.requires_grad_(),
              cos.requires_grad_(table_grad), sin.requires_grad_(table_grad)]

    q_out, k_out = DF.rotary_embedding(q, k, cos, sin, interleaved=interleaved, unsqueeze_dim=dim, backend=backend)
    assert (k_out is None) == (k is None)
    # float64 leaves of the same rounded values (cos/sin keep their own dtype: the reference rounds)
    ref_leaves = [None if t is None else t.detach().double().requires_grad_(t.requires_grad) for t in leaves]
    rc64 = [t.detach().to(q.dtype).double().requires_grad_(t.requires_grad) for t in leaves[2:]]
    rq, rk = (None if x is None else R_.rotary_reference(x, rc64[0], rc64[1], interleaved, dim)
              for x in ref_leaves[:2])
    eager_leaves = [None if t is None else t.detach().clone().requires_grad_(t.requires_grad) for t in leaves]
    if table_grad and interleaved:  # GPT-J's function takes the (R/2) halves: the same math on full tables
        eq, ek = (None if x is None else R_.rotary_reference(x, *eager_leaves[2:], True, dim) for x in eager_leaves[:2])
    else:
        eq, ek = _hf_eager(*eager_leaves, interleaved, dim, halves)

    assert q_out.dtype == dtype and q_out.shape == q.shape
    assert_close(q_out, rq, eq, dtype, "q_out")
    if k is not None:
        assert k_out.dtype == dtype and k_out.shape == k.shape
        assert_close(k_out, rk, ek, dtype, "k_out")

    # gradients: the same random output gradients through all three
    gq, gk = _grad_like(q_out, 7), _grad_like(k_out, 8)
    outs = [(q_out, gq), (k_out, gk)]
    torch.autograd.backward([o for o, _ in outs if o is not None], [g_ for o, g_ in outs if o is not None])
    torch.autograd.backward([o for o in (rq, rk) if o is not None],
                            [g_.double() for o, g_ in zip((rq, rk), (gq, gk)) if o is not None])
    torch.autograd.backward([o for o in (eq, ek) if o is not None], [g_ for o, g_ in zip((eq, ek), (gq, gk))
                                                                     if o is not None])
    for name, t, rt, et in zip(["q", "k"], leaves[:2], ref_leaves[:2], eager_leaves[:2]):
        if t is not None:
            assert t.grad is not None and t.grad.dtype == dtype, f"no/wrong gradient for {name}"
            assert_close(t.grad, rt.grad, et.grad, dtype, f"grad {name}")
    if table_grad:
        for name, t, rt, et in zip(["cos", "sin"], leaves[2:], rc64, eager_leaves[2:]):
            assert t.grad is not None and t.grad.dtype == t.dtype and t.grad.shape == t.shape, name
            # eager sums over heads in q's dtype: a coarser bound than the outputs' (ours is fp32)
            assert_close(t.grad, rt.grad, et.grad.float(), dtype, f"grad {name}")
    return q, k, q_out, k_out


# (B, Hq, Hk, S, D, R, unsqueeze_dim): Hk 0 means k=None
SHAPES = [
    (1, 1, 1, 1, 64, 64, 1),     # seq 1: one decode step
    (2, 4, 2, 7, 128, 128, 1),   # GQA 4:2, prime seq, LLaMA's head_dim 128
    (1, 3, 0, 5, 64, 64, 2),     # k=None, odd head count, (B, S, H, D) layout
    (2, 5, 1, 3, 80, 32, 2),     # Phi-2: head_dim 80, partial_rotary_factor 0.4; MQA (one k head)
    (1, 2, 2, 11, 64, 16, 1),    # Pythia/GPT-NeoX rotary_pct 0.25: R/2 = 8, a pass-through of 48
    (2, 3, 1, 5, 7, 4, 1),       # odd head_dim with an even rotary_dim: odd pass-through tail
    (1, 2, 1, 13, 24, 24, 2),    # R/2 = 12: not a multiple of a 16-bit vector (scalar path in CUDA)
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("interleaved", [False, True], ids=["half", "interleaved"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B,Hq,Hk,S,D,R,dim", SHAPES, ids=str)
def test_rotary_sweep(B, Hq, Hk, S, D, R, dim, dtype, interleaved, backend):
    check_rotary(backend, B, Hq, Hk, S, D, R, dtype, interleaved, dim)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dim", [1, 2])
@pytest.mark.parametrize("interleaved", [False, True], ids=["half", "interleaved"])
def test_rotary_fused_qkv_views_are_not_copied(interleaved, dim, backend, monkeypatch):
    """q, k as strided views of one qkv projection reach the kernel as they are (strides, no copy)."""
    seen = []
    impl = R_._ROTARY[backend]

    def spy(q, k, *rest):
        seen.append((q.data_ptr(), k.data_ptr()))
        impl(q, k, *rest)
    monkeypatch.setitem(R_._ROTARY, backend, spy)
    q, k, _, _ = check_rotary(backend, 2, 4, 2, 5, 32, 32, torch.float32, interleaved, dim, layout="qkv")
    if backend != "torch":  # the torch backend is eager and never calls the implementation
        assert seen[0] == (q.data_ptr(), k.data_ptr()), "q/k were copied before the kernel"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", [
    # cos shared by the batch (cos_batch 1) and stored in fp32 while q is bf16 (HF's mixed case)
    dict(dtype=torch.bfloat16, cos_batch=1, cos_dtype=torch.float32),
    # fp16 q with fp32 tables, interleaved, partial
    dict(dtype=torch.float16, cos_dtype=torch.float32, interleaved=True, R=16),
    # float64 cos with fp32 q: cast to q's dtype in the glue
    dict(dtype=torch.float32, cos_dtype=torch.float64),
    # gradients of cos and sin (learned or traced tables), batch-broadcast
    dict(dtype=torch.float32, cos_batch=1, table_grad=True),
    dict(dtype=torch.bfloat16, cos_dtype=torch.float32, table_grad=True, interleaved=True, dim=2),
    # a head dim of stride 2: copied first, still right
    dict(dtype=torch.float32, layout="strided_last"),
], ids=["bcast_fp32cos", "fp16_interleaved_partial", "f64cos", "table_grad", "table_grad_bf16", "strided_last"])
def test_rotary_tables_and_layouts(case, backend):
    c = {"interleaved": False, "dim": 1, "R": 32, **case}
    dtype, interleaved, dim, R = c.pop("dtype"), c.pop("interleaved"), c.pop("dim"), c.pop("R")
    check_rotary(backend, 2, 3, 1, 6, 32, R, dtype, interleaved, dim, **c)


def test_rotary_seq_broadcast_cos():
    # cos (B, 1, R): one angle for every position (HF broadcasts it); stride 0 along seq
    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, 3, 5, 16, generator=g)
    cos, sin = torch.rand(2, 1, 16, generator=g), torch.rand(2, 1, 16, generator=g)
    qo, _ = DF.rotary_embedding(q, None, cos, sin, backend="triton")
    ref = R_.rotary_reference(q.double(), cos.double(), sin.double())
    assert_close(qo, ref, llama_apply(q, q, cos, sin)[0], torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty(backend):
    for shape in [(0, 2, 3, 8), (2, 0, 3, 8), (2, 2, 0, 8)]:
        q = torch.randn(shape, device=DEVICE)
        cos = torch.randn(1, shape[2], 8, device=DEVICE)
        qo, ko = DF.rotary_embedding(q, q, cos, cos, backend=backend)
        assert qo.shape == q.shape and ko.shape == q.shape


def test_torch_impl_matches_the_public_torch_path():
    # the op's "torch" implementation (fp32 math, used by opcheck/compile) vs the eager path
    g = torch.Generator().manual_seed(5)
    q, k = torch.randn(2, 3, 4, 16, generator=g), torch.randn(2, 1, 4, 16, generator=g)
    cos, sin, _ = _tables(2, 4, 12, True, 1, g)
    a = R_.rotary_embedding_op.impls["torch"](q, k, cos, sin, True, 1)
    b = DF.rotary_embedding(q, k, cos, sin, interleaved=True, backend="torch")
    torch.testing.assert_close(a[0], b[0])
    torch.testing.assert_close(a[1], b[1])


# ---------------------------------------------------------------------------------------------
# torch.library contract and compilation.

@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    g = torch.Generator().manual_seed(2)
    q = torch.randn(2, 5, 3, 4, 16, generator=g)[:, :, 0].requires_grad_()  # non-contiguous
    k = torch.randn(2, 1, 4, 16, generator=g).requires_grad_()
    cos, sin, _ = _tables(2, 4, 8, False, 1, g)
    cases = [(q, k, cos, sin, False, 1), (q, None, cos, sin, True, 1),
             (q.transpose(1, 2).detach().requires_grad_(), None, cos.requires_grad_(), sin, False, 2)]
    for args in cases:
        args = tuple(a.to(DEVICE) if isinstance(a, torch.Tensor) else a for a in args) + (backend,)
        torch.library.opcheck(R_.rotary_embedding_op.custom_op, args)
        # the backward op has no autograd of its own (no double backward): plain tensors
        plain = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
        torch.library.opcheck(R_.rotary_embedding_backward_op.custom_op, plain)


def test_compile_fullgraph():
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(4)
    q = torch.randn(2, 4, 6, 16, generator=g).to(DEVICE).requires_grad_()
    k = torch.randn(2, 2, 6, 16, generator=g).to(DEVICE).requires_grad_()
    cos, sin, _ = (t.to(DEVICE) if isinstance(t, torch.Tensor) else t for t in _tables(2, 6, 16, False, 2, g))

    def attn_scores(q, k):
        qo, ko = DF.rotary_embedding(q, k, cos, sin, backend="triton")
        return (qo @ ko.repeat_interleave(2, 1).transpose(-1, -2)).pow(2).sum()

    eager = attn_scores(q, k)
    eager.backward()
    grads = [q.grad.clone(), k.grad.clone()]
    q.grad = k.grad = None
    compiled = torch.compile(attn_scores, fullgraph=True)(q, k)
    compiled.backward()
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-4)
    for t, gr in zip((q, k), grads):
        torch.testing.assert_close(t.grad, gr, rtol=1e-5, atol=1e-4)


# ---------------------------------------------------------------------------------------------
# Bad input: clear errors naming the argument, before any launch.

def _qc(*, q=(2, 3, 5, 16), k=(2, 1, 5, 16), cos=(2, 5, 16), qd=torch.float32, kd=torch.float32):
    return (torch.randn(q, dtype=qd), None if k is None else torch.randn(k, dtype=kd),
            torch.randn(cos), torch.randn(cos))


@pytest.mark.parametrize("call_, match", [
    (lambda: DF.rotary_embedding([1.0], None, *_qc()[2:]), "q must be a torch.Tensor"),
    (lambda: DF.rotary_embedding(torch.arange(8).view(1, 1, 2, 4), None, *_qc(cos=(1, 2, 4))[2:]),
     "q must be a floating"),
    (lambda: DF.rotary_embedding(torch.randn(3, 5, 16), None, *_qc()[2:]), "q must be 4-D"),
    (lambda: DF.rotary_embedding(*_qc(kd=torch.float16)), "k dtype torch.float16 must equal q dtype"),
    (lambda: DF.rotary_embedding(*_qc(k=(2, 1, 4, 16))), "k .* must match q"),
    (lambda: DF.rotary_embedding(*_qc(k=(2, 1, 5, 8))), "k .* must match q"),
    (lambda: DF.rotary_embedding(*_qc(cos=(2, 5, 7))), "rotary_dim .* must be even"),
    (lambda: DF.rotary_embedding(*_qc(cos=(2, 5, 18))), "rotary_dim .* <= head_dim 16"),
    (lambda: DF.rotary_embedding(*_qc(cos=(3, 5, 16))), "cos/sin .* must be \\(batch or 1"),
    (lambda: DF.rotary_embedding(*_qc(cos=(2, 4, 16))), "cos/sin .* must be \\(batch or 1"),
    (lambda: DF.rotary_embedding(*_qc(cos=(5, 16))), "cos must be 3-D"),
    (lambda: DF.rotary_embedding(*_qc()[:3], torch.randn(2, 5, 8)), "cos .* and sin .* same shape"),
    (lambda: DF.rotary_embedding(*_qc()[:2], torch.randn(2, 5, 16, device="meta"), _qc()[3]), "cos is on meta"),
    (lambda: DF.rotary_embedding(_qc()[0], torch.randn(2, 1, 5, 16, device="meta"), *_qc()[2:]), "k is on meta"),
    (lambda: DF.rotary_embedding(*_qc()[:3], torch.arange(160).view(2, 5, 16)), "sin must be a floating"),
    (lambda: DF.rotary_embedding(*_qc(), unsqueeze_dim=3), "unsqueeze_dim must be 1"),
    (lambda: DF.rotary_embedding(*_qc(), backend="fast"), "backend must be one of"),
])
def test_bad_input(call_, match):
    with pytest.raises((TypeError, ValueError), match=match):
        call_()


def test_bad_input_types():
    with pytest.raises(TypeError, match="k dtype"):
        DF.rotary_embedding(*_qc(kd=torch.bfloat16))
    with pytest.raises(TypeError, match="q must be a floating"):
        DF.rotary_embedding(torch.zeros(1, 1, 2, 4, dtype=torch.int32), None, *_qc(cos=(1, 2, 4))[2:])


def test_named_backend_that_cannot_run_raises_and_explain():
    q = torch.randn(1, 2, 3, 8, dtype=torch.float64)
    cos = torch.randn(1, 3, 8, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="triton.*float64"):
        DF.rotary_embedding(q, None, cos, cos, backend="triton")
    torch.testing.assert_close(DF.rotary_embedding(q, None, cos, cos)[0], R_.rotary_reference(q, cos, cos))
    verdict = dlh.explain("rotary_embedding", q.float(), None, cos.float(), cos.float())
    assert verdict["torch"] == "ok" and verdict["auto"].startswith("picks")
    assert "unsqueeze_dim=2" in str(pytest.raises(ValueError, DF.rotary_embedding, torch.randn(2, 3, 5), None,
                                                  cos, cos, unsqueeze_dim=2).value)


# ---------------------------------------------------------------------------------------------
# GPU only: real sizes, 64-bit offsets.

KERNEL_BACKENDS = [backend_param(b) for b in ("triton", "cuda")]


@pytest.mark.gpu
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B,Hq,Hk,S,D,R,dim,interleaved", [
    (4, 32, 8, 2048, 128, 128, 1, False),   # LLaMA-3-8B prefill, GQA 32:8
    (2, 32, 32, 1023, 80, 32, 2, False),    # Phi-2, partial rotary, (B, S, H, D)
    (2, 16, 16, 777, 256, 64, 2, True),     # GPT-J, interleaved
    (64, 32, 8, 1, 128, 128, 1, False),     # decode: batch 64, one token each
], ids=str)
def test_gpu_rotary_sizes(B, Hq, Hk, S, D, R, dim, interleaved, dtype, backend):
    check_rotary(backend, B, Hq, Hk, S, D, R, dtype, interleaved, dim, layout="qkv", cos_dtype=torch.float32)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_gpu_rotary_64bit_offsets(backend):
    # q of 32 * (2^19 + 1) * 128 > 2^31 elements: offsets past 2^31 must not wrap
    S = 2**19 + 1
    q = torch.randn(1, 32, S, 128, device="cuda", dtype=torch.bfloat16)
    cos, sin = (torch.rand(1, S, 128, device="cuda") for _ in range(2))
    qo, _ = DF.rotary_embedding(q, None, cos, sin, backend=backend)
    tail = R_.rotary_reference(q[:, -1:, -2:].double(), cos[:, -2:].double(), sin[:, -2:].double())
    assert (qo[:, -1:, -2:].double() - tail).abs().max().item() < 6e-2
    del q, qo
    torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------
# csrc/rotary.cu on the CPU through the strict CUDA emulation (tests/cuda_emu), called by the op's
# own cuda glue (dlh_kernels.ops.rotary._rotary_impl("cuda", ...)) with the emulated module in
# place of dlh_kernels._C: every 16-byte access is checked for alignment, every launch for its
# configuration; results against float64.

EMU_ROTARY_ENTRIES = [("rotary", "RotaryArgs")]


class EmulatedRotaryExt:
    """dlh_kernels._C.rotary (same positional arguments) over the emulated kernel (ctypes)."""

    def __init__(self, lib):
        U, I = ctypes.c_uint64, ctypes.c_int64  # noqa: E741

        class Args(ctypes.Structure):  # mirrors dlh::RotaryArgs
            _fields_ = ([(n, U) for n in "q k q_out k_out cos sin".split()]
                        + [(n, I) for n in "B Hq Hk S D R".split()] + [("strides", I * 16)]
                        + [("interleaved", ctypes.c_bool), ("backward", ctypes.c_bool),
                           ("dtype", ctypes.c_int), ("cs_dtype", ctypes.c_int), ("stream", U)])

        self.lib, self.Args, self.I = lib, Args, I

    def rotary(self, *args):
        args = list(args)
        args[12] = (self.I * 16)(*args[12])
        self.lib.run("rotary", self.Args(*args))


def emulated_rotary_glue(monkeypatch, source=None, build=None):
    """The op module with its cuda glue routed to csrc/rotary.cu (or `source`) under the emulation."""
    import cuda_emu
    reason = cuda_emu.unavailable()
    if reason:
        pytest.skip(reason)
    from dlh_kernels import _ext
    lib = (build or cuda_emu.build)("rotary.cu", EMU_ROTARY_ENTRIES, min_launches=2, source=source)
    ext = EmulatedRotaryExt(lib)
    monkeypatch.setattr(_ext, "ext", lambda: ext)
    monkeypatch.setattr(_ext, "stream_handle", lambda device: 0)
    return R_


def run_emulated_case(B, Hq, Hk, S, D, R, dtype, cos_dtype, interleaved, dim, layout="contiguous", seed=0):
    """Forward and backward through the cuda glue on CPU tensors, against float64."""
    g = torch.Generator().manual_seed(seed)
    cos, sin, _ = _tables(B, S, R, interleaved, B if seed % 2 == 0 else 1, g, cos_dtype)
    if layout == "qkv":
        q, k = _fused_qkv(B, Hq, Hk, S, D, dim, g, dtype)
    elif layout == "offset":  # every row one element past a 16-byte boundary: scalar path
        q = _heads(B, Hq, S, D + 1, dim, g, dtype)[..., 1:]
        k = _heads(B, Hk, S, D + 1, dim, g, dtype)[..., 1:] if Hk else None
    else:
        q = _heads(B, Hq, S, D, dim, g, dtype)
        k = _heads(B, Hk, S, D, dim, g, dtype) if Hk else None
    cos_k, sin_k = R_._kernel_tables(q, cos, sin)
    c64, s64 = cos.to(dtype).double(), sin.to(dtype).double()
    for backward in (False, True):
        qo, ko = R_._rotary_impl("cuda", backward)(q, k, cos_k, sin_k, interleaved, dim)
        for x, out in ((q, qo), (k, ko)):
            if x is None:
                continue
            x64 = x.double().requires_grad_()
            ref = R_.rotary_reference(x64, c64, s64, interleaved, dim)
            if backward:  # out = dx for dy = x: the vector-Jacobian product of the reference
                ref = torch.autograd.grad(ref, x64, x.double())[0]
            eager = R_.rotary_reference(x, cos, sin, interleaved, dim) if not backward else ref
            assert_close(out, ref, eager, dtype, f"{'d' if backward else ''}out")


EMULATED_CASES = [
    # (B, Hq, Hk, S, D, R, dtype, cos dtype, interleaved, dim, layout)
    (2, 4, 2, 3, 64, 64, torch.bfloat16, torch.float32, False, 1, "contiguous"),  # vector path, fp32 tables
    (1, 3, 1, 2, 80, 32, torch.float16, torch.float16, True, 2, "qkv"),           # Phi-2 partial, fused views
    (1, 2, 0, 3, 7, 4, torch.float32, torch.float32, False, 1, "contiguous"),     # odd head_dim, k=None
    (1, 2, 1, 2, 32, 32, torch.bfloat16, torch.bfloat16, False, 2, "offset"),     # misaligned views: scalar path
    (1, 2, 1, 2, 24, 24, torch.bfloat16, torch.bfloat16, False, 1, "contiguous"), # R/2 = 12: no 16-bit vectors
]


@pytest.mark.parametrize("B,Hq,Hk,S,D,R,dtype,cos_dtype,interleaved,dim,layout", EMULATED_CASES)
def test_cuda_kernel_emulated_on_cpu(monkeypatch, B, Hq, Hk, S, D, R, dtype, cos_dtype, interleaved, dim, layout):
    emulated_rotary_glue(monkeypatch)
    run_emulated_case(B, Hq, Hk, S, D, R, dtype, cos_dtype, interleaved, dim, layout, seed=B + Hq)


def test_cuda_bad_arguments_emulated(monkeypatch):
    from dlh_kernels import _ext
    emulated_rotary_glue(monkeypatch)
    ext = _ext.ext()
    q = torch.randn(1, 1, 2, 8)
    base = [q.data_ptr(), 0, q.data_ptr(), 0, q.data_ptr(), q.data_ptr(), 1, 1, 0, 2, 8]
    with pytest.raises(RuntimeError, match="R \\(rotary_dim\\) must be even"):
        ext.rotary(*base, 7, [0] * 16, False, False, 0, 0, 0)
    with pytest.raises(RuntimeError, match="cs_dtype must be 0"):
        ext.rotary(*base, 8, [0] * 16, False, False, 0, 1, 0)
