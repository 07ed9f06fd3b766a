"""The strict CUDA emulation (tests/cuda_emu) catches what a GPU would get wrong.

Each test applies one deliberate break to a copy of a csrc/*.cu file (a text replacement that
must match exactly once, so that a refactor of the kernel fails here loudly instead of letting
the test pass without testing anything), builds the copy under the emulation, runs one small case
through the same checks as the kernel's own emulated test, and requires the emulation to report
the violation. None of these breaks changes a result the old (lax) emulation could see: with
synchronous cp.async, an unbounded shared array and free-running threads they all passed.
The unmodified kernels pass the same emulation with zero violations (their own tests).
"""
import math

import pytest
import torch

import cuda_emu
import test_cuda_build as B
from test_cuda_attention import EMU_ATTN_ENTRIES, EMU_ATTN_EXPORTS, _EmulatedAttentionExt, _check_emulated

F16, BF16, F32 = torch.float16, torch.bfloat16, torch.float32
pytestmark = B.needs_nvcc


def _build(cu_name, entries, extra_exports="", defines=(), **kw):
    """B._build_emulated at -O0: the mutants run one small case each, so compile time dominates."""
    return B._build_emulated(cu_name, entries, extra_exports, [*defines, "-O0"], **kw)


def mutated(cu_name, old, new):
    """csrc/<cu_name> with `old` (which must occur exactly once) replaced by `new`."""
    text = (B.CSRC / cu_name).read_text()
    assert text.count(old) == 1, f"{cu_name}: the mutation's anchor occurs {text.count(old)} times, not once:\n{old}"
    return text.replace(old, new)


def expect_violation(kind, fn, *args, **kwargs):
    """fn must raise cuda_emu.Violation reporting `kind` (a category of the emulation)."""
    with pytest.raises(cuda_emu.Violation) as info:
        fn(*args, **kwargs)
    assert f"{kind}:" in str(info.value), str(info.value)
    return str(info.value)


# ---- attention.cu ---------------------------------------------------------------------------------
def _attention_glue(monkeypatch, source):
    from dlh_kernels import _ext
    from dlh_kernels.ops import attention as attn
    ext = _EmulatedAttentionExt(_build("attention.cu", EMU_ATTN_ENTRIES, EMU_ATTN_EXPORTS,
                                                  min_launches=4, source=source))
    monkeypatch.setattr(_ext, "ext", lambda: ext)
    monkeypatch.setattr(_ext, "stream_handle", lambda device: 0)
    monkeypatch.setattr(attn, "emulated", ext, raising=False)
    return attn


def _attention_forward(A, L=16, S=200, D=32, causal=False):
    """One forward of 4 key tiles (BN = 64): every buffer of the stream is refilled."""
    q = torch.randn(1, 1, L, D, dtype=F16)
    k, v = torch.randn(1, 1, S, D, dtype=F16), torch.randn(1, 1, S, D, dtype=F16)
    return A._cuda_fwd(q, k, v, None, None, 0.0, causal, 1 / math.sqrt(D))


def test_attention_kv_step_waits_for_too_few_groups(monkeypatch):
    """(a) wait<2> in kv_step: tile j is still in flight when the block reads it."""
    A = _attention_glue(monkeypatch, mutated("attention.cu", "  cp_async_commit();\n  cp_async_wait<1>();\n"
                                             "  __syncthreads();\n}", "  cp_async_commit();\n"
                                             "  cp_async_wait<2>();\n  __syncthreads();\n}"))
    expect_violation("in-flight", _attention_forward, A)


def test_attention_forward_without_its_loop_end_barrier(monkeypatch):
    """(b) the barrier at the end of the forward's key loop removed: the next kv_step refills the
    buffer other warps may still be reading."""
    A = _attention_glue(monkeypatch, mutated(
        "attention.cu", "    __syncthreads();  // every warp is done with this buffer before it is refilled\n", ""))
    expect_violation("race", _attention_forward, A)


def test_attention_forward_smem_undersized(monkeypatch):
    """(d) fwd_smem sized for 3 key/value tiles instead of 4: the last V buffer lies past the
    launch's dynamic shared memory."""
    A = _attention_glue(monkeypatch, mutated(
        "attention.cu", "return tile_bytes(64 + 4 * fwd_bn(D), D); }", "return tile_bytes(64 + 3 * fwd_bn(D), D); }"))
    message = expect_violation("bounds", _attention_forward, A)
    assert "attention_fwd_kernel" in message and "past the" in message


def test_attention_quad_shuffle_with_half_a_mask(monkeypatch):
    """The softmax's quad max with mask 0x0000ffff: lanes 16..31 take part without being in it."""
    A = _attention_glue(monkeypatch, mutated("attention.cu", "v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 1));",
                                             "v = fmaxf(v, __shfl_xor_sync(0x0000ffffu, v, 1));"))
    expect_violation("shuffle", _attention_forward, A)


def test_attention_unmodified_passes_the_same_cases(monkeypatch):
    """The cases above on the real source: no violation, and the results hold against float64."""
    A = _attention_glue(monkeypatch, None)
    out, lse = _attention_forward(A)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    _check_emulated(A, 1, 1, 1, 16, 200, 32, F16, False, grads=False)
    # the checks ran: every copy, fragment load and shared access went through the emulation
    totals = A.emulated.lib.totals
    for counter in ("launches", "barriers", "cp_async", "ldmatrix", "mma", "shuffles", "shared_accesses"):
        assert totals[counter] > 0, totals


# ---- conv2d.cu --------------------------------------------------------------------------------------
CONV_CASE = (2, 9, 9, 8, 16, 3, 3, (1, 1), (1, 1), (1, 1), 1, BF16, 2, True)  # Kgemm 72: 3 k-tiles, cp.async


def test_conv2d_without_its_main_loop_barrier():
    """(c) the barrier at the end of the implicit GEMM's k loop removed: stage kt + 1's cp.async
    overwrites what other warps read in iteration kt - 1."""
    lib = _build("conv2d.cu", B.EMU_CONV_ENTRIES, source=mutated(
        "conv2d.cu", "    __syncthreads();  // everyone is done reading `stage` before it is refilled\n", ""))
    expect_violation("race", B._check_conv2d, B._EmulatedConv2d(lib), torch.device("cpu"), *CONV_CASE)


# ---- linear.cu --------------------------------------------------------------------------------------
def test_linear_without_its_main_loop_barrier():
    """(c) the barrier at the end of the GEMM's k loop removed (n-contiguous weight: the
    ldmatrix.trans path): stage kt + 1's cp.async overwrites what other warps read in kt - 1."""
    import test_linear as L
    lib = _build("linear.cu", [("linear_fwd", "LinearArgs")], min_launches=2, source=mutated(
        "linear.cu", "    __syncthreads();  // everyone is done reading `stage` before it is refilled\n", ""))
    expect_violation("race", L.check_emulated, lib, 37, 40, 96, F16, 2, False)


# ---- layer_norm.cu -----------------------------------------------------------------------------------
def test_layer_norm_backward_reuses_one_reduction_buffer():
    """norm_bwd's per-row block_sum2 always into red[0] instead of alternating: row r + 1's
    partial sums overwrite red[0] while slower warps may still read row r's."""
    lib = _build("layer_norm.cu", B.EMU_NORM_ENTRIES, B.EMU_NORM_EXPORTS, B.EMU_NORM_DEFINES, source=mutated(
        "layer_norm.cu", "sums = block_sum2(sums, red[parity]);", "sums = block_sum2(sums, red[0]);"))
    ext = B._EmulatedExt(lib)
    expect_violation("race", B._check_norm, ext, torch.device("cpu"), 1, 6, 2048, BF16, F32, True, True, 8)


# ---- gelu.cu -----------------------------------------------------------------------------------------
def test_gelu_blocks_past_their_launch_bounds():
    """make_tiling with 2 * kThreads threads per block for kernels declared
    __launch_bounds__(kThreads = 256): a GPU refuses the launch, the grid-stride loops hide it
    from the results (and the old emulation ran it)."""
    lib = _build("gelu.cu", B.EMU_GELU_ENTRIES, B.EMU_GELU_EXPORTS, source=mutated(
        "gelu.cu", "std::min<int64_t>(kThreads / bx, M));", "std::min<int64_t>(2 * kThreads / bx, M));"))
    # 6 rows of 1007 padded to 1008 (no collapse into one row): 126 threads across, 4 rows a block
    message = expect_violation("launch", B._check_gelu, B._EmulatedGeluExt(lib), torch.device("cpu"), 2, 6, 1007,
                               BF16, F32, True, 1, 0)
    assert "__launch_bounds__(256)" in message


def test_gelu_dbias_reduce_without_its_barrier():
    """gelu_dbias_reduce_kernel's barrier between the per-row-group sums and their total
    removed: warp 0 adds sums[i][tx] that warps 1..7 may not have written yet. (The old
    emulation caught this one only when the OS scheduled the threads badly.)"""
    lib = _build("gelu.cu", B.EMU_GELU_ENTRIES, B.EMU_GELU_EXPORTS, source=mutated(
        "gelu.cu", "    sums[ty][tx] = s;\n    __syncthreads();\n", "    sums[ty][tx] = s;\n"))
    # 200 rows of 40: 4 row groups, so dbias goes through the partials and the reduce kernel
    expect_violation("race", B._check_gelu, B._EmulatedGeluExt(lib), torch.device("cpu"), 2, 200, 40, BF16, None,
                     False, 0, 3)


# ---- group_norm.cu -----------------------------------------------------------------------------------
def _group_norm_case(monkeypatch, source, case):
    lib = _build("group_norm.cu", B.EMU_GN_ENTRIES, B.EMU_GN_EXPORTS,
                            [f"-DDLH_TEST_GN_BATCH_BYTES={B.EMU_GN_BATCH_BYTES}"], source=source)
    from dlh_kernels import _ext
    from dlh_kernels.ops import group_norm as GN
    monkeypatch.setattr(_ext, "ext", lambda: B._EmulatedGroupNormExt(lib))
    monkeypatch.setattr(_ext, "stream_handle", lambda device: 0)
    monkeypatch.setattr(_ext, "sm_count", lambda index: 16)
    B._check_group_norm(GN, torch.device("cpu"), *case)


# NCHW, groups split in 4 tiles of 2048 elements: blocks of several warps
GN_SPLIT_CASE = ((2, 4, 64, 64), 2, F32, F32, "contiguous", "contiguous", True, True)


def test_group_norm_forward_reuses_the_first_reduction_buffer(monkeypatch):
    """The forward's second block reduction (m2) through red_sum, the buffer the first one (sum,
    count) still reads from: a warp's partial m2 may overwrite a sum a slower warp has not read
    (block_sum's contract: a second buffer, or a barrier)."""
    source = mutated("group_norm.cu", "    m2 = block_sum(m2, red_m2);",
                     "    m2 = block_sum(m2, reinterpret_cast<float*>(red_sum));")
    expect_violation("race", _group_norm_case, monkeypatch, source, GN_SPLIT_CASE)


def test_group_norm_backward_without_the_barrier_before_channel_sums(monkeypatch):
    """The backward's per-element dw/db contributions read by channel_sums before every thread
    wrote them (the barrier after the buffer fill removed; the old emulation caught it only by
    wrong results when the threads happened to interleave)."""
    old = ("          buf[(i * tpr + tid) * VEC + k] = which == 0 ? dz[i * VEC + k] * xhat[i * VEC + k] : "
           "dz[i * VEC + k];\n      __syncthreads();\n")
    source = mutated("group_norm.cu", old, old.replace("      __syncthreads();\n", ""))
    expect_violation("race", _group_norm_case, monkeypatch, source, GN_SPLIT_CASE)


# ---- activation.cu -----------------------------------------------------------------------------------
def test_activation_vector_path_ignoring_row_strides(monkeypatch):
    """plan() allowing 16-byte packs whatever the row stride: rows of 303 bf16 (606 bytes) start
    misaligned from row 1 on; a GPU faults, the CPU just reads them (and the results are right)."""
    import test_activation as T
    from dlh_kernels import _ext
    ext = T.build_emulated(mutated("activation.cu", "(M == 1 || (o.stride * int64_t(sizeof(T))) % 16 == 0)",
                                   "true"), defines=("-O0",))
    monkeypatch.setattr(_ext, "ext", lambda: ext)
    monkeypatch.setattr(_ext, "stream_handle", lambda device: 0)
    expect_violation("alignment", T.check_unary, "silu", "cuda", (6, 300), BF16, "row_slice",
                     run=T._unary_via_op("silu"))


# ---- diffusion_step.cu -------------------------------------------------------------------------------
STEP_LAUNCH = "diffusion_step_kernel<T, TableT, true><<<blocks, kThreads, 0, stream>>>(P);"


def _one_step(monkeypatch, source):
    """One DDPM step of a contiguous (2, 3, 5, 7) fp32 sample through the op's cuda glue."""
    lib = _build("diffusion_step.cu", B.EMU_STEP_ENTRIES, source=source)
    from dlh_kernels import _ext
    from dlh_kernels.ops import diffusion_step as D
    monkeypatch.setattr(_ext, "ext", lambda: B._EmulatedStepExt(lib))
    monkeypatch.setattr(_ext, "stream_handle", lambda device: 0)
    x = torch.randn(2, 3, 5, 7)
    table = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0).float()
    D._STEP["cuda"](x, x, None, x, torch.empty_like(x), table, 500, 480, None, 0, 0, 0.0, None, None)


def test_diffusion_step_launched_past_its_launch_bounds(monkeypatch):
    """Blocks of 2 * kThreads = 512 threads for a kernel declared __launch_bounds__(256): a GPU
    refuses the launch (too many resources requested); the grid-stride loop hides it from the
    results."""
    source = mutated("diffusion_step.cu", STEP_LAUNCH, STEP_LAUNCH.replace("kThreads, 0", "2 * kThreads, 0"))
    message = expect_violation("launch", _one_step, monkeypatch, source)
    assert "__launch_bounds__(256)" in message


def test_launch_grid_checks(monkeypatch):
    """Grid y past 65,535: refused like on a GPU (a violation, and the launch fails)."""
    source = mutated("diffusion_step.cu", STEP_LAUNCH, STEP_LAUNCH.replace("<<<blocks,", "<<<dim3(1, 70000),"))
    message = expect_violation("launch", _one_step, monkeypatch, source)
    assert "grid (1,70000,1)" in message


def test_dynamic_smem_over_48k_needs_the_attribute(monkeypatch):
    """attention's allow_smem made a no-op: a 73,728-byte launch (hd 128) without
    cudaFuncSetAttribute is refused."""
    A = _attention_glue(monkeypatch, mutated("attention.cu", "  if (bytes <= 48 * 1024) return;\n",
                                             "  if (bytes > 0) return;\n"))
    message = expect_violation("launch", _attention_forward, A, D=128)
    assert "cudaFuncSetAttribute" in message


# ---- rotary.cu ---------------------------------------------------------------------------------------
def test_rotary_vector_path_without_its_stride_check(monkeypatch):
    """vectorizable() no longer checks pointers and strides: bf16 rows of D = 32 that start one element
    past a 16-byte boundary (a sliced view) move as 16-byte packs, which a GPU faults on and a
    CPU silently forgives (the results stay right)."""
    import test_rotary as T
    source = mutated("rotary.cu", "    if (bytes % 16) return false;\n", "")
    source = source.replace("    if (p % 16) return false;\n", "", 1)
    T.emulated_rotary_glue(monkeypatch, source, build=lambda *a, **kw: _build(*a, **kw))
    expect_violation("alignment", T.run_emulated_case, 1, 2, 1, 2, 32, 32, BF16, BF16, False, 2, "offset")
