// common.cuh: what every csrc/ file shares.
//
// The extension never links libtorch. Python hands us raw device pointers (as integers, 0 for
// "absent"), sizes, row strides in elements, dtype codes and the CUDA stream; torch owns every
// allocation. This header therefore has two halves:
//   * plain C++ (visible to g++ compiling bindings.cpp): dtype codes, argument validation,
//     ceil_div/round_up and the host entry points each .cu file exports;
//   * CUDA only (under __CUDACC__): launch checking, fp16/bf16 <-> fp32 conversion, 16-byte
//     vector loads and stores, warp and block reductions and the dtype dispatchers.
// Kernel launches (<<<...>>>), __shared__ declarations and __launch_bounds__ stay in the .cu
// files: the CPU emulation (tests/cuda_emu) rewrites them there, and never rewrites this header.
// Errors: bad arguments throw std::invalid_argument (Python ValueError), CUDA failures throw
// std::runtime_error("dlh::<kernel>: <cuda error string>") (Python RuntimeError).
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>

namespace dlh {

// dtype codes shared with the Python side.
enum DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

inline bool valid_dtype(int code) { return code == kFloat32 || code == kFloat16 || code == kBFloat16; }

inline int dtype_size(int code) { return code == kFloat32 ? 4 : 2; }

inline void check_arg(bool ok, const char* fn, const std::string& what) {
  if (!ok) throw std::invalid_argument(std::string("dlh::") + fn + ": " + what);
}

inline void check_dtype_code(int code, const char* fn, const char* arg) {
  check_arg(valid_dtype(code), fn,
            std::string(arg) + " must be 0 (float32), 1 (float16) or 2 (bfloat16), got " +
                std::to_string(code));
}

inline void check_present(const char* fn, const char* name, std::uintptr_t ptr) {
  check_arg(ptr != 0, fn, std::string(name) + " is required (got a null pointer)");
}

inline void check_sm_count(const char* fn, int sm_count) {
  check_arg(sm_count >= 1, fn, "sm_count must be >= 1, got " + std::to_string(sm_count));
}

// Host-side sizing arithmetic (positive b).
inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline int64_t round_up(int64_t a, int64_t b) { return ceil_div(a, b) * b; }

// ---------------------------------------------------------------------------------------------
// Host entry points. Each block is defined in the .cu file named in its heading and bound in
// bindings.cpp; the argument meanings are documented there.
// ---------------------------------------------------------------------------------------------

// layer_norm.cu: LayerNorm / RMSNorm, optionally fused with a residual add.
struct NormFwdArgs {
  std::uintptr_t x, res, w, b, y, h, mean, rstd, workspace;
  int64_t M, N, stride_x, stride_res, stride_y, stride_h;
  float eps;
  bool rms;
  int x_dtype, w_dtype, sm_count;
  std::uintptr_t stream;
};
struct NormBwdArgs {
  std::uintptr_t dy, h, w, mean, rstd, dh_out, dx, dw, db, workspace;
  int64_t M, N, stride_dy, stride_h, stride_dh, stride_dx;
  bool rms;
  int x_dtype, w_dtype, sm_count;
  std::uintptr_t stream;
};
int64_t norm_fwd_workspace(int64_t M, int64_t N, int sm_count);
void norm_fwd(const NormFwdArgs& args);
int64_t norm_bwd_workspace(int64_t M, int64_t N, int sm_count);
void norm_bwd(const NormBwdArgs& args);

// gelu.cu: GELU (exact erf form, or tanh = true for approximate="tanh"), optionally after a bias
// add, and GeGLU (a * gelu(g) over the two halves of each row of x), forward and backward.
struct GeluFwdArgs {
  std::uintptr_t x, bias, y;
  int64_t M, N, stride_x, stride_y;
  bool tanh;
  int x_dtype, bias_dtype;
  std::uintptr_t stream;
};
struct GeluBwdArgs {
  std::uintptr_t dy, x, bias, dx, dbias, workspace;
  int64_t M, N, stride_dy, stride_x, stride_dx;
  bool tanh;
  int x_dtype, bias_dtype, sm_count;
  std::uintptr_t stream;
};
struct GegluFwdArgs {
  std::uintptr_t x, y;
  int64_t M, H, stride_x, stride_y;
  bool tanh;
  int dtype;
  std::uintptr_t stream;
};
struct GegluBwdArgs {
  std::uintptr_t dy, x, dx;
  int64_t M, H, stride_dy, stride_x, stride_dx;
  bool tanh;
  int dtype;
  std::uintptr_t stream;
};
void gelu_fwd(const GeluFwdArgs& args);
int64_t gelu_bwd_workspace(int64_t M, int64_t N, int sm_count);
void gelu_bwd(const GeluBwdArgs& args);
void geglu_fwd(const GegluFwdArgs& args);
void geglu_bwd(const GegluBwdArgs& args);

// diffusion_step.cu: one reverse diffusion step (method 0 DDPM, 1 DDIM, 2 the sampler's linear
// interpolation; prediction 0 epsilon, 1 v_prediction, 2 sample) with optional guidance
// (m = u + guidance_scale*(m - u)) and x0 clipping, and its Philox noise stream. Timesteps and
// the seed are values, or device pointers to int64 (t/pt: one value with stride 0, or one per
// batch element, t_stride apart) read by the kernel. noise_mode: 0 none, 1 given (z), 2 drawn from the seed.
// Layout: n elements over dims (4, collapsed by the caller), strides[4*k + d] for tensor k of
// (x, m, u, z, out); contig: every tensor contiguous.
struct DiffusionStepArgs {
  std::uintptr_t x, m, u, z, out, table, t, pt, seed;
  int64_t t_value, pt_value, seed_value, t_stride, pt_stride, n, per_batch, n_table;
  int64_t dims[4];
  int64_t strides[20];
  float eta, clip_range, guidance_scale;
  int method, prediction, noise_mode;
  bool clip, guidance, contig;
  int dtype;
  bool table_f64;
  std::uintptr_t stream;
};
struct SeededRandnArgs {
  std::uintptr_t out, seed;
  int64_t seed_value, n;
  int dtype;
  std::uintptr_t stream;
};
void diffusion_step(const DiffusionStepArgs& args);
void seeded_randn(const SeededRandnArgs& args);

// group_norm.cu: GroupNorm of (N, C, S) tensors (S: the spatial dims collapsed into one stride)
// in G groups, with an optional SiLU after the affine, forward and backward. channels_inner
// picks the unit-stride dim of every tensor: channels (channels_last) or spatial (NCHW).
// mean/rstd: (N*G,) fp32. dw/db (backward, optional): (C,) fp32, overwritten.
struct GroupNormFwdArgs {
  std::uintptr_t x, w, b, y, mean, rstd, workspace;
  int64_t N, C, S, G;
  int64_t stride_xn, stride_xc, stride_xs, stride_yn, stride_yc, stride_ys;
  float eps;
  bool silu, channels_inner;
  int x_dtype, w_dtype, sm_count;
  std::uintptr_t stream;
};
struct GroupNormBwdArgs {
  std::uintptr_t dy, x, w, b, mean, rstd, dx, dw, db, workspace;
  int64_t N, C, S, G;
  int64_t stride_dyn, stride_dyc, stride_dys, stride_xn, stride_xc, stride_xs;
  int64_t stride_dxn, stride_dxc, stride_dxs;
  bool silu, channels_inner;
  int x_dtype, w_dtype, sm_count;
  std::uintptr_t stream;
};
int64_t group_norm_fwd_workspace(int64_t N, int64_t C, int64_t S, int64_t G, bool channels_inner,
                                 int x_dtype, int sm_count);
void group_norm_fwd(const GroupNormFwdArgs& args);
int64_t group_norm_bwd_workspace(int64_t N, int64_t C, int64_t S, int64_t G, bool channels_inner,
                                 int x_dtype, int sm_count);
void group_norm_bwd(const GroupNormBwdArgs& args);

// conv2d.cu: 2D convolution forward, NHWC, fused bias + activation. x (N, H, W, C), w (K, R, S,
// C/groups), y (N, OH, OW, K), all contiguous, in one dtype (bias (K,) too; 0 when absent).
// activation: 0 none, 1 relu, 2 silu, 3 gelu (erf), 4 gelu_tanh, 5 leaky_relu(negative_slope).
struct Conv2dFwdArgs {
  std::uintptr_t x, w, bias, y;
  int64_t N, H, W, C, K, R, S, OH, OW, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, groups;
  int activation;
  float negative_slope;
  int dtype;
  std::uintptr_t stream;
};
void conv2d_fwd(const Conv2dFwdArgs& args);

// attention.cu: scaled-dot-product attention on fp16/bf16 tensor cores (sm_80+), forward and
// backward. q (B, Hq, L, D), k/v (B, Hkv, S, D), out (B, Hq, L, D), lse (B, Hq, L) fp32 base-2
// log-sum-exp (+inf for a row that sees no key); Hq a multiple of Hkv (grouped heads). strides:
// (batch, head, seq) per tensor in elements, the head dim contiguous; then the mask's (batch,
// head, row, col), 0 for broadcast dims. mask_kind: 0 none, 1 bool (1 byte, nonzero attends),
// 2 fp32 added to the scaled scores. causal: key j attends query i iff j <= i (top-left).
// dropout_p > 0: seed points at the int64 Philox seed on the device (the Triton kernels' stream).
struct AttentionFwdArgs {
  std::uintptr_t q, k, v, mask, seed, out, lse;
  int64_t B, Hq, Hkv, L, S, D;
  int64_t strides[16];  // q, k, v, out (3 each), mask (4)
  int mask_kind;
  float scale, dropout_p;
  bool causal;
  int dtype;
  std::uintptr_t stream;
};
// Backward: dq (B, Hq, L, D), dk/dv (B, Hkv, S, D) overwritten (dk/dv summed over each group's
// query heads); delta: (B, Hq, L) fp32 scratch; dscores (optional, 0: none): (B, Hq, L, S) fp32,
// zero-filled by the caller, gets dS (the gradient of the scores = of an additive mask).
struct AttentionBwdArgs {
  std::uintptr_t dout, q, k, v, out, lse, mask, seed, dq, dk, dv, delta, dscores;
  int64_t B, Hq, Hkv, L, S, D;
  int64_t strides[28];  // dout, q, k, v, out, dq, dk, dv (3 each), mask (4)
  int mask_kind;
  float scale, dropout_p;
  bool causal;
  int dtype;
  std::uintptr_t stream;
};
bool attention_head_dim_supported(int64_t D, bool backward);
void attention_fwd(const AttentionFwdArgs& args);
void attention_bwd(const AttentionBwdArgs& args);

// rotary.cu: rotary position embedding of q (B, Hq, S, D) and k (B, Hk, S, D; 0/Hk = 0 when
// absent) in one launch: the first R (even, <= D) elements of each row rotate by cos/sin
// (B or 1, S or 1, R), the rest pass through to q_out/k_out. interleaved: pairs (2i, 2i+1)
// (GPT-J), else (i, i + R/2) (LLaMA). backward: the transpose (dy in, dx out). strides: (batch,
// head, seq) of q, k, q_out, k_out (3 each, unit stride on D), then (batch, seq) of cos and sin
// (0 for a broadcast dim). dtype: q/k; cs_dtype: cos/sin, float32 or dtype (rounded to dtype).
struct RotaryArgs {
  std::uintptr_t q, k, q_out, k_out, cos, sin;
  int64_t B, Hq, Hk, S, D, R;
  int64_t strides[16];
  bool interleaved, backward;
  int dtype, cs_dtype;
  std::uintptr_t stream;
};
void rotary(const RotaryArgs& args);

// linear.cu: y = act(x @ w^T + bias) (activation codes as conv2d.cu's), or, with dy, the
// backward's y = dy * act'(x @ w^T + bias). x (M, K) rows with row stride stride_x (unit column
// stride); w (N, K): w_k_contiguous = true: w[n * stride_w + k] (nn.Linear's layout), false:
// w[k * stride_w + n] (a transposed view, e.g. GPT-2 Conv1D's weight.t()); y, dy (M, N) rows.
// One dtype for x, w, bias (N,) (0: none), dy and y.
struct LinearArgs {
  std::uintptr_t x, w, bias, dy, y;
  int64_t M, N, K, stride_x, stride_w, stride_dy, stride_y;
  bool w_k_contiguous;
  int activation;
  float negative_slope;
  int dtype;
  std::uintptr_t stream;
};
void linear_fwd(const LinearArgs& args);

// activation.cu: pointwise activations y = f(x), act 0 silu, 1 relu, 2 leaky_relu(negative_slope),
// and gated ones y = a(gate) * up, act 0 silu (SwiGLU), 1 gelu (erf), 2 gelu (tanh); forward and
// backward (dx = dy * f'(x); dgate = dy * up * a'(gate), dup = dy * a(gate)). Every tensor an
// (M, N) row view with its own row stride (elements); outputs may be their input (in place).
struct ActivationFwdArgs {
  std::uintptr_t x, y;
  int64_t M, N, stride_x, stride_y;
  int act;
  float negative_slope;
  int dtype;
  std::uintptr_t stream;
};
struct ActivationBwdArgs {
  std::uintptr_t dy, x, dx;
  int64_t M, N, stride_dy, stride_x, stride_dx;
  int act;
  float negative_slope;
  int dtype;
  std::uintptr_t stream;
};
struct GatedFwdArgs {
  std::uintptr_t gate, up, y;
  int64_t M, N, stride_gate, stride_up, stride_y;
  int act;
  int dtype;
  std::uintptr_t stream;
};
struct GatedBwdArgs {
  std::uintptr_t dy, gate, up, dgate, dup;
  int64_t M, N, stride_dy, stride_gate, stride_up, stride_dgate, stride_dup;
  int act;
  int dtype;
  std::uintptr_t stream;
};
void activation_fwd(const ActivationFwdArgs& args);
void activation_bwd(const ActivationBwdArgs& args);
void gated_fwd(const GatedFwdArgs& args);
void gated_bwd(const GatedBwdArgs& args);

}  // namespace dlh

#ifdef __CUDACC__
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

namespace dlh {

// Called right after every launch: a bad configuration, a missing device or a missing driver all
// surface here, as a C++ exception rather than a later, unrelated failure.
inline void check_launch(const char* kernel) {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess)
    throw std::runtime_error(std::string("dlh::") + kernel + ": " + cudaGetErrorString(err));
}

inline cudaStream_t as_stream(std::uintptr_t handle) { return reinterpret_cast<cudaStream_t>(handle); }

inline bool aligned16(std::uintptr_t ptr) { return ptr % 16 == 0; }

// ---- element conversion: all arithmetic is fp32, storage is T -------------------------------
__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// ---- vector access ---------------------------------------------------------------------------
// A Pack is what one 16-byte (or narrower) load or store moves; alignas makes the compiler emit
// a single LDG.128 / STG.128 for it.
template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

// Elements of T in one 16-byte access.
template <typename T>
constexpr int kVec16 = 16 / static_cast<int>(sizeof(T));

// Reads VEC consecutive elements row[col .. col+VEC) into out[] as fp32; columns >= end read as 0.
// `vec_ok` promises that row is 16-byte aligned and col is a multiple of VEC, so that the whole
// group can move as 16-byte packs (two packs when VEC fp32 weights span 32 bytes). Otherwise
// (misaligned tensor, or the group straddles the end of the row) it falls back to scalar loads.
// `row` already points at the start of the caller's tile, so col and end are small 32-bit
// offsets; all 64-bit arithmetic happens once, when the tile pointer is formed.
template <int VEC, typename T>
__device__ __forceinline__ void load_group(const T* row, int col, int end, bool vec_ok, float* out) {
  constexpr int P = kVec16<T> < VEC ? kVec16<T> : VEC;
  if (vec_ok && col + VEC <= end) {
#pragma unroll
    for (int q = 0; q < VEC; q += P) {
      const Pack<T, P> pack = *reinterpret_cast<const Pack<T, P>*>(row + col + q);
#pragma unroll
      for (int k = 0; k < P; ++k) out[q + k] = to_float(pack.v[k]);
    }
  } else {
#pragma unroll
    for (int k = 0; k < VEC; ++k) out[k] = col + k < end ? to_float(row[col + k]) : 0.f;
  }
}

// Writes in[0..VEC) to row[col .. col+VEC) rounded to T; columns >= end are left untouched.
template <int VEC, typename T>
__device__ __forceinline__ void store_group(T* row, int col, int end, bool vec_ok, const float* in) {
  constexpr int P = kVec16<T> < VEC ? kVec16<T> : VEC;
  if (vec_ok && col + VEC <= end) {
#pragma unroll
    for (int q = 0; q < VEC; q += P) {
      Pack<T, P> pack;
#pragma unroll
      for (int k = 0; k < P; ++k) pack.v[k] = from_float<T>(in[q + k]);
      *reinterpret_cast<Pack<T, P>*>(row + col + q) = pack;
    }
  } else {
#pragma unroll
    for (int k = 0; k < VEC; ++k)
      if (col + k < end) row[col + k] = from_float<T>(in[k]);
  }
}

template <int VEC>
__device__ __forceinline__ void fill(float* out, float value) {
#pragma unroll
  for (int k = 0; k < VEC; ++k) out[k] = value;
}

// ---- reductions --------------------------------------------------------------------------------
// Butterfly (xor) reduction: every lane ends with the full sum, and since a+b == b+a exactly in
// IEEE arithmetic, every lane holds the bitwise same value. Needs all 32 lanes active.
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// Sums v over the blockDim.x threads that share a row (threadIdx.y picks the row). One warp per
// row (blockDim.x == 32): shuffles only, no barrier. Wider (then the block is that one row): the
// per-warp sums through `buf` (32 slots) and one barrier; every thread adds the per-warp sums in
// the same order, so all threads get bitwise the same result. The caller must not write `buf`
// again until every thread has passed another barrier (use a second buffer, or alternate two).
__device__ __forceinline__ float block_sum(float v, float* buf) {
  v = warp_sum(v);
  if (blockDim.x == 32) return v;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, warps = blockDim.x >> 5;
  if (lane == 0) buf[warp] = v;
  __syncthreads();
  float total = 0.f;
  for (int i = 0; i < warps; ++i) total += buf[i];
  return total;
}

// block_sum of two values at once (one barrier), e.g. sum and sum of squares.
__device__ __forceinline__ float2 block_sum2(float2 v, float2* buf) {
  v.x = warp_sum(v.x);
  v.y = warp_sum(v.y);
  if (blockDim.x == 32) return v;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, warps = blockDim.x >> 5;
  if (lane == 0) buf[warp] = v;
  __syncthreads();
  float2 total = make_float2(0.f, 0.f);
  for (int i = 0; i < warps; ++i) {
    total.x += buf[i].x;
    total.y += buf[i].y;
  }
  return total;
}

// ---- Triton's Philox stream ---------------------------------------------------------------------
// tl.rand / tl.randn (seed, index): Philox4x32-10 of the counter (index low word, index high
// word, 0, 0) keyed by the 64-bit seed (k0 = low word, k1 = high word); words 0 and 1 out.
__device__ __forceinline__ uint32_t mulhi32(uint32_t a, uint32_t b) {
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);  // one mul.hi.u32
}

// All four words (tl.randint4x; the attention kernels' dropout decides 4 keys with one call).
__device__ __forceinline__ void philox4(uint64_t seed, uint64_t index, uint32_t& w0, uint32_t& w1, uint32_t& w2,
                                        uint32_t& w3) {
  uint32_t c0 = static_cast<uint32_t>(index), c1 = static_cast<uint32_t>(index >> 32), c2 = 0, c3 = 0;
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
#pragma unroll
  for (int round = 0; round < 10; ++round) {
    const uint32_t hi_b = mulhi32(0xCD9E8D57u, c2), hi_a = mulhi32(0xD2511F53u, c0);
    const uint32_t lo_b = 0xCD9E8D57u * c2, lo_a = 0xD2511F53u * c0;
    c0 = hi_b ^ c1 ^ k0;
    c2 = hi_a ^ c3 ^ k1;
    c1 = lo_b;
    c3 = lo_a;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  w0 = c0;
  w1 = c1;
  w2 = c2;
  w3 = c3;
}

// Words 0 and 1 (tl.rand / tl.randn).
__device__ __forceinline__ void philox_words(uint64_t seed, uint64_t index, uint32_t& w0, uint32_t& w1) {
  uint32_t w2, w3;
  philox4(seed, index, w0, w1, w2, w3);
}

// Triton's uint_to_uniform_float: a word to [0, 1).
__device__ __forceinline__ float uniform01(uint32_t word) {
  int32_t v = static_cast<int32_t>(word);
  if (v < 0) v = ~v;
  return static_cast<float>(v) * 4.6566127342e-10f;
}

// tl.rand(seed, index)
__device__ __forceinline__ float philox_uniform(uint64_t seed, uint64_t index) {
  uint32_t w0, w1;
  philox_words(seed, index, w0, w1);
  return uniform01(w0);
}

// ---- dtype dispatch ----------------------------------------------------------------------------
template <typename T>
struct TypeTag {
  using type = T;
};

// Calls f(TypeTag<T>{}) for the storage type T of a dtype code the caller has already checked
// (anything but float32 and float16 is bfloat16).
template <typename F>
void dispatch_dtype(int dtype, F&& f) {
  switch (dtype) {
    case kFloat32: f(TypeTag<float>{}); break;
    case kFloat16: f(TypeTag<__half>{}); break;
    default: f(TypeTag<__nv_bfloat16>{}); break;
  }
}

// Calls f(TypeTag<T>{}, TypeTag<W>{}) for the activation type T (x_dtype) and the parameter type
// W (w_dtype), which is either float32 or T. Any other combination is a ValueError.
template <typename F>
void dispatch_norm_types(int x_dtype, int w_dtype, const char* fn, F&& f) {
  check_dtype_code(x_dtype, fn, "x_dtype");
  check_dtype_code(w_dtype, fn, "w_dtype");
  check_arg(w_dtype == kFloat32 || w_dtype == x_dtype, fn,
            "w_dtype must be float32 (0) or equal to x_dtype (" + std::to_string(x_dtype) +
                "), got " + std::to_string(w_dtype));
  const bool w_f32 = w_dtype == kFloat32;
  switch (x_dtype) {
    case kFloat32:
      f(TypeTag<float>{}, TypeTag<float>{});
      break;
    case kFloat16:
      if (w_f32) f(TypeTag<__half>{}, TypeTag<float>{});
      else f(TypeTag<__half>{}, TypeTag<__half>{});
      break;
    default:
      if (w_f32) f(TypeTag<__nv_bfloat16>{}, TypeTag<float>{});
      else f(TypeTag<__nv_bfloat16>{}, TypeTag<__nv_bfloat16>{});
      break;
  }
}

}  // namespace dlh
#endif  // __CUDACC__
