// The one header every device .cuh includes. Device code written against it compiles with nvcc for the GPU
// and with g++ against the SIMT emulator (tests/simt/simt_emulator.h, -DXENT_SIMT_EMULATOR), which runs it on
// the CPU in the tests. No torch headers here or in device code: the emulator's macros are global.
//
// Rules for device code, so that both builds behave alike:
//   - every global-memory access goes through xent::cuda::load_global / store_global (the emulator counts
//     the bytes; a Vec<T, N> access is one vector load/store, LDG.E.128 for 16 bytes);
//   - launches use XENT_LAUNCH, dynamic shared memory XENT_DYNAMIC_SHARED, checks XENT_DEVICE_ASSERT, unrolled
//     loops XENT_UNROLL;
//   - warp-level code uses the _sync intrinsics with masks naming exactly the lanes that take part.
#pragma once

#if defined(__CUDACC__)

#include <cassert>
#include <cstdint>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

using xent_stream_t = cudaStream_t;

// XENT_LAUNCH(grid, block, smem_bytes, stream, kernel)(args...); `kernel` is last so that template
// arguments may contain commas.
#define XENT_LAUNCH(grid, block, smem_bytes, stream, ...) __VA_ARGS__<<<(grid), (block), (smem_bytes), (stream)>>>

// One byte array for every kernel: nvcc rejects extern __shared__ arrays of different types under one name.
#define XENT_DYNAMIC_SHARED(T, name)                                      \
  extern __shared__ __align__(16) unsigned char xent_dynamic_shared_[]; \
  T* name = reinterpret_cast<T*>(xent_dynamic_shared_)

// __assert_fail directly rather than assert(): the check stays under NDEBUG, and the launch then fails with
// cudaErrorAssert ("device-side assert triggered"). `msg` must be a string literal.
#define XENT_DEVICE_ASSERT(cond, msg)                                           \
  do {                                                                          \
    if (!(cond)) __assert_fail(msg " (" #cond ")", __FILE__, __LINE__, __func__); \
  } while (0)

#define XENT_DETAIL_COUNT_READ(bytes) ((void)0)
#define XENT_DETAIL_COUNT_WRITE(bytes) ((void)0)

#elif defined(XENT_SIMT_EMULATOR)

#include <cassert>
#include <cstdint>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "simt_emulator.h"

using xent_stream_t = ::xent_simt::Stream;

// Runs the whole grid before returning; throws std::runtime_error for a bad configuration, a deadlock, a
// misused warp collective or a failed XENT_DEVICE_ASSERT.
#define XENT_LAUNCH(grid, block, smem_bytes, stream, ...)                                      \
  ::xent_simt::detail::make_launcher((grid), (block), (smem_bytes), (stream),                  \
                                     [&](auto&... xent_launch_args_) { __VA_ARGS__(xent_launch_args_...); })

#define XENT_DYNAMIC_SHARED(T, name) T* name = reinterpret_cast<T*>(::xent_simt::detail::dynamic_shared_memory())

// Stops the thread; the launch throws "device-side assert triggered ... msg (cond)" once the grid is done.
#define XENT_DEVICE_ASSERT(cond, msg)                                                              \
  do {                                                                                             \
    if (!(cond)) ::xent_simt::detail::device_assert_fail(#cond, "" msg, __FILE__, __LINE__); \
  } while (0)

#define XENT_DETAIL_COUNT_READ(bytes) ::xent_simt::detail::count_read(bytes)
#define XENT_DETAIL_COUNT_WRITE(bytes) ::xent_simt::detail::count_write(bytes)

#else
#error "compat.cuh: compile device code with nvcc, or with -DXENT_SIMT_EMULATOR and tests/simt on the include path"
#endif

#define XENT_RESTRICT __restrict__

// `#pragma unroll` for nvcc; g++ (the emulator build) gets its own spelling instead of a warning.
#if defined(__CUDACC__)
#define XENT_UNROLL _Pragma("unroll")
#else
#define XENT_UNROLL _Pragma("GCC unroll 16")
#endif

namespace xent::cuda {

// N elements moved as one access: sizeof(T) * N must be a power of two up to 16 bytes for one instruction.
template <class T, int N>
struct alignas(sizeof(T) * N) Vec {
  T val[N];
};

template <class T>
__device__ __forceinline__ T load_global(const T* p) {
  XENT_DETAIL_COUNT_READ(sizeof(T));
  return *p;
}

template <class T>
__device__ __forceinline__ void store_global(T* p, const T& v) {
  XENT_DETAIL_COUNT_WRITE(sizeof(T));
  *p = v;
}

} // namespace xent::cuda
