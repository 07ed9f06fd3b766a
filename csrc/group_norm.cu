// group_norm.cu: GroupNorm, forward and backward, with an optional SiLU fused after the affine
// (the normalisation + activation pair of every DDPM U-Net ResBlock).
//
// Math (per group: sample n, group g, the Cg = C/G channels g*Cg .. g*Cg+Cg-1 at all S spatial
// positions, L = Cg*S elements; all in fp32 whatever the storage dtype)
//   mean = sum(x)/L, var = sum((x - mean)^2)/L (biased), rstd = 1/sqrt(var + eps)
//   xhat = (x - mean)*rstd,  z = xhat*w[c] + b[c],  y = silu(z) = z/(1 + exp(-z))  (or y = z)
//   Backward, z recomputed from x and the saved mean/rstd (never stored):
//   dz = dy*silu'(z) = dy*s*(1 + z*(1 - s)), s = 1/(1 + exp(-z))     (dz = dy without SiLU)
//   g = dz*w[c],  dx = rstd*(g - xhat*sum(g*xhat)/L - sum(g)/L)
//   dw[c] = sum over n, s of dz*xhat,  db[c] = sum over n, s of dz
//   Variances are two-pass over values held in registers; tiles of one group spread over blocks
//   are combined with Chan's formula: M2 = sum_t M2_t + sum_t n_t*(mean_t - mean)^2.
//
// Memory traffic per element, s = sizeof(x dtype) (w, b, mean, rstd and partials: O(N*C)):
//   forward : read x, write y          = 2s   (split groups: + a re-read of x, from L2)
//   backward: read dy, x, write dx     = 3s   (split groups: + a re-read of dy, x, from L2)
//             plus the dw/db partials: 8 bytes per (sample, channel, tile), ~Cg*3/tile of the total.
//   FLOPs: ~10 per element, ~25 with the SiLU (one expf): bandwidth-bound, the goal is bytes/s.
//
// Layout. Tensors arrive as (N, C, S) with three strides each; one of the channel and spatial
// strides must be 1, the same one for every tensor of a call (the Python glue copies a tensor
// that breaks this, which normal layouts never do):
//   * spatial-inner (contiguous NCHW): a group is Cg rows (channels) of K = S contiguous elements;
//   * channels-inner (channels_last, and spatial-less (N, C) inputs): a group is S rows (spatial
//     positions) of K = Cg contiguous channels.
//   Rows are cut into vectors of VEC = 16/s elements (the last one of a row masked), numbered
//   v = row*KV + kv, KV = ceil(K/VEC): a thread moves a vector with one 16-byte load or store
//   when every pointer is 16-byte aligned and every stride a multiple of 16 bytes (checked at run
//   time), else with scalar accesses. The weight of a vector is one scalar (spatial-inner) or VEC
//   consecutive weights (channels-inner).
//
// Kernel shapes (one template each; v1 thresholds are reasoned, not measured)
//   * fused: a group of up to 1024*16 elements (forward; 512*8 backward) sits in one block's
//     registers: one read, one write. Groups that are too big, and few big groups (< sm_count/2,
//     which would leave SMs idle), take the split path.
//   * split: a group is cut into tiles of tpr*EPT elements over several blocks. A stats pass writes
//     per-tile partials (count, mean, M2) or (sum g*xhat, sum g), an apply pass re-reads its tile,
//     combines the group's partials and writes y or dx. Samples go in batches of <= 16 MB of
//     re-read data, so that the re-read comes from L2, not DRAM.
//   * dw/db: every backward block writes its tile's per-channel sums of dz*xhat and dz, reduced in
//     a fixed order through shared memory and a warp per channel, as slot (n, c, tile) of an
//     (N, C, tiles) partial (zeros for the channels it does not touch); a last kernel adds each
//     channel's N*tiles slots in a fixed order. Deterministic, no atomics.
//   Offsets of samples, rows and groups are 64-bit; vector indices inside a group are 32-bit
//   (a group must have < 2^31 vectors, checked).
//
// Version history
//   v1: fused and split forward/backward for both inner layouts, runtime 16-byte vector
//       fallback, deterministic dw/db partials. Compiled for sm_80/sm_90 (ptxas, sm_90: no spills
//       but for the fp32 fused NCHW backward, 24 bytes); checked against float64 on the CPU
//       through tests/test_cuda_build.py's CUDA emulation. Not yet run on a GPU: no timings yet.

#include <algorithm>
#include <climits>
#include <type_traits>

#include "common.cuh"

namespace dlh {
namespace {

// ---- tuning constants (v1: reasoned, not measured) ------------------------------------------
constexpr int kMaxThreads = 1024;
constexpr int kFwdEpt = 16;            // forward: elements of x per thread (NV = 16/VEC vectors)
constexpr int kBwdEpt = 8;             // backward: keeps dy, xhat and dz per element
constexpr int kBwdMaxThreads = 512;    // the backward's per-element shared buffer: 512*8 floats
constexpr int kSplitMaxThreads = 512;  // split tiles: 512 threads, down to 128 to fill the GPU
constexpr int64_t kSplitMinElems = 8192;  // with few groups, split groups at least this large
// Bytes a split apply pass re-reads per launch pair (x, or dy + x), kept well inside L2.
// Overridable only so that the CPU emulation test can reach the batch logic at small sizes.
#ifdef DLH_TEST_GN_BATCH_BYTES
constexpr int64_t kBatchBytes = DLH_TEST_GN_BATCH_BYTES;
#else
constexpr int64_t kBatchBytes = int64_t(16) << 20;
#endif


enum class Pass { kFull, kStats, kApply };

// The shape of a call as the kernels see it: per group, R rows of K contiguous elements, KV
// vectors of VEC per row, Vg = R*KV vectors in all.
struct Geometry {
  int64_t N, C, S, G, Cg, R, K, KV, Vg;
  bool cols;  // channels-inner: rows are spatial positions, columns channels
};

Geometry geometry(int64_t N, int64_t C, int64_t S, int64_t G, bool channels_inner, int vec) {
  Geometry geo;
  geo.N = N;
  geo.C = C;
  geo.S = S;
  geo.G = G;
  geo.Cg = G > 0 ? C / G : 0;
  geo.cols = channels_inner;
  geo.R = channels_inner ? S : geo.Cg;
  geo.K = channels_inner ? geo.Cg : S;
  geo.KV = ceil_div(geo.K, vec);
  geo.Vg = geo.R * geo.KV;
  return geo;
}

// How a call is cut into launches. Depends only on the geometry, the direction, the dtype and
// sm_count, never on pointers, so that the *_workspace queries and the launches always agree.
struct Plan {
  bool split = false;
  int tpr = 32;          // threads per block
  int nv = 1;            // vectors per thread
  int64_t tile_v = 0;    // vectors per tile: tpr * nv
  int64_t chunks = 1;    // tiles per group
  int64_t batch = 0;     // samples per launch (pair)
};

Plan plan_for(const Geometry& geo, bool backward, int elem_bytes, int sm_count) {
  Plan p;
  const int vec = 16 / elem_bytes;
  p.nv = (backward ? kBwdEpt : kFwdEpt) / vec;
  const int max_fused = backward ? kBwdMaxThreads : kMaxThreads;
  const int64_t groups = geo.N * geo.G;
  const bool few = groups * 2 < sm_count && geo.Vg * vec >= kSplitMinElems;
  p.batch = geo.N;
  if (geo.Vg <= int64_t(max_fused) * p.nv && !few) {
    p.tpr = static_cast<int>(std::max<int64_t>(32, round_up(ceil_div(geo.Vg, p.nv), 32)));
    p.tile_v = int64_t(p.tpr) * p.nv;
    p.chunks = 1;
    return p;
  }
  p.split = true;
  const int64_t reread = geo.C * geo.S * elem_bytes * (backward ? 2 : 1);
  p.batch = std::min(geo.N, std::max<int64_t>(1, kBatchBytes / std::max<int64_t>(1, reread)));
  // Smaller tiles until there are >= 2 blocks per SM (or tiles reach 128 threads).
  p.tpr = kSplitMaxThreads;
  while (p.tpr > 128 && p.batch * geo.G * ceil_div(geo.Vg, int64_t(p.tpr) * p.nv) < 2 * sm_count)
    p.tpr /= 2;
  p.tile_v = int64_t(p.tpr) * p.nv;
  p.chunks = ceil_div(geo.Vg, p.tile_v);
  p.batch = std::max<int64_t>(1, std::min(p.batch, int64_t(INT_MAX) / (geo.G * p.chunks)));
  return p;
}

// Workspace, in floats, each section on a 16-byte boundary.
//   forward : [tile partials: batch*G x chunks x 3 (split only)]
//   backward: [tile partials: batch*G x chunks x 2 (split only)] [dw: N x C x chunks] [db: same]
struct Layout {
  int64_t tile_part = 0, dw_part = 0, db_part = 0, total = 0;
};

Layout layout_for(const Geometry& geo, const Plan& p, bool backward) {
  Layout l;
  const int64_t tile_floats = p.split ? p.batch * geo.G * p.chunks * (backward ? 2 : 3) : 0;
  l.dw_part = round_up(tile_floats, 4);
  if (!backward) {
    l.total = tile_floats;
    return l;
  }
  const int64_t channel_floats = geo.N * geo.C * p.chunks;
  l.db_part = l.dw_part + round_up(channel_floats, 4);
  l.total = l.db_part + channel_floats;
  return l;
}

__device__ __forceinline__ int imin(int a, int b) { return a < b ? a : b; }

// A tensor of the call as one group sees it: base pointer of the group, row stride.
struct Strides {
  int64_t n, row, group;  // per sample, per row (channel or spatial position), per group
};

// Where thread tid's NV vectors of tile `chunk` sit in the group: row, first column, and
// whether the vector exists (the last tile of a group may be partial).
template <int NV, int VEC>
struct VectorSlots {
  int row[NV], col[NV];
  bool ok[NV];

  __device__ __forceinline__ VectorSlots(int64_t v0, int tpr, int tid, int64_t Vg, int64_t KV) {
#pragma unroll
    for (int i = 0; i < NV; ++i) {
      const int64_t v = v0 + i * tpr + tid;
      ok[i] = v < Vg;
      // 32-bit division: Vg < 2^31 is checked on the host
      const int r = ok[i] ? static_cast<int>(v) / static_cast<int>(KV) : 0;
      row[i] = r;
      col[i] = ok[i] ? (static_cast<int>(v) - r * static_cast<int>(KV)) * VEC : 0;
    }
  }
};

// Per-element affine parameters of vector i: VEC consecutive channels (channels-inner) or one
// channel for the whole vector (spatial-inner). Absent parameters read as w = 1, b = 0.
template <bool COLS, int VEC, typename W>
__device__ __forceinline__ void load_params(const W* w, const W* b, int64_t ch0, int row, int col,
                                            int K, bool vec_ok, float* wv, float* bv) {
  if constexpr (COLS) {
    if (w) load_group<VEC>(w + ch0, col, K, vec_ok, wv);
    else fill<VEC>(wv, 1.f);
    if (b) load_group<VEC>(b + ch0, col, K, vec_ok, bv);
    else fill<VEC>(bv, 0.f);
  } else {
    fill<VEC>(wv, w ? to_float(w[ch0 + row]) : 1.f);
    fill<VEC>(bv, b ? to_float(b[ch0 + row]) : 0.f);
  }
}

// ---- forward --------------------------------------------------------------------------------
template <typename T, typename W>
struct FwdParams {
  const T* x;          // input, (N, C, S)
  const W* w;          // weight, (C,), or null (= 1)
  const W* b;          // bias, (C,), or null (= 0)
  T* y;                // output, (N, C, S)
  float* mean;         // (N*G,)
  float* rstd;         // (N*G,)
  float* partials;     // split: (batch*G, chunks, 3) per tile (count, mean, M2)
  Strides xs, ys;
  int64_t G, Cg, K, KV, Vg;
  int64_t group_begin, group_end;  // the groups (n*G + g) of this launch
  int64_t tile_v, chunks;
  float eps;
  bool silu;
  bool vec_ok;         // x, y: 16-byte aligned pointers and strides
  bool w_vec_ok;       // w, b: 16-byte aligned, and so is every group's first channel
};

// kFull: one block per group, normalised in registers. kStats: one block per (group, tile),
// writes the tile's partials. kApply: re-reads its tile, combines the group's partials, writes y.
template <typename T, typename W, int NV, Pass PASS, bool COLS>
__global__ void __launch_bounds__(kMaxThreads) group_norm_fwd_kernel(const FwdParams<T, W> p) {
  constexpr int VEC = kVec16<T>;
  constexpr int EPT = NV * VEC;
  __shared__ float2 red_sum[32];
  __shared__ float red_m2[32];

  const int tid = threadIdx.x, tpr = blockDim.x;
  const int64_t local = blockIdx.x / p.chunks;
  const int64_t chunk = blockIdx.x % p.chunks;
  const int64_t group = p.group_begin + local;
  if (group >= p.group_end) return;  // whole block
  const int64_t n = group / p.G, g = group - n * p.G;
  const int K = static_cast<int>(p.K);
  const T* xg = p.x + n * p.xs.n + g * p.xs.group;
  const VectorSlots<NV, VEC> slot(chunk * p.tile_v, tpr, tid, p.Vg, p.KV);

  float v[EPT];  // this thread's elements; padding holds 0
#pragma unroll
  for (int i = 0; i < NV; ++i) {
    if (slot.ok[i]) load_group<VEC>(xg + slot.row[i] * p.xs.row, slot.col[i], K, p.vec_ok, &v[i * VEC]);
    else fill<VEC>(&v[i * VEC], 0.f);
  }

  float mean, rstd;
  if constexpr (PASS == Pass::kApply) {
    // Every warp combines the group's tile partials by itself: no barrier, and since all warps
    // run the same arithmetic on the same data, all of them (in every block) agree bitwise.
    const float* part = p.partials + local * p.chunks * 3;
    const int lane = tid & 31;
    float count = 0.f, sum = 0.f;
    for (int64_t c = lane; c < p.chunks; c += 32) {
      count += part[3 * c];
      sum += part[3 * c] * part[3 * c + 1];
    }
    count = warp_sum(count);
    mean = warp_sum(sum) / count;
    float m2 = 0.f;
    for (int64_t c = lane; c < p.chunks; c += 32) {
      const float d = part[3 * c + 1] - mean;
      m2 += part[3 * c + 2] + part[3 * c] * d * d;
    }
    rstd = rsqrtf(warp_sum(m2) / count + p.eps);
    if (chunk == 0 && tid == 0) {
      p.mean[group] = mean;
      p.rstd[group] = rstd;
    }
  } else {
    float sum = 0.f, count = 0.f;
#pragma unroll
    for (int i = 0; i < NV; ++i) {
      if (!slot.ok[i]) continue;
      count += float(imin(VEC, K - slot.col[i]));
#pragma unroll
      for (int k = 0; k < VEC; ++k) sum += v[i * VEC + k];
    }
    const float2 totals = block_sum2(make_float2(sum, count), red_sum);
    mean = totals.x / totals.y;
    // Second pass over the registers; padding must not contribute (0 - mean)^2.
    float m2 = 0.f;
#pragma unroll
    for (int i = 0; i < NV; ++i) {
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        const float d = v[i * VEC + k] - mean;
        if (slot.ok[i] && slot.col[i] + k < K) m2 += d * d;
      }
    }
    m2 = block_sum(m2, red_m2);
    if constexpr (PASS == Pass::kStats) {
      if (tid == 0) {
        float* part = p.partials + (local * p.chunks + chunk) * 3;
        part[0] = totals.y;
        part[1] = mean;
        part[2] = m2;
      }
      return;
    }
    rstd = rsqrtf(m2 / totals.y + p.eps);
    if (tid == 0) {
      p.mean[group] = mean;
      p.rstd[group] = rstd;
    }
  }

  if constexpr (PASS != Pass::kStats) {
    T* yg = p.y + n * p.ys.n + g * p.ys.group;
    const int64_t ch0 = g * p.Cg;
#pragma unroll
    for (int i = 0; i < NV; ++i) {
      if (!slot.ok[i]) continue;
      float wv[VEC], bv[VEC], out[VEC];
      load_params<COLS, VEC>(p.w, p.b, ch0, slot.row[i], slot.col[i], K, p.w_vec_ok, wv, bv);
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        const float z = (v[i * VEC + k] - mean) * rstd * wv[k] + bv[k];
        out[k] = p.silu ? z / (1.f + expf(-z)) : z;
      }
      store_group<VEC>(yg + slot.row[i] * p.ys.row, slot.col[i], K, p.vec_ok, out);
    }
  }
}

// ---- backward -------------------------------------------------------------------------------
template <typename T, typename W>
struct BwdParams {
  const T* dy;         // upstream gradient, (N, C, S)
  const T* x;          // the forward's input, (N, C, S)
  const W* w;          // weight, (C,), or null (= 1)
  const W* b;          // bias, (C,), or null (= 0): only the SiLU needs it
  const float* mean;   // (N*G,)
  const float* rstd;   // (N*G,)
  T* dx;               // (N, C, S)
  float* tile_part;    // split: (batch*G, chunks, 2) per tile (sum g*xhat, sum g)
  float* dw_part;      // (N, C, chunks) per-tile channel sums of dz*xhat, or null
  float* db_part;      // (N, C, chunks) per-tile channel sums of dz, or null
  Strides dys, xs, dxs;
  int64_t G, Cg, C, K, KV, Vg;
  int64_t group_begin, group_end, tile_v, chunks;
  float inv_count;     // 1/L
  bool silu, vec_ok, w_vec_ok;
};

// The tile's sum of buf[] (one float per element slot, 0 for padding) per channel of the group,
// written to part[(n*C + ch0 + j)*chunks + chunk] for every channel j of the group (0 for the
// channels the tile does not touch). One warp per channel, lanes in a fixed order, then a
// butterfly: deterministic.
template <bool COLS, int VEC>
__device__ void channel_sums(const float* buf, float* part, int64_t n, int64_t C, int64_t ch0,
                             int64_t Cg, int64_t chunk, int64_t chunks, int64_t v0, int valid_v,
                             int KV) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, warps = blockDim.x >> 5;
  for (int j = warp; j < Cg; j += warps) {
    float acc = 0.f;
    if constexpr (COLS) {
      // channel j is element k of column vector kv; this tile's vectors of that column are the
      // local vectors lv = first, first + KV, ...
      const int kv = j / VEC, k = j - kv * VEC;
      const int first = static_cast<int>(((kv - v0 % KV) % KV + KV) % KV);
      for (int lv = first + lane * KV; lv < valid_v; lv += 32 * KV) acc += buf[lv * VEC + k];
    } else {
      // channel j is row j: the local vectors [j*KV - v0, (j+1)*KV - v0), clipped to the tile
      const int lo = static_cast<int>(std::max<int64_t>(j * int64_t(KV) - v0, 0));
      const int hi = static_cast<int>(std::min<int64_t>((j + 1) * int64_t(KV) - v0, valid_v));
      for (int e = lo * VEC + lane; e < hi * VEC; e += 32) acc += buf[e];
    }
    acc = warp_sum(acc);
    if (lane == 0) part[((n * C + ch0 + j) * chunks) + chunk] = acc;
  }
}

// kFull: one block per group: dx, and the group's channel sums. kStats: one block per (group,
// tile): the tile's (sum g*xhat, sum g) and channel sums. kApply: dx of the tile, from the
// group's tile sums.
template <typename T, typename W, int NV, Pass PASS, bool COLS>
__global__ void __launch_bounds__(kBwdMaxThreads) group_norm_bwd_kernel(const BwdParams<T, W> p) {
  constexpr int VEC = kVec16<T>;
  constexpr int EPT = NV * VEC;
  __shared__ float2 red[32];
  __shared__ float buf[kBwdMaxThreads * kBwdEpt];  // per-element dw/db contributions

  const int tid = threadIdx.x, tpr = blockDim.x;
  const int64_t local = blockIdx.x / p.chunks;
  const int64_t chunk = blockIdx.x % p.chunks;
  const int64_t group = p.group_begin + local;
  if (group >= p.group_end) return;  // whole block
  const int64_t n = group / p.G, g = group - n * p.G;
  const int K = static_cast<int>(p.K);
  const int64_t v0 = chunk * p.tile_v;
  const VectorSlots<NV, VEC> slot(v0, tpr, tid, p.Vg, p.KV);
  const T* dyg = p.dy + n * p.dys.n + g * p.dys.group;
  const T* xg = p.x + n * p.xs.n + g * p.xs.group;
  const int64_t ch0 = g * p.Cg;
  const float mean = p.mean[group], rstd = p.rstd[group];

  // dz and xhat of every element (0 for padding), and gw = dz*w in place of dy.
  float gw[EPT], xhat[EPT], dz[EPT];
  float2 sums = make_float2(0.f, 0.f);  // this thread's (sum g*xhat, sum g)
#pragma unroll
  for (int i = 0; i < NV; ++i) {
    float wv[VEC], bv[VEC];
    if (slot.ok[i]) {
      load_group<VEC>(dyg + slot.row[i] * p.dys.row, slot.col[i], K, p.vec_ok, &gw[i * VEC]);
      load_group<VEC>(xg + slot.row[i] * p.xs.row, slot.col[i], K, p.vec_ok, &xhat[i * VEC]);
      load_params<COLS, VEC>(p.w, p.b, ch0, slot.row[i], slot.col[i], K, p.w_vec_ok, wv, bv);
    } else {
      fill<VEC>(&gw[i * VEC], 0.f);
      fill<VEC>(&xhat[i * VEC], 0.f);
      fill<VEC>(wv, 0.f);
      fill<VEC>(bv, 0.f);
    }
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      const int e = i * VEC + k;
      const bool valid = slot.ok[i] && slot.col[i] + k < K;
      xhat[e] = valid ? (xhat[e] - mean) * rstd : 0.f;
      float d = gw[e];  // dy; 0 on padding
      if (p.silu) {
        const float z = xhat[e] * wv[k] + bv[k];
        const float s = 1.f / (1.f + expf(-z));
        d *= s * (1.f + z * (1.f - s));
      }
      dz[e] = d;
      gw[e] = d * wv[k];
      sums.x += gw[e] * xhat[e];
      sums.y += gw[e];
    }
  }

  if constexpr (PASS != Pass::kApply) {
    // The tile's channel sums, through shared memory: element slot (i*tpr + tid)*VEC + k.
    const int valid_v = static_cast<int>(std::min<int64_t>(p.tile_v, p.Vg - v0));
    for (int which = 0; which < 2; ++which) {
      float* part = which == 0 ? p.dw_part : p.db_part;
      if (!part) continue;  // uniform over the block
#pragma unroll
      for (int i = 0; i < NV; ++i)
#pragma unroll
        for (int k = 0; k < VEC; ++k)
          buf[(i * tpr + tid) * VEC + k] = which == 0 ? dz[i * VEC + k] * xhat[i * VEC + k] : dz[i * VEC + k];
      __syncthreads();
      channel_sums<COLS, VEC>(buf, part, n, p.C, ch0, p.Cg, chunk, p.chunks, v0, valid_v,
                              static_cast<int>(p.KV));
      __syncthreads();
    }
  }

  float c1, c2;  // sum(g*xhat)/L, sum(g)/L
  if constexpr (PASS == Pass::kApply) {
    // every warp adds the group's tile sums by itself (see the forward's kApply)
    const float* part = p.tile_part + local * p.chunks * 2;
    float a = 0.f, b = 0.f;
    for (int64_t c = tid & 31; c < p.chunks; c += 32) {
      a += part[2 * c];
      b += part[2 * c + 1];
    }
    c1 = warp_sum(a) * p.inv_count;
    c2 = warp_sum(b) * p.inv_count;
  } else {
    sums = block_sum2(sums, red);
    if constexpr (PASS == Pass::kStats) {
      if (tid == 0) {
        float* part = p.tile_part + (local * p.chunks + chunk) * 2;
        part[0] = sums.x;
        part[1] = sums.y;
      }
      return;
    }
    c1 = sums.x * p.inv_count;
    c2 = sums.y * p.inv_count;
  }

  if constexpr (PASS != Pass::kStats) {
    T* dxg = p.dx + n * p.dxs.n + g * p.dxs.group;
#pragma unroll
    for (int i = 0; i < NV; ++i) {
      if (!slot.ok[i]) continue;
      float out[VEC];
#pragma unroll
      for (int k = 0; k < VEC; ++k) out[k] = rstd * (gw[i * VEC + k] - xhat[i * VEC + k] * c1 - c2);
      store_group<VEC>(dxg + slot.row[i] * p.dxs.row, slot.col[i], K, p.vec_ok, out);
    }
  }
}

// dw[c] = sum over n and tiles of dw_part[n, c, tile] (db likewise), in a fixed order: one warp
// per channel, lanes striding over the N*chunks slots, then a butterfly.
__global__ void __launch_bounds__(256)
group_norm_channel_reduce_kernel(const float* dw_part, const float* db_part, float* dw, float* db,
                                 int64_t N, int64_t C, int64_t chunks) {
  const int lane = threadIdx.x & 31;
  const int64_t c = int64_t(blockIdx.x) * (blockDim.x >> 5) + (threadIdx.x >> 5);
  if (c >= C) return;  // whole warp
  float a = 0.f, b = 0.f;
  for (int64_t t = lane; t < N * chunks; t += 32) {
    const int64_t n = t / chunks, k = t - n * chunks;
    const int64_t idx = (n * C + c) * chunks + k;
    if (dw_part) a += dw_part[idx];
    if (db_part) b += db_part[idx];
  }
  a = warp_sum(a);
  b = warp_sum(b);
  if (lane == 0) {
    if (dw) dw[c] = a;
    if (db) db[c] = b;
  }
}

// ---- launchers ------------------------------------------------------------------------------
template <typename T, typename W, int NV, Pass PASS, bool COLS>
void launch_fwd(int64_t blocks, int tpr, const FwdParams<T, W>& p, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(blocks));
  group_norm_fwd_kernel<T, W, NV, PASS, COLS><<<grid, dim3(tpr), 0, stream>>>(p);
  check_launch("group_norm_fwd_kernel");
}

template <typename T, typename W, int NV, Pass PASS, bool COLS>
void launch_bwd(int64_t blocks, int tpr, const BwdParams<T, W>& p, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(blocks));
  group_norm_bwd_kernel<T, W, NV, PASS, COLS><<<grid, dim3(tpr), 0, stream>>>(p);
  check_launch("group_norm_bwd_kernel");
}

Strides strides_of(const Geometry& geo, int64_t sn, int64_t sc, int64_t ss) {
  return Strides{sn, geo.cols ? ss : sc, geo.Cg * sc};
}

// 16-byte vectors need an aligned pointer and strides that are multiples of VEC elements (a
// stride that is never used, because its dim has one entry, cannot spoil them).
bool vec_aligned(std::uintptr_t ptr, const Strides& s, const Geometry& geo, int vec) {
  return !ptr || (aligned16(ptr) && (geo.N == 1 || s.n % vec == 0) && (geo.R == 1 || s.row % vec == 0) &&
                  (geo.G == 1 || s.group % vec == 0));
}

template <typename W>
bool params_vec_aligned(std::uintptr_t w, std::uintptr_t b, const Geometry& geo) {
  const bool groups_ok = geo.G == 1 || (geo.Cg * int64_t(sizeof(W))) % 16 == 0;
  return (!w || aligned16(w)) && (!b || aligned16(b)) && groups_ok;
}

template <typename T, typename W, bool COLS>
void run_fwd(const GroupNormFwdArgs& a, const Geometry& geo, const Plan& plan) {
  constexpr int VEC = kVec16<T>;
  constexpr int NV = kFwdEpt / VEC;
  FwdParams<T, W> p{};
  p.x = reinterpret_cast<const T*>(a.x);
  p.w = reinterpret_cast<const W*>(a.w);
  p.b = reinterpret_cast<const W*>(a.b);
  p.y = reinterpret_cast<T*>(a.y);
  p.mean = reinterpret_cast<float*>(a.mean);
  p.rstd = reinterpret_cast<float*>(a.rstd);
  p.partials = reinterpret_cast<float*>(a.workspace);
  p.xs = strides_of(geo, a.stride_xn, a.stride_xc, a.stride_xs);
  p.ys = strides_of(geo, a.stride_yn, a.stride_yc, a.stride_ys);
  p.G = geo.G;
  p.Cg = geo.Cg;
  p.K = geo.K;
  p.KV = geo.KV;
  p.Vg = geo.Vg;
  p.tile_v = plan.tile_v;
  p.chunks = plan.chunks;
  p.eps = a.eps;
  p.silu = a.silu;
  p.vec_ok = vec_aligned(a.x, p.xs, geo, VEC) && vec_aligned(a.y, p.ys, geo, VEC);
  p.w_vec_ok = params_vec_aligned<W>(a.w, a.b, geo);
  const cudaStream_t stream = as_stream(a.stream);
  if (!plan.split) {
    p.group_begin = 0;
    p.group_end = geo.N * geo.G;
    launch_fwd<T, W, NV, Pass::kFull, COLS>(p.group_end, plan.tpr, p, stream);
    return;
  }
  for (int64_t n0 = 0; n0 < geo.N; n0 += plan.batch) {
    p.group_begin = n0 * geo.G;
    p.group_end = std::min(geo.N, n0 + plan.batch) * geo.G;
    const int64_t blocks = (p.group_end - p.group_begin) * plan.chunks;
    launch_fwd<T, W, NV, Pass::kStats, COLS>(blocks, plan.tpr, p, stream);
    launch_fwd<T, W, NV, Pass::kApply, COLS>(blocks, plan.tpr, p, stream);
  }
}

template <typename T, typename W, bool COLS>
void run_bwd(const GroupNormBwdArgs& a, const Geometry& geo, const Plan& plan) {
  constexpr int VEC = kVec16<T>;
  constexpr int NV = kBwdEpt / VEC;
  const Layout layout = layout_for(geo, plan, true);
  float* ws = reinterpret_cast<float*>(a.workspace);
  float* dw = reinterpret_cast<float*>(a.dw);
  float* db = reinterpret_cast<float*>(a.db);
  BwdParams<T, W> p{};
  p.dy = reinterpret_cast<const T*>(a.dy);
  p.x = reinterpret_cast<const T*>(a.x);
  p.w = reinterpret_cast<const W*>(a.w);
  p.b = reinterpret_cast<const W*>(a.b);
  p.mean = reinterpret_cast<const float*>(a.mean);
  p.rstd = reinterpret_cast<const float*>(a.rstd);
  p.dx = reinterpret_cast<T*>(a.dx);
  p.tile_part = plan.split ? ws + layout.tile_part : nullptr;
  p.dw_part = dw ? ws + layout.dw_part : nullptr;
  p.db_part = db ? ws + layout.db_part : nullptr;
  p.dys = strides_of(geo, a.stride_dyn, a.stride_dyc, a.stride_dys);
  p.xs = strides_of(geo, a.stride_xn, a.stride_xc, a.stride_xs);
  p.dxs = strides_of(geo, a.stride_dxn, a.stride_dxc, a.stride_dxs);
  p.G = geo.G;
  p.Cg = geo.Cg;
  p.C = geo.C;
  p.K = geo.K;
  p.KV = geo.KV;
  p.Vg = geo.Vg;
  p.tile_v = plan.tile_v;
  p.chunks = plan.chunks;
  p.inv_count = 1.f / (float(geo.Cg) * float(geo.S));
  p.silu = a.silu;
  p.vec_ok = vec_aligned(a.dy, p.dys, geo, VEC) && vec_aligned(a.x, p.xs, geo, VEC) &&
             vec_aligned(a.dx, p.dxs, geo, VEC);
  p.w_vec_ok = params_vec_aligned<W>(a.w, a.b, geo);
  const cudaStream_t stream = as_stream(a.stream);
  if (!plan.split) {
    p.group_begin = 0;
    p.group_end = geo.N * geo.G;
    launch_bwd<T, W, NV, Pass::kFull, COLS>(p.group_end, plan.tpr, p, stream);
  } else {
    for (int64_t n0 = 0; n0 < geo.N; n0 += plan.batch) {
      p.group_begin = n0 * geo.G;
      p.group_end = std::min(geo.N, n0 + plan.batch) * geo.G;
      const int64_t blocks = (p.group_end - p.group_begin) * plan.chunks;
      launch_bwd<T, W, NV, Pass::kStats, COLS>(blocks, plan.tpr, p, stream);
      launch_bwd<T, W, NV, Pass::kApply, COLS>(blocks, plan.tpr, p, stream);
    }
  }
  if (dw || db) {
    constexpr int kWarps = 8;
    const dim3 grid(static_cast<unsigned>(ceil_div(geo.C, kWarps)));
    const dim3 block(32 * kWarps);
    group_norm_channel_reduce_kernel<<<grid, block, 0, stream>>>(p.dw_part, p.db_part, dw, db, geo.N, geo.C,
                                                                 plan.chunks);
    check_launch("group_norm_channel_reduce_kernel");
  }
}

// ---- argument checks ------------------------------------------------------------------------
void check_sizes(const char* fn, int64_t N, int64_t C, int64_t S, int64_t G, int sm_count) {
  check_arg(N >= 0, fn, "N must be >= 0, got " + std::to_string(N));
  check_arg(C >= 0, fn, "C must be >= 0, got " + std::to_string(C));
  check_arg(S >= 0, fn, "S must be >= 0, got " + std::to_string(S));
  check_arg(G >= 1, fn, "G (num_groups) must be >= 1, got " + std::to_string(G));
  check_arg(C % G == 0, fn,
            "G (num_groups) must divide C = " + std::to_string(C) + ", got " + std::to_string(G));
  check_sm_count(fn, sm_count);
}

void check_group_size(const char* fn, const Geometry& geo) {
  check_arg(geo.K < INT_MAX && geo.Vg < INT_MAX, fn,
            "a group of " + std::to_string(geo.Cg) + " x " + std::to_string(geo.S) +
                " elements is too large (at most 2^31 16-byte vectors per group)");
}

// The vectorised dim must have unit stride in every tensor: spatial (channels_inner false) or
// channels (true). A dim of size 1 has no stride to speak of.
void check_inner(const char* fn, const char* name, const Geometry& geo, int64_t sc, int64_t ss) {
  if (geo.cols)
    check_arg(sc == 1 || geo.C == 1, fn,
              std::string(name) + ": channels_inner needs a channel stride of 1, got " + std::to_string(sc));
  else
    check_arg(ss == 1 || geo.S == 1, fn,
              std::string(name) + ": spatial-inner needs a spatial stride of 1, got " + std::to_string(ss));
}

int elem_size(int x_dtype, const char* fn) {
  check_dtype_code(x_dtype, fn, "x_dtype");
  return dtype_size(x_dtype);
}

// The geometry for 16-byte vectors of es-byte elements, once its group size is checked.
Geometry checked_geometry(const char* fn, int64_t N, int64_t C, int64_t S, int64_t G, bool channels_inner,
                          int es) {
  const Geometry geo = geometry(N, C, S, G, channels_inner, 16 / es);
  check_group_size(fn, geo);
  return geo;
}

// Calls f(TypeTag<T>{}, TypeTag<W>{}, std::bool_constant<COLS>{}) for the call's activation and
// parameter types (dispatch_norm_types) and its inner dim (COLS: channels_inner).
template <typename Args, typename F>
void dispatch_group_norm(const Args& a, const Geometry& geo, const char* fn, F&& f) {
  dispatch_norm_types(a.x_dtype, (a.w || a.b) ? a.w_dtype : a.x_dtype, fn, [&](auto t, auto w) {
    if (geo.cols) f(t, w, std::true_type{});
    else f(t, w, std::false_type{});
  });
}

// The checks both entry points start with (sizes, dtype codes); returns x's element size.
template <typename Args>
int check_call(const char* fn, const Args& a) {
  check_sizes(fn, a.N, a.C, a.S, a.G, a.sm_count);
  const int es = elem_size(a.x_dtype, fn);
  check_dtype_code(a.w_dtype, fn, "w_dtype");
  return es;
}

// Both workspace queries: bytes of the forward's or the backward's layout.
int64_t workspace_bytes(const char* fn, int64_t N, int64_t C, int64_t S, int64_t G, bool channels_inner,
                        int x_dtype, int sm_count, bool backward) {
  check_sizes(fn, N, C, S, G, sm_count);
  const int es = elem_size(x_dtype, fn);
  if (N * C * S == 0) return 0;
  const Geometry geo = checked_geometry(fn, N, C, S, G, channels_inner, es);
  return layout_for(geo, plan_for(geo, backward, es, sm_count), backward).total * int64_t(sizeof(float));
}

}  // namespace

// ---- host entry points ----------------------------------------------------------------------
int64_t group_norm_fwd_workspace(int64_t N, int64_t C, int64_t S, int64_t G, bool channels_inner,
                                 int x_dtype, int sm_count) {
  return workspace_bytes("group_norm_fwd_workspace", N, C, S, G, channels_inner, x_dtype, sm_count, false);
}

void group_norm_fwd(const GroupNormFwdArgs& a) {
  const char* fn = "group_norm_fwd";
  const int es = check_call(fn, a);
  if (a.N * a.C * a.S == 0) return;
  check_present(fn, "x", a.x);
  check_present(fn, "y", a.y);
  check_present(fn, "mean", a.mean);
  check_present(fn, "rstd", a.rstd);
  const Geometry geo = checked_geometry(fn, a.N, a.C, a.S, a.G, a.channels_inner, es);
  check_inner(fn, "x", geo, a.stride_xc, a.stride_xs);
  check_inner(fn, "y", geo, a.stride_yc, a.stride_ys);
  const Plan plan = plan_for(geo, false, es, a.sm_count);
  check_arg(!plan.split || a.workspace != 0, fn,
            "this shape needs a workspace of group_norm_fwd_workspace(...) bytes, got none");
  dispatch_group_norm(a, geo, fn, [&](auto t, auto w, auto cols) {
    run_fwd<typename decltype(t)::type, typename decltype(w)::type, decltype(cols)::value>(a, geo, plan);
  });
}

int64_t group_norm_bwd_workspace(int64_t N, int64_t C, int64_t S, int64_t G, bool channels_inner,
                                 int x_dtype, int sm_count) {
  return workspace_bytes("group_norm_bwd_workspace", N, C, S, G, channels_inner, x_dtype, sm_count, true);
}

void group_norm_bwd(const GroupNormBwdArgs& a) {
  const char* fn = "group_norm_bwd";
  const int es = check_call(fn, a);
  if (a.N * a.C * a.S == 0) {
    // nothing to normalise: the channel sums are empty sums
    check_arg(a.C == 0 || (!a.dw && !a.db), fn,
              "dw/db of an empty input are zeros: fill them on the host (no launch here)");
    return;
  }
  check_present(fn, "dy", a.dy);
  check_present(fn, "x", a.x);
  check_present(fn, "mean", a.mean);
  check_present(fn, "rstd", a.rstd);
  check_present(fn, "dx", a.dx);
  const Geometry geo = checked_geometry(fn, a.N, a.C, a.S, a.G, a.channels_inner, es);
  check_inner(fn, "dy", geo, a.stride_dyc, a.stride_dys);
  check_inner(fn, "x", geo, a.stride_xc, a.stride_xs);
  check_inner(fn, "dx", geo, a.stride_dxc, a.stride_dxs);
  const Plan plan = plan_for(geo, true, es, a.sm_count);
  check_arg(a.workspace != 0 || layout_for(geo, plan, true).total == 0 || (!plan.split && !a.dw && !a.db), fn,
            "this shape needs a workspace of group_norm_bwd_workspace(...) bytes, got none");
  dispatch_group_norm(a, geo, fn, [&](auto t, auto w, auto cols) {
    run_bwd<typename decltype(t)::type, typename decltype(w)::type, decltype(cols)::value>(a, geo, plan);
  });
}

}  // namespace dlh
