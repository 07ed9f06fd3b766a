// linear.cu: y = act(x @ w^T + bias), the bias and activation in the GEMM's epilogue; and the
// backward's dz = dy * act'(x @ w^T + bias) from the same GEMM (z recomputed, never stored).
//
// Math. x (M, K), w (N, K), bias (N,), all one dtype T; fp32 accumulation:
//   z[m, n] = bias[n] + sum_k x[m, k] * w[n, k]
//   y[m, n] = act(z[m, n])                    forward (dy absent)
//   y[m, n] = dy[m, n] * act'(z[m, n])        GRAD mode (dy given): the backward's dz
// Activations (fp32), conv2d.cu's codes: 0 none, 1 relu, 2 silu, 3 gelu (erf), 4 gelu_tanh,
// 5 leaky_relu(negative_slope). Derivatives: relu' = [z > 0]; leaky' = 1 or slope by z's sign;
// silu' = s (1 + z (1 - s)), s = sigmoid(z); gelu' = Phi(z) + z phi(z); the tanh form's
// s + 2 z s (1 - s) u', s = sigmoid(2u), u = sqrt(2/pi) (z + 0.044715 z^3) (gelu.cu's forms).
// y is rounded to T once, at its only store.
//
// Layouts. x: rows with row stride stride_x, unit column stride. w: either k-contiguous
// (w[n * stride_w + k], nn.Linear's (out, in) weight) or n-contiguous (w[k * stride_w + n]: a
// transposed view such as GPT-2 Conv1D's weight.t(), which stores (in, out)) -- no copy either
// way. y, dy: rows with their own row strides, unit column stride. Offsets are 64-bit.
//
// Paths
//   * linear_mma_kernel (fp16/bf16, sm_80+): tensor cores, mma.sync m16n8k16 with fp32
//     accumulation. Block tile BM x BN x BK = 128 x 64 x 32, 128 threads = 4 warps in 2 x 2,
//     warp tile 64 x 32 = 4 x 4 mma tiles (64 fp32 accumulators per thread); conv2d.cu's
//     igemm with a plain A. Shared memory: two stages of the x tile (128 x 32, k contiguous)
//     and of the w tile, stored as it lies in memory: k-contiguous w as (64 n x 32 k) rows
//     read by ldmatrix, n-contiguous w as (32 k x 64 n) rows read by ldmatrix.trans (which
//     yields the same B fragments). Rows padded by 8 elements (80 and 144 bytes: the 8 rows
//     an ldmatrix phase reads land in distinct 16-byte bank groups); 30 KiB static.
//     Pipeline: stage kt+1 requested (cp.async) before the mma work on stage kt.
//       VEC = true (x, w 16-byte aligned, row strides multiples of 8, and the contiguous
//       extent (K, or N for n-contiguous w) a multiple of 8): each 8-element chunk is one
//       16-byte cp.async.cg, zero-filled past the edges.
//       VEC = false: element-wise loads (0 outside), one 16-byte shared store per chunk.
//     Epilogue: bias + activation (or dy * act') on the accumulators in fp32, stored from
//     registers, two columns per 4-byte store when aligned.
//   * linear_simt_kernel (fp32; fp16/bf16 on devices without mma.sync): CUDA cores, 64 x 64
//     x 16 tiles through shared memory (fp32), 256 threads with a 4 x 4 register tile each,
//     plain fp32 FMA: fp32 stays fp32 (no TF32), as F.linear's default. Any strides.
//
// Bytes / FLOPs. 2*M*N*K FLOPs. The tensor-core block reads (128 + 64) * 32 * s bytes of
// operands per k step for 2*128*64*32 FLOPs: 43 FLOP/B in bf16 (x re-read N/64 times and w
// M/128 times, through L2). A cuBLAS-class kernel uses 128 x 256 tiles, 3-4 stages and (on
// sm_90) wgmma/TMA; this v1 does not: it is the CUDA C++ reference for the fused epilogue, not
// a cuBLAS replacement. Estimates only: never measured.
//
// Version history
//   v1: mma.sync GEMM (conv2d.cu v2's tile, two-stage cp.async, both weight layouts) with the
//       fused bias + 6 activations and their GRAD epilogue; SIMT fp32 kernel. Checked on the
//       CPU through tests/cuda_emu (mma, ldmatrix, cp.async emulated) against float64 and
//       compiled for sm_80/sm_90 (ptxas: mma 126-140 registers, SIMT 62-94, no spills); NOT
//       yet run on a GPU.

#include <algorithm>
#include <atomic>
#include <climits>
#include <type_traits>

#include "common.cuh"
#include "mma.cuh"

#ifndef DLH_TEST_LINEAR_MAX_GRID_Y
#define DLH_TEST_LINEAR_MAX_GRID_Y 65535  // CUDA's gridDim.y cap; the emulated tests lower it
#endif

namespace dlh {
namespace {

// ---- tuning constants (v1: reasoned, not measured) ------------------------------------------
constexpr int kBM = 128;          // tensor-core block tile: rows of x
constexpr int kBN = 64;           // tensor-core block tile: rows of w (output columns)
constexpr int kBK = 32;           // reduction step (two mma k-steps of 16)
constexpr int kLdsK = kBK + 8;    // shared row stride of k-contiguous tiles (80 bytes)
constexpr int kLdsN = kBN + 8;    // shared row stride of the n-contiguous w tile (144 bytes)
constexpr int kWStage = kBN * kLdsK;  // elements of one w stage, either layout (64*40 >= 32*72)
constexpr int kTcThreads = 128;
constexpr int kSimtTile = 64;     // SIMT block tile (rows and columns)
constexpr int kSimtK = 16;
constexpr int kSimtLds = kSimtTile + 4;
constexpr int kSimtThreads = 256;
constexpr int kMaxGridY = DLH_TEST_LINEAR_MAX_GRID_Y;
static_assert(kBK * kLdsN <= kWStage, "the n-contiguous w stage must fit the k-contiguous one's room");

enum Activation : int { kNone = 0, kRelu = 1, kSilu = 2, kGelu = 3, kGeluTanh = 4, kLeakyRelu = 5, kTanh = 6, kSigmoid = 7 };

constexpr float kSqrt1_2 = 0.70710678118654752f;
constexpr float kInvSqrt2Pi = 0.39894228040143268f;
constexpr float kSqrt2OverPi = 0.79788456080286536f;
constexpr float kTanhCoeff = 0.044715f;

__device__ __forceinline__ float sigmoidf(float v) { return 1.f / (1.f + expf(-v)); }

// act(z), or dy * act'(z) when grad; the code is uniform over the launch (one predicted branch).
__device__ __forceinline__ float epilogue(float z, float dy, int act, float slope, bool grad) {
  switch (act) {
    case kRelu: return grad ? (z > 0.f ? dy : 0.f) : (z < 0.f ? 0.f : z);  // NaN stays NaN
    case kSilu: {
      const float s = sigmoidf(z);
      return grad ? dy * s * (1.f + z * (1.f - s)) : z * s;
    }
    case kGelu:
      return grad ? dy * (0.5f * (1.f + erff(z * kSqrt1_2)) + z * expf(-0.5f * z * z) * kInvSqrt2Pi)
                  : 0.5f * z * (1.f + erff(z * kSqrt1_2));
    case kGeluTanh: {
      const float u = kSqrt2OverPi * z * (1.f + kTanhCoeff * z * z);
      const float s = sigmoidf(2.f * u);  // 0.5 (1 + tanh u)
      return grad ? dy * (s + 2.f * z * s * (1.f - s) * kSqrt2OverPi * (1.f + 3.f * kTanhCoeff * z * z)) : z * s;
    }
    case kLeakyRelu: return grad ? (z > 0.f ? dy : dy * slope) : (z > 0.f ? z : z * slope);
    case kTanh: {
      const float t = tanhf(z);
      return grad ? dy * (1.f - t * t) : t;
    }
    case kSigmoid: {
      const float s = sigmoidf(z);
      return grad ? dy * s * (1.f - s) : s;
    }
    default: return grad ? dy : z;
  }
}

struct LinearParams {
  const void* x;
  const void* w;
  const void* bias;  // nullptr: none
  const void* dy;    // nullptr: forward
  void* y;
  int64_t M;
  int N, K;
  int64_t ldx, ldw, lddy, ldy;
  int act;
  float slope;
  int nt0;           // first column tile of this launch (gridDim.y is capped at 65,535)
};

// bias + activation for the element (m, n) (both in range) of accumulator value acc.
template <typename T>
__device__ __forceinline__ float finish(const LinearParams& p, float acc, float b, int64_t m, int n) {
  const bool grad = p.dy != nullptr;
  const float dy = grad ? to_float(static_cast<const T*>(p.dy)[m * p.lddy + n]) : 0.f;
  return epilogue(acc + b, dy, p.act, p.slope, grad);
}

// ---- tensor-core GEMM (fp16 / bf16) -----------------------------------------------------------
template <typename T, bool VEC, bool W_K_CONTIGUOUS>
__global__ void __launch_bounds__(kTcThreads) linear_mma_kernel(const LinearParams p) {
  __shared__ __align__(16) T sA[2][kBM][kLdsK];
  __shared__ __align__(16) T sW[2][kWStage];  // (kBN x kLdsK) or (kBK x kLdsN), see W_K_CONTIGUOUS

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int wm = warp >> 1, wn = warp & 1;
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * kBM;
  const int n0 = (p.nt0 + static_cast<int>(blockIdx.y)) * kBN;
  const T* __restrict__ x = static_cast<const T*>(p.x);
  const T* __restrict__ w = static_cast<const T*>(p.w);
  const T zero = from_float<T>(0.f);

  // Loader roles, every stage: chunk column kc (8 k's) of x rows lrow + 32*i (i < 4); of w,
  // k-contiguous: chunk kc of w rows lrow + 32*j (j < 2); n-contiguous: chunk (c & 7) * 8 of
  // k row c >> 3, c = tid + 128*j (j < 2).
  const int kc = (tid & 3) * 8;
  const int lrow = tid >> 2;

  auto load_stage = [&](int stage, int kt) {
    const int k0 = kt * kBK;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int64_t m = m0 + lrow + 32 * i;
      const int k = k0 + kc;
      T* dst = &sA[stage][lrow + 32 * i][kc];
      if constexpr (VEC) {
        const bool ok = m < p.M && k < p.K;  // K % 8 == 0: the chunk is all in or all out
        cp_async16(dst, ok ? x + m * p.ldx + k : x, ok);
      } else {
        Pack<T, 8> pack;
#pragma unroll
        for (int e = 0; e < 8; ++e) pack.v[e] = m < p.M && k + e < p.K ? x[m * p.ldx + k + e] : zero;
        *reinterpret_cast<Pack<T, 8>*>(dst) = pack;
      }
    }
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      if constexpr (W_K_CONTIGUOUS) {
        const int n = n0 + lrow + 32 * j, k = k0 + kc;
        T* dst = &sW[stage][(lrow + 32 * j) * kLdsK + kc];
        if constexpr (VEC) {
          const bool ok = n < p.N && k < p.K;
          cp_async16(dst, ok ? w + n * p.ldw + k : w, ok);
        } else {
          Pack<T, 8> pack;
#pragma unroll
          for (int e = 0; e < 8; ++e) pack.v[e] = n < p.N && k + e < p.K ? w[n * p.ldw + k + e] : zero;
          *reinterpret_cast<Pack<T, 8>*>(dst) = pack;
        }
      } else {
        const int c = tid + kTcThreads * j;
        const int kr = c >> 3, nc = (c & 7) * 8;
        const int k = k0 + kr, n = n0 + nc;
        T* dst = &sW[stage][kr * kLdsN + nc];
        if constexpr (VEC) {
          const bool ok = k < p.K && n < p.N;  // N % 8 == 0: the chunk is all in or all out
          cp_async16(dst, ok ? w + static_cast<int64_t>(k) * p.ldw + n : w, ok);
        } else {
          Pack<T, 8> pack;
#pragma unroll
          for (int e = 0; e < 8; ++e)
            pack.v[e] = k < p.K && n + e < p.N ? w[static_cast<int64_t>(k) * p.ldw + n + e] : zero;
          *reinterpret_cast<Pack<T, 8>*>(dst) = pack;
        }
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

  const int k_tiles = (p.K + kBK - 1) / kBK;
  if (k_tiles > 0) load_stage(0, 0);
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
        // matrices: 0 (n 0-7, k 0-7), 1 (n 0-7, k 8-15), 2 (n 8-15, k 0-7), 3 (n 8-15, k 8-15)
        // of this 16-column pair; lane l addresses row l % 8 of matrix l / 8
        unsigned r[4];
        if constexpr (W_K_CONTIGUOUS) {
          const int n = wn * 32 + np * 16 + (lane & 7) + (lane >> 4) * 8;
          ldmatrix_x4(r, &sW[stage][n * kLdsK + kk + ((lane >> 3) & 1) * 8]);
        } else {  // rows are k: the transposing load gives the same (k pair, n) fragments
          const int k = kk + ((lane >> 3) & 1) * 8 + (lane & 7);
          ldmatrix_x4_trans(r, &sW[stage][k * kLdsN + wn * 32 + np * 16 + (lane >> 4) * 8]);
        }
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

  // Epilogue: fragment rows lane/4 and lane/4 + 8, columns 2*(lane%4) and +1 of each mma tile.
  const T* bias = static_cast<const T*>(p.bias);
  T* y = static_cast<T*>(p.y);
#pragma unroll
  for (int nt = 0; nt < 4; ++nt) {
    const int n = n0 + wn * 32 + nt * 8 + (lane & 3) * 2;
    const bool in0 = n < p.N, in1 = n + 1 < p.N;
    const float b0 = bias != nullptr && in0 ? to_float(bias[n]) : 0.f;
    const float b1 = bias != nullptr && in1 ? to_float(bias[n + 1]) : 0.f;
#pragma unroll
    for (int mt = 0; mt < 4; ++mt) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int64_t m = m0 + wm * 64 + mt * 16 + (lane >> 2) + h * 8;
        if (m >= p.M || !in0) continue;
        T* dst = y + m * p.ldy + n;
        const float v0 = finish<T>(p, acc[mt][nt][2 * h], b0, m, n);
        if (in1) {
          const float v1 = finish<T>(p, acc[mt][nt][2 * h + 1], b1, m, n + 1);
          if (reinterpret_cast<std::uintptr_t>(dst) % (2 * sizeof(T)) == 0) {
            Pack<T, 2> pack;
            pack.v[0] = from_float<T>(v0);
            pack.v[1] = from_float<T>(v1);
            *reinterpret_cast<Pack<T, 2>*>(dst) = pack;
          } else {
            dst[0] = from_float<T>(v0);
            dst[1] = from_float<T>(v1);
          }
        } else {
          dst[0] = from_float<T>(v0);
        }
      }
    }
  }
}

// ---- CUDA-core GEMM (fp32, and fp16/bf16 without mma.sync) ---------------------------------------
// Thread (ty, tx) = (tid / 16, tid % 16) owns rows ty*4 .. +3 and columns tx*4 .. +3 of the
// 64 x 64 block tile. Tiles go to shared memory k-major (sX[k][m], sW[k][n]) as fp32, so the
// inner loop reads 4 + 4 values per 16 FMAs. Global loads: consecutive threads walk the
// operand's contiguous dim (k for x and k-contiguous w, n for n-contiguous w).
// __launch_bounds__(256, 1): with the thread count alone, ptxas (nvcc 13, sm_90) held the
// 16-bit k-contiguous variants to 64 registers and spilled 12 bytes; with it, 90-94, no spills.
template <typename T, bool W_K_CONTIGUOUS>
__global__ void __launch_bounds__(kSimtThreads, 1) linear_simt_kernel(const LinearParams p) {
  __shared__ float sX[kSimtK][kSimtLds];
  __shared__ float sW[kSimtK][kSimtLds];

  const int tid = threadIdx.x, ty = tid >> 4, tx = tid & 15;
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * kSimtTile;
  const int n0 = (p.nt0 + static_cast<int>(blockIdx.y)) * kSimtTile;
  const T* __restrict__ x = static_cast<const T*>(p.x);
  const T* __restrict__ w = static_cast<const T*>(p.w);

  float acc[4][4];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) acc[i][j] = 0.f;

  for (int k0 = 0; k0 < p.K; k0 += kSimtK) {
#pragma unroll
    for (int i = 0; i < kSimtTile * kSimtK / kSimtThreads; ++i) {  // 4 elements of each operand
      const int e = tid + kSimtThreads * i;
      {
        const int r = e / kSimtK, kk = e % kSimtK;
        const int64_t m = m0 + r;
        const int k = k0 + kk;
        sX[kk][r] = m < p.M && k < p.K ? to_float(x[m * p.ldx + k]) : 0.f;
      }
      if constexpr (W_K_CONTIGUOUS) {
        const int r = e / kSimtK, kk = e % kSimtK;
        const int n = n0 + r, k = k0 + kk;
        sW[kk][r] = n < p.N && k < p.K ? to_float(w[n * p.ldw + k]) : 0.f;
      } else {
        const int kk = e / kSimtTile, c = e % kSimtTile;
        const int n = n0 + c, k = k0 + kk;
        sW[kk][c] = n < p.N && k < p.K ? to_float(w[static_cast<int64_t>(k) * p.ldw + n]) : 0.f;
      }
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kSimtK; ++kk) {
      float a[4], b[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) a[i] = sX[kk][ty * 4 + i];
#pragma unroll
      for (int j = 0; j < 4; ++j) b[j] = sW[kk][tx * 4 + j];
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
    }
    __syncthreads();  // the tiles are refilled next step
  }

  const T* bias = static_cast<const T*>(p.bias);
  T* y = static_cast<T*>(p.y);
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const int n = n0 + tx * 4 + j;
    if (n >= p.N) continue;
    const float b = bias != nullptr ? to_float(bias[n]) : 0.f;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int64_t m = m0 + ty * 4 + i;
      if (m < p.M) y[m * p.ldy + n] = from_float<T>(finish<T>(p, acc[i][j], b, m, n));
    }
  }
}

// ---- host side ------------------------------------------------------------------------------------
// mma.sync m16n8k16 and ldmatrix need sm_80 (built for less, mma.cuh's guards compile them to
// nothing): asked once per device, as conv2d.cu does.
bool linear_device_has_mma(const char* fn) {
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

// One launch per 65,535 column tiles (gridDim.y's cap): launch(grid, p) with p.nt0 set.
template <typename Launch>
void over_column_tiles(LinearParams p, int64_t tile_m, int64_t tile_n, Launch&& launch) {
  const int64_t n_tiles = ceil_div(p.N, tile_n);
  for (int64_t nt0 = 0; nt0 < n_tiles; nt0 += kMaxGridY) {
    p.nt0 = static_cast<int>(nt0);
    launch(dim3(static_cast<unsigned>(ceil_div(p.M, tile_m)),
                static_cast<unsigned>(std::min<int64_t>(n_tiles - nt0, kMaxGridY))),
           p);
  }
}

template <typename T, bool VEC, bool WK>
void launch_mma(const LinearParams& p, cudaStream_t stream) {
  over_column_tiles(p, kBM, kBN, [&](dim3 grid, const LinearParams& q) {
    linear_mma_kernel<T, VEC, WK><<<grid, dim3(kTcThreads), 0, stream>>>(q);
    check_launch("linear_mma_kernel");
  });
}

template <typename T, bool WK>
void launch_simt(const LinearParams& p, cudaStream_t stream) {
  over_column_tiles(p, kSimtTile, kSimtTile, [&](dim3 grid, const LinearParams& q) {
    linear_simt_kernel<T, WK><<<grid, dim3(kSimtThreads), 0, stream>>>(q);
    check_launch("linear_simt_kernel");
  });
}

}  // namespace

void linear_fwd(const LinearArgs& a) {
  const char* fn = "linear_fwd";
  check_dtype_code(a.dtype, fn, "dtype");
  check_arg(a.activation >= kNone && a.activation <= kSigmoid, fn,
            "activation must be 0 (none), 1 (relu), 2 (silu), 3 (gelu), 4 (gelu_tanh), 5 (leaky_relu), "
            "6 (tanh) or 7 (sigmoid), got " +
                std::to_string(a.activation));
  check_arg(a.M >= 0, fn, "M must be >= 0, got " + std::to_string(a.M));
  check_arg(a.N >= 0 && a.N <= INT_MAX - kBN, fn, "N must be in [0, 2^31 - 64), got " + std::to_string(a.N));
  check_arg(a.K >= 0 && a.K <= INT_MAX - kBK, fn, "K must be in [0, 2^31 - 32), got " + std::to_string(a.K));
  check_arg(a.stride_x >= 0 && a.stride_w >= 0 && a.stride_y >= 0 && a.stride_dy >= 0, fn,
            "strides must be >= 0");
  check_arg(ceil_div(a.M, kSimtTile) <= INT_MAX, fn, "M must be < 2^37");
  if (a.M == 0 || a.N == 0) return;  // nothing to write
  check_present(fn, "y", a.y);
  if (a.K > 0) {
    check_present(fn, "x", a.x);
    check_present(fn, "w", a.w);
  }

  LinearParams p;
  p.x = reinterpret_cast<const void*>(a.x);
  p.w = reinterpret_cast<const void*>(a.w);
  p.bias = reinterpret_cast<const void*>(a.bias);
  p.dy = reinterpret_cast<const void*>(a.dy);
  p.y = reinterpret_cast<void*>(a.y);
  p.M = a.M;
  p.N = static_cast<int>(a.N);
  p.K = static_cast<int>(a.K);
  p.ldx = a.stride_x;
  p.ldw = a.stride_w;
  p.lddy = a.stride_dy;
  p.ldy = a.stride_y;
  p.act = a.activation;
  p.slope = a.negative_slope;
  p.nt0 = 0;

  const cudaStream_t stream = as_stream(a.stream);
  // the 16-byte loader: both operands aligned, row strides and the contiguous extents whole chunks
  const int64_t w_extent = a.w_k_contiguous ? a.K : a.N;
  const bool vec = aligned16(a.x) && aligned16(a.w) && a.stride_x % 8 == 0 && a.stride_w % 8 == 0 &&
                   a.K % 8 == 0 && w_extent % 8 == 0;
  bool tensor_cores = a.dtype != kFloat32;
#ifdef DLH_TEST_LINEAR_SIMT_ONLY
  tensor_cores = false;  // tests: the CUDA-core kernel on every dtype, under the emulation
#endif
  if (tensor_cores) tensor_cores = linear_device_has_mma(fn);
  dispatch_dtype(a.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    if constexpr (!std::is_same_v<T, float>) {
      if (tensor_cores) {
        if (vec && a.w_k_contiguous) launch_mma<T, true, true>(p, stream);
        else if (vec) launch_mma<T, true, false>(p, stream);
        else if (a.w_k_contiguous) launch_mma<T, false, true>(p, stream);
        else launch_mma<T, false, false>(p, stream);
        return;
      }
    }
    if (a.w_k_contiguous) launch_simt<T, true>(p, stream);
    else launch_simt<T, false>(p, stream);
  });
}

}  // namespace dlh
