#include "cpu/reductions.h"

#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace xent::cpu {

at::Tensor targets_as_int64(const at::Tensor& target) { return target.to(at::kLong).contiguous().view({-1}); }

double validate_targets(const at::Tensor& target64, int64_t C, int64_t ignore_index, const at::Tensor& weight) {
  const int64_t P = target64.numel();
  const int64_t* t = target64.const_data_ptr<int64_t>();
  const int64_t n_blocks = (P + kReduceBlock - 1) / kReduceBlock;
  std::vector<int64_t> block_bad(n_blocks, -1);
  const bool f64 = weight.defined() && weight.scalar_type() == at::kDouble;
  const double* w64 = f64 ? weight.const_data_ptr<double>() : nullptr;
  const float* w32 = weight.defined() && !f64 ? weight.const_data_ptr<float>() : nullptr;
  const std::vector<double> block_total = over_blocks(P, [&](int64_t b, int64_t begin, int64_t end) -> double {
    // ignore_index is tested first: it may be any integer, even a valid class. Branch-free (& rather
    // than &&), one unsigned compare for both ends of [0, C).
    auto out_of_range = [C, ignore_index](int64_t tp) {
      return (tp != ignore_index) & (static_cast<uint64_t>(tp) >= static_cast<uint64_t>(C));
    };
    // Branch-free pass: the count of non-ignored targets and whether any is out of range.
    int64_t count = 0;
    bool bad = false;
    for (int64_t p = begin; p < end; ++p) {
      count += t[p] != ignore_index;
      bad |= out_of_range(t[p]);
    }
    if (bad) {  // the first offender, for the error message
      block_bad[b] = std::find_if(t + begin, t + end, out_of_range) - t;
      return 0;
    }
    if (!w64 && !w32) return static_cast<double>(count);
    return block_sum(begin, end, [t, ignore_index, w64, w32](int64_t p) {
      const int64_t tp = t[p];
      return tp == ignore_index ? 0.0 : w64 ? w64[tp] : static_cast<double>(w32[tp]);
    });
  });
  double total = 0;
  for (int64_t b = 0; b < n_blocks; ++b) {
    TORCH_CHECK_INDEX(block_bad[b] < 0, "Target ", t[block_bad[b]], " is out of bounds.");
    total += block_total[b];
  }
  return total;
}

double deterministic_sum(const at::Tensor& values) {
  TORCH_INTERNAL_ASSERT(values.is_contiguous());
  if (values.scalar_type() == at::kDouble) {
    const double* v = values.const_data_ptr<double>();
    return blocked_sum(values.numel(), [v](int64_t p) { return v[p]; });
  }
  const float* v = values.const_data_ptr<float>();
  return blocked_sum(values.numel(), [v](int64_t p) { return static_cast<double>(v[p]); });
}

} // namespace xent::cpu
