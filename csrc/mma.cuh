// mma.cuh: the sm_80 tensor-core and async-copy instructions, as small device functions.
//
//   cp_async16(dst, src, valid)   16 bytes global -> shared (cp.async.cg, L1 bypassed); valid =
//                                 false zero-fills dst without reading src
//   cp_async_commit / _wait<N>    close the current group of copies / wait until at most N
//                                 groups are still in flight
//   ldmatrix_x4(r, p)             four 8x8 b16 matrices from shared memory, lane l giving the
//                                 address of row l % 8 of matrix l / 8; r[i] = matrix i's
//                                 elements (row lane/4, cols 2*(lane%4) and +1)
//   ldmatrix_x4_trans(r, p)       the same, transposed: r[i] = (row 2*(lane%4) and +1, col lane/4)
//   mma16816<T>(c, a, b)          c (16x8 fp32) += a (16x16 T, row) * b (16x8 T, col),
//                                 T = __half or __nv_bfloat16 (mma.sync.m16n8k16)
//   pack2<T>(lo, hi)              two fp32 rounded to T in one 32-bit register (lo in the low half)
//
// Fragment layouts (PTX ISA, mma.m16n8k16, g = lane / 4, t = lane % 4):
//   a[0] (row g, cols 2t, 2t+1)  a[1] (row g+8, same cols)  a[2] (row g, cols 2t+8, 2t+9)  a[3] (row g+8, ...)
//   b[0] (rows 2t, 2t+1, col g)  b[1] (rows 2t+8, 2t+9, col g)
//   c[0], c[1] (row g, cols 2t, 2t+1)  c[2], c[3] (row g+8, cols 2t, 2t+1)
// so a 16x16 A operand is two adjacent 16x8 accumulators: a = {pack(c0[0], c0[1]),
// pack(c0[2], c0[3]), pack(c1[0], c1[1]), pack(c1[2], c1[3])}.
//
// The CPU emulation (tests/cuda_emu) defines DLH_EMULATE_MMA and brings its own versions (same
// names and layouts, computed lane by lane, cp.async asynchronous and every address checked); the real instructions exist only in
// the device pass for sm_80 and newer, and the host code only launches these kernels there.
#pragma once

#include "common.cuh"

#ifdef __CUDACC__
namespace dlh {

#ifndef DLH_EMULATE_MMA
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
#define DLH_HAS_MMA 1
#endif

#ifdef DLH_HAS_MMA
__device__ __forceinline__ unsigned smem_u32(const void* p) {
  return static_cast<unsigned>(__cvta_generic_to_shared(p));
}
#endif

__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool valid) {
#ifdef DLH_HAS_MMA
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_u32(dst)), "l"(src),
               "r"(valid ? 16 : 0)
               : "memory");
#endif
}

__device__ __forceinline__ void cp_async_commit() {
#ifdef DLH_HAS_MMA
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}

template <int N>
__device__ __forceinline__ void cp_async_wait() {
#ifdef DLH_HAS_MMA
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
#endif
}

__device__ __forceinline__ void ldmatrix_x4(unsigned* r, const void* p) {
#ifdef DLH_HAS_MMA
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(p)));
#endif
}

__device__ __forceinline__ void ldmatrix_x4_trans(unsigned* r, const void* p) {
#ifdef DLH_HAS_MMA
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(p)));
#endif
}

template <typename T>
__device__ __forceinline__ void mma16816(float* c, const unsigned* a, const unsigned* b);

template <>
__device__ __forceinline__ void mma16816<__half>(float* c, const unsigned* a, const unsigned* b) {
#ifdef DLH_HAS_MMA
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#endif
}

template <>
__device__ __forceinline__ void mma16816<__nv_bfloat16>(float* c, const unsigned* a, const unsigned* b) {
#ifdef DLH_HAS_MMA
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#endif
}
#endif  // DLH_EMULATE_MMA

template <typename T>
__device__ __forceinline__ unsigned pack2(float lo, float hi) {
  const T l = from_float<T>(lo), h = from_float<T>(hi);
  unsigned short bl, bh;
  static_assert(sizeof(T) == 2, "pack2 packs 16-bit types");
  __builtin_memcpy(&bl, &l, 2);
  __builtin_memcpy(&bh, &h, 2);
  return static_cast<unsigned>(bl) | (static_cast<unsigned>(bh) << 16);
}

}  // namespace dlh
#endif  // __CUDACC__
