// rotary.cu: rotary position embedding (RoPE) of queries and keys, forward and backward.
//
// Math (fp32 arithmetic, storage T; cos/sin rounded to T first, as transformers hands them over)
//   x: one head's row of D elements at position (b, s); c, s: the rows of R (rotary_dim, even,
//   <= D) elements of cos and sin at (b, s), shared by every head. Pairs (first, second):
//     rotate-half (LLaMA, GPT-NeoX): (i, i + R/2), i < R/2      interleaved (GPT-J): (2i, 2i + 1)
//   forward:  out[f] = x[f]*c[f] - x[g]*s[f]       out[g] = x[g]*c[g] + x[f]*s[g]   (f first, g second)
//             i.e. x*cos + rot(x)*sin elementwise, transformers' formula with no assumption that
//             cos/sin repeat their halves; out[R..D) = x[R..D) (partial rotary passes through).
//   backward: the transpose of that linear map, dx = dy*cos - rot(dy*sin):
//             dx[f] = dy[f]*c[f] + dy[g]*s[g]      dx[g] = dy[g]*c[g] - dy[f]*s[f]
//             = the forward with the partner's sin, negated (t_f = -s[g], t_g = -s[f]).
//
// Memory traffic per element of q and k, s = sizeof(T): read x, write out = 2s, forward and
// backward alike. cos/sin: 2*R*sizeof(cos) per position, read by all Hq + Hk heads of the
// position in one block (L1 hits after the first head). ~6 fp32 lane-instructions per element
// against a budget of ~36 for 4 bytes moved (bf16): bandwidth-bound, the goal is the copy ceiling.
//
// Layout. q, k, q_out, k_out are logical (B, H, S, D) with any batch/head/seq strides (elements)
// and a unit stride on D; cos/sin are (B or 1, S or 1, R) with batch/seq strides, 0 when
// broadcast. One block per position (b, s) (a grid-stride loop past kMaxBlocks) walks the
// (Hq + Hk) x units of its heads: a unit is VEC = 16/s consecutive pairs (rotate-half: one
// 16-byte load from each half; interleaved: VEC elements = VEC/2 pairs in one load) or VEC
// pass-through elements. 16-byte accesses need every pointer 16-byte aligned, every stride a
// multiple of 16 bytes and R/2 (rotate-half) or R (interleaved) a multiple of VEC; otherwise the
// same kernel runs every unit with scalar accesses (host-checked, one flag). q and k go through
// one launch: heads [0, Hq) are q's, [Hq, Hq + Hk) k's (GQA counts free). Offsets are 64-bit.
//
// Version history
//   v1: block per position, units of VEC pairs through common.cuh's load_group/store_group,
//       runtime flags for the direction (one uniform branch), templates for the storage and
//       table dtypes and the pairing. ptxas (nvcc 13.0): 46-80 registers, no spills, sm_80 and
//       sm_90 (bench/results/ptxas_rotary.txt). Checked against float64 on the CPU through
//       tests/cuda_emu (tests/test_rotary.py; every 16-byte access checked for alignment, and
//       tests/test_cuda_emulation.py shows a vector path without its stride check is caught).
//       Not yet run or timed on a GPU.

#include <algorithm>
#include <type_traits>

#include "common.cuh"

namespace dlh {
namespace {

constexpr int kThreads = 128;            // threads per block: a position's heads are ~4-16K elements
constexpr int64_t kMaxBlocks = 1 << 20;  // past this, the blocks loop over positions

struct RotaryParams {
  const void* x[2];  // q, k (or dq_out, dk_out): heads [0, Hq) and [Hq, Hq + Hk)
  void* out[2];
  const void* cos;
  const void* sin;
  int64_t positions, S;
  int Hq, Hk, D, R;
  int64_t xs[2][3], os[2][3];  // (batch, head, seq) strides of x and out, per tensor
  int64_t cs[2], ss[2];        // (batch, seq) strides of cos and sin (0: broadcast)
  bool backward, vec_ok;
};

// v rounded to T and back (the table in the activation dtype); nothing when the table is in T.
template <typename T, typename C>
__device__ __forceinline__ float as_activation(float v) {
  if constexpr (std::is_same<T, C>::value) return v;
  else return to_float(from_float<T>(v));
}

template <int VEC, typename T, typename C>
__device__ __forceinline__ void load_table(const C* row, int col, int end, bool vec_ok, float* out) {
  load_group<VEC>(row, col, end, vec_ok, out);
#pragma unroll
  for (int k = 0; k < VEC; ++k) out[k] = as_activation<T, C>(out[k]);
}

template <typename T, typename C, bool INTERLEAVED>
__global__ void __launch_bounds__(kThreads) rotary_kernel(const RotaryParams P) {
  constexpr int VEC = kVec16<T>;  // elements of T in 16 bytes: 4 (fp32) or 8 (16-bit)
  const int half = P.R / 2;
  const int rot_units = INTERLEAVED ? (P.R + VEC - 1) / VEC : (half + VEC - 1) / VEC;
  const int units = rot_units + (P.D - P.R + VEC - 1) / VEC;
  const int items = (P.Hq + P.Hk) * units;
  for (int64_t pos = blockIdx.x; pos < P.positions; pos += gridDim.x) {
    const int64_t b = pos / P.S, s = pos % P.S;
    const C* cos_row = static_cast<const C*>(P.cos) + b * P.cs[0] + s * P.cs[1];
    const C* sin_row = static_cast<const C*>(P.sin) + b * P.ss[0] + s * P.ss[1];
    for (int item = threadIdx.x; item < items; item += blockDim.x) {
      const int head = item / units, unit = item - head * units;
      const int which = head < P.Hq ? 0 : 1;
      const int h = which == 0 ? head : head - P.Hq;
      const T* x = static_cast<const T*>(P.x[which]) + b * P.xs[which][0] + h * P.xs[which][1] +
                   s * P.xs[which][2];
      T* out = static_cast<T*>(P.out[which]) + b * P.os[which][0] + h * P.os[which][1] + s * P.os[which][2];
      float v[VEC];
      if (unit >= rot_units) {  // pass-through columns [R, D): copied
        const int col = (unit - rot_units) * VEC, n = P.D - P.R;
        load_group<VEC>(x + P.R, col, n, P.vec_ok, v);
        store_group<VEC>(out + P.R, col, n, P.vec_ok, v);
        continue;
      }
      const int col = unit * VEC;
      float c[VEC], sn[VEC];
      if constexpr (INTERLEAVED) {
        // VEC/2 pairs (v[2j], v[2j + 1]); sin of the partner is the neighbour in the same unit
        load_group<VEC>(x, col, P.R, P.vec_ok, v);
        load_table<VEC, T>(cos_row, col, P.R, P.vec_ok, c);
        load_table<VEC, T>(sin_row, col, P.R, P.vec_ok, sn);
        float o[VEC];
#pragma unroll
        for (int j = 0; j < VEC; j += 2) {
          const float tf = P.backward ? -sn[j + 1] : sn[j];
          const float tg = P.backward ? -sn[j] : sn[j + 1];
          o[j] = v[j] * c[j] - v[j + 1] * tf;
          o[j + 1] = v[j + 1] * c[j + 1] + v[j] * tg;
        }
        store_group<VEC>(out, col, P.R, P.vec_ok, o);
      } else {
        // VEC pairs: v (first half) with w (second half), columns col.. and half + col..
        float w[VEC], c2[VEC], s2[VEC];
        load_group<VEC>(x, col, half, P.vec_ok, v);
        load_group<VEC>(x + half, col, half, P.vec_ok, w);
        load_table<VEC, T>(cos_row, col, half, P.vec_ok, c);
        load_table<VEC, T>(cos_row + half, col, half, P.vec_ok, c2);
        load_table<VEC, T>(sin_row, col, half, P.vec_ok, sn);
        load_table<VEC, T>(sin_row + half, col, half, P.vec_ok, s2);
        float o1[VEC], o2[VEC];
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          const float tf = P.backward ? -s2[j] : sn[j];
          const float tg = P.backward ? -sn[j] : s2[j];
          o1[j] = v[j] * c[j] - w[j] * tf;
          o2[j] = w[j] * c2[j] + v[j] * tg;
        }
        store_group<VEC>(out, col, half, P.vec_ok, o1);
        store_group<VEC>(out + half, col, half, P.vec_ok, o2);
      }
    }
  }
}

template <typename T, typename C>
void launch_rotary(const RotaryParams& P, bool interleaved, cudaStream_t stream) {
  const int64_t blocks = std::min(P.positions, kMaxBlocks);
  if (interleaved) {
    rotary_kernel<T, C, true><<<blocks, kThreads, 0, stream>>>(P);
  } else {
    rotary_kernel<T, C, false><<<blocks, kThreads, 0, stream>>>(P);
  }
  check_launch("rotary_kernel");
}

// Can every unit move as 16-byte packs? Pointers aligned, strides (bytes) multiples of 16, and
// the second half (rotate-half) or the pass-through section starting at a multiple of VEC.
bool vectorizable(const RotaryArgs& a, int64_t elem, int64_t table_elem, int vec) {
  const std::uintptr_t ptrs[6] = {a.q, a.k, a.q_out, a.k_out, a.cos, a.sin};
  for (std::uintptr_t p : ptrs)
    if (p % 16) return false;
  for (int i = 0; i < 16; ++i) {
    const int64_t bytes = a.strides[i] * (i < 12 ? elem : table_elem);
    if (bytes % 16) return false;
  }
  return (a.interleaved ? a.R : a.R / 2) % vec == 0;
}

}  // namespace

void rotary(const RotaryArgs& a) {
  const char* fn = "rotary";
  check_arg(a.B >= 0 && a.S >= 0 && a.Hq >= 0 && a.Hk >= 0, fn, "B, S, Hq and Hk must be >= 0");
  check_arg(a.R > 0 && a.R % 2 == 0 && a.R <= a.D, fn,
            "R (rotary_dim) must be even, positive and <= D, got R = " + std::to_string(a.R) + ", D = " +
                std::to_string(a.D));
  check_arg((a.Hq + a.Hk) * (ceil_div(a.D, 4) + 2) < INT32_MAX, fn,
            "Hq, Hk and D are too large for one position's 32-bit work index");
  check_dtype_code(a.dtype, fn, "dtype");
  check_arg(a.cs_dtype == kFloat32 || a.cs_dtype == a.dtype, fn,
            "cs_dtype must be 0 (float32) or equal to dtype (" + std::to_string(a.dtype) + "), got " +
                std::to_string(a.cs_dtype));
  if (a.B * a.S == 0 || a.Hq + a.Hk == 0) return;
  check_arg(a.cos && a.sin, fn, "cos and sin are required");
  check_arg(a.Hq == 0 || (a.q && a.q_out), fn, "q and q_out are required when Hq > 0");
  check_arg(a.Hk == 0 || (a.k && a.k_out), fn, "k and k_out are required when Hk > 0");
  RotaryParams P;
  P.x[0] = reinterpret_cast<const void*>(a.q);
  P.x[1] = reinterpret_cast<const void*>(a.k);
  P.out[0] = reinterpret_cast<void*>(a.q_out);
  P.out[1] = reinterpret_cast<void*>(a.k_out);
  P.cos = reinterpret_cast<const void*>(a.cos);
  P.sin = reinterpret_cast<const void*>(a.sin);
  P.positions = a.B * a.S;
  P.S = a.S;
  P.Hq = static_cast<int>(a.Hq);
  P.Hk = static_cast<int>(a.Hk);
  P.D = static_cast<int>(a.D);
  P.R = static_cast<int>(a.R);
  for (int t = 0; t < 2; ++t)
    for (int d = 0; d < 3; ++d) {
      P.xs[t][d] = a.strides[3 * t + d];      // q, k
      P.os[t][d] = a.strides[6 + 3 * t + d];  // q_out, k_out
    }
  P.cs[0] = a.strides[12];
  P.cs[1] = a.strides[13];
  P.ss[0] = a.strides[14];
  P.ss[1] = a.strides[15];
  P.backward = a.backward;
  const cudaStream_t stream = as_stream(a.stream);
  dispatch_norm_types(a.dtype, a.cs_dtype, fn, [&](auto t_tag, auto c_tag) {
    using T = typename decltype(t_tag)::type;
    using C = typename decltype(c_tag)::type;
    P.vec_ok = vectorizable(a, sizeof(T), sizeof(C), kVec16<T>);
    launch_rotary<T, C>(P, a.interleaved, stream);
  });
}

}  // namespace dlh
