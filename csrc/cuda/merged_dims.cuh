// MergedDims: how device code indexes a strided tensor in place, shared by nll_loss (position dims) and the
// binary losses (broadcast operands). Built on the host by host::merge_dims (host_compat.h).
#pragma once

#include "compat.cuh"

namespace xent::cuda {

// Merged dims a kernel indexes directly (more: the host makes the tensor contiguous).
constexpr int kMaxMergedDims = 4;

// A tensor's dims after size-1 dims were dropped and each run of dims contiguous in it (stride_outer ==
// stride_inner * size_inner; broadcast dims, stride 0, merge with each other) merged into one: ndim >= 1
// (size, stride) pairs, outermost first. The default is one element at offset 0.
struct MergedDims {
  int ndim = 1;
  int64_t size[kMaxMergedDims] = {1, 1, 1, 1};
  int64_t stride[kMaxMergedDims] = {0, 0, 0, 0};
};

} // namespace xent::cuda
