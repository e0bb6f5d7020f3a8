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
// unit): ceil_div, the dtype and value dispatchers, typed data pointers, merged dims, empty reductions.
#pragma once

#include "compat.cuh"
#include "merged_dims.cuh"

#include <ATen/core/Reduction.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <optional>
#include <type_traits>
#include <vector>

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

// The cases of dispatch_cases: a dtype S handled with the device type T (passed on as Tag<T>), or a value V
// (passed on as std::integral_constant, a template argument in the callee).
template <at::ScalarType S, class T>
struct DtypeCase : Tag<T> {
  static constexpr at::ScalarType key = S;
};
template <auto V>
struct ValueCase : std::integral_constant<decltype(V), V> {
  static constexpr decltype(V) key = V;
};

// Calls f(Case{}) for the first of Cases whose key equals `key`; false when none does.
template <class... Cases, class K, class F>
bool dispatch_cases(K key, F&& f) {
  return ((key == Cases::key ? (f(Cases{}), true) : false) || ...);
}

// Calls f(Tag<T>{}) with T the device type of a floating dtype (__nv_bfloat16 and __half for the 16-bit
// ones); `op` names the op in the error for any other dtype.
template <class F>
void dispatch_float_dtype(at::ScalarType st, const char* op, F&& f) {
  const bool known = dispatch_cases<DtypeCase<at::kFloat, float>, DtypeCase<at::kDouble, double>,
                                    DtypeCase<at::kBFloat16, __nv_bfloat16>, DtypeCase<at::kHalf, __half>>(st, f);
  TORCH_CHECK(known, op, ": unsupported dtype ", st);
}

// The same for class-index target dtypes (int64, int32, uint8).
template <class F>
void dispatch_index_dtype(at::ScalarType st, const char* op, F&& f) {
  const bool known =
      dispatch_cases<DtypeCase<at::kLong, int64_t>, DtypeCase<at::kInt, int32_t>, DtypeCase<at::kByte, uint8_t>>(st, f);
  TORCH_CHECK(known, op, ": unsupported target dtype ", st);
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

// t's dims, dim `skip` (if >= 0) and size-1 dims dropped, contiguous runs merged (MergedDims, outermost
// first); nullopt when more than kMaxMergedDims remain.
inline std::optional<MergedDims> merge_dims(const at::Tensor& t, int64_t skip = -1) {
  std::vector<int64_t> sizes, strides;
  for (int64_t d = 0; d < t.dim(); ++d) {
    if (d == skip || t.size(d) == 1) continue;
    if (!sizes.empty() && strides.back() == t.stride(d) * t.size(d)) {
      sizes.back() *= t.size(d);
      strides.back() = t.stride(d);
    } else {
      sizes.push_back(t.size(d));
      strides.push_back(t.stride(d));
    }
  }
  if (sizes.size() > static_cast<size_t>(kMaxMergedDims)) return std::nullopt;
  MergedDims md;
  if (sizes.empty()) return md;  // one element: offset 0
  md.ndim = static_cast<int>(sizes.size());
  for (int i = 0; i < md.ndim; ++i) {
    md.size[i] = sizes[i];
    md.stride[i] = strides[i];
  }
  return md;
}

// The loss of an empty input: mean is 0 / 0 = NaN and sum 0, as PyTorch's; reduction none leaves it empty.
inline void fill_empty_reduction(at::Tensor& loss, int64_t reduction) {
  if (reduction == at::Reduction::Mean) loss.fill_(std::numeric_limits<double>::quiet_NaN());
  if (reduction == at::Reduction::Sum) loss.zero_();
}

} // namespace xent::cuda::host
