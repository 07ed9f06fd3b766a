// emu.h: the CUDA a csrc/*.cu file sees when tests/cuda_emu builds it with g++ for the CPU.
//
// Included (by the driver's source rewrite) before common.cuh. It turns the CUDA keywords into
// C++, declares the built-in variables and the device functions the kernels use, and leaves
// everything else to the runtime (runtime.cpp), which is compiled separately and without the
// memory-access instrumentation that this translation unit gets (-fsanitize=thread with our own
// __tsan_* hooks: every load and store of the kernel code reaches the runtime, which checks
// alignment and, for shared memory, bounds and races). See __init__.py for the whole story.
#pragma once
#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <functional>

#undef __global__
#define __global__
#undef __device__
#define __device__
#undef __forceinline__
#define __forceinline__ inline
// The driver rewrites every `__shared__` declaration into ::emu::static_shared and every
// `__launch_bounds__(N, ...)` into a check at kernel entry; these are the fallbacks.
#undef __launch_bounds__
#define __launch_bounds__(...)
#undef __shared__
#define __shared__ static
#define __CUDACC__ 1

// extern "C" functions the driver (ctypes) calls: visible outside the library
#define EMU_EXPORT extern "C" __attribute__((visibility("default")))

extern thread_local uint3 threadIdx, blockIdx;
extern dim3 blockDim, gridDim;

void __syncthreads();
float __shfl_xor_sync(unsigned mask, float v, int lane_mask);
int __shfl_xor_sync(unsigned mask, int v, int lane_mask);
unsigned __shfl_xor_sync(unsigned mask, unsigned v, int lane_mask);

inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline long min(long a, long b) { return a < b ? a : b; }

namespace emu {
// Kernel launches, as the driver rewrites `kernel<<<grid, block, smem, stream>>>(args);`.
void launch(const char* name, const void* kernel, dim3 grid, dim3 block, size_t dynamic_smem,
            const std::function<void()>& body);
template <typename... A>
const void* kernel_address(void (*kernel)(A...)) {
  return reinterpret_cast<const void*>(kernel);
}
// At the entry of a kernel declared with __launch_bounds__(max_threads, ...).
void launch_bounds(int max_threads);
// `__shared__ T name[dims];` becomes `auto& name = static_shared<T[dims]>(align);`: the block's
// shared-memory window hands out the bytes (same offsets in every thread), so that the checks
// see the kernel's static shared memory exactly like its dynamic one.
void* static_shared_bytes(size_t bytes, size_t align);
template <typename A>
A& static_shared(size_t align) {
  return *static_cast<A*>(static_shared_bytes(sizeof(A), align > alignof(A) ? align : alignof(A)));
}
unsigned char* dynamic_smem();
}  // namespace emu

// The kernels' dynamic shared memory (attention.cu): the launch's size, right after the static part.
#define DLH_DYNAMIC_SMEM(name) unsigned char* const name = ::emu::dynamic_smem()

// DLH_TEST_VECTOR_ACCESS (gelu.cu) counts 16-byte accesses (misaligned ones are violations).
void emu_vector_access(const void* p);

// mma.sync / ldmatrix / cp.async (csrc/mma.cuh), emulated by the runtime.
#define DLH_EMULATE_MMA 1
void cp_async16(void* dst, const void* src, bool valid);
void cp_async_commit();
void cp_async_wait_groups(int n);
template <int N>
inline void cp_async_wait() {
  cp_async_wait_groups(N);
}
void ldmatrix_x4(unsigned* r, const void* p);
void ldmatrix_x4_trans(unsigned* r, const void* p);
template <typename T>
void mma16816(float* c, const unsigned* a, const unsigned* b);
template <>
void mma16816<__half>(float* c, const unsigned* a, const unsigned* b);
template <>
void mma16816<__nv_bfloat16>(float* c, const unsigned* a, const unsigned* b);
