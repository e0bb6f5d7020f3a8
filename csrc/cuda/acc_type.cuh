// The accumulation dtype of the device code and the conversions to and from it, shared by the losses'
// device code (nll_loss.cuh, binary_losses.cuh). Device code only: includes nothing but compat.cuh.
//
// Accumulation is in float for float, bfloat16 and float16 inputs and in double for double inputs.
#pragma once

#include "compat.cuh"

namespace xent::cuda {

template <class T>
struct AccType {
  using type = float;
};
template <>
struct AccType<double> {
  using type = double;
};

// Explicit conversion intrinsics: torch builds CUDA code with __CUDA_NO_HALF_CONVERSIONS__ and
// __CUDA_NO_BFLOAT16_CONVERSIONS__.
__device__ inline float to_acc(float v) { return v; }
__device__ inline double to_acc(double v) { return v; }
__device__ inline float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ inline float to_acc(__half v) { return __half2float(v); }

template <class T>
__device__ inline T from_acc(typename AccType<T>::type v);
template <>
__device__ inline float from_acc<float>(float v) { return v; }
template <>
__device__ inline double from_acc<double>(double v) { return v; }
template <>
__device__ inline __nv_bfloat16 from_acc<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
template <>
__device__ inline __half from_acc<__half>(float v) { return __float2half_rn(v); }

} // namespace xent::cuda
