// A SIMT emulator that runs our CUDA device code (csrc/cuda/*.cuh, through compat.cuh) on the CPU, for the
// tests only. Compiled by g++ with -std=c++20 -ffp-contract=fast (so FMAs contract as under nvcc).
//
// Model: each block runs on one OS worker thread (blocks are handed out in index order to a small pool);
// each CUDA thread of the block is a fiber on that worker. A fiber runs until it reaches a sync point
// (__syncthreads, a warp collective); once every fiber of the block is waiting, the waits that can complete
// are released and the next pass starts, in an order given by the schedule (forward, reverse, or a fresh
// random order of warps and of the lanes inside each warp at every pass). Because a block's fibers share one
// OS thread, `__shared__` becomes `static thread_local`: one copy per block in flight.
//
// Checked, and reported by the launch as std::runtime_error: invalid launch configurations; deadlocks
// (__syncthreads that some threads never reach, including threads that exited); warp collectives whose mask
// names lanes that exited, lanes that do not exist, or lanes waiting at a different collective; device
// asserts (XENT_DEVICE_ASSERT). A failing block is abandoned; blocks already running finish, no new block
// starts, and the error of the lowest-numbered failing block is reported, so the block -> worker assignment
// never changes what a launch reports.
//
// Not emulated: lockstep warps (code must use the _sync intrinsics), inter-block waiting or grid sync,
// inline PTX, cp.async/TMA/mma, denormal flushing, __CUDA_ARCH__ branches (it stays undefined), occupancy and
// register or shared-memory limits beyond the launch checks, the 48 KiB dynamic shared memory opt-in.
#pragma once

#if defined(__CUDACC__)
#error "simt_emulator.h is for host compilers; nvcc builds use the CUDA runtime (see csrc/cuda/compat.cuh)"
#endif

// CUDA's headers compile under g++: they give dim3/uint3, __half/__nv_bfloat16 with the device's rounding,
// and (crt/host_defines.h) empty __global__/__device__/__host__ plus GNU __forceinline__/__align__/__noinline__.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <vector_types.h>

#include <math.h>  // libstdc++'s math.h also puts the float overloads (isnan, fabs, ...) in the global namespace
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <bit>
#include <cmath>
#include <concepts>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <mutex>
#include <stdexcept>
#include <string>
#include <system_error>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

#if !defined(__x86_64__) && !defined(XENT_SIMT_UCONTEXT)
#define XENT_SIMT_UCONTEXT 1
#endif
#if defined(XENT_SIMT_UCONTEXT)
#include <ucontext.h>
#endif
#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#endif

// ---------------------------------------------------------------------------------------------------------
// CUDA's qualifiers and built-in variables.

#undef __shared__
#define __shared__ static thread_local
#ifndef __launch_bounds__
#define __launch_bounds__(...)
#endif
#define threadIdx (::xent_simt::detail::thread_idx())
#define blockIdx (::xent_simt::detail::block_idx())
#define blockDim (::xent_simt::detail::block_dim())
#define gridDim (::xent_simt::detail::grid_dim())
inline constexpr int warpSize = 32;  // a variable, not a macro: cudaDeviceProp has a member of that name

namespace xent_simt {

enum class Schedule { Forward, Reverse, Random };

// Bytes moved through xent::cuda::load_global / store_global (and __ldg).
struct Traffic {
  int64_t bytes_read = 0;
  int64_t bytes_written = 0;
};

// The emulator's stream type (compat.cuh's xent_stream_t). Launches are synchronous; streams are ignored.
using Stream = struct StreamOpaque*;

namespace detail {

constexpr unsigned kWarpSize = 32;
constexpr unsigned kMaxThreadsPerBlock = 1024;
constexpr size_t kMaxDynamicSmem = 227 * 1024;  // the largest opt-in on sm_80/sm_90
// Fiber stacks are mapped lazily, so only touched pages cost memory; sanitizers need the headroom.
constexpr size_t kStackBytes = 256 * 1024;

struct Settings {
  std::mutex mu;
  Schedule schedule = Schedule::Forward;
  uint64_t seed = 0;
  int num_workers = 0;  // <= 0: one per hardware thread
  Traffic traffic;
};
inline Settings& settings() {
  static Settings s;
  return s;
}

} // namespace detail

inline void set_schedule(Schedule schedule, uint64_t seed = 0) {
  auto& s = detail::settings();
  std::lock_guard lock(s.mu);
  s.schedule = schedule;
  s.seed = seed;
}

// Worker threads per launch (never more than the launch has blocks); n <= 0 restores one per hardware thread.
inline void set_num_workers(int n) {
  auto& s = detail::settings();
  std::lock_guard lock(s.mu);
  s.num_workers = n;
}

// Global-memory traffic of the launches since the previous call.
inline Traffic take_traffic() {
  auto& s = detail::settings();
  std::lock_guard lock(s.mu);
  return std::exchange(s.traffic, Traffic{});
}

namespace detail {

// ---------------------------------------------------------------------------------------------------------
// Execution contexts. glibc's swapcontext makes a sigprocmask syscall per switch (6-8x slower), so x86-64
// switches with a few instructions: callee-saved registers and the SSE/x87 control words go on the stack.

#if !defined(XENT_SIMT_UCONTEXT)
struct Context {
  void* sp = nullptr;
};

[[gnu::naked, gnu::noinline]] inline void switch_context(Context* /*from: rdi*/, const Context* /*to: rsi*/) {
  asm("pushq %rbp\n\t"
      "pushq %rbx\n\t"
      "pushq %r12\n\t"
      "pushq %r13\n\t"
      "pushq %r14\n\t"
      "pushq %r15\n\t"
      "subq $8, %rsp\n\t"
      "stmxcsr (%rsp)\n\t"
      "fnstcw 4(%rsp)\n\t"
      "movq %rsp, (%rdi)\n\t"
      "movq (%rsi), %rsp\n\t"
      "ldmxcsr (%rsp)\n\t"
      "fldcw 4(%rsp)\n\t"
      "addq $8, %rsp\n\t"
      "popq %r15\n\t"
      "popq %r14\n\t"
      "popq %r13\n\t"
      "popq %r12\n\t"
      "popq %rbx\n\t"
      "popq %rbp\n\t"
      "ret\n\t");
}

// A new context's first switch "returns" here, with the entry function in r12 and its argument in rbx.
[[gnu::naked, gnu::noinline]] inline void context_trampoline() {
  asm("movq %rbx, %rdi\n\t"
      "callq *%r12\n\t"
      "ud2\n\t");
}

inline void make_context(Context& c, unsigned char* stack, size_t size, void (*entry)(void*), void* arg) {
  const auto top = reinterpret_cast<uintptr_t>(stack + size) & ~uintptr_t{15};
  // The return-address slot sits 8 bytes below a 16-byte boundary, so the trampoline's call meets the ABI.
  auto* frame = reinterpret_cast<uint64_t*>(top - 24);
  frame[0] = reinterpret_cast<uint64_t>(&context_trampoline);
  frame[-1] = 0;  // rbp = 0 ends frame-pointer backtraces (ASan's) at the fiber's entry
  frame[-2] = reinterpret_cast<uint64_t>(arg);    // rbx
  frame[-3] = reinterpret_cast<uint64_t>(entry);  // r12
  frame[-4] = frame[-5] = frame[-6] = 0;          // r13, r14, r15
  // The fiber inherits the creating thread's rounding and exception masks.
  auto* control = reinterpret_cast<unsigned char*>(frame - 7);
  asm volatile("stmxcsr %0\n\tfnstcw %1" : "=m"(*reinterpret_cast<uint32_t*>(control)),
               "=m"(*reinterpret_cast<uint16_t*>(control + 4)));
  c.sp = frame - 7;
}
#else
struct Context {
  ucontext_t uc;
};

inline void switch_context(Context* from, const Context* to) {
  swapcontext(&from->uc, &to->uc);
}

// makecontext passes int arguments only, so pointers travel as 32-bit halves.
inline void ucontext_entry(unsigned entry_hi, unsigned entry_lo, unsigned arg_hi, unsigned arg_lo) {
  const auto join = [](unsigned hi, unsigned lo) { return (uint64_t{hi} << 32) | lo; };
  reinterpret_cast<void (*)(void*)>(join(entry_hi, entry_lo))(reinterpret_cast<void*>(join(arg_hi, arg_lo)));
}

inline void make_context(Context& c, unsigned char* stack, size_t size, void (*entry)(void*), void* arg) {
  getcontext(&c.uc);
  c.uc.uc_stack.ss_sp = stack;
  c.uc.uc_stack.ss_size = size;
  c.uc.uc_link = nullptr;
  const auto e = reinterpret_cast<uint64_t>(entry), a = reinterpret_cast<uint64_t>(arg);
  makecontext(&c.uc, reinterpret_cast<void (*)()>(&ucontext_entry), 4, unsigned(e >> 32), unsigned(e),
              unsigned(a >> 32), unsigned(a));
}
#endif

// AddressSanitizer must be told about every stack switch, or it reports false stack overflows.
#if defined(__SANITIZE_ADDRESS__)
inline void asan_start_switch(void** fake_stack_save, const void* bottom, size_t size) {
  __sanitizer_start_switch_fiber(fake_stack_save, bottom, size);
}
inline void asan_finish_switch(void* fake_stack, const void** old_bottom, size_t* old_size) {
  __sanitizer_finish_switch_fiber(fake_stack, old_bottom, old_size);
}
inline void asan_unpoison(void* p, size_t n) {
  __asan_unpoison_memory_region(p, n);
}
#else
inline void asan_start_switch(void**, const void*, size_t) {}
inline void asan_finish_switch(void*, const void**, size_t*) {}
inline void asan_unpoison(void*, size_t) {}
#endif

// Fiber stacks with a guard page below, mapped once and kept for the life of the process.
struct Stack {
  unsigned char* base = nullptr;  // usable bytes: [base, base + kStackBytes)
  bool abandoned = false;         // a fiber left it mid-call: ASan's stack poisoning there is stale
};

class StackPool {
 public:
  std::vector<Stack> take(size_t n) {
    std::vector<Stack> out;
    out.reserve(n);
    {
      std::lock_guard lock(mu_);
      while (out.size() < n && !free_.empty()) {
        out.push_back(free_.back());
        free_.pop_back();
      }
    }
    const size_t guard = size_t(sysconf(_SC_PAGESIZE));
    while (out.size() < n) {
      void* m = mmap(nullptr, guard + kStackBytes, PROT_READ | PROT_WRITE,
                     MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | MAP_STACK, -1, 0);
      if (m == MAP_FAILED || mprotect(m, guard, PROT_NONE) != 0) {
        give(out);
        throw std::runtime_error("xent_simt: cannot map a fiber stack");
      }
      out.push_back(Stack{static_cast<unsigned char*>(m) + guard});
    }
    return out;
  }

  void give(std::vector<Stack>& stacks) {
    std::lock_guard lock(mu_);
    free_.insert(free_.end(), stacks.begin(), stacks.end());
    stacks.clear();
  }

 private:
  std::mutex mu_;
  std::vector<Stack> free_;
};

inline StackPool& stack_pool() {
  static StackPool pool;
  return pool;
}

// ---------------------------------------------------------------------------------------------------------
// Launch, worker and fiber state.

enum class State : uint8_t { Ready, AtBarrier, AtCollective, Exited, Trapped };
enum class Op : uint8_t { SyncWarp, ShflIdx, ShflUp, ShflDown, ShflXor, Ballot, Any, All, ActiveMask };

struct Launch {
  dim3 grid, block;
  size_t smem = 0;
  unsigned threads = 0, warps = 0;
  int64_t blocks = 0;
  Schedule schedule = Schedule::Forward;
  uint64_t seed = 0;
  void (*invoke)(const void*) = nullptr;  // calls the kernel with the launch's arguments
  const void* kernel = nullptr;

  std::atomic<int64_t> next_block{0};
  std::atomic<bool> failed{false};
  std::mutex mu;
  int64_t error_block = INT64_MAX;
  std::string error;
  Traffic traffic;

  void record_error(int64_t block_index, std::string msg) {
    std::lock_guard lock(mu);
    if (block_index < error_block) {
      error_block = block_index;
      error = std::move(msg);
    }
    failed.store(true);
  }
};

struct Worker;

struct Fiber {
  Context ctx;
  Worker* worker = nullptr;
  unsigned char* stack = nullptr;
  uint3 tid{};
  unsigned lane = 0, warp = 0;
  State state = State::Exited;
  // The sync point this thread waits at: what it passed in and, once released, what it gets back.
  Op op = Op::SyncWarp;
  unsigned mask = 0, width = 0, operand = 0;
  uint64_t in = 0, out = 0;
  void* asan_fake_stack = nullptr;
};

struct Worker {
  explicit Worker(Launch& l) : launch(l), fibers(l.threads), stacks(stack_pool().take(l.threads)) {
    if (l.smem) smem = static_cast<unsigned char*>(::operator new(l.smem, std::align_val_t{128}));
  }
  ~Worker() {
    stack_pool().give(stacks);
    if (smem) ::operator delete(smem, std::align_val_t{128});
  }
  Worker(const Worker&) = delete;
  Worker& operator=(const Worker&) = delete;

  Launch& launch;
  std::vector<Fiber> fibers;
  std::vector<Stack> stacks;
  std::vector<uint16_t> order;  // the pass order over fibers
  unsigned char* smem = nullptr;
  uint3 block_idx{};
  uint64_t rng = 0;
  std::string error;  // the running block's first failure
  Context scheduler;
  // ASan's view of the scheduler's stack, learned at the first switch into a fiber.
  const void* sched_stack_bottom = nullptr;
  size_t sched_stack_size = 0;
  void* sched_fake_stack = nullptr;
};

inline thread_local Fiber* tl_fiber = nullptr;
// Per worker thread, added to the launch's totals when the worker finishes.
inline thread_local int64_t tl_bytes_read = 0;
inline thread_local int64_t tl_bytes_written = 0;

inline void count_read(size_t bytes) {
  tl_bytes_read += int64_t(bytes);
}
inline void count_write(size_t bytes) {
  tl_bytes_written += int64_t(bytes);
}

inline Fiber& self() {
  if (!tl_fiber) throw std::logic_error("xent_simt: device intrinsic used outside a kernel launch");
  return *tl_fiber;
}
inline const uint3& thread_idx() {
  return self().tid;
}
inline const uint3& block_idx() {
  return self().worker->block_idx;
}
inline const dim3& block_dim() {
  return self().worker->launch.block;
}
inline const dim3& grid_dim() {
  return self().worker->launch.grid;
}
inline unsigned char* dynamic_shared_memory() {
  return self().worker->smem;
}

inline unsigned lanes_in_warp(const Launch& l, unsigned warp) {
  return std::min(kWarpSize, l.threads - warp * kWarpSize);
}

// ---------------------------------------------------------------------------------------------------------
// Messages.

inline std::string strprintf(const char* fmt, auto... args) {
  char buf[512];
  std::snprintf(buf, sizeof buf, fmt, args...);
  return buf;
}

inline std::string describe_thread(const Fiber& f) {
  return strprintf("thread (%u,%u,%u) (warp %u lane %u)", f.tid.x, f.tid.y, f.tid.z, f.warp, f.lane);
}

inline std::string describe_wait(const Fiber& f) {
  static constexpr const char* kNames[] = {"__syncwarp",     "__shfl_sync",   "__shfl_up_sync",
                                           "__shfl_down_sync", "__shfl_xor_sync", "__ballot_sync",
                                           "__any_sync",     "__all_sync",     "__activemask"};
  switch (f.state) {
    case State::AtBarrier: return "__syncthreads()";
    case State::AtCollective:
      if (f.op >= Op::ShflIdx && f.op <= Op::ShflXor)
        return strprintf("%s(mask=0x%08x, width=%u)", kNames[int(f.op)], f.mask, f.width);
      return strprintf("%s(mask=0x%08x)", kNames[int(f.op)], f.mask);
    case State::Exited: return "(exited)";
    default: return "(running)";
  }
}

// ---------------------------------------------------------------------------------------------------------
// Switching between the scheduler and fibers.

inline void resume(Worker& w, Fiber& f) {
  tl_fiber = &f;
  asan_start_switch(&w.sched_fake_stack, f.stack, kStackBytes);
  switch_context(&w.scheduler, &f.ctx);
  asan_finish_switch(w.sched_fake_stack, nullptr, nullptr);
  tl_fiber = nullptr;
}

// `final`: the fiber never resumes (it exited or trapped), so ASan may drop its fake stack.
inline void to_scheduler(Fiber& f, bool final) {
  Worker& w = *f.worker;
  asan_start_switch(final ? nullptr : &f.asan_fake_stack, w.sched_stack_bottom, w.sched_stack_size);
  switch_context(&f.ctx, &w.scheduler);
  asan_finish_switch(f.asan_fake_stack, nullptr, nullptr);
}

// Records the block's first failure. Kept apart from trap() so that every temporary of the message is
// destroyed before the thread stops: trap() never returns, so its caller's temporaries would leak.
inline void set_error(Fiber& f, std::string msg) {
  if (f.worker->error.empty()) f.worker->error = std::move(msg);
}

// Stops the calling thread for good, like a trap on the GPU; the block fails with the recorded error.
[[noreturn]] inline void trap(Fiber& f) {
  f.state = State::Trapped;
  to_scheduler(f, true);
  __builtin_unreachable();
}

// Never returns (its last act is the switch back), so it is not instrumented by ASan: its redzones would stay
// poisoned on the stack for the next fiber that uses it.
[[gnu::no_sanitize_address]] inline void fiber_main(void* arg) {
  Fiber& f = *static_cast<Fiber*>(arg);
  Worker& w = *f.worker;
  asan_finish_switch(nullptr, &w.sched_stack_bottom, &w.sched_stack_size);
  bool threw = false;
  {
    std::string what;
    try {
      w.launch.invoke(w.launch.kernel);
    } catch (const std::exception& e) {
      what = e.what();
      threw = true;
    } catch (...) {
      what = "unknown exception";
      threw = true;
    }
    // Trapping inside the handler would leave the OS thread's exception state mid-catch.
    if (threw) set_error(f, describe_thread(f) + ": exception escaped device code: " + what);
  }
  if (threw) trap(f);
  f.state = State::Exited;
  to_scheduler(f, true);
  __builtin_unreachable();
}

// ---------------------------------------------------------------------------------------------------------
// Sync points. A fiber records what it waits for and switches to the scheduler, which releases it.

inline uint64_t wait_at_collective(Op op, unsigned mask, unsigned width, unsigned operand, uint64_t in) {
  Fiber& f = self();
  f.op = op;
  f.mask = mask;
  f.width = width;
  f.operand = operand;
  f.in = in;
  f.state = State::AtCollective;
  const unsigned lanes = lanes_in_warp(f.worker->launch, f.warp);
  const unsigned existing = lanes == kWarpSize ? ~0u : (1u << lanes) - 1;
  const char* problem = !(mask >> f.lane & 1) ? " with a mask that leaves out its own lane"
                        : (mask & ~existing)   ? " naming lanes that do not exist"
                        : (width == 0 || width > kWarpSize || (width & (width - 1)) != 0)
                            ? ": width must be a power of two in [1, 32]"
                            : nullptr;
  if (problem) {
    set_error(f, describe_thread(f) + " calls " + describe_wait(f) + problem +
                     strprintf(" (this warp has %u lanes)", lanes));
    trap(f);
  }
  to_scheduler(f, false);
  return f.out;
}

inline unsigned wait_at_barrier(bool pred) {
  Fiber& f = self();
  f.in = pred;
  f.state = State::AtBarrier;
  to_scheduler(f, false);
  return unsigned(f.out);
}

// The source lane of a shuffle, following PTX's shfl.sync: CUDA passes c = ((32 - width) << 8) | clamp, where
// the segment mask c[12:8] keeps a lane inside its width-sized segment and a source outside the segment (or
// below it, for up) falls back to the lane's own value.
inline unsigned shuffle_source(Op op, unsigned lane, unsigned operand, unsigned width) {
  const unsigned seg = (kWarpSize - width) & 31;
  const unsigned clamp = op == Op::ShflUp ? 0 : 31;
  const int max_lane = int((lane & seg) | (clamp & ~seg));
  const int min_lane = int(lane & seg);
  const int b = int(operand & 31);
  int j = 0;
  bool in_range = false;
  switch (op) {
    case Op::ShflUp: j = int(lane) - b; in_range = j >= max_lane; break;
    case Op::ShflDown: j = int(lane) + b; in_range = j <= max_lane; break;
    case Op::ShflXor: j = int(lane) ^ b; in_range = j <= max_lane; break;
    default: j = min_lane | (b & ~int(seg)); in_range = j <= max_lane; break;
  }
  return in_range ? unsigned(j) : lane;
}

// Completes a warp collective whose lanes (`mask`) have all arrived.
inline void complete_collective(Fiber* lanes, const Fiber& first) {
  const unsigned mask = first.mask;
  unsigned votes = 0;
  for (unsigned m = mask; m; m &= m - 1) {
    const unsigned l = unsigned(std::countr_zero(m));
    votes |= unsigned(lanes[l].in != 0) << l;
  }
  for (unsigned m = mask; m; m &= m - 1) {
    Fiber& f = lanes[std::countr_zero(m)];
    switch (f.op) {
      case Op::SyncWarp: break;
      case Op::Ballot: f.out = votes; break;
      case Op::Any: f.out = votes != 0; break;
      case Op::All: f.out = votes == mask; break;
      default: {
        // Reading a lane outside the mask is undefined on the GPU: hand back all-ones (NaN for floats).
        const unsigned src = shuffle_source(f.op, f.lane, f.operand, f.width);
        f.out = (mask >> src & 1) ? lanes[src].in : ~uint64_t{0};
      }
    }
    f.state = State::Ready;
  }
}

// Why the block cannot go on; called when no wait can be released.
inline std::string diagnose_stuck(Worker& w) {
  const Fiber* at_barrier = nullptr;
  const Fiber* exited = nullptr;
  unsigned waiting = 0, gone = 0;
  for (Fiber& f : w.fibers) {
    if (f.state == State::AtCollective) {
      Fiber* lanes = &w.fibers[f.warp * kWarpSize];
      for (unsigned m = f.mask; m; m &= m - 1) {
        const Fiber& g = lanes[std::countr_zero(m)];
        if (g.state != State::AtCollective || g.op != f.op || g.mask != f.mask || g.width != f.width)
          return "divergent warp collective: " + describe_thread(f) + " waits at " + describe_wait(f) +
                 strprintf(" but lane %u named in its mask waits at ", g.lane) + describe_wait(g);
      }
    }
    if (f.state == State::AtBarrier) {
      ++waiting;
      if (!at_barrier) at_barrier = &f;
    }
    if (f.state == State::Exited) {
      ++gone;
      if (!exited) exited = &f;
    }
  }
  if (at_barrier && exited)
    return strprintf("deadlock: %u thread(s) wait at __syncthreads() but %u thread(s) exited without reaching it "
                  "(__syncthreads() in divergent code?), e.g. ", waiting, gone) +
           describe_thread(*at_barrier) + " waits and " + describe_thread(*exited) + " exited";
  return "deadlock: no thread can make progress";
}

// Releases every wait that can complete. Returns false when the block is done or stuck (then w.error says why).
inline bool release_waits(Worker& w) {
  const Launch& l = w.launch;
  bool progress = false;
  for (unsigned warp = 0; warp < l.warps; ++warp) {
    Fiber* lanes = &w.fibers[warp * kWarpSize];
    const unsigned n = lanes_in_warp(l, warp);
    unsigned exited = 0, active = 0;
    for (unsigned i = 0; i < n; ++i) {
      exited |= unsigned(lanes[i].state == State::Exited) << i;
      active |= unsigned(lanes[i].state == State::AtCollective && lanes[i].op == Op::ActiveMask) << i;
    }
    // The lanes that reached __activemask() before any other sync point: the emulator's converged set.
    for (unsigned m = active; m; m &= m - 1) {
      lanes[std::countr_zero(m)].out = active;
      lanes[std::countr_zero(m)].state = State::Ready;
      progress = true;
    }
    unsigned done = active;
    for (unsigned i = 0; i < n; ++i) {
      const Fiber& f = lanes[i];
      if (f.state != State::AtCollective || (done >> i & 1)) continue;
      if (f.mask & exited) {
        w.error = describe_thread(f) + " waits at " + describe_wait(f) +
                  strprintf(" but lanes 0x%08x named in its mask have exited", f.mask & exited);
        return false;
      }
      bool arrived = true;
      for (unsigned m = f.mask; m && arrived; m &= m - 1) {
        const Fiber& g = lanes[std::countr_zero(m)];
        arrived = g.state == State::AtCollective && g.op == f.op && g.mask == f.mask && g.width == f.width;
      }
      if (!arrived) continue;
      done |= f.mask;
      complete_collective(lanes, f);
      progress = true;
    }
  }
  if (progress) return true;

  unsigned live = 0, at_barrier = 0, votes = 0;
  for (const Fiber& f : w.fibers) {
    live += f.state != State::Exited;
    at_barrier += f.state == State::AtBarrier;
    votes += f.state == State::AtBarrier && f.in;
  }
  if (live == 0) return false;
  // Exited threads never satisfy a barrier: CUDA leaves __syncthreads in divergent code undefined.
  if (at_barrier == l.threads) {
    for (Fiber& f : w.fibers) {
      f.out = votes;
      f.state = State::Ready;
    }
    return true;
  }
  w.error = diagnose_stuck(w);
  return false;
}

inline uint64_t next_random(uint64_t& state) {  // splitmix64
  uint64_t z = (state += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

inline void shuffle_slice(uint16_t* first, unsigned n, uint64_t& rng) {
  for (unsigned i = n; i > 1; --i) std::swap(first[i - 1], first[next_random(rng) % i]);
}

inline void order_threads(Worker& w) {
  const Launch& l = w.launch;
  w.order.resize(l.threads);
  switch (l.schedule) {
    case Schedule::Forward:
      for (unsigned i = 0; i < l.threads; ++i) w.order[i] = uint16_t(i);
      break;
    case Schedule::Reverse:
      for (unsigned i = 0; i < l.threads; ++i) w.order[i] = uint16_t(l.threads - 1 - i);
      break;
    case Schedule::Random: {
      uint16_t warps[kMaxThreadsPerBlock / kWarpSize];
      for (unsigned i = 0; i < l.warps; ++i) warps[i] = uint16_t(i);
      shuffle_slice(warps, l.warps, w.rng);
      unsigned pos = 0;
      for (unsigned i = 0; i < l.warps; ++i) {
        const unsigned n = lanes_in_warp(l, warps[i]);
        for (unsigned lane = 0; lane < n; ++lane) w.order[pos + lane] = uint16_t(warps[i] * kWarpSize + lane);
        shuffle_slice(&w.order[pos], n, w.rng);
        pos += n;
      }
    }
  }
}

inline void run_block(Worker& w, int64_t b) {
  const Launch& l = w.launch;
  w.block_idx = uint3{unsigned(b % l.grid.x), unsigned(b / l.grid.x % l.grid.y),
                      unsigned(b / (int64_t(l.grid.x) * l.grid.y))};
  w.error.clear();
  // Shared memory starts with stale data on the GPU; all-ones bytes make a read-before-write show as NaN.
  if (w.smem) std::memset(w.smem, 0xff, l.smem);
  for (unsigned i = 0; i < l.threads; ++i) {
    Fiber& f = w.fibers[i];
    Stack& s = w.stacks[i];
    if (s.abandoned) asan_unpoison(s.base, kStackBytes);
    s.abandoned = false;
    f.worker = &w;
    f.stack = s.base;
    f.tid = uint3{i % l.block.x, i / l.block.x % l.block.y, i / (l.block.x * l.block.y)};
    f.warp = i / kWarpSize;
    f.lane = i % kWarpSize;
    f.state = State::Ready;
    f.asan_fake_stack = nullptr;
    // Stacks lie a whole number of pages apart, so their hot tops would share the same few L1 sets: stagger
    // them within a page.
    make_context(f.ctx, s.base, kStackBytes - i % 16 * 256, &fiber_main, &f);
  }
  // Seeded by block index, so a block's random order does not depend on the worker that runs it.
  w.rng = l.seed ^ (uint64_t(b) * 0xd1b54a32d192ed03ull);
  order_threads(w);
  for (;;) {
    for (uint16_t i : w.order) {
      if (w.fibers[i].state != State::Ready) continue;
      resume(w, w.fibers[i]);
      if (!w.error.empty()) break;
    }
    if (!w.error.empty() || !release_waits(w)) break;
    if (l.schedule == Schedule::Random) order_threads(w);
  }
  for (unsigned i = 0; i < l.threads; ++i) w.stacks[i].abandoned = w.fibers[i].state != State::Exited;
  if (!w.error.empty())
    w.launch.record_error(b, strprintf("xent_simt: block (%u,%u,%u): ", w.block_idx.x, w.block_idx.y, w.block_idx.z) +
                                 w.error);
}

inline void run_worker(Launch& l) {
  tl_bytes_read = tl_bytes_written = 0;
  try {
    Worker w(l);
    for (;;) {
      if (l.failed.load()) break;
      const int64_t b = l.next_block.fetch_add(1);
      if (b >= l.blocks) break;
      run_block(w, b);
    }
  } catch (const std::exception& e) {
    l.record_error(-1, e.what());
  }
  std::lock_guard lock(l.mu);
  l.traffic.bytes_read += tl_bytes_read;
  l.traffic.bytes_written += tl_bytes_written;
}

inline void check_config(const dim3& grid, const dim3& block, size_t smem) {
  const auto fail = [&](const char* why) {
    throw std::runtime_error(strprintf("xent_simt: invalid configuration argument: grid (%u,%u,%u), block (%u,%u,%u), "
                                    "%zu bytes of dynamic shared memory: %s",
                                    grid.x, grid.y, grid.z, block.x, block.y, block.z, smem, why));
  };
  if (block.x == 0 || block.y == 0 || block.z == 0) fail("block dimensions must be positive");
  if (block.x > 1024 || block.y > 1024 || block.z > 64) fail("block dimensions exceed (1024, 1024, 64)");
  if (uint64_t(block.x) * block.y * block.z > kMaxThreadsPerBlock) fail("more than 1024 threads per block");
  if (grid.x == 0 || grid.y == 0 || grid.z == 0) fail("grid dimensions must be positive");
  if (grid.x > 0x7fffffffu || grid.y > 65535 || grid.z > 65535) fail("grid dimensions exceed (2^31-1, 65535, 65535)");
  if (smem > kMaxDynamicSmem) fail("dynamic shared memory exceeds 227 KiB");
}

inline void run_grid(const dim3& grid, const dim3& block, size_t smem, void (*invoke)(const void*),
                     const void* kernel) {
  if (tl_fiber) throw std::logic_error("xent_simt: kernel launches from device code are not supported");
  check_config(grid, block, smem);
  Launch l;
  l.grid = grid;
  l.block = block;
  l.smem = smem;
  l.threads = block.x * block.y * block.z;
  l.warps = (l.threads + kWarpSize - 1) / kWarpSize;
  l.blocks = int64_t(grid.x) * grid.y * grid.z;
  l.invoke = invoke;
  l.kernel = kernel;
  int workers = 0;
  {
    auto& s = settings();
    std::lock_guard lock(s.mu);
    l.schedule = s.schedule;
    l.seed = s.seed;
    workers = s.num_workers > 0 ? s.num_workers : int(std::max(1u, std::thread::hardware_concurrency()));
  }
  workers = int(std::min<int64_t>(workers, l.blocks));

  std::vector<std::thread> threads;
  try {
    for (int i = 1; i < workers; ++i) threads.emplace_back(run_worker, std::ref(l));
  } catch (const std::system_error&) {
    // Fewer workers only make the launch slower.
  }
  run_worker(l);  // the launching thread is a worker too
  for (auto& t : threads) t.join();

  {
    auto& s = settings();
    std::lock_guard lock(s.mu);
    s.traffic.bytes_read += l.traffic.bytes_read;
    s.traffic.bytes_written += l.traffic.bytes_written;
  }
  if (l.failed.load()) throw std::runtime_error(l.error);
}

// What XENT_LAUNCH(grid, block, smem, stream, kernel) evaluates to; calling it runs the grid to completion.
template <class Body>
struct Launcher {
  dim3 grid, block;
  size_t smem;
  Body body;

  template <class... Args>
  void operator()(Args&&... args) const {
    // Every emulated thread calls the kernel with these lvalues, so its by-value parameters are copied per
    // thread, as they are from CUDA's parameter space.
    const auto call = [&] { body(args...); };
    run_grid(grid, block, smem, [](const void* c) { (*static_cast<decltype(&call)>(c))(); }, &call);
  }
};

template <class Body>
Launcher<Body> make_launcher(dim3 grid, dim3 block, size_t smem, Stream, Body body) {
  return {grid, block, smem, std::move(body)};
}

[[noreturn]] inline void device_assert_fail(const char* cond, const char* msg, const char* file, int line) {
  Fiber& f = self();
  set_error(f, strprintf("device-side assert triggered at %s:%d by ", file, line) + describe_thread(f) + ": " + msg +
                   " (" + cond + ")");
  trap(f);
}

// Keeps a rounded intermediate from being fused into an FMA under -ffp-contract=fast (the _rn intrinsics).
template <class T>
inline T no_contract(T v) {
  asm("" : "+m"(v));
  return v;
}

template <class T>
concept ShuffleValue = std::is_trivially_copyable_v<T> && sizeof(T) <= 8;

template <ShuffleValue T>
inline T shuffle(Op op, unsigned mask, T var, unsigned operand, int width) {
  uint64_t bits = 0;
  std::memcpy(&bits, &var, sizeof(T));
  bits = wait_at_collective(op, mask, unsigned(width), operand, bits);
  T out;
  std::memcpy(&out, &bits, sizeof(T));
  return out;
}

template <class T, class... Allowed>
concept OneOf = (std::same_as<T, Allowed> || ...);

} // namespace detail
} // namespace xent_simt

// ---------------------------------------------------------------------------------------------------------
// CUDA intrinsics, in the global namespace like CUDA's.

inline void __syncthreads() {
  ::xent_simt::detail::wait_at_barrier(false);
}
inline int __syncthreads_count(int pred) {
  return int(::xent_simt::detail::wait_at_barrier(pred != 0));
}
inline int __syncthreads_and(int pred) {
  return ::xent_simt::detail::wait_at_barrier(pred != 0) == ::xent_simt::detail::self().worker->launch.threads;
}
inline int __syncthreads_or(int pred) {
  return ::xent_simt::detail::wait_at_barrier(pred != 0) != 0;
}

inline void __syncwarp(unsigned mask = 0xffffffffu) {
  ::xent_simt::detail::wait_at_collective(::xent_simt::detail::Op::SyncWarp, mask, 32, 0, 0);
}
inline unsigned __ballot_sync(unsigned mask, int pred) {
  return unsigned(::xent_simt::detail::wait_at_collective(::xent_simt::detail::Op::Ballot, mask, 32, 0, pred != 0));
}
inline int __any_sync(unsigned mask, int pred) {
  return int(::xent_simt::detail::wait_at_collective(::xent_simt::detail::Op::Any, mask, 32, 0, pred != 0));
}
inline int __all_sync(unsigned mask, int pred) {
  return int(::xent_simt::detail::wait_at_collective(::xent_simt::detail::Op::All, mask, 32, 0, pred != 0));
}
// A sync point: lanes run one at a time, so convergence is approximated by the lanes of the warp that reach
// __activemask() before waiting anywhere else (exited lanes and lanes waiting elsewhere are left out).
inline unsigned __activemask() {
  using namespace ::xent_simt::detail;
  return unsigned(wait_at_collective(Op::ActiveMask, 1u << self().lane, 32, 0, 0));
}

template <::xent_simt::detail::ShuffleValue T>
inline T __shfl_sync(unsigned mask, T var, int src_lane, int width = warpSize) {
  return ::xent_simt::detail::shuffle(::xent_simt::detail::Op::ShflIdx, mask, var, unsigned(src_lane), width);
}
template <::xent_simt::detail::ShuffleValue T>
inline T __shfl_up_sync(unsigned mask, T var, unsigned delta, int width = warpSize) {
  return ::xent_simt::detail::shuffle(::xent_simt::detail::Op::ShflUp, mask, var, delta, width);
}
template <::xent_simt::detail::ShuffleValue T>
inline T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = warpSize) {
  return ::xent_simt::detail::shuffle(::xent_simt::detail::Op::ShflDown, mask, var, delta, width);
}
template <::xent_simt::detail::ShuffleValue T>
inline T __shfl_xor_sync(unsigned mask, T var, int lane_mask, int width = warpSize) {
  return ::xent_simt::detail::shuffle(::xent_simt::detail::Op::ShflXor, mask, var, unsigned(lane_mask), width);
}

template <class T>
inline T __ldg(const T* p) {
  ::xent_simt::detail::count_read(sizeof(T));
  return *p;
}

inline void __threadfence() {
  std::atomic_thread_fence(std::memory_order_seq_cst);
}
inline void __threadfence_block() {
  std::atomic_thread_fence(std::memory_order_seq_cst);
}

// Atomics, with CUDA's overload sets. Blocks run concurrently on worker threads, so these are real atomics.
// The value parameter is non-deduced so that atomicAdd(&unsigned_counter, 1) converts as in CUDA.
template <::xent_simt::detail::OneOf<int, unsigned, unsigned long long, float, double> T>
inline T atomicAdd(T* address, std::type_identity_t<T> val) {
  return std::atomic_ref<T>(*address).fetch_add(val);
}
template <::xent_simt::detail::OneOf<int, unsigned> T>
inline T atomicSub(T* address, std::type_identity_t<T> val) {
  return std::atomic_ref<T>(*address).fetch_sub(val);
}
template <::xent_simt::detail::OneOf<int, unsigned, unsigned long long, float> T>
inline T atomicExch(T* address, std::type_identity_t<T> val) {
  return std::atomic_ref<T>(*address).exchange(val);
}
template <::xent_simt::detail::OneOf<int, unsigned, unsigned long long, unsigned short> T>
inline T atomicCAS(T* address, std::type_identity_t<T> compare, std::type_identity_t<T> val) {
  std::atomic_ref<T>(*address).compare_exchange_strong(compare, val);
  return compare;  // the old value either way
}
template <::xent_simt::detail::OneOf<int, unsigned, unsigned long long, long long> T>
inline T atomicMax(T* address, std::type_identity_t<T> val) {
  std::atomic_ref<T> ref(*address);
  T old = ref.load();
  while (old < val && !ref.compare_exchange_weak(old, val)) {
  }
  return old;
}
template <::xent_simt::detail::OneOf<int, unsigned, unsigned long long, long long> T>
inline T atomicMin(T* address, std::type_identity_t<T> val) {
  std::atomic_ref<T> ref(*address);
  T old = ref.load();
  while (val < old && !ref.compare_exchange_weak(old, val)) {
  }
  return old;
}
template <::xent_simt::detail::OneOf<int, unsigned, unsigned long long> T>
inline T atomicAnd(T* address, std::type_identity_t<T> val) {
  return std::atomic_ref<T>(*address).fetch_and(val);
}
template <::xent_simt::detail::OneOf<int, unsigned, unsigned long long> T>
inline T atomicOr(T* address, std::type_identity_t<T> val) {
  return std::atomic_ref<T>(*address).fetch_or(val);
}
template <::xent_simt::detail::OneOf<int, unsigned, unsigned long long> T>
inline T atomicXor(T* address, std::type_identity_t<T> val) {
  return std::atomic_ref<T>(*address).fetch_xor(val);
}

// Fast-math intrinsics in the GPU's formulation (ex2/lg2 of a scaled argument); not bit-identical to the
// hardware's approximations, so compare emulated and GPU results with tolerances.
inline float __expf(float x) {
  return exp2f(x * 1.44269504088896341f);
}
inline float __exp10f(float x) {
  return exp2f(x * 3.32192809488736235f);
}
inline float __logf(float x) {
  return log2f(x) * 0.693147180559945309f;
}
inline float __log2f(float x) {
  return log2f(x);
}
inline float __log10f(float x) {
  return log2f(x) * 0.301029995663981195f;
}
inline float __powf(float x, float y) {
  return exp2f(y * log2f(x));
}
inline float __sinf(float x) {
  return sinf(x);
}
inline float __cosf(float x) {
  return cosf(x);
}
inline float __tanf(float x) {
  return tanf(x);
}
inline float __fdividef(float x, float y) {
  return x / y;
}
inline float __frcp_rn(float x) {
  return 1.0f / x;
}
inline float __fsqrt_rn(float x) {
  return sqrtf(x);
}
inline float __saturatef(float x) {
  return fminf(fmaxf(x, 0.0f), 1.0f);  // NaN -> 0, as on the GPU
}
inline float __fmaf_rn(float x, float y, float z) {
  return fmaf(x, y, z);
}
inline float __fadd_rn(float x, float y) {
  return ::xent_simt::detail::no_contract(x + y);
}
inline float __fsub_rn(float x, float y) {
  return ::xent_simt::detail::no_contract(x - y);
}
inline float __fmul_rn(float x, float y) {
  return ::xent_simt::detail::no_contract(x * y);
}
inline double __dadd_rn(double x, double y) {
  return ::xent_simt::detail::no_contract(x + y);
}
inline double __dmul_rn(double x, double y) {
  return ::xent_simt::detail::no_contract(x * y);
}
// Templates so that a C library that declares rsqrtf/rsqrt (C23) wins overload resolution, not a clash.
template <int = 0>
inline float rsqrtf(float x) {
  return 1.0f / sqrtf(x);
}
template <int = 0>
inline double rsqrt(double x) {
  return 1.0 / sqrt(x);
}

inline int __float_as_int(float x) {
  return std::bit_cast<int>(x);
}
inline unsigned __float_as_uint(float x) {
  return std::bit_cast<unsigned>(x);
}
inline float __int_as_float(int x) {
  return std::bit_cast<float>(x);
}
inline float __uint_as_float(unsigned x) {
  return std::bit_cast<float>(x);
}
inline long long __double_as_longlong(double x) {
  return std::bit_cast<long long>(x);
}
inline double __longlong_as_double(long long x) {
  return std::bit_cast<double>(x);
}
inline int __popc(unsigned x) {
  return std::popcount(x);
}
inline int __popcll(unsigned long long x) {
  return std::popcount(x);
}
inline int __clz(int x) {
  return std::countl_zero(unsigned(x));
}
inline int __clzll(long long x) {
  return std::countl_zero((unsigned long long)x);
}
inline int __ffs(int x) {
  return x ? std::countr_zero(unsigned(x)) + 1 : 0;
}
inline int __ffsll(long long x) {
  return x ? std::countr_zero((unsigned long long)x) + 1 : 0;
}
inline unsigned __brev(unsigned x) {
  x = ((x >> 1) & 0x55555555u) | ((x & 0x55555555u) << 1);
  x = ((x >> 2) & 0x33333333u) | ((x & 0x33333333u) << 2);
  x = ((x >> 4) & 0x0f0f0f0fu) | ((x & 0x0f0f0f0fu) << 4);
  return __builtin_bswap32(x);
}

// CUDA's min/max: the usual arithmetic conversions, and fminf/fmaxf (NaN-dropping) for floating types.
template <class A, class B>
  requires(std::is_arithmetic_v<A> && std::is_arithmetic_v<B>)
inline std::common_type_t<A, B> min(A a, B b) {
  using C = std::common_type_t<A, B>;
  if constexpr (std::is_floating_point_v<C>) return std::fmin(C(a), C(b));
  else return C(b) < C(a) ? C(b) : C(a);
}
template <class A, class B>
  requires(std::is_arithmetic_v<A> && std::is_arithmetic_v<B>)
inline std::common_type_t<A, B> max(A a, B b) {
  using C = std::common_type_t<A, B>;
  if constexpr (std::is_floating_point_v<C>) return std::fmax(C(a), C(b));
  else return C(a) < C(b) ? C(b) : C(a);
}
