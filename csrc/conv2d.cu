// conv2d.cu: 2D convolution forward (NHWC), fused with a bias and an activation.
//
// Math. x (N, H, W, C) NHWC contiguous, w (K, R, S, C/G) contiguous, y (N, OH, OW, K) NHWC
// contiguous, G groups (Cg = C/G input and Kg = K/G output channels per group):
//   y[n, oh, ow, g*Kg + kk] = act(bias[g*Kg + kk] +
//       sum_{r, s, c < Cg} x[n, oh*sh - ph + r*dh, ow*sw - pw + s*dw, g*Cg + c] * w[g*Kg + kk, r, s, c])
// (taps outside the image read as 0), OH = (H + 2*ph - dh*(R - 1) - 1)/sh + 1, likewise OW.
// Activations (fp32): 0 none, 1 relu, 2 silu = v*sigmoid(v), 3 gelu (erf), 4 gelu_tanh
// (PyTorch's 0.5*v*(1 + tanh(sqrt(2/pi)*(v + 0.044715 v^3))), computed as v*sigmoid(2u) like
// gelu.cu), 5 leaky_relu(negative_slope). All sums are fp32; y is rounded once, at its only store.
//
// Implicit GEMM view (per group g): A (M x Kgemm) with M = N*OH*OW rows (output pixels) and
// Kgemm = R*S*Cg columns ordered (r, s, c), c fastest, so that a row of A is a gather of R*S
// runs of Cg contiguous channels of x; B (Kgemm x Kg) is w itself (row kk of w is column kk of B,
// k contiguous); C = A*B is y's (M x Kg) column block of group g.
//
// Paths
//   * conv2d_igemm_kernel (fp16/bf16, Kg >= 8): tensor cores (mma.sync m16n8k16, fp32
//     accumulation), sm_80+. Block tile BM x BN x BK = 128 x 64 x 32, 128 threads = 4 warps in
//     2 x 2, warp tile 64 x 32 = 4 x 4 mma tiles (64 fp32 accumulators per thread). Grid:
//     (ceil(M/128), ceil(Kg/64), G). Shared memory: two stages of A (128 x 32) and B (64 x 32)
//     tiles, rows padded to 40 elements (80 bytes: the 8 rows an ldmatrix phase reads fall in
//     distinct 16-byte bank groups), 30 KiB static. Pipeline: stage kt+1 is requested
//     (cp.async) before the mma work on stage kt, one cp.async group in flight, one barrier
//     before and one after each stage's compute.
//       VEC = true (Cg % 8 == 0, x and w 16-byte aligned): each 8-element k chunk is one
//       (r, s) tap's 8 contiguous channels: one 16-byte cp.async.cg, with src-size 0 (zero fill)
//       for padding taps, rows past M and k past Kgemm.
//       VEC = false (Cg = 1, 3, ...: the first layer of a network): each element is gathered
//       with a scalar load (0 outside) and the 8 are written to shared memory as one 16-byte
//       store; same tiles, same barriers, no cp.async.
//     Epilogue: the accumulators (fragment layout: rows lane/4 and lane/4 + 8, columns
//     2*(lane%4) and +1) get bias + activation in fp32 and are stored straight from registers,
//     two channels per 4-byte store when aligned.
//   * conv2d_direct_kernel (fp32, depthwise and any Kg < 8): one thread per output element on
//     CUDA cores, fp32 FMA over the (r, s, c) taps, grid-stride. fp32 deliberately takes this
//     plain path (no TF32 here: fp32 results stay fp32-exact up to summation order).
//
// Bytes / FLOPs. The GEMM does 2*M*Kg*Kgemm*G FLOPs; each block reads its A tile once per
// N-block column (ceil(Kg/64) times per group) and its B tile once per M-block; x is re-read
// R*S/(sh*sw) times through L2 by the implicit gather (no im2col buffer in HBM). For the 3x3
// 128 -> 128 layer (Kgemm = 1152) a 128 x 64 block tile does 128*64*1152*2 = 18.9 MFLOP per
// 128*1152*2 + 64*1152*2 = 442 KB of shared-memory fill: ~43 FLOP/B, above an H100's ~30
// FLOP/B L2 balance (989 TFLOP/s dense fp16 vs ~33 TB/s of L2-to-SM bandwidth, rough figures).
// Estimates only: never measured.
//
// Offsets: pixel and output offsets are 64-bit (N*H*W*C may pass 2^31); per-tap indices and
// Kgemm are 32-bit (checked).
//
// Version history
//   v1: implicit GEMM on mma.sync with a two-stage cp.async pipeline (16-byte zero-filling
//       cp.async when Cg % 8 == 0, scalar gather otherwise), fused bias + 6 activations,
//       groups as grid z; CUDA-core direct kernel for fp32 and depthwise. Tile sizes reasoned,
//       not tuned. ptxas (nvcc 13): igemm VEC 122 (sm_80) / 124 (sm_90) registers, no spills;
//       igemm scalar-gather 168 registers, 4-byte spill on sm_80, none on sm_90; direct 37-38.
//       The direct kernel is checked against float64 on the CPU through tests/test_cuda_build.py's
//       CUDA emulation; the tensor-core kernel only compiled there (inline PTX), and had NOT
//       run on a GPU.
//   v2: the PTX wrappers move to mma.cuh (shared with attention.cu), whose emulation (lane by
//       lane, from the PTX fragment tables) lets the CPU tests run the tensor-core kernel too.
//       Still never run on a GPU.

#include <algorithm>
#include <atomic>
#include <climits>
#include <type_traits>

#include "common.cuh"
#include "mma.cuh"

#ifndef DLH_TEST_CONV_MAX_BLOCKS
#define DLH_TEST_CONV_MAX_BLOCKS 65536  // direct kernel grid cap (the emulation uses a tiny one)
#endif

namespace dlh {
namespace {

// ---- tuning constants (v1: reasoned, not measured) ------------------------------------------
constexpr int kBM = 128;             // block tile: output pixels
constexpr int kBN = 64;              // block tile: output channels (of one group)
constexpr int kBK = 32;              // block tile: reduction (two mma k-steps of 16)
constexpr int kLds = kBK + 8;        // shared row stride in elements (80 bytes: no ldmatrix conflicts)
constexpr int kTcThreads = 128;      // 4 warps, 2 x 2, warp tile 64 x 32
constexpr int kMinKgForTc = 8;       // fewer output channels per group: the direct kernel
constexpr int kDirectThreads = 256;
// CUDA's cap on gridDim.y and gridDim.z. Emulated tests lower it (-DDLH_TEST_CONV_MAX_GRID_YZ=2)
// to make launch_tc split a small problem into several launches.
#ifndef DLH_TEST_CONV_MAX_GRID_YZ
#define DLH_TEST_CONV_MAX_GRID_YZ 65535
#endif
constexpr int kMaxGridYZ = DLH_TEST_CONV_MAX_GRID_YZ;

enum Activation : int { kNone = 0, kRelu = 1, kSilu = 2, kGelu = 3, kGeluTanh = 4, kLeakyRelu = 5, kTanh = 6, kSigmoid = 7 };

constexpr float kSqrt1_2 = 0.70710678118654752f;
constexpr float kSqrt2OverPi = 0.79788456080286536f;
constexpr float kTanhCoeff = 0.044715f;

// The activation code is uniform over the launch: one well-predicted branch per element.
__device__ __forceinline__ float activate(float v, int act, float slope) {
  switch (act) {
    case kRelu: return v < 0.f ? 0.f : v;  // NaN stays NaN, as in torch.relu
    case kSilu: return v / (1.f + expf(-v));
    case kGelu: return 0.5f * v * (1.f + erff(v * kSqrt1_2));
    case kGeluTanh: {
      const float u = kSqrt2OverPi * v * (1.f + kTanhCoeff * v * v);
      return v / (1.f + expf(-2.f * u));  // 0.5*(1 + tanh(u)) == sigmoid(2u)
    }
    case kLeakyRelu: return v < 0.f ? v * slope : v;
    case kTanh: return tanhf(v);
    case kSigmoid: return 1.f / (1.f + expf(-v));
    default: return v;
  }
}

struct ConvParams {
  const void* x;
  const void* w;
  const void* bias;  // nullptr: none
  void* y;
  int64_t M;         // N*OH*OW
  int N, H, W, C, K, R, S, OH, OW;
  int sh, sw, ph, pw, dh, dw;
  int groups, Cg, Kg, Kgemm;
  int act;
  float slope;
  int g0, nt0;       // tensor-core launches: first group and first channel tile of this launch
};


// ---- tensor-core implicit GEMM (fp16 / bf16) ------------------------------------------------------
template <typename T, bool VEC>
__global__ void __launch_bounds__(kTcThreads) conv2d_igemm_kernel(const ConvParams p) {
  __shared__ __align__(16) T sA[2][kBM][kLds];
  __shared__ __align__(16) T sB[2][kBN][kLds];

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int wm = warp >> 1, wn = warp & 1;
  // gridDim.y/z are capped at 65,535: launch_tc covers more channel tiles or groups in several
  // launches, each starting at (nt0, g0)
  const int g = p.g0 + static_cast<int>(blockIdx.z);
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * kBM;
  const int n0 = (p.nt0 + static_cast<int>(blockIdx.y)) * kBN;
  const T* __restrict__ x = static_cast<const T*>(p.x);
  const T* __restrict__ w = static_cast<const T*>(p.w);

  // Loader roles: thread tid fills chunk column kc (8 elements) of A rows tid/4 + 32*i (i < 4)
  // and of B rows tid/4 + 32*j (j < 2), every stage.
  const int kc = (tid & 3) * 8;
  const int lrow = tid >> 2;
  int a_ih[4], a_iw[4];
  int64_t a_base[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int64_t m = m0 + lrow + 32 * i;
    if (m < p.M) {
      const int ow = static_cast<int>(m % p.OW);
      const int64_t t = m / p.OW;
      const int oh = static_cast<int>(t % p.OH);
      const int64_t n = t / p.OH;
      a_ih[i] = oh * p.sh - p.ph;
      a_iw[i] = ow * p.sw - p.pw;
      a_base[i] = n * p.H * p.W * p.C + static_cast<int64_t>(g) * p.Cg;
    } else {
      a_ih[i] = INT_MIN / 2;  // every tap of a row past M is out of the image: zeros
      a_iw[i] = 0;
      a_base[i] = 0;
    }
  }
  bool b_ok[2];
  int64_t b_off[2];
#pragma unroll
  for (int j = 0; j < 2; ++j) {
    const int kk = n0 + lrow + 32 * j;
    b_ok[j] = kk < p.Kg;
    b_off[j] = b_ok[j] ? static_cast<int64_t>(g * p.Kg + kk) * p.Kgemm : 0;
  }

  auto load_stage = [&](int stage, int kt) {
    const int kbase = kt * kBK + kc;
    if constexpr (VEC) {
      // Cg % 8 == 0: the chunk is 8 channels of one tap, 16-byte aligned in x and in w.
      const int k = kbase;
      const bool kin = k < p.Kgemm;
      const int c = k % p.Cg, rs = k / p.Cg;
      const int r = rs / p.S, s = rs - r * p.S;
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int ih = a_ih[i] + r * p.dh, iw = a_iw[i] + s * p.dw;
        const bool ok = kin && static_cast<unsigned>(ih) < static_cast<unsigned>(p.H) &&
                        static_cast<unsigned>(iw) < static_cast<unsigned>(p.W);
        const T* src = ok ? x + a_base[i] + (static_cast<int64_t>(ih) * p.W + iw) * p.C + c : x;
        cp_async16(&sA[stage][lrow + 32 * i][kc], src, ok);
      }
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        const bool ok = kin && b_ok[j];
        cp_async16(&sB[stage][lrow + 32 * j][kc], ok ? w + b_off[j] + k : w, ok);
      }
    } else {
      // Any Cg: gather element by element (zeros outside), one 16-byte shared store per chunk.
      int tap_r[8], tap_s[8], tap_c[8];
#pragma unroll
      for (int e = 0; e < 8; ++e) {
        const int k = kbase + e;
        const int c = k % p.Cg, rs = k / p.Cg;
        tap_r[e] = k < p.Kgemm ? rs / p.S : -1;  // k past Kgemm: masked by tap_r < 0 below
        tap_s[e] = rs - (rs / p.S) * p.S;
        tap_c[e] = c;
      }
      const T zero = from_float<T>(0.f);
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        Pack<T, 8> pack;
#pragma unroll
        for (int e = 0; e < 8; ++e) {
          const int ih = a_ih[i] + tap_r[e] * p.dh, iw = a_iw[i] + tap_s[e] * p.dw;
          const bool ok = tap_r[e] >= 0 && static_cast<unsigned>(ih) < static_cast<unsigned>(p.H) &&
                          static_cast<unsigned>(iw) < static_cast<unsigned>(p.W);
          pack.v[e] = ok ? x[a_base[i] + (static_cast<int64_t>(ih) * p.W + iw) * p.C + tap_c[e]] : zero;
        }
        *reinterpret_cast<Pack<T, 8>*>(&sA[stage][lrow + 32 * i][kc]) = pack;
      }
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        Pack<T, 8> pack;
#pragma unroll
        for (int e = 0; e < 8; ++e) pack.v[e] = b_ok[j] && kbase + e < p.Kgemm ? w[b_off[j] + kbase + e] : zero;
        *reinterpret_cast<Pack<T, 8>*>(&sB[stage][lrow + 32 * j][kc]) = pack;
      }
    }
  };

  float acc[4][4][4];
#pragma unroll
  for (int mt = 0; mt < 4; ++mt)
#pragma unroll
    for (int nt = 0; nt < 4; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[mt][nt][e] = 0.f;

  const int k_tiles = (p.Kgemm + kBK - 1) / kBK;
  load_stage(0, 0);
  cp_async_commit();
  for (int kt = 0; kt < k_tiles; ++kt) {
    const int stage = kt & 1;
    if (kt + 1 < k_tiles) load_stage(stage ^ 1, kt + 1);  // that stage's readers passed the last barrier
    cp_async_commit();
    cp_async_wait<1>();  // stage kt's group has landed (this thread's part)
    __syncthreads();     // ... and every other thread's
#pragma unroll
    for (int kk = 0; kk < kBK; kk += 16) {
      unsigned af[4][4], bf[4][2];
#pragma unroll
      for (int mt = 0; mt < 4; ++mt)
        ldmatrix_x4(af[mt], &sA[stage][wm * 64 + mt * 16 + (lane & 15)][kk + (lane >> 4) * 8]);
#pragma unroll
      for (int np = 0; np < 2; ++np) {
        unsigned r[4];
        ldmatrix_x4(r, &sB[stage][wn * 32 + np * 16 + (lane & 7) + (lane >> 4) * 8][kk + ((lane >> 3) & 1) * 8]);
        bf[2 * np][0] = r[0];
        bf[2 * np][1] = r[1];
        bf[2 * np + 1][0] = r[2];
        bf[2 * np + 1][1] = r[3];
      }
#pragma unroll
      for (int mt = 0; mt < 4; ++mt)
#pragma unroll
        for (int nt = 0; nt < 4; ++nt) mma16816<T>(acc[mt][nt], af[mt], bf[nt]);
    }
    __syncthreads();  // everyone is done reading `stage` before it is refilled
  }
  cp_async_wait<0>();

  // Epilogue: bias + activation in fp32, the only store of y.
  const T* bias = static_cast<const T*>(p.bias);
  T* y = static_cast<T*>(p.y);
#pragma unroll
  for (int nt = 0; nt < 4; ++nt) {
    const int n = n0 + wn * 32 + nt * 8 + (lane & 3) * 2;  // channel within the group
    const int ko = g * p.Kg + n;
    const bool in0 = n < p.Kg, in1 = n + 1 < p.Kg;
    const float b0 = bias != nullptr && in0 ? to_float(bias[ko]) : 0.f;
    const float b1 = bias != nullptr && in1 ? to_float(bias[ko + 1]) : 0.f;
#pragma unroll
    for (int mt = 0; mt < 4; ++mt) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int64_t m = m0 + wm * 64 + mt * 16 + (lane >> 2) + h * 8;
        if (m >= p.M || !in0) continue;
        T* dst = y + m * p.K + ko;
        const float v0 = activate(acc[mt][nt][2 * h] + b0, p.act, p.slope);
        const float v1 = activate(acc[mt][nt][2 * h + 1] + b1, p.act, p.slope);
        if (in1 && reinterpret_cast<std::uintptr_t>(dst) % (2 * sizeof(T)) == 0) {
          Pack<T, 2> pack;
          pack.v[0] = from_float<T>(v0);
          pack.v[1] = from_float<T>(v1);
          *reinterpret_cast<Pack<T, 2>*>(dst) = pack;
        } else {
          dst[0] = from_float<T>(v0);
          if (in1) dst[1] = from_float<T>(v1);
        }
      }
    }
  }
}

// ---- CUDA-core direct convolution (fp32, depthwise, few channels per group) --------------------
// Thread per output element, output channel fastest: neighbouring threads share the pixel
// (x reads broadcast or coalesce along channels) and read neighbouring weight rows.
template <typename T>
__global__ void __launch_bounds__(kDirectThreads) conv2d_direct_kernel(const ConvParams p) {
  const T* __restrict__ x = static_cast<const T*>(p.x);
  const T* __restrict__ w = static_cast<const T*>(p.w);
  const T* bias = static_cast<const T*>(p.bias);
  T* y = static_cast<T*>(p.y);
  const int64_t total = p.M * p.K;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total; idx += step) {
    const int ko = static_cast<int>(idx % p.K);
    const int64_t m = idx / p.K;
    const int ow = static_cast<int>(m % p.OW);
    const int64_t t = m / p.OW;
    const int oh = static_cast<int>(t % p.OH);
    const int64_t n = t / p.OH;
    const int g = ko / p.Kg;
    const T* xb = x + n * p.H * p.W * p.C + static_cast<int64_t>(g) * p.Cg;
    const T* wb = w + static_cast<int64_t>(ko) * p.Kgemm;
    float acc = 0.f;
    for (int r = 0; r < p.R; ++r) {
      const int ih = oh * p.sh - p.ph + r * p.dh;
      if (static_cast<unsigned>(ih) >= static_cast<unsigned>(p.H)) continue;
      for (int s = 0; s < p.S; ++s) {
        const int iw = ow * p.sw - p.pw + s * p.dw;
        if (static_cast<unsigned>(iw) >= static_cast<unsigned>(p.W)) continue;
        const T* xp = xb + (static_cast<int64_t>(ih) * p.W + iw) * p.C;
        const T* wp = wb + (r * p.S + s) * p.Cg;
        for (int c = 0; c < p.Cg; ++c) acc += to_float(xp[c]) * to_float(wp[c]);
      }
    }
    if (bias != nullptr) acc += to_float(bias[ko]);
    y[idx] = from_float<T>(activate(acc, p.act, p.slope));
  }
}

// ---- host side ------------------------------------------------------------------------------------
void check_dim(const char* fn, const char* name, int64_t v, int64_t lo) {
  check_arg(v >= lo && v <= INT_MAX, fn,
            std::string(name) + " must be in [" + std::to_string(lo) + ", 2^31), got " + std::to_string(v));
}

// mma.sync m16n8k16 and ldmatrix need sm_80; built for less, mma.cuh's guards compile them to
// nothing (silently wrong results), so older devices take the CUDA-core kernel. Asked once per
// device (a cudaGetDevice per call, no attribute query).
bool device_has_mma(const char* fn) {
  constexpr int kDevices = 64;
  static std::atomic<int> major_of[kDevices];  // 0: not asked yet
  int dev = 0, major = 0;
  cudaError_t err = cudaGetDevice(&dev);
  const bool cacheable = err == cudaSuccess && dev >= 0 && dev < kDevices;
  if (cacheable && (major = major_of[dev].load(std::memory_order_relaxed)) > 0) return major >= 8;
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev);
  if (err != cudaSuccess) throw std::runtime_error(std::string("dlh::") + fn + ": " + cudaGetErrorString(err));
  if (cacheable) major_of[dev].store(major, std::memory_order_relaxed);
  return major >= 8;
}

template <typename T>
void launch_tc(ConvParams p, cudaStream_t stream) {
  const bool vec = p.Cg % 8 == 0 && aligned16(reinterpret_cast<std::uintptr_t>(p.x)) &&
                   aligned16(reinterpret_cast<std::uintptr_t>(p.w));
  // one launch unless the channel tiles or the groups pass gridDim.y/z's 65,535
  const int64_t n_tiles = ceil_div(p.Kg, kBN);
  for (int64_t g0 = 0; g0 < p.groups; g0 += kMaxGridYZ) {
    for (int64_t nt0 = 0; nt0 < n_tiles; nt0 += kMaxGridYZ) {
      p.g0 = static_cast<int>(g0);
      p.nt0 = static_cast<int>(nt0);
      const dim3 grid(static_cast<unsigned>(ceil_div(p.M, kBM)),
                      static_cast<unsigned>(std::min<int64_t>(n_tiles - nt0, kMaxGridYZ)),
                      static_cast<unsigned>(std::min<int64_t>(p.groups - g0, kMaxGridYZ)));
      if (vec) {
        conv2d_igemm_kernel<T, true><<<grid, dim3(kTcThreads), 0, stream>>>(p);
      } else {
        conv2d_igemm_kernel<T, false><<<grid, dim3(kTcThreads), 0, stream>>>(p);
      }
      check_launch("conv2d_igemm_kernel");
    }
  }
}

template <typename T>
void launch_direct(const ConvParams& p, cudaStream_t stream) {
  const int64_t blocks = std::min<int64_t>(ceil_div(p.M * p.K, kDirectThreads), DLH_TEST_CONV_MAX_BLOCKS);
  conv2d_direct_kernel<T><<<dim3(static_cast<unsigned>(blocks)), dim3(kDirectThreads), 0, stream>>>(p);
  check_launch("conv2d_direct_kernel");
}

}  // namespace

void conv2d_fwd(const Conv2dFwdArgs& a) {
  const char* fn = "conv2d_fwd";
  check_dtype_code(a.dtype, fn, "dtype");
  check_arg(a.activation >= kNone && a.activation <= kSigmoid, fn,
            "activation must be 0 (none), 1 (relu), 2 (silu), 3 (gelu), 4 (gelu_tanh), 5 (leaky_relu), "
            "6 (tanh) or 7 (sigmoid), got " +
                std::to_string(a.activation));
  check_dim(fn, "N", a.N, 0);
  check_dim(fn, "H", a.H, 1);
  check_dim(fn, "W", a.W, 1);
  check_dim(fn, "C", a.C, 1);
  check_dim(fn, "K", a.K, 1);
  check_dim(fn, "R", a.R, 1);
  check_dim(fn, "S", a.S, 1);
  check_dim(fn, "stride_h", a.stride_h, 1);
  check_dim(fn, "stride_w", a.stride_w, 1);
  check_dim(fn, "pad_h", a.pad_h, 0);
  check_dim(fn, "pad_w", a.pad_w, 0);
  check_dim(fn, "dil_h", a.dil_h, 1);
  check_dim(fn, "dil_w", a.dil_w, 1);
  check_dim(fn, "groups", a.groups, 1);
  check_arg(a.C % a.groups == 0, fn,
            "groups must divide C, got C=" + std::to_string(a.C) + ", groups=" + std::to_string(a.groups));
  check_arg(a.K % a.groups == 0, fn,
            "groups must divide K, got K=" + std::to_string(a.K) + ", groups=" + std::to_string(a.groups));
  const int64_t span_h = a.H + 2 * a.pad_h - a.dil_h * (a.R - 1) - 1;
  const int64_t span_w = a.W + 2 * a.pad_w - a.dil_w * (a.S - 1) - 1;
  check_arg(span_h >= 0, fn, "the dilated kernel height exceeds the padded input height (H, pad_h, R, dil_h)");
  check_arg(span_w >= 0, fn, "the dilated kernel width exceeds the padded input width (W, pad_w, S, dil_w)");
  const int64_t oh = span_h / a.stride_h + 1, ow = span_w / a.stride_w + 1;
  check_arg(a.OH == oh, fn,
            "OH must be (H + 2*pad_h - dil_h*(R-1) - 1)/stride_h + 1 = " + std::to_string(oh) + ", got " +
                std::to_string(a.OH));
  check_arg(a.OW == ow, fn,
            "OW must be (W + 2*pad_w - dil_w*(S-1) - 1)/stride_w + 1 = " + std::to_string(ow) + ", got " +
                std::to_string(a.OW));
  check_arg(a.H + 2 * a.pad_h <= INT_MAX / 2 && a.W + 2 * a.pad_w <= INT_MAX / 2, fn,
            "H + 2*pad_h and W + 2*pad_w must be < 2^30");
  const int64_t Cg = a.C / a.groups, Kg = a.K / a.groups;
  const int64_t Kgemm = a.R * a.S * Cg;
  check_arg(Kgemm <= INT_MAX / 2, fn, "R*S*C/groups must be < 2^30, got " + std::to_string(Kgemm));
  check_present(fn, "w", a.w);
  if (a.N == 0) return;  // empty batch: nothing to read or write
  check_present(fn, "x", a.x);
  check_present(fn, "y", a.y);

  ConvParams p;
  p.x = reinterpret_cast<const void*>(a.x);
  p.w = reinterpret_cast<const void*>(a.w);
  p.bias = reinterpret_cast<const void*>(a.bias);
  p.y = reinterpret_cast<void*>(a.y);
  p.M = a.N * oh * ow;
  p.N = static_cast<int>(a.N);
  p.H = static_cast<int>(a.H);
  p.W = static_cast<int>(a.W);
  p.C = static_cast<int>(a.C);
  p.K = static_cast<int>(a.K);
  p.R = static_cast<int>(a.R);
  p.S = static_cast<int>(a.S);
  p.OH = static_cast<int>(oh);
  p.OW = static_cast<int>(ow);
  p.sh = static_cast<int>(a.stride_h);
  p.sw = static_cast<int>(a.stride_w);
  p.ph = static_cast<int>(a.pad_h);
  p.pw = static_cast<int>(a.pad_w);
  // A dilation only matters with more than one tap (and is then < H + 2*pad_h): keep tap offsets small.
  p.dh = a.R > 1 ? static_cast<int>(a.dil_h) : 1;
  p.dw = a.S > 1 ? static_cast<int>(a.dil_w) : 1;
  p.groups = static_cast<int>(a.groups);
  p.Cg = static_cast<int>(Cg);
  p.Kg = static_cast<int>(Kg);
  p.Kgemm = static_cast<int>(Kgemm);
  p.act = a.activation;
  p.slope = a.negative_slope;

  const cudaStream_t stream = as_stream(a.stream);
  p.g0 = 0;
  p.nt0 = 0;
  bool tensor_cores = a.dtype != kFloat32 && Kg >= kMinKgForTc && ceil_div(p.M, kBM) <= INT_MAX;
#ifdef DLH_TEST_CONV_DIRECT_ONLY
  tensor_cores = false;  // tests: the direct kernel on every dtype, under the emulation
#endif
  if (tensor_cores) tensor_cores = device_has_mma(fn);
  dispatch_dtype(a.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    if constexpr (std::is_same_v<T, float>) {
      launch_direct<T>(p, stream);
    } else {
      if (tensor_cores) launch_tc<T>(p, stream);
      else launch_direct<T>(p, stream);
    }
  });
}

}  // namespace dlh
