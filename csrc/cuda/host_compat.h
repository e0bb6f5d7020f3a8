// Host compat for the CUDA ops' host launch code (csrc/cuda/*.cu).
//
// Every .cu in csrc/cuda is also compiled by g++ for the SIMT emulator (tests/simt/emulated_ops.cpp includes
// them all into one translation unit, with -DXENT_SIMT_EMULATOR): the tensors are then CPU tensors, launches
// run the device code on the CPU and the ops are CPU kernels of the `xent_emulated` library. Everything the
// host code needs that differs between the two builds lives here, once (the .cu files share a translation
// unit in the emulated build, so they cannot each define it):
//   XENT_CUDA_LIBRARY, XENT_CUDA_DISPATCH_KEY  the TORCH_LIBRARY_IMPL arguments;
//   XENT_CUDA_LAUNCH_CHECK()                   after every launch (C10_CUDA_KERNEL_LAUNCH_CHECK; the emulator
//                                              throws from the launch itself);
//   xent::cuda::host::DeviceGuard, current_stream(device), sm_count(device).
// Also the host helpers every .cu uses alike (same reason: one definition for the shared translation
// unit): ceil_div, the dtype dispatchers and typed data pointers.
#pragma once

#include "compat.cuh"

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <atomic>
#include <cstdint>
#include <cstdlib>

#ifdef XENT_SIMT_EMULATOR
#define XENT_CUDA_LIBRARY xent_emulated
#define XENT_CUDA_DISPATCH_KEY CPU
#define XENT_CUDA_LAUNCH_CHECK() \
  do {                           \
  } while (0)
namespace xent::cuda::host {
struct DeviceGuard {
  explicit DeviceGuard(const at::Device&) {}
};
inline xent_stream_t current_stream(const at::Device&) { return xent_stream_t{}; }
// The emulated "GPU" has 4 SMs unless XENT_SIMT_SM_COUNT says otherwise (it moves the split-row thresholds).
inline int sm_count(const at::Device&) {
  const char* env = std::getenv("XENT_SIMT_SM_COUNT");
  const int n = env != nullptr ? std::atoi(env) : 0;
  return n > 0 ? n : 4;
}
} // namespace xent::cuda::host
#else
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#define XENT_CUDA_LIBRARY xent
#define XENT_CUDA_DISPATCH_KEY CUDA
#define XENT_CUDA_LAUNCH_CHECK() C10_CUDA_KERNEL_LAUNCH_CHECK()
namespace xent::cuda::host {
using DeviceGuard = c10::cuda::CUDAGuard;
inline xent_stream_t current_stream(const at::Device& device) {
  return c10::cuda::getCurrentCUDAStream(device.index()).stream();
}
inline int sm_count(const at::Device& device) {
  static std::atomic<int> cache[64];
  const int index = device.index();
  if (index >= 0 && index < 64) {
    const int cached = cache[index].load(std::memory_order_relaxed);
    if (cached > 0) return cached;
  }
  int n = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, index));
  if (index >= 0 && index < 64) cache[index].store(n, std::memory_order_relaxed);
  return n;
}
} // namespace xent::cuda::host
#endif

namespace xent::cuda::host {

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// A type carried as a value, so a generic lambda can receive it: f(Tag<float>{}) -> decltype(tag)::type.
template <class T>
struct Tag {
  using type = T;
};

// Calls f(Tag<T>{}) with T the device type of a floating dtype (__nv_bfloat16 and __half for the 16-bit
// ones); `op` names the op in the error for any other dtype.
template <class F>
void dispatch_float_dtype(at::ScalarType st, const char* op, F&& f) {
  switch (st) {
    case at::kFloat: f(Tag<float>{}); break;
    case at::kDouble: f(Tag<double>{}); break;
    case at::kBFloat16: f(Tag<__nv_bfloat16>{}); break;
    case at::kHalf: f(Tag<__half>{}); break;
    default: TORCH_CHECK(false, op, ": unsupported dtype ", st);
  }
}

// The same for class-index target dtypes (int64, int32, uint8).
template <class F>
void dispatch_index_dtype(at::ScalarType st, const char* op, F&& f) {
  switch (st) {
    case at::kLong: f(Tag<int64_t>{}); break;
    case at::kInt: f(Tag<int32_t>{}); break;
    case at::kByte: f(Tag<uint8_t>{}); break;
    default: TORCH_CHECK(false, op, ": unsupported target dtype ", st);
  }
}

// A tensor's data as T (the device type of its dtype), or null for an undefined (absent optional) tensor.
template <class T>
const T* cptr(const at::Tensor& t) {
  return t.defined() ? reinterpret_cast<const T*>(t.const_data_ptr()) : nullptr;
}
template <class T>
T* mptr(const at::Tensor& t) {
  return t.defined() ? reinterpret_cast<T*>(t.mutable_data_ptr()) : nullptr;
}

} // namespace xent::cuda::host
