// Self-test of the SIMT emulator (simt_emulator.h through compat.cuh). Plain main: prints one line per test
// and "N passed, N failed" last; exits non-zero on any failure. Built and run by tests/test_simt_emulator.py.
#define XENT_SIMT_EMULATOR 1
#include "compat.cuh"

#include <chrono>
#include <cstdio>
#include <functional>
#include <numeric>
#include <random>
#include <string>
#include <vector>

using xent::cuda::load_global;
using xent::cuda::store_global;
using xent::cuda::Vec;
using xent_simt::Schedule;

namespace {

constexpr unsigned kFull = 0xffffffffu;

// ----------------------------------------------------------------------------------------------------------
// A minimal harness.

int g_checks_failed = 0;

#define CHECK(cond)                                                        \
  do {                                                                     \
    if (!(cond)) {                                                         \
      ++g_checks_failed;                                                   \
      std::printf("    CHECK failed at line %d: %s\n", __LINE__, #cond); \
    }                                                                      \
  } while (0)

// The message of the std::runtime_error that `launch` throws, or "" when it does not throw.
std::string launch_error(const std::function<void()>& launch) {
  try {
    launch();
  } catch (const std::runtime_error& e) {
    return e.what();
  }
  return "";
}

bool contains(const std::string& s, const char* part) {
  return s.find(part) != std::string::npos;
}

const Schedule kSchedules[] = {Schedule::Forward, Schedule::Reverse, Schedule::Random};

// ----------------------------------------------------------------------------------------------------------
// Kernels.

template <class Op>
__device__ float warp_reduce(float v, Op op) {
  for (int offset = 16; offset > 0; offset >>= 1) v = op(v, __shfl_xor_sync(kFull, v, offset));
  return v;
}

// Reduces all threads' values; `identity` fills the lanes past the last warp. blockDim.x must be a multiple
// of 32. Ends with a barrier so that it can be called again (shared memory is reused).
template <class Op>
__device__ float block_reduce(float v, Op op, float identity) {
  __shared__ float partial[32];
  const unsigned lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  v = warp_reduce(v, op);
  if (lane == 0) partial[warp] = v;
  __syncthreads();
  v = warp_reduce(lane < blockDim.x / 32 ? partial[lane] : identity, op);
  __syncthreads();
  return v;
}

const auto add_op = [](float a, float b) { return a + b; };
const auto max_op = [](float a, float b) { return fmaxf(a, b); };

// One block per row: out[row] = sum of x[row, :].
__global__ void row_sum_kernel(float* out, const float* x, int cols) {
  const float* row = x + int64_t(blockIdx.x) * cols;
  float v = 0.0f;
  for (int i = threadIdx.x; i < cols; i += blockDim.x) v += load_global(row + i);
  v = block_reduce(v, add_op, 0.0f);
  if (threadIdx.x == 0) store_global(out + blockIdx.x, v);
}

// One block per row: online max and sum of exp, like a cross-entropy forward; Vec<float, 4> loads over the
// 16-byte aligned body of the row, scalar head and tail.
__global__ void row_logsumexp_kernel(float* XENT_RESTRICT lse, const float* XENT_RESTRICT x, int cols) {
  const float* row = x + int64_t(blockIdx.x) * cols;
  float m = -INFINITY, s = 0.0f;
  const auto add = [&](float v) {
    const float m_new = fmaxf(m, v);
    s = s * __expf(m - m_new) + __expf(v - m_new);
    m = m_new;
  };
  const int head = min(cols, int((16 - reinterpret_cast<uintptr_t>(row) % 16) % 16 / sizeof(float)));
  const int vecs = (cols - head) / 4;
  const auto* body = reinterpret_cast<const Vec<float, 4>*>(row + head);
  for (int i = threadIdx.x; i < head; i += blockDim.x) add(load_global(row + i));
  for (int i = threadIdx.x; i < vecs; i += blockDim.x) {
    const auto v = load_global(body + i);
    for (float e : v.val) add(e);
  }
  for (int i = head + vecs * 4 + threadIdx.x; i < cols; i += blockDim.x) add(load_global(row + i));
  const float row_max = block_reduce(m, max_op, -INFINITY);
  const float total = block_reduce(s * __expf(m - row_max), add_op, 0.0f);
  if (threadIdx.x == 0) store_global(lse + blockIdx.x, row_max + __logf(total));
}

// Every thread of a 3-d grid of 3-d blocks writes its global linear index and a checksum of its coordinates.
__global__ void coordinates_kernel(unsigned* out) {
  const unsigned tid = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
  const unsigned bid = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
  const unsigned threads = blockDim.x * blockDim.y * blockDim.z;
  const unsigned code = threadIdx.x | threadIdx.y << 8 | threadIdx.z << 16 | blockIdx.x << 20 | blockIdx.y << 24 |
                        blockIdx.z << 28;
  store_global(out + 2 * (bid * threads + tid), bid * threads + tid);
  store_global(out + 2 * (bid * threads + tid) + 1, code);
}

// out[lane][0..3] = idx, up, down and xor shuffles of value(lane) = 100 + lane, for one width.
template <class T>
__global__ void shuffle_kernel(T* out, int width, int src, unsigned delta, int lane_mask) {
  const unsigned lane = threadIdx.x % 32;
  const T v = T(100 + lane) * T(1 << 20) + T(lane);  // uses the high bits of the 64-bit types
  T* o = out + 4 * threadIdx.x;
  o[0] = __shfl_sync(kFull, v, int(lane) * src, width);
  o[1] = __shfl_up_sync(kFull, v, delta, width);
  o[2] = __shfl_down_sync(kFull, v, delta, width);
  o[3] = __shfl_xor_sync(kFull, v, lane_mask, width);
}

// A block of 48 threads: its last warp has 16 lanes and reduces with the mask of those lanes.
__global__ void partial_warp_kernel(float* out, unsigned* masks) {
  const unsigned lanes = min(32u, blockDim.x - threadIdx.x / 32 * 32);
  const unsigned mask = lanes == 32 ? kFull : (1u << lanes) - 1;
  float v = float(threadIdx.x);
  for (unsigned offset = 8; offset > 0; offset >>= 1) v += __shfl_xor_sync(mask, v, int(offset), 16);
  out[3 * threadIdx.x] = v;
  // Down by 8 across the full width: lanes 8..15 of the short warp read lanes that do not exist.
  out[3 * threadIdx.x + 1] = __shfl_down_sync(mask, float(threadIdx.x), 8);
  out[3 * threadIdx.x + 2] = __shfl_sync(mask, float(threadIdx.x), 3);
  masks[threadIdx.x] = __activemask();
}

__global__ void full_mask_on_partial_warp_kernel(float* out) {
  out[threadIdx.x] = __shfl_xor_sync(kFull, float(threadIdx.x), 1);
}

// Votes with the full mask, then per half-warp with separate masks, concurrently.
__global__ void vote_kernel(unsigned* out) {
  const unsigned lane = threadIdx.x % 32;
  const int pred = (lane % 3 == 0) || threadIdx.x / 32 == 1;  // warp 1 votes all true
  unsigned* o = out + 8 * threadIdx.x;
  o[0] = __ballot_sync(kFull, pred);
  o[1] = unsigned(__any_sync(kFull, pred));
  o[2] = unsigned(__all_sync(kFull, pred));
  o[3] = unsigned(__any_sync(kFull, 0));
  const unsigned half = lane < 16 ? 0x0000ffffu : 0xffff0000u;
  o[4] = __ballot_sync(half, lane % 2);
  o[5] = unsigned(__all_sync(half, lane < 16));
  __syncwarp();
  o[6] = unsigned(__syncthreads_count(pred));
  const int any_lane5 = __syncthreads_or(lane == 5);
  const int all_true = __syncthreads_and(1);
  const int all_pred = __syncthreads_and(pred);
  o[7] = unsigned(any_lane5 | all_true << 1 | all_pred << 2);
}

// Reverses each block's slice through dynamic shared memory; `floats` of the dynamic area are used.
__global__ void reverse_kernel(float* out, const float* in, int floats) {
  XENT_DYNAMIC_SHARED(float, tile);
  const int base = int(blockIdx.x) * floats;
  for (int i = threadIdx.x; i < floats; i += blockDim.x) tile[i] = load_global(in + base + i);
  __syncthreads();
  for (int i = threadIdx.x; i < floats; i += blockDim.x) store_global(out + base + i, tile[floats - 1 - i]);
}

// Dynamic shared memory starts stale: all-ones bytes (NaN) in the emulator.
__global__ void stale_shared_kernel(unsigned* out) {
  XENT_DYNAMIC_SHARED(unsigned, area);
  out[threadIdx.x] = area[threadIdx.x];
}

struct AtomicCounters {
  int i_sum;
  unsigned u_sum;
  unsigned long long ull_sum;
  int i_max;
  unsigned u_max;
  unsigned long long ull_max;
  unsigned cas_sum;
  int exch_last;
  unsigned long long ull_exch;
};

__global__ void atomics_kernel(AtomicCounters* c) {
  const unsigned gid = blockIdx.x * blockDim.x + threadIdx.x;
  atomicAdd(&c->i_sum, 1);
  atomicAdd(&c->u_sum, gid);
  atomicAdd(&c->ull_sum, 1ull << 33);
  atomicMax(&c->i_max, int(gid) - 1000);
  atomicMax(&c->u_max, gid * 3 % 1001);
  atomicMax(&c->ull_max, (unsigned long long)gid << 40);
  unsigned old = c->cas_sum, seen;  // a CAS loop adding gid
  while ((seen = atomicCAS(&c->cas_sum, old, old + gid)) != old) old = seen;
  atomicExch(&c->exch_last, int(gid));
  atomicExch(&c->ull_exch, 1ull << 50);
}

// Shared-memory atomics within each block.
__global__ void shared_atomics_kernel(unsigned* out) {
  __shared__ unsigned histogram[4];
  if (threadIdx.x < 4) histogram[threadIdx.x] = 0;
  __syncthreads();
  atomicAdd(&histogram[threadIdx.x % 4], 1u);
  __syncthreads();
  if (threadIdx.x < 4) out[blockIdx.x * 4 + threadIdx.x] = histogram[threadIdx.x];
}

// Planted bug: out[i] = in[i] + in[n - 1 - i] with no barrier between the shared write and the read.
__global__ void missing_barrier_kernel(float* out, const float* in) {
  __shared__ float tile[256];
  tile[threadIdx.x] = in[threadIdx.x];
  // __syncthreads() missing
  out[threadIdx.x] = tile[threadIdx.x] + tile[blockDim.x - 1 - threadIdx.x];
}

// Planted bug: a write-after-read race across loop iterations (the trailing barrier is missing). Each
// iteration reads the difference of the slots one and two warps ahead; all slots grow by 1 per iteration,
// so the difference is right when both reads see the same iteration, as in any order that runs whole warps
// in index order or in reverse. Only an order that runs the reader between the two writers exposes it.
__global__ void war_race_kernel(float* out, int iterations) {
  __shared__ float slot[256];
  const unsigned warp = threadIdx.x / 32, warps = blockDim.x / 32;
  float acc = 0.0f;
  for (int it = 0; it < iterations; ++it) {
    slot[threadIdx.x] = float(threadIdx.x % 7) * 10.0f + float(it);
    __syncthreads();
    if (warp + 2 < warps) acc += slot[threadIdx.x + 32] - slot[threadIdx.x + 64];
    // __syncthreads() missing: the next iteration's write may land before a slower thread's read
  }
  out[threadIdx.x] = acc;
}

// Planted bug: __syncthreads() in a branch that only some threads take.
__global__ void divergent_barrier_kernel(float* out) {
  if (threadIdx.x < 64) {
    __syncthreads();
    out[threadIdx.x] = 1.0f;
  }
}

// Planted bug: half the warp returns, then the warp shuffles with the full mask.
__global__ void shuffle_after_exit_kernel(float* out) {
  const unsigned lane = threadIdx.x % 32;
  if (lane >= 16) return;
  out[threadIdx.x] = __shfl_xor_sync(kFull, float(lane), 1);
}

// Planted bug: lanes of one mask at different collectives.
__global__ void divergent_collective_kernel(unsigned* out) {
  const unsigned lane = threadIdx.x % 32;
  if (lane < 16) out[lane] = __shfl_sync(kFull, lane, 0);
  else out[lane] = __ballot_sync(kFull, 1);
}

// Planted bug: an out-of-range index caught by a device assert in block 2 before it is used.
__global__ void assert_kernel(float* out, const int* index, int n) {
  const int i = load_global(index + blockIdx.x);
  XENT_DEVICE_ASSERT(i >= 0 && i < n, "index out of range");
  store_global(out + i, 1.0f);
}

__global__ void noop_kernel() {}

// Reads n floats (Vec<float, 4> body, scalar tail) and writes them scaled.
__global__ void scale_kernel(float* out, const float* in, int n) {
  const int vecs = n / 4;
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < vecs; i += gridDim.x * blockDim.x) {
    auto v = load_global(reinterpret_cast<const Vec<float, 4>*>(in) + i);
    for (float& e : v.val) e *= 2.0f;
    store_global(reinterpret_cast<Vec<float, 4>*>(out) + i, v);
  }
  for (int i = vecs * 4 + blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x)
    store_global(out + i, 2.0f * load_global(in + i));
}

// ----------------------------------------------------------------------------------------------------------
// Tests.

std::vector<float> random_floats(size_t n, uint32_t seed) {
  std::mt19937 gen(seed);
  std::uniform_real_distribution<float> dist(-4.0f, 4.0f);
  std::vector<float> v(n);
  for (auto& e : v) e = dist(gen);
  return v;
}

void test_block_reduction() {
  for (int threads : {32, 64, 256, 1024}) {
    const int rows = 5, cols = 3001;
    const auto x = random_floats(size_t(rows) * cols, 7);
    std::vector<float> out(rows);
    XENT_LAUNCH(rows, threads, 0, nullptr, row_sum_kernel)(out.data(), x.data(), cols);
    for (int r = 0; r < rows; ++r) {
      double ref = 0;
      for (int c = 0; c < cols; ++c) ref += x[size_t(r) * cols + c];
      CHECK(std::fabs(out[r] - ref) < 1e-3);
    }
  }
}

// A reference for the shuffles written from the CUDA programming guide's description (not PTX's).
template <class T>
void check_shuffles(int width, int src, unsigned delta, int lane_mask) {
  const int threads = 64;
  std::vector<T> out(4 * threads);
  XENT_LAUNCH(1, threads, 0, nullptr, shuffle_kernel<T>)(out.data(), width, src, delta, lane_mask);
  const auto value = [](int lane) { return T(100 + lane) * T(1 << 20) + T(lane); };
  for (int t = 0; t < threads; ++t) {
    const int lane = t % 32, base = lane / width * width, pos = lane % width;
    const int idx = base + ((lane * src) % width + width) % width;
    const int up = pos >= int(delta) ? lane - int(delta) : lane;
    const int down = pos + int(delta) < width ? lane + int(delta) : lane;
    const int x = lane ^ lane_mask;
    const int bfly = x < base + width ? x : lane;  // earlier segments may be read, later ones may not
    CHECK(out[4 * t + 0] == value(idx));
    CHECK(out[4 * t + 1] == value(up));
    CHECK(out[4 * t + 2] == value(down));
    CHECK(out[4 * t + 3] == value(bfly));
  }
}

void test_shuffle_semantics() {
  for (int width : {8, 16, 32}) {
    for (int src : {0, 1, 3, 7}) check_shuffles<float>(width, src, 1, 1);
    for (unsigned delta : {1u, 2u, 5u, 16u}) check_shuffles<int>(width, 1, delta, int(delta));
    check_shuffles<unsigned>(width, 5, 3, 9);
    check_shuffles<double>(width, 3, 4, 2);
    check_shuffles<long long>(width, 7, 7, 17);
    check_shuffles<unsigned long long>(width, 2, 6, 31);
  }
  check_shuffles<int>(32, -1, 1, 16);  // srcLane taken modulo width
}

void test_partial_warp() {
  const int threads = 48;
  std::vector<float> out(3 * threads);
  std::vector<unsigned> masks(threads);
  XENT_LAUNCH(1, threads, 0, nullptr, partial_warp_kernel)(out.data(), masks.data());
  for (int t = 0; t < threads; ++t) {
    const int seg = t / 16 * 16;  // width 16 segments
    CHECK(out[3 * t] == float(16 * seg + 120));
    const bool short_warp = t >= 32;
    const int lane = t % 32;
    if (!short_warp || lane + 8 < 16) CHECK(out[3 * t + 1] == float(lane + 8 < 32 ? t + 8 : t));
    else CHECK(std::isnan(out[3 * t + 1]));  // read a lane outside the mask: undefined, NaN here
    CHECK(out[3 * t + 2] == float(t / 32 * 32 + 3));
    CHECK(masks[t] == (short_warp ? 0xffffu : kFull));
  }
  const auto err =
      launch_error([&] { XENT_LAUNCH(1, threads, 0, nullptr, full_mask_on_partial_warp_kernel)(out.data()); });
  CHECK(contains(err, "do not exist"));
}

void test_votes() {
  const int threads = 64;
  std::vector<unsigned> out(8 * threads);
  XENT_LAUNCH(1, threads, 0, nullptr, vote_kernel)(out.data());
  unsigned warp0_ballot = 0;
  for (int l = 0; l < 32; ++l) warp0_ballot |= unsigned(l % 3 == 0) << l;
  const unsigned count = 11 + 32;  // lanes 0, 3, ..., 30 of warp 0, all of warp 1
  for (int t = 0; t < threads; ++t) {
    const unsigned* o = &out[8 * t];
    const bool warp1 = t >= 32;
    const int lane = t % 32;
    CHECK(o[0] == (warp1 ? kFull : warp0_ballot));
    CHECK(o[1] == 1);
    CHECK(o[2] == (warp1 ? 1u : 0u));
    CHECK(o[3] == 0);
    CHECK(o[4] == (lane < 16 ? 0x0000aaaau : 0xaaaa0000u));
    CHECK(o[5] == (lane < 16 ? 1u : 0u));
    CHECK(o[6] == count);
    CHECK(o[7] == (1u | 2u | 0u));
  }
}

void test_dynamic_shared_memory() {
  const int blocks = 6, floats = 1000;
  const auto in = random_floats(size_t(blocks) * floats, 3);
  std::vector<float> out(in.size());
  XENT_LAUNCH(blocks, 128, floats * sizeof(float), nullptr, reverse_kernel)(out.data(), in.data(), floats);
  bool ok = true;
  for (int b = 0; b < blocks; ++b)
    for (int i = 0; i < floats; ++i) ok &= out[size_t(b) * floats + i] == in[size_t(b) * floats + floats - 1 - i];
  CHECK(ok);
  std::vector<unsigned> stale(64);
  XENT_LAUNCH(1, 64, 64 * sizeof(unsigned), nullptr, stale_shared_kernel)(stale.data());
  CHECK(std::all_of(stale.begin(), stale.end(), [](unsigned v) { return v == 0xffffffffu; }));
  // The largest opt-in size is accepted.
  XENT_LAUNCH(2, 32, 227 * 1024, nullptr, stale_shared_kernel)(stale.data());
}

void test_atomics() {
  const int blocks = 40, threads = 96, n = blocks * threads;
  for (int workers : {1, 2, 4}) {
    xent_simt::set_num_workers(workers);
    AtomicCounters c{0, 0, 0, -5000, 0, 0, 0, -1, 0};
    XENT_LAUNCH(blocks, threads, 0, nullptr, atomics_kernel)(&c);
    CHECK(c.i_sum == n);
    CHECK(c.u_sum == unsigned(n) * (n - 1) / 2);
    CHECK(c.ull_sum == (unsigned long long)n << 33);
    CHECK(c.i_max == n - 1 - 1000);
    CHECK(c.u_max == 1000);
    CHECK(c.ull_max == (unsigned long long)(n - 1) << 40);
    CHECK(c.cas_sum == unsigned(n) * (n - 1) / 2);
    CHECK(c.exch_last >= 0 && c.exch_last < n);
    CHECK(c.ull_exch == 1ull << 50);
  }
  xent_simt::set_num_workers(0);
  std::vector<unsigned> hist(4 * 8);
  XENT_LAUNCH(8, 130, 0, nullptr, shared_atomics_kernel)(hist.data());
  for (int b = 0; b < 8; ++b)
    for (int k = 0; k < 4; ++k) CHECK(hist[4 * b + k] == (k < 2 ? 33u : 32u));
}

void test_grid_of_blocks() {
  const dim3 grid(7, 5, 3), block(8, 4, 2);
  const unsigned threads = 64, total = 7 * 5 * 3 * threads;
  std::vector<unsigned> reference;
  for (int workers : {1, 3}) {
    xent_simt::set_num_workers(workers);
    std::vector<unsigned> out(2 * total, 0);
    XENT_LAUNCH(grid, block, 0, nullptr, coordinates_kernel)(out.data());
    bool ok = true;
    for (unsigned bz = 0; bz < 3; ++bz)
      for (unsigned by = 0; by < 5; ++by)
        for (unsigned bx = 0; bx < 7; ++bx)
          for (unsigned tz = 0; tz < 2; ++tz)
            for (unsigned ty = 0; ty < 4; ++ty)
              for (unsigned tx = 0; tx < 8; ++tx) {
                const unsigned id = (bx + 7 * (by + 5 * bz)) * threads + tx + 8 * (ty + 4 * tz);
                ok &= out[2 * id] == id;
                ok &= out[2 * id + 1] == (tx | ty << 8 | tz << 16 | bx << 20 | by << 24 | bz << 28);
              }
    CHECK(ok);
  }
  xent_simt::set_num_workers(0);
  // Many more blocks than workers.
  const int rows = 300, cols = 37;
  const auto x = random_floats(size_t(rows) * cols, 11);
  std::vector<float> out(rows);
  XENT_LAUNCH(rows, 64, 0, nullptr, row_sum_kernel)(out.data(), x.data(), cols);
  bool ok = true;
  for (int r = 0; r < rows; ++r) {
    double ref = 0;
    for (int c = 0; c < cols; ++c) ref += x[size_t(r) * cols + c];
    ok &= std::fabs(out[r] - ref) < 1e-4;
  }
  CHECK(ok);
}

void test_schedules_agree() {
  const int rows = 6, cols = 5003;
  const auto x = random_floats(size_t(rows) * cols, 5);
  std::vector<float> reference;
  for (Schedule s : kSchedules) {
    for (uint64_t seed : {1u, 2u, 3u}) {
      for (int workers : {1, 2}) {
        xent_simt::set_schedule(s, seed);
        xent_simt::set_num_workers(workers);
        std::vector<float> out(rows);
        XENT_LAUNCH(rows, 256, 0, nullptr, row_logsumexp_kernel)(out.data(), x.data(), cols);
        if (reference.empty()) reference = out;
        CHECK(out == reference);  // bitwise: the order of sync-point passes must not change results
      }
    }
  }
  for (int r = 0; r < rows; ++r) {
    double m = -INFINITY, s = 0;
    for (int c = 0; c < cols; ++c) m = std::max(m, double(x[size_t(r) * cols + c]));
    for (int c = 0; c < cols; ++c) s += std::exp(double(x[size_t(r) * cols + c]) - m);
    CHECK(std::fabs(reference[r] - (m + std::log(s))) < 1e-4);
  }
  xent_simt::set_schedule(Schedule::Forward, 0);
  xent_simt::set_num_workers(0);
}

void test_missing_barrier_caught() {
  const int n = 256;
  int wrong_schedules = 0;
  for (Schedule s : kSchedules) {
    xent_simt::set_schedule(s, 42);
    // Fresh inputs per run: static __shared__ arrays keep the previous block's values on a worker thread.
    const auto in = random_floats(n, 9 + unsigned(s));
    std::vector<float> out(n);
    XENT_LAUNCH(1, n, 0, nullptr, missing_barrier_kernel)(out.data(), in.data());
    bool right = true;
    for (int i = 0; i < n; ++i) right &= out[i] == in[i] + in[n - 1 - i];
    wrong_schedules += !right;
  }
  CHECK(wrong_schedules >= 1);
  xent_simt::set_schedule(Schedule::Forward, 0);
}

void test_war_race_caught_by_random() {
  const int threads = 256, iterations = 4;
  std::vector<float> expected(threads);
  for (int t = 0; t < threads; ++t)
    expected[t] = t / 32 + 2 < threads / 32 ? iterations * 10.0f * float((t + 32) % 7 - (t + 64) % 7) : 0.0f;
  const auto run = [&](Schedule s, uint64_t seed) {
    xent_simt::set_schedule(s, seed);
    std::vector<float> out(threads);
    XENT_LAUNCH(1, threads, 0, nullptr, war_race_kernel)(out.data(), iterations);
    return out == expected;
  };
  CHECK(run(Schedule::Forward, 0));  // the race hides from both fixed orders...
  CHECK(run(Schedule::Reverse, 0));
  int caught = 0;
  for (uint64_t seed = 1; seed <= 8; ++seed) caught += !run(Schedule::Random, seed);
  CHECK(caught >= 1);  // ...and shows under random ones
  xent_simt::set_schedule(Schedule::Forward, 0);
}

void test_deadlock_caught() {
  std::vector<float> out(256);
  for (Schedule s : kSchedules) {
    xent_simt::set_schedule(s, 7);
    const auto err = launch_error([&] { XENT_LAUNCH(2, 256, 0, nullptr, divergent_barrier_kernel)(out.data()); });
    CHECK(contains(err, "deadlock") && contains(err, "__syncthreads()") && contains(err, "exited"));
    CHECK(contains(err, "block (0,0,0)"));  // the lowest failing block, whichever worker saw it first
  }
  xent_simt::set_schedule(Schedule::Forward, 0);
}

void test_collective_misuse_caught() {
  std::vector<float> out(64);
  auto err = launch_error([&] { XENT_LAUNCH(1, 64, 0, nullptr, shuffle_after_exit_kernel)(out.data()); });
  CHECK(contains(err, "__shfl_xor_sync") && contains(err, "have exited") && contains(err, "0xffff0000"));
  std::vector<unsigned> u(32);
  err = launch_error([&] { XENT_LAUNCH(1, 32, 0, nullptr, divergent_collective_kernel)(u.data()); });
  CHECK(contains(err, "divergent warp collective") && contains(err, "__ballot_sync"));
}

void test_device_assert_caught() {
  const int n = 16;
  std::vector<float> out(n, 0.0f);
  const std::vector<int> index = {0, 3, 99, 5, 7, 1};
  const auto err = launch_error(
      [&] { XENT_LAUNCH(int(index.size()), 32, 0, nullptr, assert_kernel)(out.data(), index.data(), n); });
  CHECK(contains(err, "device-side assert") && contains(err, "index out of range") && contains(err, "block (2,0,0)"));
  // The emulator recovers: the abandoned fibers' stacks are reused by the next launch.
  std::vector<float> ok_out(4);
  const std::vector<int> good = {0, 1, 2, 3};
  XENT_LAUNCH(4, 32, 0, nullptr, assert_kernel)(ok_out.data(), good.data(), 4);
  CHECK(ok_out == std::vector<float>(4, 1.0f));
}

void test_invalid_configurations() {
  const auto check = [](dim3 grid, dim3 block, size_t smem, const char* why) {
    const auto err = launch_error([&] { XENT_LAUNCH(grid, block, smem, nullptr, noop_kernel)(); });
    CHECK(contains(err, "invalid configuration") && contains(err, why));
  };
  check(1, 1025, 0, "exceed");
  check(1, dim3(64, 32, 1), 0, "1024 threads");
  check(1, dim3(1, 1, 65), 0, "exceed");
  check(1, 0, 0, "positive");
  check(0, 32, 0, "positive");
  check(dim3(1, 65536, 1), 32, 0, "exceed");
  check(1, 32, 227 * 1024 + 1, "227 KiB");
  XENT_LAUNCH(dim3(1, 2, 3), dim3(4, 4, 64), 0, nullptr, noop_kernel)();  // 1024 threads is fine
}

void test_traffic() {
  const int n = 10007;  // not a multiple of 4: a scalar tail
  const auto in = random_floats(n, 1);
  std::vector<float> out(n);
  (void)xent_simt::take_traffic();
  XENT_LAUNCH(13, 128, 0, nullptr, scale_kernel)(out.data(), in.data(), n);
  const auto t = xent_simt::take_traffic();
  CHECK(t.bytes_read == int64_t(n) * 4);
  CHECK(t.bytes_written == int64_t(n) * 4);
  bool ok = true;
  for (int i = 0; i < n; ++i) ok &= out[i] == 2.0f * in[i];
  CHECK(ok);
  const auto after = xent_simt::take_traffic();
  CHECK(after.bytes_read == 0 && after.bytes_written == 0);
  // Launches accumulate until taken.
  XENT_LAUNCH(13, 128, 0, nullptr, scale_kernel)(out.data(), in.data(), n);
  XENT_LAUNCH(5, 64, 0, nullptr, scale_kernel)(out.data(), in.data(), n);
  CHECK(xent_simt::take_traffic().bytes_read == 2 * int64_t(n) * 4);
}

// The size the kernels meet in practice: 8 rows of a GPT-2 vocabulary, one 256-thread block per row.
void test_speed() {
  const int rows = 8, cols = 50257;
  const auto x = random_floats(size_t(rows) * cols, 2);
  std::vector<float> lse(rows);
  XENT_LAUNCH(rows, 256, 0, nullptr, row_logsumexp_kernel)(lse.data(), x.data(), cols);  // warm the stack pool
  double best = 1e9;
  for (int rep = 0; rep < 5; ++rep) {
    const auto t0 = std::chrono::steady_clock::now();
    XENT_LAUNCH(rows, 256, 0, nullptr, row_logsumexp_kernel)(lse.data(), x.data(), cols);
    best = std::min(best, std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
  }
  std::printf("    8 x 50257 logsumexp, 8 blocks x 256 threads: %.2f ms\n", best);
  CHECK(best < 1000.0);  // a loose bound: sanitizer builds are several times slower
}

} // namespace

int main() {
  const std::pair<const char*, void (*)()> tests[] = {
      {"block_reduction", test_block_reduction},
      {"shuffle_semantics", test_shuffle_semantics},
      {"partial_warp", test_partial_warp},
      {"votes", test_votes},
      {"dynamic_shared_memory", test_dynamic_shared_memory},
      {"atomics", test_atomics},
      {"grid_of_blocks", test_grid_of_blocks},
      {"schedules_agree", test_schedules_agree},
      {"missing_barrier_caught", test_missing_barrier_caught},
      {"war_race_caught_by_random", test_war_race_caught_by_random},
      {"deadlock_caught", test_deadlock_caught},
      {"collective_misuse_caught", test_collective_misuse_caught},
      {"device_assert_caught", test_device_assert_caught},
      {"invalid_configurations", test_invalid_configurations},
      {"traffic", test_traffic},
      {"speed", test_speed},
  };
  int passed = 0, failed = 0;
  for (const auto& [name, run] : tests) {
    const int before = g_checks_failed;
    std::string error;
    const auto t0 = std::chrono::steady_clock::now();
    try {
      run();
    } catch (const std::exception& e) {
      error = e.what();
    }
    const double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
    const bool ok = error.empty() && g_checks_failed == before;
    (ok ? passed : failed)++;
    std::printf("%s %s (%.1f ms)%s%s\n", ok ? "PASS" : "FAIL", name, ms, error.empty() ? "" : ": ", error.c_str());
  }
  std::printf("%d passed, %d failed\n", passed, failed);
  return failed == 0 ? 0 : 1;
}
