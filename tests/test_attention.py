"""Scaled-dot-product attention on every backend that runs here, against a float64 reference
computed from the same rounded inputs, forward and every gradient (query, key, value and an
additive mask that requires grad), over the feature matrix: causal (L != S too), boolean and
additive masks of every broadcast shape, grouped/multi-query heads, head dims 16..256 (not
only powers of two), value head dim != query's, lengths 1 and off the block size, scale,
dropout (statistics and gradients given the kernel's own mask), fully masked rows,
determinism, layouts, empty inputs, opcheck, torch.compile, bad inputs, and
dlh.nn.MultiheadAttention.

Without a GPU: `torch` and `triton` (interpreter, small sizes) on CPU tensors. With one: the
same on CUDA tensors, plus the GPU-only tests at the bottom (real sizes, peak memory).
"""
import math

import pytest
import torch
import torch.nn.functional as F

import dlh_kernels as dlh
import dlh_kernels.functional as DF
from dlh_kernels.ops import attention as attn
from dlh_kernels.triton_kernels import attention as kernels

from conftest import DEVICE, FLOOR, HAS_GPU, assert_grids_fit, backend_param, record_grids, scaled_error


# Attention's tolerance: error <= FACTOR x the error of eager attention in the same dtype + FLOOR.
# The eager baseline is attention written out in the input dtype (scores, softmax and both
# matmuls rounded to the dtype, as models wrote it before SDPA), the same baseline FlashAttention's
# tests use. FACTOR is conftest's 2: a fused kernel keeps the scores in fp32 but, like every
# FlashAttention, rounds P and dS to the input dtype before their matmuls on the tensor cores.
# On the GPU, fp32 inputs run their dots in TF32 (10-bit mantissas): the floor becomes 2e-3.
FACTOR = 2.0


def floor(dtype):
    if HAS_GPU and dtype == torch.float32 and kernels.FP32_DOT_PRECISION == "tf32":
        return 2e-3
    return FLOOR[dtype]


def assert_close(out, ref, eager, dtype, what="output"):
    err, base = scaled_error(out, ref), scaled_error(eager, ref)
    bound = FACTOR * base + floor(dtype)
    assert err <= bound, f"{what}: error {err:.3g} > {bound:.3g} (eager {dtype} error {base:.3g})"


BACKENDS = [backend_param(b) for b in ("torch", "triton")]  # no CUDA C++ attention kernel yet


pytestmark = pytest.mark.usefixtures("poison_outputs")  # NaN-filled outputs: unwritten elements fail


@pytest.fixture
def blocks():
    """Set the interpreter's block sizes for one test; restored afterwards."""
    yield kernels.set_interpreter_blocks
    kernels.set_interpreter_blocks()


# ---------------------------------------------------------------------------------------------
# One call, its float64 reference and eager attention in the dtype, from the same inputs.

def rand(*shape, dtype=torch.float32, g=None, scale=1.0):
    return (torch.randn(*shape, generator=g) * scale).to(dtype).to(DEVICE)


def make_qkv(B, Hq, Hkv, L, S, D, Dv, dtype, *, seed=0, layout="contiguous"):
    """Leaf tensors q (B, Hq, L, D), k (B, Hkv, S, D), v (B, Hkv, S, Dv), random, never zeros.

    layout "bshd": views of (B, L, H, D) tensors, the layout a QKV projection produces.
    """
    g = torch.Generator().manual_seed(seed)
    shapes = ((B, Hq, L, D), (B, Hkv, S, D), (B, Hkv, S, Dv))
    out = []
    for shape in shapes:
        if layout == "bshd":
            b, h, n, d = shape
            t = rand(b, n, h, d, dtype=dtype, g=g).transpose(1, 2)
        else:
            t = rand(*shape, dtype=dtype, g=g)
        out.append(t.requires_grad_())
    return out


def _leaf(t, dtype=None):
    if t is None:
        return None
    t = t.detach().to(dtype or t.dtype)
    return t.requires_grad_() if t.is_floating_point() else t


def check_call(backend, q, k, v, mask=None, *, dropout_p=0.0, is_causal=False, scale=None,
               enable_gqa=False, grads=True, torch_seed=1234):
    """DF.scaled_dot_product_attention against the float64 reference, forward and gradients."""
    dtype = q.dtype
    torch.manual_seed(torch_seed)
    ours = DF.scaled_dot_product_attention(q, k, v, mask, dropout_p, is_causal, scale, enable_gqa,
                                           backend=backend)
    keep = None
    if dropout_p > 0.0:
        assert backend == "triton", "the dropout mask is reproducible for the triton backend only"
        keep = replay_keep(q, k, dropout_p, torch_seed, enable_gqa)
    ref_in = [_leaf(t, torch.float64) for t in (q, k, v)] + [_leaf(mask, None if mask is None or mask.dtype == torch.bool else torch.float64)]
    ref = attn.attention_reference(*ref_in, dropout_p, is_causal, scale, enable_gqa, keep=keep)
    eager_in = [_leaf(t) for t in (q, k, v, mask)]
    eager = attn.attention_reference(*eager_in, dropout_p, is_causal, scale, enable_gqa,
                                     keep=None if keep is None else keep)
    assert ours.dtype == dtype and ours.shape == ref.shape, (ours.shape, ref.shape)
    assert_close(ours, ref, eager, dtype, "out")
    if not grads:
        return ours
    grad_out = torch.randn(ours.shape, generator=torch.Generator().manual_seed(7)).to(dtype).to(DEVICE)
    ours.backward(grad_out)
    ref.backward(grad_out.double())
    eager.backward(grad_out)
    for name, t, rt, et in zip(("query", "key", "value", "attn_mask"), (q, k, v, mask), ref_in, eager_in):
        if t is None or not t.requires_grad:
            continue
        assert t.grad is not None and t.grad.dtype == t.dtype and t.grad.shape == t.shape, f"grad {name}"
        assert_close(t.grad, rt.grad, et.grad, dtype, f"grad {name}")
    return ours


def replay_keep(q, k, dropout_p, torch_seed, enable_gqa=False):
    """The keep mask a call made after torch.manual_seed(torch_seed), broadcast like the scores."""
    torch.manual_seed(torch_seed)
    seed = attn.draw_seed(q.device)
    Hq, L, S = q.shape[-3], q.shape[-2], k.shape[-2]
    B = q.numel() // (Hq * L * q.shape[-1])
    keep = attn.dropout_mask((B, Hq, L), (B, 0, S), dropout_p, seed)
    return keep.view(*q.shape[:-1], S)


# ---------------------------------------------------------------------------------------------
# The sweep: shapes x causal x dtype.

SHAPES = {  # (B, Hq, Hkv, L, S, D, Dv)
    "one_token": (1, 1, 1, 1, 1, 16, 16),          # L = S = 1: one score per row
    "hd40_ragged": (2, 1, 1, 37, 29, 40, 40),      # head dim 40; lengths off the block (16)
    "hd80_L<S": (1, 2, 2, 19, 45, 80, 80),         # head dim 80; causal rows see a prefix of S
    "hd96_dv64_L>S": (1, 2, 2, 45, 19, 96, 64),    # Dv != D; causal rows past S see every key
    "hd160": (1, 1, 1, 18, 33, 160, 160),          # head dim 160 (padded to 256)
    "hd256_vit": (1, 1, 1, 17, 17, 256, 256),      # the largest head dim, ViT's 17 tokens
    "hd16_gpt": (1, 1, 1, 33, 33, 16, 16),         # the smallest head dim
}
# dtype per case, causal both ways: fp32 everywhere, the half types on a spread of shapes
SWEEP = [(s, torch.float32) for s in SHAPES] + [
    ("hd40_ragged", torch.bfloat16), ("hd96_dv64_L>S", torch.bfloat16), ("hd256_vit", torch.bfloat16),
    ("hd80_L<S", torch.float16), ("one_token", torch.float16), ("hd160", torch.float16)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("shape,dtype", SWEEP, ids=[f"{s}-{str(d)[6:]}" for s, d in SWEEP])
def test_sweep(shape, dtype, is_causal, backend):
    B, Hq, Hkv, L, S, D, Dv = SHAPES[shape]
    check_call(backend, *make_qkv(B, Hq, Hkv, L, S, D, Dv, dtype), is_causal=is_causal)


@pytest.mark.parametrize("block_m,block_n", [(32, 16), (16, 32)])
@pytest.mark.parametrize("L,S", [(45, 37), (37, 45)])
def test_block_shapes(L, S, block_m, block_n, blocks):
    # the GPU's tiles are rarely square: the causal split points (mask-free blocks vs diagonal
    # blocks) differ when BLOCK_M != BLOCK_N
    if HAS_GPU:
        pytest.skip("interpreter block sizes; the GPU picks its own")
    blocks(block_m, block_n)
    check_call("triton", *make_qkv(1, 1, 1, L, S, 32, 32, torch.float32), is_causal=True)


@pytest.mark.parametrize("scale", [0.05, 1.0])
def test_scale(scale):
    check_call("triton", *make_qkv(1, 2, 2, 20, 24, 32, 32, torch.float32), scale=scale)


# ---------------------------------------------------------------------------------------------
# Masks.

def _mask(shape, kind, dtype, seed=3):
    g = torch.Generator().manual_seed(seed)
    if kind == "bool":
        m = torch.rand(*shape, generator=g) > 0.3
        return m.to(DEVICE)
    return (torch.randn(*shape, generator=g) * 2).to(dtype).to(DEVICE).requires_grad_()


MASKS = {  # name: (mask shape for B=2, H=2, L=19, S=27, kind)
    "bool_LS": ((19, 27), "bool"),                  # one (L, S) mask for every batch and head
    "bool_key_padding": ((2, 1, 1, 27), "bool"),    # padded keys per batch element
    "bool_full": ((2, 2, 19, 27), "bool"),          # one mask per (batch, head)
    "bias_rel_pos": ((1, 2, 19, 27), "float"),      # learned relative-position / ALiBi bias per head
    "bias_full": ((2, 2, 19, 27), "float"),         # nothing broadcast
    "bias_key_padding": ((2, 1, 1, 27), "float"),   # additive key padding, learned
    "bias_per_query": ((2, 19, 1), "float"),        # broadcast along keys, 3-D (no batch dim)
    "bias_scalar": ((1,), "float"),                 # broadcast along everything
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", list(MASKS))
def test_masks(name, dtype):
    shape, kind = MASKS[name]
    if dtype == torch.bfloat16 and name not in ("bool_key_padding", "bias_rel_pos"):
        pytest.skip("bf16 on two representative masks; fp32 on all")
    q, k, v = make_qkv(2, 2, 2, 19, 27, 16, 16, dtype)
    check_call("triton", q, k, v, _mask(shape, kind, dtype))


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp32_mask_on_half_inputs(backend):
    # torch takes a float32 additive mask with fp16/bf16 inputs
    q, k, v = make_qkv(1, 2, 2, 17, 20, 16, 16, torch.float16)
    check_call(backend, q, k, v, _mask((1, 2, 17, 20), "float", torch.float32))


@pytest.mark.parametrize("kind", ["bool", "float"])
def test_fully_masked_rows_give_zeros(kind):
    # rows with nothing to attend to: zeros, and zero (finite) gradients, never NaN
    q, k, v = make_qkv(2, 2, 2, 9, 21, 16, 16, torch.float32)
    if kind == "bool":
        mask = torch.rand(2, 1, 9, 21) > 0.5
        mask[0, 0, 3] = False
        mask[1, :, :, :] = False   # a whole batch element padded away
        mask = mask.to(DEVICE)
    else:
        mask = torch.randn(2, 1, 9, 21)
        mask[0, 0, 3] = float("-inf")
        mask[1, 0, :, 5:] = float("-inf")
        mask = mask.to(DEVICE).requires_grad_()
    out = check_call("triton", q, k, v, mask)
    assert (out[0, :, 3] == 0).all()
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all()
    if kind == "bool":
        assert (out[1] == 0).all() and (q.grad[1] == 0).all() and (k.grad[1] == 0).all()
    else:
        assert torch.isfinite(mask.grad).all()


# ---------------------------------------------------------------------------------------------
# Grouped-query and multi-query attention.

@pytest.mark.parametrize("case", [
    dict(Hq=6, Hkv=2, causal=False, gqa=True),     # GQA: 3 query heads per K/V head
    dict(Hq=4, Hkv=1, causal=True, gqa=True),      # MQA through enable_gqa
    dict(Hq=4, Hkv=1, causal=False, gqa=False),    # MQA by broadcasting (no flag), as torch allows
    dict(Hq=6, Hkv=3, causal=False, gqa=True, mask=True),  # with a learned per-head bias
], ids=["gqa", "mqa_causal", "mqa_broadcast", "gqa_bias"])
def test_gqa(case):
    q, k, v = make_qkv(1, case["Hq"], case["Hkv"], 21, 18, 32, 32, torch.float32)
    mask = _mask((1, case["Hq"], 21, 18), "float", torch.float32) if case.get("mask") else None
    check_call("triton", q, k, v, mask, is_causal=case["causal"], enable_gqa=case["gqa"])


def test_gqa_bf16_causal():
    check_call("triton", *make_qkv(2, 4, 2, 20, 20, 64, 64, torch.bfloat16), is_causal=True,
               enable_gqa=True)


# ---------------------------------------------------------------------------------------------
# Layouts and ranks.

def test_layout_bshd():
    # views of (B, L, H, D) projections: strided heads, no copy needed
    check_call("triton", *make_qkv(2, 3, 3, 17, 23, 24, 24, torch.float32, layout="bshd"), is_causal=True)


@pytest.mark.parametrize("shapes", [
    ((5, 16), (7, 16), (7, 8)),                     # 2-D: one sequence, no heads
    ((3, 5, 16), (3, 7, 16), (3, 7, 16)),           # 3-D: (heads, L, D)
    ((2, 2, 3, 5, 16), (2, 2, 3, 7, 16), (2, 2, 3, 7, 16)),  # 5-D: two batch dims
    ((2, 3, 5, 16), (1, 3, 7, 16), (1, 3, 7, 16)),  # K/V broadcast along the batch
], ids=["2d", "3d", "5d", "kv_batch_broadcast"])
def test_ranks_and_broadcasting(shapes):
    g = torch.Generator().manual_seed(1)
    q, k, v = (rand(*s, g=g).requires_grad_() for s in shapes)
    check_call("triton", q, k, v, is_causal=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty(backend):
    for L, S in ((0, 5), (5, 0), (0, 0)):
        q, k, v = make_qkv(2, 2, 2, L, S, 16, 16, torch.float32)
        out = DF.scaled_dot_product_attention(q, k, v, backend=backend)
        assert out.shape == (2, 2, L, 16)
        assert (out == 0).all()  # S = 0: nothing to attend to, zeros (as torch)
        out.sum().backward()
        assert q.grad.shape == q.shape and (q.grad == 0).all()
    q, k, v = make_qkv(0, 2, 2, 4, 5, 16, 16, torch.float32)
    assert DF.scaled_dot_product_attention(q, k, v, backend=backend).shape == (0, 2, 4, 16)


# ---------------------------------------------------------------------------------------------
# Batch x heads past CUDA's 65,535 limit on grid axes y and z (review 2026-12, T8): it runs over
# y and z together. The interpreter has no grid limit, so one test checks the grids the glue
# computes (recorded, not run: 70,000 heads), another lowers the cap to force the fold on a
# small case and compares with float64 (and the folded keep mask with the unfolded one).

_ATTN_KERNELS = ("attn_fwd_kernel", "attn_bwd_preprocess_kernel", "attn_bwd_dkdv_kernel",
                 "attn_bwd_dq_kernel", "attn_bwd_dmask_kernel", "attn_dropout_mask_kernel")


@pytest.mark.parametrize("on_gpu", [False, True], ids=["interpreter_blocks", "gpu_fixed_config"])
def test_grids_fit_cuda_limits_for_70k_heads(on_gpu, monkeypatch):
    grids = record_grids(monkeypatch, kernels, _ATTN_KERNELS)
    monkeypatch.setattr(kernels, "_on_gpu", lambda t: on_gpu)
    B, H, L, S, D = 70_000, 1, 3, 2, 16  # B * H = 70,000 > 65,535: the shape video models make
    q, k, v = (torch.zeros(B, H, n, D, device=DEVICE).requires_grad_() for n in (L, S, S))
    mask = torch.zeros(B, 1, L, S, device=DEVICE, requires_grad=True)
    DF.scaled_dot_product_attention(q, k, v, mask, dropout_p=0.1, backend="triton").sum().backward()
    kernels.dropout_keep_mask(torch.zeros(1, dtype=torch.int64, device=DEVICE), B, H, L, S, 0.1)
    assert_grids_fit(grids, _ATTN_KERNELS)
    for name, (x, y, z) in grids:
        assert y * z >= B * H > y * (z - 1), (name, (x, y, z))  # every head, < one slice of padding


@pytest.mark.parametrize("dq_mode", ["separate", "atomic"])
def test_heads_folded_over_grid_y_and_z(dq_mode, monkeypatch):
    # cap 4: B * Hq = 10 heads -> (4, 3) with 2 padding programs, B * Hkv = 5 -> (4, 2) with 3,
    # the mask's 5 (batch, head) slices likewise; dropout keyed by the head index
    q, k, v = make_qkv(5, 2, 1, 20, 24, 16, 16, torch.float32, seed=8)
    mask = _mask((5, 1, 20, 24), "float", torch.float32)
    seed = torch.tensor([99], dtype=torch.int64, device=DEVICE)
    unfolded = kernels.dropout_keep_mask(seed, 5, 2, 20, 24, 0.2)
    monkeypatch.setattr(kernels, "GRID_YZ_MAX", 4)
    monkeypatch.setattr(kernels, "DQ_MODE", dq_mode)
    assert torch.equal(kernels.dropout_keep_mask(seed, 5, 2, 20, 24, 0.2), unfolded)
    check_call("triton", q, k, v, mask, dropout_p=0.2, enable_gqa=True)


# ---------------------------------------------------------------------------------------------
# Dropout: the Philox stream, its statistics, and gradients given the kernel's own mask.

def test_dropout_keep_mask_statistics():
    p, torch_seed = 0.2, 11
    q, k, _ = make_qkv(2, 2, 2, 64, 96, 16, 16, torch.float32)
    keep = replay_keep(q, k, p, torch_seed)
    n = keep.numel()
    rate = keep.float().mean().item()
    assert abs(rate - (1 - p)) < 5 * math.sqrt(p * (1 - p) / n), rate
    # every (batch, head) draws its own mask; the same seed draws the same one
    assert not torch.equal(keep[0, 0], keep[0, 1]) and not torch.equal(keep[0, 0], keep[1, 0])
    assert torch.equal(keep, replay_keep(q, k, p, torch_seed))
    assert not torch.equal(keep, replay_keep(q, k, p, torch_seed + 1))
    # no structure along rows or columns: each row's keep count is binomial(96, 0.8)
    per_row = keep.float().sum(-1).flatten()
    assert abs(per_row.std().item() - math.sqrt(96 * p * (1 - p))) < 1.0


# (B, H, L, S): why this shape. The stream: one Philox call per 4 consecutive keys of a row
# (attn.dropout_keep_reference writes it out in NumPy, independently of the kernels).
KEEP_STREAM_SHAPES = [
    (1, 2, 5, 37),     # S odd, not a multiple of 4: the last group of each row is partial
    (2, 3, 17, 64),    # several key tiles of the keep-mask kernel's 64, batch x heads > 1
    (1, 1, 3, 1),      # one key: a group of 1
    (1, 1, 70, 130),   # L and S past one 64-tile, S = 2 mod 4
]


@pytest.mark.parametrize("B,H,L,S", KEEP_STREAM_SHAPES)
def test_dropout_keep_mask_is_the_documented_stream(B, H, L, S):
    for seed_value, p in ((2**40 + 12345, 0.3), (2**62 - 7, 0.1)):   # high seed words set
        seed = torch.tensor([seed_value], dtype=torch.int64, device=DEVICE)
        keep = kernels.dropout_keep_mask(seed, B, H, L, S, p).cpu()
        assert torch.equal(keep, attn.dropout_keep_reference(seed_value, B, H, L, S, p))


def test_dropout_stream_keep_fraction():
    # many elements of the reference stream (the kernels equal it, above): the keep rate is 1 - p,
    # and each of the 4 words of a Philox call (key % 4) keeps at that rate on its own
    p, B, H, L, S = 0.3, 2, 4, 128, 257
    keep = attn.dropout_keep_reference(123456789, B, H, L, S, p)
    n = keep.numel()
    assert abs(keep.float().mean().item() - (1 - p)) < 5 * math.sqrt(p * (1 - p) / n)
    for w in range(4):
        lane = keep[..., w::4]
        assert abs(lane.float().mean().item() - (1 - p)) < 5 * math.sqrt(p * (1 - p) / lane.numel())
    # neighbouring keys decided by one call are not correlated
    a, b = keep[..., 0:-1:4].float(), keep[..., 1::4].float()
    corr = ((a - a.mean()) * (b - b.mean())).mean() / (a.std() * b.std())
    assert abs(corr.item()) < 5 / math.sqrt(a.numel())


def test_dropout_mean_is_unbiased():
    # with v = 1, each output element is sum_j P_ij Z_ij / (1 - p): its expectation is 1
    p = 0.3
    q, k, _ = make_qkv(2, 2, 2, 48, 64, 16, 16, torch.float32)
    v = torch.ones(2, 2, 64, 16, device=DEVICE)
    torch.manual_seed(5)
    out = DF.scaled_dot_product_attention(q, k, v, dropout_p=p, backend="triton")[..., 0]
    probs = attn.attention_reference(q.double(), k.double(), torch.eye(64, dtype=torch.float64, device=DEVICE))
    var = (probs.pow(2).sum(-1) * p / (1 - p)).sum() / out.numel() ** 2   # of the mean
    assert abs(out.double().mean().item() - 1.0) < 5 * var.sqrt().item()


@pytest.mark.parametrize("case", [
    dict(dtype=torch.float32, causal=False),
    dict(dtype=torch.float32, causal=True, Hkv=1),            # with MQA
    dict(dtype=torch.float32, causal=False, mask=True),       # with a learned bias
    dict(dtype=torch.bfloat16, causal=True),
    dict(dtype=torch.float32, causal=True, S=37),             # S odd: partial key groups
], ids=["fp32", "fp32_causal_mqa", "fp32_bias", "bf16_causal", "fp32_causal_S37"])
def test_dropout_gradients_match_dense_reference(case):
    Hkv, S = case.get("Hkv", 2), case.get("S", 30)
    q, k, v = make_qkv(1, 2, Hkv, 23, S, 32, 32, case["dtype"])
    mask = _mask((1, 2, 23, S), "float", case["dtype"]) if case.get("mask") else None
    check_call("triton", q, k, v, mask, dropout_p=0.25, is_causal=case["causal"],
               enable_gqa=Hkv != 2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_dropout_runs_and_varies(backend):
    q, k, v = make_qkv(1, 2, 2, 16, 16, 16, 16, torch.float32)
    a = DF.scaled_dot_product_attention(q, k, v, dropout_p=0.5, backend=backend)
    b = DF.scaled_dot_product_attention(q, k, v, dropout_p=0.5, backend=backend)
    assert torch.isfinite(a).all() and not torch.equal(a, b)


# ---------------------------------------------------------------------------------------------
# GQA/MQA dK/dV with the group's query heads split over several programs (review 2026-12, T9):
# the split is forced under the interpreter by a small SM count.

def _spy_split(monkeypatch) -> list:
    seen = []
    real = kernels.dkdv_head_split

    def spy(programs, group, sms):
        seen.append(real(programs, group, sms))
        return seen[-1]
    monkeypatch.setattr(kernels, "dkdv_head_split", spy)
    return seen


# (Hq, Hkv, L, S, causal, mask, dropout_p, dq_mode, sms -> split): why this case
GQA_SPLIT_CASES = [
    (8, 1, 20, 37, False, None, 0.0, "separate", 4, 4),     # MQA, 8 heads in parts of 2, S odd
    (8, 1, 29, 37, True, None, 0.2, "separate", 64, 8),     # one head per part, causal, dropout
    (3, 1, 21, 19, False, "bool", 0.25, "separate", 8, 3),  # group 3, bool mask, dropout
    (3, 1, 22, 37, True, None, 0.1, "separate", 8, 3),      # group 3, causal, dropout, S odd
    (10, 2, 18, 33, False, "float", 0.1, "separate", 4, 3),  # GQA 5 per K/V head: parts 2, 2, 1
    (8, 2, 17, 23, True, None, 0.2, "atomic", 8, 4),        # atomic dQ beside the split, causal
]


@pytest.mark.parametrize("Hq,Hkv,L,S,causal,mask_kind,p,dq_mode,sms,split", GQA_SPLIT_CASES)
def test_gqa_dkdv_head_split(Hq, Hkv, L, S, causal, mask_kind, p, dq_mode, sms, split, monkeypatch):
    seen = _spy_split(monkeypatch)
    monkeypatch.setattr(kernels, "SM_COUNT", sms)
    monkeypatch.setattr(kernels, "DQ_MODE", dq_mode)
    q, k, v = make_qkv(1, Hq, Hkv, L, S, 16, 16, torch.float32, seed=Hq + S)
    mask = _mask((1, Hq, L, S), mask_kind, torch.float32) if mask_kind else None
    check_call("triton", q, k, v, mask, dropout_p=p, is_causal=causal, enable_gqa=True)
    assert seen and seen[-1][0] == split, seen


def test_dkdv_head_split_fills_an_h200():
    # MQA, B = 1, S = 4096, BLOCK_N = 128: 32 programs on 132 SMs without the split
    assert kernels.dkdv_head_split(32, 8, 132) == (8, 1)             # 256: as many as the group allows
    split, per = kernels.dkdv_head_split(32, 32, 132)                # 32 heads: >= 2 per SM
    assert split * 32 >= 2 * 132 and per * split >= 32 and per * (split - 1) < 32
    assert kernels.dkdv_head_split(32 * 16, 8, 132) == (1, 8)        # big enough already
    assert kernels.dkdv_head_split(32, 1, 132) == (1, 1)             # MHA: nothing to split
    assert kernels.dkdv_head_split(32, 8, None) == (1, 8)            # no SM count: no split


# ---------------------------------------------------------------------------------------------
# Determinism and the dQ strategies.

def _grads(atomic=False, deterministic=False):
    # GQA (2 query heads per K/V head), a learned bias and dropout: every summation the backward does
    q, k, v = make_qkv(1, 2, 1, 21, 19, 16, 16, torch.float32, seed=5)
    mask = _mask((1, 2, 21, 19), "float", torch.float32)
    old = kernels.DQ_MODE
    kernels.DQ_MODE = "atomic" if atomic else "separate"
    try:
        with dlh.deterministic(deterministic):
            torch.manual_seed(3)
            out = DF.scaled_dot_product_attention(q, k, v, mask, dropout_p=0.1, enable_gqa=True,
                                                  backend="triton")
            out.backward(torch.ones_like(out))
    finally:
        kernels.DQ_MODE = old
    return [out, q.grad, k.grad, v.grad, mask.grad]


def test_backward_is_deterministic():
    # default strategy: no atomics anywhere (dQ in its own kernel, GQA heads and mask gradients
    # summed in registers in a fixed order): bitwise repeatable
    for a, b in zip(_grads(), _grads()):
        assert torch.equal(a, b)


def test_atomic_dq_matches_and_deterministic_overrides_it():
    separate = _grads()
    atomic = _grads(atomic=True)
    torch.testing.assert_close(atomic[1], separate[1], rtol=1e-5, atol=1e-5)
    for a, b in zip(separate, _grads(atomic=True, deterministic=True)):
        assert torch.equal(a, b)  # deterministic: the separate kernel, whatever DQ_MODE says


def test_deterministic_switch():
    assert not dlh.is_deterministic()
    with dlh.deterministic(True):
        assert dlh.is_deterministic()
    assert not dlh.is_deterministic()
    torch.use_deterministic_algorithms(True)
    try:
        assert dlh.is_deterministic()
    finally:
        torch.use_deterministic_algorithms(False)


# ---------------------------------------------------------------------------------------------
# torch.library contract and compilation.

def _op_args(backend):
    q, k, v = make_qkv(1, 2, 1, 5, 7, 16, 16, torch.float32)
    mask = _mask((1, 2, 5, 7), "float", torch.float32)
    seed = torch.tensor([5], dtype=torch.int64, device=DEVICE)
    return q, k, v, mask, seed, 0.2, False, 0.25, backend


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    args = _op_args(backend)
    torch.library.opcheck(attn.attention_op.custom_op, args)
    q, k, v, mask, seed = (t.detach() for t in args[:5])
    out, lse = attn.attention_op(q, k, v, mask, seed, *args[5:])
    grad_out = torch.randn_like(out)
    torch.library.opcheck(attn.attention_backward_op.custom_op,
                          (grad_out, q, k, v, out, lse, mask, seed, 0.2, False, 0.25, True, False, backend))


def test_compile_fullgraph():
    torch._dynamo.reset()
    q, k, v = make_qkv(1, 2, 1, 6, 9, 16, 16, torch.float32)
    mask = _mask((1, 2, 6, 9), "float", torch.float32)

    def block(q, k, v, mask):
        o = DF.scaled_dot_product_attention(q, k, v, mask, enable_gqa=True, backend="triton")
        return (o * o).sum()

    eager = block(q, k, v, mask)
    eager.backward()
    grads = [t.grad.clone() for t in (q, k, v, mask)]
    for t in (q, k, v, mask):
        t.grad = None
    compiled = torch.compile(block, fullgraph=True)(q, k, v, mask)
    compiled.backward()
    torch.testing.assert_close(compiled, eager)
    for t, g in zip((q, k, v, mask), grads):
        torch.testing.assert_close(t.grad, g)


# ---------------------------------------------------------------------------------------------
# Bad input: a clear error naming the argument, before any launch.

def _t(*s, **kw):
    return torch.randn(*s, **kw)


@pytest.mark.parametrize("call_, match", [
    (lambda: DF.scaled_dot_product_attention([1.0], _t(1, 2, 4), _t(1, 2, 4)), "query must be a torch.Tensor"),
    (lambda: DF.scaled_dot_product_attention(_t(1, 2, 4), _t(1, 2, 4).half(), _t(1, 2, 4)), "share one dtype"),
    (lambda: DF.scaled_dot_product_attention(_t(1, 2, 4), _t(1, 2, 5), _t(1, 2, 4)), "key's head dim"),
    (lambda: DF.scaled_dot_product_attention(_t(1, 2, 4), _t(1, 3, 4), _t(1, 2, 4)), "value's sequence length"),
    (lambda: DF.scaled_dot_product_attention(_t(4), _t(2, 4), _t(2, 4)), "query must have at least 2 dims"),
    (lambda: DF.scaled_dot_product_attention(torch.ones(1, 2, 4, dtype=torch.int32), _t(1, 2, 4), _t(1, 2, 4)), "floating-point"),
    (lambda: DF.scaled_dot_product_attention(_t(2, 3, 2, 4), _t(3, 3, 2, 4), _t(3, 3, 2, 4)), "do not broadcast"),
    (lambda: DF.scaled_dot_product_attention(_t(1, 6, 2, 4), _t(1, 4, 2, 4), _t(1, 4, 2, 4), enable_gqa=True), "enable_gqa"),
    (lambda: DF.scaled_dot_product_attention(_t(1, 2, 4), _t(1, 3, 4), _t(1, 3, 4), attn_mask=_t(2, 2)), "attn_mask of shape"),
    (lambda: DF.scaled_dot_product_attention(_t(1, 2, 4), _t(1, 3, 4), _t(1, 3, 4), attn_mask=torch.ones(2, 3, dtype=torch.int64)), "attn_mask must be bool"),
    (lambda: DF.scaled_dot_product_attention(_t(1, 2, 4), _t(1, 3, 4), _t(1, 3, 4), attn_mask=_t(2, 3, dtype=torch.float64)), "attn_mask must be bool"),
    (lambda: DF.scaled_dot_product_attention(_t(1, 2, 4), _t(1, 3, 4), _t(1, 3, 4), attn_mask=_t(2, 3), is_causal=True), "attn_mask must be None when is_causal"),
    (lambda: DF.scaled_dot_product_attention(_t(1, 2, 4), _t(1, 3, 4), _t(1, 3, 4), dropout_p=1.5), "dropout_p"),
    (lambda: DF.scaled_dot_product_attention(_t(1, 2, 4), _t(1, 3, 4), _t(1, 3, 4), scale="x"), "scale"),
    (lambda: DF.scaled_dot_product_attention(_t(1, 2, 4), _t(1, 3, 4), _t(1, 3, 4), is_causal=1), "is_causal"),
    (lambda: DF.scaled_dot_product_attention(_t(1, 2, 4), _t(1, 3, 4, device="meta"), _t(1, 3, 4)), "device"),
    (lambda: DF.scaled_dot_product_attention(_t(1, 2, 4), _t(1, 3, 4), _t(1, 3, 4), backend="fast"), "backend must be one of"),
])
def test_bad_input(call_, match):
    with pytest.raises((TypeError, ValueError, RuntimeError), match=match):
        call_()


def test_named_backend_that_cannot_run_raises():
    q = torch.randn(1, 2, 4, 8, dtype=torch.float64, device=DEVICE)
    with pytest.raises(RuntimeError, match="triton.*float64"):
        DF.scaled_dot_product_attention(q, q, q, backend="triton")
    big = torch.randn(1, 1, 4, 320, device=DEVICE)
    with pytest.raises(RuntimeError, match="head dims"):
        DF.scaled_dot_product_attention(big, big, big, backend="triton")
    with pytest.raises(RuntimeError, match="cuda"):
        DF.scaled_dot_product_attention(q.float(), q.float(), q.float(), backend="cuda")
    # auto never fails for lack of a kernel: float64 and head dim 320 go to torch
    torch.testing.assert_close(DF.scaled_dot_product_attention(q, q, q), F.scaled_dot_product_attention(q, q, q))
    torch.testing.assert_close(DF.scaled_dot_product_attention(big, big, big),
                               F.scaled_dot_product_attention(big, big, big))


def test_explain():
    q = torch.randn(1, 2, 4, 8, device=DEVICE)
    verdict = dlh.explain("scaled_dot_product_attention", q, q, q, is_causal=True)
    assert verdict["torch"] == "ok" and "cuda" in verdict
    if HAS_GPU:
        assert verdict["cuda"] == "no CUDA C++ attention kernel yet" or "extension" in verdict["cuda"]
        assert verdict["auto"] == "picks triton"
    else:
        assert verdict["auto"] == "picks torch"


def test_float64_torch_backend_matches_reference():
    q, k, v = make_qkv(2, 2, 2, 5, 7, 8, 8, torch.float64)
    mask = _mask((2, 1, 1, 7), "bool", torch.float64)
    torch.testing.assert_close(DF.scaled_dot_product_attention(q, k, v, mask),
                               attn.attention_reference(q, k, v, mask))


# ---------------------------------------------------------------------------------------------
# dlh.nn.MultiheadAttention

def _mha_pair(batch_first, **kw):
    torch.manual_seed(0)
    ref = torch.nn.MultiheadAttention(32, 2, batch_first=batch_first, **kw).to(DEVICE)
    ours = dlh.nn.MultiheadAttention(32, 2, batch_first=batch_first, **kw).to(DEVICE)
    ours.load_state_dict(ref.state_dict())
    ours.backend = "triton"
    return ref, ours


@pytest.mark.parametrize("batch_first", [True, False], ids=["batch_first", "seq_first"])
@pytest.mark.parametrize("masks", ["none", "key_padding", "attn_mask+key_padding", "causal"])
def test_mha_matches_torch(batch_first, masks):
    ref, ours = _mha_pair(batch_first)
    N, L = 2, 11
    x = torch.randn((N, L, 32) if batch_first else (L, N, 32), device=DEVICE)
    kw = {}
    if masks in ("key_padding", "attn_mask+key_padding"):
        kpm = torch.zeros(N, L, dtype=torch.bool, device=DEVICE)
        kpm[1, -3:] = True
        kw["key_padding_mask"] = kpm
    if masks == "attn_mask+key_padding":
        kw["attn_mask"] = torch.rand(L, L, device=DEVICE) > 0.8   # True: may not attend
        kw["attn_mask"].fill_diagonal_(False)
    if masks == "causal":
        kw.update(attn_mask=torch.nn.Transformer.generate_square_subsequent_mask(L, device=DEVICE),
                  is_causal=True)
    xr, xo = x.clone().requires_grad_(), x.clone().requires_grad_()
    a = ref(xr, xr, xr, need_weights=False, **kw)[0]
    b = ours(xo, xo, xo, need_weights=False, **kw)[0]
    torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
    g = torch.randn_like(a)
    a.backward(g)
    b.backward(g)
    torch.testing.assert_close(xo.grad, xr.grad, rtol=1e-4, atol=1e-5)
    for (name, pr), po in zip(ref.named_parameters(), ours.parameters()):
        torch.testing.assert_close(po.grad, pr.grad, rtol=1e-4, atol=1e-5, msg=name)


def test_mha_cross_attention_kdim_vdim_and_unbatched():
    ref, ours = _mha_pair(False, kdim=12, vdim=20)
    assert ours.state_dict().keys() == ref.state_dict().keys()
    q, k, v = torch.randn(5, 2, 32), torch.randn(7, 2, 12), torch.randn(7, 2, 20)
    q, k, v = (t.to(DEVICE) for t in (q, k, v))
    mask = torch.randn(2 * 2, 5, 7, device=DEVICE)   # per (batch, head) additive mask
    torch.testing.assert_close(ours(q, k, v, need_weights=False, attn_mask=mask)[0],
                               ref(q, k, v, need_weights=False, attn_mask=mask)[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ours(q[:, 0], k[:, 0], v[:, 0], need_weights=False)[0],
                               ref(q[:, 0], k[:, 0], v[:, 0], need_weights=False)[0], rtol=1e-4, atol=1e-5)


def test_mha_need_weights_falls_back_to_torch():
    ref, ours = _mha_pair(True)
    x = torch.randn(2, 6, 32, device=DEVICE)
    out, weights = ours(x, x, x)  # need_weights=True: torch's implementation, weights returned
    ref_out, ref_weights = ref(x, x, x)
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(weights, ref_weights)
    assert isinstance(ours, torch.nn.MultiheadAttention)


def test_mha_dropout_only_in_training():
    ref, ours = _mha_pair(True, dropout=0.5)
    x = torch.randn(2, 6, 32, device=DEVICE)
    ours.eval()
    ref.eval()
    torch.testing.assert_close(ours(x, x, x, need_weights=False)[0], ref(x, x, x, need_weights=False)[0],
                               rtol=1e-4, atol=1e-5)
    ours.train()
    a, b = ours(x, x, x, need_weights=False)[0], ours(x, x, x, need_weights=False)[0]
    assert not torch.equal(a, b)


# ---------------------------------------------------------------------------------------------
# GPU only: real sizes, TF32, autotuning, CUDA graphs, peak memory. Autotuning compiles every
# candidate configuration once per (kernel, head dims, features, dtype): only the tests that
# are about it turn it on; the others run the fixed configuration at every size.

@pytest.fixture(autouse=True)
def fixed_gpu_config():
    old = kernels.AUTOTUNE_MIN_LEN
    kernels.AUTOTUNE_MIN_LEN = 1 << 40
    yield
    kernels.AUTOTUNE_MIN_LEN = old


@pytest.fixture
def autotune():
    kernels.AUTOTUNE_MIN_LEN = 256


GPU_SHAPES = {  # (B, Hq, Hkv, L, S, D, Dv)
    "hd64_1k": (2, 8, 8, 1024, 1024, 64, 64),
    "hd128_gqa_2k": (1, 8, 2, 2048, 2048, 128, 128),
    "vit_17": (64, 8, 8, 17, 17, 32, 32),
    "hd80_L<S": (1, 4, 4, 1000, 3000, 80, 80),
    "hd256_ragged": (1, 4, 4, 777, 513, 256, 256),
}
GPU_CASES = [(s, torch.bfloat16) for s in GPU_SHAPES] + [
    ("hd64_1k", torch.float16), ("hd80_L<S", torch.float32)]


@pytest.mark.gpu
@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("shape,dtype", GPU_CASES, ids=[f"{s}-{str(d)[6:]}" for s, d in GPU_CASES])
def test_gpu_sizes(shape, dtype, is_causal):
    B, Hq, Hkv, L, S, D, Dv = GPU_SHAPES[shape]
    check_call("triton", *make_qkv(B, Hq, Hkv, L, S, D, Dv, dtype), is_causal=is_causal,
               enable_gqa=Hq != Hkv)


@pytest.mark.gpu
def test_gpu_masks_and_dropout():
    q, k, v = make_qkv(2, 8, 4, 640, 700, 64, 64, torch.bfloat16)
    check_call("triton", q, k, v, _mask((1, 8, 640, 700), "float", torch.bfloat16), enable_gqa=True)
    q, k, v = make_qkv(2, 8, 8, 512, 512, 128, 128, torch.bfloat16)
    check_call("triton", q, k, v, dropout_p=0.1, is_causal=True)


@pytest.mark.gpu
@pytest.mark.parametrize("dq_mode", ["separate", "atomic"])
def test_gpu_autotuned(dq_mode, autotune):
    # the autotuner runs each candidate on the real buffers: the atomic dQ accumulator must be
    # zeroed between them (reset_to_zero), or the result sums every candidate's dQ
    old = kernels.DQ_MODE
    kernels.DQ_MODE = dq_mode
    try:
        check_call("triton", *make_qkv(2, 8, 2, 1024, 1024, 64, 64, torch.bfloat16), is_causal=True,
                   enable_gqa=True)
    finally:
        kernels.DQ_MODE = old


@pytest.mark.gpu
@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
def test_gpu_memory_is_linear_in_sequence(is_causal):
    # L = S = 16K, 8 heads of 64: the scores alone would take 8 * 16K^2 * 2 B = 4 GiB. Forward
    # and backward may hold the inputs, outputs, gradients and O(L) per-row statistics only.
    B, H, L, D = 1, 8, 16384, 64
    q, k, v = (torch.randn(B, H, L, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    grad = torch.randn(B, H, L, D, device="cuda", dtype=torch.bfloat16)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = DF.scaled_dot_product_attention(q, k, v, is_causal=is_causal, backend="triton")
    out.backward(grad)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    tensor = B * H * L * D * 2
    # out, dq, dk, dv (4 tensors), lse + delta (fp32 per row), allocator slack
    assert extra < 6 * tensor + 16 * B * H * L + (64 << 20), f"{extra / 2**20:.0f} MiB extra"


@pytest.mark.gpu
def test_gpu_cuda_graph_with_dropout():
    q, k, v = (torch.randn(2, 4, 256, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    DF.scaled_dot_product_attention(q, k, v, dropout_p=0.1, backend="triton")  # compile outside
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = DF.scaled_dot_product_attention(q, k, v, dropout_p=0.1, backend="triton")
    graph.replay()
    first = out.clone()
    graph.replay()
    torch.cuda.synchronize()
    assert torch.isfinite(out).all() and not torch.equal(first, out)  # a fresh seed per replay
