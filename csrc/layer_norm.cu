// layer_norm.cu: LayerNorm and RMSNorm, forward and backward, optionally fused with the
// residual add of a pre-norm transformer block (h = x + res; y = norm(h)).
//
// Math (per row of N elements, all in fp32; h is x when there is no residual)
//   LayerNorm: mean = sum(h)/N, var = sum((h - mean)^2)/N (biased), rstd = 1/sqrt(var + eps)
//              xhat = (h - mean)*rstd,  y = xhat*w + b
//   RMSNorm:   rstd = 1/sqrt(sum(h^2)/N + eps),  xhat = h*rstd,  y = xhat*w   (mean stored as 0)
//   Backward, with g = dy*w:
//              dx = rstd*(g - xhat*sum(g*xhat)/N - sum(g)/N)       (RMSNorm drops the last term)
//              dx += dh_out   (the gradient reaching the returned residual sum h, if any)
//              dw[j] = sum_i dy[i,j]*xhat[i,j],  db[j] = sum_i dy[i,j]
//   The variance is the two-pass form over values held in registers, never E[h^2] - E[h]^2 (which
//   loses every digit when |mean| >> std). Row tiles split over several blocks are combined with
//   Chan's formula: M2 = sum_c M2_c + sum_c n_c*(mean_c - mean)^2.
//
// Memory traffic per element, s = sizeof(x dtype) (w, b, mean, rstd are O(N + M), noise):
//   forward : read x, write y                              = 2s   (+ read res, write h = 4s)
//   backward: read dy and h, write dx                      = 3s   (+ read dh_out       = 4s)
//             plus the dw/db partials, 2 * 8 bytes per element of a (groups x N) fp32 buffer,
//             with groups ~ a few per SM: a few percent of the total once M >> groups.
//   FLOPs are ~10 per element each way: the kernels are bandwidth-bound, the goal is bytes/s.
//
// Kernel shapes (thresholds are v1 guesses, see the constants below; all are one template each)
//   * short rows (forward N <= 1024, backward N <= 256): one warp per row, 4 rows per block,
//     shuffles only (no barriers).
//   * medium rows (forward N <= 32768, backward N <= 8192): one block of up to 1024 threads per
//     row, the row held in registers (EPT elements per thread, a template parameter), so that h
//     is read from memory exactly once.
//   * long rows, or few rows of N >= 16384 (forward): each row is cut into tiles over several
//     blocks. A stats pass writes per-tile partials (mean, M2) or (sum g*xhat, sum g) to the
//     workspace, an apply pass re-reads its tile, combines the row's partials and writes the
//     output. Rows go in batches of ~2M elements so that the re-read comes from L2, not DRAM.
//   * backward dw/db: each row group (block, or warp on the short-row path) owns a set of rows,
//     accumulates dy*xhat and dy in registers and writes one partial row; a second kernel sums
//     the partials in a fixed order. Deterministic, no atomics.
//   Loads and stores are 16-byte vectors when every pointer is 16-byte aligned and every row
//   stride a multiple of 16 bytes (checked at run time); otherwise the same kernels use scalar
//   accesses. Row offsets and tile origins are 64-bit; columns inside a tile (<= 32768) are not.
//
// Version history
//   v1: warp / block / split-row forward, block / split-row backward with deterministic dw/db
//       partials, runtime vector-alignment fallback. Compiled for sm_80/sm_90 (ptxas: no spills
//       on sm_90 but for the 32-fp32-per-thread forward, 56 bytes, and the fp32 split backward,
//       12 bytes); checked against float64 on the CPU through tests/test_cuda_build.py's CUDA
//       emulation. Not yet run on a GPU: no timings yet.

#include <algorithm>
#include <climits>

#include "common.cuh"

namespace dlh {
namespace {

// ---- tuning constants (v1: reasoned, not measured) ------------------------------------------
constexpr int kMaxThreads = 1024;
constexpr int kWarpRowsPerBlock = 4;      // rows per block on the one-warp-per-row path
constexpr int64_t kMaxWarpRowN = 1024;    // N up to this: one warp per row (32 fp32 per lane)
constexpr int kFwdMaxEpt = 32;            // 32 fp32 of row per thread keeps us under 64 registers
constexpr int64_t kFwdMaxRowN = int64_t(kMaxThreads) * kFwdMaxEpt;  // 32768
constexpr int kFwdSplitEpt = 16;          // elements per thread on the split-row forward
constexpr int kBwdEpt = 8;                // backward keeps g, xhat and the dw, db sums: 4*EPT
constexpr int64_t kBwdMaxRowN = int64_t(kMaxThreads) * kBwdEpt;  // 8192
constexpr int64_t kSplitMinN = 16384;     // with few rows (< sm_count/2), split rows this long
// Elements re-read per (stats, apply) launch pair: 8 MB fp32 (16 MB for dy + h), well inside L2.
// Overridable only so that the CPU emulation test can reach the row-batch logic at small sizes.
#ifdef DLH_TEST_SPLIT_BATCH_ELEMS
constexpr int64_t kSplitBatchElems = DLH_TEST_SPLIT_BATCH_ELEMS;
#else
constexpr int64_t kSplitBatchElems = int64_t(2) << 20;
#endif
constexpr int kMinRowsPerGroup = 4;       // backward: rows per dw/db partial, to bound its cost
constexpr int64_t kMaxRowsPerLaunch = int64_t(1) << 28;  // keeps gridDim.x < 2^31

enum class Pass { kFull, kStats, kApply };

// How a call is cut into launches. Depends only on (M, N, sm_count), never on dtypes or
// pointers, so that the *_workspace queries and the launches always agree.
struct Plan {
  bool split = false;      // rows cut into `chunks` tiles of `tile` columns (stats + apply pass)
  int ept = 0;             // elements of a row per thread
  int tpr = 0;             // threads per row tile: blockDim.x, a multiple of 32
  int rows_per_block = 1;  // blockDim.y; > 1 only when tpr == 32 (no block barriers then)
  int64_t tile = 0;        // columns per block
  int64_t chunks = 1;      // blocks per row
  int64_t batch_rows = 0;  // rows per launch (pair)
  int64_t groups = 0;      // backward: row groups, each with its own dw/db partial
};

Plan plan_fwd(int64_t M, int64_t N, int sm_count) {
  Plan p;
  p.tile = N;
  p.batch_rows = std::min(M, kMaxRowsPerLaunch);
  const bool few_rows = M * 2 < sm_count;
  if (N <= kMaxWarpRowN) {
    p.tpr = 32;
    p.rows_per_block = kWarpRowsPerBlock;
    p.ept = N <= 256 ? 8 : N <= 512 ? 16 : 32;
  } else if (N <= kFwdMaxRowN && !(few_rows && N >= kSplitMinN)) {
    // Fewest elements per thread that keeps the block at <= 256 threads (several blocks per SM
    // overlap one block's reduction with another's loads); only the longest rows need 32/thread.
    p.ept = ceil_div(N, 8) <= 256 ? 8 : ceil_div(N, 16) <= 256 ? 16 : kFwdMaxEpt;
    p.tpr = static_cast<int>(round_up(ceil_div(N, p.ept), 32));
  } else {
    p.split = true;
    p.ept = kFwdSplitEpt;
    p.batch_rows = std::min(M, std::max<int64_t>(1, kSplitBatchElems / N));
    // Smaller tiles until there are >= 2 blocks per SM (or tiles reach 128 threads).
    p.tpr = 512;
    while (p.tpr > 128 && p.batch_rows * ceil_div(N, int64_t(p.tpr) * p.ept) < 2 * sm_count)
      p.tpr /= 2;
    p.tile = int64_t(p.tpr) * p.ept;
    p.chunks = ceil_div(N, p.tile);
    p.batch_rows = std::min(p.batch_rows, int64_t(INT_MAX) / p.chunks);
  }
  return p;
}

Plan plan_bwd(int64_t M, int64_t N, int sm_count) {
  Plan p;
  p.ept = kBwdEpt;
  if (N <= kBwdMaxRowN) {
    p.tpr = static_cast<int>(round_up(ceil_div(N, p.ept), 32));
    p.rows_per_block = p.tpr == 32 ? kWarpRowsPerBlock : 1;
    p.tile = N;
    p.batch_rows = M;  // one launch: blocks loop over their rows
  } else {
    p.split = true;
    p.batch_rows = std::min(M, std::max<int64_t>(1, kSplitBatchElems / N));
    p.tpr = kMaxThreads;
    while (p.tpr > 128 && p.batch_rows * ceil_div(N, int64_t(p.tpr) * p.ept) < 2 * sm_count)
      p.tpr /= 2;
    p.tile = int64_t(p.tpr) * p.ept;
    p.chunks = ceil_div(N, p.tile);
    p.batch_rows = std::min(p.batch_rows, int64_t(INT_MAX) / p.chunks);
  }
  // Row groups. Enough blocks to fill the GPU (~1024 resident threads per SM at our register
  // use), but each group should own >= kMinRowsPerGroup rows, since every group costs a partial
  // row of dw and db (8 bytes per column, written and read back)... unless that would leave SMs
  // idle: for few rows, parallelism wins.
  const int64_t rows = p.batch_rows, rpb = p.rows_per_block;
  const int64_t blocks_per_sm = std::max<int64_t>(1, kMaxThreads / (int64_t(p.tpr) * rpb));
  int64_t row_blocks = ceil_div(int64_t(sm_count) * blocks_per_sm, p.chunks);
  row_blocks = std::min(row_blocks, ceil_div(rows, kMinRowsPerGroup * rpb));
  row_blocks = std::max(row_blocks, std::min(ceil_div(rows, rpb), ceil_div(sm_count, p.chunks)));
  row_blocks = std::max<int64_t>(row_blocks, 1);
  p.groups = row_blocks * rpb;
  return p;
}

// Backward workspace, in floats, each section starting on a 16-byte boundary:
//   [row partials: M x chunks x 2 (split only)] [dw partials: groups x N] [db partials: groups x N]
// The column partials exist only when there is more than one group (else dw/db are written
// directly).
struct BwdLayout {
  int64_t row_part = 0, dw_part = 0, db_part = 0, total = 0;  // offsets / size in floats
  bool has_col_part = false;
};

BwdLayout bwd_layout(const Plan& p, int64_t M, int64_t N) {
  BwdLayout l;
  const int64_t row_floats = p.split ? M * p.chunks * 2 : 0;
  l.has_col_part = p.groups > 1;
  const int64_t col_floats = l.has_col_part ? p.groups * N : 0;
  l.dw_part = round_up(row_floats, 4);
  l.db_part = l.dw_part + round_up(col_floats, 4);
  l.total = l.db_part + col_floats;
  return l;
}

// ---- forward --------------------------------------------------------------------------------
template <typename T, typename W>
struct FwdParams {
  const T* x;         // input, (M, N), row stride stride_x
  const T* res;       // residual, (M, N), or null
  const W* w;         // weight, (N,), or null (= 1)
  const W* b;         // bias, (N,), or null (= 0)
  T* y;               // output, (M, N)
  T* h;               // x + res rounded to T, (M, N); null iff res is null
  float* mean;        // (M,), or null; 0 for RMSNorm
  float* rstd;        // (M,), or null
  float* partials;    // split path: (M, chunks, 2) per-tile (mean, M2) or (sum h^2, 0)
  int64_t N, stride_x, stride_res, stride_y, stride_h;
  int64_t row_begin, row_end;  // the rows of this launch
  int64_t tile, chunks;
  float eps;
  bool rms;
  bool vec_ok;        // every pointer 16-byte aligned, every stride a multiple of 16 bytes
};

// One row tile per (rows_per_block == 1) block or per warp. kFull: the whole row, normalised in
// place. kStats: write this tile's partials, no output. kApply: read back h (or x), combine the
// row's partials, write y (and mean/rstd from the row's first tile).
template <typename T, typename W, int EPT, Pass PASS>
__global__ void __launch_bounds__(kMaxThreads) norm_fwd_kernel(const FwdParams<T, W> p) {
  constexpr int VEC = kVec16<T>;  // elements per 16-byte group
  constexpr int NV = EPT / VEC;   // groups per thread
  static_assert(EPT % VEC == 0, "a thread owns whole 16-byte groups");
  __shared__ float red_sum[32], red_m2[32];

  const int tid = threadIdx.x, tpr = blockDim.x;
  int64_t row, chunk = 0;
  if constexpr (PASS == Pass::kFull) {
    row = p.row_begin + int64_t(blockIdx.x) * blockDim.y + threadIdx.y;
  } else {
    row = p.row_begin + blockIdx.x / p.chunks;
    chunk = blockIdx.x % p.chunks;
  }
  // Uniform exit: a whole warp (one warp per row) or a whole block (rows_per_block == 1).
  if (row >= p.row_end) return;
  // Every pointer below starts at this tile; columns inside it are 32-bit (tile <= 32768).
  const int64_t col0 = chunk * p.tile;
  const int n_cols = static_cast<int>(min(p.tile, p.N - col0));
  // Thread tid owns groups tid, tid + tpr, ...: a warp touches 512 contiguous bytes per group.
  auto group_col = [&](int i) { return (i * tpr + tid) * VEC; };

  float v[EPT];  // this thread's share of h; columns past the end hold 0
  if constexpr (PASS == Pass::kApply) {
    const T* src = p.res ? p.h + row * p.stride_h + col0 : p.x + row * p.stride_x + col0;
#pragma unroll
    for (int i = 0; i < NV; ++i) load_group<VEC>(src, group_col(i), n_cols, p.vec_ok, &v[i * VEC]);
  } else {
    const T* x_row = p.x + row * p.stride_x + col0;
#pragma unroll
    for (int i = 0; i < NV; ++i) load_group<VEC>(x_row, group_col(i), n_cols, p.vec_ok, &v[i * VEC]);
    if (p.res) {
      const T* r_row = p.res + row * p.stride_res + col0;
      T* h_row = p.h + row * p.stride_h + col0;
#pragma unroll
      for (int i = 0; i < NV; ++i) {
        float r[VEC];
        load_group<VEC>(r_row, group_col(i), n_cols, p.vec_ok, r);
        // Round h to T before normalising: the stored h and the normalised values must agree
        // bit for bit with what eager x + res gives.
#pragma unroll
        for (int k = 0; k < VEC; ++k) v[i * VEC + k] = to_float(from_float<T>(v[i * VEC + k] + r[k]));
        store_group<VEC>(h_row, group_col(i), n_cols, p.vec_ok, &v[i * VEC]);
      }
    }
  }

  float mean = 0.f, rstd = 0.f;
  if constexpr (PASS == Pass::kApply) {
    // Every warp combines the row's tile partials by itself: no barrier, and since all warps run
    // the same arithmetic on the same data, all of them (in every block of the row) agree.
    const float* part = p.partials + row * p.chunks * 2;
    const int lane = tid & 31;
    const float n = float(p.N);
    if (p.rms) {
      float ss = 0.f;
      for (int64_t c = lane; c < p.chunks; c += 32) ss += part[2 * c];
      rstd = rsqrtf(warp_sum(ss) / n + p.eps);
    } else {
      float s = 0.f;
      for (int64_t c = lane; c < p.chunks; c += 32)
        s += float(min(p.tile, p.N - c * p.tile)) * part[2 * c];
      mean = warp_sum(s) / n;
      float m2 = 0.f;
      for (int64_t c = lane; c < p.chunks; c += 32) {
        const float d = part[2 * c] - mean;
        m2 += part[2 * c + 1] + float(min(p.tile, p.N - c * p.tile)) * d * d;
      }
      rstd = rsqrtf(warp_sum(m2) / n + p.eps);
    }
    if (chunk == 0 && tid == 0) {
      if (p.mean) p.mean[row] = mean;
      if (p.rstd) p.rstd[row] = rstd;
    }
  } else {
    const float n = float(n_cols);
    float* part = PASS == Pass::kStats ? p.partials + (row * p.chunks + chunk) * 2 : nullptr;
    if (p.rms) {
      float ss = 0.f;
#pragma unroll
      for (int s = 0; s < EPT; ++s) ss += v[s] * v[s];
      ss = block_sum(ss, red_sum);
      if constexpr (PASS == Pass::kStats) {
        if (tid == 0) {
          part[0] = ss;
          part[1] = 0.f;
        }
        return;
      }
      rstd = rsqrtf(ss / n + p.eps);
    } else {
      float s = 0.f;
#pragma unroll
      for (int i = 0; i < EPT; ++i) s += v[i];
      mean = block_sum(s, red_sum) / n;
      // Second pass over the registers; padding columns must not contribute (0 - mean)^2.
      float m2 = 0.f;
#pragma unroll
      for (int i = 0; i < NV; ++i) {
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
          const float d = v[i * VEC + k] - mean;
          if (group_col(i) + k < n_cols) m2 += d * d;
        }
      }
      m2 = block_sum(m2, red_m2);
      if constexpr (PASS == Pass::kStats) {
        if (tid == 0) {
          part[0] = mean;
          part[1] = m2;
        }
        return;
      }
      rstd = rsqrtf(m2 / n + p.eps);
    }
    if (tid == 0) {
      if (p.mean) p.mean[row] = mean;
      if (p.rstd) p.rstd[row] = rstd;
    }
  }

  if constexpr (PASS != Pass::kStats) {
    T* y_row = p.y + row * p.stride_y + col0;
    const W* w = p.w ? p.w + col0 : nullptr;
    const W* b = p.b ? p.b + col0 : nullptr;
#pragma unroll
    for (int i = 0; i < NV; ++i) {
      const int col = group_col(i);
      if (col >= n_cols) continue;  // nothing of this group is in the row
      float wv[VEC], bv[VEC], out[VEC];
      if (w) load_group<VEC>(w, col, n_cols, p.vec_ok, wv);
      else fill<VEC>(wv, 1.f);
      if (b) load_group<VEC>(b, col, n_cols, p.vec_ok, bv);
      else fill<VEC>(bv, 0.f);
#pragma unroll
      for (int k = 0; k < VEC; ++k) out[k] = (v[i * VEC + k] - mean) * rstd * wv[k] + bv[k];
      store_group<VEC>(y_row, col, n_cols, p.vec_ok, out);
    }
  }
}

// ---- backward -------------------------------------------------------------------------------
template <typename T, typename W>
struct BwdParams {
  const T* dy;         // upstream gradient, (M, N)
  const T* h;          // the normalised input (x + res, or x), (M, N)
  const W* w;          // weight, (N,), or null (= 1)
  const float* mean;   // (M,), unused for RMSNorm
  const float* rstd;   // (M,)
  const T* dh_out;     // gradient flowing into the returned residual sum, (M, N), or null
  T* dx;               // (M, N)
  float* dw_dst;       // (groups, N) partials, or the final (N,) dw when groups == 1; or null
  float* db_dst;       // likewise for db; or null
  float* row_partials; // split path: (M, chunks, 2) per-tile (sum g*xhat, sum g)
  int64_t N, stride_dy, stride_h, stride_dh, stride_dx;
  int64_t row_begin, row_end, tile, chunks, groups;
  bool rms;
  bool vec_ok;         // dy, h, dh_out, dx, w: 16-byte aligned pointers and strides
  bool dst_vec_ok;     // dw_dst, db_dst: 16-byte aligned, and so is every partial row
  bool accumulate;     // add to dw_dst/db_dst (a later row batch) instead of overwriting
};

// kStats: one (row, tile) per block, writes the tile's (sum g*xhat, sum g).
// kFull / kApply: group `group` (a block, or a warp when rows_per_block > 1) walks rows
// row_begin + group, + groups, ...; per row it computes dx, and it accumulates dy*xhat and dy for
// its columns in registers, written once at the end as its dw/db partial row.
template <typename T, typename W, Pass PASS>
__global__ void __launch_bounds__(kMaxThreads) norm_bwd_kernel(const BwdParams<T, W> p) {
  constexpr int EPT = kBwdEpt;
  constexpr int VEC = kVec16<T>;
  constexpr int NV = EPT / VEC;
  static_assert(EPT % VEC == 0, "a thread owns whole 16-byte groups");
  __shared__ float2 red[2][32];  // alternated per row: see block_sum (common.cuh)

  const int tid = threadIdx.x, tpr = blockDim.x;
  const int64_t chunk = blockIdx.x % p.chunks;
  // Every pointer below starts at this tile; columns inside it are 32-bit (tile <= 8192).
  const int64_t col0 = chunk * p.tile;
  const int n_cols = static_cast<int>(min(p.tile, p.N - col0));
  auto group_col = [&](int i) { return (i * tpr + tid) * VEC; };
  const W* w = p.w ? p.w + col0 : nullptr;
  const float inv_n = 1.f / float(p.N);

  // Loads dy and h of `row`; leaves g = dy*w in g[] and xhat in xhat[], adds the row's dw/db
  // contributions (when acc_dw/acc_db are given) and returns this thread's (sum g*xhat, sum g).
  // Padding columns load dy = 0, so they add nothing to any sum. The weight is re-read per row
  // (an L1 hit) rather than kept: registers are what limits this kernel.
  auto load_row = [&](int64_t row, float* g, float* xhat, float* acc_dw, float* acc_db) {
    const T* dy_row = p.dy + row * p.stride_dy + col0;
    const T* h_row = p.h + row * p.stride_h + col0;
#pragma unroll
    for (int i = 0; i < NV; ++i) {
      load_group<VEC>(dy_row, group_col(i), n_cols, p.vec_ok, &g[i * VEC]);
      load_group<VEC>(h_row, group_col(i), n_cols, p.vec_ok, &xhat[i * VEC]);
    }
    const float mean = p.rms ? 0.f : p.mean[row];
    const float rstd = p.rstd[row];
    float2 sums = make_float2(0.f, 0.f);
#pragma unroll
    for (int i = 0; i < NV; ++i) {
      float wv[VEC];
      if (w) load_group<VEC>(w, group_col(i), n_cols, p.vec_ok, wv);
      else fill<VEC>(wv, 1.f);
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        const int s = i * VEC + k;
        xhat[s] = (xhat[s] - mean) * rstd;
        if (acc_dw) acc_dw[s] += g[s] * xhat[s];
        if (acc_db) acc_db[s] += g[s];
        g[s] *= wv[k];
        sums.x += g[s] * xhat[s];
        sums.y += g[s];
      }
    }
    return sums;
  };

  if constexpr (PASS == Pass::kStats) {
    const int64_t row = p.row_begin + blockIdx.x / p.chunks;
    if (row >= p.row_end) return;  // whole block
    float g[EPT], xhat[EPT];
    const float2 sums = block_sum2(load_row(row, g, xhat, nullptr, nullptr), red[0]);
    if (tid == 0) {
      float* part = p.row_partials + (row * p.chunks + chunk) * 2;
      part[0] = sums.x;
      part[1] = sums.y;
    }
  } else {
    const int64_t group = (blockIdx.x / p.chunks) * blockDim.y + threadIdx.y;
    // This group's partial row (or the final dw/db when there is a single group), at this tile.
    // Formed where it is used, not kept live across the row loop: registers are the limit here.
    auto dst = [&](float* base) {
      return base ? base + (p.groups > 1 ? group * p.N : 0) + col0 : nullptr;
    };
    float acc_dw[EPT], acc_db[EPT];
#pragma unroll
    for (int i = 0; i < NV; ++i) {
      // A later row batch continues the sums this same thread stored after the previous one.
      const int col = group_col(i);
      float* dw_acc = &acc_dw[i * VEC];
      float* db_acc = &acc_db[i * VEC];
      if (p.accumulate && p.dw_dst) load_group<VEC>(dst(p.dw_dst), col, n_cols, p.dst_vec_ok, dw_acc);
      else fill<VEC>(dw_acc, 0.f);
      if (p.accumulate && p.db_dst) load_group<VEC>(dst(p.db_dst), col, n_cols, p.dst_vec_ok, db_acc);
      else fill<VEC>(db_acc, 0.f);
    }

    // Loop bounds depend only on the group: uniform over the block when it holds one row (so the
    // barrier in block_sum2 is safe), uniform over the warp otherwise (block_sum2 uses no barrier).
    int parity = 0;
    for (int64_t row = p.row_begin + group; row < p.row_end; row += p.groups, parity ^= 1) {
      float g[EPT], xhat[EPT];
      float2 sums = load_row(row, g, xhat, acc_dw, acc_db);
      if constexpr (PASS == Pass::kFull) {
        sums = block_sum2(sums, red[parity]);
      } else {
        // The stats pass left one (sum g*xhat, sum g) per tile; each warp adds them up itself.
        const float* part = p.row_partials + row * p.chunks * 2;
        sums = make_float2(0.f, 0.f);
        for (int64_t c = tid & 31; c < p.chunks; c += 32) {
          sums.x += part[2 * c];
          sums.y += part[2 * c + 1];
        }
        sums.x = warp_sum(sums.x);
        sums.y = warp_sum(sums.y);
      }
      const float rstd = p.rstd[row];
      const float c1 = sums.x * inv_n;
      const float c2 = p.rms ? 0.f : sums.y * inv_n;
      const T* dh_row = p.dh_out ? p.dh_out + row * p.stride_dh + col0 : nullptr;
      T* dx_row = p.dx + row * p.stride_dx + col0;
#pragma unroll
      for (int i = 0; i < NV; ++i) {
        const int col = group_col(i);
        if (col >= n_cols) continue;
        float dx[VEC], dh[VEC];
        if (dh_row) load_group<VEC>(dh_row, col, n_cols, p.vec_ok, dh);
        else fill<VEC>(dh, 0.f);
#pragma unroll
        for (int k = 0; k < VEC; ++k) dx[k] = rstd * (g[i * VEC + k] - xhat[i * VEC + k] * c1 - c2) + dh[k];
        store_group<VEC>(dx_row, col, n_cols, p.vec_ok, dx);
      }
    }

    // Every group writes its partial row, also a group that owned no rows (it writes zeros):
    // the reduction reads all of them.
    float* dw_dst = dst(p.dw_dst);
    float* db_dst = dst(p.db_dst);
#pragma unroll
    for (int i = 0; i < NV; ++i) {
      if (dw_dst) store_group<VEC>(dw_dst, group_col(i), n_cols, p.dst_vec_ok, &acc_dw[i * VEC]);
      if (db_dst) store_group<VEC>(db_dst, group_col(i), n_cols, p.dst_vec_ok, &acc_db[i * VEC]);
    }
  }
}

// dw[j] = sum over groups of dw_part[g, j] (and db likewise), in a fixed order. Block (32, 32):
// threadIdx.x picks the column (coalesced rows of the partials), threadIdx.y strides the groups;
// the 32 column sums are then added in order of threadIdx.y.
__global__ void __launch_bounds__(kMaxThreads)
norm_bwd_reduce_kernel(const float* dw_part, const float* db_part, float* dw, float* db,
                       int64_t groups, int64_t N) {
  __shared__ float s_dw[32][33], s_db[32][33];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t col = int64_t(blockIdx.x) * 32 + tx;
  float a = 0.f, b = 0.f;
  if (col < N) {
    for (int64_t g = ty; g < groups; g += 32) {
      if (dw_part) a += dw_part[g * N + col];
      if (db_part) b += db_part[g * N + col];
    }
  }
  s_dw[ty][tx] = a;
  s_db[ty][tx] = b;
  __syncthreads();
  if (ty == 0 && col < N) {
    float sa = 0.f, sb = 0.f;
#pragma unroll 8
    for (int k = 0; k < 32; ++k) {
      sa += s_dw[k][tx];
      sb += s_db[k][tx];
    }
    if (dw) dw[col] = sa;
    if (db) db[col] = sb;
  }
}

// ---- launchers ------------------------------------------------------------------------------
template <typename T, typename W, int EPT, Pass PASS>
void launch_fwd(dim3 grid, dim3 block, const FwdParams<T, W>& p, cudaStream_t stream) {
  norm_fwd_kernel<T, W, EPT, PASS><<<grid, block, 0, stream>>>(p);
  check_launch("norm_fwd_kernel");
}

template <typename T, typename W>
void run_norm_fwd(const NormFwdArgs& a, const Plan& plan) {
  constexpr int VEC = kVec16<T>;
  FwdParams<T, W> p{};
  p.x = reinterpret_cast<const T*>(a.x);
  p.res = reinterpret_cast<const T*>(a.res);
  p.w = reinterpret_cast<const W*>(a.w);
  p.b = reinterpret_cast<const W*>(a.b);
  p.y = reinterpret_cast<T*>(a.y);
  p.h = reinterpret_cast<T*>(a.h);
  p.mean = reinterpret_cast<float*>(a.mean);
  p.rstd = reinterpret_cast<float*>(a.rstd);
  p.partials = reinterpret_cast<float*>(a.workspace);
  p.N = a.N;
  p.stride_x = a.stride_x;
  p.stride_res = a.stride_res;
  p.stride_y = a.stride_y;
  p.stride_h = a.stride_h;
  p.tile = plan.tile;
  p.chunks = plan.chunks;
  p.eps = a.eps;
  p.rms = a.rms;
  // A single row's stride is never used, so it cannot spoil the vector path.
  auto row_ok = [&](std::uintptr_t ptr, int64_t stride) {
    return !ptr || (aligned16(ptr) && (a.M == 1 || stride % VEC == 0));
  };
  p.vec_ok = row_ok(a.x, a.stride_x) && row_ok(a.res, a.stride_res) && row_ok(a.y, a.stride_y) &&
             row_ok(a.h, a.stride_h) && row_ok(a.w, 0) && row_ok(a.b, 0);

  const cudaStream_t stream = as_stream(a.stream);
  const dim3 block(plan.tpr, plan.rows_per_block);
  for (int64_t r0 = 0; r0 < a.M; r0 += plan.batch_rows) {
    p.row_begin = r0;
    p.row_end = std::min(a.M, r0 + plan.batch_rows);
    const int64_t rows = p.row_end - r0;
    if (!plan.split) {
      const dim3 grid(static_cast<unsigned>(ceil_div(rows, plan.rows_per_block)));
      switch (plan.ept) {
        case 8: launch_fwd<T, W, 8, Pass::kFull>(grid, block, p, stream); break;
        case 16: launch_fwd<T, W, 16, Pass::kFull>(grid, block, p, stream); break;
        default: launch_fwd<T, W, kFwdMaxEpt, Pass::kFull>(grid, block, p, stream); break;
      }
    } else {
      const dim3 grid(static_cast<unsigned>(rows * plan.chunks));
      launch_fwd<T, W, kFwdSplitEpt, Pass::kStats>(grid, block, p, stream);
      launch_fwd<T, W, kFwdSplitEpt, Pass::kApply>(grid, block, p, stream);
    }
  }
}

template <typename T, typename W, Pass PASS>
void launch_bwd(dim3 grid, dim3 block, const BwdParams<T, W>& p, cudaStream_t stream) {
  norm_bwd_kernel<T, W, PASS><<<grid, block, 0, stream>>>(p);
  check_launch("norm_bwd_kernel");
}

template <typename T, typename W>
void run_norm_bwd(const NormBwdArgs& a, const Plan& plan) {
  constexpr int VEC = kVec16<T>;
  const BwdLayout layout = bwd_layout(plan, a.M, a.N);
  float* ws = reinterpret_cast<float*>(a.workspace);
  float* dw = reinterpret_cast<float*>(a.dw);
  float* db = reinterpret_cast<float*>(a.db);

  BwdParams<T, W> p{};
  p.dy = reinterpret_cast<const T*>(a.dy);
  p.h = reinterpret_cast<const T*>(a.h);
  p.w = reinterpret_cast<const W*>(a.w);
  p.mean = reinterpret_cast<const float*>(a.mean);
  p.rstd = reinterpret_cast<const float*>(a.rstd);
  p.dh_out = reinterpret_cast<const T*>(a.dh_out);
  p.dx = reinterpret_cast<T*>(a.dx);
  p.dw_dst = dw ? (layout.has_col_part ? ws + layout.dw_part : dw) : nullptr;
  p.db_dst = db ? (layout.has_col_part ? ws + layout.db_part : db) : nullptr;
  p.row_partials = plan.split ? ws + layout.row_part : nullptr;
  p.N = a.N;
  p.stride_dy = a.stride_dy;
  p.stride_h = a.stride_h;
  p.stride_dh = a.stride_dh;
  p.stride_dx = a.stride_dx;
  p.tile = plan.tile;
  p.chunks = plan.chunks;
  p.groups = plan.groups;
  p.rms = a.rms;
  // A single row's stride is never used, so it cannot spoil the vector path.
  auto row_ok = [&](std::uintptr_t ptr, int64_t stride) {
    return !ptr || (aligned16(ptr) && (a.M == 1 || stride % VEC == 0));
  };
  p.vec_ok = row_ok(a.dy, a.stride_dy) && row_ok(a.h, a.stride_h) && row_ok(a.dh_out, a.stride_dh) &&
             row_ok(a.dx, a.stride_dx) && row_ok(a.w, 0);
  p.dst_vec_ok = aligned16(reinterpret_cast<std::uintptr_t>(p.dw_dst)) &&
                 aligned16(reinterpret_cast<std::uintptr_t>(p.db_dst)) &&
                 (!layout.has_col_part || a.N % 4 == 0);

  const cudaStream_t stream = as_stream(a.stream);
  const dim3 block(plan.tpr, plan.rows_per_block);
  const dim3 apply_grid(static_cast<unsigned>(plan.groups / plan.rows_per_block * plan.chunks));
  if (!plan.split) {
    p.row_begin = 0;
    p.row_end = a.M;
    launch_bwd<T, W, Pass::kFull>(apply_grid, block, p, stream);
  } else {
    for (int64_t r0 = 0; r0 < a.M; r0 += plan.batch_rows) {
      p.row_begin = r0;
      p.row_end = std::min(a.M, r0 + plan.batch_rows);
      p.accumulate = r0 > 0;
      launch_bwd<T, W, Pass::kStats>(dim3(static_cast<unsigned>((p.row_end - r0) * plan.chunks)), block, p,
                                     stream);
      launch_bwd<T, W, Pass::kApply>(apply_grid, block, p, stream);
    }
  }
  if (layout.has_col_part && (dw || db)) {
    norm_bwd_reduce_kernel<<<dim3(static_cast<unsigned>(ceil_div(a.N, 32))), dim3(32, 32), 0, stream>>>(
        dw ? ws + layout.dw_part : nullptr, db ? ws + layout.db_part : nullptr, dw, db, plan.groups, a.N);
    check_launch("norm_bwd_reduce_kernel");
  }
}

void check_sizes(const char* fn, int64_t M, int64_t N, int sm_count) {
  check_arg(M >= 0, fn, "M must be >= 0, got " + std::to_string(M));
  check_arg(N >= 0, fn, "N must be >= 0, got " + std::to_string(N));
  check_sm_count(fn, sm_count);
}

// Inputs may broadcast over rows (stride 0); outputs must not overlap (stride >= N).
void check_stride(const char* fn, const char* name, std::uintptr_t ptr, int64_t stride, int64_t M,
                  int64_t N, bool output) {
  if (!ptr) return;
  const int64_t min_stride = output && M > 1 ? N : 0;
  check_arg(stride >= min_stride, fn,
            std::string(name) + " row stride must be >= " + std::to_string(min_stride) + ", got " +
                std::to_string(stride));
}

}  // namespace

// ---- host entry points ----------------------------------------------------------------------
int64_t norm_fwd_workspace(int64_t M, int64_t N, int sm_count) {
  check_sizes("norm_fwd_workspace", M, N, sm_count);
  if (M == 0 || N == 0) return 0;
  const Plan plan = plan_fwd(M, N, sm_count);
  return plan.split ? M * plan.chunks * 2 * int64_t(sizeof(float)) : 0;
}

void norm_fwd(const NormFwdArgs& a) {
  const char* fn = "norm_fwd";
  check_sizes(fn, a.M, a.N, a.sm_count);
  check_dtype_code(a.x_dtype, fn, "x_dtype");
  check_dtype_code(a.w_dtype, fn, "w_dtype");
  check_arg((a.res != 0) == (a.h != 0), fn, "h (the stored x + res) must be given exactly when res is");
  if (a.M == 0 || a.N == 0) return;
  check_present(fn, "x", a.x);
  check_present(fn, "y", a.y);
  check_stride(fn, "x", a.x, a.stride_x, a.M, a.N, false);
  check_stride(fn, "res", a.res, a.stride_res, a.M, a.N, false);
  check_stride(fn, "y", a.y, a.stride_y, a.M, a.N, true);
  check_stride(fn, "h", a.h, a.stride_h, a.M, a.N, true);
  const Plan plan = plan_fwd(a.M, a.N, a.sm_count);
  check_arg(!plan.split || a.workspace != 0, fn,
            "this shape needs a workspace of norm_fwd_workspace(M, N, sm_count) bytes, got none");
  dispatch_norm_types(a.x_dtype, (a.w || a.b) ? a.w_dtype : a.x_dtype, fn, [&](auto t, auto w) {
    run_norm_fwd<typename decltype(t)::type, typename decltype(w)::type>(a, plan);
  });
}

int64_t norm_bwd_workspace(int64_t M, int64_t N, int sm_count) {
  check_sizes("norm_bwd_workspace", M, N, sm_count);
  if (M == 0 || N == 0) return 0;
  const Plan plan = plan_bwd(M, N, sm_count);
  return bwd_layout(plan, M, N).total * int64_t(sizeof(float));
}

void norm_bwd(const NormBwdArgs& a) {
  const char* fn = "norm_bwd";
  check_sizes(fn, a.M, a.N, a.sm_count);
  check_dtype_code(a.x_dtype, fn, "x_dtype");
  check_dtype_code(a.w_dtype, fn, "w_dtype");
  if (a.M == 0 || a.N == 0) return;
  check_present(fn, "dy", a.dy);
  check_present(fn, "h", a.h);
  check_present(fn, "rstd", a.rstd);
  check_present(fn, "dx", a.dx);
  if (!a.rms) check_present(fn, "mean", a.mean);
  check_stride(fn, "dy", a.dy, a.stride_dy, a.M, a.N, false);
  check_stride(fn, "h", a.h, a.stride_h, a.M, a.N, false);
  check_stride(fn, "dh_out", a.dh_out, a.stride_dh, a.M, a.N, false);
  check_stride(fn, "dx", a.dx, a.stride_dx, a.M, a.N, true);
  const Plan plan = plan_bwd(a.M, a.N, a.sm_count);
  const bool needs_ws = bwd_layout(plan, a.M, a.N).total > 0 && (plan.split || a.dw || a.db);
  check_arg(!needs_ws || a.workspace != 0, fn,
            "this shape needs a workspace of norm_bwd_workspace(M, N, sm_count) bytes, got none");
  dispatch_norm_types(a.x_dtype, a.w ? a.w_dtype : a.x_dtype, fn, [&](auto t, auto w) {
    run_norm_bwd<typename decltype(t)::type, typename decltype(w)::type>(a, plan);
  });
}

}  // namespace dlh
