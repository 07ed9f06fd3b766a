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
    return 0


if __name__ == "__main__":
    sys.exit(main(int(sys.argv[1])))
