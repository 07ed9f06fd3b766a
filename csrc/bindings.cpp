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

  // ---- gelu.cu ----------------------------------------------------------------------------------
  // tanh=False: exact GELU, 0.5*x*(1 + erf(x/sqrt(2))); tanh=True: PyTorch's approximate="tanh".
  // fp32 math for every dtype. Outputs may be their input itself (in place), no other overlap.
  m.def(
      "gelu_fwd",
      [](ptr_t x, ptr_t bias, ptr_t y, int64_t M, int64_t N, int64_t stride_x, int64_t stride_y, bool tanh,
         int x_dtype, int bias_dtype, ptr_t stream) {
        const dlh::GeluFwdArgs args{x, bias, y, M, N, stride_x, stride_y, tanh, x_dtype, bias_dtype, stream};
        py::gil_scoped_release no_gil;
        dlh::gelu_fwd(args);
      },
      py::arg("x"), py::arg("bias"), py::arg("y"), py::arg("M"), py::arg("N"), py::arg("stride_x"),
      py::arg("stride_y"), py::arg("tanh"), py::arg("x_dtype"), py::arg("bias_dtype"), py::arg("stream"),
      "y = gelu(x + bias) over the M rows of x (bias (N,) optional, in x's dtype or fp32; bias_dtype is\n"
      "ignored without it), rounded to x's dtype.");

  m.def("gelu_bwd_workspace", &dlh::gelu_bwd_workspace, py::arg("M"), py::arg("N"), py::arg("sm_count"),
        "Bytes of scratch gelu_bwd needs for its dbias output on an (M, N) problem on sm_count SMs (0 if\n"
        "none); the same M, N and sm_count must then be passed to gelu_bwd.");

  m.def(
      "gelu_bwd",
      [](ptr_t dy, ptr_t x, ptr_t bias, ptr_t dx, ptr_t dbias, ptr_t workspace, int64_t M, int64_t N,
         int64_t stride_dy, int64_t stride_x, int64_t stride_dx, bool tanh, int x_dtype, int bias_dtype,
         int sm_count, ptr_t stream) {
        const dlh::GeluBwdArgs args{dy,       x,         bias,      dx,   dbias,   workspace,  M,        N,
                                    stride_dy, stride_x, stride_dx, tanh, x_dtype, bias_dtype, sm_count, stream};
        py::gil_scoped_release no_gil;
        dlh::gelu_bwd(args);
      },
      py::arg("dy"), py::arg("x"), py::arg("bias"), py::arg("dx"), py::arg("dbias"), py::arg("workspace"),
      py::arg("M"), py::arg("N"), py::arg("stride_dy"), py::arg("stride_x"), py::arg("stride_dx"), py::arg("tanh"),
      py::arg("x_dtype"), py::arg("bias_dtype"), py::arg("sm_count"), py::arg("stream"),
      "dx = dy * gelu'(x + bias), rounded to x's dtype; when given, dbias (fp32, (N,)) is overwritten with\n"
      "the column sums of the unrounded dx, deterministically (M = 0 writes nothing, dbias included).");

  m.def(
      "geglu_fwd",
      [](ptr_t x, ptr_t y, int64_t M, int64_t H, int64_t stride_x, int64_t stride_y, bool tanh, int dtype,
         ptr_t stream) {
        const dlh::GegluFwdArgs args{x, y, M, H, stride_x, stride_y, tanh, dtype, stream};
        py::gil_scoped_release no_gil;
        dlh::geglu_fwd(args);
      },
      py::arg("x"), py::arg("y"), py::arg("M"), py::arg("H"), py::arg("stride_x"), py::arg("stride_y"),
      py::arg("tanh"), py::arg("dtype"), py::arg("stream"),
      "y[m, h] = x[m, h] * gelu(x[m, H + h]) for rows of 2H elements of x and H of y.");

  m.def(
      "geglu_bwd",
      [](ptr_t dy, ptr_t x, ptr_t dx, int64_t M, int64_t H, int64_t stride_dy, int64_t stride_x,
         int64_t stride_dx, bool tanh, int dtype, ptr_t stream) {
        const dlh::GegluBwdArgs args{dy, x, dx, M, H, stride_dy, stride_x, stride_dx, tanh, dtype, stream};
        py::gil_scoped_release no_gil;
        dlh::geglu_bwd(args);
      },
      py::arg("dy"), py::arg("x"), py::arg("dx"), py::arg("M"), py::arg("H"), py::arg("stride_dy"),
      py::arg("stride_x"), py::arg("stride_dx"), py::arg("tanh"), py::arg("dtype"), py::arg("stream"),
      "Backward of geglu_fwd: dx[:, :H] = dy * gelu(g), dx[:, H:] = dy * a * gelu'(g) (dx rows of 2H).");

  // ---- diffusion_step.cu ------------------------------------------------------------------------
  // t, pt, seed: device pointers to int64 (0: use t_value, pt_value, seed_value); dims: 4 sizes,
  // strides: 20 (x, m, u, z, out; 4 each). No host sync: timesteps and seed may live on the device.
  m.def(
      "diffusion_step",
      [](ptr_t x, ptr_t mo, ptr_t u, ptr_t z, ptr_t out, ptr_t table, ptr_t t, ptr_t pt, ptr_t seed,
         int64_t t_value, int64_t pt_value, int64_t seed_value, int64_t t_stride, int64_t pt_stride,
         int64_t n, int64_t per_batch, int64_t n_table, py::sequence dims, py::sequence strides,
         double eta, double clip_range, double guidance_scale, int method, int prediction,
         int noise_mode, bool clip, bool guidance, bool contig, int dtype, bool table_f64, ptr_t stream) {
        dlh::check_arg(py::len(dims) == 4 && py::len(strides) == 20, "diffusion_step",
                       "dims must hold 4 sizes and strides 20 (x, m, u, z, out; 4 each)");
        dlh::DiffusionStepArgs args{x, mo, u, z, out, table, t, pt, seed, t_value, pt_value, seed_value,
                                    t_stride, pt_stride, n, per_batch, n_table, {}, {},
                                    static_cast<float>(eta), static_cast<float>(clip_range),
                                    static_cast<float>(guidance_scale), method, prediction, noise_mode,
                                    clip, guidance, contig, dtype, table_f64, stream};
        for (int d = 0; d < 4; ++d) args.dims[d] = dims[d].cast<int64_t>();
        for (int k = 0; k < 20; ++k) args.strides[k] = strides[k].cast<int64_t>();
        py::gil_scoped_release no_gil;
        dlh::diffusion_step(args);
      },
      py::arg("x"), py::arg("m"), py::arg("u"), py::arg("z"), py::arg("out"), py::arg("table"), py::arg("t"),
      py::arg("pt"), py::arg("seed"), py::arg("t_value"), py::arg("pt_value"), py::arg("seed_value"),
      py::arg("t_stride"), py::arg("pt_stride"), py::arg("n"), py::arg("per_batch"), py::arg("n_table"),
      py::arg("dims"), py::arg("strides"), py::arg("eta"), py::arg("clip_range"), py::arg("guidance_scale"),
      py::arg("method"), py::arg("prediction"), py::arg("noise_mode"), py::arg("clip"), py::arg("guidance"),
      py::arg("contig"), py::arg("dtype"), py::arg("table_f64"), py::arg("stream"),
      "One reverse diffusion step (method 0 ddpm, 1 ddim, 2 interp; prediction 0 epsilon, 1 v, 2 sample)\n"
      "into out; noise_mode 0 none, 1 given z, 2 Philox from the seed (tl.randn's stream).");

  m.def(
      "seeded_randn",
      [](ptr_t out, ptr_t seed, int64_t seed_value, int64_t n, int dtype, ptr_t stream) {
        const dlh::SeededRandnArgs args{out, seed, seed_value, n, dtype, stream};
        py::gil_scoped_release no_gil;
        dlh::seeded_randn(args);
      },
      py::arg("out"), py::arg("seed"), py::arg("seed_value"), py::arg("n"), py::arg("dtype"), py::arg("stream"),
      "out[i] = tl.randn(seed, i) for i < n (contiguous out); seed: device pointer to int64, or 0 for seed_value.");

  // ---- group_norm.cu ----------------------------------------------------------------------------
  // Tensors as (N, C, S) with three strides each (elements); channels_inner: the channel stride
  // of every tensor is 1 (channels_last), else the spatial one (NCHW). w/b: (C,) in x's dtype or
  // fp32, one dtype for both; 0 when absent. activation: silu=True fuses y = silu(GroupNorm(x)).
  m.def("group_norm_fwd_workspace", &dlh::group_norm_fwd_workspace, py::arg("N"), py::arg("C"), py::arg("S"),
        py::arg("G"), py::arg("channels_inner"), py::arg("x_dtype"), py::arg("sm_count"),
        "Bytes of fp32 scratch group_norm_fwd needs for this problem on sm_count SMs (0 if none).");

  m.def(
      "group_norm_fwd",
      [](ptr_t x, ptr_t w, ptr_t b, ptr_t y, ptr_t mean, ptr_t rstd, ptr_t workspace, int64_t N, int64_t C,
         int64_t S, int64_t G, int64_t stride_xn, int64_t stride_xc, int64_t stride_xs, int64_t stride_yn,
         int64_t stride_yc, int64_t stride_ys, double eps, bool silu, bool channels_inner, int x_dtype,
         int w_dtype, int sm_count, ptr_t stream) {
        const dlh::GroupNormFwdArgs args{x,         w,         b,         y,         mean,      rstd,
                                         workspace, N,         C,         S,         G,         stride_xn,
                                         stride_xc, stride_xs, stride_yn, stride_yc, stride_ys,
                                         static_cast<float>(eps), silu, channels_inner, x_dtype, w_dtype,
                                         sm_count, stream};
        py::gil_scoped_release no_gil;
        dlh::group_norm_fwd(args);
      },
      py::arg("x"), py::arg("w"), py::arg("b"), py::arg("y"), py::arg("mean"), py::arg("rstd"),
      py::arg("workspace"), py::arg("N"), py::arg("C"), py::arg("S"), py::arg("G"), py::arg("stride_xn"),
      py::arg("stride_xc"), py::arg("stride_xs"), py::arg("stride_yn"), py::arg("stride_yc"),
      py::arg("stride_ys"), py::arg("eps"), py::arg("silu"), py::arg("channels_inner"), py::arg("x_dtype"),
      py::arg("w_dtype"), py::arg("sm_count"), py::arg("stream"),
      "GroupNorm of x in G groups (then SiLU when silu): writes y (x's dtype) and mean/rstd ((N*G,) fp32).");

  m.def("group_norm_bwd_workspace", &dlh::group_norm_bwd_workspace, py::arg("N"), py::arg("C"), py::arg("S"),
        py::arg("G"), py::arg("channels_inner"), py::arg("x_dtype"), py::arg("sm_count"),
        "Bytes of fp32 scratch group_norm_bwd needs for this problem on sm_count SMs.");

  m.def(
      "group_norm_bwd",
      [](ptr_t dy, ptr_t x, ptr_t w, ptr_t b, ptr_t mean, ptr_t rstd, ptr_t dx, ptr_t dw, ptr_t db,
         ptr_t workspace, int64_t N, int64_t C, int64_t S, int64_t G, int64_t stride_dyn, int64_t stride_dyc,
         int64_t stride_dys, int64_t stride_xn, int64_t stride_xc, int64_t stride_xs, int64_t stride_dxn,
         int64_t stride_dxc, int64_t stride_dxs, bool silu, bool channels_inner, int x_dtype, int w_dtype,
         int sm_count, ptr_t stream) {
        const dlh::GroupNormBwdArgs args{dy,         x,          w,          b,          mean,
                                         rstd,       dx,         dw,         db,         workspace,
                                         N,          C,          S,          G,          stride_dyn,
                                         stride_dyc, stride_dys, stride_xn,  stride_xc,  stride_xs,
                                         stride_dxn, stride_dxc, stride_dxs, silu,       channels_inner,
                                         x_dtype,    w_dtype,    sm_count,   stream};
        py::gil_scoped_release no_gil;
        dlh::group_norm_bwd(args);
      },
      py::arg("dy"), py::arg("x"), py::arg("w"), py::arg("b"), py::arg("mean"), py::arg("rstd"), py::arg("dx"),
      py::arg("dw"), py::arg("db"), py::arg("workspace"), py::arg("N"), py::arg("C"), py::arg("S"), py::arg("G"),
      py::arg("stride_dyn"), py::arg("stride_dyc"), py::arg("stride_dys"), py::arg("stride_xn"),
      py::arg("stride_xc"), py::arg("stride_xs"), py::arg("stride_dxn"), py::arg("stride_dxc"),
      py::arg("stride_dxs"), py::arg("silu"), py::arg("channels_inner"), py::arg("x_dtype"), py::arg("w_dtype"),
      py::arg("sm_count"), py::arg("stream"),
      "Backward of group_norm_fwd (b matters only with silu): dx and, when given, dw/db ((C,) fp32,\n"
      "overwritten, deterministic).");

  // ---- conv2d.cu --------------------------------------------------------------------------------
  // NHWC 2D convolution forward + bias + activation (0 none, 1 relu, 2 silu, 3 gelu, 4 gelu_tanh,
  // 5 leaky_relu); fp16/bf16 on tensor cores (implicit GEMM, sm_80+), fp32 and depthwise on CUDA cores.
  m.def(
      "conv2d_fwd",
      [](ptr_t x, ptr_t w, ptr_t bias, ptr_t y, int64_t N, int64_t H, int64_t W, int64_t C, int64_t K,
         int64_t R, int64_t S, int64_t OH, int64_t OW, int64_t stride_h, int64_t stride_w, int64_t pad_h,
         int64_t pad_w, int64_t dil_h, int64_t dil_w, int64_t groups, int activation, double negative_slope,
         int dtype, ptr_t stream) {
        const dlh::Conv2dFwdArgs args{x,     w,     bias,     y,        N,     H,     W,     C,
                                      K,     R,     S,        OH,       OW,    stride_h,    stride_w,
                                      pad_h, pad_w, dil_h,    dil_w,    groups, activation,
                                      static_cast<float>(negative_slope), dtype, stream};
        py::gil_scoped_release no_gil;
        dlh::conv2d_fwd(args);
      },
      py::arg("x"), py::arg("w"), py::arg("bias"), py::arg("y"), py::arg("N"), py::arg("H"), py::arg("W"),
      py::arg("C"), py::arg("K"), py::arg("R"), py::arg("S"), py::arg("OH"), py::arg("OW"), py::arg("stride_h"),
      py::arg("stride_w"), py::arg("pad_h"), py::arg("pad_w"), py::arg("dil_h"), py::arg("dil_w"),
      py::arg("groups"), py::arg("activation"), py::arg("negative_slope"), py::arg("dtype"), py::arg("stream"),
      "y = act(conv2d(x, w) + bias): x (N, H, W, C), w (K, R, S, C/groups), y (N, OH, OW, K), contiguous,\n"
      "one dtype (0 fp32, 1 fp16, 2 bf16); bias (K,) optional (0).");

  // ---- attention.cu -----------------------------------------------------------------------------
  // fp16/bf16 on tensor cores (sm_80+). strides: (batch, head, seq) in elements per tensor, then the
  // mask's (batch, head, row, col); the head dim is contiguous; Q/K/V (and dout) 16-byte aligned
  // with row strides that are multiples of 8 elements.
  m.def("attention_head_dim_supported", &dlh::attention_head_dim_supported, py::arg("D"), py::arg("backward"),
        "Whether the kernels take head dim D (forward: 32, 64, 96, 128, 256; backward: up to 128).");

  m.def(
      "attention_fwd",
      [](ptr_t q, ptr_t k, ptr_t v, ptr_t mask, ptr_t seed, ptr_t out, ptr_t lse, int64_t B, int64_t Hq,
         int64_t Hkv, int64_t L, int64_t S, int64_t D, py::sequence strides, int mask_kind, double scale,
         double dropout_p, bool causal, int dtype, ptr_t stream) {
        dlh::check_arg(py::len(strides) == 16, "attention_fwd",
                       "strides must hold 16 values (q, k, v, out: 3 each; mask: 4)");
        dlh::AttentionFwdArgs args{q, k, v, mask, seed, out, lse, B, Hq, Hkv, L, S, D, {}, mask_kind,
                                   static_cast<float>(scale), static_cast<float>(dropout_p), causal, dtype,
                                   stream};
        for (int i = 0; i < 16; ++i) args.strides[i] = strides[i].cast<int64_t>();
        py::gil_scoped_release no_gil;
        dlh::attention_fwd(args);
      },
      py::arg("q"), py::arg("k"), py::arg("v"), py::arg("mask"), py::arg("seed"), py::arg("out"), py::arg("lse"),
      py::arg("B"), py::arg("Hq"), py::arg("Hkv"), py::arg("L"), py::arg("S"), py::arg("D"), py::arg("strides"),
      py::arg("mask_kind"), py::arg("scale"), py::arg("dropout_p"), py::arg("causal"), py::arg("dtype"),
      py::arg("stream"),
      "out = softmax(scale * q k^T [+ mask]) v and lse (fp32, base 2; +inf for rows that see no key).\n"
      "mask_kind 0 none, 1 bool (bytes), 2 fp32 additive. dropout_p > 0: seed is a device pointer to the\n"
      "int64 Philox seed (the Triton kernels' keep mask for that seed).");

  m.def(
      "attention_bwd",
      [](ptr_t dout, ptr_t q, ptr_t k, ptr_t v, ptr_t out, ptr_t lse, ptr_t mask, ptr_t seed, ptr_t dq, ptr_t dk,
         ptr_t dv, ptr_t delta, ptr_t dscores, int64_t B, int64_t Hq, int64_t Hkv, int64_t L, int64_t S, int64_t D,
         py::sequence strides, int mask_kind, double scale, double dropout_p, bool causal, int dtype,
         ptr_t stream) {
        dlh::check_arg(py::len(strides) == 28, "attention_bwd",
                       "strides must hold 28 values (dout, q, k, v, out, dq, dk, dv: 3 each; mask: 4)");
        dlh::AttentionBwdArgs args{dout, q, k, v, out, lse, mask, seed, dq, dk, dv, delta, dscores, B, Hq, Hkv, L, S, D, {},
                                   mask_kind, static_cast<float>(scale), static_cast<float>(dropout_p), causal,
                                   dtype, stream};
        for (int i = 0; i < 28; ++i) args.strides[i] = strides[i].cast<int64_t>();
        py::gil_scoped_release no_gil;
        dlh::attention_bwd(args);
      },
      py::arg("dout"), py::arg("q"), py::arg("k"), py::arg("v"), py::arg("out"), py::arg("lse"), py::arg("mask"),
      py::arg("seed"), py::arg("dq"), py::arg("dk"), py::arg("dv"), py::arg("delta"), py::arg("dscores"), py::arg("B"),
      py::arg("Hq"),
      py::arg("Hkv"), py::arg("L"), py::arg("S"), py::arg("D"), py::arg("strides"), py::arg("mask_kind"),
      py::arg("scale"), py::arg("dropout_p"), py::arg("causal"), py::arg("dtype"), py::arg("stream"),
      "Backward of attention_fwd: dq, dk, dv (overwritten; dk/dv summed over each K/V head's query heads),\n"
      "deterministic; delta: (B, Hq, L) fp32 scratch; dscores (0: none): zero-filled (B, Hq, L, S) fp32 that\n"
      "gets dS, the gradient of an additive mask before its broadcast dims are summed.");

  // ---- activation.cu ----------------------------------------------------------------------------
  // act (unary): 0 silu, 1 relu, 2 leaky_relu(negative_slope); act (gated): 0 silu (SwiGLU),
  // 1 gelu (erf), 2 gelu (tanh). fp32 math for every dtype; (M, N) row views, one row stride each.
  m.def(
      "activation_fwd",
      [](ptr_t x, ptr_t y, int64_t M, int64_t N, int64_t stride_x, int64_t stride_y, int act,
         double negative_slope, int dtype, ptr_t stream) {
        const dlh::ActivationFwdArgs args{x, y, M, N, stride_x, stride_y, act,
                                          static_cast<float>(negative_slope), dtype, stream};
        py::gil_scoped_release no_gil;
        dlh::activation_fwd(args);
      },
      py::arg("x"), py::arg("y"), py::arg("M"), py::arg("N"), py::arg("stride_x"), py::arg("stride_y"),
      py::arg("act"), py::arg("negative_slope"), py::arg("dtype"), py::arg("stream"),
      "y = f(x) over the M rows of x (f: act 0 silu, 1 relu, 2 leaky_relu), rounded to x's dtype.");

  m.def(
      "activation_bwd",
      [](ptr_t dy, ptr_t x, ptr_t dx, int64_t M, int64_t N, int64_t stride_dy, int64_t stride_x,
         int64_t stride_dx, int act, double negative_slope, int dtype, ptr_t stream) {
        const dlh::ActivationBwdArgs args{dy, x, dx, M, N, stride_dy, stride_x, stride_dx, act,
                                          static_cast<float>(negative_slope), dtype, stream};
        py::gil_scoped_release no_gil;
        dlh::activation_bwd(args);
      },
      py::arg("dy"), py::arg("x"), py::arg("dx"), py::arg("M"), py::arg("N"), py::arg("stride_dy"),
      py::arg("stride_x"), py::arg("stride_dx"), py::arg("act"), py::arg("negative_slope"), py::arg("dtype"),
      py::arg("stream"), "Backward of activation_fwd: dx = dy * f'(x), recomputed from x.");

  m.def(
      "gated_fwd",
      [](ptr_t gate, ptr_t up, ptr_t y, int64_t M, int64_t N, int64_t stride_gate, int64_t stride_up,
         int64_t stride_y, int act, int dtype, ptr_t stream) {
        const dlh::GatedFwdArgs args{gate, up, y, M, N, stride_gate, stride_up, stride_y, act, dtype, stream};
        py::gil_scoped_release no_gil;
        dlh::gated_fwd(args);
      },
      py::arg("gate"), py::arg("up"), py::arg("y"), py::arg("M"), py::arg("N"), py::arg("stride_gate"),
      py::arg("stride_up"), py::arg("stride_y"), py::arg("act"), py::arg("dtype"), py::arg("stream"),
      "y = a(gate) * up (a: act 0 silu, 1 gelu, 2 gelu tanh); gate and up may be the two halves of one row.");

  m.def(
      "gated_bwd",
      [](ptr_t dy, ptr_t gate, ptr_t up, ptr_t dgate, ptr_t dup, int64_t M, int64_t N, int64_t stride_dy,
         int64_t stride_gate, int64_t stride_up, int64_t stride_dgate, int64_t stride_dup, int act, int dtype,
         ptr_t stream) {
        const dlh::GatedBwdArgs args{dy,        gate,         up,         dgate, dup,   M,     N,
                                     stride_dy, stride_gate,  stride_up,  stride_dgate, stride_dup,
                                     act,       dtype,        stream};
        py::gil_scoped_release no_gil;
        dlh::gated_bwd(args);
      },
      py::arg("dy"), py::arg("gate"), py::arg("up"), py::arg("dgate"), py::arg("dup"), py::arg("M"), py::arg("N"),
      py::arg("stride_dy"), py::arg("stride_gate"), py::arg("stride_up"), py::arg("stride_dgate"),
      py::arg("stride_dup"), py::arg("act"), py::arg("dtype"), py::arg("stream"),
      "Backward of gated_fwd: dgate = dy * up * a'(gate), dup = dy * a(gate).");

  // ---- linear.cu ----------------------------------------------------------------------------------
  // y = act(x @ w^T + bias) (activation codes as conv2d_fwd's), or with dy: y = dy * act'(z), the
  // backward's dz. fp16/bf16 on tensor cores (mma.sync, sm_80+), fp32 on CUDA cores (no TF32).
  m.def(
      "linear_fwd",
      [](ptr_t x, ptr_t w, ptr_t bias, ptr_t dy, ptr_t y, int64_t M, int64_t N, int64_t K, int64_t stride_x,
         int64_t stride_w, int64_t stride_dy, int64_t stride_y, bool w_k_contiguous, int activation,
         double negative_slope, int dtype, ptr_t stream) {
        const dlh::LinearArgs args{x,        w,        bias,     dy,       y,
                                   M,        N,        K,        stride_x, stride_w,
                                   stride_dy, stride_y, w_k_contiguous, activation,
                                   static_cast<float>(negative_slope), dtype, stream};
        py::gil_scoped_release no_gil;
        dlh::linear_fwd(args);
      },
      py::arg("x"), py::arg("w"), py::arg("bias"), py::arg("dy"), py::arg("y"), py::arg("M"), py::arg("N"),
      py::arg("K"), py::arg("stride_x"), py::arg("stride_w"), py::arg("stride_dy"), py::arg("stride_y"),
      py::arg("w_k_contiguous"), py::arg("activation"), py::arg("negative_slope"), py::arg("dtype"),
      py::arg("stream"),
      "y = act(x @ w^T + bias), or dy * act'(x @ w^T + bias) when dy is given: x (M, K) rows (row stride\n"
      "stride_x), w (N, K) with w[n*stride_w + k] (w_k_contiguous) or w[k*stride_w + n], y and dy (M, N)\n"
      "rows; one dtype (0 fp32, 1 fp16, 2 bf16); bias (N,) and dy optional (0).");

  // ---- rotary.cu ----------------------------------------------------------------------------------
  m.def(
      "rotary",
      [](ptr_t q, ptr_t k, ptr_t q_out, ptr_t k_out, ptr_t cos, ptr_t sin, int64_t B, int64_t Hq, int64_t Hk,
         int64_t S, int64_t D, int64_t R, py::sequence strides, bool interleaved, bool backward, int dtype,
         int cs_dtype, ptr_t stream) {
        dlh::check_arg(py::len(strides) == 16, "rotary",
                       "strides must hold 16 values (q, k, q_out, k_out: 3 each; cos, sin: 2 each)");
        dlh::RotaryArgs args{q, k, q_out, k_out, cos, sin, B, Hq, Hk, S, D, R, {},
                             interleaved, backward, dtype, cs_dtype, stream};
        for (int i = 0; i < 16; ++i) args.strides[i] = strides[i].cast<int64_t>();
        py::gil_scoped_release no_gil;
        dlh::rotary(args);
      },
      py::arg("q"), py::arg("k"), py::arg("q_out"), py::arg("k_out"), py::arg("cos"), py::arg("sin"), py::arg("B"),
      py::arg("Hq"), py::arg("Hk"), py::arg("S"), py::arg("D"), py::arg("R"), py::arg("strides"),
      py::arg("interleaved"), py::arg("backward"), py::arg("dtype"), py::arg("cs_dtype"), py::arg("stream"),
      "Rotary embedding of q (B, Hq, S, D) and k (B, Hk, S, D; 0 and Hk = 0 when absent) in one launch:\n"
      "the first R elements of each row rotate by cos/sin (B or 1, S or 1, R), the rest pass through;\n"
      "interleaved: GPT-J pairs (2i, 2i+1), else (i, i + R/2); backward: the transpose (dy -> dx).");
}
