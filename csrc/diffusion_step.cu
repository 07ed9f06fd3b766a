// diffusion_step.cu: one reverse diffusion step (DDPM, DDIM, the sampler's linear interpolation)
// with fused classifier-free guidance, x0 clipping and in-kernel Philox noise; and that noise
// stream on its own (seeded_randn).
//
// Math (all in fp32; the table differences 1 - a and a_p - a_t in the table's dtype, where they
// are exact), a_t = table[t], a_p = table[prev] (1 when prev < 0: the final step):
//   guidance   m = u + w*(c - u)
//   x0         epsilon: (x - sqrt(1 - a_t)*m)/sqrt(a_t);  v_prediction: sqrt(a_t)*x - sqrt(1 - a_t)*m;
//              sample: m;  then optionally clamped to [-clip, clip]
//   DDPM       beta = (a_p - a_t)/a_p,  var = (1 - a_p)/(1 - a_t)*beta  (>= 1e-20, diffusers' clamp)
//              x_prev = sqrt(a_p)*beta/(1 - a_t)*x0 + sqrt(a_t/a_p)*(1 - a_p)/(1 - a_t)*x
//                       + [t > 0]*sqrt(var)*z
//   DDIM       eps_hat from the unclipped x0 (epsilon: m; v: sqrt(a_t)*m + sqrt(1 - a_t)*x;
//              sample: (x - sqrt(a_t)*m)/sqrt(1 - a_t)),  sigma = eta*sqrt(var),
//              dir = sqrt((1 - a_p)*((1 - eta^2) + eta^2*a_t*(1 - a_p)/(a_p*(1 - a_t))))
//                  (= sqrt(1 - a_p - sigma^2) without cancellation; clamped at 0 for eta > 1)
//              x_prev = sqrt(a_p)*x0 + dir*eps_hat + sigma*z
//   interp     (the table holds the interpolation times s; s_p = 0 when prev < 0)
//              x0: epsilon (x - s*m)/(1 - s), v_prediction x - s*m, sample m;
//              x_prev = (s_p/s)*x + (1 - s_p/s)*x0
//   All of them are x_prev = P*x0 + Q*x + R*m + S*z with x0 = CX*x + CM*m: the coefficients
//   depend on the timesteps only (computed once per thread for one timestep, per batch element
//   otherwise). A timestep outside the table writes NaN: the host cannot see a device value
//   without a sync, and NaN is visible where a clamp would be silently wrong.
//
// Noise z (noise_mode 2): the stream of Triton's tl.randn(seed, i), i the element's logical
// row-major index: Philox4x32-10 keyed by the 64-bit seed (k0 = low word, k1 = high word),
// counter (i_lo, i_hi, 0, 0); words 0 and 1 become uniforms in [0, 1) (as int32, ~x if negative,
// times 4.6566127342e-10) and one Box-Muller normal, r*cos(2*pi*u2) with r = sqrt(-2 log u1),
// u1 >= 1e-7. Same stream as the Triton kernel and the torch reference; the values agree to the
// rounding of logf/cosf/sqrtf (not bitwise). The seed is a value or a pointer to one int64
// (read on the device: a captured CUDA graph replays with whatever the tensor holds).
//
// Memory traffic per element, s = sizeof(T): read x, m (+u with guidance, +z when given), write
// x_prev: 3s to 5s. A 4x4x64x64 latent step is ~200 KB, well under a microsecond of DRAM time:
// the step is bound by its launch. Philox costs ~70 integer ops per element, also far below it.
//
// Layout: logical index i over the shape collapsed (by the caller) to 4 dims, a stride per dim
// for each tensor; kContig: every tensor contiguous, offset = i. Offsets are 64-bit.
//
// Version history
//   v1: grid-stride loop, 4 elements per thread, scalar (coalesced) loads, one template per
//       (dtype, table dtype, contiguous); method, prediction, noise, guidance and clipping are
//       uniform runtime branches. Compiled for sm_80/sm_90; checked against float64 on the CPU
//       through tests/test_cuda_build.py's CUDA emulation. Not yet run on a GPU: no timings.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>

#include "common.cuh"

namespace dlh {
namespace {

constexpr int kThreads = 256;
constexpr int kElemsPerThread = 4;        // grid-stride trips per thread at full grid
constexpr int64_t kMaxBlocks = 1 << 16;   // beyond this the grid-stride loop takes over
constexpr float kMinVariance = 1e-20f;    // diffusers' clamp of the fixed_small variance

enum Method : int { kDdpm = 0, kDdim = 1, kInterp = 2 };
enum Prediction : int { kEpsilon = 0, kVPrediction = 1, kSample = 2 };
enum NoiseMode : int { kNoNoise = 0, kGivenNoise = 1, kDrawnNoise = 2 };

struct StepParams {
  const void* x;
  const void* m;
  const void* u;
  const void* z;
  void* out;
  const void* table;
  const int64_t* t;
  const int64_t* pt;
  const int64_t* seed;
  int64_t t_value, pt_value, seed_value, t_stride, pt_stride, n, per_batch, n_table;
  int64_t d1, d2, d3;
  int64_t stride[5][4];  // x, m, u, z, out
  float eta, clip_range, guidance_scale;
  int method, prediction, noise_mode;
  bool clip, guidance;
};

// ---- the noise stream --------------------------------------------------------------------------
// tl.randn(seed, index): Philox4x32-10 (common.cuh), then Box-Muller of words 0 and 1.
__device__ __forceinline__ float philox_normal(uint64_t seed, uint64_t index) {
  uint32_t c0, c1;
  philox_words(seed, index, c0, c1);
  const float u1 = fmaxf(1.0e-7f, uniform01(c0));
  const float u2 = uniform01(c1);
  return sqrtf(-2.0f * logf(u1)) * cosf(6.283185307179586f * u2);
}

// ---- the coefficients of one (t, prev) pair ---------------------------------------------------
struct Coeffs {
  float cx, cm, p, q, r, s;
  bool valid;
};

template <typename TableT>
__device__ Coeffs step_coeffs(const StepParams& P, int64_t t, int64_t pt) {
  Coeffs c;
  c.valid = t >= 0 && t < P.n_table && pt < P.n_table;
  const TableT* table = static_cast<const TableT*>(P.table);
  const int64_t last = P.n_table - 1;
  const TableT a_t = table[t < 0 ? 0 : (t > last ? last : t)];
  const TableT a_prev = table[pt < 0 ? 0 : (pt > last ? last : pt)];
  if (P.method == kInterp) {
    const TableT s_p = pt < 0 ? TableT(0) : a_prev;
    const float s_t = static_cast<float>(a_t);
    c.q = static_cast<float>(s_p) / s_t;
    c.p = 1.f - c.q;
    c.r = 0.f;
    c.s = 0.f;
    if (P.prediction == kEpsilon) {
      c.cx = 1.f / (1.f - s_t);
      c.cm = -s_t * c.cx;
    } else if (P.prediction == kVPrediction) {
      c.cx = 1.f;
      c.cm = -s_t;
    } else {
      c.cx = 0.f;
      c.cm = 1.f;
    }
    return c;
  }
  const TableT a_p = pt < 0 ? TableT(1) : a_prev;
  const float d_t = static_cast<float>(TableT(1) - a_t);  // exact for a >= 1/2 (Sterbenz)
  const float d_p = static_cast<float>(TableT(1) - a_p);
  const float diff = static_cast<float>(a_p - a_t);
  const float at = static_cast<float>(a_t), ap = static_cast<float>(a_p);
  const float sa = sqrtf(at), sb = sqrtf(d_t);
  if (P.prediction == kEpsilon) {
    c.cx = 1.f / sa;
    c.cm = -sb * c.cx;
  } else if (P.prediction == kVPrediction) {
    c.cx = sa;
    c.cm = -sb;
  } else {
    c.cx = 0.f;
    c.cm = 1.f;
  }
  const float beta = diff / ap;  // 1 - a_t/a_p without the cancellation
  const float var = d_p / d_t * beta;
  if (P.method == kDdpm) {
    c.p = sqrtf(ap) * beta / d_t;
    c.q = sqrtf(at / ap) * d_p / d_t;
    c.r = 0.f;
    c.s = t > 0 ? sqrtf(fmaxf(var, kMinVariance)) : 0.f;
  } else {
    const float e2 = P.eta * P.eta;
    const float keep = (1.f - e2) + e2 * (at * d_p) / (ap * d_t);
    const float dir = sqrtf(fmaxf(d_p * keep, 0.f));
    c.s = P.eta * sqrtf(var);
    c.p = sqrtf(ap);
    if (P.prediction == kEpsilon) {
      c.q = 0.f;
      c.r = dir;
    } else if (P.prediction == kVPrediction) {
      c.q = dir * sb;
      c.r = dir * sa;
    } else {
      c.q = dir / sb;
      c.r = -c.q * sa;
    }
  }
  return c;
}

__device__ __forceinline__ int64_t strided(const int64_t* s, int64_t i0, int64_t i1, int64_t i2, int64_t i3) {
  return i0 * s[0] + i1 * s[1] + i2 * s[2] + i3 * s[3];
}

template <typename T, typename TableT, bool kContig>
__global__ void __launch_bounds__(kThreads) diffusion_step_kernel(const StepParams P) {
  const T* x = static_cast<const T*>(P.x);
  const T* m = static_cast<const T*>(P.m);
  const T* u = static_cast<const T*>(P.u);
  const T* z = static_cast<const T*>(P.z);
  T* out = static_cast<T*>(P.out);
  const bool per_batch = (P.t != nullptr && P.t_stride != 0) || (P.pt != nullptr && P.pt_stride != 0);
  // One timestep for the whole batch: the coefficients once per thread, from the device values
  // (a broadcast load that every thread of the grid shares through L1/L2) or the host's.
  Coeffs c = step_coeffs<TableT>(P, P.t ? P.t[0] : P.t_value, P.pt ? P.pt[0] : P.pt_value);
  int64_t coeff_batch = 0;
  const uint64_t seed = P.noise_mode == kDrawnNoise
                            ? static_cast<uint64_t>(P.seed ? P.seed[0] : P.seed_value) : 0;
  const int64_t step = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < P.n; i += step) {
    if (per_batch) {
      const int64_t b = i / P.per_batch;
      if (b != coeff_batch) {  // consecutive elements of a thread rarely change batch element
        c = step_coeffs<TableT>(P, P.t ? P.t[b * P.t_stride] : P.t_value,
                                P.pt ? P.pt[b * P.pt_stride] : P.pt_value);
        coeff_batch = b;
      }
    }
    int64_t ox = i, om = i, ou = i, oz = i, oo = i;
    if constexpr (!kContig) {
      const int64_t i3 = i % P.d3;
      int64_t r = i / P.d3;
      const int64_t i2 = r % P.d2;
      r /= P.d2;
      const int64_t i1 = r % P.d1;
      const int64_t i0 = r / P.d1;
      ox = strided(P.stride[0], i0, i1, i2, i3);
      om = strided(P.stride[1], i0, i1, i2, i3);
      ou = strided(P.stride[2], i0, i1, i2, i3);
      oz = strided(P.stride[3], i0, i1, i2, i3);
      oo = strided(P.stride[4], i0, i1, i2, i3);
    }
    const float xv = to_float(x[ox]);
    float mv = to_float(m[om]);
    if (P.guidance) {
      const float uv = to_float(u[ou]);
      mv = uv + P.guidance_scale * (mv - uv);
    }
    float x0 = c.cx * xv + c.cm * mv;
    if (P.clip) x0 = fminf(fmaxf(x0, -P.clip_range), P.clip_range);
    float result = c.p * x0 + c.q * xv + c.r * mv;
    if (c.s != 0.f) {
      if (P.noise_mode == kGivenNoise) result += c.s * to_float(z[oz]);
      else if (P.noise_mode == kDrawnNoise) result += c.s * philox_normal(seed, static_cast<uint64_t>(i));
    }
    out[oo] = from_float<T>(c.valid ? result : NAN);
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) seeded_randn_kernel(T* out, const int64_t* seed_ptr,
                                                               int64_t seed_value, int64_t n) {
  const uint64_t seed = static_cast<uint64_t>(seed_ptr ? seed_ptr[0] : seed_value);
  const int64_t step = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += step)
    out[i] = from_float<T>(philox_normal(seed, static_cast<uint64_t>(i)));
}

int64_t grid_for(int64_t n) {
  return std::max<int64_t>(1, std::min(kMaxBlocks, (n + kThreads * kElemsPerThread - 1) /
                                                       (kThreads * kElemsPerThread)));
}

template <typename T, typename TableT>
void launch_step(const StepParams& P, bool contig, cudaStream_t stream) {
  const int64_t blocks = grid_for(P.n);
  if (contig) {
    diffusion_step_kernel<T, TableT, true><<<blocks, kThreads, 0, stream>>>(P);
  } else {
    diffusion_step_kernel<T, TableT, false><<<blocks, kThreads, 0, stream>>>(P);
  }
  check_launch("diffusion_step_kernel");
}

}  // namespace

void diffusion_step(const DiffusionStepArgs& a) {
  const char* fn = "diffusion_step";
  check_dtype_code(a.dtype, fn, "dtype");
  check_arg(a.n >= 0, fn, "n must be >= 0, got " + std::to_string(a.n));
  check_arg(a.method >= kDdpm && a.method <= kInterp, fn,
            "method must be 0 (ddpm), 1 (ddim) or 2 (interp), got " + std::to_string(a.method));
  check_arg(a.prediction >= kEpsilon && a.prediction <= kSample, fn,
            "prediction must be 0 (epsilon), 1 (v_prediction) or 2 (sample), got " +
                std::to_string(a.prediction));
  check_arg(a.noise_mode >= kNoNoise && a.noise_mode <= kDrawnNoise, fn,
            "noise_mode must be 0 (none), 1 (given) or 2 (drawn), got " + std::to_string(a.noise_mode));
  check_arg(a.n_table >= 1, fn, "n_table must be >= 1, got " + std::to_string(a.n_table));
  check_arg(a.eta >= 0.f, fn, "eta must be >= 0");
  if (a.n == 0) return;
  check_arg(a.x && a.m && a.out && a.table, fn, "x, m, out and table are required");
  check_arg(!a.guidance || a.u, fn, "u (the unconditional output) is required with guidance");
  check_arg(a.noise_mode != kGivenNoise || a.z, fn, "z is required with noise_mode 1 (given)");
  check_arg(a.noise_mode != kDrawnNoise || a.seed || a.seed_value >= 0, fn,
            "seed_value must be >= 0, got " + std::to_string(a.seed_value));
  check_arg(a.t || (a.t_value >= 0 && a.t_value < a.n_table), fn,
            "t_value must be in [0, n_table), got " + std::to_string(a.t_value));
  check_arg(a.pt || a.pt_value < a.n_table, fn,
            "pt_value must be < n_table, got " + std::to_string(a.pt_value));
  check_arg(a.t_stride >= 0, fn, "t_stride must be >= 0");
  check_arg(a.pt_stride >= 0, fn, "pt_stride must be >= 0");
  check_arg(a.per_batch >= 1, fn, "per_batch must be >= 1");
  check_arg(a.dims[0] >= 1 && a.dims[1] >= 1 && a.dims[2] >= 1 && a.dims[3] >= 1 &&
                a.dims[0] * a.dims[1] * a.dims[2] * a.dims[3] == a.n,
            fn, "dims must be positive with product n");
  StepParams P;
  P.x = reinterpret_cast<const void*>(a.x);
  P.m = reinterpret_cast<const void*>(a.m);
  P.u = reinterpret_cast<const void*>(a.u);
  P.z = reinterpret_cast<const void*>(a.z);
  P.out = reinterpret_cast<void*>(a.out);
  P.table = reinterpret_cast<const void*>(a.table);
  P.t = reinterpret_cast<const int64_t*>(a.t);
  P.pt = reinterpret_cast<const int64_t*>(a.pt);
  P.seed = reinterpret_cast<const int64_t*>(a.seed);
  P.t_value = a.t_value;
  P.pt_value = a.pt_value;
  P.seed_value = a.seed_value;
  P.t_stride = a.t_stride;
  P.pt_stride = a.pt_stride;
  P.n = a.n;
  P.per_batch = a.per_batch;
  P.n_table = a.n_table;
  P.d1 = a.dims[1];
  P.d2 = a.dims[2];
  P.d3 = a.dims[3];
  for (int k = 0; k < 5; ++k)
    for (int d = 0; d < 4; ++d) P.stride[k][d] = a.strides[4 * k + d];
  P.eta = a.eta;
  P.clip_range = a.clip_range;
  P.guidance_scale = a.guidance_scale;
  P.method = a.method;
  P.prediction = a.prediction;
  P.noise_mode = a.noise_mode;
  P.clip = a.clip;
  P.guidance = a.guidance;
  const cudaStream_t stream = as_stream(a.stream);
  dispatch_dtype(a.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    if (a.table_f64) launch_step<T, double>(P, a.contig, stream);
    else launch_step<T, float>(P, a.contig, stream);
  });
}

void seeded_randn(const SeededRandnArgs& a) {
  const char* fn = "seeded_randn";
  check_dtype_code(a.dtype, fn, "dtype");
  check_arg(a.n >= 0, fn, "n must be >= 0, got " + std::to_string(a.n));
  check_arg(a.seed || a.seed_value >= 0, fn, "seed_value must be >= 0, got " + std::to_string(a.seed_value));
  if (a.n == 0) return;
  check_arg(a.out != 0, fn, "out is required");
  const cudaStream_t stream = as_stream(a.stream);
  const int64_t* seed = reinterpret_cast<const int64_t*>(a.seed);
  dispatch_dtype(a.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    seeded_randn_kernel<T><<<grid_for(a.n), kThreads, 0, stream>>>(reinterpret_cast<T*>(a.out), seed,
                                                                     a.seed_value, a.n);
    check_launch("seeded_randn_kernel");
  });
}

}  // namespace dlh
