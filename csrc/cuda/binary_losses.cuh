// Binary losses device code: binary_cross_entropy, binary_cross_entropy_with_logits and sigmoid_focal_loss,
// forward (unreduced, or per-block partial sums plus a finish kernel) and backward.
//
// Device code only. It includes nothing but compat.cuh and the shared device headers acc_type.cuh (with the
// math in the accumulation dtype), merged_dims.cuh and reduce.cuh (and standard headers), so that the same
// source compiles under nvcc and, as plain C++, under the SIMT emulator (tests/simt). Every global memory
// access goes through xent::cuda::load_global / store_global (the emulator counts the bytes). Host launch
// code: binary_losses.cu.
//
// Note [CUDA binary loss kernels]
// -------------------------------
// The losses are elementwise over the input's flat index i in [0, numel). The host hands the kernels
// contiguous input and target (as the CPU op, it copies a non-contiguous one first; a misaligned one is
// used as is), and writes a contiguous loss (reduction none) or gradient.
//
// Work: a thread handles kVectorsPerThread vectors of V consecutive elements, strided by kBlock so that
// every access is coalesced; a block handles kVectorsPerBlock vectors. V = 16 / sizeof(T) (one 128-bit
// access per vector) when input, target, the output and every dense operand read as vectors have the same
// address modulo 16; the elements before the first 16-byte boundary (the head, < V) and after the last
// whole vector (the tail, < V) are handled one by one by block 0. Any other alignment runs the V = 1
// instantiation (scalar, still coalesced). The block layout depends only on the shapes and that
// alignment, never on the device, so sums are bitwise reproducible.
//
// Operands (weight, pos_weight, and the backward's grad_loss for reduction none) broadcast against the
// input and are read in place through their (0-)strides, never expanded into an input-sized copy:
//   kOne      absent (weight, pos_weight: exactly PyTorch's missing tensor, no (pw - 1) y term).
//   kScalar   one element (a one-element tensor, or all strides 0 such as the grad_loss that loss.sum()'s
//             backward expands): thread 0 of each block reads it into shared memory.
//   kVector   dense (offset i) in the input's dtype with the input's alignment: read as vectors.
//   kStrided  offset = sum_d coord_d(i) * stride_d over up to kMaxOperandDims merged dims (size-1 dims
//             dropped, contiguous runs merged; per class (N, C) -> strides (0, 1), per row -> (1, 0), a
//             transposed grad_loss, a dense operand in the accumulation dtype). A vector's first offset
//             costs one division per merged dim; the next elements carry coordinates like an odometer.
//             (More than kMaxOperandDims merged dims: the host materializes a contiguous operand.)
// An operand is stored in the input's dtype or in the accumulation dtype (`in_acc`).
//
// Arithmetic (per element, in acc_t = float, or double for double inputs; x = input, y = target, w =
// weight, pw = pos_weight, s = upstream gradient, p = sigmoid(x), q = sigmoid(-x), L = 1 + (pw - 1) y),
// the formulas of the CPU kernels (csrc/cpu/binary_loss_kernels_impl.h, which derives them):
//   bce      loss = w ((y - 1) max(log1p(-x), -100) - y max(log x, -100)); x or y outside [0, 1] (or NaN)
//            fails the device-side assert XENT_BCE_INPUT_OUT_OF_RANGE / XENT_BCE_TARGET_OUT_OF_RANGE (the
//            CPU op raises, PyTorch's CUDA kernel asserts).
//            grad = s (x - y) / max((1 - x) x, 1e-12f) w
//   logits   loss = w (((x >= 0) ? (1 - y) x : -pw y x) + L log1p(exp(-|x|))) (no cancellation; PyTorch's
//            expression for infinite x, e.g. NaN for x = -inf); grad = s w ((1 - y) p - pw y q)
//   focal    loss = a ce f, ce the logits loss, m = (1 - y) p + y q, f = m^gamma (products for integer
//            gamma, pow otherwise), a = alpha y + (1 - alpha)(1 - y) or 1 for alpha < 0;
//            grad = s a w ((d ce_u / dx) f + ce_u gamma m^(gamma - 1) p q (1 - 2 y)).
// Device math (expf, log1pf, logf, powf: 1-2 ulp) differs from the CPU kernels' vector approximations by a
// few ulp: the CUDA and CPU results agree to tolerance, not bitwise.
//
// Reductions (mean / sum): each thread adds its vectors' losses (summed in acc_t within a vector) into a
// double; blocks reduce in a fixed tree (reduce.cuh) and store one double partial each; finish_kernel, a
// single block, adds the partials in a fixed order and divides by numel for mean. No floating-point
// atomics, nothing read back by the host. The backward of mean / sum reads the 0-d grad_loss (as double)
// on the device: s = grad_loss / numel (mean) or grad_loss, rounded to acc_t, as the CPU op.
//
// Traffic: the forward reads each input and target element once (plus dense operands once), the backward
// the same plus grad_loss, and writes each gradient element once. Indices and offsets are int64.
#pragma once

#include "acc_type.cuh"
#include "compat.cuh"
#include "merged_dims.cuh"
#include "reduce.cuh"

#include <cmath>
#include <cstdint>

// The messages of the device-side range checks of binary_cross_entropy (string literals, as compat.cuh
// requires): the CPU op's (and PyTorch's CPU) error messages.
#define XENT_BCE_INPUT_OUT_OF_RANGE "binary_cross_entropy: all elements of input should be between 0 and 1"
#define XENT_BCE_TARGET_OUT_OF_RANGE "binary_cross_entropy: all elements of target should be between 0 and 1"

namespace xent::cuda::binary {

// Every kernel runs kBlock-thread blocks, except finish_kernel (kFinishBlock threads), and declares
// __launch_bounds__(threads, 1) so that ptxas may use the registers the fp64 focal kernels need instead of
// spilling (the emulator defines __launch_bounds__ away).
constexpr int kBlock = 256;
constexpr int kVectorsPerThread = 4;
constexpr int kVectorsPerBlock = kBlock * kVectorsPerThread;
constexpr int kFinishBlock = 512;
constexpr int kMaxOperandDims = kMaxMergedDims;
// Focal: gamma = k integer up to this is computed by products (as the CPU kernels).
constexpr double kMaxIntegerGamma = 64;

enum class Loss : int { bce = 0, logits = 1, focal = 2 };

// A weight, pos_weight or upstream gradient, broadcast against the input (Note [CUDA binary loss kernels]).
// kStrided: the merged dims of the input-shaped view (MergedDims, outermost first).
struct Operand : MergedDims {
  enum Kind : int { kOne = 0, kScalar = 1, kVector = 2, kStrided = 3 };
  int kind = kOne;
  bool in_acc = false;          // data holds acc_t values (else the input's dtype)
  const void* data = nullptr;   // element 0 (the offset of flat index 0 is 0)
};

// Everything the kernels need, by value. acc_t values travel as double (exact for float).
struct Params {
  const void* x = nullptr;  // input (numel) contiguous
  const void* y = nullptr;  // target (numel) contiguous
  int64_t numel = 0;
  int64_t head = 0;  // elements before the first vector
  int64_t nvec = 0;  // whole vectors from `head`
  Operand weight, pos_weight;
  Operand grad;                         // backward, reduction none: the upstream gradient
  const double* grad_total = nullptr;   // backward, mean / sum: the 0-d grad_loss as double
  double grad_divisor = 1;              // numel for mean, else 1
  void* out = nullptr;                  // forward none: the loss; backward: the gradient; (numel) contiguous
  double* partials = nullptr;           // forward mean / sum: [n_blocks] sums; else null
  // Focal options.
  double alpha = 0, gamma = 0;
  int gamma_int = -1;  // k when gamma = k is an integer in [0, kMaxIntegerGamma], else -1
};

// ---------------------------------------------------------------------------------------------------------
// 128-bit accesses index arrays of Vec from a 16-byte aligned base (see vec_base in cross_entropy.cuh: a
// cast of an element offset lets the backend split one STG.E.128 into narrower stores).
template <class T, int V>
__device__ inline const Vec<T, V>* vec_array(const void* base, int64_t head) {
  return reinterpret_cast<const Vec<T, V>*>(static_cast<const T*>(base) + head);
}
template <class T, int V>
__device__ inline Vec<T, V>* vec_array(void* base, int64_t head) {
  return reinterpret_cast<Vec<T, V>*>(static_cast<T*>(base) + head);
}

// ---------------------------------------------------------------------------------------------------------
// Operands.

template <class scalar_t>
__device__ inline typename AccType<scalar_t>::type operand_at(const Operand& op, int64_t off) {
  using acc_t = typename AccType<scalar_t>::type;
  if (op.in_acc) return load_global(static_cast<const acc_t*>(op.data) + off);
  return to_acc(load_global(static_cast<const scalar_t*>(op.data) + off));
}

// Where a kStrided operand's element for flat index i is: its offset and its coordinates (an odometer over
// the merged dims, so that the next index costs additions).
struct Cursor {
  int64_t off;
  int64_t coord[kMaxOperandDims];
};

__device__ inline Cursor cursor_at(const Operand& op, int64_t i) {
  Cursor c;
  c.off = 0;
XENT_UNROLL
  for (int d = kMaxOperandDims - 1; d >= 0; --d) {
    c.coord[d] = 0;
    if (d < op.ndim) {
      if (d == 0) {
        c.coord[d] = i;
      } else {
        const int64_t q = i / op.size[d];
        c.coord[d] = i - q * op.size[d];
        i = q;
      }
      c.off += c.coord[d] * op.stride[d];
    }
  }
  return c;
}

// The cursor of the next flat index.
__device__ inline void advance(const Operand& op, Cursor& c) {
  bool carry = true;
XENT_UNROLL
  for (int d = kMaxOperandDims - 1; d >= 0; --d) {
    if (carry && d < op.ndim) {
      if (d == 0 || c.coord[d] + 1 < op.size[d]) {
        ++c.coord[d];
        c.off += op.stride[d];
        carry = false;
      } else {
        c.off -= c.coord[d] * op.stride[d];
        c.coord[d] = 0;
      }
    }
  }
}

// The operand's values for the V elements from flat index i0, the vector j of the vectorized range (V > 1),
// given the operand's value when it is kOne / kScalar (`uniform`).
template <class scalar_t, int V>
__device__ inline void operand_values(const Operand& op, typename AccType<scalar_t>::type uniform, int64_t head,
                                      int64_t j, int64_t i0, typename AccType<scalar_t>::type (&v)[V]) {
  if (op.kind == Operand::kOne || op.kind == Operand::kScalar) {
XENT_UNROLL
    for (int e = 0; e < V; ++e) v[e] = uniform;
  } else if (V > 1 && op.kind == Operand::kVector) {
    const Vec<scalar_t, V> r = load_global(vec_array<scalar_t, V>(op.data, head) + j);
XENT_UNROLL
    for (int e = 0; e < V; ++e) v[e] = to_acc(r.val[e]);
  } else {
    Cursor c = cursor_at(op, i0);
XENT_UNROLL
    for (int e = 0; e < V; ++e) {
      v[e] = operand_at<scalar_t>(op, c.off);
      if (e + 1 < V) advance(op, c);
    }
  }
}

// One element's operand value (head, tail and the V = 1 kernels).
template <class scalar_t>
__device__ inline typename AccType<scalar_t>::type operand_value(const Operand& op,
                                                                 typename AccType<scalar_t>::type uniform,
                                                                 int64_t i) {
  if (op.kind == Operand::kOne || op.kind == Operand::kScalar) return uniform;
  if (op.kind == Operand::kVector) return operand_at<scalar_t>(op, i);
  return operand_at<scalar_t>(op, cursor_at(op, i).off);
}

// ---------------------------------------------------------------------------------------------------------
// Per-call constants and the per-element formulas.

template <class T>
struct Consts {
  bool has_pos_weight;
  bool alpha_on;
  T alpha, one_minus_alpha, gamma, gamma_minus_one;
  int gamma_int;
};

template <class T>
__device__ inline Consts<T> consts_of(const Params& a) {
  Consts<T> c;
  c.has_pos_weight = a.pos_weight.kind != Operand::kOne;
  c.alpha_on = a.alpha >= 0;
  c.alpha = static_cast<T>(a.alpha);
  c.one_minus_alpha = static_cast<T>(1.0 - a.alpha);
  c.gamma = static_cast<T>(a.gamma);
  c.gamma_minus_one = static_cast<T>(a.gamma - 1.0);
  c.gamma_int = a.gamma_int;
  return c;
}

// exp(-|x|) and what follows from it.
template <class T>
struct Sigmoid {
  T e, d;       // exp(-|x|), 1 / (1 + e)
  bool nonneg;  // x >= 0 (false for NaN)
  __device__ explicit Sigmoid(T x) {
    e = acc_exp(-acc_abs(x));
    d = T(1) / (T(1) + e);
    nonneg = x >= T(0);
  }
  __device__ T p() const { return nonneg ? d : e * d; }  // sigmoid(x)
  __device__ T q() const { return nonneg ? e * d : d; }  // sigmoid(-x) = 1 - sigmoid(x), accurately
};

// ce_u, the with-logits loss before the weight; sp = log1p(exp(-|x|)), pwy = pw y, L = 1 + (pw - 1) y.
template <class T>
__device__ inline T logits_loss_unweighted(T x, T y, T pwy, T L, T sp) {
  if (acc_abs(x) == static_cast<T>(INFINITY)) {
    // PyTorch's expression (1 - y) x - L (min(x, 0) - sp), e.g. NaN for x = -inf.
    return (T(1) - y) * x - L * (acc_min(x, T(0)) - sp);
  }
  return (x >= T(0) ? (T(1) - y) * x : -(pwy * x)) + L * sp;
}

template <class T>
__device__ inline void pos_weight_terms(const Consts<T>& c, T y, T pw, T& pwy, T& L) {
  if (c.has_pos_weight) {
    pwy = pw * y;
    L = (pw - T(1)) * y + T(1);  // ATen's (pos_weight - 1) * target + 1
  } else {
    pwy = y;
    L = T(1);
  }
}

// f = m^gamma and, when h != null, h = m^(gamma - 1) (gamma_int > 0: products, left to right as torch's pow
// for small integers; gamma_int == 0: f = 1; else pow).
template <class T>
__device__ inline void focal_powers(const Consts<T>& c, T m, T& f, T* h) {
  if (c.gamma_int == 0) {
    f = T(1);
  } else if (c.gamma_int > 0) {
    T hk = T(1);
    if (c.gamma_int > 1) {
      hk = m;
      for (int i = 2; i < c.gamma_int; ++i) hk = hk * m;
    }
    f = c.gamma_int == 1 ? m : hk * m;
    if (h != nullptr) *h = hk;
  } else {
    f = acc_pow(m, c.gamma);
    if (h != nullptr) *h = acc_pow(m, c.gamma_minus_one);  // not f / m: m = 0 with gamma < 1 must give inf
  }
}

template <class T>
__device__ inline T alpha_t(const Consts<T>& c, T y) {
  return c.alpha * y + c.one_minus_alpha * (T(1) - y);
}

template <Loss L, class T>
__device__ inline T loss_of(const Consts<T>& c, T x, T y, T w, T pw) {
  if constexpr (L == Loss::bce) {
    // ATen's checks; NaN fails both comparisons.
    XENT_DEVICE_ASSERT(x >= T(0) && x <= T(1), XENT_BCE_INPUT_OUT_OF_RANGE);
    XENT_DEVICE_ASSERT(y >= T(0) && y <= T(1), XENT_BCE_TARGET_OUT_OF_RANGE);
    const T log_x = acc_max(acc_log(x), T(-100));
    const T log_1mx = acc_max(acc_log1p(-x), T(-100));
    return ((y - T(1)) * log_1mx - y * log_x) * w;
  } else if constexpr (L == Loss::logits) {
    const T sp = acc_log1p(acc_exp(-acc_abs(x)));  // the forward needs no sigmoid
    T pwy, Lw;
    pos_weight_terms(c, y, pw, pwy, Lw);
    return logits_loss_unweighted(x, y, pwy, Lw, sp) * w;
  } else {
    const Sigmoid<T> sg(x);
    T pwy, Lw;
    pos_weight_terms(c, y, pw, pwy, Lw);
    const T ce = logits_loss_unweighted(x, y, pwy, Lw, acc_log1p(sg.e)) * w;
    const T m = (T(1) - y) * sg.p() + y * sg.q();
    T f;
    focal_powers(c, m, f, static_cast<T*>(nullptr));
    const T loss = ce * f;
    return c.alpha_on ? alpha_t(c, y) * loss : loss;
  }
}

template <Loss L, class T>
__device__ inline T grad_of(const Consts<T>& c, T x, T y, T w, T pw, T s) {
  if constexpr (L == Loss::bce) {
    // ATen's EPSILON is the float 1e-12 (9.9999999600e-13), also for float64.
    const T eps = static_cast<T>(1e-12f);
    return s * (x - y) / acc_max((T(1) - x) * x, eps) * w;
  } else if constexpr (L == Loss::logits) {
    const Sigmoid<T> sg(x);
    const T pwy = c.has_pos_weight ? pw * y : y;
    return s * ((T(1) - y) * sg.p() - pwy * sg.q()) * w;
  } else {
    const Sigmoid<T> sg(x);
    const T p = sg.p(), q = sg.q();
    T pwy, Lw;
    pos_weight_terms(c, y, pw, pwy, Lw);
    const T dce = (T(1) - y) * p - pwy * q;
    const T m = (T(1) - y) * p + y * q;
    T f, h = T(0);
    focal_powers(c, m, f, &h);
    T g = dce * f;
    if (c.gamma_int != 0) {
      const T ce = logits_loss_unweighted(x, y, pwy, Lw, acc_log1p(sg.e));
      const T dm = p * q * (T(1) - y - y);
      g = g + ce * (c.gamma * h) * dm;
    }
    g = s * g * w;
    return c.alpha_on ? alpha_t(c, y) * g : g;
  }
}

// Thread 0 reads the uniform operand values (kScalar operands, the mean / sum upstream gradient) into
// shared memory for the block: [weight, pos_weight, upstream gradient]; 1 for absent ones.
template <class scalar_t>
__device__ inline void load_uniforms(const Params& a, typename AccType<scalar_t>::type* sh) {
  using acc_t = typename AccType<scalar_t>::type;
  if (threadIdx.x == 0) {
    sh[0] = a.weight.kind == Operand::kScalar ? operand_at<scalar_t>(a.weight, 0) : acc_t(1);
    sh[1] = a.pos_weight.kind == Operand::kScalar ? operand_at<scalar_t>(a.pos_weight, 0) : acc_t(1);
    if (a.grad_total != nullptr) {
      sh[2] = static_cast<acc_t>(load_global(a.grad_total) / a.grad_divisor);
    } else {
      sh[2] = a.grad.kind == Operand::kScalar ? operand_at<scalar_t>(a.grad, 0) : acc_t(1);
    }
  }
  __syncthreads();
}

// ---------------------------------------------------------------------------------------------------------
// The elementwise pass shared by the forward and the backward.

// The inputs of V consecutive elements: input and target as stored, the operands in acc_t (the upstream
// gradient s only in the backward).
template <class scalar_t, int V>
struct Inputs {
  using acc_t = typename AccType<scalar_t>::type;
  Vec<scalar_t, V> x, y;
  acc_t w[V], pw[V], s[V];
};

// Vector j of the vectorized range (V > 1), or element j of the V = 1 kernels: flat indices head + j * V, ...
template <bool kUpstream, class scalar_t, int V>
__device__ inline Inputs<scalar_t, V> vector_inputs(const Params& a, const typename AccType<scalar_t>::type* uni,
                                                    int64_t j) {
  Inputs<scalar_t, V> in;
  const int64_t i0 = a.head + j * V;
  in.x = load_global(vec_array<scalar_t, V>(a.x, a.head) + j);
  in.y = load_global(vec_array<scalar_t, V>(a.y, a.head) + j);
  operand_values<scalar_t, V>(a.weight, uni[0], a.head, j, i0, in.w);
  operand_values<scalar_t, V>(a.pos_weight, uni[1], a.head, j, i0, in.pw);
  if constexpr (kUpstream) operand_values<scalar_t, V>(a.grad, uni[2], a.head, j, i0, in.s);
  return in;
}

// Element i of the scalar head or tail of the vector kernels.
template <bool kUpstream, class scalar_t>
__device__ inline Inputs<scalar_t, 1> element_inputs(const Params& a, const typename AccType<scalar_t>::type* uni,
                                                     int64_t i) {
  Inputs<scalar_t, 1> in;
  in.x.val[0] = load_global(static_cast<const scalar_t*>(a.x) + i);
  in.y.val[0] = load_global(static_cast<const scalar_t*>(a.y) + i);
  in.w[0] = operand_value<scalar_t>(a.weight, uni[0], i);
  in.pw[0] = operand_value<scalar_t>(a.pos_weight, uni[1], i);
  if constexpr (kUpstream) in.s[0] = operand_value<scalar_t>(a.grad, uni[2], i);
  return in;
}

// A block's share of the pass: vector(j) for its vectors (kVectorsPerThread per thread, strided by kBlock so
// that every access is coalesced), then, in block 0 of the vector kernels, element(i) for the scalar head
// and tail (< V elements each).
template <int V, class VectorF, class ElementF>
__device__ inline void for_each_part(const Params& a, const VectorF& vector, const ElementF& element) {
  const int64_t j0 = static_cast<int64_t>(blockIdx.x) * kVectorsPerBlock + threadIdx.x;
XENT_UNROLL
  for (int k = 0; k < kVectorsPerThread; ++k) {
    const int64_t j = j0 + static_cast<int64_t>(k) * kBlock;
    if (j >= a.nvec) break;
    vector(j);
  }
  if (V > 1 && blockIdx.x == 0) {
    const int64_t tail_begin = a.head + a.nvec * V;
    if (threadIdx.x < a.head) element(static_cast<int64_t>(threadIdx.x));
    if (tail_begin + threadIdx.x < a.numel) element(tail_begin + threadIdx.x);
  }
}

// ---------------------------------------------------------------------------------------------------------
// Forward.

template <Loss L, class scalar_t, int V>
__device__ inline void fwd_body(const Params& a) {
  using acc_t = typename AccType<scalar_t>::type;
  __shared__ acc_t sh_uniform[3];
  __shared__ double sh_sum[kBlock / 32];
  load_uniforms<scalar_t>(a, sh_uniform);
  const Consts<acc_t> c = consts_of<acc_t>(a);
  const bool reduce = a.partials != nullptr;
  double total = 0;
  for_each_part<V>(
      a,
      [&](int64_t j) {
        const Inputs<scalar_t, V> in = vector_inputs<false, scalar_t, V>(a, sh_uniform, j);
        Vec<scalar_t, V> out;
        acc_t sum = 0;
XENT_UNROLL
        for (int e = 0; e < V; ++e) {
          const acc_t l = loss_of<L>(c, to_acc(in.x.val[e]), to_acc(in.y.val[e]), in.w[e], in.pw[e]);
          sum += l;
          out.val[e] = from_acc<scalar_t>(l);
        }
        if (reduce) {
          total += static_cast<double>(sum);
        } else {
          store_global(vec_array<scalar_t, V>(a.out, a.head) + j, out);
        }
      },
      [&](int64_t i) {
        const Inputs<scalar_t, 1> in = element_inputs<false, scalar_t>(a, sh_uniform, i);
        const acc_t l = loss_of<L>(c, to_acc(in.x.val[0]), to_acc(in.y.val[0]), in.w[0], in.pw[0]);
        if (!reduce) store_global(static_cast<scalar_t*>(a.out) + i, from_acc<scalar_t>(l));
        total += static_cast<double>(l);
      });
  // `reduce` is uniform over the grid: block_sum's barrier is reached by every thread or none.
  if (reduce) store_block_sum<kBlock>(total, sh_sum, a.partials);
}

template <class scalar_t>
struct FinishParams {
  const double* partials = nullptr;  // [n]
  int64_t n = 0;
  double divisor = 1;  // numel for mean, else 1
  scalar_t* loss = nullptr;  // the 0-d loss
};

// A single block: sums the partials in a fixed order and writes the loss (for an empty input the host
// writes it without a launch).
template <class scalar_t>
__global__ void __launch_bounds__(kFinishBlock, 1) finish_kernel(const FinishParams<scalar_t> f) {
  using acc_t = typename AccType<scalar_t>::type;
  __shared__ double sh_sum[kFinishBlock / 32];
  const double total = block_sum_of<kFinishBlock>(f.partials, f.n, sh_sum);
  // Rounded to the accumulation dtype, then to scalar_t (as nll_loss's finish).
  if (threadIdx.x == 0) store_global(f.loss, from_acc<scalar_t>(static_cast<acc_t>(total / f.divisor)));
}

// ---------------------------------------------------------------------------------------------------------
// Backward.

template <Loss L, class scalar_t, int V>
__device__ inline void bwd_body(const Params& a) {
  using acc_t = typename AccType<scalar_t>::type;
  __shared__ acc_t sh_uniform[3];
  load_uniforms<scalar_t>(a, sh_uniform);
  const Consts<acc_t> c = consts_of<acc_t>(a);
  for_each_part<V>(
      a,
      [&](int64_t j) {
        const Inputs<scalar_t, V> in = vector_inputs<true, scalar_t, V>(a, sh_uniform, j);
        Vec<scalar_t, V> g;
XENT_UNROLL
        for (int e = 0; e < V; ++e) {
          const acc_t x = to_acc(in.x.val[e]), y = to_acc(in.y.val[e]);
          g.val[e] = from_acc<scalar_t>(grad_of<L>(c, x, y, in.w[e], in.pw[e], in.s[e]));
        }
        store_global(vec_array<scalar_t, V>(a.out, a.head) + j, g);
      },
      [&](int64_t i) {
        const Inputs<scalar_t, 1> in = element_inputs<true, scalar_t>(a, sh_uniform, i);
        const acc_t g = grad_of<L>(c, to_acc(in.x.val[0]), to_acc(in.y.val[0]), in.w[0], in.pw[0], in.s[0]);
        store_global(static_cast<scalar_t*>(a.out) + i, from_acc<scalar_t>(g));
      });
}

// ---------------------------------------------------------------------------------------------------------
// The kernels: the vector ones (kVectorWidth elements per vector, 128-bit accesses) and the scalar ones
// (V = 1, any alignment).
template <class scalar_t>
constexpr int kVectorWidth = 16 / static_cast<int>(sizeof(scalar_t));

template <Loss L, class scalar_t>
__global__ void __launch_bounds__(kBlock, 1) fwd_vector_kernel(const Params a) {
  fwd_body<L, scalar_t, kVectorWidth<scalar_t>>(a);
}
template <Loss L, class scalar_t>
__global__ void __launch_bounds__(kBlock, 1) bwd_vector_kernel(const Params a) {
  bwd_body<L, scalar_t, kVectorWidth<scalar_t>>(a);
}
template <Loss L, class scalar_t>
__global__ void __launch_bounds__(kBlock, 1) fwd_scalar_kernel(const Params a) {
  fwd_body<L, scalar_t, 1>(a);
}
template <Loss L, class scalar_t>
__global__ void __launch_bounds__(kBlock, 1) bwd_scalar_kernel(const Params a) {
  bwd_body<L, scalar_t, 1>(a);
}

} // namespace xent::cuda::binary
