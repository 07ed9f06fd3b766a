// gelu.cu: GELU (optionally after a bias add) and GeGLU, forward and backward.
//
// Math (all in fp32, whatever the storage dtype; h = x + bias[n], or x when there is no bias)
//   exact ("none"):  gelu(h)  = 0.5*h*(1 + erf(h/sqrt(2)))
//                    gelu'(h) = 0.5*(1 + erf(h/sqrt(2))) + h*exp(-h^2/2)/sqrt(2*pi)
//   tanh:            u = sqrt(2/pi)*(h + 0.044715*h^3),  gelu(h) = 0.5*h*(1 + tanh(u))
//                    computed as h*s with s = sigmoid(2u) = 1/(1 + exp(-2u)): the same value
//                    (0.5*(1 + tanh(u)) == sigmoid(2u) exactly), and no tanh of large arguments,
//                    no cancellation in 1 + tanh(u) for h << 0, no NaN for |h| -> inf.
//                    gelu'(h) = s + 2*h*s*(1 - s)*sqrt(2/pi)*(1 + 3*0.044715*h^2)
//                    (the derivative of PyTorch's formula: 1 - tanh(u)^2 == 4*s*(1 - s)).
//   gelu_fwd: y = gelu(h)                          gelu_bwd: dx = dy*gelu'(h)
//             dbias[n] = sum over rows of dx[:, n], from the fp32 dx before it is rounded
//   geglu:    a = x[:, :H], g = x[:, H:],  y = a*gelu(g)
//             da = dy*gelu(g),  dg = dy*a*gelu'(g)
//
// Memory traffic per element, s = sizeof(dtype); bias and dbias are O(N), noise:
//   gelu_fwd : read x, write y                                 = 2s
//   gelu_bwd : read dy, x, write dx                            = 3s
//              with dbias: + 8 bytes per (row group, column) of fp32 partials, written and read
//              back; a row group owns ~kMinRowsPerPartial (64) rows or more, so that adds at most
//              8 / (64 * 3s) of traffic: 2% for 16-bit dtypes.
//   geglu_fwd: read a, g, write y        (per output element)  = 3s
//   geglu_bwd: read dy, a, g, write da, dg                     = 5s
//   Instructions: an H100 SXM issues ~30e12 fp32 lane-instructions/s against ~3.35e12 bytes/s,
//   ~9 per byte moved. gelu_fwd in 16 bits moves 4 bytes per element (a budget of ~36) and spends
//   ~25 (erff or expf + a division, conversions, addressing); the backward moves 6 and spends ~40.
//   So the kernels are bandwidth-bound, but not by a wide margin: no extra math per element.
//   (Estimates; to be checked with Nsight Compute.)
//
// Layout. Every tensor is an (M, N) row view (unit column stride, row stride in elements). Rows
// are cut into groups of VEC = 16/s elements; a thread moves one group with one 16-byte load or
// store per tensor. Group k covers columns [k*VEC - pad, (k+1)*VEC - pad), where pad is chosen
// so that x's first vector group is 16-byte aligned: a view at any element offset still moves in
// 16-byte vectors, after a short scalar head. The vector path needs every tensor to share x's
// misalignment (for the bias: at the same columns) and every row stride to be a multiple of 16
// bytes (M == 1 has no row stride); otherwise the same kernels run every group with scalar
// accesses. Rows that are contiguous end to end (no bias, stride == N everywhere) are treated as
// one row of M*N elements, so that short or odd rows still move in vectors.
// Work is a grid of tiles (blockDim.y rows x blockDim.x*UNROLL groups); a grid of
// sm_count * (resident blocks per SM) blocks walks the tiles with a grid-stride loop, so an (M, N)
// call is spread over rows and columns alike (M = 1 with N = numel fills the GPU too). All
// offsets are 64-bit; the tile index uses 32-bit division when the tile count allows.
//
// dbias (gelu_bwd): R row groups (a function of M, N and sm_count only, so that
// gelu_bwd_workspace agrees with the launch). A block of bx x by threads owns row group r of a
// column block: thread (tx, ty) walks rows r*by + ty, + R*by, ... summing its dx in registers;
// the by sums are added in ty order through shared memory and written as row r of an (R, ldp)
// fp32 partial buffer (or straight to dbias when R == 1); a second kernel adds the R partials of
// each column in order. No atomics: the result is bitwise reproducible for a given sm_count.
//
// Version history
//   v1: tiled grid-stride elementwise kernels with 16-byte vectors, an alignment check and a pad
//       so that offset views stay vectorised, contiguous rows collapsed into one, UNROLL = 2
//       groups per thread in the forward; deterministic dbias through row-group partials. The
//       GELU form and the bias dtype are runtime flags (one kernel per storage dtype: the file
//       builds in ~15 s instead of ~42 s with them as template parameters). ptxas, sm_90: 39-48
//       registers (forward), 32-40 (backward), 40-61 (dbias), 32-57 (GeGLU), no spills.
//       Checked against float64 on the CPU through tests/test_cuda_build.py's CUDA emulation
//       (which also checks every 16-byte access for alignment). Not yet run on a GPU: no timings.

#include <algorithm>
#include <atomic>
#include <climits>

#include "common.cuh"

namespace dlh {
namespace {

// ---- tuning constants (v1: reasoned, not measured) ------------------------------------------
constexpr int kThreads = 256;               // threads per block (tiles are blockDim.x*blockDim.y)
constexpr int kFwdUnroll = 2;               // groups per thread in gelu_fwd: 2 loads in flight
constexpr int kDbiasRows = 8;               // blockDim.y of the dbias kernel (rows summed in-block)
constexpr int64_t kMinRowsPerPartial = 64;  // dbias: rows per partial row, bounds its traffic
constexpr int kPlanBlocksPerSm = 8;         // dbias plan only (2048 threads / 256): see plan_dbias
constexpr int kMaxBlocksPerSm = 32;         // resident block limit of sm_80 and sm_90
constexpr int kMaxDevices = 64;             // device_sm_count cache

// ---- the math ---------------------------------------------------------------------------------
constexpr float kSqrt1_2 = 0.70710678118654752f;      // 1/sqrt(2)
constexpr float kInvSqrt2Pi = 0.39894228040143268f;   // 1/sqrt(2*pi)
constexpr float kSqrt2OverPi = 0.79788456080286536f;  // sqrt(2/pi)
constexpr float kTanhCoeff = 0.044715f;

enum class Act { kErf, kTanh };

template <Act A>
__device__ __forceinline__ float gelu(float h) {
  if constexpr (A == Act::kErf) {
    return 0.5f * h * (1.f + erff(h * kSqrt1_2));
  } else {
    const float u = kSqrt2OverPi * h * (1.f + kTanhCoeff * h * h);
    // h*sigmoid(2u): for u -> -inf, exp -> inf and h/inf -> -0, the right limit.
    return h / (1.f + expf(-2.f * u));
  }
}

// gelu(h) and gelu'(h) together (they share the erf or the exp).
template <Act A>
__device__ __forceinline__ void gelu_and_grad(float h, float& value, float& grad) {
  if constexpr (A == Act::kErf) {
    const float cdf = 0.5f * (1.f + erff(h * kSqrt1_2));
    value = h * cdf;
    grad = cdf + h * kInvSqrt2Pi * expf(-0.5f * h * h);
  } else {
    const float u = kSqrt2OverPi * h * (1.f + kTanhCoeff * h * h);
    // e = exp(-2u), clamped so that e*s*s below stays finite (e^80 < FLT_MAX); past the clamp the
    // true s is < 2e-35 and every term is 0 at fp32 resolution anyway.
    const float e = expf(fminf(-2.f * u, 80.f));
    const float s = 1.f / (1.f + e);  // sigmoid(2u) = 0.5*(1 + tanh(u))
    value = h * s;
    // s*(1 - s) as e*s*s: no cancellation of 1 - s when s -> 1.
    grad = s + 2.f * h * (e * s * s) * kSqrt2OverPi * (1.f + 3.f * kTanhCoeff * h * h);
  }
}

// The GELU form is a kernel argument: one uniform branch per group, not per element.
template <int VEC>
__device__ __forceinline__ void gelu_span(bool tanh, float* v) {
  if (tanh) {
#pragma unroll
    for (int k = 0; k < VEC; ++k) v[k] = gelu<Act::kTanh>(v[k]);
  } else {
#pragma unroll
    for (int k = 0; k < VEC; ++k) v[k] = gelu<Act::kErf>(v[k]);
  }
}

template <int VEC>
__device__ __forceinline__ void gelu_and_grad_span(bool tanh, const float* h, float* value, float* grad) {
  if (tanh) {
#pragma unroll
    for (int k = 0; k < VEC; ++k) gelu_and_grad<Act::kTanh>(h[k], value[k], grad[k]);
  } else {
#pragma unroll
    for (int k = 0; k < VEC; ++k) gelu_and_grad<Act::kErf>(h[k], value[k], grad[k]);
  }
}

// ---- row access -------------------------------------------------------------------------------
// A test hook on every 16-byte access. A misaligned vector access faults on a GPU but just works
// on a CPU, so the CPU emulation test (tests/test_cuda_build.py) defines DLH_TEST_VECTOR_ACCESS to
// count them, and to see which layouts take the vector path at all.
#ifdef DLH_TEST_VECTOR_ACCESS
#define DLH_VECTOR_ACCESS(ptr) DLH_TEST_VECTOR_ACCESS(ptr)
#else
#define DLH_VECTOR_ACCESS(ptr) ((void)0)
#endif

// Reads row[start .. start+VEC) as fp32. `full` promises the whole group lies inside [0, n) and
// row + start is 16-byte aligned: then it moves as 16-byte packs (two when VEC fp32 bias values
// span 32 bytes). Otherwise scalar loads, columns outside [0, n) read as 0. Columns are 64-bit:
// with M == 1 a row is the whole tensor.
template <int VEC, typename T>
__device__ __forceinline__ void load_span(const T* row, int64_t start, int64_t n, bool full, float* out) {
  constexpr int P = kVec16<T> < VEC ? kVec16<T> : VEC;
  if (full) {
#pragma unroll
    for (int q = 0; q < VEC; q += P) {
      DLH_VECTOR_ACCESS(row + start + q);
      const Pack<T, P> pack = *reinterpret_cast<const Pack<T, P>*>(row + start + q);
#pragma unroll
      for (int k = 0; k < P; ++k) out[q + k] = to_float(pack.v[k]);
    }
  } else {
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      const int64_t c = start + k;
      out[k] = c >= 0 && c < n ? to_float(row[c]) : 0.f;
    }
  }
}

// Writes in[0..VEC) to row[start .. start+VEC) rounded to T; columns outside [0, n) untouched.
template <int VEC, typename T>
__device__ __forceinline__ void store_span(T* row, int64_t start, int64_t n, bool full, const float* in) {
  constexpr int P = kVec16<T> < VEC ? kVec16<T> : VEC;
  if (full) {
#pragma unroll
    for (int q = 0; q < VEC; q += P) {
      Pack<T, P> pack;
#pragma unroll
      for (int k = 0; k < P; ++k) pack.v[k] = from_float<T>(in[q + k]);
      DLH_VECTOR_ACCESS(row + start + q);
      *reinterpret_cast<Pack<T, P>*>(row + start + q) = pack;
    }
  } else {
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      const int64_t c = start + k;
      if (c >= 0 && c < n) row[c] = from_float<T>(in[k]);
    }
  }
}

// v[k] += bias[start + k], the bias being fp32 or T; nothing when there is no bias.
template <int VEC, typename T>
__device__ __forceinline__ void add_bias(const void* bias, bool bias_f32, int64_t start, int64_t n, bool full,
                                         float* v) {
  if (!bias) return;
  float b[VEC];
  if (bias_f32) load_span<VEC>(static_cast<const float*>(bias), start, n, full, b);
  else load_span<VEC>(static_cast<const T*>(bias), start, n, full, b);
#pragma unroll
  for (int k = 0; k < VEC; ++k) v[k] += b[k];
}

// ---- tiling -----------------------------------------------------------------------------------
// The (M, N) problem as groups and tiles. Set on the host, read by every kernel.
struct Tiling {
  int64_t M, N;        // rows, columns (N = H for GeGLU)
  int64_t pad;         // group k starts at column k*VEC - pad
  int64_t G;           // groups per row: ceil((N + pad) / VEC)
  int64_t col_blocks;  // tiles across a row: ceil(G / (blockDim.x * UNROLL))
  int64_t tiles;       // col_blocks * ceil(M / blockDim.y)
  bool tiles32;        // tiles < 2^32: the tile index splits with 32-bit division
  bool vec_ok;         // the 16-byte path is allowed (see VecAlign)
};

// First group (of UNROLL, blockDim.x apart) and row of this thread in tile `tile`.
__device__ __forceinline__ void tile_origin(const Tiling& t, int64_t tile, int unroll, int64_t& row,
                                            int64_t& group) {
  int64_t rb, cb;
  if (t.tiles32) {  // 64-bit division is a ~70-instruction subroutine; most calls never need it
    const unsigned tt = static_cast<unsigned>(tile), cbs = static_cast<unsigned>(t.col_blocks);
    rb = tt / cbs;
    cb = tt - static_cast<unsigned>(rb) * cbs;
  } else {
    rb = tile / t.col_blocks;
    cb = tile - rb * t.col_blocks;
  }
  row = rb * blockDim.y + threadIdx.y;
  group = cb * unroll * blockDim.x + threadIdx.x;
}

template <int VEC>
__device__ __forceinline__ bool full_group(const Tiling& t, int64_t start) {
  return t.vec_ok && start >= 0 && start + VEC <= t.N;
}

// The grid-stride loop of the one-group-per-thread kernels: body(row, start, full) for this
// thread's group of VEC columns (first column `start`, `full` as full_group) in every tile, when
// that group holds any of the problem.
template <int VEC, typename F>
__device__ __forceinline__ void for_each_group(const Tiling& t, F&& body) {
  for (int64_t tile = blockIdx.x; tile < t.tiles; tile += gridDim.x) {
    int64_t row, group;
    tile_origin(t, tile, 1, row, group);
    const int64_t start = group * VEC - t.pad;
    if (row >= t.M || start >= t.N) continue;
    body(row, start, full_group<VEC>(t, start));
  }
}

// ---- gelu forward -------------------------------------------------------------------------------
// The bias is fp32 or T (bias_f32 says which) and the GELU form a runtime flag: both are uniform
// branches per 16-byte group, invisible next to the memory traffic, and they keep the number of
// kernel instantiations (and the build time) at one per storage dtype.
struct GeluFwdParams {
  const void* x;     // input, (M, N), row stride stride_x
  const void* bias;  // (N,), fp32 or x's dtype; or null
  void* y;           // output, (M, N), row stride stride_y; may be x itself (in place)
  int64_t stride_x, stride_y;
  Tiling t;
  bool bias_f32, tanh;
};

template <typename T>
__global__ void __launch_bounds__(kThreads) gelu_fwd_kernel(const GeluFwdParams p) {
  constexpr int VEC = kVec16<T>;
  constexpr int U = kFwdUnroll;
  const Tiling& t = p.t;
  for (int64_t tile = blockIdx.x; tile < t.tiles; tile += gridDim.x) {
    int64_t row, group;
    tile_origin(t, tile, U, row, group);
    if (row >= t.M) continue;
    const T* x = static_cast<const T*>(p.x) + row * p.stride_x;
    T* y = static_cast<T*>(p.y) + row * p.stride_y;
    // All loads first, then all math and stores: U loads in flight per thread, and y == x
    // (in place) stays correct since a thread reads its columns before it writes them.
    float v[U][VEC];
    int64_t start[U];
    bool full[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      start[u] = (group + int64_t(u) * blockDim.x) * VEC - t.pad;
      full[u] = full_group<VEC>(t, start[u]);
      if (start[u] >= t.N) continue;
      load_span<VEC>(x, start[u], t.N, full[u], v[u]);
      add_bias<VEC, T>(p.bias, p.bias_f32, start[u], t.N, full[u], v[u]);
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      if (start[u] >= t.N) continue;
      gelu_span<VEC>(p.tanh, v[u]);
      store_span<VEC>(y, start[u], t.N, full[u], v[u]);
    }
  }
}

// ---- gelu backward ------------------------------------------------------------------------------
struct GeluBwdParams {
  const void* dy;    // upstream gradient, (M, N)
  const void* x;     // the forward input, (M, N)
  const void* bias;  // (N,), fp32 or x's dtype; or null
  void* dx;          // (M, N); may be dy or x itself (in place)
  float* dbias;      // (N,) fp32, or null (only the dbias kernel writes it)
  float* partials;   // dbias kernel, R > 1: (R, ldp) fp32 row-group partials
  int64_t stride_dy, stride_x, stride_dx;
  Tiling t;
  int64_t R;         // dbias kernel: row groups
  int64_t ldp;       // dbias kernel: partial row pitch, in floats (a multiple of 8)
  unsigned gx;       // dbias kernel: blocks per row group
  bool partials_vec_ok, bias_f32, tanh;
};

// dx of one group of one row: loads dy, x (+ bias), writes dx, returns dx (fp32) in out[].
template <typename T, int VEC>
__device__ __forceinline__ void gelu_bwd_group(const GeluBwdParams& p, int64_t row, int64_t start, bool full,
                                               float* out) {
  float dy[VEC], h[VEC], value[VEC], grad[VEC];
  load_span<VEC>(static_cast<const T*>(p.dy) + row * p.stride_dy, start, p.t.N, full, dy);
  load_span<VEC>(static_cast<const T*>(p.x) + row * p.stride_x, start, p.t.N, full, h);
  add_bias<VEC, T>(p.bias, p.bias_f32, start, p.t.N, full, h);
  gelu_and_grad_span<VEC>(p.tanh, h, value, grad);  // value unused: the compiler drops it
#pragma unroll
  for (int k = 0; k < VEC; ++k) out[k] = dy[k] * grad[k];
  store_span<VEC>(static_cast<T*>(p.dx) + row * p.stride_dx, start, p.t.N, full, out);
}

template <typename T>
__global__ void __launch_bounds__(kThreads) gelu_bwd_kernel(const GeluBwdParams p) {
  constexpr int VEC = kVec16<T>;
  for_each_group<VEC>(p.t, [&](int64_t row, int64_t start, bool full) {
    float dx[VEC];
    gelu_bwd_group<T, VEC>(p, row, start, full, dx);
  });
}

// gelu_bwd with dbias. Block (bx, by), grid gx * R: block b serves row group r = b / gx and
// column blocks b % gx, + gx, ...; see the header for the reduction order.
template <typename T>
__global__ void __launch_bounds__(kThreads) gelu_bwd_dbias_kernel(const GeluBwdParams p) {
  constexpr int VEC = kVec16<T>;
  __shared__ float red[VEC][kThreads];  // [k][ty*bx + tx]: consecutive tx, no bank conflicts
  const Tiling& t = p.t;
  const int tx = threadIdx.x, ty = threadIdx.y, bx = blockDim.x, by = blockDim.y;
  const int64_t r = blockIdx.x / p.gx;
  // Loop bounds depend on the block only: every thread reaches every barrier.
  for (int64_t cb = blockIdx.x % p.gx; cb < t.col_blocks; cb += p.gx) {
    const int64_t start = (cb * bx + tx) * VEC - t.pad;
    const bool full = full_group<VEC>(t, start);
    float acc[VEC];
    fill<VEC>(acc, 0.f);
    if (start < t.N) {
      for (int64_t row = r * by + ty; row < t.M; row += p.R * by) {
        float dx[VEC];
        gelu_bwd_group<T, VEC>(p, row, start, full, dx);
#pragma unroll
        for (int k = 0; k < VEC; ++k) acc[k] += dx[k];
      }
    }
    if (by > 1) {  // add the by row sums of each column in ty order
#pragma unroll
      for (int k = 0; k < VEC; ++k) red[k][ty * bx + tx] = acc[k];
      __syncthreads();
      if (ty == 0) {
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
          float s = 0.f;
          for (int i = 0; i < by; ++i) s += red[k][i * bx + tx];
          acc[k] = s;
        }
      }
      __syncthreads();  // red is rewritten by the next column block
    }
    if (ty != 0 || start >= t.N) continue;
    if (p.R > 1) {
      // Partial row r holds column c at index c + pad: every group starts on a multiple of VEC
      // there, and all VEC values are written (zeros past the row end; ldp has room for them).
      float* dst = p.partials + r * p.ldp + (start + t.pad);
      if (p.partials_vec_ok) {
#pragma unroll
        for (int q = 0; q < VEC; q += 4) {
          Pack<float, 4> pack;
#pragma unroll
          for (int k = 0; k < 4; ++k) pack.v[k] = acc[q + k];
          DLH_VECTOR_ACCESS(dst + q);
          *reinterpret_cast<Pack<float, 4>*>(dst + q) = pack;
        }
      } else {
#pragma unroll
        for (int k = 0; k < VEC; ++k) dst[k] = acc[k];
      }
    } else {
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        const int64_t c = start + k;
        if (c >= 0 && c < t.N) p.dbias[c] = acc[k];
      }
    }
  }
}

// dbias[c] = sum over r of partials[r, c + pad], in a fixed order. Block (32, 8): threadIdx.x
// picks the column (coalesced partial rows), threadIdx.y strides the row groups; the 8 sums of a
// column are then added in threadIdx.y order.
constexpr int kReduceRows = 8;
__global__ void __launch_bounds__(32 * kReduceRows)
gelu_dbias_reduce_kernel(const float* partials, float* dbias, int64_t R, int64_t ldp, int64_t pad, int64_t N) {
  __shared__ float sums[kReduceRows][33];
  const int tx = threadIdx.x, ty = threadIdx.y;
  for (int64_t base = int64_t(blockIdx.x) * 32; base < N; base += int64_t(gridDim.x) * 32) {
    const int64_t col = base + tx;
    float s = 0.f;
    if (col < N)
      for (int64_t r = ty; r < R; r += kReduceRows) s += partials[r * ldp + pad + col];
    sums[ty][tx] = s;
    __syncthreads();
    if (ty == 0 && col < N) {
      float total = 0.f;
#pragma unroll
      for (int i = 0; i < kReduceRows; ++i) total += sums[i][tx];
      dbias[col] = total;
    }
    __syncthreads();
  }
}

// ---- geglu --------------------------------------------------------------------------------------
struct GegluParams {
  const void* dy;  // backward: upstream gradient, (M, H)
  const void* x;   // (M, 2H): a = x[:, :H], g = x[:, H:]
  void* out;       // forward: y, (M, H); backward: dx, (M, 2H)
  int64_t stride_dy, stride_x, stride_out;
  Tiling t;        // N = H
  bool tanh;
};

template <typename T>
__global__ void __launch_bounds__(kThreads) geglu_fwd_kernel(const GegluParams p) {
  constexpr int VEC = kVec16<T>;
  const Tiling& t = p.t;
  for_each_group<VEC>(t, [&](int64_t row, int64_t start, bool full) {
    const T* a_row = static_cast<const T*>(p.x) + row * p.stride_x;
    float a[VEC], g[VEC];
    load_span<VEC>(a_row, start, t.N, full, a);
    load_span<VEC>(a_row + t.N, start, t.N, full, g);
    gelu_span<VEC>(p.tanh, g);
#pragma unroll
    for (int k = 0; k < VEC; ++k) a[k] *= g[k];
    store_span<VEC>(static_cast<T*>(p.out) + row * p.stride_out, start, t.N, full, a);
  });
}

template <typename T>
__global__ void __launch_bounds__(kThreads) geglu_bwd_kernel(const GegluParams p) {
  constexpr int VEC = kVec16<T>;
  const Tiling& t = p.t;
  for_each_group<VEC>(t, [&](int64_t row, int64_t start, bool full) {
    const T* a_row = static_cast<const T*>(p.x) + row * p.stride_x;
    float dy[VEC], a[VEC], g[VEC], value[VEC], grad[VEC];
    load_span<VEC>(static_cast<const T*>(p.dy) + row * p.stride_dy, start, t.N, full, dy);
    load_span<VEC>(a_row, start, t.N, full, a);
    load_span<VEC>(a_row + t.N, start, t.N, full, g);
    gelu_and_grad_span<VEC>(p.tanh, g, value, grad);
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      g[k] = dy[k] * a[k] * grad[k];  // dg
      a[k] = dy[k] * value[k];        // da
    }
    T* dx_row = static_cast<T*>(p.out) + row * p.stride_out;
    store_span<VEC>(dx_row, start, t.N, full, a);
    store_span<VEC>(dx_row + t.N, start, t.N, full, g);
  });
}

// ---- host helpers -------------------------------------------------------------------------------
// Threads across a row for `width` work items per row, at most `cap`: the row is cut into the
// fewest blocks of <= cap threads, all of the same width, so that no block is left mostly idle
// (a 300-wide row is two blocks of 150, not 256 + 44).
int row_threads(int64_t width, int cap, int64_t* col_blocks) {
  *col_blocks = ceil_div(width, cap);
  return static_cast<int>(ceil_div(width, *col_blocks));
}

void check_cuda(cudaError_t err, const char* kernel) {
  if (err == cudaSuccess) return;
  cudaGetLastError();  // clear it, so that it does not resurface at the next launch check
  throw std::runtime_error(std::string("dlh::") + kernel + ": " + cudaGetErrorString(err));
}

// SMs of the current device (the one torch's current stream belongs to), cached per device.
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

// Whether the 16-byte path is allowed, and the pad that aligns it. `anchor` (x) fixes the pad:
// head = elements before its first 16-byte boundary, pad = (VEC - head) % VEC. Every other tensor
// must then be 16-byte aligned at column `head` too (the bias at its own element size), and every
// row-varying tensor must have a row stride that is a multiple of 16 bytes, unless M == 1.
struct VecAlign {
  bool ok;
  int64_t head = 0, pad = 0;
  int64_t M;

  VecAlign(std::uintptr_t anchor, int esize, int vec, int64_t rows) : ok(anchor % esize == 0), M(rows) {
    if (ok) {
      head = int64_t((16 - anchor % 16) % 16) / esize;
      pad = (vec - head) % vec;
    }
  }
  void require(std::uintptr_t ptr, int esize, int64_t stride, bool row_varying) {
    if (!ptr) return;
    ok = ok && ptr % esize == 0 && aligned16(ptr + std::uintptr_t(head * esize)) &&
         (!row_varying || M <= 1 || (stride * esize) % 16 == 0);
  }
};

// The tiling of an (M, N) problem for groups of `vec` elements, `unroll` groups per thread, and
// the block shape: as many threads across a row as it has group columns (up to kThreads), the
// rest of the block down the rows. Warps may span rows; each row's share is still contiguous.
Tiling make_tiling(int64_t M, int64_t N, int vec, int unroll, const VecAlign& align, dim3* block) {
  Tiling t{};
  t.M = M;
  t.N = N;
  t.vec_ok = align.ok;
  t.pad = align.ok ? align.pad : 0;
  t.G = ceil_div(N + t.pad, vec);
  const int bx = row_threads(ceil_div(t.G, unroll), kThreads, &t.col_blocks);
  const int by = static_cast<int>(std::min<int64_t>(kThreads / bx, M));
  t.tiles = t.col_blocks * ceil_div(M, by);
  t.tiles32 = t.tiles <= int64_t(UINT_MAX);
  *block = dim3(bx, by);
  return t;
}

// Resident blocks of `threads` threads per SM. The occupancy API is asked once per kernel (and
// process), for kThreads; smaller blocks are scaled from it by thread count (registers are what
// limits these kernels), up to the 32 blocks an SM can hold.
template <auto Kernel>
int blocks_per_sm(const char* name, int threads) {
  static const int full_blocks = [name] {
    int n = 0;
    check_cuda(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, reinterpret_cast<const void*>(Kernel),
                                                             kThreads, 0),
               name);
    return std::max(n, 1);
  }();
  return std::clamp(full_blocks * kThreads / threads, 1, kMaxBlocksPerSm);
}

// One launch of a tiled elementwise kernel: enough blocks to fill every SM once (or one per
// tile, if fewer), each walking tiles with a grid-stride loop.
template <auto Kernel, typename Params>
void launch_tiled(const char* name, const Params& p, dim3 block, int sm_count, cudaStream_t stream) {
  const int64_t resident = int64_t(sm_count) * blocks_per_sm<Kernel>(name, block.x * block.y);
  const int64_t grid = std::min(p.t.tiles, resident);
  Kernel<<<dim3(static_cast<unsigned>(grid)), block, 0, stream>>>(p);
  check_launch(name);
}

// dbias plan: R row groups, from (M, N, sm_count) only (no dtype, no pointers), so that the
// workspace query and the launch agree. Enough row groups to give ~kPlanBlocksPerSm blocks per SM
// with column blocks of ~256 columns, but never fewer than kMinRowsPerPartial rows per group.
struct DbiasPlan {
  int64_t R, ldp;
};

DbiasPlan plan_dbias(int64_t M, int64_t N, int sm_count) {
  DbiasPlan plan;
  const int64_t col_blocks = ceil_div(N, 256);
  plan.R = ceil_div(int64_t(sm_count) * kPlanBlocksPerSm, col_blocks);
  plan.R = std::min(plan.R, ceil_div(M, kMinRowsPerPartial));
  plan.R = std::max<int64_t>(plan.R, 1);
  // Groups start at index g*VEC of a partial row and write VEC values: up to N + pad + VEC - 1
  // <= N + 14 floats; a multiple of 8 keeps every 16-byte group aligned.
  plan.ldp = round_up(N, 8) + 16;
  return plan;
}

// ---- launchers ----------------------------------------------------------------------------------
template <typename T>
void run_gelu_fwd(const GeluFwdArgs& a, int sm_count) {
  constexpr int VEC = kVec16<T>;
  int64_t M = a.M, N = a.N;
  if (!a.bias && M > 1 && a.stride_x == N && a.stride_y == N) {  // one row of M*N elements
    N *= M;
    M = 1;
  }
  const bool bias_f32 = a.bias_dtype == kFloat32;
  VecAlign align(a.x, sizeof(T), VEC, M);
  align.require(a.x, sizeof(T), a.stride_x, true);
  align.require(a.y, sizeof(T), a.stride_y, true);
  align.require(a.bias, bias_f32 ? 4 : sizeof(T), 0, false);
  GeluFwdParams p{};
  p.x = reinterpret_cast<const void*>(a.x);
  p.bias = reinterpret_cast<const void*>(a.bias);
  p.y = reinterpret_cast<void*>(a.y);
  p.stride_x = a.stride_x;
  p.stride_y = a.stride_y;
  p.bias_f32 = bias_f32;
  p.tanh = a.tanh;
  dim3 block;
  p.t = make_tiling(M, N, VEC, kFwdUnroll, align, &block);
  launch_tiled<gelu_fwd_kernel<T>>("gelu_fwd_kernel", p, block, sm_count, as_stream(a.stream));
}

template <typename T>
void run_gelu_bwd(const GeluBwdArgs& a) {
  constexpr int VEC = kVec16<T>;
  const cudaStream_t stream = as_stream(a.stream);
  int64_t M = a.M, N = a.N;
  if (!a.bias && !a.dbias && M > 1 && a.stride_dy == N && a.stride_x == N && a.stride_dx == N) {
    N *= M;
    M = 1;
  }
  const bool bias_f32 = a.bias_dtype == kFloat32;
  VecAlign align(a.x, sizeof(T), VEC, M);
  align.require(a.dy, sizeof(T), a.stride_dy, true);
  align.require(a.x, sizeof(T), a.stride_x, true);
  align.require(a.dx, sizeof(T), a.stride_dx, true);
  align.require(a.bias, bias_f32 ? 4 : sizeof(T), 0, false);
  GeluBwdParams p{};
  p.dy = reinterpret_cast<const void*>(a.dy);
  p.x = reinterpret_cast<const void*>(a.x);
  p.bias = reinterpret_cast<const void*>(a.bias);
  p.dx = reinterpret_cast<void*>(a.dx);
  p.stride_dy = a.stride_dy;
  p.stride_x = a.stride_x;
  p.stride_dx = a.stride_dx;
  p.bias_f32 = bias_f32;
  p.tanh = a.tanh;
  dim3 block;
  if (!a.dbias) {
    p.t = make_tiling(M, N, VEC, 1, align, &block);
    launch_tiled<gelu_bwd_kernel<T>>("gelu_bwd_kernel", p, block, a.sm_count, stream);
    return;
  }

  const DbiasPlan plan = plan_dbias(M, N, a.sm_count);
  p.t = make_tiling(M, N, VEC, 1, align, &block);
  // Rows summed inside a block (by), the rest of the block across columns.
  const int by = static_cast<int>(std::min<int64_t>(kDbiasRows, M));
  const int bx = row_threads(p.t.G, kThreads / by, &p.t.col_blocks);
  block = dim3(bx, by);
  p.dbias = reinterpret_cast<float*>(a.dbias);
  p.partials = plan.R > 1 ? reinterpret_cast<float*>(a.workspace) : nullptr;
  p.R = plan.R;
  p.ldp = plan.ldp;
  p.partials_vec_ok = aligned16(a.workspace);
  constexpr auto kernel = gelu_bwd_dbias_kernel<T>;
  const int64_t resident = int64_t(a.sm_count) * blocks_per_sm<kernel>("gelu_bwd_dbias_kernel", bx * by);
  p.gx = static_cast<unsigned>(std::clamp<int64_t>(resident / plan.R, 1, p.t.col_blocks));
  const dim3 grid(static_cast<unsigned>(p.gx * plan.R));
  kernel<<<grid, block, 0, stream>>>(p);
  check_launch("gelu_bwd_dbias_kernel");
  if (plan.R > 1) {
    const int64_t col_tiles = std::min<int64_t>(ceil_div(N, 32), int64_t(a.sm_count) * 64);
    gelu_dbias_reduce_kernel<<<dim3(static_cast<unsigned>(col_tiles)), dim3(32, kReduceRows), 0, stream>>>(
        p.partials, p.dbias, plan.R, plan.ldp, p.t.pad, N);
    check_launch("gelu_dbias_reduce_kernel");
  }
}

template <typename T, bool BACKWARD>
void run_geglu(const GegluBwdArgs& a) {
  constexpr int VEC = kVec16<T>;
  const int64_t H = a.H;
  VecAlign align(a.x, sizeof(T), VEC, a.M);
  align.require(a.x + std::uintptr_t(H * sizeof(T)), sizeof(T), a.stride_x, true);  // g
  align.require(a.dy, sizeof(T), a.stride_dy, true);
  align.require(a.dx, sizeof(T), a.stride_dx, true);
  if (BACKWARD) align.require(a.dx + std::uintptr_t(H * sizeof(T)), sizeof(T), a.stride_dx, true);
  GegluParams p{};
  p.dy = reinterpret_cast<const void*>(a.dy);
  p.x = reinterpret_cast<const void*>(a.x);
  p.out = reinterpret_cast<void*>(a.dx);
  p.stride_dy = a.stride_dy;
  p.stride_x = a.stride_x;
  p.stride_out = a.stride_dx;
  p.tanh = a.tanh;
  dim3 block;
  p.t = make_tiling(a.M, H, VEC, 1, align, &block);
  if constexpr (BACKWARD) {
    const char* name = "geglu_bwd_kernel";
    launch_tiled<geglu_bwd_kernel<T>>(name, p, block, device_sm_count(name), as_stream(a.stream));
  } else {
    const char* name = "geglu_fwd_kernel";
    launch_tiled<geglu_fwd_kernel<T>>(name, p, block, device_sm_count(name), as_stream(a.stream));
  }
}

// ---- argument checks ----------------------------------------------------------------------------
void check_size(const char* fn, const char* name, int64_t v) {
  check_arg(v >= 0, fn, std::string(name) + " must be >= 0, got " + std::to_string(v));
}

// Inputs may broadcast over rows (stride 0); outputs of more than one row must not overlap.
void check_stride(const char* fn, const char* name, int64_t stride, int64_t M, int64_t width, bool output) {
  const int64_t min_stride = output && M > 1 ? width : 0;
  check_arg(stride >= min_stride, fn,
            std::string(name) + " must be >= " + std::to_string(min_stride) + ", got " + std::to_string(stride));
}

void check_bias_dtype(const char* fn, int x_dtype, int bias_dtype) {
  check_dtype_code(bias_dtype, fn, "bias_dtype");
  check_arg(bias_dtype == kFloat32 || bias_dtype == x_dtype, fn,
            "bias_dtype must be float32 (0) or equal to x_dtype (" + std::to_string(x_dtype) + "), got " +
                std::to_string(bias_dtype));
}

}  // namespace

// ---- host entry points --------------------------------------------------------------------------
void gelu_fwd(const GeluFwdArgs& a) {
  const char* fn = "gelu_fwd";
  check_size(fn, "M", a.M);
  check_size(fn, "N", a.N);
  check_dtype_code(a.x_dtype, fn, "x_dtype");
  if (a.bias) check_bias_dtype(fn, a.x_dtype, a.bias_dtype);
  if (a.M == 0 || a.N == 0) return;
  check_present(fn, "x", a.x);
  check_present(fn, "y", a.y);
  check_stride(fn, "stride_x", a.stride_x, a.M, a.N, false);
  check_stride(fn, "stride_y", a.stride_y, a.M, a.N, true);
  const int sm_count = device_sm_count("gelu_fwd_kernel");
  dispatch_dtype(a.x_dtype, [&](auto t) { run_gelu_fwd<typename decltype(t)::type>(a, sm_count); });
}

int64_t gelu_bwd_workspace(int64_t M, int64_t N, int sm_count) {
  const char* fn = "gelu_bwd_workspace";
  check_size(fn, "M", M);
  check_size(fn, "N", N);
  check_sm_count(fn, sm_count);
  if (M == 0 || N == 0) return 0;
  const DbiasPlan plan = plan_dbias(M, N, sm_count);
  return plan.R > 1 ? plan.R * plan.ldp * int64_t(sizeof(float)) : 0;
}

void gelu_bwd(const GeluBwdArgs& a) {
  const char* fn = "gelu_bwd";
  check_size(fn, "M", a.M);
  check_size(fn, "N", a.N);
  check_sm_count(fn, a.sm_count);
  check_dtype_code(a.x_dtype, fn, "x_dtype");
  if (a.bias) check_bias_dtype(fn, a.x_dtype, a.bias_dtype);
  // Nothing to launch; with M == 0 dbias (all zeros) is left to the caller, like every output.
  if (a.M == 0 || a.N == 0) return;
  check_present(fn, "dy", a.dy);
  check_present(fn, "x", a.x);
  check_present(fn, "dx", a.dx);
  check_stride(fn, "stride_dy", a.stride_dy, a.M, a.N, false);
  check_stride(fn, "stride_x", a.stride_x, a.M, a.N, false);
  check_stride(fn, "stride_dx", a.stride_dx, a.M, a.N, true);
  check_arg(!a.dbias || plan_dbias(a.M, a.N, a.sm_count).R == 1 || a.workspace != 0, fn,
            "with dbias, this shape needs a workspace of gelu_bwd_workspace(M, N, sm_count) bytes, got none");
  dispatch_dtype(a.x_dtype, [&](auto t) { run_gelu_bwd<typename decltype(t)::type>(a); });
}

namespace {
void check_geglu(const char* fn, const GegluBwdArgs& a, bool backward) {
  check_size(fn, "M", a.M);
  check_size(fn, "H", a.H);
  check_dtype_code(a.dtype, fn, "dtype");
  if (a.M == 0 || a.H == 0) return;
  if (backward) check_present(fn, "dy", a.dy);
  check_present(fn, "x", a.x);
  check_present(fn, backward ? "dx" : "y", a.dx);
  if (backward) check_stride(fn, "stride_dy", a.stride_dy, a.M, a.H, false);
  check_stride(fn, "stride_x", a.stride_x, a.M, 2 * a.H, false);
  check_stride(fn, backward ? "stride_dx" : "stride_y", a.stride_dx, a.M, backward ? 2 * a.H : a.H, true);
}
}  // namespace

void geglu_fwd(const GegluFwdArgs& f) {
  const char* fn = "geglu_fwd";
  // The forward is the backward's argument set without dy; dx plays y.
  const GegluBwdArgs a{0, f.x, f.y, f.M, f.H, 0, f.stride_x, f.stride_y, f.tanh, f.dtype, f.stream};
  check_geglu(fn, a, false);
  if (a.M == 0 || a.H == 0) return;
  dispatch_dtype(a.dtype, [&](auto t) { run_geglu<typename decltype(t)::type, false>(a); });
}

void geglu_bwd(const GegluBwdArgs& a) {
  const char* fn = "geglu_bwd";
  check_geglu(fn, a, true);
  if (a.M == 0 || a.H == 0) return;
  dispatch_dtype(a.dtype, [&](auto t) { run_geglu<typename decltype(t)::type, true>(a); });
}

}  // namespace dlh
