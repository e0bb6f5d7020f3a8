#include "cpu/isa.h"

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <c10/util/Exception.h>

#include <atomic>
#include <cstdlib>
#include <string>

namespace xent::cpu {
namespace {

bool cpu_has(const std::string& isa) {
#if defined(__x86_64__) || defined(_M_X64)
  __builtin_cpu_init();
  if (isa == "avx512")
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
           __builtin_cpu_supports("fma");
  if (isa == "avx2") return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#endif
  return isa == "generic";
}

const std::string kIsas[] = {"avx512", "avx2", "generic"};

std::atomic<const std::string*>& active() {
  static std::atomic<const std::string*> isa = [] {
    const std::string* best = &kIsas[2];
    for (const std::string& name : kIsas) {
      if (cpu_has(name)) {
        best = &name;
        break;
      }
    }
    // XENT_CPU_ISA caps the choice (e.g. to compare against AVX2 on an AVX-512 machine).
    if (const char* env = std::getenv("XENT_CPU_ISA")) {
      for (const std::string& name : kIsas)
        if (name == env && cpu_has(name)) return &name;
      TORCH_WARN("xent: XENT_CPU_ISA=", env, " is unknown or not available on this CPU; using ", *best);
    }
    return best;
  }();
  return isa;
}

} // namespace

const std::string& active_cpu_isa() { return *active().load(std::memory_order_relaxed); }

void set_cpu_isa(const std::string& isa) {
  for (const std::string& name : kIsas) {
    if (name == isa) {
      TORCH_CHECK_VALUE(cpu_has(name), "xent: this CPU does not support the '", isa, "' kernels");
      active().store(&name);
      return;
    }
  }
  TORCH_CHECK_VALUE(false, "xent: unknown CPU instruction set '", isa, "' (choose avx512, avx2 or generic)");
}

bool use_avx512_bf16() {
#if defined(__x86_64__) || defined(_M_X64)
  static const bool cpu_has_bf16 = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512bf16") != 0;
  }();
  if (!cpu_has_bf16) return false;
  const char* env = std::getenv("XENT_CPU_AVX512_BF16");
  return !(env && std::string(env) == "0");
#else
  return false;
#endif
}

const KernelTables& kernel_tables() {
  const std::string& isa = active_cpu_isa();
  const KernelTables* t = isa == "avx512" ? (use_avx512_bf16() ? kernel_tables_avx512_bf16() : kernel_tables_avx512())
                          : isa == "avx2" ? kernel_tables_avx2()
                                          : nullptr;
  return t ? *t : *kernel_tables_generic();
}

DType kernel_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return DType::f32;
    case at::kDouble: return DType::f64;
    case at::kBFloat16: return DType::bf16;
    case at::kHalf: return DType::f16;
    default: TORCH_CHECK(false, "xent: unsupported dtype ", t);
  }
}

namespace {

// _cpu_isa(str isa="") -> str: selects the instruction set ("" keeps it) and returns the one in use.
std::string cpu_isa(c10::string_view isa) {
  if (!isa.empty()) set_cpu_isa(std::string(isa));
  return active_cpu_isa();
}

// _cpu_exp(Tensor x) -> Tensor: the kernels' vectorized exp of a float32 tensor (tests its accuracy).
at::Tensor cpu_exp(const at::Tensor& x) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.device().is_cpu(), "_cpu_exp expects a float32 CPU tensor");
  at::Tensor xc = x.contiguous();
  at::Tensor y = at::empty_like(xc);
  kernel_tables().exp_f32(xc.const_data_ptr<float>(), y.data_ptr<float>(), xc.numel());
  return y;
}

} // namespace

TORCH_LIBRARY_IMPL(xent, CPU, m) { m.impl("_cpu_exp", &cpu_exp); }

// An op without tensor arguments has nothing to dispatch on: registered for every key.
TORCH_LIBRARY_IMPL(xent, CompositeExplicitAutograd, m) { m.impl("_cpu_isa", &cpu_isa); }

} // namespace xent::cpu
