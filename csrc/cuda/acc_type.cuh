// The accumulation dtype of the device code, the conversions to and from it and the math functions in it,
// shared by every loss's device code. Device code only: includes nothing but compat.cuh (and <cmath> for the
// math overloads).
//
// Accumulation is in float for float, bfloat16 and float16 inputs and in double for double inputs.
#pragma once

#include "compat.cuh"

#include <cmath>

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

// Math in the accumulation dtype: the float functions for float, the double ones for double.
__device__ inline float acc_exp(float v) { return expf(v); }
__device__ inline double acc_exp(double v) { return exp(v); }
__device__ inline float acc_expm1(float v) { return expm1f(v); }
__device__ inline double acc_expm1(double v) { return expm1(v); }
__device__ inline float acc_log(float v) { return logf(v); }
__device__ inline double acc_log(double v) { return log(v); }
__device__ inline float acc_log1p(float v) { return log1pf(v); }
__device__ inline double acc_log1p(double v) { return log1p(v); }
__device__ inline float acc_pow(float a, float b) { return powf(a, b); }
__device__ inline double acc_pow(double a, double b) { return pow(a, b); }
__device__ inline float acc_abs(float v) { return fabsf(v); }
__device__ inline double acc_abs(double v) { return fabs(v); }
// max and min that ignore NaN (fmax, fmin): a NaN logit reaches cross-entropy's loss through its sum of
// exponentials instead.
__device__ inline float acc_max(float a, float b) { return fmaxf(a, b); }
__device__ inline double acc_max(double a, double b) { return fmax(a, b); }
__device__ inline float acc_min(float a, float b) { return fminf(a, b); }
__device__ inline double acc_min(double a, double b) { return fmin(a, b); }

} // namespace xent::cuda
