// The test-only translation unit of xent._C_emulated (tests/simt/README.md): the op schemas of csrc/ops.cpp
// as the `xent_emulated` library, the CUDA host launch code and device code of csrc/cuda/*.cu
// compiled as C++ against the SIMT emulator (registered as CPU kernels), and the emulator's control ops.
//
// Built by setup.py (XENT_BUILD_EMULATOR=1) with -DXENT_EMULATED_BUILD -DXENT_SIMT_EMULATOR and the include
// directories csrc and tests/simt.
#ifndef XENT_SIMT_EMULATOR
#error "emulated_ops.cpp is built with -DXENT_SIMT_EMULATOR (setup.py, XENT_BUILD_EMULATOR=1)"
#endif

#define XENT_OPS_NAMESPACE xent_emulated
#include "ops.cpp"

#include "cuda/cross_entropy.cu"
#include "cuda/nll_loss.cu"
#include "cuda/binary_losses.cu"
#include "cuda/softmax_focal.cu"

#include "simt_emulator.h"

#include <c10/util/Exception.h>
#include <torch/library.h>

#include <cstdint>
#include <string>
#include <vector>

namespace xent::simt_ops {
namespace {

// _simt_schedule(str schedule, int seed=0) -> (): the warp schedule of later launches.
void simt_schedule(const std::string& schedule, int64_t seed) {
  xent_simt::Schedule s;
  if (schedule == "forward") {
    s = xent_simt::Schedule::Forward;
  } else if (schedule == "reverse") {
    s = xent_simt::Schedule::Reverse;
  } else if (schedule == "random") {
    s = xent_simt::Schedule::Random;
  } else {
    TORCH_CHECK_VALUE(false, "_simt_schedule: expected \"forward\", \"reverse\" or \"random\", got \"", schedule, "\"");
  }
  xent_simt::set_schedule(s, static_cast<uint64_t>(seed));
}

// _simt_traffic() -> int[]: [bytes read, bytes written] by device code since the previous call.
std::vector<int64_t> simt_traffic() {
  const xent_simt::Traffic t = xent_simt::take_traffic();
  return {t.bytes_read, t.bytes_written};
}

} // namespace
} // namespace xent::simt_ops

// The control ops take no tensor, so no backend key can be derived from their arguments:
// CompositeExplicitAutograd kernels are what the dispatcher runs for them.
TORCH_LIBRARY_IMPL(xent_emulated, CompositeExplicitAutograd, m) {
  m.impl("_simt_schedule", TORCH_FN(xent::simt_ops::simt_schedule));
  m.impl("_simt_traffic", TORCH_FN(xent::simt_ops::simt_traffic));
}
