"""The CUDA C++ extension as a build artefact: it compiles, it installs, and it fails cleanly.

None of these needs a GPU, only nvcc and the CUDA headers (they skip without them), so CI
machines without GPUs catch compile errors in csrc/ and even run the kernels:
  (a) the installed dlh_kernels._C imports, reports its build, links no libcudart.so;
  (b) every csrc/*.cu compiles for sm_80 and sm_90 without warnings, bindings.cpp too;
  (c) without a GPU, calls raise RuntimeError / ValueError, never crash;
  (d) csrc/layer_norm.cu against a float64 reference on shapes that reach each of its kernel
      paths (warp per row, block per row, split rows, row batches, scalar fallback): on a GPU
      (marked `gpu`), and on the CPU through the strict CUDA emulation of tests/cuda_emu (any
      race, misaligned access, shared-memory overrun, bad shuffle mask or launch configuration
      it sees fails the call: see tests/cuda_emu/__init__.py);
  (e) csrc/gelu.cu (GELU with bias and dbias, GeGLU) the same two ways, on layouts that reach its
      vector, offset-view, scalar, contiguous-collapse and dbias-partials paths.
  (f) csrc/diffusion_step.cu through the emulation, driven by the op's own glue, against the
      float64 torch backend (the real cuda backend is tested in tests/test_diffusion_step.py).
  (g) csrc/group_norm.cu (GroupNorm + SiLU) driven by the op's own glue, against float64, on a
      GPU (marked `gpu`) and through the emulation: NCHW and channels-inner groups, fused and
      split, sample batches, vectors and the scalar fallback, layouts the glue must copy.
  (h) csrc/conv2d.cu (NHWC conv2d + bias + activation) against float64 F.conv2d: on a GPU (marked
      `gpu`) through both kernels; through the emulation, the CUDA-core direct kernel (forced for
      every dtype) and the tensor-core implicit GEMM (mma.sync, ldmatrix and cp.async emulated).
That the emulation catches what it claims to is tested in tests/test_cuda_emulation.py.
"""
import os
import re
import shutil
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

import cuda_emu

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
CU_FILES = sorted(CSRC.glob("*.cu"))


NVCC = cuda_emu.find_nvcc()  # setup.py's search order
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc not found: the CUDA extension is not built here")

# The flags setup.py uses (minus -lineinfo, which changes no diagnostics), for both archs in one
# nvcc call: nvcc shares the front end between them, and --threads compiles them side by side.
NVCC_FLAGS = ["-O3", "-std=c++17", "-Xcompiler", "-fPIC", "--expt-relaxed-constexpr",
              "-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=sm_90",
              "--threads", "2", f"-I{CSRC}", "-Xptxas", "-v"]


def _import_ext():
    try:
        import dlh_kernels._C as C
    except ImportError as exc:
        return None, str(exc)
    return C, None


# ---------------------------------------------------------------------------------------------
# (a) the installed extension

@needs_nvcc
def test_extension_is_installed():
    if os.environ.get("DLH_NO_CUDA", "0") not in ("", "0"):
        pytest.skip("DLH_NO_CUDA is set: the extension is deliberately not built")
    C, err = _import_ext()
    assert C is not None, (f"nvcc is here but dlh_kernels._C does not import ({err}); reinstall "
                           "with `pip install -v -e .` and read why setup.py skipped the build")
    info = C.build_info()
    assert set(info) == {"archs", "nvcc", "cuda_runtime"}
    archs = info["archs"].split(";")
    assert archs and all(re.fullmatch(r"\d{2,3}[af]?", a) for a in archs), info
    if not os.environ.get("DLH_CUDA_ARCHS"):
        assert archs == ["80", "90"], info
    assert re.fullmatch(r"\d+\.\d+(\.\d+)?", info["nvcc"]), info
    assert isinstance(info["cuda_runtime"], int) and info["cuda_runtime"] >= 11000, info
    # The static CUDA runtime is linked in: no CUDA library path is needed at run time.
    if shutil.which("ldd"):
        deps = subprocess.run(["ldd", C.__file__], capture_output=True, text=True).stdout
        assert "libcudart" not in deps, deps


# ---------------------------------------------------------------------------------------------
# (b) every .cu compiles for sm_80 and sm_90, without warnings, independently of the install

@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """Compiles all csrc/*.cu at once (in parallel): {name: (returncode, output)}."""
    out_dir = tmp_path_factory.mktemp("cuda_objects")

    def compile_one(src):
        cmd = [NVCC, *NVCC_FLAGS, "-c", str(src), "-o", str(out_dir / f"{src.name}.o")]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        return src.name, (proc.returncode, proc.stdout + proc.stderr)

    workers = max(1, min(len(CU_FILES), (os.cpu_count() or 2) // 2))
    with ThreadPoolExecutor(workers) as pool:
        return dict(pool.map(compile_one, CU_FILES))


@needs_nvcc
@pytest.mark.parametrize("source", [p.name for p in CU_FILES])
def test_cu_compiles_for_sm80_and_sm90(compiled, source):
    returncode, output = compiled[source]
    assert returncode == 0, f"nvcc failed on {source}:\n{output}"
    warnings = [line for line in output.splitlines() if "warning" in line.lower()]
    assert not warnings, f"{source} compiles with warnings:\n" + "\n".join(warnings)


# Kernels written before this check that ptxas makes spill a little (a few to ~100 bytes in some
# fp32/bwd instantiations): known debt, strict xfail so that fixing them forces this list to shrink.
KNOWN_SPILLS = {"layer_norm.cu", "group_norm.cu", "conv2d.cu"}


@needs_nvcc
@pytest.mark.parametrize("source", [
    pytest.param(p.name, marks=pytest.mark.xfail(strict=True, reason="known register spills (debt)"))
    if p.name in KNOWN_SPILLS else p.name for p in CU_FILES])
def test_no_register_spills(compiled, source):
    """ptxas's resource report (-v) for every kernel instantiation: a spill is a bug (registers
    went to local memory). The report is kept in bench/results/ptxas_*.txt for the record."""
    returncode, output = compiled[source]
    assert returncode == 0, output
    entries = re.findall(r"Compiling entry function '(\w+)' for '(sm_\d+)'.*?(\d+) bytes spill stores, "
                         r"(\d+) bytes spill loads", output, re.S)
    assert entries, f"no ptxas report for {source}:\n{output[:2000]}"
    spills = [(name, arch, st, ld) for name, arch, st, ld in entries if int(st) or int(ld)]
    assert not spills, f"{source}: kernels that spill registers: {spills}"


@needs_nvcc
def test_bindings_compile():
    pybind11 = pytest.importorskip("pybind11")
    import sysconfig

    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if not cxx:
        pytest.skip("no host C++ compiler")
    cuda_include = Path(os.path.realpath(NVCC)).parent.parent / "include"
    if not (cuda_include / "cuda_runtime_api.h").is_file():
        cuda_include = Path("/usr/local/cuda/include")
    cmd = [cxx, "-std=c++17", "-fsyntax-only", "-Wall", f"-I{CSRC}", f"-I{pybind11.get_include()}",
           f"-I{cuda_include}", f"-I{sysconfig.get_paths()['include']}", str(CSRC / "bindings.cpp")]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0 and "warning" not in proc.stderr, proc.stderr


# ---------------------------------------------------------------------------------------------
# (c) without a GPU, calls fail with Python exceptions, never with a crash

NO_GPU_SCRIPT = textwrap.dedent("""
    import dlh_kernels._C as C

    def outcome(fn, *args, **kwargs):
        try:
            fn(*args, **kwargs)
            return "ok"
        except Exception as exc:
            return f"{type(exc).__name__}: {exc}"

    # dummy, 16-byte aligned "device pointers": nothing may ever dereference them
    fwd = dict(x=1 << 20, res=0, w=2 << 20, b=3 << 20, y=4 << 20, h=0, mean=5 << 20,
               rstd=6 << 20, workspace=7 << 20, M=64, N=4096, stride_x=4096, stride_res=0,
               stride_y=4096, stride_h=0, eps=1e-5, rms=False, x_dtype=1, w_dtype=0,
               sm_count=132, stream=0)
    bwd = dict(dy=1 << 20, h=2 << 20, w=3 << 20, mean=4 << 20, rstd=5 << 20, dh_out=0,
               dx=6 << 20, dw=7 << 20, db=8 << 20, workspace=9 << 20, M=64, N=4096,
               stride_dy=4096, stride_h=4096, stride_dh=0, stride_dx=4096, rms=False,
               x_dtype=2, w_dtype=2, sm_count=132, stream=0)
    print("fwd", outcome(C.norm_fwd, **fwd))
    print("fwd_split", outcome(C.norm_fwd, **{**fwd, "M": 4, "N": 1 << 17, "stride_x": 1 << 17,
                                              "stride_y": 1 << 17}))
    print("bwd", outcome(C.norm_bwd, **bwd))
    print("fwd_bad_dtype", outcome(C.norm_fwd, **{**fwd, "x_dtype": 3}))
    print("fwd_bad_w_dtype", outcome(C.norm_fwd, **{**fwd, "x_dtype": 1, "w_dtype": 2}))
    print("bwd_bad_dtype", outcome(C.norm_bwd, **{**bwd, "x_dtype": -1}))
    print("fwd_bad_M", outcome(C.norm_fwd, **{**fwd, "M": -1}))
    print("fwd_h_without_res", outcome(C.norm_fwd, **{**fwd, "h": 8 << 20}))
    print("fwd_empty", outcome(C.norm_fwd, **{**fwd, "M": 0}))
    print("ws", outcome(C.norm_fwd_workspace, 8, 1 << 17, 132), C.norm_fwd_workspace(8, 1 << 17, 132))

    gf = dict(x=1 << 20, bias=2 << 20, y=3 << 20, M=64, N=4096, stride_x=4096, stride_y=4096,
              tanh=False, x_dtype=1, bias_dtype=0, stream=0)
    gb = dict(dy=1 << 20, x=2 << 20, bias=3 << 20, dx=4 << 20, dbias=5 << 20, workspace=6 << 20,
              M=4096, N=4096, stride_dy=4096, stride_x=4096, stride_dx=4096, tanh=True, x_dtype=2,
              bias_dtype=2, sm_count=132, stream=0)
    qf = dict(x=1 << 20, y=2 << 20, M=64, H=4096, stride_x=8192, stride_y=4096, tanh=False,
              dtype=1, stream=0)
    qb = dict(dy=1 << 20, x=2 << 20, dx=3 << 20, M=64, H=4096, stride_dy=4096, stride_x=8192,
              stride_dx=8192, tanh=True, dtype=0, stream=0)
    print("gelu_fwd", outcome(C.gelu_fwd, **gf))
    print("gelu_fwd_no_bias", outcome(C.gelu_fwd, **{**gf, "bias": 0, "bias_dtype": 9}))  # ignored
    print("gelu_bwd", outcome(C.gelu_bwd, **gb))
    print("gelu_bwd_no_dbias", outcome(C.gelu_bwd, **{**gb, "dbias": 0, "workspace": 0}))
    print("geglu_fwd", outcome(C.geglu_fwd, **qf))
    print("geglu_bwd", outcome(C.geglu_bwd, **qb))
    print("gelu_fwd_bad_dtype", outcome(C.gelu_fwd, **{**gf, "x_dtype": 5}))
    print("gelu_fwd_bad_bias_dtype", outcome(C.gelu_fwd, **{**gf, "x_dtype": 1, "bias_dtype": 2}))
    print("gelu_fwd_null_x", outcome(C.gelu_fwd, **{**gf, "x": 0}))
    print("gelu_fwd_bad_stride", outcome(C.gelu_fwd, **{**gf, "stride_y": 100}))
    print("gelu_bwd_bad_N", outcome(C.gelu_bwd, **{**gb, "N": -3}))
    print("gelu_bwd_no_ws", outcome(C.gelu_bwd, **{**gb, "workspace": 0}))
    print("gelu_bwd_null_dy", outcome(C.gelu_bwd, **{**gb, "dy": 0}))
    print("geglu_fwd_bad_dtype", outcome(C.geglu_fwd, **{**qf, "dtype": 7}))
    print("geglu_bwd_bad_stride", outcome(C.geglu_bwd, **{**qb, "stride_dx": 4096}))
    print("geglu_bwd_bad_H", outcome(C.geglu_bwd, **{**qb, "H": -1}))
    print("gelu_fwd_empty", outcome(C.gelu_fwd, **{**gf, "M": 0}))
    print("gelu_bwd_empty", outcome(C.gelu_bwd, **{**gb, "N": 0}))
    print("geglu_bwd_empty", outcome(C.geglu_bwd, **{**qb, "H": 0}))
    print("gelu_ws", outcome(C.gelu_bwd_workspace, 4096, 4096, 132), C.gelu_bwd_workspace(4096, 4096, 132),
          C.gelu_bwd_workspace(1, 4096, 132))

    if hasattr(C, "group_norm_fwd"):  # an extension built before group_norm.cu existed has none
        nf = dict(x=1 << 20, w=2 << 20, b=3 << 20, y=4 << 20, mean=5 << 20, rstd=6 << 20, workspace=7 << 20,
                  N=8, C=128, S=4096, G=32, stride_xn=1 << 19, stride_xc=4096, stride_xs=1,
                  stride_yn=1 << 19, stride_yc=4096, stride_ys=1, eps=1e-5, silu=True, channels_inner=False,
                  x_dtype=2, w_dtype=2, sm_count=132, stream=0)
        nb = dict(dy=1 << 20, x=2 << 20, w=3 << 20, b=4 << 20, mean=5 << 20, rstd=6 << 20, dx=7 << 20,
                  dw=8 << 20, db=9 << 20, workspace=10 << 20, N=8, C=128, S=4096, G=32,
                  stride_dyn=1 << 19, stride_dyc=1, stride_dys=128, stride_xn=1 << 19, stride_xc=1,
                  stride_xs=128, stride_dxn=1 << 19, stride_dxc=1, stride_dxs=128, silu=True,
                  channels_inner=True, x_dtype=1, w_dtype=0, sm_count=132, stream=0)
        print("gn_fwd", outcome(C.group_norm_fwd, **nf))
        print("gn_bwd", outcome(C.group_norm_bwd, **nb))
        print("gn_fwd_bad_G", outcome(C.group_norm_fwd, **{**nf, "G": 3}))
        print("gn_fwd_bad_inner", outcome(C.group_norm_fwd, **{**nf, "channels_inner": True}))
        print("gn_bwd_bad_dtype", outcome(C.group_norm_bwd, **{**nb, "x_dtype": 4}))
        print("gn_fwd_empty", outcome(C.group_norm_fwd, **{**nf, "N": 0}))
        print("gn_ws", outcome(C.group_norm_bwd_workspace, 8, 128, 4096, 32, False, 2, 132),
              C.group_norm_bwd_workspace(8, 128, 4096, 32, False, 2, 132))

    if hasattr(C, "conv2d_fwd"):  # an extension built before conv2d.cu existed has none
        cv = dict(x=1 << 20, w=2 << 20, bias=3 << 20, y=4 << 20, N=2, H=32, W=32, C=128, K=128, R=3, S=3,
                  OH=32, OW=32, stride_h=1, stride_w=1, pad_h=1, pad_w=1, dil_h=1, dil_w=1, groups=1,
                  activation=1, negative_slope=0.01, dtype=1, stream=0)
        print("conv", outcome(C.conv2d_fwd, **cv))
        print("conv_f32", outcome(C.conv2d_fwd, **{**cv, "dtype": 0, "bias": 0}))
        print("conv_dw", outcome(C.conv2d_fwd, **{**cv, "groups": 128, "R": 5, "S": 5, "pad_h": 2, "pad_w": 2}))
        print("conv_bad_OH", outcome(C.conv2d_fwd, **{**cv, "OH": 31}))
        print("conv_bad_OW", outcome(C.conv2d_fwd, **{**cv, "stride_w": 2}))
        print("conv_bad_groups", outcome(C.conv2d_fwd, **{**cv, "groups": 3}))
        print("conv_bad_groups_K", outcome(C.conv2d_fwd, **{**cv, "K": 100, "groups": 8}))
        print("conv_bad_act", outcome(C.conv2d_fwd, **{**cv, "activation": 8}))
        print("conv_bad_dtype", outcome(C.conv2d_fwd, **{**cv, "dtype": 3}))
        print("conv_bad_stride", outcome(C.conv2d_fwd, **{**cv, "stride_h": 0}))
        print("conv_null_x", outcome(C.conv2d_fwd, **{**cv, "x": 0}))
        print("conv_null_w", outcome(C.conv2d_fwd, **{**cv, "w": 0}))
        print("conv_empty", outcome(C.conv2d_fwd, **{**cv, "N": 0, "x": 0, "y": 0}))
""")


@needs_nvcc
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU behaviour")
def test_calls_without_gpu_raise_cleanly():
    C, err = _import_ext()
    if C is None:
        pytest.skip(f"dlh_kernels._C is not built ({err})")
    # In a child process, so that a crash would show up as a failed test, not a dead run.
    proc = subprocess.run([sys.executable, "-c", NO_GPU_SCRIPT], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, f"the extension crashed (rc {proc.returncode}):\n{proc.stdout}{proc.stderr}"
    results = dict(line.split(" ", 1) for line in proc.stdout.splitlines())
    for call in ("fwd", "fwd_split", "bwd"):
        assert results[call].startswith("RuntimeError: dlh::norm_"), results[call]
    for call in ("fwd_bad_dtype", "fwd_bad_w_dtype", "bwd_bad_dtype", "fwd_bad_M", "fwd_h_without_res"):
        assert results[call].startswith("ValueError: dlh::norm_"), results[call]
    assert results["fwd_empty"] == "ok"  # nothing to do: no launch, no CUDA call
    assert results["ws"].startswith("ok ") and int(results["ws"].split()[1]) > 0

    for call in ("gelu_fwd", "gelu_fwd_no_bias", "gelu_bwd", "gelu_bwd_no_dbias"):
        assert results[call].startswith("RuntimeError: dlh::gelu_"), results[call]
    for call in ("geglu_fwd", "geglu_bwd"):
        assert results[call].startswith("RuntimeError: dlh::geglu_"), results[call]
    # ValueError, and the message names the argument
    for call, arg in [("gelu_fwd_bad_dtype", "x_dtype"), ("gelu_fwd_bad_bias_dtype", "bias_dtype"),
                      ("gelu_fwd_null_x", "x is required"), ("gelu_fwd_bad_stride", "stride_y"),
                      ("gelu_bwd_bad_N", "N must be >= 0"), ("gelu_bwd_no_ws", "workspace"),
                      ("gelu_bwd_null_dy", "dy is required"), ("geglu_fwd_bad_dtype", "dtype"),
                      ("geglu_bwd_bad_stride", "stride_dx"), ("geglu_bwd_bad_H", "H must be >= 0")]:
        fn = call.split("_bad")[0].split("_null")[0].split("_no_ws")[0]
        assert results[call].startswith(f"ValueError: dlh::{fn}: ") and arg in results[call], results[call]
    for call in ("gelu_fwd_empty", "gelu_bwd_empty", "geglu_bwd_empty"):
        assert results[call] == "ok", results[call]
    ok, big, single_row = results["gelu_ws"].split()
    assert ok == "ok" and int(big) > 0 and int(single_row) == 0  # one row group: dbias written directly

    if "gn_fwd" in results:
        for call in ("gn_fwd", "gn_bwd"):
            assert results[call].startswith("RuntimeError: dlh::group_norm_"), results[call]
        for call, arg in [("gn_fwd_bad_G", "G (num_groups) must divide"), ("gn_fwd_bad_inner", "channels_inner"),
                          ("gn_bwd_bad_dtype", "x_dtype")]:
            assert results[call].startswith("ValueError: dlh::group_norm_") and arg in results[call], results[call]
        assert results["gn_fwd_empty"] == "ok"
        assert results["gn_ws"].startswith("ok ") and int(results["gn_ws"].split()[1]) > 0

    if "conv" in results:
        # the tensor-core path asks the device's compute capability first (no device: that fails)
        assert results["conv"].startswith("RuntimeError: dlh::conv2d_fwd: "), results["conv"]
        for call in ("conv_f32", "conv_dw"):  # fp32 and depthwise take the CUDA-core kernel
            assert results[call].startswith("RuntimeError: dlh::conv2d_direct_kernel: "), results[call]
        for call, arg in [("conv_bad_OH", "OH must be"), ("conv_bad_OW", "OW must be"),
                          ("conv_bad_groups", "groups must divide C"), ("conv_bad_groups_K", "groups must divide K"),
                          ("conv_bad_act", "activation"), ("conv_bad_dtype", "dtype"),
                          ("conv_bad_stride", "stride_h"), ("conv_null_x", "x is required"),
                          ("conv_null_w", "w is required")]:
            assert results[call].startswith("ValueError: dlh::conv2d_fwd: ") and arg in results[call], results[call]
        assert results["conv_empty"] == "ok"


# ---------------------------------------------------------------------------------------------
# csrc/layer_norm.cu against a float64 reference, through the raw interface, on shapes chosen to
# reach every kernel path. Run two ways: on a GPU (marked `gpu`), and on the CPU through the
# CUDA emulation (tests/cuda_emu), so that machines without GPUs still execute the kernels' index
# math, masks, reductions, tile partials and row batches, under its checks.

CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
# max |out - ref| / max(1, max |ref|): fp32 math everywhere, so the output rounding dominates
TOL = {torch.float32: 1e-4, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def _reference(x, res, w, b, dy, dh, eps, rms):
    """float64 forward and backward from the same rounded inputs (w, b: None means absent)."""
    h = (x.double() + res.double()).to(x.dtype) if res is not None else x
    hd = h.double().requires_grad_()
    wd = (w.double() if w is not None else torch.ones(h.shape[-1], dtype=torch.float64,
                                                      device=h.device)).requires_grad_()
    bd = b.double().requires_grad_() if b is not None else None
    if rms:
        y = hd * torch.rsqrt(hd.pow(2).mean(-1, keepdim=True) + eps) * wd
    else:
        y = torch.nn.functional.layer_norm(hd, (hd.shape[-1],), wd, bd, eps)
    y.backward(dy.double())
    dx = hd.grad + (dh.double() if dh is not None else 0)
    return h, y.detach(), dx, wd.grad, (bd.grad if bd is not None else None)


def _err(out, ref):
    ref = ref.double()
    return ((out.double() - ref).abs().max() / max(1.0, ref.abs().max().item())).item()


def _rel_err(out, ref):
    ref = ref.double()
    return ((out.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def _check_norm(ext, device, sms, M, N, dtype, w_dtype, residual, rms, row_pad, weight=True):
    """Runs norm_fwd and norm_bwd (twice) of `ext` on one case and checks every output."""
    g = torch.Generator(device=device).manual_seed(M * 7919 + N)

    def rows(scale=1.0, offset=0.0):  # (M, N) view with row stride N + row_pad
        t = torch.randn(M, N + row_pad, device=device, generator=g) * scale + offset
        return t.to(dtype)[:, :N]

    # A mean far from 0 exposes E[x^2] - E[x]^2 variance formulas; a ramp along the row gives
    # every tile of a split row its own mean, which the tile combination must account for.
    x = rows(2.0, 3.0 + torch.linspace(-2.0, 2.0, N + row_pad, device=device))
    res = rows() if residual else None
    w = (torch.rand(N, device=device, generator=g) + 0.5).to(w_dtype) if weight else None
    b = None if rms else torch.randn(N, device=device, generator=g).to(w_dtype)
    dy, dh = rows(), (rows() if residual else None)
    eps = 1e-5

    def ptr(t):
        return 0 if t is None else t.data_ptr()

    def nans(*shape, dtype=torch.float32):  # unwritten outputs stay NaN and fail the checks
        return torch.full(shape, float("nan"), device=device, dtype=dtype)

    y, h = nans(M, N, dtype=dtype), (nans(M, N, dtype=dtype) if residual else None)
    mean, rstd = nans(M), nans(M)
    ws = nans(ext.norm_fwd_workspace(M, N, sms) // 4 + 4)  # kept alive until the kernels ran
    ext.norm_fwd(x=x.data_ptr(), res=ptr(res), w=ptr(w), b=ptr(b), y=y.data_ptr(), h=ptr(h),
                 mean=mean.data_ptr(), rstd=rstd.data_ptr(),
                 workspace=ws.data_ptr(),
                 M=M, N=N, stride_x=x.stride(0), stride_res=res.stride(0) if residual else 0,
                 stride_y=y.stride(0), stride_h=h.stride(0) if residual else 0, eps=eps, rms=rms,
                 x_dtype=CODE[dtype], w_dtype=CODE[w_dtype], sm_count=sms)

    h_ref, y_ref, dx_ref, dw_ref, db_ref = _reference(x, res, w, b, dy, dh, eps, rms)
    if residual:
        assert torch.equal(h, h_ref), "h must be x + res rounded exactly like eager"
    assert _err(y, y_ref) <= TOL[dtype], "y"
    hd = h_ref.double()
    mean_ref = torch.zeros(M, device=device, dtype=torch.float64) if rms else hd.mean(-1)
    var_ref = hd.pow(2).mean(-1) if rms else hd.var(-1, unbiased=False)
    assert _err(mean, mean_ref) <= 2e-6, "mean"
    assert _rel_err(rstd, torch.rsqrt(var_ref + eps)) <= 1e-5, "rstd"

    grads = []
    for _ in range(2):  # twice: dw/db must be bitwise reproducible
        dx, dw, db = nans(M, N, dtype=dtype), nans(N), (None if rms else nans(N))
        ws = nans(ext.norm_bwd_workspace(M, N, sms) // 4 + 4)
        ext.norm_bwd(dy=dy.data_ptr(), h=h_ref.data_ptr(), w=ptr(w), mean=0 if rms else mean.data_ptr(),
                     rstd=rstd.data_ptr(), dh_out=ptr(dh), dx=dx.data_ptr(), dw=dw.data_ptr(),
                     db=ptr(db), workspace=ws.data_ptr(),
                     M=M, N=N, stride_dy=dy.stride(0), stride_h=h_ref.stride(0),
                     stride_dh=dh.stride(0) if residual else 0, stride_dx=dx.stride(0), rms=rms,
                     x_dtype=CODE[dtype], w_dtype=CODE[w_dtype], sm_count=sms)
        grads.append((dx, dw, db))
    (dx, dw, db), (_, dw2, db2) = grads
    assert _err(dx, dx_ref) <= TOL[dtype], "dx"
    # dw, db: fp32 sums over M rows of the same rounded inputs, relative to their own scale
    assert _rel_err(dw, dw_ref) <= 1e-4 and torch.equal(dw, dw2), "dw"
    if db is not None:
        assert _rel_err(db, db_ref) <= 1e-4 and torch.equal(db, db2), "db"


# (M, N, dtype, w_dtype, residual, rms, row_pad): why this case (sm_count 132, an H100)
GPU_CASES = [
    (7, 64, torch.float32, torch.float32, False, False, 0),          # warp per row, lanes idle
    (33, 1000, torch.float16, torch.float32, True, False, 0),        # warp per row, 32 per lane
    (9, 1024, torch.bfloat16, torch.bfloat16, False, True, 0),       # warp path's longest row
    (37, 4097, torch.float16, torch.float16, True, False, 0),        # odd N: scalar fallback
    (64, 4096, torch.bfloat16, torch.float32, True, True, 8),        # block per row, padded rows
    (130, 12288, torch.float32, torch.float32, False, False, 0),     # 32 per thread; bwd splits
    (3, 20000, torch.bfloat16, torch.bfloat16, True, False, 0),      # few rows: forward splits
    (8, 131072, torch.float32, torch.float32, False, False, 0),      # long rows, split both ways
    (40, 131072, torch.float16, torch.float32, True, True, 0),       # split, several row batches
    (2, 262147, torch.float32, torch.float32, False, False, 4),      # split, ragged last tile
    (4096, 8192, torch.bfloat16, torch.bfloat16, True, False, 0),    # many rows per dw group
]


class _GpuExt:
    """dlh_kernels._C with this device's stream filled in."""

    def __init__(self, C):
        self.C, self.stream = C, torch.cuda.current_stream().cuda_stream
        self.norm_fwd_workspace, self.norm_bwd_workspace = C.norm_fwd_workspace, C.norm_bwd_workspace

    def norm_fwd(self, **kw):
        self.C.norm_fwd(**kw, stream=self.stream)

    def norm_bwd(self, **kw):
        self.C.norm_bwd(**kw, stream=self.stream)
        torch.cuda.synchronize()

    def gelu_bwd_workspace(self, M, N, sms):
        return self.C.gelu_bwd_workspace(M, N, sms)

    def gelu_fwd(self, **kw):
        self.C.gelu_fwd(**kw, stream=self.stream)

    def gelu_bwd(self, **kw):
        self.C.gelu_bwd(**kw, stream=self.stream)
        torch.cuda.synchronize()

    def geglu_fwd(self, **kw):
        self.C.geglu_fwd(**kw, stream=self.stream)

    def geglu_bwd(self, **kw):
        self.C.geglu_bwd(**kw, stream=self.stream)
        torch.cuda.synchronize()


@pytest.mark.gpu
@pytest.mark.parametrize("M,N,dtype,w_dtype,residual,rms,row_pad", GPU_CASES)
def test_gpu_norm_paths_against_float64(M, N, dtype, w_dtype, residual, rms, row_pad):
    C, err = _import_ext()
    if C is None:
        pytest.skip(f"dlh_kernels._C is not built ({err})")
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    _check_norm(_GpuExt(C), torch.device("cuda"), sms, M, N, dtype, w_dtype, residual, rms, row_pad)


# ---- the same checks on the CPU, through the strict CUDA emulation of tests/cuda_emu (one
# std::thread per CUDA thread, asynchronous cp.async, bounded shared memory, alignment, race,
# shuffle-mask and launch checks: any violation fails the call). Host arithmetic differs from the
# GPU's only in FMA contraction and rsqrtf rounding.

EMU_NORM_EXPORTS = r"""
EMU_EXPORT long long emu_fwd_ws(long long M, long long N, int sm) { return dlh::norm_fwd_workspace(M, N, sm); }
EMU_EXPORT long long emu_bwd_ws(long long M, long long N, int sm) { return dlh::norm_bwd_workspace(M, N, sm); }
"""
EMU_NORM_ENTRIES = [("norm_fwd", "NormFwdArgs"), ("norm_bwd", "NormBwdArgs")]
EMU_BATCH_ELEMS = 40000  # row batches of the split paths after 40k elements instead of 2M
EMU_NORM_DEFINES = [f"-DDLH_TEST_SPLIT_BATCH_ELEMS={EMU_BATCH_ELEMS}"]


def _build_emulated(cu_name, entries, extra_exports="", defines=(), min_launches=3, source=None):
    """csrc/<cu_name> (or `source`, a mutated copy of its text) under the emulation: a
    cuda_emu.Library (skips the test where the emulation cannot be built)."""
    reason = cuda_emu.unavailable()
    if reason:
        pytest.skip(reason)
    return cuda_emu.build(cu_name, entries, extra_exports, defines, min_launches, source)


class _EmulatedExt:
    """The dlh_kernels._C layer-norm interface over the CPU-emulated kernels (ctypes)."""

    def __init__(self, lib):
        import ctypes

        U, I = ctypes.c_uint64, ctypes.c_int64  # noqa: E741
        tail = [("x_dtype", ctypes.c_int), ("w_dtype", ctypes.c_int), ("sm_count", ctypes.c_int),
                ("stream", U)]

        class Fwd(ctypes.Structure):  # mirrors dlh::NormFwdArgs
            _fields_ = ([(n, U) for n in "x res w b y h mean rstd workspace".split()]
                        + [(n, I) for n in "M N stride_x stride_res stride_y stride_h".split()]
                        + [("eps", ctypes.c_float), ("rms", ctypes.c_bool)] + tail)

        class Bwd(ctypes.Structure):  # mirrors dlh::NormBwdArgs
            _fields_ = ([(n, U) for n in "dy h w mean rstd dh_out dx dw db workspace".split()]
                        + [(n, I) for n in "M N stride_dy stride_h stride_dh stride_dx".split()]
                        + [("rms", ctypes.c_bool)] + tail)

        ws = [ctypes.c_longlong, ctypes.c_longlong, ctypes.c_int]
        self.fwd_ws = lib.function("emu_fwd_ws", ctypes.c_longlong, ws)
        self.bwd_ws = lib.function("emu_bwd_ws", ctypes.c_longlong, ws)
        self.lib, self.Fwd, self.Bwd = lib, Fwd, Bwd

    def norm_fwd_workspace(self, M, N, sms):
        return self.fwd_ws(M, N, sms)

    def norm_bwd_workspace(self, M, N, sms):
        return self.bwd_ws(M, N, sms)

    def norm_fwd(self, **kw):
        self.lib.run("norm_fwd", self.Fwd(**kw, stream=0))

    def norm_bwd(self, **kw):
        self.lib.run("norm_bwd", self.Bwd(**kw, stream=0))


@pytest.fixture(scope="module")
def emulated():
    return _EmulatedExt(_build_emulated("layer_norm.cu", EMU_NORM_ENTRIES, EMU_NORM_EXPORTS, EMU_NORM_DEFINES))


# (M, N, dtype, w_dtype, residual, rms, row_pad, sm_count, weight): the path each one reaches
EMULATED_CASES = [
    (7, 64, torch.float32, torch.float32, False, False, 0, 132, True),     # warp/row, 4 rows/block
    (9, 1000, torch.float16, torch.float32, True, False, 0, 132, False),   # warp/row, no weight
    (5, 4097, torch.float16, torch.float16, True, False, 0, 132, True),    # block/row, scalar path
    (6, 2048, torch.bfloat16, torch.float32, True, True, 8, 132, True),    # block/row, padded rows
    (3, 20000, torch.bfloat16, torch.bfloat16, True, False, 0, 132, True),  # split, 1 dw group
    (12, 9000, torch.float32, torch.float32, False, False, 2, 8, True),    # bwd split, 2 groups,
                                                                           # 3 row batches
    (2, 40000, torch.float32, torch.float32, False, True, 0, 132, True),   # fwd split by length
]


@needs_nvcc
@pytest.mark.parametrize("M,N,dtype,w_dtype,residual,rms,row_pad,sms,weight", EMULATED_CASES)
def test_norm_kernels_emulated_on_cpu(emulated, M, N, dtype, w_dtype, residual, rms, row_pad, sms, weight):
    _check_norm(emulated, torch.device("cpu"), sms, M, N, dtype, w_dtype, residual, rms, row_pad, weight)


# ---------------------------------------------------------------------------------------------
# (e) csrc/gelu.cu against float64, through the raw interface: GELU with an optional bias (in the
# input dtype or fp32) and dbias, and GeGLU; on a GPU (marked `gpu`) and on the CPU emulation.
# Every output lives in a NaN-filled buffer larger than its view (row padding, an offset start):
# the view must come back finite and everything around it still NaN.

def _ptr(t):
    return 0 if t is None else t.data_ptr()


def _rows(device, g, M, N, ld, dtype, scale=1.0, offset=0, fill=None):
    """An (M, N) view with row stride ld, starting `offset` elements into its storage; and the storage."""
    n = M * ld + offset
    if fill is None:
        buf = (torch.randn(n, device=device, generator=g) * scale).to(dtype)
    else:
        buf = torch.full((n,), fill, device=device, dtype=dtype)
    return buf[offset:].view(M, ld)[:, :N], buf


def _written_exactly(buf, view):
    """The view is all finite and every other element of its NaN-filled storage is still NaN."""
    return bool(torch.isfinite(view).all()) and torch.isnan(buf).sum().item() == buf.numel() - view.numel()


def _gelu64(h, tanh):
    return torch.nn.functional.gelu(h, approximate="tanh" if tanh else "none")


def _check_gelu(ext, device, sms, M, N, dtype, bias_dtype, tanh, row_pad, offset):
    """gelu_fwd, then gelu_bwd without dbias (elementwise kernel) and with it (dbias kernel, twice)."""
    g = torch.Generator(device=device).manual_seed(M * 7919 + N)
    ld, nan = N + row_pad, float("nan")
    x, _ = _rows(device, g, M, N, ld, dtype, 3.0, offset)  # |x| up to ~12: both tails of erf / tanh
    dy, _ = _rows(device, g, M, N, ld, dtype, 1.0, offset)
    bias = None if bias_dtype is None else torch.randn(N, device=device, generator=g).to(bias_dtype)
    # The reference adds the bias in float64: the kernels add it in fp32, unrounded.
    hd = (x.double() + (bias.double() if bias is not None else 0.0)).requires_grad_()
    y_ref = _gelu64(hd, tanh)
    y_ref.backward(dy.double())
    dx_ref = hd.grad
    common = dict(M=M, N=N, tanh=tanh, x_dtype=CODE[dtype],
                  bias_dtype=CODE[bias_dtype] if bias is not None else 0)

    y, y_buf = _rows(device, g, M, N, ld, dtype, offset=offset, fill=nan)
    ext.gelu_fwd(x=x.data_ptr(), bias=_ptr(bias), y=y.data_ptr(), stride_x=ld, stride_y=ld, **common)
    assert _written_exactly(y_buf, y), "gelu_fwd: y not written exactly"
    assert _err(y, y_ref) <= TOL[dtype], "gelu_fwd: y"

    ws = torch.full((ext.gelu_bwd_workspace(M, N, sms) // 4 + 4,), nan, device=device)
    dbias = []
    for with_dbias in (False, True, True):  # twice with dbias: it must be bitwise reproducible
        dx, dx_buf = _rows(device, g, M, N, ld, dtype, offset=offset, fill=nan)
        db = torch.full((N,), nan, device=device) if with_dbias else None
        ext.gelu_bwd(dy=dy.data_ptr(), x=x.data_ptr(), bias=_ptr(bias), dx=dx.data_ptr(), dbias=_ptr(db),
                     workspace=ws.data_ptr(), stride_dy=ld, stride_x=ld, stride_dx=ld, sm_count=sms, **common)
        assert _written_exactly(dx_buf, dx), f"gelu_bwd (dbias={with_dbias}): dx not written exactly"
        assert _err(dx, dx_ref) <= TOL[dtype], f"gelu_bwd (dbias={with_dbias}): dx"
        if with_dbias:
            dbias.append(db)
    # dbias: fp32 sums over M rows of the unrounded dx, relative to their own scale
    assert _rel_err(dbias[0], dx_ref.sum(0)) <= 1e-4, "gelu_bwd: dbias"
    assert torch.equal(dbias[0], dbias[1]), "gelu_bwd: dbias is not reproducible"


def _check_geglu(ext, device, M, H, dtype, tanh, row_pad):
    g = torch.Generator(device=device).manual_seed(M * 7919 + H)
    nan = float("nan")
    ld_x, ld_y = 2 * H + row_pad, H + row_pad
    x, _ = _rows(device, g, M, 2 * H, ld_x, dtype, 3.0)
    dy, _ = _rows(device, g, M, H, ld_y, dtype)
    xd = x.double().requires_grad_()
    a, gate = xd.chunk(2, -1)
    y_ref = a * _gelu64(gate, tanh)
    y_ref.backward(dy.double())
    common = dict(M=M, H=H, tanh=tanh, dtype=CODE[dtype])

    y, y_buf = _rows(device, g, M, H, ld_y, dtype, fill=nan)
    ext.geglu_fwd(x=x.data_ptr(), y=y.data_ptr(), stride_x=ld_x, stride_y=ld_y, **common)
    assert _written_exactly(y_buf, y), "geglu_fwd: y not written exactly"
    assert _err(y, y_ref) <= TOL[dtype], "geglu_fwd: y"

    dx, dx_buf = _rows(device, g, M, 2 * H, ld_x, dtype, fill=nan)
    ext.geglu_bwd(dy=dy.data_ptr(), x=x.data_ptr(), dx=dx.data_ptr(), stride_dy=ld_y, stride_x=ld_x,
                  stride_dx=ld_x, **common)
    assert _written_exactly(dx_buf, dx), "geglu_bwd: dx not written exactly"
    assert _err(dx[:, :H], xd.grad[:, :H]) <= TOL[dtype], "geglu_bwd: da"
    assert _err(dx[:, H:], xd.grad[:, H:]) <= TOL[dtype], "geglu_bwd: dg"


def _check_gelu_in_place(ext, device, sms):
    """y = x and dx = dy (the same storage) are allowed: each element is read before it is written."""
    g = torch.Generator(device=device).manual_seed(11)
    x = (torch.randn(3001, device=device, generator=g) * 3).to(torch.bfloat16)
    dy = torch.randn(3001, device=device, generator=g).to(torch.bfloat16)
    hd = x.double().requires_grad_()
    _gelu64(hd, False).backward(dy.double())
    y = x.clone()
    ext.gelu_fwd(x=y.data_ptr(), bias=0, y=y.data_ptr(), M=1, N=3001, stride_x=3001, stride_y=3001,
                 tanh=False, x_dtype=2, bias_dtype=0)
    assert _err(y, _gelu64(x.double(), False)) <= TOL[torch.bfloat16]
    dx = dy.clone()
    ext.gelu_bwd(dy=dx.data_ptr(), x=x.data_ptr(), bias=0, dx=dx.data_ptr(), dbias=0, workspace=0, M=1,
                 N=3001, stride_dy=3001, stride_x=3001, stride_dx=3001, tanh=False, x_dtype=2, bias_dtype=0,
                 sm_count=sms)
    assert _err(dx, hd.grad) <= TOL[torch.bfloat16]


F16, BF16, F32 = torch.float16, torch.bfloat16, torch.float32

# (M, N, dtype, bias_dtype, tanh, row_pad, offset): why this case (sm_count of this GPU)
GPU_GELU_CASES = [
    (8192, 3072, BF16, BF16, False, 0, 0),     # GPT-2 MLP shape: vectors, in-dtype bias, dbias partials
    (4096, 4096, F16, F32, True, 0, 0),        # fp32 bias on fp16 (two 16-byte bias packs per group)
    (37, 4097, F16, None, False, 0, 0),        # odd N: contiguous rows run as one vectorised row
    (1, (1 << 24) + 3, F32, None, True, 0, 5),  # flat tensor, offset view: scalar head, then vectors
    (1000, 50257, BF16, F32, False, 7, 0),     # vocabulary-sized rows padded to 50264: ragged tails
    (3, 100, F32, F32, True, 3, 1),            # nothing aligned: the scalar path
    (65, 8, F16, F16, False, 0, 0),            # one group per row, 32 rows per block
    (100000, 64, BF16, BF16, True, 0, 0),      # many tiny rows: dbias over many row groups
]
# (M, H, dtype, tanh, row_pad)
GPU_GEGLU_CASES = [
    (8192, 4096, BF16, False, 0),              # a typical FFN: vectors
    (333, 1000, F16, True, 8),                 # padded rows
    (17, 4099, F32, False, 0),                 # odd H: g is misaligned against a, scalar path
    (1, 123457, F16, True, 0),                 # one long row
]


def _gpu_ext():
    C, err = _import_ext()
    if C is None:
        pytest.skip(f"dlh_kernels._C is not built ({err})")
    return _GpuExt(C), torch.cuda.get_device_properties(0).multi_processor_count


@pytest.mark.gpu
@pytest.mark.parametrize("M,N,dtype,bias_dtype,tanh,row_pad,offset", GPU_GELU_CASES)
def test_gpu_gelu_against_float64(M, N, dtype, bias_dtype, tanh, row_pad, offset):
    ext, sms = _gpu_ext()
    _check_gelu(ext, torch.device("cuda"), sms, M, N, dtype, bias_dtype, tanh, row_pad, offset)


@pytest.mark.gpu
@pytest.mark.parametrize("M,H,dtype,tanh,row_pad", GPU_GEGLU_CASES)
def test_gpu_geglu_against_float64(M, H, dtype, tanh, row_pad):
    ext, _ = _gpu_ext()
    _check_geglu(ext, torch.device("cuda"), M, H, dtype, tanh, row_pad)


@pytest.mark.gpu
def test_gpu_gelu_in_place():
    ext, sms = _gpu_ext()
    _check_gelu_in_place(ext, torch.device("cuda"), sms)


@pytest.mark.gpu
def test_gpu_gelu_past_2_31_elements():
    """64-bit offsets: one flat row of 2^31 + 37 elements, then 65537 rows of 32776 with dbias."""
    ext, sms = _gpu_ext()
    if torch.cuda.get_device_properties(0).total_memory < 24 << 30:
        pytest.skip("needs ~20 GB of GPU memory")
    dev, nan = torch.device("cuda"), float("nan")
    N = (1 << 31) + 37
    x = torch.empty(N, dtype=F16, device=dev).uniform_(-6, 6)
    y = torch.full_like(x, nan)
    ext.gelu_fwd(x=x.data_ptr(), bias=0, y=y.data_ptr(), M=1, N=N, stride_x=N, stride_y=N, tanh=False,
                 x_dtype=CODE[F16], bias_dtype=0)
    torch.cuda.synchronize()
    assert not torch.isnan(y).any()
    for start in (0, (1 << 31) - 4096, N - 4096):  # the windows a 32-bit index would get wrong
        window = slice(start, start + 4096)
        assert _err(y[window], _gelu64(x[window].double(), False)) <= TOL[F16], start
    del x, y

    M, N = (1 << 16) + 1, (1 << 15) + 8
    x = torch.empty(M, N, dtype=BF16, device=dev).uniform_(-6, 6)
    dy = torch.empty(M, N, dtype=BF16, device=dev).uniform_(-1, 1)
    bias = torch.randn(N, device=dev)
    dx, db = torch.full_like(x, nan), torch.full((N,), nan, device=dev)
    ws = torch.empty(ext.gelu_bwd_workspace(M, N, sms) // 4 + 4, device=dev)
    ext.gelu_bwd(dy=dy.data_ptr(), x=x.data_ptr(), bias=bias.data_ptr(), dx=dx.data_ptr(), dbias=db.data_ptr(),
                 workspace=ws.data_ptr(), M=M, N=N, stride_dy=N, stride_x=N, stride_dx=N, tanh=True,
                 x_dtype=CODE[BF16], bias_dtype=CODE[F32], sm_count=sms)
    assert not torch.isnan(dx).any()
    db_ref = torch.zeros(N, dtype=torch.float64, device=dev)
    for r0 in range(0, M, 4096):
        hd = (x[r0:r0 + 4096].double() + bias.double()).requires_grad_()
        _gelu64(hd, True).backward(dy[r0:r0 + 4096].double())
        db_ref += hd.grad.sum(0)
        if r0 in (0, M - 1 - (M - 1) % 4096):  # first and last rows
            assert _err(dx[r0:r0 + 4096], hd.grad) <= TOL[BF16], r0
    assert _rel_err(db, db_ref) <= 1e-4


# ---- the same on the CPU emulation ------------------------------------------------------------
EMU_GELU_ENTRIES = [("gelu_fwd", "GeluFwdArgs"), ("gelu_bwd", "GeluBwdArgs"), ("geglu_fwd", "GegluFwdArgs"),
                    ("geglu_bwd", "GegluBwdArgs")]
EMU_GELU_EXPORTS = r"""
EMU_EXPORT long long emu_gelu_bwd_ws(long long M, long long N, int sm) { return dlh::gelu_bwd_workspace(M, N, sm); }
"""


class _EmulatedGeluExt:
    """The dlh_kernels._C GELU interface over the CPU-emulated kernels (ctypes)."""

    def __init__(self, lib):
        import ctypes

        def args(pointers, sizes, ints):  # mirrors the dlh::*Args structs of common.cuh
            fields = ([(n, ctypes.c_uint64) for n in pointers.split()]
                      + [(n, ctypes.c_int64) for n in sizes.split()] + [("tanh", ctypes.c_bool)]
                      + [(n, ctypes.c_int) for n in ints.split()] + [("stream", ctypes.c_uint64)])
            return type("Args", (ctypes.Structure,), {"_fields_": fields})

        self.args = {
            "gelu_fwd": args("x bias y", "M N stride_x stride_y", "x_dtype bias_dtype"),
            "gelu_bwd": args("dy x bias dx dbias workspace", "M N stride_dy stride_x stride_dx",
                             "x_dtype bias_dtype sm_count"),
            "geglu_fwd": args("x y", "M H stride_x stride_y", "dtype"),
            "geglu_bwd": args("dy x dx", "M H stride_dy stride_x stride_dx", "dtype"),
        }
        self.ws = lib.function("emu_gelu_bwd_ws", ctypes.c_longlong,
                               [ctypes.c_longlong, ctypes.c_longlong, ctypes.c_int])
        self.lib = lib
        self.vector_accesses = {}  # entry point -> 16-byte accesses so far (misaligned ones: violations)

    def _call(self, name, kw):
        before = self.lib.totals["vector_accesses"]
        try:
            self.lib.run(name, self.args[name](**kw, stream=0))
        finally:
            count = self.lib.totals["vector_accesses"] - before
            self.vector_accesses[name] = self.vector_accesses.get(name, 0) + count

    def gelu_bwd_workspace(self, M, N, sms):
        return self.ws(M, N, sms)

    def gelu_fwd(self, **kw):
        self._call("gelu_fwd", kw)

    def gelu_bwd(self, **kw):
        self._call("gelu_bwd", kw)

    def geglu_fwd(self, **kw):
        self._call("geglu_fwd", kw)

    def geglu_bwd(self, **kw):
        self._call("geglu_bwd", kw)


@pytest.fixture(scope="module")
def emulated_gelu():
    return _EmulatedGeluExt(_build_emulated("gelu.cu", EMU_GELU_ENTRIES, EMU_GELU_EXPORTS,
                                            ["-DDLH_TEST_VECTOR_ACCESS=emu_vector_access"]))


# The emulated GPU has 3 SMs holding one block each: grids of <= 3 blocks (gelu_bwd: sm_count),
# so every grid-stride loop runs many rounds. Every 16-byte access is checked for alignment, and
# `vec` says whether the layout must take the vector path (True) or the scalar one (False).
# (M, N, dtype, bias_dtype, tanh, row_pad, offset, sms, vec)
EMULATED_GELU_CASES = [
    (37, 4097, F16, None, False, 0, 0, 2, True),   # odd N, contiguous: one row of 151589 in vectors;
                                                   # dbias: rows of odd stride, scalar, 1 group
    (6, 1007, BF16, F32, True, 1, 0, 2, True),     # N % 8 == 7, rows padded to 1008: ragged tails;
                                                   # fp32 bias on bf16 (two packs per group)
    (5, 300, F32, F32, False, 4, 0, 2, True),      # fp32 groups of 4, padded rows
    (1, 20011, F16, None, True, 0, 3, 2, True),    # M = 1 flat, prime N, 3 elements into its
                                                   # storage: scalar head of 5, then vectors
    (200, 40, BF16, None, False, 0, 3, 2, True),   # short rows, 8 rows per block, an offset start
                                                   # (pad 3, vectors); dbias: 4 row groups
    (130, 72, F16, F16, True, 0, 0, 2, True),      # in-dtype fp16 bias; dbias: 3 row groups
    (3, 50, F32, None, True, 3, 1, 2, False),      # rows of stride 53 from an odd start: scalar
    (1, 5000, BF16, F32, False, 0, 0, 4, True),    # M = 1 with bias: dbias written directly
]
# (M, H, dtype, tanh, row_pad, vec)
EMULATED_GEGLU_CASES = [
    (9, 264, F16, False, 0, True),                 # H % 8 == 0: vectors
    (7, 100, BF16, True, 6, False),                # H % 8 == 4: g misaligned against a, scalar
    (4, 96, F32, True, 4, True),                   # fp32 vectors, padded rows
    (1, 4099, F16, False, 0, False),               # one row, odd H: scalar
]


@needs_nvcc
@pytest.mark.parametrize("M,N,dtype,bias_dtype,tanh,row_pad,offset,sms,vec", EMULATED_GELU_CASES)
def test_gelu_kernels_emulated_on_cpu(emulated_gelu, M, N, dtype, bias_dtype, tanh, row_pad, offset, sms, vec):
    emulated_gelu.vector_accesses.clear()
    _check_gelu(emulated_gelu, torch.device("cpu"), sms, M, N, dtype, bias_dtype, tanh, row_pad, offset)
    for fn in ("gelu_fwd", "gelu_bwd"):
        assert (emulated_gelu.vector_accesses[fn] > 0) == vec, (fn, emulated_gelu.vector_accesses)


@needs_nvcc
@pytest.mark.parametrize("M,H,dtype,tanh,row_pad,vec", EMULATED_GEGLU_CASES)
def test_geglu_kernels_emulated_on_cpu(emulated_gelu, M, H, dtype, tanh, row_pad, vec):
    emulated_gelu.vector_accesses.clear()
    _check_geglu(emulated_gelu, torch.device("cpu"), M, H, dtype, tanh, row_pad)
    for fn in ("geglu_fwd", "geglu_bwd"):
        assert (emulated_gelu.vector_accesses[fn] > 0) == vec, (fn, emulated_gelu.vector_accesses)


@needs_nvcc
def test_gelu_in_place_emulated_on_cpu(emulated_gelu):
    _check_gelu_in_place(emulated_gelu, torch.device("cpu"), 2)


@needs_nvcc
def test_gelu_bad_arguments_emulated(emulated_gelu):
    """Argument errors name the argument (the ValueError type itself is checked on the real module)."""
    ext = emulated_gelu
    fwd = dict(x=16, bias=0, y=32, M=2, N=8, stride_x=8, stride_y=8, tanh=False, x_dtype=1, bias_dtype=0)
    bwd = dict(dy=16, x=32, bias=0, dx=48, dbias=64, workspace=0, M=4096, N=64, stride_dy=64, stride_x=64,
               stride_dx=64, tanh=False, x_dtype=0, bias_dtype=0, sm_count=132)
    geglu = dict(dy=16, x=32, dx=48, M=2, H=8, stride_dy=8, stride_x=16, stride_dx=16, tanh=True, dtype=2)
    bad = [
        (ext.gelu_fwd, {**fwd, "x_dtype": 3}, "dlh::gelu_fwd: x_dtype"),
        (ext.gelu_fwd, {**fwd, "bias": 64, "bias_dtype": 2}, "dlh::gelu_fwd: bias_dtype"),
        (ext.gelu_fwd, {**fwd, "y": 0}, "dlh::gelu_fwd: y is required"),
        (ext.gelu_fwd, {**fwd, "M": -1}, "dlh::gelu_fwd: M must be >= 0"),
        (ext.gelu_fwd, {**fwd, "stride_y": 4}, "dlh::gelu_fwd: stride_y must be >= 8"),
        (ext.gelu_bwd, {**bwd, "sm_count": 0}, "dlh::gelu_bwd: sm_count"),
        (ext.gelu_bwd, bwd, "dlh::gelu_bwd: with dbias, this shape needs a workspace"),
        (ext.gelu_bwd, {**bwd, "x": 0}, "dlh::gelu_bwd: x is required"),
        (ext.geglu_bwd, {**geglu, "stride_dx": 8}, "dlh::geglu_bwd: stride_dx must be >= 16"),
        (ext.geglu_bwd, {**geglu, "dtype": -2}, "dlh::geglu_bwd: dtype"),
    ]
    for fn, kw, message in bad:
        with pytest.raises(RuntimeError, match=re.escape(message)):
            fn(**kw)
    fwd_geglu = {k: v for k, v in geglu.items() if k not in ("dy", "dx", "stride_dy", "stride_dx")}
    with pytest.raises(RuntimeError, match=re.escape("dlh::geglu_fwd: y is required")):
        ext.geglu_fwd(**fwd_geglu, y=0, stride_y=8)
    # Empty problems launch nothing and need no pointers.
    ext.gelu_fwd(**{**fwd, "x": 0, "y": 0, "N": 0})
    ext.gelu_bwd(**{**bwd, "dy": 0, "x": 0, "dx": 0, "M": 0})
    ext.geglu_fwd(**{**fwd_geglu, "x": 0, "y": 0, "stride_y": 8, "M": 0})


# ---------------------------------------------------------------------------------------------
# (f) csrc/diffusion_step.cu through the emulation, called by the op's own glue
# (dlh_kernels.ops.diffusion_step._cuda_step) with the emulated module standing in for
# dlh_kernels._C: every method, prediction, noise mode, timestep form and layout the glue can
# send, against the float64 torch backend; the drawn noise against the torch Philox stream.
# (On a GPU, tests/test_diffusion_step.py runs the real cuda backend the same way.)

EMU_STEP_ENTRIES = [("diffusion_step", "DiffusionStepArgs"), ("seeded_randn", "SeededRandnArgs")]


class _EmulatedStepExt:
    """dlh_kernels._C's diffusion_step and seeded_randn (same positional arguments) over the
    CPU-emulated kernels, through ctypes structures that mirror dlh::DiffusionStepArgs and
    dlh::SeededRandnArgs."""

    def __init__(self, lib):
        import ctypes

        U, I = ctypes.c_uint64, ctypes.c_int64  # noqa: E741

        class Step(ctypes.Structure):
            _fields_ = ([(n, U) for n in "x m u z out table t pt seed".split()]
                        + [(n, I) for n in "t_value pt_value seed_value t_stride pt_stride n per_batch "
                                           "n_table".split()]
                        + [("dims", I * 4), ("strides", I * 20)]
                        + [(n, ctypes.c_float) for n in ("eta", "clip_range", "guidance_scale")]
                        + [(n, ctypes.c_int) for n in ("method", "prediction", "noise_mode")]
                        + [(n, ctypes.c_bool) for n in ("clip", "guidance", "contig")]
                        + [("dtype", ctypes.c_int), ("table_f64", ctypes.c_bool), ("stream", U)])

        class Randn(ctypes.Structure):
            _fields_ = [("out", U), ("seed", U), ("seed_value", I), ("n", I), ("dtype", ctypes.c_int),
                        ("stream", U)]

        self.lib, self.Step, self.Randn = lib, Step, Randn
        self.I = I

    def diffusion_step(self, *args):
        names = [n for n, _ in self.Step._fields_]
        kw = dict(zip(names, args))
        kw["dims"] = (self.I * 4)(*kw["dims"])
        kw["strides"] = (self.I * 20)(*kw["strides"])
        self.lib.run("diffusion_step", self.Step(**kw))

    def seeded_randn(self, *args):
        self.lib.run("seeded_randn", self.Randn(*args))


@pytest.fixture(scope="module")
def emulated_step():
    return _EmulatedStepExt(_build_emulated("diffusion_step.cu", EMU_STEP_ENTRIES))


@pytest.fixture
def step_ops(emulated_step, monkeypatch):
    """dlh_kernels.ops.diffusion_step with its cuda glue routed to the emulated kernels."""
    from dlh_kernels import _ext
    from dlh_kernels.ops import diffusion_step as D
    monkeypatch.setattr(_ext, "ext", lambda: emulated_step)
    monkeypatch.setattr(_ext, "stream_handle", lambda device: 0)
    return D


# (shape, dtype, table dtype, method, prediction, eta, clip, guidance, noise, timesteps, layout)
# noise: "given", "seed" (int), "seed_tensor"; timesteps: "int" (t=500 -> 480), "per_batch"
# (tensors: first, middle and last steps of a 50-step schedule side by side), "final" (0 -> -1)
EMULATED_STEP_CASES = [
    ((2, 3, 5, 7), torch.float32, torch.float32, 0, 0, 0.0, None, None, "given", "int", "contiguous"),
    ((3, 4, 6, 6), torch.bfloat16, torch.float64, 1, 1, 0.5, 1.0, 3.0, "seed", "per_batch", "contiguous"),
    ((3, 2, 9, 5), torch.float16, torch.float32, 1, 2, 1.0, 1.5, None, "seed_tensor", "per_batch", "strided"),
    ((2, 3, 4, 4), torch.float32, torch.float32, 0, 1, 0.0, None, 7.5, "seed", "per_batch", "channels_last"),
    ((5, 33), torch.float32, torch.float64, 0, 2, 0.0, 1.0, None, "given", "final", "contiguous"),
    ((2, 3, 8), torch.float32, torch.float32, 2, 0, 0.0, None, None, None, "int", "strided"),
]


def _step_inputs(shape, dtype, layout, g):
    def make(scale=1.0):
        t = torch.randn(shape, generator=g) * scale
        if layout == "strided":  # a slice of a wider last dim, and a transposed buffer
            t = torch.cat([t, torch.randn(shape[:-1] + (3,), generator=g)], -1)[..., : shape[-1]]
        elif layout == "channels_last":
            t = t.contiguous(memory_format=torch.channels_last)
        return t.to(dtype)
    return make(), make(), make(0.5), make()


@needs_nvcc
@pytest.mark.parametrize("shape,dtype,table_dtype,method,pred,eta,clip,guidance,noise,steps,layout",
                         EMULATED_STEP_CASES)
def test_diffusion_step_emulated_on_cpu(step_ops, shape, dtype, table_dtype, method, pred, eta, clip,
                                        guidance, noise, steps, layout):
    D = step_ops
    g = torch.Generator().manual_seed(3)
    x, m, u, z = _step_inputs(shape, dtype, layout, g)
    if method == 2:  # interp: the table holds interpolation times 1 - k/16
        table = (1 - torch.arange(16, dtype=torch.float64) / 16).to(table_dtype)
    else:
        table = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0).to(table_dtype)
    t, pt = {"int": (500, 480) if method != 2 else (3, 4), "final": (0, -1),
             "per_batch": (torch.tensor([[980, 1], [500, 1], [0, 1]][: shape[0]])[:, 0],  # stride 2
                           torch.tensor([960, 480, -1][: shape[0]]))}[steps]
    seed = {"seed": 1234, "seed_tensor": torch.tensor(99), "given": None, None: None}[noise]
    zz = z if noise == "given" else None
    uu = u if guidance is not None else None
    ours, ref = torch.empty_like(x), torch.empty(x.shape, dtype=torch.float64).to(memory_format=torch.contiguous_format)
    D._STEP["cuda"](x, m, uu, zz, ours, table, t, pt, seed, method, pred, eta, clip, guidance)
    D._STEP["torch"](x, m, uu, zz, ref, table, t, pt, seed, method, pred, eta, clip, guidance)
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    scale = max(1.0, ref.abs().max().item())
    assert torch.isfinite(ours).all()
    assert (ours.double() - ref).abs().max().item() / scale <= tol
    if layout == "channels_last":
        assert ours.stride() == x.stride()


@needs_nvcc
def test_diffusion_step_invalid_timestep_emulated(step_ops):
    D = step_ops
    x = torch.randn(3, 40)
    table = torch.linspace(0.999, 0.01, 100)
    out = torch.empty_like(x)
    D._STEP["cuda"](x, x, None, None, out, table, torch.tensor([5, 100, -1]), torch.tensor([4, 3, 2]), None,
                    1, 0, 0.0, None, None)
    assert torch.isfinite(out[0]).all() and out[1:].isnan().all(), "a timestep outside the table writes NaN"


@needs_nvcc
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_seeded_randn_emulated(step_ops, dtype):
    D = step_ops
    for seed in (0, 12345, (1 << 40) + 7, torch.tensor(2 ** 33 + 5)):
        out = torch.empty(3, 1001, dtype=dtype)
        D._RANDN["cuda"](out, seed)
        ref = D.philox_randn((3, 1001), seed)
        # the same Philox words, then logf/cosf/sqrtf here vs torch's: a few ulps apart
        torch.testing.assert_close(out.float(), ref.to(dtype).float(), atol=1e-5 if dtype == torch.float32 else 2e-2,
                                   rtol=1e-5 if dtype == torch.float32 else 1e-2)


# ---------------------------------------------------------------------------------------------
# (g) csrc/group_norm.cu (GroupNorm + SiLU, forward and backward) through the op's own glue
# (dlh_kernels.ops.group_norm._cuda_fwd / _cuda_bwd: inner-layout choice, copies, workspaces)
# against float64, on layouts and sizes that reach every kernel path: spatial-inner (NCHW) and
# channels-inner (channels_last, (N, C)) groups, fused and split, several sample batches, 16-byte
# vectors and the scalar fallback. On a GPU (marked `gpu`) with the real extension; on the CPU
# with the emulated kernels standing in for dlh_kernels._C.

EMU_GN_ENTRIES = [("group_norm_fwd", "GroupNormFwdArgs"), ("group_norm_bwd", "GroupNormBwdArgs")]
EMU_GN_EXPORTS = r"""
EMU_EXPORT long long emu_group_norm_fwd_ws(long long N, long long C, long long S, long long G, bool inner,
                                           int dtype, int sm) {
  return dlh::group_norm_fwd_workspace(N, C, S, G, inner, dtype, sm);
}
EMU_EXPORT long long emu_group_norm_bwd_ws(long long N, long long C, long long S, long long G, bool inner,
                                           int dtype, int sm) {
  return dlh::group_norm_bwd_workspace(N, C, S, G, inner, dtype, sm);
}
"""
EMU_GN_BATCH_BYTES = 40000  # split-path sample batches after 40 kB of re-read data instead of 16 MB


class _EmulatedGroupNormExt:
    """dlh_kernels._C's group_norm_* (same positional arguments) over the CPU-emulated kernels,
    through ctypes structures that mirror dlh::GroupNormFwdArgs and dlh::GroupNormBwdArgs."""

    def __init__(self, lib):
        import ctypes

        U, I = ctypes.c_uint64, ctypes.c_int64  # noqa: E741
        tail = [(n, ctypes.c_int) for n in ("x_dtype", "w_dtype", "sm_count")] + [("stream", U)]

        class Fwd(ctypes.Structure):
            _fields_ = ([(n, U) for n in "x w b y mean rstd workspace".split()]
                        + [(n, I) for n in "N C S G stride_xn stride_xc stride_xs stride_yn stride_yc "
                                           "stride_ys".split()]
                        + [("eps", ctypes.c_float), ("silu", ctypes.c_bool), ("channels_inner", ctypes.c_bool)]
                        + tail)

        class Bwd(ctypes.Structure):
            _fields_ = ([(n, U) for n in "dy x w b mean rstd dx dw db workspace".split()]
                        + [(n, I) for n in "N C S G stride_dyn stride_dyc stride_dys stride_xn stride_xc "
                                           "stride_xs stride_dxn stride_dxc stride_dxs".split()]
                        + [("silu", ctypes.c_bool), ("channels_inner", ctypes.c_bool)] + tail)

        ws = [ctypes.c_longlong] * 4 + [ctypes.c_bool, ctypes.c_int, ctypes.c_int]
        self.fwd_ws = lib.function("emu_group_norm_fwd_ws", ctypes.c_longlong, ws)
        self.bwd_ws = lib.function("emu_group_norm_bwd_ws", ctypes.c_longlong, ws)
        self.lib, self.Fwd, self.Bwd = lib, Fwd, Bwd

    def group_norm_fwd_workspace(self, *args):
        return self.fwd_ws(*args)

    def group_norm_bwd_workspace(self, *args):
        return self.bwd_ws(*args)

    def group_norm_fwd(self, *args):
        self.lib.run("group_norm_fwd", self.Fwd(*args))

    def group_norm_bwd(self, *args):
        self.lib.run("group_norm_bwd", self.Bwd(*args))


@pytest.fixture(scope="module")
def emulated_gn():
    return _EmulatedGroupNormExt(_build_emulated("group_norm.cu", EMU_GN_ENTRIES, EMU_GN_EXPORTS,
                                                 [f"-DDLH_TEST_GN_BATCH_BYTES={EMU_GN_BATCH_BYTES}"]))


def _gn_layout(t, layout, g):
    if layout == "channels_last":
        return t.movedim(1, -1).contiguous().movedim(-1, 1)
    if layout == "padded":  # every sample padded: a stride_n that is not C*S (vectors stay aligned)
        return torch.cat([t, torch.randn((t.shape[0], 8) + t.shape[2:], generator=g)], 1)[:, : t.shape[1]]
    if layout == "strided":  # a spatial stride of 2 and no unit channel stride: the glue copies
        return torch.stack([t, torch.randn(t.shape, generator=g)], -1)[..., 0]
    return t


def _check_group_norm(GN, device, shape, G, dtype, w_dtype, layout, dy_layout, silu, affine=True):
    """The cuda backend's forward and backward (twice: dw/db bitwise repeatable) against float64."""
    from dlh_kernels import _alloc
    g = torch.Generator().manual_seed(sum(shape) * 31 + G)
    C = shape[1]
    # a mean far from 0 and a ramp along the last dim: each tile of a split group has its own mean
    ramp = torch.linspace(-2.0, 2.0, shape[-1]) if len(shape) > 2 else 0.0
    x = _gn_layout(torch.randn(shape, generator=g) * 2 + 3 + ramp, layout, g).to(dtype).to(device)
    dy = _gn_layout(torch.randn(shape, generator=g), dy_layout, g).to(dtype).to(device)
    w = (torch.rand(C, generator=g) + 0.5).to(w_dtype).to(device) if affine else None
    b = torch.randn(C, generator=g).to(w_dtype).to(device) if affine else None
    act = "silu" if silu else None

    xd = x.double().requires_grad_()
    wd = w.double().requires_grad_() if affine else None
    bd = b.double().requires_grad_() if affine else None
    y_ref = GN.group_norm_reference(xd, G, wd, bd, 1e-5, act)
    y_ref.backward(dy.double())
    xg = x.double().reshape(shape[0], G, -1)
    mean_ref, var_ref = xg.mean(-1).reshape(-1), xg.var(-1, unbiased=False).reshape(-1)

    _alloc.set_poison(True)  # every output starts as NaN: an unwritten element fails the checks
    try:
        y = GN._new_like(x, real=True)
        mean = torch.full((shape[0] * G,), float("nan"), device=device)
        rstd = mean.clone()
        GN._FWD["cuda"](GN._ncs(x), w, b, y.view(GN._sizes(y)), mean, rstd, G, 1e-5, silu)
        grads = []
        for _ in range(2):
            dx = GN._new_like(x, real=True)
            dw, db = GN._BWD["cuda"](GN._ncs(dy), GN._ncs(x), w, b, mean, rstd, dx.view(GN._sizes(dx)), G,
                                     silu, affine, affine)
            grads.append((dx, dw, db))
    finally:
        _alloc.set_poison(False)
    assert y.stride() == GN._new_like(x).stride(), "the output keeps the layout the fake kernel promises"
    assert _err(y, y_ref) <= TOL[dtype], "y"
    assert _err(mean, mean_ref) <= 2e-6, "mean"
    assert _rel_err(rstd, torch.rsqrt(var_ref + 1e-5)) <= 1e-5, "rstd"
    (dx, dw, db), (dx2, dw2, db2) = grads
    assert _err(dx, xd.grad) <= TOL[dtype], "dx"
    assert torch.equal(dx, dx2)
    if affine:
        # fp32 sums over N*S of the same rounded inputs, relative to their own scale
        assert _rel_err(dw, wd.grad) <= 1e-4 and torch.equal(dw, dw2), "dw"
        assert _rel_err(db, bd.grad) <= 1e-4 and torch.equal(db, db2), "db"


# (shape, G, dtype, w_dtype, layout, dy_layout, silu, affine, sm_count): the path each one reaches.
# The emulated GPU has sm_count SMs; with few groups (< sm_count/2) of >= 8192 elements the
# kernels split groups to fill it. VEC: 4 fp32, 8 fp16/bf16 elements per 16-byte vector.
EMULATED_GN_CASES = [
    ((2, 8, 4, 8), 4, F32, F32, "contiguous", "contiguous", True, True, 8),    # NCHW fused, vectors
    ((2, 6, 5, 3), 3, BF16, F32, "contiguous", "contiguous", True, True, 8),   # 5x3: scalar, fp32 w
    ((3, 16, 3, 5), 2, F16, F16, "channels_last", "channels_last", True, True, 8),  # NHWC fused,
                                                                               # Cg = 8: one vector
    ((2, 6, 4, 4), 2, F32, F32, "channels_last", "contiguous", False, True, 8),  # NHWC, Cg = 3:
                                                                               # scalar; dy copied
    ((5, 12), 3, BF16, BF16, "contiguous", "contiguous", True, False, 8),      # (N, C): channels
                                                                               # inner, no affine
    ((2, 4, 64, 64), 2, F32, F32, "contiguous", "contiguous", True, True, 16),  # NCHW split: 4
                                                                               # tiles, 2 batches
    ((1, 16, 32, 32), 2, BF16, BF16, "channels_last", "channels_last", True, True, 16),  # NHWC
                                                                               # split, 8 bwd tiles
    ((2, 8, 12, 10), 1, F16, F32, "padded", "strided", False, True, 8),        # one group, padded
                                                                               # samples, dy copied
    ((2, 4, 6, 6), 2, F32, F32, "strided", "strided", True, True, 8),          # no unit stride:
                                                                               # x copied to NCHW
    ((1, 6, 91, 91), 2, F16, F16, "contiguous", "contiguous", True, True, 16),  # NCHW split, Cg = 3,
                                                                               # 91x91: scalar
    ((1, 24, 40, 40), 2, BF16, F32, "channels_last", "channels_last", True, True, 16),  # NHWC split,
                                                                               # Cg = 12: 2 vectors
                                                                               # a row, scalar
]


@needs_nvcc
@pytest.mark.parametrize("shape,G,dtype,w_dtype,layout,dy_layout,silu,affine,sms", EMULATED_GN_CASES, ids=str)
def test_group_norm_kernels_emulated_on_cpu(emulated_gn, monkeypatch, shape, G, dtype, w_dtype, layout,
                                            dy_layout, silu, affine, sms):
    from dlh_kernels import _ext
    from dlh_kernels.ops import group_norm as GN
    monkeypatch.setattr(_ext, "ext", lambda: emulated_gn)
    monkeypatch.setattr(_ext, "stream_handle", lambda device: 0)
    monkeypatch.setattr(_ext, "sm_count", lambda index: sms)
    _check_group_norm(GN, torch.device("cpu"), shape, G, dtype, w_dtype, layout, dy_layout, silu, affine)


@needs_nvcc
def test_group_norm_bad_arguments_emulated(emulated_gn):
    """Argument errors name the argument (the ValueError type itself is checked on the real module)."""
    ext = emulated_gn
    fwd = [16, 0, 0, 32, 48, 64, 0, 2, 8, 16, 4, 128, 16, 1, 128, 16, 1, 1e-5, True, False, 0, 0, 8, 0]
    for i, value, message in [
        (8, 6, "G (num_groups) must divide C = 6"),      # C = 6, G = 4
        (10, 0, "G (num_groups) must be >= 1"),
        (20, 3, "x_dtype must be 0 (float32)"),
        (0, 0, "x is required"),
        (13, 2, "x: spatial-inner needs a spatial stride of 1, got 2"),
    ]:
        args = list(fwd)
        args[i] = value
        with pytest.raises(RuntimeError, match=re.escape(message)):
            ext.group_norm_fwd(*args)
    cols = list(fwd)
    cols[19] = True  # channels_inner, but the channel stride of x is 16
    with pytest.raises(RuntimeError, match=re.escape("x: channels_inner needs a channel stride of 1")):
        ext.group_norm_fwd(*cols)
    ext.group_norm_fwd(*(fwd[:7] + [0] + fwd[8:]))  # N = 0: nothing to do, no launch


GPU_GN_CASES = [
    ((64, 128, 32, 32), 32, BF16, BF16, "contiguous", "contiguous", True, True),    # fused, 4K groups
    ((16, 128, 64, 64), 32, BF16, F32, "channels_last", "channels_last", True, True),  # 16K: NHWC
    ((8, 512, 64, 64), 32, F16, F16, "contiguous", "contiguous", True, True),       # split, batches
    ((1, 256, 128, 128), 32, F32, F32, "channels_last", "contiguous", False, True),  # few big groups
    ((3, 96, 7, 7), 32, BF16, BF16, "contiguous", "contiguous", True, True),        # Cg = 3, 7x7
]


@pytest.mark.gpu
@pytest.mark.parametrize("shape,G,dtype,w_dtype,layout,dy_layout,silu,affine", GPU_GN_CASES, ids=str)
def test_gpu_group_norm_against_float64(shape, G, dtype, w_dtype, layout, dy_layout, silu, affine):
    C, err = _import_ext()
    if C is None or not hasattr(C, "group_norm_fwd"):
        pytest.skip(f"dlh_kernels._C is not built with group_norm ({err})")
    from dlh_kernels.ops import group_norm as GN
    _check_group_norm(GN, torch.device("cuda"), shape, G, dtype, w_dtype, layout, dy_layout, silu, affine)
    torch.cuda.synchronize()


# ---------------------------------------------------------------------------------------------
# (h) csrc/conv2d.cu: y = act(conv2d(x, w) + bias), NHWC, through the raw interface, against
# float64 F.conv2d on the same rounded inputs. y lives in a NaN-filled buffer longer than y: it
# must come back finite and the tail still NaN. On a GPU (marked `gpu`): the tensor-core implicit
# GEMM (fp16/bf16, 16-byte cp.async when C/groups % 8 == 0, scalar gather otherwise) and the
# CUDA-core direct kernel (fp32, depthwise). On the CPU emulation: the direct kernel forced for
# every dtype (DLH_TEST_CONV_DIRECT_ONLY), with a 3-block grid so its grid-stride loop turns, and
# (below) the tensor-core kernel.

_CONV_ACTS = {
    0: lambda t, a: t,
    1: lambda t, a: torch.relu(t),
    2: lambda t, a: torch.nn.functional.silu(t),
    3: lambda t, a: torch.nn.functional.gelu(t),
    4: lambda t, a: torch.nn.functional.gelu(t, approximate="tanh"),
    5: lambda t, a: torch.nn.functional.leaky_relu(t, a),
}


def _check_conv2d(conv2d_fwd, device, N, H, W, C, K, R, S, stride, pad, dil, groups, dtype, act, bias):
    g = torch.Generator(device=device).manual_seed(N * 7919 + H * 31 + C * 7 + K)
    cg = C // groups
    x = torch.randn(N, H, W, C, device=device, generator=g).to(dtype)
    w = (torch.randn(K, R, S, cg, device=device, generator=g) / (R * S * cg) ** 0.5).to(dtype)
    b = torch.randn(K, device=device, generator=g).to(dtype) if bias else None
    slope = 0.2
    OH = (H + 2 * pad[0] - dil[0] * (R - 1) - 1) // stride[0] + 1
    OW = (W + 2 * pad[1] - dil[1] * (S - 1) - 1) // stride[1] + 1
    ref = torch.nn.functional.conv2d(x.double().permute(0, 3, 1, 2), w.double().permute(0, 3, 1, 2),
                                     b.double() if b is not None else None, stride, pad, dil, groups)
    ref = _CONV_ACTS[act](ref, slope).permute(0, 2, 3, 1)
    numel = N * OH * OW * K
    y_buf = torch.full((numel + 40,), float("nan"), device=device, dtype=dtype)
    y = y_buf[:numel].view(N, OH, OW, K)
    conv2d_fwd(x=x.data_ptr(), w=w.data_ptr(), bias=_ptr(b), y=y.data_ptr(), N=N, H=H, W=W, C=C, K=K, R=R, S=S,
               OH=OH, OW=OW, stride_h=stride[0], stride_w=stride[1], pad_h=pad[0], pad_w=pad[1], dil_h=dil[0],
               dil_w=dil[1], groups=groups, activation=act, negative_slope=slope, dtype=CODE[dtype])
    assert _written_exactly(y_buf, y), "conv2d_fwd: y not written exactly"
    assert _err(y, ref) <= TOL[dtype], f"conv2d_fwd: y (err {_err(y, ref):.2e})"


# (N, H, W, C, K, R, S, stride, pad, dil, groups, dtype, activation, bias): the path each reaches
GPU_CONV_CASES = [
    (2, 28, 28, 1, 16, 5, 5, (1, 1), (2, 2), (1, 1), 1, F16, 1, True),      # 1 -> 16 5x5: TC, scalar gather
    (2, 28, 28, 1, 16, 5, 5, (1, 1), (2, 2), (1, 1), 1, F32, 1, True),      # the same in fp32: direct
    (2, 32, 32, 128, 128, 3, 3, (1, 1), (1, 1), (1, 1), 1, BF16, 2, True),  # 3x3 128 -> 128: TC, cp.async
    (2, 32, 32, 128, 128, 3, 3, (1, 1), (1, 1), (1, 1), 1, F16, 3, False),  # same, fp16, gelu, no bias
    (3, 16, 16, 64, 96, 1, 1, (1, 1), (0, 0), (1, 1), 1, F16, 4, True),     # 1x1, Kg = 96: an N-tile tail
    (2, 64, 64, 3, 64, 11, 11, (4, 4), (2, 2), (1, 1), 1, BF16, 1, True),   # 11x11 stride 4, 3 -> 64
    (2, 20, 20, 64, 64, 3, 3, (1, 1), (1, 1), (1, 1), 2, F16, 5, True),     # groups = 2 (grid z)
    (2, 17, 17, 32, 32, 3, 3, (1, 1), (1, 1), (1, 1), 32, F16, 2, True),    # depthwise: direct
    (1, 15, 13, 16, 24, 3, 3, (2, 2), (2, 1), (2, 2), 1, F32, 3, True),     # fp32, stride + dilation
    (1, 7, 9, 24, 40, 3, 3, (2, 1), (1, 1), (1, 2), 1, BF16, 0, False),     # M = 36 < 128, Kgemm 216
    (2, 9, 9, 12, 16, 3, 3, (1, 1), (1, 1), (1, 1), 2, F16, 2, True),       # Cg = 6: TC scalar, groups
]


@pytest.mark.gpu
@pytest.mark.parametrize("N,H,W,C,K,R,S,stride,pad,dil,groups,dtype,act,bias", GPU_CONV_CASES)
def test_gpu_conv2d_against_float64(N, H, W, C, K, R, S, stride, pad, dil, groups, dtype, act, bias):
    C_ext, err = _import_ext()
    if C_ext is None:
        pytest.skip(f"dlh_kernels._C is not built ({err})")

    def conv2d_fwd(**kw):
        C_ext.conv2d_fwd(**kw, stream=torch.cuda.current_stream().cuda_stream)
        torch.cuda.synchronize()

    _check_conv2d(conv2d_fwd, torch.device("cuda"), N, H, W, C, K, R, S, stride, pad, dil, groups, dtype, act,
                  bias)


class _EmulatedConv2d:
    """conv2d_fwd(**Conv2dFwdArgs fields) over csrc/conv2d.cu built under the CPU emulation."""

    def __init__(self, lib):
        import ctypes

        class Args(ctypes.Structure):  # mirrors dlh::Conv2dFwdArgs
            _fields_ = ([(n, ctypes.c_uint64) for n in "x w bias y".split()]
                        + [(n, ctypes.c_int64) for n in ("N H W C K R S OH OW stride_h stride_w pad_h pad_w dil_h "
                                                         "dil_w groups").split()]
                        + [("activation", ctypes.c_int), ("negative_slope", ctypes.c_float),
                           ("dtype", ctypes.c_int), ("stream", ctypes.c_uint64)])

        self.lib, self.Args = lib, Args

    def __call__(self, **kw):
        self.lib.run("conv2d_fwd", self.Args(**kw, stream=0))


EMU_CONV_ENTRIES = [("conv2d_fwd", "Conv2dFwdArgs")]


@pytest.fixture(scope="module")
def emulated_conv2d():
    return _EmulatedConv2d(_build_emulated("conv2d.cu", EMU_CONV_ENTRIES, defines=["-DDLH_TEST_CONV_DIRECT_ONLY",
                                                                                 "-DDLH_TEST_CONV_MAX_BLOCKS=3"]))


EMULATED_CONV_CASES = [
    (1, 12, 12, 1, 16, 5, 5, (1, 1), (2, 2), (1, 1), 1, F16, 1, True),      # 1 -> 16 5x5
    (2, 9, 9, 8, 8, 3, 3, (1, 1), (1, 1), (1, 1), 2, BF16, 2, True),        # groups = 2
    (1, 10, 10, 16, 16, 3, 3, (1, 1), (1, 1), (1, 1), 16, F32, 5, True),    # depthwise, leaky relu
    (1, 20, 20, 3, 8, 11, 11, (4, 4), (2, 2), (1, 1), 1, F32, 4, True),     # 11x11 stride 4
    (2, 7, 7, 6, 4, 1, 1, (1, 1), (0, 0), (1, 1), 1, F16, 3, False),        # 1x1, no bias
    (1, 11, 9, 4, 6, 3, 3, (2, 1), (2, 1), (2, 3), 1, F32, 0, True),        # strides, dilations
]


@needs_nvcc
@pytest.mark.parametrize("N,H,W,C,K,R,S,stride,pad,dil,groups,dtype,act,bias", EMULATED_CONV_CASES)
def test_conv2d_direct_emulated_on_cpu(emulated_conv2d, N, H, W, C, K, R, S, stride, pad, dil, groups, dtype, act,
                                       bias):
    _check_conv2d(emulated_conv2d, torch.device("cpu"), N, H, W, C, K, R, S, stride, pad, dil, groups, dtype, act,
                  bias)


# The tensor-core implicit GEMM through the emulation of mma.sync / ldmatrix / cp.async
# (tests/cuda_emu): both loaders (16-byte cp.async and scalar gather), N-tile and M-tile tails, groups
# (grid z), several N blocks (grid y).
@pytest.fixture(scope="module")
def emulated_conv2d_tc():
    return _EmulatedConv2d(_build_emulated("conv2d.cu", EMU_CONV_ENTRIES))


EMULATED_CONV_TC_CASES = [
    (1, 12, 12, 1, 16, 5, 5, (1, 1), (2, 2), (1, 1), 1, F16, 1, True),      # Cg = 1: scalar gather
    (2, 9, 9, 8, 16, 3, 3, (1, 1), (1, 1), (1, 1), 1, BF16, 2, True),       # Cg = 8: cp.async, 2 M blocks
    (1, 8, 8, 16, 16, 3, 3, (1, 1), (1, 1), (1, 1), 2, F16, 5, True),       # groups = 2 (grid z)
    (1, 7, 9, 24, 40, 3, 3, (2, 1), (1, 1), (1, 2), 1, BF16, 0, False),     # Kgemm 216, Kg 40 tail
    (1, 6, 6, 16, 96, 1, 1, (1, 1), (0, 0), (1, 1), 1, F16, 4, True),       # 1x1, Kg 96: 2 N blocks
]


@needs_nvcc
@pytest.mark.parametrize("N,H,W,C,K,R,S,stride,pad,dil,groups,dtype,act,bias", EMULATED_CONV_TC_CASES)
def test_conv2d_tensor_cores_emulated_on_cpu(emulated_conv2d_tc, N, H, W, C, K, R, S, stride, pad, dil, groups,
                                            dtype, act, bias):
    _check_conv2d(emulated_conv2d_tc, torch.device("cpu"), N, H, W, C, K, R, S, stride, pad, dil, groups, dtype,
                  act, bias)


# The tensor-core path's grid past CUDA's 65,535 limit on gridDim.y (channel tiles) and gridDim.z
# (groups): conv2d.cu then runs several launches with offsets (g0, nt0). The limit lowered to 2
# (DLH_TEST_CONV_MAX_GRID_YZ) makes those split launches happen at test sizes; the emulation
# itself refuses any launch whose grid is over the real limit.
@pytest.fixture(scope="module")
def emulated_conv2d_split():
    return _EmulatedConv2d(_build_emulated("conv2d.cu", EMU_CONV_ENTRIES,
                                           defines=["-DDLH_TEST_CONV_MAX_GRID_YZ=2"]))


EMULATED_CONV_SPLIT_CASES = [
    (1, 6, 6, 40, 40, 3, 3, (1, 1), (1, 1), (1, 1), 5, F16, 2, True),     # 5 groups: z chunks 2, 2, 1
    (1, 5, 5, 16, 136, 1, 1, (1, 1), (0, 0), (1, 1), 1, BF16, 1, True),   # 3 channel tiles: y chunks 2, 1
]


@needs_nvcc
@pytest.mark.parametrize("N,H,W,C,K,R,S,stride,pad,dil,groups,dtype,act,bias", EMULATED_CONV_SPLIT_CASES)
def test_conv2d_split_launches_emulated_on_cpu(emulated_conv2d_split, N, H, W, C, K, R, S, stride, pad, dil,
                                               groups, dtype, act, bias):
    _check_conv2d(emulated_conv2d_split, torch.device("cpu"), N, H, W, C, K, R, S, stride, pad, dil, groups, dtype,
                  act, bias)
