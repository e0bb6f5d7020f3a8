#include "cpu/reductions.h"

#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <vector>

namespace xent::cpu {

at::Tensor targets_as_int64(const at::Tensor& target) { return target.to(at::kLong).contiguous().view({-1}); }

double validate_targets(const at::Tensor& target64, int64_t C, int64_t ignore_index, const at::Tensor& weight) {
  const int64_t P = target64.numel();
  const int64_t* t = target64.const_data_ptr<int64_t>();
  const int64_t n_blocks = (P + kReduceBlock - 1) / kReduceBlock;
  std::vector<double> block_sum(n_blocks, 0.0);
  std::vector<int64_t> block_bad(n_blocks, -1);
  const bool f64 = weight.defined() && weight.scalar_type() == at::kDouble;
  const double* w64 = f64 ? weight.const_data_ptr<double>() : nullptr;
  const float* w32 = weight.defined() && !f64 ? weight.const_data_ptr<float>() : nullptr;
  at::parallel_for(0, n_blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      double sum = 0;
      const int64_t end = std::min(P, (b + 1) * kReduceBlock);
      for (int64_t p = b * kReduceBlock; p < end; ++p) {
        const int64_t tp = t[p];
        if (tp == ignore_index) continue;  // before the range check: ignore_index may be any integer
        if (tp < 0 || tp >= C) {
          block_bad[b] = p;
          break;
        }
        sum += w64 ? w64[tp] : w32 ? static_cast<double>(w32[tp]) : 1.0;
      }
      block_sum[b] = sum;
    }
  });
  double total = 0;
  for (int64_t b = 0; b < n_blocks; ++b) {
    TORCH_CHECK_INDEX(block_bad[b] < 0, "Target ", t[block_bad[b]], " is out of bounds.");
    total += block_sum[b];
  }
  return total;
}

double deterministic_sum(const at::Tensor& values) {
  TORCH_INTERNAL_ASSERT(values.is_contiguous());
  const int64_t P = values.numel();
  const int64_t n_blocks = (P + kReduceBlock - 1) / kReduceBlock;
  std::vector<double> block_sum(n_blocks, 0.0);
  const bool f64 = values.scalar_type() == at::kDouble;
  at::parallel_for(0, n_blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      double sum = 0;
      const int64_t end = std::min(P, (b + 1) * kReduceBlock);
      if (f64) {
        const double* v = values.const_data_ptr<double>();
        for (int64_t p = b * kReduceBlock; p < end; ++p) sum += v[p];
      } else {
        const float* v = values.const_data_ptr<float>();
        for (int64_t p = b * kReduceBlock; p < end; ++p) sum += v[p];
      }
      block_sum[b] = sum;
    }
  });
  double total = 0;
  for (double s : block_sum) total += s;
  return total;
}

} // namespace xent::cpu
