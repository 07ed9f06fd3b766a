"""The CUDA C++ extension as a build artefact: it compiles, it installs, and it fails cleanly.

None of these needs a GPU, only nvcc and the CUDA headers (they skip without them), so CI
machines without GPUs catch compile errors in csrc/ and even run the kernels:
  (a) the installed dlh_kernels._C imports, reports its build, links no libcudart.so;
  (b) every csrc/*.cu compiles for sm_80 and sm_90 without warnings, bindings.cpp too;
  (c) without a GPU, calls raise RuntimeError / ValueError, never crash;
  (d) csrc/layer_norm.cu against a float64 reference on shapes that reach each of its kernel
      paths (warp per row, block per row, split rows, row batches, scalar fallback): on a GPU
      (marked `gpu`), and on the CPU through a small emulation of the CUDA features it uses.
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

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
CU_FILES = sorted(CSRC.glob("*.cu"))


def _find_nvcc():
    """Same search order as setup.py: CUDA_HOME / CUDA_PATH, PATH, /usr/local/cuda."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home and (Path(home) / "bin" / "nvcc").is_file():
            return str(Path(home) / "bin" / "nvcc")
    found = shutil.which("nvcc")
    if found:
        return found
    default = Path("/usr/local/cuda/bin/nvcc")
    return str(default) if default.is_file() else None


NVCC = _find_nvcc()
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc not found: the CUDA extension is not built here")

# The flags setup.py uses (minus -lineinfo, which changes no diagnostics), for both archs in one
# nvcc call: nvcc shares the front end between them, and --threads compiles them side by side.
NVCC_FLAGS = ["-O3", "-std=c++17", "-Xcompiler", "-fPIC", "--expt-relaxed-constexpr",
              "-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=sm_90",
              "--threads", "2", f"-I{CSRC}"]


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


# ---------------------------------------------------------------------------------------------
# csrc/layer_norm.cu against a float64 reference, through the raw interface, on shapes chosen to
# reach every kernel path. Run two ways: on a GPU (marked `gpu`), and on the CPU through a tiny
# CUDA emulation (below), so that machines without GPUs still execute the kernels' index math,
# masks, reductions, tile partials and row batches.

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


@pytest.mark.gpu
@pytest.mark.parametrize("M,N,dtype,w_dtype,residual,rms,row_pad", GPU_CASES)
def test_gpu_norm_paths_against_float64(M, N, dtype, w_dtype, residual, rms, row_pad):
    C, err = _import_ext()
    if C is None:
        pytest.skip(f"dlh_kernels._C is not built ({err})")
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    _check_norm(_GpuExt(C), torch.device("cuda"), sms, M, N, dtype, w_dtype, residual, rms, row_pad)


# ---- the same checks on the CPU, through an emulation of the few CUDA features the kernels use
# One std::thread per CUDA thread, blocks one after another (so `static` works as __shared__),
# warp shuffles through a per-warp exchange and barrier, kernel launches rewritten into calls.
# Host arithmetic differs from the GPU's only in FMA contraction and rsqrtf rounding.
EMU_HEADER = r"""
#pragma once
#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <barrier>
#include <cmath>
#include <cstdio>
#include <functional>
#include <memory>
#include <thread>
#include <vector>
#undef __shared__
#define __shared__ static
#undef __launch_bounds__
#define __launch_bounds__(...)
#undef __global__
#define __global__
#undef __device__
#define __device__
#undef __forceinline__
#define __forceinline__ inline
#define __CUDACC__ 1
namespace emu {
struct Warp { float vals[32]; std::unique_ptr<std::barrier<>> bar; };
struct Block { std::unique_ptr<std::barrier<>> bar; std::vector<Warp> warps; };
inline Block* block_state = nullptr;
inline thread_local int lane, warp;
}
inline thread_local uint3 threadIdx, blockIdx;
inline dim3 blockDim, gridDim;
inline void __syncthreads() { emu::block_state->bar->arrive_and_wait(); }
inline float __shfl_xor_sync(unsigned, float v, int offset) {
  emu::Warp& w = emu::block_state->warps[emu::warp];
  w.vals[emu::lane] = v;
  w.bar->arrive_and_wait();
  const float other = w.vals[emu::lane ^ offset];
  w.bar->arrive_and_wait();
  return other;
}
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline long min(long a, long b) { return a < b ? a : b; }
namespace emu {
inline void launch(dim3 grid, dim3 block, const std::function<void()>& kernel) {
  const int threads = block.x * block.y * block.z;
  Block state;
  state.bar = std::make_unique<std::barrier<>>(threads);
  state.warps.resize(threads / 32);
  for (Warp& w : state.warps) w.bar = std::make_unique<std::barrier<>>(32);
  block_state = &state;
  blockDim = block;
  gridDim = grid;
  std::barrier<> next_block(threads);
  std::vector<std::thread> pool;
  for (int t = 0; t < threads; ++t)
    pool.emplace_back([&, t] {
      threadIdx = make_uint3(t % block.x, t / block.x % block.y, t / (block.x * block.y));
      lane = t % 32;
      warp = t / 32;
      for (unsigned b = 0; b < grid.x; ++b) {
        blockIdx = make_uint3(b, 0, 0);
        kernel();
        next_block.arrive_and_wait();
      }
    });
  for (std::thread& th : pool) th.join();
}
}
extern "C" cudaError_t cudaGetLastError(void) { return cudaSuccess; }
extern "C" const char* cudaGetErrorString(cudaError_t) { return "no error"; }
"""

EMU_EXPORTS = r"""
#include <exception>
extern "C" int emu_norm_fwd(const dlh::NormFwdArgs* a, char* err, int n) {
  try { dlh::norm_fwd(*a); } catch (std::exception& e) { snprintf(err, n, "%s", e.what()); return 1; }
  return 0;
}
extern "C" int emu_norm_bwd(const dlh::NormBwdArgs* a, char* err, int n) {
  try { dlh::norm_bwd(*a); } catch (std::exception& e) { snprintf(err, n, "%s", e.what()); return 1; }
  return 0;
}
extern "C" long long emu_fwd_ws(long long M, long long N, int sm) {
  return dlh::norm_fwd_workspace(M, N, sm);
}
extern "C" long long emu_bwd_ws(long long M, long long N, int sm) {
  return dlh::norm_bwd_workspace(M, N, sm);
}
"""

EMU_BATCH_ELEMS = 40000  # row batches of the split paths after 40k elements instead of 2M


def _emulated_source(cu_text):
    """layer_norm.cu with each `kernel<<<grid, block, smem, stream>>>(args);` made a call."""
    launch = re.compile(r"^(\s*)([^\n;]+?)<<<(.+?)>>>\((.*?)\);", re.M | re.S)

    def rewrite(m):
        indent, kernel, config, args = m.groups()
        grid, block = [c.strip() for c in re.split(r",(?![^()]*\))", config)][:2]
        return f"{indent}::emu::launch({grid}, {block}, [&] {{ {kernel}({args}); }});"

    text, launches = launch.subn(rewrite, cu_text)
    assert launches >= 3, "expected the three kernel launches of layer_norm.cu"
    return text.replace('#include "common.cuh"', '#include "emu.h"\n#include "common.cuh"') + EMU_EXPORTS


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

        for name in ("emu_fwd_ws", "emu_bwd_ws"):
            getattr(lib, name).restype = ctypes.c_longlong
            getattr(lib, name).argtypes = [ctypes.c_longlong, ctypes.c_longlong, ctypes.c_int]
        self.lib, self.Fwd, self.Bwd, self.ctypes = lib, Fwd, Bwd, ctypes

    def _call(self, fn, args):
        err = self.ctypes.create_string_buffer(512)
        if fn(self.ctypes.byref(args), err, 512):
            raise RuntimeError(err.value.decode())

    def norm_fwd_workspace(self, M, N, sms):
        return self.lib.emu_fwd_ws(M, N, sms)

    def norm_bwd_workspace(self, M, N, sms):
        return self.lib.emu_bwd_ws(M, N, sms)

    def norm_fwd(self, **kw):
        self._call(self.lib.emu_norm_fwd, self.Fwd(**kw, stream=0))

    def norm_bwd(self, **kw):
        self._call(self.lib.emu_norm_bwd, self.Bwd(**kw, stream=0))


@pytest.fixture(scope="module")
def emulated(tmp_path_factory):
    import ctypes

    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    cuda_include = Path(os.path.realpath(NVCC)).parent.parent / "include"
    if not (cuda_include / "cuda_fp16.h").is_file():
        cuda_include = Path("/usr/local/cuda/include")
    if not cxx or not (cuda_include / "cuda_fp16.h").is_file():
        pytest.skip("needs a host C++ compiler and the CUDA headers")
    work = tmp_path_factory.mktemp("emulated")
    probe = subprocess.run([cxx, "-std=c++20", "-x", "c++", "-fsyntax-only", "-"],
                           input="#include <barrier>\n", capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"{cxx} lacks C++20 <barrier>")
    (work / "emu.h").write_text(EMU_HEADER)
    (work / "layer_norm_emu.cpp").write_text(_emulated_source((CSRC / "layer_norm.cu").read_text()))
    lib = work / "layer_norm_emu.so"
    cmd = [cxx, "-std=c++20", "-O1", "-fPIC", "-shared", f"-DDLH_TEST_SPLIT_BATCH_ELEMS={EMU_BATCH_ELEMS}",
           f"-I{work}", f"-I{CSRC}", f"-I{cuda_include}", str(work / "layer_norm_emu.cpp"), "-o", str(lib),
           "-pthread"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, f"the emulated build of layer_norm.cu failed:\n{proc.stderr}"
    return _EmulatedExt(ctypes.CDLL(str(lib)))


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
