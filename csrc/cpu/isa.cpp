#include "cpu/isa.h"

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

} // namespace xent::cpu
