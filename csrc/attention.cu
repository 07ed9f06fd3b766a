// attention.cu: fused scaled-dot-product attention on tensor cores (sm_80+), forward and backward.
//
// The FlashAttention-2 organisation, written for mma.sync.m16n8k16 (fp16/bf16 in, fp32 accumulate):
//
// forward (attention_fwd_kernel): a block of 4 warps owns BM = 64 query rows of one (batch, head),
//   16 rows per warp. Its Q tile stays in shared memory (and, for head dims <= 128, in registers);
//   K and V tiles of BN keys stream through two shared-memory buffers with cp.async, the next tile
//   loading while the current one is used. S = Q K^T and O += P V run on tensor cores; the softmax
//   is online, in registers, in base 2 (scores pre-multiplied by scale * log2 e, exp2); P goes from
//   the S accumulators straight into the A operand of P V (same thread owns the same elements).
//   The row's log-sum-exp (base 2) is written for the backward; a row that sees no key gets zeros
//   and lse = +inf. Causal: key tiles past the block's last row are never loaded.
// backward, deterministic, in three kernels (no atomics, no fp32 dQ scratch):
//   attention_delta_kernel   delta = rowsum(dO * O) (fp32), one warp per row;
//   attention_dkdv_kernel    a block owns BN = 64 keys of one (batch, K/V head) and loops over
//                            every query head of its GQA group and every query tile, recomputing
//                            P^T = exp2(S^T - lse) and accumulating dV += P^T dO and
//                            dK += dS^T Q in registers, dS^T = P^T * (dP^T - delta);
//   attention_dq_kernel      a block owns BM query rows and loops over key tiles (the forward's
//                            shape), accumulating dQ += dS K in registers.
//   Computing dQ in its own pass costs two extra matmuls (S and dP again) against the
//   FlashAttention-2 scheme of atomically adding dQ from the dK/dV blocks; in exchange dQ is
//   bitwise reproducible (as the Triton backend's default), there is no (B, H, L, D) fp32
//   buffer and no contention on it.
//
// Shared-memory tiles hold rows of D + 8 elements: the 16-byte pad shifts consecutive rows by
// four banks, so the eight row addresses of every ldmatrix hit distinct banks, for each head dim.
// Masks (optional): bool (one byte per element, nonzero = attend) or fp32 additive, of any
// broadcast shape through four strides (0 for broadcast dims); read per element, in the epilogue.
// Dropout (optional): the Triton kernels' Philox keep mask (same seed, same mask; one Philox call
// per 4 keys of a row, shared between lanes by shuffles); the softmax sums keep every probability,
// O sums the kept ones, times 1 / (1 - p).
// Head dims: 32, 64, 96, 128, 256 forward; up to 128 backward (dK and dV for 256 would not fit
// in registers). Q, K, V need unit stride along the head dim, row strides that are multiples of
// 8 elements and 16-byte aligned bases (cp.async moves 16 bytes); the Python glue copies
// anything else.
#include <climits>
#include <type_traits>

#include "common.cuh"
#include "mma.cuh"

#ifndef DLH_DYNAMIC_SMEM
#define DLH_DYNAMIC_SMEM(name) extern __shared__ __align__(16) unsigned char name[]
#endif

namespace dlh {
namespace {

constexpr int kThreads = 128;  // 4 warps, 16 rows each
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kInf = __builtin_huge_valf();

struct AttnParams {
  const void* q;
  const void* k;
  const void* v;
  const void* mask;  // nullptr: none
  const int64_t* seed;  // dropout: the Philox seed (device, one int64)
  void* out;
  float* lse;          // forward output, (B, Hq, L) contiguous
  const void* dout;    // backward inputs
  const float* lse_in;
  float* delta;        // (B, Hq, L) contiguous, written by the delta kernel
  float* dscores;      // optional (B, Hq, L, S) fp32: dS, the additive mask's gradient before its
                       // broadcast dims are summed (elements the kernels skip stay as given: 0)
  void* dq;
  void* dk;
  void* dv;
  // (batch, head, seq) strides in elements; the head dim has stride 1
  int64_t sq[3], sk[3], sv[3], so[3], sdo[3], sdq[3], sdk[3], sdv[3];
  int64_t sm[4];  // mask (batch, head, row, col)
  int B, Hq, Hkv, L, S, group, mask_kind, blocks_per_head;
  float scale, scale_log2;
  float dropout_p, keep_scale;  // keep_scale = 1 / (1 - dropout_p)
  bool causal, dropout;
};

__device__ __forceinline__ int lane_id() { return threadIdx.x & 31; }

// The (batch b, head h) slice of an operand whose strides s are (batch, head, seq), as a T*
// (const T for the inputs).
template <typename T, typename V>
__device__ __forceinline__ T* head_slice(V* base, const int64_t* s, int b, int h) {
  return static_cast<T*>(base) + b * s[0] + h * s[1];
}

// ---- shared-memory tiles ---------------------------------------------------------------------------
// Rows [row0, row0 + ROWS) of a (len x D) matrix at g (row stride ld) into smem (row stride D + 8);
// rows past len are zero-filled. Part of the caller's current cp.async group.
template <int ROWS, int D, typename T>
__device__ __forceinline__ void load_tile(T* smem, const T* g, int64_t ld, int row0, int len) {
  constexpr int kChunks = D / 8;  // 16-byte chunks per row
  for (int i = threadIdx.x; i < ROWS * kChunks; i += kThreads) {
    const int r = i / kChunks, c = i % kChunks;
    const bool valid = row0 + r < len;
    const T* src = valid ? g + static_cast<int64_t>(row0 + r) * ld + c * 8 : g;
    cp_async16(smem + r * (D + 8) + c * 8, src, valid);
  }
}

// A operand (16 x 16) at rows m0.., cols k0.. of a row-major tile [m][k].
template <int LD, typename T>
__device__ __forceinline__ void load_a(unsigned* a, const T* s, int m0, int k0) {
  const int l = lane_id();
  ldmatrix_x4(a, s + (m0 + (l & 7) + ((l >> 3) & 1) * 8) * LD + k0 + (l >> 4) * 8);
}

// B operands of two n-tiles (n0.., n0+8..) x k16 (k0..) from a tile stored as B^T, row-major [n][k]:
// b[0..1] for n-tile n0, b[2..3] for n0 + 8.
template <int LD, typename T>
__device__ __forceinline__ void load_b_nk(unsigned* b, const T* s, int n0, int k0) {
  const int l = lane_id();
  ldmatrix_x4(b, s + (n0 + (l & 7) + (l >> 4) * 8) * LD + k0 + ((l >> 3) & 1) * 8);
}

// The same from a tile stored as B, row-major [k][n] (transposing load).
template <int LD, typename T>
__device__ __forceinline__ void load_b_kn(unsigned* b, const T* s, int k0, int n0) {
  const int l = lane_id();
  ldmatrix_x4_trans(b, s + (k0 + (l & 7) + ((l >> 3) & 1) * 8) * LD + n0 + (l >> 4) * 8);
}

// A operand k16 chunk kk from a 16 x N fp32 accumulator (two adjacent n-tiles), rounded to T.
template <typename T>
__device__ __forceinline__ void acc_to_a(unsigned* a, const float* c0, const float* c1) {
  a[0] = pack2<T>(c0[0], c0[1]);
  a[1] = pack2<T>(c0[2], c0[3]);
  a[2] = pack2<T>(c1[0], c1[1]);
  a[3] = pack2<T>(c1[2], c1[3]);
}

// ---- the key/value stream of a query block (forward and dQ) ---------------------------------------
// Key tiles of BN the query rows [m0, m0 + bm) see: all of S, or (causal) those up to the last row.
__device__ __forceinline__ int key_tiles(const AttnParams& p, int m0, int bm, int bn) {
  const int n_end = p.causal ? (p.S < m0 + bm ? p.S : m0 + bm) : p.S;
  return n_end > 0 ? (n_end + bn - 1) / bn : 0;
}

// Tile j of K and V into buffer `buf` (two buffers of BN rows each); part of the current cp.async group.
template <int BN, int D, typename T>
__device__ __forceinline__ void load_kv(T* sK, T* sV, const T* k, const T* v, const AttnParams& p, int j, int buf) {
  load_tile<BN, D>(sK + buf * BN * (D + 8), k, p.sk[2], j * BN, p.S);
  load_tile<BN, D>(sV + buf * BN * (D + 8), v, p.sv[2], j * BN, p.S);
}

// Step j of the double-buffered stream: request tile j + 1 into the other buffer, wait until
// tile j (and everything before it) has landed, and make it visible to the whole block.
template <int BN, int D, typename T>
__device__ __forceinline__ void kv_step(T* sK, T* sV, const T* k, const T* v, const AttnParams& p, int j,
                                        int tiles) {
  if (j + 1 < tiles) load_kv<BN, D>(sK, sV, k, v, p, j + 1, (j + 1) & 1);
  cp_async_commit();
  cp_async_wait<1>();
  __syncthreads();
}

// ---- warp-level products (each warp: 16 rows) ----------------------------------------------------
template <int N>
__device__ __forceinline__ void zero(float (*acc)[4]) {
#pragma unroll
  for (int i = 0; i < N / 8; ++i) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.f;
}

// acc (16 x N) += A (rows a_row.. of sA, K wide) * B, B given as B^T: sB row-major [n][k].
template <int K, int N, int LD, typename T>
__device__ __forceinline__ void mma_a_bt(float (*acc)[4], const T* sA, int a_row, const T* sB) {
#pragma unroll
  for (int kk = 0; kk < K / 16; ++kk) {
    unsigned a[4];
    load_a<LD>(a, sA, a_row, kk * 16);
#pragma unroll
    for (int nn = 0; nn < N / 16; ++nn) {
      unsigned b[4];
      load_b_nk<LD>(b, sB, nn * 16, kk * 16);
      mma16816<T>(acc[2 * nn], a, b);
      mma16816<T>(acc[2 * nn + 1], a, b + 2);
    }
  }
}

// acc (16 x N) += P * B: P the 16 x K fp32 accumulator p (rounded to T), B row-major [k][n] in sB.
template <int K, int N, int LD, typename T>
__device__ __forceinline__ void mma_p_b(float (*acc)[4], const float (*p)[4], const T* sB) {
#pragma unroll
  for (int kk = 0; kk < K / 16; ++kk) {
    unsigned a[4];
    acc_to_a<T>(a, p[2 * kk], p[2 * kk + 1]);
#pragma unroll
    for (int nn = 0; nn < N / 16; ++nn) {
      unsigned b[4];
      load_b_kn<LD>(b, sB, kk * 16, nn * 16);
      mma16816<T>(acc[2 * nn], a, b);
      mma16816<T>(acc[2 * nn + 1], a, b + 2);
    }
  }
}

// Rows row0 + lane/4 and + 8 of a 16 x D accumulator, times scale[0] / scale[1], to dst (row
// stride ld) rounded to T, two elements per 4-byte store; rows >= rows_end are not written.
template <int D, typename T>
__device__ __forceinline__ void store_rows(T* dst, int64_t ld, const float (*acc)[4], int row0, int rows_end,
                                           const float* scale) {
  const int g = lane_id() >> 2, t = lane_id() & 3;
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int row = row0 + g + 8 * i;
    if (row >= rows_end) continue;
#pragma unroll
    for (int dn = 0; dn < D / 8; ++dn)
      *reinterpret_cast<unsigned*>(dst + row * ld + dn * 8 + 2 * t) =
          pack2<T>(acc[dn][2 * i] * scale[i], acc[dn][2 * i + 1] * scale[i]);
  }
}

// ---- masking -------------------------------------------------------------------------------------
// The score of (query row, key col) with everything that masks it applied: -inf past the ends,
// above the diagonal (causal), where a bool mask is false; plus an additive mask (in base 2).
// mask points at the (batch, head) slice of the mask.
__device__ __forceinline__ float masked(const AttnParams& p, const unsigned char* mask, int row, int col,
                                        float s) {
  if (row >= p.L || col >= p.S || (p.causal && col > row)) return -kInf;
  if (p.mask_kind != 0) {
    const int64_t off = row * p.sm[2] + col * p.sm[3];
    if (p.mask_kind == 1) {
      if (!mask[off]) return -kInf;
    } else {
      s += reinterpret_cast<const float*>(mask)[off] * kLog2e;
    }
  }
  return s;
}

// Dropout: the Triton kernels' stream exactly (triton_kernels/attention.py, _keep), so one seed
// gives one mask on both backends (and ops.attention.dropout_mask / dropout_keep_reference
// reproduce it). One Philox4x32-10 call decides 4 consecutive keys of a row: key group j (keys
// 4j .. 4j + 3) of row `row` of query head bh has the counter (bh * L + row) * ceil(S / 4) + j,
// and its word w keeps key 4j + w when Triton's uniform of it is >= p (tl.rand4x).
//
// Philox4x32-10 of the counter: all four words, common.cuh's philox4 (tl.randint4x).
// The keep decisions of key group `group` of row `row`: bit w for key 4 * group + w.
__device__ __forceinline__ unsigned keep_bits(const AttnParams& p, uint64_t seed, int64_t bh, int row, int group) {
  const int64_t groups = (p.S + 3) / 4;
  uint32_t w0, w1, w2, w3;
  philox4(seed, static_cast<uint64_t>((bh * p.L + row) * groups + group), w0, w1, w2, w3);
  const float q = p.dropout_p;
  return static_cast<unsigned>(uniform01(w0) >= q) | static_cast<unsigned>(uniform01(w1) >= q) << 1 |
         static_cast<unsigned>(uniform01(w2) >= q) << 2 | static_cast<unsigned>(uniform01(w3) >= q) << 3;
}

// The keep decisions of one m16n8 accumulator fragment in the scores' orientation (rows = queries
// row0 + g, row0 + g + 8; cols = keys col0 + 2t, col0 + 2t + 1, col0 a multiple of 8): bit e for
// element e (row half e >> 1, col e & 1). Lanes t and t ^ 1 hold the two halves of each key group
// 4 * (t >> 1) of both rows, so the even lane draws row0 + g's group and the odd one row0 + g + 8's,
// and they swap them: one Philox call per 4 elements. Every lane of the warp must call it.
__device__ __forceinline__ unsigned kept_fragment(const AttnParams& p, uint64_t seed, int64_t bh, int row0,
                                                  int col0) {
  const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3, odd = t & 1;
  const unsigned mine = keep_bits(p, seed, bh, row0 + g + 8 * odd, (col0 >> 2) + (t >> 1));
  const unsigned other = __shfl_xor_sync(0xffffffffu, mine, 1);
  const unsigned top = odd ? other : mine, bottom = odd ? mine : other;  // rows g, g + 8
  return (top >> (2 * odd) & 3u) | (bottom >> (2 * odd) & 3u) << 2;
}

// The same in the transposed orientation of the dK/dV kernel (rows = keys key0 + g, key0 + g + 8
// with key0 a multiple of 16; cols = queries col0 + 2t, col0 + 2t + 1): bit e for element e (key
// half e >> 1, query e & 1). A key group is 4 consecutive g, so the 4 lanes of equal t and g >> 2
// (lane bits 2-3: i = g & 3) need the same 4 calls, (query col0 + 2t + (c & 1), key group of
// key0 + g + 8 * (c >> 1)) for c = 0..3, and lane i needs bit i of each: lane i draws call i and
// the quad transposes its 4 x 4 bits with three shuffles.
__device__ __forceinline__ unsigned kept_fragment_t(const AttnParams& p, uint64_t seed, int64_t bh, int key0,
                                                    int col0) {
  const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3, i = g & 3;
  const unsigned mine = keep_bits(p, seed, bh, col0 + 2 * t + (i & 1), ((key0 + (g & ~3) + 8 * (i >> 1)) >> 2));
  unsigned bits = (mine >> i & 1u) << i;  // x = 0: element e = i from this lane's own call
#pragma unroll
  for (int x = 1; x < 4; ++x) {  // from the lane holding call i ^ x: element e = i ^ x, key offset i
    const unsigned from = __shfl_xor_sync(0xffffffffu, mine, x << 2);
    bits |= (from >> i & 1u) << (i ^ x);
  }
  return bits;
}

template <bool DROPOUT>
__device__ __forceinline__ uint64_t dropout_seed(const AttnParams& p) {
  return DROPOUT ? static_cast<uint64_t>(*p.seed) : 0;
}

// The tile [m0, m0+bm) x [n0, n0+bn) needs no per-element test.
__device__ __forceinline__ bool interior(const AttnParams& p, int m0, int bm, int n0, int bn) {
  return p.mask_kind == 0 && m0 + bm <= p.L && n0 + bn <= p.S && (!p.causal || n0 + bn - 1 <= m0);
}

__device__ __forceinline__ const unsigned char* mask_slice(const AttnParams& p, int b, int h) {
  if (p.mask_kind == 0) return nullptr;
  const int64_t elems = b * p.sm[0] + h * p.sm[1];
  return static_cast<const unsigned char*>(p.mask) + elems * (p.mask_kind == 1 ? 1 : 4);
}

// Max and sum over the four lanes that share a row (lanes 4g .. 4g+3).
__device__ __forceinline__ float quad_max(float v) {
  v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 1));
  return fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 2));
}
__device__ __forceinline__ float quad_sum(float v) {
  v += __shfl_xor_sync(0xffffffffu, v, 1);
  return v + __shfl_xor_sync(0xffffffffu, v, 2);
}

// The (batch, head, query block) of this block: query blocks fastest, the last (for causal
// attention the longest) first.
struct BlockPos {
  int b, h, blk;
};
__device__ __forceinline__ BlockPos block_pos(int heads, int blocks) {
  const int bid = blockIdx.x;
  BlockPos pos;
  pos.blk = blocks - 1 - bid % blocks;
  pos.h = bid / blocks % heads;
  pos.b = bid / blocks / heads;
  return pos;
}

// =====================================================================================================
// Forward
// =====================================================================================================
template <typename T, int D, int BN, bool Q_IN_REGS, bool DROPOUT>
__global__ void __launch_bounds__(kThreads, 2) attention_fwd_kernel(const AttnParams p) {
  constexpr int BM = 64, LD = D + 8;
  DLH_DYNAMIC_SMEM(smem_raw);
  T* sQ = reinterpret_cast<T*>(smem_raw);
  T* sK = sQ + BM * LD;      // two buffers of BN rows
  T* sV = sK + 2 * BN * LD;  // two buffers of BN rows

  const BlockPos pos = block_pos(p.Hq, p.blocks_per_head);
  const int hk = pos.h / p.group;
  const int m0 = pos.blk * BM;
  const int warp = threadIdx.x >> 5, lane = lane_id(), g = lane >> 2, t = lane & 3;
  const int wm = warp * 16;
  const T* q = head_slice<const T>(p.q, p.sq, pos.b, pos.h);
  const T* k = head_slice<const T>(p.k, p.sk, pos.b, hk);
  const T* v = head_slice<const T>(p.v, p.sv, pos.b, hk);
  const unsigned char* mask = mask_slice(p, pos.b, pos.h);
  const uint64_t seed = dropout_seed<DROPOUT>(p);
  const int64_t bh = static_cast<int64_t>(pos.b) * p.Hq + pos.h;

  const int tiles = key_tiles(p, m0, BM, BN);
  load_tile<BM, D>(sQ, q, p.sq[2], m0, p.L);
  if (tiles > 0) load_kv<BN, D>(sK, sV, k, v, p, 0, 0);
  cp_async_commit();

  float o[D / 8][4];
  zero<D>(o);
  float row_max[2] = {-kInf, -kInf}, row_sum[2] = {0.f, 0.f};
  unsigned qf[Q_IN_REGS ? D / 16 : 1][4];

  for (int j = 0; j < tiles; ++j) {
    const int buf = j & 1, n0 = j * BN;
    kv_step<BN, D>(sK, sV, k, v, p, j, tiles);
    const T* cK = sK + buf * BN * LD;
    const T* cV = sV + buf * BN * LD;

    // S = Q K^T (16 x BN per warp); Q from registers (loaded once) or from shared memory
    float s[BN / 8][4];
    zero<BN>(s);
    if constexpr (Q_IN_REGS) {
      if (j == 0) {
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) load_a<LD>(qf[kk], sQ, wm, kk * 16);
      }
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk) {
#pragma unroll
        for (int nn = 0; nn < BN / 16; ++nn) {
          unsigned b[4];
          load_b_nk<LD>(b, cK, nn * 16, kk * 16);
          mma16816<T>(s[2 * nn], qf[kk], b);
          mma16816<T>(s[2 * nn + 1], qf[kk], b + 2);
        }
      }
    } else {
      mma_a_bt<D, BN, LD>(s, sQ, wm, cK);
    }

    // scale, mask, online softmax (rows g and g + 8 of the warp's 16)
    const bool full = interior(p, m0 + wm, 16, n0, BN);
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int row = m0 + wm + g + 8 * i;
      float mx = -kInf;
#pragma unroll
      for (int nt = 0; nt < BN / 8; ++nt) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          float& x = s[nt][2 * i + e];
          x *= p.scale_log2;
          if (!full) x = masked(p, mask, row, n0 + nt * 8 + 2 * t + e, x);
          mx = fmaxf(mx, x);
        }
      }
      const float m_new = fmaxf(row_max[i], quad_max(mx));
      const float m_use = m_new == -kInf ? 0.f : m_new;  // a row with no key yet: keep zeros
      const float alpha = exp2f(row_max[i] - m_use);
      row_max[i] = m_new;
      float sum = 0.f;
#pragma unroll
      for (int nt = 0; nt < BN / 8; ++nt) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          float& x = s[nt][2 * i + e];
          x = exp2f(x - m_use);
          sum += x;
        }
      }
      row_sum[i] = row_sum[i] * alpha + sum;
#pragma unroll
      for (int dn = 0; dn < D / 8; ++dn) {
        o[dn][2 * i] *= alpha;
        o[dn][2 * i + 1] *= alpha;
      }
    }

    if constexpr (DROPOUT) {  // the row sums keep every p; O sums the kept ones (rescaled at the end)
#pragma unroll
      for (int nt = 0; nt < BN / 8; ++nt) {
        const unsigned keep = kept_fragment(p, seed, bh, m0 + wm, n0 + nt * 8);
#pragma unroll
        for (int e = 0; e < 4; ++e)
          if (!(keep >> e & 1u)) s[nt][e] = 0.f;
      }
    }
    mma_p_b<BN, D, LD>(o, s, cV);  // O += P V
    __syncthreads();  // every warp is done with this buffer before it is refilled
  }
  cp_async_wait<0>();

  // O / l and the log-sum-exp; rows without any key: zeros and +inf
  float l[2], inv[2];
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    l[i] = quad_sum(row_sum[i]);
    inv[i] = l[i] > 0.f ? p.keep_scale / l[i] : 0.f;
  }
  T* out = head_slice<T>(p.out, p.so, pos.b, pos.h);
  store_rows<D>(out, p.so[2], o, m0 + wm, p.L, inv);
  float* lse = p.lse + bh * p.L;
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int row = m0 + wm + g + 8 * i;
    if (t == 0 && row < p.L) lse[row] = l[i] > 0.f ? row_max[i] + log2f(l[i]) : kInf;
  }
}

// =====================================================================================================
// Backward
// =====================================================================================================

// delta[row] = sum_d dO[row, d] * O[row, d] in fp32: one warp per row of (B, Hq, L).
template <typename T>
__global__ void __launch_bounds__(kThreads) attention_delta_kernel(const AttnParams p, int D) {
  const int64_t rows = static_cast<int64_t>(p.B) * p.Hq * p.L;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * (kThreads / 32) + (threadIdx.x >> 5);
  if (row >= rows) return;
  const int i = static_cast<int>(row % p.L);
  const int h = static_cast<int>(row / p.L % p.Hq);
  const int b = static_cast<int>(row / p.L / p.Hq);
  const T* dout = head_slice<const T>(p.dout, p.sdo, b, h) + i * p.sdo[2];
  const T* out = head_slice<const T>(p.out, p.so, b, h) + i * p.so[2];
  float acc = 0.f;
  for (int d = lane_id(); d < D; d += 32) acc += to_float(dout[d]) * to_float(out[d]);
  acc = warp_sum(acc);
  if (lane_id() == 0) p.delta[row] = acc;
}

// dK, dV for BN = 64 keys of one (batch, K/V head): every query head of the group, every query tile.
template <typename T, int D, int BM, bool DROPOUT>
__global__ void __launch_bounds__(kThreads) attention_dkdv_kernel(const AttnParams p) {
  constexpr int BN = 64, LD = D + 8;
  DLH_DYNAMIC_SMEM(smem_raw);
  T* sK = reinterpret_cast<T*>(smem_raw);
  T* sV = sK + BN * LD;
  T* sQ = sV + BN * LD;         // two buffers of BM rows
  T* sdO = sQ + 2 * BM * LD;    // two buffers of BM rows
  float* sL = reinterpret_cast<float*>(sdO + 2 * BM * LD);  // lse, two buffers
  float* sD = sL + 2 * BM;                                  // delta, two buffers

  const BlockPos pos = block_pos(p.Hkv, p.blocks_per_head);
  const int n0 = pos.blk * BN;
  const int warp = threadIdx.x >> 5, lane = lane_id(), g = lane >> 2, t = lane & 3;
  const int wn = warp * 16;
  const T* k = head_slice<const T>(p.k, p.sk, pos.b, pos.h);
  const T* v = head_slice<const T>(p.v, p.sv, pos.b, pos.h);
  const uint64_t seed = dropout_seed<DROPOUT>(p);

  // query tiles that see these keys: all, or (causal) those with a row >= n0
  const int m_tiles = (p.L + BM - 1) / BM;
  const int first = p.causal ? (n0 / BM < m_tiles ? n0 / BM : m_tiles) : 0;
  const int per_head = m_tiles - first;
  const int steps = per_head * p.group;

  // issue the loads of step `it` (query head, query tile) into buffer `buf`
  auto fetch = [&](int it, int buf) {
    const int h = pos.h * p.group + it / per_head;
    const int m0 = (first + it % per_head) * BM;
    const T* q = head_slice<const T>(p.q, p.sq, pos.b, h);
    const T* dout = head_slice<const T>(p.dout, p.sdo, pos.b, h);
    load_tile<BM, D>(sQ + buf * BM * LD, q, p.sq[2], m0, p.L);
    load_tile<BM, D>(sdO + buf * BM * LD, dout, p.sdo[2], m0, p.L);
    const int64_t rows = (static_cast<int64_t>(pos.b) * p.Hq + h) * p.L;
    for (int r = threadIdx.x; r < BM; r += kThreads) {
      const bool in = m0 + r < p.L;
      sL[buf * BM + r] = in ? p.lse_in[rows + m0 + r] : kInf;
      sD[buf * BM + r] = in ? p.delta[rows + m0 + r] : 0.f;
    }
  };

  load_tile<BN, D>(sK, k, p.sk[2], n0, p.S);
  load_tile<BN, D>(sV, v, p.sv[2], n0, p.S);
  if (steps > 0) fetch(0, 0);
  cp_async_commit();

  float dk[D / 8][4], dv[D / 8][4];
  zero<D>(dk);
  zero<D>(dv);

  for (int it = 0; it < steps; ++it) {
    const int buf = it & 1;
    const int h = pos.h * p.group + it / per_head;
    const int m0 = (first + it % per_head) * BM;
    if (it + 1 < steps) fetch(it + 1, buf ^ 1);
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();
    const T* cQ = sQ + buf * BM * LD;
    const T* cdO = sdO + buf * BM * LD;
    const float* cL = sL + buf * BM;
    const float* cD = sD + buf * BM;
    const unsigned char* mask = mask_slice(p, pos.b, h);
    const int64_t bh = static_cast<int64_t>(pos.b) * p.Hq + h;

    // S^T = K Q^T and dP^T = V dO^T (16 keys x BM queries per warp)
    float st[BM / 8][4], dpt[BM / 8][4];
    zero<BM>(st);
    zero<BM>(dpt);
    mma_a_bt<D, BM, LD>(st, sK, wn, cQ);
    mma_a_bt<D, BM, LD>(dpt, sV, wn, cdO);

    // P^T = exp2(S^T - lse), dS^T = P^T (dP^T - delta)
    const bool full = interior(p, m0, BM, n0 + wn, 16);
#pragma unroll
    for (int nt = 0; nt < BM / 8; ++nt) {
      const unsigned keep = DROPOUT ? kept_fragment_t(p, seed, bh, n0 + wn, m0 + nt * 8) : 0u;
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int key = n0 + wn + g + (e >> 1) * 8;
        const int col = nt * 8 + 2 * t + (e & 1);
        float x = st[nt][e] * p.scale_log2;
        if (!full) x = masked(p, mask, m0 + col, key, x);
        const float pr = exp2f(x - cL[col]);
        float dp = dpt[nt][e], pd = pr;  // dropout: dV sees the kept, rescaled P; dP is masked alike
        if constexpr (DROPOUT) {
          const bool k = keep >> e & 1u;
          pd = k ? pr * p.keep_scale : 0.f;
          dp = k ? dp * p.keep_scale : 0.f;
        }
        st[nt][e] = pd;
        dpt[nt][e] = pr * (dp - cD[col]);
      }
    }

    mma_p_b<BM, D, LD>(dv, st, cdO);   // dV += P^T dO
    mma_p_b<BM, D, LD>(dk, dpt, cQ);   // dK += dS^T Q
    __syncthreads();
  }
  cp_async_wait<0>();

  T* dkp = head_slice<T>(p.dk, p.sdk, pos.b, pos.h);
  T* dvp = head_slice<T>(p.dv, p.sdv, pos.b, pos.h);
  const float dk_scale[2] = {p.scale, p.scale}, one[2] = {1.f, 1.f};
  store_rows<D>(dkp, p.sdk[2], dk, n0 + wn, p.S, dk_scale);
  store_rows<D>(dvp, p.sdv[2], dv, n0 + wn, p.S, one);
}

// dQ for BM = 64 query rows of one (batch, query head): the forward's loop over key tiles.
template <typename T, int D, int BN, bool DROPOUT>
__global__ void __launch_bounds__(kThreads, 2) attention_dq_kernel(const AttnParams p) {
  constexpr int BM = 64, LD = D + 8;
  DLH_DYNAMIC_SMEM(smem_raw);
  T* sQ = reinterpret_cast<T*>(smem_raw);
  T* sdO = sQ + BM * LD;
  T* sK = sdO + BM * LD;     // two buffers of BN rows
  T* sV = sK + 2 * BN * LD;  // two buffers of BN rows

  const BlockPos pos = block_pos(p.Hq, p.blocks_per_head);
  const int hk = pos.h / p.group;
  const int m0 = pos.blk * BM;
  const int warp = threadIdx.x >> 5, lane = lane_id(), g = lane >> 2, t = lane & 3;
  const int wm = warp * 16;
  const T* q = head_slice<const T>(p.q, p.sq, pos.b, pos.h);
  const T* dout = head_slice<const T>(p.dout, p.sdo, pos.b, pos.h);
  const T* k = head_slice<const T>(p.k, p.sk, pos.b, hk);
  const T* v = head_slice<const T>(p.v, p.sv, pos.b, hk);
  const unsigned char* mask = mask_slice(p, pos.b, pos.h);
  const uint64_t seed = dropout_seed<DROPOUT>(p);
  const int64_t bh = static_cast<int64_t>(pos.b) * p.Hq + pos.h;
  const int64_t rows = bh * p.L;
  float lse[2], delta[2];
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int row = m0 + wm + g + 8 * i;
    lse[i] = row < p.L ? p.lse_in[rows + row] : kInf;
    delta[i] = row < p.L ? p.delta[rows + row] : 0.f;
  }

  const int tiles = key_tiles(p, m0, BM, BN);
  load_tile<BM, D>(sQ, q, p.sq[2], m0, p.L);
  load_tile<BM, D>(sdO, dout, p.sdo[2], m0, p.L);
  if (tiles > 0) load_kv<BN, D>(sK, sV, k, v, p, 0, 0);
  cp_async_commit();

  float dq[D / 8][4];
  zero<D>(dq);

  for (int j = 0; j < tiles; ++j) {
    const int buf = j & 1, n0 = j * BN;
    kv_step<BN, D>(sK, sV, k, v, p, j, tiles);
    const T* cK = sK + buf * BN * LD;
    const T* cV = sV + buf * BN * LD;

    // S = Q K^T and dP = dO V^T (16 x BN per warp)
    float s[BN / 8][4], dp[BN / 8][4];
    zero<BN>(s);
    zero<BN>(dp);
    mma_a_bt<D, BN, LD>(s, sQ, wm, cK);
    mma_a_bt<D, BN, LD>(dp, sdO, wm, cV);

    // P = exp2(S - lse), dS = P (dP - delta)
    const bool full = interior(p, m0 + wm, 16, n0, BN);
#pragma unroll
    for (int nt = 0; nt < BN / 8; ++nt) {
      const unsigned keep = DROPOUT ? kept_fragment(p, seed, bh, m0 + wm, n0 + nt * 8) : 0u;
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int i = e >> 1, row = m0 + wm + g + 8 * i, col = n0 + nt * 8 + 2 * t + (e & 1);
        float x = s[nt][e] * p.scale_log2;
        if (!full) x = masked(p, mask, row, col, x);
        float d = dp[nt][e];
        if constexpr (DROPOUT) d = (keep >> e & 1u) ? d * p.keep_scale : 0.f;
        dp[nt][e] = exp2f(x - lse[i]) * (d - delta[i]);
        if (p.dscores != nullptr && row < p.L && col < p.S) p.dscores[(bh * p.L + row) * p.S + col] = dp[nt][e];
      }
    }

    mma_p_b<BN, D, LD>(dq, dp, cK);  // dQ += dS K
    __syncthreads();
  }
  cp_async_wait<0>();

  T* dqp = head_slice<T>(p.dq, p.sdq, pos.b, pos.h);
  const float dq_scale[2] = {p.scale, p.scale};
  store_rows<D>(dqp, p.sdq[2], dq, m0 + wm, p.L, dq_scale);
}

// =====================================================================================================
// Host side
// =====================================================================================================

// Tile shapes per head dim: (forward key tile, dQ key tile, dK/dV query tile).
constexpr int fwd_bn(int D) { return D <= 128 ? 64 : 32; }
constexpr int dq_bn(int D) { return D <= 64 ? 64 : 32; }
constexpr int dkdv_bm(int D) { return D <= 64 ? 64 : 32; }

constexpr int64_t tile_bytes(int rows, int D) { return static_cast<int64_t>(rows) * (D + 8) * 2; }
constexpr int64_t fwd_smem(int D) { return tile_bytes(64 + 4 * fwd_bn(D), D); }
constexpr int64_t dq_smem(int D) { return tile_bytes(2 * 64 + 4 * dq_bn(D), D); }
constexpr int64_t dkdv_smem(int D) { return tile_bytes(2 * 64 + 4 * dkdv_bm(D), D) + 4 * 4 * dkdv_bm(D); }

// Calls f(std::integral_constant<int, D>{}) for a supported head dim.
template <typename F>
void dispatch_head_dim(int64_t D, F&& f) {
  switch (D) {
    case 32: f(std::integral_constant<int, 32>{}); break;
    case 64: f(std::integral_constant<int, 64>{}); break;
    case 96: f(std::integral_constant<int, 96>{}); break;
    case 128: f(std::integral_constant<int, 128>{}); break;
    default: f(std::integral_constant<int, 256>{}); break;
  }
}

// Calls f(std::integral_constant<bool, flag>{}).
template <typename F>
void dispatch_bool(bool flag, F&& f) {
  if (flag) f(std::true_type{});
  else f(std::false_type{});
}

// Kernels that want more than 48 KiB of shared memory must say so before their launch.
void allow_smem(const void* kernel, int64_t bytes, const char* name) {
  if (bytes <= 48 * 1024) return;
  const cudaError_t err =
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
  if (err != cudaSuccess) throw std::runtime_error(std::string("dlh::") + name + ": " + cudaGetErrorString(err));
}

void check_device(const char* fn) {
  int device = 0, major = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
  if (err != cudaSuccess) throw std::runtime_error(std::string("dlh::") + fn + ": " + cudaGetErrorString(err));
  if (major < 8)
    throw std::runtime_error(std::string("dlh::") + fn +
                             ": the tensor-core attention kernels need compute capability 8.0 or newer");
}

void check_operand(const char* fn, const char* name, std::uintptr_t ptr, const int64_t* strides) {
  check_present(fn, name, ptr);
  check_arg(ptr % 16 == 0, fn, std::string(name) + " must be 16-byte aligned");
  check_arg(strides[0] % 8 == 0 && strides[1] % 8 == 0 && strides[2] % 8 == 0, fn,
            std::string(name) + "'s batch, head and sequence strides must be multiples of 8 elements, got " +
                std::to_string(strides[0]) + ", " + std::to_string(strides[1]) + ", " + std::to_string(strides[2]));
  check_arg(strides[0] >= 0 && strides[1] >= 0 && strides[2] >= 0, fn,
            std::string(name) + "'s strides must be >= 0");
}

void check_sizes(const char* fn, int64_t B, int64_t Hq, int64_t Hkv, int64_t L, int64_t S, int64_t D,
                 bool backward, int mask_kind, int dtype) {
  check_arg(dtype == kFloat16 || dtype == kBFloat16, fn,
            "dtype must be 1 (float16) or 2 (bfloat16): the kernels run on fp16/bf16 tensor cores, got " +
                std::to_string(dtype));
  check_arg(attention_head_dim_supported(D, backward), fn,
            std::string("head dim must be one of 32, 64, 96, 128") + (backward ? "" : ", 256") + ", got " +
                std::to_string(D));
  check_arg(B >= 0 && Hq >= 1 && Hkv >= 1 && L >= 0 && S >= 0, fn, "sizes must be >= 0 (heads >= 1)");
  check_arg(Hq % Hkv == 0, fn,
            "Hq (" + std::to_string(Hq) + ") must be a multiple of Hkv (" + std::to_string(Hkv) + ")");
  check_arg(L < INT_MAX / 2 && S < INT_MAX / 2 && B <= INT_MAX && Hq <= INT_MAX, fn,
            "L and S must be < 2^30, B and H < 2^31");
  check_arg(mask_kind >= 0 && mask_kind <= 2, fn,
            "mask_kind must be 0 (none), 1 (bool) or 2 (float32 additive), got " + std::to_string(mask_kind));
}

AttnParams make_params(int64_t B, int64_t Hq, int64_t Hkv, int64_t L, int64_t S, int mask_kind, std::uintptr_t mask,
                       const int64_t* mask_strides, float scale, bool causal, std::uintptr_t seed, float dropout_p,
                       const char* fn) {
  check_arg(dropout_p >= 0.f && dropout_p < 1.f, fn, "dropout_p must be in [0, 1), got " + std::to_string(dropout_p));
  if (dropout_p > 0.f) check_present(fn, "seed", seed);
  AttnParams p{};
  p.B = static_cast<int>(B);
  p.Hq = static_cast<int>(Hq);
  p.Hkv = static_cast<int>(Hkv);
  p.L = static_cast<int>(L);
  p.S = static_cast<int>(S);
  p.group = static_cast<int>(Hq / Hkv);
  p.mask_kind = mask ? mask_kind : 0;
  p.mask = reinterpret_cast<const void*>(mask);
  for (int d = 0; d < 4; ++d) p.sm[d] = mask_strides[d];
  p.scale = scale;
  p.scale_log2 = scale * kLog2e;
  p.causal = causal;
  p.dropout = dropout_p > 0.f;
  p.dropout_p = dropout_p;
  p.keep_scale = 1.f / (1.f - dropout_p);
  p.seed = reinterpret_cast<const int64_t*>(seed);
  return p;
}

void copy3(int64_t* dst, const int64_t* src) {
  for (int d = 0; d < 3; ++d) dst[d] = src[d];
}

unsigned grid_of(int64_t blocks, const char* fn) {
  check_arg(blocks <= INT_MAX, fn, "too many blocks (batch * heads * tiles must be < 2^31)");
  return static_cast<unsigned>(blocks);
}

}  // namespace

bool attention_head_dim_supported(int64_t D, bool backward) {
  return D == 32 || D == 64 || D == 96 || D == 128 || (D == 256 && !backward);
}

void attention_fwd(const AttentionFwdArgs& a) {
  const char* fn = "attention_fwd";
  check_sizes(fn, a.B, a.Hq, a.Hkv, a.L, a.S, a.D, false, a.mask_kind, a.dtype);
  if (a.B == 0 || a.L == 0) return;
  check_operand(fn, "q", a.q, a.strides + 0);
  check_operand(fn, "k", a.k, a.strides + 3);
  check_operand(fn, "v", a.v, a.strides + 6);
  check_present(fn, "out", a.out);
  check_present(fn, "lse", a.lse);
  check_arg(a.strides[11] % 2 == 0 && a.out % 4 == 0, fn, "out must be 4-byte aligned with an even row stride");
  check_device(fn);

  AttnParams p = make_params(a.B, a.Hq, a.Hkv, a.L, a.S, a.mask_kind, a.mask, a.strides + 12, a.scale, a.causal,
                             a.seed, a.dropout_p, fn);
  p.q = reinterpret_cast<const void*>(a.q);
  p.k = reinterpret_cast<const void*>(a.k);
  p.v = reinterpret_cast<const void*>(a.v);
  p.out = reinterpret_cast<void*>(a.out);
  p.lse = reinterpret_cast<float*>(a.lse);
  copy3(p.sq, a.strides + 0);
  copy3(p.sk, a.strides + 3);
  copy3(p.sv, a.strides + 6);
  copy3(p.so, a.strides + 9);
  p.blocks_per_head = static_cast<int>(ceil_div(a.L, 64));
  const unsigned grid = grid_of(a.B * a.Hq * p.blocks_per_head, fn);
  const cudaStream_t stream = as_stream(a.stream);

  dispatch_dtype(a.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    if constexpr (!std::is_same_v<T, float>) {
      dispatch_head_dim(a.D, [&](auto dim) {
        constexpr int D = decltype(dim)::value;
        constexpr int64_t smem = fwd_smem(D);
        dispatch_bool(p.dropout, [&](auto drop) {
          constexpr bool DROPOUT = decltype(drop)::value;
          auto kernel = attention_fwd_kernel<T, D, fwd_bn(D), (D <= 128), DROPOUT>;
          allow_smem(reinterpret_cast<const void*>(kernel), smem, fn);
          attention_fwd_kernel<T, D, fwd_bn(D), (D <= 128), DROPOUT><<<dim3(grid), dim3(kThreads), smem, stream>>>(p);
          check_launch("attention_fwd_kernel");
        });
      });
    }
  });
}

void attention_bwd(const AttentionBwdArgs& a) {
  const char* fn = "attention_bwd";
  check_sizes(fn, a.B, a.Hq, a.Hkv, a.L, a.S, a.D, true, a.mask_kind, a.dtype);
  if (a.B == 0 || (a.L == 0 && a.S == 0)) return;
  const char* names[8] = {"dout", "q", "k", "v", "out", "dq", "dk", "dv"};
  const std::uintptr_t ptrs[8] = {a.dout, a.q, a.k, a.v, a.out, a.dq, a.dk, a.dv};
  for (int i = 0; i < 4; ++i) check_operand(fn, names[i], ptrs[i], a.strides + 3 * i);
  for (int i = 4; i < 8; ++i) {
    check_present(fn, names[i], ptrs[i]);
    check_arg(ptrs[i] % 4 == 0 && a.strides[3 * i + 2] % 2 == 0, fn,
              std::string(names[i]) + " must be 4-byte aligned with an even row stride");
  }
  check_present(fn, "lse", a.lse);
  check_present(fn, "delta", a.delta);
  check_device(fn);

  AttnParams p = make_params(a.B, a.Hq, a.Hkv, a.L, a.S, a.mask_kind, a.mask, a.strides + 24, a.scale, a.causal,
                             a.seed, a.dropout_p, fn);
  p.dout = reinterpret_cast<const void*>(a.dout);
  p.q = reinterpret_cast<const void*>(a.q);
  p.k = reinterpret_cast<const void*>(a.k);
  p.v = reinterpret_cast<const void*>(a.v);
  p.out = reinterpret_cast<void*>(a.out);
  p.dq = reinterpret_cast<void*>(a.dq);
  p.dk = reinterpret_cast<void*>(a.dk);
  p.dv = reinterpret_cast<void*>(a.dv);
  p.lse_in = reinterpret_cast<const float*>(a.lse);
  p.delta = reinterpret_cast<float*>(a.delta);
  p.dscores = reinterpret_cast<float*>(a.dscores);
  copy3(p.sdo, a.strides + 0);
  copy3(p.sq, a.strides + 3);
  copy3(p.sk, a.strides + 6);
  copy3(p.sv, a.strides + 9);
  copy3(p.so, a.strides + 12);
  copy3(p.sdq, a.strides + 15);
  copy3(p.sdk, a.strides + 18);
  copy3(p.sdv, a.strides + 21);
  const cudaStream_t stream = as_stream(a.stream);
  const int64_t rows = a.B * a.Hq * a.L;

  dispatch_dtype(a.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    if constexpr (!std::is_same_v<T, float>) {
      if (rows > 0) {
        const unsigned grid = grid_of(ceil_div(rows, kThreads / 32), fn);
        attention_delta_kernel<T><<<dim3(grid), dim3(kThreads), 0, stream>>>(p, static_cast<int>(a.D));
        check_launch("attention_delta_kernel");
      }
      dispatch_head_dim(a.D, [&](auto dim) {
        constexpr int D = decltype(dim)::value;
        if constexpr (D <= 128) dispatch_bool(p.dropout, [&](auto drop) {
          constexpr bool DROPOUT = decltype(drop)::value;
          if (a.S > 0) {
            AttnParams pk = p;
            pk.blocks_per_head = static_cast<int>(ceil_div(a.S, 64));
            const unsigned grid = grid_of(a.B * a.Hkv * pk.blocks_per_head, fn);
            constexpr int64_t smem = dkdv_smem(D);
            auto kernel = attention_dkdv_kernel<T, D, dkdv_bm(D), DROPOUT>;
            allow_smem(reinterpret_cast<const void*>(kernel), smem, fn);
            attention_dkdv_kernel<T, D, dkdv_bm(D), DROPOUT><<<dim3(grid), dim3(kThreads), smem, stream>>>(pk);
            check_launch("attention_dkdv_kernel");
          }
          if (a.L > 0) {
            AttnParams pq = p;
            pq.blocks_per_head = static_cast<int>(ceil_div(a.L, 64));
            const unsigned grid = grid_of(a.B * a.Hq * pq.blocks_per_head, fn);
            constexpr int64_t smem = dq_smem(D);
            auto kernel = attention_dq_kernel<T, D, dq_bn(D), DROPOUT>;
            allow_smem(reinterpret_cast<const void*>(kernel), smem, fn);
            attention_dq_kernel<T, D, dq_bn(D), DROPOUT><<<dim3(grid), dim3(kThreads), smem, stream>>>(pq);
            check_launch("attention_dq_kernel");
          }
        });
      });
    }
  });
}

}  // namespace dlh
