#include "cpu/grad_buffer.h"

#include <torch/library.h>

#include <ATen/ops/empty_strided.h>
#include <ATen/ops/from_blob.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <cstdlib>
#include <deque>
#include <mutex>
#include <string>

#include <sys/mman.h>

namespace xent::cpu {
namespace {

constexpr int64_t kHugePage = int64_t(2) << 20;
constexpr int64_t kDefaultCapacity = int64_t(2) << 30;

struct Block {
  void* ptr;
  int64_t bytes;  // a multiple of kHugePage
};

class GradBufferCache {
 public:
  static GradBufferCache& instance() {
    // Leaked on purpose: tensors freed during interpreter shutdown still return their blocks here.
    static auto* cache = new GradBufferCache();
    return *cache;
  }

  void* take(int64_t bytes) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      for (auto it = free_.begin(); it != free_.end(); ++it) {
        if (it->bytes == bytes) {
          void* ptr = it->ptr;
          held_ -= bytes;
          free_.erase(it);
          return ptr;
        }
      }
    }
    // Map 2 MiB more than needed and trim both ends, so the block starts on a huge-page boundary; the
    // advice then lets the kernel back it with huge pages under THP's "madvise" mode. Failure of the
    // advice only costs speed.
    const int64_t padded = bytes + kHugePage;
    void* raw = mmap(nullptr, padded, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    TORCH_CHECK(raw != MAP_FAILED, "xent: out of memory allocating a ", bytes, "-byte gradient buffer");
    const uintptr_t start = reinterpret_cast<uintptr_t>(raw);
    const uintptr_t aligned = (start + kHugePage - 1) / kHugePage * kHugePage;
    if (aligned > start) munmap(raw, aligned - start);
    const uintptr_t end = start + padded;
    if (end > aligned + bytes) munmap(reinterpret_cast<void*>(aligned + bytes), end - (aligned + bytes));
    void* ptr = reinterpret_cast<void*>(aligned);
    madvise(ptr, bytes, MADV_HUGEPAGE);
    return ptr;
  }

  void give_back(void* ptr, int64_t bytes) {
    std::unique_lock<std::mutex> lock(mutex_);
    if (bytes > capacity_) {
      lock.unlock();
      munmap(ptr, bytes);
      return;
    }
    std::vector<Block> evicted;
    while (held_ + bytes > capacity_ && !free_.empty()) {
      evicted.push_back(free_.front());
      held_ -= free_.front().bytes;
      free_.pop_front();
    }
    free_.push_back({ptr, bytes});
    held_ += bytes;
    lock.unlock();
    for (const Block& b : evicted) munmap(b.ptr, b.bytes);
  }

  std::vector<int64_t> control(int64_t capacity) {
    std::vector<Block> evicted;
    std::unique_lock<std::mutex> lock(mutex_);
    if (capacity >= 0) {
      capacity_ = capacity;
      while (held_ > capacity_ && !free_.empty()) {
        evicted.push_back(free_.front());
        held_ -= free_.front().bytes;
        free_.pop_front();
      }
    }
    std::vector<int64_t> state{capacity_, held_};
    lock.unlock();
    for (const Block& b : evicted) munmap(b.ptr, b.bytes);
    return state;
  }

 private:
  GradBufferCache() {
    capacity_ = kDefaultCapacity;
    if (const char* env = std::getenv("XENT_CPU_GRAD_CACHE_BYTES")) {
      try {
        capacity_ = std::stoll(env);
      } catch (...) {
        TORCH_WARN("xent: ignoring XENT_CPU_GRAD_CACHE_BYTES=", env, " (not an integer)");
      }
    }
  }

  std::mutex mutex_;
  std::deque<Block> free_;  // oldest first
  int64_t held_ = 0;
  int64_t capacity_ = 0;
};

} // namespace

at::Tensor empty_grad_buffer(c10::IntArrayRef sizes, c10::IntArrayRef strides, at::ScalarType dtype) {
  int64_t extent = 1;  // elements spanned by the strided tensor
  bool empty = false;
  for (size_t d = 0; d < sizes.size(); ++d) {
    if (sizes[d] == 0) empty = true;
    extent += (sizes[d] - 1) * strides[d];
  }
  const int64_t bytes = extent * static_cast<int64_t>(c10::elementSize(dtype));
  if (empty || bytes < kMinCachedBytes) {
    return at::empty_strided(sizes, strides, at::TensorOptions().dtype(dtype));
  }
  const int64_t mapped = (bytes + kHugePage - 1) / kHugePage * kHugePage;
  void* ptr = GradBufferCache::instance().take(mapped);
  return at::from_blob(
      ptr, sizes, strides, [mapped](void* p) { GradBufferCache::instance().give_back(p, mapped); },
      at::TensorOptions().dtype(dtype).device(at::kCPU));
}

namespace {

// _cpu_grad_cache(int capacity=-1) -> int[]: sets the cache's capacity in bytes when capacity >= 0 (0 frees
// what it holds) and returns [capacity, bytes held now].
std::vector<int64_t> cpu_grad_cache(int64_t capacity) { return GradBufferCache::instance().control(capacity); }

} // namespace

// An op without tensor arguments has nothing to dispatch on: registered for every key.
TORCH_LIBRARY_IMPL(xent, CompositeExplicitAutograd, m) { m.impl("_cpu_grad_cache", &cpu_grad_cache); }

} // namespace xent::cpu
