// bindings.cpp: the Python face of the CUDA kernels, the module dlh_kernels._C.
//
// Compiled by the host compiler (not nvcc) against pybind11 and the CUDA runtime headers only;
// the module links the static CUDA runtime and never libtorch. Every tensor crosses as a raw
// device pointer (a Python int, 0 for "absent"), with sizes and row strides in elements, dtype
// codes (0 float32, 1 float16, 2 bfloat16) and the CUDA stream handle as an int
// (torch.cuda.current_stream().cuda_stream). Torch allocates everything, workspaces included.
//
// Errors: std::invalid_argument -> ValueError (bad sizes, dtype codes, missing tensors),
// std::runtime_error -> RuntimeError (anything CUDA reports, e.g. no GPU on this machine).

#include <cuda_runtime_api.h>
#include <pybind11/pybind11.h>

#include <cstdint>

#include "common.cuh"

#ifndef DLH_CUDA_ARCHS
#define DLH_CUDA_ARCHS "unknown"
#endif
#ifndef DLH_NVCC_VERSION
#define DLH_NVCC_VERSION "unknown"
#endif

namespace py = pybind11;
using ptr_t = std::uintptr_t;

PYBIND11_MODULE(_C, m) {
  m.doc() = "dlh-kernels CUDA C++ kernels (raw-pointer interface; see dlh_kernels for the torch ops)";

  m.def(
      "build_info",
      [] {
        py::dict info;
        info["archs"] = DLH_CUDA_ARCHS;
        info["nvcc"] = DLH_NVCC_VERSION;
        info["cuda_runtime"] = CUDART_VERSION;
        return info;
      },
      "How this extension was built: target archs, nvcc version, CUDA runtime version.");

  // ---- layer_norm.cu ----------------------------------------------------------------------------
  m.def("norm_fwd_workspace", &dlh::norm_fwd_workspace, py::arg("M"), py::arg("N"), py::arg("sm_count"),
        "Bytes of fp32 scratch norm_fwd needs for an (M, N) problem on sm_count SMs (0 if none).");

  m.def(
      "norm_fwd",
      [](ptr_t x, ptr_t res, ptr_t w, ptr_t b, ptr_t y, ptr_t h, ptr_t mean, ptr_t rstd, ptr_t workspace,
         int64_t M, int64_t N, int64_t stride_x, int64_t stride_res, int64_t stride_y, int64_t stride_h,
         double eps, bool rms, int x_dtype, int w_dtype, int sm_count, ptr_t stream) {
        const dlh::NormFwdArgs args{x,      res,    w,          b,        y,        h,
                                    mean,   rstd,   workspace,  M,        N,        stride_x,
                                    stride_res, stride_y, stride_h, static_cast<float>(eps), rms,
                                    x_dtype, w_dtype, sm_count, stream};
        py::gil_scoped_release no_gil;
        dlh::norm_fwd(args);
      },
      py::arg("x"), py::arg("res"), py::arg("w"), py::arg("b"), py::arg("y"), py::arg("h"),
      py::arg("mean"), py::arg("rstd"), py::arg("workspace"), py::arg("M"), py::arg("N"),
      py::arg("stride_x"), py::arg("stride_res"), py::arg("stride_y"), py::arg("stride_h"),
      py::arg("eps"), py::arg("rms"), py::arg("x_dtype"), py::arg("w_dtype"), py::arg("sm_count"),
      py::arg("stream"),
      "LayerNorm (rms=False) or RMSNorm (rms=True) of the M rows of x, or of h = x + res when res\n"
      "is given (h is then stored, rounded to x's dtype). Writes y and, when given, mean/rstd (fp32).");

  m.def("norm_bwd_workspace", &dlh::norm_bwd_workspace, py::arg("M"), py::arg("N"), py::arg("sm_count"),
        "Bytes of fp32 scratch norm_bwd needs for an (M, N) problem on sm_count SMs.");

  m.def(
      "norm_bwd",
      [](ptr_t dy, ptr_t h, ptr_t w, ptr_t mean, ptr_t rstd, ptr_t dh_out, ptr_t dx, ptr_t dw, ptr_t db,
         ptr_t workspace, int64_t M, int64_t N, int64_t stride_dy, int64_t stride_h, int64_t stride_dh,
         int64_t stride_dx, bool rms, int x_dtype, int w_dtype, int sm_count, ptr_t stream) {
        const dlh::NormBwdArgs args{dy,        h,        w,         mean,      rstd,     dh_out,
                                    dx,        dw,       db,        workspace, M,        N,
                                    stride_dy, stride_h, stride_dh, stride_dx, rms,      x_dtype,
                                    w_dtype,   sm_count, stream};
        py::gil_scoped_release no_gil;
        dlh::norm_bwd(args);
      },
      py::arg("dy"), py::arg("h"), py::arg("w"), py::arg("mean"), py::arg("rstd"), py::arg("dh_out"),
      py::arg("dx"), py::arg("dw"), py::arg("db"), py::arg("workspace"), py::arg("M"), py::arg("N"),
      py::arg("stride_dy"), py::arg("stride_h"), py::arg("stride_dh"), py::arg("stride_dx"), py::arg("rms"),
      py::arg("x_dtype"), py::arg("w_dtype"), py::arg("sm_count"), py::arg("stream"),
      "Backward of norm_fwd: dx (plus dh_out when given) and, when given, dw/db (fp32, overwritten).");
}
