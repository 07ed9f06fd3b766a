// activation.cu: pointwise activations (SiLU, ReLU, LeakyReLU) and gated ones (SwiGLU, gated
// GELU), forward and backward.
//
// Math (all in fp32, whatever the storage dtype):
//   unary, y = f(x), dx = dy * f'(x):
//     silu (0):        f(x) = x * s,  s = sigmoid(x) = 1/(1 + exp(-x));  f'(x) = s * (1 + x*(1 - s))
//     relu (1):        f(x) = x > 0 ? x : 0;                              f'(x) = x > 0 ? 1 : 0
//     leaky_relu (2):  f(x) = x > 0 ? x : slope*x;                        f'(x) = x > 0 ? 1 : slope
//     (relu keeps NaN as NaN like torch; the gradient at x = 0 is 0 (slope), as in torch.)
//   gated, y = a(g) * u over gate g and up u of the same shape:
//     dg = dy * u * a'(g),  du = dy * a(g)
//     a = silu (0: SwiGLU, LLaMA / Phi-3), gelu erf (1), gelu tanh (2: T5's gated-gelu); the GELU
//     forms are gelu.cu's: tanh as h*sigmoid(2u), no tanh of large arguments, no NaN at |h| -> inf.
//   exp(-x) overflows to inf for x < -88: s = 0 and x*s = -0, the right limit; no clamp needed.
//
// Memory traffic per element, s = sizeof(dtype); no other traffic (no workspace, no reduction):
//   activation_fwd: read x, write y                       = 2s
//   activation_bwd: read dy, x, write dx                  = 3s   (f' recomputed from x)
//   gated_fwd:      read g, u, write y                    = 3s
//   gated_bwd:      read dy, g, u, write dg, du           = 5s   (a(g), a'(g) recomputed)
//   All bandwidth-bound: an H100 has ~9 fp32 instructions per byte; silu's expf + division is
//   ~20 per element against a budget of ~36 (16-bit, forward). The goal is the copy ceiling.
//
// Layout. Every tensor is an (M, N) row view (unit column stride, its own row stride in
// elements: gate and up may be the two halves of one (M, 2N) matmul output). A thread moves
// groups of VEC = 16/s columns with one 16-byte load or store per tensor when every pointer is
// 16-byte aligned and every row stride is a multiple of 16 bytes (M == 1 needs none); otherwise
// the same kernels move each group element by element. Rows that are contiguous end to end (every
// stride == N) are run as one row of M*N elements, so short or odd rows still move in vectors.
// Blocks of 256 threads are (bx groups) x (by rows), bx the power of two that covers a row's
// groups (up to 256), so that short rows do not leave warps idle; a grid of at most
// sm_count * kBlocksPerSm blocks walks rows (y) and groups (x) with grid-stride loops, no integer
// division. All offsets are 64-bit.
//
// Version history
//   v1: grid-stride elementwise kernels, one template instantiation per (dtype, activation,
//       direction): 36 kernels of ~30 lines each; 16-byte vectors when everything is aligned, else
//       scalar (an offset view such as x[1:] goes scalar: gelu.cu's pad trick is not ported yet).
//       Checked against float64 on the CPU through tests/cuda_emu (alignment of every 16-byte
//       access, launch bounds); compiled for sm_80/sm_90. Not yet run or timed on a GPU.

#include <algorithm>
#include <atomic>
#include <type_traits>

#include "common.cuh"

namespace dlh {
namespace {

// ---- tuning constants (v1: reasoned, not measured) ------------------------------------------
constexpr int kThreads = 256;     // threads per block
constexpr int kBlocksPerSm = 8;   // 2048 resident threads per SM on sm_80/sm_90 / 256
constexpr int kMaxGridY = 65535;  // CUDA's limit on gridDim.y
constexpr int kMaxDevices = 64;   // sm-count cache

// Activation codes, shared with dlh_kernels/ops/activation.py.
enum UnaryAct : int { kSilu = 0, kRelu = 1, kLeakyRelu = 2 };
enum GatedAct : int { kGatedSilu = 0, kGatedGelu = 1, kGatedGeluTanh = 2 };

constexpr float kSqrt1_2 = 0.70710678118654752f;      // 1/sqrt(2)
constexpr float kInvSqrt2Pi = 0.39894228040143268f;   // 1/sqrt(2*pi)
constexpr float kSqrt2OverPi = 0.79788456080286536f;  // sqrt(2/pi)
constexpr float kTanhCoeff = 0.044715f;

// ---- the math ---------------------------------------------------------------------------------
// value = f(z) and grad = f'(z) of unary activation ACT; the forward uses only value (the compiler
// drops the rest).
template <int ACT>
__device__ __forceinline__ void unary_act(float z, float slope, float& value, float& grad) {
  if constexpr (ACT == kSilu) {
    const float s = 1.f / (1.f + expf(-z));
    value = z * s;
    grad = s * (1.f + z * (1.f - s));
  } else if constexpr (ACT == kRelu) {
    value = z < 0.f ? 0.f : z;  // NaN stays NaN
    grad = z > 0.f ? 1.f : 0.f;
  } else {
    value = z > 0.f ? z : z * slope;
    grad = z > 0.f ? 1.f : slope;
  }
}

template <int ACT>
__device__ __forceinline__ void gated_act(float g, float& value, float& grad) {
  if constexpr (ACT == kGatedSilu) {
    unary_act<kSilu>(g, 0.f, value, grad);
  } else if constexpr (ACT == kGatedGelu) {
    const float cdf = 0.5f * (1.f + erff(g * kSqrt1_2));
    value = g * cdf;
    grad = cdf + g * kInvSqrt2Pi * expf(-0.5f * g * g);
  } else {
    const float u = kSqrt2OverPi * g * (1.f + kTanhCoeff * g * g);
    // e = exp(-2u) clamped so that e*s*s stays finite; past the clamp s < 2e-35, every term ~0.
    const float e = expf(fminf(-2.f * u, 80.f));
    const float s = 1.f / (1.f + e);  // sigmoid(2u) = 0.5*(1 + tanh(u))
    value = g * s;
    grad = s + 2.f * g * (e * s * s) * kSqrt2OverPi * (1.f + 3.f * kTanhCoeff * g * g);
  }
}

// ---- row access -------------------------------------------------------------------------------
// The CPU emulation's hook on every 16-byte access (tests/cuda_emu counts them, to see which
// layouts take the vector path; misaligned ones are violations there, faults on a GPU).
#ifdef DLH_TEST_VECTOR_ACCESS
#define DLH_VECTOR_ACCESS(ptr) DLH_TEST_VECTOR_ACCESS(ptr)
#else
#define DLH_VECTOR_ACCESS(ptr) ((void)0)
#endif

// row[start .. start+VEC) as fp32: one 16-byte pack when `full` (the group lies inside the row
// and is aligned), else element by element with columns >= n read as 0.
template <int VEC, typename T>
__device__ __forceinline__ void load_span(const T* row, int64_t start, int64_t n, bool full, float* out) {
  if (full) {
    DLH_VECTOR_ACCESS(row + start);
    const Pack<T, VEC> pack = *reinterpret_cast<const Pack<T, VEC>*>(row + start);
#pragma unroll
    for (int k = 0; k < VEC; ++k) out[k] = to_float(pack.v[k]);
  } else {
#pragma unroll
    for (int k = 0; k < VEC; ++k) out[k] = start + k < n ? to_float(row[start + k]) : 0.f;
  }
}

// in[0..VEC) rounded to T into row[start .. start+VEC); columns >= n untouched.
template <int VEC, typename T>
__device__ __forceinline__ void store_span(T* row, int64_t start, int64_t n, bool full, const float* in) {
  if (full) {
    Pack<T, VEC> pack;
#pragma unroll
    for (int k = 0; k < VEC; ++k) pack.v[k] = from_float<T>(in[k]);
    DLH_VECTOR_ACCESS(row + start);
    *reinterpret_cast<Pack<T, VEC>*>(row + start) = pack;
  } else {
#pragma unroll
    for (int k = 0; k < VEC; ++k)
      if (start + k < n) row[start + k] = from_float<T>(in[k]);
  }
}

// The problem as rows of groups, set on the host.
struct Grid2d {
  int64_t M, N;  // rows, columns
  int64_t G;     // groups of VEC columns per row
  bool vec_ok;   // every pointer and row stride allows 16-byte packs
};

// body(row, start, full) for every group of VEC columns this thread owns: rows along y, groups
// along x, both grid-stride (no division; gridDim.y is capped at 65,535 by the host).
template <int VEC, typename F>
__device__ __forceinline__ void for_each_group(const Grid2d& t, F&& body) {
  const int64_t row_step = int64_t(gridDim.y) * blockDim.y;
  const int64_t group_step = int64_t(gridDim.x) * blockDim.x;
  for (int64_t row = int64_t(blockIdx.y) * blockDim.y + threadIdx.y; row < t.M; row += row_step) {
    for (int64_t g = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; g < t.G; g += group_step) {
      const int64_t start = g * VEC;
      body(row, start, t.vec_ok && start + VEC <= t.N);
    }
  }
}

// ---- kernels ----------------------------------------------------------------------------------
struct UnaryParams {
  const void* dy;  // backward: upstream gradient, (M, N), row stride stride_dy
  const void* x;   // input, (M, N), row stride stride_x
  void* out;       // forward: y; backward: dx; (M, N), row stride stride_out; may be x or dy (in place)
  int64_t stride_dy, stride_x, stride_out;
  Grid2d t;
  float slope;     // leaky_relu's negative_slope
};

template <typename T, int ACT, bool BACKWARD>
__global__ void __launch_bounds__(kThreads) activation_kernel(const UnaryParams p) {
  constexpr int VEC = kVec16<T>;
  for_each_group<VEC>(p.t, [&](int64_t row, int64_t start, bool full) {
    float x[VEC], dy[VEC], value, grad;
    load_span<VEC>(static_cast<const T*>(p.x) + row * p.stride_x, start, p.t.N, full, x);
    if constexpr (BACKWARD) load_span<VEC>(static_cast<const T*>(p.dy) + row * p.stride_dy, start, p.t.N, full, dy);
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      unary_act<ACT>(x[k], p.slope, value, grad);
      if constexpr (BACKWARD) x[k] = dy[k] * grad;
      else x[k] = value;
    }
    store_span<VEC>(static_cast<T*>(p.out) + row * p.stride_out, start, p.t.N, full, x);
  });
}

struct GatedParams {
  const void* dy;  // backward: upstream gradient, (M, N)
  const void* g;   // gate, (M, N)
  const void* u;   // up, (M, N)
  void* out0;      // forward: y; backward: dgate; (M, N)
  void* out1;      // backward: dup, (M, N)
  int64_t stride_dy, stride_g, stride_u, stride_out0, stride_out1;
  Grid2d t;
};

template <typename T, int ACT, bool BACKWARD>
__global__ void __launch_bounds__(kThreads) gated_kernel(const GatedParams p) {
  constexpr int VEC = kVec16<T>;
  for_each_group<VEC>(p.t, [&](int64_t row, int64_t start, bool full) {
    const int64_t n = p.t.N;
    float g[VEC], u[VEC], dy[VEC], value, grad;
    load_span<VEC>(static_cast<const T*>(p.g) + row * p.stride_g, start, n, full, g);
    load_span<VEC>(static_cast<const T*>(p.u) + row * p.stride_u, start, n, full, u);
    if constexpr (BACKWARD) {
      load_span<VEC>(static_cast<const T*>(p.dy) + row * p.stride_dy, start, n, full, dy);
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        gated_act<ACT>(g[k], value, grad);
        g[k] = dy[k] * u[k] * grad;  // dgate
        u[k] = dy[k] * value;        // dup
      }
      store_span<VEC>(static_cast<T*>(p.out0) + row * p.stride_out0, start, n, full, g);
      store_span<VEC>(static_cast<T*>(p.out1) + row * p.stride_out1, start, n, full, u);
    } else {
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        gated_act<ACT>(g[k], value, grad);
        g[k] = value * u[k];
      }
      store_span<VEC>(static_cast<T*>(p.out0) + row * p.stride_out0, start, n, full, g);
    }
  });
}

// ---- host helpers -------------------------------------------------------------------------------
void check_cuda(cudaError_t err, const char* kernel) {
  if (err == cudaSuccess) return;
  cudaGetLastError();  // clear it, so that it does not resurface at the next launch check
  throw std::runtime_error(std::string("dlh::") + kernel + ": " + cudaGetErrorString(err));
}

// SMs of the current device, cached per device.
int device_sm_count(const char* kernel) {
  static std::atomic<int> cache[kMaxDevices];
  int dev = 0;
  check_cuda(cudaGetDevice(&dev), kernel);
  if (dev >= 0 && dev < kMaxDevices) {
    const int cached = cache[dev].load(std::memory_order_relaxed);
    if (cached > 0) return cached;
  }
  int sms = 0;
  check_cuda(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev), kernel);
  sms = std::max(sms, 1);
  if (dev >= 0 && dev < kMaxDevices) cache[dev].store(sms, std::memory_order_relaxed);
  return sms;
}

// A tensor of the problem: its pointer and row stride (elements).
struct Operand {
  std::uintptr_t ptr;
  int64_t stride;
};

// The problem's Grid2d, with contiguous rows collapsed into one (every stride == N), and the
// launch shape: block (bx groups, by rows), grid capped at sm_count * kBlocksPerSm blocks.
template <typename T, size_t K>
Grid2d plan(int64_t M, int64_t N, Operand (&ops)[K], dim3* block, dim3* grid, const char* kernel) {
  constexpr int VEC = kVec16<T>;
  bool dense = M > 1;
  for (const Operand& o : ops) dense = dense && (!o.ptr || o.stride == N);
  if (dense) {
    N *= M;
    M = 1;
  }
  Grid2d t{M, N, ceil_div(N, VEC), true};
  for (const Operand& o : ops)
    if (o.ptr) t.vec_ok = t.vec_ok && aligned16(o.ptr) && (M == 1 || (o.stride * int64_t(sizeof(T))) % 16 == 0);
  int bx = 1;
  while (bx < kThreads && bx < t.G) bx *= 2;
  const int by = static_cast<int>(std::min<int64_t>(kThreads / bx, M));
  const int64_t target = int64_t(device_sm_count(kernel)) * kBlocksPerSm;
  const int64_t gx = std::min(ceil_div(t.G, bx), target);
  const int64_t gy = std::min({ceil_div(M, by), std::max<int64_t>(1, target / gx), int64_t(kMaxGridY)});
  *block = dim3(bx, by);
  *grid = dim3(static_cast<unsigned>(gx), static_cast<unsigned>(gy));
  return t;
}

// ---- argument checks ----------------------------------------------------------------------------
void check_size(const char* fn, const char* name, int64_t v) {
  check_arg(v >= 0, fn, std::string(name) + " must be >= 0, got " + std::to_string(v));
}

// Inputs may broadcast over rows (stride 0); outputs of more than one row must not overlap.
void check_stride(const char* fn, const char* name, int64_t stride, int64_t M, int64_t N, bool output) {
  const int64_t min_stride = output && M > 1 ? N : 0;
  check_arg(stride >= min_stride, fn,
            std::string(name) + " must be >= " + std::to_string(min_stride) + ", got " + std::to_string(stride));
}

void check_act(const char* fn, int act, const char* codes) {
  check_arg(act >= 0 && act <= 2, fn, std::string("act must be ") + codes + ", got " + std::to_string(act));
}

constexpr const char* kUnaryCodes = "0 (silu), 1 (relu) or 2 (leaky_relu)";
constexpr const char* kGatedCodes = "0 (silu), 1 (gelu) or 2 (gelu_tanh)";

// Calls f(std::integral_constant<int, ACT>{}) for a checked activation code 0..2.
template <typename F>
void dispatch_act(int act, F&& f) {
  switch (act) {
    case 0: f(std::integral_constant<int, 0>{}); break;
    case 1: f(std::integral_constant<int, 1>{}); break;
    default: f(std::integral_constant<int, 2>{}); break;
  }
}

template <bool BACKWARD>
void run_activation(const ActivationBwdArgs& a) {
  const char* name = BACKWARD ? "activation_bwd_kernel" : "activation_fwd_kernel";
  dispatch_dtype(a.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    Operand ops[] = {{a.dy, a.stride_dy}, {a.x, a.stride_x}, {a.dx, a.stride_dx}};
    dim3 block, grid;
    UnaryParams p{};
    p.t = plan<T>(a.M, a.N, ops, &block, &grid, name);
    p.dy = reinterpret_cast<const void*>(a.dy);
    p.x = reinterpret_cast<const void*>(a.x);
    p.out = reinterpret_cast<void*>(a.dx);
    p.stride_dy = a.stride_dy;
    p.stride_x = a.stride_x;
    p.stride_out = a.stride_dx;
    p.slope = a.negative_slope;
    dispatch_act(a.act, [&](auto act) {
      activation_kernel<T, decltype(act)::value, BACKWARD><<<grid, block, 0, as_stream(a.stream)>>>(p);
      check_launch(name);
    });
  });
}

template <bool BACKWARD>
void run_gated(const GatedBwdArgs& a) {
  const char* name = BACKWARD ? "gated_bwd_kernel" : "gated_fwd_kernel";
  dispatch_dtype(a.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    Operand ops[] = {{a.dy, a.stride_dy}, {a.gate, a.stride_gate}, {a.up, a.stride_up},
                     {a.dgate, a.stride_dgate}, {a.dup, a.stride_dup}};
    dim3 block, grid;
    GatedParams p{};
    p.t = plan<T>(a.M, a.N, ops, &block, &grid, name);
    p.dy = reinterpret_cast<const void*>(a.dy);
    p.g = reinterpret_cast<const void*>(a.gate);
    p.u = reinterpret_cast<const void*>(a.up);
    p.out0 = reinterpret_cast<void*>(a.dgate);
    p.out1 = reinterpret_cast<void*>(a.dup);
    p.stride_dy = a.stride_dy;
    p.stride_g = a.stride_gate;
    p.stride_u = a.stride_up;
    p.stride_out0 = a.stride_dgate;
    p.stride_out1 = a.stride_dup;
    dispatch_act(a.act, [&](auto act) {
      gated_kernel<T, decltype(act)::value, BACKWARD><<<grid, block, 0, as_stream(a.stream)>>>(p);
      check_launch(name);
    });
  });
}

// The forward's argument checks are the backward's without dy; dx (dgate) plays y.
void check_activation(const char* fn, const ActivationBwdArgs& a, bool backward) {
  check_size(fn, "M", a.M);
  check_size(fn, "N", a.N);
  check_dtype_code(a.dtype, fn, "dtype");
  check_act(fn, a.act, kUnaryCodes);
  if (a.M == 0 || a.N == 0) return;
  if (backward) check_present(fn, "dy", a.dy);
  check_present(fn, "x", a.x);
  check_present(fn, backward ? "dx" : "y", a.dx);
  if (backward) check_stride(fn, "stride_dy", a.stride_dy, a.M, a.N, false);
  check_stride(fn, "stride_x", a.stride_x, a.M, a.N, false);
  check_stride(fn, backward ? "stride_dx" : "stride_y", a.stride_dx, a.M, a.N, true);
}

void check_gated(const char* fn, const GatedBwdArgs& a, bool backward) {
  check_size(fn, "M", a.M);
  check_size(fn, "N", a.N);
  check_dtype_code(a.dtype, fn, "dtype");
  check_act(fn, a.act, kGatedCodes);
  if (a.M == 0 || a.N == 0) return;
  if (backward) check_present(fn, "dy", a.dy);
  check_present(fn, "gate", a.gate);
  check_present(fn, "up", a.up);
  check_present(fn, backward ? "dgate" : "y", a.dgate);
  if (backward) check_present(fn, "dup", a.dup);
  if (backward) check_stride(fn, "stride_dy", a.stride_dy, a.M, a.N, false);
  check_stride(fn, "stride_gate", a.stride_gate, a.M, a.N, false);
  check_stride(fn, "stride_up", a.stride_up, a.M, a.N, false);
  check_stride(fn, backward ? "stride_dgate" : "stride_y", a.stride_dgate, a.M, a.N, true);
  if (backward) check_stride(fn, "stride_dup", a.stride_dup, a.M, a.N, true);
}

}  // namespace

// ---- host entry points --------------------------------------------------------------------------
void activation_fwd(const ActivationFwdArgs& f) {
  const ActivationBwdArgs a{0, f.x, f.y, f.M, f.N, 0, f.stride_x, f.stride_y, f.act, f.negative_slope,
                            f.dtype, f.stream};
  check_activation("activation_fwd", a, false);
  if (a.M == 0 || a.N == 0) return;
  run_activation<false>(a);
}

void activation_bwd(const ActivationBwdArgs& a) {
  check_activation("activation_bwd", a, true);
  if (a.M == 0 || a.N == 0) return;
  run_activation<true>(a);
}

void gated_fwd(const GatedFwdArgs& f) {
  const GatedBwdArgs a{0, f.gate, f.up, f.y, 0, f.M, f.N, 0, f.stride_gate, f.stride_up, f.stride_y, 0,
                       f.act, f.dtype, f.stream};
  check_gated("gated_fwd", a, false);
  if (a.M == 0 || a.N == 0) return;
  run_gated<false>(a);
}

void gated_bwd(const GatedBwdArgs& a) {
  check_gated("gated_bwd", a, true);
  if (a.M == 0 || a.N == 0) return;
  run_gated<true>(a);
}

}  // namespace dlh
