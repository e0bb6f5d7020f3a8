// Host launch code of the CUDA binary-loss ops: binary_cross_entropy, binary_cross_entropy_with_logits and
// sigmoid_focal_loss (device code and Note [CUDA binary loss kernels]: binary_losses.cuh). Semantics: exactly
// the CPU ops' (csrc/cpu/binary_losses.cpp), which are PyTorch's and torchvision's; the argument checks are
// shared with them (csrc/binary_losses_host.h).
//
// The same file is compiled by g++ for the SIMT emulator (tests/simt/emulated_ops.cpp, XENT_SIMT_EMULATOR):
// then the tensors are CPU tensors, launches run the device code on the CPU and the ops are CPU kernels of
// the `xent_emulated` library. Everything that differs lives in host_compat.h. (The emulated build compiles
// every .cu of csrc/cuda into one translation unit: this file's host helpers live in their own namespace.)
//
// No host synchronisation: nothing computed on the device is read here. Mean and sum are reduced on the
// device in a fixed order (finish_kernel); the backward reads grad_loss on the device. The small tensor
// conversions below (an operand to the accumulation dtype, a 0-d grad_loss to double) are device ops.
//
// Layout, as the CPU op: a non-contiguous input or target is copied to contiguous memory first (an
// elementwise loss has no better order to exploit, and the loss / gradient are contiguous, as the fake
// kernels in xent/_binary_ops.py promise); a misaligned one is read in place. weight, pos_weight and
// grad_loss are read in place through their strides (broadcast dims have stride 0).
#include "binary_loss_ops.h"
#include "binary_losses.cuh"
#include "binary_losses_host.h"
#include "host_compat.h"

#include <ATen/core/Reduction.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <optional>
#include <type_traits>
#include <vector>

namespace xent::cuda::binary_host {
namespace {

using binary::Loss;
using binary::Operand;

// The device code's name for a loss (its kernels' template argument).
constexpr Loss device_loss(BinaryLossKind kind) {
  switch (kind) {
    case BinaryLossKind::bce: return Loss::bce;
    case BinaryLossKind::bce_with_logits: return Loss::logits;
    case BinaryLossKind::sigmoid_focal: return Loss::focal;
  }
  return Loss::bce;  // unreachable: every kind is listed
}

using host::ceil_div;

at::ScalarType acc_of(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

uintptr_t address_mod16(const void* p) { return reinterpret_cast<uintptr_t>(p) & 15; }

// An operand (Note [CUDA binary loss kernels]) for `t`, which broadcasts to the input (checked), or its
// upstream gradient. `keep` holds any converted copy alive until the launch has been issued (the caching
// allocator keeps its memory for the stream).
Operand describe_operand(const at::Tensor& t_in, const at::Tensor& input, std::vector<at::Tensor>& keep) {
  Operand op;
  if (!t_in.defined()) return op;
  const at::ScalarType acc = acc_of(input.scalar_type());
  at::Tensor t = t_in;
  if (t.scalar_type() != input.scalar_type() && t.scalar_type() != acc) {
    t = t.to(acc);  // e.g. an int64 or float64 weight of a float32 input: converted on the device
    keep.push_back(t);
  }
  op.in_acc = t.scalar_type() != input.scalar_type();
  op.data = t.const_data_ptr();
  if (t.numel() == 1) {
    op.kind = Operand::kScalar;
    return op;
  }
  // The merged dims of the input-shaped view (broadcast dims, stride 0, merge with each other).
  const at::Tensor e = t.expand(input.sizes());
  std::optional<MergedDims> dims = host::merge_dims(e);
  if (dims && dims->ndim == 1 && dims->stride[0] == 0) {  // e.g. a (1, 1) weight of a one-row input
    op.kind = Operand::kScalar;
    return op;
  }
  if (!dims) {
    // Rare (more than kMaxOperandDims non-mergeable dims): an input-shaped contiguous copy.
    t = e.contiguous();
    keep.push_back(t);
    op.data = t.const_data_ptr();
    dims = MergedDims{};
    dims->size[0] = input.numel();
    dims->stride[0] = 1;
  }
  op.kind = Operand::kStrided;
  static_cast<MergedDims&>(op) = *dims;
  return op;
}

bool dense(const Operand& op) { return op.kind == Operand::kStrided && op.ndim == 1 && op.stride[0] == 1; }

struct Prepared {
  at::Tensor input, target;
  std::vector<at::Tensor> keep;
  binary::Params params;
  bool vectorized = false;  // V = 16 / element size, else V = 1
  unsigned blocks = 0;
};

// Contiguous input and target, operands, focal options; the work split is chosen by split() once every
// pointer (the output's too) is known.
Prepared prepare(const at::Tensor& input, const at::Tensor& target, const std::optional<at::Tensor>& weight,
                 const std::optional<at::Tensor>& pos_weight, const BinaryLossOptions& o) {
  check_binary_loss_inputs(binary_loss_name(o.kind), o.kind == BinaryLossKind::bce, input, target, weight, pos_weight,
                           o.reduction);
  Prepared pr;
  pr.input = input.contiguous();
  pr.target = target.contiguous();
  binary::Params& a = pr.params;
  a.x = pr.input.const_data_ptr();
  a.y = pr.target.const_data_ptr();
  a.numel = pr.input.numel();
  if (a.numel == 0) return pr;
  a.weight = describe_operand(weight.value_or(at::Tensor()), pr.input, pr.keep);
  a.pos_weight = describe_operand(pos_weight.value_or(at::Tensor()), pr.input, pr.keep);
  a.alpha = o.alpha;
  a.gamma = o.gamma;
  a.gamma_int = -1;
  if (o.gamma >= 0 && o.gamma <= binary::kMaxIntegerGamma) {
    const int k = static_cast<int>(o.gamma);
    if (static_cast<double>(k) == o.gamma) a.gamma_int = k;
  }
  return pr;
}

// Vector or scalar kernels, head, vectors and blocks (Note [CUDA binary loss kernels]): vectorized when the
// input, target, the output (if any) and every dense operand in the input's dtype share the input's
// address modulo 16. Dense operands that do are then read as vectors (kVector).
void split(Prepared& pr, const void* out) {
  binary::Params& a = pr.params;
  const int64_t elt = pr.input.element_size();
  const int64_t V = 16 / elt;
  const uintptr_t mod = address_mod16(a.x);
  bool vec = mod % elt == 0 && address_mod16(a.y) == mod && (out == nullptr || address_mod16(out) == mod);
  // Dense operands in the input's dtype that do not share the alignment are read element by element; they
  // do not prevent the vector kernels.
  int64_t head = vec ? static_cast<int64_t>(((16 - mod) & 15) / elt) : 0;
  if (head > a.numel) head = a.numel;
  if (vec) {
    for (Operand* op : {&a.weight, &a.pos_weight, &a.grad}) {
      if (dense(*op) && !op->in_acc && address_mod16(op->data) == mod) op->kind = Operand::kVector;
    }
  }
  a.head = vec ? head : 0;
  a.nvec = vec ? (a.numel - head) / V : a.numel;
  pr.vectorized = vec;
  const int64_t blocks = std::max<int64_t>(1, ceil_div(a.nvec, binary::kVectorsPerBlock));
  TORCH_CHECK(blocks <= std::numeric_limits<int32_t>::max(), "binary losses: input too large for the CUDA kernels");
  pr.blocks = static_cast<unsigned>(blocks);
}

// The elementwise kernel of the forward or the backward: the loss `kind`, the input's dtype, vector or scalar.
void launch_pass(BinaryLossKind kind, const Prepared& pr, bool backward, xent_stream_t stream) {
  host::dispatch_float_dtype(pr.input.scalar_type(), binary_loss_name(kind), [&](auto tag) {
    using scalar_t = typename decltype(tag)::type;
    using host::ValueCase;
    auto launch = [&](auto loss) {
      constexpr Loss L = decltype(loss)::value;
      auto* kernel = backward
          ? (pr.vectorized ? &binary::bwd_vector_kernel<L, scalar_t> : &binary::bwd_scalar_kernel<L, scalar_t>)
          : (pr.vectorized ? &binary::fwd_vector_kernel<L, scalar_t> : &binary::fwd_scalar_kernel<L, scalar_t>);
      XENT_LAUNCH(pr.blocks, binary::kBlock, 0, stream, kernel)(pr.params);
      XENT_CUDA_LAUNCH_CHECK();
    };
    host::dispatch_cases<ValueCase<Loss::bce>, ValueCase<Loss::logits>, ValueCase<Loss::focal>>(device_loss(kind),
                                                                                                launch);
  });
}

// The ops: binary_loss_ops.h registers them for the schemas of csrc/ops.cpp.
struct BinaryLossesOnCuda {
  static at::Tensor forward(const at::Tensor& input, const at::Tensor& target, const std::optional<at::Tensor>& weight,
                            const std::optional<at::Tensor>& pos_weight, const BinaryLossOptions& o) {
    // The checks first (a guard for a tensor on another device type would fail less clearly); the copies in
    // prepare() guard their own device.
    Prepared pr = prepare(input, target, weight, pos_weight, o);
    const int64_t reduction = o.reduction;
    host::DeviceGuard guard(input.device());
    const bool none = reduction == at::Reduction::None;
    at::Tensor loss = none ? at::empty(input.sizes(), input.options()) : at::empty({}, input.options());
    binary::Params& a = pr.params;
    if (a.numel == 0) {
      host::fill_empty_reduction(loss, reduction);
      return loss;
    }
    split(pr, none ? loss.const_data_ptr() : nullptr);
    at::Tensor partials;
    if (none) {
      a.out = loss.mutable_data_ptr();
    } else {
      partials = at::empty({static_cast<int64_t>(pr.blocks)}, input.options().dtype(at::kDouble));
      a.partials = partials.mutable_data_ptr<double>();
    }
    const xent_stream_t stream = host::current_stream(input.device());
    launch_pass(o.kind, pr, /*backward=*/false, stream);
    if (!none) {
      host::dispatch_float_dtype(input.scalar_type(), binary_loss_name(o.kind), [&](auto tag) {
        using scalar_t = typename decltype(tag)::type;
        binary::FinishParams<scalar_t> f;
        f.partials = partials.const_data_ptr<double>();
        f.n = pr.blocks;
        f.divisor = reduction == at::Reduction::Mean ? static_cast<double>(a.numel) : 1.0;
        f.loss = static_cast<scalar_t*>(loss.mutable_data_ptr());
        auto* kernel = &binary::finish_kernel<scalar_t>;
        XENT_LAUNCH(1, binary::kFinishBlock, 0, stream, kernel)(f);
        XENT_CUDA_LAUNCH_CHECK();
      });
    }
    return loss;
  }

  static at::Tensor backward(const at::Tensor& grad_loss, const at::Tensor& input, const at::Tensor& target,
                             const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& pos_weight,
                             const BinaryLossOptions& o) {
    Prepared pr = prepare(input, target, weight, pos_weight, o);
    const int64_t reduction = o.reduction;
    check_binary_loss_grad(binary_loss_name(o.kind), grad_loss, input, reduction);
    host::DeviceGuard guard(input.device());
    at::Tensor grad = at::empty(input.sizes(), input.options());
    binary::Params& a = pr.params;
    if (a.numel == 0) return grad;
    at::Tensor grad_total;
    if (reduction == at::Reduction::None) {
      // Any strides: the expanded scalar of loss.sum()'s backward (all strides 0) becomes kScalar, an
      // expanded row kStrided with stride 0, a contiguous one kVector.
      a.grad = describe_operand(grad_loss, pr.input, pr.keep);
    } else {
      // The 0-d upstream gradient in double, read on the device (the CPU op's item<double>()).
      grad_total = grad_loss.to(at::kDouble);
      a.grad_total = grad_total.const_data_ptr<double>();
      a.grad_divisor = reduction == at::Reduction::Mean ? static_cast<double>(a.numel) : 1.0;
    }
    split(pr, grad.const_data_ptr());
    a.out = grad.mutable_data_ptr();
    launch_pass(o.kind, pr, /*backward=*/true, host::current_stream(input.device()));
    return grad;
  }
};

} // namespace
} // namespace xent::cuda::binary_host

TORCH_LIBRARY_IMPL(XENT_CUDA_LIBRARY, XENT_CUDA_DISPATCH_KEY, m) {
  xent::register_binary_losses<xent::cuda::binary_host::BinaryLossesOnCuda>(m);
}
