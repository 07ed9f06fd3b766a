"""The Triton kernels compile to GPU code for sm_80 and sm_90, on any machine.

The interpreter runs the kernels' logic on CPU but is lenient where the compiler is not
(loop-carried types, constexpr branches, pointer types): this compiles every variant the launch
helpers use, through Triton's own compiler and ptxas, without a GPU. The suite runs with the
interpreter on, so the compiling happens in a child process without it:
`python tests/test_triton_compile.py ARCH` compiles everything for one architecture.
"""
import itertools
import os
import subprocess
import sys

import pytest

ARCHS = [80, 90]


@pytest.mark.parametrize("arch", ARCHS)
def test_triton_kernels_compile(arch):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, __file__, str(arch)], env=env, capture_output=True,
                          text=True, timeout=900)
    if proc.returncode == 3:
        pytest.skip(proc.stdout.strip())
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "compiled" in proc.stdout


# ---- the child process: everything below runs without the interpreter ----------------------


def compile_kernel(fn, target, pointers, scalars, constexprs, num_warps=4, num_stages=3):
    """pointers: {name: element type or None (absent)}; scalars: {name: type}."""
    import triton
    from triton.compiler import ASTSource
    signature, consts = {}, dict(constexprs)
    for name, ty in pointers.items():
        if ty is None:
            signature[name], consts[name] = "constexpr", None
        else:
            signature[name] = f"*{ty}"
    signature.update(scalars)
    signature.update({name: "constexpr" for name in constexprs})
    # keep the kernel's own argument order
    signature = {a: signature[a] for a in fn.arg_names}
    compiled = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=consts),
                              target=target, options={"num_warps": num_warps, "num_stages": num_stages})
    assert compiled.asm.get("cubin"), "no machine code"


def forward_kernels(target, dtype, rms, residual, affine):
    x = dtype
    opt = x if residual else None
    w = x if affine else None
    i32 = "i32"
    compile_kernel(
        K.norm_fwd_kernel, target,
        dict(X=x, R=opt, W=w, B=None if rms else w, Y=x, H=opt, Mean=None if rms else "fp32",
             Rstd="fp32"),
        dict(stride_x=i32, stride_r=i32, stride_y=i32, stride_h=i32, M=i32, N=i32, eps="fp32"),
        dict(RMS=rms, HAS_RES=residual, HAS_W=affine, HAS_B=affine and not rms, BLOCK_M=4,
             BLOCK_N=1024), num_warps=8)
    compile_kernel(
        K.norm_fwd_partial_kernel, target,
        dict(X=x, R=opt, H=opt, Partial="fp32"),
        dict(stride_x=i32, stride_r=i32, stride_h=i32, N=i32, CHUNK=i32, n_chunks=i32),
        dict(RMS=rms, HAS_RES=residual, BLOCK_N=4096), num_warps=8)
    compile_kernel(
        K.norm_fwd_apply_kernel, target,
        dict(Src=x, W=w, B=None if rms else w, Y=x, Mean=None if rms else "fp32", Rstd="fp32",
             Partial="fp32"),
        dict(stride_src=i32, stride_y=i32, N=i32, CHUNK=i32, n_chunks=i32, eps="fp32"),
        dict(RMS=rms, HAS_W=affine, HAS_B=affine and not rms, BLOCK_N=4096, CHUNKS_P2=32),
        num_warps=8)


def backward_kernels(target, dtype, rms, split, residual):
    x, i32 = dtype, "i32"
    stats = None if rms else "fp32"
    if split:
        compile_kernel(
            K.norm_bwd_partial_kernel, target,
            dict(DY=x, Hin=x, W=x, Mean=stats, Rstd="fp32", Partial="fp32"),
            dict(stride_dy=i32, stride_h=i32, N=i32, CHUNK=i32, n_chunks=i32),
            dict(RMS=rms, HAS_W=True, BLOCK_N=4096), num_warps=8)
    compile_kernel(
        K.norm_bwd_kernel, target,
        dict(DY=x, Hin=x, W=x, Mean=stats, Rstd="fp32", DH=x if residual else None, DX=x,
             DWp="fp32", DBp=None if rms else "fp32", Partial="fp32" if split else None),
        dict(stride_dy=i32, stride_h=i32, stride_dh=i32, stride_dx=i32, M=i32, N=i32,
             rows_per_group=i32, n_chunks=i32),
        dict(RMS=rms, HAS_W=True, HAS_DH=residual, COMPUTE_DW=True, COMPUTE_DB=not rms,
             SPLIT=split, BLOCK_M=1 if split else 4, BLOCK_N=4096 if split else 1024,
             CHUNKS_P2=32 if split else 1), num_warps=8)


def gelu_kernels(target, dtype, tanh, bias):
    x, i32, i64 = dtype, "i32", "i64"
    b = ("fp32" if dtype == "bf16" else x) if bias else None
    # N as i64: the flat path of a tensor past 2^31 elements
    for n_type in (i32, i64):
        compile_kernel(
            G.gelu_fwd_kernel, target, dict(X=x, Bias=b, Y=x),
            dict(M=i32, N=n_type, stride_x=i32, stride_y=i32),
            dict(TANH=tanh, HAS_BIAS=bias, BLOCK_M=1, BLOCK_N=4096), num_warps=8)
    compile_kernel(
        G.gelu_bwd_kernel, target, dict(DY=x, X=x, Bias=b, DX=x, DB_PART="fp32" if bias else None),
        dict(M=i32, N=i32, stride_dy=i32, stride_x=i32, stride_dx=i32, rows_per_group=i32),
        dict(TANH=tanh, HAS_BIAS=bias, BIAS_GRAD=bias, BLOCK_M=4, BLOCK_N=1024), num_warps=8)
    compile_kernel(
        G.geglu_fwd_kernel, target, dict(X=x, Y=x), dict(M=i32, H=i32, stride_x=i32, stride_y=i32),
        dict(TANH=tanh, BLOCK_M=4, BLOCK_N=1024), num_warps=8)
    compile_kernel(
        G.geglu_bwd_kernel, target, dict(DY=x, X=x, DX=x),
        dict(M=i32, H=i32, stride_dy=i32, stride_x=i32, stride_dx=i32),
        dict(TANH=tanh, BLOCK_M=4, BLOCK_N=1024), num_warps=8)
    # the smallest autotune config everywhere, the largest for bf16 (compiling one takes
    # ~10 s), forward and gradient epilogues
    configs = [(64, 32, 32, 4, 5)] + ([(128, 256, 64, 8, 3)] if dtype == "bf16" and not tanh else [])
    for (bm, bn, bk, warps, stages) in configs:
        for grad in (False, True):
            compile_kernel(
                G.linear_gelu_kernel, target,
                dict(A=x, W=x, Bias=x if bias else None, C=x, DC=x if grad else None),
                dict(M=i32, N=i32, K=i32, stride_am=i32, stride_ak=i32, stride_wn=i32,
                     stride_wk=i32, stride_cm=i32, stride_dcm=i32, M_BUCKET=i32),
                dict(TANH=tanh, HAS_BIAS=bias, GRAD=grad,
                     INPUT_PRECISION="ieee" if dtype == "fp32" else "tf32", DOT_FP32=False,
                     BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8),
                num_warps=warps, num_stages=stages)


def attention_kernels(target, dtype, D, Dv, causal, mask, dropout, atomic, fwd_cfg, dkdv_cfg):
    """One variant of every attention kernel. mask: None, "bool" or "bias" (with its gradient)."""
    x, i32 = dtype, "i32"
    block_d, block_dv = (max(16, 1 << (n - 1).bit_length()) for n in (D, Dv))
    mask_ptr = {None: None, "bool": "i1", "bias": x}[mask]
    seed = "i64" if dropout else None
    # the kernels' own stride names: q (b h m d), k/v (b h n d), mask (b h m n), ...
    def named(prefix, last2):
        return {f"stride_{prefix}{s}": i32 for s in ("b", "h") + last2}
    qkv = {**named("q", ("m", "d")), **named("k", ("n", "d")), **named("v", ("n", "d")),
           **named("m", ("m", "n"))}
    do = named("do", ("m", "d"))
    common = dict(HEAD_D=D, HEAD_DV=Dv, DROPOUT=dropout, BLOCK_D=block_d, BLOCK_DV=block_dv,
                  DOT_PRECISION="tf32" if dtype == "fp32" else "ieee")
    kind = {None: 0, "bool": 1, "bias": 2}[mask]
    bm, bn, warps, stages = fwd_cfg
    compile_kernel(
        A.attn_fwd_kernel, target,
        dict(Q=x, K=x, V=x, Mask=mask_ptr, Seed=seed, Out=x, Lse="fp32"),
        {**qkv, **named("o", ("m", "d")), "Hq": i32, "L": i32, "S": i32, "GROUP": i32,
         "qk_scale": "fp32", "dropout_p": "fp32", "L_BUCKET": i32, "S_BUCKET": i32},
        dict(common, IS_CAUSAL=causal, MASK_KIND=kind, BLOCK_M=bm, BLOCK_N=bn),
        num_warps=warps, num_stages=stages)
    compile_kernel(
        A.attn_bwd_preprocess_kernel, target, dict(Out=x, DO=x, Delta="fp32"),
        {**named("o", ("m", "d")), **do, "Hq": i32, "L": i32},
        dict(HEAD_DV=Dv, BLOCK_M=64, BLOCK_DV=block_dv))
    scalars = {**qkv, **do, "L": i32, "S": i32, "GROUP": i32, "qk_scale": "fp32",
               "dropout_p": "fp32", "L_BUCKET": i32, "S_BUCKET": i32}
    bm, bn, warps, stages = dkdv_cfg
    compile_kernel(
        A.attn_bwd_dkdv_kernel, target,
        dict(Q=x, K=x, V=x, Mask=mask_ptr, Seed=seed, DO=x, Lse="fp32", Delta="fp32", DK=x, DV=x,
             DQ="fp32" if atomic else None),
        {**scalars, **named("dk", ("n", "d")), **named("dv", ("n", "d")), **named("dq", ("m", "d")),
         "Hq": i32, "Hkv": i32, "sm_scale": "fp32"},
        dict(common, IS_CAUSAL=causal, MASK_KIND=kind, ATOMIC_DQ=atomic, BLOCK_M=bm, BLOCK_N=bn),
        num_warps=warps, num_stages=stages)
    bm, bn, warps, stages = fwd_cfg
    compile_kernel(
        A.attn_bwd_dq_kernel, target,
        dict(Q=x, K=x, V=x, Mask=mask_ptr, Seed=seed, DO=x, Lse="fp32", Delta="fp32", DQ=x),
        {**scalars, **named("dq", ("m", "d")), "Hq": i32, "sm_scale": "fp32"},
        dict(common, IS_CAUSAL=causal, MASK_KIND=kind, BLOCK_M=bm, BLOCK_N=bn),
        num_warps=warps, num_stages=stages)
    if mask == "bias":
        compile_kernel(
            A.attn_bwd_dmask_kernel, target,
            dict(Q=x, K=x, V=x, Mask=x, Seed=seed, DO=x, Lse="fp32", Delta="fp32", DMask="fp32"),
            {**scalars, "B": i32, "Hq": i32, "mH": i32, "mL": i32, "mS": i32},
            dict(common, BCAST_B=True, BCAST_H=False, BCAST_L=causal, BCAST_S=False,
                 BLOCK_M=64, BLOCK_N=64), num_warps=4, num_stages=2)


def diffusion_kernels(target, dtype, method, pred, noise, tensors, contig, table):
    """tensors: timesteps and seed as device tensors (True) or ints; noise 0 none, 1 given, 2 drawn."""
    i32, i64 = "i32", "i64"
    guidance = clip = method != 2
    strides = {f"s{t}{d}": i64 for t in "xmuno" for d in range(4)}
    compile_kernel(
        S.diffusion_step_kernel, target,
        dict(X=dtype, MO=dtype, UC=dtype if guidance else None, NZ=dtype if noise == 1 else None, OUT=dtype,
             AC=table, T="i64" if tensors else None, PT="i32" if tensors else None,
             SEED="i64" if tensors and noise == 2 else None),
        dict(t_int=i32, pt_int=i32, seed_int=i64, t_stride=i32, pt_stride=i32, n_elements=i64,
             per_batch=i64, n_table=i32, D1=i64, D2=i64, D3=i64, **strides, eta="fp32",
             clip_range="fp32", guidance_scale="fp32"),
        dict(METHOD=method, PRED=pred, CLIP=clip, GUIDANCE=guidance, NOISE=noise, T_TENSOR=tensors,
             PT_TENSOR=tensors, SEED_TENSOR=tensors and noise == 2, CONTIG=contig, BLOCK=S.BLOCK))


def group_norm_kernels(target, dtype, w_dtype, affine, silu, int64, fused, split):
    x, i32 = dtype, "i32"
    w = w_dtype if affine else None
    flags = dict(HAS_W=affine, HAS_B=affine, SILU=silu, INT64=int64)
    strides = lambda *names: {f"stride_{n}{d}": i32 for n in names for d in "ncs"}  # noqa: E731
    for block_c, block_s in (fused, split):
        blocks = dict(BLOCK_C=block_c, BLOCK_S=block_s)
        warps = max(1, min(16, block_c * block_s // 512))
        if (block_c, block_s) == fused:
            compile_kernel(
                GN.group_norm_fwd_kernel, target,
                dict(X=x, W=w, B=w, Y=x, Mean="fp32", Rstd="fp32"),
                dict(**strides("x", "y"), G=i32, CG=i32, S=i32, eps="fp32"),
                dict(**flags, **blocks), num_warps=warps)
            compile_kernel(
                GN.group_norm_bwd_kernel, target,
                dict(DY=x, X=x, W=w, B=w, Mean="fp32", Rstd="fp32", DX=x, DWp="fp32" if affine else None,
                     DBp="fp32" if affine else None),
                dict(**strides("dy", "x", "dx"), G=i32, CG=i32, S=i32, C=i32),
                dict(**flags, COMPUTE_DW=affine, COMPUTE_DB=affine, **blocks), num_warps=warps)
            continue
        compile_kernel(
            GN.group_norm_fwd_partial_kernel, target, dict(X=x, Partial="fp32"),
            dict(**strides("x"), G=i32, CG=i32, S=i32, CHUNK_S=i32, s_chunks=i32),
            dict(INT64=int64, **blocks), num_warps=warps)
        compile_kernel(
            GN.group_norm_fwd_apply_kernel, target,
            dict(X=x, W=w, B=w, Y=x, Mean="fp32", Rstd="fp32", Partial="fp32"),
            dict(**strides("x", "y"), G=i32, CG=i32, S=i32, CHUNK_S=i32, s_chunks=i32, eps="fp32"),
            dict(**flags, **blocks, CHUNKS_P2=64), num_warps=warps)
        compile_kernel(
            GN.group_norm_bwd_partial_kernel, target,
            dict(DY=x, X=x, W=w, B=w, Mean="fp32", Rstd="fp32", Partial="fp32",
                 DWp="fp32" if affine else None, DBp="fp32" if affine else None),
            dict(**strides("dy", "x"), G=i32, CG=i32, S=i32, C=i32, CHUNK_S=i32, s_chunks=i32),
            dict(**flags, COMPUTE_DW=affine, COMPUTE_DB=affine, **blocks), num_warps=warps)
        compile_kernel(
            GN.group_norm_bwd_apply_kernel, target,
            dict(DY=x, X=x, W=w, B=w, Mean="fp32", Rstd="fp32", DX=x, Partial="fp32"),
            dict(**strides("dy", "x", "dx"), G=i32, CG=i32, S=i32, CHUNK_S=i32, s_chunks=i32),
            dict(**flags, **blocks, CHUNKS_P2=64), num_warps=warps)


def conv2d_kernels(target, dtype, act, bias, grad, fwd_cfg, bwd_cfg):
    """One variant of each conv2d kernel. fwd_cfg: (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages)."""
    x, i32 = dtype, "i32"
    dims = dict(N=i32, H=i32, W=i32, OH=i32, OW=i32, CG=i32, KG=i32, R=i32, S=i32)
    conv = dict(stride_h=i32, stride_w=i32, pad_h=i32, pad_w=i32, dil_h=i32, dil_w=i32)

    def strides(*names):
        return {f"s{n}{d}": i32 for n in names for d in "nchw"}
    precision = dict(INPUT_PRECISION="ieee" if dtype == "fp32" else "tf32", DOT_FP32=False)
    bm, bn, bk, warps, stages = fwd_cfg
    compile_kernel(
        CV.conv2d_fwd_kernel, target, dict(X=x, Wt=x, Bias=x if bias else None, Y=x, DY=x if grad else None),
        dict(**dims, sxn=i32, sxc=i32, sxh=i32, sxw=i32, swk=i32, swc=i32, swr=i32, sws=i32,
             **strides("y", "d"), **conv, negative_slope="fp32", M_BUCKET=i32),
        dict(ACT=act, HAS_BIAS=bias, GRAD=grad, **precision, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8),
        num_warps=warps, num_stages=stages)
    bm, bn, bk, warps, stages = bwd_cfg
    compile_kernel(
        CV.conv2d_bwd_input_kernel, target, dict(DZ=x, Wt=x, DX=x),
        dict(**dims, **strides("z"), swk=i32, swc=i32, swr=i32, sws=i32, **strides("x"), **conv),
        dict(**precision, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk), num_warps=warps, num_stages=stages)
    compile_kernel(
        CV.conv2d_bwd_weight_kernel, target, dict(DZ=x, X=x, DW="fp32"),
        dict(**dims, **strides("z", "x"), swk=i32, swc=i32, swr=i32, sws=i32, **conv,
             pix_per_split=i32, split_stride=i32),
        dict(**precision, BLOCK_M=64, BLOCK_N=64, BLOCK_K=64), num_warps=4, num_stages=3)


def main(arch: int) -> int:
    try:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource  # noqa: F401
    except ImportError:
        print("this Triton has no ASTSource/GPUTarget compile API")
        return 3
    global K
    from dlh_kernels.triton_kernels import layer_norm as K
    target = GPUTarget("cuda", arch, 32)
    count = 0
    for dtype in ("bf16", "fp32"):
        for flags in itertools.product([False, True], repeat=3):
            forward_kernels(target, dtype, *flags)
            backward_kernels(target, dtype, *flags)
            count += 1
    print(f"compiled {count} variants of the norm kernels for sm_{arch}")
    global G
    from dlh_kernels.triton_kernels import gelu as G
    count = 0
    for dtype in ("bf16", "fp16", "fp32"):
        for tanh, bias in ((False, False), (True, True)):
            gelu_kernels(target, dtype, tanh, bias)
            count += 1
    print(f"compiled {count} variants of the gelu kernels for sm_{arch}")
    global A
    from dlh_kernels.triton_kernels import attention as A
    # (dtype, D, Dv, causal, mask, dropout, atomic dQ, fwd/dq (BLOCK_M, BLOCK_N, warps, stages),
    #  dkdv config): the GPU's fixed small-problem configs and the largest autotune candidates
    variants = [
        ("bf16", 64, 64, True, None, False, False, (128, 64, 8, 3), (32, 128, 8, 2)),
        ("fp16", 128, 128, False, "bool", True, True, (64, 32, 4, 2), (64, 64, 4, 2)),
        ("fp32", 80, 80, True, "bias", True, False, (64, 32, 4, 2), (32, 64, 4, 3)),
        ("bf16", 256, 256, False, None, False, False, (32, 32, 4, 1), (32, 32, 4, 1)),
        ("bf16", 128, 64, False, "bias", False, True, (128, 32, 4, 4), (16, 128, 8, 2)),
    ]
    for v in variants:
        attention_kernels(target, *v)
    compile_kernel(A.attn_dropout_mask_kernel, target, dict(Seed="i64", Keep="i1"),
                   dict(L="i32", S="i32", dropout_p="fp32"), dict(BLOCK_M=64, BLOCK_N=64))
    print(f"compiled {len(variants)} variants of the attention kernels for sm_{arch}")
    global S
    from dlh_kernels.triton_kernels import diffusion_step as S
    # (dtype, method, prediction, noise, device timesteps/seed, contiguous, table dtype)
    variants = [
        ("bf16", 0, 0, 1, False, True, "fp32"),     # DDPM epsilon, given noise: the common call
        ("fp16", 1, 1, 2, True, False, "fp64"),     # DDIM v, drawn noise, device t/seed, strided
        ("fp32", 1, 2, 0, True, True, "fp32"),      # DDIM eta = 0, sample prediction
        ("bf16", 2, 2, 0, False, False, "fp32"),    # the sampler's interpolation step
    ]
    for v in variants:
        diffusion_kernels(target, *v)
    for seed in (dict(SEED="i64"), dict(SEED=None)):
        compile_kernel(S.seeded_randn_kernel, target, dict(OUT="bf16", **seed),
                       dict(seed_int="i64", n_elements="i64"),
                       dict(SEED_TENSOR=seed["SEED"] is not None, BLOCK=S.BLOCK))
    print(f"compiled {len(variants) + 2} variants of the diffusion step kernels for sm_{arch}")
    global GN
    from dlh_kernels.triton_kernels import group_norm as GN
    # (dtype, weight dtype, affine, silu, int64, fused (BLOCK_C, BLOCK_S), split (BLOCK_C, BLOCK_S))
    variants = [
        ("bf16", "bf16", True, True, False, (4, 1024), (1, 4096)),    # U-Net NCHW: the common call
        ("fp16", "fp32", True, True, True, (16, 512), (16, 256)),     # fp32 params, 64-bit offsets
        ("fp32", None, False, False, False, (2, 64), (8, 512)),       # no affine, no activation
    ]
    for v in variants:
        group_norm_kernels(target, *v)
    print(f"compiled {len(variants)} variants of the group norm kernels for sm_{arch}")
    global CV
    from dlh_kernels.triton_kernels import conv2d as CV
    # (dtype, activation code, bias, GRAD, forward config, dx config): the largest autotune
    # candidate, the depthwise-sized one, and the fp32 GRAD recompute
    variants = [
        ("bf16", 1, True, False, (128, 128, 64, 8, 3), (128, 64, 64, 4, 3)),
        ("fp16", 4, True, True, (64, 32, 16, 4, 3), (128, 16, 16, 4, 3)),
        ("fp32", 5, False, True, (128, 64, 32, 4, 4), (128, 32, 32, 4, 3)),
        ("bf16", 3, False, False, (256, 64, 64, 8, 3), (128, 64, 64, 4, 3)),
    ]
    for v in variants:
        conv2d_kernels(target, *v)
    print(f"compiled {len(variants)} variants of the conv2d kernels for sm_{arch}")
    return 0


if __name__ == "__main__":
    sys.exit(main(int(sys.argv[1])))
